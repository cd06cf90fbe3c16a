//! The smaller gaps of issue 30, each attacked through the binary: a readiness flood against a
//! node on the remote backend, a damaged blob and a damaged spill file read by a read-only
//! caller, `x-deriva-trace: force` from callers who may not force and beyond
//! `--trace-max-per-second`, `Explain` of another caller's trace, `deriva gc --grace 0s`, and an
//! output-tier object moved under another recipe in a real SeaweedFS.

use deriva_testkit::backends::{self, Space};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{ExplainRequest, GcRequest, GetRequest, PutLeafRequest};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use deriva_testkit::http::http_get;
use deriva_testkit::process::ServerProcess;
use deriva_testkit::{DEADLINE, get_all, hex, put_leaf, put_recipe, sample, token_file};

// ---- shared helpers ---------------------------------------------------------------------------

/// `msg` as a request carrying `token` (if any) and the given metadata.
fn request<T>(msg: T, token: Option<&str>, metadata: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
        );
    }
    for (key, value) in metadata {
        r.metadata_mut()
            .insert(*key, MetadataValue::try_from(*value).unwrap());
    }
    r
}

/// A Get read to its end with `token` and `metadata`: the `x-trace-id` the server answered, and
/// the bytes or the status.
async fn get_with(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
    token: Option<&str>,
    metadata: &[(&'static str, &str)],
) -> (Option<String>, Result<Vec<u8>, tonic::Status>) {
    let req = request(GetRequest { addr: addr.clone() }, token, metadata);
    let trace_id = |m: &tonic::metadata::MetadataMap| {
        m.get("x-trace-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let response = match client.get(req).await {
        Ok(r) => r,
        Err(status) => return (trace_id(status.metadata()), Err(status)),
    };
    let id = trace_id(response.metadata());
    let mut stream = response.into_inner();
    let mut bytes = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => bytes.extend_from_slice(&msg.chunk),
            Ok(None) => return (id, Ok(bytes)),
            Err(status) => return (id, Err(status)),
        }
    }
}

/// `PutLeaf` with `token`.
async fn put_leaf_as(client: &mut DerivaClient<Channel>, token: &str, data: &[u8]) -> Bytes {
    let req = request(
        PutLeafRequest {
            data: Bytes::copy_from_slice(data),
        },
        Some(token),
        &[],
    );
    client.put_leaf(req).await.unwrap().into_inner().addr
}

/// The binary under attack on the remote backend of `backends`, in `space`, with `extra` flags.
fn remote_node(backends: &backends::Backends, space: &Space, extra: &[&str]) -> ServerProcess {
    backends::on_backends(super::server(), backends, space, extra).start()
}

/// Polls `GET /readyz` until it answers 200 (every 20 ms, for at most [`DEADLINE`]).
async fn wait_ready(http: &str) {
    let start = Instant::now();
    loop {
        if http_get(http, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number of calls to `backend` with `op` in an exposition (the count of the duration
/// histogram, whatever the order of its labels).
fn backend_calls(exposition: &str, backend: &str, op: &str) -> f64 {
    let (backend, op) = (format!("backend=\"{backend}\""), format!("op=\"{op}\""));
    exposition
        .lines()
        .filter(|l| l.starts_with("deriva_backend_request_duration_seconds_count{"))
        .filter(|l| l.contains(&backend) && l.contains(&op))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- readiness ----------------------------------------------------------------------------------

/// 200 concurrent `/readyz` and `/health` requests, unauthenticated, against a node on the
/// remote backend: each used to make a PostgreSQL `SELECT 1` and a signed S3 HEAD, tying up the
/// pool the RPCs wait on. The result of a probe is now kept for one second and concurrent
/// requests share one probe in flight, so the flood makes about one probe a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_flood_makes_about_one_backend_probe_a_second() {
    let backends = backends::shared();
    let space = Space::new("readyz_flood");
    let node = remote_node(&backends, &space, &[]);
    let http = node.metrics_addr().to_owned();
    wait_ready(&http).await;

    let before = node.scrape().await;
    let start = Instant::now();
    let answers = futures::future::join_all((0..200).map(|i| {
        let http = http.clone();
        async move {
            let path = if i % 2 == 0 { "/readyz" } else { "/health" };
            (path, http_get(&http, path).await)
        }
    }))
    .await;
    let elapsed = start.elapsed();
    for (path, answer) in answers {
        let answer = answer.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
    }
    let after = node.scrape().await;

    // One probe per second the flood lasted, and one more at each edge.
    let allowed = 2.0 + elapsed.as_secs_f64().ceil();
    for (backend, op) in [("postgres", "check"), ("s3", "head")] {
        let probes = backend_calls(&after, backend, op) - backend_calls(&before, backend, op);
        eprintln!("{backend} {op}: {probes} probes for 200 requests in {elapsed:?}");
        assert!(
            probes <= allowed,
            "{probes} {backend} {op} calls for 200 readiness requests in {elapsed:?} \
             (at most {allowed} expected)"
        );
    }
}

// ---- paths in errors ----------------------------------------------------------------------------

/// Flips one byte in the middle of `path`, keeping its length.
fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// A read-only caller reads a leaf whose blob file was damaged under the running server, and
/// a recipe output whose spill file was: the DATA_LOSS answers name the address and what was
/// wrong, never the file (the absolute path of the data directory); the log has the path.
/// The server stays unharmed: the recipe is computed again on the next Get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_loss_names_the_address_and_never_the_file() {
    let tokens = tempfile::tempdir().unwrap();
    let file = token_file(
        tokens.path(),
        &[
            ("t-reader", "read", "reader"),
            ("t-writer", "read,write", "writer"),
        ],
    );
    let node = super::server()
        .args(["--auth-tokens".to_owned(), file.display().to_string()])
        .args([
            // Every leaf a file, read a chunk at a time; outputs above 1 KiB spilled.
            "--inline-leaf-bytes",
            "0",
            "--chunk-bytes",
            "1KiB",
            "--spill-bytes",
            "1KiB",
        ])
        .start();
    let dir = node.dir().to_owned();
    let dir_text = dir.display().to_string();
    let mut client = node.client().await;

    let leaf_bytes: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let leaf = put_leaf_as(&mut client, "t-writer", &leaf_bytes).await;
    let leaf_hex = hex(&leaf);
    let blob = dir.join("blobs").join(&leaf_hex[..2]).join(&leaf_hex);
    flip_a_byte(&blob);
    let (_, got) = get_with(&mut client, &leaf, Some("t-reader"), &[]).await;
    let status = got.expect_err("a damaged leaf is never served");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let message = status.message();
    assert!(message.contains(&leaf_hex), "names the address: {message}");
    assert!(
        !message.contains(&dir_text) && !message.contains("blobs/"),
        "names no path: {message}"
    );
    let blob_text = blob.display().to_string();
    node.wait_for_stderr("the damaged blob's path", |l| l.contains(&blob_text));

    // A spilled output (8 KiB, above --spill-bytes), damaged after its first Get.
    let source = put_leaf_as(&mut client, "t-writer", &vec![b'a'; 8192]).await;
    let recipe = deriva_server::proto::PutRecipeRequest {
        function_name: "uppercase".into(),
        function_version: "v1".into(),
        inputs: vec![source.clone()],
        params: Default::default(),
    };
    let upper = client
        .put_recipe(request(recipe, Some("t-writer"), &[]))
        .await
        .unwrap()
        .into_inner()
        .addr;
    let upper_hex = hex(&upper);
    let (_, first) = get_with(&mut client, &upper, Some("t-reader"), &[]).await;
    assert_eq!(first.unwrap(), vec![b'A'; 8192]);
    let spilled = dir.join("spill").join(&upper_hex);
    flip_a_byte(&spilled);
    let (_, got) = get_with(&mut client, &upper, Some("t-reader"), &[]).await;
    let status = got.expect_err("a damaged spill file is never served whole");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let message = status.message();
    assert!(message.contains(&upper_hex), "names the address: {message}");
    assert!(
        !message.contains(&dir_text) && !message.contains("spill/"),
        "names no path: {message}"
    );
    let spilled_text = spilled.display().to_string();
    node.wait_for_stderr("the damaged spill file's path", |l| {
        l.contains(&spilled_text)
    });
    // The damaged entry is gone: computed again.
    let (_, again) = get_with(&mut client, &upper, Some("t-reader"), &[]).await;
    assert_eq!(again.unwrap(), vec![b'A'; 8192]);
}

// ---- forced traces ------------------------------------------------------------------------------

/// Every span the collector received until an `rpc` span of `trace_id` came, draining as it
/// goes (its channel holds 64 spans).
async fn spans_until(
    collector: &mut FakeCollectorServer,
    trace_id: &str,
    seen: &mut Vec<ExportedSpan>,
) {
    let start = Instant::now();
    while !seen
        .iter()
        .any(|s| s.trace_id == trace_id && s.name.starts_with("deriva.Deriva/"))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "no span of trace {trace_id} exported; got {:?}",
            seen.iter()
                .map(|s| (&s.trace_id, &s.name))
                .collect::<Vec<_>>()
        );
        seen.extend(
            collector
                .exported_spans(1, Duration::from_millis(200))
                .await,
        );
    }
}

/// How many exported spans carry the request id `id`.
fn exported_with_request_id(spans: &[ExportedSpan], id: &str) -> usize {
    let quoted = format!("\"{id}\"");
    spans
        .iter()
        .filter(|s| {
            s.attributes
                .get("request_id")
                .is_some_and(|v| v.contains(&quoted))
        })
        .count()
}

/// A `traceparent` that asks for sampling, with a trace id of `n`.
fn sampled_parent(n: u8) -> (String, String) {
    let trace_id = format!("{:032x}", 0xdead_0000_u128 + u128::from(n));
    (format!("00-{trace_id}-00f067aa0ba902b7-01"), trace_id)
}

/// `x-deriva-trace: force` samples a request whatever the ratio. A refused (unauthenticated)
/// request and a read-only caller used to force traces too, and forced traces ignored
/// `--trace-max-per-second`: with tokens, forcing now needs `write` or `admin`, and a forced
/// trace takes its place under the cap. (`--trace-sample-ratio 0`: nothing else is sampled
/// but a caller's sampled `traceparent`, which the test uses as a barrier: spans are exported
/// in the order they end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_writers_and_admins_force_traces_and_only_under_the_cap() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let tokens = tempfile::tempdir().unwrap();
    let file = token_file(
        tokens.path(),
        &[
            ("t-reader", "read", "reader"),
            ("t-writer", "read,write", "writer"),
        ],
    );
    let node = super::server()
        .args(["--auth-tokens".to_owned(), file.display().to_string()])
        .args([
            "--otlp-endpoint",
            &collector.endpoint(),
            "--trace-sample-ratio",
            "0",
            // One trace now, the next in about 1,000 s.
            "--trace-max-per-second",
            "0.001",
        ])
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .start();
    let mut client = node.client().await;
    let leaf = put_leaf_as(&mut client, "t-writer", b"traced or not").await;
    let force = ("x-deriva-trace", "force");

    let (_, anonymous) = get_with(
        &mut client,
        &leaf,
        None,
        &[force, ("x-request-id", "anonymous")],
    )
    .await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    let (_, reader) = get_with(
        &mut client,
        &leaf,
        Some("t-reader"),
        &[force, ("x-request-id", "reader-forced")],
    )
    .await;
    assert_eq!(reader.unwrap(), b"traced or not");
    for i in 0..5 {
        let id = format!("writer-forced-{i}");
        let (_, writer) = get_with(
            &mut client,
            &leaf,
            Some("t-writer"),
            &[force, ("x-request-id", &id)],
        )
        .await;
        assert_eq!(writer.unwrap(), b"traced or not");
    }
    // Asking for capture (what `deriva get --explain` sends) is any caller's: a read-only
    // caller's request is kept for its own `Explain`, whole, and never exported. A junk value
    // asks for nothing.
    let (captured_trace, captured) = get_with(
        &mut client,
        &leaf,
        Some("t-reader"),
        &[
            ("x-deriva-trace", "CAPTURE"),
            ("x-request-id", "reader-captured"),
        ],
    )
    .await;
    assert_eq!(captured.unwrap(), b"traced or not");
    let captured_trace = captured_trace.expect("a captured request answers its trace id");
    let tree = explain(&mut client, "t-reader", &captured_trace)
        .await
        .expect("the reader's own captured request");
    assert!(
        tree.spans.iter().any(|s| s.name == "materialize"),
        "kept whole: {tree:?}"
    );
    let (_, junk) = get_with(
        &mut client,
        &leaf,
        Some("t-writer"),
        &[
            ("x-deriva-trace", "force please"),
            ("x-request-id", "writer-junk"),
        ],
    )
    .await;
    assert_eq!(junk.unwrap(), b"traced or not");
    // Two barriers, one after the other was exported: by then every earlier span had ended.
    let mut seen = Vec::new();
    for n in 0..2 {
        let (parent, trace_id) = sampled_parent(n);
        let (_, barrier) = get_with(
            &mut client,
            &leaf,
            Some("t-reader"),
            &[("traceparent", &parent)],
        )
        .await;
        barrier.unwrap();
        spans_until(&mut collector, &trace_id, &mut seen).await;
    }
    let count = |id: &str| exported_with_request_id(&seen, id);
    assert_eq!(count("anonymous"), 0, "a refused request forced a trace");
    assert_eq!(
        count("reader-forced"),
        0,
        "a read-only caller forced a trace"
    );
    assert_eq!(count("reader-captured"), 0, "a capture was exported");
    assert_eq!(count("writer-junk"), 0, "a junk value forced a trace");
    let forced: Vec<usize> = (0..5)
        .map(|i| count(&format!("writer-forced-{i}")))
        .collect();
    assert_eq!(
        forced,
        [1, 0, 0, 0, 0],
        "five forced traces under a cap of one: the first sampled, no other"
    );
}

// ---- Explain ------------------------------------------------------------------------------------

/// `Explain` of `trace_id` with `token`.
async fn explain(
    client: &mut DerivaClient<Channel>,
    token: &str,
    trace_id: &str,
) -> Result<deriva_server::proto::ExplainResponse, tonic::Status> {
    let req = ExplainRequest {
        trace_id: trace_id.to_owned(),
    };
    client
        .explain(request(req, Some(token), &[]))
        .await
        .map(tonic::Response::into_inner)
}

/// `Explain` by trace id: the caller that made the request and an `admin` get its tree; any
/// other reader gets NOT_FOUND, worded exactly as for a trace id the server never saw, so it
/// learns neither the tree nor the other caller's `auth.name`, nor that the trace exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_serves_a_trace_only_to_its_caller_and_to_admin() {
    let tokens = tempfile::tempdir().unwrap();
    let file = token_file(
        tokens.path(),
        &[
            ("t-alice", "read,write", "alice"),
            ("t-bob", "read", "bob"),
            ("t-root", "read,admin", "root"),
        ],
    );
    let node = super::server()
        .args(["--auth-tokens".to_owned(), file.display().to_string()])
        .start();
    let mut client = node.client().await;
    let leaf = put_leaf_as(&mut client, "t-alice", b"alice's data").await;
    let (trace_id, got) = get_with(&mut client, &leaf, Some("t-alice"), &[]).await;
    assert_eq!(got.unwrap(), b"alice's data");
    let trace_id = trace_id.expect("an x-trace-id");

    let own = explain(&mut client, "t-alice", &trace_id)
        .await
        .expect("alice's own trace");
    assert_eq!(own.method, "Get");
    assert!(
        own.spans
            .iter()
            .flat_map(|s| &s.fields)
            .any(|f| f.key == "auth.name" && f.value == "alice"),
        "{own:?}"
    );
    let admin = explain(&mut client, "t-root", &trace_id)
        .await
        .expect("admin sees any trace");
    assert_eq!((admin.trace_id, admin.method), (own.trace_id, own.method));

    let foreign = explain(&mut client, "t-bob", &trace_id)
        .await
        .expect_err("bob does not see alice's trace");
    let unknown_id = "0123456789abcdef0123456789abcdef";
    let unknown = explain(&mut client, "t-bob", unknown_id).await.unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound, "{foreign:?}");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert_eq!(
        foreign.message(),
        unknown.message().replace(unknown_id, &trace_id),
        "a foreign trace answers as an unknown one"
    );
    assert!(!foreign.message().contains("alice"), "{foreign:?}");
}

// ---- garbage collection -------------------------------------------------------------------------

/// `deriva` against `node` with `args`.
fn deriva(node: &ServerProcess, args: &[&str]) -> std::process::Output {
    Command::new(super::cli_bin())
        .args(["--server", &node.url()])
        .args(args)
        .env_remove("DERIVA_SERVER")
        .env_remove("DERIVA_TOKEN")
        .output()
        .unwrap()
}

/// `GcRequest{}` means a grace period of 0: a careless client used to remove everything
/// unpinned at once. Below `--gc-min-grace` (5 minutes by default) a collection is refused
/// with FAILED_PRECONDITION naming the flag, and nothing is removed; `--gc-min-grace 0s`
/// restores the contract's literal meaning. A periodic collection whose `--gc-grace` is below
/// the minimum is refused at start, naming both flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_below_the_minimum_grace_are_refused_unless_the_operator_allows_them() {
    let guarded = super::server().start();
    let mut client = guarded.client().await;
    let leaf = put_leaf(&mut client, b"unpinned and young").await;

    let out = deriva(&guarded, &["gc", "--grace", "0s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed precondition") && stderr.contains("--gc-min-grace"),
        "{stderr}"
    );
    for req in [
        GcRequest::default(),
        GcRequest {
            dry_run: true,
            ..Default::default()
        },
    ] {
        let status = client.garbage_collect(req).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("--gc-min-grace"), "{status:?}");
    }
    assert_eq!(
        get_all(&mut client, &leaf).await.unwrap(),
        b"unpinned and young"
    );
    // At or above the minimum, as `deriva gc` asks by default (1 hour): collected, nothing old.
    let out = deriva(&guarded, &["gc"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        get_all(&mut client, &leaf).await.unwrap(),
        b"unpinned and young"
    );

    let literal = super::server().args(["--gc-min-grace", "0s"]).start();
    let mut client = literal.client().await;
    let leaf = put_leaf(&mut client, b"collected at once").await;
    let pinned = put_leaf(&mut client, b"pinned").await;
    client
        .pin(deriva_server::proto::PinRequest {
            addr: pinned.clone(),
        })
        .await
        .unwrap();
    // Strictly older than a cutoff with no grace period: times are kept to the millisecond.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let out = deriva(&literal, &["gc", "--grace", "0s"]);
    assert!(out.status.success(), "{out:?}");
    let status = get_all(&mut client, &leaf).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(get_all(&mut client, &pinned).await.unwrap(), b"pinned");

    let refused = super::server()
        .args(["--gc-interval", "1h", "--gc-grace", "1m"])
        .run_to_exit();
    assert!(!refused.status.success(), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--gc-grace") && refused.stderr.contains("--gc-min-grace"),
        "{}",
        refused.stderr
    );
}

// ---- the output tier ----------------------------------------------------------------------------

/// `curl` with the bucket's credentials (SigV4), on `key` of the bucket, with `args`.
fn s3_curl(backends: &backends::Backends, key: &str, args: &[&str]) -> std::process::Output {
    let url = format!("{}/{}/{key}", backends.s3_endpoint(), backends.bucket());
    let out = Command::new("curl")
        .args(["-s", "-f", "--max-time", "30"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            backends.access_key(),
            backends.secret_key()
        ))
        .args(args)
        .arg(&url)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Someone with write access to the bucket copies the stored output of recipe A over that of
/// recipe B. A node that has neither in memory reads B from the tier: it used to serve A's
/// output as B's; now the object names its recipe, so it is refused as damaged, B is computed
/// again and the tier repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_moved_under_another_recipe_is_never_served() {
    let backends = backends::shared();
    let space = Space::new("moved_output");
    let tier = ["--output-tier", "blob-store"];
    let first = remote_node(&backends, &space, &tier);
    let mut client = first.client().await;
    let alpha = put_leaf(&mut client, b"alpha").await;
    let beta = put_leaf(&mut client, b"beta").await;
    let a = put_recipe(&mut client, "uppercase", &[&alpha], &[]).await;
    let b = put_recipe(&mut client, "uppercase", &[&beta], &[]).await;
    assert_eq!(get_all(&mut client, &a).await.unwrap(), b"ALPHA");
    assert_eq!(get_all(&mut client, &b).await.unwrap(), b"BETA");

    let key = |r: &Bytes| format!("{}/outputs/{}", space.prefix, hex(r));
    let moved = tempfile::NamedTempFile::new().unwrap();
    let path = moved.path().to_str().unwrap();
    s3_curl(&backends, &key(&a), &["-o", path]);
    s3_curl(&backends, &key(&b), &["-T", path]);

    let second = remote_node(&backends, &space, &tier);
    let mut client = second.client().await;
    assert_eq!(
        get_all(&mut client, &b).await.unwrap(),
        b"BETA",
        "B's output, never A's"
    );
    let text = second.scrape().await;
    assert_eq!(
        sample(&text, "deriva_storage_corruption_total"),
        Some(1.0),
        "the moved object counts as damage"
    );
    // The tier holds B's own output again: a third node reads it from there.
    let repaired = s3_curl(&backends, &key(&b), &[]).stdout;
    assert_ne!(
        repaired,
        std::fs::read(path).unwrap(),
        "the moved object was replaced"
    );
    let third = remote_node(&backends, &space, &tier);
    let mut client = third.client().await;
    assert_eq!(get_all(&mut client, &b).await.unwrap(), b"BETA");
    assert_eq!(get_all(&mut client, &a).await.unwrap(), b"ALPHA");
}
