//! Scrape under load: 32 concurrent `/metrics` scrapers while `deriva bench` drives cached
//! Gets against the real binaries. No RPC error and no scrape error; the Get p99 with and
//! without the scrapers is printed (for RELIABILITY.md, not asserted).
//!
//! Bounded form: 3 s per phase. `DERIVA_LONG=1` runs 10 times longer (`DERIVA_LONG=N`: N times).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deriva_compute::testing::wait_until;
use deriva_testkit::{ServerProcess, deriva_bin, http_get, long_factor, sample};
use parking_lot::Mutex;

const SCRAPERS: usize = 32;

/// `deriva bench --workload cached-get` for `secs` seconds: the JSON report.
async fn bench(grpc: &str, secs: u64) -> serde_json::Value {
    let grpc = grpc.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(deriva_bin())
            .env("DERIVA_SERVER", format!("http://{grpc}"))
            .args(["bench", "--workload", "cached-get", "--concurrency", "8"])
            .args(["--duration", &format!("{secs}s"), "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "deriva bench failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deriva bench printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check(report: &serde_json::Value, phase: &str) -> (u64, u64) {
    let requests = report["requests"].as_u64().unwrap();
    assert_eq!(report["errors"], 0, "{phase}: RPC errors: {report}");
    assert!(requests > 0, "{phase}: no request: {report}");
    (requests, report["latency_us"]["p99"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_scrapers_under_cached_get_load() {
    let secs = 3 * long_factor();
    let server = ServerProcess::start();

    let alone = bench(server.grpc_addr(), secs).await;
    let (requests_alone, p99_alone) = check(&alone, "without scrapers");

    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut scrapers = Vec::new();
    for _ in 0..SCRAPERS {
        let (addr, stop, scrapes, failures) = (
            server.metrics_addr().to_owned(),
            stop.clone(),
            scrapes.clone(),
            failures.clone(),
        );
        scrapers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http_get(&addr, "/metrics").await {
                    Ok(r) if r.status == 200 && r.body.contains("deriva_rpc_total") => {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .push(format!("HTTP {}: {:.200}", r.status, r.body)),
                    Err(e) => failures.lock().push(e.to_string()),
                }
            }
        }));
    }
    let loaded = bench(server.grpc_addr(), secs).await;
    // On a loaded machine the scrapers may have had little time: let them go on until there
    // were at least as many scrapes as scrapers.
    wait_until("as many scrapes as scrapers, or a failed one", || {
        scrapes.load(Ordering::Relaxed) >= SCRAPERS as u64 || !failures.lock().is_empty()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("a scraper hung")
            .unwrap();
    }
    let (requests_loaded, p99_loaded) = check(&loaded, "with 32 scrapers");
    let failures = failures.lock().clone();
    let scrapes = scrapes.load(Ordering::Relaxed);
    eprintln!(
        "scrape under load: {secs} s per phase; cached-get alone {requests_alone} requests, \
         p99 {p99_alone} µs; with {SCRAPERS} scrapers {requests_loaded} requests, p99 \
         {p99_loaded} µs, {scrapes} scrapes, {} scrape errors",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} scrapes failed, first: {}",
        failures.len(),
        failures[0]
    );
    assert!(scrapes >= SCRAPERS as u64, "only {scrapes} scrapes");
    // The server saw no failed Get either.
    let metrics = server.scrape().await;
    let served = sample(&metrics, "deriva_rpc_total{method=\"get\",status=\"ok\"}");
    assert!(
        served.is_some_and(|n| n >= (requests_alone + requests_loaded) as f64),
        "Gets served: {served:?}"
    );
    let failed = sample(
        &metrics,
        "deriva_rpc_total{method=\"get\",status=\"error\"}",
    );
    assert!(
        failed.is_none_or(|n| n == 0.0),
        "failed Gets: {failed:?}\n{}",
        server.stderr()
    );
}
