//! The smaller gaps of issue 30, each attacked through the binary: a readiness flood against a
//! node on the remote backend, a damaged blob and a damaged spill file read by a read-only
//! caller, `x-deriva-trace: force` from callers who may not force and beyond
//! `--trace-max-per-second`, `Explain` of another caller's trace, `deriva gc --grace 0s`, and an
//! output-tier object moved under another recipe in a real SeaweedFS.

#[path = "../../../deriva-remote/tests/services/mod.rs"]
mod services;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{GetRequest, PutLeafRequest};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::common::http::http_get;
use crate::common::process::ServerProcess;
use crate::common::{DEADLINE, hex};

// ---- shared helpers ---------------------------------------------------------------------------

/// A token file in `dir` with `(token, scopes, name)` entries; its path.
fn token_file(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let text: String = entries
        .iter()
        .map(|(token, scopes, name)| {
            format!("{} {scopes} {name}\n", deriva_core::token::hashed(token))
        })
        .collect();
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

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

/// A place of its own in the shared services: a key prefix and a PostgreSQL schema.
struct Space {
    prefix: String,
    schema: String,
}

impl Space {
    fn new(test: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "{test}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            prefix: format!("campaign-{tag}"),
            schema: format!("c_{tag}"),
        }
    }
}

/// The binary under attack on the remote backend of `backends`, in `space`, with `extra` flags.
fn remote_node(backends: &services::Backends, space: &Space, extra: &[&str]) -> ServerProcess {
    let mut options = crate::server()
        .args([
            "--blob-store".to_owned(),
            format!("s3://{}/{}", backends.bucket(), space.prefix),
            "--index".to_owned(),
            backends.pg_url(),
            "--index-schema".to_owned(),
            space.schema.clone(),
        ])
        .args(extra.iter().copied());
    for (key, value) in backends.aws_env() {
        options = options.env(key, value);
    }
    options.start()
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
    let backends = services::shared();
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
    let node = crate::server()
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
