//! Garbage collection through the executor: the outputs of collected recipes leave the cache,
//! the `gc` → `mark` → `sweep` span tree, and the `deriva_gc_*` metrics.

use std::time::Duration;

use deriva_compute::GcOptions;
use deriva_core::DerivaError;
use deriva_testkit::compute::Harness;
use opentelemetry::Value;
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::SpanData;

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_drops_the_outputs_of_what_it_removes_and_reports_it_in_spans_and_metrics() {
    let (exporter, provider, _guard) = deriva_testkit::compute::spans_in_memory();

    let h = Harness::new();
    let kept = h.leaf(b"kept").await;
    let pinned = h.recipe("uppercase/v1", &[kept], &[]).await;
    let dropped = h.leaf(b"dropped").await;
    let unpinned = h.recipe("reverse/v1", &[dropped], &[]).await;
    h.exec.store().pin(pinned).await.unwrap();
    assert_eq!(&h.exec.materialize(pinned).await.unwrap()[..], b"KEPT");
    assert_eq!(&h.exec.materialize(unpinned).await.unwrap()[..], b"deppord");
    assert_eq!(h.exec.cache().stats().entries(), 2);
    // Strictly older than a cutoff with no grace period (times are kept to the millisecond).
    tokio::time::sleep(Duration::from_millis(30)).await;

    let dry = h
        .exec
        .garbage_collect(GcOptions {
            dry_run: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(
        (
            dry.store.recipes_removed,
            dry.store.blobs_removed,
            dry.cache_entries_removed,
            dry.bytes_reclaimed_cache
        ),
        (1, 1, 1, 7)
    );
    assert_eq!(
        h.exec.cache().stats().entries(),
        2,
        "a dry run drops nothing"
    );

    let report = h.exec.garbage_collect(GcOptions::default()).await.unwrap();
    assert_eq!(report.store.recipes_removed, 1);
    assert_eq!(report.store.blobs_removed, 1);
    assert_eq!(report.store.bytes_reclaimed, 7);
    assert_eq!(report.cache_entries_removed, 1);
    assert_eq!(report.bytes_reclaimed_cache, 7);
    assert_eq!(
        (
            report.store.live_blobs,
            report.store.live_recipes,
            report.store.pinned
        ),
        (1, 1, 1)
    );
    assert_eq!(
        h.exec.cache().stats().entries(),
        1,
        "the removed recipe's output is gone"
    );
    assert!(matches!(
        h.exec.materialize(unpinned).await,
        Err(DerivaError::NotFound { .. })
    ));
    assert_eq!(&h.exec.materialize(pinned).await.unwrap()[..], b"KEPT");

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let gcs: Vec<&SpanData> = spans.iter().filter(|s| s.name == "gc").collect();
    assert_eq!(gcs.len(), 2, "one gc span per collection");
    let gc = gcs
        .iter()
        .find(|s| attr(s, "dry_run") == Some(Value::Bool(false)))
        .expect("the real collection's span");
    assert_eq!(gc.parent_span_id, SpanId::INVALID);
    assert_eq!(attr(gc, "removed"), Some(Value::I64(2)));
    assert_eq!(attr(gc, "grace_secs"), Some(Value::I64(0)));
    let child = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.parent_span_id == gc.span_context.span_id())
            .unwrap_or_else(|| panic!("no {name} span under gc"))
    };
    let mark = child("mark");
    assert_eq!(attr(mark, "live"), Some(Value::I64(2)));
    assert_eq!(attr(mark, "candidates"), Some(Value::I64(2)));
    let sweep = child("sweep");
    assert_eq!(attr(sweep, "removed"), Some(Value::I64(2)));
    assert_eq!(attr(sweep, "kept"), Some(Value::I64(0)));

    let runs = |mode: &str, result: &str| {
        h.sample(&format!(
            r#"deriva_gc_runs_total{{mode="{mode}",result="{result}"}}"#
        ))
    };
    assert_eq!(runs("collect", "ok"), Some(1.0));
    assert_eq!(runs("dry_run", "ok"), Some(1.0));
    assert_eq!(runs("collect", "error"), Some(0.0));
    assert_eq!(runs("collect", "corrupted"), Some(0.0));
    for (kind, n) in [("leaf", 1.0), ("recipe", 1.0), ("output", 1.0)] {
        assert_eq!(
            h.sample(&format!(r#"deriva_gc_removed_total{{kind="{kind}"}}"#)),
            Some(n),
            "{kind}: only the real collection counts"
        );
    }
    assert_eq!(h.sample("deriva_gc_reclaimed_bytes_total"), Some(14.0));
    assert_eq!(
        h.sample(r#"deriva_gc_duration_seconds_count{mode="collect"}"#),
        Some(1.0)
    );
}
