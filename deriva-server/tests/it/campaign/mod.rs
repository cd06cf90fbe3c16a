//! The hostile-client campaign (issue 30): the release `deriva-server` attacked as a hostile or
//! careless user would, one module per front. Each finding of that issue is a test here that
//! failed on the binary before it; the fan-out, the deep chain and the random attacks of `fuzz`
//! bound what passed then too. RELIABILITY.md lists each attack with its result and its test.
//!
//! `.ci/run` builds the release binaries and points `DERIVA_CAMPAIGN_SERVER` at
//! `target/release/deriva-server`; without it (a plain `cargo test`), the campaign attacks the
//! debug build cargo made for this test.
//!
//! | module | front |
//! |---|---|
//! | `compute` | recipes that would run away: huge counts, timeouts, shutdown during a compute, a 10,000-input fan-out and a 10,000-level chain |
//! | `connections` | sockets that send a byte and wait, slow headers, idle connections, on both listeners |
//! | `tls_reload` | mutual TLS on the HTTP listener, SIGHUP reloads, file permissions |
//! | `secrets` | passwords in `--help`, `--print-config`, `/debug`, logs and spans |
//! | `gaps` | readiness floods, paths in errors, forced traces, `Explain` of another caller's trace, GC grace, the output tier |
//! | `fuzz` | random bytes and random valid-looking gRPC frames at both listeners |

mod compute;
mod connections;
mod fuzz;
mod gaps;
mod secrets;
mod tls_reload;

use std::path::PathBuf;

use deriva_testkit::process::{ServerOptions, ServerProcess};

/// The server binary under attack: `DERIVA_CAMPAIGN_SERVER` when set (`.ci/run`: the release
/// build), else the debug build of this test run.
fn server_bin() -> PathBuf {
    std::env::var_os("DERIVA_CAMPAIGN_SERVER")
        .filter(|p| !p.is_empty())
        .map_or_else(deriva_testkit::server_bin, PathBuf::from)
}

/// The `deriva` client beside [`server_bin`] when there is one there, else the one
/// [`deriva_testkit::deriva_bin`] finds.
fn cli_bin() -> PathBuf {
    let beside = server_bin().with_file_name(format!("deriva{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        beside
    } else {
        deriva_testkit::deriva_bin()
    }
}

/// [`ServerProcess::options`] for [`server_bin`].
fn server() -> ServerOptions {
    ServerProcess::options().binary(server_bin())
}

/// The harness itself: the binary under attack starts, and the client beside it reaches it.
#[test]
fn the_campaign_attacks_a_running_binary() {
    let bin = server_bin();
    eprintln!("campaign: attacking {}", bin.display());
    let server = server().start();
    let out = std::process::Command::new(cli_bin())
        .args(["--server", &server.url(), "status"])
        .env_remove("DERIVA_SERVER")
        .env_remove("DERIVA_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deriva status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
