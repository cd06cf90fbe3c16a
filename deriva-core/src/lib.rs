//! # deriva-core
//!
//! The data model and durable store of Deriva, a computation-addressed store.
//!
//! - [`addr`]: [`CAddr`], the 32-byte BLAKE3 address of leaves and recipes.
//! - [`recipe`]: [`FunctionId`], [`Recipe`], params and the canonical recipe encoding.
//! - [`error`]: [`DerivaError`], the error every Deriva crate returns.
//! - [`size`]: [`parse_size`](size::parse_size), byte sizes with units (`64KiB`, `256MiB`).
//! - [`redact`]: [`redact_url`](redact::redact_url), the one way a connection string (a URL, a
//!   libpq `key=value` string) is printed: its passwords and secret parameters hidden.
//! - [`store`]: what the engine needs from storage, as two async traits ([`BlobStore`],
//!   [`RecipeIndex`]), the [`Store`] built from one of each, the local backend
//!   ([`store::local`], feature `local`, on by default: recipes in redb, leaf bytes in files) and
//!   the conformance suite every backend passes (`store::conformance`, feature `conformance`).
//! - [`task`]: blocking work on the blocking pool that stays in its caller's trace.
//! - [`spans`]: the names of Deriva's spans and their fields, shared by the engine, the server's
//!   trace store and the client's `--explain`.
//!
//! Without the `local` feature (as the `deriva` client builds it) the crate does not link redb.
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
//! params are always encoded sorted by key. Golden-vector tests in `tests/golden.rs` pin this
//! encoding: any change to it must bump the version byte and the context string.
//!
//! Limits, checked when a recipe is built: function name and version 1–128 bytes with no `/`
//! and no control characters; at most 1024 inputs; at most 256 params; keys 1–128 bytes;
//! values at most 64 KiB.
//!
//! ## Local store layout
//!
//! ```text
//! <data-dir>/
//!   deriva.redb             redb: tables `recipes`, `dependents` (multimap), `meta`, `pins`,
//!                           `recipe_times` (each recipe's last put, for garbage collection)
//!   leaves.redb             redb: table `leaves`, small leaves (at most `inline_leaf_bytes`,
//!                           64 KiB by default): address → last put (ms, u64 LE) ‖ bytes
//!   blobs/
//!     tmp/                  in-progress writes; emptied when the store opens
//!     00/ … ff/             shards by the first address byte
//!       <64 hex chars>      one leaf's bytes, named by its address; its mtime is its last put
//! ```
//!
//! - `recipes`: recipe address → DAG depth (`u32` LE) followed by the canonical encoding.
//!   Every read re-hashes the encoding and checks it against the key.
//! - `dependents`: input address → each recipe that uses it; cascade invalidation walks it.
//! - `meta`: `recipe_count`, updated in the same transaction as the insert.
//!
//! A small leaf goes to one committer thread, which writes every put waiting at that moment in
//! one redb transaction and commits it durably (group commit: one fsync shared by the batch)
//! before any of them is acknowledged. A larger blob is written to `blobs/tmp/`, fsynced,
//! renamed into its shard and the shard directory fsynced, all before `put` returns; a crash
//! never leaves partial bytes under a real address. Every read re-hashes the leaf, row or
//! file: a mismatch is [`DerivaError::Corrupted`], never data.
//! Blob count and bytes are counted once at open (which also cleans `tmp/`) and then kept as
//! atomics ([`store::StoreCounters`]); the recipe count is persisted in `meta`.

pub mod addr;
pub mod error;
pub mod escape;
pub mod recipe;
pub mod redact;
pub mod size;
pub mod spans;
pub mod store;
pub mod task;
pub mod token;

pub use addr::{AddrParseError, CAddr};
pub use error::{DerivaError, Result};
pub use recipe::{FunctionId, Params, Recipe};
pub use store::{
    AddrKind, BlobStore, InvalidationBus, OutputStore, RecipeIndex, Store, StoreCounters,
    StoredRecipe,
};
