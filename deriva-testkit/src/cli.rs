//! Running the `deriva` binary in tests: its exit code and output, with a deadline. Used by
//! the tests of `deriva-cli` (usage) and of `deriva-server` (the client against a server).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rustix::process::{WaitId, WaitIdOptions};

/// What a finished `deriva` command left behind.
#[derive(Debug)]
pub struct Output {
    /// The exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// Stdout as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("UTF-8 stdout")
    }

    /// Asserts success with nothing on stderr; returns stdout.
    pub fn success(self, args: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "deriva {args:?} failed; stderr: {}",
            self.stderr
        );
        assert!(
            self.stderr.is_empty(),
            "deriva {args:?} wrote to stderr: {}",
            self.stderr
        );
        self.text()
    }

    /// Asserts a failure with `code` and exactly one `deriva: ...` line on stderr; returns it.
    pub fn failure(self, code: i32) -> String {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}; stderr: {}",
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {:?}", self.stderr);
        assert!(lines[0].starts_with("deriva: "), "{:?}", lines[0]);
        assert!(
            !lines[0].contains("panicked") && !lines[0].contains("Status {"),
            "{:?}",
            lines[0]
        );
        lines[0].to_owned()
    }
}

/// Runs `cmd` (feeding `stdin` if given) and waits for it to exit, at most `deadline`; a
/// command still running then is killed and the test fails.
pub fn run(mut cmd: Command, stdin: Option<Vec<u8>>, deadline: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn deriva");
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = String::new();
        let _ = err_pipe.read_to_string(&mut buf);
        buf
    });
    // The waiter only learns of the exit (NOWAIT: it does not reap), so until `child.wait()`
    // below the pid stays this child's and `kill` cannot hit another process.
    let pid = rustix::process::Pid::from_child(&child);
    let (exited, exit) = mpsc::channel();
    thread::spawn(move || {
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
        while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(WaitId::Pid(pid), options)
        {
        }
        let _ = exited.send(());
    });
    if exit.recv_timeout(deadline).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {deadline:?}");
    }
    let status = child.wait().expect("wait for deriva");
    if let Some(feeder) = feeder {
        feeder.join().expect("stdin feeder");
    }
    Output {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}
