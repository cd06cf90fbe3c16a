//! [`GrpcServices`]: the two gRPC services of the listener, told apart by the path's service
//! name, in place of tonic's router. The router is built on axum; with it, the `deriva` binary
//! linked axum's code too whenever it was built in the same command as the server (Cargo
//! unifies tonic's features across both).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

/// The Deriva service and the standard health service, behind one [`Service`]: a request whose
/// path names the health service (`/grpc.health.v1.Health/…`) goes to `health`, every other one
/// to `deriva`, whose generated code answers `UNIMPLEMENTED` for a method it does not have.
#[derive(Debug, Clone)]
pub struct GrpcServices<D, H> {
    deriva: D,
    health: H,
}

impl<D, H> GrpcServices<D, H> {
    /// Both services, as the listener serves them.
    pub fn new(deriva: D, health: H) -> Self {
        Self { deriva, health }
    }
}

/// Whether `path` (`/<package.Service>/<Method>`) names the service called `name`.
fn names_service(path: &str, name: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(name))
        .is_some_and(|rest| rest.starts_with('/'))
}

impl<D, H> Service<http::Request<Body>> for GrpcServices<D, H>
where
    D: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    H: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<D::Future, H::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Generated tonic services are always ready; ask both anyway, as tower's contract wants
        // whichever one `call` picks to have said so.
        match (self.deriva.poll_ready(cx), self.health.poll_ready(cx)) {
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if names_service(req.uri().path(), H::NAME) {
            Either::Right(self.health.call(req))
        } else {
            Either::Left(self.deriva.call(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::names_service;

    #[test]
    fn a_path_names_a_service_only_up_to_the_slash() {
        let health = "grpc.health.v1.Health";
        assert!(names_service("/grpc.health.v1.Health/Check", health));
        assert!(names_service("/grpc.health.v1.Health/Watch", health));
        assert!(!names_service("/grpc.health.v1.HealthX/Check", health));
        assert!(!names_service("/deriva.v1.Deriva/Get", health));
        assert!(!names_service("grpc.health.v1.Health/Check", health));
        assert!(!names_service("/grpc.health.v1.Health", health));
        assert!(!names_service("", health));
    }
}
