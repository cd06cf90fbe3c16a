//! Every RPC and every documented error code, against the real server function on port 0 with
//! a real tonic client.

use std::time::Duration;

use bytes::Bytes;
use deriva_compute::testing::{Gate, wait_until};
use deriva_compute::{
    ComputeContext, ComputeFunction, FunctionError, FunctionRegistry, VerificationMode,
};
use deriva_core::{CAddr, FunctionId, Params};
use deriva_server::proto::{
    GetRequest, InvalidateRequest, PutLeafRequest, ResolveRequest, VerifyRequest,
};
use deriva_testkit::{InProcess, hex};
use tonic::Code;

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "status {status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} lacks {needle:?}",
                status.message()
            );
        }
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_resolve_status_round_trip() {
    let mut s = InProcess::start().await;
    let a = s.put(b"hello ").await;
    assert_eq!(
        a.as_ref(),
        CAddr::for_leaf(b"hello ").as_bytes(),
        "a leaf address is plain BLAKE3"
    );
    let b = s.put(b"world").await;
    assert_eq!(s.put(b"world").await, b, "idempotent");
    let ab = s.recipe("concat", &[&a, &b], &[]).await;
    assert_eq!(s.recipe("concat", &[&a, &b], &[]).await, ab);
    assert_eq!(s.get(&ab).await.unwrap(), b"hello world");
    assert_eq!(s.get(&a).await.unwrap(), b"hello ");

    let resolved = s
        .client
        .resolve(ResolveRequest { addr: ab.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.found);
    assert_eq!(
        (
            resolved.function_name.as_str(),
            resolved.function_version.as_str()
        ),
        ("concat", "v1")
    );
    assert_eq!(resolved.inputs, vec![a.clone(), b.clone()]);
    let leaf = s
        .client
        .resolve(ResolveRequest { addr: a.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!leaf.found);
    let unknown = s
        .client
        .resolve(ResolveRequest {
            addr: Bytes::from(vec![7; 32]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.found);
    let rep = s.recipe("repeat", &[&a], &[("count", "2")]).await;
    let resolved = s
        .client
        .resolve(ResolveRequest { addr: rep })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.params.get("count").map(String::as_str), Some("2"));

    let st = s.status().await;
    assert_eq!((st.recipe_count, st.blob_count), (2, 2));
    assert_eq!(st.cache_entries, 1);
    assert_eq!(st.cache_size_bytes, 11);
    assert_eq!(st.verification_mode, "off");
    assert!(st.cache_hit_rate >= 0.0 && st.cache_hit_rate <= 1.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_streams_chunks_of_the_configured_size() {
    let mut s = InProcess::start().await;
    let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    let leaf = s.put(&data).await;
    let chunks = s.get_chunks(&leaf).await.unwrap();
    let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
    assert_eq!(sizes, [65536, 65536, 65536, 8192]);
    assert_eq!(chunks.concat(), data);
    let empty = s.put(b"").await;
    assert_eq!(
        s.get_chunks(&empty).await.unwrap(),
        vec![Bytes::new()],
        "an empty value is one empty chunk"
    );
    s.stop().await;
}

/// `PutLeafStream` stores what `PutLeaf` would, however the bytes are cut, including a leaf
/// larger than one message; a stream that breaks off stores nothing and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_leaf_stream_stores_a_leaf_of_any_size_or_nothing_at_all() {
    use deriva_server::proto::PutLeafStreamRequest;
    let mut s = InProcess::builder()
        .config(|c| c.max_message_bytes = 1 << 20)
        .start()
        .await;
    let streamed = |parts: Vec<Vec<u8>>| {
        futures::stream::iter(
            parts
                .into_iter()
                .map(|p| PutLeafStreamRequest { chunk: p.into() }),
        )
    };
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    assert_code(
        s.client
            .put_leaf(PutLeafRequest {
                data: data.clone().into(),
            })
            .await,
        Code::ResourceExhausted,
        "message",
    );
    // Cut unevenly, every message under the 1 MiB limit.
    let mut parts = vec![data[..1].to_vec(), data[1..700_000].to_vec()];
    parts.extend(data[700_000..].chunks((1 << 20) - 64).map(<[u8]>::to_vec));
    let addr = s
        .client
        .put_leaf_stream(streamed(parts))
        .await
        .unwrap()
        .into_inner()
        .addr;
    assert_eq!(addr.as_ref(), CAddr::for_leaf(&data).as_bytes());
    assert_eq!(s.get(&addr).await.unwrap(), data);
    let empty = s
        .client
        .put_leaf_stream(streamed(vec![]))
        .await
        .unwrap()
        .into_inner()
        .addr;
    assert_eq!(
        empty,
        s.put(b"").await,
        "the empty leaf, as PutLeaf stores it"
    );
    assert_eq!(s.status().await.blob_count, 2);

    // A stream that breaks off half-way (here, with a message over the limit): its error,
    // nothing stored, no file left behind.
    let parts = vec![vec![1u8; 1 << 19], vec![2u8; 1 << 19], vec![3u8; 2 << 20]];
    assert_code(
        s.client.put_leaf_stream(streamed(parts)).await,
        Code::ResourceExhausted,
        "1048576",
    );
    let tmp = s.dir().join("blobs").join("tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(s.status().await.blob_count, 2);
    assert_eq!(s.get(&addr).await.unwrap().len(), data.len());
    s.stop().await;
}

/// A leaf larger than a chunk streams from the store: every chunk is sent as it is read and
/// hashed; if the bytes turn out not to match the address, the stream ends with DATA_LOSS
/// (naming the leaf) instead of OK, and the corruption is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_damaged_mid_way_ends_its_stream_with_data_loss() {
    let mut s = InProcess::builder()
        .telemetry(deriva_server::telemetry::TelemetryConfig::default())
        .http()
        .start()
        .await;
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 253) as u8).collect();
    let leaf = s.put(&data).await;
    let path = s.blob_path(&leaf);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150 * 1024] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let corruptions = |exposition: &str| {
        deriva_testkit::sample(exposition, "deriva_storage_corruption_total").unwrap_or(0.0)
    };
    let before = corruptions(&s.scrape().await);

    let mut stream = s
        .client
        .get(GetRequest { addr: leaf.clone() })
        .await
        .expect("the Get starts: the damage is found only at the end")
        .into_inner();
    let mut received = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(msg)) => received += msg.chunk.len(),
            Ok(None) => panic!("the stream ended OK after {received} bytes"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        received,
        data.len(),
        "every chunk is sent before the verdict"
    );
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&hex(&leaf)), "{status:?}");
    assert_eq!(corruptions(&s.scrape().await), before + 1.0);
    // The server goes on serving.
    let other = s.put(b"fine").await;
    assert_eq!(s.get(&other).await.unwrap(), b"fine");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_are_rejected_precisely() {
    let mut s = InProcess::start().await;
    let a = s.put(b"x").await;
    let short = Bytes::from(vec![1u8; 31]);
    assert_code(
        s.get(&short).await,
        Code::InvalidArgument,
        "addr: an address is 32 bytes, got 31",
    );
    assert_code(
        s.client
            .resolve(ResolveRequest {
                addr: short.clone(),
            })
            .await,
        Code::InvalidArgument,
        "addr",
    );
    assert_code(
        s.client
            .invalidate(InvalidateRequest {
                addr: short.clone(),
                cascade: false,
            })
            .await,
        Code::InvalidArgument,
        "addr",
    );
    assert_code(
        s.client
            .verify(VerifyRequest {
                addr: short.clone(),
            })
            .await,
        Code::InvalidArgument,
        "addr",
    );
    assert_code(
        s.try_recipe("concat", &[&a, &short], &[]).await,
        Code::InvalidArgument,
        "inputs[1]",
    );
    assert_code(
        s.try_recipe("con/cat", &[&a], &[]).await,
        Code::InvalidArgument,
        "function name",
    );
    assert_code(
        s.try_recipe("", &[&a], &[]).await,
        Code::InvalidArgument,
        "function name is empty",
    );
    assert_code(
        s.try_recipe("repeat", &[&a], &[("count", "lots")]).await,
        Code::InvalidArgument,
        "`count`",
    );
    assert_code(
        s.try_recipe("repeat", &[&a], &[]).await,
        Code::InvalidArgument,
        "`count` is required",
    );
    assert_code(
        s.try_recipe("identity", &[&a], &[("", "v")]).await,
        Code::InvalidArgument,
        "param key",
    );
    assert_eq!(
        s.status().await.recipe_count,
        0,
        "nothing invalid was stored"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_failed_precondition() {
    let mut s = InProcess::start().await;
    let nowhere = Bytes::from(vec![9u8; 32]);
    let hexed = hex(&nowhere);
    assert_code(s.get(&nowhere).await, Code::NotFound, &hexed);
    assert_code(
        s.client
            .invalidate(InvalidateRequest {
                addr: nowhere.clone(),
                cascade: true,
            })
            .await,
        Code::NotFound,
        &hexed,
    );
    assert_code(
        s.client
            .verify(VerifyRequest {
                addr: nowhere.clone(),
            })
            .await,
        Code::NotFound,
        &hexed,
    );
    assert_code(
        s.try_recipe("concat", &[&nowhere], &[]).await,
        Code::FailedPrecondition,
        &hexed,
    );
    let a = s.put(b"x").await;
    assert_code(
        s.try_recipe("teleport", &[&a], &[]).await,
        Code::FailedPrecondition,
        "teleport/v1",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_failure_is_internal_with_the_function_message() {
    let mut s = InProcess::start().await;
    let junk = s.put(b"not gzip at all").await;
    let bad = s.recipe("gunzip", &[&junk], &[]).await;
    assert_code(
        s.get(&bad).await,
        Code::Internal,
        "gunzip/v1 failed: input is not valid gzip",
    );
    // The server is unharmed.
    assert_eq!(s.get(&junk).await.unwrap(), b"not gzip at all");
    s.stop().await;
}

/// Returns a different output each call.
#[derive(Default)]
struct Flaky(std::sync::atomic::AtomicU64);

impl ComputeFunction for Flaky {
    fn compute(&self, _: &ComputeContext, _: &[Bytes], _: &Params) -> Result<Bytes, FunctionError> {
        Ok(self
            .0
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .to_string()
            .into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_loss_for_corruption_and_determinism_violations() {
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(FunctionId::new("flaky", "v1").unwrap(), Flaky::default());
    let mut s = InProcess::builder()
        .config(|c| {
            c.verification = VerificationMode::Dual;
            // The test damages a blob file under the running server: every leaf a file.
            c.inline_leaf_bytes = 0;
        })
        .functions(functions)
        .start()
        .await;
    let a = s.put(b"some bytes").await;
    let flaky = s.recipe("flaky", &[&a], &[]).await;
    assert_code(
        s.get(&flaky).await,
        Code::DataLoss,
        "flaky/v1 is not deterministic",
    );

    let verify = s
        .client
        .verify(VerifyRequest {
            addr: flaky.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!verify.deterministic);
    assert!(
        verify.error.contains("different outputs"),
        "{}",
        verify.error
    );
    let st = s.status().await;
    assert_eq!(st.verification_mode, "dual");
    assert_eq!((st.verification_failed, st.verification_total), (2, 2));
    assert!((st.verification_failure_rate - 1.0).abs() < 1e-9);

    // Flip one byte of the stored blob: a Get of it, or of a recipe above it, is DATA_LOSS.
    let upper = s.recipe("uppercase", &[&a], &[]).await;
    let hexed = hex(&a);
    let path = s.blob_path(&a);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_code(s.get(&a).await, Code::DataLoss, &hexed);
    assert_code(s.get(&upper).await, Code::DataLoss, &hexed);
    let other = s.put(b"fine").await;
    assert_eq!(s.get(&other).await.unwrap(), b"fine");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted() {
    let mut s = InProcess::builder()
        .config(|c| c.max_message_bytes = 1 << 20)
        .start()
        .await;
    let big = vec![0u8; 2 << 20];
    let result = s
        .client
        .put_leaf(PutLeafRequest {
            data: Bytes::from(big),
        })
        .await;
    assert_code(
        result,
        Code::ResourceExhausted,
        "1048576-byte message limit",
    );
    // Just under the limit still works, and the server is fine.
    let ok = s.put(&vec![1u8; (1 << 20) - 64]).await;
    assert_eq!(s.get(&ok).await.unwrap().len(), (1 << 20) - 64);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_verify() {
    let mut s = InProcess::start().await;
    let a = s.put(b"abc").await;
    let b = s.recipe("reverse", &[&a], &[]).await;
    let c = s.recipe("uppercase", &[&b], &[]).await;
    assert_eq!(s.get(&c).await.unwrap(), b"CBA");
    let inv = s
        .client
        .invalidate(InvalidateRequest {
            addr: c.clone(),
            cascade: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(inv.was_cached);
    assert_eq!(inv.evicted_count, 1);
    s.get(&c).await.unwrap();
    let inv = s
        .client
        .invalidate(InvalidateRequest {
            addr: a.clone(),
            cascade: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!inv.was_cached);
    assert_eq!(inv.evicted_count, 2);
    assert_eq!(s.status().await.cache_entries, 0);

    let v = s
        .client
        .verify(VerifyRequest { addr: c.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(v.deterministic);
    assert_eq!(v.output_hash, CAddr::for_leaf(b"CBA").to_hex());
    assert_eq!(v.output_size, 3);
    assert!(v.error.is_empty());
    assert_code(
        s.client.verify(VerifyRequest { addr: a.clone() }).await,
        Code::InvalidArgument,
        "leaf",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let s = InProcess::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "deriva.Deriva".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancelling_mid_stream_leaves_the_server_healthy() {
    let mut s = InProcess::start().await;
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 256) as u8).collect();
    let leaf = s.put(&mib).await;
    let big = s.recipe("repeat", &[&leaf], &[("count", "32")]).await;
    for _ in 0..3 {
        let mut stream = s
            .client
            .get(GetRequest { addr: big.clone() })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.chunk.len(), 65536);
        drop(stream); // hang up mid-stream
    }
    let st = s.status().await;
    assert_eq!(st.recipe_count, 1);
    assert_eq!(s.get(&big).await.unwrap().len(), 32 << 20);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_on_the_same_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = InProcess::builder().dir(dir.path()).start().await;
    let a = s.put(b"persist me").await;
    let r = s.recipe("reverse", &[&a], &[]).await;
    s.stop().await;

    let mut s = InProcess::builder().dir(dir.path()).start().await;
    assert_eq!(s.get(&a).await.unwrap(), b"persist me");
    assert_eq!(s.get(&r).await.unwrap(), b"em tsisrep");
    let st = s.status().await;
    assert_eq!((st.recipe_count, st.blob_count), (1, 1));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_stops_the_work_on_its_behalf() {
    // `first = inner(a)` and `second = outer(first)`, each function held by its own gate.
    let (inner, outer) = (Gate::new(), Gate::new());
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(FunctionId::new("inner", "v1").unwrap(), inner.function());
    functions.register(FunctionId::new("outer", "v1").unwrap(), outer.function());
    let mut s = InProcess::builder().functions(functions).start().await;
    let a = s.put(b"a").await;
    let first = s.recipe("inner", &[&a], &[]).await;
    let second = s.recipe("outer", &[&first], &[]).await;
    // Hang up while `first` computes. The server drops the call and every materialization on
    // its behalf while that compute is still held: nothing is left that could compute `second`.
    let mut client = s.client.clone();
    let call = tokio::spawn({
        let second = second.clone();
        async move { deriva_testkit::get_all(&mut client, &second).await }
    });
    inner.wait_started(1).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    wait_until("the server dropped the abandoned Get", || {
        s.stats.active() == 0
    })
    .await;
    // The compute already running on the blocking pool cannot be stopped; let it return. (Its
    // output may or may not be cached: tokio cannot interrupt a poll in progress.)
    inner.open();
    inner.wait_finished(1).await;
    assert!(
        s.status().await.cache_entries <= 1,
        "at most the abandoned `first` is cached"
    );
    // A new Get computes `second`, and it is the only compute of `second` there ever is.
    let mut client = s.client.clone();
    let again = tokio::spawn({
        let second = second.clone();
        async move { deriva_testkit::get_all(&mut client, &second).await }
    });
    outer.wait_started(1).await;
    outer.open();
    assert_eq!(again.await.unwrap().unwrap(), b"a");
    assert_eq!(
        outer.counts().started,
        1,
        "`second` was computed only for the new Get"
    );
    assert!((1..=2).contains(&inner.counts().started));
    s.stop().await;
}

/// Race 3 of RELIABILITY.md: `serve` returns only once every handle on the store is gone, so the
/// data directory opens again at once. A Get still computing when the shutdown grace ends is cut
/// off (`UNAVAILABLE`) and its materialization dropped; the held compute itself runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_returns_only_when_the_store_can_be_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(FunctionId::new("held", "v1").unwrap(), gate.function());
    let mut s = InProcess::builder()
        .dir(dir.path())
        .config(|c| c.shutdown_grace = Duration::from_millis(200))
        .functions(functions)
        .start()
        .await;
    let a = s.put(b"a").await;
    let held = s.recipe("held", &[&a], &[]).await;
    let mut client = s.client.clone();
    let call = tokio::spawn(async move { deriva_testkit::get_all(&mut client, &held).await });
    gate.wait_started(1).await;

    s.stop().await;
    // At once: no retry, no wait. redb refuses a second open while any handle is alive.
    let reopened = deriva_store_local::open(dir.path());
    let answer = call.await.unwrap();
    gate.open();
    let store = reopened.expect("the store reopens as soon as serve returns");
    assert_eq!(store.counters().recipes(), 1);
    let status = answer.expect_err("the held Get was cut off");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

/// The memory budget: a recipe whose known sizes exceed it is RESOURCE_EXHAUSTED before any
/// input is read, with the size and the budget in the message; one that fits only once
/// another compute is done waits for it, then runs. The server serves on either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_refuses_up_front_and_queues_what_fits_later() {
    const BUDGET: u64 = 8 << 20;
    let gate = Gate::new();
    let mut functions = FunctionRegistry::with_builtins();
    functions.register(FunctionId::new("held", "v1").unwrap(), gate.function());
    let mut s = InProcess::builder()
        .config(|c| c.memory_budget = BUDGET)
        .functions(functions)
        .telemetry(deriva_server::telemetry::TelemetryConfig::default())
        .http()
        .start()
        .await;
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let leaf = s.put(&mib).await;
    // 1 MiB in, 16 MiB out: refused before anything is read or computed.
    let huge = s.recipe("repeat", &[&leaf], &[("count", "16")]).await;
    let needed = (17u64 << 20).to_string();
    for _ in 0..2 {
        let err = s.get(&huge).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        for part in [
            needed.as_str(),
            &BUDGET.to_string(),
            "memory budget",
            "repeat/v1",
        ] {
            assert!(
                err.message().contains(part),
                "{part:?} in {:?}",
                err.message()
            );
        }
    }
    // A concat of three 3 MiB leaves: 9 MiB in, 9 MiB out.
    let parts: Vec<Bytes> = futures::future::join_all((0..3u8).map(|i| {
        let mut client = s.client.clone();
        async move { deriva_testkit::put_leaf(&mut client, &vec![i; 3 << 20]).await }
    }))
    .await;
    let refs: Vec<&Bytes> = parts.iter().collect();
    let joined = s.recipe("concat", &refs, &[]).await;
    assert_code(s.get(&joined).await, Code::ResourceExhausted, "concat/v1");
    assert_eq!(s.stats.outcome(deriva_compute::Outcome::Computed), 0);

    // Two held computes of 3 MiB in and (the gate's guess) 3 MiB out: the second waits.
    let three = &parts[0];
    let first = s.recipe("held", &[three], &[("tag", "1")]).await;
    let second = s.recipe("held", &[three], &[("tag", "2")]).await;
    let calls: Vec<_> = [first, second]
        .into_iter()
        .map(|addr| {
            let mut client = s.client.clone();
            tokio::spawn(async move { deriva_testkit::get_all(&mut client, &addr).await })
        })
        .collect();
    gate.wait_started(1).await;
    let budget = s.executor().budget().clone();
    wait_until("the second compute to wait for memory", || {
        budget.stats().waiting() == 1
    })
    .await;
    assert_eq!(
        gate.counts().started,
        1,
        "the second waits outside the function"
    );
    assert_eq!(budget.stats().inflight_bytes(), 6 << 20);
    gate.open();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().len(), (3 << 20) + 1);
    }
    assert_eq!(budget.stats().waits(), 1);
    assert_eq!(budget.stats().rejections(), 3);
    assert_eq!(budget.stats().inflight_bytes(), 0);
    let text = s.scrape().await;
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_memory_budget_bytes"),
        Some(BUDGET as f64)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_memory_rejections_total"),
        Some(3.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_memory_waits_total"),
        Some(1.0)
    );
    s.stop().await;
}

/// An output above `--spill-bytes` is kept in `<data-dir>/spill`, not in the memory cache,
/// and later Gets stream it from there; invalidating it removes the file; a damaged file ends
/// a Get with DATA_LOSS and is dropped, so the next Get computes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outputs_spill_to_disk_and_stream_from_there() {
    let mut s = InProcess::builder()
        .config(|c| c.spill_bytes = 1 << 20)
        .telemetry(deriva_server::telemetry::TelemetryConfig::default())
        .http()
        .start()
        .await;
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i * 3 % 251) as u8).collect();
    let leaf = s.put(&mib).await;
    let big = s.recipe("repeat", &[&leaf], &[("count", "4")]).await;
    let small = s
        .recipe("slice", &[&leaf], &[("offset", "0"), ("length", "10")])
        .await;
    let expected = mib.repeat(4);
    assert!(s.get(&big).await.unwrap() == expected);
    assert_eq!(s.get(&small).await.unwrap(), &mib[..10]);
    let spilled = s.dir().join("spill").join(hex(&big));
    assert!(spilled.is_file(), "{} is written", spilled.display());
    let st = s.status().await;
    assert_eq!(st.cache_entries, 1, "only the small output is in memory");
    assert!(st.cache_size_bytes < 1 << 20);

    let computed = s.stats.outcome(deriva_compute::Outcome::Computed);
    assert!(s.get(&big).await.unwrap() == expected);
    assert_eq!(
        s.stats.outcome(deriva_compute::Outcome::Computed),
        computed,
        "not computed again"
    );
    let text = s.scrape().await;
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_spill_entries"),
        Some(1.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_spill_size_bytes"),
        Some((4u64 << 20) as f64)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_spill_write_total"),
        Some(1.0)
    );
    // Both Gets streamed from the file: the first once its compute had written it.
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_spill_hit_total"),
        Some(2.0)
    );

    // Damaged in the middle: the Get ends with DATA_LOSS; the next one recomputes.
    let mut bytes = std::fs::read(&spilled).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&spilled, bytes).unwrap();
    assert_code(s.get(&big).await, Code::DataLoss, "corrupted");
    assert!(s.get(&big).await.unwrap() == expected);
    assert_eq!(
        s.stats.outcome(deriva_compute::Outcome::Computed),
        computed + 1
    );

    s.client
        .invalidate(InvalidateRequest {
            addr: big.clone(),
            cascade: false,
        })
        .await
        .unwrap();
    assert!(!spilled.exists(), "invalidated: the file is gone");
    assert!(s.get(&big).await.unwrap() == expected);
    s.stop().await;
}

/// The RPCs of the original Deriva's newer contract, called with the client generated from
/// their proto text: pins, CascadeInvalidate under every policy, ClusterStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_cascade_policies_and_cluster_status() {
    use deriva_server::proto::{
        CascadeInvalidateRequest, ClusterStatusRequest, ListPinsRequest, PinRequest, UnpinRequest,
    };
    let mut s = InProcess::builder()
        .telemetry(deriva_server::telemetry::TelemetryConfig::default())
        .http()
        .start()
        .await;
    let a = s.put(b"abc").await;
    let r = s.recipe("uppercase", &[&a], &[]).await;
    let r2 = s.recipe("repeat", &[&r], &[("count", "3")]).await;

    // Pins: only what exists, once; listed; counted on /metrics.
    let pin = |addr: &Bytes| PinRequest { addr: addr.clone() };
    assert!(s.client.pin(pin(&a)).await.unwrap().into_inner().was_new);
    assert!(!s.client.pin(pin(&a)).await.unwrap().into_inner().was_new);
    assert!(s.client.pin(pin(&r2)).await.unwrap().into_inner().was_new);
    let unknown = Bytes::copy_from_slice(CAddr::for_leaf(b"unknown").as_bytes());
    assert_code(
        s.client.pin(pin(&unknown)).await,
        Code::NotFound,
        "no leaf or recipe",
    );
    assert_code(
        s.client.pin(pin(&Bytes::from_static(b"short"))).await,
        Code::InvalidArgument,
        "addr",
    );
    let listed = s
        .client
        .list_pins(ListPinsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.count, 2);
    let mut addrs = listed.addrs.clone();
    addrs.sort();
    let mut expected = vec![a.clone(), r2.clone()];
    expected.sort();
    assert_eq!(addrs, expected);
    assert_eq!(
        deriva_testkit::sample(&s.scrape().await, "deriva_pins"),
        Some(2.0)
    );
    let unpin = |addr: &Bytes| UnpinRequest { addr: addr.clone() };
    assert!(
        s.client
            .unpin(unpin(&a))
            .await
            .unwrap()
            .into_inner()
            .was_pinned
    );
    assert!(
        !s.client
            .unpin(unpin(&a))
            .await
            .unwrap()
            .into_inner()
            .was_pinned
    );

    // CascadeInvalidate: r and r2 cached (3 + 9 bytes).
    assert_eq!(s.get(&r2).await.unwrap(), b"ABCABCABC");
    let cascade = |policy: &str, include_root: bool| CascadeInvalidateRequest {
        addr: a.clone(),
        policy: policy.into(),
        include_root,
        detail_addrs: true,
    };
    for policy in ["NONE", "none"] {
        let none = s
            .client
            .cascade_invalidate(cascade(policy, true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (none.evicted_count, none.traversed_count),
            (0, 0),
            "{policy}"
        );
    }
    for policy in ["dry_run", "DryRun"] {
        let dry = s
            .client
            .cascade_invalidate(cascade(policy, true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(dry.evicted_count, 2, "{policy}");
        assert_eq!(dry.traversed_count, 3);
        assert_eq!(dry.max_depth, 2);
        assert_eq!(dry.bytes_reclaimed, 12);
        assert_eq!(dry.evicted_addrs, vec![r.clone(), r2.clone()]);
    }
    assert_eq!(
        s.status().await.cache_entries,
        2,
        "a dry run evicts nothing"
    );
    // Any other policy is immediate; without the root, only the dependents are walked.
    let done = s
        .client
        .cascade_invalidate(cascade("whatever", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.evicted_count, done.traversed_count), (2, 2));
    assert_eq!(s.status().await.cache_entries, 0);
    assert_code(
        s.client
            .cascade_invalidate(CascadeInvalidateRequest {
                addr: unknown.clone(),
                ..cascade("immediate", true)
            })
            .await,
        Code::NotFound,
        "no leaf or recipe",
    );
    let text = s.scrape().await;
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_invalidation_total{policy="dry_run"}"#),
        Some(2.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_invalidation_total{policy="none"}"#),
        Some(2.0)
    );

    let cluster = s
        .client
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((cluster.alive_count, cluster.nodes.len()), (1, 1));
    let node = &cluster.nodes[0];
    assert_eq!(
        (node.state.as_str(), node.role.as_str()),
        ("alive", "server")
    );
    assert_eq!(node.grpc_addr, s.grpc_addr());
    assert_eq!(node.blob_count, 1);
    s.stop().await;
}

/// GarbageCollect with the client generated from the original proto text: a dry run, a bounded
/// run, a full run that keeps what a pin reaches; then the periodic collection of
/// `--gc-interval` removes what is left unpinned by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collect_by_request_and_by_itself() {
    use deriva_server::proto::{GcRequest, PinRequest};
    let mut s = InProcess::builder()
        // Collections with no grace period, as the contract reads.
        .config(|c| c.gc_min_grace = Duration::ZERO)
        .telemetry(deriva_server::telemetry::TelemetryConfig::default())
        .http()
        .start()
        .await;
    let kept = s.put(b"kept").await;
    let pinned = s.recipe("uppercase", &[&kept], &[]).await;
    let loose = s.put(b"loose").await;
    let inner = s.recipe("reverse", &[&loose], &[]).await;
    let outer = s.recipe("repeat", &[&inner], &[("count", "2")]).await;
    s.client
        .pin(PinRequest {
            addr: pinned.clone(),
        })
        .await
        .unwrap();
    assert_eq!(s.get(&outer).await.unwrap(), b"esoolesool");
    // Strictly older than a cutoff with no grace period (times are kept to the millisecond).
    tokio::time::sleep(Duration::from_millis(30)).await;

    let gc = |grace_period_secs, dry_run, max_removals| GcRequest {
        grace_period_secs,
        dry_run,
        detail_addrs: true,
        max_removals,
    };
    let young = s
        .client
        .garbage_collect(gc(3600, false, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((young.blobs_removed, young.recipes_removed), (0, 0));
    assert_eq!(
        (young.live_blobs, young.live_recipes, young.pinned_count),
        (2, 3, 1)
    );

    let dry = s
        .client
        .garbage_collect(gc(0, true, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    assert_eq!(
        dry.removed_addrs,
        vec![outer.clone(), inner.clone(), loose.clone()]
    );
    assert_eq!((dry.blobs_removed, dry.recipes_removed), (1, 2));
    assert_eq!(dry.bytes_reclaimed_blobs, 5);
    // outer and inner are cached: 10 + 5 bytes.
    assert_eq!(
        (dry.cache_entries_removed, dry.bytes_reclaimed_cache),
        (2, 15)
    );
    assert_eq!(dry.total_bytes_reclaimed, 20);
    assert_eq!(
        s.get(&outer).await.unwrap(),
        b"esoolesool",
        "a dry run removes nothing"
    );

    let one = s
        .client
        .garbage_collect(gc(0, false, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.removed_addrs, vec![outer.clone()]);
    assert_eq!(one.cache_entries_removed, 1);
    assert_code(s.get(&outer).await, Code::NotFound, "no leaf or recipe");
    assert_eq!(s.get(&inner).await.unwrap(), b"esool");

    let rest = s
        .client
        .garbage_collect(gc(0, false, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!rest.dry_run);
    assert_eq!(rest.removed_addrs, vec![inner.clone(), loose.clone()]);
    assert_eq!((rest.live_blobs, rest.live_recipes), (1, 1));
    assert_code(s.get(&loose).await, Code::NotFound, "no leaf or recipe");
    assert_eq!(s.get(&pinned).await.unwrap(), b"KEPT");
    let quiet = s.client.garbage_collect(gc(0, false, 0)).await.unwrap();
    assert!(
        quiet.into_inner().removed_addrs.is_empty(),
        "nothing left to remove"
    );

    let text = s.scrape().await;
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_gc_runs_total{mode="collect",result="ok"}"#),
        Some(4.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_gc_removed_total{kind="recipe"}"#),
        Some(2.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_gc_removed_total{kind="leaf"}"#),
        Some(1.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, r#"deriva_gc_removed_total{kind="output"}"#),
        Some(2.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_gc_reclaimed_bytes_total"),
        Some(20.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_storage_blobs"),
        Some(1.0)
    );
    assert_eq!(
        deriva_testkit::sample(&text, "deriva_dag_recipes"),
        Some(1.0)
    );
    s.stop().await;

    // By itself: every 100 ms with no grace period; unpinned, the rest goes without a request.
    let dir = tempfile::tempdir().unwrap();
    let mut s = InProcess::builder()
        .dir(dir.path())
        .config(|c| {
            c.gc_interval = Some(Duration::from_millis(100));
            c.gc_grace = Duration::ZERO;
        })
        .start()
        .await;
    let leaf = s.put(b"collected by itself").await;
    let counters = s.executor().store().counters().clone();
    wait_until("the periodic collection to remove the leaf", || {
        counters.blobs() == 0
    })
    .await;
    assert_code(s.get(&leaf).await, Code::NotFound, "no leaf or recipe");
    s.stop().await;
}
