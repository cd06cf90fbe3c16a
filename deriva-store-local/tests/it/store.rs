//! The durable store: round trips, idempotency, restart, crash leftovers, corruption and
//! concurrency. Every test works in its own temporary directory, on a multi-thread tokio
//! runtime: the local backend does its I/O on tokio's blocking pool. A restart drops the store
//! and waits for it to be [released](Store::released) (the redb file lock is free only then)
//! before it opens the directory again.
//!
//! These tests look at the blob files themselves, so their stores keep every leaf a file
//! (`inline_leaf_bytes: 0`); `tests/small_leaves.rs` covers small leaves kept as redb rows.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, FunctionId, Recipe};
use deriva_store::{AddrKind, Store};
use deriva_store_local::{BLOB_DIR, LocalOptions};
use tempfile::TempDir;
use tokio::sync::Barrier;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn open(dir: &Path) -> Store {
    deriva_store_local::open_with(
        dir,
        LocalOptions {
            inline_leaf_bytes: 0,
        },
    )
    .expect("store opens")
}

/// Drops `store` and waits until its backend has let go of the data directory.
async fn close(store: Store) {
    let released = store.released();
    drop(store);
    released.wait().await;
}

/// Closes `store` and opens the same directory again: a restart.
async fn reopen(store: Store, dir: &Path) -> Store {
    close(store).await;
    open(dir)
}

fn bytes(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

fn recipe(function: &str, inputs: &[CAddr], params: &[(&str, &str)]) -> Recipe {
    let function: FunctionId = function.parse().expect("valid function id");
    Recipe::new(function, inputs.to_vec(), params.iter().copied()).expect("valid recipe")
}

/// `(recipes, blobs, blob_bytes)`.
fn counters(store: &Store) -> (u64, u64, u64) {
    let c = store.counters();
    (c.recipes(), c.blobs(), c.blob_bytes())
}

fn blob_path(dir: &Path, addr: &CAddr) -> PathBuf {
    let hex = addr.to_hex();
    dir.join(BLOB_DIR).join(&hex[..2]).join(hex)
}

fn tmp_dir(dir: &Path) -> PathBuf {
    dir.join(BLOB_DIR).join("tmp")
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn set(addrs: &[CAddr]) -> HashSet<CAddr> {
    addrs.iter().copied().collect()
}

#[track_caller]
fn assert_corrupted<T: std::fmt::Debug>(result: Result<T, DerivaError>, expected: CAddr) {
    match result {
        Err(DerivaError::Corrupted { addr, detail }) => {
            assert_eq!(
                addr, expected,
                "Corrupted names the wrong address ({detail})"
            );
        }
        other => panic!("expected Corrupted for {expected}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Leaves and kinds
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_round_trip() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for data in [&b"hello"[..], b"", &big] {
        let addr = store.put_leaf(bytes(data)).await.unwrap();
        assert_eq!(addr, CAddr::for_leaf(data));
        assert_eq!(store.get_leaf(addr).await.unwrap().as_deref(), Some(data));
        assert_eq!(fs::read(blob_path(tmp.path(), &addr)).unwrap(), data);
    }
    assert_eq!(counters(&store), (0, 3, 5 + 200_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_address_is_none() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let unknown = CAddr::for_leaf(b"never stored");
    assert_eq!(store.get_leaf(unknown).await.unwrap(), None);
    assert_eq!(store.get_recipe(unknown).await.unwrap(), None);
    assert_eq!(store.kind_of(unknown).await.unwrap(), None);
    assert_eq!(store.dependents(unknown).await.unwrap(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_of_tells_leaves_from_recipes() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let leaf = store.put_leaf(bytes(b"data")).await.unwrap();
    let r = store
        .put_recipe(recipe("upper/v1", &[leaf], &[]))
        .await
        .unwrap();
    assert_eq!(store.kind_of(leaf).await.unwrap(), Some(AddrKind::Leaf));
    assert_eq!(store.kind_of(r).await.unwrap(), Some(AddrKind::Recipe));
    assert_eq!(
        store.kind_of(CAddr::for_leaf(b"other")).await.unwrap(),
        None
    );
    // A recipe is not a leaf, and a leaf is not a recipe.
    assert_eq!(store.get_leaf(r).await.unwrap(), None);
    assert_eq!(store.get_recipe(leaf).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Recipes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_recipe_with_missing_input_stores_nothing() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let present = store.put_leaf(bytes(b"present")).await.unwrap();
    let missing = CAddr::for_leaf(b"missing");
    let before = counters(&store);

    let r = recipe("concat/v1", &[present, missing], &[]);
    let err = store.put_recipe(r.clone()).await.unwrap_err();
    assert_eq!(err, DerivaError::MissingInput { input: missing });
    assert!(err.to_string().contains(&missing.to_hex()), "{err}");

    assert_eq!(store.get_recipe(r.addr()).await.unwrap(), None);
    assert_eq!(store.kind_of(r.addr()).await.unwrap(), None);
    assert_eq!(store.dependents(present).await.unwrap(), vec![]);
    assert_eq!(store.dependents(missing).await.unwrap(), vec![]);
    assert_eq!(counters(&store), before);
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 0);

    // Once the input exists the same recipe is accepted.
    store.put_leaf(bytes(b"missing")).await.unwrap();
    assert_eq!(store.put_recipe(r.clone()).await.unwrap(), r.addr());
    assert_eq!(store.counters().recipes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_are_idempotent() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let leaf = store.put_leaf(bytes(b"twice")).await.unwrap();
    assert_eq!(store.put_leaf(bytes(b"twice")).await.unwrap(), leaf);

    let r = recipe("repeat/v1", &[leaf], &[("count", "3")]);
    let first = store.put_recipe(r.clone()).await.unwrap();
    let second = store.put_recipe(r.clone()).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first, r.addr());

    assert_eq!(counters(&store), (1, 1, 5));
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 1);
    assert_eq!(store.dependents(leaf).await.unwrap(), vec![r.addr()]);
}

/// Leaves and recipes of the restart test:
///
/// ```text
/// alpha ─┬─ r_concat(alpha, beta) ─┐
/// beta  ─┘                         ├─ r_join(r_concat, r_upper) ─┐
/// alpha ─── r_upper(alpha) ────────┘                             ├─ r_wrap(r_join, gamma)
/// gamma ─────────────────────────────────────────────────────────┘
/// ```
struct Graph {
    leaves: Vec<(CAddr, Vec<u8>)>,
    alpha: CAddr,
    beta: CAddr,
    gamma: CAddr,
    r_concat: Recipe,
    r_upper: Recipe,
    r_join: Recipe,
    r_wrap: Recipe,
}

impl Graph {
    async fn build(store: &Store) -> Self {
        let data: [Vec<u8>; 3] = [b"alpha".to_vec(), b"beta".to_vec(), (0..=255u8).collect()];
        let mut leaves: Vec<(CAddr, Vec<u8>)> = Vec::new();
        for d in data {
            leaves.push((store.put_leaf(bytes(&d)).await.unwrap(), d));
        }
        let (alpha, beta, gamma) = (leaves[0].0, leaves[1].0, leaves[2].0);
        let r_concat = recipe("concat/v1", &[alpha, beta], &[]);
        let r_upper = recipe("upper/v1", &[alpha], &[("locale", "tr")]);
        let r_join = recipe(
            "join/v1",
            &[r_concat.addr(), r_upper.addr()],
            &[("sep", ",")],
        );
        let r_wrap = recipe("wrap/v2", &[r_join.addr(), gamma], &[]);
        for r in [&r_concat, &r_upper, &r_join, &r_wrap] {
            assert_eq!(store.put_recipe(r.clone()).await.unwrap(), r.addr());
        }
        Self {
            leaves,
            alpha,
            beta,
            gamma,
            r_concat,
            r_upper,
            r_join,
            r_wrap,
        }
    }

    async fn check(&self, store: &Store) {
        for (addr, data) in &self.leaves {
            assert_eq!(
                store.get_leaf(*addr).await.unwrap().as_deref(),
                Some(&data[..])
            );
            assert_eq!(store.kind_of(*addr).await.unwrap(), Some(AddrKind::Leaf));
        }
        for (r, depth) in [
            (&self.r_concat, 1),
            (&self.r_upper, 1),
            (&self.r_join, 2),
            (&self.r_wrap, 3),
        ] {
            let stored = store
                .get_recipe(r.addr())
                .await
                .unwrap()
                .expect("recipe is stored");
            assert_eq!(&stored.recipe, r);
            assert_eq!(stored.depth, depth, "depth of {:?}", r.function());
        }

        let (concat, upper, join, wrap) = (
            self.r_concat.addr(),
            self.r_upper.addr(),
            self.r_join.addr(),
            self.r_wrap.addr(),
        );
        assert_eq!(
            set(&store.dependents(self.alpha).await.unwrap()),
            set(&[concat, upper])
        );
        assert_eq!(store.dependents(self.beta).await.unwrap(), vec![concat]);
        assert_eq!(store.dependents(self.gamma).await.unwrap(), vec![wrap]);
        assert_eq!(store.dependents(concat).await.unwrap(), vec![join]);
        assert_eq!(store.dependents(upper).await.unwrap(), vec![join]);
        assert_eq!(store.dependents(join).await.unwrap(), vec![wrap]);
        assert_eq!(store.dependents(wrap).await.unwrap(), vec![]);

        // The diamond: join is reached through both concat and upper but listed once, after
        // both (breadth-first), and wrap comes last.
        let from_alpha = store.transitive_dependents(self.alpha).await.unwrap();
        assert_eq!(from_alpha.len(), 4, "{from_alpha:?}");
        assert_eq!(set(&from_alpha[..2]), set(&[concat, upper]));
        assert_eq!(from_alpha[2..], [join, wrap]);
        assert_eq!(
            store.transitive_dependents(self.beta).await.unwrap(),
            vec![concat, join, wrap]
        );
        assert_eq!(
            store.transitive_dependents(self.gamma).await.unwrap(),
            vec![wrap]
        );
        assert_eq!(store.transitive_dependents(wrap).await.unwrap(), vec![]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_restart() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let graph = Graph::build(&store).await;
    graph.check(&store).await;
    let before = counters(&store);
    assert_eq!(before, (4, 3, 5 + 4 + 256));

    let store = reopen(store, tmp.path()).await;
    graph.check(&store).await;
    assert_eq!(counters(&store), before);
    assert_eq!(
        store.count_recipes_by_scan().await.unwrap(),
        store.counters().recipes()
    );

    // Putting everything again after the restart changes nothing.
    let again = Graph::build(&store).await;
    assert_eq!(again.r_wrap.addr(), graph.r_wrap.addr());
    assert_eq!(counters(&store), before);
}

// ---------------------------------------------------------------------------------------------
// Crash leftovers and stray files
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_temporary_blobs_are_never_served() {
    let tmp = TempDir::new().unwrap();
    let kept = b"kept";
    let only_in_tmp = b"these bytes only ever reached tmp/";
    let partial = b"a write that crashed half";
    let only_in_tmp_addr = CAddr::for_leaf(only_in_tmp);
    let partial_addr = CAddr::for_leaf(partial);

    let store = open(tmp.path());
    store.put_leaf(bytes(kept)).await.unwrap();
    // A file in tmp/ named exactly like an address is not a blob, even while open.
    fs::write(
        tmp_dir(tmp.path()).join(only_in_tmp_addr.to_hex()),
        only_in_tmp,
    )
    .unwrap();
    assert_eq!(store.get_leaf(only_in_tmp_addr).await.unwrap(), None);
    let before = counters(&store);
    close(store).await;

    // A crash in the middle of a write leaves a truncated file under the store's tmp name.
    fs::write(
        tmp_dir(tmp.path()).join(format!("{}.4242.0.tmp", partial_addr.to_hex())),
        &partial[..10],
    )
    .unwrap();
    assert_eq!(dir_entries(&tmp_dir(tmp.path())).len(), 2);

    let store = open(tmp.path());
    assert_eq!(dir_entries(&tmp_dir(tmp.path())), Vec::<String>::new());
    for addr in [only_in_tmp_addr, partial_addr] {
        assert_eq!(store.get_leaf(addr).await.unwrap(), None);
        assert_eq!(store.kind_of(addr).await.unwrap(), None);
        assert!(!blob_path(tmp.path(), &addr).exists());
    }
    assert_eq!(counters(&store), before);
    assert_eq!(counters(&store), (0, 1, kept.len() as u64));
    assert_eq!(
        store
            .get_leaf(CAddr::for_leaf(kept))
            .await
            .unwrap()
            .as_deref(),
        Some(&kept[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_files_in_shard_dirs_are_ignored_at_open() {
    let tmp = TempDir::new().unwrap();
    let leaf = b"the only real blob";
    let store = open(tmp.path());
    store.put_leaf(bytes(leaf)).await.unwrap();
    let before = counters(&store);
    close(store).await;
    assert_eq!(before, (0, 1, leaf.len() as u64));

    let blobs = tmp.path().join(BLOB_DIR);
    fs::write(blobs.join("00").join("notes.txt"), b"not a blob").unwrap();
    fs::write(
        blobs.join("01").join("01".repeat(31) + "0"),
        b"63 hex characters",
    )
    .unwrap();
    // A well-formed address in the wrong shard.
    let elsewhere = CAddr::from_bytes([0xab; 32]);
    fs::write(blobs.join("cd").join(elsewhere.to_hex()), b"wrong shard").unwrap();

    let store = open(tmp.path());
    assert_eq!(counters(&store), before);
    assert_eq!(store.get_leaf(elsewhere).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_reported_and_repaired() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let data: Vec<u8> = (0..100u8).collect();
    let addr = store.put_leaf(bytes(&data)).await.unwrap();
    let before = counters(&store);

    let path = blob_path(tmp.path(), &addr);
    let mut on_disk = fs::read(&path).unwrap();
    on_disk[42] ^= 0x01;
    fs::write(&path, &on_disk).unwrap();
    assert_corrupted(store.get_leaf(addr).await, addr);

    assert_eq!(store.put_leaf(bytes(&data)).await.unwrap(), addr);
    assert_eq!(
        store.get_leaf(addr).await.unwrap().as_deref(),
        Some(&data[..])
    );
    assert_eq!(fs::read(&path).unwrap(), data);
    assert_eq!(counters(&store), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_blob_is_reported_and_repaired() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let data = b"a blob that will lose its tail".to_vec();
    let addr = store.put_leaf(bytes(&data)).await.unwrap();
    let blobs_before = store.counters().blobs();

    let path = blob_path(tmp.path(), &addr);
    fs::write(&path, &data[..data.len() / 2]).unwrap();
    assert_corrupted(store.get_leaf(addr).await, addr);
    fs::write(&path, b"").unwrap();
    assert_corrupted(store.get_leaf(addr).await, addr);

    assert_eq!(store.put_leaf(bytes(&data)).await.unwrap(), addr);
    assert_eq!(
        store.get_leaf(addr).await.unwrap().as_deref(),
        Some(&data[..])
    );
    assert_eq!(store.counters().blobs(), blobs_before);
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// Eight tasks released together by a barrier each put the same leaf and recipe. Every store
/// call runs on its own blocking-pool thread, so the puts really do race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_the_same_data_count_once() {
    const TASKS: usize = 8;
    const ROUNDS: usize = 4;
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(open(tmp.path()));

    for round in 0..ROUNDS {
        let data = Bytes::from(format!("shared leaf, round {round}"));
        let leaf = CAddr::for_leaf(&data);
        let r = recipe("hash/v1", &[leaf], &[("round", &round.to_string())]);
        let barrier = Arc::new(Barrier::new(TASKS));

        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let (data, r) = (data.clone(), r.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let l = store.put_leaf(data).await.unwrap();
                    let a = store.put_recipe(r).await.unwrap();
                    (l, a)
                })
            })
            .collect();
        let mut results: Vec<(CAddr, CAddr)> = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }

        assert!(
            results.iter().all(|&res| res == (leaf, r.addr())),
            "{results:?}"
        );
        let stored = store.get_recipe(r.addr()).await.unwrap().unwrap();
        assert_eq!((stored.recipe, stored.depth), (r.clone(), 1));
        assert_eq!(store.dependents(leaf).await.unwrap(), vec![r.addr()]);
        assert_eq!(
            store.get_leaf(leaf).await.unwrap().as_deref(),
            Some(&data[..])
        );
    }

    let expected_bytes: usize = (0..ROUNDS)
        .map(|i| format!("shared leaf, round {i}").len())
        .sum();
    assert_eq!(
        counters(&store),
        (ROUNDS as u64, ROUNDS as u64, expected_bytes as u64)
    );
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), ROUNDS as u64);
    assert_eq!(dir_entries(&tmp_dir(tmp.path())), Vec::<String>::new());

    // A fresh count from disk agrees with the live counters.
    let store = Arc::into_inner(store).expect("every task is done");
    let reopened = reopen(store, tmp.path()).await;
    assert_eq!(
        counters(&reopened),
        (ROUNDS as u64, ROUNDS as u64, expected_bytes as u64)
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions: counters must match what a fresh open counts on disk.
// ---------------------------------------------------------------------------------------------

/// `blob_bytes` must match the bytes on disk after a repair, as a reopen counts them.
/// (Once drifted, and even wrapped, when the damaged file's length was subtracted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairing_a_blob_keeps_blob_bytes_equal_to_disk() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let data = b"0123456789".to_vec();
    let addr = store.put_leaf(bytes(&data)).await.unwrap();
    let path = blob_path(tmp.path(), &addr);

    fs::write(&path, &data[..5]).unwrap();
    store.put_leaf(bytes(&data)).await.unwrap();
    assert_eq!(
        store.counters().blob_bytes(),
        10,
        "after repairing a truncated blob"
    );

    fs::write(&path, vec![7u8; 1000]).unwrap();
    store.put_leaf(bytes(&data)).await.unwrap();
    assert_eq!(
        store.counters().blob_bytes(),
        10,
        "after repairing a grown blob"
    );

    let store = reopen(store, tmp.path()).await;
    assert_eq!(counters(&store), (0, 1, 10));
}

/// A file whose name is an address in upper-case hex is never served (reads use lower-case
/// paths) and must not be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upper_case_stray_file_is_not_counted() {
    let tmp = TempDir::new().unwrap();
    close(open(tmp.path())).await;
    let addr = CAddr::from_bytes([0xab; 32]);
    let shard = tmp.path().join(BLOB_DIR).join("ab");
    fs::write(shard.join(addr.to_hex().to_uppercase()), b"stray").unwrap();

    let store = open(tmp.path());
    assert_eq!(store.get_leaf(addr).await.unwrap(), None);
    assert_eq!(counters(&store), (0, 0, 0));
}

/// A directory named like an address is not a blob and must not be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_directory_is_not_counted() {
    let tmp = TempDir::new().unwrap();
    close(open(tmp.path())).await;
    let addr = CAddr::from_bytes([0xcd; 32]);
    fs::create_dir(blob_path(tmp.path(), &addr)).unwrap();

    let store = open(tmp.path());
    assert_eq!(counters(&store), (0, 0, 0));
    assert_eq!(store.kind_of(addr).await.unwrap(), None);
}

/// Garbage collection marks into a scratch redb file beside the store, never into memory: the
/// file exists while a collection is being swept, is gone when it ends, and one left by a
/// crash is removed when the store opens. Its candidates come out deepest first, then leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_marks_into_a_scratch_file_that_does_not_outlive_it() {
    use deriva_store::gc::GcOptions;
    let tmp = TempDir::new().unwrap();
    let scratch = tmp.path().join(deriva_store_local::SCRATCH_FILE);
    let store = open(tmp.path());
    let leaf = store.put_leaf(bytes(b"garbage leaf")).await.unwrap();
    let inner = store
        .put_recipe(recipe("concat/v1", &[leaf], &[]))
        .await
        .unwrap();
    let outer = store
        .put_recipe(recipe("concat/v1", &[inner, leaf], &[]))
        .await
        .unwrap();
    let kept = store.put_leaf(bytes(b"pinned leaf")).await.unwrap();
    store.pin(kept).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let mut collection = store.start_gc(&GcOptions::default()).await.unwrap();
    assert!(scratch.is_file(), "the mark wrote {}", scratch.display());
    let tally = collection.tally();
    assert_eq!((tally.candidates, tally.pinned), (3, 1), "{tally:?}");
    let mut order = Vec::new();
    while let Some(batch) = collection.next_batch().await.unwrap() {
        order.extend(batch.into_iter().map(|r| (r.kind, r.addr)));
    }
    assert_eq!(
        order,
        [
            (AddrKind::Recipe, outer),
            (AddrKind::Recipe, inner),
            (AddrKind::Leaf, leaf)
        ],
        "deepest first, then leaves"
    );
    let outcome = collection.finish();
    assert_eq!((outcome.recipes_removed, outcome.blobs_removed), (2, 1));
    assert_eq!((outcome.live_blobs, outcome.live_recipes), (1, 0));
    // Removed off the async worker, once the collection is dropped.
    let gone = std::time::Instant::now();
    while scratch.exists() {
        assert!(
            gone.elapsed() < std::time::Duration::from_secs(10),
            "still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(store.get_leaf(kept).await.unwrap().is_some());

    // A scratch file left by a crash goes when the store opens.
    close(store).await;
    fs::write(&scratch, b"left by a collection that did not end").unwrap();
    let store = open(tmp.path());
    assert!(!scratch.exists());
    close(store).await;
}
