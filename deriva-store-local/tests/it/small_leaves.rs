//! Small leaves as redb rows, written with group commit: concurrent puts share commits, every
//! acknowledged put is there after a restart, and rows live beside blob files written before
//! (or with another threshold) without being counted twice.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError};
use deriva_store::Store;
use deriva_store_local::{BLOB_DIR, LEAVES_FILE, LocalOptions, damage_leaf};
use futures::StreamExt as _;
use tempfile::TempDir;
use tokio::sync::Barrier;

const FILES_ONLY: LocalOptions = LocalOptions {
    inline_leaf_bytes: 0,
};

async fn close(store: Store) {
    let released = store.released();
    drop(store);
    released.wait().await;
}

fn blob_file(dir: &Path, addr: &CAddr) -> std::path::PathBuf {
    let hex = addr.to_hex();
    dir.join(BLOB_DIR).join(&hex[..2]).join(hex)
}

fn leaf(i: u32, len: usize) -> Bytes {
    let mut v = i.to_le_bytes().to_vec();
    v.resize(len, (i % 251) as u8);
    Bytes::from(v)
}

/// 64 writers put at once: every put is acknowledged, the commits are fewer than the puts (they
/// shared fsyncs), nothing is a file, and after a restart every leaf reads back with the counts
/// loaded from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_commits_and_survive_a_restart() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(deriva_store_local::open(tmp.path()).unwrap());
    const N: u32 = 64;
    let barrier = Arc::new(Barrier::new(N as usize));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.put_leaf(leaf(i, 1024)).await
            })
        })
        .collect();
    let mut addrs = Vec::new();
    for t in tasks {
        addrs.push(t.await.unwrap().expect("put acknowledged"));
    }
    let commits = store.counters().leaf_commits();
    assert!(
        (1..u64::from(N)).contains(&commits),
        "{N} concurrent puts made {commits} commits: they should share them"
    );
    assert_eq!(store.counters().blobs(), u64::from(N));
    assert_eq!(store.counters().blob_bytes(), u64::from(N) * 1024);
    for addr in &addrs {
        assert!(
            !blob_file(tmp.path(), addr).exists(),
            "a small leaf is no file"
        );
    }
    assert!(tmp.path().join(LEAVES_FILE).is_file());

    let store = Arc::into_inner(store).unwrap();
    close(store).await;
    let store = deriva_store_local::open(tmp.path()).unwrap();
    assert_eq!(store.counters().blobs(), u64::from(N), "counted at open");
    assert_eq!(store.counters().blob_bytes(), u64::from(N) * 1024);
    for (i, addr) in addrs.iter().enumerate() {
        let got = store.get_leaf(*addr).await.unwrap().expect("acknowledged");
        assert_eq!(got, leaf(i as u32, 1024));
        assert_eq!(store.blobs().size(*addr).await.unwrap(), Some(1024));
        assert!(store.blobs().contains(*addr).await.unwrap());
    }
    let mut listed = store.blobs().list().await.unwrap();
    listed.sort();
    let mut expected = addrs.clone();
    expected.sort();
    assert_eq!(listed, expected);
    // The same bytes again: nothing new, one more commit (the time refreshed).
    let before = store.counters().leaf_commits();
    store.put_leaf(leaf(0, 1024)).await.unwrap();
    assert_eq!(store.counters().blobs(), u64::from(N));
    assert_eq!(store.counters().leaf_commits(), before + 1);
    close(store).await;
}

/// The threshold: a leaf of exactly `inline_leaf_bytes` is a row, one byte more is a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_threshold_decides_row_or_file() {
    let tmp = TempDir::new().unwrap();
    let store = deriva_store_local::open_with(
        tmp.path(),
        LocalOptions {
            inline_leaf_bytes: 100,
        },
    )
    .unwrap();
    let row = store.put_leaf(leaf(1, 100)).await.unwrap();
    let file = store.put_leaf(leaf(2, 101)).await.unwrap();
    assert!(!blob_file(tmp.path(), &row).exists());
    assert!(blob_file(tmp.path(), &file).exists());
    assert_eq!(store.counters().blobs(), 2);
    assert_eq!(store.counters().blob_bytes(), 201);
    // Streamed in 7-byte chunks, then read as a stream of 16-byte chunks, verified at the end.
    let streamed = leaf(3, 90);
    let addr = CAddr::for_leaf(&streamed);
    store
        .blobs()
        .put_stream(addr, deriva_store::stream::chunks(streamed.clone(), 7))
        .await
        .unwrap();
    assert!(
        !blob_file(tmp.path(), &addr).exists(),
        "a small stream is a row"
    );
    let chunks: Vec<Bytes> = store
        .blobs()
        .get_stream(addr, 16)
        .await
        .unwrap()
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert!(chunks.iter().all(|c| c.len() <= 16));
    assert_eq!(chunks.concat(), streamed);
    // Put again whole: counted once.
    store.put_leaf(streamed).await.unwrap();
    assert_eq!(store.counters().blobs(), 3);
    close(store).await;
}

/// A store whose small leaves are files (written with the threshold 0, as every store was
/// before rows) opens with rows on: the files are read, a put of one refreshes the file rather
/// than adding a row, and a delete removes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_from_before_are_served_and_not_counted_twice() {
    let tmp = TempDir::new().unwrap();
    let store = deriva_store_local::open_with(tmp.path(), FILES_ONLY).unwrap();
    let old = store.put_leaf(leaf(7, 512)).await.unwrap();
    let gone = store.put_leaf(leaf(8, 512)).await.unwrap();
    close(store).await;
    let file = blob_file(tmp.path(), &old);
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();

    let store = deriva_store_local::open(tmp.path()).unwrap();
    assert_eq!(store.counters().blobs(), 2);
    assert_eq!(store.get_leaf(old).await.unwrap().unwrap(), leaf(7, 512));
    store.put_leaf(leaf(7, 512)).await.unwrap();
    assert_eq!(
        store.counters().blobs(),
        2,
        "the file was refreshed, no row added"
    );
    let at = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert!(
        at > long_ago + Duration::from_secs(1800),
        "the put refreshed the file's time"
    );
    assert!(store.blobs().delete(gone).await.unwrap());
    assert!(!blob_file(tmp.path(), &gone).exists());
    assert_eq!(store.counters().blobs(), 1);
    assert_eq!(store.counters().blob_bytes(), 512);
    close(store).await;
}

/// A damaged row is `Corrupted` on every read path, and putting the right bytes repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_row_is_reported_and_repaired() {
    let tmp = TempDir::new().unwrap();
    let store = deriva_store_local::open(tmp.path()).unwrap();
    let data = leaf(9, 4000);
    let addr = store.put_leaf(data.clone()).await.unwrap();
    close(store).await;
    damage_leaf(tmp.path(), addr, b"not those bytes").unwrap();

    let store = deriva_store_local::open(tmp.path()).unwrap();
    for result in [
        store.get_leaf(addr).await.map(drop),
        match store.blobs().get_stream(addr, 1 << 20).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
    ] {
        match result {
            Err(DerivaError::Corrupted { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("a damaged row must be Corrupted, got {other:?}"),
        }
    }
    // Streamed in chunks smaller than the row: chunks, then Corrupted.
    let items: Vec<_> = store
        .blobs()
        .get_stream(addr, 4)
        .await
        .unwrap()
        .unwrap()
        .collect()
        .await;
    assert!(matches!(
        items.last(),
        Some(Err(DerivaError::Corrupted { .. }))
    ));
    assert_eq!(store.put_leaf(data.clone()).await.unwrap(), addr);
    assert_eq!(store.get_leaf(addr).await.unwrap().unwrap(), data);
    close(store).await;
}

/// Garbage collection's conditional delete of a row: kept when put at or after the cutoff,
/// removed and uncounted when put before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_collected_by_age() {
    let tmp = TempDir::new().unwrap();
    let store = deriva_store_local::open(tmp.path()).unwrap();
    let before_put = SystemTime::now() - Duration::from_secs(5);
    let addr = store.put_leaf(leaf(11, 2048)).await.unwrap();
    assert_eq!(store.blobs().size(addr).await.unwrap(), Some(2048));
    assert_eq!(
        store
            .blobs()
            .delete_if_older(addr, before_put)
            .await
            .unwrap(),
        None,
        "put after the cutoff: kept"
    );
    assert_eq!(store.counters().blobs(), 1);
    let later = SystemTime::now() + Duration::from_secs(5);
    assert_eq!(
        store.blobs().delete_if_older(addr, later).await.unwrap(),
        Some(2048)
    );
    assert_eq!(store.counters().blobs(), 0);
    assert_eq!(store.counters().blob_bytes(), 0);
    assert!(store.get_leaf(addr).await.unwrap().is_none());
    assert!(!store.blobs().contains(addr).await.unwrap());
    close(store).await;
}
