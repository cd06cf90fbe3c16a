//! The `/debug` pages: an index of the listener, the recent, slowest and failed requests of
//! the trace store, and one request's span tree. The lists and the tree answer JSON unless the
//! request accepts `text/html` (a browser), which gets a page instead: see [`page`] for what
//! every page shares (escaping, a Content-Security-Policy with a per-response script nonce),
//! [`lists`] and [`waterfall`] for the two views.

mod index;
mod lists;
mod page;
mod provenance;
mod waterfall;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::HttpState;

/// Whether the client asked for a page rather than JSON.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

pub(super) async fn index(State(state): State<HttpState>) -> Response {
    index::page(&state).into_response()
}

pub(super) async fn trace_lists(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    match state.traces {
        Some(traces) if wants_html(&headers) => lists::page(&traces.lists()).into_response(),
        Some(traces) => axum::Json(traces.lists()).into_response(),
        None => (StatusCode::NOT_FOUND, "the trace store is off\n").into_response(),
    }
}

pub(super) async fn trace_one(
    State(state): State<HttpState>,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(traces) = state.traces.clone() else {
        return (StatusCode::NOT_FOUND, "the trace store is off\n").into_response();
    };
    let Some(trace) = traces.get(&trace_id) else {
        return (StatusCode::NOT_FOUND, "no such trace among those kept\n").into_response();
    };
    if wants_html(&headers) {
        let href = |id: &str| trace_href(&state.traces, state.trace_url_template.as_deref(), id);
        waterfall::page(&trace, &href).into_response()
    } else {
        axum::Json(trace.as_ref().clone()).into_response()
    }
}

/// The link of the trace `id`: its waterfall here while the trace store holds it, else
/// `--trace-url-template`'s URL, else none.
fn trace_href(
    traces: &Option<crate::trace_store::TraceStore>,
    template: Option<&str>,
    id: &str,
) -> Option<String> {
    if !page::linkable(id) {
        return None;
    }
    if traces.as_ref().is_some_and(|t| t.get(id).is_some()) {
        return Some(format!("/debug/traces/{id}"));
    }
    template.map(|t| t.replace("{trace_id}", id))
}

/// `?depth=N` of `/debug/provenance/{addr}`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct DepthQuery {
    depth: Option<u32>,
}

pub(super) async fn provenance(
    State(state): State<HttpState>,
    Path(addr): Path<String>,
    Query(query): Query<DepthQuery>,
    headers: HeaderMap,
) -> Response {
    let Ok(parsed) = addr.parse::<deriva_core::CAddr>() else {
        return (
            StatusCode::BAD_REQUEST,
            "the address is not 64 hexadecimal characters\n",
        )
            .into_response();
    };
    let depth = query.depth.unwrap_or(provenance::DEPTH);
    if depth > provenance::MAX_DEPTH {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "depth {depth} is deeper than a page shows ({}); deriva provenance --depth goes further\n",
                provenance::MAX_DEPTH
            ),
        )
            .into_response();
    }
    let tree = match state.exec.provenance(parsed, depth).await {
        Ok(tree) => tree,
        Err(deriva_core::DerivaError::NotFound { .. }) => {
            return (StatusCode::NOT_FOUND, "nothing is stored at this address\n").into_response();
        }
        Err(e @ deriva_core::DerivaError::Unavailable { .. }) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let rows = provenance::rows(&tree);
    if wants_html(&headers) {
        let href = |id: &str| trace_href(&state.traces, state.trace_url_template.as_deref(), id);
        provenance::page(&addr, depth, &rows, tree.truncated, &href).into_response()
    } else {
        axum::Json(serde_json::json!({ "entries": rows, "truncated": tree.truncated }))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_not_held_here_links_through_the_template() {
        let template = Some("https://jaeger.example/trace/{trace_id}");
        assert_eq!(
            trace_href(&None, template, "4bf9").as_deref(),
            Some("https://jaeger.example/trace/4bf9")
        );
        assert_eq!(trace_href(&None, None, "4bf9"), None);
        assert_eq!(trace_href(&None, template, "not hex"), None);
    }
}
