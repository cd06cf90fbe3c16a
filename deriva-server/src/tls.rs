//! TLS on both listeners (`--tls-cert`, `--tls-key`) and client certificates
//! (`--tls-client-ca`): required on gRPC, asked for but optional on HTTP (where a verified one
//! opens `/metrics` and `/debug`, see `http/`). [`Tls::reload`] (SIGHUP) reads the three
//! files again without dropping open connections.
//!
//! rustls's `ServerConfig`s cannot change once built: a reload builds new ones from the files
//! and swaps them in, and the accept loop (`listen.rs`) takes the current one for each
//! new connection ([`Acceptors::acceptor`]). A connection keeps the configuration of its
//! handshake. The three files are read together: if any of them fails, all three stay as they
//! were, so a certificate is never paired with a client CA of another generation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), the server's certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Refused if users other than its owner
    /// may write it; a warning if they may read it.
    pub key: PathBuf,
    /// With it, the gRPC listener requires client certificates issued by these CAs (PEM), and
    /// the HTTP listener asks for one.
    pub client_ca: Option<PathBuf>,
}

/// The TLS settings of both listeners, shared by their accept loops and swapped by
/// [`Tls::reload`].
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    configs: RwLock<Configs>,
}

/// One generation of configurations, built from the files at once.
struct Configs {
    grpc: Arc<rustls::ServerConfig>,
    http: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files; an error names the flag, the file and what is wrong.
    pub fn new(files: &TlsFiles) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let configs = Configs::read(files, &provider)?;
        Ok(Self {
            inner: Arc::new(Inner {
                files: files.clone(),
                provider,
                configs: RwLock::new(configs),
            }),
        })
    }

    /// Reads the certificate, the key and the client CA again: new handshakes use them, open
    /// connections keep theirs. On an error (naming the file) all three stay as they were.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = Configs::read(&self.inner.files, &self.inner.provider)?;
        *self.inner.configs.write() = fresh;
        Ok(())
    }

    /// Whether client certificates are asked for (`--tls-client-ca`).
    pub fn client_ca(&self) -> bool {
        self.inner.files.client_ca.is_some()
    }

    /// The files, as given.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// What the gRPC listener's accept loop takes its acceptors from.
    pub fn grpc(&self) -> Acceptors {
        Acceptors {
            tls: self.clone(),
            http: false,
        }
    }

    /// What the HTTP listener's accept loop takes its acceptors from.
    pub fn http(&self) -> Acceptors {
        Acceptors {
            tls: self.clone(),
            http: true,
        }
    }
}

/// The acceptors of one listener: each new connection gets the configuration in use when it
/// arrives.
#[derive(Debug, Clone)]
pub struct Acceptors {
    tls: Tls,
    http: bool,
}

impl Acceptors {
    /// An acceptor with the configuration in use now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let configs = self.tls.inner.configs.read();
        TlsAcceptor::from(if self.http {
            configs.http.clone()
        } else {
            configs.grpc.clone()
        })
    }
}

impl Configs {
    fn read(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Self, String> {
        let cert = Arc::new(certified(&files.cert, &files.key, provider)?);
        // With --tls-client-ca: required on gRPC; asked for but optional on HTTP, where probes
        // (`/healthz`, `/readyz`) need none.
        let (grpc_clients, http_clients) = match &files.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca, "--tls-client-ca")? {
                    roots
                        .add(c)
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                }
                let roots = Arc::new(roots);
                let verifier = |optional: bool| {
                    let b = WebPkiClientVerifier::builder_with_provider(
                        roots.clone(),
                        provider.clone(),
                    );
                    let b = if optional {
                        b.allow_unauthenticated()
                    } else {
                        b
                    };
                    b.build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))
                };
                (Some(verifier(false)?), Some(verifier(true)?))
            }
            None => (None, None),
        };
        // One configuration around the same certificate; a reload builds new ones.
        let config = |clients: Option<Arc<dyn ClientCertVerifier>>, alpn: &[u8]| {
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?;
            let builder = match clients {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            let mut config =
                builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.clone())));
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok::<_, String>(Arc::new(config))
        };
        Ok(Self {
            grpc: config(grpc_clients, b"h2")?,
            http: config(http_clients, b"http/1.1")?,
        })
    }
}

/// The certificate chain of `cert` with the key of `key`, checked to belong together.
fn certified(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = read_certs(cert, "--tls-cert")?;
    let key_pem = crate::auth::read_secret_file(key, "--tls-key")?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
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
