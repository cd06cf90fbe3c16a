//! [`ComputeMetrics`]: every OpenTelemetry instrument of this crate, built once from a `Meter`.
//!
//! Counters and gauges that mirror state are *observable* instruments whose callbacks read the
//! atomics in [`CacheStats`] and [`ExecStats`] at collection time, so the hot path pays one
//! relaxed atomic add instead of an SDK call. Only the histograms are recorded per operation,
//! with attribute sets built once per registered function.
//!
//! See the crate docs for the resulting Prometheus families.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use deriva_core::FunctionId;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    AsyncInstrument, Counter, Histogram, Meter, ObservableCounter, ObservableGauge,
};

use crate::budget::MemoryBudget;
use crate::executor::CascadePolicy;
use crate::memory_cache::CacheStats;
use crate::spill::SpillStore;

/// Buckets of `deriva_materialize_duration_seconds` (listed in README.md, "Metrics reference").
pub const MATERIALIZE_DURATION_BUCKETS: [f64; 8] = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
/// Buckets of `deriva_compute_duration_seconds` (listed in README.md, "Metrics reference").
pub const COMPUTE_DURATION_BUCKETS: [f64; 8] = [0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
/// Buckets of `deriva_materialize_depth`: recursion levels.
pub const DEPTH_BUCKETS: [f64; 11] = [
    0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 50.0, 100.0, 1000.0,
];
/// Buckets of `deriva_compute_input_bytes` and `deriva_compute_output_bytes`: 64 B to 1 GiB.
pub const BYTES_BUCKETS: [f64; 11] = [
    64.0,
    1024.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// How one materialize call ended; the `result` label of `deriva_materialize_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Read from the leaf store.
    Leaf,
    /// Computed from its recipe (by this call, or by a concurrent call it joined).
    Computed,
    /// Failed.
    Error,
    /// Read from the shared output tier (`--output-tier blob-store`): computed before, by this
    /// node or another.
    Stored,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Hit,
        Outcome::Leaf,
        Outcome::Computed,
        Outcome::Error,
        Outcome::Stored,
    ];

    /// The label value: `hit`, `leaf`, `computed`, `error` or `stored`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Leaf => "leaf",
            Outcome::Computed => "computed",
            Outcome::Error => "error",
            Outcome::Stored => "stored",
        }
    }
}

/// Live executor counters, read by `Status` and by the metrics callbacks.
#[derive(Debug, Default)]
pub struct ExecStats {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    saved_nanos: AtomicU64,
    corruptions: AtomicU64,
    active: AtomicI64,
    waiting: AtomicI64,
    verify_pass: AtomicU64,
    verify_fail: AtomicU64,
    cascades: [AtomicU64; CascadePolicy::ALL.len()],
    timeouts: AtomicU64,
    cancelled_running: AtomicI64,
}

impl ExecStats {
    /// Materialize calls that ended with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Compute time that cache hits avoided: the sum of the recorded compute cost of every
    /// entry served from the cache.
    pub fn saved(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.saved_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn record_saved(&self, cost: std::time::Duration) {
        let nanos = u64::try_from(cost.as_nanos()).unwrap_or(u64::MAX);
        self.saved_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Stored leaves or recipes found corrupted when read (each detection counts).
    pub fn corruptions(&self) -> u64 {
        self.corruptions.load(Ordering::Relaxed)
    }

    pub(crate) fn record_corruption(&self) {
        self.corruptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Materialize calls in progress now (every level of a recipe tree counts).
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Computes waiting for a compute permit now (all permits were taken when they asked).
    pub fn computes_waiting(&self) -> i64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Computes stopped by the compute timeout, since start.
    pub fn compute_timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// Computes cancelled (timed out, or every caller gone) whose function has not returned
    /// yet: each still holds its compute slot, its memory reservation and its thread.
    pub fn computes_cancelled_running(&self) -> i64 {
        self.cancelled_running.load(Ordering::Relaxed)
    }

    pub(crate) fn cancelled_running_add(&self, n: i64) {
        self.cancelled_running.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one compute as waiting for a permit until the guard drops.
    pub(crate) fn waiting_guard(self: &Arc<Self>) -> WaitingGuard {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(self.clone())
    }

    /// Counts one materialization as active until the guard drops, even on error or
    /// cancellation.
    pub(crate) fn active_guard(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Verifications whose two runs agreed.
    pub fn verifications_passed(&self) -> u64 {
        self.verify_pass.load(Ordering::Relaxed)
    }

    /// Verifications whose two runs disagreed.
    pub fn verifications_failed(&self) -> u64 {
        self.verify_fail.load(Ordering::Relaxed)
    }

    /// `failed / (passed + failed)` since start; 0 before the first verification.
    pub fn verification_failure_rate(&self) -> f64 {
        let (p, f) = (self.verifications_passed(), self.verifications_failed());
        if p + f == 0 {
            0.0
        } else {
            f as f64 / (p + f) as f64
        }
    }

    /// Invalidations (plain or cascading) asked with `policy`.
    pub fn cascades(&self, policy: CascadePolicy) -> u64 {
        self.cascades[policy as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn record_cascade(&self, policy: CascadePolicy) {
        self.cascades[policy as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_verification(&self, passed: bool) {
        let counter = if passed {
            &self.verify_pass
        } else {
            &self.verify_fail
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Decrements the active count when dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<ExecStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An observable counter's callback: reads the stats and observes one value per attribute set.
type Reading = Box<dyn Fn(&CacheStats, &ExecStats, &dyn AsyncInstrument<u64>) + Send + Sync>;

/// The instruments of deriva-compute.
#[derive(Debug)]
pub struct ComputeMetrics {
    pub(crate) materialize_duration: Histogram<f64>,
    pub(crate) materialize_depth: Histogram<u64>,
    pub(crate) compute_duration: Histogram<f64>,
    pub(crate) compute_input_bytes: Histogram<u64>,
    pub(crate) compute_output_bytes: Histogram<u64>,
    compute_timeouts: Counter<u64>,
    /// Compute leases taken (shared output tier): `deriva_compute_lease_acquired_total`.
    pub(crate) lease_acquired: Counter<u64>,
    /// Flights that waited on another node's lease: `deriva_compute_lease_joined_total`.
    pub(crate) lease_joined: Counter<u64>,
    /// Leases taken over from a holder that let them expire:
    /// `deriva_compute_lease_expired_total`.
    pub(crate) lease_expired: Counter<u64>,
    /// Audits (sampled recomputations of hits, and `Verify`): `deriva_audit_total`.
    pub(crate) audits: Counter<u64>,
    exec: Arc<ExecStats>,
    /// `function=<id>` per registered function, built once.
    function_attrs: HashMap<FunctionId, [KeyValue; 1]>,
    // Observable instruments live as long as the provider; the handles are kept for clarity.
    _counters: Vec<ObservableCounter<u64>>,
    _gauges_u64: Vec<ObservableGauge<u64>>,
    _gauges_f64: Vec<ObservableGauge<f64>>,
    _gauge_active: ObservableGauge<i64>,
    _gauge_cancelled_running: ObservableGauge<i64>,
    _saved: ObservableCounter<f64>,
    _memory: Vec<ObservableGauge<u64>>,
    _memory_counters: Vec<ObservableCounter<u64>>,
    pub(crate) gc: GcMetrics,
}

/// Bucket boundaries of `deriva_gc_duration_seconds`.
pub const GC_DURATION_BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// How a garbage collection ended, the `result` label of `deriva_gc_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcResult {
    /// It finished and found nothing wrong.
    Ok,
    /// It finished, and found stored recipes that do not decode.
    Corrupted,
    /// It failed (a backend error); some items may have been removed.
    Error,
}

impl GcResult {
    /// Every result, in label order.
    pub const ALL: [GcResult; 3] = [Self::Ok, Self::Corrupted, Self::Error];

    /// The label: `ok`, `corrupted` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Corrupted => "corrupted",
            Self::Error => "error",
        }
    }
}

/// The instruments of garbage collection (`deriva_gc_*`).
#[derive(Debug)]
pub(crate) struct GcMetrics {
    runs: Counter<u64>,
    removed: Counter<u64>,
    reclaimed: Counter<u64>,
    duration: Histogram<f64>,
}

impl GcMetrics {
    fn new(meter: &Meter) -> Self {
        let gc = Self {
            runs: meter
                .u64_counter("deriva.gc.runs")
                .with_description("Garbage collections by mode (collect or dry_run) and result (ok, corrupted: finished but found recipes that do not decode, error)")
                .build(),
            removed: meter
                .u64_counter("deriva.gc.removed")
                .with_description("Items garbage collection removed, by kind: leaf, recipe, or output (a cached or spilled output of a removed recipe)")
                .build(),
            reclaimed: meter
                .u64_counter("deriva.gc.reclaimed")
                .with_unit("By")
                .with_description("Bytes garbage collection freed: removed leaves, and the cached and spilled outputs of removed recipes")
                .build(),
            duration: meter
                .f64_histogram("deriva.gc.duration")
                .with_unit("s")
                .with_description("Time of one garbage collection, mark and sweep")
                .with_boundaries(GC_DURATION_BUCKETS.to_vec())
                .build(),
        };
        // Every series exists from the start, at zero, so rates and alerts see the first run.
        for mode in ["collect", "dry_run"] {
            for result in GcResult::ALL {
                gc.runs.add(
                    0,
                    &[
                        KeyValue::new("mode", mode),
                        KeyValue::new("result", result.as_str()),
                    ],
                );
            }
        }
        for kind in ["leaf", "recipe", "output"] {
            gc.removed.add(0, &[KeyValue::new("kind", kind)]);
        }
        gc.reclaimed.add(0, &[]);
        gc
    }

    /// Records one garbage collection.
    pub(crate) fn record(
        &self,
        dry_run: bool,
        result: GcResult,
        seconds: f64,
        removed: [u64; 3],
        reclaimed: u64,
    ) {
        let mode = if dry_run { "dry_run" } else { "collect" };
        self.runs.add(
            1,
            &[
                KeyValue::new("mode", mode),
                KeyValue::new("result", result.as_str()),
            ],
        );
        self.duration
            .record(seconds, &[KeyValue::new("mode", mode)]);
        if !dry_run {
            for (kind, n) in ["leaf", "recipe", "output"].into_iter().zip(removed) {
                self.removed.add(n, &[KeyValue::new("kind", kind)]);
            }
            self.reclaimed.add(reclaimed, &[]);
        }
    }
}

impl ComputeMetrics {
    /// Builds every instrument from `meter`, with callbacks over `cache` and `exec`, and the
    /// `function` attribute set for each of `functions`.
    pub fn new(
        meter: &Meter,
        cache: Arc<CacheStats>,
        exec: Arc<ExecStats>,
        functions: impl IntoIterator<Item = FunctionId>,
    ) -> Self {
        let function_attrs: HashMap<FunctionId, [KeyValue; 1]> = functions
            .into_iter()
            .map(|f| {
                let kv = [KeyValue::new("function", f.to_string())];
                (f, kv)
            })
            .collect();

        let counter = |name: &'static str, desc: &'static str, read: Reading| {
            let (cache, exec) = (cache.clone(), exec.clone());
            meter
                .u64_observable_counter(name)
                .with_description(desc)
                .with_callback(move |o| read(&cache, &exec, o))
                .build()
        };
        let [hit, miss, pass, fail] =
            ["hit", "miss", "pass", "fail"].map(|r| [KeyValue::new("result", r)]);
        let outcomes = Outcome::ALL.map(|o| [KeyValue::new("result", o.as_str())]);
        let policies = CascadePolicy::ALL.map(|p| [KeyValue::new("policy", p.as_str())]);
        let counters = vec![
            counter(
                "deriva.materialize",
                "Materialize calls by result: hit (cache: an output or a leaf), leaf (leaf store), computed (from the recipe), error",
                Box::new(move |_, e, o| {
                    for (outcome, attrs) in Outcome::ALL.iter().zip(&outcomes) {
                        o.observe(e.outcome(*outcome), attrs);
                    }
                }),
            ),
            counter(
                "deriva.cache.hit",
                "Cache lookups that found the address",
                Box::new(|c, _, o| o.observe(c.hits(), &[])),
            ),
            counter(
                "deriva.cache.miss",
                "Cache lookups that did not find the address",
                Box::new(|c, _, o| o.observe(c.misses(), &[])),
            ),
            counter(
                "deriva.cache",
                "Cache lookups by result (hit or miss)",
                Box::new(move |c, _, o| {
                    o.observe(c.hits(), &hit);
                    o.observe(c.misses(), &miss);
                }),
            ),
            counter(
                "deriva.cache.leaf.hit",
                "Cache lookups that found a leaf (counted in deriva.cache.hit too)",
                Box::new(|c, _, o| o.observe(c.leaf_hits(), &[])),
            ),
            counter(
                "deriva.cache.eviction",
                "Cache entries evicted to stay within the byte budget",
                Box::new(|c, _, o| o.observe(c.evictions(), &[])),
            ),
            counter(
                "deriva.invalidation",
                "Invalidate and CascadeInvalidate calls by policy: immediate, dry_run or none",
                Box::new(move |_, e, o| {
                    for (policy, attrs) in CascadePolicy::ALL.iter().zip(&policies) {
                        o.observe(e.cascades(*policy), attrs);
                    }
                }),
            ),
            counter(
                "deriva.storage.corruption",
                "Stored leaves or recipes whose bytes no longer match their address, found when read (answered DATA_LOSS, never served)",
                Box::new(|_, e, o| o.observe(e.corruptions(), &[])),
            ),
            counter(
                "deriva.verification",
                "Verifications (a second compute compared with the first) by result: pass or fail",
                Box::new(move |_, e, o| {
                    o.observe(e.verifications_passed(), &pass);
                    o.observe(e.verifications_failed(), &fail);
                }),
            ),
        ];

        let c = cache.clone();
        let size = meter
            .u64_observable_gauge("deriva.cache.size")
            .with_unit("By")
            .with_description("Bytes held by the cache: outputs and leaves")
            .with_callback(move |o| o.observe(c.size_bytes(), &[]))
            .build();
        let c = cache.clone();
        let entries = meter
            .u64_observable_gauge("deriva.cache.entries")
            .with_description("Entries held by the cache: outputs and leaves")
            .with_callback(move |o| o.observe(c.entries(), &[]))
            .build();
        let c = cache.clone();
        let leaf_size = meter
            .u64_observable_gauge("deriva.cache.leaf.size")
            .with_unit("By")
            .with_description("Bytes held by the cache for leaves (part of deriva.cache.size)")
            .with_callback(move |o| o.observe(c.leaf_size_bytes(), &[]))
            .build();
        let c = cache.clone();
        let leaf_entries = meter
            .u64_observable_gauge("deriva.cache.leaf.entries")
            .with_description("Leaves held by the cache (part of deriva.cache.entries)")
            .with_callback(move |o| o.observe(c.leaf_entries(), &[]))
            .build();
        let c = cache.clone();
        let hit_rate = meter
            .f64_observable_gauge("deriva.cache.hit_rate")
            .with_description("Cache hits / lookups since the process started (0 to 1)")
            .with_callback(move |o| o.observe(c.hit_rate(), &[]))
            .build();
        let e = exec.clone();
        let failure_rate = meter
            .f64_observable_gauge("deriva.verification.failure_rate")
            .with_description("Failed / all verifications since the process started (0 to 1)")
            .with_callback(move |o| o.observe(e.verification_failure_rate(), &[]))
            .build();
        let e = exec.clone();
        let active = meter
            .i64_observable_gauge("deriva.materialize.active")
            .with_description("Materialize calls in progress (every level of a recipe tree counts)")
            .with_callback(move |o| o.observe(e.active(), &[]))
            .build();

        let e = exec.clone();
        let cancelled_running = meter
            .i64_observable_gauge("deriva.compute.cancelled_running")
            .with_description("Computes cancelled (past --compute-timeout-secs, or every caller gone) whose function has not returned yet; each holds its compute slot and its memory until it does")
            .with_callback(move |o| o.observe(e.computes_cancelled_running(), &[]))
            .build();

        let compute_timeouts = meter
            .u64_counter("deriva.compute.timeouts")
            .with_description("Computes that ran longer than --compute-timeout-secs and were cancelled (their callers got DEADLINE_EXCEEDED), by function")
            .build();
        // Every series exists from the start, at zero, so rates and alerts see the first one.
        for attrs in function_attrs.values() {
            compute_timeouts.add(0, attrs);
        }

        let lease_counter = |name: &'static str, desc: &'static str| {
            let counter = meter.u64_counter(name).with_description(desc).build();
            counter.add(0, &[]);
            counter
        };
        let lease_acquired = lease_counter(
            "deriva.compute.lease.acquired",
            "Compute leases this node took (with the output tier): it computed the recipe for the nodes that share the tier",
        );
        let lease_joined = lease_counter(
            "deriva.compute.lease.joined",
            "Materializations that waited for another node's compute lease instead of computing, then read the output from the output tier",
        );
        let lease_expired = lease_counter(
            "deriva.compute.lease.expired",
            "Compute leases this node took over because their holder let them expire (it died or stalled)",
        );

        let audits = meter
            .u64_counter("deriva.audit")
            .with_description("Recomputations of stored outputs compared with their records (sampled hits with --audit-sample-ratio, and Verify), by function and result (match, mismatch, error)")
            .build();
        for id in function_attrs.keys() {
            for result in ["match", "mismatch", "error"] {
                audits.add(0, &audit_attrs(id, result));
            }
        }

        let e = exec.clone();
        let saved = meter
            .f64_observable_counter("deriva.cache.saved")
            .with_unit("s")
            .with_description("Compute time avoided by cache hits: the recorded compute cost of each output served from the cache")
            .with_callback(move |o| o.observe(e.saved().as_secs_f64(), &[]))
            .build();

        Self {
            materialize_duration: meter
                .f64_histogram("deriva.materialize.duration")
                .with_unit("s")
                .with_description("Time of one materialize call, from cache check to result")
                .with_boundaries(MATERIALIZE_DURATION_BUCKETS.to_vec())
                .build(),
            materialize_depth: meter
                .u64_histogram("deriva.materialize.depth")
                .with_description("Deepest recipe level a top-level materialize had to descend to (0: served at the top)")
                .with_boundaries(DEPTH_BUCKETS.to_vec())
                .build(),
            compute_duration: meter
                .f64_histogram("deriva.compute.duration")
                .with_unit("s")
                .with_description("Time of one compute function run, by function")
                .with_boundaries(COMPUTE_DURATION_BUCKETS.to_vec())
                .build(),
            compute_input_bytes: meter
                .u64_histogram("deriva.compute.input")
                .with_unit("By")
                .with_description("Total input bytes of one compute, by function")
                .with_boundaries(BYTES_BUCKETS.to_vec())
                .build(),
            compute_output_bytes: meter
                .u64_histogram("deriva.compute.output")
                .with_unit("By")
                .with_description("Output bytes of one compute, by function")
                .with_boundaries(BYTES_BUCKETS.to_vec())
                .build(),
            compute_timeouts,
            lease_acquired,
            lease_joined,
            lease_expired,
            audits,
            exec,
            function_attrs,
            _counters: counters,
            _gauges_u64: vec![size, entries, leaf_size, leaf_entries],
            _gauges_f64: vec![hit_rate, failure_rate],
            _gauge_active: active,
            _gauge_cancelled_running: cancelled_running,
            _saved: saved,
            _memory: Vec::new(),
            _memory_counters: Vec::new(),
            gc: GcMetrics::new(meter),
        }
    }

    /// Adds the instruments of the memory budget and, if outputs are spilled, of the spill
    /// directory: `deriva_memory_*` and `deriva_spill_*`.
    pub fn observe_memory(
        &mut self,
        meter: &Meter,
        budget: Arc<MemoryBudget>,
        spill: Option<Arc<SpillStore>>,
    ) {
        type Read<T> = Box<dyn Fn(&T) -> u64 + Send + Sync>;
        fn gauge<T: Send + Sync + 'static>(
            meter: &Meter,
            of: &Arc<T>,
            name: &'static str,
            bytes: bool,
            desc: &'static str,
            read: Read<T>,
        ) -> ObservableGauge<u64> {
            let of = of.clone();
            let builder = meter
                .u64_observable_gauge(name)
                .with_description(desc)
                .with_callback(move |o| o.observe(read(&of), &[]));
            if bytes {
                builder.with_unit("By").build()
            } else {
                builder.build()
            }
        }
        fn counter<T: Send + Sync + 'static>(
            meter: &Meter,
            of: &Arc<T>,
            name: &'static str,
            desc: &'static str,
            read: Read<T>,
        ) -> ObservableCounter<u64> {
            let of = of.clone();
            meter
                .u64_observable_counter(name)
                .with_description(desc)
                .with_callback(move |o| o.observe(read(&of), &[]))
                .build()
        }
        let m = meter;
        self._memory = vec![
            gauge(
                m,
                &budget,
                "deriva.memory.budget",
                true,
                "The memory budget of materializations (--memory-budget)",
                Box::new(|b| b.bytes()),
            ),
            gauge(
                m,
                &budget,
                "deriva.memory.inflight",
                true,
                "Bytes reserved now by materializations: their inputs and outputs",
                Box::new(|b| b.stats().inflight_bytes()),
            ),
            gauge(
                m,
                &budget,
                "deriva.memory.waiting",
                false,
                "Requests waiting now for room in the memory budget",
                Box::new(|b| b.stats().waiting()),
            ),
        ];
        self._memory_counters = vec![
            counter(
                m,
                &budget,
                "deriva.memory.waits",
                "Requests that waited for room in the memory budget",
                Box::new(|b| b.stats().waits()),
            ),
            counter(
                m,
                &budget,
                "deriva.memory.rejections",
                "Requests refused with RESOURCE_EXHAUSTED: larger than the memory budget, the wait queue full, or no room in time",
                Box::new(|b| b.stats().rejections()),
            ),
        ];
        if let Some(spill) = spill {
            self._memory.extend([
                gauge(
                    m,
                    &spill,
                    "deriva.spill.budget",
                    true,
                    "The byte budget of the spill directory (--spill-budget)",
                    Box::new(|s| s.budget()),
                ),
                gauge(
                    m,
                    &spill,
                    "deriva.spill.size",
                    true,
                    "Bytes of outputs held in the spill directory",
                    Box::new(|s| s.stats().bytes()),
                ),
                gauge(
                    m,
                    &spill,
                    "deriva.spill.entries",
                    false,
                    "Outputs held in the spill directory",
                    Box::new(|s| s.stats().entries()),
                ),
            ]);
            self._memory_counters.extend([
                counter(
                    m,
                    &spill,
                    "deriva.spill.write",
                    "Outputs larger than --spill-bytes written to the spill directory",
                    Box::new(|s| s.stats().writes()),
                ),
                counter(
                    m,
                    &spill,
                    "deriva.spill.hit",
                    "Lookups that found an output in the spill directory",
                    Box::new(|s| s.stats().hits()),
                ),
                counter(
                    m,
                    &spill,
                    "deriva.spill.eviction",
                    "Spilled outputs evicted to stay within the spill budget",
                    Box::new(|s| s.stats().evictions()),
                ),
            ]);
        }
    }

    /// Counts a compute stopped by the compute timeout.
    pub(crate) fn record_timeout(&self, id: &FunctionId) {
        self.exec.timeouts.fetch_add(1, Ordering::Relaxed);
        self.compute_timeouts.add(1, self.function_attrs(id));
    }

    /// The `function` attribute set for a registered function; empty for any other id, so
    /// the label can only take registered values.
    pub(crate) fn function_attrs(&self, id: &FunctionId) -> &[KeyValue] {
        self.function_attrs
            .get(id)
            .map(|a| a.as_slice())
            .unwrap_or(&[])
    }
}

/// The attributes of `deriva_audit_total`.
pub(crate) fn audit_attrs(id: &FunctionId, result: &'static str) -> [KeyValue; 2] {
    [
        KeyValue::new("function", id.to_string()),
        KeyValue::new("result", result),
    ]
}

/// See [`ExecStats::waiting_guard`].
#[derive(Debug)]
pub(crate) struct WaitingGuard(Arc<ExecStats>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}
