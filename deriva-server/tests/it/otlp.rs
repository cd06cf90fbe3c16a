//! The standard OpenTelemetry environment against the real binary and a real OTLP/HTTP
//! receiver (axum, here): `http/protobuf` with gzip bodies and the configured headers (a flag
//! winning over the environment), log records carrying the trace id of their request,
//! `OTEL_METRIC_EXPORT_INTERVAL` honoured, TLS with a CA and a client certificate from the
//! environment (`rcgen`), an untrusted receiver getting nothing while the server keeps
//! serving, and `OTEL_SDK_DISABLED=true` exporting nothing. Header values appear in no log
//! line and no `/debug` page. Over gRPC: a TLS receiver (tonic) gets gzip spans with the
//! headers, and the fake collector gets log records carrying their request's trace ids.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use deriva_testkit::ca::Ca;
use deriva_testkit::http::http_get;
use deriva_testkit::{DEADLINE, ServerProcess};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tokio::net::TcpListener;
use tonic::Code;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The protobuf body, gunzipped if it says it is gzip.
    fn payload(&self) -> Vec<u8> {
        if self.header("content-encoding") == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_end(&mut out)
                .expect("a gzip body");
            out
        } else {
            self.body.to_vec()
        }
    }
}

/// A real OTLP/HTTP receiver: answers every POST 200 with an empty protobuf, and keeps what it
/// got; over TLS (optionally asking for a client certificate) when given a configuration.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Captured>>>,
    /// TCP connections accepted, whether or not their handshake succeeded.
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let kept = requests.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let kept = kept.clone();
                async move {
                    kept.lock().unwrap().push(Captured {
                        path: uri.path().to_owned(),
                        headers,
                        body,
                    });
                    (
                        StatusCode::OK,
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            },
        );
        let listener = Counting {
            listener,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            connections: connections.clone(),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            requests,
            connections,
        }
    }

    fn requests(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (up to [`DEADLINE`]) for a request to `path`; every one so far.
    async fn wait_for(&self, path: &str) -> Vec<Captured> {
        let start = Instant::now();
        loop {
            let got: Vec<_> = self
                .requests()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            if !got.is_empty() {
                return got;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no request to {path} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The receiver's listener: counts connections and, with TLS, drops those whose handshake
/// fails.
struct Counting {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    connections: Arc<AtomicUsize>,
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl axum::serve::Listener for Counting {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else {
                continue;
            };
            self.connections.fetch_add(1, Ordering::SeqCst);
            match &self.tls {
                None => return (Io::Plain(stream), peer),
                Some(acceptor) => {
                    // Handshakes in line: the tests make few connections.
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                    {
                        return (Io::Tls(Box::new(tls)), peer);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Hex of an OTLP id (bytes on the wire).
fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A put and two Gets: one that is served, one that fails (`NOT_FOUND`), which writes an
/// INFO line ("rpc failed") inside its request.
async fn traffic(server: &ServerProcess) {
    let mut client = server.client().await;
    let leaf = deriva_testkit::put_leaf(&mut client, b"exported").await;
    assert_eq!(
        deriva_testkit::get_all(&mut client, &leaf).await.unwrap(),
        b"exported"
    );
    let missing = bytes::Bytes::from(vec![7u8; 32]);
    let status = deriva_testkit::get_all(&mut client, &missing)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

const ENV_SECRET: &str = "env-secret-4d1f9";
const FLAG_SECRET: &str = "flag-secret-77aa3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_sends_gzip_with_headers_metrics_on_time_and_logs_with_trace_ids() {
    let receiver = Receiver::start(None).await;
    let mut server = ServerProcess::options()
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", receiver.addr),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            format!("x-api-key={ENV_SECRET},x-tenant=from-the-environment"),
        )
        .env("OTEL_METRIC_EXPORT_INTERVAL", "1000")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["--otlp-header", &format!("x-tenant={FLAG_SECRET}")])
        .start();
    let listening = Instant::now();

    // Metrics every second (the default is 15 s): the first push comes within a few.
    receiver.wait_for("/v1/metrics").await;
    let waited = listening.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the first metric push came {waited:?} after start: OTEL_METRIC_EXPORT_INTERVAL=1000 ignored?"
    );

    traffic(&server).await;
    let traces = receiver.wait_for("/v1/traces").await;
    let start = Instant::now();
    // The log record of the failed Get, with its request's trace and span ids.
    let (record, spans) = loop {
        let mut spans = BTreeSet::new();
        for request in receiver
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/traces")
        {
            let export = ExportTraceServiceRequest::decode(&request.payload()[..]).unwrap();
            for span in export
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                spans.insert((hex_id(&span.trace_id), hex_id(&span.span_id)));
            }
        }
        let records: Vec<_> = receiver
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/logs")
            .flat_map(|r| {
                let export = ExportLogsServiceRequest::decode(&r.payload()[..]).unwrap();
                export
                    .resource_logs
                    .into_iter()
                    .flat_map(|r| r.scope_logs)
                    .flat_map(|s| s.log_records)
                    .collect::<Vec<_>>()
            })
            .collect();
        let failed = records.into_iter().find(|r| {
            format!("{:?}", r.body).contains("rpc failed")
                && spans.contains(&(hex_id(&r.trace_id), hex_id(&r.span_id)))
        });
        if let Some(record) = failed {
            break (record, spans);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no log record \"rpc failed\" with an exported span's ids; spans: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record.severity_text, "INFO");
    assert!(!spans.is_empty());
    let attributes: Vec<String> = record.attributes.iter().map(|a| a.key.clone()).collect();
    assert!(
        attributes.iter().any(|k| k == "method") && attributes.iter().any(|k| k == "code"),
        "{attributes:?}"
    );

    // Every export: protobuf, gzip, and the headers, the flag's winning for x-tenant.
    assert!(!traces.is_empty());
    for request in receiver.requests() {
        let what = &request.path;
        assert_eq!(
            request.header("content-type"),
            Some("application/x-protobuf"),
            "{what}"
        );
        assert_eq!(request.header("content-encoding"), Some("gzip"), "{what}");
        assert_eq!(request.header("x-api-key"), Some(ENV_SECRET), "{what}");
        assert_eq!(request.header("x-tenant"), Some(FLAG_SECRET), "{what}");
    }

    // The values appear nowhere: not in the log, not on the /debug pages.
    let metrics = server.metrics_addr().to_owned();
    for path in ["/debug/traces", "/metrics"] {
        let page = http_get(&metrics, path).await.unwrap();
        let text = &page.body;
        assert!(
            !text.contains(ENV_SECRET) && !text.contains(FLAG_SECRET),
            "{path}"
        );
    }
    server.stop();
    let stderr = server.stderr();
    assert!(
        !stderr.contains(ENV_SECRET) && !stderr.contains(FLAG_SECRET),
        "a header value in the log:\n{stderr}"
    );
    assert!(stderr.contains("header x-api-key set"), "{stderr}");
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A receiver's TLS: its certificate from `ca`, and client certificates from `ca` required.
fn receiver_tls(ca: &Ca) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key, _) = ca.issue(&["localhost", "127.0.0.1"], false);
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_tls_trusts_the_configured_ca_and_an_untrusted_receiver_gets_nothing() {
    let ca = Ca::new("OTLP test CA");
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(&files, "ca.pem", &ca.pem);
    let (client_cert, client_key, _) = ca.issue(&["deriva-server"], true);
    let client_cert = write(&files, "client.pem", &client_cert);
    let client_key = write(&files, "client.key", &client_key);
    let receiver = Receiver::start(Some(receiver_tls(&ca))).await;
    let endpoint = format!("https://localhost:{}", receiver.addr.port());
    let node = |trust: bool| {
        let mut options = ServerProcess::options()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &client_cert)
            .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", &client_key)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "500");
        if trust {
            options = options.env("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file);
        }
        options.start()
    };

    // Trusting the CA (and presenting a client certificate it signed): spans arrive.
    let mut trusting = node(true);
    traffic(&trusting).await;
    receiver.wait_for("/v1/traces").await;
    trusting.stop();

    // Not trusting it: the handshakes fail, nothing arrives, and the server serves on.
    let before = (
        receiver.requests().len(),
        receiver.connections.load(Ordering::SeqCst),
    );
    let mut untrusting = node(false);
    let start = Instant::now();
    while receiver.connections.load(Ordering::SeqCst) == before.1 {
        assert!(
            start.elapsed() < DEADLINE,
            "the server never tried to export"
        );
        traffic(&untrusting).await;
    }
    for _ in 0..5 {
        traffic(&untrusting).await;
    }
    // The last exports are tried at shutdown.
    assert!(untrusting.stop().success());
    assert_eq!(
        receiver.requests().len(),
        before.0,
        "an untrusted receiver got an export"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_sdk_disabled_exports_nothing() {
    let receiver = Receiver::start(None).await;
    let mut server = ServerProcess::options()
        .env("OTEL_SDK_DISABLED", "true")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", receiver.addr),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    traffic(&server).await;
    // /metrics still serves: the Prometheus endpoint is not OTLP export.
    let scrape = server.scrape().await;
    assert!(scrape.contains("deriva_rpc_total"), "{scrape}");
    // Shutdown flushes whatever would have been exported.
    assert!(server.stop().success());
    assert_eq!(
        receiver.connections.load(Ordering::SeqCst),
        0,
        "something was exported"
    );
    let stderr = server.stderr();
    assert!(
        stderr.contains("otlp=off (OTEL_SDK_DISABLED=true)"),
        "{stderr}"
    );
}

/// An OTLP/gRPC trace receiver over TLS (tonic), keeping each export with its metadata.
#[derive(Clone, Default)]
struct GrpcTraces(Arc<Mutex<Vec<(tonic::metadata::MetadataMap, ExportTraceServiceRequest)>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcTraces
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let metadata = request.metadata().clone();
        self.0
            .lock()
            .unwrap()
            .push((metadata, request.into_inner()));
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_over_tls_sends_gzip_spans_with_the_headers() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    // The receiver's TLS (tonic's server) takes the process's provider.
    deriva_util::crypto::use_ring();
    let ca = Ca::new("OTLP gRPC test CA");
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(&files, "ca.pem", &ca.pem);
    let (cert, key, _) = ca.issue(&["localhost"], false);
    let received = GrpcTraces::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(received.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // Only traces: the receiver has no metrics or logs service.
    let mut server = ServerProcess::options()
        .args(["--otlp-endpoint", &format!("https://localhost:{port}")])
        .args(["--otlp-header", &format!("x-tenant={FLAG_SECRET}")])
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file)
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            format!("x-api-key={ENV_SECRET},x-tenant=from-the-environment"),
        )
        .env("OTEL_METRICS_EXPORTER", "none")
        .env("OTEL_LOGS_EXPORTER", "none")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    traffic(&server).await;
    let start = Instant::now();
    while received.0.lock().unwrap().is_empty() {
        assert!(start.elapsed() < DEADLINE, "no spans over gRPC and TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exports = received.0.lock().unwrap().clone();
    for (metadata, export) in &exports {
        let get = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get("x-api-key"), Some(ENV_SECRET));
        assert_eq!(get("x-tenant"), Some(FLAG_SECRET), "the flag wins");
        assert_eq!(get("grpc-encoding"), Some("gzip"));
        assert!(!export.resource_spans.is_empty());
    }
    assert!(server.stop().success());
    let stderr = server.stderr();
    assert!(
        !stderr.contains(ENV_SECRET) && !stderr.contains(FLAG_SECRET),
        "{stderr}"
    );
    assert!(stderr.contains("traces to https://localhost"), "{stderr}");
    assert!(
        !stderr.contains("metrics to") && !stderr.contains("logs to"),
        "{stderr}"
    );
}

/// Over gRPC (the fake collector), a failed call's log record carries its request's ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_log_records_carry_their_requests_trace_ids() {
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .unwrap();
    let server = ServerProcess::options()
        .args(["--otlp-endpoint", &collector.endpoint()])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    traffic(&server).await;
    let logs = collector.exported_logs(1, DEADLINE).await;
    let failed = logs
        .iter()
        .find(|l| l.body.as_deref().is_some_and(|b| b.contains("rpc failed")))
        .unwrap_or_else(|| panic!("no \"rpc failed\" record in {logs:?}"));
    assert_eq!(failed.severity_text, "INFO");
    assert_eq!(failed.trace_id.len(), 32, "{failed:?}");
    let spans = collector.exported_spans(1, DEADLINE).await;
    let mut seen: Vec<_> = spans.clone();
    let start = Instant::now();
    while !seen
        .iter()
        .any(|s| s.trace_id == failed.trace_id && s.span_id == failed.span_id)
    {
        assert!(
            start.elapsed() < DEADLINE,
            "no exported span has the record's ids {}/{}",
            failed.trace_id,
            failed.span_id
        );
        seen.extend(
            collector
                .exported_spans(1, Duration::from_millis(200))
                .await,
        );
    }
}
