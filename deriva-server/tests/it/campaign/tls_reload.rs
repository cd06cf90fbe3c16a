//! Mutual TLS on the HTTP listener (`/metrics` and `/debug` refused without a client
//! certificate, opened by one or by an admin token; the probes open), SIGHUP as a reload (a
//! server without TLS survives it; tokens and the client CA are read again; a broken file keeps
//! what was in use, and says so; `deriva_config_reloads_total` counts), file modes (a token or
//! key file other users may write is refused, one they may read warns), and the warning of a
//! server whose pages are open beyond loopback.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deriva_server::proto::StatusRequest;
use deriva_server::proto::deriva_client::DerivaClient;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use deriva_testkit::ca::Ca;
use deriva_testkit::process::ServerProcess;
use deriva_testkit::{Files, sample, token_lines};

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// A server certificate, its key (mode 0600) and the CA's PEM.
struct ServerTls {
    ca: Ca,
    cert: PathBuf,
    key: PathBuf,
}

impl ServerTls {
    fn new(files: &Files) -> Self {
        let ca = Ca::new("deriva server CA");
        let (cert, key, _) = ca.issue(&["localhost", "127.0.0.1"], false);
        Self {
            cert: files.write_mode("server.pem", &cert, 0o644),
            key: files.write_mode("server.key", &key, 0o600),
            ca,
        }
    }

    fn args(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            arg(&self.cert),
            "--tls-key".into(),
            arg(&self.key),
        ]
    }
}

/// `GET path` over TLS to `addr`, trusting `ca`, with a client certificate and a bearer token
/// if given: the status and the body, or the error (a refused handshake among them).
async fn https_get(
    addr: &str,
    ca: &str,
    identity: Option<&(String, String)>,
    token: Option<&str>,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tls.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{authorization}\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    // A refused client certificate (TLS 1.3) shows as an alert on the first read.
    let read = tls.read_to_end(&mut raw).await;
    if raw.is_empty() {
        read?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// A gRPC channel over TLS to `server`, trusting `ca`, with a client identity if given.
async fn tls_channel(
    server: &ServerProcess,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(server.url().replacen("http://", "https://", 1))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A Status call on `channel` with a bearer token if given.
async fn status(channel: &Channel, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(StatusRequest {});
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    DerivaClient::new(channel.clone())
        .status(request)
        .await
        .map(drop)
}

/// Whether a new TLS connection with `identity` gets a Status answered.
async fn served(server: &ServerProcess, ca: &str, identity: Option<&(String, String)>) -> bool {
    match tls_channel(server, ca, identity).await {
        Err(_) => false,
        Ok(channel) => status(&channel, None).await.is_ok(),
    }
}

/// The value of `series` in `exposition`.
fn reloads(part: &str, result: &str) -> String {
    format!(r#"deriva_config_reloads_total{{part="{part}",result="{result}"}}"#)
}

/// Mutual TLS and no tokens: `/metrics` and `/debug/*` answer 403 to a client without a
/// certificate, and serve one with a certificate from the client CA; `/healthz` and `/readyz`
/// stay open, and `/health` shows counts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_protects_metrics_and_debug() {
    let files = Files::new();
    let tls = ServerTls::new(&files);
    let clients = Ca::new("client CA");
    let strangers = Ca::new("stranger CA");
    let server = super::server()
        .args(tls.args())
        .args([
            "--tls-client-ca".into(),
            arg(&files.write_mode("clients.pem", &clients.pem, 0o644)),
        ])
        .start();
    let addr = server.metrics_addr();
    let ca = &tls.ca.pem;
    let (cert, key, _) = clients.issue(&["ci"], true);
    let good = (cert, key);
    let (cert, key, _) = strangers.issue(&["intruder"], true);
    let stranger = (cert, key);

    for path in ["/metrics", "/debug", "/debug/traces"] {
        let (status, body) = https_get(addr, ca, None, None, path).await.unwrap();
        assert_eq!(status, 403, "{path} without a client certificate: {body}");
        assert!(
            body.contains("client certificate") && body.contains("--tls-client-ca"),
            "{body}"
        );
        // Refused in the handshake (a certificate presented must verify).
        let strange = https_get(addr, ca, Some(&stranger), None, path).await;
        assert!(
            strange.is_err(),
            "{path} with a certificate from another CA: {strange:?}"
        );
        let (status, body) = https_get(addr, ca, Some(&good), None, path).await.unwrap();
        assert_eq!(status, 200, "{path} with a client certificate: {body}");
    }
    let (_, body) = https_get(addr, ca, Some(&good), None, "/metrics")
        .await
        .unwrap();
    assert!(body.contains("# TYPE deriva_rpc_total"), "{body}");
    for path in ["/healthz", "/readyz"] {
        let (status, body) = https_get(addr, ca, None, None, path).await.unwrap();
        assert_eq!(status, 200, "{path} stays open: {body}");
    }
    let (status, body) = https_get(addr, ca, None, None, "/health").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health.get("store").is_none(),
        "/health shows counts only: {body}"
    );
    // gRPC still requires the certificate.
    assert!(!served(&server, ca, None).await);
    assert!(served(&server, ca, Some(&good)).await);
}

/// Mutual TLS and tokens: an admin token alone opens the pages, as does a client certificate
/// alone; neither gets 401 (a token would do), a token without the scope 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_too_an_admin_token_or_a_certificate_opens_the_pages() {
    let files = Files::new();
    let tls = ServerTls::new(&files);
    let clients = Ca::new("client CA");
    let tokens = files.write_mode(
        "tokens",
        &token_lines(&[
            ("deriva_admin_t1", "admin", "operator"),
            ("deriva_read_t2", "read", "reader"),
        ]),
        0o600,
    );
    let server = super::server()
        .args(tls.args())
        .args([
            "--tls-client-ca".into(),
            arg(&files.write_mode("clients.pem", &clients.pem, 0o644)),
        ])
        .args(["--auth-tokens".into(), arg(&tokens)])
        .start();
    let (addr, ca) = (server.metrics_addr(), &tls.ca.pem);
    let (cert, key, _) = clients.issue(&["ci"], true);
    let good = (cert, key);
    for path in ["/metrics", "/debug/traces"] {
        let (status, body) = https_get(addr, ca, None, None, path).await.unwrap();
        assert_eq!(status, 401, "{path}, neither: {body}");
        assert!(
            body.contains("admin") && body.contains("client certificate"),
            "{body}"
        );
        let (status, body) = https_get(addr, ca, None, Some("deriva_read_t2"), path)
            .await
            .unwrap();
        assert_eq!(status, 403, "{path}, a read token: {body}");
        let (status, body) = https_get(addr, ca, None, Some("deriva_admin_t1"), path)
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}, an admin token alone: {body}");
        let (status, body) = https_get(addr, ca, Some(&good), None, path).await.unwrap();
        assert_eq!(status, 200, "{path}, a client certificate alone: {body}");
    }
    let (status, _) = https_get(addr, ca, None, None, "/healthz").await.unwrap();
    assert_eq!(status, 200);
}

/// SIGHUP on a server without TLS or tokens: it says there is nothing to reload, keeps
/// serving on the connections it had and on new ones, and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_kill_a_server_without_tls() {
    let mut server = super::server().start();
    let mut client = server.client().await;
    client.status(StatusRequest {}).await.unwrap();
    for _ in 0..3 {
        server.signal(Signal::HUP);
    }
    server.wait_for_stderr("the SIGHUP line", |l| {
        l.contains("SIGHUP received") && !l.contains("while starting")
    });
    server.wait_for_stderr("the nothing-to-reload line", |l| {
        l.contains("nothing to reload")
    });
    client
        .status(StatusRequest {})
        .await
        .expect("an open connection still serves after SIGHUP");
    server
        .client()
        .await
        .status(StatusRequest {})
        .await
        .expect("a new connection is served after SIGHUP");
    let status = server.stop();
    assert!(status.success(), "{status:?}\n{}", server.stderr());
    assert!(server.stderr().contains("deriva-server stopped"));
}

/// SIGHUP reads the token file again: a removed token is refused from the next request on, on
/// an open connection too, and a new one is accepted. A file that does not parse, and one that
/// others may write, keep the tokens in use, and the log names the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tokens() {
    let files = Files::new();
    let admin = ("deriva_admin_a1", "admin", "operator");
    let tokens = files.write_mode(
        "tokens",
        &token_lines(&[("deriva_old_o1", "read", "old"), admin]),
        0o600,
    );
    let server = super::server()
        .args(["--auth-tokens".into(), arg(&tokens)])
        .start();
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    status(&channel, Some("deriva_old_o1")).await.unwrap();
    assert_eq!(
        status(&channel, Some("deriva_new_n1"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let scrape = || async {
        let r = deriva_testkit::http::http_get_with(
            server.metrics_addr(),
            "/metrics",
            &[("Authorization", "Bearer deriva_admin_a1")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    let before = scrape().await;
    assert_eq!(
        sample(&before, &reloads("tokens", "ok")),
        Some(0.0),
        "{before}"
    );

    // Revoke `old`, add `new`.
    files.write_mode(
        "tokens",
        &token_lines(&[("deriva_new_n1", "read", "new"), admin]),
        0o600,
    );
    server.signal(Signal::HUP);
    server.wait_for_stderr("the token reload line", |l| {
        l.contains("token file reloaded")
    });
    assert_eq!(
        status(&channel, Some("deriva_old_o1"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated,
        "a revoked token, on a connection opened before the reload"
    );
    status(&channel, Some("deriva_new_n1"))
        .await
        .expect("a token added by the reload");
    let after = scrape().await;
    assert_eq!(
        sample(&after, &reloads("tokens", "ok")),
        Some(1.0),
        "{after}"
    );

    // A file that does not parse: the tokens in use stay.
    files.write_mode("tokens", "sha256:not-a-hash read broken\n", 0o600);
    server.signal(Signal::HUP);
    let line = server.wait_for_stderr("the failed token reload line", |l| {
        l.contains("token file not reloaded")
    });
    assert!(
        line.contains(&format!("--auth-tokens {}: line 1", arg(&tokens))),
        "{line}"
    );
    status(&channel, Some("deriva_new_n1"))
        .await
        .expect("the tokens in use stay");

    // A file others may write: refused on reload too.
    files.write_mode(
        "tokens",
        &token_lines(&[("deriva_old_o1", "read", "old"), admin]),
        0o666,
    );
    server.signal(Signal::HUP);
    let line = server.wait_for_stderr("the refused token reload line", |l| {
        l.contains("token file not reloaded") && l.contains("0666")
    });
    assert!(
        line.contains(&format!("--auth-tokens {}: mode 0666", arg(&tokens))),
        "{line}"
    );
    assert_eq!(
        status(&channel, Some("deriva_old_o1"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated,
        "a world-writable file granted nothing"
    );
    let last = scrape().await;
    assert_eq!(sample(&last, &reloads("tokens", "ok")), Some(1.0), "{last}");
    assert_eq!(
        sample(&last, &reloads("tokens", "error")),
        Some(2.0),
        "{last}"
    );
}

/// SIGHUP reads the client CA again: a client certificate from the new CA is served on both
/// listeners, one from the old CA is refused on new connections while an open connection keeps
/// serving; a broken CA file keeps the CA in use, and the log names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_client_ca() {
    let files = Files::new();
    let tls = ServerTls::new(&files);
    let first = Ca::new("first client CA");
    let second = Ca::new("second client CA");
    let client_ca = files.write_mode("clients.pem", &first.pem, 0o644);
    let server = super::server()
        .args(tls.args())
        .args(["--tls-client-ca".into(), arg(&client_ca)])
        .start();
    let ca = &tls.ca.pem;
    let (cert, key, _) = first.issue(&["old-client"], true);
    let old = (cert, key);
    let (cert, key, _) = second.issue(&["new-client"], true);
    let new = (cert, key);
    let open = tls_channel(&server, ca, Some(&old)).await.unwrap();
    status(&open, None).await.unwrap();
    assert!(
        !served(&server, ca, Some(&new)).await,
        "the second CA before the reload"
    );

    files.write_mode("clients.pem", &second.pem, 0o644);
    server.signal(Signal::HUP);
    server.wait_for_stderr("the TLS reload line", |l| {
        l.contains("TLS certificate, key and client CA reloaded")
    });
    assert!(
        served(&server, ca, Some(&new)).await,
        "the second CA after the reload"
    );
    assert!(
        !served(&server, ca, Some(&old)).await,
        "the first CA after the reload"
    );
    status(&open, None)
        .await
        .expect("a connection opened before the reload keeps serving");
    let (code, body) = https_get(server.metrics_addr(), ca, Some(&new), None, "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(sample(&body, &reloads("tls", "ok")), Some(1.0), "{body}");

    std::fs::write(&client_ca, "not a certificate").unwrap();
    server.signal(Signal::HUP);
    let line = server.wait_for_stderr("the failed TLS reload line", |l| {
        l.contains("TLS files not reloaded")
    });
    assert!(
        line.contains(&format!("--tls-client-ca {}", arg(&client_ca))),
        "{line}"
    );
    assert!(served(&server, ca, Some(&new)).await, "the CA in use stays");
    let (_, body) = https_get(server.metrics_addr(), ca, Some(&new), None, "/metrics")
        .await
        .unwrap();
    assert_eq!(sample(&body, &reloads("tls", "error")), Some(1.0), "{body}");
}

/// A token file or key file that other users may write stops the server at start, naming the
/// file and its mode; one they may read gets a warning naming them.
#[test]
fn files_others_may_write_are_refused_and_those_they_may_read_warn() {
    let files = Files::new();
    let tls = ServerTls::new(&files);
    let lines = token_lines(&[("deriva_t", "read", "t")]);

    let tokens = files.write_mode("tokens", &lines, 0o666);
    let exited = super::server()
        .args(["--auth-tokens".into(), arg(&tokens)])
        .run_to_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains(&arg(&tokens)) && exited.stderr.contains("mode 0666"),
        "{}",
        exited.stderr
    );

    let key = files.write_mode(
        "open.key",
        &std::fs::read_to_string(&tls.key).unwrap(),
        0o666,
    );
    let exited = super::server()
        .args([
            "--tls-cert".into(),
            arg(&tls.cert),
            "--tls-key".into(),
            arg(&key),
        ])
        .run_to_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains(&arg(&key)) && exited.stderr.contains("mode 0666"),
        "{}",
        exited.stderr
    );

    let tokens = files.write_mode("tokens", &lines, 0o644);
    let key = files.write_mode(
        "open.key",
        &std::fs::read_to_string(&tls.key).unwrap(),
        0o644,
    );
    let server = super::server()
        .args(["--auth-tokens".into(), arg(&tokens)])
        .args([
            "--tls-cert".into(),
            arg(&tls.cert),
            "--tls-key".into(),
            arg(&key),
        ])
        .start();
    for file in [&tokens, &key] {
        let line = server.wait_for_stderr("the readable-file warning", |l| {
            l.contains("WARN") && l.contains(&arg(file)) && l.contains("read")
        });
        assert!(line.contains("0644"), "{line}");
    }
}

/// Bound beyond loopback with neither tokens nor a client CA, the server warns at start that
/// its pages are open, naming them; with tokens, it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_pages_beyond_loopback_are_announced() {
    let open = super::server()
        .without_listener_flags()
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "0.0.0.0:0"])
        .start();
    let line = open.wait_for_stderr("the open-pages warning", |l| {
        l.contains("WARN") && l.contains("beyond loopback")
    });
    assert!(
        line.contains("/metrics") && line.contains("/debug"),
        "{line}"
    );

    let files = Files::new();
    let tokens = files.write_mode("tokens", &token_lines(&[("deriva_t", "admin", "t")]), 0o600);
    let guarded = super::server()
        .without_listener_flags()
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "0.0.0.0:0"])
        .args(["--auth-tokens".into(), arg(&tokens)])
        .start();
    let port = guarded
        .metrics_addr()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let r = deriva_testkit::http_get(&format!("127.0.0.1:{port}"), "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A line logged after serving began: everything logged before it has been read.
    guarded.signal(Signal::HUP);
    guarded.wait_for_stderr("the reload line", |l| l.contains("token file reloaded"));
    assert!(
        !guarded.stderr().contains("beyond loopback"),
        "{}",
        guarded.stderr()
    );
}
