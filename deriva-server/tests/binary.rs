//! The `deriva-server` binary itself: defaults, port conflicts, signals.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");

/// Kills the child if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until stderr shows the listening line; returns the remaining stderr lines' receiver.
fn wait_listening(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("deriva-server listening") => return rx,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("deriva-server never said it was listening");
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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
    let mut running = Running(child);
    let rx = wait_listening(&mut running.0);
    assert!(
        cwd.path().join("deriva-data").join("deriva.redb").is_file(),
        "default data dir"
    );
    sigterm(&running.0);
    let status = wait_exit(&mut running.0, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
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
