//! The `provenance` table of [`RecipeDb`] (see the parent module's docs): the
//! materialization record of each computed output, with its audits.

use redb::{ReadableDatabase, ReadableTable};

use deriva_core::provenance::{AuditResult, Audits, Provenance, SignedRecord};
use deriva_core::{CAddr, DerivaError, Result};

use super::{OrStorage, PROVENANCE, RecipeDb, keys_after};

impl RecipeDb {
    /// The record of the output of the recipe `addr`, with its audits.
    pub(crate) fn record(&self, addr: &CAddr) -> Result<Option<Provenance>> {
        const CTX: &str = "reading a materialization record";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(PROVENANCE).or_storage(CTX)?;
        let row = table.get(addr.as_bytes()).or_storage(CTX)?;
        row.map(|row| decode_provenance(addr, row.value()))
            .transpose()
    }

    /// Keeps `signed` as the record of its recipe's output, with no audits, in a commit that is
    /// not durable by itself (see the module docs).
    pub(crate) fn put_record(&self, signed: &SignedRecord) -> Result<()> {
        const CTX: &str = "storing a materialization record";
        let row = Provenance::new(signed.clone()).to_bytes();
        let mut txn = self.db.begin_write().or_storage(CTX)?;
        txn.set_durability(redb::Durability::None).or_storage(CTX)?;
        txn.open_table(PROVENANCE)
            .or_storage(CTX)?
            .insert(signed.record.recipe.as_bytes(), row.as_slice())
            .or_storage(CTX)?;
        txn.commit().or_storage(CTX)
    }

    /// Counts `result` on the record of the output of `addr` if that record's output hash is
    /// `output_hash`, read and written in one write transaction (not durable by itself); the
    /// tallies after it, or `None` (nothing counted) if there is no such record.
    pub(crate) fn audit_record(
        &self,
        addr: &CAddr,
        output_hash: &CAddr,
        result: AuditResult,
    ) -> Result<Option<Audits>> {
        const CTX: &str = "counting an audit";
        let mut txn = self.db.begin_write().or_storage(CTX)?;
        txn.set_durability(redb::Durability::None).or_storage(CTX)?;
        let audits = {
            let mut table = txn.open_table(PROVENANCE).or_storage(CTX)?;
            let stored = table
                .get(addr.as_bytes())
                .or_storage(CTX)?
                .map(|row| decode_provenance(addr, row.value()))
                .transpose()?;
            match stored {
                Some(mut provenance) if provenance.record().output_hash == *output_hash => {
                    provenance.audits.add(result);
                    table
                        .insert(addr.as_bytes(), provenance.to_bytes().as_slice())
                        .or_storage(CTX)?;
                    Some(provenance.audits)
                }
                _ => None,
            }
        };
        match audits {
            Some(_) => txn.commit().or_storage(CTX)?,
            None => txn.abort().or_storage(CTX)?,
        }
        Ok(audits)
    }

    /// Deletes the records of `addrs` in one durable transaction (none if there was nothing to
    /// delete).
    pub(crate) fn delete_records(&self, addrs: &[CAddr]) -> Result<()> {
        const CTX: &str = "deleting materialization records";
        let txn = self.db.begin_write().or_storage(CTX)?;
        let mut removed = false;
        {
            let mut table = txn.open_table(PROVENANCE).or_storage(CTX)?;
            for addr in addrs {
                removed |= table.remove(addr.as_bytes()).or_storage(CTX)?.is_some();
            }
        }
        if removed {
            txn.commit().or_storage(CTX)
        } else {
            txn.abort().or_storage(CTX)
        }
    }

    /// At most `limit` records whose recipe sorts after `after` (from the first when `None`),
    /// in that order, from one read transaction.
    pub(crate) fn list_records(
        &self,
        after: Option<CAddr>,
        limit: usize,
    ) -> Result<Vec<Provenance>> {
        const CTX: &str = "listing materialization records";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(PROVENANCE).or_storage(CTX)?;
        let after = after.map(|a| *a.as_bytes());
        let range = table
            .range::<&[u8; 32]>(keys_after(after.as_ref()))
            .or_storage(CTX)?;
        let mut out = Vec::with_capacity(limit.min(crate::PAGE_CAPACITY));
        for entry in range.take(limit) {
            let (key, row) = entry.or_storage(CTX)?;
            out.push(decode_provenance(
                &CAddr::from_bytes(*key.value()),
                row.value(),
            )?);
        }
        Ok(out)
    }
}

/// The record stored in `row` for the output of `addr`; a row that does not decode, or names
/// another recipe, is [`DerivaError::Corrupted`].
fn decode_provenance(addr: &CAddr, row: &[u8]) -> Result<Provenance> {
    let provenance = Provenance::from_bytes(row).map_err(|e| DerivaError::Corrupted {
        addr: *addr,
        detail: format!("the stored materialization record does not decode: {e}"),
    })?;
    if provenance.record().recipe != *addr {
        return Err(DerivaError::Corrupted {
            addr: *addr,
            detail: format!(
                "the stored materialization record is of recipe {}",
                provenance.record().recipe
            ),
        });
    }
    Ok(provenance)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use deriva_core::FunctionId;

    /// A record row that does not decode, or that names another recipe, is Corrupted when it
    /// is read and when it is audited; an audit then counts nothing.
    #[test]
    fn a_damaged_record_is_corrupted() {
        use deriva_core::provenance::Record;
        let dir = tempfile::tempdir().unwrap();
        let db = RecipeDb::open(&dir.path().join("deriva.redb"), Arc::default()).unwrap();
        let (a, b) = (CAddr::from_bytes([1; 32]), CAddr::from_bytes([2; 32]));
        let signed = SignedRecord {
            record: Record {
                recipe: b,
                function: FunctionId::new("concat", "1").unwrap(),
                inputs: vec![],
                output_hash: CAddr::for_leaf(b"out"),
                output_bytes: 3,
                node: "n".into(),
                started_at_micros: 1,
                duration_micros: 2,
                span: None,
            },
            signature: None,
        };
        let write = |key: &CAddr, row: &[u8]| {
            let txn = db.db.begin_write().unwrap();
            txn.open_table(PROVENANCE)
                .unwrap()
                .insert(key.as_bytes(), row)
                .unwrap();
            txn.commit().unwrap();
        };
        for row in [vec![0xff, 0xff], Provenance::new(signed.clone()).to_bytes()] {
            write(&a, &row);
            for result in [
                db.record(&a).map(drop),
                db.audit_record(&a, &signed.record.output_hash, AuditResult::Match)
                    .map(drop),
            ] {
                assert!(
                    matches!(&result, Err(DerivaError::Corrupted { addr, .. }) if *addr == a),
                    "{result:?}"
                );
            }
        }
        db.put_record(&signed).unwrap();
        assert_eq!(db.record(&b).unwrap(), Some(Provenance::new(signed)));
    }
}
