//! Provenance: every computed output gets a materialization record ([`deriva_core::Record`]:
//! recipe, function, inputs, output hash and size, node, start, duration, compute span),
//! signed if the engine has a [`super::RecordSigner`]. The record goes where the output goes
//! (the memory cache entry, the spill index, the output-tier object) and into the store's
//! [`deriva_store::Records`].
//!
//! A hit (memory cache, spill, output tier) of an output with a record notes its origin on the
//! `materialize` span (`deriva.origin.*`) and links that span to the compute span, on whichever
//! node and in whichever trace it ran. A sampled fraction of those hits is audited: computed
//! again in the background, in a trace of its own, and compared with the record
//! (`deriva_audit_total`, the record's audit tallies). `Verify` feeds the same tallies.
//!
//! [`AsyncExecutor::provenance`] answers the records of an address's closure.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deriva_core::provenance::unix_micros;
use deriva_core::{
    AuditResult, CAddr, DerivaError, FunctionId, Provenance, Recipe, Record, Result, SignedRecord,
};
use deriva_store::LeafStat;
use deriva_store::task::spawn_blocking_in;
use futures::{StreamExt as _, TryStreamExt as _};
use tracing::field::Empty;
use tracing::instrument::WithSubscriber as _;
use tracing::{Instrument, Span, info_span};

use super::{AsyncExecutor, OnMismatch};
use crate::metrics::audit_attrs;
use crate::spans::{self, field};

/// The most entries [`AsyncExecutor::provenance`] answers; beyond, it is truncated.
pub const PROVENANCE_MAX_ENTRIES: usize = 4096;

/// Outputs above this size are hashed for their record on the blocking pool.
const HASH_INLINE_BYTES: usize = 64 << 10;

/// How many addresses of one level [`AsyncExecutor::provenance`] looks up at once.
const LOOKUPS: usize = 16;

/// What the store holds at an address of a provenance tree.
// Mostly recipes: boxing the large variant would cost an allocation for nearly every entry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Described {
    /// A leaf.
    Leaf(LeafStat),
    /// A recipe, and the record of its output if it has been computed (and not invalidated or
    /// collected since).
    Recipe {
        /// The recipe.
        recipe: Recipe,
        /// Its output's record and audits.
        record: Option<Provenance>,
    },
    /// Nothing (an input collected, or never stored).
    Missing,
}

/// One address of a provenance tree.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvenanceEntry {
    /// The address.
    pub addr: CAddr,
    /// Levels below the address asked for.
    pub depth: u32,
    /// What is stored there.
    pub described: Described,
}

/// The answer of [`AsyncExecutor::provenance`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProvenanceTree {
    /// The address asked for first, then its closure breadth-first, each address once.
    pub entries: Vec<ProvenanceEntry>,
    /// Whether the entries stop short of the depth asked ([`PROVENANCE_MAX_ENTRIES`]).
    pub truncated: bool,
}

impl AsyncExecutor {
    /// The record of a compute of the recipe `addr` that gave `output` in `elapsed`, in
    /// `span` (the compute span), signed if the engine signs.
    pub(super) async fn record_of(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        output: &Bytes,
        elapsed: Duration,
        span: &Span,
    ) -> Arc<SignedRecord> {
        let now = SystemTime::now();
        let started = now.checked_sub(elapsed).unwrap_or(now);
        let output_hash = if output.len() <= HASH_INLINE_BYTES {
            CAddr::for_leaf(output)
        } else {
            let output = output.clone();
            spawn_blocking_in(span.clone(), move || CAddr::for_leaf(&output))
                .await
                .unwrap_or_else(|_| CAddr::for_leaf(&[]))
        };
        let compute_span = self
            .state
            .config
            .trace_links
            .as_ref()
            .and_then(|links| links.span_ref(span));
        let record = Record {
            recipe: addr,
            function: recipe.function().clone(),
            inputs: recipe.inputs().to_vec(),
            output_hash,
            output_bytes: output.len() as u64,
            node: self.state.config.node_name.clone(),
            started_at_micros: unix_micros(started),
            duration_micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            span: compute_span,
        };
        let signature = self
            .state
            .config
            .signer
            .as_ref()
            .map(|signer| signer.sign(&record.canonical_bytes()));
        Arc::new(SignedRecord { record, signature })
    }

    /// Keeps `record` in the store's records, if it keeps any. Awaited, so that a
    /// `Provenance` asked once the Get has answered finds it; a failure is logged (the output
    /// is served all the same).
    pub(super) async fn keep_record(&self, record: &SignedRecord) {
        if let Some(records) = self.state.store.records()
            && let Err(e) = records.put(record).await
        {
            tracing::warn!(addr = %record.record.recipe, error = %e, "could not keep the materialization record");
        }
    }

    /// A hit of `addr`, whose output has `record`: notes its origin on the current
    /// (`materialize`) span and links it to the compute span, then perhaps audits it.
    pub(super) fn hit_origin(&self, addr: CAddr, record: Option<Arc<SignedRecord>>) {
        let Some(record) = record else {
            return;
        };
        let span = Span::current();
        if !span.is_disabled() {
            let r = &record.record;
            span.record(field::ORIGIN_NODE, r.node.as_str());
            span.record(
                field::ORIGIN_AGE_SECONDS,
                r.age(SystemTime::now()).as_secs_f64(),
            );
            span.record(field::ORIGIN_DURATION_SECONDS, r.duration().as_secs_f64());
            if let Some(to) = r.span {
                span.record(field::ORIGIN_TRACE_ID, to.trace_hex().as_str());
                span.record(field::ORIGIN_SPAN_ID, to.span_hex().as_str());
                if let Some(links) = &self.state.config.trace_links {
                    links.link_span(&span, to);
                }
            }
        }
        self.maybe_audit(addr, record);
    }

    /// Audits the hit of `addr` if it is sampled, this node may audit it (on a shared store,
    /// only what another node computed), an audit slot is free, and so is a compute slot
    /// (requests come first). Runs on a task of its own, in a trace of its own.
    fn maybe_audit(&self, addr: CAddr, record: Arc<SignedRecord>) {
        let audit = &self.state.config.audit;
        if audit.sample_ratio <= 0.0 || fastrand::f64() >= audit.sample_ratio {
            return;
        }
        if audit.shared_store && record.record.node == self.state.config.node_name {
            return;
        }
        if self.state.computes.available_permits() == 0 {
            return;
        }
        let Ok(permit) = self.state.audits.clone().try_acquire_owned() else {
            return;
        };
        // A trace of its own, also when the hit's request is not traced.
        let span = deriva_core::untraced::enter(None, || {
            info_span!(
                parent: None,
                spans::AUDIT,
                { field::ADDR } = %addr,
                { field::FUNCTION } = %record.record.function,
                { field::RESULT } = Empty
            )
        });
        if let (Some(links), Some(to)) = (&self.state.config.trace_links, record.record.span) {
            links.link_span(&span, to);
        }
        let this = self.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let result = match this.recompute(addr).await {
                    Ok(again) if again.record.output_hash == record.record.output_hash => {
                        AuditResult::Match
                    }
                    Ok(again) => {
                        tracing::warn!(
                            %addr,
                            function = %record.record.function,
                            recorded = ?record.record,
                            again = ?again.record,
                            "audit mismatch: computing the recipe again gave other bytes than its record"
                        );
                        AuditResult::Mismatch
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "audit failed: could not compute the recipe again");
                        AuditResult::Error
                    }
                };
                Span::current().record(field::RESULT, result.as_str());
                this.count_audit(
                    addr,
                    &record.record.function,
                    Some(record.record.output_hash),
                    result,
                )
                .await;
            }
            .instrument(span)
            // The server's subscriber, also where it is not the global one (tests).
            .with_current_subscriber(),
        );
    }

    /// Computes the recipe `addr` again, its inputs through the read path, and answers the
    /// new output's record (kept nowhere).
    async fn recompute(&self, addr: CAddr) -> Result<Arc<SignedRecord>> {
        let stored = self
            .state
            .store
            .get_recipe(addr)
            .await?
            .ok_or(DerivaError::NotFound { addr })?;
        let recipe = stored.recipe;
        let function = self.runnable(Some(addr), &recipe)?;
        let inputs = self.inputs_of(&recipe).await?;
        let (_, _, _, record) = self
            .compute(addr, &recipe, &function, inputs, false)
            .await?;
        Ok(record)
    }

    /// Counts an audit of the output of `addr`: in `deriva_audit_total`, and in the tallies of
    /// its record if one was audited (`audited`: the hash that record names). A mismatch
    /// evicts the output if `--on-mismatch evict` says so.
    pub(super) async fn count_audit(
        &self,
        addr: CAddr,
        function: &FunctionId,
        audited: Option<CAddr>,
        result: AuditResult,
    ) {
        self.state
            .metrics
            .audits
            .add(1, &audit_attrs(function, result.as_str()));
        if let (Some(records), Some(audited)) = (self.state.store.records(), audited) {
            match records.audit(addr, audited, result).await {
                Ok(Some(tallies)) if tallies.disputed() => {
                    tracing::info!(%addr, matches = tallies.matches, mismatches = tallies.mismatches, "the output is disputed");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%addr, error = %e, "could not count an audit"),
            }
        }
        if result == AuditResult::Mismatch
            && self.state.config.audit.on_mismatch == OnMismatch::Evict
        {
            match self.invalidate(addr, false).await {
                Ok(_) => tracing::warn!(%addr, "evicted the disputed output (--on-mismatch evict)"),
                Err(e) => tracing::warn!(%addr, error = %e, "could not evict the disputed output"),
            }
        }
    }

    /// What `Verify` found, counted as an audit of the record of `addr`: against the record
    /// kept, if any (a match only if both runs agreed with it); else the first run's record is
    /// kept, if both runs agreed.
    pub(super) async fn verify_audit(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        deterministic: bool,
        fresh: Option<Arc<SignedRecord>>,
    ) {
        let kept = match self.state.store.records() {
            Some(records) => records.get(addr).await.ok().flatten(),
            None => None,
        };
        let (audited, result) = match (kept, fresh) {
            (Some(kept), fresh) => {
                let same = fresh.is_some_and(|f| f.record.output_hash == kept.record().output_hash);
                let result = if deterministic && same {
                    AuditResult::Match
                } else {
                    AuditResult::Mismatch
                };
                (Some(kept.record().output_hash), result)
            }
            (None, Some(fresh)) if deterministic => {
                self.keep_record(&fresh).await;
                (Some(fresh.record.output_hash), AuditResult::Match)
            }
            // No record to count against: the metric alone.
            (None, _) => (None, AuditResult::Mismatch),
        };
        self.count_audit(addr, recipe.function(), audited, result)
            .await;
    }

    /// The provenance of `addr`: what is stored at it and, `depth` levels down, at its inputs,
    /// breadth-first, each address once, at most [`PROVENANCE_MAX_ENTRIES`]. A level's
    /// addresses are looked up 16 at a time. [`DerivaError::NotFound`] if nothing is
    /// stored at `addr`.
    pub async fn provenance(&self, addr: CAddr, depth: u32) -> Result<ProvenanceTree> {
        let mut tree = ProvenanceTree::default();
        let mut seen = HashSet::from([addr]);
        let mut level = vec![addr];
        for d in 0.. {
            let described: Vec<Described> = futures::stream::iter(level.clone())
                .map(|a| self.describe(a))
                .buffered(LOOKUPS)
                .try_collect()
                .await?;
            let mut next = Vec::new();
            for (addr, described) in level.iter().zip(described) {
                if d < depth
                    && let Described::Recipe { recipe, .. } = &described
                {
                    next.extend(recipe.inputs().iter().filter(|i| seen.insert(**i)));
                }
                tree.entries.push(ProvenanceEntry {
                    addr: *addr,
                    depth: d,
                    described,
                });
            }
            let room = PROVENANCE_MAX_ENTRIES - tree.entries.len();
            if next.len() > room {
                tree.truncated = true;
                next.truncate(room);
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        if tree.entries.first().map(|e| &e.described) == Some(&Described::Missing) {
            return Err(DerivaError::NotFound { addr });
        }
        Ok(tree)
    }

    /// What is stored at `addr`: a recipe (and its output's record), a leaf, or nothing.
    async fn describe(&self, addr: CAddr) -> Result<Described> {
        let store = &self.state.store;
        if let Some(stored) = store.get_recipe(addr).await? {
            let record = match store.records() {
                Some(records) => records.get(addr).await?,
                None => None,
            };
            // Without a record in the store, one held with the output here.
            let record = record.or_else(|| {
                self.held_record(&addr)
                    .map(|r| Provenance::new(SignedRecord::clone(&r)))
            });
            return Ok(Described::Recipe {
                recipe: stored.recipe,
                record,
            });
        }
        Ok(match store.blobs().stat(addr).await? {
            Some(stat) => Described::Leaf(stat),
            None => Described::Missing,
        })
    }

    /// The record held with the output of `addr` in the memory cache or the spill directory.
    fn held_record(&self, addr: &CAddr) -> Option<Arc<SignedRecord>> {
        self.state
            .cache
            .record_of(addr)
            .or_else(|| self.spill().and_then(|s| s.record(addr)))
    }
}
