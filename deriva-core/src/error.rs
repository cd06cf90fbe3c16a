//! [`DerivaError`], the one error type of the core and compute crates.

use crate::addr::CAddr;
use crate::recipe::FunctionId;

/// Result alias used throughout Deriva.
pub type Result<T, E = DerivaError> = std::result::Result<T, E>;

/// Everything that can go wrong in Deriva, in variants a caller can act on.
///
/// The type is `Clone` so that every waiter of a shared (single-flight) materialization receives
/// the same error. Messages name what was wrong and, where one is known, the address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerivaError {
    /// No leaf and no recipe has this address.
    #[error("{addr}: no leaf or recipe has this address")]
    NotFound {
        /// The address that was looked up.
        addr: CAddr,
    },
    /// The request itself is malformed: a bad address, function id, param or size.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A recipe names a function that is not registered.
    #[error("function {function} is not registered")]
    UnknownFunction {
        /// The unknown function.
        function: FunctionId,
    },
    /// A recipe refers to an input address that is neither a leaf nor a recipe.
    #[error("input {input} does not exist")]
    MissingInput {
        /// The missing input address.
        input: CAddr,
    },
    /// The function ran and reported a failure.
    #[error("{addr}: {function} failed: {message}")]
    ComputeFailed {
        /// The failing function.
        function: FunctionId,
        /// The recipe being computed.
        addr: CAddr,
        /// The function's own message.
        message: String,
    },
    /// Two runs of the same function on the same inputs produced different bytes.
    #[error("{addr}: {function} is not deterministic: two runs gave outputs {first} and {second}")]
    DeterminismViolation {
        /// The offending function.
        function: FunctionId,
        /// The recipe being verified.
        addr: CAddr,
        /// Leaf address (BLAKE3) of the first output.
        first: CAddr,
        /// Leaf address (BLAKE3) of the second output.
        second: CAddr,
    },
    /// Stored bytes no longer match their address (bit rot, truncation, tampering).
    #[error("{addr}: stored data is corrupted: {detail}")]
    Corrupted {
        /// The address whose bytes are wrong.
        addr: CAddr,
        /// What was found.
        detail: String,
    },
    /// The durable store failed (I/O or database error).
    #[error("storage error: {0}")]
    Storage(String),
}

impl DerivaError {
    /// Builds a [`DerivaError::Storage`] from any error, with a short context.
    pub fn storage(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self::Storage(format!("{context}: {err}"))
    }

    /// A short, stable, snake_case name of the variant, for logs and bounded metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::InvalidInput(_) => "invalid_input",
            Self::UnknownFunction { .. } => "unknown_function",
            Self::MissingInput { .. } => "missing_input",
            Self::ComputeFailed { .. } => "compute_failed",
            Self::DeterminismViolation { .. } => "determinism_violation",
            Self::Corrupted { .. } => "corrupted",
            Self::Storage(_) => "storage",
        }
    }
}
