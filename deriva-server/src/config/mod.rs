//! [`Config`], the server's settings, and [`ServerArgs`], the command line that fills it. Every
//! default is written once, in [`defaults`].
//!
//! Files: `mod.rs` ([`Config`], what it prints), `args.rs` (the flags and how they become a
//! `Config`), `defaults.rs`, `tests.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use deriva_compute::VerificationMode;

use crate::telemetry::TelemetryConfig;

mod args;
pub mod defaults;
pub mod provenance;
#[cfg(test)]
mod tests;

pub use args::{HeaderArg, ServerArgs};
pub use provenance::{MismatchAction, ProvenanceArgs, ProvenanceConfig};

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
    /// How long a compute lease lasts unless renewed (with the output tier).
    pub compute_lease_ttl: Duration,
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
    /// How old a node's last heartbeat may be before the live nodes delete its row.
    pub node_forget_after: Duration,
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
    /// Audits, signatures, trace links (see [`provenance`]).
    pub provenance: ProvenanceConfig,
    /// This node's name in its materialization records and `ClusterStatus`: its
    /// `service.instance.id`, set when the server connects ([`DEFAULT_NODE_NAME`] until then).
    pub node_name: String,
}

/// The node name of a server that was not told its `service.instance.id`.
pub const DEFAULT_NODE_NAME: &str = "deriva-server";

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
            compute_lease_ttl: self.compute_lease_ttl,
        }))
    }
}

use deriva_util::redact::redact_url;

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
            compute_lease_ttl: defaults::COMPUTE_LEASE_TTL_DURATION,
            memory_budget: defaults::memory_budget(),
            memory_queue: defaults::MEMORY_QUEUE,
            memory_wait: Duration::from_secs(defaults::MEMORY_WAIT_SECS),
            spill_bytes: defaults::size("spill-bytes", defaults::SPILL_BYTES),
            spill_budget: defaults::size("spill-budget", defaults::SPILL_BUDGET),
            heartbeat: Duration::from_secs(defaults::HEARTBEAT_SECS),
            node_forget_after: defaults::NODE_FORGET_AFTER_DURATION,
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
            provenance: ProvenanceConfig::new(),
            node_name: String::from(DEFAULT_NODE_NAME),
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
            ("trace-local-store", t.trace_local_store.to_string()),
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
            (
                "compute-lease-ttl",
                format!("{}s", self.compute_lease_ttl.as_secs()),
            ),
            ("memory-budget", self.memory_budget.to_string()),
            ("memory-queue", self.memory_queue.to_string()),
            ("memory-wait-secs", self.memory_wait.as_secs().to_string()),
            ("spill-bytes", self.spill_bytes.to_string()),
            ("spill-budget", self.spill_budget.to_string()),
            ("heartbeat-secs", self.heartbeat.as_secs().to_string()),
            (
                "node-forget-after",
                format!("{}s", self.node_forget_after.as_secs()),
            ),
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
            (
                "audit-sample-ratio",
                self.provenance.audit_sample_ratio.to_string(),
            ),
            (
                "audit-max-concurrent",
                self.provenance.audit_max_concurrent.to_string(),
            ),
            (
                "on-mismatch",
                match self.provenance.on_mismatch {
                    deriva_compute::OnMismatch::Keep => "keep".into(),
                    deriva_compute::OnMismatch::Evict => "evict".into(),
                },
            ),
            (
                "signing-key",
                shown_path(self.provenance.signing_key.as_ref()),
            ),
            (
                "trace-url-template",
                self.provenance
                    .trace_url_template
                    .clone()
                    .unwrap_or_else(|| "none".into()),
            ),
        ]
    }
}

/// A path for `--print-config`, or `off`.
fn shown_path(path: Option<&PathBuf>) -> String {
    path.map_or_else(|| "off".to_owned(), |p| p.display().to_string())
}
