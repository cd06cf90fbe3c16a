//! [`Server`]: opens the store and the engine, and [`Server::serve`]s gRPC on a listener the
//! caller bound, until a shutdown future completes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use deriva_compute::executor::Spill;
use deriva_compute::spill::SpillStore;
use deriva_compute::{
    AsyncExecutor, AuditConfig, BudgetConfig, Cache, ExecutorConfig, FunctionRegistry,
};
use deriva_core::DerivaError;
use deriva_store::Store;
use futures::FutureExt;
use opentelemetry::metrics::Meter;
use tokio::net::TcpListener;

use tracing::Dispatch;

use crate::auth::Tokens;
use crate::config::Config;
use crate::http::HttpState;
use crate::proto::deriva_server::DerivaServer;
use crate::rpc::{Cutoff, GrpcServices, OversizeLayer, RpcLayer};
use crate::service::DerivaService;
use crate::store_spec::{OpenedStore, StoreSpec};
use crate::telemetry::ServerMetrics;
use crate::tls::Tls;
use crate::trace_store::TraceStore;

/// Largest header block (all metadata of one request) accepted, in bytes.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// How long [`Server::serve`] waits for the store to be released, beyond one shutdown grace
/// period after serving stopped, before it returns without it.
pub const STORE_RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The HTTP listener failed.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// A server with its store open, ready to serve.
#[derive(Debug)]
pub struct Server {
    config: Config,
    exec: AsyncExecutor,
    metrics: ServerMetrics,
    registry: Option<prometheus::Registry>,
    dispatch: Option<Dispatch>,
    traces: Option<TraceStore>,
    edge: Option<Arc<crate::rpc::Edge>>,
    /// Listens for the other nodes' invalidations (remote backend only); stops when dropped.
    listener: Option<deriva_store_remote::Listener>,
    /// This node's name in `ClusterStatus` (its `service.instance.id` when known).
    node_name: String,
    /// The nodes of the remote backend, by their heartbeats (remote backend only).
    nodes: Option<deriva_store_remote::PgNodes>,
    /// The bearer tokens of `--auth-tokens`, if it is given.
    auth: Option<Arc<Tokens>>,
    /// TLS on both listeners, if `--tls-cert` is given.
    tls: Option<Tls>,
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
        let store = Arc::new(deriva_store_local::open_observed(
            &config.data_dir,
            deriva_store_local::LocalOptions {
                inline_leaf_bytes: config.inline_leaf_bytes,
            },
            Arc::new(deriva_store::observe::BackendMetrics::new(meter)),
        )?);
        Self::with_store(config, store, functions, meter)
    }

    /// Opens the store the configuration names: the remote backend (object store and
    /// PostgreSQL) when `--blob-store` and `--index` are given, else the local store in
    /// `config.data_dir` (opened on the blocking pool). Builds the engine with the builtin
    /// functions. A remote backend that cannot be reached is [`DerivaError::Unavailable`].
    ///
    /// With the remote backend, the server listens for the other nodes' invalidations
    /// (PostgreSQL `NOTIFY`) until it stops; `node_id` (its `service.instance.id`) tells its
    /// own from theirs.
    pub async fn connect(
        config: Config,
        meter: &Meter,
        node_id: &str,
    ) -> Result<Self, DerivaError> {
        let mut config = config;
        node_id.clone_into(&mut config.node_name);
        let spec = StoreSpec::from_config(&config, node_id).map_err(DerivaError::InvalidInput)?;
        let OpenedStore { store, cluster } = spec.open(meter).await?;
        let (bus, nodes) = cluster.unzip();
        let mut server = Self::with_store(
            config,
            Arc::new(store),
            FunctionRegistry::with_builtins(),
            meter,
        )?;
        server.nodes = nodes;
        if let Some(bus) = bus {
            let exec = server.exec.clone();
            server.listener = Some(bus.listen(move |invalidation| match invalidation {
                deriva_store_remote::Invalidation::Addrs(addrs) => {
                    let evicted = exec.evict_local(&addrs);
                    tracing::debug!(addrs = addrs.len(), evicted, "invalidated by another node");
                }
                deriva_store_remote::Invalidation::All => {
                    let evicted = exec.evict_all_local();
                    tracing::info!(evicted, "cache cleared: invalidations may have been missed");
                }
            }));
        }
        Ok(server)
    }

    /// The engine over an open `store`, with its spill directory `<data-dir>/spill` (emptied:
    /// spilled outputs do not outlive the process).
    pub fn with_store(
        config: Config,
        store: Arc<Store>,
        functions: FunctionRegistry,
        meter: &Meter,
    ) -> Result<Self, DerivaError> {
        let spill = if config.spill_budget > 0 {
            let dir = config.data_dir.join("spill");
            Some(Spill {
                store: Arc::new(SpillStore::open(&dir, config.spill_budget)?),
                threshold: config.spill_bytes,
            })
        } else {
            None
        };
        let exec_config = ExecutorConfig {
            max_concurrent_computes: config.max_concurrent_computes,
            verification: config.verification,
            memory: BudgetConfig {
                bytes: config.memory_budget,
                queue: config.memory_queue,
                wait: config.memory_wait,
            },
            spill,
            compute_timeout: config.compute_timeout,
            trace_links: Some(Arc::new(crate::telemetry::OtelTraceLinks)),
            node_name: config.node_name.clone(),
            signer: match &config.provenance.signing_key {
                Some(path) => Some(Arc::new(
                    crate::provenance::KeySigner::load(path).map_err(DerivaError::InvalidInput)?,
                )),
                None => None,
            },
            audit: AuditConfig {
                sample_ratio: config.provenance.audit_sample_ratio,
                max_concurrent: config.provenance.audit_max_concurrent,
                on_mismatch: config.provenance.on_mismatch,
                shared_store: store.bus().is_some(),
            },
            ..ExecutorConfig::default()
        };
        let auth = match &config.auth_tokens {
            Some(path) => {
                let tokens = Tokens::load(path).map_err(DerivaError::InvalidInput)?;
                tracing::info!(
                    file = %path.display(),
                    tokens = tokens.names().len(),
                    "every RPC, /metrics and /debug need a bearer token"
                );
                Some(Arc::new(tokens))
            }
            None => None,
        };
        let tls = config
            .tls
            .as_ref()
            .map(Tls::new)
            .transpose()
            .map_err(DerivaError::InvalidInput)?;
        let metrics = ServerMetrics::new(meter, store.counters().clone());
        let exec = AsyncExecutor::new(
            store,
            Arc::new(functions),
            Arc::new(Cache::new(config.cache_bytes)),
            exec_config,
            meter,
        );
        let node_name = config.node_name.clone();
        Ok(Self {
            config,
            exec,
            metrics,
            registry: None,
            dispatch: None,
            traces: None,
            edge: None,
            listener: None,
            node_name,
            nodes: None,
            auth,
            tls,
        })
    }

    /// Serves `registry` on `/metrics` (the registry the meter's Prometheus reader writes to).
    pub fn with_registry(mut self, registry: prometheus::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Answers `Explain` and `/debug/traces` from `traces` (filled by the subscriber's
    /// [`TraceStore::layer`]).
    pub fn with_trace_store(mut self, traces: TraceStore) -> Self {
        self.traces = Some(traces);
        self
    }

    /// Decides per request with `edge` whether it is traced, from the telemetry's sampler and
    /// trace store ([`Telemetry::edge`](crate::telemetry::Telemetry::edge)); without one, every
    /// request is traced.
    pub fn with_edge(mut self, edge: crate::rpc::Edge) -> Self {
        self.edge = Some(Arc::new(edge));
        self
    }

    /// Sends the spans and logs of every call to `dispatch` rather than to the global
    /// subscriber. Only in-process tests need this; the binary installs its subscriber
    /// globally.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = Some(dispatch);
        self
    }

    /// What SIGHUP reloads: the token file and the TLS files (the binary calls
    /// [`Reloader::reload`] on every SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The engine.
    pub fn executor(&self) -> &AsyncExecutor {
        &self.exec
    }

    /// Serves the Deriva service and the standard gRPC health service on `grpc`, and the
    /// HTTP endpoints (see [`crate::http`]) on `http` if given, until `shutdown` completes.
    /// Then both stop accepting, `/readyz` turns 503, and in-flight calls get at most
    /// `config.shutdown_grace` to finish; calls still running then answer `UNAVAILABLE`, and
    /// every compute still running is cancelled ([`AsyncExecutor::cancel_computes`]: a
    /// builtin stops within one chunk of work; a function that ignores its context runs on,
    /// but holds no handle on the store).
    ///
    /// This returns once every handle on the store is gone, so the data directory can be
    /// opened again at once; an executor clone the caller took from [`Server::executor`]
    /// counts too: drop it first. It waits for that at most one more grace period and
    /// [`STORE_RELEASE_LIMIT`] after it, then returns anyway, with an error in the log (a store
    /// call that never ends, such as one on a hung disk).
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let limit = self.config.max_message_bytes;
        let released = self.exec.store().released();
        let (cut_off, cutoff) = Cutoff::new();
        let ready = Arc::new(AtomicBool::new(false));
        let node = crate::service::NodeInfo::new(
            self.node_name.clone(),
            grpc.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        );
        // On the remote backend, a heartbeat row in the index until serving ends; each beat
        // also deletes the rows of nodes silent for longer than --node-forget-after.
        let heartbeat = self.nodes.clone().map(|nodes| {
            let (exec, node, every) = (self.exec.clone(), node.clone(), self.config.heartbeat);
            let forget_after = self.config.node_forget_after;
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = nodes.beat(&node.beat(&exec)).await {
                        tracing::warn!(error = %e, "could not write this node's heartbeat");
                        continue;
                    }
                    if let Err(e) = nodes.forget_silent(forget_after).await {
                        tracing::warn!(error = %e, "could not forget the nodes gone silent");
                    }
                }
            }))
        });
        // Periodic garbage collection, if asked for (`--gc-interval`); the first after one
        // interval. A failed run is logged and counted, and the next one tries again.
        let collector = self.config.gc_interval.map(|every| {
            let (exec, grace) = (self.exec.clone(), self.config.gc_grace);
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let options = deriva_compute::GcOptions {
                        grace,
                        ..Default::default()
                    };
                    // The outcome is logged and counted by the collection itself.
                    let _ = exec.garbage_collect(options).await;
                }
            }))
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<DerivaServer<DerivaService>>().await;
        let service = DerivaServer::new(
            DerivaService::new(
                self.exec.clone(),
                self.config.chunk_bytes,
                self.metrics.clone(),
            )
            .with_trace_store(self.traces.clone())
            .with_gc_min_grace(self.config.gc_min_grace)
            .with_node(node.clone())
            .with_cluster(self.nodes.clone().map(|n| (n, self.config.heartbeat))),
        )
        .max_decoding_message_size(limit);

        let shutdown = shutdown.boxed().shared();
        let stop_accepting = {
            let (shutdown, ready) = (shutdown.clone(), ready.clone());
            async move {
                shutdown.await;
                ready.store(false, Ordering::Release);
                tracing::info!("shutting down: no new connections; waiting for in-flight calls");
                health
                    .set_not_serving::<DerivaServer<DerivaService>>()
                    .await;
            }
        };
        let mut builder = tonic::transport::Server::builder()
            // hyper's default (~16 KiB) answers a larger header block with GOAWAY, failing every
            // other call on that connection too. Accept more; oversized trace headers and request
            // ids are ignored or replaced by the RPC layer anyway.
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(Some(self.config.max_streams_per_connection))
            .http2_keepalive_interval(Some(self.config.keepalive))
            .http2_keepalive_timeout(Some(crate::config::KEEPALIVE_TIMEOUT));
        if let Some(timeout) = self.config.request_timeout {
            builder = builder.timeout(timeout);
        }
        let grpc_serving = builder
            .layer(
                RpcLayer::new(self.metrics.clone(), self.dispatch.clone())
                    .with_edge(self.edge.clone())
                    .with_auth(self.auth.clone())
                    .with_cutoff(cutoff),
            )
            .layer(OversizeLayer { limit });
        let services = GrpcServices::new(service, health_service);
        let limits = self.config.limits;
        // The accept loop sets no Nagle delay: small replies would otherwise wait for the
        // peer's delayed ACK.
        let incoming = crate::listen::incoming(grpc, self.tls.as_ref().map(Tls::grpc), limits);
        let grpc_serving =
            grpc_serving.serve_with_incoming_shutdown(services, incoming, stop_accepting);
        let http_shutdown = shutdown.clone();
        let http_serving = async {
            match http {
                Some(listener) => {
                    let state = HttpState {
                        registry: self.registry.clone(),
                        exec: self.exec.clone(),
                        probe: Default::default(),
                        started: Instant::now(),
                        ready: ready.clone(),
                        traces: self.traces.clone(),
                        auth: self.auth.clone(),
                        client_certificates: self.tls.as_ref().is_some_and(Tls::client_ca),
                        metrics: self.metrics.clone(),
                        about: Arc::new(crate::http::About {
                            version: env!("CARGO_PKG_VERSION"),
                            settings: self.config.describe(),
                        }),
                        trace_url_template: self.config.provenance.trace_url_template.clone(),
                    };
                    warn_if_open(&listener, &state);
                    let listener = crate::listen::HttpListener::new(
                        listener,
                        self.tls.as_ref().map(Tls::http),
                        limits,
                    )
                    .map_err(ServeError::Http)?;
                    crate::http::serve(listener, state, limits.handshake_timeout, http_shutdown)
                        .await
                        .map_err(ServeError::Http)
                }
                None => Ok(()),
            }
        };
        ready.store(true, Ordering::Release);
        let grace = self.config.shutdown_grace;
        let exec = self.exec.clone();
        let deadline = async move {
            shutdown.await;
            tokio::time::sleep(grace).await;
        };
        let mut serving = Box::pin(async {
            tokio::try_join!(
                async { grpc_serving.await.map_err(ServeError::from) },
                http_serving
            )
        });
        let served = tokio::select! {
            served = &mut serving => served.map(drop),
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs_f64(), "in-flight calls outlived the shutdown grace; cutting them off and cancelling their computes");
                exec.cancel_computes();
                let _ = cut_off.send(true);
                // The cut-off calls answer at once; a reply still streaming to a slow client
                // gets one more grace period.
                match tokio::time::timeout(grace, &mut serving).await {
                    Ok(served) => served.map(drop),
                    Err(_) => {
                        tracing::warn!("connections still open after the cutoff; leaving them");
                        Ok(())
                    }
                }
            }
        };
        drop(serving);
        drop(cut_off);
        // No call is left to want an output: nothing computes from now on.
        exec.cancel_computes();
        drop(exec);
        // The background tasks hold the executor, hence the store: end them first.
        drop((heartbeat, collector));
        drop(self);
        // Materializations abandoned by their callers end as their tasks are dropped, and
        // store calls on the blocking pool finish; then the store closes.
        let waited = tokio::time::timeout(grace, released.clone().wait()).await;
        if waited.is_err() {
            tracing::warn!("waiting for store calls still running before closing the store");
            let waited = tokio::time::timeout(STORE_RELEASE_LIMIT, released.wait()).await;
            if waited.is_err() {
                tracing::error!(
                    limit_secs = STORE_RELEASE_LIMIT.as_secs(),
                    "the store is still in use; stopping without closing it"
                );
                return served;
            }
        }
        tracing::debug!("store closed");
        served
    }
}

/// Warns when the HTTP listener is reachable beyond loopback and its pages are open to anyone.
fn warn_if_open(listener: &TcpListener, state: &HttpState) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    if !addr.ip().is_loopback() && !state.pages_protected() {
        tracing::warn!(
            addr = %addr,
            "the HTTP listener is bound beyond loopback with neither --auth-tokens nor --tls-client-ca: \
             /metrics, /debug, /debug/traces and /health (with the store's paths and backend addresses) \
             answer anyone who can reach it"
        );
    }
}

/// Reads the configuration files again (SIGHUP): the token file of `--auth-tokens`, and the
/// certificate, key and client CA of `--tls-*`. Each part that reads and parses replaces the
/// one in use (new requests check the new tokens, on open connections too; new connections get
/// the new certificate and client CA, open ones keep theirs); one that does not keeps the one
/// in use, and the log says why, naming the file. Counted in `deriva_config_reloads_total`.
#[derive(Debug, Clone)]
pub struct Reloader {
    auth: Option<Arc<Tokens>>,
    tls: Option<Tls>,
    metrics: ServerMetrics,
}

impl Reloader {
    /// Reloads every part there is; whether all of them reloaded. Reads files: call it on the
    /// blocking pool.
    pub fn reload(&self) -> bool {
        if self.auth.is_none() && self.tls.is_none() {
            tracing::info!(
                "configuration reload: nothing to reload (no --auth-tokens, no --tls-cert)"
            );
            return true;
        }
        let mut all = true;
        if let Some(tokens) = &self.auth {
            let file = tokens.path().map(|p| p.display().to_string());
            let file = file.as_deref().unwrap_or("-");
            let reloaded = tokens.reload();
            self.metrics
                .record_config_reload("tokens", reloaded.is_ok());
            match reloaded {
                Ok(count) => {
                    tracing::info!(
                        file,
                        tokens = count,
                        "configuration reload: token file reloaded"
                    );
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(file, error = %e, "configuration reload: token file not reloaded; the tokens in use stay");
                }
            }
        }
        if let Some(tls) = &self.tls {
            let files = tls.files();
            let cert = files.cert.display().to_string();
            let key = files.key.display().to_string();
            let client_ca = files.client_ca.as_ref().map(|p| p.display().to_string());
            let client_ca = client_ca.as_deref().unwrap_or("-");
            let reloaded = tls.reload();
            self.metrics.record_config_reload("tls", reloaded.is_ok());
            match reloaded {
                Ok(()) => tracing::info!(
                    cert,
                    key,
                    client_ca,
                    "configuration reload: TLS certificate, key and client CA reloaded; new connections use them"
                ),
                Err(e) => {
                    all = false;
                    tracing::warn!(
                        cert, key, client_ca, error = %e,
                        "configuration reload: TLS files not reloaded; the certificate, key and client CA in use stay"
                    );
                }
            }
        }
        all
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
