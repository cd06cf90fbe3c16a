//! The accept loop of both listeners, with its limits against abuse.
//!
//! - **A cap on open connections** per listener (`--max-connections`): at the cap the loop stops
//!   accepting (new connections wait in the kernel's backlog) and says so once in the log, until
//!   a connection closes.
//! - **A first-byte deadline** (`--handshake-timeout-secs`): a connection that sends nothing, or
//!   does not finish its TLS handshake, within it is closed, so idle sockets cannot hold the
//!   slots. Each connection waits on a task of its own, so a slow one delays no other.
//! - With TLS, the handshake happens here too; a failed one (a plaintext client, one that does
//!   not trust the certificate, a missing or unknown client certificate) closes the connection
//!   and is logged at DEBUG.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest a new connection may take to send its first byte (plaintext) or finish its TLS
    /// handshake.
    pub handshake_timeout: Duration,
}

/// One accepted connection, plaintext or TLS, holding its slot under the cap until it closes.
pub struct Conn {
    io: Io,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = matches!(self.io, Io::Tls(_));
        f.debug_struct("Conn")
            .field("peer", &self.tcp().peer_addr().ok())
            .field("tls", &tls)
            .finish()
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

type Accepted = (Conn, SocketAddr);

/// Accepts on `listener` under `limits`, with TLS if `tls` is given, until every receiver of
/// what it accepts is dropped.
fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    what: &'static str,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel::<Accepted>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let warned = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    warned.store(false, Ordering::Relaxed);
                    slot
                }
                Err(_) => {
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            listener = what,
                            max_connections = limits.max_connections,
                            "connection limit reached: new connections wait until one closes (--max-connections)"
                        );
                    }
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => match slot {
                            Ok(slot) => slot,
                            Err(_) => return,
                        },
                        () = tx.closed() => return,
                    }
                }
            };
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
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let opened = tokio::time::timeout(limits.handshake_timeout, async {
                    match tls {
                        Some(acceptor) => acceptor.accept(tcp).await.map(|s| Io::Tls(Box::new(s))),
                        // Waits for a byte (a peek consumes nothing); readiness alone can be
                        // reported before any arrives.
                        None => match tcp.peek(&mut [0u8; 1]).await {
                            Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                            Ok(_) => Ok(Io::Plain(tcp)),
                            Err(e) => Err(e),
                        },
                    }
                })
                .await;
                match opened {
                    Ok(Ok(io)) => {
                        let _ = tx.send((Conn { io, _slot: slot }, peer)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %peer, error = %e, "connection failed before its first request");
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %peer, "connection closed: nothing received within the handshake timeout");
                    }
                }
            });
        }
    });
    rx
}

/// The gRPC listener's connections, for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
    let rx = accept_loop(listener, tls, limits, "gRPC");
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|(conn, _)| (Ok(conn), rx))
    })
}

/// The HTTP listener's connections, as `axum::serve` takes them.
#[derive(Debug)]
pub struct HttpListener {
    rx: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

impl HttpListener {
    /// Accepts on `listener` under `limits`, with TLS if `tls` is given.
    pub fn new(
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        limits: Limits,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let rx = accept_loop(listener, tls, limits, "HTTP");
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Conn;
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
