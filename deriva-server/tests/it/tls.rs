//! TLS against the real binary, with certificates made here (`rcgen`): both listeners over TLS;
//! a plaintext client and a client that trusts another CA refused; mutual TLS refusing a client
//! without a certificate or with an unknown one (the HTTP listener's pages under mutual TLS are
//! in `tests/it/campaign/tls_reload.rs`); SIGHUP swapping the certificate for new
//! connections while open ones keep serving; the CLI over https with `--tls-ca` and a client
//! certificate; bad TLS flags stopping the server with a clear message; a node reaching both
//! remote backends over TLS (`AWS_CA_BUNDLE`, `sslmode=verify-full`), and refusing to start
//! when it cannot trust them.

use std::path::Path;

use deriva_server::proto::StatusRequest;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_testkit::ca::Ca;
use deriva_testkit::{Files, ServerProcess, deriva_bin};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn arg(p: &Path) -> String {
    p.display().to_string()
}

fn https(server: &ServerProcess) -> String {
    server.url().replacen("http://", "https://", 1)
}

/// A gRPC channel over TLS to `server`, trusting `ca`, with an optional client identity.
async fn tls_channel(
    server: &ServerProcess,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(https(server))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A Status call over `channel`: whether it answered.
async fn status(channel: Channel) -> Result<(), tonic::Status> {
    DerivaClient::new(channel)
        .status(StatusRequest {})
        .await
        .map(drop)
}

/// Whether a TLS client trusting `ca` gets through the handshake with `addr`, and the
/// certificate the server presented.
async fn handshake(addr: &str, ca: &str) -> std::io::Result<(CertificateDer<'static>, String)> {
    let connector = deriva_testkit::ca::tls_connector(ca);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tls.read_to_string(&mut body).await.ok();
    Ok((presented, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_serve_tls_and_sighup_swaps_the_certificate() {
    let ca = Ca::new("deriva test CA");
    let other = Ca::new("another CA");
    let files = Files::new();
    let (cert, key, first_der) = ca.issue(&["localhost", "127.0.0.1"], false);
    let cert_path = files.write("server.pem", &cert);
    let key_path = files.write("server.key", &key);
    let server = ServerProcess::options()
        .args([
            "--tls-cert".into(),
            arg(&cert_path),
            "--tls-key".into(),
            arg(&key_path),
        ])
        .start();
    assert!(server.stderr().contains("tls=on"), "{}", server.stderr());

    // A client that trusts the CA is served.
    let open = tls_channel(&server, &ca.pem, None).await.unwrap();
    status(open.clone()).await.unwrap();

    // A plaintext client is refused.
    let plain = Channel::from_shared(server.url()).unwrap().connect().await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(refused, "a plaintext client was served");

    // A client that trusts another CA is refused.
    let wrong = tls_channel(&server, &other.pem, None).await;
    let refused = match wrong {
        Err(_) => true,
        Ok(channel) => status(channel).await.is_err(),
    };
    assert!(refused, "a client trusting another CA was served");

    // The HTTP listener speaks TLS too, and nothing else.
    let (presented, body) = handshake(server.metrics_addr(), &ca.pem).await.unwrap();
    assert_eq!(presented.as_ref(), first_der.as_slice());
    assert!(
        body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"),
        "{body}"
    );
    let plain_http = deriva_testkit::http_get(server.metrics_addr(), "/healthz").await;
    assert!(
        plain_http.map_or(true, |r| r.status != 200),
        "plaintext HTTP was served"
    );

    // SIGHUP: new connections get the new certificate; the open one keeps serving.
    let (cert2, key2, second_der) = ca.issue(&["localhost", "127.0.0.1"], false);
    std::fs::write(&cert_path, &cert2).unwrap();
    std::fs::write(&key_path, &key2).unwrap();
    server.signal(rustix::process::Signal::HUP);
    server.wait_for_stderr("the reload line", |l| {
        l.contains("TLS certificate, key and client CA reloaded")
    });
    let (presented, _) = handshake(server.metrics_addr(), &ca.pem).await.unwrap();
    assert_eq!(
        presented.as_ref(),
        second_der.as_slice(),
        "HTTP, after SIGHUP"
    );
    let (presented, _) = handshake(server.grpc_addr(), &ca.pem).await.unwrap();
    assert_eq!(
        presented.as_ref(),
        second_der.as_slice(),
        "gRPC, after SIGHUP"
    );
    status(open)
        .await
        .expect("the connection opened before SIGHUP still serves");
    status(tls_channel(&server, &ca.pem, None).await.unwrap())
        .await
        .unwrap();

    // A SIGHUP with a broken key keeps the previous certificate, and says so.
    std::fs::write(&key_path, "not a key").unwrap();
    server.signal(rustix::process::Signal::HUP);
    server.wait_for_stderr("the failed reload line", |l| {
        l.contains("TLS files not reloaded") && l.contains("server.key")
    });
    let (presented, _) = handshake(server.grpc_addr(), &ca.pem).await.unwrap();
    assert_eq!(presented.as_ref(), second_der.as_slice());

    // The CLI over https, trusting the CA.
    let out = std::process::Command::new(deriva_bin())
        .args([
            "--server",
            &https(&server),
            "--tls-ca",
            &arg(&files.write("ca.pem", &ca.pem)),
            "status",
        ])
        .env_remove("DERIVA_SERVER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new(deriva_bin())
        .args([
            "--server",
            &https(&server),
            "--tls-ca",
            &arg(&files.write("other.pem", &other.pem)),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_known_certificate() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let strangers = Ca::new("stranger CA");
    let files = Files::new();
    let (cert, key, _) = ca.issue(&["localhost", "127.0.0.1"], false);
    let server = ServerProcess::options()
        .args([
            "--tls-cert".into(),
            arg(&files.write("server.pem", &cert)),
            "--tls-key".into(),
            arg(&files.write("server.key", &key)),
            "--tls-client-ca".into(),
            arg(&files.write("clients.pem", &clients.pem)),
        ])
        .start();
    let (good_cert, good_key, _) = clients.issue(&["ci-client"], true);
    let (bad_cert, bad_key, _) = strangers.issue(&["intruder"], true);

    // Whether a Status call got its answer. A refused client's call can also wait forever:
    // the client library, its connection gone in the middle of the handshake, sometimes never
    // settles the call (seen once in CI: no socket, no timer, the test waiting). Nothing came
    // back, so it was not served; a generous bound keeps the test from waiting with it.
    async fn served(server: &ServerProcess, ca: &str, identity: Option<(&str, &str)>) -> bool {
        let call = async {
            match tls_channel(server, ca, identity).await {
                Err(_) => false,
                Ok(channel) => status(channel).await.is_ok(),
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), call)
            .await
            .unwrap_or(false)
    }
    assert!(
        !served(&server, &ca.pem, None).await,
        "a client without a certificate was served"
    );
    assert!(
        !served(&server, &ca.pem, Some((&bad_cert, &bad_key))).await,
        "a client with an unknown certificate was served"
    );
    assert!(served(&server, &ca.pem, Some((&good_cert, &good_key))).await);

    // The CLI with its certificate. Each run is bounded: `None` is a CLI still waiting after
    // 60 s, killed (by its own handle).
    let ca_file = arg(&files.write("ca.pem", &ca.pem));
    let cli = |cert: String, key: String| {
        let mut cmd = tokio::process::Command::new(deriva_bin());
        cmd.args(["--server", &https(&server), "--tls-ca", &ca_file])
            .args(["--tls-cert", &cert, "--tls-key", &key, "status"])
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
                .await
                .ok()
                .map(Result::unwrap)
        }
    };
    let ok = cli(
        arg(&files.write("c.pem", &good_cert)),
        arg(&files.write("c.key", &good_key)),
    )
    .await
    .expect("the CLI with a known certificate answered within 60 s");
    assert!(ok.status.success(), "{ok:?}");
    // Refused: exit 1. Rarely (about one run in 40 under load), the client library waits
    // forever instead, its connection closed by the refusal after a TLS 1.3 handshake it took
    // for done (a bug of the CLI, noted in issue 34's closing note). It got nothing either way,
    // which is what this test is about.
    let refused = cli(
        arg(&files.write("b.pem", &bad_cert)),
        arg(&files.write("b.key", &bad_key)),
    )
    .await;
    if let Some(refused) = refused {
        assert_eq!(refused.status.code(), Some(1), "{refused:?}");
        assert!(refused.stdout.is_empty(), "{refused:?}");
    }

    // The HTTP listener asks for a client certificate but requires none: probes need none.
    let (_, body) = handshake(server.metrics_addr(), &ca.pem).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

#[test]
fn bad_tls_flags_stop_the_server_with_a_clear_message() {
    let ca = Ca::new("CA");
    let files = Files::new();
    let (cert, _, _) = ca.issue(&["localhost"], false);
    let (_, other_key, _) = ca.issue(&["localhost"], false);
    let cert = arg(&files.write("server.pem", &cert));
    let other_key = arg(&files.write("other.key", &other_key));
    for (args, want) in [
        (
            vec!["--tls-cert", cert.as_str()],
            "--tls-cert needs --tls-key",
        ),
        (
            vec!["--tls-client-ca", cert.as_str()],
            "--tls-client-ca needs --tls-cert",
        ),
        (
            vec!["--tls-cert", cert.as_str(), "--tls-key", other_key.as_str()],
            "does not belong to the certificate",
        ),
        (
            vec![
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                other_key.as_str(),
            ],
            "/nonexistent/cert.pem",
        ),
    ] {
        let exited = ServerProcess::options().args(args.clone()).run_to_exit();
        assert!(!exited.status.success(), "{args:?}");
        assert!(exited.stderr.contains(want), "{args:?}: {}", exited.stderr);
    }
}

/// A node on the remote backends, both over TLS: S3 over https with the test CA in
/// `AWS_CA_BUNDLE`, PostgreSQL with `sslmode=verify-full` (the services' certificates are
/// signed by `deriva-testkit/backends.sh`'s test CA). A node that cannot trust them does not start,
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_both_backends_over_tls() {
    let services = deriva_testkit::backends::shared();
    let space = deriva_testkit::backends::Space::new("tls");
    let ca = arg(&services.tls_ca());
    let index = |host: &str, root: &str| {
        format!(
            "postgres://deriva@{host}:{}/deriva?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={root}",
            services.pg_port()
        )
    };
    let node = |index: String, bundle: &str| {
        let mut options = ServerProcess::options().args([
            "--blob-store".to_owned(),
            format!("s3://{}/{}", services.bucket(), space.prefix),
            "--index".to_owned(),
            index,
            "--index-schema".to_owned(),
            space.schema.clone(),
        ]);
        for (key, value) in services.aws_env() {
            if key != "AWS_ENDPOINT_URL" {
                options = options.env(key, value);
            }
        }
        options
            .env("AWS_ENDPOINT_URL", services.s3_https_endpoint())
            .env("AWS_CA_BUNDLE", bundle)
    };

    let server = node(index("localhost", &ca), &ca).start();
    let mut client = server.client().await;
    let leaf = deriva_testkit::put_leaf(&mut client, b"stored over TLS").await;
    let upper = deriva_testkit::put_recipe(&mut client, "uppercase", &[&leaf], &[]).await;
    assert_eq!(
        deriva_testkit::get_all(&mut client, &upper).await.unwrap(),
        b"STORED OVER TLS"
    );
    assert!(services.object_exists(&format!(
        "{}/leaves/{}",
        space.prefix,
        deriva_testkit::hex(&leaf)
    )));
    drop(server);

    let other = Ca::new("another CA");
    let files = Files::new();
    let other = arg(&files.write("other-ca.pem", &other.pem));
    for (index, bundle, want) in [
        (
            index("deriva-other-host", &ca),
            ca.as_str(),
            "certificate not valid for name \"deriva-other-host\"",
        ),
        (index("localhost", &other), ca.as_str(), "UnknownIssuer"),
        (
            index("localhost", &ca),
            "/nonexistent/ca.pem",
            "AWS_CA_BUNDLE=/nonexistent/ca.pem",
        ),
    ] {
        let exited = node(index.clone(), bundle).run_to_exit();
        assert!(!exited.status.success(), "{index} {bundle}");
        assert!(
            exited.stderr.contains(want),
            "{index} {bundle}: {}",
            exited.stderr
        );
    }
}
