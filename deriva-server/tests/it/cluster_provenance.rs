//! Provenance across two nodes, with real processes, a real SeaweedFS, a real PostgreSQL and a
//! real OTLP receiver, `--output-tier blob-store`: a Get through A under trace T1 computes a
//! recipe; a Get through B under trace T2 hits A's output, and B's exported spans for T2 link
//! to trace T1; B audits the hit (`--audit-sample-ratio 1`) and it matches; `Provenance` (and
//! `deriva provenance --json`) through B names A, T1 and the function, before and after both
//! nodes restart.

use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::SignedRecord;
use deriva_server::proto::{GetRequest, ProvenanceRequest};
use deriva_testkit::backends::{self, Backends, Space, on_backends, wait_for};
use deriva_testkit::{ServerProcess, put_leaf, put_recipe, sample};
use fake_opentelemetry_collector::FakeCollectorServer;
use tonic::metadata::MetadataValue;

const T1: &str = "11111111111111111111111111111111";
const T2: &str = "22222222222222222222222222222222";

/// A node named `name` (its `service.instance.id`) in `space`, exporting to `collector`.
fn named(
    services: &Backends,
    space: &Space,
    name: &str,
    collector: &str,
    extra: &[&str],
) -> ServerProcess {
    let mut flags = vec![
        "--output-tier",
        "blob-store",
        "--otlp-endpoint",
        collector,
        "--trace-sample-ratio",
        "0",
    ];
    flags.extend_from_slice(extra);
    on_backends(ServerProcess::options(), services, space, &flags)
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("service.instance.id={name}"),
        )
        .start()
}

/// Gets `addr` through `node` under the sampled trace `trace`.
async fn get_in_trace(node: &ServerProcess, addr: &Bytes, trace: &str) -> Vec<u8> {
    let mut client = node.client().await;
    let mut req = tonic::Request::new(GetRequest { addr: addr.clone() });
    let parent = MetadataValue::try_from(format!("00-{trace}-00000000000000aa-01")).unwrap();
    req.metadata_mut().insert("traceparent", parent);
    let mut stream = client.get(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        out.extend_from_slice(&m.chunk);
    }
    out
}

/// The record of `addr` that `Provenance` through `node` answers, with its audits.
async fn record_through(node: &ServerProcess, addr: &Bytes) -> (SignedRecord, u64, u64) {
    let tree = node
        .client()
        .await
        .provenance(ProvenanceRequest {
            addr: addr.clone(),
            depth: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let top = &tree.entries[0];
    assert_eq!(top.kind, "recipe");
    assert_eq!(tree.entries.len(), 2, "the recipe and its leaf: {tree:?}");
    let record = SignedRecord::from_bytes(&top.record).expect("a record");
    (record, top.audit_match, top.audit_mismatch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_on_another_node_links_to_the_compute_and_its_record_outlives_restarts() {
    let services = backends::shared();
    let space = Space::new("provenance");
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let endpoint = collector.endpoint();
    let mut a = named(&services, &space, "node-a", &endpoint, &[]);
    let mut b = named(
        &services,
        &space,
        "node-b",
        &endpoint,
        &["--audit-sample-ratio", "1"],
    );
    let mut ca = a.client().await;
    let leaf = put_leaf(&mut ca, b"where did this come from?").await;
    let recipe = put_recipe(&mut ca, "uppercase", &[&leaf], &[]).await;

    let computed = get_in_trace(&a, &recipe, T1).await;
    assert_eq!(computed, b"WHERE DID THIS COME FROM?");
    let hit = get_in_trace(&b, &recipe, T2).await;
    assert_eq!(hit, computed);
    let compute_count = r#"deriva_compute_duration_seconds_count{function="uppercase/v1"}"#;
    assert_eq!(sample(&a.scrape().await, compute_count), Some(1.0));

    // B's spans for T2: a materialize span that links to A's compute span in T1.
    let (record, _, _) = record_through(&b, &recipe).await;
    let compute_span = record.record.span.expect("the compute span");
    assert_eq!(compute_span.trace_hex(), T1);
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let linked = loop {
        spans.extend(collector.exported_spans(1, Duration::from_secs(1)).await);
        let compute = spans
            .iter()
            .find(|s| s.name == "compute" && s.trace_id == T1);
        let linking = spans.iter().find(|s| {
            s.name == "materialize"
                && s.trace_id == T2
                && s.links
                    .iter()
                    .any(|l| l.trace_id == T1 && l.span_id == compute_span.span_hex())
        });
        if let (Some(compute), Some(linking)) = (compute, linking) {
            assert_eq!(
                compute.span_id,
                compute_span.span_hex(),
                "the record names it"
            );
            let attrs = format!("{:?}", linking.attributes);
            assert!(attrs.contains("deriva.origin.node"), "{attrs}");
            assert!(attrs.contains("node-a"), "{attrs}");
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    if !linked {
        let shown: Vec<_> = spans
            .iter()
            .map(|s| (&s.name, &s.trace_id, &s.span_id, &s.links))
            .collect();
        panic!("no materialize span of T2 links to T1's compute in {shown:#?}");
    }

    // B audited the hit: computed again on B, the same bytes.
    wait_for("B's audit of the hit", async || {
        sample(
            &b.scrape().await,
            r#"deriva_audit_total{function="uppercase/v1",result="match"}"#,
        ) == Some(1.0)
    })
    .await;
    let check = |record: &SignedRecord| {
        assert_eq!(record.record.node, "node-a");
        assert_eq!(record.record.function.to_string(), "uppercase/v1");
        assert_eq!(
            record.record.output_hash,
            deriva_core::CAddr::for_leaf(&computed)
        );
        assert_eq!(
            record.record.span.map(|s| s.trace_hex()).as_deref(),
            Some(T1)
        );
    };
    wait_for("the audit in the record's tallies", async || {
        record_through(&b, &recipe).await.1 == 1
    })
    .await;
    let (before, matches, mismatches) = record_through(&b, &recipe).await;
    check(&before);
    assert_eq!((matches, mismatches), (1, 0));
    let json = cli_json(&b, &recipe);
    assert_eq!(json["node"], "node-a", "{json}");
    assert_eq!(json["trace_id"], T1, "{json}");

    // Both nodes restart: the record is the store's, not theirs.
    a.stop();
    b.stop();
    let a = named(&services, &space, "node-a", &endpoint, &[]);
    let b = named(&services, &space, "node-b", &endpoint, &[]);
    let (after, matches, _) = record_through(&b, &recipe).await;
    assert_eq!(after, before, "the same record after both restarts");
    assert_eq!(matches, 1);
    let json = cli_json(&b, &recipe);
    assert_eq!(json["node"], "node-a", "{json}");
    assert_eq!(json["trace_id"], T1, "{json}");
    assert_eq!(json["function"], "uppercase/v1", "{json}");
    drop(a);
}

/// `deriva provenance ADDR --json` through `node`, parsed.
fn cli_json(node: &ServerProcess, addr: &Bytes) -> serde_json::Value {
    let out = std::process::Command::new(deriva_testkit::deriva_bin())
        .args(["--server", &node.url(), "provenance"])
        .arg(deriva_testkit::hex(addr))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deriva provenance: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}
