//! [`InProcess`]: the server function (`deriva_server::Server`) serving on port 0 inside the
//! test's own runtime, with a tonic client on it. Built with [`InProcess::builder`]: a config
//! tweak, a function registry, telemetry of its own (captured logs, a Prometheus registry, a
//! trace store, OTLP export) and the HTTP listener are each optional.
//!
//! Tests on it run on real time, not `tokio::time::pause`: client and server talk over real
//! loopback sockets, and a paused clock jumps to the next timer whenever the runtime has no task
//! to run, I/O still in flight or not; and while a compute runs on the blocking pool (as a
//! `Gate` holds one) a paused clock does not move at all, so a timer never fires.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use deriva_compute::{AsyncExecutor, ExecStats, FunctionRegistry};
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{GetRequest, StatusRequest, StatusResponse};
use deriva_server::telemetry::{Telemetry, TelemetryConfig};
use deriva_server::{Config, ServeError, Server};
use opentelemetry::metrics::MeterProvider as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::rpc::{get_all, get_chunks, put_leaf, put_recipe, try_put_recipe};
use crate::{DEADLINE, Logs};

/// The log filter of a server with telemetry when the test sets none: the per-call "rpc
/// finished" line is DEBUG.
pub const TEST_LOG_FILTER: &str = "info,deriva_server=debug";

/// What to start; see [`InProcess::builder`].
pub struct Builder {
    dir: Option<PathBuf>,
    config: Config,
    functions: FunctionRegistry,
    telemetry: Option<TelemetryConfig>,
    http: bool,
}

impl Builder {
    /// Serves the store in `dir`, which the caller owns (to restart on it, or to look inside).
    /// By default the server has a temporary directory of its own.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Changes the [`Config`] (anything but `data_dir`, which [`Builder::dir`] sets).
    pub fn config(mut self, tweak: impl FnOnce(&mut Config)) -> Self {
        tweak(&mut self.config);
        self
    }

    /// These functions rather than the builtins.
    pub fn functions(mut self, functions: FunctionRegistry) -> Self {
        self.functions = functions;
        self
    }

    /// Telemetry of the server's own, built from `config` (its log filter defaults to
    /// [`TEST_LOG_FILTER`]): metrics in a private Prometheus registry, spans in a trace store
    /// and to `config.otlp_endpoint` if set, log lines captured in [`InProcess::logs`]. Nothing
    /// global is read or installed. Without it, instruments are no-ops and nothing is logged.
    pub fn telemetry(mut self, config: TelemetryConfig) -> Self {
        self.telemetry = Some(config);
        self
    }

    /// Also serves the HTTP endpoints (`/metrics`, health, `/debug/traces`) on a port of their
    /// own.
    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// Opens the store, starts serving, and connects a client.
    pub async fn start(self) -> InProcess {
        let (temp, dir) = match self.dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().unwrap();
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
        };
        let config = Config {
            data_dir: dir.clone(),
            ..self.config
        };
        let logs = Logs::default();
        let (server, telemetry) = match self.telemetry {
            Some(mut telemetry) => {
                telemetry
                    .log_filter
                    .get_or_insert_with(|| TEST_LOG_FILTER.to_owned());
                let telemetry = Telemetry::new(telemetry).unwrap();
                let dispatch = telemetry.subscriber(logs.clone()).unwrap();
                let server = Server::open_with(config, self.functions, &telemetry.meter())
                    .unwrap()
                    .with_registry(telemetry.registry().clone())
                    .with_trace_store(telemetry.traces().clone())
                    .with_edge(telemetry.edge())
                    .with_dispatch(dispatch);
                (server, Some(telemetry))
            }
            None => {
                let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("test");
                let server = Server::open_with(config, self.functions, &meter).unwrap();
                (server, None)
            }
        };
        let exec = server.executor().clone();
        let stats = exec.stats().clone();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap().to_string();
        let http = match self.http {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let http_addr = http.as_ref().map(|l| l.local_addr().unwrap().to_string());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(grpc, http, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {grpc_addr}: {e}"));
        InProcess {
            client: unlimited(DerivaClient::new(channel.clone())),
            channel,
            stats,
            logs,
            grpc: grpc_addr,
            http: http_addr,
            dir,
            telemetry,
            exec: Some(exec),
            stop: Some(stop),
            task: Some(task),
            _temp: temp,
        }
    }
}

/// A client that sends and accepts messages up to 1 GiB, so that only the server's limits apply.
fn unlimited(client: DerivaClient<Channel>) -> DerivaClient<Channel> {
    client
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30)
}

/// A server function serving in this runtime; see the module doc. [`InProcess::stop`] stops
/// it; dropped without that, it shuts down in the background.
pub struct InProcess {
    /// A client on the server's gRPC listener.
    pub client: DerivaClient<Channel>,
    /// The connection of [`InProcess::client`], for other services (health).
    pub channel: Channel,
    /// The engine's live counters.
    pub stats: Arc<ExecStats>,
    /// The server's log lines (empty without [`Builder::telemetry`]).
    pub logs: Logs,
    grpc: String,
    http: Option<String>,
    dir: PathBuf,
    telemetry: Option<Telemetry>,
    /// The engine, for fixtures too large to set up by RPC. `serve` returns only once every
    /// handle on the store is gone, this one included: [`InProcess::stop`] drops it first.
    exec: Option<AsyncExecutor>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    _temp: Option<tempfile::TempDir>,
}

impl InProcess {
    /// The defaults: builtin functions, [`Config::default`] on a temporary directory, no
    /// telemetry, no HTTP listener.
    pub fn builder() -> Builder {
        Builder {
            dir: None,
            config: Config::default(),
            functions: FunctionRegistry::with_builtins(),
            telemetry: None,
            http: false,
        }
    }

    /// [`InProcess::builder`]'s defaults, started.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// `127.0.0.1:PORT` of the gRPC listener.
    pub fn grpc_addr(&self) -> &str {
        &self.grpc
    }

    /// `127.0.0.1:PORT` of the HTTP listener; panics without [`Builder::http`].
    pub fn http_addr(&self) -> &str {
        self.http
            .as_deref()
            .expect("no HTTP listener: start with InProcess::builder().http()")
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob file of the leaf `addr` lives, if it is a file: larger than
    /// `inline_leaf_bytes` (start with `.config(|c| c.inline_leaf_bytes = 0)` to make every
    /// leaf a file); smaller ones are rows of `leaves.redb`.
    pub fn blob_path(&self, addr: &Bytes) -> PathBuf {
        let hex = crate::hex(addr);
        self.dir.join("blobs").join(&hex[..2]).join(hex)
    }

    /// The server's telemetry; panics without [`Builder::telemetry`].
    pub fn telemetry(&self) -> &Telemetry {
        self.telemetry
            .as_ref()
            .expect("no telemetry: start with InProcess::builder().telemetry(..)")
    }

    /// The engine behind the server.
    pub fn executor(&self) -> &AsyncExecutor {
        self.exec.as_ref().expect("the server is stopping")
    }

    /// A client on a connection of its own.
    pub async fn new_client(&self) -> DerivaClient<Channel> {
        let client = DerivaClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.grpc));
        unlimited(client)
    }

    /// `GET /metrics`; panics without [`Builder::http`].
    pub async fn scrape(&self) -> String {
        crate::http::scrape(self.http_addr()).await
    }

    /// `PutLeaf`, unwrapped: the address.
    pub async fn put(&mut self, data: &[u8]) -> Bytes {
        put_leaf(&mut self.client, data).await
    }

    /// `PutRecipe` of `name/v1`, unwrapped: the address.
    pub async fn recipe(
        &mut self,
        name: &str,
        inputs: &[&Bytes],
        params: &[(&str, &str)],
    ) -> Bytes {
        put_recipe(&mut self.client, name, inputs, params).await
    }

    /// `PutRecipe` of `name/v1`: the address, or the status.
    pub async fn try_recipe(
        &mut self,
        name: &str,
        inputs: &[&Bytes],
        params: &[(&str, &str)],
    ) -> Result<Bytes, tonic::Status> {
        try_put_recipe(&mut self.client, name, inputs, params).await
    }

    /// All the bytes of a `Get`, or its status.
    pub async fn get(&mut self, addr: &Bytes) -> Result<Vec<u8>, tonic::Status> {
        get_all(&mut self.client, addr).await
    }

    /// Every chunk of a `Get`, or its status.
    pub async fn get_chunks(&mut self, addr: &Bytes) -> Result<Vec<Bytes>, tonic::Status> {
        get_chunks(&mut self.client, addr).await
    }

    /// `req` (a `Get` with metadata of the test's): all its bytes and the response metadata, or
    /// its status.
    pub async fn get_with_metadata(
        &mut self,
        req: tonic::Request<GetRequest>,
    ) -> Result<(Vec<u8>, MetadataMap), tonic::Status> {
        let resp = self.client.get(req).await?;
        let meta = resp.metadata().clone();
        let mut stream = resp.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend_from_slice(&m.chunk);
        }
        Ok((out, meta))
    }

    /// `Status`, unwrapped.
    pub async fn status(&mut self) -> StatusResponse {
        self.client
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Asserts the standard gRPC health check answers SERVING, overall and for the service.
    pub async fn assert_serving(&self) {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        for service in ["", "deriva.Deriva"] {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health check {service:?}: {e}"))
                .into_inner()
                .status();
            assert_eq!(
                status,
                tonic_health::pb::health_check_response::ServingStatus::Serving,
                "health of {service:?}"
            );
        }
    }

    /// Stops the server and waits until `serve` has returned, which is once the store is closed:
    /// the directory can be reopened at once. Panics if that takes longer than [`DEADLINE`] or
    /// `serve` failed.
    pub async fn stop(mut self) {
        // The last handle on the store besides the server's own.
        drop(self.exec.take());
        // Err only if `serve` has already returned; its result says why.
        let _ = self.stop.take().unwrap().send(());
        let served = tokio::time::timeout(DEADLINE, self.task.take().unwrap())
            .await
            .expect("the server stops within its grace");
        served
            .expect("serve panicked")
            .unwrap_or_else(|e| panic!("serve failed: {e}"));
    }
}
