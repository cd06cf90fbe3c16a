//! Helpers shared by the server's integration tests: the two server harnesses, [`InProcess`]
//! (the server function in the test's runtime) and [`ServerProcess`] (the real binary), a real
//! [`Prometheus`], a minimal HTTP client, exposition parsing, RPC shorthands and a seeded PRNG.
//!
//! Every test file compiles this module for itself and uses part of it.

#![allow(dead_code)]

pub mod ca;
pub mod http;
pub mod in_process;
pub mod process;
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
    process::{SERVER, ServerProcess},
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

/// Files in a temporary directory of their own (removed with it): certificates, keys, token
/// files.
#[derive(Debug)]
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes `text` to `name` in the directory; its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes `text` to `name` with `mode` (also when it exists with another one); its path.
    pub fn write_mode(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.write(name, text);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

/// The lines of a token file (`--auth-tokens`), one per `(token, scopes, name)`.
pub fn token_lines(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(token, scopes, name)| {
            format!("{} {scopes} {name}\n", deriva_util::token::hashed(token))
        })
        .collect()
}

/// A token file `tokens` in `dir` with those entries; its path.
pub fn token_file(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, token_lines(entries)).unwrap();
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

/// An address as 64 hex characters.
pub fn hex(addr: &Bytes) -> String {
    deriva_core::CAddr::from_slice(addr).unwrap().to_hex()
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

/// The rows of a metrics table of README.md: the table under `heading`, up to the next
/// heading. Each row: the family, its type, and its buckets (or an empty cell).
pub fn readme_metrics(heading: &str) -> Vec<(String, String, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README has no {heading:?}"))
        .split("\n#")
        .next()
        .unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `deriva_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                format!("deriva_{}", cells[0].trim_end_matches('`')),
                cells[1].to_owned(),
                cells[3].to_owned(),
            )
        })
        .collect()
}

/// Polls `done` every 20 ms until it holds; panics naming `what` after [`DEADLINE`].
#[allow(dead_code)]
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
