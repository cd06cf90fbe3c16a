//! # deriva-store-local
//!
//! The local backend of `deriva-store`: recipes and the dependency graph in redb, leaf bytes in
//! content-addressed files. [`open`] (or [`open_with`]) returns a [`Store`] over a data
//! directory.
//!
//! Both halves do blocking I/O (fsync, redb transactions), so every trait method runs its work
//! on tokio's blocking pool, inside the caller's span, and awaits it: no call blocks an async
//! worker. Each pooled call holds a [`Lease`], so [`Store::released`] completes only when the
//! redb file is closed.
//!
//! ## Layout
//!
//! ```text
//! <data-dir>/
//!   deriva.redb             redb: tables `recipes`, `dependents` (multimap), `meta`, `pins`,
//!                           `recipe_times` (each recipe's last put, for garbage collection),
//!                           `recipes_by_depth`, `output_sizes`, `provenance` (see `recipes.rs`)
//!   leaves.redb             redb: table `leaves`, small leaves (at most `inline_leaf_bytes`,
//!                           64 KiB by default): address → last put (ms, u64 LE) ‖ bytes
//!   blobs/
//!     tmp/                  in-progress writes; emptied when the store opens
//!     00/ … ff/             shards by the first address byte
//!       <64 hex chars>      one leaf's bytes, named by its address; its mtime is its last put
//! ```
//!
//! - `recipes`: recipe address → DAG depth (`u32` LE) followed by the canonical encoding.
//!   Every read re-hashes the encoding and checks it against the key.
//! - `dependents`: input address → each recipe that uses it; cascade invalidation walks it.
//! - `meta`: `recipe_count`, updated in the same transaction as the insert.
//! - `provenance`: recipe address → the materialization record of its output and its audits
//!   ([`Records`], on [`LocalRecipeIndex`]). Puts and audits commit without an fsync of their
//!   own: a clean close or the next durable commit persists them, a crash before may lose
//!   them. A recipe's record is deleted in the transaction that deletes the recipe (garbage
//!   collection's sweep included).
//!
//! A small leaf goes to one committer thread, which writes every put waiting at that moment in
//! one redb transaction and commits it durably (group commit: one fsync shared by the batch)
//! before any of them is acknowledged. A larger blob is written to `blobs/tmp/`, fsynced,
//! renamed into its shard and the shard directory fsynced, all before `put` returns; a crash
//! never leaves partial bytes under a real address. Every read re-hashes the leaf, row or
//! file: a mismatch is `DerivaError::Corrupted`, never data.
//! Blob count and bytes are counted once at open (which also cleans `tmp/`) and then kept as
//! atomics ([`StoreCounters`]); the recipe count is persisted in `meta`.

mod calls;
mod gc;
mod leaf_files;
mod recipes;
mod small;

pub use gc::SCRATCH_FILE;
pub use small::LEAVES_FILE;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use futures::StreamExt as _;

use deriva_core::CAddr;
use deriva_core::Recipe;
use deriva_core::provenance::{AuditResult, Audits, Provenance, SignedRecord};
use deriva_core::{DerivaError, Result};
use deriva_store::observe::{BackendMetrics, Call, Target};
use deriva_store::stream::{self, ByteStream};
use deriva_store::{
    BlobStore, LeafStat, Lease, OutputSizes, RecipeIndex, Records, Store, StoreCounters,
    StoredRecipe, lease,
};

/// Name of the redb file inside the data directory.
pub const DB_FILE: &str = "deriva.redb";
/// The most a listing page reserves up front, whatever limit it is asked for.
const PAGE_CAPACITY: usize = 4096;

/// Name of the blob directory inside the data directory.
pub const BLOB_DIR: &str = "blobs";

/// How the local store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalOptions {
    /// Leaves of at most this many bytes are rows of `leaves.redb`, written with group commit
    /// (concurrent puts share one fsync); larger ones are files. `0`: every leaf a file. Reads
    /// look in both places whatever the setting.
    pub inline_leaf_bytes: u64,
}

impl LocalOptions {
    /// The default threshold of small leaves: 64 KiB.
    pub const DEFAULT_INLINE_LEAF_BYTES: u64 = 64 << 10;
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            inline_leaf_bytes: Self::DEFAULT_INLINE_LEAF_BYTES,
        }
    }
}

/// Opens the local store in `dir` with the default [`LocalOptions`]; see [`open_with`].
pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
    open_with(dir, LocalOptions::default())
}

/// Opens the local store in `dir`, creating it if needed: removes leftover temporary blob
/// files and loads the counters. Blocks while it scans the blob directory, so call it at
/// start-up (or on the blocking pool).
pub fn open_with(dir: impl AsRef<Path>, options: LocalOptions) -> Result<Store> {
    open_observed(dir, options, Arc::new(BackendMetrics::noop()))
}

/// [`open_with`], with the store's redb transactions and file operations observed on
/// `metrics` (`backend` = `redb`, `files`; see [`deriva_store::observe`]).
pub fn open_observed(
    dir: impl AsRef<Path>,
    options: LocalOptions,
    metrics: Arc<BackendMetrics>,
) -> Result<Store> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir)
        .map_err(|e| DerivaError::io(format!("creating {}", dir.display()), &e))?;
    let counters = Arc::new(StoreCounters::default());
    let (lease, released) = lease();
    let recipe_db = recipes::RecipeDb::open(&dir.join(DB_FILE), counters.clone())?;
    // A scratch file left by a collection that did not end.
    gc::remove(&dir.join(SCRATCH_FILE));
    let blobs = LocalBlobStore {
        inner: Arc::new((
            leaf_files::BlobFiles::open(
                dir,
                &dir.join(BLOB_DIR),
                options.inline_leaf_bytes,
                counters.clone(),
                metrics.clone(),
            )?,
            lease.clone(),
        )),
    };
    let recipes = LocalRecipeIndex {
        inner: Arc::new((recipe_db, lease.clone())),
        leaves: blobs.inner.clone(),
        dir: dir.to_owned(),
        metrics,
    };
    tracing::info!(
        dir = %dir.display(),
        recipes = counters.recipes(),
        blobs = counters.blobs(),
        blob_bytes = counters.blob_bytes(),
        "store opened"
    );
    let recipes = Arc::new(recipes);
    Ok(Store::new(
        Arc::new(blobs),
        recipes.clone(),
        counters,
        (lease, released),
        format!("local {}", dir.display()),
    )
    .with_sizes(recipes.clone())
    .with_records(recipes))
}

/// Replaces the stored row of recipe `addr` in the redb file of the local store in
/// `data_dir` with bytes that do not decode, for the conformance suite's corruption case. The
/// store must be closed.
/// Replaces the stored bytes of the leaf `addr` in the local store in `data_dir` with
/// `bytes`, wherever it is kept (a small-leaf row, else its file), for the conformance suite's
/// corruption cases. The store must be closed.
#[cfg(feature = "conformance")]
pub fn damage_leaf(data_dir: &Path, addr: CAddr, bytes: &[u8]) -> Result<()> {
    if small::damage_row(&data_dir.join(LEAVES_FILE), &addr, bytes)? {
        return Ok(());
    }
    let hex = addr.to_hex();
    let path = data_dir.join(BLOB_DIR).join(&hex[..2]).join(hex);
    if !path.is_file() {
        return Err(DerivaError::NotFound { addr });
    }
    std::fs::write(&path, bytes)
        .map_err(|e| DerivaError::io(format!("damaging {}", path.display()), &e))
}

#[cfg(feature = "conformance")]
pub fn damage_recipe_row(data_dir: &Path, addr: CAddr) -> Result<()> {
    recipes::RecipeDb::open(&data_dir.join(DB_FILE), Arc::default())?.damage_row(&addr)
}

/// Runs `f(inner)` on the blocking pool, in the caller's trace (see
/// [`deriva_store::task::spawn_blocking_in`]).
async fn on_pool<I, T>(
    inner: &Arc<(I, Lease)>,
    what: &'static str,
    f: impl FnOnce(&I) -> Result<T> + Send + 'static,
) -> Result<T>
where
    I: Send + Sync + 'static,
    T: Send + 'static,
{
    let inner = inner.clone();
    #[cfg(test)]
    let caller = std::thread::current().id();
    deriva_store::task::spawn_blocking_in(tracing::Span::current(), move || {
        #[cfg(test)]
        tests::POOL_CALLS
            .lock()
            .push((caller, std::thread::current().id()));
        f(&inner.0)
    })
    .await
    .map_err(|e| DerivaError::from_join(what, e))?
}

/// Leaf bytes in files under `<data-dir>/blobs`.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    inner: Arc<(leaf_files::BlobFiles, Lease)>,
}

impl LocalBlobStore {
    /// Writes `data` to a file in `tmp/` chunk by chunk, then publishes it under its address,
    /// which must be `expected` if given.
    async fn write_stream(
        &self,
        expected: Option<CAddr>,
        mut data: ByteStream,
    ) -> Result<(CAddr, u64)> {
        let mut write = on_pool(&self.inner, "storing a blob", move |b| {
            b.start_write(expected)
        })
        .await?;
        // An error item, or a failed write, drops `write`, which removes its file.
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            write = on_pool(&self.inner, "storing a blob", move |b| {
                b.write_chunk(&mut write, &chunk)?;
                Ok(write)
            })
            .await?;
        }
        on_pool(&self.inner, "storing a blob", move |b| {
            b.finish_write(write)
        })
        .await
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, data: Bytes) -> Result<CAddr> {
        if self.inner.0.is_small(data.len() as u64) {
            // Group commit: the committer thread writes it with the puts waiting beside it, and
            // answers once the commit is durable. No blocking-pool thread waits meanwhile.
            let addr = CAddr::for_leaf(&data);
            return self.inner.0.small().put(addr, data).await.map(|()| addr);
        }
        on_pool(&self.inner, "storing a blob", move |b| b.put(&data)).await
    }

    async fn put_many(&self, data: Vec<Bytes>) -> Result<Vec<CAddr>> {
        // The small leaves go to the committer together and share its commits; larger ones are
        // files, written one by one.
        let addrs: Vec<CAddr> = data.iter().map(|d| CAddr::for_leaf(d)).collect();
        let (small, large): (Vec<_>, Vec<_>) = addrs
            .iter()
            .copied()
            .zip(data)
            .partition(|(_, d)| self.inner.0.is_small(d.len() as u64));
        self.inner.0.small().put_many(small).await?;
        for (_, data) in large {
            on_pool(&self.inner, "storing a blob", move |b| b.put(&data)).await?;
        }
        Ok(addrs)
    }

    async fn get(&self, addr: CAddr) -> Result<Option<Bytes>> {
        on_pool(&self.inner, "reading a blob", move |b| b.get(&addr)).await
    }

    async fn get_stream(&self, addr: CAddr, chunk_bytes: usize) -> Result<Option<ByteStream>> {
        let chunk = chunk_bytes.max(1);
        let opened = on_pool(&self.inner, "opening a blob", move |b| {
            b.open_read(&addr, chunk as u64)
        })
        .await?;
        let (file, path) = match opened {
            None => return Ok(None),
            // One chunk or less: read and verified in that same call.
            Some(leaf_files::Opened::Whole(data)) => return Ok(Some(stream::once(data))),
            Some(leaf_files::Opened::Row(data)) => {
                return Ok(Some(stream::verified(
                    addr,
                    format!("the small leaf row of {addr}"),
                    stream::chunks(data, chunk),
                )));
            }
            Some(leaf_files::Opened::File(file, path)) => (file, path),
        };
        // Read on the blocking pool, a block at a time; the store's lease travels with the file.
        let chunks = stream::file_chunks(
            file,
            chunk,
            format!("reading blob {addr}"),
            self.inner.clone(),
        );
        // A client sees the address and what was wrong; the file's path goes to the log only.
        let verified = stream::verified(addr, "the blob file".to_owned(), chunks);
        Ok(Some(
            verified
                .inspect(move |item| {
                    if let Err(e @ DerivaError::Corrupted { .. }) = item {
                        tracing::error!(%addr, path = %path.display(), error = %e, "a blob file does not match its address");
                    }
                })
                .boxed(),
        ))
    }

    async fn put_stream(&self, addr: CAddr, data: ByteStream) -> Result<()> {
        self.write_stream(Some(addr), data).await.map(|_| ())
    }

    async fn put_unaddressed(&self, data: ByteStream) -> Result<(CAddr, u64)> {
        self.write_stream(None, data).await
    }

    async fn contains(&self, addr: CAddr) -> Result<bool> {
        on_pool(&self.inner, "looking up a blob", move |b| b.contains(&addr)).await
    }

    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        on_pool(&self.inner, "looking up blobs", move |b| b.missing(&addrs)).await
    }

    async fn size(&self, addr: CAddr) -> Result<Option<u64>> {
        on_pool(&self.inner, "sizing a blob", move |b| b.size(&addr)).await
    }

    /// The size, and the time of the last put: the small leaf row's, or the file's mtime
    /// (what garbage collection's grace period measures).
    async fn stat(&self, addr: CAddr) -> Result<Option<LeafStat>> {
        on_pool(&self.inner, "sizing a blob", move |b| b.stat(&addr)).await
    }

    async fn delete(&self, addr: CAddr) -> Result<bool> {
        on_pool(&self.inner, "deleting a blob", move |b| b.delete(&addr)).await
    }

    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<(CAddr, u64)>> {
        on_pool(&self.inner, "listing blobs", move |b| {
            b.list_page(after, limit)
        })
        .await
    }

    async fn delete_if_older(&self, addr: CAddr, cutoff: SystemTime) -> Result<Option<u64>> {
        on_pool(&self.inner, "collecting a blob", move |b| {
            b.delete_if_older(&addr, cutoff)
        })
        .await
    }

    async fn check(&self) -> Result<()> {
        on_pool(&self.inner, "checking the blob directory", |b| b.check()).await
    }
}

/// Recipes and the dependency graph in `<data-dir>/deriva.redb`.
#[derive(Debug, Clone)]
pub struct LocalRecipeIndex {
    inner: Arc<(recipes::RecipeDb, Lease)>,
    /// The leaf store beside it, whose leaves garbage collection's mark visits.
    leaves: Arc<(leaf_files::BlobFiles, Lease)>,
    /// The data directory, where the mark keeps its scratch file.
    dir: std::path::PathBuf,
    /// Each call is one redb transaction, observed here (`backend="redb"`).
    metrics: Arc<BackendMetrics>,
}

impl LocalRecipeIndex {
    /// [`on_pool`], observed as `call`.
    async fn transaction<T: Send + 'static>(
        &self,
        call: Call,
        what: &'static str,
        f: impl FnOnce(&recipes::RecipeDb) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.metrics
            .call(call, Target::None, on_pool(&self.inner, what, f))
            .await
    }
}

/// Recorded output sizes in `deriva.redb`'s `output_sizes`, written without an fsync of their
/// own.
#[async_trait]
impl OutputSizes for LocalRecipeIndex {
    async fn recorded(&self, recipe: CAddr) -> Result<Option<u64>> {
        self.transaction(
            calls::GET_OUTPUT_SIZE,
            "reading a recorded output size",
            move |r| r.output_size(&recipe),
        )
        .await
    }

    async fn record(&self, recipe: CAddr, size: u64) -> Result<()> {
        self.transaction(
            calls::PUT_OUTPUT_SIZE,
            "recording an output size",
            move |r| r.record_output_size(&recipe, size),
        )
        .await
    }
}

/// Materialization records in `deriva.redb`'s `provenance` (see the module docs for their
/// durability).
#[async_trait]
impl Records for LocalRecipeIndex {
    async fn get(&self, recipe: CAddr) -> Result<Option<Provenance>> {
        self.transaction(
            calls::GET_RECORD,
            "reading a materialization record",
            move |r| r.record(&recipe),
        )
        .await
    }

    async fn put(&self, record: &SignedRecord) -> Result<()> {
        let record = record.clone();
        self.transaction(
            calls::PUT_RECORD,
            "storing a materialization record",
            move |r| r.put_record(&record),
        )
        .await
    }

    async fn audit(
        &self,
        recipe: CAddr,
        output_hash: CAddr,
        result: AuditResult,
    ) -> Result<Option<Audits>> {
        self.transaction(calls::AUDIT_RECORD, "counting an audit", move |r| {
            r.audit_record(&recipe, &output_hash, result)
        })
        .await
    }

    async fn delete(&self, recipes: &[CAddr]) -> Result<()> {
        if recipes.is_empty() {
            return Ok(());
        }
        let recipes = recipes.to_vec();
        self.transaction(
            calls::DELETE_RECORDS,
            "deleting materialization records",
            move |r| r.delete_records(&recipes),
        )
        .await
    }

    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<Provenance>> {
        self.transaction(
            calls::LIST_RECORDS,
            "listing materialization records",
            move |r| r.list_records(after, limit),
        )
        .await
    }
}

#[async_trait]
impl RecipeIndex for LocalRecipeIndex {
    async fn put_batch(&self, batch: Vec<(CAddr, Recipe)>) -> Result<u64> {
        self.transaction(calls::PUT_RECIPES, "storing recipes", move |r| {
            r.put_batch(&batch)
        })
        .await
    }

    async fn get(&self, addr: CAddr) -> Result<Option<StoredRecipe>> {
        self.transaction(calls::GET_RECIPE, "reading a recipe", move |r| r.get(&addr))
            .await
    }

    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        self.transaction(calls::FIND_RECIPES, "looking up recipes", move |r| {
            r.missing(&addrs)
        })
        .await
    }

    async fn dependents(&self, addr: CAddr) -> Result<Vec<CAddr>> {
        self.transaction(calls::DEPENDENTS, "reading dependents", move |r| {
            r.dependents(&addr)
        })
        .await
    }

    async fn delete(&self, addr: CAddr) -> Result<bool> {
        self.transaction(calls::DELETE_RECIPE, "deleting a recipe", move |r| {
            r.delete(&addr)
        })
        .await
    }

    async fn list_page(
        &self,
        after: Option<(u32, CAddr)>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u32)>> {
        self.transaction(calls::LIST_RECIPES, "listing recipes", move |r| {
            r.list_page(after, limit)
        })
        .await
    }

    async fn pin(&self, addr: CAddr, blobs: &dyn BlobStore) -> Result<bool> {
        // The caller ([`Store::pin`]) holds off garbage collection across the check and the pin.
        let recipe = self
            .transaction(calls::FIND_RECIPES, "looking up a recipe", move |db| {
                db.contains(&addr)
            })
            .await?;
        if !recipe && !blobs.contains(addr).await? {
            return Err(DerivaError::NotFound { addr });
        }
        self.transaction(calls::PIN, "pinning an address", move |db| db.pin(&addr))
            .await
    }

    async fn mark(&self, cutoff: SystemTime) -> Result<deriva_store::gc::Mark> {
        let (leaves, dir) = (self.leaves.clone(), self.dir.clone());
        let lease = self.inner.1.clone();
        self.transaction(
            calls::LIST_RECIPES,
            "marking for garbage collection",
            move |db| {
                let scratch = gc::Scratch::create(&dir)?;
                let recipes = db.mark(&scratch, cutoff)?;
                // The leaves, a batch at a time: the dead ones to the scratch file.
                let progress = db.progress();
                let mut batch = Vec::new();
                let (mut count, mut dead) = (0u64, 0u64);
                leaves.0.for_each_aged(|leaf| {
                    batch.push(leaf);
                    if batch.len() >= gc::SCRATCH_BATCH {
                        dead += scratch.add_dead_leaves(&batch, cutoff)?;
                        count += batch.len() as u64;
                        progress.advance(batch.len() as u64);
                        batch.clear();
                    }
                    Ok(())
                })?;
                dead += scratch.add_dead_leaves(&batch, cutoff)?;
                count += batch.len() as u64;
                let tally = deriva_store::gc::MarkTally {
                    leaves: count,
                    recipes: recipes.recipes,
                    live: recipes.live,
                    pinned: recipes.pinned,
                    corrupted: recipes.corrupted,
                    candidates: recipes.dead + dead,
                };
                let candidates: Box<dyn deriva_store::gc::Candidates> =
                    Box::new(gc::LocalCandidates::new(scratch, lease));
                Ok((tally, candidates))
            },
        )
        .await
    }

    async fn delete_if_unused(&self, addr: CAddr, cutoff: SystemTime) -> Result<bool> {
        self.transaction(calls::COLLECT_RECIPE, "collecting a recipe", move |db| {
            db.delete_if_unused(&addr, cutoff)
        })
        .await
    }

    async fn is_referenced(&self, addr: CAddr) -> Result<bool> {
        self.transaction(calls::FIND_REFERENCES, "looking up references", move |db| {
            db.is_referenced(&addr)
        })
        .await
    }

    async fn unpin(&self, addr: CAddr) -> Result<bool> {
        self.transaction(calls::UNPIN, "unpinning an address", move |db| {
            db.unpin(&addr)
        })
        .await
    }

    async fn pins(&self) -> Result<Vec<CAddr>> {
        self.transaction(calls::LIST_PINS, "listing pins", |db| db.pins())
            .await
    }

    async fn count_by_scan(&self) -> Result<u64> {
        self.transaction(calls::COUNT_RECIPES, "counting recipes", |r| {
            r.count_by_scan()
        })
        .await
    }

    async fn check(&self) -> Result<()> {
        self.transaction(calls::CHECK_RECIPES, "checking the recipe database", |r| {
            r.get(&CAddr::from_bytes([0; 32])).map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::thread::ThreadId;

    use super::*;

    /// Each pooled call: the thread that asked, the thread that did the work.
    pub(super) static POOL_CALLS: parking_lot::Mutex<Vec<(ThreadId, ThreadId)>> =
        parking_lot::Mutex::new(Vec::new());

    /// Every trait method does its I/O on the blocking pool (a small leaf's put, on the
    /// committer thread). On a current-thread runtime the one async worker is the test's own
    /// thread: each call must show up as pooled work asked for by this thread and done on
    /// another.
    #[test]
    fn store_calls_never_run_on_the_async_worker() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let worker = std::thread::current().id();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let calls = rt.block_on(async {
            let blobs = store.blobs();
            let recipes = store.recipes();
            let leaf = blobs.put(Bytes::from_static(b"x")).await.unwrap();
            blobs.get(leaf).await.unwrap().unwrap();
            assert!(blobs.contains(leaf).await.unwrap());
            assert_eq!(blobs.size(leaf).await.unwrap(), Some(1));
            assert_eq!(blobs.list().await.unwrap(), [leaf]);
            let recipe = Recipe::new(
                deriva_core::FunctionId::new("identity", "1").unwrap(),
                vec![leaf],
                deriva_core::Params::new(),
            )
            .unwrap();
            let addr = recipe.addr();
            assert_eq!(recipes.put_batch(vec![(addr, recipe)]).await.unwrap(), 1);
            recipes.get(addr).await.unwrap().unwrap();
            assert!(recipes.missing(vec![addr]).await.unwrap().is_empty());
            assert_eq!(recipes.dependents(leaf).await.unwrap(), [addr]);
            assert_eq!(recipes.count_by_scan().await.unwrap(), 1);
            assert_eq!(recipes.list().await.unwrap(), [(addr, 1)]);
            assert!(recipes.delete(addr).await.unwrap());
            assert!(blobs.delete(leaf).await.unwrap());
            // 13 calls; the put went to the committer thread, not the pool.
            12
        });
        let pooled: Vec<ThreadId> = POOL_CALLS
            .lock()
            .iter()
            .filter(|(caller, _)| *caller == worker)
            .map(|(_, ran_on)| *ran_on)
            .collect();
        assert_eq!(
            pooled.len(),
            calls,
            "a store call skipped the blocking pool"
        );
        assert!(
            pooled.iter().all(|t| *t != worker),
            "store work ran on the async worker"
        );
    }
}
