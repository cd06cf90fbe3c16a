//! [`DerivaSampler`]: which new traces are recorded, and [`RateLimiter`], the cap on how many
//! a second.

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::{Link, SpanContext, SpanKind, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};
use std::sync::atomic::{AtomicU64, Ordering};

/// The span attribute that forces sampling (set when a request carries `x-deriva-trace: force`).
pub const FORCE_TRACE_ATTR: &str = "deriva.force_trace";

/// The span attribute of a request span whose sampling the RPC layer has decided already
/// ([`DerivaSampler::decide`]): the sampler follows it, and takes no second place under the
/// cap.
pub const SAMPLED_ATTR: &str = "deriva.sampled";

/// Sampling: a request marked `x-deriva-trace: force` is sampled whatever the ratio and the
/// caller's decision, but counts against the cap like any new trace (a flood of forced requests
/// must not flood the collector; the RPC layer marks only callers who may force); a span with a
/// parent follows the parent's decision (so a sampled caller is always honored); a new trace is
/// sampled with probability `ratio`, and at most `max_per_second` new traces a second.
#[derive(Debug, Clone)]
pub struct DerivaSampler {
    ratio: Sampler,
    /// The ratio itself, for [`DerivaSampler::decide`].
    fraction: f64,
    limiter: Option<Arc<RateLimiter>>,
    follow_callers: bool,
}

impl DerivaSampler {
    /// A sampler for `ratio` (clamped to 0..=1) and an optional rate cap.
    pub fn new(ratio: f64, max_per_second: Option<f64>) -> Self {
        Self {
            ratio: Sampler::TraceIdRatioBased(ratio.clamp(0.0, 1.0)),
            fraction: if ratio.is_nan() {
                0.0
            } else {
                ratio.clamp(0.0, 1.0)
            },
            limiter: max_per_second.map(|r| Arc::new(RateLimiter::new(r))),
            follow_callers: true,
        }
    }

    /// Whether a caller's (remote parent's) decision is followed, as the `parentbased_*`
    /// samplers do (the default); `false` decides a request by the ratio alone, as
    /// `always_on`, `always_off` and `traceidratio` do. Spans under a span of this process
    /// always follow it, so a trace is kept or dropped whole.
    pub fn following_callers(mut self, follow: bool) -> Self {
        self.follow_callers = follow;
        self
    }

    /// The decision for a new request under `parent` (the caller's context, invalid when it
    /// sent none), made before any span exists, with the rules of [`ShouldSample`]: forced,
    /// under the cap; else the caller's decision when callers are followed; else the ratio,
    /// under the cap. The request span then carries it ([`SAMPLED_ATTR`]).
    pub fn decide(&self, parent: &SpanContext, force: bool) -> bool {
        // A draw, not the trace id's bits: the trace id does not exist yet. A new trace has no
        // other node's decision to agree with.
        self.rules(parent, force, || {
            self.fraction >= 1.0 || fastrand::f64() < self.fraction
        })
    }

    /// The rules both decisions follow: forced, under the cap; else the caller's (or the local
    /// parent's) decision when it is followed; else `by_ratio`, under the cap.
    fn rules(&self, parent: &SpanContext, force: bool, by_ratio: impl FnOnce() -> bool) -> bool {
        if force {
            return self.under_cap();
        }
        if parent.is_valid() && (self.follow_callers || !parent.is_remote()) {
            return parent.is_sampled();
        }
        by_ratio() && self.under_cap()
    }
}

fn decision(sample: bool, parent: Option<&Context>) -> SamplingResult {
    let trace_state = parent
        .filter(|c| c.has_active_span())
        .map(|c| c.span().span_context().trace_state().clone())
        .unwrap_or_default();
    SamplingResult {
        decision: if sample {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        },
        attributes: Vec::new(),
        trace_state,
    }
}

impl ShouldSample for DerivaSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        for kv in attributes {
            if kv.key.as_str() == SAMPLED_ATTR {
                return decision(kv.value == Value::Bool(true), parent);
            }
        }
        let force = attributes
            .iter()
            .any(|kv| kv.key.as_str() == FORCE_TRACE_ATTR && kv.value == Value::Bool(true));
        let parent_span = parent
            .filter(|c| c.has_active_span())
            .map_or_else(SpanContext::empty_context, |c| {
                c.span().span_context().clone()
            });
        let sample = self.rules(&parent_span, force, || {
            self.ratio
                .should_sample(parent, trace_id, name, kind, attributes, links)
                .decision
                == SamplingDecision::RecordAndSample
        });
        decision(sample, parent)
    }
}

impl DerivaSampler {
    /// Takes a new trace's place under the per-second cap, if there is one left.
    fn under_cap(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.try_acquire())
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst` (`max(rate, 1)` for
/// [`RateLimiter::new`]), full at first. Lock-free: it keeps the time at which the bucket will
/// be full again (the generic cell rate algorithm), so a take is one clock read and one
/// compare-and-swap; the RPC layer asks it on every request.
#[derive(Debug)]
pub struct RateLimiter {
    epoch: Instant,
    /// Nanoseconds per token (`u64::MAX` for a rate of 0: never refilled).
    interval_ns: u64,
    /// How far ahead of now the full time may be while a token is left: `(burst - 1)` tokens.
    tolerance_ns: u64,
    /// When the bucket is full again, in nanoseconds after `epoch`.
    full_at_ns: AtomicU64,
}

impl RateLimiter {
    /// A full bucket of `max(rate, 1)` tokens.
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.0);
        Self::with_burst(rate, rate.max(1.0))
    }

    /// A full bucket of `burst` (at least 1) tokens, refilled at `rate` a second.
    pub fn with_burst(rate: f64, burst: f64) -> Self {
        let rate = rate.max(0.0);
        let interval = if rate > 0.0 {
            1e9 / rate
        } else {
            f64::INFINITY
        };
        let tolerance = (burst.max(1.0) - 1.0) * interval;
        // `as` saturates: an infinite interval is u64::MAX.
        Self {
            epoch: Instant::now(),
            interval_ns: interval as u64,
            tolerance_ns: if tolerance.is_nan() {
                0
            } else {
                tolerance as u64
            },
            full_at_ns: AtomicU64::new(0),
        }
    }

    /// Takes a token if one is available.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    /// Takes a token if one is available at `now` (time never runs backwards for the bucket:
    /// an earlier `now` finds it no fuller).
    pub(crate) fn try_acquire_at(&self, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut full_at = self.full_at_ns.load(Ordering::Relaxed);
        loop {
            if full_at > now.saturating_add(self.tolerance_ns) {
                return false;
            }
            let next = full_at.max(now).saturating_add(self.interval_ns);
            match self.full_at_ns.compare_exchange_weak(
                full_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => full_at = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{SpanId, TraceFlags, TraceState};

    use super::*;

    fn decide(sampler: &DerivaSampler, parent: Option<&Context>, attrs: &[KeyValue]) -> bool {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let result = sampler.should_sample(parent, trace_id, "rpc", &SpanKind::Server, attrs, &[]);
        result.decision == SamplingDecision::RecordAndSample
    }

    fn remote_parent(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            flags,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn force_wins_and_parents_are_followed() {
        let never = DerivaSampler::new(0.0, None);
        let always = DerivaSampler::new(1.0, None);
        let force = [KeyValue::new(FORCE_TRACE_ATTR, true)];
        assert!(!decide(&never, None, &[]));
        assert!(decide(&never, None, &force));
        assert!(
            decide(&never, Some(&remote_parent(true)), &[]),
            "a sampled caller is honored"
        );
        assert!(
            !decide(&always, Some(&remote_parent(false)), &[]),
            "an unsampled caller too"
        );
        assert!(
            decide(&always, Some(&remote_parent(false)), &force),
            "unless forced"
        );
        assert!(decide(
            &always,
            None,
            &[KeyValue::new(FORCE_TRACE_ATTR, false)]
        ));
    }

    #[test]
    fn samplers_that_ignore_callers_decide_alone_but_keep_local_children() {
        let always_off = DerivaSampler::new(0.0, None).following_callers(false);
        let always_on = DerivaSampler::new(1.0, None).following_callers(false);
        assert!(!decide(&always_off, Some(&remote_parent(true)), &[]));
        assert!(decide(&always_on, Some(&remote_parent(false)), &[]));
        assert!(
            decide(&always_off, None, &[KeyValue::new(FORCE_TRACE_ATTR, true)]),
            "x-deriva-trace: force still wins"
        );
        // A span under a sampled span of this process follows it.
        let local = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(local);
        assert!(decide(&always_off, Some(&cx), &[]));
    }

    #[test]
    fn the_rate_cap_limits_new_traces_and_forced_ones_but_not_children() {
        // One new trace per 1,000 s: the bucket holds one token, and no test run is slow
        // enough to see it refilled.
        let force = [KeyValue::new(FORCE_TRACE_ATTR, true)];
        let capped = DerivaSampler::new(1.0, Some(1e-3));
        assert!(decide(&capped, None, &[]));
        assert!(
            !decide(&capped, None, &[]),
            "a second new trace within the period is dropped"
        );
        assert!(decide(&capped, Some(&remote_parent(true)), &[]));
        assert!(
            !decide(&capped, None, &force),
            "a forced trace takes its place under the cap too"
        );
        // A forced trace takes the token a new trace would have had, and the other way round.
        let never = DerivaSampler::new(0.0, Some(1e-3));
        assert!(decide(&never, Some(&remote_parent(false)), &force));
        assert!(!decide(&never, None, &force));
        let capped = DerivaSampler::new(1.0, Some(1e-3));
        assert!(decide(&capped, None, &force));
        assert!(!decide(&capped, None, &[]));
    }

    /// The RPC layer's decision, made before the span, follows the same rules; the span then
    /// carries it and the sampler follows it without a second place under the cap.
    #[test]
    fn a_decision_made_at_the_edge_follows_the_rules_and_is_followed_once() {
        let remote = |sampled| remote_parent(sampled).span().span_context().clone();
        let none = SpanContext::empty_context();
        let capped = DerivaSampler::new(1.0, Some(1e-3));
        assert!(capped.decide(&none, false));
        assert!(!capped.decide(&none, false), "the cap holds");
        assert!(!capped.decide(&none, true), "also for a forced one");
        assert!(
            capped.decide(&remote(true), false),
            "a sampled caller is honored"
        );
        let never = DerivaSampler::new(0.0, None);
        assert!(!never.decide(&none, false));
        assert!(never.decide(&none, true));
        assert!(!never.decide(&remote(false), false));
        assert!(!DerivaSampler::new(1.0, None).decide(&remote(false), false));
        let alone = DerivaSampler::new(0.0, None).following_callers(false);
        assert!(!alone.decide(&remote(true), false), "a caller not followed");
        assert!(!DerivaSampler::new(f64::NAN, None).decide(&none, false));
        // About half at 0.5.
        let half = DerivaSampler::new(0.5, None);
        let n = (0..10_000).filter(|_| half.decide(&none, false)).count();
        assert!((4_000..6_000).contains(&n), "{n}");
        // The span of a decided request: followed, and the cap (spent) is not asked again.
        let sampled = [KeyValue::new(SAMPLED_ATTR, true)];
        assert!(decide(&capped, None, &sampled));
        assert!(decide(&capped, None, &sampled));
        assert!(!decide(
            &capped,
            Some(&remote_parent(true)),
            &[KeyValue::new(SAMPLED_ATTR, false)]
        ));
    }

    #[test]
    fn the_rate_limiter_refills_at_its_rate_up_to_its_burst() {
        let limiter = RateLimiter::new(2.0);
        let t0 = limiter.epoch;
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        assert!(limiter.try_acquire_at(at(0.0)));
        assert!(limiter.try_acquire_at(at(0.0)));
        assert!(!limiter.try_acquire_at(at(0.0)), "two tokens at first");
        assert!(!limiter.try_acquire_at(at(0.4)), "0.8 of a token");
        assert!(limiter.try_acquire_at(at(0.5)), "one token after 0.5 s");
        assert!(!limiter.try_acquire_at(at(0.5)));
        // A long pause refills only up to the burst of two.
        assert!(limiter.try_acquire_at(at(100.0)));
        assert!(limiter.try_acquire_at(at(100.0)));
        assert!(!limiter.try_acquire_at(at(100.0)));
        // Time never runs backwards for the bucket.
        assert!(!limiter.try_acquire_at(at(50.0)));
    }
}
