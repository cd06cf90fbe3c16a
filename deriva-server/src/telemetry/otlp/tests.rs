//! The unit tests of [`resolve`](super::resolve): the environment and the flags.

use super::*;
use crate::telemetry::TelemetryConfig;

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

    let bad =
        |vars: &[(&str, &str)]| resolve(&with_env(vars, &TelemetryConfig::default())).unwrap_err();
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
