//! The accept loop of both listeners, with its limits against abuse.
//!
//! - **A slot per connection** (`--max-connections` per listener). A connection first waits
//!   for its **first request**, on a task of its own: with TLS, its handshake, then the HTTP/2
//!   connection preface and the SETTINGS frame that must follow it (gRPC), or complete HTTP/1
//!   request headers (HTTP). Only then is it handed to hyper, and counts as open. The bytes read
//!   meanwhile are handed to hyper unchanged, before the socket's ([`Conn`] replays them).
//! - **A deadline for all of that** (`--handshake-timeout-secs`): TLS handshake and first
//!   request together, from the accept on. A connection that has not sent its first request by
//!   then is closed: one byte, a preface without its SETTINGS, headers that trickle in, a TLS
//!   handshake followed by silence all count as nothing.
//! - **At the cap**, a new connection takes the slot of the oldest connection that has not
//!   sent its first request, once that one has waited a tenth of the deadline (so that a flood of
//!   new connections cannot evict an honest client before its first bytes are read). When every
//!   slot holds an open connection, the loop stops accepting (new connections wait in the
//!   kernel's backlog) until one closes. Either way the log says "connection limit reached"
//!   once, until a connection finds a free slot again. At most one accepted connection waits for
//!   a slot beside the `--max-connections` that hold one.
//! - **What is buffered is bounded**: the preface and a SETTINGS frame of at most
//!   [`MAX_SETTINGS_BYTES`] (an HTTP/2 client sends a few dozen bytes; a larger one is refused),
//!   or request headers of at most [`MAX_HEAD_BYTES`] (answered 431 beyond).
//! - Refusals (bytes that are not HTTP/2, a failed TLS handshake: a plaintext client, one that
//!   does not trust the certificate, a missing or unknown client certificate on gRPC) close the
//!   connection and are logged at DEBUG, as are evictions and deadlines.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::tls::Acceptors;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections at once, open or still sending their first request.
    pub max_connections: usize,
    /// Longest a new connection may take to finish its TLS handshake (if any) and send its
    /// first request.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// How long a connection without its first request keeps its slot against newer ones at
    /// the cap: a tenth of the deadline.
    fn eviction_floor(&self) -> Duration {
        (self.handshake_timeout / 10).max(Duration::from_millis(10))
    }
}

/// The largest SETTINGS frame accepted after the HTTP/2 preface, in bytes of payload (682
/// settings; a client sends a handful, and HTTP/2 defines seven).
pub const MAX_SETTINGS_BYTES: usize = 4096;

/// The largest HTTP/1 request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2's frame header: 3 bytes of length, type, flags, 4 bytes of stream id.
const FRAME_HEADER: usize = 9;

/// What a listener's first request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// gRPC: the HTTP/2 preface and a SETTINGS frame.
    Http2,
    /// The HTTP listener: an HTTP/1 request head.
    Http1,
}

/// One accepted connection, plaintext or TLS, that has sent its first request; it holds its
/// slot under the cap until it closes.
pub struct Conn {
    io: Io,
    /// The bytes read to see the first request, handed out before the socket's.
    replay: Vec<u8>,
    replayed: usize,
    client_certificate: bool,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = matches!(self, Io::Tls(_));
        f.debug_struct("Io")
            .field("peer", &self.tcp().peer_addr().ok())
            .field("tls", &tls)
            .finish()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = matches!(self.io, Io::Tls(_));
        f.debug_struct("Conn")
            .field("peer", &self.io.tcp().peer_addr().ok())
            .field("tls", &tls)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl Conn {
    /// Whether the client presented a certificate that the listener's verifier accepted: one
    /// issued by the CA of `--tls-client-ca` (on a listener without it, never).
    pub fn client_certificate(&self) -> bool {
        self.client_certificate
    }
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }

    fn client_certificate(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            // rustls keeps only a chain its verifier accepted (a rejected one fails the
            // handshake); without one, there is none.
            Self::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty()),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.tcp().connect_info()
    }
}

type Accepted = (Conn, SocketAddr);

/// Why a connection was closed before its first request.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("closed by the client")]
    Closed,
    #[error("{0}")]
    NotHttp2(String),
    #[error("request headers above {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge(Box<Io>),
}

/// The connections of one listener that have not sent their first request yet, oldest first
/// (ids grow with time). Dropping an entry's sender evicts its connection.
#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    next: u64,
    waiting: BTreeMap<u64, (Instant, oneshot::Sender<()>)>,
}

impl Pending {
    fn register(self: &Arc<Self>) -> (Registration, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock();
        let id = state.next;
        state.next += 1;
        state.waiting.insert(id, (Instant::now(), tx));
        (
            Registration {
                pending: self.clone(),
                id,
            },
            rx,
        )
    }

    fn is_empty(&self) -> bool {
        self.state.lock().waiting.is_empty()
    }

    /// When the oldest waiting connection arrived.
    fn oldest(&self) -> Option<Instant> {
        self.state
            .lock()
            .waiting
            .first_key_value()
            .map(|(_, (since, _))| *since)
    }

    /// Evicts the oldest waiting connection if it arrived before `before`.
    fn evict_oldest(&self, before: Instant) -> bool {
        let mut state = self.state.lock();
        let evict = state
            .waiting
            .first_key_value()
            .is_some_and(|(_, (since, _))| *since <= before);
        // Dropping the sender tells the connection's task.
        evict && state.waiting.pop_first().is_some()
    }
}

/// A connection's entry in [`Pending`], removed when it is dropped.
struct Registration {
    pending: Arc<Pending>,
    id: u64,
}

impl Registration {
    /// Leaves the waiting list: false if the connection was evicted meanwhile.
    fn finish(self) -> bool {
        self.pending.state.lock().waiting.remove(&self.id).is_some()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.pending.state.lock().waiting.remove(&self.id);
    }
}

/// Accepts on `listener` under `limits`, with TLS if `tls` is given, until every receiver of
/// what it accepts is dropped.
fn accept_loop(
    listener: TcpListener,
    tls: Option<Acceptors>,
    limits: Limits,
    protocol: Protocol,
    what: &'static str,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel::<Accepted>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let pending = Arc::new(Pending::default());
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            if slots.available_permits() == 0 && pending.is_empty() {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(
                        listener = what,
                        max_connections = limits.max_connections,
                        "connection limit reached: every slot holds an open connection; new connections wait until one closes (--max-connections)"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        // Free: accept below.
                        Ok(slot) => drop(slot),
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                }
                continue;
            }
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
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    warned = false;
                    slot
                }
                Err(_) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(
                            listener = what,
                            max_connections = limits.max_connections,
                            "connection limit reached: a new connection takes the slot of the oldest one that has not sent its first request (--max-connections)"
                        );
                    }
                    match take_slot(&slots, &pending, limits, &tx).await {
                        Some(slot) => slot,
                        None => return,
                    }
                }
            };
            let _ = tcp.set_nodelay(true);
            let (registration, evicted) = pending.register();
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let opened = tokio::select! {
                    biased;
                    _ = evicted => {
                        tracing::debug!(listener = what, %peer, "connection closed before its first request: its slot went to a newer connection");
                        return;
                    }
                    opened = tokio::time::timeout(limits.handshake_timeout, open(tcp, tls, protocol)) => opened,
                };
                if !registration.finish() {
                    // Evicted as it finished: the slot is promised to another.
                    return;
                }
                match opened {
                    Ok(Ok((io, replay))) => {
                        let conn = Conn {
                            client_certificate: io.client_certificate(),
                            io,
                            replay,
                            replayed: 0,
                            _slot: slot,
                        };
                        let _ = tx.send((conn, peer)).await;
                    }
                    Ok(Err(Refused::HeadTooLarge(mut io))) => {
                        tracing::debug!(listener = what, %peer, "connection closed: request headers above {MAX_HEAD_BYTES} bytes");
                        let answer = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
                        let _ = tokio::time::timeout(limits.handshake_timeout, async {
                            io.write_all(answer).await?;
                            io.shutdown().await
                        })
                        .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %peer, error = %e, "connection closed before its first request");
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %peer, timeout_secs = limits.handshake_timeout.as_secs_f64(), "connection closed: no complete first request within the handshake timeout");
                    }
                }
            });
        }
    });
    rx
}

/// At the cap, with a connection accepted: the first slot that frees, or the slot of the
/// oldest connection still without its first request once it has waited
/// [`Limits::eviction_floor`]. `None` once nobody takes connections any more.
async fn take_slot(
    slots: &Arc<Semaphore>,
    pending: &Pending,
    limits: Limits,
    tx: &mpsc::Sender<Accepted>,
) -> Option<OwnedSemaphorePermit> {
    let floor = limits.eviction_floor();
    loop {
        let evictable = pending.oldest().map(|since| since + floor);
        tokio::select! {
            slot = slots.clone().acquire_owned() => return slot.ok(),
            // The evicted connection's task ends and frees its slot: the branch above.
            () = tokio::time::sleep_until(evictable.unwrap_or_else(Instant::now)), if evictable.is_some() => {
                pending.evict_oldest(Instant::now() - floor);
            }
            () = tx.closed() => return None,
        }
    }
}

/// The TLS handshake (if any) and the first request: the stream, and what was read of it.
async fn open(
    tcp: TcpStream,
    tls: Option<Acceptors>,
    protocol: Protocol,
) -> Result<(Io, Vec<u8>), Refused> {
    let mut io = match tls {
        Some(acceptors) => Io::Tls(Box::new(acceptors.acceptor().accept(tcp).await?)),
        None => Io::Plain(tcp),
    };
    let mut buf = Vec::new();
    let mut head = HeadScan::default();
    let cap = match protocol {
        Protocol::Http2 => PREFACE.len() + FRAME_HEADER + MAX_SETTINGS_BYTES,
        Protocol::Http1 => MAX_HEAD_BYTES,
    };
    loop {
        let len = buf.len();
        let room = (cap - len).min(4096);
        buf.resize(len + room, 0);
        let n = io.read(&mut buf[len..]).await?;
        buf.truncate(len + n);
        if n == 0 {
            return Err(Refused::Closed);
        }
        let complete = match protocol {
            Protocol::Http2 => settings_received(&buf).map_err(Refused::NotHttp2)?,
            Protocol::Http1 => head.complete(&buf),
        };
        if complete {
            return Ok((io, buf));
        }
        if buf.len() >= cap {
            // Only HTTP/1 gets here: a SETTINGS frame too large is refused as it is announced.
            return Err(Refused::HeadTooLarge(Box::new(io)));
        }
    }
}

/// Whether `buf` holds the HTTP/2 preface and a whole SETTINGS frame after it; an error if it
/// cannot become that.
fn settings_received(buf: &[u8]) -> Result<bool, String> {
    let n = buf.len().min(PREFACE.len());
    if buf[..n] != PREFACE[..n] {
        return Err("not the HTTP/2 connection preface (gRPC speaks HTTP/2 only)".into());
    }
    let Some(header) = buf.get(PREFACE.len()..PREFACE.len() + FRAME_HEADER) else {
        return Ok(false);
    };
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let (kind, flags) = (header[3], header[4]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    // SETTINGS is type 4, on stream 0, not an ACK, six bytes per setting.
    if kind != 4 || flags & 1 != 0 || stream != 0 || !length.is_multiple_of(6) {
        return Err("the HTTP/2 preface is not followed by a SETTINGS frame".into());
    }
    if length > MAX_SETTINGS_BYTES {
        return Err(format!(
            "a SETTINGS frame of {length} bytes (at most {MAX_SETTINGS_BYTES} accepted)"
        ));
    }
    Ok(buf.len() >= PREFACE.len() + FRAME_HEADER + length)
}

/// Finds the end of an HTTP/1 request head, the blank line after the headers, as bytes
/// arrive: each byte is looked at once. Blank lines before the request line are skipped, as
/// hyper skips them; a line may end in LF or CR LF.
#[derive(Debug, Default)]
struct HeadScan {
    scanned: usize,
    state: HeadState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    /// Before the request line: CR and LF skipped.
    #[default]
    Leading,
    /// Within a line.
    Line,
    /// Just after a line's LF.
    LineEnd,
    /// A CR just after a line's LF.
    LineEndCr,
    /// The blank line is in.
    Done,
}

impl HeadScan {
    fn complete(&mut self, buf: &[u8]) -> bool {
        use HeadState::*;
        for &b in &buf[self.scanned..] {
            self.state = match (self.state, b) {
                (Done, _) => Done,
                (Leading, b'\r' | b'\n') => Leading,
                (LineEnd | LineEndCr, b'\n') => Done,
                (LineEnd, b'\r') => LineEndCr,
                (_, b'\n') => LineEnd,
                _ => Line,
            };
        }
        self.scanned = buf.len();
        self.state == Done
    }
}

/// The gRPC listener's connections, for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Acceptors>,
    limits: Limits,
) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
    let rx = accept_loop(listener, tls, limits, Protocol::Http2, "gRPC");
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|(conn, _)| (Ok(conn), rx))
    })
}

/// The HTTP listener's connections, each with complete request headers waiting in it.
#[derive(Debug)]
pub struct HttpListener {
    rx: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

impl HttpListener {
    /// Accepts on `listener` under `limits`, with TLS if `tls` is given.
    pub fn new(listener: TcpListener, tls: Option<Acceptors>, limits: Limits) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let rx = accept_loop(listener, tls, limits, Protocol::Http1, "HTTP");
        Ok(Self { rx, local })
    }

    /// The next connection; never `None` while `self` lives (the accept loop ends only once
    /// this is dropped).
    pub async fn accept(&mut self) -> Option<(Conn, SocketAddr)> {
        self.rx.recv().await
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_blank_line_however_it_arrives() {
        let request = b"\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..request.len() {
            let mut scan = HeadScan::default();
            assert!(!scan.complete(&request[..split]), "complete at {split}");
            assert!(scan.complete(request), "split at {split}");
        }
        let mut scan = HeadScan::default();
        assert!(scan.complete(b"GET / HTTP/1.1\nHost: x\n\n"), "bare LF");
        for partial in [
            &b"\r\n\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
        ] {
            assert!(!HeadScan::default().complete(partial), "{partial:?}");
        }
    }

    #[test]
    fn the_first_http2_request_is_the_preface_and_a_settings_frame() {
        let mut first = PREFACE.to_vec();
        // SETTINGS, 12 bytes: two settings.
        first.extend_from_slice(&[0, 0, 12, 4, 0, 0, 0, 0, 0]);
        first.extend_from_slice(&[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]);
        for n in 0..first.len() {
            assert_eq!(settings_received(&first[..n]), Ok(false), "{n} bytes");
        }
        assert_eq!(settings_received(&first), Ok(true));
        let mut more = first.clone();
        more.extend_from_slice(b"whatever follows");
        assert_eq!(settings_received(&more), Ok(true));

        assert!(settings_received(b"GET / HTTP/1.1\r\n").is_err());
        assert!(settings_received(b"\x16\x03\x01").is_err(), "TLS");
        let frame = |header: [u8; 9]| {
            let mut b = PREFACE.to_vec();
            b.extend_from_slice(&header);
            settings_received(&b)
        };
        assert!(frame([0, 0, 0, 6, 0, 0, 0, 0, 0]).is_err(), "PING");
        assert!(frame([0, 0, 0, 4, 1, 0, 0, 0, 0]).is_err(), "an ACK");
        assert!(frame([0, 0, 0, 4, 0, 0, 0, 0, 1]).is_err(), "stream 1");
        assert!(
            frame([0, 0, 5, 4, 0, 0, 0, 0, 0]).is_err(),
            "not 6 per setting"
        );
        assert!(frame([0, 0x10, 2, 4, 0, 0, 0, 0, 0]).is_err(), "too large");
        assert_eq!(
            frame([0, 0, 0, 4, 0, 0, 0, 0, 0]),
            Ok(true),
            "empty SETTINGS"
        );
    }
}
