//! [`ComputeLeases`]: one compute per recipe across the nodes that share an output tier.

use std::fmt;

use async_trait::async_trait;
use deriva_core::{CAddr, Result};

/// Leases on computes, shared by the nodes of a cluster, so that a recipe is computed once
/// across the fleet: the node that takes a recipe's lease computes it and puts its output in
/// the output tier ([`OutputStore`](crate::OutputStore)); the others wait for the lease to end and read the output
/// from there. A lease lasts a bounded time, renewed by its holder while it computes, so that
/// the lease of a node that died ends by itself and another node takes it over.
#[async_trait]
pub trait ComputeLeases: Send + Sync + fmt::Debug + 'static {
    /// Takes the lease of `recipe` if nobody holds it (or its holder let it expire), in one
    /// round trip. `traceparent` (W3C) names the span that will compute, for the nodes that
    /// wait on it to link to.
    async fn acquire(&self, recipe: CAddr, traceparent: Option<String>) -> Result<LeaseAttempt>;
}

/// What [`ComputeLeases::acquire`] found.
pub enum LeaseAttempt {
    /// The lease is this node's: it computes. Dropping the lease (or
    /// [`ComputeLease::release`]) ends it and wakes the waiters.
    Acquired(ComputeLease),
    /// Another node (or an earlier flight of this one) holds it.
    Held(HeldBy),
}

impl fmt::Debug for LeaseAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Acquired(lease) => f.debug_tuple("Acquired").field(lease).finish(),
            Self::Held(held) => f.debug_tuple("Held").field(held).finish(),
        }
    }
}

/// The lease of another holder, as [`ComputeLeases::acquire`] found it.
pub struct HeldBy {
    /// The holder's node id; empty if the row was not visible to the statement that found it
    /// taken (it was taken at that very moment).
    pub node: String,
    /// The holder's span, W3C `traceparent`, if it gave one.
    pub traceparent: Option<String>,
    /// Time left until the lease expires unless it is renewed, by the database's clock.
    pub expires_in: std::time::Duration,
    /// Completes when a holder of this lease announces its end (done or failed); registered
    /// before the lease was asked for, so an end announced since is not missed. An
    /// announcement can still be lost (a dropped connection): wait on it with a timeout.
    pub ended: futures::future::BoxFuture<'static, ()>,
}

impl fmt::Debug for HeldBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldBy")
            .field("node", &self.node)
            .field("traceparent", &self.traceparent)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// How a lease ended, for its waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The output is in the output tier.
    Done,
    /// No output was kept (the compute failed, was abandoned, or its output could not be
    /// written): a waiter takes the lease and computes.
    Failed,
}

/// Ends a held lease in its backend (deletes it and wakes the waiters).
#[async_trait]
pub trait LeaseRelease: Send + Sync + 'static {
    /// Ends the lease, telling the waiters how.
    async fn release(self: Box<Self>, end: LeaseEnd);
}

/// A lease this node holds ([`LeaseAttempt::Acquired`]). The backend renews it while it is
/// held. Dropped without [`ComputeLease::release`], it ends as [`LeaseEnd::Failed`] on a task
/// of its own.
pub struct ComputeLease {
    release: Option<Box<dyn LeaseRelease>>,
    took_over: bool,
}

impl fmt::Debug for ComputeLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComputeLease")
            .field("took_over", &self.took_over)
            .finish_non_exhaustive()
    }
}

impl ComputeLease {
    /// A held lease that `release` ends; `took_over`: it was another holder's, expired.
    pub fn new(release: Box<dyn LeaseRelease>, took_over: bool) -> Self {
        Self {
            release: Some(release),
            took_over,
        }
    }

    /// Whether this lease was taken over from a holder that let it expire (a dead node).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Ends the lease now, telling the waiters how.
    pub async fn release(mut self, end: LeaseEnd) {
        if let Some(release) = self.release.take() {
            release.release(end).await;
        }
    }
}

impl Drop for ComputeLease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(release.release(LeaseEnd::Failed));
        }
    }
}
