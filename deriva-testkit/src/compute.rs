//! The engine harness of `deriva-compute`'s tests: a store in a temp dir, an executor, and a
//! private meter provider whose Prometheus exporter writes to a private registry. Nothing
//! global, so tests run in parallel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deriva_compute::{
    AsyncExecutor, Cache, ComputeContext, ComputeFunction, ExecutorConfig, FunctionError,
    FunctionRegistry,
};
use deriva_core::{CAddr, DerivaError, FunctionId, Params, Recipe};
use deriva_store::{BlobStore, ByteStream, Store, stream};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// Spans of this thread's code (and of the tasks it spawns, which carry the subscriber) go to
/// the returned in-memory exporter, through tracing-opentelemetry, until the guard is dropped.
pub fn spans_in_memory() -> (
    opentelemetry_sdk::trace::InMemorySpanExporter,
    opentelemetry_sdk::trace::SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let guard = tracing::subscriber::set_default(subscriber);
    (exporter, provider, guard)
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub exec: AsyncExecutor,
    pub registry: prometheus::Registry,
    pub provider: SdkMeterProvider,
}

pub fn fid(s: &str) -> FunctionId {
    s.parse().unwrap()
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
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
        let store = Arc::new(deriva_store_local::open(dir.path()).unwrap());
        Self::over(dir, store, functions, config, cache_bytes)
    }

    /// A harness whose store keeps every leaf in a file of its own (none in the small-leaf
    /// table), for tests that damage blob files.
    pub fn leaves_as_files() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = deriva_store_local::LocalOptions {
            inline_leaf_bytes: 0,
        };
        let store = Arc::new(deriva_store_local::open_with(dir.path(), options).unwrap());
        Self::over(
            dir,
            store,
            FunctionRegistry::with_builtins(),
            ExecutorConfig::default(),
            64 << 20,
        )
    }

    /// A harness whose store reads its leaves through a [`CountingBlobs`], returned too.
    pub fn counting(config: ExecutorConfig, cache_bytes: u64) -> (Self, Arc<CountingBlobs>) {
        let dir = tempfile::tempdir().unwrap();
        let local = deriva_store_local::open(dir.path()).unwrap();
        let blobs = Arc::new(CountingBlobs::new(local.blobs().clone()));
        let store = Store::new(
            blobs.clone(),
            local.recipes().clone(),
            local.counters().clone(),
            deriva_store::lease(),
            "counting",
        );
        let h = Self::over(
            dir,
            Arc::new(store),
            FunctionRegistry::with_builtins(),
            config,
            cache_bytes,
        );
        (h, blobs)
    }

    fn over(
        dir: tempfile::TempDir,
        store: Arc<Store>,
        functions: FunctionRegistry,
        config: ExecutorConfig,
        cache_bytes: u64,
    ) -> Self {
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

    /// A Get: the chunks of `addr` of at most `chunk_bytes`, or the first error, as a client
    /// would see them.
    pub async fn get_chunks(
        &self,
        addr: CAddr,
        chunk_bytes: usize,
    ) -> deriva_core::Result<Vec<Bytes>> {
        use futures::StreamExt as _;
        let mut chunks = self.exec.get_stream(addr, chunk_bytes).await?;
        let mut got = Vec::new();
        while let Some(chunk) = chunks.next().await {
            got.push(chunk?);
        }
        Ok(got)
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
        crate::exposition::sample(&self.scrape(), series)
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
    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let mut out = inputs.concat();
        out.extend_from_slice(params.get("tag").map(String::as_bytes).unwrap_or_default());
        Ok(out.into())
    }
}

/// Works until its context is cancelled, looking at it every millisecond, then returns
/// [`FunctionError::Cancelled`]: a compute that never ends on its own, but stops when asked.
/// Counts the calls that started and those that returned.
#[derive(Clone, Default)]
pub struct Spin {
    pub started: Arc<AtomicUsize>,
    pub returned: Arc<AtomicUsize>,
}

impl Spin {
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn returned(&self) -> usize {
        self.returned.load(Ordering::SeqCst)
    }
}

impl ComputeFunction for Spin {
    fn compute(
        &self,
        ctx: &ComputeContext,
        _: &[Bytes],
        _: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        while !ctx.is_cancelled() {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.returned.fetch_add(1, Ordering::SeqCst);
        ctx.check().map(|()| Bytes::new())
    }
}

/// Refuses the param `x=bad` in `validate`, and counts the computes it is asked for: a recipe
/// with `x=bad` can only be in the store if it was planted there.
#[derive(Clone, Default)]
pub struct Picky {
    pub calls: Arc<AtomicUsize>,
}

impl ComputeFunction for Picky {
    fn validate(&self, _: usize, params: &Params) -> Result<(), FunctionError> {
        match params.get("x").map(String::as_str) {
            Some("bad") => Err(FunctionError::BadParam {
                param: "x".into(),
                reason: "must not be bad".into(),
            }),
            _ => Ok(()),
        }
    }

    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        _: &Params,
    ) -> Result<Bytes, FunctionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(inputs.concat().into())
    }
}

/// Returns a different output on every call: deliberately non-deterministic.
#[derive(Default)]
pub struct Counter(pub AtomicUsize);

impl ComputeFunction for Counter {
    fn compute(&self, _: &ComputeContext, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        Ok(self.0.fetch_add(1, Ordering::SeqCst).to_string().into())
    }
}

/// Sleeps, then fails.
pub struct SlowFail(pub Duration);

impl ComputeFunction for SlowFail {
    fn compute(&self, _: &ComputeContext, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        std::thread::sleep(self.0);
        Err(FunctionError::Failed("it was always going to fail".into()))
    }
}

/// Panics.
pub struct Panics;

impl ComputeFunction for Panics {
    fn compute(&self, _: &ComputeContext, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        panic!("boom")
    }
}

/// A blob store that counts the reads of its inner one by address, and can pretend its leaves
/// are damaged on disk (their bytes no longer match their address), whatever the backend's
/// layout.
#[derive(Debug)]
pub struct CountingBlobs {
    inner: Arc<dyn BlobStore>,
    reads: parking_lot::Mutex<std::collections::HashMap<CAddr, usize>>,
    damaged: AtomicBool,
}

impl CountingBlobs {
    pub fn new(inner: Arc<dyn BlobStore>) -> Self {
        Self {
            inner,
            reads: Default::default(),
            damaged: AtomicBool::new(false),
        }
    }

    /// Reads of the bytes at `addr` (`get` and `get_stream`, found or not) so far.
    pub fn reads(&self, addr: CAddr) -> usize {
        self.reads.lock().get(&addr).copied().unwrap_or(0)
    }

    fn count(&self, addr: CAddr) {
        *self.reads.lock().entry(addr).or_default() += 1;
    }

    /// From now on, every leaf reads with its first byte flipped (or never again).
    pub fn damage(&self, damaged: bool) {
        self.damaged.store(damaged, Ordering::SeqCst);
    }

    fn damaged(&self) -> bool {
        self.damaged.load(Ordering::SeqCst)
    }
}

fn flipped(data: &Bytes) -> Bytes {
    let mut bytes = data.to_vec();
    if let Some(first) = bytes.first_mut() {
        *first ^= 0x5a;
    }
    bytes.into()
}

#[async_trait::async_trait]
impl BlobStore for CountingBlobs {
    async fn put(&self, data: Bytes) -> deriva_core::Result<CAddr> {
        self.inner.put(data).await
    }

    async fn get(&self, addr: CAddr) -> deriva_core::Result<Option<Bytes>> {
        self.count(addr);
        match self.inner.get(addr).await? {
            Some(_) if self.damaged() => Err(DerivaError::Corrupted {
                addr,
                detail: "damaged by the test".into(),
            }),
            found => Ok(found),
        }
    }

    async fn get_stream(
        &self,
        addr: CAddr,
        chunk_bytes: usize,
    ) -> deriva_core::Result<Option<ByteStream>> {
        self.count(addr);
        if !self.damaged() {
            return self.inner.get_stream(addr, chunk_bytes).await;
        }
        let Some(good) = self.inner.get(addr).await? else {
            return Ok(None);
        };
        let bad = stream::chunks(flipped(&good), chunk_bytes);
        Ok(Some(stream::verified(
            addr,
            "the damaged test store".into(),
            bad,
        )))
    }

    async fn put_stream(&self, addr: CAddr, data: ByteStream) -> deriva_core::Result<()> {
        self.inner.put_stream(addr, data).await
    }

    async fn put_unaddressed(&self, data: ByteStream) -> deriva_core::Result<(CAddr, u64)> {
        self.inner.put_unaddressed(data).await
    }

    async fn contains(&self, addr: CAddr) -> deriva_core::Result<bool> {
        self.inner.contains(addr).await
    }

    async fn missing(&self, addrs: Vec<CAddr>) -> deriva_core::Result<Vec<CAddr>> {
        self.inner.missing(addrs).await
    }

    async fn size(&self, addr: CAddr) -> deriva_core::Result<Option<u64>> {
        self.inner.size(addr).await
    }

    async fn delete(&self, addr: CAddr) -> deriva_core::Result<bool> {
        self.inner.delete(addr).await
    }

    async fn list_page(
        &self,
        after: Option<CAddr>,
        limit: usize,
    ) -> deriva_core::Result<Vec<(CAddr, u64)>> {
        self.inner.list_page(after, limit).await
    }

    async fn delete_if_older(
        &self,
        addr: CAddr,
        cutoff: SystemTime,
    ) -> deriva_core::Result<Option<u64>> {
        self.inner.delete_if_older(addr, cutoff).await
    }

    async fn check(&self) -> deriva_core::Result<()> {
        self.inner.check().await
    }
}
