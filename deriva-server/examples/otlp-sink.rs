//! A local OTLP/gRPC receiver that accepts and discards spans, metrics and log records, for
//! the telemetry benchmarks (`scripts/bench-overhead.sh`). It prints its endpoint on stdout,
//! then, every second in which something arrived, the totals so far on stderr, until killed.
//!
//! It decodes each request (as a collector must) and counts it; nothing else. An earlier sink
//! built on `fake-opentelemetry-collector` converted every span into a test record and queued it
//! behind a 64-item channel drained in turns with the other signals: it took about 1,500 spans
//! per second and made every server look saturated. This one is not the bottleneck: the figure
//! it reports is what the server sends.
//!
//! Run: `cargo run --release -p deriva-server --example otlp-sink`.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

/// What arrived so far.
#[derive(Debug, Default)]
struct Counts {
    spans: AtomicU64,
    span_batches: AtomicU64,
    metric_batches: AtomicU64,
    logs: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct Sink(Arc<Counts>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.0.span_batches.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        _request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.0.metric_batches.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let logs: usize = request
            .get_ref()
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.0.logs.fetch_add(logs as u64, Ordering::Relaxed);
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    let sink = Sink::default();
    let counts = sink.0.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (spans, batches, metrics, logs) = (
                counts.spans.load(Ordering::Relaxed),
                counts.span_batches.load(Ordering::Relaxed),
                counts.metric_batches.load(Ordering::Relaxed),
                counts.logs.load(Ordering::Relaxed),
            );
            if spans + metrics + logs != last {
                last = spans + metrics + logs;
                eprintln!(
                    "otlp-sink: {spans} spans in {batches} batches, {metrics} metric batches, {logs} log records"
                );
            }
        }
    });
    tonic::transport::Server::builder()
        .add_service(
            TraceServiceServer::new(sink.clone()).accept_compressed(CompressionEncoding::Gzip),
        )
        .add_service(
            MetricsServiceServer::new(sink.clone()).accept_compressed(CompressionEncoding::Gzip),
        )
        .add_service(LogsServiceServer::new(sink).accept_compressed(CompressionEncoding::Gzip))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
