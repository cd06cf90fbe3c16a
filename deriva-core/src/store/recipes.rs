//! Recipes and the dependency graph in redb.
//!
//! Tables:
//! - `recipes`: recipe address → `depth (u32 LE) ‖ canonical recipe encoding`;
//! - `dependents` (multimap): input address → addresses of the recipes that use it;
//! - `meta`: `"recipe_count"` → number of rows in `recipes`, updated in the same transaction.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::StoreCounters;
use crate::addr::CAddr;
use crate::error::{DerivaError, Result};
use crate::recipe::Recipe;

const RECIPES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("recipes");
const DEPENDENTS: MultimapTableDefinition<&[u8; 32], &[u8; 32]> =
    MultimapTableDefinition::new("dependents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RECIPE_COUNT: &str = "recipe_count";

/// Turns any redb error into [`DerivaError::Storage`] with a short context.
trait OrStorage<T> {
    fn or_storage(self, context: &str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> OrStorage<T> for std::result::Result<T, E> {
    fn or_storage(self, context: &str) -> Result<T> {
        self.map_err(|e| DerivaError::storage(context, e.into()))
    }
}

/// A stored recipe with its DAG depth (1 + the deepest input; leaves have depth 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecipe {
    /// The recipe.
    pub recipe: Recipe,
    /// Its depth in the DAG.
    pub depth: u32,
}

#[derive(Debug)]
pub(crate) struct RecipeStore {
    db: Database,
    counters: Arc<StoreCounters>,
}

/// Whether an input address names a blob; passed in so this module needs no blob store.
pub(crate) type IsLeaf<'a> = &'a dyn Fn(&CAddr) -> bool;

impl RecipeStore {
    pub(crate) fn open(path: &Path, counters: Arc<StoreCounters>) -> Result<Self> {
        const CTX: &str = "opening the recipe database";
        let db = Database::create(path)
            .map_err(|e| DerivaError::storage(format!("opening {}", path.display()), e))?;
        let txn = db.begin_write().or_storage(CTX)?;
        let count = {
            txn.open_table(RECIPES).or_storage(CTX)?;
            txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
            let meta = txn.open_table(META).or_storage(CTX)?;
            let count = meta.get(RECIPE_COUNT).or_storage(CTX)?;
            count.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit().or_storage(CTX)?;
        counters.recipes.store(count, Ordering::Relaxed);
        Ok(Self { db, counters })
    }

    /// Inserts recipes in one transaction, in order, so a recipe may use an earlier one of the
    /// batch as an input. Returns how many were new. If any recipe has a missing input, nothing
    /// is stored.
    pub(crate) fn put_batch(&self, batch: &[(CAddr, &Recipe)], is_leaf: IsLeaf<'_>) -> Result<u64> {
        const CTX: &str = "storing a recipe";
        let txn = self.db.begin_write().or_storage(CTX)?;
        let mut added = 0u64;
        {
            let mut recipes = txn.open_table(RECIPES).or_storage(CTX)?;
            let mut dependents = txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
            for (addr, recipe) in batch {
                if recipes.get(addr.as_bytes()).or_storage(CTX)?.is_some() {
                    continue;
                }
                let mut depth = 0u32;
                for input in recipe.inputs() {
                    let input_depth = match recipes.get(input.as_bytes()).or_storage(CTX)? {
                        Some(row) => decode_depth(row.value())?,
                        None if is_leaf(input) => 0,
                        None => return Err(DerivaError::MissingInput { input: *input }),
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
        if added == 0 {
            // Nothing changed: skip the fsync of a commit.
            txn.abort().or_storage(CTX)?;
            return Ok(0);
        }
        txn.commit().or_storage(CTX)?;
        self.counters.recipes.fetch_add(added, Ordering::Relaxed);
        Ok(added)
    }

    pub(crate) fn get(&self, addr: &CAddr) -> Result<Option<StoredRecipe>> {
        const CTX: &str = "reading a recipe";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        let Some(row) = table.get(addr.as_bytes()).or_storage(CTX)? else {
            return Ok(None);
        };
        let row = row.value();
        let depth = decode_depth(row)?;
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

    pub(crate) fn contains(&self, addr: &CAddr) -> Result<bool> {
        const CTX: &str = "reading a recipe";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        Ok(table.get(addr.as_bytes()).or_storage(CTX)?.is_some())
    }

    /// The recipes that use `addr` directly as an input.
    pub(crate) fn dependents(&self, addr: &CAddr) -> Result<Vec<CAddr>> {
        const CTX: &str = "reading dependents";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_multimap_table(DEPENDENTS).or_storage(CTX)?;
        let mut out = Vec::new();
        for value in table.get(addr.as_bytes()).or_storage(CTX)? {
            out.push(CAddr::from_bytes(*value.or_storage(CTX)?.value()));
        }
        Ok(out)
    }

    /// Counts the rows of `recipes` by scanning: slow, for consistency checks only.
    pub(crate) fn count_by_scan(&self) -> Result<u64> {
        const CTX: &str = "counting recipes";
        let txn = self.db.begin_read().or_storage(CTX)?;
        let table = txn.open_table(RECIPES).or_storage(CTX)?;
        table.len().or_storage(CTX)
    }
}

fn decode_depth(row: &[u8]) -> Result<u32> {
    let raw: [u8; 4] = row
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| DerivaError::Storage("recipe row shorter than its depth header".into()))?;
    Ok(u32::from_le_bytes(raw))
}
