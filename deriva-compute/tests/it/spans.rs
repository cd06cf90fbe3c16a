//! The span tree of one materialization, and of Gets of a cached leaf, exported through
//! tracing-opentelemetry into an in-memory exporter.

use std::collections::HashMap;

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

fn attr_str(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

// Multi-thread runtime: spawned tasks run on worker threads, so this also proves the executor
// carries the (thread-local, test-only) subscriber into its tasks and the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialize_span_tree_for_a_recipe_with_two_inputs() {
    let (exporter, provider, _guard) = deriva_testkit::compute::spans_in_memory();

    let h = Harness::new();
    let a = h.leaf(b"hello ").await;
    let c = h.leaf(b"dlrow").await;
    let b = h.recipe("reverse/v1", &[c], &[]).await;
    let top = h.recipe("concat/v1", &[a, b], &[]).await;
    h.exec.materialize(top).await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let materialize = |addr: deriva_core::CAddr| {
        spans
            .iter()
            .find(|s| s.name == "materialize" && attr_str(s, "addr") == Some(addr.to_string()))
            .unwrap_or_else(|| panic!("no materialize span for {addr}"))
    };
    // The engine's spans under `parent`; the store's calls to its backend (client spans of
    // deriva_store::observe: redb transactions, file operations) are checked apart.
    let children = |parent: &SpanData| -> Vec<String> {
        let mut names: Vec<String> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_context.span_id())
            .filter(|s| s.span_kind != opentelemetry::trace::SpanKind::Client)
            .map(|s| s.name.to_string())
            .collect();
        names.sort();
        names
    };

    let root = materialize(top);
    assert_eq!(
        root.parent_span_id,
        SpanId::INVALID,
        "the top materialize is a root here"
    );
    assert_eq!(attr(root, "depth"), Some(Value::I64(0)));
    assert_eq!(attr_str(root, "result").as_deref(), Some("computed"));
    assert_eq!(
        children(root),
        [
            "cache_check",
            "cache_put",
            "compute",
            "leaf_read",
            "materialize",
            "materialize"
        ]
    );
    assert!(
        spans
            .iter()
            .any(|s| s.span_kind == opentelemetry::trace::SpanKind::Client
                && s.parent_span_id == root.span_context.span_id()),
        "the recipe's lookups in the store are client spans under its materialize"
    );
    let trace_id = root.span_context.trace_id();
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace_id),
        "one trace"
    );

    let leaf_input = materialize(a);
    assert_eq!(leaf_input.parent_span_id, root.span_context.span_id());
    assert_eq!(attr(leaf_input, "depth"), Some(Value::I64(1)));
    assert_eq!(attr_str(leaf_input, "result").as_deref(), Some("leaf"));

    let recipe_input = materialize(b);
    assert_eq!(recipe_input.parent_span_id, root.span_context.span_id());
    // No `leaf_read`: the root's budget check found b's recipe in the store, and handed it down.
    assert_eq!(
        children(recipe_input),
        ["cache_check", "cache_put", "compute", "materialize"]
    );
    let grandchild = materialize(c);
    assert_eq!(
        grandchild.parent_span_id,
        recipe_input.span_context.span_id()
    );
    assert_eq!(attr(grandchild, "depth"), Some(Value::I64(2)));

    let compute = spans
        .iter()
        .find(|s| s.name == "compute" && s.parent_span_id == root.span_context.span_id())
        .unwrap();
    assert_eq!(attr_str(compute, "function").as_deref(), Some("concat/v1"));
    assert_eq!(attr(compute, "input_bytes"), Some(Value::I64(11)));
    assert_eq!(attr(compute, "output_bytes"), Some(Value::I64(11)));
    let check = by_id
        .values()
        .find(|s| s.name == "cache_check" && s.parent_span_id == root.span_context.span_id())
        .unwrap();
    assert_eq!(attr(check, "hit"), Some(Value::Bool(false)));
}

/// A Get of a leaf the cache holds is traced as a cache hit of an output is: `materialize`
/// (`result` = `hit`) with one child, `cache_check` (`hit` = true), and no `leaf_read` (the
/// store is not read). The Get that cached it read the store (`leaf_read`), then `cache_put`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_leaf_is_traced_as_a_cache_hit() {
    let (exporter, provider, _guard) = deriva_testkit::compute::spans_in_memory();

    let h = Harness::new();
    let leaf = h.leaf(&[3; 1024]).await;
    for _ in 0..4 {
        let chunks: Vec<bytes::Bytes> = h.get_chunks(leaf, 64 << 10).await.unwrap();
        assert_eq!(chunks.concat(), [3; 1024]);
    }
    h.exec.materialize(leaf).await.unwrap();

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let children = |parent: &SpanData| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_context.span_id())
            .collect()
    };
    let names = |parent: &SpanData| -> Vec<String> {
        let mut names: Vec<String> = children(parent)
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        names.sort();
        names
    };
    let of_leaf: Vec<&SpanData> = spans
        .iter()
        .filter(|s| {
            s.name == "materialize"
                && s.parent_span_id == SpanId::INVALID
                && attr(s, "addr").map(|v| v.as_str().into_owned()) == Some(leaf.to_string())
        })
        .collect();
    let by_result = |result: &str| -> Vec<&SpanData> {
        of_leaf
            .iter()
            .copied()
            .filter(|s| {
                attr(s, "result")
                    .map(|v| v.as_str().into_owned())
                    .as_deref()
                    == Some(result)
            })
            .collect()
    };
    let reads = by_result("leaf");
    assert_eq!(reads.len(), 2, "two reads of the store");
    assert_eq!(names(reads[0]), ["cache_check", "leaf_read"]);
    assert_eq!(
        names(reads[1]),
        ["cache_check", "cache_put", "leaf_read"],
        "the second read caches the leaf"
    );
    let put = children(reads[1])
        .into_iter()
        .find(|s| s.name == "cache_put")
        .unwrap();
    assert_eq!(attr(put, "bytes"), Some(Value::I64(1024)));
    let hits = by_result("hit");
    assert_eq!(hits.len(), 3, "two Gets and one materialize");
    for hit in hits {
        assert_eq!(names(hit), ["cache_check"]);
        let check = children(hit)[0];
        assert_eq!(attr(check, "hit"), Some(Value::Bool(true)));
    }
}

/// A Get of a leaf nothing is known of asks its questions of the store in one round, under its
/// `leaf_read`: the recipe index (is it a recipe?) and the leaf store (the leaf itself), at
/// once. Not "what is it, and how big" first and then the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_leaf_get_asks_the_leaf_store_and_the_recipe_index_once_each() {
    let (exporter, provider, _guard) = deriva_testkit::compute::spans_in_memory();

    let h = Harness::new();
    let leaf = h.leaf(&[5; 1024]).await;
    let chunks: Vec<bytes::Bytes> = h.get_chunks(leaf, 64 << 10).await.unwrap();
    assert_eq!(chunks.concat(), [5; 1024]);

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let read = spans
        .iter()
        .find(|s| s.name == "leaf_read")
        .expect("the Get read the store");
    assert_eq!(attr(read, "found"), Some(Value::Bool(true)));
    // Client spans of deriva_store::observe, named "<operation> <table>": one redb read of the
    // small leaves (the leaf's bytes), one of the recipes. Asking for the leaf's size first
    // would be a second "read leaves".
    let mut calls: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == read.span_context.span_id())
        .map(|s| s.name.as_ref())
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        ["read leaves", "read recipes"],
        "the store calls of the read"
    );
}
