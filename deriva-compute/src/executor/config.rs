//! The executor's settings: [`ExecutorConfig`], its [`VerificationMode`] and [`Spill`]
//! directory, and their defaults.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deriva_core::{DerivaError, Result};

use crate::budget::BudgetConfig;
use crate::spill::SpillStore;

/// When to compute a recipe twice and compare the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum VerificationMode {
    /// Never (the default).
    #[default]
    Off,
    /// Every compute.
    Dual,
    /// Each compute with this probability (0 to 1).
    Sampled(f64),
}

impl FromStr for VerificationMode {
    type Err = DerivaError;

    /// Parses `off`, `dual` or `sampled:RATE` with RATE in 0..=1.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "dual" => Ok(Self::Dual),
            _ => {
                let rate = s
                    .strip_prefix("sampled:")
                    .and_then(|r| r.parse::<f64>().ok());
                match rate {
                    Some(r) if (0.0..=1.0).contains(&r) => Ok(Self::Sampled(r)),
                    _ => Err(DerivaError::InvalidInput(format!(
                        "verification mode {s:?} is not off, dual or sampled:RATE with RATE from 0 to 1"
                    ))),
                }
            }
        }
    }
}

impl fmt::Display for VerificationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Dual => f.write_str("dual"),
            Self::Sampled(r) => write!(f, "sampled:{r}"),
        }
    }
}

impl VerificationMode {
    pub(super) fn should_verify(self) -> bool {
        match self {
            Self::Off => false,
            Self::Dual => true,
            Self::Sampled(rate) => fastrand::f64() < rate,
        }
    }
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Most computes running at once on the blocking pool. Default: the number of CPUs.
    pub max_concurrent_computes: usize,
    /// When to verify determinism. Default: off.
    pub verification: VerificationMode,
    /// A compute slower than this logs a WARN. Default: 1 s.
    pub slow_compute_threshold: Duration,
    /// The memory budget of materializations (see [`crate::budget`]). Default:
    /// [`BudgetConfig::default`].
    pub memory: BudgetConfig,
    /// Where outputs too large for the memory cache go. Default: nowhere (every output may be
    /// cached in memory).
    pub spill: Option<Spill>,
    /// A leaf that a Get reads a second time is cached if it holds at most this many bytes
    /// (and at most a sixteenth of the cache budget); 0 caches no leaf. Default:
    /// [`LEAF_CACHE_MAX_BYTES`].
    pub leaf_cache_max_bytes: u64,
    /// Longest one run of a function may take (a verification runs it twice, each under this
    /// bound); then its context is cancelled and its callers get
    /// [`DerivaError::DeadlineExceeded`]. `None`: no bound. Default: [`COMPUTE_TIMEOUT`].
    pub compute_timeout: Option<Duration>,
    /// How the engine reads and links spans across nodes (a compute lease carries the span of
    /// its holder, and a node that waits on it links to it). `None`: no links across nodes.
    /// Default: `None`; the server gives one over its OpenTelemetry layer.
    pub trace_links: Option<Arc<dyn TraceLinks>>,
    /// This node's name, written in the materialization record of every output it computes.
    /// Default: `deriva`; the server gives its `service.instance.id`.
    pub node_name: String,
    /// Signs materialization records. `None`: records are unsigned. Default: `None`.
    pub signer: Option<Arc<dyn RecordSigner>>,
    /// Sampled recomputation of hits (audits). Default: off.
    pub audit: AuditConfig,
}

/// Signs materialization records over their canonical encoding, for an engine that links no
/// cryptography: the server implements it over its `--signing-key`.
pub trait RecordSigner: Send + Sync + fmt::Debug + 'static {
    /// The ed25519 signature of `canonical` ([`deriva_core::Record::canonical_bytes`]).
    fn sign(&self, canonical: &[u8]) -> [u8; deriva_core::provenance::SIGNATURE_LEN];
}

/// What an audit that finds other bytes does with the output it disputes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMismatch {
    /// Keep serving it, marked disputed (its record's audits say so).
    #[default]
    Keep,
    /// Drop it (as an invalidation without cascade would): the next Get computes it again.
    Evict,
}

/// Sampled recomputation of hits: a fraction of the hits of computed outputs are computed
/// again in the background, at most `max_concurrent` at once and only while a compute slot is
/// free, and the output compared with its record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// The fraction of hits audited, 0 to 1. Default: 0 (off).
    pub sample_ratio: f64,
    /// Most audits running at once. Default: 1.
    pub max_concurrent: usize,
    /// What a mismatch does. Default: [`OnMismatch::Keep`].
    pub on_mismatch: OnMismatch,
    /// Whether the store is shared with other nodes: then a node audits only the outputs that
    /// another node computed, so that every comparison crosses machines. Default: `false`.
    pub shared_store: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sample_ratio: 0.0,
            max_concurrent: 1,
            on_mismatch: OnMismatch::Keep,
            shared_store: false,
        }
    }
}

/// Spans across nodes, for an engine that does not link the OpenTelemetry SDK: the server
/// implements it over its telemetry.
pub trait TraceLinks: Send + Sync + fmt::Debug + 'static {
    /// The W3C `traceparent` of `span`, if it has a valid context.
    fn traceparent(&self, span: &tracing::Span) -> Option<String>;
    /// Adds to `span` a link to the span that `traceparent` names (ignored if invalid).
    fn link(&self, span: &tracing::Span, traceparent: &str);
    /// Adds to `span` a link to the span `to` (a compute span, from a record).
    fn link_span(&self, span: &tracing::Span, to: deriva_core::SpanRef) {
        self.link(span, &to.traceparent());
    }
    /// The trace and span id of `span`, if it has a valid context (for its record).
    fn span_ref(&self, span: &tracing::Span) -> Option<deriva_core::SpanRef> {
        deriva_core::SpanRef::from_traceparent(&self.traceparent(span)?)
    }
}

/// The default of [`ExecutorConfig::compute_timeout`]: 300 s.
pub const COMPUTE_TIMEOUT: Duration = Duration::from_secs(300);

/// The default of [`ExecutorConfig::leaf_cache_max_bytes`]: 64 KiB.
pub const LEAF_CACHE_MAX_BYTES: u64 = 64 << 10;

/// Outputs larger than `threshold` bytes are kept in `store` (a local directory) instead of
/// the memory cache, and a `Get` streams them from there.
#[derive(Debug, Clone)]
pub struct Spill {
    /// The spill directory.
    pub store: Arc<SpillStore>,
    /// Outputs above this many bytes are spilled.
    pub threshold: u64,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_concurrent_computes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            verification: VerificationMode::Off,
            slow_compute_threshold: Duration::from_secs(1),
            memory: BudgetConfig::default(),
            spill: None,
            leaf_cache_max_bytes: LEAF_CACHE_MAX_BYTES,
            compute_timeout: Some(COMPUTE_TIMEOUT),
            trace_links: None,
            node_name: String::from("deriva"),
            signer: None,
            audit: AuditConfig::default(),
        }
    }
}
