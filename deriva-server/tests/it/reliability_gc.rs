//! Crash safety of garbage collection: the real `deriva-server` binary, a store seeded with
//! pinned trees and much garbage, a collection with no grace period running while a writer
//! puts and pins more, SIGKILL in the middle of the sweep (among the recipes in some rounds,
//! among the leaves in others), then a restart on the same data. After each kill:
//!
//! - no live object is lost: every pinned tree, the writer's included, is whole and
//!   materializes byte for byte;
//! - no dangling index row: every stored recipe's inputs and every pin exist, and on the
//!   remote backend every leaf the index records has its object;
//! - the counts agree with the data: the counters a store loads when it opens equal a scan,
//!   and `Status` says the same.
//!
//! At the end a collection runs to completion: exactly the live objects are left.
//!
//! Both backends: local (redb and blob files), and remote (real SeaweedFS and PostgreSQL).
//! Bounded form: 4 kills each. `DERIVA_LONG=1` runs 10 times as many. `DERIVA_SEED=S` replays.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deriva_core::CAddr;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{
    GcRequest, ListPinsRequest, PinRequest, PutLeafRequest, PutRecipeRequest, StatusRequest,
};
use deriva_store::Store;
use deriva_testkit::backends::Space;
use deriva_testkit::backends::{self, Backends};
use deriva_testkit::rpc::get_addr;
use deriva_testkit::{Rng, ServerProcess, long_factor, sample};
use futures::StreamExt as _;
use parking_lot::Mutex;
use tonic::transport::Channel;

/// Where the store under test lives.
enum Backend {
    Local(tempfile::TempDir),
    Remote(Arc<Backends>, Space, tempfile::TempDir),
}

impl Backend {
    fn start(&self) -> ServerProcess {
        match self {
            // Collections with no grace period: the contract's literal GcRequest{}.
            Backend::Local(dir) => ServerProcess::options()
                .dir(dir.path())
                .args(["--gc-min-grace", "0s"])
                .start(),
            Backend::Remote(services, space, _) => deriva_testkit::backends::node(
                services,
                space,
                &["--output-tier", "blob-store", "--gc-min-grace", "0s"],
            ),
        }
    }

    /// Waits until the killed server's database sessions have ended. A statement it sent
    /// before the kill (a leaf's row, the commit of a batch) still runs to its end in
    /// PostgreSQL: its session ends only when it next reads from the dead socket. Until then
    /// the index may still change, and the counts read now could miss a row that is there
    /// when the next server starts. Its sessions are the `deriva-server` ones whose last
    /// statement named this test's schema (the other tests use schemas of their own).
    async fn settle(&self) {
        let Backend::Remote(services, space, _) = self else {
            return;
        };
        let (pg, connection) = tokio_postgres::connect(&services.pg_url(), tokio_postgres::NoTls)
            .await
            .expect("connecting to PostgreSQL");
        let connection = tokio::spawn(connection);
        let pattern = format!("%{}%", space.schema);
        deriva_testkit::backends::sessions_ended(&pg, "deriva-server", &pattern).await;
        drop(pg);
        connection.await.unwrap().unwrap();
    }

    /// The store, opened directly (the server is down): its counters are what it loads.
    async fn open(&self) -> Store {
        match self {
            Backend::Local(dir) => {
                deriva_store_local::open(dir.path()).expect("the local store opens")
            }
            Backend::Remote(services, space, dir) => {
                let config = deriva_store_remote::RemoteConfig {
                    blob_store: format!("s3://{}/{}", services.bucket(), space.prefix),
                    aws: services.aws_env(),
                    index: services.pg_url(),
                    schema: space.schema.clone(),
                    pool_size: 8,
                    local_cache: None,
                    spool_dir: Some(dir.path().join("check-spool")),
                    output_tier: false,
                    create_schema: false,
                    node_id: "gc-crash-check".into(),
                    compute_lease_ttl: deriva_store_remote::LEASE_TTL,
                };
                deriva_store_remote::open(
                    &config,
                    Arc::new(deriva_store::observe::BackendMetrics::noop()),
                )
                .await
                .expect("the remote store opens")
                .store
            }
        }
    }
}

/// What must survive: pinned recipes and the bytes they materialize to, and their leaves.
#[derive(Default)]
struct Live {
    leaves: BTreeMap<CAddr, Bytes>,
    recipes: BTreeMap<CAddr, Bytes>,
    /// Trees whose pin was sent but not acknowledged (the kill may come in between): live if
    /// the restarted server lists the pin, garbage if not. See [`Live::settle`].
    pending: Vec<Tree>,
}

/// A tree of [`pinned_tree`]: its leaf, inner and outer recipe, each with its bytes.
#[derive(Clone)]
struct Tree([(CAddr, Bytes); 3]);

impl Live {
    fn keep(&mut self, tree: &Tree, shared: &(CAddr, Bytes)) {
        let [leaf, inner, outer] = tree.0.clone();
        self.leaves.insert(leaf.0, leaf.1);
        self.leaves.insert(shared.0, shared.1.clone());
        self.recipes.insert(inner.0, inner.1);
        self.recipes.insert(outer.0, outer.1);
    }

    /// After a restart: a tree whose pin the server took before the kill, though its answer
    /// never arrived, is live; the others are garbage.
    fn settle(&mut self, pins: &[Bytes], shared: &(CAddr, Bytes)) {
        for tree in std::mem::take(&mut self.pending) {
            if pins.contains(&bytes(&tree.0[2].0)) {
                self.keep(&tree, shared);
            }
        }
    }
}

fn bytes(addr: &CAddr) -> Bytes {
    Bytes::copy_from_slice(addr.as_bytes())
}

async fn put_leaf(
    client: &mut DerivaClient<Channel>,
    data: &Bytes,
) -> Result<CAddr, tonic::Status> {
    let addr = client
        .put_leaf(PutLeafRequest { data: data.clone() })
        .await?
        .into_inner()
        .addr;
    Ok(CAddr::from_slice(&addr).expect("an address"))
}

/// `concat/v1` over `inputs` (it takes no params: unique inputs make unique recipes).
async fn concat(
    client: &mut DerivaClient<Channel>,
    inputs: &[CAddr],
) -> Result<CAddr, tonic::Status> {
    let req = PutRecipeRequest {
        function_name: "concat".into(),
        function_version: "v1".into(),
        inputs: inputs.iter().map(bytes).collect(),
        params: Default::default(),
    };
    let addr = client.put_recipe(req).await?.into_inner().addr;
    Ok(CAddr::from_slice(&addr).expect("an address"))
}

/// A pinned tree `concat(concat(leaf, shared), leaf)`, recorded in `live` once the pin is
/// acknowledged; `Ok(false)` if a collection removed a part of it first (no grace period).
async fn pinned_tree(
    client: &mut DerivaClient<Channel>,
    live: &Mutex<Live>,
    shared: &(CAddr, Bytes),
    tag: &str,
) -> Result<bool, tonic::Status> {
    let data = Bytes::from(format!("live leaf {tag}"));
    let leaf = put_leaf(client, &data).await?;
    let inner = match concat(client, &[leaf, shared.0]).await {
        Err(e) if e.code() == tonic::Code::FailedPrecondition => return Ok(false),
        other => other?,
    };
    let outer = match concat(client, &[inner, leaf]).await {
        Err(e) if e.code() == tonic::Code::FailedPrecondition => return Ok(false),
        other => other?,
    };
    let inner_bytes: Bytes = [data.as_ref(), shared.1.as_ref()].concat().into();
    let outer_bytes: Bytes = [inner_bytes.as_ref(), data.as_ref()].concat().into();
    let tree = Tree([(leaf, data), (inner, inner_bytes), (outer, outer_bytes)]);
    live.lock().pending.push(tree.clone());
    match client
        .pin(PinRequest {
            addr: bytes(&outer),
        })
        .await
    {
        Err(e) if e.code() == tonic::Code::NotFound => {
            live.lock().pending.retain(|t| t.0[2].0 != outer);
            return Ok(false);
        }
        other => other?,
    };
    let mut l = live.lock();
    l.pending.retain(|t| t.0[2].0 != outer);
    l.keep(&tree, shared);
    Ok(true)
}

/// Garbage: `leaves` unpinned leaves and chains of recipes over them, up to 3 deep.
async fn seed_garbage(client: &DerivaClient<Channel>, rng: &mut Rng, round: u64, leaves: usize) {
    let mut addrs = Vec::new();
    let datas: Vec<Bytes> = (0..leaves)
        .map(|i| {
            let mut d = format!("garbage {round} {i} ").into_bytes();
            let n = rng.below(2048) as usize;
            d.extend(rng.bytes(n));
            Bytes::from(d)
        })
        .collect();
    let put: Vec<CAddr> = futures::stream::iter(datas)
        .map(|d| {
            let mut client = client.clone();
            async move { put_leaf(&mut client, &d).await.expect("seeding a leaf") }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    addrs.extend(put);
    // Three levels of recipes, each over two addresses of the level below.
    let mut below = addrs.clone();
    for _level in 0..3 {
        let pairs: Vec<(CAddr, CAddr)> = below
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0], c[1]))
            .collect();
        below = futures::stream::iter(pairs)
            .map(|(a, b)| {
                let mut client = client.clone();
                async move {
                    concat(&mut client, &[a, b])
                        .await
                        .expect("seeding a recipe")
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
    }
}

/// No dangling row and counts that agree, read from the store opened directly; every live
/// object there. Returns (leaves, recipes).
async fn check_store(backend: &Backend, live: &Live, ctx: &str) -> (u64, u64) {
    let store = backend.open().await;
    let mut recipes = Vec::new();
    for (addr, _) in store.recipes().list().await.unwrap() {
        let stored = store.get_recipe(addr).await.unwrap();
        let stored = stored.expect("nothing deletes while the store is checked");
        recipes.push((addr, stored.recipe.inputs().to_vec()));
    }
    let names: HashSet<CAddr> = recipes.iter().map(|r| r.0).collect();
    let leaves: HashSet<CAddr> = store.blobs().list().await.unwrap().into_iter().collect();
    for (addr, inputs) in &recipes {
        for input in inputs {
            assert!(
                leaves.contains(input) || names.contains(input),
                "{ctx}: recipe {addr} lost its input {input}"
            );
        }
    }
    for pin in store.pins().await.unwrap() {
        assert!(
            leaves.contains(&pin) || names.contains(&pin),
            "{ctx}: pin {pin} names nothing"
        );
    }
    for addr in live.leaves.keys() {
        assert!(leaves.contains(addr), "{ctx}: live leaf {addr} lost");
    }
    for addr in live.recipes.keys() {
        assert!(names.contains(addr), "{ctx}: live recipe {addr} lost");
    }
    // Every recorded leaf is readable and whole: on the remote backend, no row without its
    // object.
    let unreadable: Vec<String> = futures::stream::iter(leaves.iter().copied())
        .map(|addr| {
            let store = &store;
            async move {
                match store.get_leaf(addr).await {
                    Ok(Some(_)) => None,
                    Ok(None) => Some(format!("{addr}: recorded, but no bytes")),
                    Err(e) => Some(format!("{addr}: {e}")),
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(unreadable.is_empty(), "{ctx}: {unreadable:?}");
    let counted = (store.counters().blobs(), store.counters().recipes());
    assert_eq!(
        counted,
        (leaves.len() as u64, recipes.len() as u64),
        "{ctx}: the counters loaded at open vs the data"
    );
    assert_eq!(
        store.count_recipes_by_scan().await.unwrap(),
        recipes.len() as u64
    );
    let released = store.released();
    drop(store);
    released.wait().await;
    counted
}

async fn campaign(backend: Backend, name: &str) {
    let rounds = 4 * long_factor();
    let mut rng = Rng::from_env(name);
    let seed = rng.0;
    let live = Arc::new(Mutex::new(Live::default()));
    let shared = {
        let data = Bytes::from(format!("the shared live leaf of {name}"));
        (CAddr::for_leaf(&data), data)
    };
    let mut interrupted = 0u64;
    // What the store held after the last kill: (leaves, recipes).
    let mut after_kill = (0, 0);

    for round in 0..=rounds {
        let ctx = format!("{name}, seed {seed}, round {round}");
        let server = backend.start();
        let mut client = server.client().await;
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        if round > 0 {
            let pins = client
                .list_pins(ListPinsRequest {})
                .await
                .unwrap()
                .into_inner()
                .addrs;
            live.lock().settle(&pins, &shared);
            // The server loaded the same counts, and serves every live tree whole.
            assert_eq!(
                (status.blob_count, status.recipe_count),
                after_kill,
                "{ctx}: Status after the restart"
            );
            let metrics = server.scrape().await;
            assert_eq!(
                sample(&metrics, "deriva_storage_blobs"),
                Some(status.blob_count as f64),
                "{ctx}"
            );
            let want: Vec<(CAddr, Bytes)> = {
                let l = live.lock();
                l.recipes
                    .iter()
                    .chain(l.leaves.iter())
                    .map(|(a, b)| (*a, b.clone()))
                    .collect()
            };
            for (addr, bytes) in want {
                let got = get_addr(&mut client, &addr)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: live {addr}: {e}"));
                assert_eq!(got, bytes.as_ref(), "{ctx}: live {addr} changed");
            }
        }
        if round == rounds {
            // A collection to the end leaves exactly the live objects.
            let gc = client
                .garbage_collect(GcRequest::default())
                .await
                .unwrap()
                .into_inner();
            let l = live.lock();
            assert_eq!(
                (gc.live_blobs, gc.live_recipes),
                (l.leaves.len() as u64, l.recipes.len() as u64),
                "{ctx}: what is left after a full collection"
            );
            break;
        }

        // Seed: one pinned tree, and garbage.
        put_leaf(&mut client, &shared.1).await.unwrap();
        assert!(
            pinned_tree(&mut client, &live, &shared, &format!("{round} seed"))
                .await
                .unwrap(),
            "{ctx}: nothing collects yet"
        );
        seed_garbage(&client, &mut rng, round, 400).await;
        let seeded = client.status(StatusRequest {}).await.unwrap().into_inner();
        // Strictly older than a cutoff with no grace period (times are kept to the ms).
        tokio::time::sleep(Duration::from_millis(30)).await;

        // A writer adds pinned trees while the collection runs.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mut client, live, shared, stop) =
                (client.clone(), live.clone(), shared.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    if pinned_tree(&mut client, &live, &shared, &format!("{round} w{i}"))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let gc = {
            let mut client = client.clone();
            tokio::spawn(async move { client.garbage_collect(GcRequest::default()).await })
        };
        // Kill in the sweep: among the recipes, or among the leaves.
        let among_leaves = rng.chance(50);
        let mut poll = client.clone();
        deriva_testkit::backends::wait_for("the sweep to start", async || {
            let now = poll.status(StatusRequest {}).await.unwrap().into_inner();
            gc.is_finished()
                || if among_leaves {
                    now.blob_count < seeded.blob_count
                } else {
                    now.recipe_count < seeded.recipe_count
                }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
        stop.store(true, Ordering::SeqCst);
        let mut server = server;
        server.kill();
        match gc.await.unwrap() {
            Ok(_) => eprintln!("{ctx}: the collection finished before the kill"),
            Err(_) => interrupted += 1,
        }
        writer.await.unwrap();
        backend.settle().await;
        let snapshot = {
            let l = live.lock();
            Live {
                leaves: l.leaves.clone(),
                recipes: l.recipes.clone(),
                pending: Vec::new(),
            }
        };
        after_kill = check_store(&backend, &snapshot, &ctx).await;
    }
    eprintln!(
        "{name}: seed {seed}, {rounds} SIGKILLs, {interrupted} in the middle of a collection, {} live trees kept",
        live.lock().recipes.len() / 2
    );
    assert!(interrupted > 0, "no kill landed inside a collection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_gc_on_the_local_backend() {
    campaign(
        Backend::Local(tempfile::tempdir().unwrap()),
        "gc crash campaign, local",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_gc_on_the_remote_backend() {
    campaign(
        Backend::Remote(
            backends::shared(),
            Space::new("gc_crash"),
            tempfile::tempdir().unwrap(),
        ),
        "gc crash campaign, remote",
    )
    .await;
}
