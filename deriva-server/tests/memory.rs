//! Memory of the real `deriva-server` binary as it serves large values: its peak resident set
//! (`VmHWM` in `/proc/PID/status`) before and after.
//!
//! - a Get of a 256 MiB leaf streams it: the peak grows by far less than the leaf (at most
//!   64 MiB), where reading it whole would add the whole leaf.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::ServerProcess;
use deriva_core::store::ByteStream;
use deriva_core::{CAddr, Store};
use deriva_server::proto::GetRequest;
use futures::StreamExt as _;

/// The peak resident set of process `pid`, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"));
    kib * 1024
}

/// `len` bytes of a cheap pattern, in 1 MiB pieces, and their address.
fn pattern(len: usize) -> (Vec<Bytes>, CAddr) {
    let mut hasher = blake3::Hasher::new();
    let pieces: Vec<Bytes> = (0..len.div_ceil(1 << 20))
        .map(|i| {
            let n = (len - i * (1 << 20)).min(1 << 20);
            let piece: Bytes = (0..n).map(|j| ((i * 7 + j) % 251) as u8).collect();
            hasher.update(&piece);
            piece
        })
        .collect();
    (pieces, CAddr::from(*hasher.finalize().as_bytes()))
}

/// Stores the pieces as one leaf in the local store in `dir`, streamed, and closes the store.
async fn store_leaf(dir: &Path, pieces: Vec<Bytes>, addr: CAddr) {
    let store = Store::open(dir).unwrap();
    let stream: ByteStream = futures::stream::iter(pieces.into_iter().map(Ok)).boxed();
    store.blobs().put_stream(addr, stream).await.unwrap();
    let released = store.released();
    drop(store);
    released.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_of_a_large_leaf_streams_in_bounded_memory() {
    const LEAF: usize = 256 << 20;
    const GROWTH: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (pieces, addr) = pattern(LEAF);
    store_leaf(dir.path(), pieces, addr).await;

    let server = ServerProcess::options().dir(dir.path()).start();
    let pid = server.pid().as_raw_nonzero().get() as u32;
    let mut client = server.client().await;
    // A small Get first, so that the baseline includes a served request.
    let small = common::put_leaf(&mut client, b"warm-up").await;
    common::get_all(&mut client, &small).await.unwrap();
    let baseline = peak_rss(pid);

    let mut stream = client
        .get(GetRequest {
            addr: Bytes::copy_from_slice(addr.as_bytes()),
        })
        .await
        .unwrap()
        .into_inner();
    let mut hasher = blake3::Hasher::new();
    let mut received = 0usize;
    while let Some(msg) = stream.message().await.unwrap() {
        received += msg.chunk.len();
        hasher.update(&msg.chunk);
    }
    assert_eq!(received, LEAF);
    assert_eq!(CAddr::from(*hasher.finalize().as_bytes()), addr);
    let peak = peak_rss(pid);
    eprintln!(
        "peak RSS of deriva-server: {} MiB before the Get of a {} MiB leaf, {} MiB after",
        baseline >> 20,
        LEAF >> 20,
        peak >> 20
    );
    assert!(
        peak <= baseline + GROWTH,
        "the peak grew by {} MiB (at most {} MiB allowed) for a {} MiB leaf",
        (peak - baseline) >> 20,
        GROWTH >> 20,
        LEAF >> 20
    );
}
