//! Telemetry installation: the OpenTelemetry Resource, the meter provider (a Prometheus reader
//! on a private registry, plus OTLP when an endpoint is set), the tracer provider (sampled,
//! exporting over OTLP when an endpoint is set), and the `tracing` subscriber whose every log
//! line inside a request carries `trace_id` and `span_id`.
//!
//! [`Telemetry::new`] builds everything without touching global state, so tests make their own;
//! only the `deriva-server` binary installs the subscriber globally.
//!
//! - [`sampler`]: which new traces are recorded, and the per-second cap;
//! - [`logs`]: the log-line formatter that adds `trace_id`, `span_id` and the request id;
//! - [`metrics`]: [`ServerMetrics`], the server's own instruments.

use std::fmt;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Dispatch;
use tracing::Level;
use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

pub mod logs;
pub mod metrics;
pub mod sampler;

pub use logs::{LineIds, RequestId, WithTraceIds, current_ids};
pub use metrics::ServerMetrics;
pub use sampler::{DerivaSampler, FORCE_TRACE_ATTR, RateLimiter};

use crate::trace_store::TraceStore;
use tracing_subscriber::{EnvFilter, fmt as tfmt};

/// The filter used when `RUST_LOG` is not set: Deriva at info, the transport crates quiet.
pub const DEFAULT_LOG_FILTER: &str = "info,deriva_server=info,deriva_compute=info,deriva_core=info,deriva_remote=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,opentelemetry=warn,opentelemetry_sdk=warn";

/// The default [`TelemetryConfig::sample_ratio`] (and `--trace-sample-ratio`): every new trace.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;

/// The default [`TelemetryConfig::trace_store_capacity`] (and `--trace-store-size`).
pub const DEFAULT_TRACE_STORE_CAPACITY: usize = 256;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, with the time since start.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Telemetry settings (filled from the server flags).
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint for spans and metrics, e.g. `http://127.0.0.1:4317`; none: no export.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to sample (a sampled caller is always honored).
    pub sample_ratio: f64,
    /// Most new traces started per second; `None`: no cap.
    pub max_traces_per_second: Option<f64>,
    /// Log line format.
    pub log_format: LogFormat,
    /// `RUST_LOG`-style filter; `None`: `RUST_LOG` or [`DEFAULT_LOG_FILTER`].
    pub log_filter: Option<String>,
    /// How often OTLP metrics are pushed.
    pub metric_export_interval: Duration,
    /// How many recent requests the in-process trace store keeps (see
    /// [`crate::trace_store`]).
    pub trace_store_capacity: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: DEFAULT_SAMPLE_RATIO,
            max_traces_per_second: None,
            log_format: LogFormat::default(),
            log_filter: None,
            metric_export_interval: Duration::from_secs(15),
            trace_store_capacity: DEFAULT_TRACE_STORE_CAPACITY,
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter could not be built.
    #[error("building the Prometheus exporter: {0}")]
    Prometheus(String),
    /// An OTLP exporter could not be built (a malformed endpoint, usually).
    #[error("building the OTLP exporter for {endpoint}: {detail}")]
    Otlp {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        detail: String,
    },
    /// The log filter does not parse.
    #[error("bad log filter {filter:?}: {detail}")]
    Filter {
        /// The filter.
        filter: String,
        /// What went wrong.
        detail: String,
    },
}

/// The providers and the Prometheus registry. Keep it alive for the whole process: the
/// Prometheus reader holds the meter provider only weakly.
#[derive(Debug, Clone)]
pub struct Telemetry {
    registry: prometheus::Registry,
    meter_provider: SdkMeterProvider,
    tracer_provider: SdkTracerProvider,
    traces: TraceStore,
    config: TelemetryConfig,
    instance_id: String,
}

/// The service resource: `service.name` (`OTEL_SERVICE_NAME`, default `deriva-server`),
/// `service.version`, a fresh `service.instance.id`, and `OTEL_RESOURCE_ATTRIBUTES`.
pub fn resource() -> Resource {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "deriva-server".to_owned());
    Resource::builder()
        .with_service_name(name)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ])
        .build()
}

impl Telemetry {
    /// Builds the providers. Must run inside a tokio runtime when an OTLP endpoint is set.
    pub fn new(config: TelemetryConfig) -> Result<Self, TelemetryError> {
        let resource = resource();
        let instance_id = resource
            .get(&opentelemetry::Key::from_static_str("service.instance.id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let registry = prometheus::Registry::new();
        let prom = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prom);
        let sampler = DerivaSampler::new(config.sample_ratio, config.max_traces_per_second);
        let mut tracers = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(sampler);

        if let Some(endpoint) = &config.otlp_endpoint {
            let otlp_err = |e: &dyn fmt::Display| TelemetryError::Otlp {
                endpoint: endpoint.clone(),
                detail: e.to_string(),
            };
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| otlp_err(&e))?;
            tracers = tracers.with_batch_exporter(spans);
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| otlp_err(&e))?;
            let reader = PeriodicReader::builder(metrics)
                .with_interval(config.metric_export_interval)
                .build();
            meters = meters.with_reader(reader);
        }
        Ok(Self {
            registry,
            meter_provider: meters.build(),
            tracer_provider: tracers.build(),
            traces: TraceStore::new(config.trace_store_capacity),
            config,
            instance_id,
        })
    }

    /// The Prometheus registry that `/metrics` serves.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// This process's `service.instance.id` (from the resource): a fresh UUID unless
    /// `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// A meter for Deriva's instruments.
    pub fn meter(&self) -> Meter {
        self.meter_provider.meter("deriva")
    }

    /// The in-process store of recent request traces, filled by the subscriber's layer.
    pub fn traces(&self) -> &TraceStore {
        &self.traces
    }

    /// The tracer provider (for flushing in tests).
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer_provider
    }

    /// The meter provider (for flushing in tests).
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// A subscriber with the env filter, the OpenTelemetry layer and a fmt layer writing to
    /// `writer`. The binary installs it globally; tests keep it as a [`Dispatch`].
    pub fn subscriber<W>(&self, writer: W) -> Result<Dispatch, TelemetryError>
    where
        W: for<'w> tfmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let filter_text = match &self.config.log_filter {
            Some(f) => f.clone(),
            None => std::env::var("RUST_LOG")
                .ok()
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
        };
        let filter = EnvFilter::try_new(&filter_text).map_err(|e| TelemetryError::Filter {
            filter: filter_text.clone(),
            detail: e.to_string(),
        })?;
        let otel = tracing_opentelemetry::layer()
            .with_tracer(self.tracer_provider.tracer("deriva"))
            .with_context_activation(true)
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false);
        // Log verbosity must not decide what is traced: the filter from RUST_LOG applies to the
        // log lines only, while the OpenTelemetry layer and the trace store see every span of
        // Deriva's own crates.
        let spans = Targets::new()
            .with_target("deriva_server", Level::INFO)
            .with_target("deriva_compute", Level::INFO)
            .with_target("deriva_core", Level::INFO)
            .with_target("deriva_remote", Level::INFO);
        let registry = tracing_subscriber::registry()
            .with(otel.with_filter(spans.clone()))
            .with(self.traces.layer().with_filter(spans));
        // The fmt layer sees events only. Given spans, it would format every span's fields when
        // the span is created, whether or not a line is ever written inside it: that cost 15%
        // of cached-Get throughput (BENCHMARKS.md). Lines name their request through the ids
        // `WithTraceIds` adds instead.
        let filter = filter.and(filter_fn(|meta| meta.is_event()));
        let fmt_layer = tfmt::layer().with_writer(writer).with_ansi(false);
        let dispatch = match self.config.log_format {
            LogFormat::Text => {
                let fmt_layer = fmt_layer.event_format(WithTraceIds(
                    tfmt::format().with_timer(tfmt::time::uptime()),
                ));
                Dispatch::new(registry.with(fmt_layer.with_filter(filter)))
            }
            LogFormat::Json => {
                let fmt_layer = fmt_layer
                    .fmt_fields(tfmt::format::JsonFields::new())
                    .event_format(WithTraceIds(
                        tfmt::format()
                            .json()
                            .with_current_span(true)
                            .with_span_list(false),
                    ));
                Dispatch::new(registry.with(fmt_layer.with_filter(filter)))
            }
        };
        Ok(dispatch)
    }

    /// Flushes and stops both providers, giving up after `timeout` (a dead collector must not
    /// hold shutdown hostage). Runs the blocking SDK calls off the async workers.
    pub async fn shutdown(&self, timeout: Duration) {
        let (tracers, meters) = (self.tracer_provider.clone(), self.meter_provider.clone());
        let work = tokio::task::spawn_blocking(move || {
            if let Err(e) = tracers.shutdown_with_timeout(timeout) {
                tracing::warn!(error = %e, "span export did not finish at shutdown");
            }
            if let Err(e) = meters.shutdown_with_timeout(timeout) {
                tracing::warn!(error = %e, "metric export did not finish at shutdown");
            }
        });
        if tokio::time::timeout(timeout, work).await.is_err() {
            tracing::warn!(
                timeout_secs = timeout.as_secs_f64(),
                "telemetry shutdown timed out; dropping what was left"
            );
        }
    }
}
