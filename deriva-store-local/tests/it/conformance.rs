//! The storage conformance suite (`deriva_store::conformance`) run against the local
//! backend: redb for recipes and small leaves, files for larger leaves, in a fresh temporary directory per case.

use async_trait::async_trait;
use deriva_core::{CAddr, Result};
use deriva_store::Store;
use deriva_store::conformance::Harness;
use deriva_store_local::{damage_leaf, damage_recipe_row};
use tempfile::TempDir;

/// One local store's data directory, kept for as long as the case runs.
#[derive(Debug)]
struct LocalHarness {
    dir: TempDir,
}

impl LocalHarness {
    fn new() -> Self {
        Self {
            dir: TempDir::new().expect("temporary directory"),
        }
    }
}

#[async_trait]
impl Harness for LocalHarness {
    async fn open(&self) -> Result<Store> {
        deriva_store_local::open(self.dir.path())
    }

    async fn corrupt_blob(&self, addr: CAddr, bytes: &[u8]) {
        damage_leaf(self.dir.path(), addr, bytes).expect("damaging the leaf");
    }

    async fn corrupt_recipe(&self, addr: CAddr) {
        damage_recipe_row(self.dir.path(), addr).expect("damaging the recipe row");
    }
}

deriva_store::conformance_tests!(LocalHarness::new());
