//! [`RpcLayer`]: one tower layer around the gRPC service that gives every Deriva RPC its
//! telemetry, so no handler repeats it:
//!
//! - the `deriva_rpc_total{method,status}` count, the duration and the in-flight gauge, measured
//!   until the last frame of the response (a streaming `Get` until its stream ends; an error
//!   inside the stream or a client that hangs up counts as `error`);
//! - an OpenTelemetry server span named `deriva.Deriva/<Method>` with `rpc.system`,
//!   `rpc.service`, `rpc.method`, `rpc.grpc.status_code` and `request_id`, continuing the
//!   caller's W3C `traceparent` when there is a valid one;
//! - the request id: `x-request-id` when it is a safe token (no whitespace, quote or backslash),
//!   a new UUID otherwise;
//! - the [`Edge`]'s decision, made before anything else: a traced request gets the span below
//!   and its tree; an untraced one runs in a [`deriva_core::untraced`] scope, builds no span,
//!   and is filed by the trace store at its end only if it failed or was slow;
//! - `x-request-id` on every response, unary or streaming; `x-trace-id` on those of traced
//!   requests and on the trailers-only failures of untraced ones;
//! - with `--auth-tokens`, the bearer token checked for the method's scope before the span
//!   starts: a refused call answers without reaching the service, and is never a forced trace.
//!   `x-deriva-trace: force` is honoured only for a token with `write` or `admin` (without
//!   tokens every caller is trusted, so for anyone), and the sampler still counts it against
//!   `--trace-max-per-second`. `x-deriva-trace: capture` (any caller) keeps the request's tree
//!   in the trace store without asking for export. An `Explain` carries its [`Caller`](crate::auth::Caller) (name
//!   and scopes) to the service;
//! - with a [`Cutoff`], every call but `Status` cut off with `UNAVAILABLE` when the shutdown
//!   grace is over (see [`crate::rpc::cutoff`]).
//!
//! Requests to other services (the gRPC health service) pass through untouched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::Status;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing::instrument::WithSubscriber;
use tracing::{Dispatch, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use deriva_core::spans;

use crate::auth::{AUTH_NAME, AuthError, Scope, Tokens};
use crate::method::{RpcMethod, SERVICE};
use crate::rpc::cutoff::Cutoff;
use crate::rpc::edge::{Decision, Edge};
use crate::telemetry::RequestId;
use crate::telemetry::metrics::{RpcTimer, ServerMetrics};
use crate::trace_store::UntracedEnd;
use deriva_core::untraced::{self, Untraced};

/// Longest `x-request-id` honored; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest `traceparent`/`tracestate` read; longer ones are ignored.
const MAX_TRACE_HEADER_LEN: usize = 512;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: ServerMetrics,
    dispatch: Option<Dispatch>,
    auth: Option<Arc<Tokens>>,
    cutoff: Cutoff,
    edge: Option<Arc<Edge>>,
}

impl RpcLayer {
    /// A layer recording into `metrics`. With `dispatch`, spans and logs of each call go to that
    /// subscriber instead of the global one (used by in-process tests).
    pub fn new(metrics: ServerMetrics, dispatch: Option<Dispatch>) -> Self {
        Self {
            metrics,
            dispatch,
            auth: None,
            cutoff: Cutoff::default(),
            edge: None,
        }
    }

    /// Decides per request with `edge` whether it is traced (see [`crate::rpc::edge`]);
    /// without one, every request is, and the tracer's sampler decides what is exported.
    pub fn with_edge(mut self, edge: Option<Arc<Edge>>) -> Self {
        self.edge = edge;
        self
    }

    /// Requires a bearer token of `tokens` with the scope of each RPC
    /// ([`RpcMethod::scope`]); a refused call answers `UNAUTHENTICATED` or `PERMISSION_DENIED`
    /// without reaching the service.
    pub fn with_auth(mut self, tokens: Option<Arc<Tokens>>) -> Self {
        self.auth = tokens;
        self
    }

    /// Ends every call but `Status` with `UNAVAILABLE` once `cutoff` triggers (the shutdown
    /// grace is over), if it is still running then.
    pub fn with_cutoff(mut self, cutoff: Cutoff) -> Self {
        self.cutoff = cutoff;
        self
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
            dispatch: self.dispatch.clone(),
            auth: self.auth.clone(),
            cutoff: self.cutoff.clone(),
            edge: self.edge.clone(),
        }
    }
}

/// The service made by [`RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: ServerMetrics,
    dispatch: Option<Dispatch>,
    auth: Option<Arc<Tokens>>,
    cutoff: Cutoff,
    edge: Option<Arc<Edge>>,
}

type Resp = http::Response<tonic::body::Body>;

impl<S, B> Service<http::Request<B>> for RpcService<S>
where
    S: Service<http::Request<B>, Response = Resp, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = RpcMethod::from_path(req.uri().path());
        // The usual tower dance: the ready service handles this call, a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(method) = method else {
            return Box::pin(inner.call(req));
        };

        let request_id = request_id(req.headers());
        // With --auth-tokens: the caller's name (for the span and the completion line), or the
        // status that refuses the call before it reaches the service. Decided before the span,
        // so that only a caller who may force a trace does.
        let mut caller: Option<String> = None;
        let mut refused = None;
        let mut force = asks_for(req.headers(), "force");
        // Keeping one's own request tree in the trace store (`deriva get --explain`) costs
        // no export: any caller may ask.
        let capture = force || asks_for(req.headers(), "capture");
        let mut known = None;
        if let Some(tokens) = self.auth.as_deref() {
            let needed = method.scope();
            let authorization = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            // One look at the tokens: the caller, with every scope of its token.
            let refusal = match tokens.identify(authorization) {
                Ok(who) if who.has(needed) => {
                    // A forced trace costs the exporter and the collector whatever the sample
                    // ratio: only a caller allowed to change the store (write) or to run it
                    // (admin) may ask.
                    force = force && (who.has(Scope::Write) || who.has(Scope::Admin));
                    caller = Some(who.name.clone());
                    // Who asks, for `Explain`, which answers per caller.
                    if method == RpcMethod::Explain {
                        known = Some(who);
                    }
                    None
                }
                Ok(who) => {
                    caller = Some(who.name.clone());
                    Some(AuthError::Scope {
                        needed,
                        name: who.name,
                    })
                }
                Err(e) => Some(e),
            };
            if let Some(e) = refusal {
                self.metrics.record_auth_failure(e.reason());
                refused = Some(e.status(needed));
                force = false;
            }
        }
        if let Some(known) = known {
            req.extensions_mut().insert(known);
        }
        let dispatch = self.dispatch.clone();
        // The caller's context when `traceparent` is valid (an empty one otherwise).
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        // `None`: no edge, so traced, and the tracer's sampler decides (`force` asks it to).
        let decision = self
            .edge
            .as_ref()
            .map(|edge| edge.decide(parent.span().span_context(), force, capture));
        let timer = self.metrics.start(method);
        let mut end = CallEnd {
            timer: Some(timer),
            span: None,
            untraced: None,
            dispatch: dispatch.clone(),
            method,
            caller,
        };
        let mut trace_id = None;
        if let (Some(Decision::Untraced), Some(edge)) = (decision, &self.edge) {
            let caller_trace = parent.span().span_context().trace_id();
            let id = match caller_trace != opentelemetry::trace::TraceId::INVALID {
                true => u128::from_be_bytes(caller_trace.to_bytes()),
                false => fastrand::u128(1..),
            };
            let scope = Untraced::new(id, Arc::from(request_id.as_str()));
            end.untraced = Some((scope, edge.clone()));
        } else {
            let sampled = decision.map(|d| d == Decision::Traced { sampled: true });
            let span = with_dispatch(dispatch.as_ref(), || {
                rpc_span(method, &request_id, parent, force, sampled)
            });
            // Starting the OTel span here (with the remote parent already set) makes the
            // sampling decision; without an OpenTelemetry layer there is no trace id to report.
            trace_id = {
                let cx = span.context();
                let sc = cx.span().span_context().clone();
                sc.is_valid().then(|| sc.trace_id().to_string())
            };
            if let Some(id) = &trace_id {
                span.record(spans::field::TRACE_ID, id.as_str());
            }
            if let Some(name) = &end.caller {
                span.record(AUTH_NAME, name.as_str());
            }
            end.span = Some(span);
        }

        // One box per call, below: the refusal and the call are the two arms of an `Either`.
        let call = match refused {
            Some(status) => futures::future::Either::Left(std::future::ready(Ok::<_, Infallible>(
                status.into_http(),
            ))),
            // `Status` answers at once from counters, and is never cut off.
            None if method == RpcMethod::Status => {
                futures::future::Either::Right(Cutoff::default().run(inner.call(req)))
            }
            None => futures::future::Either::Right(self.cutoff.clone().run(inner.call(req))),
        };
        // A traced call runs in its span; an untraced one in its scope (no span: the span
        // layers see the scope and build none below it).
        let scope = end.untraced.as_ref().map(|(scope, _)| scope.clone());
        let call = match &end.span {
            Some(span) => futures::future::Either::Left(call.instrument(span.clone())),
            None => futures::future::Either::Right(untraced::scoped(scope.clone(), call)),
        };
        let call: Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>> = match dispatch {
            Some(d) => Box::pin(call.with_subscriber(d)),
            None => Box::pin(call),
        };
        Box::pin(async move {
            let Ok(mut resp) = call.await;
            let failed_at_once = Status::from_header_map(resp.headers());
            let headers = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                headers.insert("x-request-id", v);
            }
            // An untraced request's trace id is worth sending only with a failure the trace
            // store files (a stream's failure comes after its headers).
            let trace_id = trace_id.or_else(|| {
                let failed = failed_at_once
                    .as_ref()
                    .is_some_and(|s| s.code() != tonic::Code::Ok);
                scope.filter(|_| failed).map(|s| s.trace_hex())
            });
            if let Some(v) = trace_id
                .as_deref()
                .and_then(|t| HeaderValue::from_str(t).ok())
            {
                headers.insert("x-trace-id", v);
            }
            if let Some(status) = failed_at_once {
                // Trailers-only response: the call is over.
                end.finish(status.code() as i32);
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = TrackedBody {
                inner: body,
                end: Some(end),
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

fn with_dispatch<T>(dispatch: Option<&Dispatch>, f: impl FnOnce() -> T) -> T {
    match dispatch {
        Some(d) => tracing::dispatcher::with_default(d, f),
        None => f(),
    }
}

/// Whether the request carries `x-deriva-trace: <what>` (`force` or `capture`).
fn asks_for(headers: &HeaderMap, what: &str) -> bool {
    headers
        .get("x-deriva-trace")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(what.as_bytes()))
}

/// The server span, under the caller's context `parent` (empty when `traceparent` is not
/// valid). `sampled` is the edge's decision, which the sampler follows; without one, `force`
/// asks the sampler to sample it whatever the ratio (still under the per-second cap).
fn rpc_span(
    method: RpcMethod,
    request_id: &str,
    parent: opentelemetry::Context,
    force: bool,
    sampled: Option<bool>,
) -> Span {
    let span = tracing::info_span!(
        spans::RPC,
        otel.name = method.span_name(),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = SERVICE,
        { spans::field::RPC_METHOD } = method.grpc_name(),
        rpc.grpc.status_code = Empty,
        { spans::field::REQUEST_ID } = request_id,
        { spans::field::TRACE_ID } = Empty,
        deriva.force_trace = force,
        deriva.sampled = sampled,
        auth.name = Empty,
    );
    // The caller's context (an empty one makes this a root), carrying the request id for log
    // lines. Set before the span is entered, so the sampler sees the remote parent.
    let _ = span.set_parent(parent.with_value(RequestId(request_id.into())));
    span
}

/// The caller's request id if it is a token of 1 to 128 visible ASCII characters other than `"`
/// and `\`, else a new UUID v4. Whitespace (a new log line, a new `key=value`), quotes and
/// backslashes (a way out of a JSON string) would let a caller write into the logs; anything
/// else is kept as given, and every page escapes it.
pub fn request_id(headers: &HeaderMap) -> String {
    let given = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        });
    match given {
        Some(id) => id.to_owned(),
        // A v4 UUID from the thread's fast generator (seeded once from the OS): an id needs to
        // be unique, not secret, and asking the OS for randomness on every call cost a system
        // call per request.
        None => uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
            .into_uuid()
            .to_string(),
    }
}

/// Reads W3C trace headers from HTTP headers, ignoring oversized values.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        (value.len() <= MAX_TRACE_HEADER_LEN).then_some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Finishes a call exactly once: on the final status, or on drop (a client that went away).
struct CallEnd {
    timer: Option<RpcTimer>,
    /// A traced call's span.
    span: Option<Span>,
    /// An untraced call's scope, and the edge whose trace store files it if it fails or is
    /// slow.
    untraced: Option<(Arc<Untraced>, Arc<Edge>)>,
    dispatch: Option<Dispatch>,
    method: RpcMethod,
    /// The caller's token name under `--auth-tokens` (`auth.name` on the completion line).
    caller: Option<String>,
}

/// `CANCELLED`, reported when the response was dropped before it ended.
const CANCELLED: i32 = 1;

impl CallEnd {
    fn finish(mut self, code: i32) {
        self.record(code);
    }

    fn record(&mut self, code: i32) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        let ok = code == 0;
        let duration = timer.finish(ok);
        let method = self.method.label();
        let caller = self.caller.as_deref();
        if let Some(span) = &self.span {
            span.record("rpc.grpc.status_code", i64::from(code));
            if !ok {
                span.record("otel.status_code", "ERROR");
            }
            // The span is entered (which activates its OpenTelemetry context for the line's
            // ids) only when the line will be written.
            with_dispatch(self.dispatch.as_ref(), || {
                if line_wanted(ok) {
                    span.in_scope(|| finished_line(ok, method, code, caller));
                }
            });
            return;
        }
        let Some((scope, edge)) = &self.untraced else {
            return;
        };
        let duration_us = duration.as_micros() as u64;
        if !ok || edge.traces().would_keep_as_slow(duration_us) {
            edge.traces().file_untraced(UntracedEnd {
                trace_id: scope.trace_hex(),
                request_id: scope.request_id(),
                method: self.method.grpc_name(),
                status_code: i64::from(code),
                duration,
                caller,
            });
        }
        // The line carries the request's ids through its scope.
        with_dispatch(self.dispatch.as_ref(), || {
            if line_wanted(ok) {
                untraced::enter(Some(scope.clone()), || {
                    finished_line(ok, method, code, caller);
                });
            }
        });
    }
}

/// Whether the completion line of a call will be written. A line per successful call is an
/// access log, and formatting and writing it cost ~20% of cached-Get throughput
/// (BENCHMARKS.md): DEBUG, usually off. Failures stay INFO.
fn line_wanted(ok: bool) -> bool {
    !ok || tracing::event_enabled!(tracing::Level::DEBUG)
}

/// The completion line of a call (see [`line_wanted`]).
fn finished_line(ok: bool, method: &str, code: i32, caller: Option<&str>) {
    if ok {
        match caller {
            Some(name) => {
                tracing::debug!(method = %method, code, auth.name = %name, "rpc finished");
            }
            None => tracing::debug!(method = %method, code, "rpc finished"),
        }
    } else {
        match caller {
            Some(name) => {
                tracing::info!(method = %method, code, auth.name = %name, "rpc failed");
            }
            None => tracing::info!(method = %method, code, "rpc failed"),
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.record(CANCELLED);
    }
}

/// The response body, watched for its final status.
struct TrackedBody {
    inner: tonic::body::Body,
    end: Option<CallEnd>,
}

impl TrackedBody {
    fn finish(&mut self, code: i32) {
        if let Some(end) = self.end.take() {
            end.finish(code);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = Status::from_header_map(trailers).map_or(0, |s| s.code() as i32);
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.finish(status.code() as i32),
            Poll::Ready(None) => this.finish(0),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use crate::telemetry::Telemetry;
    use tonic::Code;

    use super::*;

    /// A response body that yields the given frames.
    struct Frames(VecDeque<Result<Frame<Bytes>, Status>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    fn trailers(code: i32) -> Frame<Bytes> {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from(code));
        Frame::trailers(map)
    }

    struct Fixture {
        telemetry: Telemetry,
        metrics: ServerMetrics,
    }

    /// Private providers and registry, nothing global.
    fn fixture() -> Fixture {
        let telemetry = Telemetry::new(Default::default()).unwrap();
        let metrics = ServerMetrics::new(&telemetry.meter(), Default::default());
        Fixture { telemetry, metrics }
    }

    fn sample(registry: &prometheus::Registry, series: &str) -> Option<f64> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Calls `Get` through the layer over a service answering `frames`, then reads the body to
    /// its end, or drops it after `read` frames.
    async fn get_through_layer(
        f: &Fixture,
        frames: Vec<Result<Frame<Bytes>, Status>>,
        read: Option<usize>,
    ) {
        let frames = std::sync::Arc::new(std::sync::Mutex::new(Some(frames)));
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let body = Frames(frames.lock().unwrap().take().unwrap().into());
            async move { Ok::<_, Infallible>(http::Response::new(tonic::body::Body::new(body))) }
        });
        let mut svc = RpcLayer::new(f.metrics.clone(), None).layer(inner);
        let req = http::Request::builder()
            .uri("http://x/deriva.Deriva/Get")
            .body(())
            .unwrap();
        let Ok(resp) = svc.call(req).await;
        assert!(resp.headers().contains_key("x-request-id"));
        assert!(
            !resp.headers().contains_key("x-trace-id"),
            "no OTel layer, no trace id"
        );
        let mut body = resp.into_body();
        let mut n = 0;
        while read.is_none_or(|r| n < r) {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(_) => n += 1,
                None => break,
            }
        }
    }

    #[tokio::test]
    async fn a_stream_that_ends_ok_counts_ok() {
        let f = fixture();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"chunk"))),
            Ok(trailers(0)),
        ];
        get_through_layer(&f, frames, None).await;
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_total{method="get",status="ok"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(f.telemetry.registry(), r#"deriva_rpc_active{method="get"}"#),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn an_error_in_the_middle_of_a_stream_counts_as_error() {
        let f = fixture();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"first chunk"))),
            Ok(trailers(Code::Internal as i32)),
        ];
        get_through_layer(&f, frames, None).await;
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_total{method="get",status="error"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_total{method="get",status="ok"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(f.telemetry.registry(), r#"deriva_rpc_active{method="get"}"#),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_counts_as_error_once() {
        let f = fixture();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
            Ok(trailers(0)),
        ];
        get_through_layer(&f, frames, Some(1)).await;
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_total{method="get",status="error"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(f.telemetry.registry(), r#"deriva_rpc_active{method="get"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_duration_seconds_count{method="get"}"#
            ),
            Some(1.0)
        );
    }

    /// Once the cutoff triggers, a call still waiting answers `UNAVAILABLE` (counted so), except
    /// `Status`, which is never cut off.
    #[tokio::test]
    async fn the_cutoff_ends_every_call_but_status() {
        let f = fixture();
        let (cut_off, cutoff) = Cutoff::new();
        let never = tower::service_fn(|_req: http::Request<()>| {
            std::future::pending::<Result<Resp, Infallible>>()
        });
        let layer = RpcLayer::new(f.metrics.clone(), None).with_cutoff(cutoff);
        let call = |path: &str| {
            let req = http::Request::builder()
                .uri(format!("http://x/deriva.Deriva/{path}"))
                .body(())
                .unwrap();
            layer.clone().layer(never).call(req)
        };
        let (get, status) = (call("Get"), call("Status"));
        cut_off.send(true).unwrap();
        let Ok(resp) = get.await;
        let answer = Status::from_header_map(resp.headers()).expect("a trailers-only answer");
        assert_eq!(answer.code(), Code::Unavailable);
        assert!(answer.message().contains("shutting down"), "{answer:?}");
        assert_eq!(
            sample(
                f.telemetry.registry(),
                r#"deriva_rpc_total{method="get",status="error"}"#
            ),
            Some(1.0)
        );
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), status).await;
        assert!(waited.is_err(), "Status is not cut off");
    }

    #[test]
    fn request_ids_are_sane_tokens_or_new_uuids() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("req-42.a:b/c"));
        assert_eq!(request_id(&headers), "req-42.a:b/c");
        // Markup is kept (the pages escape it); nothing that could leave a log field is.
        headers.insert(
            "x-request-id",
            HeaderValue::from_static("<script>alert(1)</script>"),
        );
        assert_eq!(request_id(&headers), "<script>alert(1)</script>");
        for hostile in [
            "a b",
            "quote\"d",
            "back\\slash",
            "tab\there",
            "",
            &"x".repeat(MAX_REQUEST_ID_LEN + 1),
        ] {
            headers.insert("x-request-id", HeaderValue::from_str(hostile).unwrap());
            let id = request_id(&headers);
            assert_ne!(id, hostile);
            let parsed = uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.get_version_num(), 4, "{id}");
        }
        // New ids differ from one another, also across threads.
        let ids: std::collections::HashSet<String> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..1000)
                        .map(|_| request_id(&HeaderMap::new()))
                        .collect::<Vec<_>>()
                })
            })
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(ids.len(), 4000);
    }
}
