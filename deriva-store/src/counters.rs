//! [`StoreCounters`]: the live totals of a store.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::gc;

/// Live totals of a [`Store`](crate::Store), kept as atomics so metrics callbacks and `Status` read them
/// without a scan or a lock. A backend is given them when it opens, loads them then, and keeps
/// them current on every put and delete.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pins: AtomicU64,
    recipes: AtomicU64,
    blobs: AtomicU64,
    blob_bytes: AtomicU64,
    leaf_commits: AtomicU64,
    gc: gc::GcProgress,
}

impl StoreCounters {
    /// How far the running garbage collection got.
    pub fn gc_progress(&self) -> &gc::GcProgress {
        &self.gc
    }

    /// Number of pinned addresses.
    pub fn pins(&self) -> u64 {
        self.pins.load(Ordering::Relaxed)
    }

    /// Sets the pin count (when a backend opens).
    pub fn set_pins(&self, n: u64) {
        self.pins.store(n, Ordering::Relaxed);
    }

    /// Adds `n` pins; a negative `n` removes.
    pub fn add_pins(&self, n: i64) {
        add_signed(&self.pins, n);
    }

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

    /// Sets the recipe count (when a backend opens).
    pub fn set_recipes(&self, n: u64) {
        self.recipes.store(n, Ordering::Relaxed);
    }

    /// Adds `n` new recipes; a negative `n` removes.
    pub fn add_recipes(&self, n: i64) {
        add_signed(&self.recipes, n);
    }

    /// Sets the blob count and bytes (when a backend opens).
    pub fn set_blobs(&self, count: u64, bytes: u64) {
        self.blobs.store(count, Ordering::Relaxed);
        self.blob_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Durable commits a backend made to store leaves, where it batches them (the local
    /// store's small leaves: one fsync per commit, shared by the puts in it).
    pub fn leaf_commits(&self) -> u64 {
        self.leaf_commits.load(Ordering::Relaxed)
    }

    /// Counts one durable commit of leaves.
    pub fn count_leaf_commit(&self) {
        self.leaf_commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one new blob of `bytes` bytes, or with `added == false` one deleted blob.
    pub fn count_blob(&self, added: bool, bytes: u64) {
        if added {
            self.blobs.fetch_add(1, Ordering::Relaxed);
            self.blob_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            add_signed(&self.blobs, -1);
            add_signed(&self.blob_bytes, -(bytes.min(i64::MAX as u64) as i64));
        }
    }
}

/// Adds a signed amount to a counter, never below zero.
fn add_signed(counter: &AtomicU64, n: i64) {
    if n >= 0 {
        counter.fetch_add(n.unsigned_abs(), Ordering::Relaxed);
    } else {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n.unsigned_abs()))
        });
    }
}
