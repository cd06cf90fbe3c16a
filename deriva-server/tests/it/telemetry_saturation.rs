//! Telemetry at saturation, against the real binary and a real OTLP/gRPC trace receiver (tonic):
//! at 100% sampling, a receiver that holds every export lets the span export queue fill, and
//! `/metrics` shows the spans dropped (`deriva_telemetry_spans_dropped_total`) and the queue's
//! length, never above its capacity; once the receiver answers, spans are exported again. With
//! a receiver that answers and an ample queue, nothing is dropped and the exported count rises.
//! The README's "Span export metrics" table is compared with a live scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use deriva_testkit::{DEADLINE, ServerProcess, sample};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An OTLP/gRPC trace receiver that answers each export once it is open, and counts the spans
/// it has answered for.
#[derive(Clone)]
struct Receiver {
    open: watch::Receiver<bool>,
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut open = self.open.clone();
        // Held until the test opens the receiver (or the test ends).
        let _ = open.wait_for(|open| *open).await;
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::SeqCst);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a receiver, open or holding; returns its endpoint, the switch that opens it, and its
/// count of spans.
async fn receiver(open: bool) -> (String, watch::Sender<bool>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (switch, watching) = watch::channel(open);
    let spans = Arc::new(AtomicU64::new(0));
    let service = TraceServiceServer::new(Receiver {
        open: watching,
        spans: spans.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (endpoint, switch, spans)
}

/// The server at 100% sampling, exporting only spans to `endpoint`, with this queue and batch.
fn server(endpoint: &str, queue: usize, batch: usize) -> ServerProcess {
    ServerProcess::options()
        .args(["--otlp-endpoint", endpoint, "--trace-sample-ratio", "1"])
        .env("OTEL_METRICS_EXPORTER", "none")
        .env("OTEL_LOGS_EXPORTER", "none")
        .env("OTEL_BSP_MAX_QUEUE_SIZE", queue.to_string())
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", batch.to_string())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        // A held export must not time out while the test looks at the queue.
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "120000")
        .start()
}

/// A few RPCs (each one a trace of several spans).
async fn traffic(server: &ServerProcess, n: usize) {
    let mut client = server.client().await;
    for i in 0..n {
        let leaf = deriva_testkit::put_leaf(&mut client, format!("span-{i}").as_bytes()).await;
        deriva_testkit::get_all(&mut client, &leaf).await.unwrap();
    }
}

/// Sends traffic and scrapes until `done` holds of the exposition (up to [`DEADLINE`]); the
/// last exposition.
async fn drive_until(server: &ServerProcess, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = server.scrape().await;
        if done(&text) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}; last scrape:\n{text}"
        );
        traffic(server, 5).await;
    }
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} on /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_holds_exports_fills_the_queue_and_the_drops_are_counted() {
    let (endpoint, open, received) = receiver(false).await;
    let mut server = server(&endpoint, 8, 4);

    let text = drive_until(&server, "spans dropped", |t| {
        sample(t, "deriva_telemetry_spans_dropped_total").is_some_and(|d| d > 0.0)
    })
    .await;
    let length = value(&text, "deriva_telemetry_span_queue_length");
    assert_eq!(value(&text, "deriva_telemetry_span_queue_capacity"), 8.0);
    assert!((0.0..=8.0).contains(&length), "queue length {length}");
    // The first export is still held: nothing is exported, nothing has failed.
    assert_eq!(value(&text, "deriva_telemetry_spans_exported_total"), 0.0);
    assert_eq!(
        value(&text, "deriva_telemetry_spans_export_failed_total"),
        0.0
    );
    readme_span_export_families_are_live(&text);
    server.wait_for_stderr("the drop warning", |l| {
        l.contains("span export queue is full")
    });

    // The receiver answers: what waited is exported, and new spans go through again.
    let dropped = value(&text, "deriva_telemetry_spans_dropped_total");
    open.send_replace(true);
    let text = drive_until(&server, "spans exported", |t| {
        sample(t, "deriva_telemetry_spans_exported_total").is_some_and(|e| e > 0.0)
    })
    .await;
    assert!(value(&text, "deriva_telemetry_spans_dropped_total") >= dropped);
    assert!(value(&text, "deriva_telemetry_span_queue_length") <= 8.0);
    assert!(
        received.load(Ordering::SeqCst) as f64
            >= value(&text, "deriva_telemetry_spans_exported_total")
    );
    assert!(server.stop().success());
    assert!(
        server
            .stderr()
            .contains("spans dropped because the export queue was full"),
        "the total at shutdown:\n{}",
        server.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_answers_gets_every_span_and_nothing_is_dropped() {
    let (endpoint, _open, received) = receiver(true).await;
    let mut server = server(&endpoint, 2048, 512);

    let text = drive_until(&server, "spans exported", |t| {
        sample(t, "deriva_telemetry_spans_exported_total").is_some_and(|e| e > 0.0)
    })
    .await;
    let first = value(&text, "deriva_telemetry_spans_exported_total");
    let text = drive_until(&server, "more spans exported", |t| {
        sample(t, "deriva_telemetry_spans_exported_total").is_some_and(|e| e > first)
    })
    .await;
    assert_eq!(value(&text, "deriva_telemetry_spans_dropped_total"), 0.0);
    assert_eq!(
        value(&text, "deriva_telemetry_spans_export_failed_total"),
        0.0
    );
    assert_eq!(value(&text, "deriva_telemetry_span_queue_capacity"), 2048.0);
    assert!(value(&text, "deriva_telemetry_span_queue_length") <= 2048.0);
    readme_span_export_families_are_live(&text);

    // A clean stop exports what waited: the receiver has every span the queue took.
    assert!(server.stop().success());
    let exported = received.load(Ordering::SeqCst);
    assert!(exported as f64 > first, "{exported} spans received");
    assert!(
        !server.stderr().contains("span export queue is full"),
        "{}",
        server.stderr()
    );
}

/// The README's "Span export metrics" table against a live exposition: each documented family
/// is there with its type, and each live `deriva_telemetry_*` family is documented.
fn readme_span_export_families_are_live(text: &str) {
    let documented = deriva_testkit::readme_metrics("### Span export metrics");
    assert_eq!(documented.len(), 5, "README span export rows");
    let live = deriva_testkit::families(text);
    for (name, kind, _) in &documented {
        let found = live
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is documented but not on /metrics"));
        assert_eq!(&found.1, kind, "type of {name}");
    }
    for (name, _) in live
        .iter()
        .filter(|(n, _)| n.starts_with("deriva_telemetry_"))
    {
        assert!(
            documented.iter().any(|(n, _, _)| n == name),
            "{name} is on /metrics but not in the README"
        );
    }
}
