//! [`OtelTraceLinks`]: the engine's [`TraceLinks`] over the OpenTelemetry layer, so that a
//! materialization that waits on another node's compute lease links to the span computing it.

use std::collections::HashMap;

use deriva_compute::TraceLinks;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const TRACEPARENT: &str = "traceparent";

/// Reads and links spans through `tracing-opentelemetry`; a span the OpenTelemetry layer does
/// not see has no `traceparent`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OtelTraceLinks;

impl TraceLinks for OtelTraceLinks {
    fn traceparent(&self, span: &Span) -> Option<String> {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        carrier.remove(TRACEPARENT)
    }

    fn link(&self, span: &Span, traceparent: &str) {
        let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        // An invalid context is ignored by add_link.
        span.add_link(cx.span().span_context().clone());
    }

    fn span_ref(&self, span: &Span) -> Option<deriva_core::SpanRef> {
        let cx = span.context();
        let ids = cx.span().span_context().clone();
        ids.is_valid().then(|| deriva_core::SpanRef {
            trace_id: ids.trace_id().to_bytes(),
            span_id: ids.span_id().to_bytes(),
        })
    }

    fn link_span(&self, span: &Span, to: deriva_core::SpanRef) {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        span.add_link(SpanContext::new(
            TraceId::from_bytes(to.trace_id),
            SpanId::from_bytes(to.span_id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_outside_the_layer_has_no_traceparent_and_a_bad_link_is_ignored() {
        let links = OtelTraceLinks;
        let span = Span::none();
        assert_eq!(links.traceparent(&span), None);
        assert_eq!(links.span_ref(&span), None);
        links.link(&span, "not a traceparent");
    }
}
