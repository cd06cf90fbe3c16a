//! Counts that cost nothing at rest (issue 32): an index of 2,000,000 leaf rows, written
//! straight into PostgreSQL, then two nodes on it, idle for 12 s. The triggers counted the
//! rows, so the nodes' `Status` is right from the start; and together the nodes read at most
//! 10,000 rows of the schema's tables (`pg_stat_user_tables`), where a reload of the counters
//! by scanning read millions every 5 s.

use std::time::{Duration, Instant};

use deriva_server::proto::{ClusterStatusRequest, StatusRequest};
use deriva_testkit::backends::{Backends, Fill, Space, fill_index, sessions_ended};
use deriva_testkit::{ServerProcess, sample};

const LEAVES: i64 = 2_000_000;
const LEAF_BYTES: i64 = 1000;
const RECIPES: i64 = 1000;
const IDLE: Duration = Duration::from_secs(12);
/// The most rows the two idle nodes may read together.
const BUDGET: i64 = 10_000;

/// Rows read from the tables of `schema` so far, as the statistics collector has them:
/// sequential scans' tuples and index fetches. Read in a fresh snapshot.
async fn rows_read(pg: &tokio_postgres::Client, schema: &str) -> i64 {
    pg.execute("SELECT pg_stat_clear_snapshot()", &[])
        .await
        .expect("clearing the statistics snapshot");
    pg.query_one(
        "SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0)::bigint
         FROM pg_stat_user_tables WHERE schemaname = $1",
        &[&schema],
    )
    .await
    .expect("reading pg_stat_user_tables")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_idle_nodes_over_two_million_leaves_read_almost_nothing() {
    // A pair of its own: the 2,000,000 rows go away with it.
    let services = Backends::start();
    let space = Space::new("idle");
    let tag = format!("deriva-idle-{}", std::process::id());
    let url = |application_name: &str| {
        format!("{}?application_name={application_name}", services.pg_url())
    };
    let node = || {
        let mut options = ServerProcess::options().args([
            "--blob-store".to_owned(),
            format!("s3://{}/{}", services.bucket(), space.prefix),
            "--index".to_owned(),
            url(&tag),
            "--index-schema".to_owned(),
            space.schema.clone(),
        ]);
        for (key, value) in services.aws_env() {
            options = options.env(key, value);
        }
        options.start()
    };
    let (pg, connection) = tokio_postgres::connect(&services.pg_url(), tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    let connection = tokio::spawn(connection);

    // A first node creates the schema; then a script fills it, as an operator's import would.
    let mut first = node();
    first.stop();
    let filler = format!("{tag}-filler");
    let fill = Fill {
        leaves: LEAVES,
        leaf_bytes: LEAF_BYTES,
        recipes: RECIPES,
    };
    fill_index(&url(&filler), &space.schema, fill).await;
    sessions_ended(&pg, &filler, "%").await;
    sessions_ended(&pg, &tag, "%").await;
    let before = rows_read(&pg, &space.schema).await;

    // Two nodes, idle but for one Status, one ClusterStatus and one scrape each.
    let (mut a, mut b) = (node(), node());
    let idle = Instant::now();
    for n in [&a, &b] {
        let mut client = n.client().await;
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (status.blob_count, status.recipe_count),
            (LEAVES as u64, RECIPES as u64),
            "the triggers counted the rows written straight into the tables"
        );
        let metrics = n.scrape().await;
        assert_eq!(
            sample(&metrics, "deriva_storage_blob_bytes"),
            Some((LEAVES * LEAF_BYTES) as f64)
        );
        let cluster = client
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!cluster.nodes.is_empty(), "{cluster:?}");
    }
    tokio::time::sleep(IDLE.saturating_sub(idle.elapsed())).await;
    a.stop();
    b.stop();
    sessions_ended(&pg, &tag, "%").await;
    let read = rows_read(&pg, &space.schema).await - before;
    eprintln!("two idle nodes over {LEAVES} leaf rows read {read} rows in {IDLE:?}");
    assert!(
        read <= BUDGET,
        "two idle nodes read {read} rows of the index in {IDLE:?}, more than {BUDGET}"
    );

    drop(pg);
    connection.await.unwrap().unwrap();
}
