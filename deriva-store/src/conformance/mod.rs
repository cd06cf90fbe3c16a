//! The conformance suite every storage backend passes: written once, generic over a
//! [`Harness`] that opens the backend under test and can damage it behind its back.
//!
//! A backend's tests instantiate it with [`conformance_tests!`](crate::conformance_tests):
//!
//! ```text
//! deriva_store::conformance_tests!(MyHarness::new());
//! ```
//!
//! which generates one `#[tokio::test]` per case, each with a fresh harness. The cases:
//! durability across reopen, idempotent puts, missing inputs, dependents, corruption
//! detection, concurrent writers, the blob operations (size, list, delete), streamed
//! leaves, streamed uploads whose address comes at the end, pins, garbage collection (its
//! rules, the refresh of a put again, and writers racing collections), and the paged listings
//! (pages of 1, 2 and many, keys at the edges, a listing while puts happen) with batched puts,
//! the materialization records (round trip, replacement, audits, deletes, gone with their
//! recipe on a sweep) and the stored time of a leaf (`stat`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

mod gc;
mod listing;
mod records;

pub use gc::{
    garbage_collection, gc_keeps_corrupted_recipes, gc_races_with_writers, gc_refreshed_by_puts,
};
pub use listing::{listing_pages, listing_while_putting};
pub use records::{leaf_stat, records};

use crate::Store;
use deriva_core::CAddr;
use deriva_core::{DerivaError, Result};
use deriva_core::{FunctionId, Recipe};

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
            gc_races_with_writers, gc_keeps_corrupted_recipes, listing_pages,
            listing_while_putting, records, leaf_stat);
    };
    (@cases $harness:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$harness).await;
            }
        )*
    };
}

fn concat() -> FunctionId {
    FunctionId::new("concat", "1").expect("valid function id")
}

pub(super) fn recipe(inputs: Vec<CAddr>, tag: &str) -> Recipe {
    Recipe::new(
        concat(),
        inputs,
        BTreeMap::from([("tag".to_owned(), tag.to_owned())]),
    )
    .expect("valid recipe")
}

/// Drops `store` and waits until its resources are free, so it can be opened again.
pub(super) async fn close(store: Store) {
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
    // A Get's one question: a leaf opened (or read whole), a recipe, or nothing.
    match store.open(a, 4096).await.unwrap() {
        Some(super::Found::Leaf(chunks)) => {
            let read: Vec<Result<Bytes>> = futures::StreamExt::collect(chunks).await;
            let read: Vec<Bytes> = read.into_iter().map(|c| c.unwrap()).collect();
            assert_eq!(read.concat(), b"a");
        }
        other => panic!("{a} is a leaf, opened as {other:?}"),
    }
    assert!(matches!(
        store.open(join, 4096).await.unwrap(),
        Some(super::Found::Recipe(found)) if found == stored
    ));
    assert!(
        store
            .open(CAddr::from_bytes([7; 32]), 4096)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.find(a).await.unwrap(),
        Some(super::Found::Leaf(Bytes::from_static(b"a")))
    );
    assert_eq!(
        store.find(join).await.unwrap(),
        Some(super::Found::Recipe(stored.clone()))
    );
    assert_eq!(store.find(CAddr::from_bytes([7; 32])).await.unwrap(), None);

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
        .put_stream(large_addr, crate::stream::chunks(large.clone(), 1 << 20))
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
        .put_stream(large_addr, crate::stream::chunks(large.clone(), 3 << 20))
        .await
        .unwrap();
    assert_eq!(store.counters().blobs(), 1);

    let small = Bytes::from_static(b"a small leaf, streamed in 4-byte chunks");
    let small_addr = CAddr::for_leaf(&small);
    blobs
        .put_stream(small_addr, crate::stream::chunks(small.clone(), 4))
        .await
        .unwrap();
    assert_eq!(blobs.get(small_addr).await.unwrap().unwrap(), small);
    assert_eq!(store.counters().blobs(), 2);

    // Bytes that are not the address's: refused, nothing stored.
    let wrong = CAddr::for_leaf(b"something else");
    for data in [small.clone(), large.clone()] {
        let err = blobs
            .put_stream(wrong, crate::stream::chunks(data, 1 << 20))
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
    let failing = crate::stream::chunks(other.slice(..17 << 20), 1 << 20)
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
            .put_unaddressed(crate::stream::chunks(data.clone(), 1 << 20))
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
        .put_unaddressed(crate::stream::chunks(large.clone(), 5 << 20))
        .await
        .unwrap();
    assert_eq!(again, CAddr::for_leaf(&large));
    assert_eq!(store.counters().blobs(), 3);

    let other: Bytes = vec![9u8; 18 << 20].into();
    let failing = crate::stream::chunks(other.slice(..17 << 20), 1 << 20)
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
