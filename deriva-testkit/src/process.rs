//! [`ServerProcess`]: the real `deriva-server` binary as a child process, on ports it picks
//! itself (read back from its listening line), with every stderr line kept, stopped by SIGTERM
//! and killed (SIGKILL) when dropped.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deriva_server::proto::deriva_client::DerivaClient;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use tonic::transport::Channel;

use crate::DEADLINE;

/// The `deriva-server` binary the tests start, in cargo's output directory ([`crate::bin_dir`]).
/// Cargo builds it for the tests of `deriva-server` (and for `cargo test --workspace`).
pub fn server_bin() -> PathBuf {
    let path = crate::bin_dir().join(format!("deriva-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the deriva-server binary is not at {}: cargo builds it for deriva-server's tests; run \
         `cargo build -p deriva-server` first",
        path.display()
    );
    path
}

/// What the server logs once both listeners are bound, with `addr=` and `metrics=`.
pub const LISTENING: &str = "deriva-server listening";

/// Runs on the stderr reader thread the instant it reads the listening line, before the line is
/// kept (so before [`ServerOptions::start`] returns), with the server's pid.
type OnListening = Box<dyn FnOnce(Pid) + Send>;

enum DataDir {
    /// A temporary directory of the harness's.
    Temp,
    /// `--data-dir` this one.
    At(PathBuf),
    /// No `--data-dir`: the binary's default, `./deriva-data`, run from this directory.
    DefaultIn(PathBuf),
}

/// How to start the server; see [`ServerProcess::options`].
pub struct ServerOptions {
    binary: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    listener_flags: bool,
    data: DataDir,
    on_listening: Option<OnListening>,
}

impl ServerOptions {
    /// Runs this binary instead of [`server_bin`] (the campaign runs the release build).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = path.into();
        self
    }

    /// Adds flags (after the listener flags, before `--data-dir`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (the harness clears `RUST_LOG` and every `DERIVA_*` and
    /// `OTEL_*` variable of the test's environment).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Serves the store in `dir`, which the caller owns (to restart on it). By default the
    /// server has a temporary directory of its own.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.data = DataDir::At(dir.to_owned());
        self
    }

    /// Passes no `--data-dir` and runs in `cwd`, so the store is the default `./deriva-data`.
    pub fn default_data_dir_in(mut self, cwd: &Path) -> Self {
        self.data = DataDir::DefaultIn(cwd.to_owned());
        self
    }

    /// Passes no `--listen 127.0.0.1:0 --metrics-addr 127.0.0.1:0`: the test's own flags, or
    /// the defaults, decide.
    pub fn without_listener_flags(mut self) -> Self {
        self.listener_flags = false;
        self
    }

    /// Runs `f` with the server's pid on the thread that reads its stderr, the instant it reads
    /// the listening line: as soon after the announcement as any client could react.
    pub fn on_listening(mut self, f: impl FnOnce(Pid) + Send + 'static) -> Self {
        self.on_listening = Some(Box::new(f));
        self
    }

    /// Starts the server and waits until it says it listens; panics, with its stderr, if it
    /// does not within [`DEADLINE`].
    pub fn start(self) -> ServerProcess {
        let default_listeners = self.listener_flags;
        let mut server = self.spawn();
        server.wait_listening();
        if default_listeners {
            for addr in [Some(&server.grpc), server.metrics.as_ref()]
                .into_iter()
                .flatten()
            {
                assert!(addr.starts_with("127.0.0.1:"), "listening on {addr}");
            }
        }
        server
    }

    /// Runs a server that is expected to fail: waits for it to exit (within [`DEADLINE`]),
    /// whatever it logged meanwhile.
    pub fn run_to_exit(self) -> Exited {
        let mut server = self.spawn();
        let status = server.wait_exit(DEADLINE);
        Exited {
            status,
            stderr: server.stderr(),
        }
    }

    fn spawn(self) -> ServerProcess {
        let mut command = Command::new(&self.binary);
        // Only the flags and variables the test gives: nothing from the environment (a log
        // format, an OTLP endpoint, a listener).
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("DERIVA_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
                command.env_remove(&key);
            }
        }
        if self.listener_flags {
            command.args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]);
        }
        command.args(&self.args);
        let (temp, dir) = match self.data {
            DataDir::Temp => {
                let temp = tempfile::tempdir().unwrap();
                command.arg("--data-dir").arg(temp.path());
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
            DataDir::At(dir) => {
                command.arg("--data-dir").arg(&dir);
                (None, dir)
            }
            DataDir::DefaultIn(cwd) => {
                command.current_dir(&cwd);
                (None, cwd.join("deriva-data"))
            }
        };
        command
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        let pid = Pid::from_child(&child);
        let stderr = child.stderr.take().unwrap();
        let shared = Arc::new(Shared::default());

        // Keeps every line, and keeps draining so the server never blocks on a full pipe.
        let mut on_listening = self.on_listening;
        let lines = shared.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                let listening = line.contains(LISTENING);
                if listening && let Some(f) = on_listening.take() {
                    f(pid);
                }
                lines.update(|s| {
                    if listening && s.listening.is_none() {
                        s.listening = Some(s.lines.len());
                    }
                    s.lines.push(line);
                });
            }
            lines.update(|s| s.eof = true);
        });
        // Learns of the exit without reaping (WNOWAIT): the child stays a zombie, its pid not
        // reused, until `Child::wait` reaps it; so `Child::kill` never reaches another process.
        let exit = shared.clone();
        std::thread::spawn(move || {
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
            while let Err(rustix::io::Errno::INTR) =
                rustix::process::waitid(WaitId::Pid(pid), options)
            {}
            exit.update(|s| s.exited = true);
        });

        ServerProcess {
            child,
            pid,
            shared,
            grpc: String::new(),
            metrics: None,
            dir,
            started,
            startup: Duration::ZERO,
            status: None,
            _temp: temp,
        }
    }
}

/// What a server that exited on its own left: see [`ServerOptions::run_to_exit`].
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    /// Its whole stderr.
    pub stderr: String,
}

#[derive(Default)]
struct State {
    lines: Vec<String>,
    /// Index of the listening line in `lines`.
    listening: Option<usize>,
    /// The whole stderr has been read.
    eof: bool,
    /// The process has exited (not necessarily reaped yet).
    exited: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test must not turn every later look into a second panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until `done` holds, or `deadline` passes: the state then, and whether `done` held.
    fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&State) -> bool,
    ) -> (MutexGuard<'_, State>, bool) {
        let mut state = self.lock();
        loop {
            if done(&state) {
                return (state, true);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return (state, false);
            };
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A running `deriva-server`; see the module doc. Built by [`ServerProcess::start`] or
/// [`ServerProcess::options`].
pub struct ServerProcess {
    child: Child,
    pid: Pid,
    shared: Arc<Shared>,
    grpc: String,
    metrics: Option<String>,
    dir: PathBuf,
    started: Instant,
    startup: Duration,
    /// Once reaped.
    status: Option<ExitStatus>,
    _temp: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Both listeners on free ports of 127.0.0.1, a temporary data directory, no other flag.
    pub fn start() -> Self {
        Self::options().start()
    }

    /// [`ServerProcess::start`]'s defaults, to change.
    pub fn options() -> ServerOptions {
        ServerOptions {
            binary: server_bin(),
            args: Vec::new(),
            env: Vec::new(),
            listener_flags: true,
            data: DataDir::Temp,
            on_listening: None,
        }
    }

    fn wait_listening(&mut self) {
        let deadline = self.started + DEADLINE;
        let (state, listening) = self
            .shared
            .wait_until(deadline, |s| s.listening.is_some() || s.eof);
        let Some(at) = state.listening.filter(|_| listening) else {
            let why = if state.eof {
                "closed its stderr (exited?)"
            } else {
                "did not say so in time"
            };
            panic!(
                "deriva-server never said it was listening: it {why}; stderr:\n{}",
                state.lines.join("\n")
            );
        };
        let line = state.lines[at].clone();
        drop(state);
        self.startup = self.started.elapsed();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                .to_owned()
        };
        self.grpc = field("addr");
        self.metrics = Some(field("metrics")).filter(|m| m != "off");
    }

    /// `127.0.0.1:PORT` of the gRPC listener.
    pub fn grpc_addr(&self) -> &str {
        &self.grpc
    }

    /// `http://` and the gRPC address, as `deriva --server` takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `127.0.0.1:PORT` of the HTTP listener (`/metrics`); panics if it is off.
    pub fn metrics_addr(&self) -> &str {
        self.metrics
            .as_deref()
            .expect("the server's HTTP listener is off")
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// From spawn to the listening line.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    pub async fn client(&self) -> DerivaClient<Channel> {
        DerivaClient::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.grpc))
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30)
    }

    /// `GET /metrics`: the exposition, asserting a 200.
    pub async fn scrape(&self) -> String {
        crate::http::scrape(self.metrics_addr()).await
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> String {
        self.shared.lock().lines.join("\n")
    }

    /// The stderr lines after the listening line, so far.
    pub fn stderr_after_listening(&self) -> Vec<String> {
        let state = self.shared.lock();
        let from = state.listening.map_or(state.lines.len(), |i| i + 1);
        state.lines[from..].to_vec()
    }

    /// Waits (blocking) for a stderr line for which `matches` holds, and returns it; panics,
    /// naming `what`, if none comes within [`DEADLINE`].
    pub fn wait_for_stderr(&self, what: &str, mut matches: impl FnMut(&str) -> bool) -> String {
        let mut seen = 0;
        let mut found = None;
        let (state, _) = self.shared.wait_until(Instant::now() + DEADLINE, |s| {
            found = s.lines[seen..].iter().find(|l| matches(l)).cloned();
            seen = s.lines.len();
            found.is_some() || s.eof
        });
        found.unwrap_or_else(|| {
            panic!(
                "deriva-server logged no {what} (stderr closed: {}):\n{}",
                state.eof,
                state.lines.join("\n")
            )
        })
    }

    /// Sends `signal`; panics once the server is reaped (its pid may be another's by then).
    pub fn signal(&self, signal: Signal) {
        assert!(self.status.is_none(), "deriva-server has already exited");
        rustix::process::kill_process(self.pid, signal)
            .unwrap_or_else(|e| panic!("cannot send {signal:?} to deriva-server: {e}"));
    }

    /// SIGTERM, then [`ServerProcess::wait_exit`] within [`DEADLINE`].
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::TERM);
        self.wait_exit(DEADLINE)
    }

    /// Waits until the server has exited and its whole stderr is read, then reaps it; panics
    /// if that takes longer than `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let (state, done) = self
            .shared
            .wait_until(Instant::now() + within, |s| s.exited && s.eof);
        if !done {
            panic!(
                "deriva-server did not exit within {within:?}; stderr:\n{}",
                state.lines.join("\n")
            );
        }
        drop(state);
        let status = self.child.wait().expect("cannot reap deriva-server");
        self.status = Some(status);
        status
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.child.kill().expect("cannot kill deriva-server");
        self.status = Some(self.child.wait().expect("cannot reap deriva-server"));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `s` without ANSI escape sequences (CSI: ESC [ params final-byte).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
