//! The defaults of the `deriva-server` flags, each written once: clap applies them (and shows
//! them in `--help`), and [`Config::default`](super::Config::default) is built from them, so the two cannot disagree.
//!
//! Sizes are strings as an operator writes them (`256MiB`), parsed by the flags' own parser.
//! The executor's settings default to [`deriva_compute::ExecutorConfig::default`], and the
//! telemetry settings to the constants of [`crate::telemetry`] behind
//! [`TelemetryConfig::default`](crate::telemetry::TelemetryConfig::default).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use deriva_compute::{ExecutorConfig, VerificationMode};

pub use crate::telemetry::{
    DEFAULT_SAMPLE_RATIO as TRACE_SAMPLE_RATIO, DEFAULT_TRACE_STORE_CAPACITY as TRACE_STORE_SIZE,
};

/// `--data-dir`.
pub const DATA_DIR: &str = "./deriva-data";
/// `--listen`: loopback only.
pub const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
/// `--cache-bytes`.
pub const CACHE_BYTES: &str = "256MiB";
/// `--max-message-bytes`.
pub const MAX_MESSAGE_BYTES: &str = "64MiB";
/// `--chunk-bytes`.
pub const CHUNK_BYTES: &str = "64KiB";
/// `--shutdown-grace-secs`.
pub const SHUTDOWN_GRACE_SECS: u64 = 10;
/// `--index-schema`.
pub const INDEX_SCHEMA: &str = "deriva";
/// `--index-pool-size`.
pub const INDEX_POOL_SIZE: usize = 16;
/// `--local-cache-bytes`.
pub const LOCAL_CACHE_BYTES: &str = "1GiB";
/// `--inline-leaf-bytes`.
pub const INLINE_LEAF_BYTES: &str = "64KiB";
/// `--heartbeat-secs`.
pub const HEARTBEAT_SECS: u64 = 5;
/// `--node-forget-after`.
pub const NODE_FORGET_AFTER: &str = "24h";
/// `--node-forget-after`, as a duration.
pub const NODE_FORGET_AFTER_DURATION: std::time::Duration = std::time::Duration::from_secs(86_400);
/// `--compute-lease-ttl`.
pub const COMPUTE_LEASE_TTL: &str = "30s";
/// `--compute-lease-ttl`, as a duration.
pub const COMPUTE_LEASE_TTL_DURATION: std::time::Duration = deriva_store_remote::LEASE_TTL;
/// The shortest and longest `--compute-lease-ttl` accepted.
pub const COMPUTE_LEASE_TTL_RANGE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);
/// `--gc-grace`.
pub const GC_GRACE: &str = "1h";
/// `--gc-min-grace`.
pub const GC_MIN_GRACE: &str = "5m";
/// `--max-connections`, per listener.
pub const MAX_CONNECTIONS: usize = 4096;
/// `--max-streams-per-connection`.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// `--request-timeout-secs`: none, as before the limits existed. A recompute may
/// legitimately take long, and a streamed upload takes as long as its bytes do; clients
/// bound their own calls with deadlines (`grpc-timeout`), which the server honours.
pub const REQUEST_TIMEOUT_SECS: u64 = 0;
/// `--keepalive-secs`.
pub const KEEPALIVE_SECS: u64 = 60;
/// `--handshake-timeout-secs`.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// `--gc-grace`, as a duration.
pub const GC_GRACE_DURATION: std::time::Duration = std::time::Duration::from_secs(3600);
/// `--gc-min-grace`, as a duration.
pub const GC_MIN_GRACE_DURATION: std::time::Duration = std::time::Duration::from_secs(300);
/// `--memory-queue`.
pub const MEMORY_QUEUE: usize = 64;
/// `--memory-wait-secs`.
pub const MEMORY_WAIT_SECS: u64 = 30;
/// `--spill-bytes`.
pub const SPILL_BYTES: &str = "64MiB";
/// `--spill-budget`.
pub const SPILL_BUDGET: &str = "4GiB";
/// `--metrics-addr`: loopback only.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

/// `--verification`: the executor's default (off).
pub fn verification() -> VerificationMode {
    ExecutorConfig::default().verification
}

/// `--memory-budget`: the executor's default (a quarter of the machine's memory, at least
/// 256 MiB).
pub fn memory_budget() -> u64 {
    ExecutorConfig::default().memory.bytes
}

/// `--max-concurrent-computes`: the executor's default (the number of CPUs).
pub fn max_concurrent_computes() -> usize {
    ExecutorConfig::default().max_concurrent_computes
}

/// `--compute-timeout-secs`: the executor's default, 300 s.
pub const COMPUTE_TIMEOUT_SECS: u64 = deriva_compute::executor::COMPUTE_TIMEOUT.as_secs();

/// A size default, in bytes.
pub(super) fn size(flag: &str, value: &str) -> u64 {
    deriva_util::size::parse_size(value)
        .unwrap_or_else(|e| panic!("the default of --{flag}, {value:?}, is not a size: {e}"))
}
