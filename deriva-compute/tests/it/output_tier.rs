//! The shared output tier, the invalidation bus and compute leases, as the executor uses them:
//! in-memory stand-ins here (the real ones, in the object store and PostgreSQL, are tested in
//! deriva-store-remote and deriva-server/tests/it/cluster.rs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deriva_compute::testing::{GATE_DEADLINE, Gate, wait_until};
use deriva_compute::{AsyncExecutor, Cache, ExecutorConfig, FunctionRegistry};
use deriva_core::{CAddr, DerivaError, Recipe, Result, SignedRecord};
use deriva_store::{
    ComputeLease, ComputeLeases, HeldBy, InvalidationBus, LeaseAttempt, LeaseEnd, LeaseRelease,
    OutputStore, StoredOutput,
};
use deriva_testkit::compute::{Slow, fid};
use futures::FutureExt as _;
use opentelemetry::metrics::MeterProvider as _;
use parking_lot::Mutex;

/// Outputs in a map; `fail` makes every read fail, `damaged` every read report corruption.
#[derive(Debug, Default)]
struct Tier {
    outputs: Mutex<HashMap<CAddr, StoredOutput>>,
    deleted: Mutex<Vec<CAddr>>,
    fail: std::sync::atomic::AtomicBool,
    damaged: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl OutputStore for Tier {
    async fn get(&self, recipe: CAddr) -> Result<Option<StoredOutput>> {
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

    async fn put(&self, recipe: CAddr, output: Bytes, record: Option<&SignedRecord>) -> Result<()> {
        let stored = StoredOutput {
            bytes: output,
            record: record.cloned(),
        };
        self.outputs.lock().insert(recipe, stored);
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
    let (a, b) = two_engines(&store, "slow/v1", slow);
    (dir, tier, bus, a, b)
}

/// Two executors over `store`, each with a cache of its own and the builtins plus `function`
/// registered as `id`.
fn two_engines(
    store: &Arc<deriva_store::Store>,
    id: &str,
    function: &(impl deriva_compute::ComputeFunction + Clone),
) -> (AsyncExecutor, AsyncExecutor) {
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
    let meter = provider.meter("test");
    let node = || {
        let mut functions = FunctionRegistry::with_builtins();
        functions.register(fid(id), function.clone());
        AsyncExecutor::new(
            store.clone(),
            Arc::new(functions),
            Arc::new(Cache::new(1 << 20)),
            ExecutorConfig::default(),
            &meter,
        )
    };
    (node(), node())
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
        tier.outputs.lock().get(&recipe).map(|b| b.bytes.to_vec()),
        Some(b"input!".to_vec()),
        "A kept its output in the tier"
    );
    let record = tier.outputs.lock()[&recipe].record.clone();
    let record = record
        .expect("the tier keeps the record with the output")
        .record;
    assert_eq!(record.recipe, recipe);
    assert_eq!(record.output_hash, CAddr::for_leaf(b"input!"));
    assert_eq!(record.output_bytes, 6);
    assert_eq!(record.inputs, vec![leaf]);

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

/// Compute leases in a map (the real ones, in PostgreSQL, are tested by
/// deriva-server/tests/it/cluster_tier.rs): a lease is held until released, and an end wakes
/// every waiter.
#[derive(Debug, Default)]
struct Leases(Arc<LeasesInner>);

#[derive(Debug, Default)]
struct LeasesInner {
    held: Mutex<HashMap<CAddr, u64>>,
    next: std::sync::atomic::AtomicU64,
    /// How many times a lease was found held.
    found_held: std::sync::atomic::AtomicU64,
    ended: Arc<tokio::sync::Notify>,
}

struct Release(Arc<LeasesInner>, CAddr, u64);

#[async_trait]
impl LeaseRelease for Release {
    async fn release(self: Box<Self>, _end: LeaseEnd) {
        let Self(leases, recipe, token) = *self;
        let mut held = leases.held.lock();
        if held.get(&recipe) == Some(&token) {
            held.remove(&recipe);
        }
        leases.ended.notify_waiters();
    }
}

#[async_trait]
impl ComputeLeases for Leases {
    async fn acquire(&self, recipe: CAddr, _traceparent: Option<String>) -> Result<LeaseAttempt> {
        use std::sync::atomic::Ordering::Relaxed;
        let inner = &self.0;
        let mut held = inner.held.lock();
        if held.contains_key(&recipe) {
            inner.found_held.fetch_add(1, Relaxed);
            return Ok(LeaseAttempt::Held(HeldBy {
                node: "the other node".into(),
                traceparent: None,
                // Longer than the test: a waiter that is not woken by the end would hang.
                expires_in: Duration::from_secs(3600),
                ended: inner.ended.clone().notified_owned().boxed(),
            }));
        }
        let token = inner.next.fetch_add(1, Relaxed);
        held.insert(recipe, token);
        let release = Release(inner.clone(), recipe, token);
        Ok(LeaseAttempt::Acquired(ComputeLease::new(
            Box::new(release),
            false,
        )))
    }
}

/// Two nodes as [`nodes`] makes them, sharing compute leases too, running `gate` as `gate/v1`,
/// and a recipe of it.
async fn leased_nodes(
    gate: &Gate,
) -> (
    tempfile::TempDir,
    Arc<Tier>,
    Leases,
    AsyncExecutor,
    AsyncExecutor,
    CAddr,
) {
    let dir = tempfile::tempdir().unwrap();
    let (tier, leases) = (Arc::new(Tier::default()), Leases::default());
    let store = Arc::new(
        deriva_store_local::open(dir.path())
            .unwrap()
            .with_outputs(tier.clone())
            .with_leases(Arc::new(Leases(leases.0.clone()))),
    );
    let (a, b) = two_engines(&store, "gate/v1", &gate.function());
    let leaf = a.store().put_leaf(Bytes::from_static(b"in")).await.unwrap();
    let recipe = Recipe::new(fid("gate/v1"), vec![leaf], Vec::<(String, String)>::new()).unwrap();
    let recipe = a.put_recipe(recipe).await.unwrap();
    (dir, tier, leases, a, b, recipe)
}

/// B asks while A computes under the lease: `outcome` of A's compute (a gate that `fails` or
/// not) decides what B gets. Returns both answers and how many computes ran.
async fn b_waits_on_a(fails: bool) -> (Result<Bytes>, Result<Bytes>, usize, Arc<Tier>, CAddr) {
    use std::sync::atomic::Ordering::Relaxed;
    let gate = if fails { Gate::failing() } else { Gate::new() };
    let (_dir, tier, leases, a, b, recipe) = leased_nodes(&gate).await;
    let first = tokio::spawn(async move { a.materialize(recipe).await });
    gate.wait_started(1).await;
    let second = tokio::spawn(async move { b.materialize(recipe).await });
    wait_until("B to find the lease held", || {
        leases.0.found_held.load(Relaxed) >= 1
    })
    .await;
    gate.open();
    let first = first.await.unwrap();
    let second = tokio::time::timeout(GATE_DEADLINE, second)
        .await
        .expect("B does not hang on a lease that ended")
        .unwrap();
    (first, second, gate.counts().started, tier, recipe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_finds_the_lease_held_waits_and_reads_the_output_from_the_tier() {
    let (first, second, computes, tier, recipe) = b_waits_on_a(false).await;
    assert_eq!(&first.unwrap()[..], b"in");
    assert_eq!(&second.unwrap()[..], b"in");
    assert_eq!(computes, 1, "B read A's output");
    assert!(tier.outputs.lock().contains_key(&recipe));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_lease_holder_fails_the_waiter_computes_itself() {
    let (first, second, computes, tier, recipe) = b_waits_on_a(true).await;
    for answer in [first, second] {
        assert!(
            matches!(answer, Err(DerivaError::ComputeFailed { .. })),
            "{answer:?}"
        );
    }
    assert_eq!(computes, 2, "B took the lease and computed");
    assert!(!tier.outputs.lock().contains_key(&recipe));
}
