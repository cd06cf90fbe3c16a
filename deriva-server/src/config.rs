//! [`Config`], the server's settings, and [`ServerArgs`], the command line that fills it. Every
//! default is written once, in [`defaults`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use deriva_compute::VerificationMode;
use deriva_util::size::{parse_duration, parse_size};

use crate::telemetry::{LogFormat, TelemetryConfig};

/// The defaults of the `deriva-server` flags, each written once: clap applies them (and shows
/// them in `--help`), and [`Config::default`] is built from them, so the two cannot disagree.
///
/// Sizes are strings as an operator writes them (`256MiB`), parsed by the flags' own parser.
/// The executor's settings default to [`deriva_compute::ExecutorConfig::default`], and the
/// telemetry settings to the constants of [`crate::telemetry`] behind
/// [`TelemetryConfig::default`].
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use deriva_compute::{ExecutorConfig, VerificationMode};

    pub use crate::telemetry::{
        DEFAULT_SAMPLE_RATIO as TRACE_SAMPLE_RATIO,
        DEFAULT_TRACE_STORE_CAPACITY as TRACE_STORE_SIZE,
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
        super::parse_size(value)
            .unwrap_or_else(|e| panic!("the default of --{flag}, {value:?}, is not a size: {e}"))
    }
}

/// Everything the server needs to run. [`Config::default`] is what `deriva-server` runs with
/// when given no flags. Its `Debug` is [`Config::describe`]: secrets hidden.
#[derive(Clone)]
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
    /// Longest one run of a function may take before it is cancelled (`DEADLINE_EXCEEDED`);
    /// `None`: no bound.
    pub compute_timeout: Option<Duration>,
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
    /// The object store for leaves (`s3://BUCKET[/PREFIX]`); with [`Config::index`], the
    /// remote backend replaces the local one.
    pub blob_store: Option<String>,
    /// The PostgreSQL index (`postgres://…`); goes with [`Config::blob_store`].
    pub index: Option<String>,
    /// The PostgreSQL schema of Deriva's tables.
    pub index_schema: String,
    /// Connections in the PostgreSQL pool.
    pub index_pool_size: usize,
    /// Bound of the local read-through cache of remote leaves, in `<data-dir>/remote-cache`;
    /// 0 turns it off.
    pub local_cache_bytes: u64,
    /// Local store: leaves of at most this many bytes are rows of `<data-dir>/leaves.redb`,
    /// written with group commit; larger ones are files. 0: every leaf a file.
    pub inline_leaf_bytes: u64,
    /// Where computed outputs are kept besides the memory cache.
    pub output_tier: OutputTier,
    /// Bound of the bytes that materializations hold in memory at once.
    pub memory_budget: u64,
    /// Most requests waiting for room in the memory budget.
    pub memory_queue: usize,
    /// Longest a request waits for room in the memory budget.
    pub memory_wait: Duration,
    /// Outputs larger than this go to `<data-dir>/spill` instead of the memory cache.
    pub spill_bytes: u64,
    /// Byte budget of `<data-dir>/spill`; 0 spills nothing.
    pub spill_budget: u64,
    /// How often a node on the remote backend writes its heartbeat row.
    pub heartbeat: Duration,
    /// How often garbage collection runs by itself; `None`: only when asked (GarbageCollect).
    pub gc_interval: Option<Duration>,
    /// The grace period of the periodic garbage collection.
    pub gc_grace: Duration,
    /// The shortest grace period a `GarbageCollect` request may ask for; less is refused with
    /// `FAILED_PRECONDITION`. Zero allows any, as the contract reads (`GcRequest{}`: grace 0).
    pub gc_min_grace: Duration,
    /// The token file of `--auth-tokens`: with it, every RPC, `/metrics` and `/debug/*` need a
    /// bearer token with the right scope.
    pub auth_tokens: Option<PathBuf>,
    /// TLS on both listeners (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Most connections open at once on each listener, and the first-byte deadline.
    pub limits: crate::listen::Limits,
    /// Most concurrent streams (calls) on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// Longest an RPC may take to answer (its first response message); `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// Interval of HTTP/2 keepalive pings; a peer that does not answer one within
    /// [`KEEPALIVE_TIMEOUT`] is dropped.
    pub keepalive: Duration,
}

/// How long a peer has to answer a keepalive ping.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// `--output-tier`: where computed outputs are kept besides each node's memory cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputTier {
    /// Nowhere: an evicted output is recomputed.
    #[default]
    None,
    /// In the object store too (`outputs/<hex>`), so that another node, or this one after a
    /// restart, serves it without recomputing. Needs the remote backend.
    BlobStore,
}

/// What went wrong in the backend flags.
fn pair_error(given: &str, missing: &str) -> String {
    format!(
        "{given} needs {missing} too: the remote backend keeps leaves in the object store and the index in PostgreSQL"
    )
}

impl Config {
    /// The remote backend's settings, if the flags ask for it; an error naming the missing
    /// flag if only half of it is given.
    pub fn remote(&self) -> Result<Option<deriva_store_remote::RemoteConfig>, String> {
        let (blob_store, index) = match (&self.blob_store, &self.index) {
            (None, None) => {
                return if self.output_tier == OutputTier::BlobStore {
                    Err("--output-tier blob-store needs --blob-store and --index".into())
                } else {
                    Ok(None)
                };
            }
            (Some(_), None) => {
                return Err(pair_error("--blob-store", "--index (DERIVA_INDEX_URL)"));
            }
            (None, Some(_)) => return Err(pair_error("--index", "--blob-store")),
            (Some(b), Some(i)) => (b.clone(), i.clone()),
        };
        Ok(Some(deriva_store_remote::RemoteConfig {
            blob_store,
            aws: deriva_store_remote::aws_env(),
            index,
            schema: self.index_schema.clone(),
            pool_size: self.index_pool_size,
            local_cache: (self.local_cache_bytes > 0)
                .then(|| (self.data_dir.join("remote-cache"), self.local_cache_bytes)),
            spool_dir: Some(self.data_dir.join("incoming")),
            output_tier: self.output_tier == OutputTier::BlobStore,
            create_schema: true,
            node_id: String::new(),
        }))
    }
}

/// The one redaction of printed URLs, shared with `deriva-store-remote` (see [`deriva_util::redact`]).
pub use deriva_util::redact::redact_url;

impl Default for Config {
    /// The settings of [`defaults`]; never reads the environment.
    fn default() -> Self {
        let usize_size = |flag, value| {
            usize::try_from(defaults::size(flag, value))
                .unwrap_or_else(|_| panic!("the default of --{flag} does not fit a usize"))
        };
        Self {
            data_dir: PathBuf::from(defaults::DATA_DIR),
            listen: defaults::LISTEN,
            cache_bytes: defaults::size("cache-bytes", defaults::CACHE_BYTES),
            verification: defaults::verification(),
            max_concurrent_computes: defaults::max_concurrent_computes(),
            compute_timeout: Some(Duration::from_secs(defaults::COMPUTE_TIMEOUT_SECS)),
            max_message_bytes: usize_size("max-message-bytes", defaults::MAX_MESSAGE_BYTES),
            chunk_bytes: usize_size("chunk-bytes", defaults::CHUNK_BYTES),
            shutdown_grace: Duration::from_secs(defaults::SHUTDOWN_GRACE_SECS),
            metrics_addr: Some(defaults::METRICS_ADDR),
            telemetry: TelemetryConfig::default(),
            blob_store: None,
            index: None,
            index_schema: defaults::INDEX_SCHEMA.to_owned(),
            index_pool_size: defaults::INDEX_POOL_SIZE,
            local_cache_bytes: defaults::size("local-cache-bytes", defaults::LOCAL_CACHE_BYTES),
            inline_leaf_bytes: defaults::size("inline-leaf-bytes", defaults::INLINE_LEAF_BYTES),
            output_tier: OutputTier::default(),
            memory_budget: defaults::memory_budget(),
            memory_queue: defaults::MEMORY_QUEUE,
            memory_wait: Duration::from_secs(defaults::MEMORY_WAIT_SECS),
            spill_bytes: defaults::size("spill-bytes", defaults::SPILL_BYTES),
            spill_budget: defaults::size("spill-budget", defaults::SPILL_BUDGET),
            heartbeat: Duration::from_secs(defaults::HEARTBEAT_SECS),
            gc_interval: None,
            gc_grace: defaults::GC_GRACE_DURATION,
            gc_min_grace: defaults::GC_MIN_GRACE_DURATION,
            auth_tokens: None,
            tls: None,
            limits: crate::listen::Limits {
                max_connections: defaults::MAX_CONNECTIONS,
                handshake_timeout: Duration::from_secs(defaults::HANDSHAKE_TIMEOUT_SECS),
            },
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            request_timeout: Some(Duration::from_secs(defaults::REQUEST_TIMEOUT_SECS))
                .filter(|d| !d.is_zero()),
            keepalive: Duration::from_secs(defaults::KEEPALIVE_SECS),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What --print-config shows: the index URL's password and the OTLP header values stay
        // hidden wherever a Config is printed.
        f.debug_map().entries(self.describe()).finish()
    }
}

impl Config {
    /// The settings the flags control, as `deriva-server --print-config` prints them: one
    /// `(key, value)` per setting, in the order of `--help`, keyed by the flag that sets it
    /// (`--metrics-port` shows in `metrics-addr`). Sizes are in bytes and durations in seconds;
    /// a listener or an export that is off shows `off`, and no cap shows `none`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let t = &self.telemetry;
        vec![
            ("data-dir", self.data_dir.display().to_string()),
            ("listen", self.listen.to_string()),
            ("cache-bytes", self.cache_bytes.to_string()),
            ("verification", self.verification.to_string()),
            (
                "max-concurrent-computes",
                self.max_concurrent_computes.to_string(),
            ),
            (
                "compute-timeout-secs",
                self.compute_timeout
                    .map_or_else(|| "none".into(), |d| d.as_secs().to_string()),
            ),
            ("max-message-bytes", self.max_message_bytes.to_string()),
            ("chunk-bytes", self.chunk_bytes.to_string()),
            (
                "shutdown-grace-secs",
                self.shutdown_grace.as_secs().to_string(),
            ),
            (
                "metrics-addr",
                self.metrics_addr.map_or("off".into(), |a| a.to_string()),
            ),
            (
                "otlp-endpoint",
                t.otlp_endpoint
                    .clone()
                    .or_else(|| t.otel_env.get("OTEL_EXPORTER_OTLP_ENDPOINT").cloned())
                    .filter(|e| !e.is_empty())
                    .map_or_else(|| "off".into(), |e| redact_url(&e)),
            ),
            (
                "otlp-protocol",
                t.otlp_protocol
                    .map(|p| p.name().to_owned())
                    .or_else(|| t.otel_env.get("OTEL_EXPORTER_OTLP_PROTOCOL").cloned())
                    .unwrap_or_else(|| "grpc".into()),
            ),
            (
                "otlp-header",
                if t.otlp_headers.is_empty() {
                    "none".into()
                } else {
                    // Names only: the values are secrets.
                    t.otlp_headers
                        .iter()
                        .map(|(k, _)| format!("{k}=<set>"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
            (
                "otlp-logs",
                t.otlp_logs
                    .map_or("with an endpoint".into(), |on| on.to_string()),
            ),
            ("trace-sample-ratio", {
                let sampler = t.export_plan().map(|p| p.sampler).unwrap_or_default();
                if sampler.follow_caller {
                    sampler.ratio.to_string()
                } else {
                    format!("{} (callers ignored)", sampler.ratio)
                }
            }),
            (
                "trace-max-per-second",
                t.max_traces_per_second
                    .map_or("none".into(), |n| n.to_string()),
            ),
            ("trace-store-size", t.trace_store_capacity.to_string()),
            (
                "log-format",
                clap::ValueEnum::to_possible_value(&t.log_format)
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default(),
            ),
            (
                "blob-store",
                self.blob_store.as_deref().map_or("off".into(), redact_url),
            ),
            (
                "index",
                self.index.as_deref().map_or("off".into(), redact_url),
            ),
            ("index-schema", self.index_schema.clone()),
            ("index-pool-size", self.index_pool_size.to_string()),
            ("local-cache-bytes", self.local_cache_bytes.to_string()),
            ("inline-leaf-bytes", self.inline_leaf_bytes.to_string()),
            (
                "output-tier",
                clap::ValueEnum::to_possible_value(&self.output_tier)
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default(),
            ),
            ("memory-budget", self.memory_budget.to_string()),
            ("memory-queue", self.memory_queue.to_string()),
            ("memory-wait-secs", self.memory_wait.as_secs().to_string()),
            ("spill-bytes", self.spill_bytes.to_string()),
            ("spill-budget", self.spill_budget.to_string()),
            ("heartbeat-secs", self.heartbeat.as_secs().to_string()),
            (
                "gc-interval",
                self.gc_interval
                    .map_or_else(|| "off".to_owned(), |d| format!("{}s", d.as_secs())),
            ),
            ("gc-grace", format!("{}s", self.gc_grace.as_secs())),
            ("gc-min-grace", format!("{}s", self.gc_min_grace.as_secs())),
            ("max-connections", self.limits.max_connections.to_string()),
            (
                "max-streams-per-connection",
                self.max_streams_per_connection.to_string(),
            ),
            (
                "request-timeout-secs",
                self.request_timeout.map_or(0, |d| d.as_secs()).to_string(),
            ),
            ("keepalive-secs", self.keepalive.as_secs().to_string()),
            (
                "handshake-timeout-secs",
                self.limits.handshake_timeout.as_secs().to_string(),
            ),
            ("tls-cert", shown_path(self.tls.as_ref().map(|t| &t.cert))),
            ("tls-key", shown_path(self.tls.as_ref().map(|t| &t.key))),
            (
                "tls-client-ca",
                shown_path(self.tls.as_ref().and_then(|t| t.client_ca.as_ref())),
            ),
            (
                "auth-tokens",
                self.auth_tokens
                    .as_ref()
                    .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            ),
        ]
    }
}

/// A path for `--print-config`, or `off`.
fn shown_path(path: Option<&PathBuf>) -> String {
    path.map_or_else(|| "off".to_owned(), |p| p.display().to_string())
}

/// `deriva-server`'s flags. Each setting has a `DERIVA_*` environment equivalent; a flag wins
/// over its variable.
#[derive(Debug, clap::Parser)]
#[command(
    name = "deriva-server",
    version,
    about = "Deriva: a computation-addressed store, served over gRPC",
    after_help = "Other commands:\n  deriva-server migrate --help   copy a store to another backend (local, or S3 + PostgreSQL)"
)]
pub struct ServerArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "DERIVA_DATA_DIR", default_value = defaults::DATA_DIR)]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "DERIVA_LISTEN", default_value_t = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Cache budget, in bytes or with a unit (KiB, MiB, GiB).
    #[arg(long, env = "DERIVA_CACHE_BYTES", default_value = defaults::CACHE_BYTES, value_parser = parse_size)]
    pub cache_bytes: u64,
    /// Verification mode: off, dual, or sampled:RATE (RATE from 0 to 1).
    #[arg(long, env = "DERIVA_VERIFICATION", default_value_t = defaults::verification(), value_parser = parse_verification)]
    pub verification: VerificationMode,
    /// Most computes at once [default: the number of CPUs].
    #[arg(long, env = "DERIVA_MAX_CONCURRENT_COMPUTES", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_computes: Option<u32>,
    /// Seconds one compute may run before it is cancelled and answers DEADLINE_EXCEEDED; 0: no
    /// limit.
    #[arg(long, env = "DERIVA_COMPUTE_TIMEOUT_SECS", default_value_t = defaults::COMPUTE_TIMEOUT_SECS)]
    pub compute_timeout_secs: u64,
    /// Largest gRPC message accepted, in bytes or with a unit.
    #[arg(long, env = "DERIVA_MAX_MESSAGE_BYTES", default_value = defaults::MAX_MESSAGE_BYTES, value_parser = parse_size)]
    pub max_message_bytes: u64,
    /// Size of each Get response chunk, in bytes or with a unit.
    #[arg(long, env = "DERIVA_CHUNK_BYTES", default_value = defaults::CHUNK_BYTES, value_parser = parse_size)]
    pub chunk_bytes: u64,
    /// Seconds that in-flight calls may take to finish after SIGINT or SIGTERM.
    #[arg(long, env = "DERIVA_SHUTDOWN_GRACE_SECS", default_value_t = defaults::SHUTDOWN_GRACE_SECS)]
    pub shutdown_grace_secs: u64,
    /// HTTP address for /metrics, /health, /healthz and /readyz (loopback unless you open it).
    #[arg(long, env = "DERIVA_METRICS_ADDR", default_value_t = defaults::METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Shortcut for the port of --metrics-addr, keeping its host; 0 turns the HTTP listener off.
    #[arg(long, env = "DERIVA_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// OTLP endpoint for spans, metrics and log records, e.g. http://127.0.0.1:4317; wins over
    /// OTEL_EXPORTER_OTLP_ENDPOINT and the per-signal ones. With no endpoint nothing is exported.
    #[arg(long, env = "DERIVA_OTLP_ENDPOINT", hide_env_values = true)]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport [default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc].
    #[arg(long, env = "DERIVA_OTLP_PROTOCOL", value_enum)]
    pub otlp_protocol: Option<crate::telemetry::Protocol>,
    /// A header (gRPC metadata) sent with every OTLP export, KEY=VALUE; repeat for more. Wins over
    /// OTEL_EXPORTER_OTLP_HEADERS for the same KEY. Values are never logged.
    // Read as text and checked in `into_config`: clap's own errors would repeat the value.
    #[arg(
        long = "otlp-header",
        env = "DERIVA_OTLP_HEADERS",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = |s: &str| Ok::<_, String>(HeaderArg(s.to_owned()))
    )]
    pub otlp_headers: Vec<HeaderArg>,
    /// Export log events as OTLP log records (with their trace and span ids) wherever an OTLP
    /// endpoint is set [default: true, unless OTEL_LOGS_EXPORTER=none].
    #[arg(long, env = "DERIVA_OTLP_LOGS")]
    pub otlp_logs: Option<bool>,
    /// Fraction of new traces sampled (0 to 1); a sampled caller is always honored [default:
    /// OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, else 1].
    #[arg(long, env = "DERIVA_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,
    /// Most new traces sampled per second, forced ones (x-deriva-trace: force) included, so
    /// load cannot flood the collector [default: no cap].
    #[arg(long, env = "DERIVA_TRACE_MAX_PER_SECOND")]
    pub trace_max_per_second: Option<f64>,
    /// How many recent requests the in-process trace store keeps for `deriva get --explain` and
    /// /debug/traces (plus the slowest and the failed ones).
    #[arg(long, env = "DERIVA_TRACE_STORE_SIZE", default_value_t = defaults::TRACE_STORE_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub trace_store_size: usize,
    /// Log format: text (with the time since start) or json.
    #[arg(long, env = "DERIVA_LOG_FORMAT", value_enum, default_value_t = LogFormat::default())]
    pub log_format: LogFormat,
    /// Object store for leaves: s3://BUCKET[/PREFIX], with endpoint, region and credentials
    /// from the standard AWS_* variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY; AWS_CA_BUNDLE for an https endpoint signed by a private CA).
    /// Needs --index; together they replace the local store.
    #[arg(long, env = "DERIVA_BLOB_STORE", hide_env_values = true)]
    pub blob_store: Option<String>,
    /// PostgreSQL index: postgres://USER:PASSWORD@HOST:PORT/DATABASE, over TLS with
    /// ?sslmode=verify-full&sslrootcert=CA.pem (libpq's parameters). Needs --blob-store.
    #[arg(long, env = "DERIVA_INDEX_URL", hide_env_values = true)]
    pub index: Option<String>,
    /// PostgreSQL schema for Deriva's tables (created and migrated at start).
    #[arg(long, env = "DERIVA_INDEX_SCHEMA", default_value = defaults::INDEX_SCHEMA)]
    pub index_schema: String,
    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "DERIVA_INDEX_POOL_SIZE", default_value_t = defaults::INDEX_POOL_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub index_pool_size: usize,
    /// Local read-through cache of remote leaves, in <data-dir>/remote-cache, bounded to this
    /// many bytes (or with a unit); 0 turns it off.
    #[arg(long, env = "DERIVA_LOCAL_CACHE_BYTES", default_value = defaults::LOCAL_CACHE_BYTES, value_parser = parse_size)]
    pub local_cache_bytes: u64,
    /// Local store: leaves of at most this many bytes (or with a unit, at most 16MiB) are kept
    /// in <data-dir>/leaves.redb and written with group commit, so concurrent puts share their
    /// fsyncs; larger ones are files under <data-dir>/blobs. 0: every leaf a file.
    #[arg(long, env = "DERIVA_INLINE_LEAF_BYTES", default_value = defaults::INLINE_LEAF_BYTES, value_parser = parse_inline_size)]
    pub inline_leaf_bytes: u64,
    /// Where computed outputs are kept besides the memory cache: none, or blob-store (the
    /// object store, so any node serves them without recomputing).
    #[arg(long, env = "DERIVA_OUTPUT_TIER", value_enum, default_value_t = OutputTier::default())]
    pub output_tier: OutputTier,
    /// Bound of the bytes that materializations hold in memory at once (inputs, outputs), in
    /// bytes or with a unit; a request that would exceed it waits, or is RESOURCE_EXHAUSTED
    /// [default: a quarter of the machine's memory, at least 256MiB].
    #[arg(long, env = "DERIVA_MEMORY_BUDGET", value_parser = parse_size)]
    pub memory_budget: Option<u64>,
    /// Most requests waiting for room in the memory budget; one more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "DERIVA_MEMORY_QUEUE", default_value_t = defaults::MEMORY_QUEUE)]
    pub memory_queue: usize,
    /// Seconds a request may wait for room in the memory budget before it is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "DERIVA_MEMORY_WAIT_SECS", default_value_t = defaults::MEMORY_WAIT_SECS)]
    pub memory_wait_secs: u64,
    /// Computed outputs larger than this (bytes or with a unit) are kept in <data-dir>/spill
    /// instead of the memory cache, and Get streams them from there.
    #[arg(long, env = "DERIVA_SPILL_BYTES", default_value = defaults::SPILL_BYTES, value_parser = parse_size)]
    pub spill_bytes: u64,
    /// Byte budget of <data-dir>/spill (least recently used outputs are evicted); 0 spills
    /// nothing.
    #[arg(long, env = "DERIVA_SPILL_BUDGET", default_value = defaults::SPILL_BUDGET, value_parser = parse_size)]
    pub spill_budget: u64,
    /// Seconds between the heartbeats a node on the remote backend writes to the index
    /// (ClusterStatus: suspect after one missed, dead after three).
    #[arg(long, env = "DERIVA_HEARTBEAT_SECS", default_value_t = defaults::HEARTBEAT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,
    /// Run garbage collection by itself this often (300, 90s, 15m, 24h, 7d), with
    /// --gc-grace; 0 (the default) runs it only when a client asks (GarbageCollect, deriva gc).
    #[arg(long, env = "DERIVA_GC_INTERVAL", default_value = "0", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// The grace period of the periodic garbage collection: what was put more recently stays,
    /// reachable from a pin or not.
    #[arg(long, env = "DERIVA_GC_GRACE", default_value = defaults::GC_GRACE, value_parser = parse_duration)]
    pub gc_grace: Duration,
    /// The shortest grace period a GarbageCollect request (deriva gc --grace) may ask for; a
    /// request for less, dry run or not, is refused (FAILED_PRECONDITION). 0s allows any:
    /// GcRequest{} then removes everything unpinned at once, as the contract reads.
    #[arg(long, env = "DERIVA_GC_MIN_GRACE", default_value = defaults::GC_MIN_GRACE, value_parser = parse_duration)]
    pub gc_min_grace: Duration,
    /// Require a bearer token on every RPC, /metrics and /debug/*: a file of lines
    /// `sha256:<hex of the token's SHA-256> SCOPES NAME` (SCOPES: read, write, admin,
    /// comma-separated); `deriva token new` makes a token and its line.
    #[arg(long, env = "DERIVA_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve both listeners over TLS with this certificate chain (PEM); needs --tls-key. The
    /// certificate and key are read again on SIGHUP.
    #[arg(long, env = "DERIVA_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DERIVA_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM) on the gRPC listener (mutual
    /// TLS); needs --tls-cert.
    #[arg(long, env = "DERIVA_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Most connections open at once on each listener; at the limit new ones wait (and the log
    /// says so once) until one closes.
    #[arg(long, env = "DERIVA_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Most calls in flight on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "DERIVA_MAX_STREAMS_PER_CONNECTION", default_value_t = defaults::MAX_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Longest an RPC may take to give its answer (a Get: its first chunk; an upload: all of
    /// it); later it is CANCELLED. 0 (the default): no limit beyond the client's deadline.
    #[arg(long, env = "DERIVA_REQUEST_TIMEOUT_SECS", default_value_t = defaults::REQUEST_TIMEOUT_SECS)]
    pub request_timeout_secs: u64,
    /// Seconds between HTTP/2 keepalive pings on idle connections; a peer that does not answer
    /// within 20 s is dropped.
    #[arg(long, env = "DERIVA_KEEPALIVE_SECS", default_value_t = defaults::KEEPALIVE_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub keepalive_secs: u64,
    /// A new connection that has not finished its TLS handshake (if any) and sent its first
    /// request (the HTTP/2 preface and SETTINGS; HTTP/1 request headers) within this many
    /// seconds is closed; on the HTTP listener it also bounds each later request's headers and
    /// the idle time between requests.
    #[arg(long, env = "DERIVA_HANDSHAKE_TIMEOUT_SECS", default_value_t = defaults::HANDSHAKE_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout_secs: u64,
    /// Print the effective configuration (flags, then DERIVA_* variables, then defaults), one
    /// `key = value` per line, and exit without opening the store or binding anything.
    #[arg(long)]
    pub print_config: bool,
}

impl ServerArgs {
    /// The [`Config`] these flags describe, with the process's `OTEL_*` variables for what
    /// the flags leave open (see [`crate::telemetry::otlp`]).
    pub fn into_config(self) -> Result<Config, String> {
        let otel_env = std::env::vars()
            .filter(|(name, _)| name.starts_with("OTEL_"))
            .collect();
        self.into_config_with(otel_env)
    }

    /// [`ServerArgs::into_config`], with the `OTEL_*` variables given.
    fn into_config_with(
        self,
        otel_env: std::collections::BTreeMap<String, String>,
    ) -> Result<Config, String> {
        let given = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let tls = match (
            given(self.tls_cert),
            given(self.tls_key),
            given(self.tls_client_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (Some(_), None, _) => return Err("--tls-cert needs --tls-key (its private key)".into()),
            (None, Some(_), _) => return Err("--tls-key needs --tls-cert (its certificate)".into()),
            (None, None, Some(_)) => {
                return Err(
                    "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS"
                        .into(),
                );
            }
        };
        let chunk_bytes = usize::try_from(self.chunk_bytes)
            .ok()
            .filter(|c| *c > 0)
            .ok_or("--chunk-bytes must be at least 1")?;
        let config = Config {
            data_dir: self.data_dir,
            listen: self.listen,
            cache_bytes: self.cache_bytes,
            verification: self.verification,
            max_concurrent_computes: self
                .max_concurrent_computes
                .map_or_else(defaults::max_concurrent_computes, |n| n as usize),
            compute_timeout: Some(Duration::from_secs(self.compute_timeout_secs))
                .filter(|d| !d.is_zero()),
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
                otlp_endpoint: self.otlp_endpoint.filter(|e| !e.is_empty()),
                otlp_protocol: self.otlp_protocol,
                otlp_headers: self
                    .otlp_headers
                    .iter()
                    .enumerate()
                    .map(|(i, h)| parse_header(&h.0, i))
                    .collect::<Result<_, _>>()?,
                otlp_logs: self.otlp_logs,
                otel_env,
                sample_ratio: self.trace_sample_ratio,
                max_traces_per_second: self.trace_max_per_second,
                log_format: self.log_format,
                trace_store_capacity: self.trace_store_size,
                ..TelemetryConfig::default()
            },
            blob_store: self.blob_store.filter(|s| !s.is_empty()),
            index: self.index.filter(|s| !s.is_empty()),
            index_schema: self.index_schema,
            index_pool_size: self.index_pool_size,
            local_cache_bytes: self.local_cache_bytes,
            inline_leaf_bytes: self.inline_leaf_bytes,
            output_tier: self.output_tier,
            memory_budget: self.memory_budget.unwrap_or_else(defaults::memory_budget),
            memory_queue: self.memory_queue,
            memory_wait: Duration::from_secs(self.memory_wait_secs),
            spill_bytes: self.spill_bytes,
            spill_budget: self.spill_budget,
            heartbeat: Duration::from_secs(self.heartbeat_secs),
            gc_interval: Some(self.gc_interval).filter(|d| !d.is_zero()),
            gc_grace: self.gc_grace,
            gc_min_grace: self.gc_min_grace,
            auth_tokens: self.auth_tokens.filter(|p| !p.as_os_str().is_empty()),
            tls,
            limits: crate::listen::Limits {
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
                handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            },
            max_streams_per_connection: self.max_streams_per_connection,
            request_timeout: Some(Duration::from_secs(self.request_timeout_secs))
                .filter(|d| !d.is_zero()),
            keepalive: Duration::from_secs(self.keepalive_secs),
        };
        // The periodic collection keeps to the floor a client is held to.
        if config.gc_interval.is_some() && config.gc_grace < config.gc_min_grace {
            return Err(format!(
                "--gc-grace {}s is below --gc-min-grace {}s: the periodic collection (--gc-interval) \
                 would remove what no client may; raise --gc-grace or lower --gc-min-grace",
                config.gc_grace.as_secs(),
                config.gc_min_grace.as_secs()
            ));
        }
        // What the environment says about OTLP is checked now, so that --print-config refuses
        // what the server would.
        config.telemetry.export_plan()?;
        Ok(config)
    }
}

/// One `--otlp-header` as given, `KEY=VALUE` or not (checked by [`parse_header`], whose error,
/// unlike clap's, never repeats it). Its `Debug` hides it: the value may be a secret.
#[derive(Clone)]
pub struct HeaderArg(String);

impl fmt::Debug for HeaderArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.0.split_once('=').map_or("?", |(k, _)| k);
        write!(f, "{name}=<set>")
    }
}

/// The `i`th `--otlp-header`, `KEY=VALUE`; an error never repeats it (it may be a secret).
fn parse_header(s: &str, i: usize) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_ascii_lowercase(), value.trim().to_owned()))
        }
        _ => Err(format!(
            "--otlp-header number {}: expected KEY=VALUE (the value is not shown)",
            i + 1
        )),
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

/// `--inline-leaf-bytes`: a size of at most 16 MiB (a row is read whole into memory).
fn parse_inline_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n > 16 << 20 {
        return Err(format!(
            "{s:?} is more than 16MiB; larger leaves belong in files"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    /// `args` parsed as the command line, ignoring every `DERIVA_*` variable of the process.
    fn parse_without_env(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        let command = ServerArgs::command().mut_args(|a| a.env(None::<&'static str>));
        let mut all = vec!["deriva-server"];
        all.extend_from_slice(args);
        ServerArgs::from_arg_matches(&command.try_get_matches_from(all)?)
    }

    #[test]
    fn no_flags_and_no_environment_give_config_default() {
        let config = parse_without_env(&[])
            .unwrap()
            .into_config_with(Default::default())
            .unwrap();
        let defaults = Config::default();
        assert_eq!(config.describe(), defaults.describe());
        assert_eq!(defaults.data_dir, PathBuf::from("./deriva-data"));
        assert_eq!(defaults.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(defaults.cache_bytes, 256 << 20);
        assert_eq!(defaults.verification, VerificationMode::Off);
        assert_eq!(defaults.max_message_bytes, 64 << 20);
        assert_eq!(defaults.chunk_bytes, 64 << 10);
        assert_eq!(defaults.shutdown_grace, Duration::from_secs(10));
        assert_eq!(
            defaults.metrics_addr,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(defaults.telemetry.otlp_endpoint, None);
        assert_eq!(defaults.telemetry.sample_ratio, None);
        assert_eq!(defaults.telemetry.log_format, LogFormat::Text);
        assert_eq!(defaults.telemetry.trace_store_capacity, 256);
    }

    #[test]
    fn metrics_port_keeps_the_host_and_zero_disables() {
        let parse = |args: &[&str]| {
            parse_without_env(args)
                .unwrap()
                .into_config_with(Default::default())
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
        let err = parse_without_env(&["--trace-sample-ratio", "1.5"]).unwrap_err();
        assert!(err.to_string().contains("ratio"), "{err}");
    }

    #[test]
    fn the_remote_backend_needs_both_flags() {
        let remote = |args: &[&str]| {
            parse_without_env(args)
                .unwrap()
                .into_config_with(Default::default())
                .unwrap()
                .remote()
        };
        assert!(remote(&[]).unwrap().is_none());
        let err = remote(&["--blob-store", "s3://b"]).unwrap_err();
        assert!(err.contains("--index"), "{err}");
        let err = remote(&["--index", "postgres://h/db"]).unwrap_err();
        assert!(err.contains("--blob-store"), "{err}");
        let err = remote(&["--output-tier", "blob-store"]).unwrap_err();
        assert!(err.contains("--blob-store"), "{err}");
        let config = remote(&["--blob-store", "s3://b/p", "--index", "postgres://h/db"])
            .unwrap()
            .unwrap();
        assert_eq!(config.blob_store, "s3://b/p");
        assert_eq!(config.schema, "deriva");
        assert_eq!(
            config.local_cache,
            Some((PathBuf::from("./deriva-data/remote-cache"), 1 << 30))
        );
    }

    #[test]
    fn the_configs_debug_hides_the_index_password() {
        let config = parse_without_env(&[
            "--blob-store",
            "s3://b",
            "--index",
            "postgres://deriva:S3c/ret@db/deriva",
        ])
        .unwrap()
        .into_config_with(Default::default())
        .unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("postgres://deriva:***@db/deriva"), "{shown}");
        assert!(!shown.contains("S3c/ret"), "{shown}");
    }

    #[test]
    fn printed_urls_hide_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
        assert_eq!(redact_url("host=h user=u"), "host=h user=u");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("host=h password='a b' user=u sslpassword=k"),
            "host=h password=*** user=u sslpassword=***"
        );
        assert_eq!(redact_url("password = top"), "password=***");
        assert_eq!(
            redact_url("postgres://h/mypassword_db"),
            "postgres://h/mypassword_db"
        );
        // tokio-postgres reads the password up to the first '@', '/' and '?' included.
        assert_eq!(
            redact_url("postgres://deriva:S3c/retPW@db:5432/deriva"),
            "postgres://deriva:***@db:5432/deriva"
        );
    }

    #[test]
    fn print_config_hides_the_secrets_of_every_url() {
        let config = parse_without_env(&[
            "--index",
            "postgres://u:pg/s3cret?@db/idx",
            "--blob-store",
            "s3://k:s3/cret@bucket/p",
            "--otlp-endpoint",
            "http://u:otlp%2Fs3cret@collector:4317",
        ])
        .unwrap()
        .into_config_with(Default::default())
        .unwrap();
        let shown: std::collections::BTreeMap<_, _> = config.describe().into_iter().collect();
        assert_eq!(shown["index"], "postgres://u:***@db/idx");
        assert_eq!(shown["blob-store"], "s3://k:***@bucket/p");
        assert_eq!(shown["otlp-endpoint"], "http://u:***@collector:4317");
    }

    /// Every flag whose value can hold a secret (a URL with credentials, a header) keeps its
    /// variable's value out of `--help`.
    #[test]
    fn help_never_shows_the_value_of_a_secret_variable() {
        let command = ServerArgs::command();
        for id in ["index", "blob_store", "otlp_endpoint", "otlp_headers"] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no argument {id}"));
            assert!(arg.is_hide_env_values_set(), "--{id} shows its env value");
        }
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
