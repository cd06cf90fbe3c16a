//! Real SeaweedFS and PostgreSQL for tests, started and stopped by `deriva-testkit/backends.sh`
//! (the same script the benchmarks and `.ci/run` use).
//!
//! - [`Backends::start`]: a pair of this test's own, in a temporary directory, stopped (by
//!   pid, through the script) when dropped; for tests that stop or kill them.
//! - [`shared`]: one pair for every test of a binary that leaves them running; started by the
//!   first test that asks, stopped when the last one using them is done.
//!
//! `weed` comes from `$DERIVA_WEED`, the PATH, or the virtual environment `.ci/run` installs;
//! PostgreSQL from Debian's package. Without them, the start fails and says how to install.
//!
//! With the `server` feature: a place of each test's own in them ([`Space`]), a node on them
//! ([`node`]), and waiting for a condition ([`wait_for`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
#[cfg(feature = "server")]
use std::time::{Duration, Instant};

#[cfg(feature = "server")]
use crate::DEADLINE;

/// One SeaweedFS and one PostgreSQL, with all their state in a temporary directory.
#[derive(Debug)]
pub struct Backends {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("backends.sh")
}

impl Backends {
    /// Starts both on free loopback ports; waits until each answers a real request.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("deriva-backends-")
            .tempdir()
            .expect("a temporary directory");
        let mut backends = Self {
            dir,
            env: BTreeMap::new(),
        };
        backends.run("start", "all");
        let env_file = backends.dir.path().join("env");
        let text = std::fs::read_to_string(&env_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", env_file.display()));
        backends.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        backends
    }

    fn run(&self, command: &str, which: &str) {
        let out = Command::new("bash")
            .arg(script())
            .arg(command)
            .arg(self.dir.path())
            .arg(which)
            .output()
            .expect("running backends.sh");
        assert!(
            out.status.success(),
            "backends.sh {command} {which} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn get(&self, key: &str) -> String {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("backends.sh wrote no {key}"))
            .clone()
    }

    /// The directory holding both services' state (see `backends.sh`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The settings the script wrote (`DERIVA_TEST_*`).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// The recorded pid of `which` (`weed`, or `pg` for the postmaster), if it runs.
    pub fn pid(&self, which: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(format!("{which}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn s3_endpoint(&self) -> String {
        self.get("DERIVA_TEST_S3_ENDPOINT")
    }

    /// The same S3 service over https, `https://127.0.0.1:PORT`; its certificate is signed by
    /// [`Backends::tls_ca`] for `localhost` and `127.0.0.1`.
    pub fn s3_https_endpoint(&self) -> String {
        self.get("DERIVA_TEST_S3_HTTPS_ENDPOINT")
    }

    /// The test CA (PEM file) that signed both services' certificates; its key is beside it
    /// (`ca.key`), for tests that issue client certificates.
    pub fn tls_ca(&self) -> PathBuf {
        PathBuf::from(self.get("DERIVA_TEST_TLS_CA"))
    }

    /// PostgreSQL's port.
    pub fn pg_port(&self) -> u16 {
        let url = self.pg_url();
        let port = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or_else(|| panic!("no port in {url}"));
        port.parse()
            .unwrap_or_else(|e| panic!("the port of {url}: {e}"))
    }

    /// The bucket, which exists.
    pub fn bucket(&self) -> String {
        self.get("DERIVA_TEST_S3_BUCKET")
    }

    /// The S3 access key id.
    pub fn access_key(&self) -> String {
        self.get("DERIVA_TEST_AWS_ACCESS_KEY_ID")
    }

    /// The S3 secret key.
    pub fn secret_key(&self) -> String {
        self.get("DERIVA_TEST_AWS_SECRET_ACCESS_KEY")
    }

    /// `postgres://deriva@127.0.0.1:PORT/deriva`.
    pub fn pg_url(&self) -> String {
        self.get("DERIVA_TEST_PG_URL")
    }

    /// The `AWS_*` variables a server needs to reach the object store.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.s3_endpoint()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key()),
        ]
    }

    /// Whether the bucket holds an object at `key`: a signed HEAD with curl (as
    /// `backends.sh` makes its probes), which answers 200 or 404.
    pub fn object_exists(&self, key: &str) -> bool {
        let url = format!("{}/{}/{key}", self.s3_endpoint(), self.bucket());
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                "-I",
            ])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{}:{}", self.access_key(), self.secret_key()))
            .arg(&url)
            .output()
            .expect("running curl");
        match String::from_utf8_lossy(&out.stdout).trim() {
            "200" => true,
            "404" => false,
            other => panic!(
                "HEAD {url}: HTTP {other:?}, {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Stops `which` (`weed`, `pg` or `all`) cleanly.
    pub fn stop(&self, which: &str) {
        self.run("stop", which);
    }

    /// Kills `which` (`weed` or `pg`) with SIGKILL: a crash.
    pub fn kill(&self, which: &str) {
        self.run("kill", which);
    }

    /// Starts `which` again, at the same address and with the same data.
    pub fn start_again(&self, which: &str) {
        self.run("start", which);
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        // Never panics: a failed stop is reported, and the pids are in the directory's files.
        match Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .arg("all")
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "backends.sh stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("backends.sh stop could not run: {e}"),
        }
    }
}

static SHARED: Mutex<Weak<Backends>> = Mutex::new(Weak::new());

/// The pair shared by the tests of this binary (all of a crate's, in one process) that leave
/// them running.
pub fn shared() -> Arc<Backends> {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(running) = slot.upgrade() {
        return running;
    }
    let started = Arc::new(Backends::start());
    *slot = Arc::downgrade(&started);
    started
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A place of its own in the shared services for one test: a key prefix and a schema.
#[derive(Debug)]
pub struct Space {
    /// The key prefix in the bucket.
    pub prefix: String,
    /// The PostgreSQL schema.
    pub schema: String,
}

impl Space {
    /// A new place, named after `test`.
    pub fn new(test: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{test}_{}_{n}", std::process::id());
        Self {
            prefix: format!("cluster-{tag}"),
            schema: format!("t_{tag}"),
        }
    }
}

/// A node on `services`, in `space`, with `extra` flags.
#[cfg(feature = "server")]
pub fn node(services: &Backends, space: &Space, extra: &[&str]) -> crate::ServerProcess {
    on_backends(crate::ServerProcess::options(), services, space, extra).start()
}

/// `options` with the flags and environment of a node on `services`, in `space`, and `extra`
/// flags.
#[cfg(feature = "server")]
pub fn on_backends(
    options: crate::process::ServerOptions,
    services: &Backends,
    space: &Space,
    extra: &[&str],
) -> crate::process::ServerOptions {
    let mut options = options
        .args([
            "--blob-store".to_owned(),
            format!("s3://{}/{}", services.bucket(), space.prefix),
            "--index".to_owned(),
            services.pg_url(),
            "--index-schema".to_owned(),
            space.schema.clone(),
        ])
        .args(extra.iter().copied());
    for (key, value) in services.aws_env() {
        options = options.env(key, value);
    }
    options
}

/// Waits until PostgreSQL has no session left named `application_name` whose last statement
/// is LIKE `query_like` (`"%"` for any). A session's statement runs to its end after its client
/// has died, and its backend flushes its table statistics only as it exits: after this, what
/// those sessions wrote and read is in the tables and in `pg_stat_user_tables`.
#[cfg(feature = "server")]
pub async fn sessions_ended(pg: &tokio_postgres::Client, application_name: &str, query_like: &str) {
    wait_for("PostgreSQL sessions to end", async || {
        pg.query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE $2",
            &[&application_name, &query_like],
        )
        .await
        .expect("reading pg_stat_activity")
        .get::<_, i64>(0)
            == 0
    })
    .await;
}

/// What [`fill_index`] writes: `leaves` leaf rows of `leaf_bytes` bytes each (addresses 1, 2,
/// … as 32-byte big-endian numbers, with no object behind them) and `recipes` recipe rows of
/// depth 1 whose encoding is no recipe (never read by the tests that fill).
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    /// Leaf rows.
    pub leaves: i64,
    /// The size each leaf row records.
    pub leaf_bytes: i64,
    /// Recipe rows.
    pub recipes: i64,
}

/// Writes the rows of `fill` straight into the index schema `schema` (created by a node
/// already) over a connection of its own to `url`, as an operator's import would: the
/// schema's triggers count them. Returns once that connection is closed; the caller waits for
/// its session to end ([`sessions_ended`]) if it reads the statistics.
#[cfg(feature = "server")]
pub async fn fill_index(url: &str, schema: &str, fill: Fill) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    let connection = tokio::spawn(connection);
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO {s}.leaves (addr, size)
                 SELECT decode(lpad(to_hex(i), 64, '0'), 'hex'), {bytes}
                 FROM generate_series(1, {leaves}) i;
             INSERT INTO {s}.recipes (addr, encoding, depth)
                 SELECT sha256(int4send(i)), 'not read', 1 FROM generate_series(1, {recipes}) i;",
            s = format_args!("\"{schema}\""),
            bytes = fill.leaf_bytes,
            leaves = fill.leaves,
            recipes = fill.recipes,
        ))
        .await
        .expect("filling the index");
    eprintln!(
        "{} leaf rows and {} recipe rows written in {:?}",
        fill.leaves,
        fill.recipes,
        started.elapsed()
    );
    drop(client);
    connection
        .await
        .expect("the connection task")
        .expect("the connection");
}

/// Waits until `done` holds, asking again every 20 ms, for at most [`DEADLINE`].
#[cfg(feature = "server")]
pub async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
