//! Shared test harness: a store in a temp dir, an executor, and a private meter provider whose
//! Prometheus exporter writes to a private registry. Nothing global, so tests run in parallel.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deriva_compute::{
    AsyncExecutor, Cache, ComputeFunction, ExecutorConfig, FunctionError, FunctionRegistry,
};
use deriva_core::{CAddr, FunctionId, Params, Recipe, Store};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub exec: AsyncExecutor,
    pub registry: prometheus::Registry,
    pub provider: SdkMeterProvider,
}

pub fn fid(s: &str) -> FunctionId {
    s.parse().unwrap()
}

impl Harness {
    pub fn new() -> Self {
        Self::with(
            FunctionRegistry::with_builtins(),
            ExecutorConfig::default(),
            64 << 20,
        )
    }

    pub fn with(functions: FunctionRegistry, config: ExecutorConfig, cache_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .unwrap();
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("deriva-compute-test");
        let exec = AsyncExecutor::new(
            store,
            Arc::new(functions),
            Arc::new(Cache::new(cache_bytes)),
            config,
            &meter,
        );
        Self {
            dir,
            exec,
            registry,
            provider,
        }
    }

    /// Dual verification, with the non-deterministic `counter/v1` registered.
    pub fn dual_with_counter() -> Self {
        let mut functions = FunctionRegistry::with_builtins();
        functions.register(fid("counter/v1"), Counter::default());
        let config = ExecutorConfig {
            verification: deriva_compute::VerificationMode::Dual,
            ..ExecutorConfig::default()
        };
        Self::with(functions, config, 1 << 20)
    }

    pub async fn leaf(&self, data: &[u8]) -> CAddr {
        self.exec
            .store()
            .put_leaf(Bytes::copy_from_slice(data))
            .await
            .unwrap()
    }

    pub async fn recipe(&self, function: &str, inputs: &[CAddr], params: &[(&str, &str)]) -> CAddr {
        let recipe = Recipe::new(fid(function), inputs.to_vec(), params.iter().copied()).unwrap();
        self.exec.put_recipe(recipe).await.unwrap()
    }

    /// The Prometheus text exposition of this harness's registry.
    pub fn scrape(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap()
    }

    /// The value of one sample line, e.g. `deriva_cache_total{result="hit"}`.
    pub fn sample(&self, series: &str) -> Option<f64> {
        let text = self.scrape();
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Sleeps, counts its calls, and returns its input with a suffix from the `tag` param.
#[derive(Clone, Default)]
pub struct Slow {
    pub delay: Duration,
    pub calls: Arc<AtomicUsize>,
}

impl Slow {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            calls: Arc::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl ComputeFunction for Slow {
    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let mut out = inputs.concat();
        out.extend_from_slice(params.get("tag").map(String::as_bytes).unwrap_or_default());
        Ok(out.into())
    }
}

/// Returns a different output on every call: deliberately non-deterministic.
#[derive(Default)]
pub struct Counter(pub AtomicUsize);

impl ComputeFunction for Counter {
    fn compute(&self, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        Ok(self.0.fetch_add(1, Ordering::SeqCst).to_string().into())
    }
}

/// Sleeps, then fails.
pub struct SlowFail(pub Duration);

impl ComputeFunction for SlowFail {
    fn compute(&self, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        std::thread::sleep(self.0);
        Err(FunctionError::Failed("it was always going to fail".into()))
    }
}

/// Panics.
pub struct Panics;

impl ComputeFunction for Panics {
    fn compute(&self, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        panic!("boom")
    }
}
