//! The remote backend's counts (leaves, their bytes, recipes, pins), kept by PostgreSQL
//! triggers in the `counts` table: after every kind of write, by a node or straight into the
//! tables, the sum of its rows equals a scan of the counted tables, and so do the counters of
//! a node that opens then (it reads those rows, never a scan). A repeated put, which refreshes
//! a row, counts nothing, even when many come at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deriva_core::{CAddr, FunctionId, Params, Recipe};
use deriva_store::Store;
use deriva_store::conformance::Harness;
use deriva_store::gc::GcOptions;
use deriva_store::observe::BackendMetrics;

use crate::conformance::RemoteHarness;

/// Recipes, leaves, leaf bytes, pins.
type Counts = (u64, u64, u64, u64);

/// A connection to the harness's database, for what a script would do and for the scans.
async fn connect(harness: &RemoteHarness) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&harness.services.pg_url(), tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// `sql` with `{s}` replaced by the harness's quoted schema.
fn sql(harness: &RemoteHarness, sql: &str) -> String {
    sql.replace("{s}", &format!("\"{}\"", harness.schema))
}

/// The counts by scanning the tables.
async fn scanned(harness: &RemoteHarness, db: &tokio_postgres::Client) -> Counts {
    let row = db
        .query_one(
            &sql(
                harness,
                "SELECT (SELECT count(*) FROM {s}.recipes), (SELECT count(*) FROM {s}.leaves),
                        (SELECT coalesce(sum(size), 0)::bigint FROM {s}.leaves),
                        (SELECT count(*) FROM {s}.pins)",
            ),
            &[],
        )
        .await
        .expect("scanning the tables");
    let n = |i: usize| row.get::<_, i64>(i) as u64;
    (n(0), n(1), n(2), n(3))
}

/// The counts as the shard rows of `counts` add up.
async fn summed(harness: &RemoteHarness, db: &tokio_postgres::Client) -> Counts {
    let row = db
        .query_one(
            &sql(
                harness,
                "SELECT sum(recipes)::bigint, sum(leaves)::bigint, sum(leaf_bytes)::bigint,
                        sum(pins)::bigint, count(*)
                 FROM {s}.counts",
            ),
            &[],
        )
        .await
        .expect("reading the counts");
    assert_eq!(row.get::<_, i64>(4), 16, "16 shard rows");
    let n = |i: usize| row.get::<_, i64>(i) as u64;
    (n(0), n(1), n(2), n(3))
}

fn counted(store: &Store) -> Counts {
    let c = store.counters();
    (c.recipes(), c.blobs(), c.blob_bytes(), c.pins())
}

/// The triggers' sums equal the scans, and equal `expected`; a node opened now counts the
/// same.
async fn check(harness: &RemoteHarness, db: &tokio_postgres::Client, expected: Counts, at: &str) {
    assert_eq!(scanned(harness, db).await, expected, "{at}: the scans");
    assert_eq!(
        summed(harness, db).await,
        expected,
        "{at}: the counts table"
    );
    let opened = harness.open().await.expect("a node opens");
    assert_eq!(counted(&opened), expected, "{at}: a node opened now");
}

fn concat(inputs: Vec<CAddr>) -> Recipe {
    let concat = FunctionId::new("concat", "v1").unwrap();
    Recipe::new(concat, inputs, Params::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_puts_repeats_collections_pins_and_scripts() {
    let harness = RemoteHarness::new();
    let db = connect(&harness).await;
    // Two nodes on one index.
    let one = Arc::new(harness.open().await.unwrap());
    let two = Arc::new(harness.open().await.unwrap());
    check(&harness, &db, (0, 0, 0, 0), "empty").await;

    let (a, b, c) = (&b"leaf a"[..], &b"leaf bb"[..], &b"leaf ccc"[..]);
    let bytes = (a.len() + b.len() + c.len()) as u64;
    let la = one.put_leaf(Bytes::from_static(a)).await.unwrap();
    let lb = one.put_leaf(Bytes::from_static(b)).await.unwrap();
    assert_eq!(
        counted(&one),
        (0, 2, 13, 0),
        "a node counts its own puts at once"
    );
    let lc = two.put_leaf(Bytes::from_static(c)).await.unwrap();
    // Puts of what is there, through both nodes, refresh rows and count nothing.
    one.put_leaf(Bytes::from_static(a)).await.unwrap();
    two.put_leaf(Bytes::from_static(a)).await.unwrap();
    check(&harness, &db, (0, 3, bytes, 0), "leaves put, some twice").await;

    // Eight writers at once put the same 20 new leaves, and the same 20 again.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = if w % 2 == 0 { one.clone() } else { two.clone() };
            tokio::spawn(async move {
                for round in 0..2 {
                    for i in 0..20 {
                        let data = Bytes::from(format!("shared leaf {i:02}"));
                        store.put_leaf(data).await.unwrap_or_else(|e| {
                            panic!("writer {w}, round {round}: {e}");
                        });
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let shared_bytes = 20 * "shared leaf 00".len() as u64;
    let bytes = bytes + shared_bytes;
    check(
        &harness,
        &db,
        (0, 23, bytes, 0),
        "racing puts of the same leaves",
    )
    .await;

    // Recipes: a put, the same again through the other node, then a batch with it and one
    // more.
    let r1 = one.put_recipe(concat(vec![la, lb])).await.unwrap();
    two.put_recipe(concat(vec![la, lb])).await.unwrap();
    check(&harness, &db, (1, 23, bytes, 0), "a recipe put twice").await;
    let batch = two
        .put_recipes(vec![concat(vec![la, lb]), concat(vec![lc, la])])
        .await
        .unwrap();
    assert_eq!(batch[0], r1);
    let r2 = batch[1];
    check(
        &harness,
        &db,
        (2, 23, bytes, 0),
        "a batch with one new recipe",
    )
    .await;

    // Pins: twice the same, then an unpin.
    assert!(one.pin(la).await.unwrap());
    assert!(one.pin(r2).await.unwrap());
    assert!(!two.pin(la).await.unwrap());
    check(&harness, &db, (2, 23, bytes, 2), "two pins").await;
    assert!(two.unpin(r2).await.unwrap());
    assert!(!one.unpin(r2).await.unwrap());
    check(&harness, &db, (2, 23, bytes, 1), "one unpinned").await;

    // A script writes straight into the tables: 10 leaves of 1,000 bytes, one of them twice.
    db.batch_execute(&sql(
        &harness,
        "INSERT INTO {s}.leaves (addr, size)
             SELECT sha256(int4send(i)), 1000 FROM generate_series(1, 10) i;
         INSERT INTO {s}.leaves (addr, size) VALUES (sha256(int4send(3)), 1000)
             ON CONFLICT (addr) DO UPDATE SET created_at = now();
         DELETE FROM {s}.leaves WHERE addr = sha256(int4send(10));",
    ))
    .await
    .unwrap();
    let bytes = bytes + 9 * 1000;
    check(
        &harness,
        &db,
        (2, 32, bytes, 1),
        "a script's inserts and delete",
    )
    .await;

    // Garbage collection keeps the pinned leaf la and what is young (nothing: grace 0),
    // and removes the rest: both recipes (unpinned, no dependents), then every other leaf.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let outcome = two.collect_garbage(&GcOptions::default()).await.unwrap();
    assert_eq!(outcome.removed.len(), 2 + 31, "{outcome:?}");
    check(
        &harness,
        &db,
        (0, 1, a.len() as u64, 1),
        "after a collection",
    )
    .await;

    // Each node learns the other's writes at its next reload of the counts.
    for store in [&one, &two] {
        let start = std::time::Instant::now();
        while counted(store) != (0, 1, a.len() as u64, 1) {
            assert!(
                start.elapsed() < deriva_store_remote::COUNTS_REFRESH * 3,
                "a node's counters: {:?}",
                counted(store)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A schema from before the counts (version 2) holding rows: the migration counts them once,
/// and the triggers count from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_counts_the_rows_already_there() {
    let harness = RemoteHarness::new();
    let db = connect(&harness).await;
    let store = harness.open().await.unwrap();
    let la = store.put_leaf(Bytes::from_static(b"old a")).await.unwrap();
    let lb = store.put_leaf(Bytes::from_static(b"old bb")).await.unwrap();
    store.put_recipe(concat(vec![la, lb])).await.unwrap();
    store.pin(la).await.unwrap();
    drop(store);
    // Back to version 2: no counts, no triggers, nor what later migrations made; then an
    // older node's writes.
    db.batch_execute(&sql(
        &harness,
        "DROP TABLE {s}.counts, {s}.compute_leases, {s}.outputs;
         DROP FUNCTION {s}.count_changes, {s}.count_truncated CASCADE;
         DELETE FROM {s}.schema_version WHERE version >= 3;
         INSERT INTO {s}.leaves (addr, size)
             SELECT sha256(int4send(i)), 100 FROM generate_series(1, 5) i;",
    ))
    .await
    .unwrap();
    let config = harness.config();
    let store = deriva_store_remote::open(&config, Arc::new(BackendMetrics::noop()))
        .await
        .unwrap()
        .store;
    let expected = (1, 7, 5 + 6 + 500, 1);
    assert_eq!(counted(&store), expected);
    check(&harness, &db, expected, "migrated").await;
    store
        .put_leaf(Bytes::from_static(b"new leaf"))
        .await
        .unwrap();
    check(&harness, &db, (1, 8, 5 + 6 + 500 + 8, 1), "a put after").await;
    let version = db
        .query_one(
            &sql(&harness, "SELECT max(version) FROM {s}.schema_version"),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i32>(0);
    assert_eq!(version, deriva_store_remote::SCHEMA_VERSION);
}
