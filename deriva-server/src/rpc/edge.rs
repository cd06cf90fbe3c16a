//! [`Edge`]: what a request will cost, decided once when it arrives.
//!
//! A request is **traced** when the sampler samples it for export (the ratio, the caller's
//! decision, the cap: [`DerivaSampler::decide`]), when its caller forces a trace
//! (`x-deriva-trace: force`, as `deriva --trace` sends) or asks for its tree to be kept
//! (`x-deriva-trace: capture`, as `deriva get --explain` sends), or when it is one of the
//! [`UNTRACED_CAPTURES_PER_SECOND`] others the trace store keeps anyway (a [`RateLimiter`]
//! with room for one). A traced request
//! gets its `rpc` span and every span below it, as before.
//!
//! Any other request is **untraced**: it runs in a [`deriva_core::untraced`] scope, where no
//! span is built, no field formatted and nothing filed while it runs. It still counts in the
//! metrics and keeps a request id and a trace id for its log lines; when it ends failed, or
//! slow enough for the slowest list, the trace store files its request span alone
//! ([`TraceStore::file_untraced`]).

use opentelemetry::trace::SpanContext;

use crate::telemetry::{DerivaSampler, RateLimiter};
use crate::trace_store::{TraceStore, UNTRACED_CAPTURES_PER_SECOND};

/// See the module docs. Built by [`Telemetry::edge`](crate::telemetry::Telemetry::edge).
#[derive(Debug)]
pub struct Edge {
    sampler: DerivaSampler,
    traces: TraceStore,
    /// The untraced requests captured anyway: one at a time, at most
    /// [`UNTRACED_CAPTURES_PER_SECOND`].
    captures: RateLimiter,
}

/// What the edge decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Spans and capture; `sampled`: exported too.
    Traced {
        /// Whether the spans are sampled for export.
        sampled: bool,
    },
    /// No spans; filed at its end only if it failed or was slow.
    Untraced,
}

impl Edge {
    /// Decides with `sampler` (a clone of the tracer provider's, sharing its cap) and files
    /// untraced requests that fail or are slow in `traces`.
    pub fn new(sampler: DerivaSampler, traces: TraceStore) -> Self {
        Self {
            sampler,
            traces,
            captures: RateLimiter::with_burst(f64::from(UNTRACED_CAPTURES_PER_SECOND), 1.0),
        }
    }

    /// The decision for a request under `parent` (the caller's context; invalid when it sent
    /// none), `force` when it asked for a trace and may, `capture` when it asked for its tree
    /// to be kept.
    pub fn decide(&self, parent: &SpanContext, force: bool, capture: bool) -> Decision {
        let sampled = self.sampler.decide(parent, force);
        if sampled || force || capture || self.captures.try_acquire() {
            Decision::Traced { sampled }
        } else {
            Decision::Untraced
        }
    }

    /// The trace store untraced requests are filed in.
    pub fn traces(&self) -> &TraceStore {
        &self.traces
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn the_edge_traces_sampled_forced_and_a_few_others() {
        let none = SpanContext::empty_context();
        let unsampled_caller = SpanContext::new(
            TraceId::from_bytes(7u128.to_be_bytes()),
            SpanId::from_bytes(9u64.to_be_bytes()),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let edge = Edge::new(DerivaSampler::new(0.0, None), TraceStore::new(4));
        // The first untraced one is captured anyway, then none for a tenth of a second: a
        // thousand asks in a row take far less.
        let start = Instant::now();
        assert_eq!(
            edge.decide(&none, false, false),
            Decision::Traced { sampled: false }
        );
        let traced = (0..1000)
            .filter(|_| edge.decide(&unsampled_caller, false, false) != Decision::Untraced)
            .count();
        if start.elapsed().as_millis() < 100 {
            assert_eq!(traced, 0);
        }
        assert_eq!(
            edge.decide(&none, true, true),
            Decision::Traced { sampled: true }
        );
        assert_eq!(
            edge.decide(&unsampled_caller, false, true),
            Decision::Traced { sampled: false },
            "captured, not exported"
        );
        let all = Edge::new(DerivaSampler::new(1.0, None), TraceStore::new(4));
        assert_eq!(
            all.decide(&none, false, false),
            Decision::Traced { sampled: true }
        );
        // A forced request over the cap is still traced (captured), not sampled.
        let capped = Edge::new(DerivaSampler::new(0.0, Some(1e-3)), TraceStore::new(4));
        assert_eq!(
            capped.decide(&none, true, true),
            Decision::Traced { sampled: true }
        );
        assert_eq!(
            capped.decide(&none, true, true),
            Decision::Traced { sampled: false }
        );
    }

    #[test]
    fn captures_pass_once_per_interval() {
        let pace = RateLimiter::with_burst(10.0, 1.0);
        assert!(pace.try_acquire());
        assert!(!pace.try_acquire());
        assert!(
            pace.try_acquire_at(Instant::now() + std::time::Duration::from_millis(100)),
            "due again"
        );
        // Zero a second means once, never a division by zero.
        assert!(RateLimiter::with_burst(0.0, 1.0).try_acquire());
    }
}
