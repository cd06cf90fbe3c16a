//! Log lines that carry their request: [`WithTraceIds`] appends (text) or prepends (JSON) the
//! current `trace_id`, `span_id` and request id to every line written inside a span.

use std::fmt;
use std::sync::Arc;

use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;
use tracing::Subscriber;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The request id of the current request, carried in the OpenTelemetry context of its spans
/// (set by `rpc::layer`), so log lines can name it without formatting span fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// The ids a log line inside a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineIds {
    /// W3C trace id, 32 hex characters.
    pub trace_id: String,
    /// Span id, 16 hex characters; `None` in an untraced request, which has no span.
    pub span_id: Option<String>,
    /// The request id, when the line is inside a request.
    pub request_id: Option<Arc<str>>,
}

/// The ids of the current OpenTelemetry context, if a span is active, else those of the
/// untraced request running (see [`deriva_core::untraced`]), if any.
pub fn current_ids() -> Option<LineIds> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() {
        return Some(LineIds {
            trace_id: sc.trace_id().to_string(),
            span_id: Some(sc.span_id().to_string()),
            request_id: cx.get::<RequestId>().map(|r| r.0.clone()),
        });
    }
    deriva_core::untraced::current().map(|scope| LineIds {
        trace_id: scope.trace_hex(),
        span_id: None,
        request_id: Some(scope.request_id().clone()),
    })
}

/// Wraps an event formatter so each line inside a span ends with (text) or starts with (JSON)
/// the current `trace_id` and `span_id`.
#[derive(Debug)]
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(ids) = current_ids() else {
            return writer.write_str(&line);
        };
        let LineIds {
            trace_id,
            span_id,
            request_id,
        } = ids;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        // Request ids are sanitized tokens (see `rpc::layer::request_id`): safe in JSON and text.
        match body.strip_prefix('{') {
            Some(rest) => {
                write!(writer, "{{\"trace_id\":\"{trace_id}\",")?;
                if let Some(span_id) = span_id {
                    write!(writer, "\"span_id\":\"{span_id}\",")?;
                }
                if let Some(rid) = request_id {
                    write!(writer, "\"request_id\":\"{rid}\",")?;
                }
                writeln!(writer, "{rest}")
            }
            None => {
                write!(writer, "{body} trace_id={trace_id}")?;
                if let Some(span_id) = span_id {
                    write!(writer, " span_id={span_id}")?;
                }
                if let Some(rid) = request_id {
                    write!(writer, " request_id={rid}")?;
                }
                writeln!(writer)
            }
        }
    }
}
