//! [`ApiError`] and the one mapping from it to a gRPC [`Status`].

use deriva_core::{CAddr, DerivaError};
use deriva_proto::BadAddr;
use tonic::{Code, Status};

/// Why an RPC failed, before it becomes a [`Status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The engine or the store refused or failed.
    #[error(transparent)]
    Engine(#[from] DerivaError),
    /// A wire address is not 32 bytes; names the request field, such as `addr` or `inputs[2]`.
    #[error(transparent)]
    BadAddr(#[from] BadAddr),
    /// `Explain` on a server that keeps no traces.
    #[error("this server keeps no traces (the trace store is off)")]
    TraceStoreOff,
    /// An `Explain` trace id that is not 32 hex characters.
    #[error("trace_id: a trace id is 32 hex characters, got {got:?}")]
    BadTraceId {
        /// The start of what was given (its first 40 characters).
        got: String,
    },
    /// An `Explain` trace id that the trace store does not hold (or no longer holds).
    #[error(
        "trace {trace_id} is not among the recent, slowest or failed requests this server keeps"
    )]
    TraceNotFound {
        /// The trace id.
        trace_id: String,
    },
    /// A `GarbageCollect` whose grace period is below `--gc-min-grace`.
    #[error(
        "grace_period_secs: a collection with a grace period of {asked_secs} s is refused: this \
         server's --gc-min-grace is {min_secs} s (ask for at least that, e.g. deriva gc --grace \
         {min_secs}s, or start the server with --gc-min-grace 0s to allow less)"
    )]
    GraceBelowMinimum {
        /// The grace period asked for, in seconds.
        asked_secs: u64,
        /// `--gc-min-grace`, in seconds.
        min_secs: u64,
    },
}

/// The result type of every RPC body.
pub type ApiResult<T> = Result<T, ApiError>;

impl From<ApiError> for Status {
    /// The single place where errors get their gRPC code:
    ///
    /// | error | code |
    /// |---|---|
    /// | bad address, bad function id or param, malformed trace id | `INVALID_ARGUMENT` |
    /// | unknown address, trace not kept | `NOT_FOUND` |
    /// | missing input, unregistered function, trace store off, a collection's grace below `--gc-min-grace` | `FAILED_PRECONDITION` |
    /// | compute failure | `INTERNAL`, with the function's message |
    /// | compute that ran longer than `--compute-timeout-secs` (the message names the recipe and the function) | `DEADLINE_EXCEEDED` |
    /// | determinism violation, corrupted data | `DATA_LOSS` |
    /// | storage failure (I/O, database, undecodable row), panicked task | `INTERNAL`, detail in the server log only |
    /// | task cancelled because the server is shutting down; a remote backend that cannot be reached (the message names it) | `UNAVAILABLE` |
    /// | more memory than `--memory-budget` allows (the message gives the size and the budget) | `RESOURCE_EXHAUSTED` |
    ///
    /// Oversized messages are rejected before any handler runs; see `rpc::status_rewrite`.
    fn from(err: ApiError) -> Status {
        let err = match err {
            ApiError::BadAddr(_) | ApiError::BadTraceId { .. } => {
                return Status::invalid_argument(err.to_string());
            }
            ApiError::TraceNotFound { .. } => return Status::not_found(err.to_string()),
            ApiError::TraceStoreOff | ApiError::GraceBelowMinimum { .. } => {
                return Status::failed_precondition(err.to_string());
            }
            ApiError::Engine(e) => e,
        };
        let code = code_of(&err);
        match code {
            Code::DataLoss => tracing::error!(error = %err, "data integrity failure"),
            Code::Internal if !matches!(err, DerivaError::ComputeFailed { .. }) => {
                // A failure of the server or its storage: the detail goes to the log only.
                tracing::error!(error = %err, kind = err.kind(), "storage or task failure");
                return Status::internal("internal storage error; the server log has the details");
            }
            _ => {}
        }
        Status::new(code, err.to_string())
    }
}

/// The gRPC code of an engine or store error (the table of [`Status::from`]); the command-line
/// tools (`deriva-server migrate`) name their failures by it too.
pub fn code_of(err: &DerivaError) -> Code {
    match err {
        DerivaError::InvalidInput(_) => Code::InvalidArgument,
        DerivaError::NotFound { .. } => Code::NotFound,
        DerivaError::UnknownFunction { .. } | DerivaError::MissingInput { .. } => {
            Code::FailedPrecondition
        }
        DerivaError::DeterminismViolation { .. } | DerivaError::Corrupted { .. } => Code::DataLoss,
        DerivaError::TaskCancelled { .. } | DerivaError::Unavailable { .. } => Code::Unavailable,
        DerivaError::OverBudget { .. } => Code::ResourceExhausted,
        DerivaError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        DerivaError::ComputeFailed { .. }
        | DerivaError::Io { .. }
        | DerivaError::Database { .. }
        | DerivaError::Decode { .. }
        | DerivaError::TaskPanicked { .. } => Code::Internal,
    }
}

/// A code as gRPC writes it: `DATA_LOSS`, `UNAVAILABLE`.
pub fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Parses a 32-byte wire address, naming the field when it is wrong.
pub fn parse_addr(field: &str, raw: &[u8]) -> ApiResult<CAddr> {
    Ok(deriva_proto::addr_from_bytes(field, raw)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_spelling() {
        assert_eq!(code_name(Code::DataLoss), "DATA_LOSS");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Ok), "OK");
    }

    #[test]
    fn a_compute_timeout_is_deadline_exceeded_naming_recipe_and_function() {
        let addr = CAddr::for_leaf(b"a recipe");
        let err = DerivaError::DeadlineExceeded {
            function: deriva_core::FunctionId::new("gzip", "v1").unwrap(),
            addr,
            limit: std::time::Duration::from_secs(300),
        };
        let status = Status::from(ApiError::from(err));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            format!(
                "{addr}: gzip/v1 ran longer than the compute timeout of 300 s and was cancelled"
            )
        );
    }

    #[test]
    fn explain_errors_keep_their_codes_and_messages() {
        let unknown = "0".repeat(32);
        let cases = [
            (
                ApiError::TraceStoreOff,
                Code::FailedPrecondition,
                "this server keeps no traces (the trace store is off)".to_owned(),
            ),
            (
                ApiError::BadTraceId { got: "xyz".into() },
                Code::InvalidArgument,
                r#"trace_id: a trace id is 32 hex characters, got "xyz""#.to_owned(),
            ),
            (
                ApiError::TraceNotFound {
                    trace_id: unknown.clone(),
                },
                Code::NotFound,
                format!(
                    "trace {unknown} is not among the recent, slowest or failed requests this \
                     server keeps"
                ),
            ),
        ];
        for (err, code, message) in cases {
            let status = Status::from(err);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
    }
}
