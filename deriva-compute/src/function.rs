//! The [`ComputeFunction`] trait, the [`ComputeContext`] a compute runs in, and the
//! [`FunctionRegistry`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use deriva_core::{FunctionId, Params};

/// Largest output a builtin may produce, in bytes. Builtins check it before allocating so a
/// hostile param (`repeat count=10^12`, a gzip bomb) fails cleanly instead of exhausting memory.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 30;

/// How many bytes a builtin processes between two looks at [`ComputeContext::check`]: a
/// cancelled builtin stops within about this much work.
pub const CANCEL_CHECK_BYTES: usize = 64 << 10;

/// Why a function did not produce an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionError {
    /// A required param is absent.
    #[error("param `{param}` is required")]
    MissingParam {
        /// The param's key.
        param: &'static str,
    },
    /// A param has a value the function cannot use.
    #[error("param `{param}` {reason}")]
    BadParam {
        /// The param's key.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The function was given the wrong number of inputs.
    #[error("expects {expected} inputs, got {got}")]
    InputCount {
        /// What the function accepts, such as `1` or `at least 1`.
        expected: String,
        /// How many it got.
        got: usize,
    },
    /// The function ran and failed on these inputs (for example, `gunzip` of data that is not
    /// gzip).
    #[error("{0}")]
    Failed(String),
    /// The function saw its [`ComputeContext`] cancelled and stopped without an output
    /// (what [`ComputeContext::check`] returns).
    #[error("the compute was cancelled")]
    Cancelled,
}

impl FunctionError {
    /// Whether the error is the recipe's fault (bad params or input count), known before
    /// looking at any input bytes, as opposed to a failure while computing.
    pub fn is_invalid_recipe(&self) -> bool {
        matches!(
            self,
            Self::MissingParam { .. } | Self::BadParam { .. } | Self::InputCount { .. }
        )
    }
}

/// A request to stop, shared by whoever may cancel a compute and the compute itself. Cheap to
/// clone; every clone sees the same state. Once cancelled, it stays cancelled.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled (yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels it, for every clone.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether it was cancelled: one atomic load, cheap enough for any loop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What a compute gets besides its inputs and params: today, whether it should stop (the
/// executor cancels it when it runs past `--compute-timeout-secs`, when every caller has gone,
/// and at shutdown). More may come (such as provenance); a function only calls its methods.
///
/// A function that loops over its input calls [`ComputeContext::check`] every
/// [`CANCEL_CHECK_BYTES`] or so of work, and returns its error:
///
/// ```
/// # use deriva_compute::{ComputeContext, FunctionError, function::CANCEL_CHECK_BYTES};
/// fn count_zeros(ctx: &ComputeContext, input: &[u8]) -> Result<usize, FunctionError> {
///     let mut zeros = 0;
///     for chunk in input.chunks(CANCEL_CHECK_BYTES) {
///         ctx.check()?;
///         zeros += chunk.iter().filter(|b| **b == 0).count();
///     }
///     Ok(zeros)
/// }
/// assert_eq!(count_zeros(&ComputeContext::default(), &[0, 1, 0]), Ok(2));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ComputeContext {
    /// This compute's own token.
    cancel: CancelToken,
    /// The executor's, cancelled at shutdown for every compute at once.
    shutdown: CancelToken,
}

impl ComputeContext {
    /// A context cancelled when `cancel` is: for running a function outside the executor (a
    /// test, a tool). [`ComputeContext::default`] is never cancelled.
    pub fn new(cancel: CancelToken) -> Self {
        Self {
            cancel,
            shutdown: CancelToken::new(),
        }
    }

    /// The executor's: cancelled by either token.
    pub(crate) fn with_shutdown(cancel: CancelToken, shutdown: CancelToken) -> Self {
        Self { cancel, shutdown }
    }

    /// Whether the compute should stop now.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.shutdown.is_cancelled()
    }

    /// `Err(FunctionError::Cancelled)` once the compute should stop, for `?` in a loop.
    pub fn check(&self) -> Result<(), FunctionError> {
        if self.is_cancelled() {
            Err(FunctionError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A pure, deterministic function from input bytes and string params to output bytes.
///
/// Deterministic means: the same inputs and params always give the same bytes, on every
/// machine, forever. A function whose output must change gets a new version instead. Deriva
/// can check this at run time (see `VerificationMode`).
///
/// `compute` runs on tokio's blocking pool, so it may take time and block. It should bound
/// its work by its params up front ([`ComputeFunction::validate`]) and, while it works, watch
/// its [`ComputeContext`]: the executor cancels a compute that runs longer than the compute
/// timeout (`--compute-timeout-secs`; the caller gets `DeadlineExceeded`), one whose callers
/// have all gone, and every compute at shutdown once the grace period is over. A thread cannot
/// be killed, so cancellation is cooperative: a function that never looks at its context runs
/// on until it returns, and until then keeps its compute slot (`--max-concurrent-computes`),
/// its memory reservation and its thread, although its caller had its answer long before
/// (`deriva_compute_cancelled_running` counts such computes). The builtins look at least every
/// [`CANCEL_CHECK_BYTES`] of work.
pub trait ComputeFunction: Send + Sync + 'static {
    /// Checks params and the number of inputs without computing anything. Called when a recipe
    /// is stored, so a bad recipe is rejected early, and again before every compute (a recipe
    /// stored by an older version, or planted in the store, is refused rather than run). It
    /// should bound what the params can make the compute do: a count, a size, a number of
    /// rounds. The default accepts everything.
    fn validate(&self, n_inputs: usize, params: &Params) -> Result<(), FunctionError> {
        let _ = (n_inputs, params);
        Ok(())
    }

    /// Computes the output. Returns [`FunctionError::Cancelled`] (from
    /// [`ComputeContext::check`]) once `ctx` is cancelled.
    fn compute(
        &self,
        ctx: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError>;

    /// The size of the output for inputs of `input_sizes` bytes, when the function can tell
    /// without computing (`concat`: their sum). The executor checks it against the memory
    /// budget before it reads any input, and reserves it before the compute. The default:
    /// unknown (the executor then uses the size recorded at an earlier compute, or the inputs'
    /// total).
    fn output_size(&self, input_sizes: &[u64], params: &Params) -> Option<u64> {
        let _ = (input_sizes, params);
        None
    }
}

/// The functions a server can run, by [`FunctionId`].
#[derive(Clone, Default)]
pub struct FunctionRegistry {
    functions: HashMap<FunctionId, Arc<dyn ComputeFunction>>,
}

impl FunctionRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every builtin (see [`crate::builtins`]).
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        crate::builtins::register_all(&mut registry);
        registry
    }

    /// Registers `function` under `id`, replacing any previous one.
    pub fn register(&mut self, id: FunctionId, function: impl ComputeFunction) -> &mut Self {
        self.functions.insert(id, Arc::new(function));
        self
    }

    /// Looks a function up.
    pub fn get(&self, id: &FunctionId) -> Option<&Arc<dyn ComputeFunction>> {
        self.functions.get(id)
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: &FunctionId) -> bool {
        self.functions.contains_key(id)
    }

    /// The registered ids, sorted.
    pub fn ids(&self) -> Vec<FunctionId> {
        let mut ids: Vec<_> = self.functions.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Number of registered functions.
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    /// Whether no function is registered.
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

impl fmt::Debug for FunctionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionRegistry")
            .field("functions", &self.ids())
            .finish()
    }
}

/// Helpers for reading params, shared by the builtins.
pub mod params {
    use super::FunctionError;
    use deriva_core::Params;

    /// Reads a required unsigned integer param.
    pub fn required_u64(params: &Params, key: &'static str) -> Result<u64, FunctionError> {
        let raw = params
            .get(key)
            .ok_or(FunctionError::MissingParam { param: key })?;
        parse_u64(key, raw)
    }

    /// Reads an optional unsigned integer param.
    pub fn optional_u64(params: &Params, key: &'static str) -> Result<Option<u64>, FunctionError> {
        params.get(key).map(|raw| parse_u64(key, raw)).transpose()
    }

    fn parse_u64(key: &str, raw: &str) -> Result<u64, FunctionError> {
        raw.parse::<u64>().map_err(|_| FunctionError::BadParam {
            param: key.to_owned(),
            reason: format!("must be a non-negative integer, got {raw:?}"),
        })
    }

    /// Rejects any param other than `allowed`, so a typo (`cout=3`) is an error rather than a
    /// silently different recipe address.
    pub fn only(params: &Params, allowed: &[&str]) -> Result<(), FunctionError> {
        match params.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(FunctionError::BadParam {
                param: k.clone(),
                reason: if allowed.is_empty() {
                    "is not accepted: this function takes no params".to_owned()
                } else {
                    format!(
                        "is not accepted: this function takes {}",
                        allowed.join(", ")
                    )
                },
            }),
            None => Ok(()),
        }
    }

    /// The common shape of a builtin: exactly one input and no params.
    pub fn unary_without_params(got: usize, params: &Params) -> Result<(), FunctionError> {
        exactly(1, got)?;
        only(params, &[])
    }

    /// Checks the number of inputs is exactly `n`.
    pub fn exactly(n: usize, got: usize) -> Result<(), FunctionError> {
        if got == n {
            Ok(())
        } else {
            Err(FunctionError::InputCount {
                expected: n.to_string(),
                got,
            })
        }
    }
}
