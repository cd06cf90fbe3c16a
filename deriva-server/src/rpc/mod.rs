//! The gRPC side around the handlers of `service.rs`:
//!
//! - [`layer`]: [`RpcLayer`], the tower layer that gives every RPC its metrics, server span,
//!   request id and trace propagation, and applies the shutdown [`Cutoff`];
//! - [`edge`]: [`Edge`], which decides once per request whether it is traced;
//! - [`cutoff`]: [`Cutoff`], which ends the calls still running when the shutdown grace is over;
//! - [`routes`]: [`GrpcServices`], which hands a call to the Deriva or the health service;
//! - [`status_rewrite`]: [`OversizeLayer`], which rewrites tonic's over-limit rejection into
//!   `RESOURCE_EXHAUSTED`.

pub mod cutoff;
pub mod edge;
pub mod layer;
pub mod routes;
pub mod status_rewrite;

pub use cutoff::Cutoff;
pub use edge::Edge;
pub use layer::RpcLayer;
pub use routes::GrpcServices;
pub use status_rewrite::OversizeLayer;
