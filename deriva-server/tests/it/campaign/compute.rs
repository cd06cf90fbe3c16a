//! Recipes that would run away (issue 30, finding 1): a `repeat` of an empty leaf 2^64-1 times,
//! a compute longer than `--compute-timeout-secs`, SIGTERM during a long compute, a recipe
//! planted in the store with params over the limit, a fan-out of 10,000 inputs and a chain of
//! 10,000 levels. See the table in `main.rs`.
//!
//! The compute timeout is set through `DERIVA_COMPUTE_TIMEOUT_SECS` rather than its flag, so
//! that a binary from before the flag existed starts all the same and shows what it does with
//! the compute (runs it to the end).
//!
//! The long computes are `gzip/v1` at level 9 of random letters `a` and `b`: every position
//! starts many short matches, so deflate walks its longest hash chains, at about 1 MB/s in a
//! release build and far slower in a debug one (random bytes go 15 times faster). A few MiB of
//! input make a compute of many seconds whatever the build, without much memory.

use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_compute::function::MAX_OUTPUT_BYTES;
use deriva_core::{CAddr, FunctionId, Recipe};
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{PutRecipeRequest, VerifyRequest};
use rustix::process::Signal;
use tonic::Code;
use tonic::transport::Channel;

use super::{cli_bin, server};
use deriva_testkit::process::ServerProcess;
use deriva_testkit::{DEADLINE, Rng, get_all, hex, put_leaf, put_recipe, sample, try_put_recipe};

/// A Get that must answer within [`DEADLINE`]; `what` says what a missing answer means.
async fn get_within(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
    what: &str,
) -> Result<Vec<u8>, tonic::Status> {
    tokio::time::timeout(DEADLINE, get_all(client, addr))
        .await
        .unwrap_or_else(|_| panic!("no answer within {DEADLINE:?}: {what}"))
}

/// One compute, `reverse/v1` of a fresh leaf, answers: with `--max-concurrent-computes 1`,
/// the one compute slot is free.
async fn a_compute_runs(client: &mut DerivaClient<Channel>, tag: &str) {
    let leaf = put_leaf(client, tag.as_bytes()).await;
    let reversed = put_recipe(client, "reverse", &[&leaf], &[]).await;
    let got = get_within(client, &reversed, "the compute slot is still taken")
        .await
        .unwrap();
    let want: Vec<u8> = tag.bytes().rev().collect();
    assert_eq!(got, want);
}

/// A sample of the server's `/metrics`, 0 when absent.
async fn metric(server: &ServerProcess, series: &str) -> f64 {
    sample(&server.scrape().await, series).unwrap_or(0.0)
}

/// Polls `/metrics` until `series` satisfies `done`; panics after [`DEADLINE`].
async fn wait_metric(server: &ServerProcess, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = metric(server, series).await;
        if done(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is still {value} after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A memory figure of the server from `/proc/PID/status`, in MiB: `VmHWM` (peak resident
/// memory) or `VmRSS` (resident now).
fn memory_mib(server: &ServerProcess, field: &str) -> f64 {
    let path = format!("/proc/{}/status", server.pid().as_raw_nonzero());
    let status = std::fs::read_to_string(&path).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"));
    kib / 1024.0
}

/// The server's peak resident memory, in MiB.
fn peak_rss_mib(server: &ServerProcess) -> f64 {
    memory_mib(server, "VmHWM")
}

/// Finding 1 as reported: `deriva recipe repeat v1 -i $EMPTY -p count=18446744073709551615`.
/// It used to be stored, and its Get looped 1.8·10¹⁹ times on the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_of_an_empty_leaf_2_pow_64_times_is_refused_at_put_recipe() {
    let server = server().args(["--max-concurrent-computes", "1"]).start();
    let mut client = server.client().await;
    let empty = put_leaf(&mut client, b"").await;
    let limit = MAX_OUTPUT_BYTES.to_string();
    for count in [u64::MAX, MAX_OUTPUT_BYTES + 1] {
        let count = count.to_string();
        let status = try_put_recipe(&mut client, "repeat", &[&empty], &[("count", &count)])
            .await
            .expect_err("a count over the output limit is stored");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        for part in ["repeat/v1", "`count`", &count, &limit] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
    }
    // The same through the client, as the finding was made.
    let out = std::process::Command::new(cli_bin())
        .args(["--server", &server.url(), "recipe", "repeat", "v1", "-i"])
        .arg(hex(&empty))
        .args(["-p", "count=18446744073709551615"])
        .env_remove("DERIVA_SERVER")
        .env_remove("DERIVA_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stored: {stderr}");
    assert!(stderr.contains("`count`"), "{stderr}");
    // At the limit it is accepted, and an empty input makes no work of it.
    let at_limit = put_recipe(&mut client, "repeat", &[&empty], &[("count", &limit)]).await;
    let started = Instant::now();
    let got = get_within(&mut client, &at_limit, "repeat of nothing ran on")
        .await
        .unwrap();
    assert!(got.is_empty());
    let took = started.elapsed();
    eprintln!("repeat(empty, {limit}): answered in {took:.2?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    a_compute_runs(&mut client, "the slot is free").await;
}

/// A compute longer than the compute timeout answers DEADLINE_EXCEEDED naming the recipe and
/// the function, soon after the timeout; with one compute slot, the next compute then runs,
/// and the memory it reserved comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_past_the_timeout_answers_deadline_exceeded_and_frees_its_slot() {
    let server = server()
        .args(["--max-concurrent-computes", "1"])
        .env("DERIVA_COMPUTE_TIMEOUT_SECS", "1")
        .start();
    let mut client = server.client().await;
    let data = Rng::from_env("compute timeout").ab_letters(16 << 20);
    let leaf = put_leaf(&mut client, &data).await;
    let gzip = put_recipe(&mut client, "gzip", &[&leaf], &[("level", "9")]).await;
    for attempt in 1..=2 {
        let started = Instant::now();
        let status = get_within(&mut client, &gzip, "the compute ran on past its timeout")
            .await
            .expect_err("gzip -9 of 16 MiB of a/b finished within 1 s");
        let took = started.elapsed();
        eprintln!("compute timeout of 1 s, attempt {attempt}: {status:?} after {took:.2?}");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        for part in [hex(&gzip).as_str(), "gzip/v1", "compute timeout"] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
        assert!(took < Duration::from_secs(20), "{took:?}");
        let started = Instant::now();
        a_compute_runs(&mut client, &format!("after timeout {attempt}")).await;
        eprintln!("the next compute answered in {:.2?}", started.elapsed());
    }
    let timeouts = r#"deriva_compute_timeouts_total{function="gzip/v1"}"#;
    assert_eq!(metric(&server, timeouts).await, 2.0);
    // Each cancelled gzip returned within a chunk, and gave back its memory.
    wait_metric(&server, "deriva_compute_cancelled_running", |v| v == 0.0).await;
    wait_metric(&server, "deriva_memory_inflight_bytes", |v| v == 0.0).await;
    eprintln!("peak RSS {:.0} MiB", peak_rss_mib(&server));
}

/// SIGTERM while a compute runs that would take minutes: the server cuts the call off when
/// the grace is over, cancels the compute, and exits, instead of waiting for the compute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_compute_exits_within_the_grace() {
    const GRACE_SECS: u64 = 2;
    /// What the exit may take beyond the grace: the cut-off, closing the store, the
    /// telemetry flush; seconds in practice.
    const MARGIN: Duration = Duration::from_secs(20);
    const INPUT: usize = 32 << 20;
    let mut server = server()
        .args(["--shutdown-grace-secs", &GRACE_SECS.to_string()])
        .env("DERIVA_COMPUTE_TIMEOUT_SECS", "3600")
        .start();
    let mut client = server.client().await;
    let data = Rng::from_env("sigterm during a compute").ab_letters(INPUT);
    let leaf = put_leaf(&mut client, &data).await;
    let gzip = put_recipe(&mut client, "gzip", &[&leaf], &[("level", "9")]).await;
    let get = tokio::spawn(async move { get_all(&mut client, &gzip).await });
    // Right before it runs, the compute reserves its input and as much again for its output.
    wait_metric(&server, "deriva_memory_inflight_bytes", |v| {
        v >= 2.0 * INPUT as f64
    })
    .await;
    server.signal(Signal::TERM);
    let signalled = Instant::now();
    let status =
        tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(GRACE_SECS) + MARGIN));
    let took = signalled.elapsed();
    eprintln!("SIGTERM during a compute: exited {status} after {took:.2?}");
    assert!(status.success(), "{status}\n{}", server.stderr());
    let answer = get.await.unwrap();
    let status = answer.expect_err("the compute finished within the grace");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        server.stderr().contains("cancelling their computes"),
        "{}",
        server.stderr()
    );
}

/// A recipe whose params are over the limit can no longer be stored; one already in the store
/// (written before the bound, or planted while the server was down) is refused at Get, Verify
/// and as an input, never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_over_limit_recipe_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = server().dir(dir.path()).start();
    let mut client = first.client().await;
    let empty = put_leaf(&mut client, b"").await;
    let count = u64::MAX.to_string();
    let refused = try_put_recipe(&mut client, "repeat", &[&empty], &[("count", &count)]).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    drop(client);
    assert!(first.stop().success());

    // Planted through the store API, with the server down.
    let (planted, above) = {
        let store = deriva_store_local::open(dir.path()).unwrap();
        let repeat = FunctionId::new("repeat", "v1").unwrap();
        let runaway = Recipe::new(
            repeat,
            vec![CAddr::from_slice(&empty).unwrap()],
            [("count", count.as_str())],
        )
        .unwrap();
        let planted = runaway.addr();
        let identity = FunctionId::new("identity", "v1").unwrap();
        let above = Recipe::new(identity, vec![planted], Vec::<(String, String)>::new()).unwrap();
        let above_addr = above.addr();
        store.put_recipes(vec![runaway, above]).await.unwrap();
        let released = store.released();
        drop(store);
        released.wait().await;
        (
            Bytes::copy_from_slice(planted.as_bytes()),
            Bytes::copy_from_slice(above_addr.as_bytes()),
        )
    };

    let server = server()
        .dir(dir.path())
        .args(["--max-concurrent-computes", "1"])
        .start();
    let mut client = server.client().await;
    for (addr, what) in [
        (&planted, "the planted recipe"),
        (&above, "a recipe over it"),
    ] {
        let status = get_within(&mut client, addr, &format!("{what} ran"))
            .await
            .expect_err("a repeat of 2^64-1 answered");
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        for part in [hex(&planted).as_str(), "repeat/v1", "`count`"] {
            assert!(
                status.message().contains(part),
                "{what}: {part}: {status:?}"
            );
        }
    }
    let verify = tokio::time::timeout(
        DEADLINE,
        client.verify(VerifyRequest {
            addr: planted.clone(),
        }),
    )
    .await
    .expect("Verify of the planted recipe ran");
    assert_eq!(verify.unwrap_err().code(), Code::InvalidArgument);
    a_compute_runs(&mut client, "nothing ran away").await;
}

/// A recipe of 10,000 inputs is refused at PutRecipe (a recipe has at most 1,024); the same
/// 10,000 leaves reached through a tree (10 recipes of 1,000 inputs under one) answer in
/// bounded time and memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_ten_thousand_inputs_is_refused_or_bounded() {
    const LEAVES: usize = 10_000;
    const BRANCH: usize = 1_000;
    let server = server().start();
    let mut client = server.client().await;
    let started = Instant::now();
    let mut leaves = Vec::with_capacity(LEAVES);
    for batch in (0..LEAVES).collect::<Vec<_>>().chunks(250) {
        let puts = batch.iter().map(|i| {
            let mut client = client.clone();
            async move { put_leaf(&mut client, format!("{i:08}").as_bytes()).await }
        });
        leaves.extend(futures::future::join_all(puts).await);
    }
    let put_time = started.elapsed();

    let status = client
        .put_recipe(PutRecipeRequest {
            function_name: "concat".into(),
            function_version: "v1".into(),
            inputs: leaves.clone(),
            params: Default::default(),
        })
        .await
        .expect_err("a recipe of 10,000 inputs was stored");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("at most 1024 inputs, got 10000"),
        "{status:?}"
    );

    let mut branches = Vec::new();
    for chunk in leaves.chunks(BRANCH) {
        let inputs: Vec<&Bytes> = chunk.iter().collect();
        branches.push(put_recipe(&mut client, "concat", &inputs, &[]).await);
    }
    let top = put_recipe(
        &mut client,
        "concat",
        &branches.iter().collect::<Vec<_>>(),
        &[],
    )
    .await;
    let before = memory_mib(&server, "VmRSS");
    let started = Instant::now();
    let got = get_within(&mut client, &top, "the fan-out never answered")
        .await
        .unwrap();
    let get_time = started.elapsed();
    let want: Vec<u8> = (0..LEAVES)
        .flat_map(|i| format!("{i:08}").into_bytes())
        .collect();
    assert!(got == want, "the fan-out's bytes are wrong");
    let rss = peak_rss_mib(&server);
    eprintln!(
        "fan-out: {LEAVES} PutLeaf in {put_time:.2?}; Get of 10 x {BRANCH} in {get_time:.2?}; \
         RSS {before:.0} MiB before the Get, peak {rss:.0} MiB"
    );
    assert!(get_time < Duration::from_secs(30), "{get_time:?}");
    assert!(rss < 512.0, "peak RSS {rss:.0} MiB");
}

/// A chain of 10,000 `identity/v1` levels: its Get answers in bounded time and memory, and so
/// does the same Get once cached. The first 9,900 levels are planted with the store API while
/// the server is down (through PutRecipe they are one fsync each: minutes in a debug build);
/// the last 100 go through PutRecipe, which takes them at that depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_ten_thousand_deep_answers_in_bounded_time_and_memory() {
    const DEPTH: usize = 10_000;
    const THROUGH_THE_API: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let planted = {
        let store = deriva_store_local::open(dir.path()).unwrap();
        let bottom = store
            .put_leaf(Bytes::from_static(b"the bottom of a 10,000-level chain"))
            .await
            .unwrap();
        let identity = FunctionId::new("identity", "v1").unwrap();
        let mut top = bottom;
        let chain: Vec<Recipe> = (0..DEPTH - THROUGH_THE_API)
            .map(|_| {
                let level =
                    Recipe::new(identity.clone(), vec![top], Vec::<(String, String)>::new())
                        .unwrap();
                top = level.addr();
                level
            })
            .collect();
        store.put_recipes(chain).await.unwrap();
        let released = store.released();
        drop(store);
        released.wait().await;
        Bytes::copy_from_slice(top.as_bytes())
    };
    let server = server().dir(dir.path()).start();
    let mut client = server.client().await;
    let started = Instant::now();
    let mut top = planted;
    for _ in 0..THROUGH_THE_API {
        top = put_recipe(&mut client, "identity", &[&top], &[]).await;
    }
    let put_time = started.elapsed();
    let before = memory_mib(&server, "VmRSS");
    let started = Instant::now();
    let got = get_within(&mut client, &top, "the chain never answered")
        .await
        .unwrap();
    let get_time = started.elapsed();
    assert_eq!(got, b"the bottom of a 10,000-level chain");
    let started = Instant::now();
    get_within(&mut client, &top, "the cached chain never answered")
        .await
        .unwrap();
    let cached_time = started.elapsed();
    let rss = peak_rss_mib(&server);
    eprintln!(
        "chain: {THROUGH_THE_API} PutRecipe at depth {} in {put_time:.2?}; Get of the top \
         ({DEPTH} levels) in {get_time:.2?}, cached {cached_time:.2?}; RSS {before:.0} MiB \
         before the Get, peak {rss:.0} MiB",
        DEPTH - THROUGH_THE_API
    );
    assert!(get_time < Duration::from_secs(45), "{get_time:?}");
    assert!(cached_time < Duration::from_secs(5), "{cached_time:?}");
    assert!(rss < 512.0, "peak RSS {rss:.0} MiB");
}
