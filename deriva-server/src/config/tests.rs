//! The unit tests of the flags and of what `Config` prints.

use super::*;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};

use crate::telemetry::LogFormat;

/// `args` parsed as the command line, ignoring every `DERIVA_*` variable of the process.
fn parse_without_env(args: &[&str]) -> Result<ServerArgs, clap::Error> {
    let command = ServerArgs::command().mut_args(|a| a.env(None::<&'static str>));
    let mut all = vec!["deriva-server"];
    all.extend_from_slice(args);
    ServerArgs::from_arg_matches(&command.try_get_matches_from(all)?)
}

#[test]
fn no_flags_and_no_environment_give_config_default() {
    let config = parse_without_env(&[])
        .unwrap()
        .into_config_with(Default::default())
        .unwrap();
    let defaults = Config::default();
    assert_eq!(config.describe(), defaults.describe());
    assert_eq!(defaults.data_dir, PathBuf::from("./deriva-data"));
    assert_eq!(defaults.listen, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(defaults.cache_bytes, 256 << 20);
    assert_eq!(defaults.verification, VerificationMode::Off);
    assert_eq!(defaults.max_message_bytes, 64 << 20);
    assert_eq!(defaults.chunk_bytes, 64 << 10);
    assert_eq!(defaults.shutdown_grace, Duration::from_secs(10));
    assert_eq!(
        defaults.metrics_addr,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(defaults.telemetry.otlp_endpoint, None);
    assert_eq!(defaults.telemetry.sample_ratio, None);
    assert_eq!(defaults.telemetry.log_format, LogFormat::Text);
    assert_eq!(defaults.telemetry.trace_store_capacity, 256);
}

#[test]
fn metrics_port_keeps_the_host_and_zero_disables() {
    let parse = |args: &[&str]| {
        parse_without_env(args)
            .unwrap()
            .into_config_with(Default::default())
            .unwrap()
            .metrics_addr
    };
    assert_eq!(
        parse(&["--metrics-port", "9191"]),
        Some("127.0.0.1:9191".parse().unwrap())
    );
    assert_eq!(
        parse(&["--metrics-addr", "0.0.0.0:9000", "--metrics-port", "9191"]),
        Some("0.0.0.0:9191".parse().unwrap())
    );
    assert_eq!(parse(&["--metrics-port", "0"]), None);
    let err = parse_without_env(&["--trace-sample-ratio", "1.5"]).unwrap_err();
    assert!(err.to_string().contains("ratio"), "{err}");
}

#[test]
fn the_remote_backend_needs_both_flags() {
    let remote = |args: &[&str]| {
        parse_without_env(args)
            .unwrap()
            .into_config_with(Default::default())
            .unwrap()
            .remote()
    };
    assert!(remote(&[]).unwrap().is_none());
    let err = remote(&["--blob-store", "s3://b"]).unwrap_err();
    assert!(err.contains("--index"), "{err}");
    let err = remote(&["--index", "postgres://h/db"]).unwrap_err();
    assert!(err.contains("--blob-store"), "{err}");
    let err = remote(&["--output-tier", "blob-store"]).unwrap_err();
    assert!(err.contains("--blob-store"), "{err}");
    let config = remote(&["--blob-store", "s3://b/p", "--index", "postgres://h/db"])
        .unwrap()
        .unwrap();
    assert_eq!(config.blob_store, "s3://b/p");
    assert_eq!(config.schema, "deriva");
    assert_eq!(
        config.local_cache,
        Some((PathBuf::from("./deriva-data/remote-cache"), 1 << 30))
    );
}

#[test]
fn the_configs_debug_hides_the_index_password() {
    let config = parse_without_env(&[
        "--blob-store",
        "s3://b",
        "--index",
        "postgres://deriva:S3c/ret@db/deriva",
    ])
    .unwrap()
    .into_config_with(Default::default())
    .unwrap();
    let shown = format!("{config:?}");
    assert!(shown.contains("postgres://deriva:***@db/deriva"), "{shown}");
    assert!(!shown.contains("S3c/ret"), "{shown}");
}

#[test]
fn printed_urls_hide_passwords() {
    assert_eq!(
        redact_url("postgres://u:secret@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
    assert_eq!(redact_url("host=h user=u"), "host=h user=u");
    assert_eq!(
        redact_url("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
        "postgres://u@h/db?sslmode=require&password=***&x=1"
    );
    assert_eq!(
        redact_url("host=h password='a b' user=u sslpassword=k"),
        "host=h password=*** user=u sslpassword=***"
    );
    assert_eq!(redact_url("password = top"), "password=***");
    assert_eq!(
        redact_url("postgres://h/mypassword_db"),
        "postgres://h/mypassword_db"
    );
    // tokio-postgres reads the password up to the first '@', '/' and '?' included.
    assert_eq!(
        redact_url("postgres://deriva:S3c/retPW@db:5432/deriva"),
        "postgres://deriva:***@db:5432/deriva"
    );
}

#[test]
fn print_config_hides_the_secrets_of_every_url() {
    let config = parse_without_env(&[
        "--index",
        "postgres://u:pg/s3cret?@db/idx",
        "--blob-store",
        "s3://k:s3/cret@bucket/p",
        "--otlp-endpoint",
        "http://u:otlp%2Fs3cret@collector:4317",
    ])
    .unwrap()
    .into_config_with(Default::default())
    .unwrap();
    let shown: std::collections::BTreeMap<_, _> = config.describe().into_iter().collect();
    assert_eq!(shown["index"], "postgres://u:***@db/idx");
    assert_eq!(shown["blob-store"], "s3://k:***@bucket/p");
    assert_eq!(shown["otlp-endpoint"], "http://u:***@collector:4317");
}

/// Every flag whose value can hold a secret (a URL with credentials, a header) keeps its
/// variable's value out of `--help`.
#[test]
fn help_never_shows_the_value_of_a_secret_variable() {
    let command = ServerArgs::command();
    for id in ["index", "blob_store", "otlp_endpoint", "otlp_headers"] {
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("no argument {id}"));
        assert!(arg.is_hide_env_values_set(), "--{id} shows its env value");
    }
}

#[test]
fn bad_flags_are_rejected_with_the_reason() {
    let err =
        ServerArgs::try_parse_from(["deriva-server", "--verification", "sometimes"]).unwrap_err();
    assert!(err.to_string().contains("verification mode"), "{err}");
    let err = ServerArgs::try_parse_from(["deriva-server", "--listen", "nowhere"]).unwrap_err();
    assert!(err.to_string().contains("--listen"), "{err}");
}

#[test]
fn trace_local_store_is_off_by_default_and_takes_an_optional_value() {
    let on = |args: &[&str]| {
        parse_without_env(args)
            .unwrap()
            .into_config_with(Default::default())
            .unwrap()
            .telemetry
            .trace_local_store
    };
    assert!(!on(&[]));
    assert!(on(&["--trace-local-store"]));
    assert!(on(&["--trace-local-store", "true"]));
    assert!(!on(&["--trace-local-store", "false"]));
    let err = parse_without_env(&["--trace-local-store", "sometimes"]).unwrap_err();
    assert!(err.to_string().contains("--trace-local-store"), "{err}");
}

#[test]
fn a_node_is_forgotten_only_after_it_shows_as_dead() {
    let config = |args: &[&str]| {
        parse_without_env(args)
            .unwrap()
            .into_config_with(Default::default())
    };
    assert_eq!(
        config(&[]).unwrap().node_forget_after,
        Duration::from_secs(24 * 3600)
    );
    assert_eq!(
        config(&["--node-forget-after", "16s", "--heartbeat-secs", "5"])
            .unwrap()
            .node_forget_after,
        Duration::from_secs(16)
    );
    for args in [
        &["--node-forget-after", "15s", "--heartbeat-secs", "5"][..],
        &["--node-forget-after", "0"][..],
        &["--node-forget-after", "1m", "--heartbeat-secs", "60"][..],
    ] {
        let err = config(args).unwrap_err();
        assert!(
            err.contains("--node-forget-after") && err.contains("dead"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_compute_lease_lasts_from_a_second_to_an_hour() {
    let ttl = |args: &[&str]| {
        parse_without_env(args)
            .map(|a| {
                a.into_config_with(Default::default())
                    .unwrap()
                    .compute_lease_ttl
            })
            .map_err(|e| e.to_string())
    };
    assert_eq!(ttl(&[]), Ok(Duration::from_secs(30)));
    assert_eq!(
        ttl(&["--compute-lease-ttl", "2s"]),
        Ok(Duration::from_secs(2))
    );
    assert_eq!(
        ttl(&["--compute-lease-ttl", "1h"]),
        Ok(Duration::from_secs(3600))
    );
    for (bad, says) in [
        ("0", "\"0\" is 0s; a compute lease lasts from 1s"),
        ("2h", "\"2h\" is 7200s; a compute lease lasts from 1s"),
        ("5x", "unknown duration unit"),
    ] {
        let err = ttl(&["--compute-lease-ttl", bad]).unwrap_err();
        assert!(
            err.contains("--compute-lease-ttl") && err.contains(says),
            "{bad}: {err}"
        );
    }
}
