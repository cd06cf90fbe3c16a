//! `deriva-server --print-config`, run as a process: every flag and its `DERIVA_*` variable reach
//! the configuration, a flag wins over its variable, and with neither the printed configuration
//! is [`Config::default`], so clap's defaults and `Config::default` agree.
//!
//! The child never inherits a `DERIVA_*` or `OTEL_*` variable: each run sets exactly the
//! variables it names.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use clap::CommandFactory as _;
use deriva_server::{Config, ServerArgs};

const SERVER: &str = env!("CARGO_BIN_EXE_deriva-server");

/// One setting flag: a value other than its default, and what `--print-config` shows for it.
struct Row {
    /// The flag, without `--`.
    flag: &'static str,
    /// The variables that set it when the flag is absent, strongest first: its `DERIVA_*`
    /// variable, then any fallback.
    vars: &'static [&'static str],
    /// A value that is not the default.
    value: &'static str,
    /// The printed key, and the printed value for `value`.
    shows: (&'static str, &'static str),
    /// Another valid value, given to the weaker source when precedence is checked; it must
    /// show differently from `value`.
    other: &'static str,
}

/// Every setting flag of [`ServerArgs`]: a new flag is one more row
/// (`every_flag_has_a_row` fails until it has one).
const ROWS: &[Row] = &[
    Row {
        flag: "audit-sample-ratio",
        vars: &["DERIVA_AUDIT_SAMPLE_RATIO"],
        value: "0.25",
        shows: ("audit-sample-ratio", "0.25"),
        other: "1",
    },
    Row {
        flag: "audit-max-concurrent",
        vars: &["DERIVA_AUDIT_MAX_CONCURRENT"],
        value: "3",
        shows: ("audit-max-concurrent", "3"),
        other: "2",
    },
    Row {
        flag: "on-mismatch",
        vars: &["DERIVA_ON_MISMATCH"],
        value: "evict",
        shows: ("on-mismatch", "evict"),
        other: "keep",
    },
    Row {
        flag: "signing-key",
        vars: &["DERIVA_SIGNING_KEY"],
        value: "keys/node.pem",
        shows: ("signing-key", "keys/node.pem"),
        other: "keys/other.pem",
    },
    Row {
        flag: "trace-url-template",
        vars: &["DERIVA_TRACE_URL_TEMPLATE"],
        value: "https://jaeger.example/trace/{trace_id}",
        shows: (
            "trace-url-template",
            "https://jaeger.example/trace/{trace_id}",
        ),
        other: "http://jaeger:16686/trace/{trace_id}",
    },
    Row {
        flag: "data-dir",
        vars: &["DERIVA_DATA_DIR"],
        value: "elsewhere/data",
        shows: ("data-dir", "elsewhere/data"),
        other: "other/data",
    },
    Row {
        flag: "listen",
        vars: &["DERIVA_LISTEN"],
        value: "0.0.0.0:50052",
        shows: ("listen", "0.0.0.0:50052"),
        other: "127.0.0.1:50053",
    },
    Row {
        flag: "cache-bytes",
        vars: &["DERIVA_CACHE_BYTES"],
        value: "1GiB",
        shows: ("cache-bytes", "1073741824"),
        other: "2GiB",
    },
    Row {
        flag: "verification",
        vars: &["DERIVA_VERIFICATION"],
        value: "sampled:0.25",
        shows: ("verification", "sampled:0.25"),
        other: "dual",
    },
    Row {
        flag: "max-concurrent-computes",
        vars: &["DERIVA_MAX_CONCURRENT_COMPUTES"],
        // Not a plausible number of CPUs, which is the default.
        value: "1234",
        shows: ("max-concurrent-computes", "1234"),
        other: "4321",
    },
    Row {
        flag: "compute-timeout-secs",
        vars: &["DERIVA_COMPUTE_TIMEOUT_SECS"],
        value: "0",
        shows: ("compute-timeout-secs", "none"),
        other: "60",
    },
    Row {
        flag: "max-message-bytes",
        vars: &["DERIVA_MAX_MESSAGE_BYTES"],
        value: "1MiB",
        shows: ("max-message-bytes", "1048576"),
        other: "2MiB",
    },
    Row {
        flag: "chunk-bytes",
        vars: &["DERIVA_CHUNK_BYTES"],
        value: "4KiB",
        shows: ("chunk-bytes", "4096"),
        other: "8KiB",
    },
    Row {
        flag: "shutdown-grace-secs",
        vars: &["DERIVA_SHUTDOWN_GRACE_SECS"],
        value: "3",
        shows: ("shutdown-grace-secs", "3"),
        other: "7",
    },
    Row {
        flag: "metrics-addr",
        vars: &["DERIVA_METRICS_ADDR"],
        value: "0.0.0.0:9100",
        shows: ("metrics-addr", "0.0.0.0:9100"),
        other: "127.0.0.1:9200",
    },
    Row {
        flag: "metrics-port",
        vars: &["DERIVA_METRICS_PORT"],
        value: "9191",
        shows: ("metrics-addr", "127.0.0.1:9191"),
        other: "0",
    },
    Row {
        flag: "otlp-endpoint",
        vars: &["DERIVA_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"],
        value: "http://127.0.0.1:4317",
        shows: ("otlp-endpoint", "http://127.0.0.1:4317"),
        other: "http://collector.invalid:4317",
    },
    Row {
        flag: "otlp-protocol",
        vars: &["DERIVA_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"],
        value: "http/protobuf",
        shows: ("otlp-protocol", "http/protobuf"),
        other: "grpc",
    },
    Row {
        flag: "otlp-header",
        vars: &["DERIVA_OTLP_HEADERS"],
        value: "x-api-key=secret-of-the-row",
        shows: ("otlp-header", "x-api-key=<set>"),
        other: "x-other=1",
    },
    Row {
        flag: "otlp-logs",
        vars: &["DERIVA_OTLP_LOGS"],
        value: "false",
        shows: ("otlp-logs", "false"),
        other: "true",
    },
    Row {
        flag: "trace-sample-ratio",
        vars: &["DERIVA_TRACE_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER_ARG"],
        value: "0.25",
        shows: ("trace-sample-ratio", "0.25"),
        other: "0.5",
    },
    Row {
        flag: "trace-max-per-second",
        vars: &["DERIVA_TRACE_MAX_PER_SECOND"],
        value: "50",
        shows: ("trace-max-per-second", "50"),
        other: "70",
    },
    Row {
        flag: "trace-store-size",
        vars: &["DERIVA_TRACE_STORE_SIZE"],
        value: "1000",
        shows: ("trace-store-size", "1000"),
        other: "2000",
    },
    Row {
        flag: "trace-local-store",
        vars: &["DERIVA_TRACE_LOCAL_STORE"],
        value: "true",
        shows: ("trace-local-store", "true"),
        other: "false",
    },
    Row {
        flag: "log-format",
        vars: &["DERIVA_LOG_FORMAT"],
        value: "json",
        shows: ("log-format", "json"),
        other: "text",
    },
    Row {
        flag: "blob-store",
        vars: &["DERIVA_BLOB_STORE"],
        value: "s3://bucket/team",
        shows: ("blob-store", "s3://bucket/team"),
        other: "s3://other",
    },
    Row {
        flag: "index",
        vars: &["DERIVA_INDEX_URL"],
        value: "postgres://deriva:secret@db:5432/deriva",
        shows: ("index", "postgres://deriva:***@db:5432/deriva"),
        other: "postgres://db/other",
    },
    Row {
        flag: "index-schema",
        vars: &["DERIVA_INDEX_SCHEMA"],
        value: "team_a",
        shows: ("index-schema", "team_a"),
        other: "team_b",
    },
    Row {
        flag: "index-pool-size",
        vars: &["DERIVA_INDEX_POOL_SIZE"],
        value: "4",
        shows: ("index-pool-size", "4"),
        other: "8",
    },
    Row {
        flag: "local-cache-bytes",
        vars: &["DERIVA_LOCAL_CACHE_BYTES"],
        value: "0",
        shows: ("local-cache-bytes", "0"),
        other: "2GiB",
    },
    Row {
        flag: "inline-leaf-bytes",
        vars: &["DERIVA_INLINE_LEAF_BYTES"],
        value: "0",
        shows: ("inline-leaf-bytes", "0"),
        other: "1MiB",
    },
    Row {
        flag: "output-tier",
        vars: &["DERIVA_OUTPUT_TIER"],
        value: "blob-store",
        shows: ("output-tier", "blob-store"),
        other: "none",
    },
    Row {
        flag: "memory-budget",
        vars: &["DERIVA_MEMORY_BUDGET"],
        value: "512MiB",
        shows: ("memory-budget", "536870912"),
        other: "1GiB",
    },
    Row {
        flag: "memory-queue",
        vars: &["DERIVA_MEMORY_QUEUE"],
        value: "3",
        shows: ("memory-queue", "3"),
        other: "5",
    },
    Row {
        flag: "memory-wait-secs",
        vars: &["DERIVA_MEMORY_WAIT_SECS"],
        value: "7",
        shows: ("memory-wait-secs", "7"),
        other: "9",
    },
    Row {
        flag: "spill-bytes",
        vars: &["DERIVA_SPILL_BYTES"],
        value: "1MiB",
        shows: ("spill-bytes", "1048576"),
        other: "2MiB",
    },
    Row {
        flag: "spill-budget",
        vars: &["DERIVA_SPILL_BUDGET"],
        value: "0",
        shows: ("spill-budget", "0"),
        other: "1GiB",
    },
    Row {
        flag: "compute-lease-ttl",
        vars: &["DERIVA_COMPUTE_LEASE_TTL"],
        value: "2m",
        shows: ("compute-lease-ttl", "120s"),
        other: "45s",
    },
    Row {
        flag: "heartbeat-secs",
        vars: &["DERIVA_HEARTBEAT_SECS"],
        value: "2",
        shows: ("heartbeat-secs", "2"),
        other: "7",
    },
    Row {
        flag: "node-forget-after",
        vars: &["DERIVA_NODE_FORGET_AFTER"],
        value: "2h",
        shows: ("node-forget-after", "7200s"),
        other: "7d",
    },
    Row {
        flag: "gc-interval",
        vars: &["DERIVA_GC_INTERVAL"],
        value: "15m",
        shows: ("gc-interval", "900s"),
        other: "1h",
    },
    Row {
        flag: "gc-grace",
        vars: &["DERIVA_GC_GRACE"],
        value: "2d",
        shows: ("gc-grace", "172800s"),
        other: "90",
    },
    Row {
        flag: "gc-min-grace",
        vars: &["DERIVA_GC_MIN_GRACE"],
        value: "10m",
        shows: ("gc-min-grace", "600s"),
        other: "0",
    },
    Row {
        flag: "max-connections",
        vars: &["DERIVA_MAX_CONNECTIONS"],
        value: "100",
        shows: ("max-connections", "100"),
        other: "7",
    },
    Row {
        flag: "max-streams-per-connection",
        vars: &["DERIVA_MAX_STREAMS_PER_CONNECTION"],
        value: "32",
        shows: ("max-streams-per-connection", "32"),
        other: "8",
    },
    Row {
        flag: "request-timeout-secs",
        vars: &["DERIVA_REQUEST_TIMEOUT_SECS"],
        value: "30",
        shows: ("request-timeout-secs", "30"),
        other: "45",
    },
    Row {
        flag: "keepalive-secs",
        vars: &["DERIVA_KEEPALIVE_SECS"],
        value: "15",
        shows: ("keepalive-secs", "15"),
        other: "300",
    },
    Row {
        flag: "handshake-timeout-secs",
        vars: &["DERIVA_HANDSHAKE_TIMEOUT_SECS"],
        value: "3",
        shows: ("handshake-timeout-secs", "3"),
        other: "30",
    },
    Row {
        flag: "tls-cert",
        vars: &["DERIVA_TLS_CERT"],
        value: "etc/cert.pem",
        shows: ("tls-cert", "etc/cert.pem"),
        other: "other/cert.pem",
    },
    Row {
        flag: "tls-key",
        vars: &["DERIVA_TLS_KEY"],
        value: "etc/key.pem",
        shows: ("tls-key", "etc/key.pem"),
        other: "other/key.pem",
    },
    Row {
        flag: "tls-client-ca",
        vars: &["DERIVA_TLS_CLIENT_CA"],
        value: "etc/clients.pem",
        shows: ("tls-client-ca", "etc/clients.pem"),
        other: "other/clients.pem",
    },
    Row {
        flag: "auth-tokens",
        vars: &["DERIVA_AUTH_TOKENS"],
        value: "etc/tokens",
        shows: ("auth-tokens", "etc/tokens"),
        other: "other/tokens",
    },
];

/// The flags a row's flag needs beside it (a TLS key needs its certificate, and so on).
fn companions(flag: &str) -> &'static [&'static str] {
    match flag {
        "--tls-cert" => &["--tls-key", "k.pem"],
        "--tls-key" => &["--tls-cert", "c.pem"],
        "--tls-client-ca" => &["--tls-cert", "c.pem", "--tls-key", "k.pem"],
        _ => &[],
    }
}

/// Flags that are actions, not settings: no variable, nothing in the configuration.
const ACTIONS: &[&str] = &["print-config"];

/// What a run printed, or why it failed.
type Printed = Result<Vec<(String, String)>, String>;

/// Runs `deriva-server --print-config ARGS` in `cwd` with exactly the `DERIVA_*` and `OTEL_*`
/// variables of `vars`.
fn print_config(cwd: &Path, args: &[&str], vars: &[(&str, &str)]) -> Printed {
    let mut command = Command::new(SERVER);
    command.current_dir(cwd).arg("--print-config").args(args);
    for (name, _) in std::env::vars_os() {
        let inherited = name.to_string_lossy();
        if inherited.starts_with("DERIVA_") || inherited.starts_with("OTEL_") {
            command.env_remove(&name);
        }
    }
    command.envs(vars.iter().copied());
    let out = command
        .output()
        .map_err(|e| format!("cannot run {SERVER}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{args:?} with {vars:?}: {}; stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .map(|line| {
            line.split_once(" = ")
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{args:?} with {vars:?}: not `key = value`: {line:?}"))
        })
        .collect()
}

/// The value printed for `key`.
fn shown(printed: &Printed, key: &str) -> Result<String, String> {
    let lines = printed.as_ref().map_err(Clone::clone)?;
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("no `{key}` in {lines:?}"))
}

#[test]
fn every_flag_has_a_row() {
    let command = ServerArgs::command();
    let mut missing = Vec::new();
    let mut flags = BTreeSet::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let flag = arg
            .get_long()
            .unwrap_or_else(|| panic!("argument {id} has no long flag"));
        flags.insert(flag);
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        if ACTIONS.contains(&flag) {
            assert_eq!(env, None, "the action --{flag} has a variable");
            continue;
        }
        match ROWS.iter().find(|r| r.flag == flag) {
            None => missing.push(format!("--{flag}")),
            Some(row) => assert_eq!(
                env.as_deref(),
                Some(row.vars[0]),
                "--{flag} reads another variable than its row says"
            ),
        }
    }
    assert!(
        missing.is_empty(),
        "flags without a row in ROWS: {missing:?}"
    );
    let mut seen = BTreeSet::new();
    for row in ROWS {
        assert!(seen.insert(row.flag), "two rows for --{}", row.flag);
        assert!(
            flags.contains(row.flag),
            "a row for --{}, no such flag",
            row.flag
        );
        assert!(row.vars[0].starts_with("DERIVA_"), "--{}", row.flag);
    }
    for action in ACTIONS {
        assert!(flags.contains(action), "no such flag --{action}");
    }
}

#[test]
fn with_no_flag_and_no_variable_it_prints_config_default() {
    let cwd = tempfile::tempdir().unwrap();
    let printed = print_config(cwd.path(), &[], &[]).unwrap();
    let expected: Vec<(String, String)> = Config::default()
        .describe()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(printed, expected);
    let keys: BTreeSet<&str> = printed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys.len(),
        printed.len(),
        "a key printed twice: {printed:?}"
    );
}

#[test]
fn each_flag_and_its_variable_set_the_value_and_the_flag_wins() {
    let cwd = tempfile::tempdir().unwrap();
    let defaults = Ok(print_config(cwd.path(), &[], &[]).unwrap());
    let mut failures = Vec::new();
    let mut check = |row: &Row, how: String, printed: Printed, expected: &str| {
        let (key, _) = row.shows;
        match shown(&printed, key) {
            Ok(v) if v == expected => {}
            Ok(v) => failures.push(format!("{how}: `{key} = {v}`, expected `{expected}`")),
            Err(e) => failures.push(format!("{how}: {e}")),
        }
    };
    for row in ROWS {
        let (key, value_shows) = row.shows;
        let flag = format!("--{}", row.flag);
        let default = shown(&defaults, key).unwrap();
        assert_ne!(value_shows, default, "{flag}'s row sets the default");
        let with = companions(&flag);
        let other_args: Vec<&str> = with
            .iter()
            .copied()
            .chain([flag.as_str(), row.other])
            .collect();
        let other_shows = shown(&print_config(cwd.path(), &other_args, &[]), key)
            .unwrap_or_else(|e| panic!("{flag} {}: {e}", row.other));
        assert_ne!(
            other_shows, value_shows,
            "{flag}'s row: `other` shows as `value` does"
        );

        let run = |args: &[&str], vars: &[(&str, &str)]| {
            let args: Vec<&str> = with.iter().chain(args).copied().collect();
            print_config(cwd.path(), &args, vars)
        };
        let printed = run(&[&flag, row.value], &[]);
        check(row, format!("{flag} {}", row.value), printed, value_shows);
        for var in row.vars {
            let printed = run(&[], &[(var, row.value)]);
            check(row, format!("{var}={}", row.value), printed, value_shows);
        }
        // The flag wins over every variable.
        let others: Vec<(&str, &str)> = row.vars.iter().map(|v| (*v, row.other)).collect();
        let printed = run(&[&flag, row.value], &others);
        let how = format!("{flag} {} with {others:?}", row.value);
        check(row, how, printed, value_shows);
        // A variable wins over its fallbacks.
        for (i, strong) in row.vars.iter().enumerate() {
            for weak in &row.vars[i + 1..] {
                let vars = [(*strong, row.value), (*weak, row.other)];
                let printed = run(&[], &vars);
                check(row, format!("{vars:?}"), printed, value_shows);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn print_config_opens_and_binds_nothing() {
    let cwd = tempfile::tempdir().unwrap();
    // Both addresses taken: the server would fail to bind them.
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc, http) = (
        grpc.local_addr().unwrap().to_string(),
        http.local_addr().unwrap().to_string(),
    );
    let printed = Ok(print_config(
        cwd.path(),
        &["--listen", &grpc, "--metrics-addr", &http],
        &[],
    )
    .unwrap());
    assert_eq!(shown(&printed, "listen").unwrap(), grpc);
    assert_eq!(shown(&printed, "metrics-addr").unwrap(), http);
    // The default data directory, relative to the working directory, was not created.
    let created: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(created.is_empty(), "{created:?}");
}

#[test]
fn print_config_rejects_what_the_server_would_reject() {
    let cwd = tempfile::tempdir().unwrap();
    let rejected = |args: &[&str], vars: &[(&str, &str)], reason: &str| {
        let err = print_config(cwd.path(), args, vars).unwrap_err();
        assert!(err.contains(reason), "{args:?} {vars:?}: {err}");
    };
    rejected(
        &["--chunk-bytes", "0"],
        &[],
        "--chunk-bytes must be at least 1",
    );
    rejected(&[], &[("DERIVA_CACHE_BYTES", "lots")], "not a size");
    rejected(&["--trace-store-size", "0"], &[], "--trace-store-size");
    rejected(
        &["--gc-interval", "1h", "--gc-grace", "1m"],
        &[],
        "--gc-grace 60s is below --gc-min-grace 300s",
    );
    rejected(
        &["--inline-leaf-bytes", "17MiB"],
        &[],
        "more than 16MiB; larger leaves belong in files",
    );
    rejected(
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
        "must start with http:// or https://",
    );
    rejected(
        &["--otlp-endpoint", "http://c:4317"],
        &[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem")],
        "without OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    );
    // A header's value is never repeated, even when it is the mistake.
    let err =
        print_config(cwd.path(), &["--otlp-header", "no-equals-secret-9e1"], &[]).unwrap_err();
    let (_, stderr) = err.split_once("stderr:").expect("the server's stderr");
    assert!(stderr.contains("KEY=VALUE"), "{stderr}");
    assert!(!stderr.contains("no-equals-secret-9e1"), "{stderr}");
}
