//! Garbage collection of a [`Store`]: mark what must stay, then sweep the rest.
//!
//! - **Times.** Every leaf and recipe carries the time it was last put; putting it again
//!   refreshes it. `cutoff` is the collection's start (by [`RecipeIndex::clock`]) minus the
//!   grace period.
//! - **Mark.** The roots are the pins, every recipe put at or after the cutoff, and every
//!   recipe whose stored row does not decode (its inputs are unknown, so it is kept and
//!   reported). Live is everything reachable from a root through recipe inputs.
//! - **Sweep.** The candidates are the recipes that are not live and the leaves that are neither
//!   live nor put at or after the cutoff: recipes deepest first, then leaves, at most
//!   `max_removals`. Each delete is conditional and made while writers are held off (this
//!   process's, and through [`RecipeIndex::lock_for_sweep`] every other node's): a recipe goes
//!   only if it is still older than the cutoff, unused and unpinned, a leaf only if no recipe
//!   uses it, it is not pinned and it was not put again since. So a put that raced the mark
//!   (a recipe stored over an old leaf, a leaf stored again, a pin) is never undone, and a crash
//!   between two deletes leaves no recipe without its inputs.
//!
//! [`RecipeIndex::clock`]: super::RecipeIndex::clock
//! [`RecipeIndex::lock_for_sweep`]: super::RecipeIndex::lock_for_sweep

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{Instrument as _, field::Empty, info_span};

use crate::{AddrKind, Store};
use deriva_core::CAddr;
use deriva_core::Result;
use deriva_core::spans;

/// Deletes made per hold of the writers' lock, at most: the lock is let go in between, so
/// puts wait for one batch, never for a whole sweep.
const SWEEP_BATCH: usize = 64;
/// The longest one hold of the writers' lock lasts before it is let go.
const SWEEP_HOLD: Duration = Duration::from_millis(100);

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
    /// What was removed (or would be, in a dry run), recipes first, deepest first.
    pub removed: Vec<Removed>,
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

/// What the mark found: the candidates, in the order they are swept.
struct Marked {
    candidates: Vec<Removed>,
    leaves: u64,
    recipes: u64,
    pinned: u64,
    corrupted: u64,
}

impl Store {
    /// Collects garbage (see the [module docs](self)): one collection at a time per store.
    /// The `mark` and `sweep` spans are children of the caller's.
    pub async fn collect_garbage(&self, options: &GcOptions) -> Result<GcOutcome> {
        let _one = self.collecting.lock().await;
        let now = self.recipes.clock().await?;
        let cutoff = now.checked_sub(options.grace).unwrap_or(UNIX_EPOCH);
        let mark = info_span!(
            spans::GC_MARK,
            { spans::field::LIVE } = Empty,
            { spans::field::CANDIDATES } = Empty,
        );
        let marked = self.mark(cutoff).instrument(mark).await?;
        let mut outcome = GcOutcome {
            pinned: marked.pinned,
            corrupted: marked.corrupted,
            cutoff: Some(cutoff),
            ..GcOutcome::default()
        };
        let limit = match options.max_removals {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let sweep = info_span!(
            spans::GC_SWEEP,
            { spans::field::DRY_RUN } = options.dry_run,
            { spans::field::REMOVED } = Empty,
            { spans::field::KEPT } = Empty,
        );
        let candidates = marked.candidates;
        async {
            if options.dry_run {
                outcome.removed = candidates.into_iter().take(limit).collect();
            } else {
                self.sweep(candidates, cutoff, limit, &mut outcome).await?;
            }
            let span = tracing::Span::current();
            span.record(spans::field::REMOVED, outcome.removed.len() as i64);
            span.record(spans::field::KEPT, outcome.kept as i64);
            Ok::<_, deriva_core::DerivaError>(())
        }
        .instrument(sweep)
        .await?;
        for removed in &outcome.removed {
            match removed.kind {
                AddrKind::Leaf => {
                    outcome.blobs_removed += 1;
                    outcome.bytes_reclaimed += removed.bytes;
                }
                AddrKind::Recipe => outcome.recipes_removed += 1,
            }
        }
        outcome.live_blobs = marked.leaves.saturating_sub(outcome.blobs_removed);
        outcome.live_recipes = marked.recipes.saturating_sub(outcome.recipes_removed);
        Ok(outcome)
    }

    /// Lists pins, recipes and leaves, and returns what is unreachable and old enough.
    async fn mark(&self, cutoff: SystemTime) -> Result<Marked> {
        let pins: Vec<CAddr> = self.recipes.pins().await?;
        let recipes = self.recipes.list_aged().await?;
        let leaves = self.blobs.list_aged().await?;
        let by_addr: HashMap<CAddr, &Option<Vec<CAddr>>> =
            recipes.iter().map(|r| (r.addr, &r.inputs)).collect();
        let mut corrupted = 0u64;
        let mut stack: Vec<CAddr> = pins.clone();
        for recipe in &recipes {
            if recipe.inputs.is_none() {
                corrupted += 1;
                tracing::error!(addr = %recipe.addr, "a stored recipe does not decode; garbage collection keeps it and its inputs are not marked");
                stack.push(recipe.addr);
            } else if recipe.at >= cutoff {
                stack.push(recipe.addr);
            }
        }
        let mut live: HashSet<CAddr> = HashSet::new();
        while let Some(addr) = stack.pop() {
            if live.insert(addr)
                && let Some(Some(inputs)) = by_addr.get(&addr)
            {
                stack.extend(inputs.iter().filter(|i| !live.contains(i)));
            }
        }
        let mut dead_recipes: Vec<(u32, CAddr)> = recipes
            .iter()
            .filter(|r| !live.contains(&r.addr))
            .map(|r| (r.depth, r.addr))
            .collect();
        // Deepest first: a recipe goes before the recipes it uses.
        dead_recipes.sort_by(|a, b| b.cmp(a));
        let mut candidates: Vec<Removed> = dead_recipes
            .into_iter()
            .map(|(_, addr)| Removed {
                addr,
                kind: AddrKind::Recipe,
                bytes: 0,
            })
            .collect();
        // Then the leaves, oldest first.
        let mut dead_leaves: Vec<_> = leaves
            .iter()
            .filter(|l| l.at < cutoff && !live.contains(&l.addr))
            .collect();
        dead_leaves.sort_by_key(|l| (l.at, l.addr));
        candidates.extend(dead_leaves.into_iter().map(|l| Removed {
            addr: l.addr,
            kind: AddrKind::Leaf,
            bytes: l.size,
        }));
        let span = tracing::Span::current();
        span.record(spans::field::LIVE, live.len() as i64);
        span.record(spans::field::CANDIDATES, candidates.len() as i64);
        Ok(Marked {
            candidates,
            leaves: leaves.len() as u64,
            recipes: recipes.len() as u64,
            pinned: pins.len() as u64,
            corrupted,
        })
    }

    /// Deletes the candidates, each only if it is still eligible, in batches that hold off
    /// writers.
    async fn sweep(
        &self,
        candidates: Vec<Removed>,
        cutoff: SystemTime,
        limit: usize,
        outcome: &mut GcOutcome,
    ) -> Result<()> {
        let mut pending = candidates.into_iter().peekable();
        while pending.peek().is_some() && outcome.removed.len() < limit {
            let _writers = self.writers.write().await;
            let _others = self.recipes.lock_for_sweep().await?;
            let held = Instant::now();
            for _ in 0..SWEEP_BATCH {
                if outcome.removed.len() >= limit || held.elapsed() > SWEEP_HOLD {
                    break;
                }
                let Some(candidate) = pending.next() else {
                    break;
                };
                let gone = match candidate.kind {
                    AddrKind::Recipe => self
                        .recipes
                        .delete_if_unused(candidate.addr, cutoff)
                        .await?
                        .then_some(0),
                    AddrKind::Leaf if self.recipes.is_referenced(candidate.addr).await? => None,
                    AddrKind::Leaf => self.blobs.delete_if_older(candidate.addr, cutoff).await?,
                };
                if let Some(bytes) = gone {
                    outcome.removed.push(Removed { bytes, ..candidate });
                } else {
                    outcome.kept += 1;
                }
            }
        }
        Ok(())
    }
}
