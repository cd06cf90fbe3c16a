//! Several `deriva-server` processes on one remote store: a real SeaweedFS (S3) for the bytes
//! and a real PostgreSQL for the index, started for this test binary by `deriva-testkit/backends.sh`.
//!
//! - two nodes share one bucket and database: put through A, get through B; an Invalidate
//!   through B evicts on A; the output tier serves B without a recompute;
//! - the object store or the database going away under load gives `UNAVAILABLE` naming it,
//!   never `INTERNAL`, and nothing wrong is served; the same nodes recover when it is back;
//! - a node killed under load loses nothing it acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::PutLeafRequest;
use deriva_server::proto::{ExplainRequest, GetRequest, InvalidateRequest};
use deriva_testkit::backends::{self, Backends};
use deriva_testkit::backends::{Space, node, wait_for};
use deriva_testkit::{DEADLINE, ServerProcess, get_all, http_get, put_leaf, put_recipe, sample};
use fake_opentelemetry_collector::FakeCollectorServer;
use tonic::Code;

fn materialized(exposition: &str, result: &str) -> f64 {
    sample(
        exposition,
        &format!(r#"deriva_materialize_total{{result="{result}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_leaves_recipes_outputs_and_invalidations() {
    let services = backends::shared();
    let space = Space::new("two_nodes");
    // B exports its spans to a real OTLP receiver, as to Jaeger.
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let a = node(&services, &space, &["--output-tier", "blob-store"]);
    let b = node(
        &services,
        &space,
        &[
            "--output-tier",
            "blob-store",
            "--otlp-endpoint",
            &collector.endpoint(),
        ],
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // Leaves put through A are served by B, byte for byte (a large one goes in parts).
    let small = put_leaf(&mut ca, b"hello, ").await;
    let big_bytes: Vec<u8> = (0..20 << 20).map(|i: u32| (i % 251) as u8).collect();
    let big = put_leaf(&mut ca, &big_bytes).await;
    assert_eq!(get_all(&mut cb, &big).await.unwrap(), big_bytes);

    // B's trace of that Get shows the object-store read inside the materialize tree, as a
    // client span with the semantic-convention attributes.
    let response = cb
        .get(GetRequest {
            addr: small.clone(),
        })
        .await
        .expect("Get through B");
    let trace_id = response
        .metadata()
        .get("x-trace-id")
        .expect("x-trace-id")
        .to_str()
        .unwrap()
        .to_owned();
    let mut stream = response.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.extend_from_slice(&m.chunk);
    }
    assert_eq!(got, b"hello, ");
    let explained = cb
        .explain(ExplainRequest { trace_id })
        .await
        .expect("Explain through B")
        .into_inner();
    let field = |span: &deriva_server::proto::TraceSpan, key: &str| {
        span.fields
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.value.clone())
    };
    let read = explained
        .spans
        .iter()
        .find(|s| {
            s.name == "object_store" && field(s, "rpc.method").as_deref() == Some("GetObject")
        })
        .unwrap_or_else(|| panic!("no object-store read in {:#?}", explained.spans));
    assert_eq!(field(read, "rpc.system").as_deref(), Some("aws-api"));
    assert_eq!(field(read, "aws.s3.bucket"), Some(services.bucket()));
    let key = field(read, "aws.s3.key").unwrap_or_default();
    assert!(
        key.ends_with(&format!("leaves/{}", deriva_testkit::hex(&small))),
        "{key}"
    );
    let parent = explained
        .spans
        .iter()
        .find(|s| s.id == read.parent)
        .expect("the read has a parent");
    assert_eq!(parent.name, "leaf_read");
    // The same question went to the index at once: an index_db client span of PostgreSQL
    // (the remote backend's calls are traced without --trace-local-store) that asks the
    // recipes, beside the leaf row's lookup (in whichever order they finished).
    let index = explained
        .spans
        .iter()
        .find(|s| {
            s.name == "index_db"
                && s.parent == read.parent
                && field(s, "db.collection.name").as_deref() == Some("recipes")
        })
        .unwrap_or_else(|| panic!("no recipe query beside the read in {:#?}", explained.spans));
    assert_eq!(
        field(index, "db.system.name").as_deref(),
        Some("postgresql")
    );

    // The same read reaches the OTLP receiver as a client span of that trace, with the
    // semantic-convention attributes (what Jaeger shows).
    let mut exported = Vec::new();
    let start = Instant::now();
    let object_read = loop {
        exported.extend(collector.exported_spans(1, Duration::from_secs(1)).await);
        if let Some(span) = exported
            .iter()
            .find(|s| s.trace_id == explained.trace_id && s.name == "GetObject")
        {
            break span.clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no GetObject span of trace {} among {} exported spans",
            explained.trace_id,
            exported.len()
        );
    };
    assert_eq!(object_read.kind, "SPAN_KIND_CLIENT");
    for (key, value) in [
        ("rpc.system", "aws-api".to_owned()),
        ("rpc.method", "GetObject".to_owned()),
        ("aws.s3.bucket", services.bucket()),
    ] {
        let raw = object_read.attributes.get(key).cloned().unwrap_or_default();
        assert!(raw.contains(&format!("{value:?}")), "{key}: {raw}");
    }

    // A recipe put through A, computed by A, is served by B from the output tier.
    let world = put_leaf(&mut ca, b"world").await;
    let greeting = put_recipe(&mut ca, "concat", &[&small, &world], &[]).await;
    assert_eq!(get_all(&mut ca, &greeting).await.unwrap(), b"hello, world");
    let before = b.scrape().await;
    assert_eq!(get_all(&mut cb, &greeting).await.unwrap(), b"hello, world");
    let after = b.scrape().await;
    assert_eq!(
        materialized(&after, "stored") - materialized(&before, "stored"),
        1.0,
        "B read the output from the output tier"
    );
    assert_eq!(
        materialized(&after, "computed"),
        materialized(&before, "computed"),
        "B computed nothing"
    );

    // Invalidate through B: A forgets its cached output (LISTEN/NOTIFY), and the output tier
    // forgets it too, so A's next Get computes it again.
    let cached_on_a = |exposition: &str| sample(exposition, "deriva_cache_entries").unwrap_or(0.0);
    let cached_before = cached_on_a(&a.scrape().await);
    assert!(cached_before >= 1.0);
    cb.invalidate(InvalidateRequest {
        addr: greeting.clone(),
        cascade: true,
    })
    .await
    .expect("Invalidate through B");
    wait_for("A evicts what B invalidated", async || {
        cached_on_a(&a.scrape().await) == cached_before - 1.0
    })
    .await;
    let before = a.scrape().await;
    assert_eq!(get_all(&mut ca, &greeting).await.unwrap(), b"hello, world");
    let after = a.scrape().await;
    assert_eq!(
        materialized(&after, "computed") - materialized(&before, "computed"),
        1.0,
        "A computed the invalidated output again"
    );

    // B's index queries (the Invalidate above walked the dependents in PostgreSQL) reach the
    // receiver as client spans with the database conventions.
    let start = Instant::now();
    loop {
        exported.extend(collector.exported_spans(1, Duration::from_secs(1)).await);
        let query = exported.iter().find(|s| {
            s.attributes
                .get("db.operation.name")
                .is_some_and(|v| v.contains("\"SELECT\""))
        });
        if let Some(query) = query {
            assert_eq!(query.kind, "SPAN_KIND_CLIENT");
            let system = query.attributes.get("db.system.name").cloned();
            assert!(
                system
                    .as_deref()
                    .unwrap_or_default()
                    .contains("\"postgresql\""),
                "{system:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no PostgreSQL client span among {} exported spans",
            exported.len()
        );
    }

    // Both nodes count the same store (B learns A's writes when it reloads its counters).
    for n in [&a, &b] {
        wait_for("every node counts every node's writes", async || {
            let text = n.scrape().await;
            sample(&text, "deriva_dag_recipes") == Some(1.0)
                && sample(&text, "deriva_storage_blobs") == Some(3.0)
        })
        .await;
    }
}

/// Puts and gets as fast as one client can, until `stop`, counting each success in `answered`
/// as it comes; panics on any status but `UNAVAILABLE`, or on wrong bytes. Returns (successes,
/// unavailable answers, their messages).
async fn load(
    node: &ServerProcess,
    known: Vec<(Bytes, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> (u64, u64, Vec<String>) {
    let mut client = node.client().await;
    let (mut ok, mut unavailable, mut messages) = (0, 0, Vec::new());
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let outcome = if i.is_multiple_of(2) {
            let data = format!("load {i} {}", std::process::id()).into_bytes();
            client
                .put_leaf(PutLeafRequest {
                    data: Bytes::from(data),
                })
                .await
                .map(drop)
        } else {
            let (addr, bytes) = &known[(i as usize / 2) % known.len()];
            match client.get(GetRequest { addr: addr.clone() }).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut got = Vec::new();
                    loop {
                        match stream.message().await {
                            Ok(Some(m)) => got.extend_from_slice(&m.chunk),
                            Ok(None) => {
                                assert_eq!(&got, bytes, "a Get served wrong bytes");
                                break Ok(());
                            }
                            Err(s) => break Err(s),
                        }
                    }
                }
                Err(s) => Err(s),
            }
        };
        match outcome {
            Ok(()) => {
                ok += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(s) if s.code() == Code::Unavailable => {
                unavailable += 1;
                if messages.len() < 5 {
                    messages.push(s.message().to_owned());
                }
            }
            Err(s) => panic!("expected OK or UNAVAILABLE, got {s:?}"),
        }
    }
    (ok, unavailable, messages)
}

/// `GET /readyz`: the status and body.
async fn readyz(node: &ServerProcess) -> (u16, String) {
    let r = http_get(node.metrics_addr(), "/readyz")
        .await
        .expect("GET /readyz");
    (r.status, r.body)
}

/// Runs load on `node` while `which` (`weed` or `pg`) is down; returns what the load saw.
async fn outage(services: &Backends, node: &ServerProcess, which: &str, names: &str) {
    let mut client = node.client().await;
    let mut known = Vec::new();
    for i in 0..20 {
        let data = format!("before the outage {i}").into_bytes();
        known.push((put_leaf(&mut client, &data).await, data));
    }
    // A recipe never materialized, over leaves the load never reads (a leaf the load reads
    // twice is kept in the memory cache, and a recipe over it could then be computed without
    // the object store): a Get of it needs both the index (its recipe) and the object store
    // (its inputs).
    let aside = [
        put_leaf(&mut client, b"never read by the load: a").await,
        put_leaf(&mut client, b"never read by the load: b").await,
    ];
    let untouched = put_recipe(&mut client, "concat", &[&aside[0], &aside[1]], &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let loader = load(node, known.clone(), stop.clone(), answered.clone());
    // Waits until the load has had `more` successful answers since `since`.
    let answers = async |since: u64, more: u64| {
        wait_for("successful answers to the load", async || {
            answered.load(Ordering::Relaxed) >= since + more
        })
        .await;
        answered.load(Ordering::Relaxed)
    };
    let during = async {
        // Some successful traffic first, then the outage.
        answers(0, 20).await;
        services.kill(which);
        let killed = Instant::now();
        wait_for("readiness turns 503 naming the backend", async || {
            let (status, body) = readyz(node).await;
            status == 503 && body.contains(names)
        })
        .await;
        eprintln!(
            "{which}: /readyz 503 naming it {} ms after the kill",
            killed.elapsed().as_millis()
        );
        let status = client
            .get(GetRequest {
                addr: untouched.clone(),
            })
            .await;
        let status = match status {
            Ok(stream) => stream.into_inner().message().await.map(drop),
            Err(s) => Err(s),
        };
        let status = status.expect_err("a Get while the backend is down fails");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(names), "{status:?}");
        let put = client
            .put_leaf(PutLeafRequest {
                data: Bytes::from_static(b"during the outage"),
            })
            .await
            .expect_err("a put while the backend is down fails");
        assert_eq!(put.code(), Code::Unavailable, "{put:?}");
        assert!(put.message().contains(names), "{put:?}");
        let restarted = Instant::now();
        services.start_again(which);
        wait_for("readiness recovers", async || readyz(node).await.0 == 200).await;
        eprintln!(
            "{which}: back and the node ready {} ms after the restart began",
            restarted.elapsed().as_millis()
        );
        // Some traffic after the recovery, then stop the load.
        answers(answered.load(Ordering::Relaxed), 20).await;
        stop.store(true, Ordering::Relaxed);
    };
    let ((ok, unavailable, messages), ()) = tokio::join!(loader, during);
    assert!(ok > 0, "the load got answers");
    for m in &messages {
        assert!(m.contains(names), "UNAVAILABLE names the backend: {m}");
    }
    eprintln!("{which} outage: {ok} answers OK, {unavailable} UNAVAILABLE");
    // Recovered, without restarting the node: every leaf from before is still there.
    for (addr, bytes) in &known {
        assert_eq!(&get_all(&mut client, addr).await.unwrap(), bytes);
    }
    assert_eq!(
        get_all(&mut client, &untouched).await.unwrap(),
        b"never read by the load: anever read by the load: b"
    );
    let after = put_leaf(&mut client, b"after the outage").await;
    assert_eq!(
        get_all(&mut client, &after).await.unwrap(),
        b"after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_outage_is_unavailable_and_recovers() {
    // Services of its own: this test stops them.
    let services = Backends::start();
    let space = Space::new("s3_outage");
    let n = node(&services, &space, &["--local-cache-bytes", "0"]);
    outage(&services, &n, "weed", "object store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_outage_is_unavailable_and_recovers() {
    let services = Backends::start();
    let space = Space::new("pg_outage");
    let n = node(&services, &space, &[]);
    outage(&services, &n, "pg", "index database").await;
    // By now the node has made calls of each kind, failed ones and local cache reads included:
    // every family of the README's remote table is on /metrics, as documented.
    readme_remote_families_are_live(&n.scrape().await);
}

/// The README's "Storage backend metrics" table against a live exposition: each documented
/// family is there with its type and buckets, and each live `deriva_backend_*` or
/// `deriva_local_cache_*` family is documented.
fn readme_remote_families_are_live(text: &str) {
    let documented = deriva_testkit::readme_metrics("### Storage backend metrics");
    assert_eq!(documented.len(), 4, "README remote metrics rows");
    let live = deriva_testkit::families(text);
    for (name, kind, buckets) in &documented {
        let found = live
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is documented but not on /metrics"));
        assert_eq!(&found.1, kind, "type of {name}");
        for le in buckets.split(", ").filter(|b| !b.is_empty()) {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name}_bucket{{"))
                        && l.contains(&format!("le=\"{le}\""))),
                "{name}: no bucket {le}"
            );
        }
    }
    for (name, _) in live
        .iter()
        .filter(|(n, _)| n.starts_with("deriva_backend_") || n.starts_with("deriva_local_cache_"))
    {
        assert!(
            documented.iter().any(|(n, _, _)| n == name),
            "{name} is on /metrics but not in the README"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing_it_acknowledged() {
    let services = backends::shared();
    let space = Space::new("kill_node");
    let mut a = node(&services, &space, &[]);
    let b = node(&services, &space, &[]);
    let acknowledged = Arc::new(parking_lot::Mutex::new(Vec::<(Bytes, Vec<u8>)>::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let acknowledged = acknowledged.clone();
            let url = a.url();
            tokio::spawn(async move {
                let Ok(mut client) =
                    deriva_server::proto::deriva_client::DerivaClient::connect(url).await
                else {
                    return;
                };
                for i in 0.. {
                    let data = format!("writer {w} leaf {i}").into_bytes();
                    match client
                        .put_leaf(PutLeafRequest {
                            data: Bytes::from(data.clone()),
                        })
                        .await
                    {
                        Ok(r) => acknowledged.lock().push((r.into_inner().addr, data)),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    wait_for("writes are acknowledged", async || {
        acknowledged.lock().len() >= 100
    })
    .await;
    a.kill();
    for w in writers {
        w.await.expect("writer");
    }
    let acknowledged = acknowledged.lock().clone();
    let mut client = b.client().await;
    for (addr, data) in &acknowledged {
        assert_eq!(&get_all(&mut client, addr).await.unwrap(), data);
    }
    eprintln!(
        "{} acknowledged leaves all readable through B",
        acknowledged.len()
    );
}

/// Large values on the remote backend: a leaf streamed in through one node (spooled, then
/// uploaded in parts) comes out of the other; a spilled output is served from each node's own
/// spill directory; and a budget check uses the leaf sizes PostgreSQL records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_stream_spill_and_meet_the_budget_on_the_remote_backend() {
    use deriva_server::proto::PutLeafStreamRequest;
    let services = backends::shared();
    let space = Space::new("large_values");
    let flags = ["--spill-bytes", "1MiB", "--memory-budget", "64MiB"];
    let (a, b) = (
        node(&services, &space, &flags),
        node(&services, &space, &flags),
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i * 11 % 251) as u8).collect();
    let pieces: Vec<PutLeafStreamRequest> = data
        .chunks(1 << 20)
        .map(|c| PutLeafStreamRequest {
            chunk: Bytes::copy_from_slice(c),
        })
        .collect();
    let leaf = ca
        .put_leaf_stream(futures::stream::iter(pieces))
        .await
        .unwrap()
        .into_inner()
        .addr;
    assert_eq!(
        leaf.as_ref(),
        deriva_core::CAddr::for_leaf(&data).as_bytes()
    );
    let spool = a.dir().join("incoming");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool is empty again"
    );
    assert!(get_all(&mut cb, &leaf).await.unwrap() == data);

    let mib = put_leaf(&mut ca, &data[..1 << 20]).await;
    let four = put_recipe(&mut ca, "repeat", &[&mib], &[("count", "4")]).await;
    for (node, client) in [(&a, &mut ca), (&b, &mut cb)] {
        assert!(get_all(client, &four).await.unwrap() == data[..1 << 20].repeat(4));
        let spilled = node.dir().join("spill").join(deriva_testkit::hex(&four));
        assert!(spilled.is_file(), "{} holds the output", spilled.display());
    }

    // 20 MiB in, 160 MiB out: refused before anything is read, by the other node, from the
    // leaf's size as PostgreSQL records it.
    let huge = put_recipe(&mut ca, "repeat", &[&leaf], &[("count", "8")]).await;
    let err = get_all(&mut cb, &huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains(&(180u64 << 20).to_string()),
        "{}",
        err.message()
    );
}

/// ClusterStatus on the remote backend: every node with a heartbeat row, `alive` while it
/// beats, `suspect` after a missed heartbeat, `dead` after three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_follows_the_heartbeats() {
    use deriva_server::proto::{ClusterStatusRequest, ClusterStatusResponse};
    let services = backends::shared();
    let space = Space::new("heartbeats");
    let flags = ["--heartbeat-secs", "1"];
    let a = node(&services, &space, &flags);
    let mut b = node(&services, &space, &flags);
    let mut ca = a.client().await;
    async fn status(
        client: &mut deriva_server::proto::deriva_client::DerivaClient<tonic::transport::Channel>,
    ) -> ClusterStatusResponse {
        client
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }
    let state_of = |s: &ClusterStatusResponse, addr: &str| {
        s.nodes
            .iter()
            .find(|n| n.grpc_addr == addr)
            .map(|n| n.state.clone())
    };
    wait_for("both nodes alive", async || {
        let s = status(&mut ca).await;
        s.alive_count == 2
            && state_of(&s, a.grpc_addr()).as_deref() == Some("alive")
            && state_of(&s, b.grpc_addr()).as_deref() == Some("alive")
    })
    .await;
    let s = status(&mut ca).await;
    assert!(s.nodes.iter().all(|n| n.role == "server"), "{s:?}");
    assert_ne!(s.nodes[0].name, s.nodes[1].name);

    let b_addr = b.grpc_addr().to_owned();
    b.kill();
    wait_for("the killed node suspect", async || {
        state_of(&status(&mut ca).await, &b_addr).as_deref() == Some("suspect")
    })
    .await;
    wait_for("the killed node dead", async || {
        let s = status(&mut ca).await;
        state_of(&s, &b_addr).as_deref() == Some("dead") && s.alive_count == 1 && s.dead_count == 1
    })
    .await;
    assert_eq!(
        state_of(&status(&mut ca).await, a.grpc_addr()).as_deref(),
        Some("alive"),
        "the node that answers still beats"
    );
}

/// `--node-forget-after`: a row whose last heartbeat is older is deleted at the next heartbeat
/// of a live node, so ClusterStatus lists it no more; a dead node younger than that stays,
/// `dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rows_of_long_silent_nodes_are_forgotten() {
    use deriva_server::proto::ClusterStatusRequest;
    let services = backends::shared();
    let space = Space::new("forget_nodes");
    let a = node(
        &services,
        &space,
        &["--heartbeat-secs", "1", "--node-forget-after", "10m"],
    );
    let (pg, connection) = tokio_postgres::connect(&services.pg_url(), tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    let connection = tokio::spawn(connection);
    // Two nodes that stopped beating: 11 minutes ago, and 1 minute ago.
    let nodes = format!("\"{}\".nodes", space.schema);
    for (name, silent) in [("gone-long-ago", "11 minutes"), ("gone-lately", "1 minute")] {
        pg.execute(
            &format!(
                "INSERT INTO {nodes} (name, grpc_addr, role, incarnation, started_at,
                     heartbeat_at, cache_entries, cache_bytes, blob_count, cpu_load)
                 VALUES ($1, '127.0.0.1:1', 'server', 1, now() - interval '1 day',
                     now() - $2::text::interval, 0, 0, 0, 0)"
            ),
            &[&name, &silent],
        )
        .await
        .expect("planting a node row");
    }
    wait_for("the long-silent node's row deleted", async || {
        let names: Vec<String> = pg
            .query(&format!("SELECT name FROM {nodes}"), &[])
            .await
            .expect("reading the nodes")
            .iter()
            .map(|r| r.get(0))
            .collect();
        !names.iter().any(|n| n == "gone-long-ago")
    })
    .await;
    let status = a
        .client()
        .await
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<(&str, &str)> = status
        .nodes
        .iter()
        .map(|n| (n.grpc_addr.as_str(), n.state.as_str()))
        .collect();
    listed.sort();
    let mut expected = vec![(a.grpc_addr(), "alive"), ("127.0.0.1:1", "dead")];
    expected.sort();
    assert_eq!(listed, expected, "{status:?}");
    assert_eq!((status.alive_count, status.dead_count), (1, 1));
    drop(pg);
    connection.await.unwrap().unwrap();
}

/// A collection through node A on the shared store removes the recipe and its leaf, drops
/// the output from the output tier, and (through the bus) from B's cache, so B, which had it
/// cached, answers NOT_FOUND; put again, it is computed afresh, not read from the tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_on_one_node_reaches_the_output_tier_and_the_other_nodes() {
    use deriva_server::proto::GcRequest;
    let services = backends::shared();
    let space = Space::new("gc_two_nodes");
    // GcRequest{}: no grace period, which --gc-min-grace 0s allows.
    let flags = ["--output-tier", "blob-store", "--gc-min-grace", "0s"];
    let (a, b) = (
        node(&services, &space, &flags),
        node(&services, &space, &flags),
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let leaf = put_leaf(&mut ca, b"collected").await;
    let upper = put_recipe(&mut ca, "uppercase", &[&leaf], &[]).await;
    assert_eq!(get_all(&mut cb, &upper).await.unwrap(), b"COLLECTED");
    // Strictly older than a cutoff with no grace period (times are kept to the millisecond).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let gc = ca
        .garbage_collect(GcRequest {
            detail_addrs: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gc.removed_addrs, vec![upper.clone(), leaf.clone()]);
    assert_eq!((gc.live_blobs, gc.live_recipes), (0, 0));
    wait_for("B to forget the collected output", async || {
        get_all(&mut cb, &upper)
            .await
            .is_err_and(|e| e.code() == Code::NotFound)
    })
    .await;
    let e = get_all(&mut ca, &leaf).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Put again: B computes it; the tier no longer holds the old output.
    assert_eq!(put_leaf(&mut ca, b"collected").await, leaf);
    assert_eq!(put_recipe(&mut ca, "uppercase", &[&leaf], &[]).await, upper);
    let before = b.scrape().await;
    assert_eq!(get_all(&mut cb, &upper).await.unwrap(), b"COLLECTED");
    let after = b.scrape().await;
    assert_eq!(
        materialized(&after, "computed") - materialized(&before, "computed"),
        1.0,
        "B computed it again"
    );
    assert_eq!(
        materialized(&after, "stored"),
        materialized(&before, "stored"),
        "nothing came from the output tier"
    );
    let text = a.scrape().await;
    assert_eq!(
        sample(&text, r#"deriva_gc_removed_total{kind="recipe"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"deriva_gc_runs_total{mode="collect",result="ok"}"#),
        Some(1.0)
    );
}
