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
    /// The function ran longer than the compute timeout and was cancelled. Nothing was kept;
    /// a later request computes it again, under the same bound.
    #[error(
        "{addr}: {function} ran longer than the compute timeout of {} s and was cancelled",
        limit.as_secs_f64()
    )]
    DeadlineExceeded {
        /// The function that ran too long.
        function: FunctionId,
        /// The recipe being computed.
        addr: CAddr,
        /// The compute timeout.
        limit: std::time::Duration,
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
    /// An I/O operation failed. The [`std::io::ErrorKind`] is kept so callers can tell, say, a
    /// full disk from a permission problem.
    #[error("{context}: {message}")]
    Io {
        /// What was being done, with the path or address.
        context: String,
        /// The kind the operating system reported.
        kind: std::io::ErrorKind,
        /// The error's own message.
        message: String,
    },
    /// A storage backend's database failed (an error that is not the operating system's I/O).
    #[error("{context}: database error: {message}")]
    Database {
        /// What was being done.
        context: String,
        /// The database's message.
        message: String,
    },
    /// Bytes that should hold an encoded value (a stored recipe, a row) do not decode.
    #[error("{context}: cannot decode: {message}")]
    Decode {
        /// What was being decoded.
        context: String,
        /// Why it does not decode, with the byte offset where one is known.
        message: String,
    },
    /// A background task (a compute, a store call on the blocking pool) panicked.
    #[error("{task} panicked: {message}")]
    TaskPanicked {
        /// What the task was doing.
        task: String,
        /// The panic payload, when it is a string.
        message: String,
    },
    /// A remote backend (object store, database) cannot be reached or does not answer in time.
    /// Retrying later may succeed; nothing was stored or served half-way.
    #[error("{backend} is unavailable: {message}")]
    Unavailable {
        /// Which backend, as operators know it: `the object store s3://bucket`, `the index
        /// database`.
        backend: String,
        /// What failed.
        message: String,
    },
    /// Serving the request would take more memory than the server's budget allows now: the
    /// request alone is larger than the budget, or it waited for room and none came. Nothing
    /// was read or computed for it beyond what is named.
    #[error("{what} needs {needed} bytes in memory; the memory budget is {budget} bytes: {reason}")]
    OverBudget {
        /// What needed the memory: `materializing <addr> (concat/v1)`.
        what: String,
        /// The bytes it needed.
        needed: u64,
        /// The budget, in bytes.
        budget: u64,
        /// Why it was refused: larger than the whole budget, the wait queue full, or the
        /// wait too long.
        reason: String,
    },
    /// A background task was cancelled before it finished, because its runtime is shutting
    /// down.
    #[error("{task} was cancelled: the server is shutting down")]
    TaskCancelled {
        /// What the task was doing.
        task: String,
    },
}

impl DerivaError {
    /// Builds a [`DerivaError::Io`] from an I/O error, with a short context.
    pub fn io(context: impl std::fmt::Display, err: &std::io::Error) -> Self {
        Self::Io {
            context: context.to_string(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// Builds a [`DerivaError::Database`] from a backend's error, with a short context.
    pub fn database(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self::Database {
            context: context.to_string(),
            message: err.to_string(),
        }
    }

    /// Builds a [`DerivaError::Decode`].
    pub fn decode(context: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Self::Decode {
            context: context.to_string(),
            message: message.to_string(),
        }
    }

    /// Builds [`DerivaError::TaskPanicked`] or [`DerivaError::TaskCancelled`] from the
    /// [`JoinError`](tokio::task::JoinError) of a task doing `task`.
    pub fn from_join(task: impl std::fmt::Display, err: tokio::task::JoinError) -> Self {
        let task = task.to_string();
        match err.try_into_panic() {
            Ok(payload) => Self::TaskPanicked {
                task,
                message: panic_text(payload.as_ref()),
            },
            Err(_) => Self::TaskCancelled { task },
        }
    }

    /// A short, stable, snake_case name of the variant, for logs and bounded metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::InvalidInput(_) => "invalid_input",
            Self::UnknownFunction { .. } => "unknown_function",
            Self::MissingInput { .. } => "missing_input",
            Self::ComputeFailed { .. } => "compute_failed",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::DeterminismViolation { .. } => "determinism_violation",
            Self::Corrupted { .. } => "corrupted",
            Self::Io { .. } => "io",
            Self::Database { .. } => "database",
            Self::Decode { .. } => "decode",
            Self::TaskPanicked { .. } => "task_panicked",
            Self::TaskCancelled { .. } => "task_cancelled",
            Self::Unavailable { .. } => "unavailable",
            Self::OverBudget { .. } => "over_budget",
        }
    }
}

/// The text of a panic payload: the message of `panic!("...")`, or a placeholder.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
