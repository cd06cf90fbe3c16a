//! The shared output tier and the invalidation bus, as the executor uses them: in-memory
//! stand-ins here (the real ones, in the object store and PostgreSQL, are tested in
//! deriva-store-remote and deriva-server/tests/it/cluster.rs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deriva_compute::{AsyncExecutor, Cache, ExecutorConfig, FunctionRegistry};
use deriva_core::{CAddr, DerivaError, Recipe, Result};
use deriva_store::{InvalidationBus, OutputStore};
use deriva_testkit::compute::{Slow, fid};
use opentelemetry::metrics::MeterProvider as _;
use parking_lot::Mutex;

/// Outputs in a map; `fail` makes every read fail, `damaged` every read report corruption.
#[derive(Debug, Default)]
struct Tier {
    outputs: Mutex<HashMap<CAddr, Bytes>>,
    deleted: Mutex<Vec<CAddr>>,
    fail: std::sync::atomic::AtomicBool,
    damaged: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl OutputStore for Tier {
    async fn get(&self, recipe: CAddr) -> Result<Option<Bytes>> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.fail.load(Relaxed) {
            return Err(DerivaError::Unavailable {
                backend: "the test tier".into(),
                message: "down".into(),
            });
        }
        if self.damaged.load(Relaxed) {
            return Err(DerivaError::Corrupted {
                addr: recipe,
                detail: "test".into(),
            });
        }
        Ok(self.outputs.lock().get(&recipe).cloned())
    }

    async fn put(&self, recipe: CAddr, output: Bytes) -> Result<()> {
        self.outputs.lock().insert(recipe, output);
        Ok(())
    }

    async fn delete(&self, recipe: CAddr) -> Result<()> {
        self.outputs.lock().remove(&recipe);
        self.deleted.lock().push(recipe);
        Ok(())
    }

    async fn contains(&self, recipe: CAddr) -> Result<bool> {
        Ok(self.outputs.lock().contains_key(&recipe))
    }

    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<CAddr>> {
        let mut all: Vec<CAddr> = self.outputs.lock().keys().copied().collect();
        all.sort();
        all.retain(|a| after.is_none_or(|after| *a > after));
        all.truncate(limit);
        Ok(all)
    }
}

#[derive(Debug, Default)]
struct Bus(Mutex<Vec<Vec<CAddr>>>);

#[async_trait]
impl InvalidationBus for Bus {
    async fn publish(&self, addrs: &[CAddr]) -> Result<()> {
        self.0.lock().push(addrs.to_vec());
        Ok(())
    }
}

/// Two executors ("nodes") over one store with the tier and the bus, each with its own cache.
fn nodes(
    slow: &Slow,
) -> (
    tempfile::TempDir,
    Arc<Tier>,
    Arc<Bus>,
    AsyncExecutor,
    AsyncExecutor,
) {
    let dir = tempfile::tempdir().unwrap();
    let (tier, bus) = (Arc::new(Tier::default()), Arc::new(Bus::default()));
    let store = Arc::new(
        deriva_store_local::open(dir.path())
            .unwrap()
            .with_outputs(tier.clone())
            .with_bus(bus.clone()),
    );
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
    let meter = provider.meter("test");
    let node = || {
        let mut functions = FunctionRegistry::with_builtins();
        functions.register(fid("slow/v1"), slow.clone());
        AsyncExecutor::new(
            store.clone(),
            Arc::new(functions),
            Arc::new(Cache::new(1 << 20)),
            ExecutorConfig::default(),
            &meter,
        )
    };
    let (a, b) = (node(), node());
    (dir, tier, bus, a, b)
}

async fn setup(exec: &AsyncExecutor) -> (CAddr, CAddr) {
    let leaf = exec
        .store()
        .put_leaf(Bytes::from_static(b"input"))
        .await
        .unwrap();
    let recipe = Recipe::new(
        fid("slow/v1"),
        vec![leaf],
        [("tag".to_owned(), "!".to_owned())],
    )
    .unwrap();
    (leaf, exec.put_recipe(recipe).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computed_output_is_served_by_the_other_node_until_invalidated() {
    let slow = Slow::new(Duration::ZERO);
    let (_dir, tier, bus, a, b) = nodes(&slow);
    let (leaf, recipe) = setup(&a).await;

    assert_eq!(&a.materialize(recipe).await.unwrap()[..], b"input!");
    assert_eq!(slow.calls(), 1);
    assert_eq!(
        tier.outputs.lock().get(&recipe).map(|b| b.to_vec()),
        Some(b"input!".to_vec()),
        "A kept its output in the tier"
    );

    // B's cache is empty: it reads the tier and computes nothing.
    assert_eq!(&b.materialize(recipe).await.unwrap()[..], b"input!");
    assert_eq!(slow.calls(), 1, "B served the stored output");

    // Invalidate through B (from the leaf, cascading): the tier forgets the output, and the
    // other nodes are told.
    b.invalidate(leaf, true).await.unwrap();
    assert!(tier.deleted.lock().contains(&recipe));
    assert_eq!(bus.0.lock().as_slice(), [vec![leaf, recipe]]);
    // What A does when the bus delivers it.
    assert_eq!(a.evict_local(&[leaf, recipe]), 1, "A had the output cached");
    assert_eq!(&a.materialize(recipe).await.unwrap()[..], b"input!");
    assert_eq!(slow.calls(), 2, "A computed it again");

    // Forgetting everything (after missed invalidations) empties the cache.
    assert!(a.evict_all_local() >= 1);
    assert_eq!(a.cache().stats().entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_damaged_tier_means_computing_instead() {
    use std::sync::atomic::Ordering::Relaxed;
    let slow = Slow::new(Duration::ZERO);
    let (_dir, tier, _bus, a, b) = nodes(&slow);
    let (_leaf, recipe) = setup(&a).await;
    tier.fail.store(true, Relaxed);
    assert_eq!(&a.materialize(recipe).await.unwrap()[..], b"input!");
    assert_eq!(slow.calls(), 1);
    tier.fail.store(false, Relaxed);
    tier.damaged.store(true, Relaxed);
    assert_eq!(&b.materialize(recipe).await.unwrap()[..], b"input!");
    assert_eq!(slow.calls(), 2, "a damaged stored output is never served");
    assert_eq!(b.stats().corruptions(), 1, "and it is counted");
}
