//! The `deriva-server` binary itself: defaults, port conflicts, signals.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{DEADLINE, Killed, SERVER};
use rustix::process::{Pid, Signal};

/// Forwards the child's stderr lines to the returned receiver. When `signal` is given, the
/// reader thread sends it to the child the instant it reads the listening line, before it
/// forwards that line: as soon after the announcement as a client could react.
fn read_stderr(child: &mut Child, signal: Option<Signal>) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let pid = Pid::from_child(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(signal) = signal
                && line.contains("deriva-server listening")
            {
                rustix::process::kill_process(pid, signal).expect("cannot signal deriva-server");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits until `rx` shows the listening line; every line read so far on failure.
fn wait_listening(rx: &mpsc::Receiver<String>) {
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("deriva-server listening") => return,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!(
        "deriva-server never said it was listening; stderr:\n{}",
        seen.join("\n")
    );
}

fn sigterm(child: &Child) {
    rustix::process::kill_process(Pid::from_child(child), Signal::TERM).unwrap();
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "deriva-server did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn starts_with_no_flags_and_stops_cleanly_on_sigterm() {
    let cwd = tempfile::tempdir().unwrap();
    let child = Command::new(SERVER)
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Killed(child);
    let rx = read_stderr(&mut running.0, None);
    wait_listening(&rx);
    assert!(
        cwd.path().join("deriva-data").join("deriva.redb").is_file(),
        "default data dir"
    );
    sigterm(&running.0);
    let status = wait_exit(&mut running.0, DEADLINE);
    assert!(status.success(), "exit status {status:?}");
    let rest: Vec<String> = rx.iter().collect();
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
        let child = common::server_command(data.path(), &[]).spawn().unwrap();
        let mut running = Killed(child);
        let rx = read_stderr(&mut running.0, Some(signal));
        wait_listening(&rx);
        let status = wait_exit(&mut running.0, DEADLINE);
        let rest: Vec<String> = rx.iter().collect();
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
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(SERVER)
        .args(flags)
        .args([taken_flag, &addr, "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    (addr, String::from_utf8(out.stderr).unwrap())
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
    let out = Command::new(SERVER)
        .args(["--verification", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("verification mode"), "{stderr}");
}
