//! [`TraceStoreLayer`], the `tracing` layer that fills a [`TraceStore`]: it collects the spans
//! under each request span and files the finished tree when the request span closes.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use deriva_core::spans;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{
    EventRecord, LinkRecord, MAX_EVENTS_PER_SPAN, MAX_FIELD_LEN, MAX_SPANS_PER_TRACE, REQUEST_SPAN,
    SpanRecord, TraceRecord, TraceStore,
};

/// What the layer keeps in a span's extensions while it is open.
struct Open {
    id: u64,
    parent: Option<u64>,
    /// The request span's tracing id and start, so closing is O(1) however deep the span
    /// (walking the scope to the root made a 10,000-deep chain quadratic).
    root: (Id, Instant),
    start: Instant,
    fields: Vec<(&'static str, String)>,
    events: Vec<EventRecord>,
    links: Vec<LinkRecord>,
}

/// Extra state of an open request span.
struct Request {
    started_unix_ms: u64,
    spans: Vec<SpanRecord>,
    dropped: u64,
    /// The trace id once it is recorded and counted among the open ones (never for `Explain`,
    /// which shares the trace id of the command whose request it explains).
    counted_as_open: Option<String>,
    explain: bool,
}

struct Fields<'a>(&'a mut Vec<(&'static str, String)>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, mut value: String) {
        if value.len() > MAX_FIELD_LEN {
            let mut cut = MAX_FIELD_LEN;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        match self.0.iter_mut().find(|(k, _)| *k == field.name()) {
            Some(slot) => slot.1 = value,
            None => self.0.push((field.name(), value)),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

/// The layer of a [`TraceStore`]; see the module docs.
#[derive(Debug, Clone)]
pub struct TraceStoreLayer {
    pub(super) store: TraceStore,
}

impl<S> Layer<S> for TraceStoreLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span.parent();
        let is_request = parent.is_none() && attrs.metadata().name() == REQUEST_SPAN;
        let start = Instant::now();
        // Only spans under a request span are kept.
        let (parent_id, root) = match &parent {
            Some(p) => match p.extensions().get::<Open>() {
                Some(open) => (Some(open.id), open.root.clone()),
                None => return,
            },
            None if is_request => (None, (id.clone(), start)),
            None => return,
        };
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let explain = is_request
            && fields
                .iter()
                .any(|(k, v)| *k == spans::field::RPC_METHOD && v == "Explain");
        let mut ext = span.extensions_mut();
        ext.insert(Open {
            id: self.store.next_id.fetch_add(1, Ordering::Relaxed),
            parent: parent_id,
            root,
            start,
            fields,
            events: Vec::new(),
            links: Vec::new(),
        });
        if is_request {
            let started_unix_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            ext.insert(Request {
                started_unix_ms,
                spans: Vec::new(),
                dropped: 0,
                counted_as_open: None,
                explain,
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(open) = ext.get_mut::<Open>() else {
            return;
        };
        values.record(&mut Fields(&mut open.fields));
        // Only a request span's first recorded trace id counts it among the open traces; the
        // spans below it pay nothing more here.
        let wants_id = ext
            .get_mut::<Request>()
            .is_some_and(|r| !r.explain && r.counted_as_open.is_none());
        if !wants_id {
            return;
        }
        let trace_id = ext.get_mut::<Open>().and_then(|open| {
            open.fields
                .iter()
                .find(|(k, v)| *k == spans::field::TRACE_ID && !v.is_empty())
                .map(|(_, v)| v.clone())
        });
        if let (Some(request), Some(id)) = (ext.get_mut::<Request>(), trace_id) {
            self.store.opened(&id);
            request.counted_as_open = Some(id);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut ext = span.extensions_mut();
        let Some(open) = ext.get_mut::<Open>() else {
            return;
        };
        if open.events.len() >= MAX_EVENTS_PER_SPAN {
            return;
        }
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        open.events.push(EventRecord {
            at_us: open.root.1.elapsed().as_micros() as u64,
            level: event.metadata().level().as_str(),
            fields,
        });
    }

    fn on_follows_from(&self, id: &Id, follows: &Id, ctx: Context<'_, S>) {
        let (Some(span), Some(followed)) = (ctx.span(id), ctx.span(follows)) else {
            return;
        };
        // The request the followed span belongs to, and its trace id.
        let Some(root) = followed
            .extensions()
            .get::<Open>()
            .and_then(|open| ctx.span(&open.root.0))
        else {
            return;
        };
        let trace_id = root.extensions().get::<Open>().and_then(|open| {
            open.fields
                .iter()
                .find(|(k, _)| *k == spans::field::TRACE_ID)
                .map(|(_, v)| v.clone())
        });
        let Some(trace_id) = trace_id else { return };
        if let Some(open) = span.extensions_mut().get_mut::<Open>() {
            open.links.push(LinkRecord {
                trace_id,
                name: followed.name(),
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let end = Instant::now();
        let request = span.extensions_mut().remove::<Request>();
        let (root_id, root_start) = open.root.clone();
        let record = SpanRecord {
            id: open.id,
            parent: open.parent,
            name: span.name(),
            start_us: open.start.duration_since(root_start).as_micros() as u64,
            duration_us: end.duration_since(open.start).as_micros() as u64,
            fields: open.fields,
            events: open.events,
            links: open.links,
        };
        match request {
            None => {
                // A span inside a request: file it with the request span (still open, since a
                // parent outlives its children).
                if let Some(root) = ctx.span(&root_id) {
                    let mut ext = root.extensions_mut();
                    if let Some(r) = ext.get_mut::<Request>() {
                        if r.spans.len() < MAX_SPANS_PER_TRACE {
                            r.spans.push(record);
                        } else {
                            r.dropped += 1;
                        }
                    }
                }
            }
            Some(r) => {
                let _closed = Closed(&self.store, r.counted_as_open.clone());
                let field = |name: &str| record.field(name).map(str::to_owned);
                let mut spans = Vec::with_capacity(r.spans.len() + 1);
                let addr = r
                    .spans
                    .iter()
                    .filter(|s| s.name == spans::MATERIALIZE)
                    .min_by_key(|s| s.start_us)
                    .and_then(|s| s.field(spans::field::ADDR))
                    .map(str::to_owned);
                let trace = TraceRecord {
                    trace_id: field(spans::field::TRACE_ID).unwrap_or_default(),
                    request_id: field(spans::field::REQUEST_ID).unwrap_or_default(),
                    method: field(spans::field::RPC_METHOD).unwrap_or_default(),
                    addr,
                    status_code: field("rpc.grpc.status_code")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0),
                    started_unix_ms: r.started_unix_ms,
                    duration_us: record.duration_us,
                    dropped_spans: r.dropped,
                    spans: Vec::new(),
                };
                // Asking for a trace is not worth a trace: it would also share the trace id of
                // the request it explains (the CLI sends one trace context per command).
                if trace.method == "Explain" {
                    return;
                }
                spans.push(record);
                spans.extend(r.spans);
                self.store.insert(TraceRecord { spans, ..trace });
            }
        }
    }
}

/// Marks a request span closed when dropped: after its trace is filed, or when it is skipped.
struct Closed<'a>(&'a TraceStore, Option<String>);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.closed(self.1.as_deref());
    }
}
