//! Hot leaves in the cache: a leaf a Get reads a second time is cached beside the outputs,
//! under the same budget, served without the store, and dropped when it is collected.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use deriva_compute::{CacheKind, ExecutorConfig, GcOptions, Outcome};
use deriva_core::{CAddr, DerivaError};
use deriva_testkit::compute::{CountingBlobs, Harness};

const CHUNK: usize = 64 << 10;

/// A Get: the chunks of `addr`, or the first error, as a client would see them.
async fn get(h: &Harness, addr: CAddr, chunk_bytes: usize) -> deriva_core::Result<Vec<Bytes>> {
    h.get_chunks(addr, chunk_bytes).await
}

async fn get_all(h: &Harness, addr: CAddr) -> deriva_core::Result<Vec<u8>> {
    Ok(get(h, addr, CHUNK).await?.concat())
}

fn counting() -> (Harness, std::sync::Arc<CountingBlobs>) {
    Harness::counting(ExecutorConfig::default(), 1 << 20)
}

/// (a) The second Get of a leaf caches it; later Gets, and recipes over it, do not touch the
/// blob store. (Their spans: `tests/it/spans.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_read_twice_is_then_served_from_the_cache_without_the_store() {
    let (h, blobs) = counting();
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    let leaf = h.leaf(&data).await;
    let stats = h.exec.stats().clone();

    assert_eq!(get_all(&h, leaf).await.unwrap(), data);
    assert_eq!(blobs.reads(leaf), 1);
    assert!(
        !h.exec.cache().contains(&leaf),
        "a leaf read once is not cached"
    );
    assert_eq!(get_all(&h, leaf).await.unwrap(), data);
    assert_eq!(blobs.reads(leaf), 2);
    assert_eq!(h.exec.cache().kind_of(&leaf), Some(CacheKind::Leaf));
    assert_eq!(stats.outcome(Outcome::Leaf), 2);

    for round in 1..=3u64 {
        assert_eq!(get_all(&h, leaf).await.unwrap(), data);
        assert_eq!(blobs.reads(leaf), 2, "round {round} read the store");
        assert_eq!(stats.outcome(Outcome::Hit), round);
        assert_eq!(h.exec.cache().stats().leaf_hits(), round);
    }
    // Served in the asked chunks, as slices of the cached bytes.
    let chunks = get(&h, leaf, 300).await.unwrap();
    assert_eq!(
        chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
        [300, 300, 300, 124]
    );
    // An input of a compute, and a materialize: from the cache too.
    let reversed = h.recipe("reverse/v1", &[leaf], &[]).await;
    let mut want = data.clone();
    want.reverse();
    assert_eq!(h.exec.materialize(reversed).await.unwrap(), want);
    assert_eq!(h.exec.materialize(leaf).await.unwrap(), data);
    assert_eq!(blobs.reads(leaf), 2);
    assert_eq!(
        h.exec.stats().saved(),
        Duration::ZERO,
        "a leaf hit saves no compute"
    );
}

/// Only small leaves are cached: a leaf above the bound streams from the store every time (and
/// arrives whole, in its chunks, even on the read that looked at caching it); none is cached
/// with the bound at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_leaves_stream_from_the_store_every_time() {
    let (h, blobs) = counting();
    let big: Vec<u8> = (0..200_001u32).map(|i| (i % 253) as u8).collect();
    let big_leaf = h.leaf(&big).await;
    for read in 1..=3 {
        let chunks = get(&h, big_leaf, 16 << 10).await.unwrap();
        assert_eq!(chunks.len(), 13, "200,001 bytes in 16 KiB chunks");
        assert!(chunks.concat() == big, "read {read}");
        assert_eq!(blobs.reads(big_leaf), read);
    }
    assert!(!h.exec.cache().contains(&big_leaf));

    // At the bound exactly, in several chunks: cached, and served in the same chunks.
    let config = ExecutorConfig {
        leaf_cache_max_bytes: 10_000,
        ..ExecutorConfig::default()
    };
    let (h, blobs) = Harness::counting(config, 1 << 20);
    let at_bound = h.leaf(&[7; 10_000]).await;
    let over = h.leaf(&[8; 10_001]).await;
    for leaf in [at_bound, over] {
        for _ in 0..3 {
            let chunks = get(&h, leaf, 4096).await.unwrap();
            assert_eq!(
                chunks.iter().map(Bytes::len).collect::<Vec<_>>()[..2],
                [4096, 4096]
            );
        }
    }
    assert_eq!((blobs.reads(at_bound), blobs.reads(over)), (2, 3));
    assert!(h.exec.cache().contains(&at_bound) && !h.exec.cache().contains(&over));

    let off = ExecutorConfig {
        leaf_cache_max_bytes: 0,
        ..ExecutorConfig::default()
    };
    let (h, blobs) = Harness::counting(off, 1 << 20);
    let small = h.leaf(b"small").await;
    for _ in 0..3 {
        assert_eq!(get_all(&h, small).await.unwrap(), b"small");
    }
    assert_eq!(
        (blobs.reads(small), h.exec.cache().stats().entries()),
        (3, 0)
    );
}

/// (b) Leaves and outputs share one byte budget: whatever the mix, the cache never holds more,
/// evicts either kind, and counts each kind's entries and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_and_outputs_share_the_cache_budget() {
    const BUDGET: u64 = 16 << 10;
    let h = Harness::with(
        deriva_compute::FunctionRegistry::with_builtins(),
        ExecutorConfig::default(),
        BUDGET,
    );
    let cache = h.exec.cache().clone();
    let mut sizes: HashMap<CAddr, (u64, CacheKind)> = HashMap::new();
    // A sixteenth of the budget at most: 1 KiB.
    let too_big = h.leaf(&[1; 1025]).await;
    for _ in 0..3 {
        get_all(&h, too_big).await.unwrap();
    }
    assert!(!cache.contains(&too_big));
    for i in 0..24u32 {
        let data: Vec<u8> = (0..1000u32).map(|j| (i * 7 + j) as u8).collect();
        let leaf = h.leaf(&data).await;
        get_all(&h, leaf).await.unwrap();
        get_all(&h, leaf).await.unwrap();
        sizes.insert(leaf, (1000, CacheKind::Leaf));
        let out = h.recipe("repeat/v1", &[leaf], &[("count", "2")]).await;
        h.exec.materialize(out).await.unwrap();
        sizes.insert(out, (2000, CacheKind::Output));
        let s = cache.stats();
        assert!(
            s.size_bytes() <= BUDGET,
            "step {i}: {} bytes",
            s.size_bytes()
        );
    }
    let s = cache.stats();
    assert!(s.evictions() > 0, "24 KiB of leaves and 48 KiB of outputs");
    let held: Vec<(u64, CacheKind)> = sizes
        .iter()
        .filter(|(a, _)| cache.contains(a))
        .map(|(a, (size, kind))| {
            assert_eq!(cache.kind_of(a), Some(*kind));
            assert_eq!(cache.size_of(a), Some(*size));
            (*size, *kind)
        })
        .collect();
    let of = |kind: CacheKind| held.iter().filter(move |(_, k)| *k == kind);
    assert_eq!(s.entries(), held.len() as u64);
    assert_eq!(s.size_bytes(), held.iter().map(|(n, _)| n).sum::<u64>());
    assert_eq!(s.leaf_entries(), of(CacheKind::Leaf).count() as u64);
    assert_eq!(
        s.leaf_size_bytes(),
        of(CacheKind::Leaf).map(|(n, _)| n).sum::<u64>()
    );
    assert!(s.leaf_entries() > 0 && of(CacheKind::Output).count() > 0);
    assert!(
        sizes
            .iter()
            .any(|(a, (_, k))| *k == CacheKind::Leaf && !cache.contains(a)),
        "leaves are evicted too"
    );
}

/// (c) A leaf that garbage collection removes leaves the cache before the collection reports
/// it: the next Get is NOT_FOUND. So does a leaf that is invalidated (it is read again) or that
/// another node's collection announces on the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collected_leaf_is_not_served_from_the_cache() {
    let (h, blobs) = counting();
    let gone = h.leaf(b"garbage soon").await;
    let kept = h.leaf(b"pinned, kept").await;
    h.exec.store().pin(kept).await.unwrap();
    for leaf in [gone, kept, gone, kept] {
        get_all(&h, leaf).await.unwrap();
    }
    assert!(h.exec.cache().contains(&gone) && h.exec.cache().contains(&kept));
    // Strictly older than a cutoff with no grace period (times are kept to the millisecond).
    tokio::time::sleep(Duration::from_millis(30)).await;

    let dry = h
        .exec
        .garbage_collect(GcOptions {
            dry_run: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.store.blobs_removed, 1);
    assert!(h.exec.cache().contains(&gone), "a dry run drops nothing");

    let report = h.exec.garbage_collect(GcOptions::default()).await.unwrap();
    assert_eq!(report.store.blobs_removed, 1);
    assert_eq!(report.store.removed[0].addr, gone);
    assert_eq!(
        (report.cache_entries_removed, report.bytes_reclaimed_cache),
        (0, 0),
        "a cached leaf counts as the leaf removed, not as an output"
    );
    assert!(!h.exec.cache().contains(&gone));
    assert_eq!(h.exec.cache().stats().leaf_entries(), 1);
    let reads = blobs.reads(gone);
    assert_eq!(
        get_all(&h, gone).await,
        Err(DerivaError::NotFound { addr: gone })
    );
    assert_eq!(
        blobs.reads(gone),
        reads + 1,
        "asked the store, not the cache"
    );

    // Invalidate drops a cached leaf too, and says so; the next Get reads the store.
    let report = h.exec.invalidate(kept, false).await.unwrap();
    assert!(report.was_cached);
    assert_eq!(report.evicted, vec![kept]);
    assert_eq!(get_all(&h, kept).await.unwrap(), b"pinned, kept");
    assert_eq!(blobs.reads(kept), 3);
    // Cached again (its earlier read is remembered); then another node announces it collected.
    assert!(h.exec.cache().contains(&kept));
    assert_eq!(h.exec.evict_local(&[kept]), 1);
    assert_eq!(h.exec.cache().stats().leaf_entries(), 0);
}

/// A leaf whose stored bytes are damaged is never cached, and each read reports it. A leaf
/// cached before its stored copy is damaged keeps being served from memory: those bytes were
/// verified against the address, so they are the leaf's. Once it leaves the cache, the damage
/// is found (and counted) at the next read, as without a cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_leaves_are_never_cached_and_cached_ones_stay_right() {
    let (h, blobs) = counting();
    let leaf = h.leaf(b"precious bytes").await;
    let corrupted = |r: deriva_core::Result<Vec<u8>>| matches!(r, Err(DerivaError::Corrupted { addr, .. }) if addr == leaf);
    blobs.damage(true);
    for read in 1..=3 {
        assert!(corrupted(get_all(&h, leaf).await), "read {read}");
        assert!(!h.exec.cache().contains(&leaf));
        assert_eq!(h.exec.stats().corruptions(), read);
    }
    blobs.damage(false);
    assert_eq!(get_all(&h, leaf).await.unwrap(), b"precious bytes");
    assert!(h.exec.cache().contains(&leaf), "read before: admitted now");

    blobs.damage(true);
    let reads = blobs.reads(leaf);
    assert_eq!(get_all(&h, leaf).await.unwrap(), b"precious bytes");
    assert_eq!(blobs.reads(leaf), reads);
    assert_eq!(h.exec.stats().corruptions(), 3);
    // Evicted (or invalidated): the damage shows at the next read.
    assert!(h.exec.cache().remove(&leaf));
    assert!(corrupted(get_all(&h, leaf).await));
    assert_eq!(h.exec.stats().corruptions(), 4);
    assert!(!h.exec.cache().contains(&leaf));
}
