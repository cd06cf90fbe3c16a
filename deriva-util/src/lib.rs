//! # deriva-util
//!
//! Helpers with no domain meaning, shared by the server (`deriva-server`), the client (`deriva`)
//! and the remote storage backend. Small on purpose: it links nothing the client should not.
//!
//! - [`token`]: bearer tokens: their scopes, names, digests and how a new one is made.
//! - [`size`]: [`parse_size`](size::parse_size) and [`parse_duration`](size::parse_duration),
//!   byte sizes with units (`64KiB`, `256MiB`) and durations (`30s`).
//! - [`redact`]: [`redact_url`](redact::redact_url), the one way a connection string (a URL, a
//!   libpq `key=value` string) is printed: its passwords and secret parameters hidden.
//! - [`escape`]: percent-decoding, for the redaction and for the URLs' own parsers.
//! - [`signing`]: ed25519 keys in PEM, which sign and check materialization records.
//! - [`time`]: [`civil_date`](time::civil_date), the calendar date of a day since the Unix epoch.
//! - [`crypto`]: [`use_ring`](crypto::use_ring), the process's one TLS crypto provider.

pub mod crypto;
pub mod escape;
pub mod redact;
pub mod signing;
pub mod size;
pub mod time;
pub mod token;
