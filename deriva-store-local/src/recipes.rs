//! Recipes and the dependency graph in redb.
//!
//! Tables:
//! - `recipes`: recipe address → `depth (u32 LE) ‖ canonical recipe encoding`;
//! - `dependents` (multimap): input address → addresses of the recipes that use it;
//! - `meta`: `"recipe_count"` → number of rows in `recipes`, updated in the same transaction;
//! - `pins`: pinned address → when it was pinned (seconds since the Unix epoch);
//! - `recipe_times`: recipe address → when it was last put (milliseconds since the Unix
//!   epoch), for garbage collection; a recipe without a row (stored by an older version)
//!   counts as put long ago;
//! - `recipes_by_depth`: `depth (u32 big-endian) ‖ address` → nothing, one key per row of
//!   `recipes`, written in the same transaction: the listing's pages walk it, in the order that
//!   puts every recipe after its inputs. A database written before it existed gets it when it
//!   opens (one pass over `recipes`, whenever the two tables' lengths differ);
//! - `output_sizes`: recipe address → the recorded size of its output (a hint for the memory
//!   budget), written without an fsync of its own;
//! - `provenance`: recipe address → the materialization record of its output with its audits
//!   (`Provenance::to_bytes`, see `deriva_core::provenance`). A put and an audit commit without
//!   an fsync of their own (`Durability::None`): they reach the disk with the next durable
//!   commit of this database (a recipe put, a pin, a delete) or when the store closes (redb
//!   makes pending commits durable on a clean close), and a crash before either loses them;
//!   a lost record is a record the output no longer shows, never a wrong one. A record goes in
//!   the transaction that deletes its recipe (garbage collection's sweep, a delete), and its
//!   deletes ([`RecipeDb::delete_records`]) are durable.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

use deriva_core::CAddr;
use deriva_core::Recipe;
use deriva_core::{DerivaError, Result};
use deriva_store::{StoreCounters, StoredRecipe};

use crate::gc::{self, SCRATCH_BATCH, Scratch};

mod records;

const RECIPES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("recipes");
const DEPENDENTS: MultimapTableDefinition<&[u8; 32], &[u8; 32]> =
    MultimapTableDefinition::new("dependents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RECIPE_COUNT: &str = "recipe_count";
const PINS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("pins");
const RECIPE_TIMES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("recipe_times");
const BY_DEPTH: TableDefinition<&[u8; 36], ()> = TableDefinition::new("recipes_by_depth");

/// The key of `addr` at `depth` in `recipes_by_depth`: big-endian depth first, so that keys
/// sort by depth, then by address.
fn depth_key(depth: u32, addr: &CAddr) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..4].copy_from_slice(&depth.to_be_bytes());
    key[4..].copy_from_slice(addr.as_bytes());
    key
}
/// The recorded size of each computed output, by recipe: a hint for the memory budget,
/// written without an fsync of its own.
const OUTPUT_SIZES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("output_sizes");
/// The materialization record of each computed output, with its audits, by recipe.
const PROVENANCE: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("provenance");
/// A recipe stored again refreshes its time only if the stored one is at least this old: a
/// burst of identical puts commits (and fsyncs) once.
const TOUCH_EVERY_MS: u64 = 1000;

/// The keys after `after` (all of them when `None`), for a listing page's `range`.
pub(super) fn keys_after<K>(after: Option<&K>) -> (Bound<&K>, Bound<&K>) {
    let start = match after {
        Some(key) => Bound::Excluded(key),
        None => Bound::Unbounded,
    };
    (start, Bound::Unbounded)
}

/// Milliseconds since the Unix epoch.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Turns a redb error into [`DerivaError::Io`] (keeping the OS error kind) or
/// [`DerivaError::Database`], with a short context.
trait OrStorage<T> {
    fn or_storage(self, context: &str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> OrStorage<T> for std::result::Result<T, E> {
    fn or_storage(self, context: &str) -> Result<T> {
        self.map_err(|e| db_error(context, e.into()))
    }
}

/// Opens (creating) the redb file `path` of a local store; another process holding it open
/// (redb's file lock: a running deriva-server) is [`DerivaError::Unavailable`], saying so.
pub(super) fn open_database(path: &Path) -> Result<Database> {
    Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => DerivaError::Unavailable {
            backend: format!("the local store {}", path.display()),
            message: "it is open in another process (a running deriva-server?); \
                      one process at a time may open a local store"
                .into(),
        },
        e => db_error(&format!("opening {}", path.display()), e.into()),
    })
}

pub(super) fn db_error(context: &str, err: redb::Error) -> DerivaError {
    match err {
        redb::Error::Io(io) => DerivaError::io(context, &io),
        other => DerivaError::database(context, other),
    }
}

#[derive(Debug)]
pub(super) struct RecipeDb {
    db: Database,
    counters: Arc<StoreCounters>,
}

impl RecipeDb {
    pub(super) fn open(path: &Path, counters: Arc<StoreCounters>) -> Result<Self> {
        const CTX: &str = "opening the recipe database";
        let db = open_database(path)?;
        let txn = db.begin_write().or_storage(CTX)?;
        let count = {
            txn.open_table(RECIPES).or_storage(CTX)?;
            txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
            txn.open_table(RECIPE_TIMES).or_storage(CTX)?;
            index_depths(&txn)?;
            txn.open_table(OUTPUT_SIZES).or_storage(CTX)?;
            txn.open_table(PROVENANCE).or_storage(CTX)?;
            let pins = txn.open_table(PINS).or_storage(CTX)?;
            counters.set_pins(pins.len().or_storage(CTX)?);
            let meta = txn.open_table(META).or_storage(CTX)?;
            let count = meta.get(RECIPE_COUNT).or_storage(CTX)?;
            count.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit().or_storage(CTX)?;
        counters.set_recipes(count);
        Ok(Self { db, counters })
    }

    /// Inserts recipes in one transaction, in order, so a recipe may use an earlier one of the
    /// batch as an input; an input that is no recipe is a leaf (the caller checked that it
    /// exists). Returns how many were new.
    pub(super) fn put_batch(&self, batch: &[(CAddr, Recipe)]) -> Result<u64> {
        const CTX: &str = "storing a recipe";
        let txn = self.db.begin_write().or_storage(CTX)?;
        let mut added = 0u64;
        let mut touched = 0u64;
        let now = millis(SystemTime::now());
        {
            let mut recipes = txn.open_table(RECIPES).or_storage(CTX)?;
            let mut dependents = txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
            let mut times = txn.open_table(RECIPE_TIMES).or_storage(CTX)?;
            let mut by_depth = txn.open_table(BY_DEPTH).or_storage(CTX)?;
            for (addr, recipe) in batch {
                if recipes.get(addr.as_bytes()).or_storage(CTX)?.is_some() {
                    // Stored again: refresh its time.
                    let at = times
                        .get(addr.as_bytes())
                        .or_storage(CTX)?
                        .map(|v| v.value());
                    if at.is_none_or(|at| at.saturating_add(TOUCH_EVERY_MS) <= now) {
                        times.insert(addr.as_bytes(), now).or_storage(CTX)?;
                        touched += 1;
                    }
                    continue;
                }
                times.insert(addr.as_bytes(), now).or_storage(CTX)?;
                let mut depth = 0u32;
                for input in recipe.inputs() {
                    let input_depth = match recipes.get(input.as_bytes()).or_storage(CTX)? {
                        Some(row) => decode_depth(input, row.value())?,
                        None => 0,
                    };
                    depth = depth.max(input_depth);
                }
                let mut row = depth.saturating_add(1).to_le_bytes().to_vec();
                row.extend_from_slice(&recipe.canonical_bytes());
                recipes
                    .insert(addr.as_bytes(), row.as_slice())
                    .or_storage(CTX)?;
                by_depth
                    .insert(&depth_key(depth.saturating_add(1), addr), ())
                    .or_storage(CTX)?;
                for input in recipe.inputs() {
                    dependents
                        .insert(input.as_bytes(), addr.as_bytes())
                        .or_storage(CTX)?;
                }
                added += 1;
            }
            if added > 0 {
                let mut meta = txn.open_table(META).or_storage(CTX)?;
                let count = meta.get(RECIPE_COUNT).or_storage(CTX)?.map(|v| v.value());
                meta.insert(RECIPE_COUNT, count.unwrap_or(0) + added)
                    .or_storage(CTX)?;
            }
        }
        if added == 0 && touched == 0 {
            // Nothing changed: skip the fsync of a commit.
            txn.abort().or_storage(CTX)?;
            return Ok(0);
        }
        txn.commit().or_storage(CTX)?;
        self.counters.add_recipes(added as i64);
        Ok(added)
    }

    pub(super) fn get(&self, addr: &CAddr) -> Result<Option<StoredRecipe>> {
        const CTX: &str = "reading a recipe";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let Some(row) = table.get(addr.as_bytes()).or_storage(CTX)? else {
            return Ok(None);
        };
        let row = row.value();
        let depth = decode_depth(addr, row)?;
        let recipe =
            Recipe::from_canonical_bytes(&row[4..]).map_err(|e| DerivaError::Corrupted {
                addr: *addr,
                detail: format!("stored recipe does not decode: {e}"),
            })?;
        if recipe.addr() != *addr {
            return Err(DerivaError::Corrupted {
                addr: *addr,
                detail: format!("stored recipe hashes to {}", recipe.addr()),
            });
        }
        Ok(Some(StoredRecipe { recipe, depth }))
    }

    /// Of `addrs`, those with no row, in one read transaction.
    pub(super) fn missing(&self, addrs: &[CAddr]) -> Result<Vec<CAddr>> {
        const CTX: &str = "looking up recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let mut out = Vec::new();
        for addr in addrs {
            if table.get(addr.as_bytes()).or_storage(CTX)?.is_none() {
                out.push(*addr);
            }
        }
        Ok(out)
    }

    /// Deletes the row of `addr`, its edges from its inputs, and counts it; `false` if there
    /// was no row. Edges *to* it (recipes that use it) stay: they name what would break.
    pub(super) fn delete(&self, addr: &CAddr) -> Result<bool> {
        self.delete_when(addr, |_| Ok(true))
    }

    /// [`RecipeDb::delete`] if `addr` was last put before `cutoff`, no recipe uses it and it is
    /// not pinned, all checked in the deleting transaction.
    pub(super) fn delete_if_unused(&self, addr: &CAddr, cutoff: SystemTime) -> Result<bool> {
        const CTX: &str = "collecting a recipe";
        let cutoff = millis(cutoff);
        self.delete_when(addr, |txn| {
            let at = txn
                .open_table(RECIPE_TIMES)
                .or_storage(CTX)?
                .get(addr.as_bytes())
                .or_storage(CTX)?
                .map_or(0, |v| v.value());
            let referenced = referenced(
                &txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?,
                &txn.open_table(PINS).or_storage(CTX)?,
                addr,
            )?;
            Ok(at < cutoff && !referenced)
        })
    }

    /// Deletes the recipe `addr` if it exists and `allowed` (asked inside the write
    /// transaction) says so.
    fn delete_when(
        &self,
        addr: &CAddr,
        allowed: impl FnOnce(&redb::WriteTransaction) -> Result<bool>,
    ) -> Result<bool> {
        const CTX: &str = "deleting a recipe";
        let txn = self.db.begin_write().or_storage(CTX)?;
        if !allowed(&txn)? {
            txn.abort().or_storage(CTX)?;
            return Ok(false);
        }
        {
            let mut recipes = txn.open_table(RECIPES).or_storage(CTX)?;
            let Some(row) = recipes.remove(addr.as_bytes()).or_storage(CTX)? else {
                drop(recipes);
                txn.abort().or_storage(CTX)?;
                return Ok(false);
            };
            let recipe = Recipe::from_canonical_bytes(row.value().get(4..).unwrap_or_default());
            let depth = decode_depth(addr, row.value());
            drop(row);
            if let Ok(depth) = depth {
                txn.open_table(BY_DEPTH)
                    .or_storage(CTX)?
                    .remove(&depth_key(depth, addr))
                    .or_storage(CTX)?;
            }
            let mut dependents = txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
            if let Ok(recipe) = recipe {
                for input in recipe.inputs() {
                    dependents
                        .remove(input.as_bytes(), addr.as_bytes())
                        .or_storage(CTX)?;
                }
            }
            txn.open_table(RECIPE_TIMES)
                .or_storage(CTX)?
                .remove(addr.as_bytes())
                .or_storage(CTX)?;
            // The record of its output goes with it.
            txn.open_table(PROVENANCE)
                .or_storage(CTX)?
                .remove(addr.as_bytes())
                .or_storage(CTX)?;
            let mut meta = txn.open_table(META).or_storage(CTX)?;
            let count = meta.get(RECIPE_COUNT).or_storage(CTX)?.map(|v| v.value());
            meta.insert(RECIPE_COUNT, count.unwrap_or(1).saturating_sub(1))
                .or_storage(CTX)?;
        }
        txn.commit().or_storage(CTX)?;
        self.counters.add_recipes(-1);
        Ok(true)
    }

    /// Whether a recipe uses `addr` as an input, or `addr` is pinned.
    pub(super) fn is_referenced(&self, addr: &CAddr) -> Result<bool> {
        const CTX: &str = "looking up references";
        let txn = self.db.begin_read().or_storage(CTX)?;
        referenced(
            &txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?,
            &txn.open_table(PINS).or_storage(CTX)?,
            addr,
        )
    }

    /// The progress of this store's garbage collection.
    pub(super) fn progress(&self) -> &deriva_store::gc::GcProgress {
        self.counters.gc_progress()
    }

    /// Garbage collection's mark of the recipes at `cutoff`, into `scratch` (see
    /// [`crate::gc`]), from one read transaction: the roots (pins, recipes put at or after
    /// `cutoff`, recipes whose rows do not decode), everything they reach, then the dead
    /// recipes. Holds at most [`SCRATCH_BATCH`] addresses at a time.
    pub(super) fn mark(&self, scratch: &Scratch, cutoff: SystemTime) -> Result<RecipeMark> {
        const CTX: &str = "marking recipes";
        let progress = self.counters.gc_progress();
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let times = txn.open_table(RECIPE_TIMES).or_storage(CTX)?;
        let pins = txn.open_table(PINS).or_storage(CTX)?;
        let mut mark = RecipeMark::default();
        let mut roots: Vec<CAddr> = Vec::new();
        for entry in pins.iter().or_storage(CTX)? {
            roots.push(CAddr::from_bytes(*entry.or_storage(CTX)?.0.value()));
            mark.pinned += 1;
            if roots.len() >= SCRATCH_BATCH {
                mark.live += add_roots(scratch, &roots)?;
                roots.clear();
            }
        }
        for entry in table.iter().or_storage(CTX)? {
            let (key, row) = entry.or_storage(CTX)?;
            mark.recipes += 1;
            progress.advance(1);
            let addr = CAddr::from_bytes(*key.value());
            let at = times
                .get(key.value())
                .or_storage(CTX)?
                .map_or(0, |v| v.value());
            let decodes = decode_inputs(&addr, row.value()).is_some();
            if !decodes {
                mark.corrupted += 1;
                tracing::error!(%addr, "a stored recipe does not decode; garbage collection keeps it and its inputs are not marked");
            }
            if !decodes || UNIX_EPOCH + Duration::from_millis(at) >= cutoff {
                roots.push(addr);
                if roots.len() >= SCRATCH_BATCH {
                    mark.live += add_roots(scratch, &roots)?;
                    roots.clear();
                }
            }
        }
        mark.live += add_roots(scratch, &roots)?;
        drop(roots);

        // The walk: the inputs of each recipe of the front, until the front is empty.
        loop {
            let write = scratch.write()?;
            let visited = {
                let mut front = write.open_table(gc::FRONT).or_storage(CTX)?;
                let mut live = write.open_table(gc::LIVE).or_storage(CTX)?;
                let mut batch = Vec::new();
                while batch.len() < SCRATCH_BATCH {
                    let Some((key, ())) = front
                        .pop_first()
                        .or_storage(CTX)?
                        .map(|(k, v)| (*k.value(), v.value()))
                    else {
                        break;
                    };
                    batch.push(key);
                }
                for key in &batch {
                    let Some(row) = table.get(key).or_storage(CTX)? else {
                        continue;
                    };
                    let addr = CAddr::from_bytes(*key);
                    for input in decode_inputs(&addr, row.value()).unwrap_or_default() {
                        if live.insert(input.as_bytes(), ()).or_storage(CTX)?.is_none() {
                            front.insert(input.as_bytes(), ()).or_storage(CTX)?;
                            mark.live += 1;
                        }
                    }
                }
                batch.len()
            };
            write.commit().or_storage(CTX)?;
            if visited == 0 {
                break;
            }
        }

        // The dead recipes, deepest first in the scratch file's order.
        let mut dead: Vec<(u32, CAddr)> = Vec::new();
        let live = scratch.live()?;
        for entry in table.iter().or_storage(CTX)? {
            let (key, row) = entry.or_storage(CTX)?;
            let addr = CAddr::from_bytes(*key.value());
            if let Some(live) = &live
                && live.get(key.value()).or_storage(CTX)?.is_some()
            {
                continue;
            }
            dead.push((decode_depth(&addr, row.value()).unwrap_or(0), addr));
            if dead.len() >= SCRATCH_BATCH {
                mark.dead += scratch.add_dead_recipes(&dead)?;
                dead.clear();
            }
        }
        mark.dead += scratch.add_dead_recipes(&dead)?;
        Ok(mark)
    }

    /// The recorded output size of the recipe `addr`.
    pub(super) fn output_size(&self, addr: &CAddr) -> Result<Option<u64>> {
        const CTX: &str = "reading a recorded output size";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(OUTPUT_SIZES).or_storage(CTX)?;
        Ok(table
            .get(addr.as_bytes())
            .or_storage(CTX)?
            .map(|v| v.value()))
    }

    /// Records the output size of the recipe `addr` in a commit that is not durable by itself
    /// (`Durability::None`): it reaches the disk with the next durable commit of this database
    /// (a recipe put, a pin), and a crash before that loses it, as a hint may be lost.
    pub(super) fn record_output_size(&self, addr: &CAddr, size: u64) -> Result<()> {
        const CTX: &str = "recording an output size";
        let mut txn = self.db.begin_write().or_storage(CTX)?;
        txn.set_durability(redb::Durability::None).or_storage(CTX)?;
        txn.open_table(OUTPUT_SIZES)
            .or_storage(CTX)?
            .insert(addr.as_bytes(), size)
            .or_storage(CTX)?;
        txn.commit().or_storage(CTX)
    }

    /// Whether `addr` is a stored recipe.
    pub(super) fn contains(&self, addr: &CAddr) -> Result<bool> {
        Ok(self.missing(std::slice::from_ref(addr))?.is_empty())
    }

    /// The recipes that use `addr` directly as an input.
    pub(super) fn dependents(&self, addr: &CAddr) -> Result<Vec<CAddr>> {
        const CTX: &str = "reading dependents";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
        let mut out = Vec::new();
        for value in table.get(addr.as_bytes()).or_storage(CTX)? {
            out.push(CAddr::from_bytes(*value.or_storage(CTX)?.value()));
        }
        Ok(out)
    }

    /// Overwrites the row of `addr` with a valid depth header followed by bytes that are no
    /// recipe encoding.
    #[cfg(feature = "conformance")]
    pub(super) fn damage_row(&self, addr: &CAddr) -> Result<()> {
        const CTX: &str = "damaging a recipe";
        let txn = self.db.begin_write().or_storage(CTX)?;
        {
            let mut recipes = txn.open_table(RECIPES).or_storage(CTX)?;
            // The depth stays what it was: the listing's index still names the row.
            let depth = match recipes.get(addr.as_bytes()).or_storage(CTX)? {
                Some(row) => decode_depth(addr, row.value())?,
                None => 1,
            };
            let mut row = depth.to_le_bytes().to_vec();
            row.extend_from_slice(&[0xff, 0xff]);
            recipes
                .insert(addr.as_bytes(), row.as_slice())
                .or_storage(CTX)?;
        }
        txn.commit().or_storage(CTX)
    }

    /// At most `limit` recipes whose `(depth, address)` sorts after `after` (from the first
    /// when `None`), in that order, from one read transaction over `recipes_by_depth`.
    pub(super) fn list_page(
        &self,
        after: Option<(u32, CAddr)>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u32)>> {
        const CTX: &str = "listing recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(BY_DEPTH).or_storage(CTX)?;
        let after = after.map(|(depth, addr)| depth_key(depth, &addr));
        let range = table
            .range::<&[u8; 36]>(keys_after(after.as_ref()))
            .or_storage(CTX)?;
        let mut out = Vec::with_capacity(limit.min(super::PAGE_CAPACITY));
        for entry in range.take(limit) {
            let (key, _) = entry.or_storage(CTX)?;
            let key = key.value();
            let depth = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
            let mut addr = [0u8; 32];
            addr.copy_from_slice(&key[4..]);
            out.push((CAddr::from_bytes(addr), depth));
        }
        Ok(out)
    }

    /// Pins `addr` (durably); whether it was not pinned before.
    pub(super) fn pin(&self, addr: &CAddr) -> Result<bool> {
        const CTX: &str = "pinning an address";
        let txn = self.db.begin_write().or_storage(CTX)?;
        let new = {
            let mut pins = txn.open_table(PINS).or_storage(CTX)?;
            if pins.get(addr.as_bytes()).or_storage(CTX)?.is_some() {
                false
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                pins.insert(addr.as_bytes(), now).or_storage(CTX)?;
                true
            }
        };
        if !new {
            txn.abort().or_storage(CTX)?;
            return Ok(false);
        }
        txn.commit().or_storage(CTX)?;
        self.counters.add_pins(1);
        Ok(true)
    }

    /// Unpins `addr`; whether it was pinned.
    pub(super) fn unpin(&self, addr: &CAddr) -> Result<bool> {
        const CTX: &str = "unpinning an address";
        let txn = self.db.begin_write().or_storage(CTX)?;
        let was = txn
            .open_table(PINS)
            .or_storage(CTX)?
            .remove(addr.as_bytes())
            .or_storage(CTX)?
            .is_some();
        if !was {
            txn.abort().or_storage(CTX)?;
            return Ok(false);
        }
        txn.commit().or_storage(CTX)?;
        self.counters.add_pins(-1);
        Ok(true)
    }

    /// Every pinned address, from one read transaction.
    pub(super) fn pins(&self) -> Result<Vec<CAddr>> {
        const CTX: &str = "listing pins";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(PINS).or_storage(CTX)?;
        let mut out = Vec::new();
        for entry in table.iter().or_storage(CTX)? {
            out.push(CAddr::from_bytes(*entry.or_storage(CTX)?.0.value()));
        }
        Ok(out)
    }

    /// Counts the rows of `recipes` by scanning: slow, for consistency checks only.
    pub(super) fn count_by_scan(&self) -> Result<u64> {
        const CTX: &str = "counting recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        table.len().or_storage(CTX)
    }
}

/// Builds `recipes_by_depth` from `recipes` in `txn` if it does not hold one key per recipe
/// (a database from before it existed): one pass over `recipes`, at open.
fn index_depths(txn: &redb::WriteTransaction) -> Result<()> {
    const CTX: &str = "indexing recipes by depth";
    let recipes = txn.open_table(RECIPES).or_storage(CTX)?;
    let mut by_depth = txn.open_table(BY_DEPTH).or_storage(CTX)?;
    let want = recipes.len().or_storage(CTX)?;
    if by_depth.len().or_storage(CTX)? == want {
        return Ok(());
    }
    by_depth.retain(|_, ()| false).or_storage(CTX)?;
    for entry in recipes.iter().or_storage(CTX)? {
        let (key, row) = entry.or_storage(CTX)?;
        let addr = CAddr::from_bytes(*key.value());
        by_depth
            .insert(&depth_key(decode_depth(&addr, row.value())?, &addr), ())
            .or_storage(CTX)?;
    }
    tracing::info!(recipes = want, "indexed the recipes by depth");
    Ok(())
}

/// Whether a recipe uses `addr` (an edge in `dependents`) or `addr` is pinned, in the
/// transaction the tables were opened in.
fn referenced(
    dependents: &impl ReadableMultimapTable<&'static [u8; 32], &'static [u8; 32]>,
    pins: &impl ReadableTable<&'static [u8; 32], u64>,
    addr: &CAddr,
) -> Result<bool> {
    const CTX: &str = "looking up references";
    let used = !dependents.get(addr.as_bytes()).or_storage(CTX)?.is_empty();
    Ok(used || pins.get(addr.as_bytes()).or_storage(CTX)?.is_some())
}

/// What [`RecipeDb::mark`] counted.
#[derive(Debug, Default)]
pub(super) struct RecipeMark {
    pub(super) recipes: u64,
    pub(super) live: u64,
    pub(super) pinned: u64,
    pub(super) corrupted: u64,
    pub(super) dead: u64,
}

/// Marks `roots` live and puts the new ones on the walk's front: how many were new.
fn add_roots(scratch: &Scratch, roots: &[CAddr]) -> Result<u64> {
    const CTX: &str = "marking recipes";
    let write = scratch.write()?;
    let mut new = 0;
    {
        let mut live = write.open_table(gc::LIVE).or_storage(CTX)?;
        let mut front = write.open_table(gc::FRONT).or_storage(CTX)?;
        for root in roots {
            if live.insert(root.as_bytes(), ()).or_storage(CTX)?.is_none() {
                front.insert(root.as_bytes(), ()).or_storage(CTX)?;
                new += 1;
            }
        }
    }
    write.commit().or_storage(CTX)?;
    Ok(new)
}

/// The inputs of the recipe stored in `row` at `addr`; `None` if the row does not decode to
/// a recipe with that address.
fn decode_inputs(addr: &CAddr, row: &[u8]) -> Option<Vec<CAddr>> {
    row.get(4..)
        .and_then(|enc| Recipe::from_canonical_bytes(enc).ok())
        .filter(|r| r.addr() == *addr)
        .map(|r| r.inputs().to_vec())
}

fn decode_depth(addr: &CAddr, row: &[u8]) -> Result<u32> {
    let raw: [u8; 4] = row
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| DerivaError::Corrupted {
            addr: *addr,
            detail: format!(
                "the recipe row is {} bytes, shorter than its depth header",
                row.len()
            ),
        })?;
    Ok(u32::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use deriva_core::{FunctionId, Params};

    fn recipe(inputs: Vec<CAddr>, n: u32) -> Recipe {
        let mut params = Params::new();
        params.insert("n".to_owned(), n.to_string());
        Recipe::new(FunctionId::new("concat", "1").unwrap(), inputs, params).unwrap()
    }

    /// A database written before `recipes_by_depth` existed (here: the table dropped) gets it
    /// when it opens, and its listing pages by depth; a delete takes the recipe's key away.
    #[test]
    fn the_depth_index_is_built_at_open_for_an_older_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deriva.redb");
        let leaf = CAddr::for_leaf(b"leaf");
        let mut expected = Vec::new();
        {
            let db = RecipeDb::open(&path, Arc::default()).unwrap();
            let mut below = leaf;
            for depth in 1..=3u32 {
                let batch: Vec<(CAddr, Recipe)> = (0..4)
                    .map(|i| {
                        let r = recipe(vec![below, leaf], depth * 10 + i);
                        (r.addr(), r)
                    })
                    .collect();
                db.put_batch(&batch).unwrap();
                expected.extend(batch.iter().map(|(a, _)| (*a, depth)));
                below = batch[0].0;
            }
            let txn = db.db.begin_write().unwrap();
            assert!(txn.delete_table(BY_DEPTH).unwrap());
            txn.commit().unwrap();
        }
        expected.sort_by_key(|(a, d)| (*d, *a));
        let db = RecipeDb::open(&path, Arc::default()).unwrap();
        assert_eq!(db.list_page(None, 100).unwrap(), expected);
        let (a, d) = expected[4];
        assert_eq!(db.list_page(Some((d, a)), 3).unwrap(), expected[5..8]);
        assert!(db.delete(&expected[0].0).unwrap());
        assert_eq!(db.list_page(None, 100).unwrap(), expected[1..]);
    }
}
