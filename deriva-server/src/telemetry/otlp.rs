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

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::TelemetryConfig;

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

/// Reads the flags of `config` and its `OTEL_*` variables ([`TelemetryConfig::otel_env`]; an
/// empty value counts as unset, as the specification says).
pub fn resolve(config: &TelemetryConfig) -> Result<ExportPlan, String> {
    let get = |name: &str| {
        config
            .otel_env
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let flags = Flags::of(config);
    let mut plan = ExportPlan::default();
    let mut warnings = Vec::new();

    plan.sdk_disabled = match get("OTEL_SDK_DISABLED").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            warnings.push(format!(
                "OTEL_SDK_DISABLED={v}: expected true or false; taken as false"
            ));
            false
        }
        None => false,
    };

    for signal in [Signal::Traces, Signal::Metrics, Signal::Logs] {
        let export = resolve_signal(signal, &get, &flags, &mut warnings)?;
        let export = export.filter(|_| !plan.sdk_disabled || flags.endpoint.is_some());
        match signal {
            Signal::Traces => plan.traces = export,
            Signal::Metrics => plan.metrics = export,
            Signal::Logs => plan.logs = export,
        }
    }

    let millis = |name: &str, default: Duration, warnings: &mut Vec<String>| match get(name) {
        None => default,
        Some(v) => match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                warnings.push(format!(
                    "{name}={v}: expected a positive number of milliseconds; using {}",
                    default.as_millis()
                ));
                default
            }
        },
    };
    let count = |name: &str, default: usize, warnings: &mut Vec<String>| match get(name) {
        None => default,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                warnings.push(format!(
                    "{name}={v}: expected a positive whole number; using {default}"
                ));
                default
            }
        },
    };
    plan.metric_interval = millis(
        "OTEL_METRIC_EXPORT_INTERVAL",
        DEFAULT_METRIC_INTERVAL,
        &mut warnings,
    );
    let metric_timeout = millis(
        "OTEL_METRIC_EXPORT_TIMEOUT",
        DEFAULT_METRIC_TIMEOUT,
        &mut warnings,
    );
    if let Some(metrics) = &mut plan.metrics {
        metrics.timeout = metrics.timeout.min(metric_timeout);
    }
    let defaults = SpanBatching::default();
    plan.batching = SpanBatching {
        max_queue_size: count(
            "OTEL_BSP_MAX_QUEUE_SIZE",
            defaults.max_queue_size,
            &mut warnings,
        ),
        scheduled_delay: millis(
            "OTEL_BSP_SCHEDULE_DELAY",
            defaults.scheduled_delay,
            &mut warnings,
        ),
        max_export_batch_size: count(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size,
            &mut warnings,
        ),
    };
    if plan.batching.max_export_batch_size > plan.batching.max_queue_size {
        warnings.push(format!(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE={} is larger than the queue ({}): using the queue's size",
            plan.batching.max_export_batch_size, plan.batching.max_queue_size
        ));
        plan.batching.max_export_batch_size = plan.batching.max_queue_size;
    }

    plan.sampler = match flags.sample_ratio {
        Some(ratio) => SamplerChoice {
            ratio,
            follow_caller: true,
        },
        None => sampler(&get, &mut warnings),
    };
    plan.warnings = warnings;
    Ok(plan)
}

/// `OTEL_TRACES_SAMPLER` and its argument, mapped onto Deriva's sampler.
fn sampler(get: &dyn Fn(&str) -> Option<String>, warnings: &mut Vec<String>) -> SamplerChoice {
    let name = get("OTEL_TRACES_SAMPLER").map(|v| v.to_ascii_lowercase());
    let ratio = |warnings: &mut Vec<String>| match get("OTEL_TRACES_SAMPLER_ARG") {
        None => 1.0,
        Some(v) => match v.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                warnings.push(format!(
                    "OTEL_TRACES_SAMPLER_ARG={v}: expected a ratio from 0 to 1; using 1"
                ));
                1.0
            }
        },
    };
    let choice = |ratio, follow_caller| SamplerChoice {
        ratio,
        follow_caller,
    };
    match name.as_deref() {
        None | Some("parentbased_traceidratio") => choice(ratio(warnings), true),
        Some("traceidratio") => choice(ratio(warnings), false),
        Some("always_on") => choice(1.0, false),
        Some("always_off") => choice(0.0, false),
        Some("parentbased_always_on") => choice(1.0, true),
        Some("parentbased_always_off") => choice(0.0, true),
        Some(other) => {
            warnings.push(format!(
                "OTEL_TRACES_SAMPLER={other}: not supported (always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off, parentbased_traceidratio); using \
                 parentbased_traceidratio"
            ));
            choice(ratio(warnings), true)
        }
    }
}

/// The flags of a [`TelemetryConfig`] that [`resolve`] reads, an empty endpoint as none.
struct Flags<'a> {
    endpoint: Option<&'a str>,
    protocol: Option<Protocol>,
    headers: &'a [(String, String)],
    logs: Option<bool>,
    sample_ratio: Option<f64>,
}

impl<'a> Flags<'a> {
    fn of(config: &'a TelemetryConfig) -> Self {
        Self {
            endpoint: config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()),
            protocol: config.otlp_protocol,
            headers: &config.otlp_headers,
            logs: config.otlp_logs,
            sample_ratio: config.sample_ratio,
        }
    }
}

fn resolve_signal(
    signal: Signal,
    get: &dyn Fn(&str) -> Option<String>,
    flags: &Flags<'_>,
    warnings: &mut Vec<String>,
) -> Result<Option<SignalExport>, String> {
    let upper = signal.upper();
    let specific = |option: &str| format!("OTEL_EXPORTER_OTLP_{upper}_{option}");
    let generic = |option: &str| format!("OTEL_EXPORTER_OTLP_{option}");
    // The signal's own variable, else the generic one: (value, the variable it came from).
    let pick = |option: &str| {
        let name = specific(option);
        get(&name).map(|v| (v, name)).or_else(|| {
            let name = generic(option);
            get(&name).map(|v| (v, name))
        })
    };

    let exporter = format!("OTEL_{upper}_EXPORTER");
    match get(&exporter).map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => warnings.push(format!(
            "{exporter}={other}: only otlp and none are supported; using otlp"
        )),
    }
    if signal == Signal::Logs && flags.logs == Some(false) {
        return Ok(None);
    }

    let protocol = match flags.protocol {
        Some(p) => p,
        None => match pick("PROTOCOL") {
            None => Protocol::default(),
            Some((v, _)) if v == "grpc" => Protocol::Grpc,
            Some((v, _)) if v == "http/protobuf" => Protocol::HttpProtobuf,
            Some((v, name)) => {
                warnings.push(format!(
                    "{name}={v}: only grpc and http/protobuf are supported; using grpc"
                ));
                Protocol::Grpc
            }
        },
    };
    let base = |url: &str| match protocol {
        Protocol::Grpc => url.to_owned(),
        Protocol::HttpProtobuf => format!("{}{}", url.trim_end_matches('/'), signal.path()),
    };
    let endpoint = match (flags.endpoint, get(&specific("ENDPOINT"))) {
        (Some(flag), _) => base(flag),
        (_, Some(own)) => own,
        _ => match get(&generic("ENDPOINT")) {
            Some(url) => base(&url),
            None => return Ok(None),
        },
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!(
            "the OTLP {} endpoint {:?} must start with http:// or https://",
            signal.name(),
            deriva_util::redact::redact_url(&endpoint)
        ));
    }

    // Headers: the generic ones, then the signal's own, then the flags', a later one replacing
    // an earlier one of the same name.
    let mut headers = BTreeMap::new();
    for name in [generic("HEADERS"), specific("HEADERS")] {
        if let Some(list) = get(&name) {
            for (key, value) in parse_headers(&list, &name, warnings) {
                headers.insert(key, value);
            }
        }
    }
    for (key, value) in flags.headers {
        headers.insert(key.to_ascii_lowercase(), value.clone());
    }
    for key in headers.keys() {
        check_header_name(key)?;
    }

    let timeout = match pick("TIMEOUT") {
        None => DEFAULT_TIMEOUT,
        Some((v, name)) => match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                warnings.push(format!(
                    "{name}={v}: expected a positive number of milliseconds; using 10000"
                ));
                DEFAULT_TIMEOUT
            }
        },
    };
    let gzip = match pick("COMPRESSION") {
        None => false,
        Some((v, _)) if v == "gzip" => true,
        Some((v, _)) if v == "none" => false,
        Some((v, name)) => {
            warnings.push(format!(
                "{name}={v}: only gzip and none are supported; using none"
            ));
            false
        }
    };
    let certificate = pick("CERTIFICATE").map(|(v, _)| PathBuf::from(v));
    let client = match (pick("CLIENT_CERTIFICATE"), pick("CLIENT_KEY")) {
        (None, None) => None,
        (Some((cert, _)), Some((key, _))) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (Some((_, name)), None) => {
            return Err(format!("{name} is set without {}", specific("CLIENT_KEY")));
        }
        (None, Some((_, name))) => {
            return Err(format!(
                "{name} is set without {}",
                specific("CLIENT_CERTIFICATE")
            ));
        }
    };
    Ok(Some(SignalExport {
        signal,
        protocol,
        endpoint,
        headers: headers.into_iter().collect(),
        timeout,
        gzip,
        certificate,
        client,
    }))
}

/// `key=value` pairs separated by commas, values percent-decoded (the W3C baggage format the
/// specification names). A pair that does not read is skipped with a warning that names the
/// key, never the value.
fn parse_headers(list: &str, variable: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, item) in list.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            warnings.push(format!("{variable}: entry {} has no '=': skipped", i + 1));
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        match deriva_util::escape::percent_decode(value.trim()) {
            Some(value) if !key.is_empty() => out.push((key, value)),
            _ => warnings.push(format!(
                "{variable}: the value of entry {} ({key:?}) does not decode: skipped",
                i + 1
            )),
        }
    }
    out
}

/// A header name HTTP/2 and gRPC take: lower-case token characters.
fn check_header_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "OTLP header name {name:?} is not a valid header name"
        ))
    }
}

/// Reads a PEM file named by the variable behind `what`.
fn read_pem(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Why the `kind` exporter of `export` could not be built, its endpoint redacted (also where
/// the exporter's own message quotes it).
fn build_error(kind: &str, export: &SignalExport, e: impl fmt::Display) -> String {
    let endpoint = deriva_util::redact::redact_url(&export.endpoint);
    let message = e.to_string().replace(&export.endpoint, &endpoint);
    format!("the OTLP {kind} exporter for {endpoint}: {message}")
}

/// The span exporter for `export`.
pub fn span_exporter(export: &SignalExport) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("traces", export, e))
}

/// The metric exporter for `export`.
pub fn metric_exporter(
    export: &SignalExport,
) -> Result<opentelemetry_otlp::MetricExporter, String> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("metrics", export, e))
}

/// The log exporter for `export`.
pub fn log_exporter(export: &SignalExport) -> Result<opentelemetry_otlp::LogExporter, String> {
    let builder = opentelemetry_otlp::LogExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("logs", export, e))
}

/// gRPC: TLS for https (the machine's CAs, plus `…_CERTIFICATE`), gzip, and the headers set by
/// an interceptor that runs after the exporter adds the environment's, so ours win.
fn grpc<B>(builder: B, export: &SignalExport) -> Result<B, String>
where
    B: opentelemetry_otlp::WithExportConfig + opentelemetry_otlp::WithTonicConfig,
{
    use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
    let mut builder = builder
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout);
    if export.gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    if export.endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &export.certificate {
            let pem = read_pem(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &export.client {
            let cert = read_pem(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
            let key = read_pem(key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?;
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        builder = builder.with_tls_config(tls);
    }
    let mut metadata = MetadataMap::new();
    for (name, value) in &export.headers {
        let key: AsciiMetadataKey = name
            .parse()
            .map_err(|_| format!("OTLP header name {name:?} is not a valid gRPC metadata key"))?;
        let value: AsciiMetadataValue = value.parse().map_err(|_| {
            format!("the value of OTLP header {name} is not valid in gRPC metadata")
        })?;
        metadata.insert(key, value);
    }
    Ok(
        builder.with_interceptor(move |mut request: tonic::Request<()>| {
            for kv in metadata.iter() {
                if let tonic::metadata::KeyAndValueRef::Ascii(key, value) = kv {
                    request.metadata_mut().insert(key.clone(), value.clone());
                }
            }
            Ok(request)
        }),
    )
}

/// OTLP/HTTP: a blocking client of our own (the exporters run on threads of their own), with
/// the CA and client certificate, that sets our headers last, so they win.
fn http<B>(builder: B, export: &SignalExport) -> Result<B, String>
where
    B: opentelemetry_otlp::WithExportConfig + opentelemetry_otlp::WithHttpConfig,
{
    let mut builder = builder
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if export.gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    // reqwest is built without a crypto provider of its own (no aws-lc): it takes the
    // process's, which is ring. Installing it again is a no-op (the Err says one is set).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::blocking::Client::builder().timeout(export.timeout);
    if let Some(ca) = &export.certificate {
        let pem = read_pem(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {}: {e}", ca.display()))?;
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = &export.client {
        let mut pem = read_pem(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
        pem.push(b'\n');
        pem.extend(read_pem(key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            format!(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE {}: {e}",
                cert.display()
            )
        })?;
        client = client.identity(identity);
    }
    // Built (and so its runtime started) on a thread of its own: a blocking client may not be
    // made inside the async runtime.
    let client = std::thread::spawn(move || client.build())
        .join()
        .map_err(|_| "the OTLP/HTTP client: its builder panicked".to_owned())?
        .map_err(|e| format!("the OTLP/HTTP client: {e}"))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &export.headers {
        let name = http::HeaderName::try_from(name.as_str())
            .map_err(|_| format!("OTLP header name {name:?} is not a valid header name"))?;
        let mut value = http::HeaderValue::try_from(value.as_str())
            .map_err(|_| format!("the value of OTLP header {name} is not a valid header value"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(builder.with_http_client(HeaderClient { client, headers }))
}

/// An OTLP/HTTP client that sets Deriva's headers on every request, over those the exporter
/// set (from the environment).
struct HeaderClient {
    client: reqwest::blocking::Client,
    headers: http::HeaderMap,
}

impl fmt::Debug for HeaderClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderClient")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HeaderClient {
    async fn send_bytes(
        &self,
        mut request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        for (name, value) in &self.headers {
            request.headers_mut().insert(name, value.clone());
        }
        self.client.send_bytes(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_env(vars: &[(&str, &str)], flags: &TelemetryConfig) -> TelemetryConfig {
        TelemetryConfig {
            otel_env: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..flags.clone()
        }
    }

    fn plan(vars: &[(&str, &str)], flags: &TelemetryConfig) -> ExportPlan {
        resolve(&with_env(vars, flags)).unwrap()
    }

    #[test]
    fn nothing_set_exports_nothing() {
        let p = plan(&[], &TelemetryConfig::default());
        assert!(p.traces.is_none() && p.metrics.is_none() && p.logs.is_none());
        assert_eq!(p.metric_interval, DEFAULT_METRIC_INTERVAL);
        assert_eq!(p.sampler, SamplerChoice::default());
        assert_eq!(p.batching, SpanBatching::default());
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let p = plan(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                (
                    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                    "https://logs.example/custom",
                ),
            ],
            &TelemetryConfig::default(),
        );
        assert_eq!(
            p.traces.unwrap().endpoint,
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            p.metrics.unwrap().endpoint,
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(p.logs.unwrap().endpoint, "https://logs.example/custom");

        // gRPC takes the endpoint as it is; the flag wins over every variable.
        let flags = TelemetryConfig {
            otlp_endpoint: Some("http://flag:4317".into()),
            ..TelemetryConfig::default()
        };
        let p = plan(
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://env:1")],
            &flags,
        );
        assert_eq!(p.traces.unwrap().endpoint, "http://flag:4317");

        // A signal's own endpoint alone exports that signal alone.
        let p = plan(
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4317")],
            &TelemetryConfig::default(),
        );
        assert!(p.traces.is_none() && p.logs.is_none());
        assert_eq!(p.metrics.unwrap().protocol, Protocol::Grpc);
    }

    #[test]
    fn headers_merge_and_flags_win() {
        let flags = TelemetryConfig {
            otlp_endpoint: Some("http://c:4317".into()),
            otlp_headers: vec![("X-Tenant".into(), "from-flag".into())],
            ..TelemetryConfig::default()
        };
        let p = plan(
            &[
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-api-key=a%20b,x-tenant=env, broken",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=traces-only"),
            ],
            &flags,
        );
        let traces = p.traces.unwrap();
        assert_eq!(
            traces.headers,
            vec![
                ("x-api-key".to_owned(), "traces-only".to_owned()),
                ("x-tenant".to_owned(), "from-flag".to_owned())
            ]
        );
        assert_eq!(
            p.metrics.unwrap().headers[0],
            ("x-api-key".to_owned(), "a b".to_owned())
        );
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings); // "broken", once per signal
        // Values appear nowhere but in the headers themselves.
        let debug = format!("{traces:?} {:?} {}", p.warnings, traces.describe());
        assert!(
            !debug.contains("traces-only") && !debug.contains("from-flag"),
            "{debug}"
        );
        assert!(debug.contains("header x-api-key set"), "{debug}");
    }

    #[test]
    fn options_and_their_mistakes() {
        let p = plan(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "soon"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "zstd"),
                ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
                ("OTEL_METRIC_EXPORT_TIMEOUT", "500"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_SCHEDULE_DELAY", "250"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "400"),
                ("OTEL_LOGS_EXPORTER", "none"),
            ],
            &TelemetryConfig::default(),
        );
        let traces = p.traces.unwrap();
        assert_eq!(traces.timeout, Duration::from_millis(2500));
        assert!(traces.gzip);
        // A bad value is the default, then bounded by the metric export timeout.
        assert_eq!(p.metrics.unwrap().timeout, Duration::from_millis(500));
        assert!(p.logs.is_none());
        assert_eq!(p.metric_interval, Duration::from_secs(1));
        assert_eq!(
            p.batching,
            SpanBatching {
                max_queue_size: 100,
                scheduled_delay: Duration::from_millis(250),
                max_export_batch_size: 100,
            }
        );
        let warnings = p.warnings.join("\n");
        assert!(
            warnings.contains("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT=soon"),
            "{warnings}"
        );
        assert!(
            warnings.contains("OTEL_BSP_MAX_EXPORT_BATCH_SIZE=400"),
            "{warnings}"
        );
        assert!(!warnings.contains("zstd"), "logs are off: {warnings}");

        let bad = |vars: &[(&str, &str)]| {
            resolve(&with_env(vars, &TelemetryConfig::default())).unwrap_err()
        };
        assert!(bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]).contains("http://"));
        assert!(
            bad(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
            ])
            .contains("without OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY")
        );
        assert!(
            bad(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=1"),
            ])
            .contains("not a valid header name")
        );
    }

    #[test]
    fn sdk_disabled_and_samplers() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        let p = plan(&env, &TelemetryConfig::default());
        assert!(p.sdk_disabled && p.traces.is_none() && p.metrics.is_none() && p.logs.is_none());
        // The flag wins.
        let flags = TelemetryConfig {
            otlp_endpoint: Some("http://c:4317".into()),
            ..TelemetryConfig::default()
        };
        assert!(plan(&env, &flags).traces.is_some());

        let sampler = |name: &str, arg: &str| {
            plan(
                &[
                    ("OTEL_TRACES_SAMPLER", name),
                    ("OTEL_TRACES_SAMPLER_ARG", arg),
                ],
                &TelemetryConfig::default(),
            )
            .sampler
        };
        let s = |ratio, follow_caller| SamplerChoice {
            ratio,
            follow_caller,
        };
        assert_eq!(sampler("parentbased_traceidratio", "0.25"), s(0.25, true));
        assert_eq!(sampler("traceidratio", "0.5"), s(0.5, false));
        assert_eq!(sampler("always_on", ""), s(1.0, false));
        assert_eq!(sampler("always_off", ""), s(0.0, false));
        assert_eq!(sampler("parentbased_always_off", ""), s(0.0, true));
        assert_eq!(sampler("jaeger_remote", "0.5"), s(0.5, true));
        assert_eq!(sampler("traceidratio", "2"), s(1.0, false));
        let flags = TelemetryConfig {
            sample_ratio: Some(0.1),
            ..TelemetryConfig::default()
        };
        assert_eq!(
            plan(&[("OTEL_TRACES_SAMPLER", "always_off")], &flags).sampler,
            s(0.1, true)
        );
    }
}
