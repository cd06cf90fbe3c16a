//! # deriva-server
//!
//! Deriva's gRPC server and its telemetry. The path of a request, and which files to touch to
//! add an RPC, a metric or a span, are in `ARCHITECTURE.md` at the repository root.
//!
//! - [`auth`]: the scoped bearer tokens of `--auth-tokens`.
//! - [`config`]: [`Config`] and the `deriva-server` flags that fill it.
//! - [`server`]: [`Server`], which opens the store and serves gRPC and HTTP on listeners it is
//!   given until a shutdown future completes (tests run it in-process on port 0).
//! - [`service`]: the tonic implementation of `service Deriva`: decode, call the engine,
//!   encode.
//! - [`error`]: [`ApiError`](error::ApiError) and the one mapping from errors to gRPC status
//!   codes.
//! - [`method`]: [`RpcMethod`](method::RpcMethod), one variant per RPC: path, metric label,
//!   span name, token scope. The table every folder reads, so it sits below them all.
//! - [`rpc`]: the tower layer that gives every RPC its metrics, server span, request id and
//!   trace propagation, and the over-limit status rewrite (`RESOURCE_EXHAUSTED`).
//! - [`telemetry`]: the OpenTelemetry providers, the Prometheus registry, OTLP export,
//!   [`sampler`](telemetry::sampler), log lines with trace ids ([`logs`](telemetry::logs)) and
//!   the server's instruments ([`metrics`](telemetry::metrics)); only the binary installs
//!   anything global.
//! - [`listen`]: the accept loop of both listeners and its limits (connections, first byte).
//! - [`tls`]: TLS on both listeners, client certificates, the certificate swapped on SIGHUP.
//! - [`trace_store`]: the in-process store of recent request span trees (`Explain`,
//!   `/debug/traces`) and the `tracing` layer that fills it.
//! - [`http`]: `/metrics`, `/health`, `/healthz`, `/readyz` and the `/debug` pages.
//! - [`store_spec`]: [`StoreSpec`](store_spec::StoreSpec), the store the flags name, and the
//!   one way to open it (the server and `migrate` both use it).
//! - [`migrate`]: `deriva-server migrate`, which copies a store between backends.
//! - [`proto`]: the wire contract, [`deriva_proto`] re-exported.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod listen;
pub mod method;
pub mod migrate;
pub mod provenance;
pub mod rpc;
pub mod server;
pub mod service;
pub mod store_spec;
pub mod telemetry;
pub mod tls;
pub mod trace_store;

/// The wire contract, from [`deriva_proto`]: `crate::proto::GetRequest` and so on.
pub use deriva_proto as proto;

pub use config::{Config, OutputTier, ServerArgs};
pub use server::{ServeError, Server};
