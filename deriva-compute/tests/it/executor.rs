//! Materialization behaviour: order, single-flight, concurrency, depth, errors, invalidation,
//! verification.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;

use deriva_compute::testing::{Gate, wait_until};
use deriva_compute::{ExecutorConfig, FunctionRegistry, VerificationMode};
use deriva_core::{CAddr, DerivaError, Recipe};
use deriva_testkit::compute::{Harness, Panics, Picky, Slow, Spin, fid};

fn registry_with_slow(slow: &Slow) -> FunctionRegistry {
    let mut r = FunctionRegistry::with_builtins();
    r.register(fid("slow/v1"), slow.clone());
    r
}

#[tokio::test]
async fn leaf_recipe_and_cache_paths() {
    let h = Harness::new();
    let a = h.leaf(b"hello ").await;
    let b = h.leaf(b"world").await;
    let ab = h.recipe("concat/v1", &[a, b], &[]).await;
    let upper = h.recipe("uppercase/v1", &[ab], &[]).await;
    assert_eq!(h.exec.materialize(a).await.unwrap(), &b"hello "[..]);
    assert_eq!(
        h.exec.materialize(upper).await.unwrap(),
        &b"HELLO WORLD"[..]
    );
    assert!(h.exec.cache().contains(&upper) && h.exec.cache().contains(&ab));
    assert!(
        !h.exec.cache().contains(&a),
        "a leaf read as an input is not cached (only Gets cache leaves)"
    );
    // Second time: a cache hit at the top.
    let hits = h.exec.cache().stats().hits();
    assert_eq!(
        h.exec.materialize(upper).await.unwrap(),
        &b"HELLO WORLD"[..]
    );
    assert_eq!(h.exec.cache().stats().hits(), hits + 1);
}

#[tokio::test]
async fn unknown_address_is_not_found() {
    let h = Harness::new();
    let nowhere = CAddr::from_bytes([9; 32]);
    assert_eq!(
        h.exec.materialize(nowhere).await,
        Err(DerivaError::NotFound { addr: nowhere })
    );
}

#[tokio::test]
async fn put_recipe_validates_function_and_params() {
    let h = Harness::new();
    let a = h.leaf(b"x").await;
    let unknown = Recipe::new(fid("nope/v1"), vec![a], Vec::<(String, String)>::new()).unwrap();
    assert!(matches!(
        h.exec.put_recipe(unknown).await,
        Err(DerivaError::UnknownFunction { .. })
    ));
    let bad = Recipe::new(fid("repeat/v1"), vec![a], [("count", "many")]).unwrap();
    let err = h.exec.put_recipe(bad).await.unwrap_err();
    assert!(
        matches!(&err, DerivaError::InvalidInput(m) if m.contains("`count`")),
        "{err}"
    );
    let missing = Recipe::new(
        fid("identity/v1"),
        vec![CAddr::from_bytes([1; 32])],
        Vec::<(String, String)>::new(),
    )
    .unwrap();
    assert!(matches!(
        h.exec.put_recipe(missing).await,
        Err(DerivaError::MissingInput { .. })
    ));
    assert_eq!(h.exec.store().counters().recipes(), 0);
}

#[tokio::test]
async fn compute_failures_and_panics_are_errors_not_crashes() {
    let mut r = FunctionRegistry::with_builtins();
    r.register(fid("panics/v1"), Panics);
    let h = Harness::with(r, ExecutorConfig::default(), 1 << 20);
    let junk = h.leaf(b"not gzip").await;
    let bad = h.recipe("gunzip/v1", &[junk], &[]).await;
    match h.exec.materialize(bad).await {
        Err(DerivaError::ComputeFailed {
            function,
            addr,
            message,
        }) => {
            assert_eq!(function.to_string(), "gunzip/v1");
            assert_eq!(addr, bad);
            assert!(message.contains("not valid gzip"), "{message}");
        }
        other => panic!("expected ComputeFailed, got {other:?}"),
    }
    let boom = h.recipe("panics/v1", &[junk], &[]).await;
    let err = h.exec.materialize(boom).await.unwrap_err();
    assert!(
        matches!(&err, DerivaError::ComputeFailed { message, .. } if message.contains("boom")),
        "{err}"
    );
    // The executor still works afterwards, and nothing failed was cached.
    assert!(!h.exec.cache().contains(&bad) && !h.exec.cache().contains(&boom));
    let ok = h.recipe("reverse/v1", &[junk], &[]).await;
    assert_eq!(h.exec.materialize(ok).await.unwrap(), &b"pizg ton"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_compute_once_and_share_the_result() {
    let slow = Slow::new(Duration::from_millis(200));
    let h = Harness::with(
        registry_with_slow(&slow),
        ExecutorConfig::default(),
        1 << 20,
    );
    let a = h.leaf(b"abc").await;
    let r = h.recipe("slow/v1", &[a], &[]).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let exec = h.exec.clone();
            tokio::spawn(async move { exec.materialize(r).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), &b"abc"[..]);
    }
    assert_eq!(
        slow.calls(),
        1,
        "exactly one compute for 16 concurrent requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waiters_all_get_the_same_error() {
    let mut reg = FunctionRegistry::with_builtins();
    reg.register(
        fid("fail/v1"),
        deriva_testkit::compute::SlowFail(Duration::from_millis(100)),
    );
    let h = Harness::with(reg, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"abc").await;
    let r = h.recipe("fail/v1", &[a], &[]).await;
    let results = futures::future::join_all((0..8).map(|_| h.exec.materialize(r))).await;
    let first = results[0].clone().unwrap_err();
    assert!(matches!(first, DerivaError::ComputeFailed { .. }));
    assert!(results.iter().all(|r| r.as_ref().unwrap_err() == &first));
}

/// `concat(gate(x, L), gate(x, R))` materializing in a task, with `permits` compute permits.
async fn gated_diamond(permits: usize) -> (Harness, Gate, JoinHandle<deriva_core::Result<Bytes>>) {
    let gate = Gate::new();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("gate/v1"), gate.function());
    let config = ExecutorConfig {
        max_concurrent_computes: permits,
        ..ExecutorConfig::default()
    };
    let h = Harness::with(functions, config, 1 << 20);
    let base = h.leaf(b"x").await;
    let left = h.recipe("gate/v1", &[base], &[("tag", "L")]).await;
    let right = h.recipe("gate/v1", &[base], &[("tag", "R")]).await;
    let top = h.recipe("concat/v1", &[left, right], &[]).await;
    let exec = h.exec.clone();
    let task = tokio::spawn(async move { exec.materialize(top).await });
    (h, gate, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_branches_run_concurrently() {
    let (_h, gate, task) = gated_diamond(2).await;
    // Both branches are inside their compute at once: run one after the other, the second
    // could not start while the first is held.
    gate.wait_started(2).await;
    gate.open();
    assert_eq!(task.await.unwrap().unwrap(), &b"xLxR"[..]);
    assert_eq!(gate.counts().max_running, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_semaphore_bounds_concurrency() {
    let (h, gate, task) = gated_diamond(1).await;
    gate.wait_started(1).await;
    // The branches are materialized concurrently, so only the one permit keeps the second
    // compute out while the first is held: it waits for the permit, or (were the permit not
    // enforced) it starts.
    wait_until("the second compute waits for the permit, or starts", || {
        gate.counts().started == 2 || h.exec.stats().computes_waiting() == 1
    })
    .await;
    assert_eq!(
        gate.counts().started,
        1,
        "a second compute started: {:?}",
        gate.counts()
    );
    gate.open();
    assert_eq!(task.await.unwrap().unwrap(), &b"xLxR"[..]);
    assert_eq!(gate.counts().started, 2);
    assert_eq!(
        gate.counts().max_running,
        1,
        "one permit serializes computes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_ten_thousand_deep_does_not_overflow_the_stack() {
    let h = Harness::new();
    let mut prev = h.leaf(b"deep").await;
    let mut recipes = Vec::new();
    for _ in 0..10_000 {
        let r = Recipe::new(
            fid("identity/v1"),
            vec![prev],
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        prev = r.addr();
        recipes.push(r);
    }
    h.exec.store().put_recipes(recipes).await.unwrap();
    assert_eq!(
        h.exec
            .store()
            .get_recipe(prev)
            .await
            .unwrap()
            .unwrap()
            .depth,
        10_000
    );
    assert_eq!(h.exec.materialize(prev).await.unwrap(), &b"deep"[..]);
    assert_eq!(h.exec.stats().active(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_materialization_is_cancelled() {
    // `first = inner(a)` and `second = outer(first)`, each function held by its own gate.
    let (inner, outer) = (Gate::new(), Gate::new());
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("inner/v1"), inner.function());
    functions.register(fid("outer/v1"), outer.function());
    let h = Harness::with(functions, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"a").await;
    let first = h.recipe("inner/v1", &[a], &[("tag", "1")]).await;
    let second = h.recipe("outer/v1", &[first], &[("tag", "2")]).await;
    let exec = h.exec.clone();
    let task = tokio::spawn(async move { exec.materialize(second).await });
    // Give up while `first` computes. Every materialization on the caller's behalf ends while
    // that compute is still held: nothing is left that could go on to compute `second`.
    inner.wait_started(1).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    wait_until("no materialization is active", || {
        h.exec.stats().active() == 0
    })
    .await;
    // The gate ignores its context, so the compute on the blocking pool runs on although it
    // was cancelled; let it return. (Whether its output is cached depends on whether its task was being polled when it was
    // aborted: tokio cannot interrupt a poll in progress. Either way the value is correct.)
    inner.open();
    inner.wait_finished(1).await;
    assert!(!h.exec.cache().contains(&second));
    // A new request computes `second`, and it is the only compute of `second` there ever is.
    let exec = h.exec.clone();
    let again = tokio::spawn(async move { exec.materialize(second).await });
    outer.wait_started(1).await;
    outer.open();
    assert_eq!(again.await.unwrap().unwrap(), &b"a12"[..]);
    assert_eq!(
        outer.counts().started,
        1,
        "`second` was computed only for the new request"
    );
    assert!((1..=2).contains(&inner.counts().started));
    assert_eq!(h.exec.stats().active(), 0);
}

/// Race 1 of RELIABILITY.md ("five engine races"): a request that hangs up must not hand its
/// compute slot to the next request while its compute runs on. Waves of requests for slow recipes
/// are abandoned while every slot is taken; then one more request comes. The abandoned computes
/// keep their slots until they return, so no more than the limit ever run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_cancelled_requests_never_runs_more_computes_than_the_limit() {
    const LIMIT: usize = 2;
    let gate = Gate::new();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("gate/v1"), gate.function());
    let config = ExecutorConfig {
        max_concurrent_computes: LIMIT,
        ..ExecutorConfig::default()
    };
    let h = Harness::with(functions, config, 1 << 20);
    let a = h.leaf(b"a").await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let idle = tasks();
    for wave in 0..3 {
        let mut requests = Vec::new();
        for i in 0..LIMIT {
            let r = h
                .recipe("gate/v1", &[a], &[("tag", &format!("{wave}.{i}"))])
                .await;
            let exec = h.exec.clone();
            requests.push(tokio::spawn(async move { exec.materialize(r).await }));
        }
        wait_until("every compute slot is taken", || {
            h.exec.compute_permits_available() == 0
        })
        .await;
        for request in requests {
            request.abort();
            let _ = request.await;
        }
        // Every task of the abandoned materializations is gone (and with it whatever it held).
        wait_until("the abandoned tasks are dropped", || tasks() == idle).await;
    }
    let last = h.recipe("gate/v1", &[a], &[("tag", "last")]).await;
    let exec = h.exec.clone();
    let request = tokio::spawn(async move { exec.materialize(last).await });
    // Had a slot come back, the last request's compute would start while the others are held.
    wait_until("a compute starts or every slot stays taken", || {
        gate.counts().started > LIMIT || h.exec.compute_permits_available() == 0
    })
    .await;
    assert!(
        gate.counts().max_running <= LIMIT,
        "{} computes ran at once with a limit of {LIMIT}",
        gate.counts().max_running
    );
    gate.open();
    assert_eq!(request.await.unwrap().unwrap(), &b"alast"[..]);
    assert!(gate.counts().max_running <= LIMIT, "{:?}", gate.counts());
    // The abandoned computes, released by the same gate, give their slots back as they finish
    // on the blocking pool, which may be after the last request has its answer: every slot
    // comes back.
    wait_until("every compute slot is free again", || {
        h.exec.compute_permits_available() == LIMIT
    })
    .await;
}

/// A harness with `spin/v1` ([`Spin`]) and `gate/v1` (`gate`'s, which ignores its context),
/// one compute slot, and `timeout`.
fn one_slot(spin: &Spin, gate: &Gate, timeout: Option<Duration>) -> Harness {
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("spin/v1"), spin.clone());
    functions.register(fid("gate/v1"), gate.function());
    let config = ExecutorConfig {
        max_concurrent_computes: 1,
        compute_timeout: timeout,
        ..ExecutorConfig::default()
    };
    Harness::with(functions, config, 1 << 20)
}

/// Waits until no compute holds the slot or memory of a harness made by [`one_slot`].
async fn everything_given_back(h: &Harness) {
    wait_until("the compute slot and the memory are given back", || {
        h.exec.compute_permits_available() == 1
            && h.exec.budget().stats().inflight_bytes() == 0
            && h.exec.stats().computes_cancelled_running() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_past_its_timeout_is_cancelled_and_gives_back_its_slot() {
    let (spin, gate) = (Spin::default(), Gate::new());
    let h = one_slot(&spin, &gate, Some(Duration::from_millis(200)));
    let a = h.leaf(b"a").await;
    let r = h.recipe("spin/v1", &[a], &[]).await;
    for attempt in 1..=2 {
        let err = h.exec.materialize(r).await.unwrap_err();
        assert_eq!(
            err,
            DerivaError::DeadlineExceeded {
                function: fid("spin/v1"),
                addr: r,
                limit: Duration::from_millis(200),
            }
        );
        assert!(err.to_string().contains(&r.to_string()), "{err}");
        wait_until("the cancelled compute returns", || {
            spin.returned() == attempt
        })
        .await;
        everything_given_back(&h).await;
        assert_eq!(h.exec.stats().compute_timeouts(), attempt as u64);
    }
    assert!(!h.exec.cache().contains(&r));
    // A verification runs under the same bound.
    assert!(matches!(
        h.exec.verify(r).await,
        Err(DerivaError::DeadlineExceeded { .. })
    ));
    // The one slot is free: a builtin computes.
    let up = h.recipe("uppercase/v1", &[a], &[]).await;
    assert_eq!(h.exec.materialize(up).await.unwrap(), &b"A"[..]);
    let scrape = h.scrape();
    assert!(
        scrape.contains(r#"deriva_compute_timeouts_total{function="spin/v1"} 3"#),
        "{scrape}"
    );
}

/// A thread cannot be killed: a function that never looks at its context answers
/// DEADLINE_EXCEEDED at the timeout all the same, but keeps its slot and its memory until it
/// returns, and counts as cancelled and running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_ignores_its_context_keeps_its_slot_until_it_returns() {
    let (spin, gate) = (Spin::default(), Gate::new());
    let h = one_slot(&spin, &gate, Some(Duration::from_millis(200)));
    let a = h.leaf(b"a").await;
    let r = h.recipe("gate/v1", &[a], &[]).await;
    let err = h.exec.materialize(r).await.unwrap_err();
    assert!(
        matches!(err, DerivaError::DeadlineExceeded { addr, .. } if addr == r),
        "{err}"
    );
    assert_eq!(gate.counts().finished, 0);
    assert_eq!(h.exec.compute_permits_available(), 0);
    assert!(h.exec.budget().stats().inflight_bytes() > 0);
    assert_eq!(h.exec.stats().computes_cancelled_running(), 1);
    assert!(
        h.scrape().contains("deriva_compute_cancelled_running 1"),
        "{}",
        h.scrape()
    );
    gate.open();
    gate.wait_finished(1).await;
    everything_given_back(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_compute_is_cancelled() {
    let (spin, gate) = (Spin::default(), Gate::new());
    let h = one_slot(&spin, &gate, None);
    let a = h.leaf(b"a").await;
    let r = h.recipe("spin/v1", &[a], &[]).await;
    let exec = h.exec.clone();
    let request = tokio::spawn(async move { exec.materialize(r).await });
    wait_until("the compute starts", || spin.started() == 1).await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    wait_until("the abandoned compute returns", || spin.returned() == 1).await;
    everything_given_back(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_computes_stops_running_and_later_computes() {
    let (spin, gate) = (Spin::default(), Gate::new());
    let h = one_slot(&spin, &gate, None);
    let a = h.leaf(&[b'a'; 1 << 20]).await;
    let r = h.recipe("spin/v1", &[a], &[]).await;
    let exec = h.exec.clone();
    let request = tokio::spawn(async move { exec.materialize(r).await });
    wait_until("the compute starts", || spin.started() == 1).await;
    h.exec.cancel_computes();
    let err = request.await.unwrap().unwrap_err();
    assert!(matches!(err, DerivaError::TaskCancelled { .. }), "{err:?}");
    everything_given_back(&h).await;
    // A builtin started afterwards sees its context cancelled at its first chunk.
    let up = h.recipe("uppercase/v1", &[a], &[]).await;
    assert!(matches!(
        h.exec.materialize(up).await,
        Err(DerivaError::TaskCancelled { .. })
    ));
    assert_eq!(h.exec.stats().compute_timeouts(), 0);
}

/// A recipe stored without its function's check (planted, or stored before a bound existed)
/// is refused before anything is read or run, as itself and as an input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_recipe_its_function_refuses_is_not_run() {
    let picky = Picky::default();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("picky/v1"), picky.clone());
    let h = Harness::with(functions, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"a").await;
    let bad = Recipe::new(fid("picky/v1"), vec![a], [("x", "bad")]).unwrap();
    assert!(matches!(
        h.exec.put_recipe(bad.clone()).await,
        Err(DerivaError::InvalidInput(_))
    ));
    let planted = h.exec.store().put_recipe(bad).await.unwrap();
    let above = h.recipe("identity/v1", &[planted], &[]).await;
    for addr in [planted, above] {
        let err = h.exec.materialize(addr).await.unwrap_err();
        assert!(
            matches!(&err, DerivaError::InvalidInput(m)
                if m.contains(&planted.to_string()) && m.contains("picky/v1") && m.contains("`x`")),
            "{err}"
        );
    }
    assert!(matches!(
        h.exec.verify(planted).await,
        Err(DerivaError::InvalidInput(_))
    ));
    assert_eq!(picky.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let fine = h.recipe("picky/v1", &[a], &[("x", "good")]).await;
    assert_eq!(h.exec.materialize(fine).await.unwrap(), &b"a"[..]);
}

/// Race 4 of RELIABILITY.md: an invalidation that arrives while a recipe computes wins: the
/// compute's output is returned to its caller but not cached, and the next request computes again.
/// The same holds for a cascade from an input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_wins_over_a_compute_already_running() {
    let (first, second) = (Gate::new(), Gate::new());
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(fid("first/v1"), first.function());
    functions.register(fid("second/v1"), second.function());
    let h = Harness::with(functions, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"a").await;
    let r1 = h.recipe("first/v1", &[a], &[("tag", "1")]).await;
    let r2 = h.recipe("second/v1", &[a], &[("tag", "2")]).await;

    // Round 1 invalidates the recipe itself; round 2 cascades from its input.
    for (gate, r, target, cascade) in [(&first, r1, r1, false), (&second, r2, a, true)] {
        let exec = h.exec.clone();
        let request = tokio::spawn(async move { exec.materialize(r).await });
        gate.wait_started(1).await;
        let report = h.exec.invalidate(target, cascade).await.unwrap();
        assert!(!report.was_cached);
        gate.open();
        assert!(request.await.unwrap().is_ok());
        assert!(
            !h.exec.cache().contains(&r),
            "a compute that started before the invalidation was cached (cascade: {cascade})"
        );
        assert_eq!(h.exec.cache().stats().entries(), 0);
        assert_eq!(h.exec.cache().stats().size_bytes(), 0);
        // The next request computes again, and that output is cached.
        assert_eq!(
            h.exec.materialize(r).await.unwrap(),
            h.exec.materialize(r).await.unwrap()
        );
        assert_eq!(gate.counts().started, 2, "one compute before and one after");
        assert!(h.exec.cache().contains(&r));
        h.exec.cache().remove(&r);
    }
}

#[tokio::test]
async fn invalidate_one_or_cascade() {
    let h = Harness::new();
    let a = h.leaf(b"a").await;
    let b = h.recipe("identity/v1", &[a], &[]).await;
    let c = h.recipe("reverse/v1", &[b], &[]).await;
    let d = h.recipe("concat/v1", &[b, c], &[]).await;
    let other = h.recipe("uppercase/v1", &[a], &[]).await;
    for x in [d, other] {
        h.exec.materialize(x).await.unwrap();
    }
    let report = h.exec.invalidate(c, false).await.unwrap();
    assert!(report.was_cached);
    assert_eq!(report.evicted, vec![c]);
    assert!(h.exec.cache().contains(&d));

    let report = h.exec.invalidate(a, true).await.unwrap();
    assert!(!report.was_cached, "a leaf read as an input is not cached");
    let mut evicted = report.evicted.clone();
    evicted.sort();
    let mut expected = vec![b, d, other];
    expected.sort();
    assert_eq!(evicted, expected);
    assert_eq!(h.exec.cache().stats().entries(), 0);
    let nowhere = CAddr::from_bytes([3; 32]);
    assert_eq!(
        h.exec.invalidate(nowhere, true).await,
        Err(DerivaError::NotFound { addr: nowhere })
    );
}

#[tokio::test]
async fn dual_verification_catches_a_non_deterministic_function() {
    let h = Harness::dual_with_counter();
    let a = h.leaf(b"a").await;
    let flaky = h.recipe("counter/v1", &[a], &[]).await;
    match h.exec.materialize(flaky).await {
        Err(DerivaError::DeterminismViolation {
            function,
            addr,
            first,
            second,
        }) => {
            assert_eq!(function.to_string(), "counter/v1");
            assert_eq!(addr, flaky);
            assert_ne!(first, second);
        }
        other => panic!("expected DeterminismViolation, got {other:?}"),
    }
    assert!(
        !h.exec.cache().contains(&flaky),
        "a violating output is never cached"
    );
    let fine = h.recipe("reverse/v1", &[a], &[]).await;
    h.exec.materialize(fine).await.unwrap();
    let stats = h.exec.stats();
    assert_eq!(
        (stats.verifications_passed(), stats.verifications_failed()),
        (1, 1)
    );
    assert!((stats.verification_failure_rate() - 0.5).abs() < 1e-9);
}

#[test]
fn verification_mode_parses() {
    assert_eq!(
        "off".parse::<VerificationMode>().unwrap(),
        VerificationMode::Off
    );
    assert_eq!(
        "dual".parse::<VerificationMode>().unwrap(),
        VerificationMode::Dual
    );
    assert_eq!(
        "sampled:0.25".parse::<VerificationMode>().unwrap(),
        VerificationMode::Sampled(0.25)
    );
    for bad in ["", "sampled:", "sampled:2", "sampled:x", "always"] {
        let err = bad.parse::<VerificationMode>().unwrap_err();
        assert!(
            err.to_string().contains("verification mode"),
            "{bad}: {err}"
        );
    }
    assert_eq!(VerificationMode::Sampled(0.5).to_string(), "sampled:0.5");
}

#[tokio::test]
async fn cache_budget_holds_under_materialization() {
    let h = Harness::with(
        FunctionRegistry::with_builtins(),
        ExecutorConfig::default(),
        1000,
    );
    let a = h.leaf(&[7u8; 300]).await;
    for i in 0..10 {
        let r = h
            .recipe("repeat/v1", &[a], &[("count", &(1 + i % 2).to_string())])
            .await;
        let r2 = h.recipe("reverse/v1", &[r], &[]).await;
        h.exec.materialize(r2).await.unwrap();
        assert!(h.exec.cache().stats().size_bytes() <= 1000);
    }
    assert!(h.exec.cache().stats().evictions() > 0);
    let _ = Arc::clone(h.exec.store());
}

#[tokio::test]
async fn verify_computes_twice_whatever_the_mode() {
    let h = Harness::dual_with_counter();
    let a = h.leaf(b"abc").await;
    let good = h.recipe("reverse/v1", &[a], &[]).await;
    let report = h.exec.verify(good).await.unwrap();
    assert!(report.deterministic);
    assert_eq!(report.output_hash, CAddr::for_leaf(b"cba"));
    assert_eq!(report.output_size, 3);
    assert!(
        h.exec.cache().contains(&good),
        "a verified output is cached"
    );

    let flaky = h.recipe("counter/v1", &[a], &[]).await;
    let report = h.exec.verify(flaky).await.unwrap();
    assert!(!report.deterministic);
    assert_ne!(report.output_hash, report.second_hash);
    assert!(!h.exec.cache().contains(&flaky));

    assert!(
        matches!(h.exec.verify(a).await, Err(DerivaError::InvalidInput(m)) if m.contains("leaf"))
    );
    let nowhere = CAddr::from_bytes([5; 32]);
    assert_eq!(
        h.exec.verify(nowhere).await,
        Err(DerivaError::NotFound { addr: nowhere })
    );
    // Verification off by default: an explicit verify still runs twice.
    let plain = Harness::new();
    let a = plain.leaf(b"x").await;
    let r = plain.recipe("identity/v1", &[a], &[]).await;
    assert!(plain.exec.verify(r).await.unwrap().deterministic);
    assert_eq!(plain.exec.stats().verifications_passed(), 1);
}

/// `get_stream`: a leaf streams from the store in chunks of at most the asked size (one chunk
/// when it fits); a recipe's output is cut into slices; a cached output comes from memory; a
/// leaf damaged in the middle streams its chunks and then ends with `Corrupted`, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_stream_streams_leaves_and_slices_outputs() {
    use deriva_compute::Outcome;
    use futures::StreamExt as _;
    let h = Harness::new();
    let big: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    let leaf = h.leaf(&big).await;
    let small = h.leaf(b"tiny").await;
    let upper = h.recipe("uppercase/v1", &[small], &[]).await;

    let chunks: Vec<Bytes> = h.get_chunks(leaf, 64 << 10).await.unwrap();
    assert_eq!(chunks.len(), 5, "300,001 bytes in 64 KiB chunks");
    assert!(chunks.iter().all(|c| c.len() <= 64 << 10));
    assert!(chunks.concat() == big);
    let one: Vec<Bytes> = h.get_chunks(small, 64 << 10).await.unwrap();
    assert_eq!(one, [Bytes::from_static(b"tiny")]);
    for outcome in [Outcome::Computed, Outcome::Hit] {
        let before = h.exec.stats().outcome(outcome);
        let out: Vec<Bytes> = h.get_chunks(upper, 2).await.unwrap();
        assert_eq!(out, [&b"TI"[..], &b"NY"[..]]);
        assert_eq!(h.exec.stats().outcome(outcome), before + 1, "{outcome:?}");
    }
    // Two streamed leaves, and the recipe's input, read whole by its compute.
    assert_eq!(h.exec.stats().outcome(Outcome::Leaf), 3);
    let missing = CAddr::for_leaf(b"never stored");
    assert!(matches!(
        h.exec.get_stream(missing, 1024).await,
        Err(DerivaError::NotFound { .. })
    ));

    // A byte flipped in the middle: same size, every chunk sent, then Corrupted.
    let hex = leaf.to_hex();
    let path = h.dir.path().join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150_000] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let before = h.exec.stats().corruptions();
    let items: Vec<deriva_core::Result<Bytes>> = h
        .exec
        .get_stream(leaf, 64 << 10)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 6, "five chunks, then the error");
    assert!(items[..5].iter().all(Result::is_ok));
    assert!(matches!(&items[5], Err(DerivaError::Corrupted { addr, .. }) if *addr == leaf));
    assert_eq!(h.exec.stats().corruptions(), before + 1);
}
