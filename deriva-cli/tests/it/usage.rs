//! Tests of the `deriva` binary that need no server: usage errors, which are caught before any
//! RPC, and a server that cannot be reached. The tests against a real server are in
//! `deriva-server/tests/it/cli.rs`.

use std::process::Command;
use std::time::Duration;

use deriva_testkit::cli::Output;

/// How long one `deriva` command may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// Where nothing listens: port 1 (tcpmux) is never handed out by a bind to port 0.
const NOWHERE: &str = "http://127.0.0.1:1";

/// Runs `deriva ARGS` with no server from the environment, waiting at most [`DEADLINE`].
fn deriva(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deriva"));
    cmd.args(args).env_remove("DERIVA_SERVER");
    deriva_testkit::cli::run(cmd, None, DEADLINE)
}

#[test]
fn bad_input_is_a_usage_error_before_any_rpc() {
    let good = "ab".repeat(32);
    let bad_last = format!("{}g", &good[1..]);
    let cases: [&[&str]; 7] = [
        &["get", "xyz"],
        &["get", &good[1..]],
        &["resolve", "zz"],
        &["invalidate", "--cascade", "0x12"],
        &["verify", &bad_last],
        &["recipe", "concat", "v1", "-i", &good, "-i", "nothex"],
        &["recipe", "repeat", "v1", "-i", &good, "-p", "count"],
    ];
    for args in cases {
        let line = deriva(&[&["--server", NOWHERE][..], args].concat()).failure(2);
        if args.contains(&"-p") {
            assert!(line.contains("key=value"), "{args:?}: {line}");
        } else {
            assert!(line.contains("hex"), "{args:?}: {line}");
        }
    }
    let line = deriva(&["--server", NOWHERE, "get", "xyz"]).failure(2);
    assert!(line.starts_with("deriva: get: \"xyz\""), "{line}");
    let line = deriva(&[
        "--server", NOWHERE, "recipe", "f", "v1", "-i", &good, "-i", "zz",
    ])
    .failure(2);
    assert!(line.starts_with("deriva: -i #2: \"zz\""), "{line}");
}

#[test]
fn a_server_url_that_is_not_http_or_https_is_a_usage_error() {
    let line = deriva(&["--server", "ftp://127.0.0.1:1", "status"]).failure(2);
    assert!(line.contains("only http:// and https://"), "{line}");
    // TLS files without an https:// URL would be ignored: refused instead.
    let line = deriva(&[
        "--server",
        "http://127.0.0.1:1",
        "--tls-ca",
        "ca.pem",
        "status",
    ])
    .failure(2);
    assert!(line.contains("https://"), "{line}");
    let line = deriva(&["--server", "http://[::1", "status"]).failure(2);
    assert!(line.contains("not a valid URL"), "{line}");
}

#[test]
fn get_into_a_directory_is_a_usage_error_before_any_rpc() {
    let dir = std::env::temp_dir();
    let dir = dir.to_str().expect("UTF-8 temp dir");
    let addr = "ab".repeat(32);
    let line = deriva(&["--server", NOWHERE, "get", &addr, "-o", dir]).failure(2);
    assert!(line.contains("is a directory"), "{line}");
}

#[test]
fn unreachable_server_names_the_url() {
    let line = deriva(&["--server", NOWHERE, "status"]).failure(1);
    assert!(line.contains(NOWHERE), "{line}");
    // A bare HOST:PORT is an http:// URL, and the message names it as given.
    let line = deriva(&["--server", "127.0.0.1:1", "status"]).failure(1);
    assert!(
        line.contains("cannot reach the server at 127.0.0.1:1"),
        "{line}"
    );
    // A missing file is reported as such, whatever the server.
    let line = deriva(&["--server", NOWHERE, "put", "/no/such/file"]).failure(1);
    assert!(line.contains("/no/such/file"), "{line}");
}

#[test]
fn help_names_the_flags_and_bad_flags_exit_2() {
    let out = deriva(&["recipe", "--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let stdout = out.text();
    assert!(stdout.contains("--param <KEY=VALUE>"), "{stdout}");
    assert!(stdout.contains("--input <ADDR>"), "{stdout}");
    // clap's own errors: several lines, but the same exit code as every usage error.
    let out = deriva(&["bench", "--size", "12 parsecs"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("unknown size unit"), "{}", out.stderr);
}

#[test]
fn provenance_checks_its_address_depth_and_key_before_any_rpc() {
    let addr = "ab".repeat(32);
    let line = deriva(&["--server", NOWHERE, "provenance", "0x12"]).failure(2);
    assert!(line.starts_with("deriva: provenance: \"0x12\""), "{line}");
    let out = deriva(&["--server", NOWHERE, "provenance", &addr, "--depth", "1025"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--depth") && out.stderr.contains("0..=1024"),
        "{}",
        out.stderr
    );
    let with_key = |path: &str| {
        deriva(&[
            "--server",
            NOWHERE,
            "provenance",
            &addr,
            "--verify-key",
            path,
        ])
        .failure(2)
    };
    let line = with_key("/no/such/key.pem");
    assert!(
        line.starts_with("deriva: --verify-key: cannot read the public key /no/such/key.pem"),
        "{line}"
    );
    // A private key where the public one is expected is named as such.
    let private = std::env::temp_dir().join(format!("deriva-key-{}.pem", std::process::id()));
    std::fs::write(
        &private,
        deriva_util::signing::SigningKey::generate_pem().unwrap(),
    )
    .unwrap();
    let path = private.to_str().expect("UTF-8 temp dir");
    let line = with_key(path);
    let _ = std::fs::remove_file(&private);
    assert!(line.contains("BEGIN PUBLIC KEY"), "{line}");
    // Then the server is asked (here: cannot be reached).
    let line = deriva(&["--server", NOWHERE, "provenance", &addr, "--json"]).failure(1);
    assert!(line.contains(NOWHERE), "{line}");
}
