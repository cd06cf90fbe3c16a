//! # deriva-core
//!
//! The data model of Deriva, a computation-addressed store: no storage, no I/O.
//!
//! - [`addr`]: [`CAddr`], the 32-byte BLAKE3 address of leaves and recipes.
//! - [`recipe`]: [`FunctionId`], [`Recipe`], params and the canonical recipe encoding.
//! - [`error`]: [`DerivaError`], the error every Deriva crate returns.
//! - [`provenance`]: [`Record`], what a node records of each compute, and its canonical
//!   encoding (signed, with its audits).
//! - [`spans`]: the names of Deriva's spans and their fields, shared by the engine, the server's
//!   trace store and the client's `--explain`.
//! - [`untraced`]: the scope of a request that is not traced (decided when it arrives), which
//!   every span layer checks and every task the request spawns carries.
//!
//! Storage is `deriva-store` (traits, the `Store` facade) and its backends
//! (`deriva-store-local`, `deriva-store-remote`); helpers with no domain meaning (tokens, sizes,
//! redaction) are `deriva-util`.
//!
//! ## Addresses
//!
//! A **leaf** address is the plain BLAKE3 hash of the leaf's bytes: `b3sum FILE` prints the
//! same 64 hex characters.
//!
//! A **recipe** address is `BLAKE3-derive_key(context, encoding)`, where the context string
//! is [`RECIPE_ADDR_CONTEXT`](recipe::RECIPE_ADDR_CONTEXT)
//! (`"deriva 2026-11-25 recipe address v1"`) and the encoding is the canonical encoding below.
//! Using BLAKE3's key-derivation mode separates the two domains: no recipe can have the address
//! of a leaf, whatever bytes the leaf holds.
//!
//! ### Canonical recipe encoding, version 1
//!
//! All integers are unsigned 32-bit little-endian; strings are UTF-8 preceded by their byte
//! length.
//!
//! | field | bytes |
//! |---|---|
//! | encoding version | one byte, `0x01` |
//! | function name | `u32` length, bytes |
//! | function version | `u32` length, bytes |
//! | inputs | `u32` count, then each input address as 32 raw bytes, in recipe order |
//! | params | `u32` count, then per param sorted by key (bytewise): key (`u32` length, bytes), value (`u32` length, bytes) |
//!
//! Input order matters (`concat(a, b)` differs from `concat(b, a)`); param order does not, since
//! params are always encoded sorted by key. Golden-vector tests in `tests/it/golden.rs` pin this
//! encoding: any change to it must bump the version byte and the context string.
//!
//! Limits, checked when a recipe is built: function name and version 1–128 bytes with no `/`
//! and no control characters; at most 1024 inputs; at most 256 params; keys 1–128 bytes;
//! values at most 64 KiB.

pub mod addr;
pub mod error;
pub mod provenance;
pub mod recipe;
pub mod spans;
pub mod untraced;

pub use addr::{AddrParseError, CAddr};
pub use error::{DerivaError, Result};
pub use provenance::{AuditResult, Audits, Provenance, Record, SignedRecord, SpanRef};
pub use recipe::{FunctionId, Params, Recipe};
