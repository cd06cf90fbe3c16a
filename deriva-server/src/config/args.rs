//! [`ServerArgs`], the `deriva-server` flags, and how they become a [`Config`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use deriva_compute::VerificationMode;
use deriva_util::size::{parse_duration, parse_size};

use super::{Config, OutputTier, defaults};
use crate::telemetry::{LogFormat, TelemetryConfig};

/// `deriva-server`'s flags. Each setting has a `DERIVA_*` environment equivalent; a flag wins
/// over its variable.
#[derive(Debug, clap::Parser)]
#[command(
    name = "deriva-server",
    version,
    about = "Deriva: a computation-addressed store, served over gRPC",
    after_help = "Other commands:\n  deriva-server migrate --help   copy a store to another backend (local, or S3 + PostgreSQL)\n  deriva-server keygen OUT       make an ed25519 key for --signing-key (OUT) and its public half (OUT.pub)"
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
    /// Trace each call to the local store (a redb transaction, a leaf file) as a client span of
    /// its request. Off by default: such a span costs about as much CPU as the call it
    /// describes; the calls are always measured (deriva_backend_request_duration_seconds).
    /// The remote backend's calls are always traced.
    #[arg(long, env = "DERIVA_TRACE_LOCAL_STORE", value_name = "BOOL", num_args = 0..=1,
          default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub trace_local_store: bool,
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
    /// With --output-tier blob-store, a node that computes a recipe holds a lease on it in the
    /// index, so the other nodes wait for its output instead of computing it too; the lease is
    /// renewed while it computes and lasts this long (1s to 1h) unless renewed: the longest
    /// the others wait for a node that died computing before one of them takes over.
    #[arg(long, env = "DERIVA_COMPUTE_LEASE_TTL", default_value = defaults::COMPUTE_LEASE_TTL, value_parser = parse_lease_ttl)]
    pub compute_lease_ttl: Duration,
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
    /// Delete the row of a node (ClusterStatus lists it no more) once its last heartbeat is
    /// this old (90s, 15m, 24h, 7d); the live nodes do it as they beat. Must be longer than
    /// three heartbeats, so that a node shows as dead before it goes.
    #[arg(long, env = "DERIVA_NODE_FORGET_AFTER", default_value = defaults::NODE_FORGET_AFTER, value_parser = parse_duration)]
    pub node_forget_after: Duration,
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
    #[command(flatten)]
    pub provenance: super::provenance::ProvenanceArgs,
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
    pub(super) fn into_config_with(
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
                trace_local_store: self.trace_local_store,
                ..TelemetryConfig::default()
            },
            blob_store: self.blob_store.filter(|s| !s.is_empty()),
            index: self.index.filter(|s| !s.is_empty()),
            index_schema: self.index_schema,
            index_pool_size: self.index_pool_size,
            local_cache_bytes: self.local_cache_bytes,
            inline_leaf_bytes: self.inline_leaf_bytes,
            output_tier: self.output_tier,
            compute_lease_ttl: self.compute_lease_ttl,
            memory_budget: self.memory_budget.unwrap_or_else(defaults::memory_budget),
            memory_queue: self.memory_queue,
            memory_wait: Duration::from_secs(self.memory_wait_secs),
            spill_bytes: self.spill_bytes,
            spill_budget: self.spill_budget,
            heartbeat: Duration::from_secs(self.heartbeat_secs),
            node_forget_after: self.node_forget_after,
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
            provenance: self.provenance.into_config(),
            node_name: String::from(super::DEFAULT_NODE_NAME),
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
        // A node is dead after three missed heartbeats; its row must outlive that.
        let dead_after = config.heartbeat * deriva_store_remote::DEAD_AFTER;
        if config.node_forget_after <= dead_after {
            return Err(format!(
                "--node-forget-after {}s is not longer than {} heartbeats ({}s with \
                 --heartbeat-secs {}): a silent node would be forgotten before it shows as dead",
                config.node_forget_after.as_secs(),
                deriva_store_remote::DEAD_AFTER,
                dead_after.as_secs(),
                config.heartbeat.as_secs()
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

/// `--compute-lease-ttl`: a duration from 1s to 1h. Shorter, a busy database's renewal could
/// come late and a live holder lose its lease; longer, the others wait that long for a node
/// that died computing.
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    let range = defaults::COMPUTE_LEASE_TTL_RANGE;
    if !range.contains(&ttl) {
        return Err(format!(
            "{s:?} is {}s; a compute lease lasts from {}s (shorter, a live holder could lose it \
             between renewals) to {}s (longer, the other nodes would wait that long for one \
             that died)",
            ttl.as_secs(),
            range.start().as_secs(),
            range.end().as_secs()
        ));
    }
    Ok(ttl)
}
