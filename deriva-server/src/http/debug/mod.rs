//! The `/debug` pages: an index of the listener, the recent, slowest and failed requests of
//! the trace store, and one request's span tree. The lists and the tree answer JSON unless the
//! request accepts `text/html` (a browser), which gets a page instead: see [`page`] for what
//! every page shares (escaping, a Content-Security-Policy with a per-response script nonce),
//! [`lists`] and [`waterfall`] for the two views.

mod index;
mod lists;
mod page;
mod waterfall;

use axum::extract::{Path, State};
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
    let Some(traces) = state.traces else {
        return (StatusCode::NOT_FOUND, "the trace store is off\n").into_response();
    };
    let Some(trace) = traces.get(&trace_id) else {
        return (StatusCode::NOT_FOUND, "no such trace among those kept\n").into_response();
    };
    if wants_html(&headers) {
        waterfall::page(&trace).into_response()
    } else {
        axum::Json(trace.as_ref().clone()).into_response()
    }
}
