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
