//! A local OTLP/gRPC receiver that accepts and discards spans, metrics and log records, for
//! the telemetry overhead benchmark (`scripts/bench-overhead.sh`). It prints its endpoint on
//! stdout, then counts what it received until killed.
//!
//! Run: `cargo run --release -p deriva-server --example otlp-sink`.

use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut collector = FakeCollectorServer::start().await?;
    println!("{}", collector.endpoint());
    let (mut spans, mut metrics, mut logs, mut next_report) = (0usize, 0usize, 0usize, 10_000usize);
    loop {
        // Drain continuously: the receiver's queues hold 64 items and would otherwise push back
        // on the exporter, which is not what a real collector does.
        spans += collector
            .exported_spans(64, Duration::from_millis(20))
            .await
            .len();
        metrics += collector
            .exported_metrics(64, Duration::from_millis(20))
            .await
            .len();
        logs += collector
            .exported_logs(64, Duration::from_millis(20))
            .await
            .len();
        if spans + metrics + logs >= next_report {
            eprintln!("otlp-sink: {spans} spans, {metrics} metric batches, {logs} log records");
            next_report += 10_000;
        }
    }
}
