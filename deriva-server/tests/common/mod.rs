//! Helpers shared by the server's integration tests: the server harnesses, [`InProcess`]
//! (the server function in the test's runtime) and the real binary's, a real
//! [`Prometheus`], a minimal HTTP client, exposition parsing, RPC shorthands and a seeded PRNG.
//!
//! Every test file compiles this module for itself and uses part of it.

#![allow(dead_code)]

pub mod http;
pub mod in_process;
pub mod prometheus;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{GetRequest, PutLeafRequest, PutRecipeRequest};
use tonic::transport::Channel;

// Each test file uses some of these.
#[allow(unused_imports)]
pub use self::{
    http::{HttpResponse, http_get, scrape},
    in_process::InProcess,
    prometheus::{Prometheus, Series, percent_encode, require, unix_now},
};

/// The `deriva` client binary, next to [`SERVER`] in cargo's output directory.
///
/// It belongs to `deriva-cli`, so cargo builds it for `cargo test --workspace` and
/// `cargo build -p deriva-cli`, but not for this package's tests alone; without it, this panics
/// and says so. (A `deriva` built before the client's last change is used as it is.)
pub fn deriva_bin() -> PathBuf {
    let name = format!("deriva{}", std::env::consts::EXE_SUFFIX);
    let path = Path::new(SERVER).with_file_name(name);
    assert!(
        path.is_file(),
        "the deriva binary is not at {}: it belongs to deriva-cli, which these tests do not \
         build; run `cargo build -p deriva-cli` first (with --release for release tests), or \
         `cargo test --workspace`",
        path.display()
    );
    path
}

/// Every wait of the tests that run the binaries ends by this long after it starts.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A small deterministic PRNG (SplitMix64) for generated test inputs; print the seed on failure.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// From `DERIVA_SEED` when set, else from the clock; prints the seed.
    pub fn from_env(what: &str) -> Self {
        let seed = std::env::var("DERIVA_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (rerun with DERIVA_SEED={seed})");
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// How many times longer the long forms of the reliability campaigns run: `DERIVA_LONG`
/// (`1` means 10×, any other number that factor), else 1.
pub fn long_factor() -> u64 {
    match std::env::var("DERIVA_LONG").ok().as_deref() {
        None | Some("") | Some("0") => 1,
        Some("1") => 10,
        Some(n) => n.parse().unwrap_or(10),
    }
}

/// Captures log output written by a `tracing_subscriber` fmt layer.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// An address where nothing listens: port 1 (tcpmux) is never handed out by a bind to port 0,
/// so unlike a port that was free a moment ago no other test can take it meanwhile.
pub const NOWHERE: &str = "127.0.0.1:1";

/// The value of one sample line of a Prometheus exposition, e.g.
/// `deriva_rpc_total{method="get",status="ok"}`.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `# TYPE` lines of an exposition: (family, type).
pub fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

/// `PutLeaf`, unwrapped: the address.
pub async fn put_leaf(client: &mut DerivaClient<Channel>, data: &[u8]) -> Bytes {
    let req = PutLeafRequest {
        data: Bytes::copy_from_slice(data),
    };
    client.put_leaf(req).await.unwrap().into_inner().addr
}

/// `PutRecipe` of `function/v1`: the address, or the status.
pub async fn try_put_recipe(
    client: &mut DerivaClient<Channel>,
    function: &str,
    inputs: &[&Bytes],
    params: &[(&str, &str)],
) -> Result<Bytes, tonic::Status> {
    let req = PutRecipeRequest {
        function_name: function.to_owned(),
        function_version: "v1".to_owned(),
        inputs: inputs.iter().map(|&i| i.clone()).collect(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    client.put_recipe(req).await.map(|r| r.into_inner().addr)
}

/// `PutRecipe` of `function/v1`, unwrapped: the address.
pub async fn put_recipe(
    client: &mut DerivaClient<Channel>,
    function: &str,
    inputs: &[&Bytes],
    params: &[(&str, &str)],
) -> Bytes {
    try_put_recipe(client, function, inputs, params)
        .await
        .unwrap()
}

/// Every chunk of a Get, or its status.
pub async fn get_chunks(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
) -> Result<Vec<Bytes>, tonic::Status> {
    let req = GetRequest { addr: addr.clone() };
    let mut stream = client.get(req).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(msg) = stream.message().await? {
        chunks.push(msg.chunk);
    }
    Ok(chunks)
}

/// All the bytes of a Get, or its status.
pub async fn get_all(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
) -> Result<Vec<u8>, tonic::Status> {
    Ok(get_chunks(client, addr).await?.concat())
}

// ---------------------------------------------------------------------------------------------
// The older child-process harnesses, until every test file is on `ServerProcess`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

/// The server binary the tests start.
pub const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server binary, on free ports, with `--verification dual`, on a temporary data
/// directory. Everything else is [`ServerOnDir`]'s.
pub struct DerivaServer {
    server: ServerOnDir,
    _data: tempfile::TempDir,
}

impl DerivaServer {
    pub fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let server = ServerOnDir::start(data.path(), &["--verification", "dual"]);
        assert!(server.grpc.starts_with("127.0.0.1:"), "{}", server.grpc);
        assert!(
            server.metrics.starts_with("127.0.0.1:"),
            "{}",
            server.metrics
        );
        Self {
            server,
            _data: data,
        }
    }
}

impl std::ops::Deref for DerivaServer {
    type Target = ServerOnDir;

    fn deref(&self) -> &ServerOnDir {
        &self.server
    }
}

/// The server binary on free ports over a data directory the caller owns, so a test can kill it
/// (SIGKILL, with [`ServerOnDir::kill`]) and start it again on the same directory.
pub struct ServerOnDir {
    child: Killed,
    /// gRPC address.
    pub grpc: String,
    /// HTTP address of `/metrics`.
    pub metrics: String,
    /// Every stderr line so far, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    /// From spawn to the "listening" line.
    pub startup: Duration,
}

/// The server binary with `extra` flags on `dir`, both listeners on ports it picks itself
/// (`127.0.0.1:0`, announced in its listening line), no logging or OTLP settings from the
/// environment, and stderr piped.
pub fn server_command(dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(SERVER);
    command
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("DERIVA_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl ServerOnDir {
    /// Starts `deriva-server` on `dir` with `extra` flags, and waits until it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let started = Instant::now();
        let child = server_command(dir, extra).spawn().unwrap();
        let mut child = Killed(child);
        let stderr = child.0.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("deriva-server listening") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|e| {
            panic!(
                "deriva-server never said it was listening ({e}); stderr:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
        let startup = started.elapsed();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        Self {
            grpc: field("addr="),
            metrics: field("metrics="),
            child,
            log,
            startup,
        }
    }

    pub async fn client(&self) -> DerivaClient<Channel> {
        DerivaClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.grpc))
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30)
    }

    pub async fn scrape(&self) -> String {
        let r = http_get(&self.metrics, "/metrics").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }
}
