//! The local backend's calls go through `deriva_store::observe` like the remote one's: each
//! redb transaction (`backend="redb"`, an `index_db` client span with `db.system.name=redb`)
//! and each leaf-file operation (`backend="files"`, a `leaf_file` span) is measured in
//! `deriva_backend_*`, and traced when the current trace is sampled.

use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{DerivaError, FunctionId, Recipe};
use deriva_store::observe::BackendMetrics;
use deriva_store_local::{BLOB_DIR, LocalOptions};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// The backend's instruments on a private Prometheus registry (the provider must outlive them).
fn metrics_on_a_registry() -> (prometheus::Registry, SdkMeterProvider, Arc<BackendMetrics>) {
    let registry = prometheus::Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .unwrap();
    let meters = SdkMeterProvider::builder().with_reader(reader).build();
    let metrics = Arc::new(BackendMetrics::new(&meters.meter("test")));
    (registry, meters, metrics)
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "current_thread")]
async fn the_local_backend_observes_its_redb_transactions_and_file_operations() {
    // Metrics on a private Prometheus registry; spans through tracing-opentelemetry to memory.
    let (registry, _meters, metrics) = metrics_on_a_registry();
    let exporter = InMemorySpanExporter::default();
    let tracers = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracers.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let store =
        deriva_store_local::open_observed(dir.path(), LocalOptions::default(), metrics).unwrap();
    let small = Bytes::from_static(b"a small leaf, a redb row");
    let large = Bytes::from(vec![7u8; 100 * 1024]);
    let function: FunctionId = "concat/v1".parse().unwrap();

    // One sampled request: every call in it is a client span under it.
    let request = tracing::info_span!("request");
    let (small_addr, large_addr) = async {
        let small_addr = store.put_leaf(small.clone()).await.unwrap();
        let large_addr = store.put_leaf(large.clone()).await.unwrap();
        assert_eq!(
            store.get_leaf(small_addr).await.unwrap(),
            Some(small.clone())
        );
        assert_eq!(
            store.get_leaf(large_addr).await.unwrap(),
            Some(large.clone())
        );
        let recipe = Recipe::new(function, vec![small_addr, large_addr], [("", ""); 0]).unwrap();
        let recipe = store.put_recipe(recipe).await.unwrap();
        assert!(store.get_recipe(recipe).await.unwrap().is_some());
        (small_addr, large_addr)
    }
    .instrument(request.clone())
    .await;
    let request_id = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        request.context().span().span_context().span_id()
    };
    drop(request);

    // Outside any request: measured, not traced.
    let traced = exporter.get_finished_spans().unwrap().len();
    assert!(store.get_leaf(large_addr).await.unwrap().is_some());
    assert_eq!(exporter.get_finished_spans().unwrap().len(), traced);

    // A blob file damaged on disk: the read fails as corrupted, counted by kind.
    let hex = large_addr.to_hex();
    let path = dir.path().join(BLOB_DIR).join(&hex[..2]).join(&hex);
    std::fs::write(&path, b"not the bytes").unwrap();
    let failed = async { store.get_leaf(large_addr).await }
        .instrument(tracing::info_span!("request"))
        .await;
    assert!(
        matches!(failed, Err(DerivaError::Corrupted { .. })),
        "{failed:?}"
    );

    let spans = exporter.get_finished_spans().unwrap();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let put_row = named("write leaves");
    assert_eq!(put_row.len(), 1, "{spans:#?}");
    let row = put_row[0];
    assert_eq!(row.span_kind, SpanKind::Client);
    assert_eq!(row.parent_span_id, request_id);
    assert_eq!(attr(row, "db.system.name").as_deref(), Some("redb"));
    assert_eq!(attr(row, "db.operation.name").as_deref(), Some("write"));
    assert_eq!(attr(row, "db.collection.name").as_deref(), Some("leaves"));
    let put_file = named("put blobs");
    assert_eq!(put_file.len(), 1, "{spans:#?}");
    assert_eq!(put_file[0].parent_span_id, request_id);
    assert_eq!(attr(put_file[0], "deriva.store.op").as_deref(), Some("put"));
    assert_eq!(named("write recipes").len(), 1, "{spans:#?}");
    // Its inputs looked up, then it is read back.
    assert!(!named("read recipes").is_empty(), "{spans:#?}");
    // Two reads of the file in requests, the second failed.
    let gets = named("get blobs");
    assert_eq!(gets.len(), 2, "{spans:#?}");
    let bad = gets
        .iter()
        .find(|s| attr(s, "error.type").is_some())
        .unwrap();
    assert_eq!(attr(bad, "error.type").as_deref(), Some("corrupted"));

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let count = |labels: &str| {
        deriva_testkit::sample(
            &text,
            &format!("deriva_backend_request_duration_seconds_count{{{labels}}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count(r#"backend="redb",op="put_leaf""#), 1.0, "{text}");
    assert_eq!(count(r#"backend="files",op="put""#), 1.0, "{text}");
    assert_eq!(count(r#"backend="redb",op="put_recipes""#), 1.0, "{text}");
    assert_eq!(count(r#"backend="redb",op="get_recipe""#), 1.0, "{text}");
    // The small leaf is found as a row; each of the large one's three reads looks for a row
    // first, then reads the file.
    assert!(count(r#"backend="redb",op="get_leaf""#) >= 4.0, "{text}");
    assert_eq!(count(r#"backend="files",op="get""#), 3.0, "{text}");
    assert_eq!(
        deriva_testkit::sample(
            &text,
            r#"deriva_backend_errors_total{backend="files",kind="corrupted",op="get"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // Nothing failed but that read.
    assert_eq!(
        text.matches("deriva_backend_errors_total{").count(),
        1,
        "{text}"
    );
    let _ = small_addr;
}

/// Counts the `index_db` and `leaf_file` spans built, sampled or not.
#[derive(Clone, Default)]
struct CountClientSpans(Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountClientSpans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if matches!(attrs.metadata().name(), "index_db" | "leaf_file") {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// In a request that is not sampled, a call is measured but builds no span at all.
#[tokio::test(flavor = "current_thread")]
async fn a_call_in_a_trace_that_is_not_sampled_builds_no_span() {
    let (registry, _meters, metrics) = metrics_on_a_registry();
    let tracers = SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff)
        .build();
    let built = CountClientSpans::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracers.tracer("test")))
        .with(built.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let store =
        deriva_store_local::open_observed(dir.path(), LocalOptions::default(), metrics).unwrap();
    async {
        let addr = store
            .put_leaf(Bytes::from_static(b"unsampled"))
            .await
            .unwrap();
        let large = store
            .put_leaf(Bytes::from(vec![1u8; 100 * 1024]))
            .await
            .unwrap();
        assert!(store.get_leaf(addr).await.unwrap().is_some());
        assert!(store.get_leaf(large).await.unwrap().is_some());
    }
    .instrument(tracing::info_span!("request"))
    .await;

    assert_eq!(built.0.load(std::sync::atomic::Ordering::Relaxed), 0);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert_eq!(
        deriva_testkit::sample(
            &text,
            r#"deriva_backend_request_duration_seconds_count{backend="files",op="put"}"#
        ),
        Some(1.0),
        "{text}"
    );
}
