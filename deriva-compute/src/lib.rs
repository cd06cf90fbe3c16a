//! # deriva-compute
//!
//! Deriva's compute side: the functions, the cache of their outputs, and the engine that
//! materializes any address.
//!
//! - [`function`]: the [`ComputeFunction`] trait, the [`ComputeContext`] a compute runs in
//!   (with its [`CancelToken`]), and the [`FunctionRegistry`]; [`builtins`] holds the builtin
//!   functions (`concat/v1`, `gzip/v1`, …) and their bounds.
//! - [`memory_cache`]: [`Cache`], the memory cache of computed outputs and hot small leaves,
//!   byte-budgeted and cost-aware, with lock-free stats.
//! - [`spill`]: [`spill::SpillStore`], the local directory that holds outputs too large for
//!   the cache, with its own byte budget; Gets stream them from there.
//! - [`budget`]: [`MemoryBudget`], the bound on the bytes computes hold at once.
//! - [`executor`]: [`AsyncExecutor`], which materializes addresses, invalidates, and verifies
//!   determinism. Its modules, in the order a Get goes through them: the read path (cache,
//!   spill, leaf), single-flight, compute (budget, permit, verify); beside them its config and
//!   maintenance (invalidation, GC).
//! - [`metrics`]: [`ComputeMetrics`], this crate's OpenTelemetry instruments.
//! - `testing` (feature `test-util`, for tests only): `Gate`, a compute function that holds its
//!   calls until the test opens it, so tests wait for events rather than sleep.
//!
//! ## Computes that cannot run away
//!
//! A function's [`ComputeFunction::validate`] bounds what its params can make it do, when the
//! recipe is stored and again before every compute (so a recipe planted in the store with
//! params over a bound is refused with [`deriva_core::DerivaError::InvalidInput`], not run).
//! While it runs, a compute can be cancelled: its [`ComputeContext`] is cancelled when it runs
//! longer than [`ExecutorConfig::compute_timeout`] (its callers get
//! [`deriva_core::DerivaError::DeadlineExceeded`] at once), when every caller of it has gone,
//! and for every compute by [`AsyncExecutor::cancel_computes`] (the server's shutdown, once the
//! grace period is over). Cancellation is cooperative, since a thread cannot be killed: the
//! builtins look at their context every 64 KiB of work and return; a registered function gets
//! the same context and should do the same. One that ignores it runs on, keeping its compute
//! slot and its memory reservation until it returns (`deriva_compute_cancelled_running`
//! counts it), so abandoned work never pushes the engine past its limits.
//!
//! This crate only *emits* telemetry: `tracing` spans and events, and OpenTelemetry
//! instruments built from a `Meter` it is given. Installing subscribers, providers and
//! exporters is the server binary's job.
//!
//! ## Spans
//!
//! Their names are the constants of [`spans`] (defined in `deriva_core::spans`, so the
//! `deriva` client, which links no engine, renders the same names).
//!
//! | span | fields | parent |
//! |---|---|---|
//! | `materialize` | `addr`, `depth` (0 for the requested address, +1 per input level), `result`; on a hit of a computed output its origin: `deriva.origin.node`, `deriva.origin.age_seconds`, `deriva.origin.duration_seconds`, `deriva.origin.trace_id`, `deriva.origin.span_id` (and a span link to that compute) | the caller's span, or the parent `materialize` for an input |
//! | `cache_check` | `hit` | `materialize` |
//! | `leaf_read` | `found` | `materialize` |
//! | `compute` | `function`, `input_bytes`, `output_bytes` | `materialize` |
//! | `verify` | `function`, `passed` | `materialize` |
//! | `cache_put` | `bytes` | `materialize` |
//! | `spill_write` | `bytes` | `materialize` (an output above the spill threshold) |
//! | `invalidate` | `addr`, `cascade`, `policy`, `evicted` | the caller's span |
//! | `verify_recipe` | `addr`, `deterministic` | the caller's span (an explicit verification) |
//! | `audit` | `addr`, `function`, `result` (`match`, `mismatch`, `error`) | none: a trace of its own, linked to the compute it checks (`--audit-sample-ratio`) |
//!
//! Below these, in a sampled trace, each call the store makes to its backend is a client span
//! of `deriva_store::observe`: `object_store` and `index_db` (PostgreSQL) on the remote
//! backend, `index_db` (redb) and `leaf_file` on the local one; a `leaf_read` of a leaf that
//! is a file, for one, has a redb read of the small-leaf table and a `leaf_file` read.
//!
//! A Get of a leaf held by the cache is traced and counted as a cache hit of an output is:
//! `materialize` (`result` = `hit`) with one child, `cache_check` (`hit` = true), and no
//! `leaf_read`. The Get that caches a leaf has `leaf_read` (`found` = true), then `cache_put`.
//!
//! A compute slower than 1 s (configurable) logs a WARN; a determinism violation logs an ERROR
//! naming the function. A call that joins another call's in-flight materialization logs an INFO
//! event and `follows_from` the computing span, which the OpenTelemetry layer exports as a span
//! link.
//!
//! ## Metric families
//!
//! Through the OpenTelemetry → Prometheus bridge these instruments appear as:
//!
//! | family | type | labels | buckets / meaning |
//! |---|---|---|---|
//! | `deriva_materialize_total` | counter | `result` = `hit`, `leaf`, `computed`, `error` | materialize calls (every level of a tree counts); `hit` includes leaves served from the cache, `leaf` counts reads of the leaf store; `computed` includes calls that joined a concurrent compute |
//! | `deriva_materialize_duration_seconds` | histogram | – | 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30 |
//! | `deriva_materialize_active` | gauge | – | materialize calls in progress |
//! | `deriva_materialize_depth` | histogram | – | 0, 1, 2, 3, 5, 8, 13, 21, 50, 100, 1000; deepest level a top-level call descended to |
//! | `deriva_cache_hit_total` | counter | – | cache lookups that hit (an output or a leaf) |
//! | `deriva_cache_miss_total` | counter | – | cache lookups that missed |
//! | `deriva_cache_total` | counter | `result` = `hit`, `miss` | the same lookups, labelled, for ratio queries |
//! | `deriva_cache_eviction_total` | counter | – | entries (outputs or leaves) evicted to stay within budget |
//! | `deriva_cache_size_bytes` | gauge | – | bytes cached, outputs and leaves |
//! | `deriva_cache_entries` | gauge | – | entries cached, outputs and leaves |
//! | `deriva_cache_hit_rate` | gauge | – | hits / lookups since start (0–1); use `deriva_cache_total` for windowed rates |
//! | `deriva_cache_saved_seconds_total` | counter | – | compute time avoided: the recorded compute cost of every output served from the cache (leaf hits save a read, not a compute) |
//! | `deriva_cache_leaf_hit_total` | counter | – | the cache hits that found a leaf (part of `deriva_cache_hit_total`) |
//! | `deriva_cache_leaf_size_bytes` | gauge | – | bytes of leaves cached (part of `deriva_cache_size_bytes`; outputs hold the rest) |
//! | `deriva_cache_leaf_entries` | gauge | – | leaves cached (part of `deriva_cache_entries`) |
//! | `deriva_compute_duration_seconds` | histogram | `function` | 0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1, 5 |
//! | `deriva_compute_input_bytes` | histogram | `function` | 64 B, 1 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB, 4 MiB, 16 MiB, 64 MiB, 256 MiB, 1 GiB |
//! | `deriva_compute_output_bytes` | histogram | `function` | as input bytes |
//! | `deriva_compute_timeouts_total` | counter | `function` | computes stopped by [`ExecutorConfig::compute_timeout`] |
//! | `deriva_compute_cancelled_running` | gauge | – | computes cancelled (timed out, or every caller gone) whose function has not returned yet; each still holds its compute slot and memory |
//! | `deriva_compute_lease_acquired_total`, `deriva_compute_lease_joined_total`, `deriva_compute_lease_expired_total` | counter | – | compute leases ([`deriva_store::ComputeLeases`], with an output tier) taken; materializations that waited on another node's lease instead of computing; leases taken over from a holder that let them expire |
//! | `deriva_storage_corruption_total` | counter | – | stored leaves or recipes found corrupted when read (answered `DATA_LOSS`, never served or cached); each detection counts |
//! | `deriva_verification_total` | counter | `result` = `pass`, `fail` | verifications |
//! | `deriva_verification_failure_rate` | gauge | – | failed / all verifications since start (0–1) |
//! | `deriva_invalidation_total` | counter | `policy` = `immediate`, `dry_run`, `none` | invalidations (plain or cascading) by policy |
//! | `deriva_memory_budget_bytes`, `deriva_memory_inflight_bytes`, `deriva_memory_waiting` | gauge | – | the memory budget, the bytes reserved now, the requests waiting for room |
//! | `deriva_memory_waits_total`, `deriva_memory_rejections_total` | counter | – | requests that waited; requests refused (`RESOURCE_EXHAUSTED`) |
//! | `deriva_spill_budget_bytes`, `deriva_spill_size_bytes`, `deriva_spill_entries` | gauge | – | the spill directory's budget, bytes and entries (with a spill directory) |
//! | `deriva_spill_write_total`, `deriva_spill_hit_total`, `deriva_spill_eviction_total` | counter | – | outputs spilled, read back, evicted |
//!
//! `function` only ever holds a registered function id (`concat/v1`), so it stays bounded.
//! Counters and state gauges are observable instruments read from atomics at collection time;
//! only the histograms are recorded on the hot path.

pub mod budget;
pub mod builtins;
pub mod executor;
pub mod function;
pub mod memory_cache;
pub mod metrics;
pub mod spill;
#[cfg(feature = "test-util")]
pub mod testing;

/// Span and field names: [`deriva_core::spans`], re-exported where the spans are emitted.
pub use deriva_core::spans;

pub use budget::{BudgetConfig, MemoryBudget};
pub use deriva_store::gc::GcOptions;
pub use executor::{
    AsyncExecutor, AuditConfig, COMPUTE_TIMEOUT, CascadePolicy, CascadeReport, Described,
    ExecutorConfig, GcReport, InvalidateReport, LEAF_CACHE_MAX_BYTES, OnMismatch,
    PROVENANCE_MAX_ENTRIES, ProvenanceEntry, ProvenanceTree, RecordSigner, TraceLinks,
    VerificationMode, VerifyReport,
};
pub use function::{CancelToken, ComputeContext, ComputeFunction, FunctionError, FunctionRegistry};
pub use memory_cache::{Cache, CacheHit, CacheStats, EntryKind as CacheKind};
pub use metrics::{ComputeMetrics, ExecStats, GcResult, Outcome};
