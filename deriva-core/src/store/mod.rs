//! The durable [`Store`]: recipes and the dependency graph in redb, leaf bytes in
//! content-addressed files. See the crate docs for the directory layout.

mod blobs;
mod recipes;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::addr::CAddr;
use crate::error::{DerivaError, Result};
use crate::recipe::Recipe;

pub use recipes::StoredRecipe;

/// Name of the redb file inside the data directory.
pub const DB_FILE: &str = "deriva.redb";
/// Name of the blob directory inside the data directory.
pub const BLOB_DIR: &str = "blobs";

/// Live totals of a [`Store`], kept as atomics so metrics callbacks and `Status` read them
/// without a scan or a lock. They are loaded when the store opens and updated on every new put.
#[derive(Debug, Default)]
pub struct StoreCounters {
    recipes: AtomicU64,
    blobs: AtomicU64,
    blob_bytes: AtomicU64,
}

impl StoreCounters {
    /// Number of stored recipes.
    pub fn recipes(&self) -> u64 {
        self.recipes.load(Ordering::Relaxed)
    }

    /// Number of stored leaf blobs.
    pub fn blobs(&self) -> u64 {
        self.blobs.load(Ordering::Relaxed)
    }

    /// Total size of the stored leaf blobs, in bytes.
    pub fn blob_bytes(&self) -> u64 {
        self.blob_bytes.load(Ordering::Relaxed)
    }
}

/// What an address names in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrKind {
    /// A leaf blob.
    Leaf,
    /// A recipe.
    Recipe,
}

/// The durable store. All methods take `&self` and are safe to call from many threads; they
/// block on disk I/O, so async callers should use a blocking-friendly context for large blobs.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    recipes: recipes::RecipeStore,
    blobs: blobs::BlobStore,
    counters: Arc<StoreCounters>,
}

impl Store {
    /// Opens the store in `dir`, creating it if needed. Removes leftover temporary blob files
    /// and loads the counters.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| DerivaError::storage(format!("creating {}", dir.display()), e))?;
        let counters = Arc::new(StoreCounters::default());
        let recipes = recipes::RecipeStore::open(&dir.join(DB_FILE), counters.clone())?;
        let blobs = blobs::BlobStore::open(&dir.join(BLOB_DIR), counters.clone())?;
        tracing::info!(
            dir = %dir.display(),
            recipes = counters.recipes(),
            blobs = counters.blobs(),
            blob_bytes = counters.blob_bytes(),
            "store opened"
        );
        Ok(Self {
            dir: dir.to_owned(),
            recipes,
            blobs,
            counters,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live counters, shareable with metrics callbacks.
    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
    }

    /// Stores a leaf durably (fsynced before this returns) and returns its address.
    pub fn put_leaf(&self, data: &[u8]) -> Result<CAddr> {
        self.blobs.put(data)
    }

    /// Reads a leaf, verifying its hash. `Ok(None)` if there is no leaf at `addr`;
    /// [`DerivaError::Corrupted`] if the stored bytes do not match the address.
    pub fn get_leaf(&self, addr: &CAddr) -> Result<Option<Bytes>> {
        self.blobs.get(addr)
    }

    /// Stores a recipe durably and returns its address. Every input must already be a leaf or
    /// a recipe ([`DerivaError::MissingInput`] otherwise). Storing the same recipe again is a
    /// no-op.
    pub fn put_recipe(&self, recipe: &Recipe) -> Result<CAddr> {
        Ok(self.put_recipes(std::slice::from_ref(recipe))?[0])
    }

    /// Stores several recipes in one transaction (one fsync), in order: a recipe may use an
    /// earlier recipe of the same batch as an input. All or nothing: if any input is missing,
    /// nothing is stored. Returns the addresses, in order.
    pub fn put_recipes(&self, recipes: &[Recipe]) -> Result<Vec<CAddr>> {
        let batch: Vec<(CAddr, &Recipe)> = recipes.iter().map(|r| (r.addr(), r)).collect();
        let is_leaf = |a: &CAddr| self.blobs.contains(a);
        self.recipes.put_batch(&batch, &is_leaf)?;
        Ok(batch.into_iter().map(|(addr, _)| addr).collect())
    }

    /// Reads a recipe and its DAG depth. `Ok(None)` if there is no recipe at `addr`.
    pub fn get_recipe(&self, addr: &CAddr) -> Result<Option<StoredRecipe>> {
        self.recipes.get(addr)
    }

    /// What `addr` names, if anything.
    pub fn kind_of(&self, addr: &CAddr) -> Result<Option<AddrKind>> {
        if self.recipes.contains(addr)? {
            Ok(Some(AddrKind::Recipe))
        } else if self.blobs.contains(addr) {
            Ok(Some(AddrKind::Leaf))
        } else {
            Ok(None)
        }
    }

    /// The recipes that use `addr` directly as an input.
    pub fn dependents(&self, addr: &CAddr) -> Result<Vec<CAddr>> {
        self.recipes.dependents(addr)
    }

    /// Every recipe that depends on `addr`, directly or through other recipes, in breadth-first
    /// order, each once. `addr` itself is not included.
    pub fn transitive_dependents(&self, addr: &CAddr) -> Result<Vec<CAddr>> {
        let mut seen = HashSet::from([*addr]);
        let mut queue = VecDeque::from([*addr]);
        let mut out = Vec::new();
        while let Some(next) = queue.pop_front() {
            for dep in self.recipes.dependents(&next)? {
                if seen.insert(dep) {
                    out.push(dep);
                    queue.push_back(dep);
                }
            }
        }
        Ok(out)
    }

    /// Counts recipes by scanning the table; for health checks and consistency tests, not for
    /// hot paths (use [`Store::counters`]).
    pub fn count_recipes_by_scan(&self) -> Result<u64> {
        self.recipes.count_by_scan()
    }
}
