//! Telemetry installation: the OpenTelemetry Resource, the meter provider (a Prometheus reader
//! on a private registry, plus OTLP when an endpoint is set), the tracer provider (sampled,
//! exporting over OTLP when an endpoint is set), and the `tracing` subscriber whose every log
//! line inside a request carries `trace_id` and `span_id`.
//!
//! [`Telemetry::new`] builds everything without touching global state, so tests make their own;
//! only the `deriva-server` binary installs the subscriber globally.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use parking_lot::Mutex;
use tracing::Level;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

use crate::trace_store::TraceStore;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, fmt as tfmt};

/// The span attribute that forces sampling (set when a request carries `x-deriva-trace: force`).
pub const FORCE_TRACE_ATTR: &str = "deriva.force_trace";

/// The filter used when `RUST_LOG` is not set: Deriva at info, the transport crates quiet.
pub const DEFAULT_LOG_FILTER: &str = "info,deriva_server=info,deriva_compute=info,deriva_core=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,opentelemetry=warn,opentelemetry_sdk=warn";

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
        })
    }

    /// The Prometheus registry that `/metrics` serves.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
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
            .with_target("deriva_core", Level::INFO);
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

/// The request id of the current request, carried in the OpenTelemetry context of its spans
/// (set by [`crate::rpc_layer`]), so log lines can name it without formatting span fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// The ids a log line inside a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineIds {
    /// W3C trace id, 32 hex characters.
    pub trace_id: String,
    /// Span id, 16 hex characters.
    pub span_id: String,
    /// The request id, when the line is inside a request.
    pub request_id: Option<Arc<str>>,
}

/// The ids of the current OpenTelemetry context, if a span is active.
pub fn current_ids() -> Option<LineIds> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| LineIds {
        trace_id: sc.trace_id().to_string(),
        span_id: sc.span_id().to_string(),
        request_id: cx.get::<RequestId>().map(|r| r.0.clone()),
    })
}

/// Wraps an event formatter so each line inside a span ends with (text) or starts with (JSON)
/// the current `trace_id` and `span_id`.
#[derive(Debug)]
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(ids) = current_ids() else {
            return writer.write_str(&line);
        };
        let LineIds {
            trace_id,
            span_id,
            request_id,
        } = ids;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        // Request ids are sanitized tokens (see `rpc_layer::request_id`): safe in JSON and text.
        match (body.strip_prefix('{'), request_id) {
            (Some(rest), Some(rid)) => writeln!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",\"request_id\":\"{rid}\",{rest}"
            ),
            (Some(rest), None) => {
                writeln!(
                    writer,
                    "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
                )
            }
            (None, Some(rid)) => {
                writeln!(
                    writer,
                    "{body} trace_id={trace_id} span_id={span_id} request_id={rid}"
                )
            }
            (None, None) => writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}"),
        }
    }
}

/// Sampling: a request marked `x-deriva-trace: force` is always sampled; a span with a parent
/// follows the parent's decision (so a sampled caller is always honored); a new trace is
/// sampled with probability `ratio`, and at most `max_per_second` new traces a second.
#[derive(Debug, Clone)]
pub struct DerivaSampler {
    ratio: Sampler,
    limiter: Option<Arc<RateLimiter>>,
}

impl DerivaSampler {
    /// A sampler for `ratio` (clamped to 0..=1) and an optional rate cap.
    pub fn new(ratio: f64, max_per_second: Option<f64>) -> Self {
        Self {
            ratio: Sampler::TraceIdRatioBased(ratio.clamp(0.0, 1.0)),
            limiter: max_per_second.map(|r| Arc::new(RateLimiter::new(r))),
        }
    }
}

fn decision(sample: bool, parent: Option<&Context>) -> SamplingResult {
    let trace_state = parent
        .filter(|c| c.has_active_span())
        .map(|c| c.span().span_context().trace_state().clone())
        .unwrap_or_default();
    SamplingResult {
        decision: if sample {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        },
        attributes: Vec::new(),
        trace_state,
    }
}

impl ShouldSample for DerivaSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if attributes
            .iter()
            .any(|kv| kv.key.as_str() == FORCE_TRACE_ATTR && kv.value == Value::Bool(true))
        {
            return decision(true, parent);
        }
        if let Some(cx) = parent.filter(|c| c.has_active_span()) {
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                return decision(sc.is_sampled(), parent);
            }
        }
        let by_ratio = self
            .ratio
            .should_sample(parent, trace_id, name, kind, attributes, links);
        let sample = by_ratio.decision == SamplingDecision::RecordAndSample
            && self.limiter.as_ref().is_none_or(|l| l.try_acquire());
        decision(sample, parent)
    }
}

/// A token bucket: `rate` tokens a second, holding at most `max(rate, 1)`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.0);
        Self {
            rate,
            state: Mutex::new((rate.max(1.0), Instant::now())),
        }
    }

    /// Takes a token if one is available.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    /// Takes a token if one is available at `now` (not before the last call's `now`).
    fn try_acquire_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        let now = now.max(state.1);
        let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
        state.0 = (state.0 + refill).min(self.rate.max(1.0));
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

    use super::*;

    fn decide(sampler: &DerivaSampler, parent: Option<&Context>, attrs: &[KeyValue]) -> bool {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let result = sampler.should_sample(parent, trace_id, "rpc", &SpanKind::Server, attrs, &[]);
        result.decision == SamplingDecision::RecordAndSample
    }

    fn remote_parent(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            flags,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn force_wins_and_parents_are_followed() {
        let never = DerivaSampler::new(0.0, None);
        let always = DerivaSampler::new(1.0, None);
        let force = [KeyValue::new(FORCE_TRACE_ATTR, true)];
        assert!(!decide(&never, None, &[]));
        assert!(decide(&never, None, &force));
        assert!(
            decide(&never, Some(&remote_parent(true)), &[]),
            "a sampled caller is honored"
        );
        assert!(
            !decide(&always, Some(&remote_parent(false)), &[]),
            "an unsampled caller too"
        );
        assert!(
            decide(&always, Some(&remote_parent(false)), &force),
            "unless forced"
        );
        assert!(decide(
            &always,
            None,
            &[KeyValue::new(FORCE_TRACE_ATTR, false)]
        ));
    }

    #[test]
    fn the_rate_cap_limits_new_traces_but_not_children_or_forced_ones() {
        // One new trace per 1,000 s: the bucket holds one token, and no test run is slow
        // enough to see it refilled.
        let capped = DerivaSampler::new(1.0, Some(1e-3));
        assert!(decide(&capped, None, &[]));
        assert!(
            !decide(&capped, None, &[]),
            "a second new trace within the period is dropped"
        );
        assert!(decide(&capped, Some(&remote_parent(true)), &[]));
        assert!(decide(
            &capped,
            None,
            &[KeyValue::new(FORCE_TRACE_ATTR, true)]
        ));
    }

    #[test]
    fn the_rate_limiter_refills_at_its_rate_up_to_its_burst() {
        let limiter = RateLimiter::new(2.0);
        let t0 = limiter.state.lock().1;
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        assert!(limiter.try_acquire_at(at(0.0)));
        assert!(limiter.try_acquire_at(at(0.0)));
        assert!(!limiter.try_acquire_at(at(0.0)), "two tokens at first");
        assert!(!limiter.try_acquire_at(at(0.4)), "0.8 of a token");
        assert!(limiter.try_acquire_at(at(0.5)), "one token after 0.5 s");
        assert!(!limiter.try_acquire_at(at(0.5)));
        // A long pause refills only up to the burst of two.
        assert!(limiter.try_acquire_at(at(100.0)));
        assert!(limiter.try_acquire_at(at(100.0)));
        assert!(!limiter.try_acquire_at(at(100.0)));
        // Time never runs backwards for the bucket.
        assert!(!limiter.try_acquire_at(at(50.0)));
    }
}
