//! The gRPC side around the handlers of [`crate::service`]:
//!
//! - [`method`]: [`RpcMethod`], one variant per RPC with its path, metric label and span name;
//! - [`layer`]: [`RpcLayer`], the tower layer that gives every RPC its metrics, server span,
//!   request id and trace propagation;
//! - [`status_rewrite`]: [`OversizeLayer`], which rewrites tonic's over-limit rejection into
//!   `RESOURCE_EXHAUSTED`.

pub mod layer;
pub mod method;
pub mod status_rewrite;

pub use layer::RpcLayer;
pub use method::RpcMethod;
pub use status_rewrite::OversizeLayer;
