//! Maintenance: invalidation (plain and cascading, here and, through the bus, on the other
//! nodes) and garbage collection, and the evictions both make in this node's cache and spill
//! directory.

use std::time::{Duration, Instant};

use deriva_core::{CAddr, DerivaError, Result};
use deriva_store::AddrKind;
use deriva_store::gc::{GcOptions, GcOutcome, Removed};
use tracing::field::Empty;
use tracing::{Instrument, Span, info_span};

use super::{AsyncExecutor, as_i64};
use crate::metrics::GcResult;
use crate::spans::{self, field};

/// What [`AsyncExecutor::invalidate`] evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidateReport {
    /// Whether the address itself was cached.
    pub was_cached: bool,
    /// Every address removed from the cache, the requested one first if it was cached.
    pub evicted: Vec<CAddr>,
}

/// What [`AsyncExecutor::cascade_invalidate`] does with the addresses it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CascadePolicy {
    /// Evict them (the default).
    #[default]
    Immediate,
    /// Report what would be evicted; change nothing.
    DryRun,
    /// Do nothing.
    None,
}

impl CascadePolicy {
    /// Every policy, in the order of [`CascadePolicy::as_str`]'s labels.
    pub const ALL: [CascadePolicy; 3] = [Self::Immediate, Self::DryRun, Self::None];

    /// The policy a client names: `dry_run` or `dryrun`, `none` (any case); anything else is
    /// `immediate`.
    pub fn parse(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "dry_run" | "dryrun" => Self::DryRun,
            "none" => Self::None,
            _ => Self::Immediate,
        }
    }

    /// The label: `immediate`, `dry_run` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::DryRun => "dry_run",
            Self::None => "none",
        }
    }
}

/// What [`AsyncExecutor::cascade_invalidate`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CascadeReport {
    /// Whether the requested address itself was held (cached or spilled) and evicted (or
    /// would be, in a dry run).
    pub was_cached: bool,
    /// The addresses evicted (or that would be), the requested one first if it was.
    pub evicted: Vec<CAddr>,
    /// The addresses examined: the root if included, and every transitive dependent.
    pub traversed: u64,
    /// The longest distance from the root to a dependent (0 without dependents).
    pub max_depth: u32,
    /// The bytes of the evicted outputs (in memory and in the spill directory).
    pub bytes_reclaimed: u64,
    /// How long it took.
    pub duration: Duration,
}

/// What [`AsyncExecutor::garbage_collect`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// What the store's collection found and removed.
    pub store: GcOutcome,
    /// Outputs of removed recipes this node held (in memory or spilled) and dropped (or, in a
    /// dry run, would drop). Removed leaves leave the cache too, but count as leaves only, in
    /// `store`.
    pub cache_entries_removed: u64,
    /// Their bytes.
    pub bytes_reclaimed_cache: u64,
    /// Whether nothing was removed, only reported.
    pub dry_run: bool,
    /// How long it took.
    pub duration: Duration,
}

impl AsyncExecutor {
    /// Evicts `addr` from the cache and, with `cascade`, every recipe that depends on it
    /// directly or transitively. [`DerivaError::NotFound`] if the store does not know `addr`.
    /// The same as [`AsyncExecutor::cascade_invalidate`] with [`CascadePolicy::Immediate`] and
    /// the root included.
    pub async fn invalidate(&self, addr: CAddr, cascade: bool) -> Result<InvalidateReport> {
        let report = self
            .cascade_invalidate(addr, cascade, CascadePolicy::Immediate, true)
            .await?;
        Ok(InvalidateReport {
            was_cached: report.was_cached,
            evicted: report.evicted,
        })
    }

    /// Invalidates `addr` (if `include_root`) and, with `cascade`, every recipe that depends
    /// on it directly or transitively: each is evicted from the memory cache and the spill
    /// directory of this node, from the shared output tier, and (through the store's
    /// [`deriva_store::InvalidationBus`]) from the other nodes. [`CascadePolicy::DryRun`]
    /// reports what would be evicted and changes nothing; [`CascadePolicy::None`] does
    /// nothing. [`DerivaError::NotFound`] if the store does not know `addr`.
    ///
    /// An invalidation wins over computes already running: their outputs are not kept, and
    /// the next request starts a new materialization rather than joining theirs.
    pub async fn cascade_invalidate(
        &self,
        addr: CAddr,
        cascade: bool,
        policy: CascadePolicy,
        include_root: bool,
    ) -> Result<CascadeReport> {
        let span = info_span!(
            spans::INVALIDATE,
            { field::ADDR } = %addr,
            { field::CASCADE } = cascade,
            { field::POLICY } = policy.as_str(),
            { field::EVICTED } = Empty
        );
        async move {
            let start = Instant::now();
            self.state.stats.record_cascade(policy);
            if self.state.store.kind_of(addr).await?.is_none() {
                return Err(DerivaError::NotFound { addr });
            }
            if policy == CascadePolicy::None {
                Span::current().record(field::EVICTED, 0i64);
                return Ok(CascadeReport::default());
            }
            let dependents = if cascade {
                self.state
                    .store
                    .transitive_dependents_with_distance(addr)
                    .await?
            } else {
                Vec::new()
            };
            let max_depth = dependents.iter().map(|(_, d)| *d).max().unwrap_or(0);
            let mut targets: Vec<CAddr> = dependents.into_iter().map(|(a, _)| a).collect();
            if include_root {
                targets.insert(0, addr);
            }
            let mut report = CascadeReport {
                traversed: targets.len() as u64,
                max_depth,
                ..CascadeReport::default()
            };
            for target in &targets {
                let size = self.held_size(target);
                let gone = match policy {
                    CascadePolicy::DryRun => size.is_some(),
                    _ => self.forget(target),
                };
                if gone {
                    report.evicted.push(*target);
                    report.bytes_reclaimed += size.unwrap_or(0);
                    report.was_cached |= *target == addr;
                }
            }
            if policy == CascadePolicy::Immediate && !targets.is_empty() {
                // The other nodes and the shared output tier forget them too. Both are
                // remote: a failure is the call's error (the client retries), never
                // half-silent.
                if let Some(outputs) = self.state.store.outputs() {
                    futures::future::try_join_all(targets.iter().map(|a| outputs.delete(*a)))
                        .await?;
                }
                // Their records go with them: the next compute makes new ones.
                if let Some(records) = self.state.store.records() {
                    records.delete(&targets).await?;
                }
                if let Some(bus) = self.state.store.bus() {
                    bus.publish(&targets).await?;
                }
            }
            report.duration = start.elapsed();
            Span::current().record(field::EVICTED, as_i64(report.evicted.len()));
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Collects garbage in the store (see [`deriva_store::gc`]), and after each swept batch
    /// drops the outputs of its removed recipes from this node's cache and spill directory,
    /// from the shared output tier and (through the bus) from the other nodes' caches, and its
    /// removed leaves from this node's cache and (through the bus) the other nodes'. This
    /// process holds one batch at a time, whatever the store's size. So once this returns, no
    /// Get on this node serves a leaf it reports removed. In a `gc` span whose children are the
    /// store's `mark` and `sweep`; counted in `deriva_gc_*`.
    pub async fn garbage_collect(&self, options: GcOptions) -> Result<GcReport> {
        let span = info_span!(
            spans::GC,
            { field::DRY_RUN } = options.dry_run,
            { field::GRACE_SECS } = as_i64(options.grace.as_secs()),
            { field::REMOVED } = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty,
        );
        async move {
            let start = Instant::now();
            let gc = &self.state.metrics.gc;
            let mut report = GcReport {
                dry_run: options.dry_run,
                ..GcReport::default()
            };
            let collected = async {
                let mut collection = self.state.store.start_gc(&options).await?;
                while let Some(batch) = collection.next_batch().await? {
                    self.after_gc_batch(&batch, options.dry_run, &mut report)
                        .await;
                }
                Ok::<_, DerivaError>(collection.finish())
            };
            let outcome = match collected.await {
                Ok(outcome) => outcome,
                Err(e) => {
                    gc.record(
                        options.dry_run,
                        GcResult::Error,
                        start.elapsed().as_secs_f64(),
                        [0; 3],
                        0,
                    );
                    let span = Span::current();
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_message", tracing::field::display(&e));
                    tracing::error!(error = %e, "garbage collection failed");
                    return Err(e);
                }
            };
            for _ in 0..outcome.corrupted {
                self.state.stats.record_corruption();
            }
            let result = if outcome.corrupted > 0 {
                GcResult::Corrupted
            } else {
                GcResult::Ok
            };
            report.duration = start.elapsed();
            gc.record(
                options.dry_run,
                result,
                report.duration.as_secs_f64(),
                [
                    outcome.blobs_removed,
                    outcome.recipes_removed,
                    report.cache_entries_removed,
                ],
                outcome.bytes_reclaimed + report.bytes_reclaimed_cache,
            );
            Span::current().record(
                field::REMOVED,
                as_i64(outcome.blobs_removed + outcome.recipes_removed),
            );
            tracing::info!(
                dry_run = options.dry_run,
                blobs_removed = outcome.blobs_removed,
                recipes_removed = outcome.recipes_removed,
                outputs_removed = report.cache_entries_removed,
                bytes_reclaimed = outcome.bytes_reclaimed + report.bytes_reclaimed_cache,
                kept = outcome.kept,
                live_blobs = outcome.live_blobs,
                live_recipes = outcome.live_recipes,
                "garbage collection finished"
            );
            report.store = outcome;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// What one swept batch of a garbage collection leaves to do here: the outputs of the
    /// removed recipes dropped from this node's cache and spill directory, from the shared
    /// output tier and (through the bus) from the other nodes' caches; the removed leaves
    /// from this node's cache and (through the bus) the other nodes'. In a dry run, only
    /// counted.
    async fn after_gc_batch(&self, batch: &[Removed], dry_run: bool, report: &mut GcReport) {
        let of_kind = |kind: AddrKind| -> Vec<CAddr> {
            batch
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.addr)
                .collect()
        };
        let (recipes, leaves) = (of_kind(AddrKind::Recipe), of_kind(AddrKind::Leaf));
        for recipe in &recipes {
            let size = self.held_size(recipe);
            let dropped = if dry_run {
                size.is_some()
            } else {
                self.forget(recipe)
            };
            if dropped {
                report.cache_entries_removed += 1;
                report.bytes_reclaimed_cache += size.unwrap_or(0);
            }
        }
        if dry_run || batch.is_empty() {
            return;
        }
        // Deleted from the store already; a read that started before the delete finds the
        // generation moved and caches nothing.
        for leaf in &leaves {
            self.forget(leaf);
        }
        // The recipes are gone already: a tier object or another node's cached copy left
        // behind is garbage, never served wrongly (an output is a function of its recipe), so
        // a failure here is logged, not the collection's error. Another node may serve a
        // removed leaf from its cache until the bus reaches it.
        if let Some(outputs) = self.state.store.outputs()
            && !recipes.is_empty()
        {
            let deletes = recipes.iter().map(|a| outputs.delete(*a));
            if let Err(e) = futures::future::try_join_all(deletes).await {
                tracing::warn!(error = %e, "could not delete the shared outputs of collected recipes");
            }
        }
        let removed: Vec<CAddr> = recipes.iter().chain(&leaves).copied().collect();
        if let Some(bus) = self.state.store.bus()
            && let Err(e) = bus.publish(&removed).await
        {
            tracing::warn!(error = %e, "could not tell the other nodes about collected recipes and leaves");
        }
    }

    /// The bytes this node holds for the output of `addr`: in the memory cache or the spill
    /// directory.
    fn held_size(&self, addr: &CAddr) -> Option<u64> {
        let cached = self.state.cache.size_of(addr);
        let spilled = self.spill().and_then(|s| s.size_of(addr));
        match (cached, spilled) {
            (None, None) => None,
            (c, s) => Some(c.unwrap_or(0) + s.unwrap_or(0)),
        }
    }

    /// Evicts `addrs` from this node's cache only, as an `Invalidate` on another node asked
    /// (through the store's [`deriva_store::InvalidationBus`]); computes running now will not
    /// cache their outputs. Returns how many were cached.
    pub fn evict_local(&self, addrs: &[CAddr]) -> usize {
        addrs.iter().filter(|a| self.forget(a)).count()
    }

    /// Evicts everything from this node's cache and detaches every in-flight
    /// materialization: after a node may have missed invalidations from the others (its
    /// subscription to them was down). Returns how many entries were cached.
    pub fn evict_all_local(&self) -> usize {
        self.state.inflight.lock().clear();
        let cached = self.state.cache.invalidate_all();
        let spilled = self.spill().map_or(0, |s| s.clear());
        cached + spilled
    }

    /// Invalidates `addr` in the cache and detaches its in-flight materialization, if any, so
    /// that later requests start afresh. Returns whether it was cached.
    fn forget(&self, addr: &CAddr) -> bool {
        self.state.inflight.lock().remove(addr);
        // The generation moves first: a compute finishing now keeps its output nowhere.
        let cached = self.state.cache.invalidate(addr);
        // Removing a spilled file is one unlink, short enough for the caller's thread.
        let spilled = self.spill().is_some_and(|s| s.remove(addr));
        cached || spilled
    }
}
