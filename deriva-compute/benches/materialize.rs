//! `materialize` on a cache hit: the cost of telemetry on the hottest path.
//!
//! - `noop`: a no-op meter and no subscriber (the floor);
//! - `metrics`: a real SDK meter provider with a Prometheus reader, no subscriber (the
//!   difference to `noop` is the hot-path metric recording);
//! - `metrics+spans`: the same plus a `tracing` subscriber with the OpenTelemetry layer,
//!   sampling every span (the full production cost of one cache hit).
//!
//! And `get_stream_hot_1kib`: a Get (`get_stream`, drained) of a cached 1 KiB output against one
//! of a cached 1 KiB leaf (read twice first, so the cache holds it): the two should cost the
//! same, one cache lookup and a `Bytes` clone.
//!
//! Run: `cargo bench -p deriva-compute --bench materialize`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use deriva_compute::{AsyncExecutor, Cache, ExecutorConfig, FunctionRegistry};
use deriva_core::{CAddr, FunctionId, Recipe};
use futures::StreamExt as _;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;

struct World {
    _dir: tempfile::TempDir,
    exec: AsyncExecutor,
    hot: CAddr,
    leaf: CAddr,
}

fn world(rt: &tokio::runtime::Runtime, meter: &Meter) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(deriva_store_local::open(dir.path()).unwrap());
    let exec = AsyncExecutor::new(
        store,
        Arc::new(FunctionRegistry::with_builtins()),
        Arc::new(Cache::new(64 << 20)),
        ExecutorConfig::default(),
        meter,
    );
    let leaf = rt
        .block_on(exec.store().put_leaf(bytes::Bytes::from(vec![7u8; 1024])))
        .unwrap();
    let recipe = Recipe::new(
        FunctionId::new("reverse", "v1").unwrap(),
        vec![leaf],
        Vec::<(String, String)>::new(),
    )
    .unwrap();
    let hot = rt.block_on(exec.put_recipe(recipe)).unwrap();
    rt.block_on(exec.materialize(hot)).unwrap();
    for _ in 0..2 {
        rt.block_on(drain(&exec, leaf));
    }
    assert!(exec.cache().contains(&leaf));
    World {
        _dir: dir,
        exec,
        hot,
        leaf,
    }
}

/// A Get of `addr`: its chunks, all received.
async fn drain(exec: &AsyncExecutor, addr: CAddr) -> usize {
    let mut chunks = exec.get_stream(addr, 64 << 10).await.unwrap();
    let mut len = 0;
    while let Some(chunk) = chunks.next().await {
        len += chunk.unwrap().len();
    }
    len
}

fn prometheus_meter() -> (SdkMeterProvider, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .unwrap();
    (
        SdkMeterProvider::builder().with_reader(exporter).build(),
        registry,
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("materialize_cache_hit");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    let noop = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("bench");
    let w = world(&rt, &noop);
    group.bench_function("noop", |b| {
        b.to_async(&rt).iter(|| w.exec.materialize(w.hot))
    });

    let (provider, _registry) = prometheus_meter();
    let w = world(&rt, &provider.meter("bench"));
    group.bench_function("metrics", |b| {
        b.to_async(&rt).iter(|| w.exec.materialize(w.hot))
    });

    let tracer = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer.tracer("bench")));
    let dispatch = tracing::Dispatch::new(subscriber);
    tracing::dispatcher::with_default(&dispatch, || {
        group.bench_function("metrics+spans", |b| {
            b.to_async(&rt).iter(|| w.exec.materialize(w.hot))
        });
    });
    group.finish();

    let mut group = c.benchmark_group("get_stream_hot_1kib");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("recipe", |b| b.to_async(&rt).iter(|| drain(&w.exec, w.hot)));
    group.bench_function("leaf", |b| b.to_async(&rt).iter(|| drain(&w.exec, w.leaf)));
    group.finish();
    drop(provider);
}

criterion_group!(benches, bench);
criterion_main!(benches);
