//! [`Config`], the server's settings, and [`ServerArgs`], the command line that fills it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use deriva_compute::VerificationMode;
use deriva_core::size::parse_size;

use crate::telemetry::{LogFormat, TelemetryConfig};

/// Everything the server needs to run. [`Config::default`] is what `deriva-server` runs with
/// when given no flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the store lives (`deriva.redb` and `blobs/`). Created if missing.
    pub data_dir: PathBuf,
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    /// Byte budget of the in-memory cache of computed outputs.
    pub cache_bytes: u64,
    /// When to compute twice and compare.
    pub verification: VerificationMode,
    /// Most computes running at once.
    pub max_concurrent_computes: usize,
    /// Largest gRPC message accepted, in bytes; a larger request is `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// Size of each `Get` response chunk, in bytes.
    pub chunk_bytes: usize,
    /// How long in-flight calls may run after a shutdown signal before they are cut off.
    pub shutdown_grace: Duration,
    /// Address of the HTTP listener for `/metrics` and the health endpoints; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Tracing, metrics export and logging.
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./deriva-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            cache_bytes: 256 << 20,
            verification: VerificationMode::Off,
            max_concurrent_computes: deriva_compute::ExecutorConfig::default()
                .max_concurrent_computes,
            max_message_bytes: 64 << 20,
            chunk_bytes: 64 << 10,
            shutdown_grace: Duration::from_secs(10),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// `deriva-server`'s flags. Each has a `DERIVA_*` environment equivalent; a flag wins over its
/// variable.
#[derive(Debug, clap::Parser)]
#[command(
    name = "deriva-server",
    version,
    about = "Deriva: a computation-addressed store, served over gRPC"
)]
pub struct ServerArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "DERIVA_DATA_DIR", default_value = "./deriva-data")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "DERIVA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Cache budget, in bytes or with a unit (KiB, MiB, GiB).
    #[arg(long, env = "DERIVA_CACHE_BYTES", default_value = "256MiB", value_parser = parse_size)]
    pub cache_bytes: u64,
    /// Verification mode: off, dual, or sampled:RATE (RATE from 0 to 1).
    #[arg(long, env = "DERIVA_VERIFICATION", default_value = "off", value_parser = parse_verification)]
    pub verification: VerificationMode,
    /// Most computes at once [default: the number of CPUs].
    #[arg(long, env = "DERIVA_MAX_CONCURRENT_COMPUTES", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_computes: Option<u32>,
    /// Largest gRPC message accepted, in bytes or with a unit.
    #[arg(long, env = "DERIVA_MAX_MESSAGE_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_message_bytes: u64,
    /// Size of each Get response chunk, in bytes or with a unit.
    #[arg(long, env = "DERIVA_CHUNK_BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub chunk_bytes: u64,
    /// Seconds that in-flight calls may take to finish after SIGINT or SIGTERM.
    #[arg(long, env = "DERIVA_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// HTTP address for /metrics, /health, /healthz and /readyz (loopback unless you open it).
    #[arg(long, env = "DERIVA_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,
    /// Shortcut for the port of --metrics-addr, keeping its host; 0 turns the HTTP listener off.
    #[arg(long, env = "DERIVA_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// OTLP/gRPC endpoint for spans and metrics, e.g. http://127.0.0.1:4317 [env:
    /// OTEL_EXPORTER_OTLP_ENDPOINT is used when this is not set]. Without one nothing is exported.
    #[arg(long, env = "DERIVA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (0 to 1); a sampled caller is always honored.
    #[arg(long, env = "DERIVA_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
    /// Most new traces sampled per second, so load cannot flood the collector [default: no cap].
    #[arg(long, env = "DERIVA_TRACE_MAX_PER_SECOND")]
    pub trace_max_per_second: Option<f64>,
    /// How many recent requests the in-process trace store keeps for `deriva get --explain` and
    /// /debug/traces (plus the slowest and the failed ones).
    #[arg(long, env = "DERIVA_TRACE_STORE_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub trace_store_size: u32,
    /// Log format: text (with the time since start) or json.
    #[arg(long, env = "DERIVA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl ServerArgs {
    /// The [`Config`] these flags describe.
    pub fn into_config(self) -> Result<Config, String> {
        let defaults = Config::default();
        let chunk_bytes = usize::try_from(self.chunk_bytes)
            .ok()
            .filter(|c| *c > 0)
            .ok_or("--chunk-bytes must be at least 1")?;
        Ok(Config {
            data_dir: self.data_dir,
            listen: self.listen,
            cache_bytes: self.cache_bytes,
            verification: self.verification,
            max_concurrent_computes: self
                .max_concurrent_computes
                .map_or(defaults.max_concurrent_computes, |n| n as usize),
            max_message_bytes: usize::try_from(self.max_message_bytes)
                .map_err(|_| "--max-message-bytes is too large")?,
            chunk_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            metrics_addr: match self.metrics_port {
                Some(0) => None,
                Some(port) => Some(SocketAddr::new(self.metrics_addr.ip(), port)),
                None => Some(self.metrics_addr),
            },
            telemetry: TelemetryConfig {
                otlp_endpoint: self
                    .otlp_endpoint
                    .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
                    .filter(|e| !e.is_empty()),
                sample_ratio: self.trace_sample_ratio,
                max_traces_per_second: self.trace_max_per_second,
                log_format: self.log_format,
                trace_store_capacity: self.trace_store_size as usize,
                ..TelemetryConfig::default()
            },
        })
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio from 0 to 1")),
    }
}

fn parse_verification(s: &str) -> Result<VerificationMode, String> {
    s.parse()
        .map_err(|e: deriva_core::DerivaError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn no_flags_gives_the_defaults() {
        let config = ServerArgs::try_parse_from(["deriva-server"])
            .unwrap()
            .into_config()
            .unwrap();
        let defaults = Config::default();
        assert_eq!(config.data_dir, defaults.data_dir);
        assert_eq!(config.listen, defaults.listen);
        assert_eq!(config.cache_bytes, defaults.cache_bytes);
        assert_eq!(config.max_message_bytes, defaults.max_message_bytes);
        assert_eq!(config.chunk_bytes, defaults.chunk_bytes);
        assert_eq!(config.verification, VerificationMode::Off);
        assert_eq!(config.metrics_addr, defaults.metrics_addr);
        assert_eq!(config.telemetry.sample_ratio, 1.0);
        assert_eq!(config.telemetry.log_format, LogFormat::Text);
        assert_eq!(config.telemetry.trace_store_capacity, 256);
    }

    #[test]
    fn metrics_port_keeps_the_host_and_zero_disables() {
        let parse = |args: &[&str]| {
            let mut all = vec!["deriva-server"];
            all.extend_from_slice(args);
            ServerArgs::try_parse_from(all)
                .unwrap()
                .into_config()
                .unwrap()
                .metrics_addr
        };
        assert_eq!(
            parse(&["--metrics-port", "9191"]),
            Some("127.0.0.1:9191".parse().unwrap())
        );
        assert_eq!(
            parse(&["--metrics-addr", "0.0.0.0:9000", "--metrics-port", "9191"]),
            Some("0.0.0.0:9191".parse().unwrap())
        );
        assert_eq!(parse(&["--metrics-port", "0"]), None);
        let err = ServerArgs::try_parse_from(["deriva-server", "--trace-sample-ratio", "1.5"])
            .unwrap_err();
        assert!(err.to_string().contains("ratio"), "{err}");
    }

    #[test]
    fn bad_flags_are_rejected_with_the_reason() {
        let err = ServerArgs::try_parse_from(["deriva-server", "--verification", "sometimes"])
            .unwrap_err();
        assert!(err.to_string().contains("verification mode"), "{err}");
        let err = ServerArgs::try_parse_from(["deriva-server", "--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
