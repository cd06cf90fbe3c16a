//! # deriva-server
//!
//! Deriva's gRPC server and its telemetry.
//!
//! - [`config`]: [`Config`] and the `deriva-server` flags that fill it.
//! - [`server`]: [`Server`], which opens the store and serves gRPC and HTTP on listeners it is
//!   given until a shutdown future completes (tests run it in-process on port 0).
//! - [`service`]: the tonic implementation of `service Deriva`.
//! - [`error`]: the one mapping from errors to gRPC status codes.
//! - [`limits`]: the over-limit request rewrite (`RESOURCE_EXHAUSTED`).
//! - [`rpc_layer`]: the tower layer that gives every RPC its metrics, server span, request id
//!   and trace propagation.
//! - [`metrics`]: the server's instruments (RPC, DAG and storage families).
//! - [`telemetry`]: the OpenTelemetry providers, the Prometheus registry, OTLP export, sampling
//!   and the `tracing` subscriber; only the binary installs anything global.
//! - [`trace_store`]: the in-process store of recent request span trees (`Explain`,
//!   `/debug/traces`).
//! - [`http`]: `/metrics`, `/health`, `/healthz`, `/readyz` and `/debug/traces`.
//! - [`proto`]: the wire contract, [`deriva_proto`] re-exported.

pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod rpc_layer;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod trace_store;

/// The wire contract, from [`deriva_proto`]: `crate::proto::GetRequest` and so on.
pub use deriva_proto as proto;

pub use config::{Config, ServerArgs};
pub use server::{ServeError, Server};
