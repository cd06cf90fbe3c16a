//! Telemetry micro-benchmarks of the server side:
//!
//! - `instruments`: one recording of each instrument kind through the OpenTelemetry SDK
//!   (counter with 2 attributes, histogram, up-down counter), beside the raw `prometheus` crate
//!   doing the same;
//! - `scrape`: encoding `/metrics` (gather + text format) with every family present and 10, 100
//!   and 1000 distinct `function` label values;
//! - `spans`: creating, entering and closing a span with fields, with no subscriber and with the
//!   OpenTelemetry layer.
//!
//! Run: `cargo bench -p deriva-server --bench telemetry`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use deriva_compute::{
    AsyncExecutor, Cache, ComputeContext, ComputeFunction, ExecutorConfig, FunctionError,
    FunctionRegistry,
};
use deriva_core::{CAddr, FunctionId, Params, Recipe};
use deriva_server::telemetry::ServerMetrics;
use deriva_server::telemetry::{Telemetry, TelemetryConfig};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g
}

fn instruments(c: &mut Criterion) {
    let telemetry = Telemetry::new(TelemetryConfig::default()).unwrap();
    let meter = telemetry.meter();
    let counter = meter.u64_counter("bench.counter").build();
    let histogram = meter
        .f64_histogram("bench.histogram")
        .with_unit("s")
        .with_boundaries(vec![0.001, 0.01, 0.1, 1.0])
        .build();
    let updown = meter.i64_up_down_counter("bench.updown").build();
    let two = [
        KeyValue::new("method", "get"),
        KeyValue::new("status", "ok"),
    ];
    let one = [KeyValue::new("method", "get")];

    let registry = prometheus::Registry::new();
    let opts = |n: &str| prometheus::Opts::new(n, "bench");
    let p_counter =
        prometheus::IntCounterVec::new(opts("p_counter"), &["method", "status"]).unwrap();
    let p_hist = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new("p_hist", "bench").buckets(vec![0.001, 0.01, 0.1, 1.0]),
        &["method"],
    )
    .unwrap();
    let p_gauge = prometheus::IntGaugeVec::new(opts("p_gauge"), &["method"]).unwrap();
    registry.register(Box::new(p_counter.clone())).unwrap();
    registry.register(Box::new(p_hist.clone())).unwrap();
    registry.register(Box::new(p_gauge.clone())).unwrap();
    let p_counter_resolved = p_counter.with_label_values(&["get", "ok"]);

    let mut g = group(c, "instruments");
    g.bench_function("otel_counter_2_attrs", |b| {
        b.iter(|| counter.add(1, black_box(&two)))
    });
    g.bench_function("otel_histogram_1_attr", |b| {
        b.iter(|| histogram.record(black_box(0.0042), &one))
    });
    g.bench_function("otel_histogram_no_attrs", |b| {
        b.iter(|| histogram.record(black_box(0.0042), &[]))
    });
    g.bench_function("otel_updown_1_attr", |b| {
        b.iter(|| updown.add(1, black_box(&one)))
    });
    g.bench_function("prometheus_counter_2_labels", |b| {
        b.iter(|| p_counter.with_label_values(black_box(&["get", "ok"])).inc())
    });
    g.bench_function("prometheus_counter_resolved", |b| {
        b.iter(|| black_box(&p_counter_resolved).inc())
    });
    g.bench_function("prometheus_histogram_1_label", |b| {
        b.iter(|| {
            p_hist
                .with_label_values(&["get"])
                .observe(black_box(0.0042))
        })
    });
    g.bench_function("prometheus_gauge_1_label", |b| {
        b.iter(|| p_gauge.with_label_values(black_box(&["get"])).inc())
    });
    g.bench_function("atomic_add", |b| {
        let a = std::sync::atomic::AtomicU64::new(0);
        b.iter(|| black_box(&a).fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    });
    g.finish();
}

/// Copies its input: each registered id is a distinct `function` label value.
struct Copy;

impl ComputeFunction for Copy {
    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        _: &Params,
    ) -> Result<Bytes, FunctionError> {
        Ok(inputs.concat().into())
    }
}

/// A server-shaped world whose compute histograms hold `functions` label values.
fn scrape_world(
    rt: &tokio::runtime::Runtime,
    functions: usize,
) -> (tempfile::TempDir, Telemetry, AsyncExecutor) {
    let telemetry = Telemetry::new(TelemetryConfig::default()).unwrap();
    let meter = telemetry.meter();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(deriva_store_local::open(dir.path()).unwrap());
    let metrics = ServerMetrics::new(&meter, store.counters().clone());
    let mut registry = FunctionRegistry::with_builtins();
    let ids: Vec<FunctionId> = (0..functions)
        .map(|i| FunctionId::new(format!("fn{i:04}"), "v1").unwrap())
        .collect();
    for id in &ids {
        registry.register(id.clone(), Copy);
    }
    let exec = AsyncExecutor::new(
        store,
        Arc::new(registry),
        Arc::new(Cache::new(64 << 20)),
        ExecutorConfig::default(),
        &meter,
    );
    let leaf = rt
        .block_on(exec.store().put_leaf(bytes::Bytes::from_static(b"bench")))
        .unwrap();
    let recipes: Vec<Recipe> = ids
        .iter()
        .map(|id| Recipe::new(id.clone(), vec![leaf], Vec::<(String, String)>::new()).unwrap())
        .collect();
    let addrs: Vec<CAddr> = rt.block_on(exec.store().put_recipes(recipes)).unwrap();
    rt.block_on(async {
        for a in &addrs {
            exec.materialize(*a).await.unwrap();
        }
    });
    // Every server family has data too.
    for (i, method) in deriva_server::method::RpcMethod::ALL
        .into_iter()
        .enumerate()
    {
        metrics.start(method).finish(i % 2 == 0);
    }
    metrics.record_dag_insert(Duration::from_micros(300));
    (dir, telemetry, exec)
}

fn scrape(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut g = group(c, "scrape");
    for n in [10, 100, 1000] {
        let (_dir, telemetry, _exec) = scrape_world(&rt, n);
        let registry = telemetry.registry().clone();
        let bytes = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
            .len();
        eprintln!("scrape with {n} function labels: {bytes} bytes of exposition");
        g.bench_with_input(
            BenchmarkId::new("gather_and_encode", n),
            &registry,
            |b, r| {
                b.iter(|| {
                    prometheus::TextEncoder::new()
                        .encode_to_string(&r.gather())
                        .unwrap()
                })
            },
        );
    }
    g.finish();
}

fn spans(c: &mut Criterion) {
    let addr = CAddr::for_leaf(b"bench");
    let mut g = group(c, "spans");
    g.bench_function("no_subscriber", |b| {
        b.iter(|| tracing::info_span!("materialize", %addr, depth = 0i64).in_scope(|| black_box(1)))
    });
    let tracer = SdkTracerProvider::builder().build();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer.tracer("bench"))),
    );
    tracing::dispatcher::with_default(&dispatch, || {
        g.bench_function("otel_layer_sampled", |b| {
            b.iter(|| {
                tracing::info_span!("materialize", %addr, depth = 0i64).in_scope(|| black_box(1))
            })
        });
    });
    let unsampled = SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff)
        .build();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(unsampled.tracer("bench"))),
    );
    tracing::dispatcher::with_default(&dispatch, || {
        g.bench_function("otel_layer_not_sampled", |b| {
            b.iter(|| {
                tracing::info_span!("materialize", %addr, depth = 0i64).in_scope(|| black_box(1))
            })
        });
    });
    g.finish();
}

criterion_group!(benches, instruments, scrape, spans);
criterion_main!(benches);
