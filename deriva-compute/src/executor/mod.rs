//! [`AsyncExecutor`], the engine that materializes any address. This file holds the engine's
//! shared state, its accessors and its two entry points, [`AsyncExecutor::materialize`] and
//! [`AsyncExecutor::get_stream`]; the work is cut along the way the data goes, and a reader
//! following one Get moves down through the modules in this order:
//!
//! 1. `read_path`: one level of materialization in its `materialize` span: the memory cache,
//!    then the spill directory, then (for a Get) the leaf store; a miss goes on to
//! 2. `single_flight`: every concurrent caller of one address joins one materialization,
//!    run in its own task (so a recipe chain of any depth never deepens the stack), aborted
//!    when its last caller has gone;
//! 3. `compute`: in that task, the recipe is checked against its function and the memory
//!    budget, the shared output tier is asked, the inputs are materialized concurrently (each
//!    through the read path, one level deeper), and the function runs on the blocking pool
//!    under a compute permit and a memory reservation (twice when verifying); the output is
//!    kept in the memory cache or, above the spill threshold, the spill directory.
//!
//! Beside that road: `config`, the settings, and `maintenance`, invalidation and garbage
//! collection, which evict what the road left in the cache and the spill directory.
//!
//! A compute runs with a [`crate::ComputeContext`] whose token is cancelled when it runs past
//! [`ExecutorConfig::compute_timeout`] (its callers then get
//! [`DerivaError::DeadlineExceeded`]), when every caller has gone (its task was aborted), and
//! for every compute at once by [`AsyncExecutor::cancel_computes`] (shutdown). The permit and
//! the memory reservation belong to the blocking closure: they are given back when the
//! function returns, which for a builtin is within one chunk of work after the cancellation,
//! and for a function that ignores its context, whenever it returns.
//!
//! A `Get` also caches hot small leaves: a leaf of at most
//! [`ExecutorConfig::leaf_cache_max_bytes`] read a second time (see [`Cache::admit_leaf`]) is
//! read whole, verified, and cached beside the outputs, under the same budget; from then on a
//! Get of it is a cache hit like a cached output's. Garbage collection drops the leaves it
//! deletes from the cache before it reports them.

mod compute;
mod config;
mod lease;
mod maintenance;
mod provenance;
mod read_path;
mod single_flight;
mod stored;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, FunctionId, Recipe, Result};
use deriva_store::ByteStream;
use deriva_store::Store;
use opentelemetry::metrics::Meter;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::budget::MemoryBudget;
use crate::function::{CancelToken, FunctionError, FunctionRegistry};
use crate::memory_cache::Cache;
use crate::metrics::{ComputeMetrics, ExecStats};
use crate::spill::SpillStore;

pub use compute::VerifyReport;
pub use config::{
    AuditConfig, COMPUTE_TIMEOUT, ExecutorConfig, LEAF_CACHE_MAX_BYTES, OnMismatch, RecordSigner,
    Spill, TraceLinks, VerificationMode,
};
pub use maintenance::{CascadePolicy, CascadeReport, GcReport, InvalidateReport};
pub use provenance::{Described, PROVENANCE_MAX_ENTRIES, ProvenanceEntry, ProvenanceTree};
use single_flight::Flight;

/// What every clone of an [`AsyncExecutor`] shares: the store, the functions, the memory cache
/// and budget, the settings, the compute slots and the flights in the air.
struct ExecutorState {
    store: Arc<Store>,
    registry: Arc<FunctionRegistry>,
    cache: Arc<Cache>,
    config: ExecutorConfig,
    computes: Arc<Semaphore>,
    inflight: Mutex<HashMap<CAddr, Flight>>,
    next_flight: AtomicU64,
    stats: Arc<ExecStats>,
    metrics: ComputeMetrics,
    budget: Arc<MemoryBudget>,
    /// The largest leaf a Get caches: the configured bound, within a sixteenth of the budget.
    leaf_limit: u64,
    /// Cancelled by [`AsyncExecutor::cancel_computes`]: every compute's context sees it.
    shutdown: CancelToken,
    /// The audits running ([`AuditConfig::max_concurrent`] permits).
    audits: Arc<Semaphore>,
}

/// The materialization engine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AsyncExecutor {
    state: Arc<ExecutorState>,
}

impl fmt::Debug for AsyncExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncExecutor")
            .field("config", &self.state.config)
            .field("registry", &self.state.registry)
            .field("cache_budget", &self.state.cache.budget())
            .finish_non_exhaustive()
    }
}

/// The deepest level one top-level materialize reached.
#[derive(Debug, Default)]
struct DepthTracker(AtomicU32);

impl AsyncExecutor {
    /// Builds an executor over `store`, running the functions of `registry`, caching in
    /// `cache`, with its instruments built from `meter`.
    pub fn new(
        store: Arc<Store>,
        registry: Arc<FunctionRegistry>,
        cache: Arc<Cache>,
        config: ExecutorConfig,
        meter: &Meter,
    ) -> Self {
        let stats = Arc::new(ExecStats::default());
        let budget = Arc::new(MemoryBudget::new(config.memory));
        let mut metrics =
            ComputeMetrics::new(meter, cache.stats().clone(), stats.clone(), registry.ids());
        metrics.observe_memory(
            meter,
            budget.clone(),
            config.spill.as_ref().map(|s| s.store.clone()),
        );
        let mut config = config;
        // A record holds at most MAX_NODE_LEN bytes of node name.
        let max = deriva_core::provenance::MAX_NODE_LEN;
        if config.node_name.len() > max {
            let mut end = max;
            while !config.node_name.is_char_boundary(end) {
                end -= 1;
            }
            config.node_name.truncate(end);
        }
        let permits = config.max_concurrent_computes.max(1);
        let audits = Arc::new(Semaphore::new(config.audit.max_concurrent));
        let leaf_limit = config.leaf_cache_max_bytes.min(cache.budget() / 16);
        Self {
            state: Arc::new(ExecutorState {
                leaf_limit,
                store,
                registry,
                cache,
                computes: Arc::new(Semaphore::new(permits)),
                config,
                inflight: Mutex::default(),
                next_flight: AtomicU64::new(0),
                stats,
                metrics,
                budget,
                shutdown: CancelToken::new(),
                audits,
            }),
        }
    }

    /// The memory budget.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.state.budget
    }

    /// The spill directory, if outputs are spilled.
    pub fn spill(&self) -> Option<&Arc<SpillStore>> {
        self.state.config.spill.as_ref().map(|s| &s.store)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.state.store
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.state.cache
    }

    /// The function registry.
    pub fn registry(&self) -> &Arc<FunctionRegistry> {
        &self.state.registry
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<ExecStats> {
        &self.state.stats
    }

    /// The verification mode in force.
    pub fn verification_mode(&self) -> VerificationMode {
        self.state.config.verification
    }

    /// How many more computes could start now (the compute limit minus those running).
    pub fn compute_permits_available(&self) -> usize {
        self.state.computes.available_permits()
    }

    /// Cancels every compute running now and every one that starts from now on: each sees its
    /// [`ComputeContext`](crate::ComputeContext) cancelled (a builtin returns within one chunk of work) and its
    /// callers get [`DerivaError::TaskCancelled`]. For shutdown, once the grace period is over;
    /// it cannot be undone.
    pub fn cancel_computes(&self) {
        self.state.shutdown.cancel();
    }

    /// Checks a recipe against the registry (function registered, params and input count
    /// accepted) and stores it. Every input must exist.
    pub async fn put_recipe(&self, recipe: Recipe) -> Result<CAddr> {
        self.runnable(None, &recipe)?;
        self.state.store.put_recipe(recipe).await
    }

    /// Produces the bytes of `addr`: from the cache, the leaf store, or by computing its recipe
    /// (and, recursively, its inputs).
    pub async fn materialize(&self, addr: CAddr) -> Result<Bytes> {
        let depth = Arc::new(DepthTracker::default());
        let result = self
            .materialize_at(addr, 0, depth.clone(), single_flight::Known::Nothing)
            .await;
        self.state
            .metrics
            .materialize_depth
            .record(u64::from(depth.0.load(Ordering::Relaxed)), &[]);
        result.map(|(bytes, _)| bytes)
    }

    /// The bytes of `addr` for a Get, in chunks of at most `chunk_bytes`, in a `materialize`
    /// span as [`AsyncExecutor::materialize`] makes: a cached output or leaf from memory (a
    /// cache hit); a leaf straight from the store as it is sent, holding about one chunk
    /// (hashed on the way: a damaged leaf ends the stream with [`DerivaError::Corrupted`],
    /// counted as a corruption; see [`deriva_store::stream`]); a recipe materialized,
    /// then cut into slices.
    ///
    /// A small leaf read for the second time (see [`Cache::admit_leaf`]) is read whole before
    /// this returns, and cached once its bytes proved to match its address; a damaged one is
    /// never cached, and streams as above.
    pub async fn get_stream(&self, addr: CAddr, chunk_bytes: usize) -> Result<ByteStream> {
        let tracker = Arc::new(DepthTracker::default());
        let this = self.clone();
        let inner_tracker = tracker.clone();
        let result = self
            .in_materialize_span(addr, 0, tracker.clone(), async move {
                this.cached_leaf_or_resolve(addr, chunk_bytes, inner_tracker)
                    .await
            })
            .await;
        self.state
            .metrics
            .materialize_depth
            .record(u64::from(tracker.0.load(Ordering::Relaxed)), &[]);
        result.map(|(chunks, _)| chunks)
    }

    /// Counts a [`DerivaError::Corrupted`] found while reading `addr` itself (not one passed up
    /// from an input, which was counted where it was found).
    pub(super) fn count_corruption<T>(&self, read: Result<T>) -> Result<T> {
        if let Err(DerivaError::Corrupted { .. }) = &read {
            self.state.stats.record_corruption();
        }
        read
    }
}

/// Span fields are recorded as `i64`: tracing-opentelemetry exports `u64` fields as strings.
fn as_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn invalid_recipe(function: &FunctionId, addr: Option<CAddr>, e: &FunctionError) -> DerivaError {
    match addr {
        Some(addr) => DerivaError::InvalidInput(format!("{addr}: {function}: {e}")),
        None => DerivaError::InvalidInput(format!("{function}: {e}")),
    }
}
