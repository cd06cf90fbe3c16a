//! The HTTP listener beside gRPC (axum): `/metrics`, `/health`, `/healthz` and `/readyz`.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | the Prometheus text format (`text/plain; version=0.0.4`) |
//! | `GET /health` | JSON `{status, cache_entries, dag_recipes, uptime_seconds}`; 503 with `reason` when a real read of the store fails |
//! | `GET /healthz` | liveness: 200 while the process serves HTTP |
//! | `GET /readyz` | readiness: 200 once the store is open, 503 while shutting down |
//! | `GET /debug/traces` | JSON: the recent, slowest and failed requests (see [`crate::trace_store`]) |
//! | `GET /debug/traces/{trace_id}` | one request's span tree as JSON, or as HTML for a browser (`Accept: text/html`) |

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deriva_compute::AsyncExecutor;
use serde_json::json;

use crate::trace_store::TraceStore;

mod debug;

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The registry `/metrics` encodes; `None` answers 404 there.
    pub registry: Option<prometheus::Registry>,
    /// The engine, for `/health`.
    pub exec: AsyncExecutor,
    /// When the server started.
    pub started: Instant,
    /// False until serving starts and again from the shutdown signal on.
    pub ready: Arc<AtomicBool>,
    /// Recent request traces; `None` answers 404 on `/debug/traces`.
    pub traces: Option<TraceStore>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/traces", get(debug::trace_lists))
        .route("/debug/traces/{trace_id}", get(debug::trace_one))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let Some(registry) = state.registry else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response();
    };
    // Encoding runs the observable callbacks and formats every series: keep it off the
    // workers that serve RPCs.
    let encoded = tokio::task::spawn_blocking(move || {
        prometheus::TextEncoder::new().encode_to_string(&registry.gather())
    })
    .await;
    match encoded {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "encoding /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics task failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn health(State(state): State<HttpState>) -> Response {
    // A real read of both halves of the store (for the local backend: a redb lookup and a
    // blob directory lookup).
    let failure = state
        .exec
        .store()
        .check()
        .await
        .err()
        .map(|e| e.to_string());
    let body = |status: &str| {
        json!({
            "status": status,
            "cache_entries": state.exec.cache().stats().entries(),
            "dag_recipes": state.exec.store().counters().recipes(),
            "uptime_seconds": state.started.elapsed().as_secs(),
        })
    };
    match failure {
        None => (StatusCode::OK, axum::Json(body("healthy"))).into_response(),
        Some(reason) => {
            tracing::warn!(%reason, "health check failed");
            let mut value = body("unhealthy");
            value["reason"] = json!(reason);
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(value)).into_response()
        }
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
