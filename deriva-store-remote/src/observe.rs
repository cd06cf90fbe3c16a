//! Every backend call is observed in one place: a client span with the OpenTelemetry semantic
//! conventions, the call's duration, and its error by kind.
//!
//! Prometheus families (see README.md, "Metrics reference"):
//! - `deriva_backend_request_duration_seconds{backend,op}` (histogram);
//! - `deriva_backend_errors_total{backend,op,kind}`, `kind` being the error's
//!   [`DerivaError::kind`] (`unavailable`, `corrupted`, `database`, …);
//! - `deriva_local_cache_hits_total` and `deriva_local_cache_misses_total`: reads of remote
//!   bytes answered by the local read-through cache, or not.

use std::future::Future;
use std::time::Instant;

use deriva_core::DerivaError;
use deriva_core::error::Result;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use tracing::{Instrument, Span};

/// Buckets of `deriva_backend_request_duration_seconds`: from a fast loopback round trip to a
/// call that ran into its timeout.
pub const BACKEND_DURATION_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

/// Which remote engine a call went to: the `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The S3-compatible object store.
    S3,
    /// The PostgreSQL index.
    Postgres,
}

impl Backend {
    /// The `backend` label value.
    pub fn label(self) -> &'static str {
        match self {
            Backend::S3 => "s3",
            Backend::Postgres => "postgres",
        }
    }
}

/// The instruments of the remote backends, built once from a `Meter`.
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
                .with_description("Duration of calls to the remote backends (object store, index)")
                .with_boundaries(BACKEND_DURATION_BUCKETS.to_vec())
                .build(),
            errors: meter
                .u64_counter("deriva.backend.errors")
                .with_description("Failed calls to the remote backends, by error kind")
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
        Self::new(&opentelemetry::metrics::NoopMeterProvider::new().meter("deriva-store-remote"))
    }

    /// Counts one read of the local cache.
    pub(crate) fn cache_read(&self, hit: bool) {
        if hit {
            self.cache_hits.add(1, &[]);
        } else {
            self.cache_misses.add(1, &[]);
        }
    }

    /// Runs one backend call inside `span`, and records its duration and, if it failed, its
    /// error kind (also on the span, as `error.type`).
    pub(crate) async fn call<T>(
        &self,
        backend: Backend,
        op: &'static str,
        span: Span,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        let out = call.instrument(span.clone()).await;
        let labels = [
            KeyValue::new("backend", backend.label()),
            KeyValue::new("op", op),
        ];
        self.duration.record(start.elapsed().as_secs_f64(), &labels);
        if let Err(e) = &out {
            let [backend, op] = labels;
            self.errors
                .add(1, &[backend, op, KeyValue::new("kind", e.kind())]);
            failed(&span, e);
        }
        out
    }
}

/// Marks `span` as failed with `err`.
fn failed(span: &Span, err: &DerivaError) {
    span.record("error.type", err.kind());
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_message", tracing::field::display(err));
}

/// A client span for one object-store request (semantic conventions for AWS S3).
pub(crate) fn s3_span(method: &'static str, bucket: &str, key: &str) -> Span {
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

/// A client span for one PostgreSQL query (semantic conventions for databases).
pub(crate) fn pg_span(operation: &'static str, table: &'static str) -> Span {
    tracing::info_span!(
        deriva_core::spans::INDEX_DB,
        otel.kind = "client",
        otel.name = tracing::field::display(format_args!("{operation} {table}")),
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.collection.name = table,
        error.type = tracing::field::Empty,
    )
}
