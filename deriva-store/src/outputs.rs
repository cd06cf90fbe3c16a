//! The traits of what a store keeps of computed outputs: the output tier ([`OutputStore`]),
//! their sizes ([`OutputSizes`]), their materialization records ([`Records`]), and the
//! invalidations told to the other nodes ([`InvalidationBus`]).

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use deriva_core::provenance::{AuditResult, Audits, Provenance, SignedRecord};
use deriva_core::{CAddr, Result};
use futures::stream::BoxStream;

use crate::{PAGE, pages};

/// Computed outputs kept beyond one node's memory (the shared output tier): any node, or the
/// same node after a restart, serves them without recomputing. Keyed by recipe address; the
/// backend must detect damaged bytes (an output has no address of its own to check against).
#[async_trait]
pub trait OutputStore: Send + Sync + fmt::Debug + 'static {
    /// The stored output of the recipe at `recipe`, verified, with the record stored with it;
    /// `Ok(None)` if there is none.
    async fn get(&self, recipe: CAddr) -> Result<Option<StoredOutput>>;

    /// Stores `output` as the output of `recipe`, replacing any earlier one, with its
    /// materialization `record` (which the backend then also answers from [`Records`], if it
    /// keeps records, with its audits reset).
    async fn put(&self, recipe: CAddr, output: Bytes, record: Option<&SignedRecord>) -> Result<()>;

    /// Deletes the stored output of `recipe`; deleting nothing is no error.
    async fn delete(&self, recipe: CAddr) -> Result<()>;

    /// Whether an output of `recipe` is stored (without reading or verifying it).
    async fn contains(&self, recipe: CAddr) -> Result<bool>;

    /// One page of the listing of the recipe address of every stored output: at most `limit`,
    /// those that sort after `after` (from the first when `None`), in ascending byte order;
    /// fewer than `limit` only at the end. Walk it with [`pages()`] ([`OutputStore::list_pages`]);
    /// for bulk work such as `deriva-server migrate`.
    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<CAddr>>;

    /// Every stored output's recipe address, a page of `limit` at a time, in address order:
    /// [`pages()`] over [`OutputStore::list_page`].
    fn list_pages(&self, limit: usize) -> BoxStream<'_, Result<Vec<CAddr>>> {
        pages(
            limit,
            |addr: &CAddr| *addr,
            move |after, limit| self.list_page(after, limit),
        )
    }

    /// Every stored output's recipe address, gathered from [`OutputStore::list_page`]: holds
    /// the whole listing, so for tests and small stores only.
    async fn list(&self) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        let mut pages = self.list_pages(PAGE);
        while let Some(page) = futures::TryStreamExt::try_next(&mut pages).await? {
            out.extend(page);
        }
        Ok(out)
    }
}

/// An output read from the output tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutput {
    /// The output, verified.
    pub bytes: Bytes,
    /// The record the computing node stored with it (none for an output stored without one).
    pub record: Option<SignedRecord>,
}

/// The materialization records of computed outputs ([`deriva_core::provenance`]), kept for as
/// long as the outputs: a record goes when its output is invalidated or its recipe collected
/// ([`Records::delete`]), and a new compute replaces it.
#[async_trait]
pub trait Records: Send + Sync + fmt::Debug + 'static {
    /// The record of the output of `recipe`, with its audits; `Ok(None)` if there is none.
    async fn get(&self, recipe: CAddr) -> Result<Option<Provenance>>;

    /// Keeps `record` as the record of its recipe's output, replacing any earlier one (and its
    /// audits).
    async fn put(&self, record: &SignedRecord) -> Result<()>;

    /// Counts one audit of the output of `recipe` whose hash is `output_hash`, if the record
    /// kept is still of that output; answers the tallies after it (`None`: no such record, so
    /// nothing was counted). Counts from every node add up.
    async fn audit(
        &self,
        recipe: CAddr,
        output_hash: CAddr,
        result: AuditResult,
    ) -> Result<Option<Audits>>;

    /// Deletes the records of `recipes` (their outputs were invalidated or collected);
    /// deleting nothing is no error.
    async fn delete(&self, recipes: &[CAddr]) -> Result<()>;

    /// One page of the listing of every record with its audits: at most `limit`, those whose
    /// recipe address sorts after `after` (from the first when `None`), in ascending byte
    /// order; fewer than `limit` only at the end. Walk it with [`pages()`]
    /// ([`Records::list_pages`]); for bulk work such as `deriva-server migrate`. The default,
    /// for a backend that cannot list its records, lists none.
    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<Provenance>> {
        let _ = (after, limit);
        Ok(Vec::new())
    }

    /// Every record, a page of `limit` at a time, in recipe address order: [`pages()`] over
    /// [`Records::list_page`].
    fn list_pages(&self, limit: usize) -> BoxStream<'_, Result<Vec<Provenance>>> {
        pages(
            limit,
            |provenance: &Provenance| provenance.record().recipe,
            move |after, limit| self.list_page(after, limit),
        )
    }
}

/// Tells the other nodes that share a store which addresses were invalidated, so that each
/// evicts them from its own memory cache.
#[async_trait]
pub trait InvalidationBus: Send + Sync + fmt::Debug + 'static {
    /// Publishes `addrs` (never empty) to every other node.
    async fn publish(&self, addrs: &[CAddr]) -> Result<()>;
}

/// The sizes of computed outputs, kept beyond one process's memory so that the memory budget's
/// up-front check knows them after a restart. A size is a hint: a backend may lose the latest
/// ones in a crash (it must not pay a durable write per compute for them), and a recipe's
/// output, being determined by its address, keeps its size.
#[async_trait]
pub trait OutputSizes: Send + Sync + fmt::Debug + 'static {
    /// The recorded size of the output of `recipe`, if any.
    async fn recorded(&self, recipe: CAddr) -> Result<Option<u64>>;

    /// Records `size` as the output size of `recipe` (a no-op for a backend that records it
    /// with the output).
    async fn record(&self, recipe: CAddr, size: u64) -> Result<()>;
}
