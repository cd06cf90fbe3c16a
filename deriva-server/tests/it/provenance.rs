//! Provenance on one node (the local store), through a real tonic client against the server
//! function on port 0: every computed output's record (who, where, when, which trace), a hit's
//! origin on its span, the `Provenance` RPC, sampled audits with a deliberately
//! nondeterministic function, `Verify` as an audit, signed records, and absurd requests. The
//! same across two nodes on SeaweedFS and PostgreSQL is `cluster_provenance.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_compute::{ComputeContext, ComputeFunction, FunctionError, FunctionRegistry};
use deriva_core::{CAddr, FunctionId, Params, Recipe, SignedRecord};
use deriva_server::proto::{ExplainRequest, GetRequest, ProvenanceRequest, VerifyRequest};
use deriva_server::telemetry::TelemetryConfig;
use deriva_testkit::http::http_get_with;
use deriva_testkit::{InProcess, http_get};

use crate::observability::wait_sample;
use deriva_util::signing::VerifyingKey;
use tonic::Code;

/// Gives another output on every call.
#[derive(Default)]
struct Nondeterministic(AtomicUsize);

impl ComputeFunction for Nondeterministic {
    fn compute(&self, _: &ComputeContext, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        Ok(format!("run {}", self.0.fetch_add(1, Ordering::SeqCst)).into())
    }
}

fn functions() -> FunctionRegistry {
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(
        FunctionId::new("nondeterministic", "v1").unwrap(),
        Nondeterministic::default(),
    );
    functions
}

/// A node with telemetry (the trace store) and the nondeterministic function, configured by
/// `tweak`.
async fn node(tweak: impl FnOnce(&mut deriva_server::Config)) -> InProcess {
    InProcess::builder()
        .telemetry(TelemetryConfig::default())
        .http()
        .functions(functions())
        .config(tweak)
        .start()
        .await
}

/// Gets `addr` whole; answers the bytes and the request's trace id.
async fn traced_get(s: &mut InProcess, addr: &Bytes) -> (Vec<u8>, String) {
    let (bytes, meta) = s
        .get_with_metadata(tonic::Request::new(GetRequest { addr: addr.clone() }))
        .await
        .unwrap();
    let trace = meta.get("x-trace-id").unwrap().to_str().unwrap().to_owned();
    (bytes, trace)
}

async fn provenance(
    s: &mut InProcess,
    addr: &Bytes,
    depth: u32,
) -> deriva_server::proto::ProvenanceResponse {
    s.client
        .provenance(ProvenanceRequest {
            addr: addr.clone(),
            depth,
        })
        .await
        .unwrap()
        .into_inner()
}

fn record_of(entry: &deriva_server::proto::ProvenanceEntry) -> SignedRecord {
    assert!(!entry.record.is_empty(), "no record in {entry:?}");
    SignedRecord::from_bytes(&entry.record).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_names_and_links_the_compute_that_made_it() {
    let mut s = node(|_| {}).await;
    let a = s.put(b"hello ").await;
    let b = s.put(b"world").await;
    let r = s.recipe("concat", &[&a, &b], &[]).await;
    let (first, computed_in) = traced_get(&mut s, &r).await;
    assert_eq!(first, b"hello world");

    // The record: function, inputs, output, node, and the trace it was computed in.
    let tree = provenance(&mut s, &r, 1).await;
    assert!(!tree.truncated);
    assert_eq!(tree.entries.len(), 3, "the recipe and its two leaves");
    let top = &tree.entries[0];
    assert_eq!((top.kind.as_str(), top.depth), ("recipe", 0));
    assert_eq!(top.function_name, "concat");
    let record = record_of(top);
    assert_eq!(record.record.recipe.as_bytes(), &r[..]);
    assert_eq!(record.record.function.to_string(), "concat/v1");
    assert_eq!(record.record.output_hash, CAddr::for_leaf(b"hello world"));
    assert_eq!(record.record.output_bytes, 11);
    assert_eq!(record.record.node, "deriva-server");
    assert_eq!(record.signature, None, "unsigned without --signing-key");
    let span = record.record.span.expect("the compute span");
    assert_eq!(span.trace_hex(), computed_in);
    let age = record.record.age(std::time::SystemTime::now());
    assert!(age < Duration::from_secs(600), "computed just now: {age:?}");

    // A hit of it, in another trace, names its origin and links to it.
    let (again, hit_in) = traced_get(&mut s, &r).await;
    assert_eq!(again, first);
    assert_ne!(hit_in, computed_in);
    let explained = s
        .client
        .explain(ExplainRequest {
            trace_id: hit_in.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let materialize = explained
        .spans
        .iter()
        .find(|s| s.name == "materialize")
        .expect("a materialize span");
    let field = |key: &str| {
        materialize
            .fields
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.value.clone())
            .unwrap_or_else(|| panic!("no {key} in {:?}", materialize.fields))
    };
    assert_eq!(field("result"), "hit");
    assert_eq!(field("deriva.origin.node"), "deriva-server");
    assert_eq!(field("deriva.origin.trace_id"), computed_in);
    assert_eq!(field("deriva.origin.span_id"), span.span_hex());
    let took: f64 = field("deriva.origin.duration_seconds").parse().unwrap();
    assert!((0.0..60.0).contains(&took), "{took}");
    let age: f64 = field("deriva.origin.age_seconds").parse().unwrap();
    assert!((0.0..600.0).contains(&age), "{age}");

    // `deriva get --explain` names the origin on the hit row.
    let explain = cli(&s, &["get", &deriva_testkit::hex(&r), "--explain"]);
    assert!(explain.status.success());
    let explained = String::from_utf8_lossy(&explain.stderr);
    assert!(
        explained
            .lines()
            .any(|l| l.contains("hit · computed on deriva-server") && l.contains(" ago in ")),
        "{explained}"
    );

    // The pages: the hit's waterfall links to the compute's, and to the provenance page.
    let html = [("Accept", "text/html")];
    let page = http_get_with(s.http_addr(), &format!("/debug/traces/{hit_in}"), &html)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("href=\"/debug/traces/{computed_in}\"")),
        "the origin links to the compute's trace:\n{}",
        page.body
    );
    let addr = deriva_testkit::hex(&r);
    assert!(
        page.body
            .contains(&format!("href=\"/debug/provenance/{addr}\""))
    );
    let page = http_get_with(s.http_addr(), &format!("/debug/provenance/{addr}"), &html)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("concat/v1"), "{}", page.body);
    assert!(
        page.body
            .contains(&format!("href=\"/debug/traces/{computed_in}\""))
    );
    let json = http_get(s.http_addr(), &format!("/debug/provenance/{addr}?depth=1"))
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    assert_eq!(json["entries"][0]["node"], "deriva-server");
    assert_eq!(json["entries"][0]["trace_id"], computed_in.as_str());
    assert_eq!(json["entries"].as_array().unwrap().len(), 3);
    for (path, code) in [
        ("/debug/provenance/xyz".to_owned(), 400),
        (format!("/debug/provenance/{addr}?depth=65"), 400),
        (format!("/debug/provenance/{addr}?depth=-1"), 400),
        (format!("/debug/provenance/{}", "ab".repeat(32)), 404),
    ] {
        let got = http_get(s.http_addr(), &path).await.unwrap();
        assert_eq!(got.status, code, "{path}: {}", got.body);
    }
    for leaf in &tree.entries[1..] {
        assert_eq!((leaf.kind.as_str(), leaf.depth), ("leaf", 1));
        assert!(leaf.leaf_size == 6 || leaf.leaf_size == 5, "{leaf:?}");
        assert!(leaf.stored_at_unix_micros > 0, "a put time: {leaf:?}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provenance_requests_get_precise_errors() {
    let mut s = node(|_| {}).await;
    let err = s
        .client
        .provenance(ProvenanceRequest {
            addr: Bytes::from_static(b"abc"),
            depth: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("addr"), "{}", err.message());
    let nowhere = Bytes::copy_from_slice(CAddr::for_leaf(b"never stored").as_bytes());
    let err = s
        .client
        .provenance(ProvenanceRequest {
            addr: nowhere,
            depth: u32::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A leaf has no record, only its size and put time.
    let leaf = s.put(b"just bytes").await;
    let tree = provenance(&mut s, &leaf, u32::MAX).await;
    assert_eq!(tree.entries.len(), 1);
    assert_eq!(tree.entries[0].kind, "leaf");
    assert_eq!(tree.entries[0].leaf_size, 10);
    // A recipe never computed has no record yet.
    let r = s.recipe("uppercase", &[&leaf], &[]).await;
    let tree = provenance(&mut s, &r, 0).await;
    assert_eq!(tree.entries.len(), 1, "depth 0: the address alone");
    assert!(tree.entries[0].record.is_empty());
    s.assert_serving().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_deeper_than_the_cap_is_cut_and_says_so() {
    let mut s = node(|_| {}).await;
    let leaf = s.put(b"bottom").await;
    let mut below = CAddr::from_slice(&leaf).unwrap();
    let mut chain = Vec::new();
    for _ in 0..5000 {
        let recipe = Recipe::new(
            FunctionId::new("identity", "v1").unwrap(),
            vec![below],
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        below = recipe.addr();
        chain.push(recipe);
    }
    s.executor().store().put_recipes(chain).await.unwrap();
    let top = Bytes::copy_from_slice(below.as_bytes());
    let tree = provenance(&mut s, &top, u32::MAX).await;
    assert!(tree.truncated);
    assert_eq!(
        tree.entries.len(),
        deriva_compute::PROVENANCE_MAX_ENTRIES,
        "as many entries as the cap"
    );
    assert_eq!(
        tree.entries.last().unwrap().depth as usize,
        tree.entries.len() - 1
    );
    s.assert_serving().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_count_matches_and_dispute_a_nondeterministic_function() {
    let mut s = node(|c| c.provenance.audit_sample_ratio = 1.0).await;
    let a = s.put(b"input").await;
    let upper = s.recipe("uppercase", &[&a], &[]).await;
    let flaky = s.recipe("nondeterministic", &[&a], &[]).await;

    // Computed, then hit: the hit is audited, and uppercase gives the same bytes.
    let (computed, _) = traced_get(&mut s, &upper).await;
    assert_eq!(traced_get(&mut s, &upper).await.0, computed);
    wait_sample(
        &s,
        r#"deriva_audit_total{function="uppercase/v1",result="match"}"#,
        1.0,
    )
    .await;
    let tree = provenance(&mut s, &upper, 0).await;
    assert!(tree.entries[0].audit_match >= 1, "{:?}", tree.entries[0]);
    assert_eq!(tree.entries[0].audit_mismatch, 0);

    // The nondeterministic function: its hit is served (keep), its audit disagrees.
    let (first, _) = traced_get(&mut s, &flaky).await;
    assert_eq!(
        traced_get(&mut s, &flaky).await.0,
        first,
        "keep: still served"
    );
    wait_sample(
        &s,
        r#"deriva_audit_total{function="nondeterministic/v1",result="mismatch"}"#,
        1.0,
    )
    .await;
    let tree = provenance(&mut s, &flaky, 0).await;
    assert!(
        tree.entries[0].audit_mismatch >= 1,
        "disputed: {:?}",
        tree.entries[0]
    );
    assert_eq!(
        record_of(&tree.entries[0]).record.output_hash,
        CAddr::for_leaf(&first),
        "the record is still of the output served"
    );
    let logs = s.logs.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("audit mismatch")),
        "a WARN names the mismatch:\n{logs}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mismatch_evict_drops_the_disputed_output() {
    let mut s = node(|c| {
        c.provenance.audit_sample_ratio = 1.0;
        c.provenance.on_mismatch = deriva_compute::OnMismatch::Evict;
    })
    .await;
    let a = s.put(b"input").await;
    let flaky = s.recipe("nondeterministic", &[&a], &[]).await;
    let (first, _) = traced_get(&mut s, &flaky).await;
    assert_eq!(
        traced_get(&mut s, &flaky).await.0,
        first,
        "the hit is served"
    );
    wait_sample(
        &s,
        r#"deriva_audit_total{function="nondeterministic/v1",result="mismatch"}"#,
        1.0,
    )
    .await;
    // Evicted: the next Get computes it again (a third run, another output).
    let deadline = Instant::now() + Duration::from_secs(30);
    while s
        .executor()
        .cache()
        .contains(&CAddr::from_slice(&flaky).unwrap())
    {
        assert!(
            Instant::now() < deadline,
            "the disputed output is still cached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(traced_get(&mut s, &flaky).await.0, first);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_counts_as_an_audit() {
    let mut s = node(|_| {}).await;
    let a = s.put(b"input").await;
    let r = s.recipe("reverse", &[&a], &[]).await;
    traced_get(&mut s, &r).await;
    let report = s
        .client
        .verify(VerifyRequest { addr: r.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(report.deterministic);
    wait_sample(
        &s,
        r#"deriva_audit_total{function="reverse/v1",result="match"}"#,
        1.0,
    )
    .await;
    let tree = provenance(&mut s, &r, 0).await;
    assert_eq!(tree.entries[0].audit_match, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_record_verifies_and_one_altered_byte_fails() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("node.pem");
    deriva_server::provenance::keygen(&key).unwrap();
    let public = VerifyingKey::load(&keys.path().join("node.pem.pub")).unwrap();
    let mut s = node(|c| c.provenance.signing_key = Some(key.clone())).await;
    let a = s.put(b"signed input").await;
    let r = s.recipe("blake3", &[&a], &[]).await;
    traced_get(&mut s, &r).await;
    let tree = provenance(&mut s, &r, 0).await;
    let signed = record_of(&tree.entries[0]);
    let signature = signed.signature.expect("signed with --signing-key");
    let canonical = signed.record.canonical_bytes();
    assert!(public.verify(&canonical, &signature));
    for at in [0, canonical.len() / 2, canonical.len() - 1] {
        let mut altered = canonical.clone();
        altered[at] ^= 1;
        assert!(!public.verify(&altered, &signature), "byte {at} altered");
    }

    // The client checks every signature of the tree: the key that signed passes, another
    // fails, naming the record.
    let addr = deriva_testkit::hex(&r);
    let pub_path = keys.path().join("node.pem.pub");
    let ok = cli(
        &s,
        &[
            "provenance",
            &addr,
            "--verify-key",
            pub_path.to_str().unwrap(),
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let other = keys.path().join("other.pem");
    deriva_server::provenance::keygen(&other).unwrap();
    let other_pub = keys.path().join("other.pem.pub");
    let fails = cli(
        &s,
        &[
            "provenance",
            &addr,
            "--verify-key",
            other_pub.to_str().unwrap(),
        ],
    );
    assert_eq!(fails.status.code(), Some(1));
    let said = String::from_utf8_lossy(&fails.stderr);
    assert!(said.contains(&addr), "names the record that fails: {said}");
    let json = cli(&s, &["provenance", &addr, "--json"]);
    assert!(json.status.success());
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["kind"], "recipe");
    assert_eq!(json["function"], "blake3/v1");
    assert_eq!(json["node"], "deriva-server");
    assert_eq!(json["signed"], true);
    assert_eq!(json["inputs"][0]["kind"], "leaf");
    assert_eq!(
        json["trace_id"],
        signed.record.span.unwrap().trace_hex().as_str()
    );
    s.stop().await;
}

/// The `deriva` binary against `s` with `args`.
fn cli(s: &InProcess, args: &[&str]) -> std::process::Output {
    std::process::Command::new(deriva_testkit::deriva_bin())
        .args(["--server", &format!("http://{}", s.grpc_addr())])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        InProcess::builder()
            .dir(dir.path())
            .functions(functions())
            .start()
    };
    let mut s = start().await;
    let a = s.put(b"kept").await;
    let r = s.recipe("uppercase", &[&a], &[]).await;
    assert_eq!(s.get(&r).await.unwrap(), b"KEPT");
    let before = record_of(&provenance(&mut s, &r, 0).await.entries[0]);
    s.stop().await;

    let mut s = start().await;
    let after = record_of(&provenance(&mut s, &r, 0).await.entries[0]);
    assert_eq!(after, before, "the same record after the restart");
    // Invalidated, the output's record goes with it.
    s.client
        .invalidate(deriva_server::proto::InvalidateRequest {
            addr: r.clone(),
            cascade: false,
        })
        .await
        .unwrap();
    assert!(provenance(&mut s, &r, 0).await.entries[0].record.is_empty());
    s.stop().await;
}
