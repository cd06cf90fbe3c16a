//! What the integration tests of Deriva's crates share: the two server harnesses,
//! [`InProcess`] (the server function in the test's runtime) and [`ServerProcess`] (the real
//! binary), real SeaweedFS and PostgreSQL ([`backends`]), a real [`Prometheus`], the `deriva`
//! binary's runner ([`cli`]), the engine harness of `deriva-compute`'s tests ([`compute`]), a
//! minimal HTTP client and scraping, exposition parsing, a test CA, token files, RPC
//! shorthands and a seeded PRNG.
//!
//! A dev-dependency only, never published. Each crate's tests are one binary
//! (`tests/it/main.rs`), so everything here runs in a process shared with other tests: nothing
//! here sets a global (subscriber, meter provider, environment variable, current directory).
//!
//! Features keep a crate's tests from building what they do not use: `server` (the server
//! harnesses and everything that speaks to a server) and `compute` (the engine harness). The
//! rest (backends, the CLI runner, exposition parsing, files, the PRNG) needs neither.

#![allow(missing_debug_implementations)]

pub mod backends;
#[cfg(feature = "server")]
pub mod ca;
pub mod cli;
#[cfg(feature = "compute")]
pub mod compute;
pub mod exposition;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod in_process;
#[cfg(feature = "server")]
pub mod process;
#[cfg(feature = "server")]
pub mod prometheus;
#[cfg(feature = "server")]
pub mod rpc;

#[cfg(feature = "server")]
pub use self::{
    http::{HttpResponse, http_get, scrape},
    in_process::InProcess,
    process::{ServerProcess, server_bin},
    prometheus::{Prometheus, Series, percent_encode, require, unix_now},
    rpc::{get_all, get_chunks, put_leaf, put_recipe, try_put_recipe},
};
pub use exposition::{families, sample};

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The `deriva` client binary, in cargo's output directory beside the test binary's.
///
/// It belongs to `deriva-cli`, so cargo builds it for `cargo test --workspace` and
/// `cargo build -p deriva-cli`, but not for this package's tests alone; without it, this panics
/// and says so. (A `deriva` built before the client's last change is used as it is.)
pub fn deriva_bin() -> PathBuf {
    let name = format!("deriva{}", std::env::consts::EXE_SUFFIX);
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "the deriva binary is not at {}: it belongs to deriva-cli, which these tests do not \
         build; run `cargo build -p deriva-cli` first (with --release for release tests), or \
         `cargo test --workspace`",
        path.display()
    );
    path
}

/// Cargo's output directory for binaries (`target/debug`, `target/release`): the test binary
/// runs from its `deps` subdirectory.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the test binary's directory");
    if dir.ends_with("deps") {
        dir.parent().expect("cargo's output directory").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Files in a temporary directory of their own (removed with it): certificates, keys, token
/// files.
#[derive(Debug)]
pub struct Files {
    dir: tempfile::TempDir,
}

impl Default for Files {
    fn default() -> Self {
        Self::new()
    }
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

    /// `len` random letters `a` and `b`: slow to gzip, since every match is short (1 MiB at
    /// level 6 takes about 2 s in a debug build; 16 MiB at level 9 about 16 s in release).
    pub fn ab_letters(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let bits = self.next_u64();
            let n = (len - out.len()).min(64);
            out.extend((0..n).map(|i| b'a' + ((bits >> i) & 1) as u8));
        }
        out
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
