//! [`AsyncExecutor`]: materialization, single-flight, the compute semaphore, invalidation and
//! verification.
//!
//! `materialize(addr)` runs: cache → leaf → recipe → inputs (concurrently) → compute on the
//! blocking pool → cache put. Everything after the cache check runs in a spawned task shared by
//! every concurrent caller of the same address (single-flight). Because each level runs in its
//! own task, a recipe chain of any depth never deepens the stack. When every caller of a shared
//! materialization has gone away, its task is aborted.
//!
//! A compute runs on the blocking pool under a compute permit, with a [`ComputeContext`] whose
//! token is cancelled when it runs past [`ExecutorConfig::compute_timeout`] (its callers then
//! get [`DerivaError::DeadlineExceeded`]), when every caller has gone (its task was aborted),
//! and for every compute at once by [`AsyncExecutor::cancel_computes`] (shutdown). The permit
//! and the memory reservation belong to the blocking closure: they are given back when the
//! function returns, which for a builtin is within one chunk of work after the cancellation,
//! and for a function that ignores its context, whenever it returns.
//!
//! A `Get` ([`AsyncExecutor::get_stream`]) also caches hot small leaves: a leaf of at most
//! [`ExecutorConfig::leaf_cache_max_bytes`] read a second time (see
//! [`Cache::admit_leaf`]) is read whole, verified, and cached beside the outputs, under the same
//! budget; from then on a Get of it is a cache hit like a cached output's. Garbage collection
//! drops the leaves it deletes from the cache before it reports them.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, FunctionId, Recipe, Result};
use deriva_store::gc::{GcOptions, GcOutcome};
use deriva_store::task::spawn_blocking_in;
use deriva_store::{AddrKind, ByteStream, Store, stream};
use futures::future::{BoxFuture, Shared, WeakShared};
use futures::{FutureExt, StreamExt as _};
use opentelemetry::metrics::Meter;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::field::Empty;
use tracing::instrument::WithSubscriber;
use tracing::{Instrument, Span, info_span};

use crate::budget::{BudgetConfig, MemoryBudget, Reservation};
use crate::cache::{Cache, Kind as CacheKind};
use crate::function::{
    CancelToken, ComputeContext, ComputeFunction, FunctionError, FunctionRegistry,
};
use crate::metrics::{ComputeMetrics, ExecStats, GcResult, Outcome};
use crate::spans::{self, field};
use crate::spill::SpillStore;

/// When to compute a recipe twice and compare the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum VerificationMode {
    /// Never (the default).
    #[default]
    Off,
    /// Every compute.
    Dual,
    /// Each compute with this probability (0 to 1).
    Sampled(f64),
}

impl FromStr for VerificationMode {
    type Err = DerivaError;

    /// Parses `off`, `dual` or `sampled:RATE` with RATE in 0..=1.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "dual" => Ok(Self::Dual),
            _ => {
                let rate = s
                    .strip_prefix("sampled:")
                    .and_then(|r| r.parse::<f64>().ok());
                match rate {
                    Some(r) if (0.0..=1.0).contains(&r) => Ok(Self::Sampled(r)),
                    _ => Err(DerivaError::InvalidInput(format!(
                        "verification mode {s:?} is not off, dual or sampled:RATE with RATE from 0 to 1"
                    ))),
                }
            }
        }
    }
}

impl fmt::Display for VerificationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Dual => f.write_str("dual"),
            Self::Sampled(r) => write!(f, "sampled:{r}"),
        }
    }
}

impl VerificationMode {
    fn should_verify(self) -> bool {
        match self {
            Self::Off => false,
            Self::Dual => true,
            Self::Sampled(rate) => fastrand::f64() < rate,
        }
    }
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Most computes running at once on the blocking pool. Default: the number of CPUs.
    pub max_concurrent_computes: usize,
    /// When to verify determinism. Default: off.
    pub verification: VerificationMode,
    /// A compute slower than this logs a WARN. Default: 1 s.
    pub slow_compute_threshold: Duration,
    /// The memory budget of materializations (see [`crate::budget`]). Default:
    /// [`BudgetConfig::default`].
    pub memory: BudgetConfig,
    /// Where outputs too large for the memory cache go. Default: nowhere (every output may be
    /// cached in memory).
    pub spill: Option<Spill>,
    /// A leaf that a Get reads a second time is cached if it holds at most this many bytes
    /// (and at most a sixteenth of the cache budget); 0 caches no leaf. Default:
    /// [`LEAF_CACHE_MAX_BYTES`].
    pub leaf_cache_max_bytes: u64,
    /// Longest one run of a function may take (a verification runs it twice, each under this
    /// bound); then its context is cancelled and its callers get
    /// [`DerivaError::DeadlineExceeded`]. `None`: no bound. Default: [`COMPUTE_TIMEOUT`].
    pub compute_timeout: Option<Duration>,
}

/// The default of [`ExecutorConfig::compute_timeout`]: 300 s.
pub const COMPUTE_TIMEOUT: Duration = Duration::from_secs(300);

/// The default of [`ExecutorConfig::leaf_cache_max_bytes`]: 64 KiB.
pub const LEAF_CACHE_MAX_BYTES: u64 = 64 << 10;

/// Outputs larger than `threshold` bytes are kept in `store` (a local directory) instead of
/// the memory cache, and a `Get` streams them from there.
#[derive(Debug, Clone)]
pub struct Spill {
    /// The spill directory.
    pub store: Arc<SpillStore>,
    /// Outputs above this many bytes are spilled.
    pub threshold: u64,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_concurrent_computes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            verification: VerificationMode::Off,
            slow_compute_threshold: Duration::from_secs(1),
            memory: BudgetConfig::default(),
            spill: None,
            leaf_cache_max_bytes: LEAF_CACHE_MAX_BYTES,
            compute_timeout: Some(COMPUTE_TIMEOUT),
        }
    }
}

/// What [`AsyncExecutor::invalidate`] evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidateReport {
    /// Whether the address itself was cached.
    pub was_cached: bool,
    /// Every address removed from the cache, the requested one first if it was cached.
    pub evicted: Vec<CAddr>,
}

/// What [`AsyncExecutor::cascade_invalidate`] does with the addresses it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CascadePolicy {
    /// Evict them (the default).
    #[default]
    Immediate,
    /// Report what would be evicted; change nothing.
    DryRun,
    /// Do nothing.
    None,
}

impl CascadePolicy {
    /// Every policy, in the order of [`CascadePolicy::as_str`]'s labels.
    pub const ALL: [CascadePolicy; 3] = [Self::Immediate, Self::DryRun, Self::None];

    /// The policy a client names: `dry_run` or `dryrun`, `none` (any case); anything else is
    /// `immediate`.
    pub fn parse(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "dry_run" | "dryrun" => Self::DryRun,
            "none" => Self::None,
            _ => Self::Immediate,
        }
    }

    /// The label: `immediate`, `dry_run` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::DryRun => "dry_run",
            Self::None => "none",
        }
    }
}

/// What [`AsyncExecutor::cascade_invalidate`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CascadeReport {
    /// Whether the requested address itself was held (cached or spilled) and evicted (or
    /// would be, in a dry run).
    pub was_cached: bool,
    /// The addresses evicted (or that would be), the requested one first if it was.
    pub evicted: Vec<CAddr>,
    /// The addresses examined: the root if included, and every transitive dependent.
    pub traversed: u64,
    /// The longest distance from the root to a dependent (0 without dependents).
    pub max_depth: u32,
    /// The bytes of the evicted outputs (in memory and in the spill directory).
    pub bytes_reclaimed: u64,
    /// How long it took.
    pub duration: Duration,
}

/// What [`AsyncExecutor::garbage_collect`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// What the store's collection found and removed.
    pub store: GcOutcome,
    /// Outputs of removed recipes this node held (in memory or spilled) and dropped (or, in a
    /// dry run, would drop). Removed leaves leave the cache too, but count as leaves only, in
    /// `store`.
    pub cache_entries_removed: u64,
    /// Their bytes.
    pub bytes_reclaimed_cache: u64,
    /// Whether nothing was removed, only reported.
    pub dry_run: bool,
    /// How long it took.
    pub duration: Duration,
}

/// What [`AsyncExecutor::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Whether both runs gave the same bytes.
    pub deterministic: bool,
    /// BLAKE3 of the first run's output.
    pub output_hash: CAddr,
    /// BLAKE3 of the second run's output (equal to `output_hash` when deterministic).
    pub second_hash: CAddr,
    /// Size of the output in bytes (0 when the runs disagreed).
    pub output_size: u64,
    /// Time of the first run (zero when the runs disagreed).
    pub compute_time: Duration,
}

type FlightOutput = Result<(Bytes, Outcome)>;
/// The memory reservation that still covers a flight's output: for an output kept in neither
/// the cache nor anywhere else in memory (a spilled one), until its last caller lets it go.
type Held = Option<Arc<Reservation>>;
/// What a shared flight gives each of its callers.
type FlownOutput = Result<((Bytes, Held), Outcome)>;
type FlightFuture = BoxFuture<'static, FlownOutput>;

/// A leaf opened for a Get.
enum LeafRead {
    /// Read whole and verified (a small leaf the cache admitted), with the time it took.
    Whole(Bytes, Duration),
    /// Its chunks as they are read (the first ones may have been read already).
    Streaming(ByteStream),
}

struct Flight {
    id: u64,
    shared: WeakShared<FlightFuture>,
    /// The `materialize` span of the call that started it, for joiners to link to.
    span: Span,
}

struct Inner {
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
}

/// The materialization engine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AsyncExecutor {
    inner: Arc<Inner>,
}

impl fmt::Debug for AsyncExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncExecutor")
            .field("config", &self.inner.config)
            .field("registry", &self.inner.registry)
            .field("cache_budget", &self.inner.cache.budget())
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
        let permits = config.max_concurrent_computes.max(1);
        let leaf_limit = config.leaf_cache_max_bytes.min(cache.budget() / 16);
        Self {
            inner: Arc::new(Inner {
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
            }),
        }
    }

    /// The memory budget.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.inner.budget
    }

    /// The spill directory, if outputs are spilled.
    pub fn spill(&self) -> Option<&Arc<SpillStore>> {
        self.inner.config.spill.as_ref().map(|s| &s.store)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.inner.cache
    }

    /// The function registry.
    pub fn registry(&self) -> &Arc<FunctionRegistry> {
        &self.inner.registry
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<ExecStats> {
        &self.inner.stats
    }

    /// The verification mode in force.
    pub fn verification_mode(&self) -> VerificationMode {
        self.inner.config.verification
    }

    /// How many more computes could start now (the compute limit minus those running).
    pub fn compute_permits_available(&self) -> usize {
        self.inner.computes.available_permits()
    }

    /// Cancels every compute running now and every one that starts from now on: each sees its
    /// [`ComputeContext`] cancelled (a builtin returns within one chunk of work) and its
    /// callers get [`DerivaError::TaskCancelled`]. For shutdown, once the grace period is over;
    /// it cannot be undone.
    pub fn cancel_computes(&self) {
        self.inner.shutdown.cancel();
    }

    /// Checks a recipe against the registry (function registered, params and input count
    /// accepted) and stores it. Every input must exist.
    pub async fn put_recipe(&self, recipe: Recipe) -> Result<CAddr> {
        self.runnable(None, &recipe)?;
        self.inner.store.put_recipe(recipe).await
    }

    /// The function of `recipe` (stored at `addr`, if it is), once it is registered and
    /// accepts the recipe's params and inputs ([`ComputeFunction::validate`]).
    fn runnable(&self, addr: Option<CAddr>, recipe: &Recipe) -> Result<Arc<dyn ComputeFunction>> {
        let function = self.function(recipe.function())?;
        function
            .validate(recipe.inputs().len(), recipe.params())
            .map_err(|e| invalid_recipe(recipe.function(), addr, &e))?;
        Ok(function)
    }

    fn function(&self, id: &FunctionId) -> Result<Arc<dyn ComputeFunction>> {
        self.inner
            .registry
            .get(id)
            .cloned()
            .ok_or_else(|| DerivaError::UnknownFunction {
                function: id.clone(),
            })
    }

    /// Produces the bytes of `addr`: from the cache, the leaf store, or by computing its recipe
    /// (and, recursively, its inputs).
    pub async fn materialize(&self, addr: CAddr) -> Result<Bytes> {
        let depth = Arc::new(DepthTracker::default());
        let result = self.materialize_at(addr, 0, depth.clone()).await;
        self.inner
            .metrics
            .materialize_depth
            .record(u64::from(depth.0.load(Ordering::Relaxed)), &[]);
        result.map(|(bytes, _)| bytes)
    }

    /// One level of materialization, in its own `materialize` span.
    fn materialize_at(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
    ) -> impl Future<Output = FlightOutput> + Send + 'static {
        let this = self.clone();
        let inner_tracker = tracker.clone();
        self.observed(addr, depth, tracker, async move {
            this.lookup_or_resolve(addr, depth, inner_tracker).await
        })
    }

    /// Runs `body`, one level of materialization, in its own `materialize` span, and counts
    /// its outcome and its time.
    fn observed<T: Send + 'static>(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        body: impl Future<Output = Result<(T, Outcome)>> + Send + 'static,
    ) -> impl Future<Output = Result<(T, Outcome)>> + Send + 'static {
        tracker.0.fetch_max(depth, Ordering::Relaxed);
        let span = info_span!(
            spans::MATERIALIZE,
            { field::ADDR } = %addr,
            { field::DEPTH } = i64::from(depth),
            { field::RESULT } = Empty
        );
        let this = self.clone();
        async move {
            let _active = this.inner.stats.active_guard();
            let start = Instant::now();
            let result = body.await;
            let outcome = match &result {
                Ok((_, outcome)) => *outcome,
                Err(_) => Outcome::Error,
            };
            this.inner.stats.record(outcome);
            this.inner
                .metrics
                .materialize_duration
                .record(start.elapsed().as_secs_f64(), &[]);
            Span::current().record(field::RESULT, outcome.as_str());
            result
        }
        .instrument(span)
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
            .observed(addr, 0, tracker.clone(), async move {
                this.cached_leaf_or_resolve(addr, chunk_bytes, inner_tracker)
                    .await
            })
            .await;
        self.inner
            .metrics
            .materialize_depth
            .record(u64::from(tracker.0.load(Ordering::Relaxed)), &[]);
        result.map(|(chunks, _)| chunks)
    }

    async fn cached_leaf_or_resolve(
        &self,
        addr: CAddr,
        chunk_bytes: usize,
        tracker: Arc<DepthTracker>,
    ) -> Result<(ByteStream, Outcome)> {
        if let Some(hit) = self.cache_check(&addr) {
            return Ok((stream::chunks(hit, chunk_bytes), Outcome::Hit));
        }
        if let Some(chunks) = self.spilled_stream(addr, chunk_bytes).await {
            return Ok((chunks, Outcome::Hit));
        }
        // Noted before the read: a deletion (garbage collection) from now on keeps this leaf
        // out of the cache.
        let generation = self.inner.cache.generation(&addr);
        let read = info_span!(spans::LEAF_READ, { field::FOUND } = Empty);
        let leaf = self
            .read_leaf(addr, chunk_bytes)
            .instrument(read.clone())
            .await;
        read.record(field::FOUND, matches!(leaf, Ok(Some(_))));
        drop(read);
        match self.count_corruption(leaf)? {
            Some(LeafRead::Whole(bytes, cost)) => {
                self.cache_leaf(addr, &bytes, cost, generation);
                return Ok((stream::chunks(bytes, chunk_bytes), Outcome::Leaf));
            }
            Some(LeafRead::Streaming(chunks)) => {
                return Ok((self.counting_corruption(chunks), Outcome::Leaf));
            }
            None => {}
        }
        let ((bytes, held), outcome) = self.join_or_start(addr, 0, tracker, true).await?;
        // A spilled output streams from its file, so this call does not hold it while a slow
        // client reads; its reservation goes once every caller has let it go.
        if self.spills(bytes.len())
            && let Some(chunks) = self.spilled_stream(addr, chunk_bytes).await
        {
            drop((bytes, held));
            return Ok((chunks, outcome));
        }
        let chunks = stream::chunks(bytes, chunk_bytes).map(move |chunk| {
            let _covered = &held;
            chunk
        });
        Ok((chunks.boxed(), outcome))
    }

    /// Opens the leaf `addr` in the store, if there is one. A leaf the cache admits (see
    /// [`Cache::admit_leaf`]) is read on while it fits the leaf limit
    /// ([`ExecutorConfig::leaf_cache_max_bytes`], within a sixteenth of the budget): whole if
    /// its stream ends cleanly there (so its bytes match its address), else streaming on from
    /// what was read, errors included.
    async fn read_leaf(&self, addr: CAddr, chunk_bytes: usize) -> Result<Option<LeafRead>> {
        let start = Instant::now();
        let Some(mut chunks) = self
            .inner
            .store
            .blobs()
            .get_stream(addr, chunk_bytes)
            .await?
        else {
            return Ok(None);
        };
        let limit = self.inner.leaf_limit;
        if limit == 0 || !self.inner.cache.admit_leaf(&addr) {
            return Ok(Some(LeafRead::Streaming(chunks)));
        }
        let mut read: Vec<Result<Bytes>> = Vec::new();
        let mut len = 0u64;
        loop {
            match chunks.next().await {
                None => {
                    // One exact copy: a chunk may be a slice of a much larger read buffer.
                    let mut whole = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                    for chunk in read.iter().flatten() {
                        whole.extend_from_slice(chunk);
                    }
                    return Ok(Some(LeafRead::Whole(whole.into(), start.elapsed())));
                }
                Some(Ok(chunk)) => {
                    len += chunk.len() as u64;
                    read.push(Ok(chunk));
                    if len > limit {
                        break;
                    }
                }
                Some(Err(e)) => {
                    read.push(Err(e));
                    break;
                }
            }
        }
        let rest = futures::stream::iter(read).chain(chunks);
        Ok(Some(LeafRead::Streaming(rest.boxed())))
    }

    /// Caches the verified bytes of the leaf `addr`, read in `cost`, unless it was deleted or
    /// invalidated since `generation`; in a `cache_put` span.
    fn cache_leaf(&self, addr: CAddr, bytes: &Bytes, cost: Duration, generation: u64) {
        info_span!(spans::CACHE_PUT, { field::BYTES } = as_i64(bytes.len())).in_scope(|| {
            self.inner
                .cache
                .insert_leaf_if_current(addr, bytes.clone(), cost, generation)
        });
    }

    /// Whether an output of `len` bytes goes to the spill directory rather than the cache.
    fn spills(&self, len: usize) -> bool {
        self.inner
            .config
            .spill
            .as_ref()
            .is_some_and(|s| len as u64 > s.threshold)
    }

    /// The spilled output of `addr` as a stream, if the spill directory holds it. A damaged
    /// file ends the stream with [`DerivaError::Corrupted`], counted as a corruption; a file
    /// that cannot be opened is logged and treated as absent.
    async fn spilled_stream(&self, addr: CAddr, chunk_bytes: usize) -> Option<ByteStream> {
        let spill = self.inner.config.spill.as_ref()?;
        if !spill.store.contains(&addr) {
            return None;
        }
        let opened = self.count_corruption(spill.store.stream(addr, chunk_bytes).await);
        self.absent_if_failed(addr, opened)
            .map(|chunks| self.counting_corruption(chunks))
    }

    /// `chunks`, with a [`DerivaError::Corrupted`] at their end counted as a corruption.
    fn counting_corruption(&self, chunks: ByteStream) -> ByteStream {
        let stats = self.inner.stats.clone();
        chunks
            .inspect(move |item| {
                if let Err(DerivaError::Corrupted { .. }) = item {
                    stats.record_corruption();
                }
            })
            .boxed()
    }

    /// What a read of the spill directory found; a failed read is logged and taken as absent
    /// (the output is computed again).
    fn absent_if_failed<T>(&self, addr: CAddr, read: Result<Option<T>>) -> Option<T> {
        read.unwrap_or_else(|e| {
            tracing::warn!(%addr, error = %e, "could not read a spilled output; computing it instead");
            None
        })
    }

    /// The spilled output of `addr`, read whole and verified, if the spill directory holds it
    /// (as an input of another compute).
    async fn spilled_bytes(&self, addr: CAddr) -> Option<Bytes> {
        let spill = self.inner.config.spill.as_ref()?;
        if !spill.store.contains(&addr) {
            return None;
        }
        let store = spill.store.clone();
        let read = spawn_blocking_in(Span::current(), move || store.get(&addr))
            .await
            .unwrap_or_else(|e| Err(DerivaError::from_join("reading a spilled output", e)));
        let read = self.count_corruption(read);
        self.absent_if_failed(addr, read)
    }

    /// The cached output or leaf of `addr`, if any, in a `cache_check` span.
    fn cache_check(&self, addr: &CAddr) -> Option<Bytes> {
        let hit = info_span!(spans::CACHE_CHECK, { field::HIT } = Empty).in_scope(|| {
            let hit = self.inner.cache.get(addr);
            Span::current().record(field::HIT, hit.is_some());
            hit
        })?;
        // Compute time saved: a leaf's cost is a read, not a compute.
        if hit.kind == CacheKind::Output {
            self.inner.stats.record_saved(hit.cost);
        }
        Some(hit.data)
    }

    async fn lookup_or_resolve(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
    ) -> FlightOutput {
        if let Some(hit) = self.cache_check(&addr) {
            return Ok((hit, Outcome::Hit));
        }
        if let Some(spilled) = self.spilled_bytes(addr).await {
            return Ok((spilled, Outcome::Hit));
        }
        // An input is covered by the reservation of the compute that uses it.
        let ((bytes, _held), outcome) = self.join_or_start(addr, depth, tracker, false).await?;
        Ok((bytes, outcome))
    }

    /// Joins the in-flight materialization of `addr`, or starts one in a new task (which skips
    /// the leaf read if `leaf_read` says the caller found no leaf already).
    fn join_or_start(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        leaf_read: bool,
    ) -> Shared<FlightFuture> {
        let mut inflight = self.inner.inflight.lock();
        if let Some(flight) = inflight.get(&addr)
            && let Some(shared) = flight.shared.upgrade()
        {
            // Show why this call waits: an event, and a link (`follows_from`, an OpenTelemetry
            // span link) to the span doing the work.
            let leader = flight.span.clone();
            drop(inflight);
            let current = Span::current();
            current.follows_from(&leader);
            tracing::info!(%addr, "joined an in-flight materialization");
            return shared;
        }
        let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let span = Span::current();
        let leader_span = span.clone();
        // The span is entered and dropped inside the task's poll, where `with_current_subscriber`
        // makes the caller's subscriber the default: tracing-subscriber closes a parent span
        // through the thread's default subscriber, so a span dropped elsewhere would keep its
        // parent open whenever the subscriber is not global (as in tests).
        let task = tokio::spawn(
            async move {
                this.resolve(addr, depth, tracker, leaf_read)
                    .instrument(span)
                    .await
            }
            .with_current_subscriber(),
        );
        let guard = FlightTask {
            task,
            addr,
            id,
            inner: Arc::downgrade(&self.inner),
        };
        let shared = guard.boxed().shared();
        let weak = shared
            .downgrade()
            .expect("a fresh Shared has not completed");
        inflight.insert(
            addr,
            Flight {
                id,
                shared: weak,
                span: leader_span,
            },
        );
        shared
    }

    /// Leaf (unless `leaf_read`: the caller found none), then recipe. Runs inside the flight's
    /// task.
    async fn resolve(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        leaf_read: bool,
    ) -> FlownOutput {
        // Noted before anything is read: an invalidation from now on keeps this output out of
        // the cache.
        let generation = self.inner.cache.generation(&addr);
        if !leaf_read {
            let read = info_span!(spans::LEAF_READ, { field::FOUND } = Empty);
            let leaf = self
                .inner
                .store
                .get_leaf(addr)
                .instrument(read.clone())
                .await;
            read.record(field::FOUND, matches!(leaf, Ok(Some(_))));
            drop(read);
            if let Some(bytes) = self.count_corruption(leaf)? {
                // Known from now on, for the budget checks of the recipes that use it.
                self.inner.budget.record(addr, bytes.len() as u64);
                return Ok(((bytes, None), Outcome::Leaf));
            }
        }
        let stored = self
            .count_corruption(self.inner.store.get_recipe(addr).await)?
            .ok_or(DerivaError::NotFound { addr })?;
        let recipe = stored.recipe;
        // Before anything is read: refuse a recipe its function does not accept (stored before
        // a bound existed, or planted in the store), and what could never fit the memory budget.
        let function = self.runnable(Some(addr), &recipe)?;
        self.check_budget(addr, &recipe, &function).await?;
        let outputs = self.inner.store.outputs();
        if let Some(outputs) = outputs
            && let Some(output) = self.read_output_tier(outputs, addr).await
        {
            self.inner.budget.record(addr, output.len() as u64);
            self.keep(addr, &output, Duration::ZERO, generation).await;
            return Ok(((output, None), Outcome::Stored));
        }
        let inputs = futures::future::try_join_all(
            recipe
                .inputs()
                .iter()
                .map(|input| self.materialize_at(*input, depth + 1, tracker.clone())),
        )
        .await?;
        let inputs: Vec<Bytes> = inputs.into_iter().map(|(bytes, _)| bytes).collect();
        // Held until the output is kept (cache or spill) and handed to the callers.
        let (output, cost, reserved) = self
            .compute(addr, &recipe, &function, inputs, false)
            .await?;
        let cached = self.keep(addr, &output, cost, generation).await;
        // Not after an invalidation that came in meanwhile: that output is what it evicted.
        if let Some(outputs) = outputs
            && self.inner.cache.generation(&addr) == generation
        {
            let write = info_span!(spans::OUTPUT_WRITE, { field::BYTES } = as_i64(output.len()));
            if let Err(e) = outputs.put(addr, output.clone()).instrument(write).await {
                // The output tier saves recomputes; losing a write costs one later.
                tracing::warn!(%addr, error = %e, "could not keep the output in the output tier");
            }
        }
        // A cached output counts against the cache's budget from now on; any other stays
        // covered while its callers hold it.
        let held = (!cached).then_some(reserved);
        Ok(((output, held), Outcome::Computed))
    }

    /// Keeps the output of `addr` for later calls: in the memory cache, or, above the spill
    /// threshold, in the spill directory (not after an invalidation since `generation`).
    /// Returns whether it went into the memory cache.
    async fn keep(&self, addr: CAddr, output: &Bytes, cost: Duration, generation: u64) -> bool {
        let spill = self.inner.config.spill.as_ref();
        if let Some(spill) = spill.filter(|_| self.spills(output.len())) {
            if self.inner.cache.generation(&addr) != generation {
                return false;
            }
            let (store, data) = (spill.store.clone(), output.clone());
            let write = info_span!(spans::SPILL_WRITE, { field::BYTES } = as_i64(output.len()));
            let written = spawn_blocking_in(write, move || store.put(addr, &data))
                .await
                .unwrap_or_else(|e| Err(DerivaError::from_join("spilling an output", e)));
            match written {
                // An invalidation that came in while it was written wins.
                Ok(_) if self.inner.cache.generation(&addr) != generation => {
                    spill.store.remove(&addr);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "could not spill an output; it will be recomputed");
                }
            }
            return false;
        }
        info_span!(spans::CACHE_PUT, { field::BYTES } = as_i64(output.len())).in_scope(|| {
            self.inner
                .cache
                .insert_if_current(addr, output.clone(), cost, generation)
                .is_some()
        })
    }

    /// What materializing the recipe `addr` is known to need in memory before anything is
    /// read: its inputs' sizes where known (recorded outputs, leaf sizes from the store) and
    /// its output's (from the function, or recorded). Refused with
    /// [`DerivaError::OverBudget`] if that alone exceeds the memory budget.
    async fn check_budget(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        function: &Arc<dyn ComputeFunction>,
    ) -> Result<()> {
        let budget = &self.inner.budget;
        let sizes = futures::future::join_all(recipe.inputs().iter().map(|input| async move {
            match budget.recorded(input) {
                Some(size) => Some(size),
                None => self.inner.store.blobs().size(*input).await.ok().flatten(),
            }
        }))
        .await;
        let known: u64 = sizes.iter().flatten().sum();
        let all: Option<Vec<u64>> = sizes.into_iter().collect();
        let output = budget
            .recorded(&addr)
            .or_else(|| function.output_size(all.as_deref()?, recipe.params()));
        budget.check(
            || format!("materializing {addr} ({})", recipe.function()),
            known.saturating_add(output.unwrap_or(0)),
        )
    }

    /// The output of `addr` from the shared output tier, if it holds one. A tier that fails
    /// is logged and skipped: the recipe is computed instead.
    async fn read_output_tier(
        &self,
        outputs: &Arc<dyn deriva_store::OutputStore>,
        addr: CAddr,
    ) -> Option<Bytes> {
        let read = info_span!(spans::OUTPUT_READ, { field::FOUND } = Empty);
        let found = outputs.get(addr).instrument(read.clone()).await;
        read.record(field::FOUND, matches!(found, Ok(Some(_))));
        match found {
            Ok(found) => found,
            Err(e) => {
                if let DerivaError::Corrupted { .. } = e {
                    self.inner.stats.record_corruption();
                }
                let _entered = read.enter();
                tracing::warn!(%addr, error = %e, "the output tier failed; computing instead");
                None
            }
        }
    }

    /// Counts a [`DerivaError::Corrupted`] found while reading `addr` itself (not one passed up
    /// from an input, which was counted where it was found).
    fn count_corruption<T>(&self, read: Result<T>) -> Result<T> {
        if let Err(DerivaError::Corrupted { .. }) = &read {
            self.inner.stats.record_corruption();
        }
        read
    }

    /// Runs `function`, the recipe's (from [`AsyncExecutor::runnable`]), on the blocking pool
    /// (and again to verify, when `force_verify` or the mode says so). Returns the output, the
    /// compute time, and the memory reservation that covers the output.
    async fn compute(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        function: &Arc<dyn ComputeFunction>,
        inputs: Vec<Bytes>,
        force_verify: bool,
    ) -> Result<(Bytes, Duration, Arc<Reservation>)> {
        let id = recipe.function();
        let inputs: Arc<[Bytes]> = inputs.into();
        let input_bytes: u64 = inputs.iter().map(|i| i.len() as u64).sum();
        let params = Arc::new(recipe.params().clone());
        // The inputs and the output (two with a verification), reserved before the function
        // runs; the output's size from the function, else the last compute's, else the inputs'.
        let verifying = force_verify || self.inner.config.verification.should_verify();
        let sizes: Vec<u64> = inputs.iter().map(|i| i.len() as u64).collect();
        let output_guess = function
            .output_size(&sizes, &params)
            .or_else(|| self.inner.budget.recorded(&addr))
            .unwrap_or(input_bytes);
        let needed =
            input_bytes.saturating_add(output_guess.saturating_mul(if verifying { 2 } else { 1 }));
        // Shared with every run's blocking closure: a run that outlives its caller (cancelled,
        // but not returned yet) keeps the bytes it still uses reserved.
        let reserved = Arc::new(
            self.inner
                .budget
                .reserve(|| format!("computing {addr} ({id})"), needed)
                .await?,
        );
        let job = Job {
            addr,
            id,
            function,
            inputs: &inputs,
            params: &params,
            reserved: &reserved,
        };
        let span = info_span!(
            spans::COMPUTE,
            { field::FUNCTION } = %id,
            { field::INPUT_BYTES } = as_i64(input_bytes),
            { field::OUTPUT_BYTES } = Empty
        );

        let (output, elapsed) = self.run_function(&job, span.clone()).await?;
        span.record(field::OUTPUT_BYTES, as_i64(output.len()));
        self.inner.budget.record(addr, output.len() as u64);
        let attrs = self.inner.metrics.function_attrs(id);
        let m = &self.inner.metrics;
        m.compute_duration.record(elapsed.as_secs_f64(), attrs);
        m.compute_input_bytes.record(input_bytes, attrs);
        m.compute_output_bytes.record(output.len() as u64, attrs);
        if elapsed >= self.inner.config.slow_compute_threshold {
            span.in_scope(|| {
                tracing::warn!(
                    function = %id,
                    %addr,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "slow compute"
                );
            });
        }

        if verifying {
            let span =
                info_span!(spans::VERIFY, { field::FUNCTION } = %id, { field::PASSED } = Empty);
            let (second, _) = self.run_function(&job, span.clone()).await?;
            let passed = second == output;
            span.record(field::PASSED, passed);
            self.inner.stats.record_verification(passed);
            if !passed {
                let (first, second) = (CAddr::for_leaf(&output), CAddr::for_leaf(&second));
                span.in_scope(|| {
                    tracing::error!(
                        function = %id,
                        %addr,
                        %first,
                        %second,
                        "determinism violation: two runs of the same recipe gave different outputs"
                    );
                });
                return Err(DerivaError::DeterminismViolation {
                    function: id.clone(),
                    addr,
                    first,
                    second,
                });
            }
        }
        Ok((output, elapsed, reserved))
    }

    /// One run of `job`'s function on the blocking pool, under a compute permit, within the
    /// compute timeout. The permit and the reservation move into the blocking closure, so a
    /// run holds them until its function returns, even when its callers have gone or it was
    /// cancelled: abandoned work never pushes the engine past `max_concurrent_computes` or
    /// the memory budget.
    ///
    /// The run's token is cancelled when the timeout passes (the answer is then
    /// [`DerivaError::DeadlineExceeded`], at once, whether or not the function has noticed)
    /// and when this future is dropped (every caller has gone).
    async fn run_function(&self, job: &Job<'_>, span: Span) -> Result<(Bytes, Duration)> {
        let (addr, id) = (job.addr, job.id);
        let permit = match self.inner.computes.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = self.inner.stats.waiting_guard();
                self.inner
                    .computes
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| DerivaError::TaskCancelled {
                        task: format!("{addr}: waiting for a compute slot"),
                    })?
            }
        };
        let run = Arc::new(Run::new(self.inner.stats.clone()));
        // Dropped with this future: on an early return, and when the task is aborted.
        let _cancel_on_drop = CancelOnDrop(run.clone());
        let ctx = ComputeContext::with_shutdown(run.token.clone(), self.inner.shutdown.clone());
        let (function, inputs, params) =
            (job.function.clone(), job.inputs.clone(), job.params.clone());
        // Made out here so that it also ends the run if the closure is dropped unrun (the
        // runtime shutting down).
        let (reserved, finished) = (job.reserved.clone(), Finished(run.clone()));
        let handle = spawn_blocking_in(span, move || {
            let _held = (finished, permit, reserved);
            let start = Instant::now();
            let out = function.compute(&ctx, &inputs, &params);
            (out, start.elapsed())
        });
        let ran = match self.inner.config.compute_timeout {
            Some(limit) => match tokio::time::timeout(limit, handle).await {
                Ok(ran) => ran,
                Err(_) => {
                    run.cancel();
                    self.inner.metrics.record_timeout(id);
                    tracing::warn!(
                        function = %id,
                        %addr,
                        timeout_secs = limit.as_secs_f64(),
                        "compute timed out; cancelled"
                    );
                    return Err(DerivaError::DeadlineExceeded {
                        function: id.clone(),
                        addr,
                        limit,
                    });
                }
            },
            None => handle.await,
        };
        match ran {
            Ok((Ok(bytes), elapsed)) => Ok((bytes, elapsed)),
            Ok((Err(e), _)) if e.is_invalid_recipe() => Err(invalid_recipe(id, Some(addr), &e)),
            Ok((Err(FunctionError::Cancelled), _)) if self.inner.shutdown.is_cancelled() => {
                Err(DerivaError::TaskCancelled {
                    task: format!("{addr}: the compute of {id}"),
                })
            }
            Ok((Err(e), _)) => Err(DerivaError::ComputeFailed {
                function: id.clone(),
                addr,
                message: e.to_string(),
            }),
            Err(join) => match join.try_into_panic() {
                Ok(payload) => Err(DerivaError::ComputeFailed {
                    function: id.clone(),
                    addr,
                    message: format!(
                        "the function panicked: {}",
                        deriva_core::error::panic_text(payload.as_ref())
                    ),
                }),
                Err(_) => Err(DerivaError::TaskCancelled {
                    task: format!("{addr}: the compute of {id}"),
                }),
            },
        }
    }

    /// Computes the recipe at `addr` twice, whatever the verification mode, and compares. The
    /// inputs are materialized as usual. A deterministic output is cached. A mismatch is a
    /// report with `deterministic: false` (and counts as a failed verification), not an error;
    /// a leaf is [`DerivaError::InvalidInput`], an unknown address [`DerivaError::NotFound`].
    pub async fn verify(&self, addr: CAddr) -> Result<VerifyReport> {
        let span = info_span!(spans::VERIFY_RECIPE, { field::ADDR } = %addr, { field::DETERMINISTIC } = Empty);
        async move {
            let generation = self.inner.cache.generation(&addr);
            let Some(stored) = self.inner.store.get_recipe(addr).await? else {
                return Err(match self.inner.store.kind_of(addr).await? {
                    Some(_) => DerivaError::InvalidInput(format!(
                        "{addr} is a leaf; only recipes can be verified"
                    )),
                    None => DerivaError::NotFound { addr },
                });
            };
            let recipe = stored.recipe;
            let function = self.runnable(Some(addr), &recipe)?;
            let tracker = Arc::new(DepthTracker::default());
            let inputs = futures::future::try_join_all(
                recipe
                    .inputs()
                    .iter()
                    .map(|input| self.materialize_at(*input, 1, tracker.clone())),
            )
            .await?;
            let inputs = inputs.into_iter().map(|(bytes, _)| bytes).collect();
            let report = match self.compute(addr, &recipe, &function, inputs, true).await {
                Ok((output, cost, _reserved)) => {
                    let hash = CAddr::for_leaf(&output);
                    let size = output.len() as u64;
                    self.keep(addr, &output, cost, generation).await;
                    VerifyReport {
                        deterministic: true,
                        output_hash: hash,
                        second_hash: hash,
                        output_size: size,
                        compute_time: cost,
                    }
                }
                Err(DerivaError::DeterminismViolation { first, second, .. }) => VerifyReport {
                    deterministic: false,
                    output_hash: first,
                    second_hash: second,
                    output_size: 0,
                    compute_time: Duration::ZERO,
                },
                Err(e) => return Err(e),
            };
            Span::current().record(field::DETERMINISTIC, report.deterministic);
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Evicts `addr` from the cache and, with `cascade`, every recipe that depends on it
    /// directly or transitively. [`DerivaError::NotFound`] if the store does not know `addr`.
    /// The same as [`AsyncExecutor::cascade_invalidate`] with [`CascadePolicy::Immediate`] and
    /// the root included.
    pub async fn invalidate(&self, addr: CAddr, cascade: bool) -> Result<InvalidateReport> {
        let report = self
            .cascade_invalidate(addr, cascade, CascadePolicy::Immediate, true)
            .await?;
        Ok(InvalidateReport {
            was_cached: report.was_cached,
            evicted: report.evicted,
        })
    }

    /// Invalidates `addr` (if `include_root`) and, with `cascade`, every recipe that depends
    /// on it directly or transitively: each is evicted from the memory cache and the spill
    /// directory of this node, from the shared output tier, and (through the store's
    /// [`deriva_store::InvalidationBus`]) from the other nodes. [`CascadePolicy::DryRun`]
    /// reports what would be evicted and changes nothing; [`CascadePolicy::None`] does
    /// nothing. [`DerivaError::NotFound`] if the store does not know `addr`.
    ///
    /// An invalidation wins over computes already running: their outputs are not kept, and
    /// the next request starts a new materialization rather than joining theirs.
    pub async fn cascade_invalidate(
        &self,
        addr: CAddr,
        cascade: bool,
        policy: CascadePolicy,
        include_root: bool,
    ) -> Result<CascadeReport> {
        let span = info_span!(
            spans::INVALIDATE,
            { field::ADDR } = %addr,
            { field::CASCADE } = cascade,
            { field::POLICY } = policy.as_str(),
            { field::EVICTED } = Empty
        );
        async move {
            let start = Instant::now();
            self.inner.stats.record_cascade(policy);
            if self.inner.store.kind_of(addr).await?.is_none() {
                return Err(DerivaError::NotFound { addr });
            }
            if policy == CascadePolicy::None {
                Span::current().record(field::EVICTED, 0i64);
                return Ok(CascadeReport::default());
            }
            let dependents = if cascade {
                self.inner
                    .store
                    .transitive_dependents_with_distance(addr)
                    .await?
            } else {
                Vec::new()
            };
            let max_depth = dependents.iter().map(|(_, d)| *d).max().unwrap_or(0);
            let mut targets: Vec<CAddr> = dependents.into_iter().map(|(a, _)| a).collect();
            if include_root {
                targets.insert(0, addr);
            }
            let mut report = CascadeReport {
                traversed: targets.len() as u64,
                max_depth,
                ..CascadeReport::default()
            };
            for target in &targets {
                let size = self.held_size(target);
                let gone = match policy {
                    CascadePolicy::DryRun => size.is_some(),
                    _ => self.forget(target),
                };
                if gone {
                    report.evicted.push(*target);
                    report.bytes_reclaimed += size.unwrap_or(0);
                    report.was_cached |= *target == addr;
                }
            }
            if policy == CascadePolicy::Immediate && !targets.is_empty() {
                // The other nodes and the shared output tier forget them too. Both are
                // remote: a failure is the call's error (the client retries), never
                // half-silent.
                if let Some(outputs) = self.inner.store.outputs() {
                    futures::future::try_join_all(targets.iter().map(|a| outputs.delete(*a)))
                        .await?;
                }
                if let Some(bus) = self.inner.store.bus() {
                    bus.publish(&targets).await?;
                }
            }
            report.duration = start.elapsed();
            Span::current().record(field::EVICTED, as_i64(report.evicted.len()));
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Collects garbage in the store (see [`deriva_store::gc`]), then drops the outputs
    /// of the removed recipes from this node's cache and spill directory, from the shared
    /// output tier and (through the bus) from the other nodes' caches, and the removed leaves
    /// from this node's cache and (through the bus) the other nodes'. So once this returns, no
    /// Get on this node serves a leaf it reports removed. In a `gc` span whose children are the
    /// store's `mark` and `sweep`; counted in `deriva_gc_*`.
    pub async fn garbage_collect(&self, options: GcOptions) -> Result<GcReport> {
        let span = info_span!(
            spans::GC,
            { field::DRY_RUN } = options.dry_run,
            { field::GRACE_SECS } = as_i64(options.grace.as_secs()),
            { field::REMOVED } = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty,
        );
        async move {
            let start = Instant::now();
            let gc = &self.inner.metrics.gc;
            let outcome = match self.inner.store.collect_garbage(&options).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    gc.record(
                        options.dry_run,
                        GcResult::Error,
                        start.elapsed().as_secs_f64(),
                        [0; 3],
                        0,
                    );
                    let span = Span::current();
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_message", tracing::field::display(&e));
                    tracing::error!(error = %e, "garbage collection failed");
                    return Err(e);
                }
            };
            let of_kind = |kind: AddrKind| -> Vec<CAddr> {
                outcome
                    .removed
                    .iter()
                    .filter(|r| r.kind == kind)
                    .map(|r| r.addr)
                    .collect()
            };
            let (recipes, leaves) = (of_kind(AddrKind::Recipe), of_kind(AddrKind::Leaf));
            let mut report = GcReport {
                dry_run: options.dry_run,
                ..GcReport::default()
            };
            for recipe in &recipes {
                let size = self.held_size(recipe);
                let dropped = if options.dry_run {
                    size.is_some()
                } else {
                    self.forget(recipe)
                };
                if dropped {
                    report.cache_entries_removed += 1;
                    report.bytes_reclaimed_cache += size.unwrap_or(0);
                }
            }
            if !options.dry_run {
                // Deleted from the store already; a read that started before the delete
                // finds the generation moved and caches nothing.
                for leaf in &leaves {
                    self.forget(leaf);
                }
            }
            if !options.dry_run && !outcome.removed.is_empty() {
                // The recipes are gone already: a tier object or another node's cached copy
                // left behind is garbage, never served wrongly (an output is a function of
                // its recipe), so a failure here is logged, not the collection's error. Another
                // node may serve a removed leaf from its cache until the bus reaches it.
                if let Some(outputs) = self.inner.store.outputs()
                    && !recipes.is_empty()
                {
                    let deletes = recipes.iter().map(|a| outputs.delete(*a));
                    if let Err(e) = futures::future::try_join_all(deletes).await {
                        tracing::warn!(error = %e, "could not delete the shared outputs of collected recipes");
                    }
                }
                let removed: Vec<CAddr> = recipes.iter().chain(&leaves).copied().collect();
                if let Some(bus) = self.inner.store.bus()
                    && let Err(e) = bus.publish(&removed).await
                {
                    tracing::warn!(error = %e, "could not tell the other nodes about collected recipes and leaves");
                }
            }
            for _ in 0..outcome.corrupted {
                self.inner.stats.record_corruption();
            }
            let result = if outcome.corrupted > 0 {
                GcResult::Corrupted
            } else {
                GcResult::Ok
            };
            report.duration = start.elapsed();
            gc.record(
                options.dry_run,
                result,
                report.duration.as_secs_f64(),
                [
                    outcome.blobs_removed,
                    outcome.recipes_removed,
                    report.cache_entries_removed,
                ],
                outcome.bytes_reclaimed + report.bytes_reclaimed_cache,
            );
            Span::current().record(field::REMOVED, as_i64(outcome.removed.len()));
            tracing::info!(
                dry_run = options.dry_run,
                blobs_removed = outcome.blobs_removed,
                recipes_removed = outcome.recipes_removed,
                outputs_removed = report.cache_entries_removed,
                bytes_reclaimed = outcome.bytes_reclaimed + report.bytes_reclaimed_cache,
                kept = outcome.kept,
                live_blobs = outcome.live_blobs,
                live_recipes = outcome.live_recipes,
                "garbage collection finished"
            );
            report.store = outcome;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// The bytes this node holds for the output of `addr`: in the memory cache or the spill
    /// directory.
    fn held_size(&self, addr: &CAddr) -> Option<u64> {
        let cached = self.inner.cache.size_of(addr);
        let spilled = self.spill().and_then(|s| s.size_of(addr));
        match (cached, spilled) {
            (None, None) => None,
            (c, s) => Some(c.unwrap_or(0) + s.unwrap_or(0)),
        }
    }

    /// Evicts `addrs` from this node's cache only, as an `Invalidate` on another node asked
    /// (through the store's [`deriva_store::InvalidationBus`]); computes running now will not
    /// cache their outputs. Returns how many were cached.
    pub fn evict_local(&self, addrs: &[CAddr]) -> usize {
        addrs.iter().filter(|a| self.forget(a)).count()
    }

    /// Evicts everything from this node's cache and detaches every in-flight
    /// materialization: after a node may have missed invalidations from the others (its
    /// subscription to them was down). Returns how many entries were cached.
    pub fn evict_all_local(&self) -> usize {
        self.inner.inflight.lock().clear();
        let cached = self.inner.cache.invalidate_all();
        let spilled = self.spill().map_or(0, |s| s.clear());
        cached + spilled
    }

    /// Invalidates `addr` in the cache and detaches its in-flight materialization, if any, so
    /// that later requests start afresh. Returns whether it was cached.
    fn forget(&self, addr: &CAddr) -> bool {
        self.inner.inflight.lock().remove(addr);
        // The generation moves first: a compute finishing now keeps its output nowhere.
        let cached = self.inner.cache.invalidate(addr);
        // Removing a spilled file is one unlink, short enough for the caller's thread.
        let spilled = self.spill().is_some_and(|s| s.remove(addr));
        cached || spilled
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

/// What one compute runs: the function, on these inputs and params, for the recipe `addr`,
/// under `reserved`.
struct Job<'a> {
    addr: CAddr,
    id: &'a FunctionId,
    function: &'a Arc<dyn ComputeFunction>,
    inputs: &'a Arc<[Bytes]>,
    params: &'a Arc<deriva_core::Params>,
    reserved: &'a Arc<Reservation>,
}

/// One run of a function on the blocking pool, as the task awaiting it and the blocking closure
/// both see it: its token, and whether it was cancelled while running (counted in
/// `deriva_compute_cancelled_running` until the function returns).
struct Run {
    token: CancelToken,
    state: std::sync::atomic::AtomicU8,
    stats: Arc<ExecStats>,
}

impl Run {
    const RUNNING: u8 = 0;
    const CANCELLED: u8 = 1;
    const RETURNED: u8 = 2;

    fn new(stats: Arc<ExecStats>) -> Self {
        Self {
            token: CancelToken::new(),
            state: Self::RUNNING.into(),
            stats,
        }
    }

    /// Asks the function to stop; until it returns, it counts as cancelled and running.
    fn cancel(&self) {
        self.token.cancel();
        if self
            .state
            .compare_exchange(
                Self::RUNNING,
                Self::CANCELLED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.stats.cancelled_running_add(1);
        }
    }

    /// The function has returned (or panicked).
    fn returned(&self) {
        if self.state.swap(Self::RETURNED, Ordering::AcqRel) == Self::CANCELLED {
            self.stats.cancelled_running_add(-1);
        }
    }
}

/// Cancels its run when dropped: the task awaiting the run ended, so nobody wants its output
/// (after the function returned, a no-op).
struct CancelOnDrop(Arc<Run>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Marks its run returned when dropped: at the end of the blocking closure (a panic included),
/// or with the closure if it never ran.
struct Finished(Arc<Run>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.returned();
    }
}

/// The task of one shared materialization. Dropped when the last waiter leaves: it then aborts
/// the task (a no-op if it finished) and removes its in-flight entry.
struct FlightTask {
    task: JoinHandle<FlownOutput>,
    addr: CAddr,
    id: u64,
    inner: std::sync::Weak<Inner>,
}

impl Future for FlightTask {
    type Output = FlownOutput;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FlownOutput> {
        let addr = self.addr;
        Pin::new(&mut self.task).poll(cx).map(|joined| {
            joined
                .unwrap_or_else(|e| Err(DerivaError::from_join(format!("materializing {addr}"), e)))
        })
    }
}

impl Drop for FlightTask {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(inner) = self.inner.upgrade() {
            let mut inflight = inner.inflight.lock();
            if inflight.get(&self.addr).is_some_and(|f| f.id == self.id) {
                inflight.remove(&self.addr);
            }
        }
    }
}
