//! [`Prometheus`]: a real Prometheus on a port it picks itself, and its query API.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::http::http_get;

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
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
