//! Recipes and the dependency graph in redb.
//!
//! Tables:
//! - `recipes`: recipe address → `depth (u32 LE) ‖ canonical recipe encoding`;
//! - `dependents` (multimap): input address → addresses of the recipes that use it;
//! - `meta`: `"recipe_count"` → number of rows in `recipes`, updated in the same transaction;
//! - `pins`: pinned address → when it was pinned (seconds since the Unix epoch);
//! - `recipe_times`: recipe address → when it was last put (milliseconds since the Unix
//!   epoch), for garbage collection; a recipe without a row (stored by an older version)
//!   counts as put long ago.

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
use deriva_store::{AgedRecipe, StoreCounters, StoredRecipe};

const RECIPES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("recipes");
const DEPENDENTS: MultimapTableDefinition<&[u8; 32], &[u8; 32]> =
    MultimapTableDefinition::new("dependents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RECIPE_COUNT: &str = "recipe_count";
const PINS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("pins");
const RECIPE_TIMES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("recipe_times");
/// The recorded size of each computed output, by recipe: a hint for the memory budget,
/// written without an fsync of its own.
const OUTPUT_SIZES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("output_sizes");
/// A recipe stored again refreshes its time only if the stored one is at least this old: a
/// burst of identical puts commits (and fsyncs) once.
const TOUCH_EVERY_MS: u64 = 1000;

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
            txn.open_table(OUTPUT_SIZES).or_storage(CTX)?;
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
            let recipe = Recipe::from_canonical_bytes(&row.value()[4..]);
            drop(row);
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

    /// Every recipe with its depth, time and inputs (`None` for a row that does not decode),
    /// from one read transaction.
    pub(super) fn list_aged(&self) -> Result<Vec<AgedRecipe>> {
        const CTX: &str = "listing recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let times = txn.open_table(RECIPE_TIMES).or_storage(CTX)?;
        let mut out = Vec::new();
        for entry in table.iter().or_storage(CTX)? {
            let (key, row) = entry.or_storage(CTX)?;
            let addr = CAddr::from_bytes(*key.value());
            let row = row.value();
            let inputs = row
                .get(4..)
                .and_then(|enc| Recipe::from_canonical_bytes(enc).ok())
                .filter(|r| r.addr() == addr)
                .map(|r| r.inputs().to_vec());
            let at = times
                .get(key.value())
                .or_storage(CTX)?
                .map_or(0, |v| v.value());
            out.push(AgedRecipe {
                addr,
                depth: decode_depth(&addr, row).unwrap_or(0),
                at: UNIX_EPOCH + Duration::from_millis(at),
                inputs,
            });
        }
        Ok(out)
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
        txn.open_table(RECIPES)
            .or_storage(CTX)?
            .insert(addr.as_bytes(), &[1, 0, 0, 0, 0xff, 0xff][..])
            .or_storage(CTX)?;
        txn.commit().or_storage(CTX)
    }

    /// Every recipe's address and depth, from one read transaction.
    pub(super) fn list(&self) -> Result<Vec<(CAddr, u32)>> {
        const CTX: &str = "listing recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let mut out =
            Vec::with_capacity(usize::try_from(table.len().or_storage(CTX)?).unwrap_or(0));
        for entry in table.iter().or_storage(CTX)? {
            let (key, row) = entry.or_storage(CTX)?;
            let addr = CAddr::from_bytes(*key.value());
            out.push((addr, decode_depth(&addr, row.value())?));
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
