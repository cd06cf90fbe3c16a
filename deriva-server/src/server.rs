//! [`Server`]: opens the store and the engine, and [`Server::serve`]s gRPC on a listener the
//! caller bound, until a shutdown future completes.

use std::future::Future;
use std::sync::Arc;

use deriva_compute::{AsyncExecutor, Cache, ExecutorConfig, FunctionRegistry};
use deriva_core::{DerivaError, Store};
use futures::FutureExt;
use opentelemetry::metrics::Meter;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::limits::OversizeLayer;
use crate::proto::deriva_server::DerivaServer;
use crate::service::DerivaService;

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A server with its store open, ready to serve.
#[derive(Debug)]
pub struct Server {
    config: Config,
    exec: AsyncExecutor,
}

impl Server {
    /// Opens the store in `config.data_dir` and builds the engine with the builtin functions,
    /// its instruments built from `meter`.
    pub fn open(config: Config, meter: &Meter) -> Result<Self, DerivaError> {
        Self::open_with(config, FunctionRegistry::with_builtins(), meter)
    }

    /// Like [`Server::open`], with a registry of your own.
    pub fn open_with(
        config: Config,
        functions: FunctionRegistry,
        meter: &Meter,
    ) -> Result<Self, DerivaError> {
        let store = Arc::new(Store::open(&config.data_dir)?);
        let exec_config = ExecutorConfig {
            max_concurrent_computes: config.max_concurrent_computes,
            verification: config.verification,
            ..ExecutorConfig::default()
        };
        let exec = AsyncExecutor::new(
            store,
            Arc::new(functions),
            Arc::new(Cache::new(config.cache_bytes)),
            exec_config,
            meter,
        );
        Ok(Self { config, exec })
    }

    /// The engine.
    pub fn executor(&self) -> &AsyncExecutor {
        &self.exec
    }

    /// Serves the Deriva service and the standard gRPC health service on `listener` until
    /// `shutdown` completes. Then it stops accepting, lets in-flight calls finish for at most
    /// `config.shutdown_grace`, and returns; dropping the last handle closes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let limit = self.config.max_message_bytes;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<DerivaServer<DerivaService>>().await;
        let service = DerivaServer::new(DerivaService::new(self.exec, self.config.chunk_bytes))
            .max_decoding_message_size(limit);

        let shutdown = shutdown.boxed().shared();
        let stop_accepting = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: no new connections; waiting for in-flight calls");
                health
                    .set_not_serving::<DerivaServer<DerivaService>>()
                    .await;
            }
        };
        let serving = tonic::transport::Server::builder()
            .layer(OversizeLayer { limit })
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop_accepting);
        let grace = self.config.shutdown_grace;
        let deadline = async move {
            shutdown.await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = serving => served?,
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs_f64(), "in-flight calls outlived the shutdown grace; cutting them off");
            }
        }
        Ok(())
    }
}
