//! Helpers shared by the server's integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deriva_server::proto::deriva_client::DerivaClient;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// The server binary the tests start.
pub const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");

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

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET http://{addr}{path_and_query}` with `Connection: close`; enough for /metrics, the
/// health endpoints and the Prometheus query API. Handles `Content-Length` and chunked bodies.
pub async fn http_get(addr: &str, path_and_query: &str) -> std::io::Result<HttpResponse> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timed out"))??;
    let request =
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

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

/// Fails, with how to fix it, when `tool` is not installed.
pub fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not installed (or not on PATH): this test runs the real Prometheus. \
         Run `bash .ci/run` (it installs it), or `apt-get install -y prometheus` as root."
    );
}

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

/// A real Prometheus on a port it binds itself (`127.0.0.1:0`, read back from its log), with
/// its config and data in a temporary directory.
pub struct Prometheus {
    child: Killed,
    /// `127.0.0.1:PORT` of its HTTP API, known once [`Prometheus::wait_ready`] returns.
    pub addr: String,
    /// Every line it has logged so far.
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scraping `target` every second, as job `deriva`.
    pub fn start(target: &str) -> Self {
        Self::start_with(
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: deriva\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
            &[],
        )
    }

    /// With `config` as `prometheus.yml`, and each of `files` copied next to it (rule files,
    /// which Prometheus resolves relative to the config file).
    pub fn start_with(config: &str, files: &[&Path]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        for file in files {
            let name = file.file_name().unwrap();
            std::fs::copy(file, dir.path().join(name))
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", file.display()));
        }
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start prometheus");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child: Killed(child),
            addr: String::new(),
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The address in its `msg="Listening on" address=127.0.0.1:PORT` line, once logged.
    fn listening_on(&self) -> Option<String> {
        self.log.lock().unwrap().iter().find_map(|line| {
            let (_, rest) = line.split_once("msg=\"Listening on\"")?;
            let addr = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))?;
            Some(addr.trim_matches('"').to_owned())
        })
    }

    /// Waits until it has said where it listens and `/-/ready` answers 200 there.
    pub async fn wait_ready(&mut self, deadline: Instant) {
        loop {
            if self.addr.is_empty()
                && let Some(addr) = self.listening_on()
            {
                self.addr = addr;
            }
            if !self.addr.is_empty()
                && let Ok(r) = http_get(&self.addr, "/-/ready").await
                && r.status == 200
            {
                return;
            }
            if let Some(status) = self.child.0.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` of the HTTP API, as JSON; `Err` with the whole answer unless it is a 200 with
    /// `"status":"success"`.
    pub async fn api(&self, path: &str) -> Result<Value, String> {
        let r = http_get(&self.addr, path)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let json: Value = serde_json::from_str(&r.body)
            .map_err(|e| format!("HTTP {}, not JSON ({e}): {}", r.status, r.body))?;
        if r.status != 200 || json["status"] != "success" {
            return Err(format!("HTTP {}: {}", r.status, r.body));
        }
        Ok(json)
    }

    /// `/api/v1/query`: the series of the instant vector `promql` answers, or why not (an error,
    /// or an answer that is not a vector).
    pub async fn try_query(&self, promql: &str) -> Result<Vec<Series>, String> {
        let json = self
            .api(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await?;
        if json["data"]["resultType"] != "vector" {
            return Err(format!("not an instant vector: {json}"));
        }
        json["data"]["result"]
            .as_array()
            .ok_or_else(|| format!("no result array: {json}"))?
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("bad sample {s} in {json}"))?;
                Ok(Series {
                    labels: s["metric"].clone(),
                    value,
                })
            })
            .collect()
    }

    /// `/api/v1/query`: asserts `"status":"success"` and a vector, and returns its series.
    pub async fn query(&self, promql: &str) -> Vec<Series> {
        self.try_query(promql)
            .await
            .unwrap_or_else(|e| panic!("{promql}: {e}"))
    }

    /// The value of the one series `promql` answers, polling until there is exactly one and it
    /// satisfies `ok`.
    pub async fn poll_one(&self, promql: &str, deadline: Instant, ok: impl Fn(f64) -> bool) -> f64 {
        loop {
            let result = self.query(promql).await;
            if let [one] = result.as_slice()
                && ok(one.value)
            {
                return one.value;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} never answered as expected; last answer: {result:?}\nprometheus:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One series of an instant vector.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: Value,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> &str {
        self.labels[name].as_str().unwrap_or("")
    }
}

/// An address where nothing listens: port 1 (tcpmux) is never handed out by a bind to port 0,
/// so unlike a port that was free a moment ago no other test can take it meanwhile.
pub const NOWHERE: &str = "127.0.0.1:1";

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
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

/// `PutLeaf`, unwrapped: the address.
pub async fn put_leaf(client: &mut DerivaClient<Channel>, data: &[u8]) -> bytes::Bytes {
    let req = deriva_server::proto::PutLeafRequest {
        data: bytes::Bytes::copy_from_slice(data),
    };
    client.put_leaf(req).await.unwrap().into_inner().addr
}

/// `PutRecipe` of `function/v1`, unwrapped: the address.
pub async fn put_recipe(
    client: &mut DerivaClient<Channel>,
    function: &str,
    inputs: &[&bytes::Bytes],
    params: &[(&str, &str)],
) -> bytes::Bytes {
    let req = deriva_server::proto::PutRecipeRequest {
        function_name: function.to_owned(),
        function_version: "v1".to_owned(),
        inputs: inputs.iter().map(|&i| i.clone()).collect(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    client.put_recipe(req).await.unwrap().into_inner().addr
}

/// All the bytes of a Get, or its status.
pub async fn get_all(
    client: &mut DerivaClient<Channel>,
    addr: &bytes::Bytes,
) -> Result<Vec<u8>, tonic::Status> {
    let req = deriva_server::proto::GetRequest { addr: addr.clone() };
    let mut stream = client.get(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.chunk);
    }
    Ok(out)
}
