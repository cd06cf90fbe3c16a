//! Garbage collection's mark in the local store: the live set and the candidates go to a
//! scratch redb file (`gc-scratch.redb` in the data directory, written without fsync, removed
//! when the collection ends and when the store opens), never to this process's memory.
//!
//! Tables of the scratch file:
//! - `live`: every address found live;
//! - `front`: live recipes whose inputs are not marked yet (the walk's work list);
//! - `dead_recipes`: `(u32::MAX − depth) BE ‖ addr`, so that a forward scan is deepest first;
//! - `dead_leaves`: `time of last put (ms, BE) ‖ addr` → size, oldest first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use deriva_core::{CAddr, DerivaError, Result};
use deriva_store::gc::{Candidates, Removed};
use deriva_store::{AddrKind, Lease};

use crate::recipes::db_error;

/// The scratch file's name in the data directory.
pub const SCRATCH_FILE: &str = "gc-scratch.redb";

pub(super) const LIVE: TableDefinition<&[u8; 32], ()> = TableDefinition::new("live");
pub(super) const FRONT: TableDefinition<&[u8; 32], ()> = TableDefinition::new("front");
const DEAD_RECIPES: TableDefinition<&[u8; 36], ()> = TableDefinition::new("dead_recipes");
const DEAD_LEAVES: TableDefinition<&[u8; 40], u64> = TableDefinition::new("dead_leaves");

/// Inserts per scratch transaction: each commits without fsync, and keeps what it changed in
/// memory until then.
pub(super) const SCRATCH_BATCH: usize = 10_000;

/// Milliseconds since the Unix epoch.
pub(super) fn millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The scratch file of one collection; removed when dropped.
#[derive(Debug)]
pub(super) struct Scratch {
    db: Option<Database>,
    path: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        drop(self.db.take());
        remove(&self.path);
    }
}

/// Removes a scratch file left by a collection that did not end (a crash).
pub(super) fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove garbage collection's scratch file")
        }
    }
}

impl Scratch {
    /// A fresh scratch file in `dir`.
    pub(super) fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(SCRATCH_FILE);
        remove(&path);
        let db = Database::create(&path)
            .map_err(|e| db_error("creating garbage collection's scratch file", e.into()))?;
        Ok(Self { db: Some(db), path })
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("open until dropped")
    }

    /// A write transaction that commits without fsync: the file is thrown away after.
    pub(super) fn write(&self) -> Result<WriteTransaction> {
        const CTX: &str = "writing garbage collection's scratch file";
        let mut txn = self
            .db()
            .begin_write()
            .map_err(|e| db_error(CTX, e.into()))?;
        txn.set_durability(Durability::None)
            .map_err(|e| DerivaError::database(CTX, e))?;
        Ok(txn)
    }

    /// The live set as marked so far, to read (`None` if nothing was marked).
    pub(super) fn live(&self) -> Result<Option<redb::ReadOnlyTable<&'static [u8; 32], ()>>> {
        const CTX: &str = "reading garbage collection's scratch file";
        let txn = self
            .db()
            .begin_read()
            .map_err(|e| db_error(CTX, e.into()))?;
        match txn.open_table(LIVE) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(db_error(CTX, e.into())),
        }
    }

    /// Records the dead leaves among `leaves` (put before `cutoff`, not live): how many.
    pub(super) fn add_dead_leaves(
        &self,
        leaves: &[deriva_store::AgedLeaf],
        cutoff: SystemTime,
    ) -> Result<u64> {
        const CTX: &str = "writing garbage collection's scratch file";
        let txn = self.write()?;
        let mut added = 0;
        {
            let live = txn.open_table(LIVE).map_err(|e| db_error(CTX, e.into()))?;
            let mut dead = txn
                .open_table(DEAD_LEAVES)
                .map_err(|e| db_error(CTX, e.into()))?;
            for leaf in leaves {
                if leaf.at >= cutoff
                    || live
                        .get(leaf.addr.as_bytes())
                        .map_err(|e| db_error(CTX, e.into()))?
                        .is_some()
                {
                    continue;
                }
                let mut key = [0u8; 40];
                key[..8].copy_from_slice(&millis(leaf.at).to_be_bytes());
                key[8..].copy_from_slice(leaf.addr.as_bytes());
                dead.insert(&key, leaf.size)
                    .map_err(|e| db_error(CTX, e.into()))?;
                added += 1;
            }
        }
        txn.commit().map_err(|e| db_error(CTX, e.into()))?;
        Ok(added)
    }

    /// Records dead recipes (depth, address): how many.
    pub(super) fn add_dead_recipes(&self, recipes: &[(u32, CAddr)]) -> Result<u64> {
        const CTX: &str = "writing garbage collection's scratch file";
        let txn = self.write()?;
        {
            let mut dead = txn
                .open_table(DEAD_RECIPES)
                .map_err(|e| db_error(CTX, e.into()))?;
            for (depth, addr) in recipes {
                dead.insert(&recipe_key(*depth, addr), ())
                    .map_err(|e| db_error(CTX, e.into()))?;
            }
        }
        txn.commit().map_err(|e| db_error(CTX, e.into()))?;
        Ok(recipes.len() as u64)
    }

    /// Up to `limit` dead recipes after `after` (a key), then leaves.
    fn page(&self, cursor: &mut Cursor, limit: usize) -> Result<Vec<Removed>> {
        const CTX: &str = "reading garbage collection's candidates";
        let txn = self
            .db()
            .begin_read()
            .map_err(|e| db_error(CTX, e.into()))?;
        let mut out = Vec::new();
        if !cursor.recipes_done {
            match txn.open_table(DEAD_RECIPES) {
                Ok(table) => {
                    let range = match &cursor.recipe {
                        None => table.range::<&[u8; 36]>(..),
                        Some(after) => table.range::<&[u8; 36]>((
                            std::ops::Bound::Excluded(after),
                            std::ops::Bound::Unbounded,
                        )),
                    }
                    .map_err(|e| db_error(CTX, e.into()))?;
                    for entry in range.take(limit) {
                        let (key, _) = entry.map_err(|e| db_error(CTX, e.into()))?;
                        let key = *key.value();
                        out.push(Removed {
                            addr: CAddr::from_bytes(key[4..].try_into().expect("32 bytes")),
                            kind: AddrKind::Recipe,
                            bytes: 0,
                        });
                        cursor.recipe = Some(key);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db_error(CTX, e.into())),
            }
            if !out.is_empty() {
                return Ok(out);
            }
            cursor.recipes_done = true;
        }
        match txn.open_table(DEAD_LEAVES) {
            Ok(table) => {
                let range = match &cursor.leaf {
                    None => table.range::<&[u8; 40]>(..),
                    Some(after) => table.range::<&[u8; 40]>((
                        std::ops::Bound::Excluded(after),
                        std::ops::Bound::Unbounded,
                    )),
                }
                .map_err(|e| db_error(CTX, e.into()))?;
                for entry in range.take(limit) {
                    let (key, size) = entry.map_err(|e| db_error(CTX, e.into()))?;
                    let key = *key.value();
                    out.push(Removed {
                        addr: CAddr::from_bytes(key[8..].try_into().expect("32 bytes")),
                        kind: AddrKind::Leaf,
                        bytes: size.value(),
                    });
                    cursor.leaf = Some(key);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(db_error(CTX, e.into())),
        }
        Ok(out)
    }
}

/// A dead recipe's key: deepest first in key order.
fn recipe_key(depth: u32, addr: &CAddr) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..4].copy_from_slice(&(u32::MAX - depth).to_be_bytes());
    key[4..].copy_from_slice(addr.as_bytes());
    key
}

/// Where the sweep is in the scratch file's candidates.
#[derive(Debug, Default)]
struct Cursor {
    recipe: Option<[u8; 36]>,
    recipes_done: bool,
    leaf: Option<[u8; 40]>,
}

/// The candidates of a local collection: pages read from the scratch file on the blocking
/// pool.
pub(super) struct LocalCandidates {
    scratch: Option<Arc<Scratch>>,
    cursor: Cursor,
    _lease: Lease,
}

impl LocalCandidates {
    pub(super) fn new(scratch: Scratch, lease: Lease) -> Self {
        Self {
            scratch: Some(Arc::new(scratch)),
            cursor: Cursor::default(),
            _lease: lease,
        }
    }
}

impl Drop for LocalCandidates {
    fn drop(&mut self) {
        // Closing and removing the file is blocking work: off the async worker.
        if let Some(scratch) = self.scratch.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn_blocking(move || drop(scratch));
        }
    }
}

#[async_trait]
impl Candidates for LocalCandidates {
    async fn next(&mut self, limit: usize) -> Result<Vec<Removed>> {
        let scratch = self.scratch.clone().expect("present until dropped");
        let mut cursor = std::mem::take(&mut self.cursor);
        let (page, cursor) =
            deriva_store::task::spawn_blocking_in(tracing::Span::current(), move || {
                let page = scratch.page(&mut cursor, limit.max(1));
                (page, cursor)
            })
            .await
            .map_err(|e| DerivaError::from_join("reading garbage collection's candidates", e))?;
        self.cursor = cursor;
        page
    }
}
