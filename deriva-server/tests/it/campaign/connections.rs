//! Sockets that try to hold the slots of `--max-connections` without ever making a request: one
//! byte each, a TLS handshake and then silence, the HTTP/2 preface without its SETTINGS,
//! HTTP/1 headers that trickle in, an idle keep-alive connection; against them, honest clients
//! that are served (the `deriva` CLI, a slow one within the deadline), and the server's
//! descriptors, which stay bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use deriva_testkit::ca::Ca;
use deriva_testkit::process::ServerProcess;

/// The longest a `deriva status` may take under attack before it counts as locked out (the
/// CLI's own connect timeout is 10 s).
const CLI_BOUND: Duration = Duration::from_secs(20);

/// The HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `deriva [extra] status` against `url`: how long it took, or why it failed.
async fn cli_status(url: &str, extra: &[String]) -> Result<Duration, String> {
    let started = Instant::now();
    let child = tokio::process::Command::new(super::cli_bin())
        .arg("--server")
        .arg(url)
        .args(extra)
        .arg("status")
        .env_remove("DERIVA_SERVER")
        .env_remove("DERIVA_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    match tokio::time::timeout(CLI_BOUND, child.wait_with_output()).await {
        Err(_) => Err(format!("deriva status did not answer within {CLI_BOUND:?}")),
        Ok(out) => {
            let out = out.unwrap();
            if out.status.success() {
                Ok(started.elapsed())
            } else {
                Err(format!(
                    "deriva status failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        }
    }
}

/// Open file descriptors of the server.
fn fds(server: &ServerProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid().as_raw_nonzero()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// How a squatter opens its socket.
#[derive(Clone)]
enum Squat {
    /// Sends these bytes over plain TCP, then nothing.
    Bytes(&'static [u8]),
    /// Completes a TLS handshake, then sends nothing.
    TlsHandshake(tokio_rustls::TlsConnector),
}

/// Sockets that each open, send what their [`Squat`] says and then wait; each is opened again
/// as soon as the server closes it, as an attacker in a loop would.
struct Squatters {
    /// Sockets that got their bytes (or handshake) through.
    opened: Arc<AtomicUsize>,
    /// Sockets the server closed.
    closed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Squatters {
    fn start(addr: &str, n: usize, how: Squat) -> Self {
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..n)
            .map(|_| {
                let (addr, how) = (addr.to_owned(), how.clone());
                let (opened, closed) = (opened.clone(), closed.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok(tcp) = TcpStream::connect(&addr).await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let held: Box<dyn AsyncRead + Unpin + Send> = match &how {
                            Squat::Bytes(bytes) => {
                                let mut tcp = tcp;
                                if tcp.write_all(bytes).await.is_err() {
                                    continue;
                                }
                                Box::new(tcp)
                            }
                            Squat::TlsHandshake(connector) => {
                                let name =
                                    rustls::pki_types::ServerName::try_from("localhost").unwrap();
                                match connector.connect(name, tcp).await {
                                    Ok(tls) => Box::new(tls),
                                    Err(_) => continue,
                                }
                            }
                        };
                        opened.fetch_add(1, Ordering::Relaxed);
                        until_closed(held).await;
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self {
            opened,
            closed,
            tasks,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::Relaxed)
    }

    /// Waits until `done(opened, closed)` holds; panics naming `what` after the deadline.
    async fn wait(&self, what: &str, done: impl Fn(usize, usize) -> bool) {
        let deadline = Instant::now() + deriva_testkit::DEADLINE;
        while !done(self.opened(), self.closed()) {
            assert!(
                Instant::now() < deadline,
                "{what}: {} opened, {} closed by the server",
                self.opened(),
                self.closed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Squatters {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads (and drops) whatever comes until the peer closes or the connection fails.
async fn until_closed(mut stream: impl AsyncRead + Unpin) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// How long until the server closes `stream`, if it does within `bound`.
async fn closed_after(stream: impl AsyncRead + Unpin, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    tokio::time::timeout(bound, until_closed(stream))
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// Four sockets that each send one byte, reconnecting as soon as they are closed, against
/// `--max-connections 4 --handshake-timeout-secs 1`: `deriva status` is served each time, the
/// deadline closes the sockets, and with fifty such sockets the server still holds at most four
/// connections (beside one it may hold while it finds it a slot) and still serves the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_one_byte_sockets_do_not_lock_out_the_cli() {
    let server = super::server()
        .args(["--max-connections", "4", "--handshake-timeout-secs", "1"])
        .start();
    let url = server.url();
    cli_status(&url, &[])
        .await
        .expect("served before the attack");
    let baseline = fds(&server);

    let squatters = Squatters::start(server.grpc_addr(), 4, Squat::Bytes(b"P"));
    squatters.wait("four one-byte sockets", |o, _| o >= 4).await;
    for round in 0..3 {
        let took = cli_status(&url, &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}, under four one-byte sockets: {e}"));
        eprintln!("deriva status answered in {took:?} under four one-byte sockets");
    }
    // Nothing but the deadline closes them when no one else comes.
    squatters
        .wait("the one-byte sockets closed by the deadline", |_, c| c >= 8)
        .await;
    drop(squatters);

    // Fifty of them: the slots stay four.
    let flood = Squatters::start(server.grpc_addr(), 50, Squat::Bytes(b"P"));
    flood.wait("fifty sockets cycling", |_, c| c >= 50).await;
    let cli = tokio::spawn({
        let url = url.clone();
        async move { cli_status(&url, &[]).await }
    });
    let mut most = 0;
    while !cli.is_finished() {
        most = most.max(fds(&server));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let took = cli
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("under fifty one-byte sockets: {e}"));
    eprintln!(
        "deriva status answered in {took:?} under fifty one-byte sockets; at most {most} descriptors (baseline {baseline})"
    );
    assert!(
        most <= baseline + 4 + 1 + 2,
        "{most} descriptors open under the flood, baseline {baseline}: more than the 4 slots, one waiting for a slot and 2 to spare"
    );
}

/// The same over TLS: four sockets that finish their TLS handshake and then say nothing, and
/// one that sends one byte, all reconnecting, do not lock out `deriva status` over https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_sockets_do_not_lock_out_the_cli() {
    let ca = Ca::new("deriva campaign CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = ca.issue(&["localhost", "127.0.0.1"], false);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let key = write("server.key", &key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let server = super::server()
        .args(["--max-connections", "4", "--handshake-timeout-secs", "1"])
        .args(["--tls-cert", &write("server.pem", &cert), "--tls-key", &key])
        .start();
    let url = server.url().replacen("http://", "https://", 1);
    let tls_ca = ["--tls-ca".to_owned(), write("ca.pem", &ca.pem)];
    cli_status(&url, &tls_ca)
        .await
        .expect("served before the attack");

    // Four that would hold every slot once their handshake is done, and one that sends the
    // first byte of a ClientHello.
    let handshakes = Squatters::start(
        server.grpc_addr(),
        4,
        Squat::TlsHandshake(deriva_testkit::ca::tls_connector(&ca.pem)),
    );
    let bytes = Squatters::start(server.grpc_addr(), 1, Squat::Bytes(b"\x16"));
    handshakes
        .wait("four silent TLS connections", |o, _| o >= 4)
        .await;
    bytes.wait("a one-byte socket", |o, _| o >= 1).await;
    for round in 0..3 {
        let took = cli_status(&url, &tls_ca)
            .await
            .unwrap_or_else(|e| panic!("round {round}, under silent TLS sockets: {e}"));
        eprintln!("deriva status over https answered in {took:?} under silent sockets");
    }
    handshakes
        .wait("the silent TLS connections closed", |_, c| c >= 4)
        .await;
}

/// A relay to `upstream` for one client at a time that forwards the client's first 30 bytes
/// in two parts, `pause` apart, and then everything as it comes, both ways: a slow client.
async fn slow_start_relay(upstream: String, pause: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = TcpStream::connect(&upstream).await?;
                let mut first = [0u8; 30];
                client.read_exact(&mut first).await?;
                server.write_all(&first[..10]).await?;
                tokio::time::sleep(pause).await;
                server.write_all(&first[10..]).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                std::io::Result::Ok(())
            });
        }
    });
    addr
}

/// A socket that sends the HTTP/2 preface and no SETTINGS frame is closed at the deadline; one
/// that announces a SETTINGS frame larger than the server buffers is closed at once; a client
/// whose preface comes slowly, within the deadline, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preface_without_settings_is_closed_at_the_deadline() {
    let server = super::server()
        .args(["--max-connections", "8", "--handshake-timeout-secs", "4"])
        .start();
    let mut preface_only = TcpStream::connect(server.grpc_addr()).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    let mut huge = TcpStream::connect(server.grpc_addr()).await.unwrap();
    huge.write_all(PREFACE).await.unwrap();
    // A SETTINGS frame header announcing 60,000 bytes (10,000 settings).
    huge.write_all(&[0x00, 0xea, 0x60, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();

    let relay = slow_start_relay(server.grpc_addr().to_owned(), Duration::from_millis(1500)).await;
    let relay = format!("http://{relay}");
    let (preface_closed, huge_closed, slow) = tokio::join!(
        closed_after(preface_only, Duration::from_secs(20)),
        closed_after(huge, Duration::from_secs(20)),
        cli_status(&relay, &[]),
    );
    let preface_closed = preface_closed.expect("the preface-only socket is still open after 20 s");
    assert!(
        preface_closed >= Duration::from_secs(2),
        "the preface-only socket was closed after {preface_closed:?}, before the 4 s deadline"
    );
    let huge_closed = huge_closed.expect("the socket with a huge SETTINGS frame is still open");
    assert!(
        huge_closed < Duration::from_secs(3),
        "a SETTINGS frame the server will not buffer is refused as it is announced, not at the deadline ({huge_closed:?})"
    );
    eprintln!(
        "preface without SETTINGS closed after {preface_closed:?}; a 60,000-byte SETTINGS frame refused after {huge_closed:?}; slow: {slow:?}"
    );
    let took = slow.expect("a client whose preface comes slowly within the deadline is served");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}

/// Reads one HTTP/1.1 response with a `content-length`: its status and body.
async fn read_response(stream: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]).into_owned();
                return Ok((status, body));
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Sends `head` one byte every 200 ms, until the server closes the connection.
async fn trickle(mut writer: tokio::net::tcp::OwnedWriteHalf, head: &'static [u8]) {
    for b in head.iter().cycle() {
        if writer.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The HTTP listener under `--handshake-timeout-secs 2`: headers that trickle in (slowloris)
/// are cut off, on a new connection and for the second request of a keep-alive one; an idle
/// keep-alive connection is closed; headers above the bound get 431. Honest clients, slow
/// within the deadline or pausing between requests for less than it, are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed_on_the_http_listener() {
    let server = super::server()
        .args(["--max-connections", "16", "--handshake-timeout-secs", "2"])
        .start();
    let addr = server.metrics_addr().to_owned();
    const BOUND: Duration = Duration::from_secs(20);

    // Slowloris on a new connection: the request line, then a header byte by byte.
    let slowloris = async {
        let stream = TcpStream::connect(&addr).await.unwrap();
        let (reader, mut writer) = stream.into_split();
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: deriva\r\n")
            .await
            .unwrap();
        let writing = tokio::spawn(trickle(writer, b"X-Slow: abcdefgh"));
        let closed = closed_after(reader, BOUND).await;
        writing.abort();
        closed
    };
    // Idle after one request on a keep-alive connection.
    let idle = async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: deriva\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = read_response(&mut stream).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        closed_after(stream, BOUND).await
    };
    // Slowloris on the second request of a keep-alive connection.
    let second = async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: deriva\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.unwrap().0, 200);
        let (reader, mut writer) = stream.into_split();
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let writing = tokio::spawn(trickle(writer, b"Host: deriva"));
        let closed = closed_after(reader, BOUND).await;
        writing.abort();
        closed
    };
    // Slow but within the deadline: the request in three parts over 1.2 s.
    let honest = async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        for part in [
            &b"GET /healthz HTTP/1.1\r\n"[..],
            b"Host: deriva\r\n",
            b"\r\n",
        ] {
            stream.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let first = read_response(&mut stream).await.unwrap();
        // A pause shorter than the idle timeout, and a second request on the same connection.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: deriva\r\n\r\n")
            .await
            .unwrap();
        (first, read_response(&mut stream).await.unwrap())
    };
    // Headers above the bound the server buffers.
    let too_large = async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let filler = "a".repeat(20 * 1024);
        let request =
            format!("GET /healthz HTTP/1.1\r\nHost: deriva\r\nX-Filler: {filler}\r\n\r\n");
        // The server may close before it has read all of it.
        let _ = stream.write_all(request.as_bytes()).await;
        read_response(&mut stream).await
    };
    let (slowloris, idle, second, honest, too_large) =
        tokio::join!(slowloris, idle, second, honest, too_large);

    eprintln!(
        "closed after: slowloris {slowloris:?}, idle keep-alive {idle:?}, slow second request {second:?}; headers above 16 KiB: {:?}",
        too_large.as_ref().map(|r| r.0)
    );
    let slowloris = slowloris.expect("trickling headers kept the connection open");
    assert!(
        slowloris >= Duration::from_secs(1) && slowloris < Duration::from_secs(10),
        "trickling headers cut off after {slowloris:?} (deadline 2 s)"
    );
    let idle = idle.expect("an idle keep-alive connection was never closed");
    assert!(
        idle >= Duration::from_secs(1) && idle < Duration::from_secs(10),
        "idle keep-alive connection closed after {idle:?} (timeout 2 s)"
    );
    let second = second.expect("a trickling second request kept the connection open");
    assert!(
        second < Duration::from_secs(10),
        "a trickling second request was cut off after {second:?} (timeout 2 s)"
    );
    let ((s1, b1), (s2, b2)) = honest;
    assert_eq!(
        (s1, b1.as_str(), s2, b2.as_str()),
        (200, "ok\n", 200, "ok\n")
    );
    let (status, _) = too_large.expect("an answer to headers above 16 KiB");
    assert_eq!(status, 431, "headers above 16 KiB");
    // The listener still serves.
    let r = deriva_testkit::http_get(&addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
}
