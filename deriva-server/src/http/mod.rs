//! The HTTP listener beside gRPC (axum): `/metrics`, `/health`, `/healthz` and `/readyz`.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | the Prometheus text format (`text/plain; version=0.0.4`) |
//! | `GET /health` | JSON `{status, store, cache_entries, dag_recipes, uptime_seconds}`; 503 with `reason` and `failures` (each naming its backend: the index, the blob store) when a real read of either fails (a probe's outcome answers for a second: [`ProbeCache`]) |
//! | `GET /healthz` | liveness: 200 while the process serves HTTP |
//! | `GET /readyz` | readiness: 200 once the store is open and both backends answer a real read (the same shared probe as `/health`); 503 while shutting down, or while a backend is unreachable (the body names it) |
//! | `GET /debug` | an HTML index: version, uptime, store, effective settings, links to the other pages |
//! | `GET /debug/traces` | JSON: the recent, slowest and failed requests (see [`crate::trace_store`]); for a browser (`Accept: text/html`) three filterable tables |
//! | `GET /debug/traces/{trace_id}` | one request's span tree as JSON, or for a browser a waterfall of its spans |
//!
//! The HTML pages load nothing from elsewhere and send a `Content-Security-Policy` that lets only
//! their own inline script run.
//!
//! With `--auth-tokens`, `/metrics` and `/debug/*` need a bearer token with the `admin` scope
//! (401 without a known token, 403 without the scope); `/healthz` and `/readyz` stay open for
//! probes, and `/health` then shows counts only (no paths, no backend addresses).

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

use crate::auth::{AuthError, Scope, Tokens};
use crate::telemetry::ServerMetrics;
use crate::trace_store::TraceStore;

mod debug;
mod probe;

pub use probe::ProbeCache;

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The registry `/metrics` encodes; `None` answers 404 there.
    pub registry: Option<prometheus::Registry>,
    /// The engine, for `/health`.
    pub exec: AsyncExecutor,
    /// The outcome of the last backend probe of `/health` and `/readyz`, shared by both.
    pub probe: ProbeCache,
    /// When the server started.
    pub started: Instant,
    /// False until serving starts and again from the shutdown signal on.
    pub ready: Arc<AtomicBool>,
    /// Recent request traces; `None` answers 404 on `/debug/traces`.
    pub traces: Option<TraceStore>,
    /// The bearer tokens of `--auth-tokens`: with them, `/metrics` and `/debug/*` need `admin`.
    pub auth: Option<Arc<Tokens>>,
    /// Counts refused requests (`deriva_auth_failures_total`).
    pub metrics: ServerMetrics,
    /// What `/debug` shows about the server.
    pub about: Arc<About>,
}

/// The version and the effective settings, for `/debug`.
#[derive(Debug, Clone, Default)]
pub struct About {
    /// The server's version.
    pub version: &'static str,
    /// [`crate::config::Config::describe`]: `key = value` pairs, secrets hidden.
    pub settings: Vec<(&'static str, String)>,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/debug", get(debug::index))
        .route("/debug/traces", get(debug::trace_lists))
        .route("/debug/traces/{trace_id}", get(debug::trace_one))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(state)
}

/// With `--auth-tokens`, lets through only requests with an `admin` bearer token.
async fn require_admin(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(tokens) = &state.auth else {
        return next.run(request).await;
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match tokens.check(authorization, Scope::Admin) {
        Ok(_) => next.run(request).await,
        Err(e) => {
            state.metrics.record_auth_failure(e.reason());
            let status = match e {
                AuthError::Scope { .. } => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let message = format!("{}\n", e.message(Scope::Admin));
            (
                status,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"deriva\"")],
                message,
            )
                .into_response()
        }
    }
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve<L>(
    listener: L,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
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

/// How long a health or readiness probe waits for each backend.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A real round trip to each half of the store, at once (for the local backend: a redb lookup
/// and a blob directory lookup; for the remote one: a PostgreSQL query and a signed object
/// store request). Returns what failed, each naming its backend.
async fn backend_failures(exec: &AsyncExecutor) -> Vec<String> {
    let store = exec.store();
    let probe = |what: &'static str, check| async move {
        match tokio::time::timeout(PROBE_TIMEOUT, check).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e}")),
            Err(_) => Some(format!(
                "{what} did not answer within {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    };
    let (index, blobs) = tokio::join!(
        probe("the recipe index", store.recipes().check()),
        probe("the blob store", store.blobs().check()),
    );
    index.into_iter().chain(blobs).collect()
}

async fn health(State(state): State<HttpState>) -> Response {
    let failures = state.probe.outcome(|| backend_failures(&state.exec)).await;
    // Open to anyone: with --auth-tokens, counts only (no data directory, no backend address).
    let open = state.auth.is_some();
    let body = |status: &str| {
        let mut value = json!({
            "status": status,
            "cache_entries": state.exec.cache().stats().entries(),
            "dag_recipes": state.exec.store().counters().recipes(),
            "uptime_seconds": state.started.elapsed().as_secs(),
        });
        if !open {
            value["store"] = json!(state.exec.store().description());
        }
        value
    };
    if failures.is_empty() {
        (StatusCode::OK, axum::Json(body("healthy"))).into_response()
    } else {
        let reason = failures.join("; ");
        tracing::warn!(%reason, "health check failed");
        let mut value = body("unhealthy");
        if open {
            value["failures"] = json!(failures.len());
        } else {
            value["reason"] = json!(reason);
            value["failures"] = json!(&*failures);
        }
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(value)).into_response()
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
    }
    let failures = state.probe.outcome(|| backend_failures(&state.exec)).await;
    if failures.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else if state.auth.is_some() {
        // Open to anyone: no backend addresses.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {} backend(s) unreachable\n", failures.len()),
        )
            .into_response()
    } else {
        let reason = failures.join("; ");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response()
    }
}
