//! Single-flight: every concurrent caller of one address shares one materialization, run in
//! its own task (`super::compute`'s `resolve`), aborted when its last caller has gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, Recipe, Result};
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared, WeakShared};
use tokio::task::JoinHandle;
use tracing::instrument::WithSubscriber;
use tracing::{Instrument, Span};

use super::{AsyncExecutor, DepthTracker, ExecutorState};
use crate::budget::Reservation;
use crate::metrics::Outcome;

/// The bytes of one level of materialization, and where they came from.
pub(super) type Materialized = Result<(Bytes, Outcome)>;

/// A flight's output, with the memory reservation that still covers it when nothing else
/// holds it in memory (a spilled output, or one the cache did not take), until its last
/// caller lets it go.
#[derive(Clone)]
pub(super) struct ReservedOutput {
    pub(super) bytes: Bytes,
    pub(super) reservation: Option<Arc<Reservation>>,
    /// Whether the flight wrote it to the spill directory, where a Get streams it from.
    pub(super) spilled: bool,
}

/// What the caller of a flight already knows of its address from the store, so that the
/// flight does not ask again.
pub(super) enum Known {
    /// Nothing: the flight asks the store what the address is.
    Nothing,
    /// A leaf (found by the budget check of a recipe that uses it, or read before).
    Leaf,
    /// A recipe, read by the caller (a Get's `leaf_read`, or the budget check of a recipe
    /// that uses it).
    Recipe(Recipe),
}

/// What a shared flight gives each of its callers.
pub(super) type FlightResult = Result<(ReservedOutput, Outcome)>;
type FlightFuture = BoxFuture<'static, FlightResult>;

/// The materialization of one address in the air, as the map of flights holds it.
pub(super) struct Flight {
    /// Tells this flight from a later one of the same address.
    id: u64,
    shared: WeakShared<FlightFuture>,
    /// The `materialize` span of the call that started it, for joiners to link to.
    span: Span,
}

impl AsyncExecutor {
    /// Joins the in-flight materialization of `addr`, or starts one in a new task, which
    /// starts from what the caller already `known` of the address.
    pub(super) fn join_or_start(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        known: Known,
    ) -> Shared<FlightFuture> {
        let mut inflight = self.state.inflight.lock();
        if let Some(flight) = inflight.get(&addr)
            && let Some(shared) = flight.shared.upgrade()
        {
            // Show why this call waits: an event, and a link (`follows_from`, an OpenTelemetry
            // span link) to the span doing the work.
            let leader = flight.span.clone();
            drop(inflight);
            let current = Span::current();
            current.follows_from(&leader);
            tracing::info!(%addr, "joined an in-flight materialization");
            return shared;
        }
        let id = self.state.next_flight.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let span = Span::current();
        let leader_span = span.clone();
        // The span is entered and dropped inside the task's poll, where `with_current_subscriber`
        // makes the caller's subscriber the default: tracing-subscriber closes a parent span
        // through the thread's default subscriber, so a span dropped elsewhere would keep its
        // parent open whenever the subscriber is not global (as in tests).
        // A flight of an untraced request builds no spans either (see `deriva_core::untraced`).
        let task = tokio::spawn(deriva_core::untraced::in_current(
            async move {
                this.resolve(addr, depth, tracker, known)
                    .instrument(span)
                    .await
            }
            .with_current_subscriber(),
        ));
        let guard = FlightTask {
            task,
            addr,
            id,
            state: Arc::downgrade(&self.state),
        };
        let shared = guard.boxed().shared();
        let weak = shared
            .downgrade()
            .expect("a fresh Shared has not completed");
        inflight.insert(
            addr,
            Flight {
                id,
                shared: weak,
                span: leader_span,
            },
        );
        shared
    }
}

/// The task of one shared materialization. Dropped when the last waiter leaves: it then aborts
/// the task (a no-op if it finished) and removes its in-flight entry.
struct FlightTask {
    task: JoinHandle<FlightResult>,
    addr: CAddr,
    id: u64,
    state: std::sync::Weak<ExecutorState>,
}

impl Future for FlightTask {
    type Output = FlightResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FlightResult> {
        let addr = self.addr;
        Pin::new(&mut self.task).poll(cx).map(|joined| {
            joined
                .unwrap_or_else(|e| Err(DerivaError::from_join(format!("materializing {addr}"), e)))
        })
    }
}

impl Drop for FlightTask {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(state) = self.state.upgrade() {
            let mut inflight = state.inflight.lock();
            if inflight.get(&self.addr).is_some_and(|f| f.id == self.id) {
                inflight.remove(&self.addr);
            }
        }
    }
}
