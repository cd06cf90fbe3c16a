//! `--auth-tokens` against the real binary: the token matrix (no token, an unknown or
//! malformed one, and each scope against each RPC), the HTTP listener's admin guard, the
//! failure counts, tokens made by `deriva token new`, that no token string leaks into logs,
//! spans, `/debug` or metrics, and that a bad token file stops the server with the line named.

use std::collections::HashMap;

use bytes::Bytes;
use deriva_server::method::RpcMethod;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{
    CascadeInvalidateRequest, ClusterStatusRequest, ExplainRequest, GcRequest, GetRequest,
    InvalidateRequest, ListPinsRequest, PinRequest, PutLeafRequest, PutLeafStreamRequest,
    PutRecipeRequest, ResolveRequest, StatusRequest, UnpinRequest, VerifyRequest,
};
use deriva_testkit::http::http_get_with;
use deriva_testkit::{ServerProcess, deriva_bin, sample};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Tokens and the scopes of their entries.
const TOKENS: [(&str, &str, &str); 4] = [
    ("deriva_reader_secret_1f2e", "read", "reader"),
    ("deriva_writer_secret_3d4c", "write", "writer"),
    ("deriva_admin_secret_5b6a", "admin", "operator"),
    ("deriva_ci_secret_7980", "read,write", "ci"),
];

/// The token file of [`TOKENS`], with a comment line (skipped) first.
fn token_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    let text = format!("# test tokens\n{}", deriva_testkit::token_lines(&TOKENS));
    std::fs::write(&path, text).unwrap();
    path
}

fn start(dir: &std::path::Path) -> ServerProcess {
    let file = token_file(dir);
    ServerProcess::options()
        .args(["--auth-tokens".into(), file.display().to_string()])
        .start()
}

/// One call of `method` with `authorization` (if any): its status code (OK included).
async fn call(
    client: &mut DerivaClient<Channel>,
    method: RpcMethod,
    authorization: Option<&str>,
) -> Code {
    fn req<T>(msg: T, authorization: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(a) = authorization {
            r.metadata_mut()
                .insert("authorization", MetadataValue::try_from(a).unwrap());
        }
        r
    }
    let addr = Bytes::from(vec![0xab; 32]);
    let a = authorization;
    let result: Result<(), tonic::Status> = match method {
        RpcMethod::PutLeaf => client
            .put_leaf(req(
                PutLeafRequest {
                    data: Bytes::from_static(b"x"),
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::PutRecipe => client
            .put_recipe(req(
                PutRecipeRequest {
                    function_name: "identity".into(),
                    function_version: "v1".into(),
                    inputs: vec![addr.clone()],
                    params: HashMap::new(),
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::Get => match client.get(req(GetRequest { addr }, a)).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            }
            Err(e) => Err(e),
        },
        RpcMethod::Resolve => client
            .resolve(req(ResolveRequest { addr }, a))
            .await
            .map(drop),
        RpcMethod::Invalidate => client
            .invalidate(req(
                InvalidateRequest {
                    addr,
                    cascade: false,
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::Status => client.status(req(StatusRequest {}, a)).await.map(drop),
        RpcMethod::Provenance => client
            .provenance(req(
                deriva_server::proto::ProvenanceRequest { addr, depth: 1 },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::Verify => client
            .verify(req(VerifyRequest { addr }, a))
            .await
            .map(drop),
        RpcMethod::Explain => client
            .explain(req(
                ExplainRequest {
                    trace_id: "0".repeat(32),
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::PutLeafStream => {
            let chunks = futures::stream::iter([PutLeafStreamRequest {
                chunk: Bytes::from_static(b"streamed"),
            }]);
            client.put_leaf_stream(req(chunks, a)).await.map(drop)
        }
        RpcMethod::CascadeInvalidate => client
            .cascade_invalidate(req(
                CascadeInvalidateRequest {
                    addr,
                    policy: "dry_run".into(),
                    include_root: true,
                    detail_addrs: false,
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::GarbageCollect => client
            .garbage_collect(req(
                GcRequest {
                    grace_period_secs: 3600,
                    dry_run: true,
                    ..Default::default()
                },
                a,
            ))
            .await
            .map(drop),
        RpcMethod::Pin => client.pin(req(PinRequest { addr }, a)).await.map(drop),
        RpcMethod::Unpin => client.unpin(req(UnpinRequest { addr }, a)).await.map(drop),
        RpcMethod::ListPins => client.list_pins(req(ListPinsRequest {}, a)).await.map(drop),
        RpcMethod::ClusterStatus => client
            .cluster_status(req(ClusterStatusRequest {}, a))
            .await
            .map(drop),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => {
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ) {
                // Names the scope needed, never a token or an entry's name.
                let message = status.message();
                assert!(
                    message.contains(method.scope().as_str()),
                    "{method:?}: {message}"
                );
                for (token, _, name) in TOKENS {
                    assert!(
                        !message.contains(token) && !message.contains(name),
                        "{method:?}: {message}"
                    );
                }
            }
            status.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_a_token_with_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut client = server.client().await;
    let mut refused = HashMap::<&str, u64>::new();
    for method in RpcMethod::ALL {
        let needed = method.scope().as_str();
        for (authorization, expected, reason) in [
            (None, Code::Unauthenticated, "missing"),
            (
                Some("Bearer deriva_not_a_known_token"),
                Code::Unauthenticated,
                "unknown",
            ),
            (
                Some("Basic cmVhZGVyOnNlY3JldA=="),
                Code::Unauthenticated,
                "malformed",
            ),
        ] {
            let code = call(&mut client, method, authorization).await;
            assert_eq!(code, expected, "{method:?} with {authorization:?}");
            *refused.entry(reason).or_default() += 1;
        }
        for (token, scopes, _) in TOKENS {
            let bearer = format!("Bearer {token}");
            let code = call(&mut client, method, Some(&bearer)).await;
            if scopes.split(',').any(|s| s == needed) {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{method:?} with a {scopes} token: {code:?}"
                );
            } else {
                assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{method:?} with a {scopes} token"
                );
                *refused.entry("scope").or_default() += 1;
            }
        }
    }
    // The gRPC health service stays open, for probes.
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    // /metrics and /debug need admin; the probes stay open, /health without paths.
    let http = server.metrics_addr();
    let admin = format!("Bearer {}", TOKENS[2].0);
    let reader = format!("Bearer {}", TOKENS[0].0);
    let guarded = ["/metrics", "/debug", "/debug/traces"];
    for path in guarded {
        let none = http_get_with(http, path, &[]).await.unwrap();
        assert_eq!(none.status, 401, "{path}: {}", none.body);
        assert!(
            none.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer"))
        );
        assert!(none.body.contains("admin"), "{}", none.body);
        let read = http_get_with(http, path, &[("authorization", &reader)])
            .await
            .unwrap();
        assert_eq!(read.status, 403, "{path}: {}", read.body);
        let ok = http_get_with(http, path, &[("authorization", &admin)])
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "{path}: {}", ok.body);
    }
    *refused.entry("missing").or_default() += guarded.len() as u64;
    *refused.entry("scope").or_default() += guarded.len() as u64;
    for path in ["/healthz", "/readyz", "/health"] {
        let open = http_get_with(http, path, &[]).await.unwrap();
        assert_eq!(open.status, 200, "{path}: {}", open.body);
    }
    let health = http_get_with(http, "/health", &[]).await.unwrap();
    assert!(
        !health.body.contains(&server.dir().display().to_string())
            && !health.body.contains("store"),
        "/health shows counts only: {}",
        health.body
    );

    let metrics = http_get_with(http, "/metrics", &[("authorization", &admin)])
        .await
        .unwrap()
        .body;
    for (reason, n) in &refused {
        assert_eq!(
            sample(
                &metrics,
                &format!(r#"deriva_auth_failures_total{{reason="{reason}"}}"#)
            ),
            Some(*n as f64),
            "{reason}"
        );
    }

    // The callers' names are in the spans and log lines; no token string is anywhere.
    let traces = http_get_with(http, "/debug/traces", &[("authorization", &admin)])
        .await
        .unwrap()
        .body;
    let logs = server.stderr();
    assert!(
        logs.lines()
            .any(|l| l.contains("auth.name=ci") && l.contains("rpc failed")),
        "no log line names the caller:\n{logs}"
    );
    for (token, _, _) in TOKENS {
        let hash = deriva_util::token::hashed(token);
        for (what, text) in [
            ("logs", &logs),
            ("/debug/traces", &traces),
            ("/metrics", &metrics),
        ] {
            assert!(!text.contains(token), "a token in {what}");
            assert!(!text.contains(&hash[7..]), "a token hash in {what}");
        }
    }
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&traces).unwrap()["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["trace_id"].as_str().map(str::to_owned))
        .collect();
    let mut named = false;
    for id in ids {
        let tree = http_get_with(
            http,
            &format!("/debug/traces/{id}"),
            &[("authorization", &admin)],
        )
        .await
        .unwrap()
        .body;
        for (token, _, _) in TOKENS {
            assert!(!tree.contains(token), "a token in /debug/traces/{id}");
        }
        named |= tree.contains("auth.name");
    }
    assert!(named, "no span carries auth.name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_tokens_and_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new(deriva_bin())
        .args([
            "token",
            "new",
            "--scopes",
            "read,write",
            "--name",
            "cli-test",
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let out = String::from_utf8(made.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let token = lines[0];
    assert!(token.starts_with("deriva_") && token.len() == 71, "{token}");
    assert_eq!(
        lines[1],
        format!("{} read,write cli-test", deriva_util::token::hashed(token))
    );
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{}\n", lines[1])).unwrap();
    let server = ServerProcess::options()
        .args(["--auth-tokens".into(), file.display().to_string()])
        .start();
    let deriva = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(deriva_bin());
        cmd.args(["--server", &server.url()]).args(args);
        cmd.env_remove("DERIVA_TOKEN");
        if let Some(token) = token {
            cmd.env("DERIVA_TOKEN", token);
        }
        cmd.output().unwrap()
    };
    let leaf = dir.path().join("leaf");
    std::fs::write(&leaf, b"with a token").unwrap();
    let refused = deriva(&["put", leaf.to_str().unwrap()], None);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("unauthenticated") && err.contains("write"),
        "{err}"
    );
    let put = deriva(&["put", leaf.to_str().unwrap()], Some(token));
    assert!(put.status.success(), "{put:?}");
    let addr = String::from_utf8(put.stdout).unwrap().trim().to_owned();
    let got = deriva(&["get", &addr], Some(token));
    assert_eq!(got.stdout, b"with a token");
    let gc = deriva(&["gc", "--dry-run"], Some(token));
    assert_eq!(gc.status.code(), Some(1));
    let err = String::from_utf8_lossy(&gc.stderr);
    assert!(
        err.contains("permission denied") && err.contains("admin"),
        "{err}"
    );
    // --token as a flag works too, and a bad scope list is a usage error.
    let status = std::process::Command::new(deriva_bin())
        .args(["--server", &server.url(), "--token", token, "status"])
        .env_remove("DERIVA_TOKEN")
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let bad = std::process::Command::new(deriva_bin())
        .args(["token", "new", "--scopes", "read,root", "--name", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope \"root\""));
}

#[test]
fn a_bad_token_file_stops_the_server_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!(
            "{} read ok\nderiva_plain_token read oops\n",
            deriva_util::token::hashed("t")
        ),
    )
    .unwrap();
    let exited = ServerProcess::options()
        .args(["--auth-tokens".into(), file.display().to_string()])
        .run_to_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("line 2") && exited.stderr.contains("not the token"),
        "{}",
        exited.stderr
    );
    assert!(
        !exited.stderr.contains("deriva_plain_token"),
        "the file's secret is not echoed"
    );
    let missing = ServerProcess::options()
        .args(["--auth-tokens", "/nonexistent/tokens"])
        .run_to_exit();
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("/nonexistent/tokens"),
        "{}",
        missing.stderr
    );
}

/// Open file descriptors of process `pid`.
fn fds(pid: rustix::process::Pid) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", pid.as_raw_nonzero()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 1,000 idle connections against a cap of 200: the server's descriptors stay bounded, the
/// log says the cap was reached, a client connected before keeps being served, and a new
/// client is served once the idle sockets have been closed for sending nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_neither_starve_clients_nor_exhaust_descriptors() {
    // This test process needs more than 1,000 descriptors of its own.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let server = ServerProcess::options()
        .args(["--max-connections", "200", "--handshake-timeout-secs", "2"])
        .start();
    let mut early = server.client().await;
    early.status(StatusRequest {}).await.unwrap();
    let baseline = fds(server.pid());
    let mut idle = Vec::new();
    // More than the listen backlog holds beside the 200 accepted: the later connects wait for
    // the culling of idle ones (their SYNs are retried), so they are made concurrently.
    let connects: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(tokio::net::TcpStream::connect(
                server.grpc_addr().to_owned(),
            ))
        })
        .collect();
    server.wait_for_stderr("the connection limit line", |l| {
        l.contains("connection limit reached")
    });
    let flood = tokio::spawn(async move {
        for c in connects {
            // Each one connects in the end, or times out in the kernel: either way it was tried.
            if let Ok(Ok(stream)) = c.await {
                idle.push(stream);
            }
        }
        idle
    });
    // Under the cap, whatever the flood: 200 slots, plus the early client's and some slack.
    for _ in 0..20 {
        let open = fds(server.pid());
        assert!(
            open <= baseline + 200 + 16,
            "{open} descriptors open, baseline {baseline}"
        );
        early
            .status(StatusRequest {})
            .await
            .expect("the connected client keeps being served");
    }
    // A new client waits behind the flood only until the idle ones are closed.
    let started = std::time::Instant::now();
    let mut late = server.client().await;
    late.status(StatusRequest {}).await.unwrap();
    assert!(
        started.elapsed() < deriva_testkit::DEADLINE,
        "a new client waited {:?}",
        started.elapsed()
    );
    flood.abort();
}

/// `--request-timeout-secs` cuts off a call that has not answered in time: an upload that
/// stalls after its first chunk gets `CANCELLED`, nothing is stored, and the server serves the
/// next call. (It is off by default: the same stalled upload would wait for its client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_cancels_a_stalled_upload() {
    let server = ServerProcess::options()
        .args(["--request-timeout-secs", "1"])
        .start();
    let mut client = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(PutLeafStreamRequest {
        chunk: Bytes::from_static(b"the first chunk of an upload that stalls"),
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let status = client
        .put_leaf_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("a stalled upload is cut off");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "cut off after {:?}, before the timeout",
        started.elapsed()
    );
    drop(tx);
    let status = client
        .status(StatusRequest {})
        .await
        .expect("served after the timeout")
        .into_inner();
    assert_eq!(status.blob_count, 0, "the stalled upload stored nothing");
    let tmp = server.dir().join("blobs/tmp");
    deriva_testkit::wait_for("the upload's temporary file removed", || {
        std::fs::read_dir(&tmp)
            .unwrap_or_else(|e| panic!("{}: {e}", tmp.display()))
            .next()
            .is_none()
    });
}
