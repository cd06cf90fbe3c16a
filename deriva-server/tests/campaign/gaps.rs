//! The smaller gaps of issue 30, each attacked through the binary: a readiness flood against a
//! node on the remote backend, a damaged blob and a damaged spill file read by a read-only
//! caller, `x-deriva-trace: force` from callers who may not force and beyond
//! `--trace-max-per-second`, `Explain` of another caller's trace, `deriva gc --grace 0s`, and an
//! output-tier object moved under another recipe in a real SeaweedFS.

#[path = "../../../deriva-remote/tests/services/mod.rs"]
mod services;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::DEADLINE;
use crate::common::http::http_get;
use crate::common::process::ServerProcess;

// ---- shared helpers ---------------------------------------------------------------------------

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
