//! The storage conformance suite (`deriva_core::store::conformance`) run against the local
//! backend: redb for recipes, files for leaf bytes, in a fresh temporary directory per case.

use std::fs;
use std::path::PathBuf;

use async_trait::async_trait;
use deriva_core::store::conformance::Harness;
use deriva_core::store::local::{BLOB_DIR, damage_recipe_row};
use deriva_core::{CAddr, Result, Store};
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

    /// Where the local backend keeps the bytes of `addr`: `blobs/<first 2 hex>/<64 hex>`.
    fn blob_path(&self, addr: CAddr) -> PathBuf {
        let hex = addr.to_hex();
        self.dir.path().join(BLOB_DIR).join(&hex[..2]).join(hex)
    }
}

#[async_trait]
impl Harness for LocalHarness {
    async fn open(&self) -> Result<Store> {
        Store::open(self.dir.path())
    }

    async fn corrupt_blob(&self, addr: CAddr, bytes: &[u8]) {
        let path = self.blob_path(addr);
        assert!(path.is_file(), "no blob file at {}", path.display());
        fs::write(&path, bytes).expect("overwriting the blob file");
    }

    async fn corrupt_recipe(&self, addr: CAddr) {
        damage_recipe_row(self.dir.path(), addr).expect("damaging the recipe row");
    }
}

deriva_core::conformance_tests!(LocalHarness::new());
