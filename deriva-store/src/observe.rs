//! The one place where calls to a storage backend are observed: every backend (local or
//! remote) runs each of its calls through [`BackendMetrics::call`] (or
//! [`BackendMetrics::call_blocking`]), naming the call, and gets the same instrumentation: a
//! client span with the OpenTelemetry semantic conventions, the call's duration, and its error
//! by kind. No backend builds a span or records an instrument of its own.
//!
//! Prometheus families (see README.md, "Storage backend metrics"):
//! - `deriva_backend_request_duration_seconds{backend,op}` (histogram);
//! - `deriva_backend_errors_total{backend,op,kind}`, `kind` being the error's
//!   [`DerivaError::kind`] (`unavailable`, `corrupted`, `database`, `io`, …);
//! - `deriva_local_cache_hits_total` and `deriva_local_cache_misses_total`: reads of remote
//!   bytes answered by the remote backend's local read-through cache, or not.
//!
//! `backend` is [`Backend::label`]: `s3` and `postgres` (one wire request each) for the remote
//! backend, `redb` and `files` for the local one.
//!
//! A span costs about a microsecond whether or not its trace is sampled (BENCHMARKS.md,
//! "Spans"), more than a local call's bookkeeping should. So a call gets its span only when
//! the current OpenTelemetry context is sampled: inside a sampled request. A call outside any
//! request (a background refresh, a committer thread) or in a request that is not sampled is
//! measured but not traced. The metrics are always recorded, with label sets of `'static`
//! strings: no allocation per call.
//!
//! The local backend's calls (a redb transaction, a leaf file) take a few microseconds, and in
//! a server a span through every layer costs as much again: their spans have a target of their
//! own, [`LOCAL_CALLS_TARGET`], which the server turns on only when asked
//! (`--trace-local-store`; BENCHMARKS.md §13 has the cost). The remote backend's calls, network
//! round trips, are always traced.

use std::future::Future;
use std::time::Instant;

use deriva_core::DerivaError;
use deriva_core::error::Result;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use tracing::{Instrument, Span};

/// The target of the local backend's client spans (redb and the leaf files), which a
/// subscriber enables on its own; the remote backend's spans have this module's target.
pub const LOCAL_CALLS_TARGET: &str = "deriva_store::local_calls";

/// Buckets of `deriva_backend_request_duration_seconds`: from a fast loopback round trip to a
/// call that ran into its timeout.
pub const BACKEND_DURATION_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

/// Which engine a call went to: the `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The S3-compatible object store of the remote backend.
    S3,
    /// The PostgreSQL index of the remote backend.
    Postgres,
    /// The redb databases of the local backend (`deriva.redb`, `leaves.redb`).
    Redb,
    /// The leaf files of the local backend (`blobs/`).
    Files,
}

impl Backend {
    /// The `backend` label value.
    pub fn label(self) -> &'static str {
        match self {
            Backend::S3 => "s3",
            Backend::Postgres => "postgres",
            Backend::Redb => "redb",
            Backend::Files => "files",
        }
    }
}

/// What one backend call is: its `backend` and `op` labels, and what its span says. Backends
/// declare one per kind of call (usually a `const`); [`BackendMetrics::call`] does the rest.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    /// One object-store request (semantic conventions for AWS S3): `rpc.method` such as
    /// `GetObject`; the bucket and key are given to [`BackendMetrics::call`].
    Object {
        /// The `op` label: `get`, `put`, `put_multipart`, `head`, `delete`, `list`.
        op: &'static str,
        /// `rpc.method`.
        method: &'static str,
    },
    /// One database statement or transaction (semantic conventions for databases).
    Database {
        /// The `backend` label: [`Backend::Postgres`] or [`Backend::Redb`].
        backend: Backend,
        /// The `op` label.
        op: &'static str,
        /// `db.operation.name`: `SELECT`, `INSERT`, `DELETE` (PostgreSQL), `read` or `write`
        /// (a redb transaction).
        operation: &'static str,
        /// `db.collection.name`: the main table.
        table: &'static str,
    },
    /// One operation on the local leaf files.
    File {
        /// The `op` label: `get`, `open`, `put`, `write`, `head`, `delete`, `list`, `check`.
        op: &'static str,
    },
}

impl Call {
    /// The `backend` label.
    pub fn backend(&self) -> Backend {
        match self {
            Call::Object { .. } => Backend::S3,
            Call::Database { backend, .. } => *backend,
            Call::File { .. } => Backend::Files,
        }
    }

    /// The `op` label.
    pub fn op(&self) -> &'static str {
        match self {
            Call::Object { op, .. } | Call::Database { op, .. } | Call::File { op } => op,
        }
    }

    /// Its client span. `target` is the object of an object-store call: the bucket and key.
    fn span(&self, target: Target<'_>) -> Span {
        match *self {
            Call::Object { method, .. } => {
                let (bucket, key) = match target {
                    Target::Object { bucket, key } => (bucket, key),
                    Target::None => ("", ""),
                };
                tracing::info_span!(
                    deriva_core::spans::OBJECT_STORE,
                    otel.kind = "client",
                    otel.name = method,
                    otel.status_code = tracing::field::Empty,
                    otel.status_message = tracing::field::Empty,
                    rpc.system = "aws-api",
                    rpc.service = "S3",
                    rpc.method = method,
                    aws.s3.bucket = bucket,
                    aws.s3.key = key,
                    error.type = tracing::field::Empty,
                )
            }
            // One span shape for both databases; each its own callsite, since only the local
            // one's target is switched off by default.
            Call::Database {
                backend,
                operation,
                table,
                ..
            } => {
                macro_rules! index_db_span {
                    ($target:expr, $system:literal) => {
                        tracing::info_span!(
                            target: $target,
                            deriva_core::spans::INDEX_DB,
                            otel.kind = "client",
                            otel.name = tracing::field::display(format_args!("{operation} {table}")),
                            otel.status_code = tracing::field::Empty,
                            otel.status_message = tracing::field::Empty,
                            db.system.name = $system,
                            db.operation.name = operation,
                            db.collection.name = table,
                            error.type = tracing::field::Empty,
                        )
                    };
                }
                match backend {
                    Backend::Postgres => index_db_span!(module_path!(), "postgresql"),
                    _ => index_db_span!(LOCAL_CALLS_TARGET, "redb"),
                }
            }
            Call::File { op } => tracing::info_span!(
                target: LOCAL_CALLS_TARGET,
                deriva_core::spans::LEAF_FILE,
                otel.kind = "client",
                otel.name = tracing::field::display(format_args!("{op} blobs")),
                otel.status_code = tracing::field::Empty,
                otel.status_message = tracing::field::Empty,
                deriva.store.backend = "files",
                deriva.store.op = op,
                error.type = tracing::field::Empty,
            ),
        }
    }
}

/// What an object-store call works on, for its span; [`Target::None`] for the other calls.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// No object: a database or file call.
    None,
    /// The object at `key` in `bucket`.
    Object {
        /// `aws.s3.bucket`.
        bucket: &'a str,
        /// `aws.s3.key`.
        key: &'a str,
    },
}

/// The instruments of the storage backends, built once from a `Meter` and shared by every
/// backend of a store.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    duration: Histogram<f64>,
    errors: Counter<u64>,
    cache_hits: Counter<u64>,
    cache_misses: Counter<u64>,
}

impl BackendMetrics {
    /// Builds the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            duration: meter
                .f64_histogram("deriva.backend.request.duration")
                .with_unit("s")
                .with_description(
                    "Duration of calls to the storage backends (object store, index, redb, files)",
                )
                .with_boundaries(BACKEND_DURATION_BUCKETS.to_vec())
                .build(),
            errors: meter
                .u64_counter("deriva.backend.errors")
                .with_description("Failed calls to the storage backends, by error kind")
                .build(),
            cache_hits: meter
                .u64_counter("deriva.local_cache.hits")
                .with_description("Reads of remote bytes answered by the local read-through cache")
                .build(),
            cache_misses: meter
                .u64_counter("deriva.local_cache.misses")
                .with_description("Reads of remote bytes the local read-through cache did not hold")
                .build(),
        }
    }

    /// Instruments that record nothing, for tools and tests that have no meter.
    pub fn noop() -> Self {
        use opentelemetry::metrics::MeterProvider;
        Self::new(&opentelemetry::metrics::NoopMeterProvider::new().meter("deriva-store"))
    }

    /// Counts one read of the remote backend's local read-through cache.
    pub fn cache_read(&self, hit: bool) {
        if hit {
            self.cache_hits.add(1, &[]);
        } else {
            self.cache_misses.add(1, &[]);
        }
    }

    /// Runs one backend call: inside its client span when the current trace is sampled, and
    /// records its duration and, if it failed, its error kind (also on the span, as
    /// `error.type`).
    pub async fn call<T>(
        &self,
        call: Call,
        target: Target<'_>,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span = span_if_sampled(&call, target);
        let start = Instant::now();
        let out = match &span {
            Some(span) => work.instrument(span.clone()).await,
            None => work.await,
        };
        self.record(&call, span.as_ref(), start, &out);
        out
    }

    /// [`BackendMetrics::call`] for blocking work, on the thread that does it (the blocking
    /// pool's, inside the caller's span: see [`crate::task::spawn_blocking_in`]).
    pub fn call_blocking<T>(&self, call: Call, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let span = span_if_sampled(&call, Target::None);
        let start = Instant::now();
        let out = match &span {
            Some(span) => span.in_scope(work),
            None => work(),
        };
        self.record(&call, span.as_ref(), start, &out);
        out
    }

    fn record<T>(&self, call: &Call, span: Option<&Span>, start: Instant, out: &Result<T>) {
        let labels = [
            KeyValue::new("backend", call.backend().label()),
            KeyValue::new("op", call.op()),
        ];
        self.duration.record(start.elapsed().as_secs_f64(), &labels);
        if let Err(e) = out {
            let [backend, op] = labels;
            self.errors
                .add(1, &[backend, op, KeyValue::new("kind", e.kind())]);
            if let Some(span) = span {
                failed(span, e);
            }
        }
    }
}

/// Whether the current OpenTelemetry context (the request's, activated by the
/// tracing-opentelemetry layer when its span is entered) is sampled.
fn sampled() -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    opentelemetry::Context::map_current(|cx| cx.span().span_context().is_sampled())
}

/// The call's span, if its trace is sampled and the subscriber wants it (the local calls'
/// target is off by default): a disabled span is not worth entering around every call.
fn span_if_sampled(call: &Call, target: Target<'_>) -> Option<Span> {
    if sampled() {
        Some(call.span(target)).filter(|span| !span.is_disabled())
    } else {
        None
    }
}

/// Marks `span` as failed with `err`.
fn failed(span: &Span, err: &DerivaError) {
    span.record("error.type", err.kind());
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_message", tracing::field::display(err));
}
