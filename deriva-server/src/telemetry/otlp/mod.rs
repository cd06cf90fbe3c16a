//! OTLP export set up the way every OpenTelemetry SDK is: from the standard `OTEL_*`
//! environment, with Deriva's flags winning over it.
//!
//! [`resolve`] reads the environment (through a lookup function, so tests pass a map) and the
//! flags into an [`ExportPlan`]: for each signal, where it goes and how, plus the metric
//! interval, the span batching and the sampler. Everything is then set in code, so the SDK's own
//! reading of the environment never decides anything (it would, for example, let
//! `OTEL_EXPORTER_OTLP_HEADERS` override `--otlp-header`). Values that do not parse are reported
//! as warnings and replaced by the default, as the specification asks; files that cannot be read
//! stop the server at start, naming the variable.
//!
//! Header values are secrets (API keys): they appear in no message, log line or `Debug` output;
//! only their names do.
//!
//! Files: `mod.rs` (the plan's types), `resolve.rs` ([`resolve`]), `exporters.rs` (the SDK's
//! exporters built from the plan), `tests.rs`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

mod exporters;
mod resolve;
#[cfg(test)]
mod tests;

pub use exporters::{log_exporter, metric_exporter, span_exporter};
pub use resolve::resolve;

/// The default OTLP timeout, per export (`OTEL_EXPORTER_OTLP_TIMEOUT`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default metric push interval (`OTEL_METRIC_EXPORT_INTERVAL`). The specification's is
/// 60 s; Deriva's dashboards and alerts are built for 15 s.
pub const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(15);
/// The default bound on one metric export (`OTEL_METRIC_EXPORT_TIMEOUT`).
pub const DEFAULT_METRIC_TIMEOUT: Duration = Duration::from_secs(30);

/// How OTLP travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP over gRPC (port 4317 by convention): Deriva's default.
    #[default]
    #[value(name = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention), to `/v1/traces`,
    /// `/v1/metrics` and `/v1/logs`.
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    /// The name the specification gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// One of the three signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Spans.
    Traces,
    /// Metrics.
    Metrics,
    /// Log records.
    Logs,
}

impl Signal {
    fn upper(self) -> &'static str {
        match self {
            Self::Traces => "TRACES",
            Self::Metrics => "METRICS",
            Self::Logs => "LOGS",
        }
    }

    /// `traces`, `metrics` or `logs`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Traces => "traces",
            Self::Metrics => "metrics",
            Self::Logs => "logs",
        }
    }

    /// The path OTLP/HTTP appends to a base endpoint.
    fn path(self) -> &'static str {
        match self {
            Self::Traces => "/v1/traces",
            Self::Metrics => "/v1/metrics",
            Self::Logs => "/v1/logs",
        }
    }
}

/// Header names only, for `Debug`: the values are secrets.
struct Names<'a>(&'a [(String, String)]);

impl fmt::Debug for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<set>")))
            .finish()
    }
}

/// Where and how one signal is exported.
#[derive(Clone)]
pub struct SignalExport {
    /// Which.
    pub signal: Signal,
    /// How.
    pub protocol: Protocol,
    /// The full URL (for OTLP/HTTP, with the signal's path).
    pub endpoint: String,
    /// Headers (gRPC metadata), lower-case names; the values are secrets.
    pub headers: Vec<(String, String)>,
    /// Per export.
    pub timeout: Duration,
    /// gzip the bodies.
    pub gzip: bool,
    /// A CA to trust (PEM), beside the machine's.
    pub certificate: Option<PathBuf>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for SignalExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalExport")
            .field("signal", &self.signal)
            .field("protocol", &self.protocol)
            .field("endpoint", &deriva_util::redact::redact_url(&self.endpoint))
            .field("headers", &Names(&self.headers))
            .field("timeout", &self.timeout)
            .field("gzip", &self.gzip)
            .field("certificate", &self.certificate)
            .field("client", &self.client)
            .finish()
    }
}

impl SignalExport {
    /// One line for the start-up log: where, how, and the names of the headers set.
    pub fn describe(&self) -> String {
        let endpoint = deriva_util::redact::redact_url(&self.endpoint);
        let mut out = format!("{endpoint} over {}", self.protocol.name());
        if self.gzip {
            out.push_str(", gzip");
        }
        if self.certificate.is_some() {
            out.push_str(", trusting the CA of OTEL_EXPORTER_OTLP_CERTIFICATE");
        }
        if self.client.is_some() {
            out.push_str(", with a client certificate");
        }
        for (name, _) in &self.headers {
            out.push_str(&format!(", header {name} set"));
        }
        out
    }
}

/// The span batching (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanBatching {
    /// Spans held while waiting for export; more are dropped.
    pub max_queue_size: usize,
    /// The most time between exports.
    pub scheduled_delay: Duration,
    /// The most spans in one export.
    pub max_export_batch_size: usize,
}

impl Default for SpanBatching {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            scheduled_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
        }
    }
}

/// Which new traces are recorded (`OTEL_TRACES_SAMPLER`, or `--trace-sample-ratio`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerChoice {
    /// Fraction of new traces (0 to 1).
    pub ratio: f64,
    /// Follow a caller's sampled flag (the `parentbased_*` samplers); `false`: decide by the
    /// ratio alone.
    pub follow_caller: bool,
}

impl Default for SamplerChoice {
    fn default() -> Self {
        Self {
            ratio: 1.0,
            follow_caller: true,
        }
    }
}

/// Everything about export, resolved.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// Spans, if exported.
    pub traces: Option<SignalExport>,
    /// Metrics, if exported.
    pub metrics: Option<SignalExport>,
    /// Log records, if exported.
    pub logs: Option<SignalExport>,
    /// How often metrics are pushed.
    pub metric_interval: Duration,
    /// Span batching.
    pub batching: SpanBatching,
    /// The sampler.
    pub sampler: SamplerChoice,
    /// `OTEL_SDK_DISABLED=true` turned export off.
    pub sdk_disabled: bool,
    /// Values that were ignored, and why (never a header value): logged at start.
    pub warnings: Vec<String>,
}

impl Default for ExportPlan {
    fn default() -> Self {
        Self {
            traces: None,
            metrics: None,
            logs: None,
            metric_interval: DEFAULT_METRIC_INTERVAL,
            batching: SpanBatching::default(),
            sampler: SamplerChoice::default(),
            sdk_disabled: false,
            warnings: Vec::new(),
        }
    }
}
