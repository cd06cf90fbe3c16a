//! Garbage collection of a [`Store`]: mark what must stay, then sweep the rest, in memory
//! bounded whatever the size of the store.
//!
//! - **Times.** Every leaf and recipe carries the time it was last put; putting it again
//!   refreshes it. `cutoff` is the collection's start (by [`RecipeIndex::clock`]) minus the
//!   grace period.
//! - **Mark** ([`RecipeIndex::mark`], done by the backend where the data is: in PostgreSQL
//!   by set statements into temporary tables, in the local store into a scratch redb file).
//!   The roots are the pins, every recipe put at or after the cutoff, and every recipe whose
//!   stored row does not decode (its recipe is unknown, so it is kept and reported). Live is
//!   everything reachable from a root through the recorded inputs. The candidates are the
//!   recipes that are not live and the leaves that are neither live nor put at or after the
//!   cutoff. The backend keeps them, and hands them out a page at a time ([`Candidates`]):
//!   recipes deepest first (a recipe goes before the recipes it uses), then leaves oldest
//!   first. This process holds one page, never the store's listing.
//! - **Sweep.** At most `max_removals` candidates. Each delete is conditional and made while
//!   writers are held off (this process's, and through [`RecipeIndex::lock_for_sweep`] every
//!   other node's): a recipe goes only if it is still older than the cutoff, unused and
//!   unpinned, a leaf only if no recipe uses it, it is not pinned and it was not put again
//!   since. So a put that raced the mark (a recipe stored over an old leaf, a leaf stored
//!   again, a pin) is never undone, and a crash between two deletes leaves no recipe without
//!   its inputs.
//! - **Progress.** [`StoreCounters::gc_progress`] tells the phase and how far it got, for
//!   metrics (`deriva_gc_phase`) and `deriva gc`'s bar.
//!
//! [`Store::start_gc`] marks and returns a [`Collection`] whose [`Collection::next_batch`]
//! sweeps one batch at a time, so that the caller acts on each batch (drops cached copies,
//! tells other nodes) without keeping the list; [`Store::collect_garbage`] runs it to the end.
//!
//! [`RecipeIndex::clock`]: super::RecipeIndex::clock
//! [`RecipeIndex::mark`]: super::RecipeIndex::mark
//! [`RecipeIndex::lock_for_sweep`]: super::RecipeIndex::lock_for_sweep
//! [`StoreCounters::gc_progress`]: super::StoreCounters::gc_progress

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tracing::{Instrument as _, Span, field::Empty, info_span};

use crate::{AddrKind, Store};
use deriva_core::CAddr;
use deriva_core::Result;
use deriva_core::spans;

/// Deletes made per hold of the writers' lock, at most: the lock is let go in between, so
/// puts wait for one batch, never for a whole sweep.
const SWEEP_BATCH: usize = 64;
/// Candidates a dry run reads per page.
const DRY_RUN_PAGE: usize = 10_000;
/// The longest one hold of the writers' lock lasts before it is let go.
const SWEEP_HOLD: Duration = Duration::from_millis(100);
/// The most removed items a [`GcOutcome`] lists by address; its counts cover them all.
pub const LISTED_REMOVALS: usize = 10_000;

/// What one garbage collection is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Anything put within this time before the collection started stays, reachable or not.
    pub grace: Duration,
    /// Report what would be removed; remove nothing.
    pub dry_run: bool,
    /// Remove at most this many items (leaves and recipes); 0 for no limit.
    pub max_removals: u64,
}

/// One item removed (or, in a dry run, that would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Its address.
    pub addr: CAddr,
    /// A leaf or a recipe.
    pub kind: AddrKind,
    /// Its size in bytes (0 for a recipe).
    pub bytes: u64,
}

/// What one garbage collection of the store found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOutcome {
    /// The first [`LISTED_REMOVALS`] items removed (or that would be, in a dry run), in the
    /// order they went: recipes first, deepest first.
    pub removed: Vec<Removed>,
    /// Whether more were removed than `removed` lists.
    pub removed_truncated: bool,
    /// Leaves removed.
    pub blobs_removed: u64,
    /// Recipes removed.
    pub recipes_removed: u64,
    /// Bytes of the leaves removed.
    pub bytes_reclaimed: u64,
    /// Leaves the mark found that stay.
    pub live_blobs: u64,
    /// Recipes the mark found that stay.
    pub live_recipes: u64,
    /// Pinned addresses.
    pub pinned: u64,
    /// Candidates a conditional delete kept: put again, used or pinned since the mark.
    pub kept: u64,
    /// Recipes whose stored rows do not decode (kept, since their inputs are unknown).
    pub corrupted: u64,
    /// The cutoff: what was put before it and is unreachable was eligible.
    pub cutoff: Option<SystemTime>,
}

/// What a backend's mark counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MarkTally {
    /// Leaves stored when the mark ran.
    pub leaves: u64,
    /// Recipes stored when the mark ran.
    pub recipes: u64,
    /// Addresses found live (pinned, recent, or reachable from those).
    pub live: u64,
    /// Pinned addresses.
    pub pinned: u64,
    /// Recipes whose stored rows do not decode, kept with everything they reach.
    pub corrupted: u64,
    /// Candidates: dead recipes and old dead leaves.
    pub candidates: u64,
}

/// What [`RecipeIndex::mark`](crate::RecipeIndex::mark) returns: its tally, and the candidates
/// it keeps.
pub type Mark = (MarkTally, Box<dyn Candidates>);

/// The candidates of one collection, kept by the backend that marked them (a temporary
/// table, a scratch file) until this is dropped.
#[async_trait]
pub trait Candidates: Send {
    /// At most `limit` more candidates (`limit` ≥ 1), in sweep order: every dead recipe,
    /// deepest first, then every dead leaf, oldest first. Empty once all were given.
    async fn next(&mut self, limit: usize) -> Result<Vec<Removed>>;
}

/// Which step a garbage collection is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GcPhase {
    /// None runs.
    Idle = 0,
    /// Finding what stays.
    Mark = 1,
    /// Removing (or, in a dry run, listing) the candidates.
    Sweep = 2,
}

impl GcPhase {
    /// Every phase, in order.
    pub const ALL: [GcPhase; 3] = [GcPhase::Idle, GcPhase::Mark, GcPhase::Sweep];

    /// Its name in metrics and in `deriva gc`'s bar.
    pub fn as_str(self) -> &'static str {
        match self {
            GcPhase::Idle => "idle",
            GcPhase::Mark => "mark",
            GcPhase::Sweep => "sweep",
        }
    }
}

/// How far the running garbage collection of a store got: read by metrics callbacks and
/// progress requests without a lock.
#[derive(Debug, Default)]
pub struct GcProgress {
    phase: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
}

impl GcProgress {
    /// The phase, and in it how many items were done of how many (the total is 0 while
    /// unknown).
    pub fn get(&self) -> (GcPhase, u64, u64) {
        let phase = match self.phase.load(Ordering::Relaxed) {
            1 => GcPhase::Mark,
            2 => GcPhase::Sweep,
            _ => GcPhase::Idle,
        };
        (
            phase,
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Enters `phase`, with `total` items to do.
    pub fn enter(&self, phase: GcPhase, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Counts `n` more items done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// Sets the progress back to idle when the collection ends, however it ends.
struct Idle<'a>(&'a GcProgress);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.enter(GcPhase::Idle, 0);
    }
}

/// One garbage collection, marked and being swept: see the [module docs](self).
pub struct Collection<'a> {
    store: &'a Store,
    dry_run: bool,
    cutoff: SystemTime,
    tally: MarkTally,
    candidates: Box<dyn Candidates>,
    /// Fetched, not yet swept.
    pending: VecDeque<Removed>,
    /// Removals still allowed.
    left: u64,
    exhausted: bool,
    outcome: GcOutcome,
    sweep: Span,
    _idle: Idle<'a>,
    _one: tokio::sync::MutexGuard<'a, ()>,
}

impl std::fmt::Debug for Collection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("dry_run", &self.dry_run)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts a garbage collection (see the [module docs](self)): waits for any other of
    /// this store to end, then marks, in a `mark` span, child of the caller's.
    pub async fn start_gc(&self, options: &GcOptions) -> Result<Collection<'_>> {
        let one = self.collecting.lock().await;
        let progress = self.counters.gc_progress();
        let idle = Idle(progress);
        let now = self.recipes.clock().await?;
        let cutoff = now.checked_sub(options.grace).unwrap_or(UNIX_EPOCH);
        let mark = info_span!(
            spans::GC_MARK,
            { spans::field::LIVE } = Empty,
            { spans::field::CANDIDATES } = Empty,
        );
        progress.enter(
            GcPhase::Mark,
            self.counters.recipes() + self.counters.blobs(),
        );
        let (tally, candidates) = self.recipes.mark(cutoff).instrument(mark.clone()).await?;
        mark.record(spans::field::LIVE, tally.live as i64);
        mark.record(spans::field::CANDIDATES, tally.candidates as i64);
        let left = match options.max_removals {
            0 => u64::MAX,
            n => n,
        };
        progress.enter(GcPhase::Sweep, tally.candidates.min(left));
        let sweep = info_span!(
            spans::GC_SWEEP,
            { spans::field::DRY_RUN } = options.dry_run,
            { spans::field::REMOVED } = Empty,
            { spans::field::KEPT } = Empty,
        );
        Ok(Collection {
            store: self,
            dry_run: options.dry_run,
            cutoff,
            tally,
            candidates,
            pending: VecDeque::new(),
            left,
            exhausted: false,
            outcome: GcOutcome {
                pinned: tally.pinned,
                corrupted: tally.corrupted,
                cutoff: Some(cutoff),
                ..GcOutcome::default()
            },
            sweep,
            _idle: idle,
            _one: one,
        })
    }

    /// Collects garbage (see the [module docs](self)): [`Store::start_gc`], then every batch.
    pub async fn collect_garbage(&self, options: &GcOptions) -> Result<GcOutcome> {
        let mut collection = self.start_gc(options).await?;
        while collection.next_batch().await?.is_some() {}
        Ok(collection.finish())
    }
}

impl Collection<'_> {
    /// What the mark counted.
    pub fn tally(&self) -> MarkTally {
        self.tally
    }

    /// Sweeps the next batch (in a dry run: lists it) in the `sweep` span, and returns what
    /// it removed; `None` once the sweep is over.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Removed>>> {
        let span = self.sweep.clone();
        self.sweep_batch().instrument(span).await
    }

    async fn sweep_batch(&mut self) -> Result<Option<Vec<Removed>>> {
        let want = if self.dry_run {
            DRY_RUN_PAGE
        } else {
            SWEEP_BATCH
        };
        if self.left == 0 {
            return Ok(None);
        }
        if self.pending.is_empty() && !self.exhausted {
            let page = self.candidates.next(want).await?;
            self.exhausted = page.is_empty();
            self.pending.extend(page);
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        let removed = if self.dry_run {
            let n = self
                .pending
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            self.pending.drain(..n).collect::<Vec<_>>()
        } else {
            self.delete_some().await?
        };
        self.left -= removed.len() as u64;
        self.count(&removed);
        Ok(Some(removed))
    }

    /// Deletes pending candidates, each only if it is still eligible, under the writers'
    /// lock: at most [`SWEEP_BATCH`], in runs of one kind (one statement each on a backend
    /// that batches), until [`SWEEP_HOLD`] has passed.
    async fn delete_some(&mut self) -> Result<Vec<Removed>> {
        let store = self.store;
        let _writers = store.writers.write().await;
        let _others = store.recipes.lock_for_sweep().await?;
        let held = Instant::now();
        let mut removed = Vec::new();
        let mut tried = 0u64;
        let budget = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(SWEEP_BATCH);
        while removed.len() < budget && held.elapsed() <= SWEEP_HOLD {
            let Some(kind) = self.pending.front().map(|c| c.kind) else {
                break;
            };
            let mut run = Vec::new();
            while run.len() < budget - removed.len()
                && let Some(next) = self.pending.front()
                && next.kind == kind
            {
                run.push(self.pending.pop_front().expect("peeked"));
            }
            tried += run.len() as u64;
            let addrs: Vec<CAddr> = run.iter().map(|c| c.addr).collect();
            let gone: Vec<Removed> = match kind {
                AddrKind::Recipe => {
                    let deleted = store.recipes.delete_unused_many(addrs, self.cutoff).await?;
                    run.iter()
                        .filter(|c| deleted.contains(&c.addr))
                        .copied()
                        .collect()
                }
                AddrKind::Leaf => {
                    let free = store.recipes.unreferenced(addrs).await?;
                    let deleted = store.blobs.delete_older_many(free, self.cutoff).await?;
                    run.iter()
                        .filter_map(|c| {
                            let (_, bytes) = deleted.iter().find(|(a, _)| *a == c.addr)?;
                            Some(Removed {
                                bytes: *bytes,
                                ..*c
                            })
                        })
                        .collect()
                }
            };
            self.outcome.kept += (run.len() - gone.len()) as u64;
            removed.extend(gone);
        }
        store.counters.gc_progress().advance(tried);
        Ok(removed)
    }

    /// Adds a batch to the outcome.
    fn count(&mut self, batch: &[Removed]) {
        let outcome = &mut self.outcome;
        for removed in batch {
            match removed.kind {
                AddrKind::Leaf => {
                    outcome.blobs_removed += 1;
                    outcome.bytes_reclaimed += removed.bytes;
                }
                AddrKind::Recipe => outcome.recipes_removed += 1,
            }
            if outcome.removed.len() < LISTED_REMOVALS {
                outcome.removed.push(*removed);
            } else {
                outcome.removed_truncated = true;
            }
        }
        if self.dry_run {
            self.store
                .counters
                .gc_progress()
                .advance(batch.len() as u64);
        }
    }

    /// Ends the collection (whatever was not swept yet stays) and reports it.
    pub fn finish(self) -> GcOutcome {
        let mut outcome = self.outcome;
        self.sweep.record(
            spans::field::REMOVED,
            (outcome.blobs_removed + outcome.recipes_removed) as i64,
        );
        self.sweep.record(spans::field::KEPT, outcome.kept as i64);
        outcome.live_blobs = self.tally.leaves.saturating_sub(outcome.blobs_removed);
        outcome.live_recipes = self.tally.recipes.saturating_sub(outcome.recipes_removed);
        outcome
    }
}
