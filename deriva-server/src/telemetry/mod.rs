//! Telemetry installation: the OpenTelemetry Resource, the meter provider (a Prometheus reader
//! on a private registry, plus OTLP when an endpoint is set), the tracer provider (sampled,
//! exporting over OTLP when an endpoint is set), the logger provider (log events as OTLP log
//! records, when an endpoint is set), and the `tracing` subscriber whose every log line inside
//! a request carries `trace_id` and `span_id`.
//!
//! [`Telemetry::new`] builds everything without touching global state, so tests make their own;
//! only the `deriva-server` binary installs the subscriber globally.
//!
//! - [`sampler`]: which new traces are recorded, and the per-second cap;
//! - [`links`]: [`OtelTraceLinks`], the engine's links to spans of other nodes;
//! - [`logs`]: the log-line formatter that adds `trace_id`, `span_id` and the request id;
//! - [`metrics`]: [`ServerMetrics`], the server's own instruments, and [`SpanExportMetrics`],
//!   the span export queue's;
//! - [`otlp`]: the standard `OTEL_*` environment and the flags, resolved into exporters;
//! - [`span_queue`]: [`SpanQueue`], the batching span processor that counts the spans it drops
//!   when its queue is full.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Dispatch;
use tracing::Level;
use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

pub mod links;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod sampler;
pub mod span_queue;

pub use links::OtelTraceLinks;
pub use logs::{LineIds, RequestId, WithTraceIds, current_ids};
pub use metrics::{ServerMetrics, SpanExportMetrics};
pub use otlp::{ExportPlan, Protocol};
pub use sampler::{DerivaSampler, FORCE_TRACE_ATTR, RateLimiter};
pub use span_queue::{SpanQueue, SpanQueueStats};

use crate::rpc::Edge;
use crate::trace_store::TraceStore;
use tracing_subscriber::{EnvFilter, fmt as tfmt};

/// The filter used when `RUST_LOG` is not set: Deriva at info, the transport crates quiet.
pub const DEFAULT_LOG_FILTER: &str = "info,deriva_server=info,deriva_compute=info,deriva_core=info,deriva_store=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,opentelemetry=warn,opentelemetry_sdk=warn";

/// The default sample ratio (`--trace-sample-ratio`, `OTEL_TRACES_SAMPLER_ARG`): every new
/// trace.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;

/// The crates an export runs through, whose own log events never become log records.
const EXPORT_TARGETS: [&str; 8] = [
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
    "tonic",
    "h2",
    "hyper",
    "reqwest",
];

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

/// Telemetry settings (filled from the server flags and the `OTEL_*` environment). Its `Debug`
/// shows header names, never their values.
#[derive(Clone)]
pub struct TelemetryConfig {
    /// `--otlp-endpoint`: the OTLP endpoint of every signal, e.g. `http://127.0.0.1:4317`;
    /// wins over `OTEL_EXPORTER_OTLP_*ENDPOINT`. With neither, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `--otlp-protocol`; `None`: `OTEL_EXPORTER_OTLP_*PROTOCOL`, else gRPC.
    pub otlp_protocol: Option<Protocol>,
    /// `--otlp-header`s: sent with every export, over the environment's of the same name.
    pub otlp_headers: Vec<(String, String)>,
    /// `--otlp-logs`: `Some(false)` keeps log events off OTLP; `None`: exported wherever an
    /// endpoint is (unless `OTEL_LOGS_EXPORTER=none`).
    pub otlp_logs: Option<bool>,
    /// The process's `OTEL_*` variables (see [`otlp::resolve`]); empty in tests that want none.
    pub otel_env: std::collections::BTreeMap<String, String>,
    /// `--trace-sample-ratio`: fraction of new traces to sample (a sampled caller is always
    /// honored); `None`: `OTEL_TRACES_SAMPLER`, else every trace.
    pub sample_ratio: Option<f64>,
    /// Most new traces started per second; `None`: no cap.
    pub max_traces_per_second: Option<f64>,
    /// Log line format.
    pub log_format: LogFormat,
    /// `RUST_LOG`-style filter; `None`: `RUST_LOG` or [`DEFAULT_LOG_FILTER`].
    pub log_filter: Option<String>,
    /// How often OTLP metrics are pushed; `None`: `OTEL_METRIC_EXPORT_INTERVAL`, else 15 s.
    pub metric_export_interval: Option<Duration>,
    /// How many recent requests the in-process trace store keeps (see
    /// [`crate::trace_store`]).
    pub trace_store_capacity: usize,
    /// `--trace-local-store`: a client span for each call to the local store (a redb
    /// transaction, a leaf file) in a sampled request; off, they are only measured
    /// (`deriva_backend_*`).
    pub trace_local_store: bool,
}

impl fmt::Debug for TelemetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .otlp_headers
            .iter()
            .map(|(k, _)| format!("{k}=<set>"))
            .collect();
        let env: Vec<String> = self
            .otel_env
            .iter()
            .map(|(k, v)| match k.contains("HEADERS") {
                true => format!("{k}=<set>"),
                false => format!("{k}={}", deriva_util::redact::redact_url(v)),
            })
            .collect();
        f.debug_struct("TelemetryConfig")
            .field(
                "otlp_endpoint",
                &self
                    .otlp_endpoint
                    .as_deref()
                    .map(deriva_util::redact::redact_url),
            )
            .field("otlp_protocol", &self.otlp_protocol)
            .field("otlp_headers", &headers)
            .field("otlp_logs", &self.otlp_logs)
            .field("otel_env", &env)
            .field("sample_ratio", &self.sample_ratio)
            .field("max_traces_per_second", &self.max_traces_per_second)
            .field("log_format", &self.log_format)
            .field("log_filter", &self.log_filter)
            .field("metric_export_interval", &self.metric_export_interval)
            .field("trace_store_capacity", &self.trace_store_capacity)
            .field("trace_local_store", &self.trace_local_store)
            .finish()
    }
}

impl TelemetryConfig {
    /// The flags and `OTEL_*` variables, resolved (see [`otlp::resolve`]); an error names the
    /// flag or variable that is wrong.
    pub fn export_plan(&self) -> Result<ExportPlan, String> {
        otlp::resolve(self)
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_headers: Vec::new(),
            otlp_logs: None,
            otel_env: std::collections::BTreeMap::new(),
            sample_ratio: None,
            max_traces_per_second: None,
            log_format: LogFormat::default(),
            log_filter: None,
            metric_export_interval: None,
            trace_store_capacity: DEFAULT_TRACE_STORE_CAPACITY,
            trace_local_store: false,
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter could not be built.
    #[error("building the Prometheus exporter: {0}")]
    Prometheus(String),
    /// OTLP export could not be set up: a malformed endpoint or header, a certificate file
    /// that cannot be read. The message names the flag or variable, never a header's value.
    #[error("OTLP export: {0}")]
    Otlp(String),
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
    /// Log records over OTLP, when exported.
    logger_provider: Option<SdkLoggerProvider>,
    /// The span export queue's counts and their instruments, when spans are exported.
    span_export: Option<(Arc<SpanQueueStats>, SpanExportMetrics)>,
    plan: ExportPlan,
    traces: TraceStore,
    config: TelemetryConfig,
    instance_id: String,
    /// The tracer's sampler (clones share its cap), for the RPC layer's [`Edge`].
    sampler: DerivaSampler,
}

/// The service resource: `service.name` (`OTEL_SERVICE_NAME`, default `deriva-server`),
/// `service.version`, `OTEL_RESOURCE_ATTRIBUTES`, and `service.instance.id`: the one
/// `OTEL_RESOURCE_ATTRIBUTES` gives (a node's stable name, which its materialization records
/// and `ClusterStatus` show), else a fresh UUID.
pub fn resource() -> Resource {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "deriva-server".to_owned());
    let instance = opentelemetry::Key::from_static_str("service.instance.id");
    let given = Resource::builder().build().get(&instance).is_some();
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if !given {
        attributes.push(KeyValue::new(instance, uuid::Uuid::new_v4().to_string()));
    }
    Resource::builder()
        .with_service_name(name)
        .with_attributes(attributes)
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
        let plan = config.export_plan().map_err(TelemetryError::Otlp)?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prom);
        let sampler = DerivaSampler::new(plan.sampler.ratio, config.max_traces_per_second)
            .following_callers(plan.sampler.follow_caller);
        let mut tracers = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(sampler.clone());
        let mut span_stats = None;
        if let Some(export) = &plan.traces {
            let exporter = otlp::span_exporter(export).map_err(TelemetryError::Otlp)?;
            let queue = SpanQueue::new(exporter, plan.batching).map_err(|e| {
                TelemetryError::Otlp(format!("starting the span export thread: {e}"))
            })?;
            span_stats = Some(queue.stats());
            tracers = tracers.with_span_processor(queue);
        }
        if let Some(export) = &plan.metrics {
            let exporter = otlp::metric_exporter(export).map_err(TelemetryError::Otlp)?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(
                    config
                        .metric_export_interval
                        .unwrap_or(plan.metric_interval),
                )
                .build();
            meters = meters.with_reader(reader);
        }
        let logger_provider = match &plan.logs {
            Some(export) => {
                let exporter = otlp::log_exporter(export).map_err(TelemetryError::Otlp)?;
                Some(
                    SdkLoggerProvider::builder()
                        .with_resource(resource)
                        .with_batch_exporter(exporter)
                        .build(),
                )
            }
            None => None,
        };
        let meter_provider = meters.build();
        let span_export = span_stats.map(|stats| {
            let metrics = SpanExportMetrics::new(&meter_provider.meter("deriva"), stats.clone());
            (stats, metrics)
        });
        Ok(Self {
            registry,
            meter_provider,
            tracer_provider: tracers.build(),
            logger_provider,
            span_export,
            plan,
            traces: TraceStore::new(config.trace_store_capacity),
            config,
            instance_id,
            sampler,
        })
    }

    /// The RPC layer's decision per request, with the tracer's sampler and this trace store
    /// (see [`crate::rpc::edge`]).
    pub fn edge(&self) -> Edge {
        Edge::new(self.sampler.clone(), self.traces.clone())
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

    /// The span export queue's counts, when spans are exported over OTLP.
    pub fn span_queue(&self) -> Option<&SpanQueueStats> {
        self.span_export.as_ref().map(|(stats, _)| &**stats)
    }

    /// The logger provider, when log records are exported (for flushing in tests).
    pub fn logger_provider(&self) -> Option<&SdkLoggerProvider> {
        self.logger_provider.as_ref()
    }

    /// What is exported, and where: the resolved flags and `OTEL_*` environment.
    pub fn plan(&self) -> &ExportPlan {
        &self.plan
    }

    /// One line for the start-up log: each exported signal with where it goes, or `off`.
    /// Header values never appear, only their names.
    pub fn exports(&self) -> String {
        let signals: Vec<String> = [&self.plan.traces, &self.plan.metrics, &self.plan.logs]
            .into_iter()
            .flatten()
            .map(|e| format!("{} to {}", e.signal.name(), e.describe()))
            .collect();
        match (signals.is_empty(), self.plan.sdk_disabled) {
            (true, true) => "off (OTEL_SDK_DISABLED=true)".to_owned(),
            (true, false) => "off".to_owned(),
            (false, _) => signals.join("; "),
        }
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
        let parse = || {
            EnvFilter::try_new(&filter_text).map_err(|e| TelemetryError::Filter {
                filter: filter_text.clone(),
                detail: e.to_string(),
            })
        };
        let filter = parse()?;
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
            .with_target("deriva_store", Level::INFO)
            // The local store's calls cost about as much as their spans: traced when asked.
            .with_target(
                deriva_store::observe::LOCAL_CALLS_TARGET,
                if self.config.trace_local_store {
                    LevelFilter::INFO
                } else {
                    LevelFilter::OFF
                },
            );
        // Log events as OTLP log records, under the console's filter. The exporters' own crates
        // are left out: a record about a failed export must not feed the export.
        // Always behind a filter, even with no logger provider: an unfiltered `None` layer
        // would tell tracing that every callsite is wanted (`Option<Layer>` answers
        // `Interest::always()`), and every TRACE span of h2, hyper and tonic would be built,
        // doubling the CPU of a cached Get with telemetry off (BENCHMARKS.md).
        let exporting_logs = self.logger_provider.is_some();
        let not_exporters = filter_fn(|meta| {
            let target = meta.target();
            !EXPORT_TARGETS.iter().any(|t| {
                target
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
        });
        let bridge = self
            .logger_provider
            .as_ref()
            .map(opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new)
            .with_filter(
                parse()?
                    .and(filter_fn(move |meta| exporting_logs && meta.is_event()))
                    .and(not_exporters),
            );
        // Nothing of an untraced request reaches the span layers (`deriva_core::untraced`): its
        // spans are not built at all, since no other layer wants them.
        let traced = filter_fn(|_| !deriva_core::untraced::active());
        let registry = tracing_subscriber::registry()
            .with(otel.with_filter(spans.clone().and(traced.clone())))
            .with(self.traces.layer().with_filter(spans.and(traced)))
            .with(bridge);
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

    /// Flushes and stops the providers, giving up after `timeout` (a dead collector must not
    /// hold shutdown hostage). Runs the blocking SDK calls off the async workers.
    pub async fn shutdown(&self, timeout: Duration) {
        let (tracers, meters) = (self.tracer_provider.clone(), self.meter_provider.clone());
        let loggers = self.logger_provider.clone();
        let work = tokio::task::spawn_blocking(move || {
            if let Err(e) = tracers.shutdown_with_timeout(timeout) {
                tracing::warn!(error = %e, "span export did not finish at shutdown");
            }
            if let Err(e) = meters.shutdown_with_timeout(timeout) {
                tracing::warn!(error = %e, "metric export did not finish at shutdown");
            }
            // Last, so that the lines above are exported too.
            if let Some(loggers) = loggers
                && let Err(e) = loggers.shutdown_with_timeout(timeout)
            {
                eprintln!("deriva-server: log record export did not finish at shutdown: {e}");
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

#[cfg(test)]
mod tests {
    use tracing_core::callsite::Callsite;
    use tracing_core::metadata::Kind;
    use tracing_core::subscriber::Interest;
    use tracing_core::{Level, Metadata};

    use super::*;

    /// A callsite of this test's own: a TRACE span of `h2` (which no layer wants), or an INFO
    /// span of Deriva's (which the OpenTelemetry layer and the trace store want).
    struct Probe(&'static Metadata<'static>);

    impl Callsite for Probe {
        fn set_interest(&self, _: Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            self.0
        }
    }

    static H2: Probe = Probe(&H2_META);
    static H2_META: Metadata<'static> = tracing_core::metadata! {
        name: "poll",
        target: "h2::proto::connection",
        level: Level::TRACE,
        fields: &[],
        callsite: &H2,
        kind: Kind::SPAN,
    };
    static OURS: Probe = Probe(&OURS_META);
    static OURS_META: Metadata<'static> = tracing_core::metadata! {
        name: "materialize",
        target: "deriva_compute::executor",
        level: Level::INFO,
        fields: &[],
        callsite: &OURS,
        kind: Kind::SPAN,
    };

    /// A shared buffer the fmt layer writes lines into.
    #[derive(Clone, Default)]
    struct Lines(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// In an untraced request's scope no span reaches the trace store (or the OpenTelemetry
    /// layer: the span is not built at all), and a JSON line carries the request's trace id and
    /// request id, with no span id; outside it, the same code builds its spans.
    #[test]
    fn an_untraced_scope_builds_no_spans_and_its_lines_carry_its_ids() {
        let telemetry = Telemetry::new(TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: Some("info".into()),
            ..TelemetryConfig::default()
        })
        .unwrap();
        let lines = Lines::default();
        let writer = lines.clone();
        let dispatch = telemetry.subscriber(move || writer.clone()).unwrap();
        let scope = deriva_core::untraced::Untraced::new(0xfeed, "req-untraced".into());
        tracing::dispatcher::with_default(&dispatch, || {
            deriva_core::untraced::enter(Some(scope), || {
                let span = tracing::info_span!(deriva_core::spans::RPC, rpc.method = "Get");
                assert!(span.is_disabled(), "a span built in an untraced scope");
                span.in_scope(|| tracing::warn!("inside an untraced request"));
            });
            let span = tracing::info_span!(deriva_core::spans::RPC, rpc.method = "Get");
            assert!(!span.is_disabled());
        });
        let text = String::from_utf8(lines.0.lock().clone()).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("inside an untraced request"))
            .unwrap_or_else(|| panic!("no line in {text}"));
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["trace_id"], format!("{:032x}", 0xfeed), "{line}");
        assert_eq!(json["request_id"], "req-untraced", "{line}");
        assert!(json.get("span_id").is_none(), "{line}");
        assert_eq!(
            telemetry.traces().held().0,
            1,
            "only the span outside the scope"
        );
    }

    #[test]
    fn the_configs_debug_shows_header_names_only() {
        let config = TelemetryConfig {
            otlp_endpoint: Some("http://u:flag/secret@c:4317".into()),
            otlp_headers: vec![("x-api-key".into(), "flag-secret".into())],
            otel_env: [
                (
                    "OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
                    "x-tenant=env-secret".to_owned(),
                ),
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                    "https://u:env-secret@c:4318".to_owned(),
                ),
            ]
            .into(),
            ..TelemetryConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("x-api-key=<set>"), "{shown}");
    }

    /// The span export families are on `/metrics` exactly when spans are exported, under the
    /// names README.md's "Span export metrics" table gives, and the capacity is the queue's.
    #[test]
    fn span_export_families_come_with_span_export() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = runtime.enter();
        let scrape = |telemetry: &Telemetry| {
            prometheus::TextEncoder::new()
                .encode_to_string(&telemetry.registry().gather())
                .unwrap()
        };
        let families = [
            ("deriva_telemetry_spans_dropped_total", "counter"),
            ("deriva_telemetry_spans_exported_total", "counter"),
            ("deriva_telemetry_spans_export_failed_total", "counter"),
            ("deriva_telemetry_span_queue_length", "gauge"),
            ("deriva_telemetry_span_queue_capacity", "gauge"),
        ];
        let exporting = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
            otel_env: [
                ("OTEL_BSP_MAX_QUEUE_SIZE", "7"),
                ("OTEL_METRICS_EXPORTER", "none"),
                ("OTEL_LOGS_EXPORTER", "none"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
            ..TelemetryConfig::default()
        })
        .unwrap();
        let text = scrape(&exporting);
        for (name, kind) in families {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind}:\n{text}"
            );
        }
        assert!(
            text.contains("deriva_telemetry_span_queue_capacity 7\n"),
            "{text}"
        );
        assert_eq!(exporting.span_queue().map(|q| q.capacity()), Some(7));

        let quiet = Telemetry::new(TelemetryConfig::default()).unwrap();
        assert!(quiet.span_queue().is_none());
        assert!(!scrape(&quiet).contains("deriva_telemetry"));
    }

    /// With or without OTLP export (and its log bridge), the subscriber builds no span that no
    /// layer wants: an unfiltered layer anywhere in the stack would enable every callsite, and
    /// h2's, hyper's and tonic's TRACE spans cost as much CPU as serving a cached Get.
    #[test]
    fn the_subscriber_builds_only_the_spans_its_layers_want() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = runtime.enter();
        for endpoint in [None, Some("http://127.0.0.1:9".to_owned())] {
            let telemetry = Telemetry::new(TelemetryConfig {
                otlp_endpoint: endpoint.clone(),
                log_filter: Some("off".into()),
                ..TelemetryConfig::default()
            })
            .unwrap();
            assert_eq!(telemetry.logger_provider().is_some(), endpoint.is_some());
            let dispatch = telemetry.subscriber(std::io::sink).unwrap();
            let h2 = dispatch.register_callsite(&H2_META);
            let ours = dispatch.register_callsite(&OURS_META);
            assert!(
                h2.is_never(),
                "an h2 TRACE span, export {endpoint:?}: {h2:?}"
            );
            assert!(!ours.is_never(), "Deriva's span, export {endpoint:?}");
        }
    }
}
