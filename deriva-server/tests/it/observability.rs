//! The observability pipeline against the real server function on port 0: /metrics and the
//! health endpoints over HTTP, the RPC telemetry layer, propagation, logs with trace ids, and
//! spans received by a real OTLP receiver. Every test builds its own providers, registry and
//! subscriber; nothing global is read or installed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_compute::FunctionRegistry;
use deriva_compute::testing::{Gate, wait_until};
use deriva_core::{CAddr, FunctionId};
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{ExplainRequest, GetRequest, PutRecipeRequest, StatusRequest};
use deriva_server::telemetry::{LogFormat, TelemetryConfig};
use deriva_testkit::{InProcess, families, http_get, sample};
use fake_opentelemetry_collector::FakeCollectorServer;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// The server with telemetry of its own built from `telemetry`, and the HTTP listener.
async fn observed(telemetry: TelemetryConfig) -> InProcess {
    InProcess::builder()
        .telemetry(telemetry)
        .http()
        .start()
        .await
}

/// [`observed`] exporting to `collector` and sampling nothing new
/// (`--trace-sample-ratio 0`).
async fn unsampled(collector: &FakeCollectorServer) -> InProcess {
    observed(TelemetryConfig {
        otlp_endpoint: Some(collector.endpoint()),
        sample_ratio: Some(0.0),
        ..TelemetryConfig::default()
    })
    .await
}

/// [`observed`] with the default telemetry settings.
async fn plain() -> InProcess {
    observed(TelemetryConfig::default()).await
}

fn get_req(addr: &Bytes) -> tonic::Request<GetRequest> {
    tonic::Request::new(GetRequest { addr: addr.clone() })
}

/// Polls `/metrics` until `series` has `want`.
pub(crate) async fn wait_sample(obs: &InProcess, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = sample(&obs.scrape().await, series);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_answers_200_with_the_prometheus_format() {
    let obs = plain().await;
    let resp = http_get(obs.http_addr(), "/metrics").await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    // Registry initialized: counters and gauges exist before any traffic.
    for family in [
        "deriva_rpc_total",
        "deriva_cache_total",
        "deriva_rpc_active",
        "deriva_dag_recipes",
        "deriva_storage_blobs",
    ] {
        assert!(
            resp.body.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    assert_eq!(
        sample(&resp.body, r#"deriva_rpc_total{method="get",status="ok"}"#),
        Some(0.0)
    );
    assert!(!resp.body.contains("otel_scope"), "no otel_scope_* labels");
    assert!(!resp.body.contains("target_info"));
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_total_counts_ok_and_error_and_the_gauge_returns_to_zero() {
    let mut obs = plain().await;
    let a = obs.put(b"abc").await;
    obs.get_with_metadata(get_req(&a)).await.unwrap();
    let err = obs
        .get_with_metadata(get_req(&Bytes::from(vec![1u8; 31])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = obs
        .get_with_metadata(get_req(&Bytes::from(vec![1u8; 32])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let text = obs.scrape().await;
    assert_eq!(
        sample(&text, r#"deriva_rpc_total{method="get",status="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_rpc_total{method="get",status="error"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_rpc_total{method="put_leaf",status="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_rpc_duration_seconds_count{method="get"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_rpc_active{method="get"}"#),
        Some(0.0)
    );
    for le in [
        "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "+Inf",
    ] {
        let line = format!("deriva_rpc_duration_seconds_bucket{{method=\"get\",le=\"{le}\"}}");
        assert!(text.contains(&line), "missing {line}");
    }
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_stream_counts_as_error_and_releases_the_gauge() {
    let mut obs = plain().await;
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let leaf = obs.put(&mib).await;
    let req = PutRecipeRequest {
        function_name: "repeat".into(),
        function_version: "v1".into(),
        inputs: vec![leaf],
        params: [("count".to_string(), "16".to_string())].into(),
    };
    let big = obs.client.put_recipe(req).await.unwrap().into_inner().addr;
    let mut stream = obs
        .client
        .get(GetRequest { addr: big })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    wait_sample(&obs, r#"deriva_rpc_active{method="get"}"#, 1.0).await;
    drop(stream);
    wait_sample(&obs, r#"deriva_rpc_active{method="get"}"#, 0.0).await;
    wait_sample(
        &obs,
        r#"deriva_rpc_total{method="get",status="error"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &obs.scrape().await,
            r#"deriva_rpc_total{method="get",status="ok"}"#
        ),
        Some(0.0)
    );
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_shows_every_documented_family_as_the_readme_says() {
    let mut obs = plain().await;
    let a = obs.put(b"hello ").await;
    let b = obs.put(b"world").await;
    let ab = obs.recipe("concat", &[&a, &b], &[]).await;
    assert_eq!(
        obs.get_with_metadata(get_req(&ab)).await.unwrap().0,
        b"hello world"
    );
    obs.get_with_metadata(get_req(&ab)).await.unwrap();
    obs.client
        .verify(deriva_server::proto::VerifyRequest { addr: ab.clone() })
        .await
        .unwrap();
    // A collection, so that its duration histogram exists; its grace period keeps everything.
    let gc = obs
        .client
        .garbage_collect(deriva_server::proto::GcRequest {
            grace_period_secs: 3600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((gc.blobs_removed, gc.recipes_removed), (0, 0));
    let text = obs.scrape().await;
    let live = families(&text);

    // The main table, and the storage backends' families, which have a table of their own
    // (checked against a remote node by tests/it/cluster.rs): a local node has them too.
    let storage = deriva_testkit::readme_metrics("### Storage backend metrics");
    for backend in ["redb", "files"] {
        let series =
            format!("deriva_backend_request_duration_seconds_count{{backend=\"{backend}\"");
        assert!(
            text.lines().any(|l| l.starts_with(&series)),
            "no {backend} calls measured:\n{text}"
        );
    }
    let documented = deriva_testkit::readme_metrics("### Metrics reference");
    assert_eq!(documented.len(), 55, "README metrics table rows");
    for (name, kind, buckets) in &documented {
        let found = live
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is documented but not on /metrics"));
        assert_eq!(&found.1, kind, "type of {name}");
        if kind == "histogram" && buckets != "as input bytes" {
            let les: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
                .filter_map(|l| {
                    l.split("le=\"")
                        .nth(1)?
                        .split('"')
                        .next()
                        .map(str::to_owned)
                })
                .collect();
            for le in buckets.split(", ") {
                assert!(
                    les.iter().any(|x| x == le),
                    "{name}: bucket {le} missing in {les:?}"
                );
            }
        }
    }
    for (name, _) in &live {
        assert!(
            documented.iter().chain(&storage).any(|(n, _, _)| n == name),
            "{name} is on /metrics but not in the README"
        );
    }
    assert!(sample(&text, r#"deriva_rpc_total{method="get",status="ok"}"#).unwrap() >= 2.0);
    assert!(sample(&text, "deriva_cache_hit_total").unwrap() >= 1.0);
    assert!(sample(&text, "deriva_cache_miss_total").unwrap() >= 1.0);
    assert_eq!(sample(&text, "deriva_dag_recipes"), Some(1.0));
    assert_eq!(sample(&text, "deriva_storage_blobs"), Some(2.0));
    // The two small leaves went through the group commit: one or two commits.
    let commits = sample(&text, "deriva_storage_leaf_commits_total").unwrap();
    assert!((1.0..=2.0).contains(&commits), "{commits} leaf commits");
    assert_eq!(sample(&text, "deriva_storage_blob_bytes"), Some(11.0));
    assert_eq!(
        sample(&text, "deriva_dag_insert_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"deriva_compute_duration_seconds_count{function="concat/v1"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_verification_total{result="pass"}"#),
        Some(1.0)
    );
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_request_and_trace_ids() {
    let mut obs = plain().await;
    let a = obs.put(b"x").await;
    // Streaming, with the caller's request id.
    let mut req = get_req(&a);
    req.metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("req-42"));
    let (_, meta) = obs.get_with_metadata(req).await.unwrap();
    assert_eq!(meta.get("x-request-id").unwrap(), "req-42");
    let trace_id = meta.get("x-trace-id").unwrap().to_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32);
    // Unary, without one: a UUID is generated.
    let resp = obs.client.status(StatusRequest {}).await.unwrap();
    let generated = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(generated.len(), 36, "{generated}");
    assert!(resp.metadata().get("x-trace-id").is_some());
    // A hostile request id is replaced, not echoed.
    let mut req = tonic::Request::new(StatusRequest {});
    req.metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("a\"b c"));
    let resp = obs.client.status(req).await.unwrap();
    assert_ne!(resp.metadata().get("x-request-id").unwrap(), "a\"b c");
    // Errors too.
    let err = obs
        .get_with_metadata(get_req(&Bytes::from(vec![1u8; 32])))
        .await
        .unwrap_err();
    assert!(
        err.metadata().get("x-request-id").is_some() && err.metadata().get("x-trace-id").is_some()
    );
    // Log lines of a request carry its trace id.
    let logs = obs.logs.text();
    let line = logs
        .lines()
        .find(|l| l.contains("rpc finished") && l.contains(&trace_id))
        .unwrap_or_else(|| panic!("no log line with {trace_id}:\n{logs}"));
    assert!(line.contains("span_id="), "{line}");
    assert!(
        line.contains("request_id=req-42"),
        "the request id names the line: {line}"
    );
    assert!(line.contains("method=get"), "{line}");
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints() {
    let obs = plain().await;
    let health = http_get(obs.http_addr(), "/health").await.unwrap();
    assert_eq!(health.status, 200);
    let json: serde_json::Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["dag_recipes"], 0);
    assert_eq!(json["cache_entries"], 0);
    assert!(json["uptime_seconds"].is_u64());
    assert_eq!(
        http_get(obs.http_addr(), "/healthz").await.unwrap().status,
        200
    );
    assert_eq!(
        http_get(obs.http_addr(), "/readyz").await.unwrap().status,
        200
    );
    // Break the store under the server: /health must say so, once the last probe's outcome
    // (kept for a second) is stale.
    std::fs::remove_dir_all(obs.dir().join("blobs")).unwrap();
    let broken = Instant::now();
    let health = loop {
        let health = http_get(obs.http_addr(), "/health").await.unwrap();
        if health.status != 200 || broken.elapsed() > deriva_testkit::DEADLINE {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health.status, 503);
    let json: serde_json::Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!(json["status"], "unhealthy");
    assert!(
        json["reason"].as_str().unwrap().contains("blob directory"),
        "{json}"
    );
    obs.stop().await;
}

/// An exported attribute's value as a plain string. The receiver stores each value as the
/// `Debug` text of the OTLP `AnyValue` (`Some(AnyValue { value: Some(StringValue("x")) })`).
fn attr(span: &fake_opentelemetry_collector::ExportedSpan, key: &str) -> Option<String> {
    let raw = span.attributes.get(key)?;
    let inner = ["StringValue(", "IntValue(", "BoolValue(", "DoubleValue("]
        .iter()
        .find_map(|tag| raw.split_once(tag).map(|(_, rest)| rest))?;
    let value = inner.split(')').next()?;
    Some(value.trim_matches('"').to_owned())
}

fn traceparent(trace: &str, span: &str) -> MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace}-{span}-01").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_one_get_reach_a_real_otlp_receiver_as_one_tree() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let mut obs = observed(TelemetryConfig {
        otlp_endpoint: Some(collector.endpoint()),
        log_format: LogFormat::Json,
        // Only the forced request below is sampled, so the receiver sees exactly its spans.
        sample_ratio: Some(0.0),
        // With the local store's calls as client spans, which the checks below look for.
        trace_local_store: true,
        ..TelemetryConfig::default()
    })
    .await;
    let a = obs.put(b"hello ").await;
    let c = obs.put(b"dlrow").await;
    let b = obs.recipe("reverse", &[&c], &[]).await;
    let top = obs.recipe("concat", &[&a, &b], &[]).await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = get_req(&top);
    req.metadata_mut()
        .insert("traceparent", traceparent(caller_trace, caller_span));
    let (bytes, meta) = obs.get_with_metadata(req).await.unwrap();
    assert_eq!(bytes, b"hello world");
    assert_eq!(meta.get("x-trace-id").unwrap(), caller_trace);
    obs.telemetry().tracer_provider().force_flush().unwrap();
    let spans = collector.exported_spans(12, Duration::from_secs(60)).await;

    assert!(
        spans.iter().all(|s| s.trace_id == caller_trace),
        "one trace, the caller's"
    );
    let rpc = spans
        .iter()
        .find(|s| s.name == "deriva.Deriva/Get")
        .expect("the RPC span");
    assert_eq!(
        rpc.parent_span_id, caller_span,
        "the RPC span continues the caller's span"
    );
    assert_eq!(rpc.kind, "SPAN_KIND_SERVER");
    assert_eq!(attr(rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(rpc, "rpc.service").as_deref(), Some("deriva.Deriva"));
    assert_eq!(attr(rpc, "rpc.method").as_deref(), Some("Get"));
    assert_eq!(attr(rpc, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert!(rpc.attributes.contains_key("request_id"));

    let children_of = |id: &str| -> Vec<&fake_opentelemetry_collector::ExportedSpan> {
        spans.iter().filter(|s| s.parent_span_id == id).collect()
    };
    let materialize: Vec<_> = children_of(&rpc.span_id)
        .into_iter()
        .filter(|s| s.name == "materialize")
        .collect();
    assert_eq!(materialize.len(), 1, "one materialize under the RPC span");
    let root = materialize[0];
    assert_eq!(
        attr(root, "addr"),
        Some(CAddr::from_slice(&top).unwrap().to_string())
    );
    // The engine's spans; the store's calls to its backend (client spans of
    // deriva_store::observe, here the local redb and files) are counted apart.
    let (store_calls, engine): (Vec<_>, Vec<_>) = children_of(&root.span_id)
        .into_iter()
        .partition(|s| attr(s, "db.system.name").is_some() || attr(s, "deriva.store.op").is_some());
    assert!(
        store_calls
            .iter()
            .any(|s| attr(s, "db.system.name").as_deref() == Some("redb")),
        "no redb transaction under the recipe's materialize: {store_calls:#?}"
    );
    let mut names: Vec<&str> = engine.into_iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cache_check",
            "cache_put",
            "compute",
            "leaf_read",
            "materialize",
            "materialize"
        ]
    );
    for input in [&a, &b] {
        let hex = CAddr::from_slice(input).unwrap().to_string();
        let span = children_of(&root.span_id)
            .into_iter()
            .find(|s| s.name == "materialize" && attr(s, "addr").as_ref() == Some(&hex))
            .unwrap_or_else(|| panic!("no child materialize for input {hex}"));
        assert_eq!(attr(span, "depth").as_deref(), Some("1"));
    }
    let compute = children_of(&root.span_id)
        .into_iter()
        .find(|s| s.name == "compute")
        .unwrap();
    assert_eq!(attr(compute, "function").as_deref(), Some("concat/v1"));

    // The JSON log lines of that request carry the same trace id.
    let logs = obs.logs.text();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let finished = lines
        .iter()
        .find(|l| l["fields"]["message"] == "rpc finished" && l["trace_id"] == caller_trace)
        .unwrap_or_else(|| {
            panic!("no JSON log line of the Get with trace_id {caller_trace}:\n{logs}")
        });
    assert_eq!(finished["span_id"], rpc.span_id.as_str());
    assert_eq!(
        finished["request_id"].as_str(),
        Some(attr(rpc, "request_id").unwrap().as_str())
    );
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_root() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let mut obs = unsampled(&collector).await;
    let a = obs.put(b"x").await;
    let mut req = get_req(&a);
    req.metadata_mut().insert(
        "traceparent",
        MetadataValue::from_static("00-zzzz-not-a-trace-01"),
    );
    req.metadata_mut()
        .insert("x-deriva-trace", MetadataValue::from_static("force"));
    let (_, meta) = obs.get_with_metadata(req).await.unwrap();
    obs.telemetry().tracer_provider().force_flush().unwrap();
    let spans = collector.exported_spans(1, Duration::from_secs(60)).await;
    let rpc = spans
        .iter()
        .find(|s| s.name == "deriva.Deriva/Get")
        .expect("the forced RPC span");
    assert_eq!(rpc.parent_span_id, "", "a root span");
    assert_eq!(
        meta.get("x-trace-id").unwrap().to_str().unwrap(),
        rpc.trace_id
    );
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_exports_nothing_unless_forced_and_a_sampled_caller_is_honored() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let mut obs = unsampled(&collector).await;
    let a = obs.put(b"x").await;
    for _ in 0..5 {
        obs.get_with_metadata(get_req(&a)).await.unwrap();
    }
    obs.telemetry().tracer_provider().force_flush().unwrap();
    assert!(
        collector
            .exported_spans(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "ratio 0: nothing sampled"
    );

    let mut req = get_req(&a);
    req.metadata_mut().insert(
        "traceparent",
        traceparent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
    );
    obs.get_with_metadata(req).await.unwrap();
    obs.telemetry().tracer_provider().force_flush().unwrap();
    let spans = collector.exported_spans(1, Duration::from_secs(60)).await;
    assert!(
        spans
            .iter()
            .any(|s| s.name == "deriva.Deriva/Get"
                && s.trace_id == "0af7651916cd43dd8448eb211c80319c")
    );
    obs.stop().await;
}

/// Starts a server exporting to `endpoint`, runs `during` (e.g. killing the collector) between
/// two batches of Gets that must all succeed, then checks shutdown stays within its bound.
async fn serve_through_collector_trouble(endpoint: String, during: impl FnOnce()) {
    let mut obs = observed(TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        metric_export_interval: Some(Duration::from_millis(200)),
        ..TelemetryConfig::default()
    })
    .await;
    let a = obs.put(b"still serving").await;
    obs.get_with_metadata(get_req(&a)).await.unwrap();
    during();
    for _ in 0..20 {
        assert_eq!(
            obs.get_with_metadata(get_req(&a)).await.unwrap().0,
            b"still serving"
        );
    }
    let telemetry = obs.telemetry().clone();
    obs.stop().await;
    let start = Instant::now();
    telemetry.shutdown(Duration::from_secs(5)).await;
    let took = start.elapsed();
    // Bounded by the one 5 s timeout (the two providers' own timeouts, one after the other,
    // would allow 10 s), with room for a busy machine.
    assert!(took < Duration::from_secs(8), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_nothing_but_telemetry() {
    serve_through_collector_trouble(format!("http://{}", deriva_testkit::NOWHERE), || {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_dying_mid_run_does_not_stop_serving() {
    let collector = FakeCollectorServer::start().await.unwrap();
    serve_through_collector_trouble(collector.endpoint(), move || collector.abort()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_log_lines_inside_a_request_carry_trace_and_span_ids() {
    let mut obs = plain().await;
    let a = obs.put(b"x").await;
    let (_, meta) = obs.get_with_metadata(get_req(&a)).await.unwrap();
    let trace_id = meta.get("x-trace-id").unwrap().to_str().unwrap().to_owned();
    let logs = obs.logs.text();
    let line = logs
        .lines()
        .find(|l| l.contains("rpc finished") && l.contains(&format!("trace_id={trace_id}")));
    let line = line.unwrap_or_else(|| panic!("no text line with trace_id={trace_id}:\n{logs}"));
    assert!(line.contains(" span_id="), "{line}");
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_traces_returns_the_same_tree_as_explain() {
    let mut obs = plain().await;
    let a = obs.put(b"hello ").await;
    let c = obs.put(b"dlrow").await;
    let b = obs.recipe("reverse", &[&c], &[]).await;
    let top = obs.recipe("concat", &[&a, &b], &[]).await;
    obs.get_with_metadata(get_req(&b)).await.unwrap(); // one input cached, the other a leaf
    let (_, meta) = obs.get_with_metadata(get_req(&top)).await.unwrap();
    let trace_id = meta.get("x-trace-id").unwrap().to_str().unwrap().to_owned();

    let explained = obs
        .client
        .explain(ExplainRequest {
            trace_id: trace_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.method, "Get");
    let names: Vec<&str> = explained.spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "materialize").count(),
        3,
        "{names:?}"
    );

    let listed = http_get(obs.http_addr(), "/debug/traces").await.unwrap();
    assert_eq!(listed.status, 200);
    let lists: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    assert!(
        lists["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["trace_id"] == trace_id.as_str())
    );

    let one = http_get(obs.http_addr(), &format!("/debug/traces/{trace_id}"))
        .await
        .unwrap();
    assert_eq!(one.status, 200);
    let json: serde_json::Value = serde_json::from_str(&one.body).unwrap();
    let spans = json["spans"].as_array().unwrap();
    assert_eq!(spans.len(), explained.spans.len());
    for (http_span, rpc_span) in spans.iter().zip(&explained.spans) {
        assert_eq!(http_span["name"], rpc_span.name.as_str());
        assert_eq!(http_span["id"], rpc_span.id);
        assert_eq!(http_span["parent"].as_u64().unwrap_or(0), rpc_span.parent);
        assert_eq!(http_span["duration_us"], rpc_span.duration_us);
    }
    let unknown = obs
        .client
        .explain(ExplainRequest {
            trace_id: "0".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad = obs
        .client
        .explain(ExplainRequest {
            trace_id: "xyz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    obs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_materialization_links_to_the_computing_span() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let gate = Gate::new();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(FunctionId::new("gate", "v1").unwrap(), gate.function());
    let mut obs = InProcess::builder()
        .telemetry(TelemetryConfig {
            otlp_endpoint: Some(collector.endpoint()),
            sample_ratio: Some(0.0),
            ..TelemetryConfig::default()
        })
        .http()
        .functions(functions)
        .start()
        .await;
    let a = obs.put(b"x").await;
    let slow = obs.recipe("gate", &[&a], &[]).await;
    let forced_get = |mut client: DerivaClient<Channel>| {
        let mut req = get_req(&slow);
        req.metadata_mut()
            .insert("x-deriva-trace", MetadataValue::from_static("force"));
        tokio::spawn(async move {
            let mut stream = client.get(req).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        })
    };
    // The first Get computes (held by the gate); the second joins it; then the gate opens.
    let first = forced_get(obs.client.clone());
    gate.wait_started(1).await;
    let joined = forced_get(obs.client.clone());
    wait_until("the second Get joins the first", || {
        obs.logs
            .text()
            .contains("joined an in-flight materialization")
    })
    .await;
    gate.open();
    first.await.unwrap().unwrap();
    joined.await.unwrap().unwrap();
    assert_eq!(gate.counts().started, 1, "one compute for both Gets");
    obs.telemetry().tracer_provider().force_flush().unwrap();
    let spans = collector.exported_spans(10, Duration::from_secs(60)).await;
    let computing = spans
        .iter()
        .find(|s| {
            s.name == "materialize"
                && spans
                    .iter()
                    .any(|c| c.name == "compute" && c.parent_span_id == s.span_id)
        })
        .expect("the computing materialize span");
    // The other top-level materialize: a direct child of the second request's RPC span.
    let rpc_ids: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "deriva.Deriva/Get")
        .map(|s| s.span_id.as_str())
        .collect();
    assert_eq!(rpc_ids.len(), 2, "both requests were forced");
    let joiner = spans
        .iter()
        .find(|s| {
            s.name == "materialize"
                && s.span_id != computing.span_id
                && rpc_ids.contains(&s.parent_span_id.as_str())
        })
        .expect("the joining materialize span");
    assert!(
        joiner
            .links
            .iter()
            .any(|l| l.span_id == computing.span_id && l.trace_id == computing.trace_id),
        "joiner links {:?}, computing span {}",
        joiner.links,
        computing.span_id
    );
    assert!(
        joiner
            .events
            .iter()
            .any(|e| e.name.contains("joined an in-flight materialization")),
        "{:?}",
        joiner.events
    );
    obs.stop().await;
}

/// Issue 34: a request that is neither sampled nor forced is untraced. It builds no spans (the
/// trace store keeps only the few captured anyway, and nothing reaches the collector) and
/// answers with no `x-trace-id`; a failed one is filed all the same, by its request span
/// alone, and its log line carries its trace id and request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untraced_requests_build_no_spans_but_failures_are_kept_with_their_ids() {
    use deriva_server::trace_store::CAPTURE_FIELD;

    let mut collector = FakeCollectorServer::start().await.unwrap();
    let mut obs = unsampled(&collector).await;
    let a = obs.put(b"quiet").await;
    let start = Instant::now();
    let mut with_trace_id = 0;
    const GETS: usize = 200;
    for _ in 0..GETS {
        let (bytes, meta) = obs.get_with_metadata(get_req(&a)).await.unwrap();
        assert_eq!(bytes, b"quiet");
        assert!(meta.get("x-request-id").is_some());
        with_trace_id += usize::from(meta.get("x-trace-id").is_some());
    }
    // At most ten a second are captured anyway (plus the first).
    let allowed = 2 + (start.elapsed().as_secs_f64() * 10.0) as usize;
    assert!(
        with_trace_id <= allowed.min(GETS - 1),
        "{with_trace_id} of {GETS} Gets were traced in {:?}",
        start.elapsed()
    );
    // Kept with their spans: only those. The others kept (the slow ones of the latency tail,
    // which enter the slowest list) are their request span alone.
    let recent = obs.telemetry().traces().lists().recent;
    let traced = recent
        .iter()
        .filter(|t| t.method == "Get")
        .filter(|t| {
            let kept = obs.telemetry().traces().get(&t.trace_id).unwrap();
            kept.spans[0].field(CAPTURE_FIELD) != Some("untraced")
        })
        .count();
    assert!(
        traced <= allowed,
        "{traced} Gets kept with spans: {recent:?}"
    );

    // Failures: each answers its trace id, and the trace store files it; an untraced one by
    // its request span alone.
    let missing = Bytes::from(vec![7u8; 32]);
    let mut untraced = None;
    for _ in 0..50 {
        let err = obs.get_with_metadata(get_req(&missing)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let trace_id = err
            .metadata()
            .get("x-trace-id")
            .expect("a failure answers its trace id")
            .to_str()
            .unwrap()
            .to_owned();
        let request_id = err
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let kept = obs
            .telemetry()
            .traces()
            .get(&trace_id)
            .expect("a failure is kept");
        assert_eq!(kept.status_code, Code::NotFound as i64);
        assert_eq!(kept.request_id, request_id);
        if kept.spans.len() == 1 && kept.spans[0].field(CAPTURE_FIELD) == Some("untraced") {
            untraced = Some((trace_id, request_id));
            break;
        }
    }
    let (trace_id, request_id) = untraced.expect("an untraced failure among 50");
    let failed = obs.telemetry().traces().lists().failed;
    assert!(failed.iter().any(|t| t.trace_id == trace_id), "{failed:?}");
    let logs = obs.logs.text();
    let line = logs
        .lines()
        .find(|l| l.contains("rpc failed") && l.contains(&format!("trace_id={trace_id}")))
        .unwrap_or_else(|| panic!("no line with trace_id={trace_id}:\n{logs}"));
    assert!(line.contains(&format!("request_id={request_id}")), "{line}");
    assert!(!line.contains("span_id="), "no span, no span id: {line}");

    // A caller that asks for its tree to be kept (`deriva get --explain`) gets it whole,
    // though it is not sampled.
    let mut req = get_req(&a);
    req.metadata_mut()
        .insert("x-deriva-trace", MetadataValue::from_static("capture"));
    let (_, meta) = obs.get_with_metadata(req).await.unwrap();
    let trace_id = meta
        .get("x-trace-id")
        .expect("a captured request")
        .to_str()
        .unwrap();
    let kept = obs
        .telemetry()
        .traces()
        .wait_for(trace_id, Duration::from_secs(30))
        .await;
    let names: Vec<&str> = kept
        .as_ref()
        .unwrap()
        .spans
        .iter()
        .map(|s| s.name)
        .collect();
    assert!(names.contains(&"materialize"), "{names:?}");

    // Ratio 0: the collector receives no span at all.
    obs.telemetry().tracer_provider().force_flush().unwrap();
    assert!(
        collector
            .exported_spans(1, Duration::from_millis(500))
            .await
            .is_empty()
    );
    obs.stop().await;
}
