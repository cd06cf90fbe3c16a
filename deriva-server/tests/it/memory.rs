//! Memory of the real `deriva-server` binary as it takes and serves large values: its peak
//! resident set (`VmHWM` in `/proc/PID/status`) before and after.
//!
//! - A 1 GiB leaf put with `PutLeafStream` and read back with `Get` streams both ways: the
//!   peak grows by at most 64 MiB, where holding it would add the whole gibibyte.
//! - A 4 GiB leaf goes in and comes back out, byte for byte, within the same bound.
//! - 8 concurrent Gets of a 256 MiB computed output stay under the memory budget + 64 MiB:
//!   one compute (single-flight) within the budget, its output spilled to disk, and every Get
//!   streaming from the spill file. 8 concurrent Gets of 8 *different* 256 MiB outputs (2 GiB
//!   in all) stay under the same bound: their computes take turns within the budget.

use bytes::Bytes;
use deriva_core::CAddr;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{GetRequest, PutLeafStreamRequest};
use deriva_testkit::ServerProcess;
use futures::StreamExt as _;
use tonic::transport::Channel;

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

/// A leaf of `mib` MiB, made on the fly: one pseudo-random MiB with the piece's number in its
/// first bytes, so every piece differs. The test never holds more than a piece of it.
#[derive(Clone)]
struct Pattern {
    base: Bytes,
    mib: u64,
}

impl Pattern {
    fn new(mib: u64) -> Self {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let base: Bytes = (0..1 << 17)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        Self { base, mib }
    }

    fn len(&self) -> u64 {
        self.mib << 20
    }

    fn piece(&self, i: u64) -> Bytes {
        let mut piece = self.base.to_vec();
        piece[..8].copy_from_slice(&i.to_le_bytes());
        piece.into()
    }

    /// The leaf's address (hashing it piece by piece).
    fn addr(&self) -> CAddr {
        let mut hasher = blake3::Hasher::new();
        for i in 0..self.mib {
            hasher.update(&self.piece(i));
        }
        CAddr::from(*hasher.finalize().as_bytes())
    }
}

/// Puts the leaf with `PutLeafStream`, in 1 MiB messages; returns the address answered.
async fn put_streamed(client: &mut DerivaClient<Channel>, leaf: &Pattern) -> Bytes {
    let pieces = leaf.clone();
    let chunks = futures::stream::iter(0..leaf.mib).map(move |i| PutLeafStreamRequest {
        chunk: pieces.piece(i),
    });
    client
        .put_leaf_stream(chunks)
        .await
        .unwrap()
        .into_inner()
        .addr
}

/// Gets `addr` and checks that the bytes are the leaf's, piece by piece.
async fn get_and_compare(client: &mut DerivaClient<Channel>, addr: &Bytes, leaf: &Pattern) {
    let mut stream = client
        .get(GetRequest { addr: addr.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut expected = leaf.piece(0);
    let (mut next, mut received) = (1u64, 0u64);
    while let Some(msg) = stream.message().await.unwrap() {
        let mut chunk = msg.chunk;
        while !chunk.is_empty() {
            if expected.is_empty() {
                assert!(next < leaf.mib, "more bytes than the leaf has");
                expected = leaf.piece(next);
                next += 1;
            }
            let n = chunk.len().min(expected.len());
            assert!(
                chunk.split_to(n) == expected.split_to(n),
                "the bytes differ near offset {received}"
            );
            received += n as u64;
        }
    }
    assert_eq!(received, leaf.len(), "every byte came back");
}

/// Starts a server on a fresh directory with `args`; returns it, a client, its pid and its
/// peak RSS once it has served a small put and get.
async fn started_with(args: &[&str]) -> (ServerProcess, DerivaClient<Channel>, u32, u64) {
    let server = ServerProcess::options().args(args).start();
    let pid = server.pid().as_raw_nonzero().get() as u32;
    let mut client = server.client().await;
    let small = deriva_testkit::put_leaf(&mut client, b"warm-up").await;
    deriva_testkit::get_all(&mut client, &small).await.unwrap();
    let baseline = peak_rss(pid);
    (server, client, pid, baseline)
}

/// The peak may have grown by at most `growth` over `baseline`.
#[track_caller]
fn assert_bounded(what: &str, pid: u32, baseline: u64, growth: u64) {
    let peak = peak_rss(pid);
    eprintln!(
        "peak RSS of deriva-server: {} MiB before {what}, {} MiB after",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak <= baseline + growth,
        "{what}: the peak grew by {} MiB (at most {} MiB allowed)",
        (peak - baseline) >> 20,
        growth >> 20
    );
}

async fn started() -> (ServerProcess, DerivaClient<Channel>, u32, u64) {
    started_with(&[]).await
}

const GROWTH: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_leaf_put_and_get_stream_in_bounded_memory() {
    let (_server, mut client, pid, baseline) = started().await;
    let leaf = Pattern::new(1024);
    let addr = put_streamed(&mut client, &leaf).await;
    assert_eq!(addr.as_ref(), leaf.addr().as_bytes());
    assert_bounded("the PutLeafStream of a 1 GiB leaf", pid, baseline, GROWTH);
    get_and_compare(&mut client, &addr, &leaf).await;
    assert_bounded("its Get", pid, baseline, GROWTH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_gib_leaf_round_trips() {
    let (server, mut client, pid, baseline) = started().await;
    let leaf = Pattern::new(4096);
    let addr = put_streamed(&mut client, &leaf).await;
    let hex = leaf.addr().to_hex();
    assert_eq!(addr.as_ref(), leaf.addr().as_bytes());
    let blob = server.dir().join("blobs").join(&hex[..2]).join(&hex);
    let stored = std::fs::metadata(blob).unwrap().len();
    assert_eq!(stored, 4 << 30);
    get_and_compare(&mut client, &addr, &leaf).await;
    assert_bounded("the put and get of a 4 GiB leaf", pid, baseline, GROWTH);
}

/// Gets every address of `outputs` at once, each from its own task; checks each against the
/// hash in `expected`.
async fn get_all_at_once(client: &DerivaClient<Channel>, outputs: &[(Bytes, CAddr)]) {
    let gets: Vec<_> = outputs
        .iter()
        .cloned()
        .map(|(addr, expected)| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut stream = client.get(GetRequest { addr }).await.unwrap().into_inner();
                let mut hasher = blake3::Hasher::new();
                while let Some(msg) = stream.message().await.unwrap() {
                    hasher.update(&msg.chunk);
                }
                assert_eq!(CAddr::from(*hasher.finalize().as_bytes()), expected);
            })
        })
        .collect();
    for get in gets {
        get.await.unwrap();
    }
}

/// A 256 MiB output: `repeat` of the `i`th MiB of a pattern, 256 times; its address and the
/// hash of its bytes.
async fn repeat_output(client: &mut DerivaClient<Channel>, i: u64) -> (Bytes, CAddr) {
    let piece = Pattern::new(1).piece(i);
    let leaf = deriva_testkit::put_leaf(client, &piece).await;
    let output = deriva_testkit::put_recipe(client, "repeat", &[&leaf], &[("count", "256")]).await;
    let mut hasher = blake3::Hasher::new();
    for _ in 0..256 {
        hasher.update(&piece);
    }
    (output, CAddr::from(*hasher.finalize().as_bytes()))
}

const BUDGET: u64 = 320 << 20;

#[track_caller]
fn assert_under_budget(what: &str, pid: u32) {
    let peak = peak_rss(pid);
    eprintln!(
        "peak RSS of deriva-server after {what}: {} MiB (budget {} MiB)",
        peak >> 20,
        BUDGET >> 20
    );
    assert!(
        peak <= BUDGET + GROWTH,
        "{what}: peak {} MiB over the budget {} MiB + {} MiB",
        peak >> 20,
        BUDGET >> 20,
        GROWTH >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_gets_of_a_256_mib_output_stay_under_the_budget() {
    let (_server, mut client, pid, _) = started_with(&["--memory-budget", "320MiB"]).await;
    let output = repeat_output(&mut client, 0).await;
    get_all_at_once(&client, &vec![output; 8]).await;
    assert_under_budget("8 concurrent Gets of one 256 MiB output", pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_gets_of_different_256_mib_outputs_take_turns_within_the_budget() {
    let (_server, mut client, pid, _) = started_with(&["--memory-budget", "320MiB"]).await;
    let mut outputs = Vec::new();
    for i in 0..8 {
        outputs.push(repeat_output(&mut client, i).await);
    }
    get_all_at_once(&client, &outputs).await;
    assert_under_budget("8 concurrent Gets of 8 different 256 MiB outputs", pid);
}
