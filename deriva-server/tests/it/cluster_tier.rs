//! The output tier across nodes, with real processes, a real SeaweedFS and a real PostgreSQL:
//! one compute per recipe across the nodes that share it (compute leases in PostgreSQL,
//! `deriva-store-remote/src/leases.rs`), and its index (`outputs.rs`):
//!
//! - a fresh recipe's Get asks the object store nothing that misses (the index says there is
//!   no output yet);
//! - 16 concurrent Gets of one uncomputed 40 MB gzip recipe, 8 through each of two nodes: one
//!   compute in all, the same bytes from both;
//! - a node that waits on the other's lease links its span to the computing one;
//! - the holder killed while it computes: the other node takes the lease over once it expires.

use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::GetRequest;
use deriva_testkit::backends::{self, Space, node, wait_for};
use deriva_testkit::{Rng, ServerProcess, get_all, put_leaf, put_recipe, sample};
use fake_opentelemetry_collector::FakeCollectorServer;
use tonic::metadata::MetadataValue;

const FLAGS: [&str; 2] = ["--output-tier", "blob-store"];

/// `series` in `node`'s exposition, 0 if absent.
async fn metric(node: &ServerProcess, series: &str) -> f64 {
    sample(&node.scrape().await, series).unwrap_or(0.0)
}

/// Computes of `gzip/v1` on `nodes`, summed.
async fn gzip_computes(nodes: &[&ServerProcess]) -> f64 {
    let mut sum = 0.0;
    for node in nodes {
        sum += metric(
            node,
            r#"deriva_compute_duration_seconds_count{function="gzip/v1"}"#,
        )
        .await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_gets_through_two_nodes_compute_once() {
    let services = backends::shared();
    let space = Space::new("lease_budget");
    let (a, b) = (
        node(&services, &space, &FLAGS),
        node(&services, &space, &FLAGS),
    );
    let (mut ca, cb) = (a.client().await, b.client().await);
    let data: Vec<u8> = (0..40_000_000u32).map(|i| (i % 251) as u8).collect();
    let leaf = put_leaf(&mut ca, &data).await;
    drop(data);
    let recipe = put_recipe(&mut ca, "gzip", &[&leaf], &[("level", "1")]).await;
    let start = Instant::now();
    let gets: Vec<_> = (0..16)
        .map(|i| {
            let mut client = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            let recipe = recipe.clone();
            tokio::spawn(async move { get_all(&mut client, &recipe).await })
        })
        .collect();
    let mut outputs = Vec::new();
    for get in gets {
        outputs.push(get.await.unwrap().expect("every Get answers"));
    }
    eprintln!("16 Gets in {:?}", start.elapsed());
    assert!(outputs[0].starts_with(&[0x1f, 0x8b]), "a gzip stream");
    assert!(
        outputs.iter().all(|o| *o == outputs[0]),
        "the same bytes from both nodes"
    );
    assert_eq!(gzip_computes(&[&a, &b]).await, 1.0, "one compute in all");
    let acquired = r#"deriva_compute_lease_acquired_total"#;
    assert_eq!(metric(&a, acquired).await + metric(&b, acquired).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waiting_on_a_lease_links_to_the_computing_span() {
    let services = backends::shared();
    let space = Space::new("lease_link");
    let mut collector = FakeCollectorServer::start().await.unwrap();
    // Only the forced Gets are traced, so the collector gets a handful of spans.
    let flags = [
        FLAGS[0],
        FLAGS[1],
        "--otlp-endpoint",
        &collector.endpoint(),
        "--trace-sample-ratio",
        "0",
    ];
    let (a, b) = (
        node(&services, &space, &flags),
        node(&services, &space, &flags),
    );
    let (mut ca, cb) = (a.client().await, b.client().await);
    // About 2 s of gzip in a debug build: B asks while A computes.
    let leaf = put_leaf(&mut ca, &Rng::from_env("lease link").ab_letters(1 << 20)).await;
    let recipe = put_recipe(&mut ca, "gzip", &[&leaf], &[("level", "6")]).await;
    let forced_get = |mut client: deriva_server::proto::deriva_client::DerivaClient<_>,
                      addr: Bytes| {
        let mut req = tonic::Request::new(GetRequest { addr });
        req.metadata_mut()
            .insert("x-deriva-trace", MetadataValue::from_static("force"));
        tokio::spawn(async move {
            let mut stream = client.get(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(m) = stream.message().await? {
                out.extend_from_slice(&m.chunk);
            }
            Ok::<_, tonic::Status>(out)
        })
    };
    let first = forced_get(ca.clone(), recipe.clone());
    wait_for("A to take the lease", async || {
        metric(&a, "deriva_compute_lease_acquired_total").await == 1.0
    })
    .await;
    let joined = forced_get(cb.clone(), recipe.clone());
    let (first, joined) = (
        first.await.unwrap().unwrap(),
        joined.await.unwrap().unwrap(),
    );
    assert_eq!(first, joined);
    assert_eq!(gzip_computes(&[&a, &b]).await, 1.0, "one compute in all");
    assert_eq!(metric(&b, "deriva_compute_lease_joined_total").await, 1.0);

    // A's computing materialize span, and B's, which links to it.
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        spans.extend(collector.exported_spans(1, Duration::from_secs(1)).await);
        let computing = spans.iter().find(|s| {
            s.name == "materialize"
                && spans
                    .iter()
                    .any(|c| c.name == "compute" && c.parent_span_id == s.span_id)
        });
        let joiner = computing.and_then(|computing| {
            spans.iter().find(|s| {
                s.name == "materialize"
                    && s.links
                        .iter()
                        .any(|l| l.span_id == computing.span_id && l.trace_id == computing.trace_id)
            })
        });
        if let (Some(computing), Some(joiner)) = (computing, joiner) {
            break Some((computing.trace_id.clone(), joiner.trace_id.clone()));
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let Some((computing, joiner)) = found else {
        let shown: Vec<_> = spans
            .iter()
            .map(|s| (&s.name, &s.trace_id, &s.span_id, &s.links))
            .collect();
        panic!("no materialize span links to the computing one in {shown:#?}");
    };
    assert_ne!(computing, joiner, "two requests, two traces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_node_died_is_taken_over_once_it_expires() {
    let services = backends::shared();
    let space = Space::new("lease_takeover");
    let flags = [FLAGS[0], FLAGS[1], "--compute-lease-ttl", "2s"];
    let (mut a, b) = (
        node(&services, &space, &flags),
        node(&services, &space, &flags),
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // About 2 s of gzip in a debug build: A is killed while it computes.
    let leaf = put_leaf(
        &mut ca,
        &Rng::from_env("lease takeover").ab_letters(1 << 20),
    )
    .await;
    let recipe = put_recipe(&mut ca, "gzip", &[&leaf], &[("level", "6")]).await;
    let leader = {
        let (mut ca, recipe) = (ca.clone(), recipe.clone());
        tokio::spawn(async move { get_all(&mut ca, &recipe).await })
    };
    wait_for("A to take the lease", async || {
        metric(&a, "deriva_compute_lease_acquired_total").await == 1.0
    })
    .await;
    // Killed while it computes: its lease stays until it expires.
    a.kill();
    assert!(leader.await.unwrap().is_err(), "A died before it answered");
    let start = Instant::now();
    let output = get_all(&mut cb, &recipe).await.expect("B answers");
    eprintln!("B answered in {:?}", start.elapsed());
    assert!(output.starts_with(&[0x1f, 0x8b]), "a gzip stream");
    let text = b.scrape().await;
    for series in [
        "deriva_compute_lease_expired_total",
        "deriva_compute_lease_acquired_total",
        r#"deriva_compute_duration_seconds_count{function="gzip/v1"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(1.0), "{series} on B");
    }
}

/// S3 reads (`get`, `head`) on `node`: each would miss for a fresh recipe.
async fn s3_reads(node: &ServerProcess) -> f64 {
    let text = node.scrape().await;
    ["get", "head"]
        .iter()
        .map(|op| {
            let series = format!(
                r#"deriva_backend_request_duration_seconds_count{{backend="s3",op="{op}"}}"#
            );
            sample(&text, &series).unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_recipe_asks_the_object_store_nothing_that_misses() {
    let services = backends::shared();
    let space = Space::new("outputs_index");
    let a = node(&services, &space, &FLAGS);
    let mut ca = a.client().await;
    let leaf = put_leaf(&mut ca, b"read from the local cache").await;
    // Read once, so that the recipe's input comes from the local read-through cache.
    get_all(&mut ca, &leaf).await.unwrap();
    let upper = put_recipe(&mut ca, "uppercase", &[&leaf], &[]).await;
    let before = s3_reads(&a).await;
    assert_eq!(
        get_all(&mut ca, &upper).await.unwrap(),
        b"READ FROM THE LOCAL CACHE"
    );
    assert_eq!(s3_reads(&a).await, before, "no S3 read for a fresh recipe");
    let text = a.scrape().await;
    assert_eq!(
        sample(
            &text,
            r#"deriva_backend_request_duration_seconds_count{backend="s3",op="put"}"#
        ),
        Some(2.0),
        "the leaf and the output"
    );
    assert!(
        sample(
            &text,
            r#"deriva_backend_request_duration_seconds_count{backend="postgres",op="find_output"}"#
        )
        .is_some(),
        "the index was asked"
    );
}
