//! # deriva-cli
//!
//! `deriva`, the command-line client of a Deriva server: it stores leaves and recipes, fetches
//! their bytes, explains a `Get`, and load-tests a server with `deriva bench`. It talks to the
//! server over gRPC only, so it depends on [`deriva_proto`] and on [`deriva_core`]'s data model
//! (without its store), never on the server or the compute engine.
//!
//! - [`args`]: [`CliArgs`] and [`Command`], the clap types of the command line, and the parsers
//!   of addresses and `key=value` params.
//! - [`client`]: [`Target`] (the server and the command's trace context), [`connect`], and
//!   [`CliError`] with its exit codes and its one-line rendering, [`error_line`].
//! - [`commands`]: [`run`], which executes one command, and the formatting of each answer.
//! - [`explain`]: [`format_explain`], the `get --explain` tree.
//! - [`provenance`]: the `provenance` tree and JSON, and the check of record signatures.
//! - [`bench`](mod@bench): `deriva bench`, the load generator.
//!
//! Everything local is checked before any RPC (addresses must be 64 hex characters, params
//! `key=value`), so bad input fails the same way whether or not a server is running. The exit
//! code is 2 for usage errors, 130 for Ctrl-C and 1 for the rest.

pub mod args;
pub mod bench;
pub mod client;
pub mod commands;
pub mod explain;
mod human;
pub mod provenance;

pub use args::{CliArgs, Command, DEFAULT_SERVER};
pub use client::{CliError, Target, connect, error_line};
pub use commands::{run, run_until_interrupted};
pub use explain::format_explain;
