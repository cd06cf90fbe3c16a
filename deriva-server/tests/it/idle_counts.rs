//! An index of 2,000,000 leaf rows, written straight into PostgreSQL (issue 32), tried as an
//! operator would:
//! - Counts that cost nothing at rest: two nodes on it, idle for 12 s. The triggers counted
//!   the rows, so the nodes' `Status` is right from the start; and together the nodes read at
//!   most 10,000 rows of the schema's tables (`pg_stat_user_tables`), where a reload of the
//!   counters by scanning read millions every 5 s.
//! - Garbage collection in bounded memory: a dry run that finds all 2,000,000 leaves garbage
//!   raises the node's peak RSS at most 64 MiB above its RSS before the call (a mark that
//!   listed the store in the node took it from 14 MB to 555 MB).

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
/// The most a garbage collection's dry run may raise a node's peak RSS above its RSS before.
const GC_MEMORY: u64 = 64 << 20;

/// A field of `/proc/PID/status` in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kib * 1024
}

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
    let node = |extra: &[&str]| {
        let mut options = ServerProcess::options()
            .args([
                "--blob-store".to_owned(),
                format!("s3://{}/{}", services.bucket(), space.prefix),
                "--index".to_owned(),
                url(&tag),
                "--index-schema".to_owned(),
                space.schema.clone(),
            ])
            .args(extra);
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
    let mut first = node(&[]);
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
    let (mut a, mut b) = (node(&[]), node(&[]));
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

    // Garbage collection: every leaf is unreferenced and older than a grace period of 0.
    let mut node = node(&["--gc-min-grace", "0s"]);
    let pid = node.pid().as_raw_nonzero().get() as u32;
    let mut client = node.client().await;
    client.status(StatusRequest {}).await.unwrap();
    // The peak from here on: writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting the peak RSS");
    let before = proc_status_bytes(pid, "VmRSS");
    // As an operator runs it, on a terminal (`script` gives it one), where it shows a bar.
    let collecting = Instant::now();
    let mut cli = std::process::Command::new("script");
    cli.args(["-qec"])
        .arg(format!(
            "{} gc --dry-run --grace 0s --detail",
            deriva_testkit::deriva_bin().display()
        ))
        .arg("/dev/null")
        .env("DERIVA_SERVER", node.url())
        .env("TERM", "xterm");
    let out = deriva_testkit::cli::run(cli, None, Duration::from_secs(300));
    let took = collecting.elapsed();
    let peak = proc_status_bytes(pid, "VmHWM");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.code,
        Some(0),
        "deriva gc --dry-run: {text}{}",
        out.stderr
    );
    eprintln!(
        "gc dry run over {LEAVES} leaves: {took:?}, RSS {} MiB before, peak {} MiB",
        before >> 20,
        peak >> 20
    );
    let line = |key: &str| {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{key}: "))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no {key} in {text}"))
    };
    assert!(
        text.contains("sweep ["),
        "the bar showed the sweep on the terminal: {}",
        &text[..text.len().min(2000)]
    );
    assert_eq!(
        line("blobs_removed"),
        LEAVES.to_string(),
        "every leaf is garbage"
    );
    // The recipe rows, written as 'not read', do not decode: kept and reported.
    assert_eq!(line("recipes_removed"), "0");
    assert_eq!(
        line("bytes_reclaimed_blobs"),
        (LEAVES * LEAF_BYTES).to_string()
    );
    assert!(
        text.contains("(the first 10000 only: the counts above cover them all)"),
        "the first 10,000 addresses are listed, and the answer says there were more"
    );
    assert!(
        peak <= before + GC_MEMORY,
        "a dry run over {LEAVES} leaves took the node from {before} to a peak of {peak} bytes, \
         more than {GC_MEMORY} above"
    );
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        status.blob_count, LEAVES as u64,
        "a dry run removes nothing"
    );
    assert_eq!(status.gc_phase, "idle");
    node.stop();

    drop(pg);
    connection.await.unwrap().unwrap();
}
