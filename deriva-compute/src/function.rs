//! The [`ComputeFunction`] trait and the [`FunctionRegistry`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{FunctionId, Params};

/// Largest output a builtin may produce, in bytes. Builtins check it before allocating so a
/// hostile param (`repeat count=10^12`, a gzip bomb) fails cleanly instead of exhausting memory.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 30;

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
}

impl FunctionError {
    /// Whether the error is the recipe's fault (bad params or input count), known before
    /// looking at any input bytes, as opposed to a failure while computing.
    pub fn is_invalid_recipe(&self) -> bool {
        !matches!(self, Self::Failed(_))
    }
}

/// A pure, deterministic function from input bytes and string params to output bytes.
///
/// Deterministic means: the same inputs and params always give the same bytes, on every
/// machine, forever. A function whose output must change gets a new version instead. Deriva
/// can check this at run time (see `VerificationMode`).
///
/// `compute` runs on tokio's blocking pool, so it may take time and block.
pub trait ComputeFunction: Send + Sync + 'static {
    /// Checks params and the number of inputs without computing anything. Called when a recipe
    /// is stored, so a bad recipe is rejected early. The default accepts everything.
    fn validate(&self, n_inputs: usize, params: &Params) -> Result<(), FunctionError> {
        let _ = (n_inputs, params);
        Ok(())
    }

    /// Computes the output.
    fn compute(&self, inputs: &[Bytes], params: &Params) -> Result<Bytes, FunctionError>;

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
