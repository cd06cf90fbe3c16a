//! The real `deriva-server` binary scraped by a real Prometheus: the PromQL queries an operator
//! runs against the families of README.md's metrics reference (p99 latency, cache hit rate,
//! verification failure rate, the shapes the `monitoring/` dashboard uses) answer with the
//! values the workload implies, and `promtool check metrics` accepts the exposition.
//!
//! Needs the `prometheus` and `promtool` binaries on `PATH` (`bash .ci/run` installs them, or
//! `apt-get install -y prometheus`); without them the tests fail, they never skip.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{InvalidateRequest, StatusRequest, VerifyRequest};
use deriva_testkit::{
    DEADLINE, Prometheus, Series, ServerProcess, get_all, percent_encode, put_leaf, put_recipe,
    require, sample, unix_now,
};
use tonic::Code;
use tonic::transport::Channel;

/// The window of the range queries: dashboards use `[5m]`, far longer than a test; with a 1 s
/// scrape interval 30 s holds plenty of samples, and every query keeps its shape.
const WINDOW: &str = "30s";

/// The one series of `result` whose `name` label is `value`.
#[track_caller]
fn series<'a>(result: &'a [Series], name: &str, value: &str) -> &'a Series {
    let found: Vec<&Series> = result.iter().filter(|s| s.label(name) == value).collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!("expected one series with {name}={value:?} in {result:?}"),
    }
}

async fn concat(client: &mut DerivaClient<Channel>, a: &Bytes, b: &Bytes) -> Bytes {
    put_recipe(client, "concat", &[a, b], &[]).await
}

/// One round of the workload: Get misses (after an invalidate) and hits, a NOT_FOUND, an
/// INVALID_ARGUMENT, a Verify and a Status; every compute is verified (`--verification dual`).
async fn round(client: &mut DerivaClient<Channel>, leaves: &(Bytes, Bytes), recipe: &Bytes) {
    assert_eq!(put_leaf(client, b"hello ").await, leaves.0);
    assert_eq!(concat(client, &leaves.0, &leaves.1).await, *recipe);
    client
        .invalidate(InvalidateRequest {
            addr: recipe.clone(),
            cascade: false,
        })
        .await
        .unwrap();
    // A miss (computed twice and compared), then hits.
    for _ in 0..4 {
        assert_eq!(get_all(client, recipe).await.unwrap(), b"hello world");
    }
    let unknown = get_all(client, &Bytes::from(vec![0xab; 32]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let short = get_all(client, &Bytes::from(vec![0xab; 31]))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    let verified = client
        .verify(VerifyRequest {
            addr: recipe.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.deterministic, "{verified:?}");
    client.status(StatusRequest {}).await.unwrap();
}

/// Cache lookups so far, from one scrape: (hits, misses).
fn cache_lookups(exposition: &str) -> (f64, f64) {
    let read = |series: &str| {
        sample(exposition, series).unwrap_or_else(|| panic!("no {series} in:\n{exposition}"))
    };
    (
        read(r#"deriva_cache_total{result="hit"}"#),
        read(r#"deriva_cache_total{result="miss"}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_answer_from_a_real_prometheus() {
    require("prometheus");
    let deadline = Instant::now() + DEADLINE;
    let server = ServerProcess::options()
        .args(["--verification", "dual"])
        .start();
    let mut client = server.client().await;

    // The workload's first round by hand: two leaves, a concat/v1 recipe, misses then hits.
    let a = put_leaf(&mut client, b"hello ").await;
    let b = put_leaf(&mut client, b"world").await;
    let recipe = concat(&mut client, &a, &b).await;
    for _ in 0..3 {
        assert_eq!(get_all(&mut client, &recipe).await.unwrap(), b"hello world");
    }
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.verification_mode, "dual");
    assert_eq!(
        (status.verification_passed, status.verification_failed),
        (1, 0)
    );

    // Then the same rounds, over and over, until the queries have run.
    let one_round = {
        let before = cache_lookups(&server.scrape().await);
        round(&mut client, &(a.clone(), b.clone()), &recipe).await;
        let after = cache_lookups(&server.scrape().await);
        (after.0 - before.0, after.1 - before.1)
    };
    assert!(one_round.0 > 0.0 && one_round.1 > 0.0, "{one_round:?}");
    let expected_hit_rate = one_round.0 / (one_round.0 + one_round.1);
    let stop = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn({
        let (stop, leaves, recipe) = (stop.clone(), (a.clone(), b.clone()), recipe.clone());
        let mut client = client.clone();
        async move {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round(&mut client, &leaves, &recipe).await;
                rounds += 1;
                // Pacing only: a steady rate over the scrapes.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rounds
        }
    });

    let mut prom = Prometheus::start(server.metrics_addr());
    prom.wait_ready(deadline).await;
    prom.poll_one(r#"up{job="deriva"}"#, deadline, |v| v == 1.0)
        .await;
    // At least 6 scrapes in the window, so every rate has samples to work with.
    let scrapes = prom
        .poll_one(
            &format!(r#"count_over_time(up{{job="deriva"}}[{WINDOW}])"#),
            deadline,
            |v| v >= 6.0,
        )
        .await;

    // Stop the workload, and wait for a scrape of the idle server: the windowed rates still
    // cover the workload, and the gauges read idle.
    stop.store(true, Ordering::Relaxed);
    let rounds = workload.await.unwrap();
    assert!(rounds > 0);
    let stopped_at = unix_now();
    prom.poll_one("timestamp(deriva_materialize_active)", deadline, |t| {
        t > stopped_at + 0.01
    })
    .await;

    let mut report = vec![format!(
        "{scrapes} scrapes in [{WINDOW}]; {rounds} workload rounds; \
         cache hit rate of one round: {expected_hit_rate:.4}"
    )];
    let mut run = async |promql: String| {
        let result = prom.query(&promql).await;
        report.push(format!("{promql}\n  => {result:?}"));
        result
    };

    // Request rate by method.
    let rates = run(format!("rate(deriva_rpc_total[{WINDOW}])")).await;
    assert!(!rates.is_empty());
    let rate_of = |method: &str, status: &str| {
        rates
            .iter()
            .find(|s| s.label("method") == method && s.label("status") == status)
            .unwrap_or_else(|| panic!("no {method}/{status} in {rates:?}"))
            .value
    };
    for (method, status) in [
        ("get", "ok"),
        ("get", "error"),
        ("put_leaf", "ok"),
        ("put_recipe", "ok"),
        ("invalidate", "ok"),
        ("verify", "ok"),
        ("status", "ok"),
    ] {
        let r = rate_of(method, status);
        assert!(r > 0.0 && r.is_finite(), "{method}/{status}: {r}");
    }
    // Per round: 4 good Gets, 2 failed ones.
    let ratio = rate_of("get", "ok") / rate_of("get", "error");
    assert!((1.5..=2.5).contains(&ratio), "get ok/error = {ratio}");
    for method in ["resolve", "put_leaf", "put_recipe", "status", "verify"] {
        assert_eq!(rate_of(method, "error"), 0.0, "{method} errors");
    }

    // p99 latency of Get: a small positive number of seconds, within the buckets.
    let p99 = run(format!(
        r#"histogram_quantile(0.99, rate(deriva_rpc_duration_seconds_bucket{{method="get"}}[{WINDOW}]))"#
    ))
    .await;
    let [p99] = p99.as_slice() else {
        panic!("one p99 series expected: {p99:?}")
    };
    assert_eq!(p99.label("method"), "get");
    assert!(p99.value > 0.0 && p99.value <= 10.0, "{p99:?}");

    // Cache hit rate over time, as it is usually first written. Its `+` matches series on every label,
    // `result` included, so `hit + miss` pairs nothing and the whole query is empty: recorded,
    // not asserted on.
    let literal = run(format!(
        r#"rate(deriva_cache_total{{result="hit"}}[{WINDOW}]) /
(rate(deriva_cache_total{{result="hit"}}[{WINDOW}]) + rate(deriva_cache_total{{result="miss"}}[{WINDOW}]))"#
    ))
    .await;
    // The same query, matching the operands while ignoring `result`.
    let hit_rate = run(format!(
        r#"rate(deriva_cache_total{{result="hit"}}[{WINDOW}]) / ignoring(result)
(rate(deriva_cache_total{{result="hit"}}[{WINDOW}]) + ignoring(result) rate(deriva_cache_total{{result="miss"}}[{WINDOW}]))"#
    ))
    .await;
    let [hit_rate] = hit_rate.as_slice() else {
        panic!("one hit-rate series expected: {hit_rate:?}")
    };
    assert!(
        hit_rate.value > 0.0 && hit_rate.value < 1.0,
        "hit rate {hit_rate:?}"
    );
    assert!(
        (hit_rate.value - expected_hit_rate).abs() < 0.1,
        "hit rate {} where one round gives {expected_hit_rate}",
        hit_rate.value
    );

    // The same shape also works on the unlabelled pair of families, and agrees.
    let pair = run(format!(
        "rate(deriva_cache_hit_total[{WINDOW}]) /
(rate(deriva_cache_hit_total[{WINDOW}]) + rate(deriva_cache_miss_total[{WINDOW}]))"
    ))
    .await;
    let [pair] = pair.as_slice() else {
        panic!("one hit-rate series expected: {pair:?}")
    };
    assert!(
        (pair.value - hit_rate.value).abs() < 1e-9,
        "{pair:?} vs {hit_rate:?}"
    );

    // p95 compute time by function: concat/v1 is the only function that ran.
    let p95 = run(format!(
        "histogram_quantile(0.95, rate(deriva_compute_duration_seconds_bucket[{WINDOW}]))"
    ))
    .await;
    let concat_p95 = series(&p95, "function", "concat/v1");
    assert!(
        concat_p95.value > 0.0 && concat_p95.value <= 5.0,
        "{concat_p95:?}"
    );
    for s in &p95 {
        assert_eq!(
            s.label("function"),
            "concat/v1",
            "only concat/v1 ran: {p95:?}"
        );
    }

    // Active materializations: none on an idle server.
    let active = run("deriva_materialize_active".to_owned()).await;
    let [active] = active.as_slice() else {
        panic!("one series expected: {active:?}")
    };
    assert_eq!(active.value, 0.0, "{active:?}");

    // Verification failure rate, as it is usually first written: `/` matches on every label, so it
    // divides the fail rate by itself (0/0, NaN, while nothing fails). Recorded, not asserted on.
    let literal_failures = run(format!(
        r#"rate(deriva_verification_total{{result="fail"}}[{WINDOW}]) /
rate(deriva_verification_total[{WINDOW}])"#
    ))
    .await;
    // Fails over all verifications: there were verifications in the window, none failed.
    let verified = run(format!("sum(rate(deriva_verification_total[{WINDOW}]))")).await;
    let [verified] = verified.as_slice() else {
        panic!("{verified:?}")
    };
    assert!(verified.value > 0.0, "no verification in the window");
    let failure_rate = run(format!(
        r#"rate(deriva_verification_total{{result="fail"}}[{WINDOW}]) / ignoring(result)
sum without(result) (rate(deriva_verification_total[{WINDOW}]))"#
    ))
    .await;
    let [failure_rate] = failure_rate.as_slice() else {
        panic!("one failure-rate series expected: {failure_rate:?}")
    };
    assert_eq!(failure_rate.value, 0.0, "{failure_rate:?}");

    eprintln!("{}", report.join("\n"));
    eprintln!("literal hit-rate query: {literal:?}");
    eprintln!("literal verification failure-rate query: {literal_failures:?}");
    assert!(
        !server.stderr().contains(" ERROR "),
        "the server logged errors:\n{}",
        server.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_exposition() {
    require("promtool");
    let server = ServerProcess::options()
        .args(["--verification", "dual"])
        .start();
    let mut client = server.client().await;
    // Every family present: leaves, a verified compute, hits, errors.
    let a = put_leaf(&mut client, b"hello ").await;
    let b = put_leaf(&mut client, b"world").await;
    let recipe = concat(&mut client, &a, &b).await;
    round(&mut client, &(a, b), &recipe).await;
    let text = server.scrape().await;
    assert!(text.contains("deriva_verification_total{"), "{text}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "promtool check metrics: {}\nstdout: {stdout:?}\nstderr: {stderr:?}",
        out.status
    );
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics found problems ({}):\n{stdout}{stderr}\nin:\n{text}",
        out.status
    );
}

/// The query encoder leaves nothing PromQL needs unescaped.
#[test]
fn percent_encoding_covers_promql() {
    assert_eq!(
        percent_encode(r#"rate(x{a="b"}[30s]) / y"#),
        "rate%28x%7Ba%3D%22b%22%7D%5B30s%5D%29%20%2F%20y"
    );
}
