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
//! **Who may read `/metrics` and `/debug/*`** ([`require_admin`]): anyone, unless the pages are
//! protected. With `--auth-tokens`, a bearer token with the `admin` scope opens them (401 without
//! a known token, 403 without the scope). With `--tls-client-ca`, the listener asks every client
//! for a certificate without requiring one, and a certificate issued by that CA opens them too;
//! a client with neither gets 403 (401 when tokens are on, since a token would do). `/healthz`
//! and `/readyz` stay open for probes, and `/health` shows counts only (no paths, no backend
//! addresses) whenever the pages are protected.
//!
//! **Timeouts** ([`serve`]): hyper's HTTP/1 server with a timer. Its header-read timeout, the
//! handshake timeout (`--handshake-timeout-secs`), starts whenever the connection waits for a
//! request head: so it bounds both the headers of each request and the idle time of a
//! keep-alive connection between two requests (hyper restarts it as the connection goes idle).
//! The first request's headers are already in when hyper gets the connection
//! ([`crate::listen`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    /// The bearer tokens of `--auth-tokens`: with them, `/metrics` and `/debug/*` need `admin`
    /// (or a client certificate, with `client_certificates`).
    pub auth: Option<Arc<Tokens>>,
    /// `--tls-client-ca`: clients are asked for a certificate, and `/metrics` and `/debug/*`
    /// need one issued by that CA (or an `admin` token, with `auth`).
    pub client_certificates: bool,
    /// Counts refused requests (`deriva_auth_failures_total`).
    pub metrics: ServerMetrics,
    /// What `/debug` shows about the server.
    pub about: Arc<About>,
    /// `--trace-url-template`: where a link to a trace this node does not hold goes.
    pub trace_url_template: Option<String>,
}

/// The version and the effective settings, for `/debug`.
#[derive(Debug, Clone, Default)]
pub struct About {
    /// The server's version.
    pub version: &'static str,
    /// `Config::describe` (in `config.rs`): `key = value` pairs, secrets hidden.
    pub settings: Vec<(&'static str, String)>,
}

impl HttpState {
    /// Whether `/metrics` and `/debug/*` need a credential: a token or a client certificate.
    pub fn pages_protected(&self) -> bool {
        self.auth.is_some() || self.client_certificates
    }
}

/// Set on every request of a connection whose client presented a certificate issued by the CA
/// of `--tls-client-ca` (verified in the handshake).
#[derive(Debug, Clone, Copy)]
pub struct ClientCertificate;

/// The router.
pub fn router(state: HttpState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/debug", get(debug::index))
        .route("/debug/traces", get(debug::trace_lists))
        .route("/debug/traces/{trace_id}", get(debug::trace_one))
        .route("/debug/provenance/{addr}", get(debug::provenance))
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

/// Lets through, on protected pages, only a client with a certificate from the CA of
/// `--tls-client-ca` or with an `admin` bearer token of `--auth-tokens`.
async fn require_admin(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.pages_protected() {
        return next.run(request).await;
    }
    if state.client_certificates && request.extensions().get::<ClientCertificate>().is_some() {
        return next.run(request).await;
    }
    let or_certificate = if state.client_certificates {
        ", or a client certificate issued by the CA of --tls-client-ca"
    } else {
        ""
    };
    let Some(tokens) = &state.auth else {
        // Mutual TLS alone: there is nothing to send in a header that would do.
        return (
            StatusCode::FORBIDDEN,
            "this page needs a client certificate issued by the CA of --tls-client-ca\n",
        )
            .into_response();
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
            let message = format!("{}{or_certificate}\n", e.message(Scope::Admin));
            (
                status,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"deriva\"")],
                message,
            )
                .into_response()
        }
    }
}

/// Serves `router(state)` on the connections of `listener` until `shutdown` completes: then it
/// stops accepting, lets each connection finish the request it is answering (an idle one
/// closes at once), and returns once all are closed. `header_timeout` bounds each request's
/// headers and the idle time between two requests (see the module documentation).
pub async fn serve(
    mut listener: crate::listen::HttpListener,
    state: HttpState,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    // Every connection's task waits on this to begin its graceful shutdown.
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Some((conn, peer)) = accepted else { break };
        let certified = conn.client_certificate();
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            if certified {
                request.extensions_mut().insert(ClientCertificate);
            }
            // A Router is always ready: no poll_ready needed before the call.
            tower::Service::call(&mut router.clone(), request)
        });
        let connection = http1.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let closing = async move {
                // The guard `wait_for` returns must not live across an await.
                let _ = closing.wait_for(|closing| *closing).await.map(drop);
            };
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = closing => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                // Header timeouts, clients that left, malformed requests.
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
        // Forget the connections that have ended.
        while connections.try_join_next().is_some() {}
    }
    // No new connections: the accept loop ends with its receiver.
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
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
    // Open to anyone: with protected pages, counts only (no data directory, no backend address).
    let open = state.pages_protected();
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
    } else if state.pages_protected() {
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
