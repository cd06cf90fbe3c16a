//! # deriva-store
//!
//! Deriva's storage: what the engine needs from a backend, as traits, and the [`Store`] the
//! engine and the server use.
//!
//! - [`BlobStore`]: leaf bytes by their BLAKE3 address.
//! - [`RecipeIndex`]: recipes by address, with their DAG depth and the dependency graph.
//! - [`OutputStore`]: computed outputs kept beyond one node's memory (the shared output tier).
//! - [`InvalidationBus`]: invalidations told to the other nodes of a cluster.
//! - [`ComputeLeases`]: one compute per recipe across the nodes that share an output tier.
//! - [`OutputSizes`]: the recorded sizes of computed outputs, kept across restarts.
//! - [`Records`]: the materialization records of computed outputs (who computed them, where,
//!   when, in which trace) and their audits.
//! - [`Store`]: a blob store and a recipe index, plus what spans the two (an input must exist
//!   before a recipe uses it; transitive dependents; the live [`StoreCounters`]).
//! - [`gc`]: garbage collection over any [`Store`]; [`stream`]: leaf bytes as hashed streams of
//!   chunks; [`pages`](mod@pages): keyset-paginated listings (`list_page`) as streams of pages;
//!   [`task`]: blocking work on the blocking pool that stays in its caller's trace.
//! - [`observe`]: the one instrumentation of every backend's calls ([`observe::BackendMetrics`]):
//!   client spans and the `deriva_backend_*` metrics. Backends declare their calls and run
//!   them through it; none builds a span or an instrument of its own.
//!
//! The traits are async: a backend may be remote. A backend whose calls block (the local one
//! does file and redb I/O) runs them on the blocking pool, never on the caller's async worker.
//! The backends are crates of their own: `deriva-store-local` (redb + blob files) and
//! `deriva-store-remote` (an S3-compatible object store + PostgreSQL). `conformance` (a feature)
//! is the suite every backend must pass.

#[cfg(feature = "conformance")]
pub mod conformance;
mod counters;
pub mod gc;
mod leases;
pub mod observe;
mod outputs;
pub mod pages;
pub mod stream;
pub mod task;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use counters::StoreCounters;
use deriva_core::CAddr;
use deriva_core::Recipe;
use deriva_core::{DerivaError, Result};
pub use leases::{ComputeLease, ComputeLeases, HeldBy, LeaseAttempt, LeaseEnd, LeaseRelease};
pub use outputs::{InvalidationBus, OutputSizes, OutputStore, Records, StoredOutput};
pub use pages::{PAGE, pages};
pub use stream::ByteStream;

/// What [`BlobStore::stat`] tells of a stored leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafStat {
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored (last written), if the backend keeps it.
    pub stored_at: Option<SystemTime>,
}

/// What an address names in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrKind {
    /// A leaf blob.
    Leaf,
    /// A recipe.
    Recipe,
}

/// What [`Store::locate`] found at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// A leaf of `size` bytes (not read).
    Leaf {
        /// Its stored size in bytes.
        size: u64,
    },
    /// A recipe, read whole.
    Recipe(StoredRecipe),
}

/// What [`Store::open`] (`L` = [`ByteStream`]) or [`Store::find`] (`L` = [`Bytes`]) found at
/// an address.
#[derive(Clone, PartialEq, Eq)]
pub enum Found<L> {
    /// A leaf: its chunks as they are read and verified, or its bytes read whole and verified.
    Leaf(L),
    /// A recipe, read whole.
    Recipe(StoredRecipe),
}

/// Shows a recipe whole and a leaf as `Leaf(..)`: a stream has nothing to show, and bytes
/// could be gigabytes.
impl<L> fmt::Debug for Found<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Leaf(_) => f.write_str("Leaf(..)"),
            Self::Recipe(stored) => f.debug_tuple("Recipe").field(stored).finish(),
        }
    }
}

/// A stored recipe with its DAG depth (1 + the deepest input; leaves have depth 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecipe {
    /// The recipe.
    pub recipe: Recipe,
    /// Its depth in the DAG.
    pub depth: u32,
}

/// A stored leaf as garbage collection sees it: its address, its size and when it was last
/// put (stored, or stored again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgedLeaf {
    /// The leaf's address.
    pub addr: CAddr,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last put.
    pub at: SystemTime,
}

/// Held while garbage collection deletes: no put, pin or other change of what refers to what
/// runs on any node that shares the backend until it is dropped. A backend without other
/// nodes has nothing to hold ([`Store`] excludes the puts of its own process).
pub struct SweepLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl SweepLock {
    /// A lock that holds `guard` until it is dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self(Box::new(guard))
    }
}

impl fmt::Debug for SweepLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SweepLock")
    }
}

/// Leaf bytes by BLAKE3 address.
///
/// Every method may be called from many tasks at once. Errors are [`DerivaError`]s: a read
/// whose bytes do not hash to the address is [`DerivaError::Corrupted`], never data.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug + 'static {
    /// Stores `data` durably under its BLAKE3 address, and returns the address. Idempotent:
    /// storing the same bytes again changes nothing (a backend may repair a corrupted copy).
    async fn put(&self, data: Bytes) -> Result<CAddr>;

    /// The bytes at `addr`, verified against the address; `Ok(None)` if there are none.
    async fn get(&self, addr: CAddr) -> Result<Option<Bytes>>;

    /// The bytes at `addr` as a stream of chunks of at most `chunk_bytes` (the last may be
    /// shorter), holding about one chunk in memory whatever the leaf's size; `Ok(None)` if
    /// there are none. Hashed as they pass: bytes that do not match end the stream with
    /// [`DerivaError::Corrupted`] after the last chunk (see [`stream`]).
    async fn get_stream(&self, addr: CAddr, chunk_bytes: usize) -> Result<Option<ByteStream>>;

    /// Stores the leaf `addr` from a stream of its bytes, holding a bounded part of them at a
    /// time, durably once this returns `Ok`. Nothing is stored if the bytes do not hash to
    /// `addr` ([`DerivaError::Corrupted`]) or if `data` yields an error (returned as it is).
    /// Idempotent, like [`BlobStore::put`].
    async fn put_stream(&self, addr: CAddr, data: ByteStream) -> Result<()>;

    /// Stores a leaf from a stream of its bytes whose address is known only at the end (a
    /// client's streamed upload), holding a bounded part of them at a time; returns its address
    /// and length, durably stored once this returns `Ok`. Nothing is stored if `data` yields
    /// an error (returned as it is). Idempotent, like [`BlobStore::put`].
    async fn put_unaddressed(&self, data: ByteStream) -> Result<(CAddr, u64)>;

    /// Whether a blob exists at `addr` (without reading or verifying it).
    async fn contains(&self, addr: CAddr) -> Result<bool>;

    /// Of `addrs`, the ones with no blob, in the given order. The default asks
    /// [`BlobStore::contains`] for each; an index that records the leaves (the PostgreSQL one)
    /// answers in one round trip.
    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        for addr in addrs {
            if !self.contains(addr).await? {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// The stored size of the blob at `addr`, if there is one.
    async fn size(&self, addr: CAddr) -> Result<Option<u64>>;

    /// The stored size of the blob at `addr` and when it was stored, if there is one. The
    /// default knows no time; backends that keep one (for garbage collection's grace) say it.
    async fn stat(&self, addr: CAddr) -> Result<Option<LeafStat>> {
        Ok(self.size(addr).await?.map(|size| LeafStat {
            size,
            stored_at: None,
        }))
    }

    /// Deletes the blob at `addr`; `Ok(false)` if there was none.
    async fn delete(&self, addr: CAddr) -> Result<bool>;

    /// Stores several leaves durably, like [`BlobStore::put`] each, and returns their
    /// addresses in order; on an error some may be stored. The default puts them one by one; a
    /// backend that can share the work of a batch (one transaction, one multi-row insert)
    /// overrides it. For bulk copies (`deriva-server migrate`'s small leaves).
    async fn put_many(&self, data: Vec<Bytes>) -> Result<Vec<CAddr>> {
        let mut out = Vec::with_capacity(data.len());
        for leaf in data {
            out.push(self.put(leaf).await?);
        }
        Ok(out)
    }

    /// One page of the listing of every stored blob with its size: at most `limit` of them,
    /// those whose address sorts after `after` (from the first when `None`), in ascending byte
    /// order of address; fewer than `limit` only at the end. Walk it with [`pages`](fn@pages)
    /// ([`BlobStore::list_pages`]).
    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<(CAddr, u64)>>;

    /// Every stored blob with its size, a page of `limit` at a time, in address order:
    /// [`pages`](fn@pages) over [`BlobStore::list_page`].
    fn list_pages(&self, limit: usize) -> BoxStream<'_, Result<Vec<(CAddr, u64)>>> {
        pages(
            limit,
            |(addr, _): &(CAddr, u64)| *addr,
            move |after, limit| self.list_page(after, limit),
        )
    }

    /// Every stored blob address, gathered from [`BlobStore::list_page`]: holds the whole
    /// listing, so for tests and small stores only (bulk work walks
    /// [`BlobStore::list_pages`]).
    async fn list(&self) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        let mut pages = self.list_pages(PAGE);
        while let Some(page) = futures::TryStreamExt::try_next(&mut pages).await? {
            out.extend(page.into_iter().map(|(addr, _)| addr));
        }
        Ok(out)
    }

    /// Deletes the blob at `addr` if it was last put before `cutoff`: its size if it was
    /// deleted, `Ok(None)` if it was put since (or is gone). For garbage collection, which
    /// holds off writers and has checked that nothing refers to it.
    async fn delete_if_older(&self, addr: CAddr, cutoff: SystemTime) -> Result<Option<u64>>;

    /// [`BlobStore::delete_if_older`] for each of `addrs`: the ones deleted, with their sizes.
    /// The default asks one at a time; the remote store deletes the batch's rows in one
    /// statement.
    async fn delete_older_many(
        &self,
        addrs: Vec<CAddr>,
        cutoff: SystemTime,
    ) -> Result<Vec<(CAddr, u64)>> {
        let mut out = Vec::new();
        for addr in addrs {
            if let Some(size) = self.delete_if_older(addr, cutoff).await? {
                out.push((addr, size));
            }
        }
        Ok(out)
    }

    /// A cheap real round trip to the backend, for health checks: `Ok` if it can serve.
    async fn check(&self) -> Result<()>;
}

/// Recipes by address, with their DAG depth, and for each address the recipes that use it.
///
/// Every method may be called from many tasks at once. A read whose stored recipe does not
/// hash to its key is [`DerivaError::Corrupted`].
#[async_trait]
pub trait RecipeIndex: Send + Sync + fmt::Debug + 'static {
    /// Stores the recipes of `batch` (with their addresses) atomically and durably: all or
    /// none. Recipes already stored are not changed, except for the time of their last put
    /// (garbage collection's clock), which is refreshed. An input is a recipe of the index, an earlier
    /// recipe of the batch, or else taken to be a leaf (depth 0): [`Store`] checks that inputs
    /// exist before it calls this. Returns how many recipes were new.
    async fn put_batch(&self, batch: Vec<(CAddr, Recipe)>) -> Result<u64>;

    /// The recipe at `addr` and its depth; `Ok(None)` if there is none.
    async fn get(&self, addr: CAddr) -> Result<Option<StoredRecipe>>;

    /// Of `addrs`, the ones that are not stored recipes, in the given order.
    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>>;

    /// The recipes that use `addr` directly as an input.
    async fn dependents(&self, addr: CAddr) -> Result<Vec<CAddr>>;

    /// Every recipe that depends on `addr`, directly or through other recipes, with its
    /// shortest distance from `addr` (1 for a direct dependent), in breadth-first order, each
    /// once; `addr` itself is not included. The default
    /// asks [`RecipeIndex::dependents`] level by level; an index that can walk the graph in one
    /// query (PostgreSQL's recursive CTE) overrides it.
    async fn transitive_dependents(&self, addr: CAddr) -> Result<Vec<(CAddr, u32)>> {
        let mut seen = HashSet::from([addr]);
        let mut queue = VecDeque::from([(addr, 0u32)]);
        let mut out = Vec::new();
        while let Some((next, distance)) = queue.pop_front() {
            for dep in self.dependents(next).await? {
                if seen.insert(dep) {
                    out.push((dep, distance + 1));
                    queue.push_back((dep, distance + 1));
                }
            }
        }
        Ok(out)
    }

    /// Of `addrs` (inputs of recipes about to be stored), the first, in order, that is neither
    /// a recipe of this index nor a blob of `blobs`; `None` if all exist. The default asks
    /// [`RecipeIndex::missing`], then `blobs` for each address that is no recipe. An index that
    /// also records the leaves (the PostgreSQL one) answers in one round trip.
    async fn first_missing_input(
        &self,
        addrs: Vec<CAddr>,
        blobs: &dyn BlobStore,
    ) -> Result<Option<CAddr>> {
        for input in self.missing(addrs).await? {
            if !blobs.contains(input).await? {
                return Ok(Some(input));
            }
        }
        Ok(None)
    }

    /// Stores the recipes of `batch` like [`RecipeIndex::put_batch`], after checking that
    /// every address of `inputs` (the inputs that are no recipe of the batch) is a recipe of
    /// this index or a blob of `blobs`: the first that is neither, in order, is
    /// [`DerivaError::MissingInput`] and nothing is stored. A recipe already stored is stored
    /// again: its time is refreshed. The check and the insert are one step for garbage
    /// collection: a backend shared by several nodes excludes their sweeps itself (the local
    /// one relies on [`Store`]'s lock). The default checks with
    /// [`RecipeIndex::first_missing_input`], then calls [`RecipeIndex::put_batch`].
    async fn put_checked(
        &self,
        batch: Vec<(CAddr, Recipe)>,
        inputs: Vec<CAddr>,
        blobs: &dyn BlobStore,
    ) -> Result<u64> {
        if !inputs.is_empty()
            && let Some(input) = self.first_missing_input(inputs, blobs).await?
        {
            return Err(DerivaError::MissingInput { input });
        }
        self.put_batch(batch).await
    }

    /// Deletes the recipe at `addr` and its edges to its inputs; `Ok(false)` if there was none.
    async fn delete(&self, addr: CAddr) -> Result<bool>;

    /// The time by which garbage collection measures ages: the clock that stamps puts (the
    /// database's, for a shared index). The default is this machine's.
    async fn clock(&self) -> Result<SystemTime> {
        Ok(SystemTime::now())
    }

    /// Garbage collection's mark (see [`gc`]), done where the data is: finds what is live at
    /// `cutoff` (pinned, put at or after it, or reachable from those; and every recipe whose
    /// row does not decode, with what it reaches) and keeps the candidates (the recipes that
    /// are not live, and the leaves of the same store that are neither live nor put at or
    /// after `cutoff`) for the sweep to page through. Holds a bounded part of the store in
    /// this process, whatever its size; counts what it visited on the store's
    /// [`StoreCounters::gc_progress`].
    async fn mark(&self, cutoff: SystemTime) -> Result<gc::Mark>;

    /// Deletes the recipe at `addr`, as [`RecipeIndex::delete`] does, only if it was last put
    /// before `cutoff`, no recipe uses it and it is not pinned; whether it was deleted.
    async fn delete_if_unused(&self, addr: CAddr, cutoff: SystemTime) -> Result<bool>;

    /// Whether a stored recipe uses `addr` as an input, or `addr` is pinned.
    async fn is_referenced(&self, addr: CAddr) -> Result<bool>;

    /// [`RecipeIndex::delete_if_unused`] for each of `addrs`, in order: the ones deleted.
    /// The default asks one at a time; PostgreSQL deletes the batch in one statement (again
    /// for what an earlier recipe of the batch still used).
    async fn delete_unused_many(
        &self,
        addrs: Vec<CAddr>,
        cutoff: SystemTime,
    ) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        for addr in addrs {
            if self.delete_if_unused(addr, cutoff).await? {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// Of `addrs`, the ones [`RecipeIndex::is_referenced`] is false for, in order. The default
    /// asks one at a time; PostgreSQL answers the batch in one statement.
    async fn unreferenced(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        for addr in addrs {
            if !self.is_referenced(addr).await? {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// Holds off the puts and pins of every other node that shares this index, for garbage
    /// collection's deletes. The default (an index of one process) holds nothing.
    async fn lock_for_sweep(&self) -> Result<SweepLock> {
        Ok(SweepLock::new(()))
    }

    /// One page of the listing of every stored recipe's address and DAG depth: at most `limit`
    /// of them, those whose `(depth, address)` sorts after `after` (from the first when
    /// `None`), in ascending order of depth, then of the address's bytes; fewer than `limit`
    /// only at the end. In that order every recipe's inputs come before it, so a copy that
    /// writes page after page never writes a recipe before its inputs. Walk it with [`pages`](fn@pages)
    /// ([`RecipeIndex::list_pages`]); for bulk work such as `deriva-server migrate`, not for
    /// hot paths.
    async fn list_page(
        &self,
        after: Option<(u32, CAddr)>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u32)>>;

    /// Every stored recipe with its depth, a page of `limit` at a time, in `(depth, address)`
    /// order: [`pages`](fn@pages) over [`RecipeIndex::list_page`].
    fn list_pages(&self, limit: usize) -> BoxStream<'_, Result<Vec<(CAddr, u32)>>> {
        pages(
            limit,
            |(addr, depth): &(CAddr, u32)| (*depth, *addr),
            move |after, limit| self.list_page(after, limit),
        )
    }

    /// Every stored recipe's address and depth, gathered from [`RecipeIndex::list_page`]:
    /// holds the whole listing, so for tests and small stores only.
    async fn list(&self) -> Result<Vec<(CAddr, u32)>> {
        let mut out = Vec::new();
        let mut pages = self.list_pages(PAGE);
        while let Some(page) = futures::TryStreamExt::try_next(&mut pages).await? {
            out.extend(page);
        }
        Ok(out)
    }

    /// The number of stored recipes, counted by a scan: for checks, not hot paths (use
    /// [`StoreCounters`]).
    async fn count_by_scan(&self) -> Result<u64>;

    /// Pins `addr`, durably: pinned addresses are the roots of what garbage collection keeps.
    /// Whether it was not pinned before; [`DerivaError::NotFound`] if `addr` is neither a
    /// recipe of this index nor a blob of `blobs`. The check and the pin are one step for
    /// garbage collection, like [`RecipeIndex::put_checked`]'s.
    async fn pin(&self, addr: CAddr, blobs: &dyn BlobStore) -> Result<bool>;

    /// Unpins `addr`; whether it was pinned.
    async fn unpin(&self, addr: CAddr) -> Result<bool>;

    /// Every pinned address, in no particular order.
    async fn pins(&self) -> Result<Vec<CAddr>>;

    /// A cheap real round trip to the backend, for health checks: `Ok` if it can serve.
    async fn check(&self) -> Result<()>;
}

/// Held by everything that keeps a backend's resources (a database file, connections) in use.
/// When the last `Lease` of a store is dropped, its [`Released`] completes.
#[derive(Debug, Clone)]
pub struct Lease(#[allow(dead_code)] Arc<tokio::sync::watch::Sender<()>>);

/// Completes when every [`Lease`] of a store has been dropped: then the store's resources are
/// free (the local backend's redb file can be opened again).
#[derive(Debug, Clone)]
pub struct Released(tokio::sync::watch::Receiver<()>);

/// A new lease and the signal of its release.
pub fn lease() -> (Lease, Released) {
    let (tx, rx) = tokio::sync::watch::channel(());
    (Lease(Arc::new(tx)), Released(rx))
}

impl Released {
    /// Waits until every lease is gone.
    pub async fn wait(mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

/// The storage of one Deriva server: a [`BlobStore`] for leaves and a [`RecipeIndex`] for
/// recipes. Cheap to share behind an `Arc`; every method is async and never blocks its caller's
/// thread.
pub struct Store {
    blobs: Arc<dyn BlobStore>,
    recipes: Arc<dyn RecipeIndex>,
    outputs: Option<Arc<dyn OutputStore>>,
    bus: Option<Arc<dyn InvalidationBus>>,
    leases: Option<Arc<dyn ComputeLeases>>,
    sizes: Option<Arc<dyn OutputSizes>>,
    records: Option<Arc<dyn Records>>,
    counters: Arc<StoreCounters>,
    /// Held shared by whatever adds a reference (a recipe put, a pin) across its check and its
    /// write, and exclusively by garbage collection's deletes.
    writers: tokio::sync::RwLock<()>,
    /// One garbage collection at a time.
    collecting: tokio::sync::Mutex<()>,
    released: Released,
    _lease: Lease,
    description: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.description)
            .field("blobs", &self.blobs)
            .field("recipes", &self.recipes)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store over two backends. `counters` must be the counters the backends keep current;
    /// `lease` and `released` come from one [`lease()`], whose other clones the backends hold
    /// for as long as they use their resources. `description` names the backend in logs.
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        recipes: Arc<dyn RecipeIndex>,
        counters: Arc<StoreCounters>,
        (lease, released): (Lease, Released),
        description: impl Into<String>,
    ) -> Self {
        Self {
            blobs,
            recipes,
            outputs: None,
            bus: None,
            leases: None,
            sizes: None,
            records: None,
            counters,
            writers: tokio::sync::RwLock::new(()),
            collecting: tokio::sync::Mutex::new(()),
            released,
            _lease: lease,
            description: description.into(),
        }
    }

    /// Keeps computed outputs in `outputs` too (the shared output tier).
    pub fn with_outputs(mut self, outputs: Arc<dyn OutputStore>) -> Self {
        self.outputs = Some(outputs);
        self
    }

    /// Publishes invalidations to the other nodes of a cluster on `bus`.
    pub fn with_bus(mut self, bus: Arc<dyn InvalidationBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Takes a lease on each compute in `leases`, so that the nodes sharing the output tier
    /// compute each recipe once (only used with [`Store::with_outputs`]).
    pub fn with_leases(mut self, leases: Arc<dyn ComputeLeases>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Keeps the recorded sizes of computed outputs in `sizes`, across restarts.
    pub fn with_sizes(mut self, sizes: Arc<dyn OutputSizes>) -> Self {
        self.sizes = Some(sizes);
        self
    }

    /// Keeps the materialization records of computed outputs in `records`.
    pub fn with_records(mut self, records: Arc<dyn Records>) -> Self {
        self.records = Some(records);
        self
    }

    /// Where the materialization records of computed outputs are kept, if anywhere.
    pub fn records(&self) -> Option<&Arc<dyn Records>> {
        self.records.as_ref()
    }

    /// Where the recorded sizes of computed outputs are kept, if anywhere.
    pub fn sizes(&self) -> Option<&Arc<dyn OutputSizes>> {
        self.sizes.as_ref()
    }

    /// The compute leases shared with the other nodes, if there are any.
    pub fn leases(&self) -> Option<&Arc<dyn ComputeLeases>> {
        self.leases.as_ref()
    }

    /// The shared output tier, if there is one.
    pub fn outputs(&self) -> Option<&Arc<dyn OutputStore>> {
        self.outputs.as_ref()
    }

    /// The invalidation bus to the other nodes, if there are any.
    pub fn bus(&self) -> Option<&Arc<dyn InvalidationBus>> {
        self.bus.as_ref()
    }

    /// Names the backend, for logs: `local /var/lib/deriva`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The live counters, shareable with metrics callbacks (they do not keep the store open).
    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
    }

    /// Completes once this store and everything that kept its backends' resources are gone.
    pub fn released(&self) -> Released {
        self.released.clone()
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// The recipe index.
    pub fn recipes(&self) -> &Arc<dyn RecipeIndex> {
        &self.recipes
    }

    /// Stores a leaf durably and returns its address.
    pub async fn put_leaf(&self, data: Bytes) -> Result<CAddr> {
        self.blobs.put(data).await
    }

    /// Reads a leaf, verifying its hash. `Ok(None)` if there is no leaf at `addr`;
    /// [`DerivaError::Corrupted`] if the stored bytes do not match the address.
    pub async fn get_leaf(&self, addr: CAddr) -> Result<Option<Bytes>> {
        self.blobs.get(addr).await
    }

    /// Stores a recipe durably and returns its address. Every input must already be a leaf or
    /// a recipe ([`DerivaError::MissingInput`] otherwise). Storing the same recipe again changes
    /// nothing but the time of its last put, which garbage collection's grace period counts from.
    pub async fn put_recipe(&self, recipe: Recipe) -> Result<CAddr> {
        Ok(self.put_recipes(vec![recipe]).await?[0])
    }

    /// Stores several recipes atomically, in order: a recipe may use an earlier recipe of the
    /// same batch as an input. All or nothing: if any input is missing, nothing is stored.
    /// Returns the addresses, in order.
    pub async fn put_recipes(&self, recipes: Vec<Recipe>) -> Result<Vec<CAddr>> {
        let batch: Vec<(CAddr, Recipe)> = recipes.into_iter().map(|r| (r.addr(), r)).collect();
        // Inputs that are not earlier recipes of the batch must exist already: as recipes, or
        // else as leaves. The first missing one, in batch order, is the error.
        let mut earlier = HashSet::with_capacity(batch.len());
        let mut outside = Vec::new();
        for (addr, recipe) in &batch {
            for input in recipe.inputs() {
                if !earlier.contains(input) && !outside.contains(input) {
                    outside.push(*input);
                }
            }
            earlier.insert(*addr);
        }
        let addrs = batch.iter().map(|(addr, _)| *addr).collect();
        // A sweep of garbage collection waits until the check and the insert are done, so it
        // never deletes an input between them.
        let _writing = self.writers.read().await;
        self.recipes
            .put_checked(batch, outside, self.blobs.as_ref())
            .await?;
        Ok(addrs)
    }

    /// Reads a recipe and its DAG depth. `Ok(None)` if there is no recipe at `addr`.
    pub async fn get_recipe(&self, addr: CAddr) -> Result<Option<StoredRecipe>> {
        self.recipes.get(addr).await
    }

    /// What `addr` names, in one question: a leaf and its size (its bytes not read), a recipe
    /// (read whole, as [`Store::get_recipe`] reads it), or nothing. The recipe index and the
    /// leaf store are asked at once, so the answer takes one round trip of the slower of the
    /// two; a materialization asks this once per address, and takes the sizes of its inputs
    /// from the same answers.
    pub async fn locate(&self, addr: CAddr) -> Result<Option<Located>> {
        let (recipe, size) =
            futures::future::try_join(self.recipes.get(addr), self.blobs.size(addr)).await?;
        Ok(match (recipe, size) {
            (Some(recipe), _) => Some(Located::Recipe(recipe)),
            (None, Some(size)) => Some(Located::Leaf { size }),
            (None, None) => None,
        })
    }

    /// For a Get of an address nothing is known of: the leaf at `addr` opened, or the recipe
    /// stored there, or nothing. The leaf store and the recipe index are asked at once, so a
    /// leaf costs one round trip (not a [`Store::locate`] and then a read) and a recipe no more
    /// than [`Store::locate`] costs.
    pub async fn open(&self, addr: CAddr, chunk_bytes: usize) -> Result<Option<Found<ByteStream>>> {
        self.recipe_or_leaf(addr, self.blobs.get_stream(addr, chunk_bytes))
            .await
    }

    /// [`Store::open`], with a leaf read whole and verified ([`DerivaError::Corrupted`] if its
    /// bytes do not match `addr`): for an input of a compute.
    pub async fn find(&self, addr: CAddr) -> Result<Option<Found<Bytes>>> {
        self.recipe_or_leaf(addr, self.blobs.get(addr)).await
    }

    /// The recipe at `addr` if there is one, else what `leaf` (a read of the leaf store at
    /// `addr`, run at the same time) found.
    async fn recipe_or_leaf<L>(
        &self,
        addr: CAddr,
        leaf: impl Future<Output = Result<Option<L>>>,
    ) -> Result<Option<Found<L>>> {
        let (recipe, leaf) = futures::future::try_join(self.recipes.get(addr), leaf).await?;
        Ok(match (recipe, leaf) {
            (Some(recipe), _) => Some(Found::Recipe(recipe)),
            (None, leaf) => leaf.map(Found::Leaf),
        })
    }

    /// What `addr` names, if anything.
    pub async fn kind_of(&self, addr: CAddr) -> Result<Option<AddrKind>> {
        if self.recipes.missing(vec![addr]).await?.is_empty() {
            Ok(Some(AddrKind::Recipe))
        } else if self.blobs.contains(addr).await? {
            Ok(Some(AddrKind::Leaf))
        } else {
            Ok(None)
        }
    }

    /// The recipes that use `addr` directly as an input.
    pub async fn dependents(&self, addr: CAddr) -> Result<Vec<CAddr>> {
        self.recipes.dependents(addr).await
    }

    /// Every recipe that depends on `addr`, directly or through other recipes, in breadth-first
    /// order, each once. `addr` itself is not included.
    pub async fn transitive_dependents(&self, addr: CAddr) -> Result<Vec<CAddr>> {
        let found = self.recipes.transitive_dependents(addr).await?;
        Ok(found.into_iter().map(|(dep, _)| dep).collect())
    }

    /// [`Store::transitive_dependents`], each with its shortest distance from `addr`.
    pub async fn transitive_dependents_with_distance(
        &self,
        addr: CAddr,
    ) -> Result<Vec<(CAddr, u32)>> {
        self.recipes.transitive_dependents(addr).await
    }

    /// Pins `addr`, a leaf or a recipe ([`DerivaError::NotFound`] otherwise): a root of what
    /// garbage collection keeps. Whether it was not pinned before.
    pub async fn pin(&self, addr: CAddr) -> Result<bool> {
        let _writing = self.writers.read().await;
        self.recipes.pin(addr, self.blobs.as_ref()).await
    }

    /// Unpins `addr`; whether it was pinned (unpinning what is not pinned is no error).
    pub async fn unpin(&self, addr: CAddr) -> Result<bool> {
        self.recipes.unpin(addr).await
    }

    /// Every pinned address, in no particular order.
    pub async fn pins(&self) -> Result<Vec<CAddr>> {
        self.recipes.pins().await
    }

    /// Checks that both backends can serve (a real read of each), for health checks.
    pub async fn check(&self) -> Result<()> {
        self.recipes.check().await?;
        self.blobs.check().await
    }

    /// Counts recipes by scanning; for health checks and consistency tests, not for hot paths
    /// (use [`Store::counters`]).
    pub async fn count_recipes_by_scan(&self) -> Result<u64> {
        self.recipes.count_by_scan().await
    }
}
