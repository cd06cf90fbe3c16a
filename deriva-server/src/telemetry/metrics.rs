//! [`ServerMetrics`]: the server's own instruments (RPC, DAG and storage families), and
//! [`SpanExportMetrics`]: those of the span export queue.
//!
//! | family | type | labels | meaning |
//! |---|---|---|---|
//! | `deriva_rpc_total` | counter | `method`, `status` = `ok`/`error` | finished RPCs |
//! | `deriva_rpc_duration_seconds` | histogram | `method` | RPC latency, until the last byte of a stream; buckets 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10 |
//! | `deriva_rpc_active` | gauge | `method` | RPCs in flight |
//! | `deriva_dag_recipes` | gauge | – | recipes stored |
//! | `deriva_dag_insert_duration_seconds` | histogram | – | time to validate and durably store one recipe; buckets 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1 |
//! | `deriva_storage_blobs` | gauge | – | leaf blobs stored |
//! | `deriva_storage_blob_bytes` | gauge | – | bytes of leaf blobs stored |
//! | `deriva_storage_leaf_commits_total` | counter | – | durable commits of small leaves (local store): one fsync each, shared by the puts in it |
//! | `deriva_pins` | gauge | – | pinned addresses |
//! | `deriva_gc_phase` | gauge | `phase` = `idle`/`mark`/`sweep` | 1 for the phase this node's garbage collection is in, 0 for the others |
//! | `deriva_config_reloads_total` | counter | `part` = `tokens`/`tls`, `result` = `ok`/`error` | reloads of a configuration file (SIGHUP): the token file of `--auth-tokens`; the certificate, key and client CA of `--tls-*` (read together) |
//!
//! `method` is the [`RpcMethod::label`] of one of [`RpcMethod::ALL`]. Counts and gauges are atomics read by observable
//! instruments at collection time; the store gauges read the store's own counters, so they are
//! right from the first scrape after a restart.
//!
//! [`SpanExportMetrics`], only when spans are exported over OTLP (README.md, "Span export
//! metrics"):
//!
//! | family | type | meaning |
//! |---|---|---|
//! | `deriva_telemetry_spans_dropped_total` | counter | spans ended and sampled, dropped because the export queue was full |
//! | `deriva_telemetry_spans_exported_total` | counter | spans the OTLP receiver accepted |
//! | `deriva_telemetry_spans_export_failed_total` | counter | spans of exports that failed (refused, unreachable, timed out) |
//! | `deriva_telemetry_span_queue_length` | gauge | spans waiting now in the export queue |
//! | `deriva_telemetry_span_queue_capacity` | gauge | the most spans that can wait (`OTEL_BSP_MAX_QUEUE_SIZE`) |

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use deriva_store::StoreCounters;
use deriva_store::gc::GcPhase;

use super::span_queue::SpanQueueStats;

use crate::method::RpcMethod;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, ObservableCounter, ObservableGauge};

/// Buckets of `deriva_rpc_duration_seconds` (listed in README.md, "Metrics reference").
pub const RPC_DURATION_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];
/// Buckets of `deriva_dag_insert_duration_seconds`.
pub const DAG_INSERT_BUCKETS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// Counts per method, indexed by [`RpcMethod::index`].
#[derive(Debug, Default)]
struct RpcCounts {
    ok: [AtomicU64; RpcMethod::COUNT],
    error: [AtomicU64; RpcMethod::COUNT],
    active: [AtomicI64; RpcMethod::COUNT],
}

/// The `reason` values of `deriva_auth_failures_total`.
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["missing", "malformed", "unknown", "scope"];

/// The `part` values of `deriva_config_reloads_total`.
pub const RELOAD_PARTS: [&str; 2] = ["tokens", "tls"];

/// The server's instruments.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    counts: Arc<RpcCounts>,
    rpc_duration: Histogram<f64>,
    dag_insert: Histogram<f64>,
    auth_failures: opentelemetry::metrics::Counter<u64>,
    config_reloads: opentelemetry::metrics::Counter<u64>,
    method_attrs: [[KeyValue; 1]; RpcMethod::COUNT],
    _counter: ObservableCounter<u64>,
    _leaf_commits: ObservableCounter<u64>,
    _gauges: Vec<ObservableGauge<u64>>,
    _gc_phase: ObservableGauge<u64>,
    _active: ObservableGauge<i64>,
}

impl ServerMetrics {
    /// Builds the instruments from `meter`, with the store gauges over `store`.
    pub fn new(meter: &Meter, store: Arc<StoreCounters>) -> Self {
        let counts = Arc::new(RpcCounts::default());
        let method_attrs = RpcMethod::ALL.map(|m| [KeyValue::new("method", m.label())]);
        let status_attrs: Vec<[[KeyValue; 2]; 2]> = RpcMethod::ALL
            .iter()
            .map(|m| {
                ["ok", "error"].map(|status| {
                    [
                        KeyValue::new("method", m.label()),
                        KeyValue::new("status", status),
                    ]
                })
            })
            .collect();

        let c = counts.clone();
        let counter = meter
            .u64_observable_counter("deriva.rpc")
            .with_description("Finished RPCs by method and status (ok or error)")
            .with_callback(move |o| {
                for (i, [ok, error]) in status_attrs.iter().enumerate() {
                    o.observe(c.ok[i].load(Ordering::Relaxed), ok);
                    o.observe(c.error[i].load(Ordering::Relaxed), error);
                }
            })
            .build();
        let (c, attrs) = (counts.clone(), method_attrs.clone());
        let active = meter
            .i64_observable_gauge("deriva.rpc.active")
            .with_description("RPCs in flight, by method")
            .with_callback(move |o| {
                for (i, a) in attrs.iter().enumerate() {
                    o.observe(c.active[i].load(Ordering::Relaxed), a);
                }
            })
            .build();
        let gauge = |name: &'static str,
                     unit: Option<&'static str>,
                     desc: &'static str,
                     read: fn(&StoreCounters) -> u64| {
            let store = store.clone();
            let builder = meter.u64_observable_gauge(name).with_description(desc);
            let builder = match unit {
                Some(u) => builder.with_unit(u),
                None => builder,
            };
            builder
                .with_callback(move |o| o.observe(read(&store), &[]))
                .build()
        };
        let gauges = vec![
            gauge(
                "deriva.dag.recipes",
                None,
                "Recipes stored",
                StoreCounters::recipes,
            ),
            gauge(
                "deriva.storage.blobs",
                None,
                "Leaf blobs stored",
                StoreCounters::blobs,
            ),
            gauge(
                "deriva.pins",
                None,
                "Pinned addresses: the roots of what garbage collection keeps",
                StoreCounters::pins,
            ),
            gauge(
                "deriva.storage.blob",
                Some("By"),
                "Bytes of leaf blobs stored",
                StoreCounters::blob_bytes,
            ),
        ];
        let gc_phase = {
            let store = store.clone();
            let phases = GcPhase::ALL.map(|p| (p, [KeyValue::new("phase", p.as_str())]));
            meter
                .u64_observable_gauge("deriva.gc.phase")
                .with_description(
                    "The phase of this node's garbage collection: 1 for the phase it is in \
                     (idle, mark: finding what stays, sweep: removing the rest), 0 for the others",
                )
                .with_callback(move |o| {
                    let (now, _, _) = store.gc_progress().get();
                    for (phase, attrs) in &phases {
                        o.observe(u64::from(*phase == now), attrs);
                    }
                })
                .build()
        };
        let leaf_commits = {
            let store = store.clone();
            meter
                .u64_observable_counter("deriva.storage.leaf_commits")
                .with_description(
                    "Durable commits of small leaves by the local store: one fsync each, shared \
                     by every PutLeaf in it (puts over commits is the batch size)",
                )
                .with_callback(move |o| o.observe(store.leaf_commits(), &[]))
                .build()
        };
        let auth_failures = meter
            .u64_counter("deriva.auth.failures")
            .with_description("Requests refused by --auth-tokens, by reason: missing, malformed, unknown (token), scope (the token lacks the scope)")
            .build();
        for reason in AUTH_FAILURE_REASONS {
            auth_failures.add(0, &[KeyValue::new("reason", reason)]);
        }
        let config_reloads = meter
            .u64_counter("deriva.config.reloads")
            .with_description("Reloads of a configuration file on SIGHUP, by part (tokens: --auth-tokens; tls: the certificate, key and client CA) and result (ok; error: the part in use stays)")
            .build();
        for part in RELOAD_PARTS {
            for result in ["ok", "error"] {
                config_reloads.add(
                    0,
                    &[KeyValue::new("part", part), KeyValue::new("result", result)],
                );
            }
        }
        Self {
            inner: Arc::new(Inner {
                counts,
                auth_failures,
                config_reloads,
                rpc_duration: meter
                    .f64_histogram("deriva.rpc.duration")
                    .with_unit("s")
                    .with_description(
                        "RPC latency by method; a streaming Get is timed until its last byte",
                    )
                    .with_boundaries(RPC_DURATION_BUCKETS.to_vec())
                    .build(),
                dag_insert: meter
                    .f64_histogram("deriva.dag.insert.duration")
                    .with_unit("s")
                    .with_description("Time to validate and durably store one recipe")
                    .with_boundaries(DAG_INSERT_BUCKETS.to_vec())
                    .build(),
                method_attrs,
                _counter: counter,
                _leaf_commits: leaf_commits,
                _gauges: gauges,
                _gc_phase: gc_phase,
                _active: active,
            }),
        }
    }

    /// Counts an RPC of `method` as in flight until the guard is finished or dropped.
    pub fn start(&self, method: RpcMethod) -> RpcTimer {
        let index = method.index();
        self.inner.counts.active[index].fetch_add(1, Ordering::Relaxed);
        RpcTimer {
            metrics: self.clone(),
            index,
            start: std::time::Instant::now(),
            done: false,
        }
    }

    /// Counts one request refused by the token check, for `reason` (one of
    /// [`AUTH_FAILURE_REASONS`]).
    pub fn record_auth_failure(&self, reason: &'static str) {
        self.inner
            .auth_failures
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    /// Counts one reload of `part` (one of [`RELOAD_PARTS`]).
    pub fn record_config_reload(&self, part: &'static str, ok: bool) {
        self.inner.config_reloads.add(
            1,
            &[
                KeyValue::new("part", part),
                KeyValue::new("result", if ok { "ok" } else { "error" }),
            ],
        );
    }

    /// Records one recipe insert.
    pub fn record_dag_insert(&self, elapsed: std::time::Duration) {
        self.inner.dag_insert.record(elapsed.as_secs_f64(), &[]);
    }
}

/// One RPC in flight. [`RpcTimer::finish`] records it; dropping it unfinished records an error
/// (the client went away, or the response was abandoned). Either way the in-flight gauge goes
/// back down exactly once.
#[derive(Debug)]
pub struct RpcTimer {
    metrics: ServerMetrics,
    index: usize,
    start: std::time::Instant,
    done: bool,
}

impl RpcTimer {
    /// Records the outcome and the duration, which it returns.
    pub fn finish(mut self, ok: bool) -> std::time::Duration {
        self.record(ok)
    }

    fn record(&mut self, ok: bool) -> std::time::Duration {
        let elapsed = self.start.elapsed();
        if std::mem::replace(&mut self.done, true) {
            return elapsed;
        }
        let inner = &self.metrics.inner;
        inner.counts.active[self.index].fetch_sub(1, Ordering::Relaxed);
        let counter = if ok {
            &inner.counts.ok
        } else {
            &inner.counts.error
        };
        counter[self.index].fetch_add(1, Ordering::Relaxed);
        inner
            .rpc_duration
            .record(elapsed.as_secs_f64(), &inner.method_attrs[self.index]);
        elapsed
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        if !self.done {
            self.record(false);
        }
    }
}

/// The span export queue's instruments (the `deriva_telemetry_*` families), reading the counts
/// of a [`SpanQueue`](super::span_queue::SpanQueue) at collection time.
#[derive(Debug, Clone)]
pub struct SpanExportMetrics {
    _counters: Vec<ObservableCounter<u64>>,
    _gauges: Vec<ObservableGauge<u64>>,
}

impl SpanExportMetrics {
    /// Builds the instruments from `meter`, over `stats`.
    pub fn new(meter: &Meter, stats: Arc<SpanQueueStats>) -> Self {
        let counter = |name: &'static str, desc: &'static str, read: fn(&SpanQueueStats) -> u64| {
            let stats = stats.clone();
            meter
                .u64_observable_counter(name)
                .with_unit("{span}")
                .with_description(desc)
                .with_callback(move |o| o.observe(read(&stats), &[]))
                .build()
        };
        let gauge = |name: &'static str, desc: &'static str, read: fn(&SpanQueueStats) -> usize| {
            let stats = stats.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit("{span}")
                .with_description(desc)
                .with_callback(move |o| o.observe(read(&stats) as u64, &[]))
                .build()
        };
        Self {
            _counters: vec![
                counter(
                    "deriva.telemetry.spans.dropped",
                    "Spans ended and sampled but dropped because the export queue was full; lower --trace-sample-ratio",
                    SpanQueueStats::dropped,
                ),
                counter(
                    "deriva.telemetry.spans.exported",
                    "Spans the OTLP receiver accepted",
                    SpanQueueStats::exported,
                ),
                counter(
                    "deriva.telemetry.spans.export_failed",
                    "Spans of OTLP exports that failed: refused, unreachable, or not answered within the timeout",
                    SpanQueueStats::failed,
                ),
            ],
            _gauges: vec![
                gauge(
                    "deriva.telemetry.span_queue.length",
                    "Spans waiting now in the export queue",
                    SpanQueueStats::queued,
                ),
                gauge(
                    "deriva.telemetry.span_queue.capacity",
                    "The most spans the export queue holds (OTEL_BSP_MAX_QUEUE_SIZE)",
                    SpanQueueStats::capacity,
                ),
            ],
        }
    }
}
