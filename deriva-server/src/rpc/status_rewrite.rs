//! [`OversizeLayer`]: answers an over-limit request with `RESOURCE_EXHAUSTED`.
//!
//! tonic rejects a message over `max_decoding_message_size` before any handler runs, with
//! `OUT_OF_RANGE`. Deriva never answers `OUT_OF_RANGE` itself, so this layer rewrites exactly
//! that rejection into the documented code, with a message naming the limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};
use tower::{Layer, Service};

/// Rewrites tonic's oversize rejection. See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct OversizeLayer {
    /// The configured limit, for the message.
    pub limit: usize,
}

impl<S> Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize {
            inner,
            limit: self.limit,
        }
    }
}

/// The service made by [`OversizeLayer`].
#[derive(Debug, Clone)]
pub struct Oversize<S> {
    inner: S,
    limit: usize,
}

type Resp = http::Response<tonic::body::Body>;

impl<S, B> Service<http::Request<B>> for Oversize<S>
where
    S: Service<http::Request<B>, Response = Resp> + Send,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            match Status::from_header_map(resp.headers()) {
                Some(status)
                    if status.code() == Code::OutOfRange && status.message().contains("message length too large") =>
                {
                    Ok(Status::resource_exhausted(format!(
                        "the request is larger than the server's {limit}-byte message limit (--max-message-bytes)"
                    ))
                    .into_http())
                }
                _ => Ok(resp),
            }
        })
    }
}
