//! `deriva-server migrate` against the real services (SeaweedFS for S3, PostgreSQL for the
//! index, from `deriva-testkit/backends.sh`):
//!
//! - a local store with thousands of leaves and recipes (a deep chain, a fan-out, a leaf above
//!   the multipart threshold) moves to the remote backend; the first run is killed halfway and
//!   a second finishes it; a third copies nothing; `--verify` passes; a node on the destination
//!   serves every address byte for byte as a node on the source does, with the same counts;
//!   migrating back to a fresh local directory gives the same addresses and depths;
//! - `--include-outputs` carries the output tier, which the destination then serves;
//! - materialization records move, with their outputs or alone;
//! - a damaged leaf stops the migration with `DATA_LOSS` naming it; a store in use, bad flags
//!   and a source that does not exist are refused with a message that says so.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use bytes::Bytes;
/// The server binary cargo built for these tests.
const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");
use deriva_core::{CAddr, FunctionId, Recipe};
use deriva_server::migrate::Report;
use deriva_server::proto::StatusRequest;
use deriva_testkit::backends::{self, Backends};
use deriva_testkit::backends::{Space, node, wait_for};
use deriva_testkit::{DEADLINE, Rng, ServerProcess, get_all, sample};
use futures::StreamExt as _;

/// `deriva-server migrate ARGS`, with the services' `AWS_*` variables and no `DERIVA_*` one.
fn migrate_command(services: &Backends, args: &[&str]) -> Command {
    let mut command = Command::new(SERVER);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("DERIVA_") || name.starts_with("AWS_") {
            command.env_remove(&key);
        }
    }
    command.envs(services.aws_env());
    command.arg("migrate").args(args);
    command.stdin(Stdio::null());
    command
}

/// Runs a migration to its end.
fn migrate(services: &Backends, args: &[&str]) -> Output {
    migrate_command(services, args)
        .output()
        .expect("running deriva-server migrate")
}

/// Runs a migration that must succeed with `--json`, and returns its report.
fn migrate_ok(services: &Backends, args: &[&str]) -> Report {
    let mut all = args.to_vec();
    all.push("--json");
    let out = migrate(services, &all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("a JSON report: {e}: {stdout}"))
}

/// The flags that name `space` on `services`, with `--` or `--to-` flags.
fn remote_flags(services: &Backends, space: &Space, to: bool) -> Vec<String> {
    let p = if to { "--to-" } else { "--" };
    vec![
        format!("{p}blob-store"),
        format!("s3://{}/{}", services.bucket(), space.prefix),
        format!("{p}index"),
        services.pg_url(),
        format!("{p}index-schema"),
        space.schema.clone(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn concat() -> FunctionId {
    FunctionId::new("concat", "v1").unwrap()
}

fn recipe(function: &str, inputs: Vec<CAddr>) -> Recipe {
    Recipe::new(
        FunctionId::new(function, "v1").unwrap(),
        inputs,
        Vec::<(String, String)>::new(),
    )
    .unwrap()
}

/// What the source store holds.
struct Contents {
    leaves: Vec<CAddr>,
    recipes: Vec<CAddr>,
}

/// A local store in `dir` with `n` leaves (the last 20 MiB, above the multipart threshold)
/// and about `n` recipes: a chain 300 deep, a fan-out of one leaf into `n / 2` recipes, and
/// a `reverse` of the other leaves with a second level over some of them.
async fn build_local_store(dir: &Path, n: usize) -> Contents {
    let store = deriva_store_local::open(dir).unwrap();
    let mut rng = Rng::from_env("migrate");
    let mut leaves = Vec::with_capacity(n);
    for i in 0..n {
        let mut data = format!("leaf {i} ").into_bytes();
        let len = if i == n - 1 {
            20 << 20
        } else {
            rng.below(2048) as usize
        };
        data.extend(rng.bytes(len));
        leaves.push(store.put_leaf(Bytes::from(data)).await.unwrap());
    }
    let mut recipes = Vec::new();
    // A chain: identity(l0), then concat(previous, l_k).
    let mut chain = vec![recipe("identity", vec![leaves[0]])];
    for k in 1..300 {
        let previous = chain[k - 1].addr();
        chain.push(
            Recipe::new(
                concat(),
                vec![previous, leaves[k]],
                Vec::<(String, String)>::new(),
            )
            .unwrap(),
        );
    }
    recipes.extend(store.put_recipes(chain).await.unwrap());
    // A fan-out: the hub leaf is an input of n/2 recipes.
    let hub = leaves[1];
    let fan: Vec<Recipe> = (n / 2..n)
        .map(|i| recipe("concat", vec![hub, leaves[i]]))
        .collect();
    let fan = store.put_recipes(fan).await.unwrap();
    // reverse of the leaves 300..n/2, and concat(fan, reverse) over some of them.
    let reversed: Vec<Recipe> = (300..n / 2)
        .map(|i| recipe("reverse", vec![leaves[i]]))
        .collect();
    let reversed = store.put_recipes(reversed).await.unwrap();
    let second: Vec<Recipe> = fan
        .iter()
        .zip(&reversed)
        .step_by(3)
        .map(|(f, r)| recipe("concat", vec![*f, *r]))
        .collect();
    recipes.extend(fan);
    recipes.extend(reversed);
    recipes.extend(store.put_recipes(second).await.unwrap());
    // Three pins: a leaf, the end of the chain, and the last recipe.
    for pinned in [leaves[0], recipes[299], *recipes.last().unwrap()] {
        assert!(store.pin(pinned).await.unwrap());
    }
    let released = store.released();
    drop(store);
    released.wait().await;
    Contents { leaves, recipes }
}

/// Rows of `table` in the index of `space`, counted; 0 before the schema exists.
async fn rows_in_index(services: &Backends, space: &Space, table: &str) -> i64 {
    let Ok((client, connection)) =
        tokio_postgres::connect(&services.pg_url(), tokio_postgres::NoTls).await
    else {
        return 0;
    };
    let task = tokio::spawn(connection);
    let sql = format!("SELECT count(*) FROM \"{}\".{table}", space.schema);
    let n = match client.query_one(&sql, &[]).await {
        Ok(row) => row.get::<_, i64>(0),
        Err(_) => 0,
    };
    drop(client);
    let _ = task.await;
    n
}

/// Every address's bytes through `a` and through `b`, compared; at most 8 Gets at once.
async fn same_bytes(a: &ServerProcess, b: &ServerProcess, addrs: &[CAddr]) {
    let (ca, cb) = (a.client().await, b.client().await);
    let compared = futures::stream::iter(addrs.iter().copied())
        .map(|addr| {
            let (mut ca, mut cb) = (ca.clone(), cb.clone());
            async move {
                let key = Bytes::copy_from_slice(addr.as_bytes());
                let from_a = get_all(&mut ca, &key).await;
                let from_b = get_all(&mut cb, &key).await;
                match (from_a, from_b) {
                    (Ok(x), Ok(y)) => assert!(x == y, "{addr}: the nodes serve different bytes"),
                    (x, y) => panic!("{addr}: {:?} / {:?}", x.err(), y.err()),
                }
            }
        })
        .buffer_unordered(8)
        .count()
        .await;
    assert_eq!(compared, addrs.len());
}

async fn counts(node: &ServerProcess) -> (u64, u64) {
    let status = node
        .client()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    (status.recipe_count, status.blob_count)
}

/// Sorted leaves, and recipes with depths, of the local store in `dir`.
async fn listing(dir: &Path) -> (Vec<CAddr>, Vec<(CAddr, u32)>) {
    let store = deriva_store_local::open(dir).unwrap();
    let mut leaves = store.blobs().list().await.unwrap();
    let mut recipes = store.recipes().list().await.unwrap();
    leaves.sort();
    recipes.sort();
    let released = store.released();
    drop(store);
    released.wait().await;
    (leaves, recipes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_store_moves_to_the_remote_backend_resumably_and_back() {
    let services = backends::shared();
    let space = Space::new("migrate_up");
    let source = tempfile::tempdir().unwrap();
    let contents = build_local_store(source.path(), 2000).await;
    let (n_leaves, n_recipes) = (contents.leaves.len() as u64, contents.recipes.len() as u64);
    assert!(n_recipes >= 1500, "{n_recipes} recipes");
    let src = source.path().to_str().unwrap().to_owned();
    let mut to_remote = vec!["--data-dir".to_owned(), src.clone()];
    to_remote.extend(remote_flags(&services, &space, true));
    // A dry run counts everything and writes nothing.
    let dry = migrate_ok(&services, &[strs(&to_remote), vec!["--dry-run"]].concat());
    assert_eq!(
        (dry.leaves.copied, dry.recipes.copied),
        (n_leaves, n_recipes)
    );
    assert_eq!(dry.mode, "dry-run");
    assert_eq!(dry.pins.copied, 3, "pins are counted too");
    assert_eq!(rows_in_index(&services, &space, "leaves").await, 0);

    // One object at a time, killed twice: once some leaves are in, and once some recipes are.
    let mut verify_args = to_remote.clone();
    verify_args.extend(["--verify".to_owned(), "--json".to_owned()]);
    let mut at_kill = Vec::new();
    for (table, at_least) in [("leaves", 50), ("recipes", 1)] {
        let mut run = migrate_command(
            &services,
            &[strs(&to_remote), vec!["--concurrency", "1"]].concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        wait_for(&format!("the run copies some {table}"), async || {
            rows_in_index(&services, &space, table).await >= at_least
        })
        .await;
        run.kill().unwrap();
        let status = run.wait().unwrap();
        assert!(!status.success(), "the run ended before it was killed");

        // What the kill left is consistent: nothing damaged, no recipe without its inputs;
        // the rest is missing (exit 1, not 3).
        let half = migrate(&services, &strs(&verify_args));
        let stderr = String::from_utf8_lossy(&half.stderr);
        assert_eq!(half.status.code(), Some(1), "{stderr}");
        let half: Report = serde_json::from_slice(&half.stdout).unwrap();
        assert_eq!(
            (half.leaves.failed, half.recipes.failed),
            (0, 0),
            "{:?}",
            half.errors
        );
        let (leaves, recipes) = (half.leaves.checked, half.recipes.checked);
        assert_eq!(
            leaves,
            rows_in_index(&services, &space, "leaves").await as u64
        );
        assert_eq!(half.leaves.missing, n_leaves - leaves);
        assert_eq!(half.recipes.missing, n_recipes - recipes);
        assert!(
            half.leaves.missing + half.recipes.missing > 0,
            "killed after it copied everything"
        );
        at_kill.push((leaves, recipes));
    }
    let (copied_before, recipes_before) = at_kill[1];
    assert!(
        recipes_before > 0 && recipes_before < n_recipes,
        "{at_kill:?}"
    );

    // Run again: only the rest is copied.
    let second = migrate_ok(&services, &strs(&to_remote));
    assert_eq!(second.leaves.skipped, copied_before);
    assert_eq!(second.leaves.copied, n_leaves - copied_before);
    assert_eq!(second.recipes.skipped, recipes_before);
    assert_eq!(
        second.leaves.failed + second.recipes.failed,
        0,
        "{:?}",
        second.errors
    );
    assert_eq!(second.recipes.copied + second.recipes.skipped, n_recipes);
    assert_eq!((second.pins.copied, second.pins.failed), (3, 0));
    eprintln!(
        "migrate killed twice: {n_leaves} leaves and {n_recipes} recipes in the source; \
         (leaves, recipes) in the destination at the kills: {at_kill:?}, each time 0 damaged \
         and 0 recipes without an input; the last run copied {} leaves and {} recipes and \
         skipped {} and {}, in {:.1} s",
        second.leaves.copied,
        second.recipes.copied,
        second.leaves.skipped,
        second.recipes.skipped,
        second.duration_seconds
    );
    // And again: nothing to do, nothing rewritten.
    let third = migrate_ok(&services, &strs(&to_remote));
    assert_eq!(
        (third.leaves.copied, third.recipes.copied, third.bytes),
        (0, 0, 0)
    );
    assert_eq!(
        (third.leaves.skipped, third.recipes.skipped),
        (n_leaves, n_recipes)
    );
    assert_eq!((third.pins.copied, third.pins.skipped), (0, 3));

    let verified = migrate_ok(&services, &strs(&verify_args[..verify_args.len() - 1]));
    assert_eq!(verified.mode, "verify");
    assert_eq!(
        (verified.leaves.checked, verified.recipes.checked),
        (n_leaves, n_recipes)
    );
    assert_eq!(verified.leaves.missing + verified.recipes.missing, 0);
    assert_eq!((verified.pins.checked, verified.pins.missing), (3, 0));
    // A node on each side serves the same bytes for every address, with the same counts.
    let on_source = ServerProcess::options().dir(source.path()).start();
    let on_destination = node(&services, &space, &[]);
    assert_eq!(counts(&on_source).await, (n_recipes, n_leaves));
    assert_eq!(counts(&on_destination).await, (n_recipes, n_leaves));
    let all: Vec<CAddr> = contents
        .leaves
        .iter()
        .chain(&contents.recipes)
        .copied()
        .collect();
    same_bytes(&on_source, &on_destination, &all).await;
    drop(on_source);
    drop(on_destination);
    // Back to a fresh local directory: the same addresses, with the same depths.
    let back = tempfile::tempdir().unwrap();
    let mut to_local = remote_flags(&services, &space, false);
    to_local.extend([
        "--to-data-dir".to_owned(),
        back.path().to_str().unwrap().to_owned(),
    ]);
    let down = migrate_ok(&services, &strs(&to_local));
    assert_eq!(
        (down.leaves.copied, down.recipes.copied),
        (n_leaves, n_recipes)
    );
    assert_eq!(listing(back.path()).await, listing(source.path()).await);
    assert_eq!(down.pins.copied, 3);
    let store = deriva_store_local::open(back.path()).unwrap();
    let mut pins = store.pins().await.unwrap();
    pins.sort();
    let mut expected = vec![
        contents.leaves[0],
        contents.recipes[299],
        *contents.recipes.last().unwrap(),
    ];
    expected.sort();
    assert_eq!(pins, expected, "the pins came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_tier_moves_with_include_outputs() {
    let services = backends::shared();
    let (from, to) = (Space::new("outputs_from"), Space::new("outputs_to"));
    let tier = ["--output-tier", "blob-store"];
    let origin = node(&services, &from, &tier);
    let mut client = origin.client().await;
    let mut recipes = Vec::new();
    for i in 0..20 {
        let data = format!("output {i}").into_bytes();
        let leaf = deriva_testkit::put_leaf(&mut client, &data).await;
        let r = deriva_testkit::put_recipe(&mut client, "reverse", &[&leaf], &[]).await;
        get_all(&mut client, &r).await.unwrap();
        recipes.push((r, data.into_iter().rev().collect::<Vec<u8>>()));
    }
    drop(origin);

    let mut args = remote_flags(&services, &from, false);
    args.extend(remote_flags(&services, &to, true));
    args.push("--include-outputs".to_owned());
    let report = migrate_ok(&services, &strs(&args));
    let outputs = report.outputs.expect("an outputs tally");
    assert_eq!((outputs.copied, outputs.failed), (20, 0));
    assert_eq!((report.leaves.copied, report.recipes.copied), (20, 20));
    args.push("--verify".to_owned());
    let verified = migrate_ok(&services, &strs(&args));
    assert_eq!(verified.outputs.unwrap().checked, 20);
    let first = deriva_testkit::hex(&recipes[0].0);
    assert!(services.object_exists(&format!("{}/outputs/{first}", to.prefix)));
    assert!(!services.object_exists(&format!("{}/outputs/{}", to.prefix, "0".repeat(64))));

    // The destination serves the outputs from its tier: nothing is computed.
    let moved = node(&services, &to, &tier);
    let mut client = moved.client().await;
    for (r, expected) in &recipes {
        assert_eq!(&get_all(&mut client, r).await.unwrap(), expected);
    }
    let exposition = moved.scrape().await;
    let stored = sample(&exposition, r#"deriva_materialize_total{result="stored"}"#);
    let computed = sample(
        &exposition,
        r#"deriva_materialize_total{result="computed"}"#,
    );
    assert_eq!(stored, Some(20.0), "{exposition}");
    assert_eq!(computed.unwrap_or(0.0), 0.0);
}

/// A record of `output` as the output of `recipe`.
fn record_of(
    recipe: CAddr,
    output: &[u8],
    signature: Option<[u8; 64]>,
) -> deriva_core::provenance::SignedRecord {
    deriva_core::provenance::SignedRecord {
        record: deriva_core::provenance::Record {
            recipe,
            function: concat(),
            inputs: vec![CAddr::for_leaf(b"records' input")],
            output_hash: CAddr::for_leaf(output),
            output_bytes: output.len() as u64,
            node: "node-a".into(),
            started_at_micros: 1_765_000_000_000_000,
            duration_micros: 3_100_000,
            span: None,
        },
        signature,
    }
}

/// The remote store of `space`, opened directly, with the output tier if `tier`.
async fn open_remote(services: &Backends, space: &Space, tier: bool) -> deriva_store::Store {
    let spool = std::env::temp_dir().join(format!("records-spool-{}", space.schema));
    let config = deriva_store_remote::RemoteConfig {
        blob_store: format!("s3://{}/{}", services.bucket(), space.prefix),
        aws: services.aws_env(),
        index: services.pg_url(),
        schema: space.schema.clone(),
        pool_size: 4,
        local_cache: None,
        spool_dir: Some(spool),
        output_tier: tier,
        create_schema: true,
        node_id: "migrate-records".into(),
        compute_lease_ttl: deriva_store_remote::LEASE_TTL,
    };
    deriva_store_remote::open(
        &config,
        std::sync::Arc::new(deriva_store::observe::BackendMetrics::noop()),
    )
    .await
    .expect("the remote store opens")
    .store
}

async fn close(store: deriva_store::Store) {
    let released = store.released();
    drop(store);
    released.wait().await;
}

/// Materialization records move with the store: from a local store to the remote backend
/// without its output tier (rows of their own), their audits starting again; a second run
/// skips them and `--verify` checks them. Then remote to remote with `--include-outputs`: the
/// record of an output in the tier travels on its object (and is not copied twice), the
/// other as a record alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialization_records_move_with_the_store() {
    use deriva_core::provenance::{AuditResult, Provenance};
    let services = backends::shared();
    let source = tempfile::tempdir().unwrap();
    let store = deriva_store_local::open(source.path()).unwrap();
    let leaf = store
        .put_leaf(Bytes::from_static(b"records' input"))
        .await
        .unwrap();
    let a = store
        .put_recipe(recipe("identity", vec![leaf]))
        .await
        .unwrap();
    let b = store
        .put_recipe(recipe("reverse", vec![leaf]))
        .await
        .unwrap();
    let (ra, rb) = (
        record_of(a, b"output of a", None),
        record_of(b, b"output of b", Some([4; 64])),
    );
    let records = store.records().expect("local records").clone();
    records.put(&ra).await.unwrap();
    records.put(&rb).await.unwrap();
    let audited = records
        .audit(a, ra.record.output_hash, AuditResult::Match)
        .await
        .unwrap();
    assert_eq!(audited.map(|a| a.matches), Some(1));
    drop(records);
    close(store).await;

    let to = Space::new("records_to");
    let mut args = vec![
        "--data-dir".to_owned(),
        source.path().to_str().unwrap().to_owned(),
    ];
    args.extend(remote_flags(&services, &to, true));
    let report = migrate_ok(&services, &strs(&args));
    assert_eq!(
        (report.records.copied, report.records.failed),
        (2, 0),
        "{report:?}"
    );
    let again = migrate_ok(&services, &strs(&args));
    assert_eq!((again.records.copied, again.records.skipped), (0, 2));
    args.push("--verify".to_owned());
    let verified = migrate_ok(&services, &strs(&args));
    assert_eq!(verified.records.checked, 2, "{verified:?}");
    assert_eq!(verified.problems(), 0, "{verified:?}");

    let moved = open_remote(&services, &to, true).await;
    let records = moved.records().expect("remote records").clone();
    assert_eq!(
        records.get(a).await.unwrap(),
        Some(Provenance::new(ra.clone())),
        "the record, its audits started again"
    );
    assert_eq!(
        records.get(b).await.unwrap(),
        Some(Provenance::new(rb.clone()))
    );
    let outputs = moved.outputs().expect("the output tier").clone();
    assert!(!outputs.contains(a).await.unwrap(), "a record is no output");
    let output = Bytes::from_static(b"output of a");
    outputs.put(a, output.clone(), Some(&ra)).await.unwrap();
    drop((records, outputs));
    close(moved).await;

    let further = Space::new("records_further");
    let mut args = remote_flags(&services, &to, false);
    args.extend(remote_flags(&services, &further, true));
    args.push("--include-outputs".to_owned());
    let report = migrate_ok(&services, &strs(&args));
    assert_eq!(report.outputs.as_ref().map(|o| o.copied), Some(1));
    assert_eq!(
        (report.records.copied, report.records.skipped),
        (1, 1),
        "a's record came with its output: {report:?}"
    );
    let last = open_remote(&services, &further, true).await;
    assert_eq!(
        last.outputs().unwrap().get(a).await.unwrap(),
        Some(deriva_store::StoredOutput {
            bytes: output,
            record: Some(ra.clone()),
        })
    );
    assert_eq!(
        last.records().unwrap().get(b).await.unwrap(),
        Some(Provenance::new(rb))
    );
    close(last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_leaf_stops_the_migration_with_data_loss_naming_it() {
    let services = backends::shared();
    let source = tempfile::tempdir().unwrap();
    // The test damages a blob file: every leaf a file.
    let files = deriva_store_local::LocalOptions {
        inline_leaf_bytes: 0,
    };
    let store = deriva_store_local::open_with(source.path(), files).unwrap();
    let mut damaged = None;
    for i in 0..50 {
        let addr = store
            .put_leaf(Bytes::from(format!("leaf {i}")))
            .await
            .unwrap();
        if i == 30 {
            damaged = Some(addr);
        }
    }
    let released = store.released();
    drop(store);
    released.wait().await;
    let damaged = damaged.unwrap();
    let hex = damaged.to_hex();
    let file = source.path().join("blobs").join(&hex[..2]).join(&hex);
    std::fs::write(&file, b"not what was stored").unwrap();

    let destination = tempfile::tempdir().unwrap();
    let out = migrate(
        &services,
        &[
            "--data-dir",
            source.path().to_str().unwrap(),
            "--to-data-dir",
            destination.path().to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("DATA_LOSS") && stderr.contains(&hex),
        "{stderr}"
    );
    // The destination never got the damaged leaf.
    let (leaves, _) = listing(destination.path()).await;
    assert!(!leaves.contains(&damaged));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_leaf_damaged_in_the_middle_is_caught_while_it_streams() {
    let services = backends::shared();
    let space = Space::new("migrate_damaged_stream");
    let source = tempfile::tempdir().unwrap();
    let store = deriva_store_local::open(source.path()).unwrap();
    let data: Vec<u8> = (0..(24usize << 20)).map(|i| (i % 253) as u8).collect();
    let addr = store.put_leaf(Bytes::from(data)).await.unwrap();
    let released = store.released();
    drop(store);
    released.wait().await;
    // One byte flipped halfway: same size, so only the hash can tell.
    let hex = addr.to_hex();
    let file = source.path().join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[12 << 20] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let mut args = vec![
        "--data-dir".to_owned(),
        source.path().to_str().unwrap().to_owned(),
    ];
    args.extend(remote_flags(&services, &space, true));
    let out = migrate(&services, &strs(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("DATA_LOSS") && stderr.contains(&hex),
        "{stderr}"
    );
    // The upload was abandoned: no row, and no object under the leaf's key.
    assert_eq!(rows_in_index(&services, &space, "leaves").await, 0);
    let key = format!("{}/leaves/{hex}", space.prefix);
    assert!(
        !services.object_exists(&key),
        "the aborted upload left an object at {key}"
    );
}

/// A local store of `n` small leaves in `dir`.
async fn small_store(dir: &Path, n: usize) {
    let store = deriva_store_local::open(dir).unwrap();
    for i in 0..n {
        store
            .put_leaf(Bytes::from(format!("leaf {i}")))
            .await
            .unwrap();
    }
    let released = store.released();
    drop(store);
    released.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_shows_a_progress_bar_and_a_pipe_does_not() {
    let source = tempfile::tempdir().unwrap();
    small_store(source.path(), 300).await;
    let (to_tty, to_pipe) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let command = |to: &Path| {
        format!(
            "{SERVER} migrate --data-dir {} --to-data-dir {} --concurrency 1",
            source.path().display(),
            to.display()
        )
    };
    // `script` (util-linux) runs the command on a pseudo-terminal and copies what it draws.
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &command(to_tty.path()), "/dev/null"])
        .env_remove("DERIVA_BLOB_STORE")
        .env_remove("DERIVA_INDEX_URL")
        .output()
        .expect("running script (util-linux)");
    let drawn = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{drawn}");
    for part in [
        "leaves [",
        "/300 objects",
        "B/s",
        "objects/s",
        "ETA ",
        "300 copied",
    ] {
        assert!(
            drawn.contains(part),
            "no {part:?} on the terminal:\n{drawn}"
        );
    }
    let out = Command::new("sh")
        .args(["-c", &command(to_pipe.path())])
        .env_remove("DERIVA_BLOB_STORE")
        .env_remove("DERIVA_INDEX_URL")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("ETA") && stdout.contains("300 copied"),
        "{stdout}{stderr}"
    );
    assert!(
        stderr.contains("migrate: 300 leaves, 0 recipes"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_in_use_and_bad_flags_are_refused_with_the_reason() {
    let services = backends::shared();
    let started = Instant::now();
    let elsewhere = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let to = ["--to-data-dir", elsewhere.path().to_str().unwrap()];
    let to_other = ["--to-data-dir", other.path().to_str().unwrap()];

    // A local store a server holds.
    let running = ServerProcess::start();
    let dir = running.dir().to_str().unwrap().to_owned();
    let out = migrate(
        &services,
        &[&["--data-dir", dir.as_str()][..], &to].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("UNAVAILABLE") && stderr.contains("open in another process"),
        "{stderr}"
    );
    drop(running);

    let cases: [(&[&str], i32, &str); 5] = [
        (
            &[&["--data-dir", "/nonexistent/deriva"][..], &to].concat(),
            1,
            "holds no Deriva store",
        ),
        (
            &["--data-dir", elsewhere.path().to_str().unwrap()],
            2,
            "no destination",
        ),
        (&to, 2, "the same store"),
        (
            &["--to-blob-store", "s3://b"],
            2,
            "--to-blob-store needs --to-index",
        ),
        (
            &[&to_other[..], &["--include-outputs"]].concat(),
            2,
            "--include-outputs needs the remote backend",
        ),
    ];
    for (args, code, says) in cases {
        let mut args = args.to_vec();
        // The source defaults to ./deriva-data: name one for the cases that test the destination.
        if !args.contains(&"--data-dir") {
            args.extend(["--data-dir", elsewhere.path().to_str().unwrap()]);
        }
        let out = migrate(&services, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // A remote source whose schema does not exist: refused, and not created.
    let nowhere = Space::new("migrate_no_such_schema");
    let mut args = remote_flags(&services, &nowhere, false);
    args.extend(to_other.iter().map(|a| (*a).to_owned()));
    let out = migrate(&services, &strs(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("has no schema {}", nowhere.schema)),
        "{stderr}"
    );
    let out = migrate(&services, &strs(&args));
    assert_eq!(
        out.status.code(),
        Some(2),
        "still absent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < DEADLINE);
}
