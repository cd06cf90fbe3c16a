//! The `deriva` command line: [`CliArgs`] and [`Command`], the clap types that parse it, and
//! the parsers of the values clap leaves as strings (addresses and `key=value` params).
//!
//! Those values are checked before any RPC, so bad input fails the same way whether or not a
//! server is running: a [`CliError::Usage`], exit code 2.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use deriva_core::CAddr;

use crate::bench::BenchArgs;
use crate::client::CliError;

/// The server the client talks to when given neither `--server` nor `DERIVA_SERVER`.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// `deriva`: the command-line client of a Deriva server.
#[derive(Debug, Parser)]
#[command(
    name = "deriva",
    version,
    about = "Command-line client of a Deriva server: store leaves and recipes, fetch their bytes",
    long_about = "Command-line client of a Deriva server, a computation-addressed store. Leaves \
                  are stored by their BLAKE3 address; recipes (a function, input addresses and \
                  params) have addresses too and are materialized on demand. Addresses are \
                  printed and accepted as 64 hex characters."
)]
pub struct CliArgs {
    /// URL of the server: http://HOST:PORT, or https://HOST:PORT for a server with TLS (a bare
    /// HOST:PORT means http://HOST:PORT).
    #[arg(
        long,
        global = true,
        env = "DERIVA_SERVER",
        hide_env_values = true,
        default_value = DEFAULT_SERVER,
        value_name = "URL"
    )]
    pub server: String,
    /// Print this command's trace id to stderr (to look it up in Jaeger), and ask the server to
    /// sample the trace whatever its sampling ratio.
    #[arg(long, global = true)]
    pub trace: bool,
    /// The bearer token to send, for a server started with --auth-tokens (better given as
    /// DERIVA_TOKEN: a flag shows in the process list).
    #[arg(
        long,
        global = true,
        env = "DERIVA_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Trust the server's certificate if this CA (PEM) issued it, instead of the system's CAs
    /// (https:// URLs).
    #[arg(long, global = true, env = "DERIVA_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to a server that requires one (mutual TLS); needs
    /// --tls-key.
    #[arg(long, global = true, env = "DERIVA_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "DERIVA_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// `deriva token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a fresh random token. Prints the token (give it to the client, e.g. as
    /// DERIVA_TOKEN; it is shown only now), then the line to add to the server's
    /// --auth-tokens file (its SHA-256, never the token). Needs no server.
    New {
        /// What the token may do: read, write, admin, comma-separated.
        #[arg(long, value_name = "SCOPES", value_parser = scopes_arg)]
        scopes: String,
        /// The name logs and spans give the caller (auth.name).
        #[arg(long, value_parser = name_arg)]
        name: String,
    },
}

fn scopes_arg(s: &str) -> Result<String, String> {
    deriva_util::token::parse_scopes(s).map(|_| s.to_owned())
}

fn name_arg(s: &str) -> Result<String, String> {
    deriva_util::token::check_name(s).map(|()| s.to_owned())
}

/// The `deriva` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a file (or stdin) as a leaf and print its address. Above 8 MiB it is streamed
    /// (PutLeafStream), with a progress bar on a terminal.
    Put {
        /// The file to store, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Store a recipe and print its address.
    Recipe {
        /// Function name, such as `concat`.
        function: String,
        /// Function version, such as `v1`.
        version: String,
        /// An input address; repeat for several inputs, in order.
        #[arg(short = 'i', long = "input", value_name = "ADDR")]
        inputs: Vec<String>,
        /// A parameter, as key=value; repeat for several.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Materialize an address and write its bytes to stdout or to a file.
    Get {
        /// The address (64 hex characters).
        addr: String,
        /// Write to FILE instead of stdout. The bytes go to a temporary file in the same
        /// directory, renamed to FILE only once the transfer is complete.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// After the transfer, print the materialization tree of this Get to stderr: cache hits
        /// and misses, leaves, computes with their sizes, and the time of each step.
        #[arg(long)]
        explain: bool,
    },
    /// Show the recipe behind an address (function, version, inputs, params).
    Resolve {
        /// The address (64 hex characters).
        addr: String,
    },
    /// Evict an address from the server's cache; print whether it was cached and the count
    /// evicted. With --cascade (CascadeInvalidate), print what was evicted and walked.
    Invalidate {
        /// The address (64 hex characters).
        addr: String,
        /// Also evict every recipe that depends on it, directly or not.
        #[arg(long)]
        cascade: bool,
        /// With --cascade: report what would be evicted, and evict nothing.
        #[arg(long, requires = "cascade")]
        dry_run: bool,
        /// With --cascade: also print every evicted address, one per line.
        #[arg(long, requires = "cascade")]
        detail: bool,
    },
    /// Pin an address (a leaf or a recipe): a root of what garbage collection keeps.
    Pin {
        /// The address (64 hex characters).
        addr: String,
    },
    /// Unpin an address.
    Unpin {
        /// The address (64 hex characters).
        addr: String,
    },
    /// List the pinned addresses, one per line.
    Pins,
    /// Collect garbage: remove what no pin reaches and was last put before the grace period.
    ///
    /// The roots are the pinned addresses and every recipe put within the grace period: they
    /// and everything they reach through recipe inputs stay. Any other leaf or recipe last put
    /// longer ago than the grace period is removed (recipes deepest first, then leaves), with
    /// its cached output. Prints the counts removed and what stays. With --dry-run, nothing is
    /// removed and the counts are what would be.
    Gc {
        /// Report what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep anything put within this long before the collection, reachable or not: a
        /// number of seconds, or with a unit (90s, 15m, 24h, 7d).
        #[arg(
            long,
            default_value = "1h",
            value_name = "DURATION",
            value_parser = deriva_util::size::parse_duration
        )]
        grace: Duration,
        /// Remove at most N leaves and recipes (recipes deepest first, then leaves); 0 for no
        /// limit.
        #[arg(long = "max", default_value_t = 0, value_name = "N")]
        max: u64,
        /// Also print every removed address, one per line.
        #[arg(long)]
        detail: bool,
    },
    /// List the nodes serving the store, with their state.
    Cluster,
    /// Bearer tokens for a server's --auth-tokens file.
    Token {
        /// What to do.
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Print the server's store, cache and verification counters.
    Status,
    /// Show where an address came from: for each recipe the function, the node that computed
    /// its output, when, how long it took, the trace of the compute and its audits; for each
    /// leaf its size and when it was put; down through the inputs to --depth.
    ///
    /// On a terminal a tree, an input shared by several recipes shown once and referred to
    /// after; with --json one JSON object. Exits with 1 if the address is unknown (not found),
    /// or if --verify-key is given and a record fails verification.
    Provenance {
        /// The address (64 hex characters).
        addr: String,
        /// Levels of inputs to describe below ADDR (0: ADDR alone); the server answers at most
        /// 4,096 addresses.
        #[arg(
            long,
            default_value_t = crate::provenance::DEFAULT_DEPTH,
            value_name = "N",
            value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::provenance::MAX_DEPTH))
        )]
        depth: u32,
        /// Print one JSON object (pretty-printed) for ADDR, its inputs nested in it.
        #[arg(long)]
        json: bool,
        /// Check the signature of every record with this ed25519 public key (PEM, as
        /// `openssl pkey -pubout` writes it) and exit with 1 naming every recipe whose record
        /// fails (a bad signature, or a record that does not decode or is another recipe's).
        /// Unsigned records are reported as unsigned, not as failures.
        #[arg(long, value_name = "PUB.pem")]
        verify_key: Option<PathBuf>,
    },
    /// Compute a recipe twice and compare; exits with 1 if the two outputs differ.
    Verify {
        /// The address of a recipe (64 hex characters).
        addr: String,
    },
    /// Load-test the server: prepare data, run a workload from concurrent clients, report
    /// throughput and latency (p50/p99/p999).
    Bench(BenchArgs),
}

/// Parses a command-line address, naming `what` (such as `get` or `-i #2`) when it is wrong.
pub fn parse_addr(what: &str, s: &str) -> Result<CAddr, CliError> {
    s.parse::<CAddr>()
        .map_err(|e| CliError::Usage(format!("{what}: {s:?} is not an address: {e}")))
}

/// Parses `key=value` (split at the first `=`; the value may be empty or contain `=`).
pub fn parse_param(s: &str) -> Result<(String, String), CliError> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => Err(CliError::Usage(format!(
            "-p {s:?}: a param is key=value (no '=' found)"
        ))),
    }
}

/// The params of a recipe command line; a key given twice is a usage error.
pub fn parse_params(raw: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut params = HashMap::new();
    for p in raw {
        let (k, v) = parse_param(p)?;
        if params.contains_key(&k) {
            return Err(CliError::Usage(format!("-p: param {k:?} is given twice")));
        }
        params.insert(k, v);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_at_the_first_equals_sign_and_once_per_key() {
        let params = parse_params(&["a=b=c".to_owned(), "empty=".to_owned()]).unwrap();
        assert_eq!(params["a"], "b=c");
        assert_eq!(params["empty"], "");
        let err = parse_params(&["k=1".to_owned(), "k=2".to_owned()]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("twice"), "{err}");
        let err = parse_param("count").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("key=value"), "{err}");
    }

    #[test]
    fn addresses_are_64_hex_characters_and_errors_name_the_argument() {
        let addr = CAddr::for_leaf(b"x");
        assert_eq!(parse_addr("get", &addr.to_string()).unwrap(), addr);
        let err = parse_addr("-i #2", "nothex").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("-i #2: \"nothex\""), "{err}");
    }

    #[test]
    fn the_server_defaults_and_bench_sizes_take_units() {
        let args = CliArgs::try_parse_from(["deriva", "status"]).unwrap();
        assert_eq!(args.server, DEFAULT_SERVER);
        assert!(!args.trace);
        let args = CliArgs::try_parse_from(["deriva", "bench", "--size", "64KiB"]).unwrap();
        let Command::Bench(bench) = args.command else {
            panic!("not bench: {:?}", args.command)
        };
        assert_eq!(bench.size, 64 << 10);
        let err = CliArgs::try_parse_from(["deriva", "bench", "--size", "3 parsecs"]).unwrap_err();
        assert!(err.to_string().contains("unknown size unit"), "{err}");
    }

    #[test]
    fn gc_keeps_an_hour_by_default_and_takes_durations_with_units() {
        let args = CliArgs::try_parse_from(["deriva", "gc"]).unwrap();
        let Command::Gc {
            dry_run,
            grace,
            max,
            detail,
        } = args.command
        else {
            panic!("not gc: {:?}", args.command)
        };
        assert_eq!(
            (dry_run, grace, max, detail),
            (false, Duration::from_secs(3600), 0, false)
        );
        let args = CliArgs::try_parse_from([
            "deriva",
            "gc",
            "--dry-run",
            "--grace",
            "15m",
            "--max",
            "7",
            "--detail",
        ])
        .unwrap();
        let Command::Gc {
            dry_run,
            grace,
            max,
            detail,
        } = args.command
        else {
            panic!("not gc: {:?}", args.command)
        };
        assert_eq!(
            (dry_run, grace, max, detail),
            (true, Duration::from_secs(900), 7, true)
        );
        let err = CliArgs::try_parse_from(["deriva", "gc", "--grace", "banana"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--grace") && text.contains("banana"),
            "{text}"
        );
        let err = CliArgs::try_parse_from(["deriva", "gc", "--max", "lots"]).unwrap_err();
        assert!(err.to_string().contains("--max"), "{err}");
    }

    #[test]
    fn provenance_asks_eight_levels_by_default_and_bounds_depth() {
        let addr = CAddr::for_leaf(b"x").to_string();
        let args = CliArgs::try_parse_from(["deriva", "provenance", &addr]).unwrap();
        let Command::Provenance {
            depth,
            json,
            verify_key,
            ..
        } = args.command
        else {
            panic!("not provenance: {:?}", args.command)
        };
        assert_eq!((depth, json, verify_key), (8, false, None));
        let max = crate::provenance::MAX_DEPTH.to_string();
        assert!(CliArgs::try_parse_from(["deriva", "provenance", &addr, "--depth", &max]).is_ok());
        let over = (crate::provenance::MAX_DEPTH + 1).to_string();
        let err = CliArgs::try_parse_from(["deriva", "provenance", &addr, "--depth", &over])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--depth") && err.contains(&over) && err.contains(&max),
            "{err}"
        );
    }
}
