//! Compute leases across nodes ([`deriva_store::ComputeLeases`], with the output tier): before
//! computing a recipe whose output the tier lacks, a flight takes the recipe's lease; if another
//! node holds it, the flight waits for that lease to end and reads the output from the tier.
//! If the holder failed (no output in the tier), or let its lease expire (it died), the flight
//! takes the lease and computes itself. The joining flight's span links to the holder's span
//! (through [`super::TraceLinks`]), as a join within one node does.

use std::sync::Arc;
use std::time::Duration;

use deriva_core::CAddr;
use deriva_store::{ComputeLease, ComputeLeases, LeaseAttempt, OutputStore, StoredOutput};
use tracing::Span;

use super::AsyncExecutor;

/// The longest a waiter waits between two looks at the output tier and the lease: the poll
/// behind the notification of a lease's end, which can be lost.
pub(super) const LEASE_POLL: Duration = Duration::from_secs(1);

/// How long past a lease's expiry a waiter may wait before it looks again (and takes the
/// lease over).
pub(super) const EXPIRY_SLACK: Duration = Duration::from_millis(100);

/// What [`AsyncExecutor::lease_or_output`] came back with.
pub(super) enum Leased {
    /// Another node computed it: its output, from the tier.
    Output(Box<StoredOutput>),
    /// Compute it: under this lease (ended when the output is in the tier), or with none if
    /// the leases could not be asked.
    Lease(Option<ComputeLease>),
}

impl AsyncExecutor {
    /// Takes the compute lease of `addr`, or waits for the node holding it and reads the output
    /// it put in `outputs`. Waits at most until the lease expires (plus [`EXPIRY_SLACK`])
    /// between looks, and looks at least every [`LEASE_POLL`].
    pub(super) async fn lease_or_output(
        &self,
        leases: &Arc<dyn ComputeLeases>,
        outputs: &Arc<dyn OutputStore>,
        addr: CAddr,
    ) -> Leased {
        let links = self.state.config.trace_links.as_ref();
        let span = Span::current();
        let traceparent = links.and_then(|l| l.traceparent(&span));
        let metrics = &self.state.metrics;
        let mut joined = false;
        loop {
            let attempt = match leases.acquire(addr, traceparent.clone()).await {
                Ok(attempt) => attempt,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "could not take the compute lease; computing without it");
                    return Leased::Lease(None);
                }
            };
            let held = match attempt {
                LeaseAttempt::Acquired(lease) => {
                    metrics.lease_acquired.add(1, &[]);
                    if lease.took_over() {
                        metrics.lease_expired.add(1, &[]);
                        tracing::info!(%addr, "took over an expired compute lease");
                    }
                    return Leased::Lease(Some(lease));
                }
                LeaseAttempt::Held(held) => held,
            };
            if !joined {
                joined = true;
                metrics.lease_joined.add(1, &[]);
                if let (Some(links), Some(leader)) = (links, held.traceparent.as_deref()) {
                    links.link(&span, leader);
                }
                tracing::info!(%addr, node = %held.node, "joined another node's compute");
            }
            let wait = held.expires_in.saturating_add(EXPIRY_SLACK).min(LEASE_POLL);
            // Either way, the tier tells: an ended or lost notification, or a poll.
            let _ended = tokio::time::timeout(wait, held.ended).await;
            if let Some(output) = self.read_output_tier(outputs, addr).await {
                return Leased::Output(Box::new(output));
            }
        }
    }
}
