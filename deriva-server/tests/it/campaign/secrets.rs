//! See the table in `main.rs`. Passwords an operator might choose (printable characters, with
//! `/ ? # @ :` among them; seeded, the seed printed, `DERIVA_SEED` to replay) in the index URL,
//! the object store URL, the OTLP endpoint and headers, the CLI's token and server URL, looked
//! for in everything the binaries show: `--help`, `--print-config`, their stderr (at DEBUG),
//! `migrate`'s report, the `/debug` page, `/health`, `/debug/traces` and every trace in it, and
//! the spans and log records an OTLP collector receives. With real PostgreSQL and SeaweedFS
//! (`deriva-testkit/backends.sh`), a role whose password holds those characters logs in.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{cli_bin, server, server_bin};
use deriva_testkit::http::http_get_with;
use deriva_testkit::{DEADLINE, Rng, get_all, put_leaf, put_recipe};

use deriva_testkit::backends;

/// A secret, as chosen and as written where it is given (a URL escapes some characters).
#[derive(Debug, Clone)]
struct Secret {
    raw: String,
    written: String,
}

impl Secret {
    /// The ways it could show: as chosen and as written, each as it is and escaped for HTML,
    /// JSON or `Debug`.
    fn forms(&self) -> Vec<String> {
        let mut forms = Vec::new();
        for text in [&self.raw, &self.written] {
            let html = text
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
                .replace('\'', "&#39;");
            let json = serde_json::to_string(text).unwrap();
            let debug = format!("{text:?}");
            forms.extend([
                text.clone(),
                html,
                json[1..json.len() - 1].to_owned(),
                debug[1..debug.len() - 1].to_owned(),
            ]);
        }
        forms.sort();
        forms.dedup();
        forms
    }
}

/// Panics, naming `place`, if any form of any of `secrets` is in `text`.
fn assert_hidden(place: &str, text: &str, secrets: &[&Secret]) {
    for secret in secrets {
        for form in secret.forms() {
            assert!(
                !text.contains(&form),
                "{place} shows the secret {form:?} (of {:?}):\n{text}",
                secret.raw
            );
        }
    }
}

/// A password: 12 to 23 printable ASCII characters, with each of `/ ? # @ :` in it.
fn password(rng: &mut Rng) -> String {
    let len = 12 + rng.below(12) as usize;
    let mut chars: Vec<char> = (0..len)
        .map(|_| char::from(0x20 + rng.below(95) as u8))
        .collect();
    for special in ['/', '?', '#', '@', ':'] {
        let at = rng.below(chars.len() as u64 + 1) as usize;
        chars.insert(at, special);
    }
    chars.into_iter().collect()
}

/// `text` with every character outside `keep` written `%XX`.
fn encode(text: &str, keep: impl Fn(char) -> bool) -> String {
    text.chars()
        .map(|c| {
            if keep(c) {
                c.to_string()
            } else {
                let mut buf = [0; 4];
                c.encode_utf8(&mut buf)
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect()
            }
        })
        .collect()
}

/// A password as tokio-postgres reads it from a URL: up to the first `@`, percent-decoded, so
/// only `%` and `@` are escaped; `/ ? # :` stay as they are.
fn pg_password(rng: &mut Rng) -> Secret {
    let raw = password(rng);
    let written = encode(&raw, |c| c != '%' && c != '@');
    Secret { raw, written }
}

/// A password as the `http` and `url` crates read it from an authority: `/ ? #`, spaces and
/// the like escaped, `@` and `:` as they are.
fn http_password(rng: &mut Rng) -> Secret {
    let raw = password(rng);
    let written = encode(&raw, |c| {
        c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c)
    });
    Secret { raw, written }
}

/// A token: what `deriva token new` makes looks like this.
fn token(rng: &mut Rng) -> Secret {
    let raw = format!("deriva_{}", hex_string(rng));
    Secret {
        written: raw.clone(),
        raw,
    }
}

fn hex_string(rng: &mut Rng) -> String {
    rng.bytes(16).iter().map(|b| format!("{b:02x}")).collect()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// `deriva-server` with only the variables the test gives (none of the test's `DERIVA_*`,
/// `OTEL_*` or `RUST_LOG`).
fn server_command() -> Command {
    let mut command = Command::new(server_bin());
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("DERIVA_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
            command.env_remove(&key);
        }
    }
    command
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `--help` of both commands of `deriva-server`, and of `deriva`, with every secret-bearing
/// variable set: the variables are named, their values never shown.
#[test]
fn help_names_the_secret_variables_but_never_shows_their_values() {
    let mut rng = Rng::from_env("secrets: help");
    let index = pg_password(&mut rng);
    let otlp = http_password(&mut rng);
    let header = token(&mut rng);
    let blob = http_password(&mut rng);
    let env = [
        (
            "DERIVA_INDEX_URL",
            format!("postgres://deriva:{}@db:5432/deriva", index.written),
        ),
        (
            "DERIVA_OTLP_ENDPOINT",
            format!("https://otel:{}@collector:4317", otlp.written),
        ),
        (
            "DERIVA_OTLP_HEADERS",
            format!("authorization=Bearer {}", header.raw),
        ),
        (
            "DERIVA_BLOB_STORE",
            format!("s3://key:{}@bucket/prefix", blob.written),
        ),
    ];
    for args in [&["--help"][..], &["migrate", "--help"]] {
        let out = run(server_command().args(args).envs(env.clone()));
        assert!(
            out.status.success(),
            "deriva-server {args:?}: {}",
            text(&out)
        );
        let shown = text(&out);
        assert!(shown.contains("[env: DERIVA_INDEX_URL"), "{shown}");
        assert_hidden(
            &format!("deriva-server {args:?}"),
            &shown,
            &[&index, &otlp, &header, &blob],
        );
    }

    let client_token = token(&mut rng);
    let url = http_password(&mut rng);
    let out = run(Command::new(cli_bin())
        .arg("--help")
        .env("DERIVA_TOKEN", &client_token.raw)
        .env(
            "DERIVA_SERVER",
            format!("http://u:{}@server:50051", url.written),
        ));
    assert!(out.status.success(), "deriva --help: {}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("[env: DERIVA_TOKEN"), "{shown}");
    assert_hidden("deriva --help", &shown, &[&client_token, &url]);
}

/// `--print-config` with generated passwords in the index URL (as a URL and as a libpq
/// `key=value` string), the object store URL and the OTLP endpoint, given as flags and as
/// variables: every password hidden, the rest of each URL shown as given.
#[test]
fn print_config_hides_every_password() {
    let mut rng = Rng::from_env("secrets: print-config");
    for _ in 0..6 {
        let index = pg_password(&mut rng);
        let otlp = http_password(&mut rng);
        let blob = http_password(&mut rng);
        let kv = pg_password(&mut rng);
        let index_url = format!(
            "postgres://deriva:{}@db.example:6543/idx?sslmode=disable&application_name=n1",
            index.written
        );
        let kv_text = format!(
            "host=db.example user=deriva password='{}' dbname=idx",
            kv.raw.replace('\\', "\\\\").replace('\'', "\\'")
        );
        let kv = Secret {
            written: kv.raw.replace('\\', "\\\\").replace('\'', "\\'"),
            raw: kv.raw,
        };
        let otlp_url = format!("http://otel:{}@collector:4317", otlp.written);
        let blob_url = format!("s3://key:{}@bucket/prefix", blob.written);
        let secrets = [&index, &otlp, &blob, &kv];
        let expect = |shown: &str, index_shown: &str| {
            let line = |key: &str| {
                shown
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{key} = ")))
                    .unwrap_or_else(|| panic!("no {key} in {shown}"))
                    .to_owned()
            };
            assert_eq!(line("index"), index_shown, "{shown}");
            assert_eq!(line("otlp-endpoint"), "http://otel:***@collector:4317");
            assert_eq!(line("blob-store"), "s3://key:***@bucket/prefix");
        };
        let url_shown =
            "postgres://deriva:***@db.example:6543/idx?sslmode=disable&application_name=n1";
        let kv_shown = "host=db.example user=deriva password=*** dbname=idx";
        for (index_value, index_shown) in [(&index_url, url_shown), (&kv_text, kv_shown)] {
            let out = run(server_command().args([
                "--print-config",
                "--index",
                index_value,
                "--otlp-endpoint",
                &otlp_url,
                "--blob-store",
                &blob_url,
            ]));
            assert!(out.status.success(), "{}", text(&out));
            assert_hidden("--print-config (flags)", &text(&out), &secrets);
            expect(&String::from_utf8_lossy(&out.stdout), index_shown);

            let out = run(server_command()
                .arg("--print-config")
                .env("DERIVA_INDEX_URL", index_value)
                .env("DERIVA_OTLP_ENDPOINT", &otlp_url)
                .env("DERIVA_BLOB_STORE", &blob_url));
            assert!(out.status.success(), "{}", text(&out));
            assert_hidden("--print-config (variables)", &text(&out), &secrets);
            expect(&String::from_utf8_lossy(&out.stdout), index_shown);
        }
    }
}

/// A password whose `@` an operator left unencoded: tokio-postgres ends the credentials there
/// and takes the rest of it, up to the real `@`, for the host name (it has none of `/ ? : ,`),
/// so the password is `HEAD@TAIL`, HEAD with `/ ? # :` in it, written with only `%` escaped.
fn careless_pg_password(rng: &mut Rng) -> (Secret, String) {
    const HOST_SAFE: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+;=";
    let head: String = password(rng).chars().filter(|c| *c != '@').collect();
    let tail: String = (0..10)
        .map(|_| char::from(HOST_SAFE[rng.below(HOST_SAFE.len() as u64) as usize]))
        .collect();
    let raw = format!("{head}@{tail}");
    let written = raw.replace('%', "%25");
    (Secret { raw, written }, tail)
}

/// A server whose index cannot be reached (nothing listens on port 1), at DEBUG, with the
/// password's `@` left unencoded (which made the rest of the password the host name in the
/// message), then written as tokio-postgres reads it: the server exits, naming the database,
/// without the password.
#[test]
fn an_unreachable_index_never_shows_the_password() {
    let mut rng = Rng::from_env("secrets: unreachable index");
    let (careless, tail) = careless_pg_password(&mut rng);
    for (secret, tail) in [(careless, Some(tail)), (pg_password(&mut rng), None)] {
        let exited = server()
            .args([
                "--blob-store",
                "s3://bucket/prefix",
                "--index",
                &format!("postgres://deriva:{}@127.0.0.1:1/idx", secret.written),
            ])
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .env("RUST_LOG", "debug")
            .run_to_exit();
        assert!(!exited.status.success(), "{}", exited.stderr);
        assert_hidden("the stderr of a failed start", &exited.stderr, &[&secret]);
        if let Some(tail) = tail {
            assert!(
                !exited.stderr.contains(&tail),
                "the end of the password, {tail:?}, shows:\n{}",
                exited.stderr
            );
        }
        assert!(
            exited
                .stderr
                .contains("the index database postgres://deriva:***@127.0.0.1:1/idx"),
            "{}",
            exited.stderr
        );
    }
}

/// An OTLP endpoint whose password leaves `/`, `?` or `#` unencoded (the client cannot read it;
/// the server serves, and its exports fail): the start-up line, the log lines of an RPC and of
/// the shutdown, at DEBUG, never show it.
#[test]
fn an_unreadable_otlp_endpoint_never_shows_the_password() {
    let mut rng = Rng::from_env("secrets: unreadable OTLP endpoint");
    // A password whose first delimiter ends the authority the client reads (`otel:HEAD`, so
    // the client takes HEAD for a port and the server starts), the rest written as the
    // client takes a path, query and fragment.
    let head = hex_string(&mut rng)[..6].to_owned();
    let delimiter = ['/', '?', '#'][rng.below(3) as usize];
    let rest = password(&mut rng);
    let careless = Secret {
        raw: format!("{head}{delimiter}{rest}"),
        written: format!(
            "{head}{delimiter}{}",
            encode(&rest, |c| {
                c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?#".contains(c)
            })
        ),
    };
    let mut node = server()
        .args([
            "--otlp-endpoint",
            &format!("http://otel:{}@127.0.0.1:1", careless.written),
        ])
        .env("RUST_LOG", "debug")
        .start();
    let out = run(Command::new(cli_bin())
        .args(["--server", &node.url(), "status"])
        .env_remove("DERIVA_SERVER")
        .env_remove("DERIVA_TOKEN"));
    assert!(out.status.success(), "deriva status: {}", text(&out));
    assert!(node.stop().success(), "{}", node.stderr());
    let stderr = node.stderr();
    assert_hidden(
        "the stderr of a server with an unreadable OTLP endpoint",
        &stderr,
        &[&careless],
    );
    assert!(
        stderr.contains("otlp=traces to http://otel:***@"),
        "{stderr}"
    );
}

/// `deriva-server migrate` from an index it cannot reach: the failure names the source with
/// its password hidden.
#[test]
fn migrate_never_shows_the_password() {
    let mut rng = Rng::from_env("secrets: migrate");
    let secret = pg_password(&mut rng);
    let to = tempfile::tempdir().unwrap();
    for json in [false, true] {
        let mut command = server_command();
        command
            .args([
                "migrate",
                "--no-progress",
                "--blob-store",
                "s3://bucket/prefix",
                "--index",
                &format!("postgres://deriva:{}@127.0.0.1:1/idx", secret.written),
            ])
            .arg("--to-data-dir")
            .arg(to.path())
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s");
        if json {
            command.arg("--json");
        }
        let out = run(&mut command);
        assert!(!out.status.success(), "{}", text(&out));
        let shown = text(&out);
        assert_hidden("deriva-server migrate", &shown, &[&secret]);
        assert!(
            shown.contains("postgres://deriva:***@127.0.0.1:1/idx"),
            "{shown}"
        );
    }
}

/// Real PostgreSQL and SeaweedFS: a role whose password holds `/ ? # @ :` (and a `pg_hba.conf`
/// line that makes it log in with that password, SCRAM). A wrong password is refused without
/// being shown; with the right one the server serves, at DEBUG, exporting spans and log
/// records over OTLP (its endpoint with a password, and a header that is a secret), and
/// neither password shows in its stderr, `/debug`, `/health`, `/debug/traces`, any trace kept,
/// `/metrics`, or what the collector receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_backend_passwords_stay_out_of_pages_logs_and_spans() {
    let mut rng = Rng::from_env("secrets: remote backend");
    let services = tokio::task::spawn_blocking(backends::Backends::start)
        .await
        .unwrap();
    let role = format!("secret_{}", std::process::id());
    let right = pg_password(&mut rng);
    let wrong = pg_password(&mut rng);
    let url = |secret: &Secret| {
        format!(
            "postgres://{role}:{}@127.0.0.1:{}/deriva",
            secret.written,
            services.pg_port()
        )
    };
    login_by_password(&services, &role, &right.raw, &wrong.raw).await;

    let space = format!("secrets_{}", std::process::id());
    let remote = |secret: &Secret| {
        let mut options = server().args([
            "--blob-store".to_owned(),
            format!("s3://{}/{space}", services.bucket()),
            "--index".to_owned(),
            url(secret),
            "--index-schema".to_owned(),
            space.clone(),
        ]);
        for (key, value) in services.aws_env() {
            options = options.env(key, value);
        }
        options.env("RUST_LOG", "debug")
    };

    // The wrong password: refused, and not shown.
    let exited = tokio::task::spawn_blocking({
        let options = remote(&wrong);
        move || options.run_to_exit()
    })
    .await
    .unwrap();
    assert!(!exited.status.success(), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("password authentication failed"),
        "{}",
        exited.stderr
    );
    assert_hidden(
        "the stderr of a server with a wrong password",
        &exited.stderr,
        &[&wrong, &right],
    );

    // The right one: the server serves, and shows it nowhere.
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .unwrap();
    let otlp = http_password(&mut rng);
    let header = token(&mut rng);
    let endpoint =
        collector
            .endpoint()
            .replacen("http://", &format!("http://otel:{}@", otlp.written), 1);
    let options = remote(&right)
        .args([
            "--otlp-endpoint".to_owned(),
            endpoint,
            "--otlp-header".to_owned(),
            format!("authorization=Bearer {}", header.raw),
        ])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut node = tokio::task::spawn_blocking(move || options.start())
        .await
        .unwrap();
    let secrets = [&right, &wrong, &otlp, &header];

    let mut client = node.client().await;
    let leaf = put_leaf(&mut client, b"secrets stay secret").await;
    let recipe = put_recipe(&mut client, "uppercase", &[&leaf], &[]).await;
    assert_eq!(
        get_all(&mut client, &recipe).await.unwrap(),
        b"SECRETS STAY SECRET"
    );
    let missing = bytes::Bytes::from(vec![7u8; 32]);
    assert_eq!(
        get_all(&mut client, &missing).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let http = node.metrics_addr().to_owned();
    let get = |path: String, html: bool| {
        let http = http.clone();
        async move {
            let accept: &[(&str, &str)] = if html {
                &[("Accept", "text/html")]
            } else {
                &[]
            };
            let r = http_get_with(&http, &path, accept)
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            assert_eq!(r.status, 200, "GET {path}: {}", r.body);
            r.body
        }
    };
    let debug = get("/debug".into(), true).await;
    assert_hidden("/debug", &debug, &secrets);
    let store = format!(
        "the index database postgres://{role}:***@127.0.0.1:{}/deriva",
        services.pg_port()
    );
    assert!(debug.contains(&store), "{debug}");
    for path in ["/health", "/metrics", "/debug/traces"] {
        assert_hidden(path, &get(path.into(), false).await, &secrets);
        assert_hidden(path, &get(path.into(), true).await, &secrets);
    }
    let lists: serde_json::Value =
        serde_json::from_str(&get("/debug/traces".into(), false).await).unwrap();
    let mut ids = Vec::new();
    collect_trace_ids(&lists, &mut ids);
    assert!(ids.len() >= 3, "{lists}");
    for id in &ids {
        let trace = get(format!("/debug/traces/{id}"), false).await;
        assert_hidden(&format!("the trace {id}"), &trace, &secrets);
        let page = get(format!("/debug/traces/{id}"), true).await;
        assert_hidden(&format!("the waterfall of {id}"), &page, &secrets);
    }

    // The collector: client spans of calls to both backends among them, and log records.
    let mut spans: Vec<fake_opentelemetry_collector::ExportedSpan> = Vec::new();
    let start = Instant::now();
    let has = |spans: &[fake_opentelemetry_collector::ExportedSpan], attribute: &str| {
        spans.iter().any(|s| s.attributes.contains_key(attribute))
    };
    while !(has(&spans, "db.operation.name") && has(&spans, "aws.s3.bucket")) {
        assert!(
            start.elapsed() < DEADLINE,
            "no spans of calls to both backends exported: {spans:?}"
        );
        spans.extend(
            collector
                .exported_spans(1, Duration::from_millis(200))
                .await,
        );
    }
    let logs = collector.exported_logs(1, DEADLINE).await;
    assert!(!logs.is_empty());
    assert_hidden("the exported spans", &format!("{spans:?}"), &secrets);
    assert_hidden("the exported log records", &format!("{logs:?}"), &secrets);

    let status = tokio::task::spawn_blocking(move || {
        let status = node.stop();
        (status, node.stderr())
    })
    .await
    .unwrap();
    let (status, stderr) = status;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(&store), "{stderr}");
    assert!(stderr.contains(" DEBUG "), "not at DEBUG:\n{stderr}");
    assert_hidden("the server's stderr", &stderr, &secrets);
}

/// Every `trace_id` string in `value`.
fn collect_trace_ids(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("trace_id", serde_json::Value::String(id)) => out.push(id.clone()),
                    _ => collect_trace_ids(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_trace_ids(v, out)),
        _ => {}
    }
}

/// Creates `role` with `password`, able to create Deriva's schema, and puts a `pg_hba.conf`
/// line before the test services' `trust` ones so that it logs in with that password only;
/// returns once PostgreSQL refuses `wrong` (the configuration reloaded).
async fn login_by_password(services: &backends::Backends, role: &str, password: &str, wrong: &str) {
    let admin = connect(&services.pg_url(), None)
        .await
        .expect("the test services' role logs in");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{}'; GRANT CREATE ON DATABASE deriva TO {role};",
            password.replace('\'', "''")
        ))
        .await
        .unwrap();
    let hba = services.dir().join("pg/data/pg_hba.conf");
    let before = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all {role} 127.0.0.1/32 scram-sha-256\n{before}"),
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let as_role = format!("postgres://{role}@127.0.0.1:{}/deriva", services.pg_port());
    let start = Instant::now();
    while connect(&as_role, Some(wrong)).await.is_ok() {
        assert!(
            start.elapsed() < DEADLINE,
            "PostgreSQL still lets {role} in with any password"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connect(&as_role, Some(password))
        .await
        .expect("the role logs in with its password");
}

/// A connection to `url` (with `password`, if given), its connection task spawned.
async fn connect(
    url: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}
