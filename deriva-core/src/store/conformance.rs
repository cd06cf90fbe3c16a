//! The conformance suite every storage backend passes: written once, generic over a
//! [`Harness`] that opens the backend under test and can damage it behind its back.
//!
//! A backend's tests instantiate it with [`conformance_tests!`](crate::conformance_tests):
//!
//! ```text
//! deriva_core::conformance_tests!(MyHarness::new());
//! ```
//!
//! which generates one `#[tokio::test]` per case, each with a fresh harness. The cases:
//! durability across reopen, idempotent puts, missing inputs, dependents, corruption
//! detection, concurrent writers, the blob operations (size, list, delete), streamed
//! leaves, streamed uploads whose address comes at the end, pins, and garbage collection (its
//! rules, the refresh of a put again, and writers racing collections).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::addr::CAddr;
use crate::error::{DerivaError, Result};
use crate::recipe::{FunctionId, Recipe};
use crate::store::gc::{GcOptions, GcOutcome};
use crate::store::{AddrKind, Store};

/// Opens one backend instance for the suite, and damages its data for the corruption case.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the store. Called again after the previous store was dropped and
    /// [released](Store::released), it must open the same data.
    async fn open(&self) -> Result<Store>;

    /// Replaces the stored bytes of blob `addr` with `bytes`, behind the store's back. Called
    /// while no store is open.
    async fn corrupt_blob(&self, addr: CAddr, bytes: &[u8]);

    /// Damages the stored recipe `addr` so that it no longer decodes or no longer hashes to
    /// `addr`. Called while no store is open.
    async fn corrupt_recipe(&self, addr: CAddr);
}

/// Generates one test per conformance case for the harness built by `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            durability_across_reopen, idempotent_puts, missing_inputs, dependents,
            corruption_detection, concurrent_writers, blob_operations, streams,
            unaddressed_uploads, pins, garbage_collection, gc_refreshed_by_puts,
            gc_races_with_writers, gc_keeps_corrupted_recipes);
    };
    (@cases $harness:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::conformance::$case(&$harness).await;
            }
        )*
    };
}

fn concat() -> FunctionId {
    FunctionId::new("concat", "1").expect("valid function id")
}

fn recipe(inputs: Vec<CAddr>, tag: &str) -> Recipe {
    Recipe::new(
        concat(),
        inputs,
        BTreeMap::from([("tag".to_owned(), tag.to_owned())]),
    )
    .expect("valid recipe")
}

/// Drops `store` and waits until its resources are free, so it can be opened again.
async fn close(store: Store) {
    let released = store.released();
    drop(store);
    released.wait().await;
}

/// Leaves and recipes survive a close and reopen, with the same counters.
pub async fn durability_across_reopen(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let a = store.put_leaf(Bytes::from_static(b"alpha")).await.unwrap();
    let b = store
        .put_leaf(Bytes::from(vec![7u8; 100_000]))
        .await
        .unwrap();
    let ab = store.put_recipe(recipe(vec![a, b], "ab")).await.unwrap();
    let top = store.put_recipe(recipe(vec![ab, a], "top")).await.unwrap();
    let counts = |s: &Store| {
        let c = s.counters();
        (c.recipes(), c.blobs(), c.blob_bytes())
    };
    let before = counts(&store);
    assert_eq!(before, (2, 2, 100_005));
    close(store).await;

    let store = h.open().await.expect("reopen");
    assert_eq!(counts(&store), before, "counters after reopen");
    assert_eq!(
        store.get_leaf(a).await.unwrap().as_deref(),
        Some(&b"alpha"[..])
    );
    assert_eq!(store.get_leaf(b).await.unwrap().unwrap().len(), 100_000);
    let stored = store.get_recipe(top).await.unwrap().expect("recipe kept");
    assert_eq!(stored.recipe.inputs(), [ab, a]);
    assert_eq!(stored.depth, 2);
    assert_eq!(store.get_recipe(ab).await.unwrap().unwrap().depth, 1);
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 2);
    close(store).await;
}

/// Storing the same leaf or recipe again returns the same address and counts once.
pub async fn idempotent_puts(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let data = Bytes::from_static(b"same bytes");
    let first = store.put_leaf(data.clone()).await.unwrap();
    let second = store.put_leaf(data).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first, CAddr::for_leaf(b"same bytes"));
    assert_eq!(
        (store.counters().blobs(), store.counters().blob_bytes()),
        (1, 10)
    );

    let r = recipe(vec![first], "r");
    let addr = store.put_recipe(r.clone()).await.unwrap();
    assert_eq!(store.put_recipe(r.clone()).await.unwrap(), addr);
    let again = store.put_recipes(vec![r.clone(), r]).await.unwrap();
    assert_eq!(again, [addr, addr]);
    assert_eq!(store.counters().recipes(), 1);
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 1);
    assert_eq!(store.dependents(first).await.unwrap(), [addr]);
    close(store).await;
}

/// A recipe whose input exists nowhere is refused, naming the input, and a batch is all or
/// nothing; an input may be an earlier recipe of the same batch, not a later one.
pub async fn missing_inputs(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let leaf = store.put_leaf(Bytes::from_static(b"leaf")).await.unwrap();
    let ghost = CAddr::for_leaf(b"never stored");
    match store.put_recipe(recipe(vec![leaf, ghost], "x")).await {
        Err(DerivaError::MissingInput { input }) => assert_eq!(input, ghost),
        other => panic!("expected MissingInput, got {other:?}"),
    }

    let good = recipe(vec![leaf], "good");
    let bad = recipe(vec![ghost], "bad");
    let err = store
        .put_recipes(vec![good.clone(), bad])
        .await
        .unwrap_err();
    assert_eq!(err, DerivaError::MissingInput { input: ghost });
    assert!(store.get_recipe(good.addr()).await.unwrap().is_none());
    assert_eq!(store.counters().recipes(), 0);

    let later = recipe(vec![leaf], "later");
    let uses_later = recipe(vec![later.addr()], "uses later");
    let err = store
        .put_recipes(vec![uses_later.clone(), later.clone()])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        DerivaError::MissingInput {
            input: later.addr()
        }
    );
    let addrs = store
        .put_recipes(vec![later.clone(), uses_later.clone()])
        .await
        .unwrap();
    assert_eq!(addrs, [later.addr(), uses_later.addr()]);
    assert_eq!(store.get_recipe(addrs[1]).await.unwrap().unwrap().depth, 2);
    assert_eq!(store.counters().recipes(), 2);
    close(store).await;
}

/// Direct and transitive dependents of a diamond, each once; deleting a recipe removes its
/// edges.
pub async fn dependents(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let a = store.put_leaf(Bytes::from_static(b"a")).await.unwrap();
    let b = store.put_leaf(Bytes::from_static(b"b")).await.unwrap();
    let left = store.put_recipe(recipe(vec![a], "left")).await.unwrap();
    let right = store.put_recipe(recipe(vec![a, b], "right")).await.unwrap();
    let join = store
        .put_recipe(recipe(vec![left, right], "join"))
        .await
        .unwrap();
    let sorted = |mut v: Vec<CAddr>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(store.dependents(a).await.unwrap()),
        sorted(vec![left, right])
    );
    assert_eq!(store.dependents(b).await.unwrap(), [right]);
    assert!(store.dependents(join).await.unwrap().is_empty());
    let all = store.transitive_dependents(a).await.unwrap();
    assert_eq!(sorted(all.clone()), sorted(vec![left, right, join]));
    assert_eq!(all.last(), Some(&join), "breadth-first: join comes last");
    let mut listed = store.recipes().list().await.unwrap();
    listed.sort();
    let mut expected = vec![(left, 1), (right, 1), (join, 2)];
    expected.sort();
    assert_eq!(listed, expected, "every recipe listed once, with its depth");
    // One question tells a leaf (and its size) from a recipe (read whole) from nothing.
    assert_eq!(
        store.locate(a).await.unwrap(),
        Some(super::Located::Leaf { size: 1 })
    );
    let Some(super::Located::Recipe(stored)) = store.locate(join).await.unwrap() else {
        panic!("{join} is a recipe");
    };
    assert_eq!(
        (stored.recipe.inputs(), stored.depth),
        (&[left, right][..], 2)
    );
    assert_eq!(
        store.locate(CAddr::from_bytes([7; 32])).await.unwrap(),
        None
    );

    assert!(store.recipes().delete(join).await.unwrap());
    assert!(!store.recipes().delete(join).await.unwrap());
    assert!(store.dependents(left).await.unwrap().is_empty());
    assert!(store.get_recipe(join).await.unwrap().is_none());
    assert_eq!(store.counters().recipes(), 2);
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 2);
    close(store).await;
}

/// Damaged blobs and recipes are reported as [`DerivaError::Corrupted`], never returned as
/// data; putting the right bytes again repairs a blob.
pub async fn corruption_detection(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let leaf = store
        .put_leaf(Bytes::from_static(b"precious"))
        .await
        .unwrap();
    let r = store.put_recipe(recipe(vec![leaf], "r")).await.unwrap();
    close(store).await;
    h.corrupt_blob(leaf, b"precioU$").await;
    h.corrupt_recipe(r).await;

    let store = h.open().await.expect("reopen");
    match store.get_leaf(leaf).await {
        Err(DerivaError::Corrupted { addr, .. }) => assert_eq!(addr, leaf),
        other => panic!("a damaged blob must be Corrupted, got {other:?}"),
    }
    match store.get_recipe(r).await {
        Err(DerivaError::Corrupted { addr, .. }) => assert_eq!(addr, r),
        other => panic!("a damaged recipe must be Corrupted, got {other:?}"),
    }
    assert_eq!(
        store
            .put_leaf(Bytes::from_static(b"precious"))
            .await
            .unwrap(),
        leaf
    );
    assert_eq!(
        store.get_leaf(leaf).await.unwrap().as_deref(),
        Some(&b"precious"[..])
    );
    close(store).await;
}

/// Many tasks putting overlapping leaves and recipes at once: every put succeeds, each thing
/// is stored once, and the counters equal a scan.
pub async fn concurrent_writers(h: &impl Harness) {
    let store = Arc::new(h.open().await.expect("open"));
    const WRITERS: usize = 8;
    const ITEMS: usize = 20;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut addrs = Vec::new();
                for i in 0..ITEMS {
                    // Half of the items are shared by every writer, half are the writer's own.
                    let key = if i % 2 == 0 {
                        format!("shared {i}")
                    } else {
                        format!("writer {w} item {i}")
                    };
                    let leaf = store.put_leaf(Bytes::from(key.clone())).await.unwrap();
                    let r = store.put_recipe(recipe(vec![leaf], &key)).await.unwrap();
                    addrs.push((leaf, r));
                }
                addrs
            })
        })
        .collect();
    let mut leaves = std::collections::HashSet::new();
    let mut recipes = std::collections::HashSet::new();
    for task in tasks {
        for (leaf, r) in task.await.expect("writer") {
            leaves.insert(leaf);
            recipes.insert(r);
        }
    }
    let expected = (ITEMS / 2 + WRITERS * ITEMS / 2) as u64;
    assert_eq!(leaves.len() as u64, expected);
    assert_eq!(recipes.len() as u64, expected);
    assert_eq!(store.counters().blobs(), expected);
    assert_eq!(store.counters().recipes(), expected);
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), expected);
    assert_eq!(store.blobs().list().await.unwrap().len() as u64, expected);
    for r in &recipes {
        assert!(store.get_recipe(*r).await.unwrap().is_some());
    }
    let store = Arc::into_inner(store).expect("writers are done");
    close(store).await;
}

/// Size, list and delete of blobs, with the counters kept right.
pub async fn blob_operations(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    let a = blobs.put(Bytes::from_static(b"12345")).await.unwrap();
    let b = blobs.put(Bytes::from_static(b"xy")).await.unwrap();
    let ghost = CAddr::for_leaf(b"ghost");
    assert_eq!(blobs.size(a).await.unwrap(), Some(5));
    assert_eq!(blobs.size(ghost).await.unwrap(), None);
    assert!(blobs.contains(b).await.unwrap());
    assert!(!blobs.contains(ghost).await.unwrap());
    assert_eq!(
        blobs.missing(vec![ghost, a, b, ghost]).await.unwrap(),
        [ghost, ghost],
        "the absent ones, in order"
    );
    assert!(blobs.missing(vec![]).await.unwrap().is_empty());
    let mut listed = blobs.list().await.unwrap();
    listed.sort();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(listed, expected);
    assert!(blobs.delete(a).await.unwrap());
    assert!(!blobs.delete(a).await.unwrap());
    assert_eq!(blobs.get(a).await.unwrap(), None);
    assert_eq!(
        (store.counters().blobs(), store.counters().blob_bytes()),
        (1, 2)
    );
    assert_eq!(blobs.list().await.unwrap(), [b]);
    drop(blobs);
    close(store).await;
}

/// Leaves streamed in and out: a round trip in chunks, above the remote backend's multipart
/// threshold (16 MiB) and below it; bytes that do not hash to the address, and a stream that
/// fails part-way, are refused with nothing stored; a damaged blob's stream ends with
/// [`DerivaError::Corrupted`].
pub async fn streams(h: &impl Harness) {
    use futures::{StreamExt as _, TryStreamExt as _};
    let store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    let large: Bytes = (0..(17usize << 20) + 3)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let large_addr = CAddr::for_leaf(&large);
    blobs
        .put_stream(
            large_addr,
            crate::store::stream::chunks(large.clone(), 1 << 20),
        )
        .await
        .unwrap();
    assert_eq!(
        blobs.size(large_addr).await.unwrap(),
        Some(large.len() as u64)
    );
    let chunks: Vec<Bytes> = blobs
        .get_stream(large_addr, 64 << 10)
        .await
        .unwrap()
        .expect("the streamed leaf")
        .try_collect()
        .await
        .unwrap();
    assert!(
        chunks.iter().all(|c| c.len() <= 64 << 10),
        "chunks of at most 64 KiB"
    );
    assert!(chunks.concat() == large, "the bytes streamed back");
    assert!(blobs.get(large_addr).await.unwrap().unwrap() == large);
    // Again: nothing changes.
    blobs
        .put_stream(
            large_addr,
            crate::store::stream::chunks(large.clone(), 3 << 20),
        )
        .await
        .unwrap();
    assert_eq!(store.counters().blobs(), 1);

    let small = Bytes::from_static(b"a small leaf, streamed in 4-byte chunks");
    let small_addr = CAddr::for_leaf(&small);
    blobs
        .put_stream(small_addr, crate::store::stream::chunks(small.clone(), 4))
        .await
        .unwrap();
    assert_eq!(blobs.get(small_addr).await.unwrap().unwrap(), small);
    assert_eq!(store.counters().blobs(), 2);

    // Bytes that are not the address's: refused, nothing stored.
    let wrong = CAddr::for_leaf(b"something else");
    for data in [small.clone(), large.clone()] {
        let err = blobs
            .put_stream(wrong, crate::store::stream::chunks(data, 1 << 20))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DerivaError::Corrupted { addr, .. } if *addr == wrong),
            "{err}"
        );
        assert!(!blobs.contains(wrong).await.unwrap());
    }
    assert!(blobs.get_stream(wrong, 1024).await.unwrap().is_none());

    // A stream that fails after 17 MiB: its error, nothing stored.
    let other: Bytes = vec![7u8; 18 << 20].into();
    let other_addr = CAddr::for_leaf(&other);
    let failing = crate::store::stream::chunks(other.slice(..17 << 20), 1 << 20)
        .chain(futures::stream::once(async {
            Err(DerivaError::Unavailable {
                backend: "the test's source".into(),
                message: "gone".into(),
            })
        }))
        .boxed();
    let err = blobs.put_stream(other_addr, failing).await.unwrap_err();
    assert!(matches!(err, DerivaError::Unavailable { .. }), "{err}");
    assert!(!blobs.contains(other_addr).await.unwrap());
    assert_eq!(store.counters().blobs(), 2);

    // A damaged blob: every chunk, then Corrupted.
    drop(blobs);
    close(store).await;
    h.corrupt_blob(small_addr, b"not the small leaf at all")
        .await;
    let store = h.open().await.expect("reopen");
    let items: Vec<Result<Bytes>> = store
        .blobs()
        .get_stream(small_addr, 8)
        .await
        .unwrap()
        .expect("the damaged leaf")
        .collect()
        .await;
    assert!(
        matches!(items.last(), Some(Err(DerivaError::Corrupted { addr, .. })) if *addr == small_addr),
        "{items:?}"
    );
    assert!(items[..items.len() - 1].iter().all(Result::is_ok));
    close(store).await;
}

/// [`BlobStore::put_unaddressed`](crate::store::BlobStore::put_unaddressed): the address
/// comes from the bytes, large and small, again changes nothing, and a failing stream stores
/// nothing.
pub async fn unaddressed_uploads(h: &impl Harness) {
    use futures::StreamExt as _;
    let store = h.open().await.expect("open");
    let blobs = store.blobs().clone();
    let large: Bytes = (0..(17usize << 20) + 11)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    let small = Bytes::from_static(b"a small upload");
    for data in [large.clone(), small.clone(), Bytes::new()] {
        let (addr, len) = blobs
            .put_unaddressed(crate::store::stream::chunks(data.clone(), 1 << 20))
            .await
            .unwrap();
        assert_eq!(addr, CAddr::for_leaf(&data));
        assert_eq!(len, data.len() as u64);
        assert!(blobs.get(addr).await.unwrap().unwrap() == data);
    }
    assert_eq!(store.counters().blobs(), 3);
    assert_eq!(
        store.counters().blob_bytes(),
        (large.len() + small.len()) as u64
    );
    let (again, _) = blobs
        .put_unaddressed(crate::store::stream::chunks(large.clone(), 5 << 20))
        .await
        .unwrap();
    assert_eq!(again, CAddr::for_leaf(&large));
    assert_eq!(store.counters().blobs(), 3);

    let other: Bytes = vec![9u8; 18 << 20].into();
    let failing = crate::store::stream::chunks(other.slice(..17 << 20), 1 << 20)
        .chain(futures::stream::once(async {
            Err(DerivaError::Unavailable {
                backend: "the test's client".into(),
                message: "gone".into(),
            })
        }))
        .boxed();
    let err = blobs.put_unaddressed(failing).await.unwrap_err();
    assert!(matches!(err, DerivaError::Unavailable { .. }), "{err}");
    assert!(
        !blobs
            .contains(CAddr::for_leaf(&other.slice(..17 << 20)))
            .await
            .unwrap()
    );
    assert_eq!(store.counters().blobs(), 3);
    drop(blobs);
    close(store).await;
}

/// Pins: only what exists, once each, listed, counted, durable across a reopen, and unpinned.
pub async fn pins(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let leaf = store
        .put_leaf(Bytes::from_static(b"pinned leaf"))
        .await
        .unwrap();
    let recipe = Recipe::new(
        FunctionId::new("concat", "v1").unwrap(),
        vec![leaf],
        BTreeMap::<String, String>::new(),
    )
    .unwrap();
    let recipe = store.put_recipe(recipe).await.unwrap();
    let unknown = CAddr::for_leaf(b"never stored");
    assert!(matches!(
        store.pin(unknown).await,
        Err(DerivaError::NotFound { addr }) if addr == unknown
    ));
    assert!(store.pin(leaf).await.unwrap(), "new");
    assert!(!store.pin(leaf).await.unwrap(), "already pinned");
    assert!(store.pin(recipe).await.unwrap());
    let mut pins = store.pins().await.unwrap();
    pins.sort();
    let mut expected = vec![leaf, recipe];
    expected.sort();
    assert_eq!(pins, expected);
    assert_eq!(store.counters().pins(), 2);
    close(store).await;

    let store = h.open().await.expect("reopen");
    assert_eq!(store.counters().pins(), 2, "counted again at open");
    assert!(store.unpin(leaf).await.unwrap());
    assert!(!store.unpin(leaf).await.unwrap(), "no longer pinned");
    assert!(!store.unpin(unknown).await.unwrap());
    assert_eq!(store.pins().await.unwrap(), vec![recipe]);
    assert_eq!(store.counters().pins(), 1);
    close(store).await;
}

/// A collection with no grace period, everything else default.
fn now_gc() -> GcOptions {
    GcOptions::default()
}

/// Lets the clock move past what was just put, so that a collection with no grace period
/// finds it strictly older than its cutoff (times are kept to the millisecond).
async fn tick() {
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
}

/// Whether every stored recipe's inputs are stored: garbage collection never leaves a recipe
/// without one. Also checks the counters against scans.
async fn assert_consistent(store: &Store) {
    let leaves: std::collections::HashSet<CAddr> =
        store.blobs().list().await.unwrap().into_iter().collect();
    let recipes = store.recipes().list_aged().await.unwrap();
    let names: std::collections::HashSet<CAddr> = recipes.iter().map(|r| r.addr).collect();
    for r in &recipes {
        for input in r.inputs.as_ref().expect("recipes decode") {
            assert!(
                leaves.contains(input) || names.contains(input),
                "recipe {} lost its input {input}",
                r.addr
            );
        }
    }
    assert_eq!(store.counters().blobs(), leaves.len() as u64, "blob count");
    assert_eq!(
        store.counters().recipes(),
        recipes.len() as u64,
        "recipe count"
    );
    assert_eq!(
        store.count_recipes_by_scan().await.unwrap(),
        recipes.len() as u64
    );
}

fn sorted(mut addrs: Vec<CAddr>) -> Vec<CAddr> {
    addrs.sort();
    addrs
}

fn removed(outcome: &GcOutcome) -> Vec<CAddr> {
    outcome.removed.iter().map(|r| r.addr).collect()
}

/// Pins are roots, their closure stays, the rest goes once older than the grace period:
/// recipes deepest first, then leaves; a dry run changes nothing; `max_removals` bounds a run.
pub async fn garbage_collection(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let leaf = |s: &'static str| store.put_leaf(Bytes::from_static(s.as_bytes()));
    let (a, b, c, d, e) = (
        leaf("gc a").await.unwrap(),
        leaf("gc b").await.unwrap(),
        leaf("gc c").await.unwrap(),
        leaf("gc d").await.unwrap(),
        leaf("gc e, used by nothing").await.unwrap(),
    );
    let r1 = store.put_recipe(recipe(vec![a, b], "r1")).await.unwrap();
    let r2 = store.put_recipe(recipe(vec![r1, c], "r2")).await.unwrap();
    let r3 = store.put_recipe(recipe(vec![d], "r3")).await.unwrap();
    let r4 = store.put_recipe(recipe(vec![r3], "r4")).await.unwrap();
    assert!(store.pin(r2).await.unwrap());
    tick().await;

    // Young: a grace period longer than the test keeps everything.
    let kept = store
        .collect_garbage(&GcOptions {
            grace: std::time::Duration::from_secs(3600),
            ..now_gc()
        })
        .await
        .unwrap();
    assert!(kept.removed.is_empty(), "{kept:?}");
    assert_eq!((kept.live_blobs, kept.live_recipes, kept.pinned), (5, 4, 1));

    let dry = store
        .collect_garbage(&GcOptions {
            dry_run: true,
            ..now_gc()
        })
        .await
        .unwrap();
    assert_eq!(removed(&dry)[..2], [r4, r3], "deepest recipe first");
    assert_eq!(
        sorted(removed(&dry)[2..].to_vec()),
        sorted(vec![d, e]),
        "then leaves"
    );
    assert_eq!((dry.recipes_removed, dry.blobs_removed), (2, 2));
    assert_eq!(
        dry.bytes_reclaimed,
        ("gc d".len() + "gc e, used by nothing".len()) as u64
    );
    assert_eq!(store.counters().blobs(), 5, "a dry run removes nothing");
    assert_eq!(store.counters().recipes(), 4);

    let one = store
        .collect_garbage(&GcOptions {
            max_removals: 1,
            ..now_gc()
        })
        .await
        .unwrap();
    assert_eq!(removed(&one), [r4]);
    assert!(store.get_recipe(r4).await.unwrap().is_none());
    assert_consistent(&store).await;

    let rest = store.collect_garbage(&now_gc()).await.unwrap();
    assert_eq!(removed(&rest)[0], r3);
    assert_eq!(sorted(removed(&rest)[1..].to_vec()), sorted(vec![d, e]));
    assert_eq!(
        rest.removed.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [AddrKind::Recipe, AddrKind::Leaf, AddrKind::Leaf]
    );
    assert_eq!((rest.live_blobs, rest.live_recipes), (3, 2));
    assert!(store.get_leaf(d).await.unwrap().is_none());
    for live in [a, b, c] {
        assert!(
            store.get_leaf(live).await.unwrap().is_some(),
            "{live} is reachable from a pin"
        );
    }
    assert!(store.get_recipe(r1).await.unwrap().is_some());
    assert_consistent(&store).await;
    close(store).await;

    // After a reopen (counts loaded again), the unpinned rest goes in one run.
    let store = h.open().await.expect("reopen");
    assert_consistent(&store).await;
    assert!(store.unpin(r2).await.unwrap());
    let all = store.collect_garbage(&now_gc()).await.unwrap();
    assert_eq!(removed(&all)[..2], [r2, r1]);
    assert_eq!((all.blobs_removed, all.recipes_removed), (3, 2));
    assert_eq!(
        (store.counters().blobs(), store.counters().recipes()),
        (0, 0)
    );
    assert_consistent(&store).await;
    close(store).await;
}

/// Putting a leaf or a recipe again makes it young again: a collection whose grace period it
/// is within keeps it.
pub async fn gc_refreshed_by_puts(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let grace = std::time::Duration::from_millis(1500);
    let leaf = store
        .put_leaf(Bytes::from_static(b"put twice"))
        .await
        .unwrap();
    let r = store
        .put_recipe(recipe(vec![leaf], "put twice"))
        .await
        .unwrap();
    tokio::time::sleep(grace + std::time::Duration::from_millis(500)).await;
    assert_eq!(
        store
            .put_leaf(Bytes::from_static(b"put twice"))
            .await
            .unwrap(),
        leaf
    );
    assert_eq!(
        store
            .put_recipe(recipe(vec![leaf], "put twice"))
            .await
            .unwrap(),
        r
    );
    let options = GcOptions { grace, ..now_gc() };
    let outcome = store.collect_garbage(&options).await.unwrap();
    assert!(
        outcome.removed.is_empty(),
        "put again within the grace period: {outcome:?}"
    );
    tokio::time::sleep(grace + std::time::Duration::from_millis(500)).await;
    let outcome = store.collect_garbage(&options).await.unwrap();
    assert_eq!(removed(&outcome), [r, leaf]);
    assert_consistent(&store).await;
    close(store).await;
}

/// Writers put leaves, recipes over them and over an old shared leaf (put again first), and
/// pins, while collections with no grace period run back to back. A put may fail (its input
/// was collected first: `MissingInput`, `NotFound` for a pin), but no stored recipe ever lacks
/// an input, and every pinned recipe keeps its whole tree. Then, with a grace period, nothing
/// the writers put is collected.
pub async fn gc_races_with_writers(h: &impl Harness) {
    let store = Arc::new(h.open().await.expect("open"));
    let shared = Bytes::from_static(b"an old leaf every writer uses");
    store.put_leaf(shared.clone()).await.unwrap();
    tick().await;
    for grace in [
        std::time::Duration::ZERO,
        std::time::Duration::from_secs(3600),
    ] {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (store, shared, done) = (store.clone(), shared.clone(), done.clone());
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    let mut pinned = Vec::new();
                    let mut i = 0u32;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) || i < 10 {
                        i += 1;
                        let key = format!("writer {w} item {i} grace {}", grace.as_secs());
                        let own = store.put_leaf(Bytes::from(key.clone())).await.unwrap();
                        let old = store.put_leaf(shared.clone()).await.unwrap();
                        let inner = match store.put_recipe(recipe(vec![own, old], &key)).await {
                            Ok(r) => r,
                            Err(DerivaError::MissingInput { .. }) if grace.is_zero() => continue,
                            Err(e) => panic!("put of {key}: {e}"),
                        };
                        let outer = match store.put_recipe(recipe(vec![inner], &key)).await {
                            Ok(r) => r,
                            Err(DerivaError::MissingInput { .. }) if grace.is_zero() => continue,
                            Err(e) => panic!("put of {key}: {e}"),
                        };
                        acked.push((own, inner, outer));
                        if i.is_multiple_of(3) {
                            match store.pin(outer).await {
                                Ok(_) => pinned.push((own, inner, outer)),
                                Err(DerivaError::NotFound { .. }) if grace.is_zero() => {}
                                Err(e) => panic!("pin of {key}: {e}"),
                            }
                        }
                    }
                    (acked, pinned)
                })
            })
            .collect();
        let options = GcOptions { grace, ..now_gc() };
        let mut runs = 0;
        let mut swept = 0;
        while runs < 20 {
            let outcome = store.collect_garbage(&options).await.unwrap();
            swept += outcome.removed.len();
            runs += 1;
            assert_consistent_recipes(&store).await;
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = Vec::new();
        let mut pinned = Vec::new();
        for w in writers {
            let (a, p) = w.await.expect("writer");
            acked.extend(a);
            pinned.extend(p);
        }
        assert!(!acked.is_empty());
        for (own, inner, outer) in &pinned {
            assert!(
                store.get_recipe(*outer).await.unwrap().is_some(),
                "pinned {outer} was collected"
            );
            assert!(store.get_recipe(*inner).await.unwrap().is_some());
            assert!(store.get_leaf(*own).await.unwrap().is_some());
            assert!(
                store
                    .get_leaf(CAddr::for_leaf(&shared))
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        if grace.is_zero() {
            assert!(
                swept > 0,
                "collections with no grace period removed nothing"
            );
        } else {
            assert_eq!(
                swept, 0,
                "a collection removed what was put within its grace period"
            );
            for (own, inner, outer) in &acked {
                assert!(store.get_recipe(*outer).await.unwrap().is_some());
                assert!(store.get_recipe(*inner).await.unwrap().is_some());
                assert!(store.get_leaf(*own).await.unwrap().is_some());
            }
        }
        for (_, _, outer) in &pinned {
            store.unpin(*outer).await.unwrap();
        }
    }
    assert_consistent(&store).await;
    let store = Arc::into_inner(store).expect("writers are done");
    close(store).await;
}

/// [`assert_consistent`] without the counters, which writers move while it reads.
async fn assert_consistent_recipes(store: &Store) {
    // Recipes first: a leaf listed after them is there if the recipes' inputs were.
    let recipes = store.recipes().list_aged().await.unwrap();
    let names: std::collections::HashSet<CAddr> = recipes.iter().map(|r| r.addr).collect();
    let leaves: std::collections::HashSet<CAddr> =
        store.blobs().list().await.unwrap().into_iter().collect();
    for r in &recipes {
        for input in r.inputs.as_ref().expect("recipes decode") {
            if !leaves.contains(input) && !names.contains(input) {
                // Deleted since the listing together with the recipe itself?
                let still = store.get_recipe(r.addr).await.unwrap().is_some();
                assert!(!still, "recipe {} lost its input {input}", r.addr);
            }
        }
    }
}

/// A recipe whose stored row no longer decodes is kept, and so are its inputs (the reference
/// check reads the edges, not the damaged row); the collection reports it.
pub async fn gc_keeps_corrupted_recipes(h: &impl Harness) {
    let store = h.open().await.expect("open");
    let leaf = store
        .put_leaf(Bytes::from_static(b"under a damaged recipe"))
        .await
        .unwrap();
    let damaged = store
        .put_recipe(recipe(vec![leaf], "damaged"))
        .await
        .unwrap();
    let other = store
        .put_leaf(Bytes::from_static(b"plain garbage"))
        .await
        .unwrap();
    close(store).await;
    h.corrupt_recipe(damaged).await;
    let store = h.open().await.expect("reopen");
    tick().await;
    let outcome = store.collect_garbage(&now_gc()).await.unwrap();
    assert_eq!(outcome.corrupted, 1);
    assert_eq!(removed(&outcome), [other]);
    assert!(
        store.blobs().contains(leaf).await.unwrap(),
        "the damaged recipe's input stays"
    );
    assert_eq!(store.count_recipes_by_scan().await.unwrap(), 1);
    close(store).await;
}
