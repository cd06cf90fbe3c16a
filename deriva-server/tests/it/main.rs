//! The integration tests of `deriva-server`, one binary: a module per subject. Their helpers
//! (the in-process and child-process servers, the backends, the CLI runner, exposition parsing)
//! are in `deriva-testkit`.
//!
//! Every test here shares one process with the others, so none sets process-wide state: no
//! global tracing subscriber or meter provider (the in-process server's telemetry is its own),
//! no environment variable (children get theirs through `Command::env`), no current directory
//! (a child runs in one). The one panic hook (`reliability`) counts only the panics of its own
//! tests' runtimes; rustls's process default provider is installed the way the server binary
//! installs it (the same provider, and "already installed" is fine).

mod api;
mod binary;
mod campaign;
mod cli;
mod cluster;
mod cluster_provenance;
mod cluster_tier;
mod config;
mod debug_pages;
mod idle_counts;
mod memory;
mod migrate;
mod migrate_scale;
mod monitoring;
mod observability;
mod otlp;
mod prometheus;
mod provenance;
mod reliability;
mod reliability_crash;
mod reliability_gc;
mod reliability_load;
mod security;
mod sizes;
mod telemetry_saturation;
mod tls;
