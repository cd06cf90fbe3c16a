//! [`MemoryBudget`]: a bound on the bytes that materializations hold in memory at once.
//!
//! A compute reserves its inputs' and its output's bytes before it runs and keeps the
//! [`Reservation`] until its output has been handed on (to the cache, the spill directory, or
//! its callers). A reservation that does not fit now waits, first come first served, in a
//! queue of bounded length for a bounded time; one larger than the whole budget, one that finds
//! the queue full, and one that waits too long fail with [`DerivaError::OverBudget`], which
//! names the size and the budget. A task never waits while it holds a reservation, so waits
//! cannot deadlock.
//!
//! Before any input of a recipe is read, the executor also checks the sizes it can know (leaf
//! sizes from the store, recorded output sizes, and what the function says its output will be)
//! against the whole budget, so a `concat` of huge inputs is refused up front.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use deriva_core::{CAddr, DerivaError, Result};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Settings of a [`MemoryBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// The bound, in bytes.
    pub bytes: u64,
    /// Most requests waiting for room at once; one more fails at once.
    pub queue: usize,
    /// Longest a request waits for room.
    pub wait: Duration,
}

impl Default for BudgetConfig {
    /// A quarter of the machine's memory (at least 256 MiB), 64 waiting, 30 s.
    fn default() -> Self {
        Self {
            bytes: default_budget_bytes(),
            queue: 64,
            wait: Duration::from_secs(30),
        }
    }
}

/// A quarter of `MemTotal` from `/proc/meminfo`, at least 256 MiB; 1 GiB where it cannot be
/// read.
pub fn default_budget_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    total.map_or(1 << 30, |t| (t / 4).max(256 << 20))
}

/// Counters of a [`MemoryBudget`], read by the metrics callbacks.
#[derive(Debug, Default)]
pub struct BudgetStats {
    inflight: AtomicU64,
    waiting: AtomicUsize,
    waits: AtomicU64,
    rejections: AtomicU64,
}

impl BudgetStats {
    /// Bytes reserved now.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Requests waiting for room now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed) as u64
    }

    /// Requests that had to wait for room, since start.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Requests refused with `RESOURCE_EXHAUSTED`, since start.
    pub fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
}

/// The bytes a semaphore permit stands for: permits count KiB, so that a budget of any size
/// fits the semaphore's range.
const UNIT: u64 = 1024;

/// Recorded output sizes are forgotten all at once beyond this many (they are hints).
const MAX_RECORDED: usize = 1 << 20;

/// The memory budget; see the module docs. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct MemoryBudget {
    config: BudgetConfig,
    units: Arc<Semaphore>,
    stats: Arc<BudgetStats>,
    /// The size of every recipe output computed, and every leaf read whole, since start.
    /// Recorded sizes, each with whether its address is a leaf (else a recipe's output).
    sizes: Mutex<HashMap<CAddr, (u64, bool)>>,
}

/// Bytes held under a [`MemoryBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
    stats: Arc<BudgetStats>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats.inflight.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryBudget {
    /// A budget of `config.bytes`.
    pub fn new(config: BudgetConfig) -> Self {
        let units = (config.bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            config,
            units: Arc::new(Semaphore::new(units)),
            stats: Arc::default(),
            sizes: Mutex::default(),
        }
    }

    /// The bound, in bytes.
    pub fn bytes(&self) -> u64 {
        self.config.bytes
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<BudgetStats> {
        &self.stats
    }

    /// The size recorded for `addr`: a recipe's output computed since start, or a leaf read.
    pub fn recorded(&self, addr: &CAddr) -> Option<u64> {
        self.sizes.lock().get(addr).map(|&(size, _)| size)
    }

    /// The size recorded for `addr` if it was recorded as a leaf's: then `addr` is known to be
    /// a leaf, and a read needs not ask the store what it is.
    pub fn recorded_leaf(&self, addr: &CAddr) -> Option<u64> {
        self.sizes
            .lock()
            .get(addr)
            .and_then(|&(size, leaf)| leaf.then_some(size))
    }

    /// Records the size of the output `addr`.
    pub fn record(&self, addr: CAddr, size: u64) {
        self.remember(addr, (size, false));
    }

    /// Records the size of the leaf `addr`.
    pub fn record_leaf(&self, addr: CAddr, size: u64) {
        self.remember(addr, (size, true));
    }

    fn remember(&self, addr: CAddr, size: (u64, bool)) {
        let mut sizes = self.sizes.lock();
        if sizes.len() >= MAX_RECORDED && !sizes.contains_key(&addr) {
            sizes.clear();
        }
        sizes.insert(addr, size);
    }

    /// Refuses at once what could never fit: `bytes` over the whole budget.
    pub fn check(&self, what: impl Fn() -> String, bytes: u64) -> Result<()> {
        if bytes > self.config.bytes {
            self.stats.rejections.fetch_add(1, Ordering::Relaxed);
            return Err(self.over(what(), bytes, "it is larger than the whole budget".into()));
        }
        Ok(())
    }

    /// Reserves `bytes`, waiting for room if need be (see the module docs). `what` names the
    /// request for the error.
    pub async fn reserve(&self, what: impl Fn() -> String, bytes: u64) -> Result<Reservation> {
        self.check(&what, bytes)?;
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        let permit = if units == 0 {
            None
        } else {
            Some(match self.units.clone().try_acquire_many_owned(units) {
                Ok(permit) => permit,
                Err(_) => self.wait_for(what, bytes, units).await?,
            })
        };
        self.stats.inflight.fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation {
            _permit: permit,
            bytes,
            stats: self.stats.clone(),
        })
    }

    async fn wait_for(
        &self,
        what: impl Fn() -> String,
        bytes: u64,
        units: u32,
    ) -> Result<OwnedSemaphorePermit> {
        let queued = self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let _leave = Leave(&self.stats.waiting);
        if queued >= self.config.queue {
            self.stats.rejections.fetch_add(1, Ordering::Relaxed);
            return Err(self.over(
                what(),
                bytes,
                format!(
                    "the budget is in use and {} requests already wait for room (--memory-queue)",
                    self.config.queue
                ),
            ));
        }
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let acquired = tokio::time::timeout(
            self.config.wait,
            self.units.clone().acquire_many_owned(units),
        )
        .await;
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(DerivaError::TaskCancelled {
                task: format!("{}: waiting for memory", what()),
            }),
            Err(_) => {
                self.stats.rejections.fetch_add(1, Ordering::Relaxed);
                Err(self.over(
                    what(),
                    bytes,
                    format!(
                        "no room came within {} s (--memory-wait-secs)",
                        self.config.wait.as_secs_f64()
                    ),
                ))
            }
        }
    }

    fn over(&self, what: String, needed: u64, reason: String) -> DerivaError {
        DerivaError::OverBudget {
            what,
            needed,
            budget: self.config.bytes,
            reason,
        }
    }
}

/// Decrements the waiting count when the wait ends, however it ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64, queue: usize, wait_ms: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(BudgetConfig {
            bytes,
            queue,
            wait: Duration::from_millis(wait_ms),
        }))
    }

    #[tokio::test]
    async fn reservations_count_and_give_back() {
        let b = budget(10 << 20, 4, 1000);
        let r1 = b.reserve(|| "one".into(), 4 << 20).await.unwrap();
        let r2 = b.reserve(|| "two".into(), 6 << 20).await.unwrap();
        assert_eq!(b.stats().inflight_bytes(), 10 << 20);
        drop(r1);
        assert_eq!(b.stats().inflight_bytes(), 6 << 20);
        drop(r2);
        assert_eq!(b.stats().inflight_bytes(), 0);
        let _empty = b.reserve(|| "nothing".into(), 0).await.unwrap();
        assert_eq!(b.stats().waits(), 0);
    }

    #[tokio::test]
    async fn larger_than_the_budget_is_refused_at_once_with_size_and_budget() {
        let b = budget(1 << 20, 4, 1000);
        let err = b
            .reserve(|| "materializing X".into(), (1 << 20) + 1)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("materializing X needs 1048577 bytes")
                && text.contains("budget is 1048576 bytes")
                && text.contains("larger than the whole budget"),
            "{text}"
        );
        assert_eq!(b.stats().rejections(), 1);
    }

    #[tokio::test]
    async fn a_request_waits_for_room_then_runs() {
        let b = budget(8 << 20, 4, 60_000);
        let held = b.reserve(|| "first".into(), 6 << 20).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(|| "second".into(), 4 << 20).await })
        };
        crate::testing::wait_until("a waiter", || b.stats().waiting() == 1).await;
        assert_eq!(b.stats().waits(), 1);
        drop(held);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(b.stats().inflight_bytes(), 4 << 20);
        drop(second);
        assert_eq!(b.stats().waiting(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_and_a_long_wait_are_refused() {
        let b = budget(4 << 20, 1, 50);
        let _held = b.reserve(|| "holder".into(), 4 << 20).await.unwrap();
        let err = b.reserve(|| "late".into(), 1 << 20).await.unwrap_err();
        assert!(err.to_string().contains("no room came within"), "{err}");
        let queued = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(|| "queued".into(), 1 << 20).await })
        };
        crate::testing::wait_until("a waiter", || b.stats().waiting() == 1).await;
        let err = b
            .reserve(|| "one too many".into(), 1 << 20)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1 requests already wait"), "{err}");
        assert!(queued.await.unwrap().is_err());
        assert_eq!(b.stats().rejections(), 3);
    }

    #[test]
    fn recorded_sizes_are_kept() {
        let b = budget(1 << 20, 1, 10);
        let a = CAddr::for_leaf(b"a");
        assert_eq!(b.recorded(&a), None);
        b.record(a, 42);
        assert_eq!(b.recorded(&a), Some(42));
    }
}
