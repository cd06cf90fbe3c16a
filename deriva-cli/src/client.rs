//! The connection to a server and what can go wrong with a command.
//!
//! - [`Target`]: the server URL and the W3C trace context every request of one command carries;
//!   [`TraceContext`] is the interceptor that adds it.
//! - [`connect`]: a [`Client`] with the client's message limits, or a [`CliError::Connect`]
//!   that names the URL.
//! - [`CliError`]: why a command failed, with its exit code; [`error_line`] renders it as the one
//!   `deriva: ...` line the binary prints.
//! - [`provenance`]: the `Provenance` call, its statuses worded for `deriva provenance`.

use std::time::Duration;

use deriva_core::CAddr;
use deriva_proto::deriva_client::DerivaClient;
use deriva_proto::{ProvenanceRequest, ProvenanceResponse, addr_bytes};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The client's own gRPC message limit, both ways. The server enforces its own (smaller) one.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// How long to wait for the TCP (and HTTP/2) connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong (a bad address, a param without `=`, a bad URL). Exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot reach the server at {url}: {reason}")]
    Connect {
        /// The `--server` URL.
        url: String,
        /// Why, from the transport.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{context}: {}", describe_status(.status))]
    Rpc {
        /// The command and its subject, such as `get 1a2b3c4d…`.
        context: String,
        /// The status, whose code is printed in words, followed by the server's message.
        status: tonic::Status,
    },
    /// Reading input or writing output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The command ran but its answer is a failure (a non-deterministic recipe, a malformed
    /// answer).
    #[error("{context}: {message}")]
    Failed {
        /// The command and its subject.
        context: String,
        /// What went wrong.
        message: String,
    },
    /// Interrupted by Ctrl-C. Exit code 130.
    #[error("interrupted")]
    Interrupted,
}

impl CliError {
    /// The process exit code: 2 for usage errors, 130 for an interrupt, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Interrupted => 130,
            _ => 1,
        }
    }

    /// A [`CliError::Rpc`] for the command and subject `context`.
    pub(crate) fn rpc(context: &str, status: tonic::Status) -> Self {
        Self::Rpc {
            context: context.to_owned(),
            status,
        }
    }

    /// A [`CliError::Io`] for what was being done, `context`.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The one line `deriva` prints for `err` on stderr: `deriva: ...`, line breaks flattened.
pub fn error_line(err: &CliError) -> String {
    let text = err.to_string();
    let flat: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    format!("deriva: {}", flat.join(" "))
}

/// A gRPC status as `code in words: message`.
fn describe_status(status: &tonic::Status) -> String {
    let words = code_words(status.code());
    if status.message().is_empty() {
        words.to_owned()
    } else {
        format!("{words}: {}", status.message())
    }
}

/// A gRPC code in words, such as `not found`.
pub fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The server a command talks to, and the W3C trace context every request of this command
/// carries, so the server's spans join one trace per command.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server URL as given.
    pub url: String,
    /// `traceparent`: a fresh trace id and span id, sampled; `None` sends none (bench), leaving
    /// the sampling decision to the server.
    pub traceparent: Option<MetadataValue<Ascii>>,
    /// The trace id of this command (32 hex characters).
    pub trace_id: String,
    /// Whether to ask the server to sample whatever its ratio (`x-deriva-trace: force`).
    pub force: bool,
    /// Whether to ask the server to keep this command's request trees in its trace store,
    /// sampled for export or not (`x-deriva-trace: capture`): for `get --explain`.
    pub capture: bool,
    /// `authorization: Bearer <token>` for a server with `--auth-tokens`.
    pub authorization: Option<MetadataValue<Ascii>>,
    /// TLS files for https:// URLs.
    pub tls: TlsFiles,
}

/// The client's TLS files (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA that issued the server's certificate; else the system's CAs.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate, for mutual TLS.
    pub cert: Option<std::path::PathBuf>,
    /// Its private key.
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// tonic's TLS settings from the files.
    fn config(&self) -> Result<ClientTlsConfig, CliError> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--tls-cert", cert)?,
                    read("--tls-key", key)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => return Err(CliError::Usage("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => return Err(CliError::Usage("--tls-key needs --tls-cert".into())),
        }
        Ok(config)
    }
}

impl Target {
    /// A target with a new random trace context.
    pub fn new(url: &str, force: bool) -> Self {
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let traceparent = format!("00-{trace_id}-{span_id}-01")
            .parse()
            .expect("hex and dashes are valid metadata");
        Self {
            url: url.to_owned(),
            traceparent: Some(traceparent),
            trace_id,
            force,
            capture: false,
            authorization: None,
            tls: TlsFiles::default(),
        }
    }

    /// Asks the server to keep this command's request trees (see [`Target::capture`]).
    pub fn capturing(mut self) -> Self {
        self.capture = true;
        self
    }

    /// Uses `tls` for an https:// URL.
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = tls;
        self
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, CliError> {
        self.authorization = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {token}").parse().map_err(|_| {
                        CliError::Usage("--token (DERIVA_TOKEN) must be printable ASCII".into())
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(self)
    }
}

/// Adds the command's trace context to every request.
#[derive(Debug, Clone)]
pub struct TraceContext {
    traceparent: Option<MetadataValue<Ascii>>,
    force: bool,
    capture: bool,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(traceparent) = &self.traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.clone());
        }
        // A forced trace is captured too.
        if self.force {
            request
                .metadata_mut()
                .insert("x-deriva-trace", MetadataValue::from_static("force"));
        } else if self.capture {
            request
                .metadata_mut()
                .insert("x-deriva-trace", MetadataValue::from_static("capture"));
        }
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        Ok(request)
    }
}

/// A connected client.
pub type Client = DerivaClient<InterceptedService<Channel, TraceContext>>;

/// Connects to `target` with the client's message limits and its trace context.
pub async fn connect(target: &Target) -> Result<Client, CliError> {
    // As messages show it: a URL may carry credentials.
    let server = &deriva_util::redact::redact_url(&target.url);
    let url = if target.url.contains("://") {
        target.url.clone()
    } else {
        format!("http://{}", target.url)
    };
    let scheme = |s: &str| {
        url.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    };
    let https = scheme("https://");
    if !https && !scheme("http://") {
        return Err(CliError::Usage(format!(
            "--server {server:?}: only http:// and https:// URLs are supported"
        )));
    }
    if !https && target.tls.any() {
        // They would be ignored, and the connection plaintext.
        return Err(CliError::Usage(format!(
            "--tls-ca, --tls-cert and --tls-key need an https:// --server URL, not {server:?}"
        )));
    }
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| {
        CliError::Usage(format!(
            "--server {server:?} is not a valid URL: {}",
            error_chain(&e)
        ))
    })?;
    if https {
        endpoint = endpoint.tls_config(target.tls.config()?).map_err(|e| {
            CliError::Usage(format!("--server {server:?}: TLS: {}", error_chain(&e)))
        })?;
    }
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| CliError::Connect {
            url: server.to_owned(),
            reason: error_chain(&e),
        })?;
    let trace = TraceContext {
        traceparent: target.traceparent.clone(),
        force: target.force,
        capture: target.capture,
        authorization: target.authorization.clone(),
    };
    Ok(DerivaClient::with_interceptor(channel, trace)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Asks `target` for the provenance of `addr`, `depth` levels of inputs down. `NOT_FOUND`
/// (nothing is stored at `addr`) and `UNIMPLEMENTED` (a server older than the RPC) are worded
/// for the command; both exit with 1, like any server error.
pub async fn provenance(
    target: &Target,
    addr: CAddr,
    depth: u32,
) -> Result<ProvenanceResponse, CliError> {
    let answer = connect(target)
        .await?
        .provenance(ProvenanceRequest {
            addr: addr_bytes(&addr),
            depth,
        })
        .await;
    answer
        .map(tonic::Response::into_inner)
        .map_err(|status| provenance_error(&addr, status))
}

/// The error of a failed `Provenance` of `addr`.
fn provenance_error(addr: &CAddr, status: tonic::Status) -> CliError {
    let context = format!("provenance {}…", addr.short());
    match status.code() {
        Code::NotFound => CliError::Failed {
            context: format!("provenance {addr}"),
            message: "not found: the server stores neither a leaf nor a recipe at this address"
                .into(),
        },
        Code::Unimplemented => CliError::Failed {
            context,
            message: "the server does not answer Provenance (it is older than this client)".into(),
        },
        _ => CliError::rpc(&context, status),
    }
}

/// An error and its sources as `a: b: c`, leaving out the generic `transport error` wrapper and
/// any message that only repeats the next one.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    let keep: Vec<&str> = parts
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            let later = parts.get(i + 1);
            p.as_str() != "transport error" && !later.is_some_and(|l| p.ends_with(l.as_str()))
        })
        .map(|(_, p)| p.as_str())
        .collect();
    if keep.is_empty() {
        parts.join(": ")
    } else {
        keep.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_errors_name_the_address_and_keep_the_usual_exit_code() {
        let addr = CAddr::for_leaf(b"x");
        let err = provenance_error(&addr, tonic::Status::not_found("unknown address"));
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            error_line(&err),
            format!(
                "deriva: provenance {addr}: not found: the server stores neither a leaf nor a \
                 recipe at this address"
            )
        );
        let err = provenance_error(&addr, tonic::Status::unimplemented(""));
        assert!(error_line(&err).contains("older than this client"), "{err}");
        let err = provenance_error(&addr, tonic::Status::unavailable("index down"));
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            error_line(&err),
            format!(
                "deriva: provenance {}…: unavailable: index down",
                addr.short()
            )
        );
    }
}
