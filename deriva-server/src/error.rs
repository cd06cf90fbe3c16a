//! [`ApiError`] and the one mapping from it to a gRPC [`Status`].

use deriva_core::{AddrParseError, CAddr, DerivaError};
use tonic::{Code, Status};

/// Why an RPC failed, before it becomes a [`Status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The engine or the store refused or failed.
    #[error(transparent)]
    Engine(#[from] DerivaError),
    /// A wire address is not 32 bytes.
    #[error("{field}: {source}")]
    BadAddr {
        /// The request field, such as `addr` or `inputs[2]`.
        field: String,
        /// What was wrong.
        source: AddrParseError,
    },
}

/// The result type of every RPC body.
pub type ApiResult<T> = Result<T, ApiError>;

impl From<ApiError> for Status {
    /// The single place where errors get their gRPC code:
    ///
    /// | error | code |
    /// |---|---|
    /// | bad address, bad function id or param | `INVALID_ARGUMENT` |
    /// | unknown address | `NOT_FOUND` |
    /// | missing input, unregistered function | `FAILED_PRECONDITION` |
    /// | compute failure | `INTERNAL`, with the function's message |
    /// | determinism violation, corrupted data | `DATA_LOSS` |
    /// | storage failure (I/O, database, undecodable row), panicked task | `INTERNAL`, detail in the server log only |
    /// | task cancelled because the server is shutting down | `UNAVAILABLE` |
    ///
    /// Oversized messages are rejected before any handler runs; see [`crate::rpc::status_rewrite`].
    fn from(err: ApiError) -> Status {
        let err = match err {
            ApiError::BadAddr { .. } => return Status::invalid_argument(err.to_string()),
            ApiError::Engine(e) => e,
        };
        if err.is_internal() {
            tracing::error!(error = %err, kind = err.kind(), "storage or task failure");
            return Status::internal("internal storage error; the server log has the details");
        }
        let code = match &err {
            DerivaError::InvalidInput(_) => Code::InvalidArgument,
            DerivaError::NotFound { .. } => Code::NotFound,
            DerivaError::UnknownFunction { .. } | DerivaError::MissingInput { .. } => {
                Code::FailedPrecondition
            }
            DerivaError::ComputeFailed { .. } => Code::Internal,
            DerivaError::DeterminismViolation { .. } | DerivaError::Corrupted { .. } => {
                tracing::error!(error = %err, "data integrity failure");
                Code::DataLoss
            }
            DerivaError::TaskCancelled { .. } => Code::Unavailable,
            DerivaError::Io { .. }
            | DerivaError::Database { .. }
            | DerivaError::Decode { .. }
            | DerivaError::TaskPanicked { .. } => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

/// Parses a 32-byte wire address, naming the field when it is wrong.
pub fn parse_addr(field: impl Into<String>, raw: &[u8]) -> ApiResult<CAddr> {
    CAddr::from_slice(raw).map_err(|source| ApiError::BadAddr {
        field: field.into(),
        source,
    })
}
