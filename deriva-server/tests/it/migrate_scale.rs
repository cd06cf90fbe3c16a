//! `deriva-server migrate` in bounded memory (issue 32): an index of 2,000,000 leaf rows,
//! written straight into PostgreSQL, and a `--dry-run` from it to a local directory, run as a
//! real process. It reads the source a page at a time, so its peak resident set (`ru_maxrss`
//! from `wait4(2)`, the kernel's own figure, not a poll) stays at most 96 MiB; gathering the
//! whole listing first took 357 MiB. Its report counts every leaf and recipe.

use std::process::{Command, Stdio};
use std::time::Instant;

use deriva_server::migrate::Report;
use deriva_testkit::backends::{Backends, Fill, Space, fill_index, node};

/// The server binary cargo built for these tests.
const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");
const FILL: Fill = Fill {
    leaves: 2_000_000,
    leaf_bytes: 1000,
    recipes: 1000,
};
/// The most the dry run may hold resident, in KiB.
const BUDGET_KIB: i64 = 96 << 10;

/// Runs its arguments as a child, waits for it with `os.wait4` and prints the child's peak
/// resident set in KiB (`ru_maxrss`) on its own last line of stderr; exits with the child's
/// status. (Rust's standard library reaps without the rusage, and this workspace forbids the
/// `unsafe` a direct `wait4(2)` would need.)
const PEAK_WRAPPER: &str = "import os, sys
pid = os.spawnv(os.P_NOWAIT, sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write('\\npeak-rss-kib %d\\n' % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_from_two_million_leaf_rows_holds_at_most_96_mib() {
    // A pair of its own: the 2,000,000 rows go away with it.
    let services = Backends::start();
    let space = Space::new("migscale");
    // A first node creates the schema; then the rows go straight in.
    let mut first = node(&services, &space, &[]);
    first.stop();
    fill_index(&services.pg_url(), &space.schema, FILL).await;

    let destination = tempfile::tempdir().expect("a temporary directory");
    let mut command = Command::new("python3");
    command.args(["-c", PEAK_WRAPPER, SERVER]);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("DERIVA_") || name.starts_with("AWS_") {
            command.env_remove(&key);
        }
    }
    command
        .envs(services.aws_env())
        .arg("migrate")
        .args([
            "--blob-store",
            &format!("s3://{}/{}", services.bucket(), space.prefix),
        ])
        .args([
            "--index",
            &services.pg_url(),
            "--index-schema",
            &space.schema,
        ])
        .arg("--to-data-dir")
        .arg(destination.path().join("store"))
        .args(["--dry-run", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let out = command
        .output()
        .expect("running deriva-server migrate under python3");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let peak_kib: i64 = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("peak-rss-kib "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS from the wrapper:\n{stderr}"));
    eprintln!(
        "migrate --dry-run over {} leaf rows: {:?}, peak RSS {} KiB ({:.1} MiB)",
        FILL.leaves,
        started.elapsed(),
        peak_kib,
        peak_kib as f64 / 1024.0
    );
    assert!(
        out.status.success(),
        "migrate --dry-run failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: Report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("a JSON report: {e}: {stdout}"));
    assert_eq!(report.mode, "dry-run");
    let leaves = FILL.leaves as u64;
    assert_eq!(
        (
            report.leaves.copied,
            report.leaves.skipped,
            report.leaves.failed
        ),
        (leaves, 0, 0),
        "every leaf would be copied: {report:?}"
    );
    assert_eq!(report.leaves.bytes, leaves * FILL.leaf_bytes as u64);
    assert_eq!(report.recipes.copied, FILL.recipes as u64, "{report:?}");
    assert!(
        peak_kib <= BUDGET_KIB,
        "migrate --dry-run peaked at {peak_kib} KiB, above {BUDGET_KIB} KiB"
    );
}
