//! `deriva-testkit/backends.sh`, as the tests use it through `deriva_testkit::backends`: both services
//! answer real requests (a signed S3 PUT and GET with curl, a query with psql), come back after
//! a crash at the same address with their data, and leave no process behind once stopped; both
//! also speak TLS with the test CA's certificate.

use deriva_testkit::backends as services;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use services::Backends;

/// A signed S3 request with curl (SeaweedFS answers unsigned ones 403); its body on success.
fn s3_curl(b: &Backends, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--aws-sigv4"])
        .arg("aws:amz:us-east-1:s3")
        .arg("--user")
        .arg(format!("{}:{}", b.access_key(), b.secret_key()))
        .args(args)
        .output()
        .expect("running curl");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn object_url(b: &Backends, key: &str) -> String {
    format!("{}/{}/{key}", b.s3_endpoint(), b.bucket())
}

/// Uploads `body` to `key` (with -T: curl 7.88 signs --data-binary bodies in a way SeaweedFS
/// rejects).
fn s3_put(b: &Backends, key: &str, body: &[u8]) {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(body).expect("writing the body");
    let path = file.path().to_str().expect("a UTF-8 path").to_owned();
    s3_curl(b, &["-T", &path, &object_url(b, key)]).unwrap_or_else(|e| panic!("PUT: {e}"));
}

fn s3_get(b: &Backends, key: &str) -> Vec<u8> {
    s3_curl(b, &[&object_url(b, key)]).unwrap_or_else(|e| panic!("GET: {e}"))
}

/// Runs one SQL command with psql; its unaligned output.
fn psql(b: &Backends, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(b.pg_url())
        .args(["-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql -c {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned()
}

/// Waits (up to 5 s: the machine's init reaps a service's exited process a moment later) for
/// `pid` to be gone from /proc.
fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let proc = format!("/proc/{pid}");
    while Path::new(&proc).exists() {
        assert!(Instant::now() < deadline, "{proc} still exists");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_of(url: &str) -> u16 {
    let hostport = url.split('/').nth(2).expect("a URL with a host");
    let port = hostport.rsplit(['@', ':']).next().expect("a port");
    port.parse()
        .unwrap_or_else(|e| panic!("port of {url}: {e}"))
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn services_answer_survive_a_crash_and_stop_completely() {
    let b = Backends::start();
    for key in [
        "DERIVA_TEST_S3_ENDPOINT",
        "DERIVA_TEST_S3_BUCKET",
        "DERIVA_TEST_AWS_ACCESS_KEY_ID",
        "DERIVA_TEST_AWS_SECRET_ACCESS_KEY",
        "DERIVA_TEST_PG_URL",
        "DERIVA_TEST_S3_HTTPS_ENDPOINT",
        "DERIVA_TEST_TLS_CA",
    ] {
        assert!(b.env().contains_key(key), "no {key} in {:?}", b.env());
    }
    assert!(
        b.s3_endpoint().starts_with("http://127.0.0.1:"),
        "{}",
        b.s3_endpoint()
    );
    assert!(
        b.pg_url().starts_with("postgres://deriva@127.0.0.1:") && b.pg_url().ends_with("/deriva"),
        "{}",
        b.pg_url()
    );
    let (s3_port, pg_port) = (port_of(&b.s3_endpoint()), port_of(&b.pg_url()));

    // Both answer real requests, and the S3 credentials are really checked.
    s3_put(&b, "script-test/a", b"hello from the test");
    assert_eq!(s3_get(&b, "script-test/a"), b"hello from the test");
    let wrong = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--aws-sigv4"])
        .arg("aws:amz:us-east-1:s3")
        .arg("--user")
        .arg(format!("{}:wrong-secret", b.access_key()))
        .arg(object_url(&b, "script-test/a"))
        .output()
        .expect("running curl");
    assert_eq!(String::from_utf8_lossy(&wrong.stdout), "403");
    assert_eq!(psql(&b, "select 1"), "1");

    // Both speak TLS too, with a certificate the test CA signed: S3 on its https port, and
    // PostgreSQL on its one port, where libpq's verify-full accepts it.
    let ca = b.tls_ca();
    let ca = ca.to_str().expect("a UTF-8 path");
    let https_url = format!("{}/{}/script-test/a", b.s3_https_endpoint(), b.bucket());
    assert_eq!(
        s3_curl(&b, &["--cacert", ca, &https_url]).unwrap_or_else(|e| panic!("GET: {e}")),
        b"hello from the test"
    );
    let untrusted =
        s3_curl(&b, &["--cacert", "/dev/null", &https_url]).expect_err("https without the test CA");
    assert!(untrusted.contains("certificate"), "{untrusted}");
    let verified = format!(
        "postgres://deriva@localhost:{}/deriva?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}",
        b.pg_port()
    );
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-d", &verified, "-c"])
        .arg("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("running psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    psql(
        &b,
        "create table survives (x int); insert into survives values (42)",
    );

    // A crashed weed comes back at the same address with the object.
    let weed = b.pid("weed").expect("weed's pid");
    b.kill("weed");
    assert_gone(weed);
    assert!(b.pid("weed").is_none());
    assert!(s3_curl(&b, &[&object_url(&b, "script-test/a")]).is_err());
    b.start_again("weed");
    assert_ne!(b.pid("weed"), Some(weed));
    assert_eq!(port_of(&b.s3_endpoint()), s3_port);
    assert_eq!(s3_get(&b, "script-test/a"), b"hello from the test");

    // So does a crashed PostgreSQL, with its committed row.
    let postmaster = b.pid("pg").expect("the postmaster's pid");
    b.kill("pg");
    assert_gone(postmaster);
    b.start_again("pg");
    assert_eq!(port_of(&b.pg_url()), pg_port);
    assert_eq!(psql(&b, "select x from survives"), "42");

    // A clean stop leaves nothing running, and nothing listening.
    let (weed, postmaster) = (b.pid("weed").unwrap(), b.pid("pg").unwrap());
    b.stop("all");
    assert_gone(weed);
    assert_gone(postmaster);
    assert_eq!((b.pid("weed"), b.pid("pg")), (None, None));
    assert!(!listening(s3_port), "S3 port {s3_port} still open");
    assert!(!listening(pg_port), "PostgreSQL port {pg_port} still open");
    // Stopping again is fine (Drop does it once more).
    b.stop("all");
}
