//! The OTLP exporters of each signal, built from a [`SignalExport`]: gRPC or HTTP, TLS files,
//! headers.

use std::fmt;
use std::path::PathBuf;

use super::{Protocol, SignalExport};

/// Reads a PEM file named by the variable behind `what`.
fn read_pem(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Why the `kind` exporter of `export` could not be built, its endpoint redacted (also where
/// the exporter's own message quotes it).
fn build_error(kind: &str, export: &SignalExport, e: impl fmt::Display) -> String {
    let endpoint = deriva_util::redact::redact_url(&export.endpoint);
    let message = e.to_string().replace(&export.endpoint, &endpoint);
    format!("the OTLP {kind} exporter for {endpoint}: {message}")
}

/// The span exporter for `export`.
pub fn span_exporter(export: &SignalExport) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("traces", export, e))
}

/// The metric exporter for `export`.
pub fn metric_exporter(
    export: &SignalExport,
) -> Result<opentelemetry_otlp::MetricExporter, String> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("metrics", export, e))
}

/// The log exporter for `export`.
pub fn log_exporter(export: &SignalExport) -> Result<opentelemetry_otlp::LogExporter, String> {
    let builder = opentelemetry_otlp::LogExporter::builder();
    let built = match export.protocol {
        Protocol::Grpc => grpc(builder.with_tonic(), export)?.build(),
        Protocol::HttpProtobuf => http(builder.with_http(), export)?.build(),
    };
    built.map_err(|e| build_error("logs", export, e))
}

/// gRPC: TLS for https (the machine's CAs, plus `…_CERTIFICATE`), gzip, and the headers set by
/// an interceptor that runs after the exporter adds the environment's, so ours win.
fn grpc<B>(builder: B, export: &SignalExport) -> Result<B, String>
where
    B: opentelemetry_otlp::WithExportConfig + opentelemetry_otlp::WithTonicConfig,
{
    use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
    let mut builder = builder
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout);
    if export.gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    if export.endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &export.certificate {
            let pem = read_pem(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &export.client {
            let cert = read_pem(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
            let key = read_pem(key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?;
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        builder = builder.with_tls_config(tls);
    }
    let mut metadata = MetadataMap::new();
    for (name, value) in &export.headers {
        let key: AsciiMetadataKey = name
            .parse()
            .map_err(|_| format!("OTLP header name {name:?} is not a valid gRPC metadata key"))?;
        let value: AsciiMetadataValue = value.parse().map_err(|_| {
            format!("the value of OTLP header {name} is not valid in gRPC metadata")
        })?;
        metadata.insert(key, value);
    }
    Ok(
        builder.with_interceptor(move |mut request: tonic::Request<()>| {
            for kv in metadata.iter() {
                if let tonic::metadata::KeyAndValueRef::Ascii(key, value) = kv {
                    request.metadata_mut().insert(key.clone(), value.clone());
                }
            }
            Ok(request)
        }),
    )
}

/// OTLP/HTTP: a blocking client of our own (the exporters run on threads of their own), with
/// the CA and client certificate, that sets our headers last, so they win.
fn http<B>(builder: B, export: &SignalExport) -> Result<B, String>
where
    B: opentelemetry_otlp::WithExportConfig + opentelemetry_otlp::WithHttpConfig,
{
    let mut builder = builder
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if export.gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    // reqwest is built without a crypto provider of its own: it takes the process's.
    deriva_util::crypto::use_ring();
    let mut client = reqwest::blocking::Client::builder().timeout(export.timeout);
    if let Some(ca) = &export.certificate {
        let pem = read_pem(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {}: {e}", ca.display()))?;
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = &export.client {
        let mut pem = read_pem(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
        pem.push(b'\n');
        pem.extend(read_pem(key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            format!(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE {}: {e}",
                cert.display()
            )
        })?;
        client = client.identity(identity);
    }
    // Built (and so its runtime started) on a thread of its own: a blocking client may not be
    // made inside the async runtime.
    let client = std::thread::spawn(move || client.build())
        .join()
        .map_err(|_| "the OTLP/HTTP client: its builder panicked".to_owned())?
        .map_err(|e| format!("the OTLP/HTTP client: {e}"))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &export.headers {
        let name = http::HeaderName::try_from(name.as_str())
            .map_err(|_| format!("OTLP header name {name:?} is not a valid header name"))?;
        let mut value = http::HeaderValue::try_from(value.as_str())
            .map_err(|_| format!("the value of OTLP header {name} is not a valid header value"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(builder.with_http_client(HeaderClient { client, headers }))
}

/// An OTLP/HTTP client that sets Deriva's headers on every request, over those the exporter
/// set (from the environment).
struct HeaderClient {
    client: reqwest::blocking::Client,
    headers: http::HeaderMap,
}

impl fmt::Debug for HeaderClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderClient")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HeaderClient {
    async fn send_bytes(
        &self,
        mut request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        for (name, value) in &self.headers {
            request.headers_mut().insert(name, value.clone());
        }
        self.client.send_bytes(request).await
    }
}
