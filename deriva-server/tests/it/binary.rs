//! The `deriva-server` binary itself: defaults, port conflicts, signals.

use std::net::TcpListener;

use deriva_testkit::{DEADLINE, ServerProcess};
use rustix::process::Signal;

#[test]
fn starts_with_no_flags_and_stops_cleanly_on_sigterm() {
    let cwd = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::options()
        .without_listener_flags()
        .default_data_dir_in(cwd.path())
        .start();
    assert!(
        cwd.path().join("deriva-data").join("deriva.redb").is_file(),
        "default data dir"
    );
    let status = server.stop();
    assert!(status.success(), "exit status {status:?}");
    let rest = server.stderr_after_listening();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
}

/// An orchestrator may stop a server the moment it has started. From the listening line on,
/// SIGTERM and SIGINT take the graceful path (exit 0, the signal logged, "stopped"), never the
/// default action that kills the process: the handlers are installed before anything is
/// announced. The signal is sent from the thread that reads the line, the instant it does.
#[test]
fn a_signal_right_after_the_listening_line_always_stops_gracefully() {
    const STARTS: usize = 50;
    let data = tempfile::tempdir().unwrap();
    for start in 0..STARTS {
        let (signal, name) = if start % 2 == 0 {
            (Signal::TERM, "SIGTERM")
        } else {
            (Signal::INT, "SIGINT")
        };
        let mut server = ServerProcess::options()
            .dir(data.path())
            .on_listening(move |pid| {
                rustix::process::kill_process(pid, signal).expect("cannot signal deriva-server");
            })
            .start();
        let status = server.wait_exit(DEADLINE);
        let rest = server.stderr_after_listening();
        assert!(
            status.success(),
            "start {start}: {name} right after the listening line ended the server with \
             {status:?}; stderr after the line: {rest:?}"
        );
        assert!(
            rest.iter().any(|l| l.contains(&format!("{name} received")))
                && rest.iter().any(|l| l.contains("deriva-server stopped")),
            "start {start}: {rest:?}"
        );
    }
}

/// Runs the server with `flags` plus one listener flag pointed at a port already taken; returns
/// the taken address and the server's stderr.
fn run_on_taken_port(flags: &[&str], taken_flag: &str) -> (String, String) {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ServerProcess::options()
        .without_listener_flags()
        .args(flags)
        .args([taken_flag, &addr])
        .run_to_exit();
    assert!(!out.status.success());
    (addr, out.stderr)
}

#[test]
fn a_port_in_use_is_a_one_line_error_naming_the_address() {
    let (addr, stderr) = run_on_taken_port(&["--metrics-port", "0"], "--listen");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&addr) && lines[0].contains("in use"),
        "{stderr}"
    );
}

#[test]
fn a_metrics_port_in_use_is_a_one_line_error_naming_the_address() {
    let (addr, stderr) = run_on_taken_port(&["--listen", "127.0.0.1:0"], "--metrics-addr");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&addr) && lines[0].contains("metrics"),
        "{stderr}"
    );
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    let out = ServerProcess::options()
        .without_listener_flags()
        .args(["--verification", "maybe"])
        .run_to_exit();
    assert_eq!(out.status.code(), Some(2));
    let stderr = out.stderr;
    assert!(stderr.contains("verification mode"), "{stderr}");
}

/// `deriva-server keygen OUT`: a key pair a server signs with; no overwriting, clear usage.
#[test]
fn keygen_makes_a_key_the_server_starts_with_and_refuses_misuse() {
    let server = deriva_testkit::process::server_bin();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.pem");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(&server)
            .arg("keygen")
            .args(args)
            .output()
            .unwrap()
    };
    let made = run(&[key.as_os_str()]);
    assert!(made.status.success(), "{made:?}");
    assert!(String::from_utf8_lossy(&made.stdout).contains("node.pem.pub"));
    let public = std::fs::read_to_string(dir.path().join("node.pem.pub")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    let again = run(&[key.as_os_str()]);
    assert_eq!(again.status.code(), Some(1), "never overwrites");
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    for args in [&[][..], &["a".as_ref(), "b".as_ref()][..]] {
        let usage = run(args);
        assert_eq!(usage.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&usage.stderr).contains("usage"));
    }
    // A server signs with it; one given a file that is not a key does not start.
    let mut signing = ServerProcess::options()
        .args(["--signing-key".as_ref(), key.as_os_str()])
        .start();
    assert!(signing.stop().success());
    let exited = ServerProcess::options()
        .args([
            "--signing-key".as_ref(),
            dir.path().join("node.pem.pub").as_os_str(),
        ])
        .run_to_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("BEGIN PRIVATE KEY"),
        "{}",
        exited.stderr
    );
}
