//! TLS on both listeners (`--tls-cert`, `--tls-key`), client certificates on gRPC
//! (`--tls-client-ca`), and the certificate swapped on SIGHUP without dropping open
//! connections.
//!
//! Each listener accepts TCP connections on one task and runs each TLS handshake on a task of
//! its own (bounded by [`HANDSHAKE_TIMEOUT`]), so a client that stalls its handshake delays no
//! one else. A failed handshake (a plaintext client, a client that does not trust the
//! certificate, a missing or unknown client certificate) closes that connection and is logged
//! at DEBUG.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a TLS handshake may take before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// The TLS connections of the gRPC listener, for tonic's `serve_with_incoming`.
    pub fn grpc_incoming(
        &self,
        listener: TcpListener,
    ) -> impl futures::Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
        let rx = accept_loop(listener, TlsAcceptor::from(self.grpc.clone()), "gRPC");
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|(stream, _)| (Ok(stream), rx))
        })
    }

    /// The TLS connections of the HTTP listener, for `axum::serve`.
    pub fn http_listener(&self, listener: TcpListener) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let rx = accept_loop(listener, TlsAcceptor::from(self.http.clone()), "HTTP");
        Ok(TlsListener { rx, local })
    }
}

type Accepted = (TlsStream<TcpStream>, SocketAddr);

/// Accepts on `listener` until the receiver is dropped; each handshake on a task of its own.
fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    what: &'static str,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel::<Accepted>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: the next accept may do better.
                    tracing::warn!(listener = what, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// The HTTP listener's TLS connections, as `axum::serve` takes them.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
