//! `deriva-server`: for now, opens the store and the engine and waits for Ctrl-C. The gRPC API,
//! its flags and telemetry arrive with their own issues.

use std::sync::Arc;

use deriva_compute::{AsyncExecutor, Cache, ExecutorConfig, FunctionRegistry};
use deriva_core::Store;

const DEFAULT_DATA_DIR: &str = "./deriva-data";
const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let dir = std::env::var("DERIVA_DATA_DIR").unwrap_or_else(|_| DEFAULT_DATA_DIR.to_owned());
    let store = match Store::open(&dir) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!("deriva-server: cannot open the store in {dir}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let counters = store.counters().clone();
    let registry = Arc::new(FunctionRegistry::with_builtins());
    let meter = opentelemetry::metrics::MeterProvider::meter(
        &opentelemetry::metrics::noop::NoopMeterProvider::new(),
        "deriva-server",
    );
    let _executor = AsyncExecutor::new(
        store,
        registry.clone(),
        Arc::new(Cache::new(DEFAULT_CACHE_BYTES)),
        ExecutorConfig::default(),
        &meter,
    );
    eprintln!(
        "deriva-server: store {dir} open ({} recipes, {} blobs, {} bytes); {} functions; Ctrl-C to stop",
        counters.recipes(),
        counters.blobs(),
        counters.blob_bytes(),
        registry.len()
    );
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("deriva-server: cannot wait for Ctrl-C: {e}");
        return std::process::ExitCode::FAILURE;
    }
    eprintln!("deriva-server: stopped");
    std::process::ExitCode::SUCCESS
}
