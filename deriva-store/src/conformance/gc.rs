//! The garbage-collection cases of the conformance suite: its rules, the refresh of a put
//! again, writers racing collections, and corrupted recipes kept.

use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError};

use super::{Harness, close, recipe};
use crate::gc::{GcOptions, GcOutcome};
use crate::{AddrKind, Store};

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
    let recipes = recipes_with_inputs(store).await;
    let names: std::collections::HashSet<CAddr> = recipes.iter().map(|r| r.0).collect();
    for (addr, inputs) in &recipes {
        for input in inputs.as_ref().expect("recipes decode") {
            assert!(
                leaves.contains(input) || names.contains(input),
                "recipe {addr} lost its input {input}"
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

/// Every stored recipe with its inputs (`None` if it is gone since the listing), read 16 at a
/// time.
async fn recipes_with_inputs(store: &Store) -> Vec<(CAddr, Option<Vec<CAddr>>)> {
    use futures::StreamExt as _;
    let listed = store.recipes().list().await.unwrap();
    futures::stream::iter(listed)
        .map(|(addr, _)| async move {
            let stored = store.get_recipe(addr).await.unwrap();
            (addr, stored.map(|s| s.recipe.inputs().to_vec()))
        })
        .buffer_unordered(16)
        .collect()
        .await
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
            // Every recipe is read back: often enough to catch a sweep that broke one, not so
            // often that the reads outgrow the writers.
            if runs % 5 == 0 {
                assert_consistent_recipes(&store).await;
            }
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
    let recipes = recipes_with_inputs(store).await;
    let names: std::collections::HashSet<CAddr> = recipes.iter().map(|r| r.0).collect();
    let leaves: std::collections::HashSet<CAddr> =
        store.blobs().list().await.unwrap().into_iter().collect();
    for (addr, inputs) in &recipes {
        // A recipe deleted since the listing has no inputs to check.
        for input in inputs.iter().flatten() {
            if !leaves.contains(input) && !names.contains(input) {
                // Deleted since the listing together with the recipe itself?
                let still = store.get_recipe(*addr).await.unwrap().is_some();
                assert!(!still, "recipe {addr} lost its input {input}");
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
