//! The instruments, read back through a private meter provider and Prometheus registry per
//! test: the families of this crate, as README.md's metrics reference lists them.

use std::time::{Duration, Instant};

use deriva_compute::testing::{GATE_DEADLINE, Gate};
use deriva_compute::{ExecutorConfig, FunctionRegistry};
use deriva_testkit::compute::{Harness, Slow, fid};

#[tokio::test]
async fn cache_hit_and_miss_counters() {
    let h = Harness::new();
    let a = h.leaf(b"abc").await;
    let r = h.recipe("reverse/v1", &[a], &[]).await;
    h.exec.materialize(r).await.unwrap(); // miss on r, miss on a (a leaf)
    assert_eq!(h.sample("deriva_cache_hit_total"), Some(0.0));
    assert_eq!(h.sample("deriva_cache_miss_total"), Some(2.0));
    h.exec.materialize(r).await.unwrap(); // hit
    assert_eq!(h.sample("deriva_cache_hit_total"), Some(1.0));
    assert_eq!(h.sample("deriva_cache_miss_total"), Some(2.0));
    assert_eq!(h.sample(r#"deriva_cache_total{result="hit"}"#), Some(1.0));
    assert_eq!(h.sample(r#"deriva_cache_total{result="miss"}"#), Some(2.0));
    assert_eq!(h.sample("deriva_cache_entries"), Some(1.0));
    assert_eq!(h.sample("deriva_cache_size_bytes"), Some(3.0));
    assert_eq!(h.sample("deriva_cache_hit_rate"), Some(1.0 / 3.0));
    assert_eq!(
        h.sample(r#"deriva_materialize_total{result="hit"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.sample(r#"deriva_materialize_total{result="leaf"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.sample(r#"deriva_materialize_total{result="computed"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.sample(r#"deriva_materialize_total{result="error"}"#),
        Some(0.0)
    );
}

/// (d) What the cache holds, by kind: a leaf cached by its second Get shows in
/// `deriva_cache_leaf_*` and in the totals; its hits are cache hits (`materialize` result
/// `hit`) that save no compute time.
#[tokio::test]
async fn cached_leaves_are_counted_apart_and_in_the_totals() {
    let h = Harness::new();
    let a = h.leaf(&[b'x'; 1024]).await;
    let get = || async {
        let chunks: Vec<bytes::Bytes> = h.get_chunks(a, 64 << 10).await.unwrap();
        assert_eq!(chunks.concat(), [b'x'; 1024]);
    };
    get().await;
    assert_eq!(h.sample("deriva_cache_leaf_entries"), Some(0.0));
    get().await; // the second read caches it
    for (family, want) in [
        ("deriva_cache_leaf_entries", 1.0),
        ("deriva_cache_leaf_size_bytes", 1024.0),
        ("deriva_cache_entries", 1.0),
        ("deriva_cache_size_bytes", 1024.0),
        ("deriva_cache_leaf_hit_total", 0.0),
        (r#"deriva_materialize_total{result="leaf"}"#, 2.0),
    ] {
        assert_eq!(h.sample(family), Some(want), "{family}");
    }
    get().await;
    let r = h.recipe("reverse/v1", &[a], &[]).await;
    h.exec.materialize(r).await.unwrap(); // a miss on r, a leaf hit on its input
    for (family, want) in [
        ("deriva_cache_leaf_entries", 1.0),
        ("deriva_cache_leaf_size_bytes", 1024.0),
        ("deriva_cache_entries", 2.0),
        ("deriva_cache_size_bytes", 2048.0),
        ("deriva_cache_leaf_hit_total", 2.0),
        ("deriva_cache_hit_total", 2.0),
        ("deriva_cache_miss_total", 3.0),
        (r#"deriva_materialize_total{result="hit"}"#, 2.0),
        (r#"deriva_materialize_total{result="leaf"}"#, 2.0),
        ("deriva_cache_saved_seconds_total", 0.0),
    ] {
        assert_eq!(h.sample(family), Some(want), "{family}");
    }
}

#[tokio::test]
async fn materialize_duration_histogram_is_observed_with_the_documented_buckets() {
    let h = Harness::new();
    let a = h.leaf(b"abc").await;
    let r = h.recipe("identity/v1", &[a], &[]).await;
    h.exec.materialize(r).await.unwrap();
    // One top-level call and one for its input.
    assert_eq!(
        h.sample("deriva_materialize_duration_seconds_count"),
        Some(2.0)
    );
    assert!(h.sample("deriva_materialize_duration_seconds_sum").unwrap() > 0.0);
    let text = h.scrape();
    for le in [
        "0.001", "0.01", "0.05", "0.1", "0.5", "1", "5", "30", "+Inf",
    ] {
        let line = format!("deriva_materialize_duration_seconds_bucket{{le=\"{le}\"}}");
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    // Depth: a top-level call that descended one level.
    assert_eq!(h.sample("deriva_materialize_depth_count"), Some(1.0));
    assert_eq!(
        h.sample(r#"deriva_materialize_depth_bucket{le="0"}"#),
        Some(0.0)
    );
    assert_eq!(
        h.sample(r#"deriva_materialize_depth_bucket{le="1"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn compute_duration_and_sizes_are_labelled_by_function() {
    let h = Harness::new();
    let a = h.leaf(b"hello ").await;
    let b = h.leaf(b"world").await;
    let r = h.recipe("concat/v1", &[a, b], &[]).await;
    h.exec.materialize(r).await.unwrap();
    assert_eq!(
        h.sample(r#"deriva_compute_duration_seconds_count{function="concat/v1"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.sample(r#"deriva_compute_input_bytes_sum{function="concat/v1"}"#),
        Some(11.0)
    );
    assert_eq!(
        h.sample(r#"deriva_compute_output_bytes_sum{function="concat/v1"}"#),
        Some(11.0)
    );
    let text = h.scrape();
    for le in [
        "0.0001", "0.001", "0.01", "0.05", "0.1", "0.5", "1", "5", "+Inf",
    ] {
        let line =
            format!("deriva_compute_duration_seconds_bucket{{function=\"concat/v1\",le=\"{le}\"}}");
        assert!(text.contains(&line), "missing {line}");
    }
    assert!(
        !text.contains(r#"_bytes_count{function="reverse/v1""#)
            && !text.contains(r#"_seconds_count{function="reverse/v1""#),
        "only computed functions have histogram series"
    );
    // Timeouts are counted from zero for every registered function, so alerts see the first.
    assert!(
        text.contains(r#"deriva_compute_timeouts_total{function="reverse/v1"} 0"#),
        "{text}"
    );
}

async fn wait_for_active(h: &Harness, want: f64) {
    let deadline = Instant::now() + GATE_DEADLINE;
    loop {
        let got = h.sample("deriva_materialize_active");
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "deriva_materialize_active never became {want}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_gauge_rises_during_a_slow_compute_and_returns_to_zero() {
    let (ok_gate, fail_gate) = (Gate::new(), Gate::failing());
    let mut reg = FunctionRegistry::with_builtins();
    reg.register(fid("gate/v1"), ok_gate.function());
    reg.register(fid("fail/v1"), fail_gate.function());
    let h = Harness::with(reg, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"a").await;
    assert_eq!(h.sample("deriva_materialize_active"), Some(0.0));

    // Held in its compute: one materialization is active until the gate opens.
    let ok = h.recipe("gate/v1", &[a], &[]).await;
    let exec = h.exec.clone();
    let task = tokio::spawn(async move { exec.materialize(ok).await });
    ok_gate.wait_started(1).await;
    wait_for_active(&h, 1.0).await;
    ok_gate.open();
    task.await.unwrap().unwrap();
    assert_eq!(h.sample("deriva_materialize_active"), Some(0.0));

    let bad = h.recipe("fail/v1", &[a], &[]).await;
    let exec = h.exec.clone();
    let task = tokio::spawn(async move { exec.materialize(bad).await });
    fail_gate.wait_started(1).await;
    wait_for_active(&h, 1.0).await;
    fail_gate.open();
    assert!(task.await.unwrap().is_err());
    assert_eq!(h.sample("deriva_materialize_active"), Some(0.0));
    assert_eq!(
        h.sample(r#"deriva_materialize_total{result="error"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn verification_counters_and_failure_rate() {
    let h = Harness::dual_with_counter();
    let a = h.leaf(b"a").await;
    let good = h.recipe("reverse/v1", &[a], &[]).await;
    let flaky = h.recipe("counter/v1", &[a], &[]).await;
    h.exec.materialize(good).await.unwrap();
    h.exec.materialize(flaky).await.unwrap_err();
    assert_eq!(
        h.sample(r#"deriva_verification_total{result="pass"}"#),
        Some(1.0)
    );
    assert_eq!(
        h.sample(r#"deriva_verification_total{result="fail"}"#),
        Some(1.0)
    );
    assert_eq!(h.sample("deriva_verification_failure_rate"), Some(0.5));
}

#[tokio::test]
async fn every_family_has_its_documented_name_and_type() {
    let h = Harness::with(
        FunctionRegistry::with_builtins(),
        ExecutorConfig::default(),
        10,
    );
    let a = h.leaf(b"abc").await;
    for n in 1..4 {
        let r = h
            .recipe("repeat/v1", &[a], &[("count", &n.to_string())])
            .await;
        h.exec.materialize(r).await.unwrap(); // small budget: forces evictions
    }
    assert!(h.sample("deriva_cache_eviction_total").unwrap() >= 1.0);
    let text = h.scrape();
    let expected = [
        ("deriva_materialize_total", "counter"),
        ("deriva_materialize_duration_seconds", "histogram"),
        ("deriva_materialize_active", "gauge"),
        ("deriva_materialize_depth", "histogram"),
        ("deriva_cache_hit_total", "counter"),
        ("deriva_cache_miss_total", "counter"),
        ("deriva_cache_total", "counter"),
        ("deriva_cache_eviction_total", "counter"),
        ("deriva_cache_size_bytes", "gauge"),
        ("deriva_cache_entries", "gauge"),
        ("deriva_cache_hit_rate", "gauge"),
        ("deriva_cache_leaf_hit_total", "counter"),
        ("deriva_cache_leaf_size_bytes", "gauge"),
        ("deriva_cache_leaf_entries", "gauge"),
        ("deriva_compute_duration_seconds", "histogram"),
        ("deriva_compute_input_bytes", "histogram"),
        ("deriva_compute_output_bytes", "histogram"),
        ("deriva_compute_timeouts_total", "counter"),
        ("deriva_compute_cancelled_running", "gauge"),
        ("deriva_compute_lease_acquired_total", "counter"),
        ("deriva_compute_lease_joined_total", "counter"),
        ("deriva_compute_lease_expired_total", "counter"),
        ("deriva_verification_total", "counter"),
        ("deriva_audit_total", "counter"),
        ("deriva_cache_saved_seconds_total", "counter"),
        ("deriva_storage_corruption_total", "counter"),
        ("deriva_verification_failure_rate", "gauge"),
        ("deriva_memory_budget_bytes", "gauge"),
        ("deriva_memory_inflight_bytes", "gauge"),
        ("deriva_memory_waiting", "gauge"),
        ("deriva_memory_waits_total", "counter"),
        ("deriva_memory_rejections_total", "counter"),
        ("deriva_invalidation_total", "counter"),
        // Zero until a collection runs (its duration histogram appears with the first).
        ("deriva_gc_runs_total", "counter"),
        ("deriva_gc_removed_total", "counter"),
        ("deriva_gc_reclaimed_bytes_total", "counter"),
    ];
    for (name, kind) in expected {
        let line = format!("# TYPE {name} {kind}");
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    assert_eq!(
        families.len(),
        expected.len(),
        "unexpected families: {families:?}"
    );
    assert!(!text.contains("otel_scope"), "no otel_scope_* labels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_seconds_grow_by_the_hit_entrys_compute_cost() {
    let mut reg = FunctionRegistry::with_builtins();
    reg.register(fid("slow/v1"), Slow::new(Duration::from_millis(30)));
    let h = Harness::with(reg, ExecutorConfig::default(), 1 << 20);
    let a = h.leaf(b"a").await;
    let r = h.recipe("slow/v1", &[a], &[]).await;
    h.exec.materialize(r).await.unwrap();
    assert_eq!(
        h.sample("deriva_cache_saved_seconds_total"),
        Some(0.0),
        "a miss saves nothing"
    );
    // The entry's recorded cost (read without counting a materialization).
    let cost = h.exec.cache().get(&r).unwrap().cost;
    assert!(cost >= Duration::from_millis(30));
    h.exec.materialize(r).await.unwrap();
    assert_eq!(h.exec.stats().saved(), cost);
    h.exec.materialize(r).await.unwrap();
    assert_eq!(h.exec.stats().saved(), cost * 2);
    let saved = h.sample("deriva_cache_saved_seconds_total").unwrap();
    assert!(
        (saved - (cost * 2).as_secs_f64()).abs() < 1e-9,
        "{saved} vs {cost:?}"
    );
}

#[tokio::test]
async fn corruption_is_counted_where_it_is_found() {
    // The test damages a blob file: every leaf a file.
    let h = Harness::leaves_as_files();
    let a = h.leaf(b"precious bytes").await;
    let up = h.recipe("uppercase/v1", &[a], &[]).await;
    let hex = a.to_hex();
    let path = h.dir.path().join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(h.sample("deriva_storage_corruption_total"), Some(0.0));
    // Through a recipe: counted once, for the leaf, not again for the recipe above it.
    assert!(
        matches!(h.exec.materialize(up).await, Err(deriva_core::DerivaError::Corrupted { addr, .. }) if addr == a)
    );
    assert_eq!(h.sample("deriva_storage_corruption_total"), Some(1.0));
    assert!(!h.exec.cache().contains(&up));
    assert!(h.exec.materialize(a).await.is_err());
    assert_eq!(h.exec.stats().corruptions(), 2);
}
