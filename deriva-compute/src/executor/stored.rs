//! What the engine answers straight from the store, for the server: leaves written, the recipe
//! stored at an address, pins, and the store's counts. The service reaches the store only
//! through these and the engine's other methods, so the server has one road down.

use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{CAddr, Recipe, Result};
use deriva_store::{ByteStream, StoreCounters};

use super::AsyncExecutor;

impl AsyncExecutor {
    /// Stores `data` as a leaf; returns its address.
    pub async fn put_leaf(&self, data: Bytes) -> Result<CAddr> {
        self.state.store.put_leaf(data).await
    }

    /// Stores the leaf whose bytes `chunks` yields, written and hashed as they come; returns
    /// its address, known only at the end. A stream that ends with an error stores nothing,
    /// and its error is the answer.
    pub async fn put_leaf_stream(&self, chunks: ByteStream) -> Result<CAddr> {
        let (addr, _) = self.state.store.blobs().put_unaddressed(chunks).await?;
        Ok(addr)
    }

    /// The recipe stored at `addr`, if `addr` is a recipe's (a leaf's or an unknown address
    /// is `None`).
    pub async fn recipe(&self, addr: CAddr) -> Result<Option<Recipe>> {
        let stored = self.state.store.get_recipe(addr).await?;
        Ok(stored.map(|stored| stored.recipe))
    }

    /// Pins `addr`, keeping it (and what it needs) from garbage collection; returns whether
    /// it was not pinned already.
    pub async fn pin(&self, addr: CAddr) -> Result<bool> {
        self.state.store.pin(addr).await
    }

    /// Unpins `addr`; returns whether it was pinned.
    pub async fn unpin(&self, addr: CAddr) -> Result<bool> {
        self.state.store.unpin(addr).await
    }

    /// Every pinned address.
    pub async fn pins(&self) -> Result<Vec<CAddr>> {
        self.state.store.pins().await
    }

    /// The store's live counts: recipes, leaves and their bytes, pins.
    pub fn store_counters(&self) -> &Arc<StoreCounters> {
        self.state.store.counters()
    }
}
