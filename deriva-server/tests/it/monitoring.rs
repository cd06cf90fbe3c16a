//! The monitoring stack's queries, proven against a real Prometheus: the real `deriva-server`
//! binary runs a workload, a real Prometheus started with a config derived from
//! `monitoring/prometheus.yml` (same rule files) scrapes it, and then **every** PromQL
//! expression of the Grafana dashboard, the alert rules and the recording rules is evaluated
//! through the query API. Each must parse and return data: a typo in a metric name, a label
//! that does not exist or an empty panel fails.
//!
//! Also checks, without Prometheus, that the stack's files agree with each other (mounted files
//! exist, host ports, datasource uids, units, quantiles by `le`, the collector's logs pipeline
//! into Loki, and the links between the Loki and Jaeger datasources).
//!
//! Needs the `prometheus` binary on `PATH` (`bash .ci/run` installs it, or
//! `apt-get install -y prometheus`); without it the test fails, it never skips. The server runs
//! on the remote backend (SeaweedFS and PostgreSQL from `deriva-testkit/backends.sh`), so that the
//! scale-out panels have data as well.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{
    GcRequest, InvalidateRequest, PinRequest, ResolveRequest, StatusRequest, VerifyRequest,
};
use deriva_testkit::{
    DEADLINE, NOWHERE, Prometheus, ServerProcess, get_all, put_leaf, put_recipe, require,
};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

/// What Grafana's global variables stand for when the test evaluates a panel's query: a window
/// holding every sample of the test (1 s scrapes) in place of `$__rate_interval` and `$__range`.
const GRAFANA_GLOBALS: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "1s"),
    ("$__range", "1m"),
];

/// A file of the repository (the workspace root is the server crate's parent).
fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Extracting the expressions.

/// One rule of a Prometheus rule file: `alert` or `record`, its name, and its `expr`.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    kind: &'static str,
    name: String,
    expr: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The rules of a rule file, read line by line (there is no YAML parser among the
/// dependencies). Understands what a rule file needs: `- alert: NAME` or `- record: NAME`,
/// then `expr:` as a plain one-line scalar, a plain scalar continued on more-indented lines, or
/// a `|`/`>` block scalar. A quoted `expr` is refused rather than half-understood. The result
/// is cross-checked against the rules Prometheus itself loaded.
fn rules(file: &str, yaml: &str) -> Vec<Rule> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut current: Option<(&'static str, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        for kind in ["alert", "record"] {
            if let Some(name) = item.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
                current = Some((kind, name.trim().trim_matches('"').to_owned()));
            }
        }
        let Some(value) = item.strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let key_indent = indent(line) + (trimmed.len() - item.len());
        let (kind, name) = current
            .take()
            .unwrap_or_else(|| panic!("{file}:{}: an expr with no alert or record", i + 1));
        let value = value.trim();
        let mut parts = Vec::new();
        i += 1;
        if value.starts_with('|') || value.starts_with('>') {
            // A block scalar: every following line more indented than the key, blank lines
            // included.
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_indent) {
                parts.push(lines[i].trim());
                i += 1;
            }
        } else {
            assert!(
                !value.starts_with('"') && !value.starts_with('\''),
                "{file}: the expr of {kind} {name} is quoted; write it plain or as a `|` block"
            );
            assert!(
                !value.contains(" #"),
                "{file}: the expr of {kind} {name} holds ` #` (a YAML comment?); use a `|` block"
            );
            parts.push(value);
            // A plain scalar continues on more-indented lines.
            while i < lines.len() && !lines[i].trim().is_empty() && indent(lines[i]) > key_indent {
                parts.push(lines[i].trim());
                i += 1;
            }
        }
        let expr = parts
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!expr.is_empty(), "{file}: {kind} {name} has an empty expr");
        out.push(Rule { kind, name, expr });
    }
    let declared = lines
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with("- alert:") || l.starts_with("- record:"))
        .count();
    assert_eq!(
        out.len(),
        declared,
        "{file}: {declared} rules declared, {} exprs found: {out:#?}",
        out.len()
    );
    out
}

/// Where an alert's expression compares with its threshold: `(lhs, operator, threshold)` when
/// the expression is exactly one comparison, outside every bracket and string, with a number on
/// its right.
fn split_threshold(expr: &str) -> Option<(&str, &str, f64)> {
    let bytes = expr.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' && q != b'`' {
                i += 1;
            } else if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' | b'\'' | b'`' => quote = Some(b),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'=' | b'!' | b'<' | b'>' if depth == 0 => {
                let two = bytes.get(i + 1) == Some(&b'=');
                match (b, two) {
                    (b'=' | b'!', true) | (b'<' | b'>', _) => {
                        let len = if two { 2 } else { 1 };
                        found.push((i, len));
                        i += len;
                        continue;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        i += 1;
    }
    let [(at, len)] = found.as_slice() else {
        return None;
    };
    let threshold = expr[at + len..].trim().parse().ok()?;
    Some((expr[..*at].trim(), &expr[*at..at + len], threshold))
}

/// One PromQL expression to evaluate, and where it comes from.
#[derive(Debug)]
struct Check {
    origin: String,
    promql: String,
}

/// Every `expr` of the dashboard (panel targets, rows' panels included), with its panel's title
/// and refId.
fn dashboard_exprs(value: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
            if let Some(expr) = map.get("expr") {
                let expr = expr
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: expr is not a string: {expr}"));
                let ref_id = map.get("refId").and_then(Value::as_str).unwrap_or("?");
                out.push((format!("panel {title:?} target {ref_id}"), expr.to_owned()));
            }
            for v in map.values() {
                dashboard_exprs(v, title, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                dashboard_exprs(v, title, out);
            }
        }
        _ => {}
    }
}

/// The dashboard's template variables' substitutions (each variable stands for its "All"
/// value) and the queries that fill them, as PromQL: `label_values(METRIC, LABEL)` must find
/// values, so `count by (LABEL) (METRIC)` must return data.
fn dashboard_variables(dashboard: &Value) -> (Vec<(String, String)>, Vec<Check>) {
    let mut substitutions = Vec::new();
    let mut checks = Vec::new();
    let list = dashboard["templating"]["list"].as_array().cloned();
    for var in list.unwrap_or_default() {
        let name = var["name"].as_str().expect("a template variable's name");
        let all = var["allValue"].as_str().unwrap_or_else(|| {
            panic!("template variable {name}: set allValue (e.g. \".+\") so that it has a value")
        });
        substitutions.push((format!("${{{name}}}"), all.to_owned()));
        substitutions.push((format!("${name}"), all.to_owned()));
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("template variable {name}: no query"));
        let args = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("template variable {name}: unsupported query {query:?}"));
        let (metric, label) = args
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("template variable {name}: label_values without a metric"));
        checks.push(Check {
            origin: format!("dashboard variable {name} ({query})"),
            promql: format!("count by ({}) ({})", label.trim(), metric.trim()),
        });
    }
    (substitutions, checks)
}

/// `expr` with Grafana's variables replaced (longest names first); panics if a `$` is left.
fn substitute(origin: &str, expr: &str, substitutions: &[(String, String)]) -> String {
    let mut all: Vec<(&str, &str)> = GRAFANA_GLOBALS.to_vec();
    all.extend(substitutions.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    all.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = expr.to_owned();
    for (from, to) in all {
        out = out.replace(from, to);
    }
    assert!(
        !out.contains('$'),
        "{origin}: a Grafana variable the test does not know is left in {out:?}"
    );
    out
}

/// Every expression the test evaluates, and the rules Prometheus must have loaded.
fn all_checks() -> (Vec<Check>, Vec<Rule>) {
    let mut checks = Vec::new();

    let dashboard: Value = serde_json::from_str(&read("monitoring/grafana/dashboards/deriva.json"))
        .expect("deriva.json is not JSON");
    let (substitutions, variable_checks) = dashboard_variables(&dashboard);
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, "", &mut exprs);
    assert!(exprs.len() >= 20, "too few dashboard queries: {exprs:#?}");
    for (origin, expr) in exprs {
        let promql = substitute(&origin, &expr, &substitutions);
        checks.push(Check {
            origin: format!("deriva.json {origin}"),
            promql,
        });
    }
    checks.extend(variable_checks);

    let mut all_rules = Vec::new();
    for file in ["monitoring/recording.yml", "monitoring/alerts.yml"] {
        for rule in rules(file, &read(file)) {
            let origin = format!("{file} {} {}", rule.kind, rule.name);
            if rule.kind == "alert" {
                // An alert that is not firing rightly answers nothing, so its whole expression
                // is only checked to parse (in `run_checks`, as `parse_only`); what must return
                // data is the expression without its comparison. The convention, stated in
                // alerts.yml: every alert is `EXPRESSION OP NUMBER`.
                let (lhs, op, threshold) = split_threshold(&rule.expr).unwrap_or_else(|| {
                    panic!(
                        "{origin}: not `EXPRESSION OP NUMBER` (one comparison with a number on \
                         its right), which this test needs: {}",
                        rule.expr
                    )
                });
                checks.push(Check {
                    origin: format!("{origin} (without `{op} {threshold}`)"),
                    promql: lhs.to_owned(),
                });
            } else {
                checks.push(Check {
                    origin,
                    promql: rule.expr.clone(),
                });
            }
            all_rules.push(rule);
        }
    }
    (checks, all_rules)
}

// ---------------------------------------------------------------------------------------------
// The Prometheus config.

/// `monitoring/prometheus.yml` with its intervals at 1 s, the deriva job pointed at the real
/// server and the collector job at a port where nothing listens; everything else (rule files,
/// job names, labels) as it is.
fn derived_config(deriva_metrics: &str) -> String {
    let mut config = read("monitoring/prometheus.yml");
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_owned()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_owned(),
        ),
        (
            "\"host.docker.internal:9090\"",
            format!("\"{deriva_metrics}\""),
        ),
        ("\"otel-collector:8889\"", format!("\"{NOWHERE}\"")),
    ] {
        assert_eq!(
            config.matches(from).count(),
            1,
            "monitoring/prometheus.yml must hold `{from}` exactly once: this test derives its \
             config by replacing it"
        );
        config = config.replacen(from, &to, 1);
    }
    config
}

// ---------------------------------------------------------------------------------------------
// The workload.

/// One round: leaves, recipes over four functions (concat, uppercase, reverse, repeat), cache
/// misses (after a cascading invalidate) and hits, every compute verified
/// (`--verification dual`) plus a Verify, two errors (NOT_FOUND and INVALID_ARGUMENT), a
/// Resolve and a Status; a Pin, and two garbage collections (a dry run and a real one), so that
/// the `deriva_gc_*` families, the duration histogram included, have observations.
async fn round(client: &mut DerivaClient<Channel>) {
    let a = put_leaf(client, b"hello ").await;
    let b = put_leaf(client, b"world").await;
    let joined = put_recipe(client, "concat", &[&a, &b], &[]).await;
    let upper = put_recipe(client, "uppercase", &[&joined], &[]).await;
    let reversed = put_recipe(client, "reverse", &[&a], &[]).await;
    let repeated = put_recipe(client, "repeat", &[&b], &[("count", "3")]).await;
    client
        .invalidate(InvalidateRequest {
            addr: joined.clone(),
            cascade: true,
        })
        .await
        .unwrap();
    // Misses (concat and uppercase computed again), then hits.
    for _ in 0..3 {
        assert_eq!(get_all(client, &upper).await.unwrap(), b"HELLO WORLD");
        assert_eq!(get_all(client, &reversed).await.unwrap(), b" olleh");
        assert_eq!(
            get_all(client, &repeated).await.unwrap(),
            b"worldworldworld"
        );
    }
    let unknown = get_all(client, &Bytes::from(vec![0xab; 32]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let short = get_all(client, &Bytes::from(vec![0xab; 31]))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    let verified = client
        .verify(VerifyRequest {
            addr: upper.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.deterministic, "{verified:?}");
    let resolved = client
        .resolve(ResolveRequest {
            addr: upper.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.found, "{resolved:?}");
    client.status(StatusRequest {}).await.unwrap();

    // Garbage collection. `upper` is pinned (a no-op after the first round), so it and all it
    // uses (`joined`, `a`, `b`) are live whatever their age: a dry run without grace reports
    // what is unpinned and older than now as garbage, never them.
    client
        .pin(PinRequest {
            addr: upper.clone(),
        })
        .await
        .unwrap();
    let dry = client
        .garbage_collect(GcRequest {
            grace_period_secs: 0,
            dry_run: true,
            detail_addrs: true,
            max_removals: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run, "{dry:?}");
    assert!(dry.pinned_count >= 1, "{dry:?}");
    assert_eq!(
        dry.removed_addrs.len() as u64,
        dry.blobs_removed + dry.recipes_removed,
        "{dry:?}"
    );
    for live in [&upper, &joined, &a, &b] {
        assert!(
            !dry.removed_addrs.contains(live),
            "the dry run would remove a pinned address or an input of one: {dry:?}"
        );
    }
    // A real collection, with a grace period longer than the test: everything the workload
    // put is young, so nothing goes and the next round finds all it needs.
    let collected = client
        .garbage_collect(GcRequest {
            grace_period_secs: 3600,
            dry_run: false,
            detail_addrs: false,
            max_removals: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!collected.dry_run, "{collected:?}");
    assert_eq!(
        (
            collected.blobs_removed,
            collected.recipes_removed,
            collected.cache_entries_removed
        ),
        (0, 0, 0),
        "{collected:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus's view of the rules.

/// `/api/v1/rules`: every rule's (kind, name, health, lastError), and each group's
/// `lastEvaluation`.
async fn loaded_rules(prom: &Prometheus) -> (Vec<(String, String, String, String)>, Vec<String>) {
    let json = prom
        .api("/api/v1/rules")
        .await
        .unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
    let mut rules = Vec::new();
    let mut evaluations = Vec::new();
    for group in json["data"]["groups"].as_array().unwrap() {
        evaluations.push(group["lastEvaluation"].as_str().unwrap_or("").to_owned());
        for rule in group["rules"].as_array().unwrap() {
            let field = |k: &str| rule[k].as_str().unwrap_or("").to_owned();
            let kind = match field("type").as_str() {
                "alerting" => "alert".to_owned(),
                "recording" => "record".to_owned(),
                other => other.to_owned(),
            };
            rules.push((kind, field("name"), field("health"), field("lastError")));
        }
    }
    (rules, evaluations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_alert_and_recording_query_returns_data() {
    require("prometheus");
    let (checks, rules) = all_checks();
    let deadline = Instant::now() + DEADLINE;
    // On the remote backend (a real SeaweedFS and PostgreSQL), so that the scale-out panels
    // (object store and index calls, the local read-through cache) have data too.
    let services = deriva_testkit::backends::Backends::start();
    let mut options = ServerProcess::options().args([
        "--verification".to_owned(),
        "dual".to_owned(),
        // The rounds collect with no grace period.
        "--gc-min-grace".to_owned(),
        "0s".to_owned(),
        "--blob-store".to_owned(),
        format!("s3://{}/monitoring", services.bucket()),
        "--index".to_owned(),
        services.pg_url(),
    ]);
    for (key, value) in services.aws_env() {
        options = options.env(key, value);
    }
    let server = options.start();
    let mut client = server.client().await;

    // A first round by hand, so that every histogram family has its first observation, then
    // the same rounds over and over in the background.
    round(&mut client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn({
        let stop = stop.clone();
        let mut client = client.clone();
        async move {
            let mut rounds = 1u64;
            while !stop.load(Ordering::Relaxed) {
                round(&mut client).await;
                rounds += 1;
                // Pacing only: a steady rate over the scrapes.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rounds
        }
    });

    let config = derived_config(server.metrics_addr());
    let rule_files = [
        repo_path("monitoring/alerts.yml"),
        repo_path("monitoring/recording.yml"),
    ];
    let rule_files: Vec<&std::path::Path> = rule_files.iter().map(|p| p.as_path()).collect();
    let mut prom = Prometheus::start_with(&config, &rule_files);
    prom.wait_ready(deadline).await;
    prom.poll_one(r#"up{job="deriva"}"#, deadline, |v| v == 1.0)
        .await;
    // Enough scrapes for every rate (two samples at least; five to be safe).
    let scrapes = prom
        .poll_one(r#"count_over_time(up{job="deriva"}[1m])"#, deadline, |v| {
            v >= 5.0
        })
        .await;

    // Prometheus loaded exactly the rules the extractor found, and each group has been
    // evaluated twice since those scrapes, without error, so the recorded series exist.
    let (_, before) = loaded_rules(&prom).await;
    let mut changes = vec![0; before.len()];
    let mut last = before;
    let loaded = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (loaded, evaluations) = loaded_rules(&prom).await;
        for (i, e) in evaluations.iter().enumerate() {
            if last.get(i) != Some(e) {
                changes[i] += 1;
            }
        }
        last = evaluations;
        if !changes.is_empty() && changes.iter().all(|&c| c >= 2) {
            break loaded;
        }
        assert!(
            Instant::now() < deadline,
            "the rule groups were not evaluated in time: {loaded:?}\nprometheus:\n{}",
            prom.log()
        );
    };
    let mut expected: Vec<(String, String)> = rules
        .iter()
        .map(|r| (r.kind.to_owned(), r.name.clone()))
        .collect();
    let mut found: Vec<(String, String)> = loaded
        .iter()
        .map(|(kind, name, _, _)| (kind.clone(), name.clone()))
        .collect();
    expected.sort();
    found.sort();
    assert_eq!(
        found, expected,
        "the rules Prometheus loaded (left) are not the ones read from the rule files (right)"
    );
    for (kind, name, health, error) in &loaded {
        assert_eq!(health, "ok", "{kind} {name}: health {health}: {error}");
    }

    stop.store(true, Ordering::Relaxed);
    let rounds = workload.await.unwrap();

    // Every expression: parses, and returns data. All failures are reported together.
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for check in &checks {
        match prom.try_query(&check.promql).await {
            Ok(series) if series.is_empty() => failures.push(format!(
                "{}: returned no data\n    {}",
                check.origin, check.promql
            )),
            Ok(series) => report.push(format!(
                "{} series  {}: {}",
                series.len(),
                check.origin,
                check.promql.replace('\n', " ")
            )),
            Err(e) => failures.push(format!(
                "{}: failed\n    {}\n    {e}",
                check.origin, check.promql
            )),
        }
    }
    // The alerts as written: they must parse (they rightly answer nothing unless firing).
    for rule in rules.iter().filter(|r| r.kind == "alert") {
        if let Err(e) = prom.try_query(&rule.expr).await {
            failures.push(format!(
                "alert {}: failed\n    {}\n    {e}",
                rule.name, rule.expr
            ));
        }
    }
    eprintln!(
        "{scrapes} scrapes in [1m]; {rounds} workload rounds; {} expressions:\n{}",
        checks.len(),
        report.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} of {} expressions of the monitoring stack failed:\n{}\nprometheus:\n{}",
        failures.len(),
        checks.len(),
        failures.join("\n"),
        prom.log()
    );
    assert!(
        !server.stderr().contains(" ERROR "),
        "the server logged errors:\n{}",
        server.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// The files agree with each other.

/// The lines of a YAML file that hold something: no blank lines, no comment lines.
fn yaml_lines(yaml: &str) -> Vec<&str> {
    yaml.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

/// Where a line's key starts: its indentation, plus the `- ` of a list item.
fn key_indent(line: &str) -> usize {
    let trimmed = line.trim_start();
    indent(line) + if trimmed.starts_with("- ") { 2 } else { 0 }
}

/// A scalar as written after `key:` or `- `: comment dropped, quotes removed.
fn yaml_scalar(text: &str) -> String {
    let text = text.split(" #").next().unwrap().trim();
    for quote in ['"', '\''] {
        if let Some(inner) = text.strip_prefix(quote).and_then(|t| t.strip_suffix(quote)) {
            return inner.to_owned();
        }
    }
    text.to_owned()
}

/// `key` at the top level of a block of YAML lines (a mapping, or one list item): its inline
/// value and the lines nested under it. The stack's files need no more of YAML than this (there
/// is no YAML parser among the dependencies): mappings and lists by indentation, plain or quoted
/// one-line scalars, flow lists of plain scalars.
fn yaml_get<'a>(block: &[&'a str], key: &str) -> Option<(String, Vec<&'a str>)> {
    let top = block.iter().map(|l| key_indent(l)).min()?;
    let at = block.iter().position(|line| {
        let text = line.trim_start();
        let text = text.strip_prefix("- ").unwrap_or(text);
        key_indent(line) == top && text.strip_prefix(key).is_some_and(|r| r.starts_with(':'))
    })?;
    let text = block[at].trim_start();
    let text = text.strip_prefix("- ").unwrap_or(text);
    let value = yaml_scalar(&text[key.len() + 1..]);
    let nested = block[at + 1..]
        .iter()
        .take_while(|l| key_indent(l) > top)
        .copied()
        .collect();
    Some((value, nested))
}

/// The value at a path of keys, from the top of a YAML file; panics, naming the file, if a key
/// is missing.
fn yaml_path<'a>(file: &str, block: &[&'a str], path: &[&str]) -> (String, Vec<&'a str>) {
    let mut current = (String::new(), block.to_vec());
    for (i, key) in path.iter().enumerate() {
        current = yaml_get(&current.1, key)
            .unwrap_or_else(|| panic!("{file}: no `{}`", path[..=i].join(".")));
    }
    current
}

/// The items of a block list (`- ...` lines at the block's top level), each with its lines.
fn yaml_items<'a>(block: &[&'a str]) -> Vec<Vec<&'a str>> {
    let Some(top) = block.iter().map(|l| indent(l)).min() else {
        return Vec::new();
    };
    let mut items: Vec<Vec<&str>> = Vec::new();
    for line in block {
        if indent(line) == top && line.trim_start().starts_with("- ") {
            items.push(vec![line]);
        } else if let Some(item) = items.last_mut() {
            item.push(line);
        }
    }
    items
}

/// A list written either way, `[a, b]` or as `- a` lines: its plain scalar items.
fn yaml_list(value: &str, nested: &[&str]) -> Vec<String> {
    if let Some(flow) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        return flow
            .split(',')
            .map(yaml_scalar)
            .filter(|v| !v.is_empty())
            .collect();
    }
    yaml_items(nested)
        .iter()
        .map(|item| yaml_scalar(item[0].trim_start().strip_prefix("- ").unwrap()))
        .collect()
}

/// `http://HOST:PORT/PATH` split into host, port and path.
fn split_url(url: &str) -> (&str, u16, &str) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url}: not http://"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority
        .split_once(':')
        .unwrap_or_else(|| panic!("{url}: no port"));
    (host, port.parse().unwrap(), path)
}

#[test]
fn the_stack_files_agree() {
    let compose = read("docker-compose.monitoring.yml");
    let mut host_ports = HashMap::new();
    for line in compose.lines().map(str::trim) {
        let Some(item) = line.strip_prefix("- ") else {
            if let Some(image) = line.strip_prefix("image:") {
                let image = image.trim();
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(
                    !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                    "image {image} is not pinned to a version"
                );
            }
            continue;
        };
        let item = item.trim_matches('"');
        // Bind mounts: the file or directory exists.
        if let Some(source) = item.strip_prefix("./") {
            let source = source.split(':').next().unwrap();
            assert!(
                repo_path(source).exists(),
                "docker-compose.monitoring.yml mounts ./{source}, which does not exist"
            );
        }
        // Published ports: `127.0.0.1:HOST:CONTAINER`, never a port the server uses.
        let fields: Vec<&str> = item.split(':').collect();
        if let [ip, host, container] = fields.as_slice()
            && ip.parse::<std::net::IpAddr>().is_ok()
            && container.parse::<u16>().is_ok()
        {
            let host: u16 = host.parse().unwrap();
            assert!(
                ![50051, 9090].contains(&host),
                "host port {host} clashes with deriva-server's defaults"
            );
            assert!(
                host_ports.insert(host, item.to_owned()).is_none(),
                "host port {host} published twice"
            );
        }
    }
    for port in [4317, 4318, 16686, 3100, 9091, 3000] {
        assert!(host_ports.contains_key(&port), "port {port} not published");
    }

    // The collector listens where compose publishes it, and serves what Prometheus scrapes.
    let collector = read("otel-collector/config.yaml");
    for needle in [
        "endpoint: 0.0.0.0:4317",
        "endpoint: 0.0.0.0:4318",
        "endpoint: 0.0.0.0:8889",
        "endpoint: jaeger:4317",
        "processors: [memory_limiter, batch]",
        "extensions: [health_check]",
    ] {
        assert!(
            collector.contains(needle),
            "otel-collector/config.yaml lacks `{needle}`"
        );
    }
    assert!(compose.contains("./otel-collector/config.yaml:/etc/otelcol-contrib/config.yaml"));
    assert!(compose.contains("--config=/etc/otelcol-contrib/config.yaml"));
    assert!(read("monitoring/prometheus.yml").contains("\"otel-collector:8889\""));

    // Logs: the collector's logs pipeline ends in an OTLP/HTTP exporter to the Loki service, on
    // the port of the Loki config compose mounts, which accepts OTLP's structured metadata.
    let compose_yaml = yaml_lines(&compose);
    let collector_yaml = yaml_lines(&collector);
    let (pipeline_exporters, nested) = yaml_path(
        "otel-collector/config.yaml",
        &collector_yaml,
        &["service", "pipelines", "logs", "exporters"],
    );
    let pipeline_exporters = yaml_list(&pipeline_exporters, &nested);
    let loki_exporters: Vec<&String> = pipeline_exporters
        .iter()
        .filter(|e| e.split('/').next() == Some("otlphttp"))
        .collect();
    let [exporter] = loki_exporters.as_slice() else {
        panic!("the collector's logs pipeline needs one otlphttp exporter: {pipeline_exporters:?}");
    };
    let (endpoint, _) = yaml_path(
        "otel-collector/config.yaml",
        &collector_yaml,
        &["exporters", exporter, "endpoint"],
    );
    let (loki_host, loki_port, loki_path) = split_url(&endpoint);
    assert_eq!(
        loki_path, "otlp",
        "{exporter}: Loki's OTLP endpoint is /otlp (the exporter appends /v1/logs): {endpoint}"
    );
    let (_, loki_service) = yaml_path(
        "docker-compose.monitoring.yml",
        &compose_yaml,
        &["services", loki_host],
    );
    let (image, _) = yaml_get(&loki_service, "image").expect("the loki service's image");
    assert!(
        image.starts_with("grafana/loki:3."),
        "Loki 3 ingests OTLP: {image}"
    );
    let (mounts, nested) = yaml_get(&loki_service, "volumes").expect("the loki service's volumes");
    let config_mount = yaml_list(&mounts, &nested)
        .into_iter()
        .find(|m| m.starts_with("./monitoring/loki/config.yaml:"))
        .expect("the loki service mounts monitoring/loki/config.yaml");
    let target = config_mount.split(':').nth(1).unwrap();
    let (command, _) = yaml_get(&loki_service, "command").expect("the loki service's command");
    assert!(
        command.contains(&format!("-config.file={target}")),
        "the loki service runs with the config it mounts ({target}): {command}"
    );
    let loki_config = read("monitoring/loki/config.yaml");
    let loki_yaml = yaml_lines(&loki_config);
    let file = "monitoring/loki/config.yaml";
    let (listen, _) = yaml_path(file, &loki_yaml, &["server", "http_listen_port"]);
    assert_eq!(
        listen.parse::<u16>().unwrap(),
        loki_port,
        "{endpoint}: Loki's port"
    );
    let (allowed, _) = yaml_path(
        file,
        &loki_yaml,
        &["limits_config", "allow_structured_metadata"],
    );
    assert_eq!(
        allowed, "true",
        "{file}: OTLP's trace ids are structured metadata"
    );
    let (_, schemas) = yaml_path(file, &loki_yaml, &["schema_config", "configs"]);
    let schemas = yaml_items(&schemas);
    let schema = schemas.last().expect("a schema");
    for (key, expected) in [("schema", "v13"), ("store", "tsdb")] {
        let (value, _) = yaml_get(schema, key).unwrap_or_else(|| panic!("{file}: schema {key}"));
        assert_eq!(
            value, expected,
            "{file}: structured metadata needs tsdb and v13"
        );
    }
    let (depends, nested) = yaml_path(
        "docker-compose.monitoring.yml",
        &compose_yaml,
        &["services", "otel-collector", "depends_on"],
    );
    assert!(
        yaml_list(&depends, &nested).iter().any(|d| d == loki_host),
        "the collector depends on {loki_host}"
    );

    // Grafana: the dashboard's datasource is the provisioned one; units; quantiles by (le).
    let file = "monitoring/grafana/provisioning/datasources/datasources.yml";
    let datasources = read(file);
    assert!(datasources.contains("uid: prometheus") && datasources.contains("type: jaeger"));
    // Logs and traces link to each other: Loki's derived field opens a line's trace_id in the
    // Jaeger datasource, and Jaeger's trace to logs queries the Loki datasource by trace id.
    let datasources_yaml = yaml_lines(&datasources);
    let (_, list) = yaml_path(file, &datasources_yaml, &["datasources"]);
    let by_type = |wanted: &str| {
        let found: Vec<Vec<&str>> = yaml_items(&list)
            .into_iter()
            .filter(|item| yaml_get(item, "type").is_some_and(|(t, _)| t == wanted))
            .collect();
        let [one] = found.as_slice() else {
            panic!("{file}: {} datasources of type {wanted}", found.len());
        };
        let (uid, _) = yaml_get(one, "uid").unwrap_or_else(|| panic!("{file}: {wanted}: no uid"));
        (uid, one.clone())
    };
    let (jaeger_uid, jaeger) = by_type("jaeger");
    let (loki_uid, loki) = by_type("loki");
    let (url, _) = yaml_get(&loki, "url").expect("the Loki datasource's url");
    let (host, port, _) = split_url(&url);
    assert_eq!(
        (host, port),
        (loki_host, loki_port),
        "the Loki datasource queries the Loki service"
    );
    let (_, fields) = yaml_path(file, &loki, &["jsonData", "derivedFields"]);
    let trace_links: Vec<Vec<&str>> = yaml_items(&fields)
        .into_iter()
        .filter(|f| yaml_get(f, "datasourceUid").is_some_and(|(uid, _)| uid == jaeger_uid))
        .collect();
    let [trace_link] = trace_links.as_slice() else {
        panic!("{file}: Loki needs one derived field into the Jaeger datasource ({jaeger_uid})");
    };
    for (key, expected) in [
        ("matcherType", "label"),
        ("matcherRegex", "trace_id"),
        // `$$`: Grafana expands environment variables in provisioning files.
        ("url", "$${__value.raw}"),
    ] {
        let (value, _) = yaml_get(trace_link, key).unwrap_or_else(|| panic!("{file}: {key}"));
        assert_eq!(value, expected, "{file}: the Loki derived field's {key}");
    }
    let (logs_uid, _) = yaml_path(
        file,
        &jaeger,
        &["jsonData", "tracesToLogsV2", "datasourceUid"],
    );
    assert_eq!(
        logs_uid, loki_uid,
        "{file}: Jaeger's trace to logs queries Loki"
    );
    // A custom query filters by trace id itself; the simple one needs filterByTraceID.
    let trace_to_logs = |key: &str| {
        yaml_get(&jaeger, "jsonData")
            .and_then(|(_, block)| yaml_get(&block, "tracesToLogsV2"))
            .and_then(|(_, block)| yaml_get(&block, key))
            .map(|(value, _)| value)
            .unwrap_or_default()
    };
    if trace_to_logs("customQuery") == "true" {
        let query = trace_to_logs("query");
        assert!(
            query.contains("trace_id")
                && ["$${__span.traceId}", "$${__trace.traceId}"]
                    .iter()
                    .any(|v| query.contains(v)),
            "{file}: Jaeger's trace to logs query filters by trace id: {query}"
        );
    } else {
        assert_eq!(
            trace_to_logs("filterByTraceID"),
            "true",
            "{file}: Jaeger's trace to logs filters by trace id"
        );
    }
    // Every `${` of Grafana's own variables is escaped, or Grafana would blank it out as an
    // unset environment variable when it loads the file (comments are not expanded).
    for (n, line) in datasources.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let unescaped = line
            .match_indices("${")
            .any(|(i, _)| i == 0 || line.as_bytes()[i - 1] != b'$');
        assert!(
            !unescaped,
            "{file}:{}: `${{` not written `$${{`: {line}",
            n + 1
        );
    }
    let dashboard: Value =
        serde_json::from_str(&read("monitoring/grafana/dashboards/deriva.json")).unwrap();
    let mut panels = dashboard["panels"].as_array().unwrap().clone();
    while let Some(panel) = panels.pop() {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        if panel["type"] == "row" {
            panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
            continue;
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str();
        assert!(
            unit.is_some_and(|u| !u.is_empty()),
            "panel {title:?} has no unit"
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "prometheus",
                "panel {title:?}: datasource"
            );
            let expr = t["expr"].as_str().unwrap();
            if expr.contains("_bucket") {
                assert!(
                    expr.contains("histogram_quantile(") && expr.contains("sum by (le"),
                    "panel {title:?}: a quantile not over `sum by (le, ...)`: {expr}"
                );
            }
        }
    }
}

#[test]
fn the_rule_extractor_reads_every_form() {
    let yaml = "groups:\n  - name: g\n    rules:\n      - record: a:b:c\n        expr: sum(x)\n\
                \x20     - alert: Plain\n        expr: up == 0\n        for: 1m\n\
                \x20     - alert: Block\n        expr: |\n          sum(rate(x[5m]))\n\n\
                \x20           / sum(rate(y[5m])) > 0.05\n        labels:\n          a: b\n\
                \x20     - alert: Continued\n        expr: sum(x)\n          < 0.5\n";
    let got = rules("test", yaml);
    let names: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|r| (r.kind, r.name.as_str(), r.expr.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("record", "a:b:c", "sum(x)"),
            ("alert", "Plain", "up == 0"),
            (
                "alert",
                "Block",
                "sum(rate(x[5m]))\n/ sum(rate(y[5m])) > 0.05"
            ),
            ("alert", "Continued", "sum(x)\n< 0.5"),
        ]
    );
}

#[test]
fn the_yaml_reader_finds_keys_items_and_lists() {
    let yaml = "# a comment\nservice:\n  pipelines:\n    logs:\n      receivers: [otlp]\n\
                \x20     exporters: [otlphttp/loki, debug] # two\n    logs2:\n      x: 1\n\
                datasources:\n  - name: Jaeger\n    uid: jaeger\n    jsonData:\n\
                \x20     url: '$${__value.raw}'\n  - name: Loki\n    uid: \"loki\"\n\
                depends_on:\n  - jaeger\n  - loki\n";
    let lines = yaml_lines(yaml);
    let (value, nested) = yaml_path("t", &lines, &["service", "pipelines", "logs", "exporters"]);
    assert_eq!(yaml_list(&value, &nested), ["otlphttp/loki", "debug"]);
    assert!(
        yaml_get(&lines, "pipelines").is_none(),
        "not at the top level"
    );
    let (_, list) = yaml_path("t", &lines, &["datasources"]);
    let items = yaml_items(&list);
    assert_eq!(items.len(), 2);
    assert_eq!(yaml_get(&items[1], "uid").unwrap().0, "loki");
    assert_eq!(yaml_get(&items[1], "name").unwrap().0, "Loki");
    assert_eq!(
        yaml_path("t", &items[0], &["jsonData", "url"]).0,
        "$${__value.raw}"
    );
    let (value, nested) = yaml_path("t", &lines, &["depends_on"]);
    assert_eq!(yaml_list(&value, &nested), ["jaeger", "loki"]);
    assert_eq!(split_url("http://loki:3100/otlp"), ("loki", 3100, "otlp"));
}

#[test]
fn thresholds_split_at_the_one_top_level_comparison() {
    assert_eq!(
        split_threshold(r#"up{job="deriva"} == 0"#),
        Some((r#"up{job="deriva"}"#, "==", 0.0))
    );
    assert_eq!(
        split_threshold("sum(rate(x{a!=\"b\",c=~\"<d>\"}[5m])) / sum(y)\n  > 0.05"),
        Some(("sum(rate(x{a!=\"b\",c=~\"<d>\"}[5m])) / sum(y)", ">", 0.05))
    );
    assert_eq!(
        split_threshold("histogram_quantile(0.99, sum by (le) (x)) >= 5"),
        Some(("histogram_quantile(0.99, sum by (le) (x))", ">=", 5.0))
    );
    // No comparison, two, or no number on the right: not the convention.
    assert_eq!(split_threshold("sum(x)"), None);
    assert_eq!(split_threshold("x > 1 < 2"), None);
    assert_eq!(split_threshold("x > y"), None);
    assert_eq!(split_threshold("x > bool 1"), None);
}

#[test]
fn grafana_variables_are_substituted() {
    let subs = vec![("$method".to_owned(), ".+".to_owned())];
    assert_eq!(
        substitute(
            "t",
            r#"rate(x{m=~"$method"}[$__rate_interval]) + max_over_time(y[$__range:])"#,
            &subs
        ),
        r#"rate(x{m=~".+"}[1m]) + max_over_time(y[1m:])"#
    );
}
