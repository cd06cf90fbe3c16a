//! `Store::put_leaf` of fresh 1 KiB leaves on the local store: what group commit buys.
//!
//! Every put stores a leaf never stored before (a counter is mixed into its bytes), so each one
//! takes the full durable path and none the cheaper "already stored" one. The runtime is a
//! multi-thread tokio runtime with 2 workers; the store lives in a fresh directory under
//! cargo's `CARGO_TARGET_TMPDIR` (`target/tmp`, on the build's disk: `/tmp` is often a tmpfs,
//! where an fsync costs nothing and the comparison would mean nothing).
//!
//! Group `put_leaf_1kib`:
//! - `rows/1`: one put at a time, default options: each leaf is a row of `leaves.redb`, and a
//!   lone put waits for its own durable commit (one fsync);
//! - `rows/16`: an iteration is 16 puts at once (16 tasks, joined); the committer thread writes
//!   the puts waiting together in one transaction, so they share commits and fsyncs;
//! - `files/1`, `files/16`: the same with `inline_leaf_bytes: 0`, every leaf its own fsynced
//!   file (and directory entry), written on the blocking pool: no fsync is shared.
//!
//! The `/16` cases report throughput in puts (`Elements(16)`): divide their time by 16 for the
//! time per put. At 1, `rows` against `files` is the cost of a lone durable put each way (a
//! redb commit against a file, its fsync and its directory entry's). At 16 it shows group
//! commit: the rows' cost per put falls with concurrency, since the waiting puts share one
//! commit, while each file still pays its own fsyncs, which contend in the file system's
//! journal. After the group, the bench prints the puts per durable commit of the rows cases
//! (`StoreCounters::leaf_commits`, over warm-up and measurement): how many puts shared an fsync.
//!
//! Run: `cargo bench -p deriva-store-local --bench put_leaf`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deriva_store::Store;
use deriva_store_local::LocalOptions;

/// The size of each leaf.
const LEAF_BYTES: usize = 1024;

/// Sequence numbers of the leaves, across every case: no two puts store the same bytes.
static NEXT_LEAF: AtomicU64 = AtomicU64::new(0);

/// A 1 KiB leaf that no earlier call returned.
fn fresh_leaf() -> Bytes {
    let seq = NEXT_LEAF.fetch_add(1, Ordering::Relaxed);
    let mut data = vec![0u8; LEAF_BYTES];
    for (i, chunk) in data.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(seq ^ (i as u64).rotate_left(32)).to_le_bytes());
    }
    Bytes::from(data)
}

/// One case's store, in its own directory, and the puts made to it.
struct Case {
    store: Arc<Store>,
    puts: AtomicU64,
    dir: tempfile::TempDir,
}

impl Case {
    fn open(options: LocalOptions) -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = Arc::new(deriva_store_local::open_with(dir.path(), options).unwrap());
        Self {
            store,
            puts: AtomicU64::new(0),
            dir,
        }
    }

    /// `n` puts of fresh leaves at once: one awaited in place, or `n` tasks, all joined.
    async fn put(&self, n: usize) {
        if n == 1 {
            self.store.put_leaf(fresh_leaf()).await.unwrap();
        } else {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..n {
                let store = self.store.clone();
                tasks.spawn(async move { store.put_leaf(fresh_leaf()).await });
            }
            while let Some(put) = tasks.join_next().await {
                put.unwrap().unwrap();
            }
        }
        self.puts.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Puts per durable commit of leaves, if this store committed any.
    fn puts_per_commit(&self) -> Option<(u64, u64, f64)> {
        let puts = self.puts.load(Ordering::Relaxed);
        let commits = self.store.counters().leaf_commits();
        (commits > 0).then(|| (puts, commits, puts as f64 / commits as f64))
    }

    /// Closes the store and waits until it released its files, then removes the directory.
    fn close(self, rt: &tokio::runtime::Runtime) {
        let released = self.store.released();
        drop(self.store);
        rt.block_on(released.wait());
        drop(self.dir);
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("put_leaf_1kib");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let rows = LocalOptions::default();
    let files = LocalOptions {
        inline_leaf_bytes: 0,
    };
    let mut rows_cases = Vec::new();
    for (layout, options) in [("rows", rows), ("files", files)] {
        for n in [1, 16] {
            let case = Case::open(options);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(format!("{layout}/{n}"), |b| {
                b.to_async(&rt).iter(|| case.put(n))
            });
            if layout == "rows" {
                rows_cases.push((n, case));
            } else {
                case.close(&rt);
            }
        }
    }
    group.finish();

    // Outside the timed part: how many puts each durable commit (one fsync) carried.
    for (n, case) in rows_cases {
        if let Some((puts, commits, ratio)) = case.puts_per_commit() {
            eprintln!(
                "put_leaf_1kib/rows/{n}: {puts} puts in {commits} leaf commits, \
                 {ratio:.2} puts per commit (fsync)"
            );
        }
        case.close(&rt);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
