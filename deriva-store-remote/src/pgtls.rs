//! PostgreSQL over TLS: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, on top of
//! tokio-postgres, with rustls.
//!
//! tokio-postgres itself knows `sslmode=disable|prefer|require` and leaves the handshake, and
//! every check of the server's certificate, to a connector. This module reads the parameters
//! the way libpq documents them and builds that connector:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | absent, `disable` | never | — |
//! | `prefer` | when the server offers it | checked against `sslrootcert` if given, else not at all |
//! | `require` | always | checked against `sslrootcert` if given, else not at all |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | signed by a CA of `sslrootcert`, and for the host name in the URL |
//!
//! One difference from libpq: without `sslmode` the connection is plaintext (libpq would
//! `prefer` TLS), as it was before Deriva supported TLS; TLS parameters without `sslmode` are
//! refused rather than ignored. `sslrootcert=system` trusts the machine's CAs. `sslcert` with
//! `sslkey` gives a client certificate. Channel binding (SCRAM-SHA-256-PLUS) is not offered.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use deriva_util::redact;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The parameters this module takes off the connection string before tokio-postgres reads it.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// A connection string read: tokio-postgres's settings, and the TLS connector they need.
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: PgTls,
}

/// Reads `url` (a `postgres://` URL or a `key=value` string). Errors name the parameter.
pub(crate) fn parse(url: &str) -> Result<Target, String> {
    let (rest, params) = split_tls_params(url);
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    let get = |name: &str| params.get(name).map(String::as_str);
    let mode = get("sslmode");
    if mode.is_none()
        && let Some(name) = TLS_PARAMS.iter().find(|n| params.contains_key(**n))
    {
        return Err(format!(
            "{name} is given but sslmode is not: add sslmode=verify-full (or verify-ca, \
             require), or remove {name}"
        ));
    }
    let root = get("sslrootcert");
    let (ssl_mode, check) = match mode {
        None | Some("disable") => {
            config.ssl_mode(SslMode::Disable);
            return Ok(Target {
                config,
                tls: PgTls { config: None },
            });
        }
        Some("prefer") | Some("require") => {
            let ssl_mode = if mode == Some("prefer") {
                SslMode::Prefer
            } else {
                SslMode::Require
            };
            (
                ssl_mode,
                if root.is_some() {
                    Check::Chain
                } else {
                    Check::None
                },
            )
        }
        Some("verify-ca") => (SslMode::Require, Check::Chain),
        Some("verify-full") => (SslMode::Require, Check::Full),
        Some("allow") => {
            return Err(
                "sslmode=allow is not supported (plaintext first, TLS only if refused); \
                        use prefer, require, verify-ca or verify-full"
                    .to_owned(),
            );
        }
        Some(other) => {
            return Err(format!(
                "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
            ));
        }
    };
    config.ssl_mode(ssl_mode);
    let mode = mode.unwrap_or_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::None => Arc::new(Unchecked(provider.clone())),
        Check::Chain | Check::Full => {
            let root = root.ok_or_else(|| {
                format!(
                    "sslmode={mode} needs sslrootcert: the file of the CA that signed the \
                     server's certificate (PEM), or sslrootcert=system for the machine's CAs"
                )
            })?;
            let roots = Arc::new(load_roots(root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert={root}: {e}"))?;
            if matches!(check, Check::Full) {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut client = match (get("sslcert"), get("sslkey")) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey={key}: no private key read: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))?
        }
        (Some(_), None) => return Err("sslcert is given without sslkey".to_owned()),
        (None, Some(_)) => return Err("sslkey is given without sslcert".to_owned()),
    };
    // PostgreSQL 17 asks for it when the handshake comes first (sslnegotiation=direct); older
    // servers ignore it.
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Target {
        config,
        tls: PgTls {
            config: Some(Arc::new(client)),
        },
    })
}

/// How much of the server's certificate is checked.
enum Check {
    /// Nothing (libpq's `require` without a root certificate): encrypted, not authenticated.
    None,
    /// Its chain to a trusted CA, not the name it is for (`verify-ca`).
    Chain,
    /// Chain and name (`verify-full`).
    Full,
}

/// The CAs of `sslrootcert`: a PEM file, or `system`.
fn load_roots(root: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if root == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            return Err(format!(
                "sslrootcert=system: the machine has no CA certificates {why}"
            ));
        }
    } else {
        for cert in read_certs(root, "sslrootcert")? {
            roots
                .add(cert)
                .map_err(|e| format!("sslrootcert={root}: not a CA certificate: {e}"))?;
        }
    }
    Ok(roots)
}

/// Every certificate of the PEM file at `path`, at least one.
fn read_certs(path: &str, param: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{param}={path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{param}={path}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// Splits libpq's TLS parameters ([`TLS_PARAMS`]) off a connection string: the rest, for
/// tokio-postgres, and their values. A URL's query is where tokio-postgres finds it (after the
/// credentials, whose password may hold a `?`). A string this cannot read goes on whole, for
/// tokio-postgres to explain what is wrong with it.
fn split_tls_params(url: &str) -> (String, BTreeMap<String, String>) {
    let mut params = BTreeMap::new();
    if redact::is_postgres_url(url) {
        let Some(start) = redact::postgres_query_start(url) else {
            return (url.to_owned(), params);
        };
        let (base, query) = (&url[..start], &url[start + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (
                deriva_util::escape::percent_decode(key),
                deriva_util::escape::percent_decode(value),
            ) {
                (Some(key), Some(value)) if TLS_PARAMS.contains(&key.as_str()) => {
                    params.insert(key, value);
                }
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, params);
    }
    let Some(pairs) = redact::key_values(url) else {
        return (url.to_owned(), params);
    };
    let mut kept = Vec::new();
    for pair in pairs {
        if TLS_PARAMS.contains(&pair.key.as_str()) {
            params.insert(pair.key, pair.value);
        } else {
            kept.push(pair.text);
        }
    }
    (kept.join(" "), params)
}

/// `verify-ca`: the chain is checked as for `verify-full`; a certificate for another name is
/// accepted. (rustls checks the name only after the chain, so no other error is hidden.)
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` without `sslrootcert`: any certificate, as libpq does. The handshake's
/// signatures are still checked, so the session is with whoever holds that certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's TLS connector: none configured for plaintext (`sslmode` absent or
/// `disable`, when tokio-postgres never starts a handshake).
#[derive(Clone, Debug)]
pub(crate) struct PgTls {
    config: Option<Arc<ClientConfig>>,
}

#[cfg(test)]
impl PgTls {
    /// Whether connections are made over TLS (or may be, for `prefer`).
    pub(crate) fn enabled(&self) -> bool {
        self.config.is_some()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        Ok(PgTlsConnect {
            config: self.config.clone(),
            domain: domain.to_owned(),
        })
    }
}

/// One connection's handshake, with the host name it checks.
pub(crate) struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    domain: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS was not asked for (no sslmode)"))?;
            let name = ServerName::try_from(self.domain.clone()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{:?} is not a host name TLS can check", self.domain),
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A connection over TLS.
pub(crate) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Vec<(String, String)>) {
        let (rest, params) = split_tls_params(url);
        (rest, params.into_iter().collect())
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn tls_parameters_come_off_urls_and_the_rest_stays() {
        assert_eq!(
            split(
                "postgres://u@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem"
            ),
            (
                "postgres://u@h:5/db?application_name=x".to_owned(),
                vec![
                    pair("sslmode", "verify-full"),
                    pair("sslrootcert", "/ca.pem")
                ]
            )
        );
        assert_eq!(
            split("postgresql://u@h/db?sslmode=require"),
            (
                "postgresql://u@h/db".to_owned(),
                vec![pair("sslmode", "require")]
            )
        );
        assert_eq!(
            split("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), vec![])
        );
        // tokio-postgres reads the password up to the first '@': a '?' or '&' in it, even
        // one followed by "sslmode=", is no query.
        let url = "postgres://u:a?&sslmode=x&b@h/db";
        assert_eq!(split(url), (url.to_owned(), vec![]));
        assert_eq!(
            parse(url).unwrap().config.get_password(),
            Some(&b"a?&sslmode=x&b"[..])
        );
        assert_eq!(
            split("postgres://u:a?b@h/db?sslmode=require"),
            (
                "postgres://u:a?b@h/db".to_owned(),
                vec![pair("sslmode", "require")]
            )
        );
    }

    #[test]
    fn tls_parameters_come_off_key_value_strings() {
        assert_eq!(
            split("host=h  user = u sslrootcert='/my dir/ca.pem' dbname=d sslmode=verify-ca"),
            (
                "host=h user = u dbname=d".to_owned(),
                vec![
                    pair("sslmode", "verify-ca"),
                    pair("sslrootcert", "/my dir/ca.pem")
                ]
            )
        );
        assert_eq!(
            split(r"password='it\'s' sslmode=require"),
            (
                r"password='it\'s'".to_owned(),
                vec![pair("sslmode", "require")]
            )
        );
        // Not readable here: left whole for tokio-postgres to explain.
        assert_eq!(split("host=h 'oops"), ("host=h 'oops".to_owned(), vec![]));
    }

    fn error(url: &str) -> String {
        match parse(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn modes_and_their_mistakes() {
        let plain = parse("postgres://u@h/db").unwrap();
        assert_eq!(plain.config.get_ssl_mode(), SslMode::Disable);
        assert!(!plain.tls.enabled());
        let disabled = parse("postgres://u@h/db?sslmode=disable").unwrap();
        assert!(!disabled.tls.enabled());
        let required = parse("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(required.config.get_ssl_mode(), SslMode::Require);
        assert!(required.tls.enabled());
        let preferred = parse("host=h user=u sslmode=prefer").unwrap();
        assert_eq!(preferred.config.get_ssl_mode(), SslMode::Prefer);

        assert!(error("postgres://u@h/db?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(error("postgres://u@h/db?sslmode=verify-ca").contains("needs sslrootcert"));
        assert!(error("postgres://u@h/db?sslmode=allow").contains("sslmode=allow"));
        assert!(error("postgres://u@h/db?sslmode=maybe").contains("sslmode=maybe: expected"));
        assert!(
            error("postgres://u@h/db?sslrootcert=/ca.pem")
                .contains("sslrootcert is given but sslmode")
        );
        let missing =
            error("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(
            missing.starts_with("sslrootcert=/nonexistent/ca.pem: "),
            "{missing}"
        );
        assert!(
            error("postgres://u@h/db?sslmode=require&sslcert=/c.pem").contains("without sslkey")
        );
        assert!(
            error("postgres://u@h/db?sslmode=require&sslkey=/k.pem").contains("without sslcert")
        );
        assert!(error("nonsense").starts_with("not a PostgreSQL URL"));
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert={}",
            empty.display()
        );
        let e = error(&url);
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
