//! The `/debug` pages: the recent, slowest and failed requests of the trace store, and one
//! request's span tree as JSON or as a minimal HTML page.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::HttpState;
use crate::trace_store::TraceRecord;

pub(super) async fn trace_lists(State(state): State<HttpState>) -> Response {
    match state.traces {
        Some(traces) => axum::Json(traces.lists()).into_response(),
        None => (StatusCode::NOT_FOUND, "the trace store is off\n").into_response(),
    }
}

pub(super) async fn trace_one(
    State(state): State<HttpState>,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(traces) = state.traces else {
        return (StatusCode::NOT_FOUND, "the trace store is off\n").into_response();
    };
    let Some(trace) = traces.get(&trace_id) else {
        return (StatusCode::NOT_FOUND, "no such trace among those kept\n").into_response();
    };
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            trace_html(&trace),
        )
            .into_response()
    } else {
        axum::Json(trace.as_ref().clone()).into_response()
    }
}

/// A minimal page: the span tree as nested lists, with durations and fields.
fn trace_html(trace: &TraceRecord) -> String {
    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }
    fn node(trace: &TraceRecord, id: u64, out: &mut String) {
        let Some(span) = trace.spans.iter().find(|s| s.id == id) else {
            return;
        };
        let fields: Vec<String> = span
            .fields
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect();
        out.push_str(&format!(
            "<li><b>{}</b> <code>{:.3} ms</code> <small>+{:.3} ms {}</small>",
            esc(span.name),
            span.duration_us as f64 / 1000.0,
            span.start_us as f64 / 1000.0,
            fields.join(" ")
        ));
        let mut children: Vec<_> = trace
            .spans
            .iter()
            .filter(|s| s.parent == Some(id))
            .collect();
        children.sort_by_key(|s| s.start_us);
        if !children.is_empty() {
            out.push_str("<ul>");
            for c in children {
                node(trace, c.id, out);
            }
            out.push_str("</ul>");
        }
        out.push_str("</li>");
    }
    let mut out = format!(
        "<!doctype html><meta charset=utf-8><title>trace {id}</title>\
         <h1>{method} <code>{id}</code></h1><p>request {req}, status {code}, {ms:.3} ms</p><ul>",
        id = esc(&trace.trace_id),
        method = esc(&trace.method),
        req = esc(&trace.request_id),
        code = trace.status_code,
        ms = trace.duration_us as f64 / 1000.0,
    );
    if let Some(root) = trace.spans.first() {
        node(trace, root.id, &mut out);
    }
    out.push_str("</ul>");
    out
}
