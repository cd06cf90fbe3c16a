//! [`resolve`]: the flags and the `OTEL_*` environment read into an [`ExportPlan`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{
    DEFAULT_METRIC_INTERVAL, DEFAULT_METRIC_TIMEOUT, DEFAULT_TIMEOUT, ExportPlan, Protocol,
    SamplerChoice, Signal, SignalExport, SpanBatching,
};
use crate::telemetry::TelemetryConfig;

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
