//! [`PgRecords`]: the materialization records of computed outputs ([`Records`]) in the
//! `outputs` table of PostgreSQL, which every remote store keeps, with or without the output
//! tier.
//!
//! A record lives in its output's row: `record` (the `SignedRecord` envelope) and the tallies
//! `audit_match`, `audit_mismatch`, `audit_error` (migration 7). A node with the output tier
//! writes the row with the object (`ObjectOutputs::put`: `stored = true`, see `outputs.rs`); a
//! record put here on a recipe with no row makes one with `stored = false` (no object: a node
//! without the tier, or an output too large for it), which the output tier does not count.
//! Every call is one statement:
//!
//! - `put`: an upsert. A new row has `stored = false`; an existing one keeps `stored` and
//!   takes the record, its output's size and hash, and zeroed audits.
//! - `audit`: one `UPDATE … RETURNING` that adds to one tally where the row's hash is the
//!   audited output's (so an audit of an output replaced since counts nothing), and answers
//!   the tallies; the additions of concurrent nodes all count.
//! - `delete`: the rows with `stored = false` of the batch are deleted, the others lose their
//!   record (their object, and then their row, go with `OutputStore::delete`).
//!
//! Garbage collection's sweep deletes the rows with `stored = false` of the recipes it
//! deletes, in the same statement (`index.rs`); the engine deletes the stored ones with their
//! objects.

use std::sync::Arc;

use async_trait::async_trait;
use deriva_core::error::Result;
use deriva_core::provenance::{AuditResult, Audits, Provenance, SignedRecord};
use deriva_core::{CAddr, DerivaError};
use deriva_store::Records;

use crate::pg::{Call, Pg};

/// The materialization records in PostgreSQL's `outputs`.
#[derive(Debug, Clone)]
pub struct PgRecords {
    pg: Arc<Pg>,
}

impl PgRecords {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        Self { pg }
    }
}

/// The record stored for the output of `recipe`, from its envelope `bytes` and tallies; an
/// envelope that does not decode, or names another recipe, is [`DerivaError::Corrupted`].
pub(crate) fn decode_record(recipe: &CAddr, bytes: &[u8], where_: &str) -> Result<SignedRecord> {
    let damaged = |detail: String| DerivaError::Corrupted {
        addr: *recipe,
        detail: format!("the materialization record in {where_}: {detail}"),
    };
    let signed = SignedRecord::from_bytes(bytes).map_err(|e| damaged(e.to_string()))?;
    if signed.record.recipe != *recipe {
        return Err(damaged(format!(
            "it is the record of recipe {}, not of this one",
            signed.record.recipe
        )));
    }
    Ok(signed)
}

/// A tally read from a `bigint` column (never negative; a negative one reads as 0).
fn tally(row: &tokio_postgres::Row, i: usize) -> u64 {
    row.get::<_, i64>(i).max(0) as u64
}

/// The tallies in columns 0, 1 and 2 of `row`.
fn audits(row: &tokio_postgres::Row) -> Audits {
    Audits {
        matches: tally(row, 0),
        mismatches: tally(row, 1),
        errors: tally(row, 2),
    }
}

/// The record of the output of `recipe` in `row`: the tallies, then the envelope ([`COLUMNS`]).
fn provenance(recipe: &CAddr, row: &tokio_postgres::Row, where_: &str) -> Result<Provenance> {
    Ok(Provenance {
        signed: decode_record(recipe, row.get::<_, &[u8]>(3), where_)?,
        audits: audits(row),
    })
}

/// The columns [`provenance`] reads, then the recipe.
const COLUMNS: &str = "audit_match, audit_mismatch, audit_error, record, recipe";

#[async_trait]
impl Records for PgRecords {
    async fn get(&self, recipe: CAddr) -> Result<Option<Provenance>> {
        const CALL: Call = Call {
            op: "get_record",
            operation: "SELECT",
            table: "outputs",
            context: "reading a materialization record",
        };
        let key = recipe.as_bytes().as_slice();
        let sql =
            format!("SELECT {COLUMNS} FROM {{s}}.outputs WHERE recipe = $1 AND record IS NOT NULL");
        let row = self.pg.query_opt(CALL, &sql, &[&key]).await?;
        row.map(|row| provenance(&recipe, &row, self.pg.name()))
            .transpose()
    }

    async fn put(&self, record: &SignedRecord) -> Result<()> {
        const CALL: Call = Call {
            op: "put_record",
            operation: "INSERT",
            table: "outputs",
            context: "storing a materialization record",
        };
        let r = &record.record;
        let key = r.recipe.as_bytes().as_slice();
        let hash = r.output_hash.as_bytes().as_slice();
        let size = i64::try_from(r.output_bytes).map_err(|_| {
            DerivaError::InvalidInput(format!(
                "a record of an output of {} bytes, more than the index can hold",
                r.output_bytes
            ))
        })?;
        let envelope = record.to_bytes();
        self.pg
            .query(
                CALL,
                "INSERT INTO {s}.outputs (recipe, size, hash, record, stored)
                 VALUES ($1, $2, $3, $4, false)
                 ON CONFLICT (recipe) DO UPDATE
                 SET size = excluded.size, hash = excluded.hash, record = excluded.record,
                     audit_match = 0, audit_mismatch = 0, audit_error = 0",
                &[&key, &size, &hash, &envelope],
            )
            .await?;
        Ok(())
    }

    async fn audit(
        &self,
        recipe: CAddr,
        output_hash: CAddr,
        result: AuditResult,
    ) -> Result<Option<Audits>> {
        const CALL: Call = Call {
            op: "audit_record",
            operation: "UPDATE",
            table: "outputs",
            context: "counting an audit",
        };
        let key = recipe.as_bytes().as_slice();
        let hash = output_hash.as_bytes().as_slice();
        let one = |r: AuditResult| i64::from(result == r);
        let (m, x, e) = (
            one(AuditResult::Match),
            one(AuditResult::Mismatch),
            one(AuditResult::Error),
        );
        let row = self
            .pg
            .query_opt(
                CALL,
                "UPDATE {s}.outputs
                 SET audit_match = audit_match + $3, audit_mismatch = audit_mismatch + $4,
                     audit_error = audit_error + $5
                 WHERE recipe = $1 AND record IS NOT NULL AND hash = $2
                 RETURNING audit_match, audit_mismatch, audit_error",
                &[&key, &hash, &m, &x, &e],
            )
            .await?;
        Ok(row.as_ref().map(audits))
    }

    async fn delete(&self, recipes: &[CAddr]) -> Result<()> {
        const CALL: Call = Call {
            op: "delete_records",
            operation: "DELETE",
            table: "outputs",
            context: "deleting materialization records",
        };
        if recipes.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = recipes.iter().map(|a| a.as_bytes().as_slice()).collect();
        // The two parts touch disjoint rows (`stored` or not), so one statement does both.
        self.pg
            .query(
                CALL,
                "WITH unstored AS (
                     DELETE FROM {s}.outputs WHERE recipe = ANY($1) AND NOT stored
                 )
                 UPDATE {s}.outputs
                 SET record = NULL, audit_match = 0, audit_mismatch = 0, audit_error = 0
                 WHERE recipe = ANY($1) AND stored AND record IS NOT NULL",
                &[&keys],
            )
            .await?;
        Ok(())
    }

    /// Through the primary key, the rows without a record skipped.
    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<Provenance>> {
        const CALL: Call = Call {
            op: "list_records",
            operation: "SELECT",
            table: "outputs",
            context: "listing materialization records",
        };
        let after = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {COLUMNS} FROM {{s}}.outputs WHERE recipe > $1 AND record IS NOT NULL
             ORDER BY recipe LIMIT $2"
        );
        let rows = self.pg.query(CALL, &sql, &[&after, &limit]).await?;
        rows.iter()
            .map(|row| {
                let recipe = crate::index::addr_of(row.get(4), CALL.context)?;
                provenance(&recipe, row, self.pg.name())
            })
            .collect()
    }
}
