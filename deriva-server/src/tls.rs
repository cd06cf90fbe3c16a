//! TLS on both listeners (`--tls-cert`, `--tls-key`), client certificates on gRPC
//! (`--tls-client-ca`), and the certificate swapped on SIGHUP without dropping open
//! connections.
//!
//! The handshakes run in [`crate::listen`]'s accept loop, each on a task of its own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), the server's certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With it, the gRPC listener requires client certificates issued by these CAs (PEM).
    pub client_ca: Option<PathBuf>,
}

/// The server's certificate and key, read again by [`ReloadableCert::reload`].
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

impl ReloadableCert {
    fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let current = certified(cert, key, &provider)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// Reads the certificate and key files again; new handshakes use them, open connections
    /// keep theirs. On an error the previous certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = certified(&self.cert, &self.key, &self.provider)?;
        *self.current.write() = Arc::new(fresh);
        Ok(())
    }
}

/// The certificate chain of `cert` with the key of `key`, checked to belong together.
fn certified(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = read_certs(cert, "--tls-cert")?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--tls-key {}: no private key in PEM form: {e}",
            key.display()
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "--tls-key {} does not belong to the certificate of --tls-cert {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no certificate in PEM form",
            path.display()
        ));
    }
    Ok(certs)
}

/// The TLS settings of both listeners.
#[derive(Debug, Clone)]
pub struct Tls {
    grpc: Arc<rustls::ServerConfig>,
    http: Arc<rustls::ServerConfig>,
    cert: Arc<ReloadableCert>,
}

impl Tls {
    /// Reads the files; an error names the flag and what is wrong.
    pub fn new(files: &TlsFiles) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(ReloadableCert::load(
            &files.cert,
            &files.key,
            provider.clone(),
        )?);
        let builder = || {
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))
        };
        let mut grpc = match &files.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca, "--tls-client-ca")? {
                    roots
                        .add(c)
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder()?
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(cert.clone())
            }
            None => builder()?
                .with_no_client_auth()
                .with_cert_resolver(cert.clone()),
        };
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        let mut http = builder()?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            grpc: Arc::new(grpc),
            http: Arc::new(http),
            cert,
        })
    }

    /// The certificate, for SIGHUP.
    pub fn cert(&self) -> &Arc<ReloadableCert> {
        &self.cert
    }

    /// The acceptor of the gRPC listener.
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.grpc.clone())
    }

    /// The acceptor of the HTTP listener.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.http.clone())
    }
}
