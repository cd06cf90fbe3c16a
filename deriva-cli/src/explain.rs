//! [`format_explain`]: the `get --explain` tree, rendered from an `Explain` answer.
//!
//! Span and field names come from [`deriva_core::spans`], the constants the server's executor
//! opens its spans with, so a renamed span cannot silently fall through to the generic line.
//! A `materialize` row that hit an output computed earlier names where it came from, from the
//! span's `deriva.origin.*` attributes: `hit · computed on node-a 3 d ago in 3.10 s`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use deriva_core::spans::{self, field};
use deriva_proto::{ExplainResponse, TraceSpan};

use crate::human::{age_text, bytes_text as size_text, duration_text, indent};

/// Width of the `--explain` output.
const EXPLAIN_WIDTH: usize = 80;
/// Deepest level indented; deeper levels show their depth instead.
const EXPLAIN_MAX_INDENT: usize = 16;
/// Most lines printed before the rest is summarized.
const EXPLAIN_MAX_LINES: usize = 200;

/// Renders an `Explain` answer as a tree, one line per step, indented by depth, with each
/// step's duration right-aligned within 80 columns, and the total at the end.
pub fn format_explain(resp: &ExplainResponse) -> String {
    let mut children: HashMap<u64, Vec<&TraceSpan>> = HashMap::new();
    for span in &resp.spans {
        children.entry(span.parent).or_default().push(span);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (s.start_us, s.id));
    }
    // The value of a span's field, or "" when the span lacks it.
    let value = |span: &TraceSpan, key: &str| {
        span.fields
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.value.clone())
            .unwrap_or_default()
    };
    let short_addr = |a: String| a.get(..8).map_or(a.clone(), str::to_owned);
    let mut lines: Vec<(usize, String, Option<u64>)> = Vec::new();
    // Depth-first, iteratively: a deep recipe chain must not recurse.
    let root = resp.spans.first();
    let mut stack: Vec<(&TraceSpan, usize)> = root
        .map(|r| {
            children
                .get(&r.id)
                .into_iter()
                .flatten()
                .rev()
                .map(|c| (*c, 0))
                .collect()
        })
        .unwrap_or_default();
    while let Some((span, depth)) = stack.pop() {
        let line = match span.name.as_str() {
            spans::MATERIALIZE => Some((
                format!(
                    "{} {} {}{}",
                    spans::MATERIALIZE,
                    short_addr(value(span, field::ADDR)),
                    value(span, field::RESULT),
                    origin_text(
                        &value(span, field::ORIGIN_NODE),
                        &value(span, field::ORIGIN_AGE_SECONDS),
                        &value(span, field::ORIGIN_DURATION_SECONDS)
                    )
                ),
                Some(span.duration_us),
            )),
            spans::CACHE_CHECK => Some((
                if value(span, field::HIT) == "true" {
                    "cache hit"
                } else {
                    "cache miss"
                }
                .to_owned(),
                None,
            )),
            // A leaf read that found nothing only means the address is a recipe: no line.
            spans::LEAF_READ if value(span, field::FOUND) == "true" => {
                Some(("leaf read".to_owned(), Some(span.duration_us)))
            }
            spans::LEAF_READ => None,
            spans::COMPUTE => Some((
                format!(
                    "{} {} {} → {}",
                    spans::COMPUTE,
                    value(span, field::FUNCTION),
                    bytes_text(&value(span, field::INPUT_BYTES)),
                    bytes_text(&value(span, field::OUTPUT_BYTES))
                ),
                Some(span.duration_us),
            )),
            spans::VERIFY => Some((
                format!(
                    "{} {}",
                    spans::VERIFY,
                    if value(span, field::PASSED) == "true" {
                        "passed"
                    } else {
                        "FAILED"
                    }
                ),
                Some(span.duration_us),
            )),
            spans::CACHE_PUT => Some((
                format!("cache put {}", bytes_text(&value(span, field::BYTES))),
                None,
            )),
            // A call of the store to its backend: what it asked of which engine.
            spans::INDEX_DB => Some((
                format!(
                    "{} {} {}",
                    value(span, "db.system.name"),
                    value(span, "db.operation.name"),
                    value(span, "db.collection.name")
                ),
                Some(span.duration_us),
            )),
            spans::OBJECT_STORE => Some((
                format!("s3 {}", value(span, "rpc.method")),
                Some(span.duration_us),
            )),
            spans::LEAF_FILE => Some((
                format!("file {}", value(span, "deriva.store.op")),
                Some(span.duration_us),
            )),
            other => Some((other.to_owned(), Some(span.duration_us))),
        };
        if let Some((text, duration)) = line {
            lines.push((depth, text, duration));
        }
        for child in children.get(&span.id).into_iter().flatten().rev() {
            stack.push((child, depth + 1));
        }
    }
    let mut out = String::new();
    let status = if resp.status_code == 0 {
        "ok".to_owned()
    } else {
        format!("status {}", resp.status_code)
    };
    let _ = writeln!(out, "{} trace {} ({status})", resp.method, resp.trace_id);
    for (depth, text, duration) in lines.iter().take(EXPLAIN_MAX_LINES) {
        let mut left = format!("{}{text}", indent(*depth, EXPLAIN_MAX_INDENT));
        match duration {
            Some(us) => {
                let right = duration_text(*us);
                // A long line (a hit's origin deep in the tree) is cut to keep the duration in
                // its column.
                let room = EXPLAIN_WIDTH.saturating_sub(right.chars().count() + 2);
                if left.chars().count() > room {
                    left = left.chars().take(room.saturating_sub(1)).collect();
                    left.push('…');
                }
                let pad = EXPLAIN_WIDTH
                    .saturating_sub(left.chars().count() + right.chars().count() + 1)
                    .max(1);
                let _ = writeln!(out, "{left}{} {right}", " ".repeat(pad));
            }
            None => {
                let _ = writeln!(out, "{left}");
            }
        }
    }
    if lines.len() > EXPLAIN_MAX_LINES {
        let _ = writeln!(out, "  … {} more steps", lines.len() - EXPLAIN_MAX_LINES);
    }
    if resp.dropped_spans > 0 {
        let _ = writeln!(
            out,
            "  ({} spans were too many to keep)",
            resp.dropped_spans
        );
    }
    let total = format!("total {}", duration_text(resp.duration_us));
    let _ = writeln!(out, "{total}");
    out
}

/// ` · computed on NODE AGE ago in DURATION` for a hit whose output has a record (the span's
/// `deriva.origin.*` attributes, seconds as decimals), or "" when `node` is empty. A value that
/// does not read as seconds is left out.
fn origin_text(node: &str, age_seconds: &str, duration_seconds: &str) -> String {
    if node.is_empty() {
        return String::new();
    }
    let seconds = |raw: &str| {
        raw.parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
    };
    // A tree line stays within 80 columns: a long name (a UUID, the default
    // `service.instance.id`) is cut to its first characters.
    const NODE_CHARS: usize = 16;
    let node = if node.chars().count() > NODE_CHARS {
        let cut: String = node.chars().take(NODE_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        node.to_owned()
    };
    let mut out = format!(" · computed on {node}");
    if let Some(age) = seconds(age_seconds) {
        let _ = write!(out, " {} ago", age_text(age));
    }
    if let Some(took) = seconds(duration_seconds) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = write!(out, " in {}", duration_text(micros));
    }
    out
}

/// A size field's value as text, or the raw value with `B` if it is not a number.
fn bytes_text(raw: &str) -> String {
    raw.parse::<u64>()
        .map_or_else(|_| format!("{raw} B"), size_text)
}

#[cfg(test)]
mod tests {
    use deriva_proto::TraceField;

    use super::*;

    fn span(id: u64, parent: u64, name: &str, fields: &[(&str, &str)], start_us: u64) -> TraceSpan {
        TraceSpan {
            id,
            parent,
            name: name.to_owned(),
            fields: fields
                .iter()
                .map(|(key, value)| TraceField {
                    key: (*key).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
            start_us,
            duration_us: 1500,
        }
    }

    #[test]
    fn a_computed_recipe_over_a_leaf_renders_as_an_indented_tree() {
        let (top, leaf) = ("ab".repeat(32), "cd".repeat(32));
        let resp = ExplainResponse {
            trace_id: "0".repeat(32),
            method: "Get".to_owned(),
            duration_us: 2_500_000,
            spans: vec![
                span(1, 0, spans::RPC, &[], 0),
                span(
                    2,
                    1,
                    spans::MATERIALIZE,
                    &[(field::ADDR, &top), (field::RESULT, "computed")],
                    1,
                ),
                span(3, 2, spans::CACHE_CHECK, &[(field::HIT, "false")], 2),
                // Out of order: children are sorted by start time.
                span(
                    6,
                    2,
                    spans::COMPUTE,
                    &[
                        (field::FUNCTION, "concat/v1"),
                        (field::INPUT_BYTES, "2048"),
                        (field::OUTPUT_BYTES, "2048"),
                    ],
                    9,
                ),
                span(4, 2, spans::LEAF_READ, &[(field::FOUND, "false")], 3),
                span(
                    5,
                    2,
                    spans::MATERIALIZE,
                    &[(field::ADDR, &leaf), (field::RESULT, "leaf")],
                    4,
                ),
                span(7, 5, spans::LEAF_READ, &[(field::FOUND, "true")], 5),
                span(8, 2, spans::VERIFY, &[(field::PASSED, "false")], 10),
                span(9, 2, spans::CACHE_PUT, &[(field::BYTES, "2048")], 11),
                span(10, 2, "something_new", &[], 12),
            ],
            ..Default::default()
        };
        let text = format_explain(&resp);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("Get trace {} (ok)", "0".repeat(32)));
        let steps: Vec<String> = lines[1..lines.len() - 1]
            .iter()
            .map(|l| l.trim_end_matches(" 1.50 ms").trim_end().to_owned())
            .collect();
        assert_eq!(
            steps,
            [
                "  materialize abababab computed",
                "    cache miss",
                "    materialize cdcdcdcd leaf",
                "      leaf read",
                "    compute concat/v1 2.0 KiB → 2.0 KiB",
                "    verify FAILED",
                "    cache put 2.0 KiB",
                "    something_new",
            ]
        );
        assert_eq!(lines[lines.len() - 1], "total 2.50 s");
        assert!(
            lines.iter().all(|l| l.chars().count() <= EXPLAIN_WIDTH),
            "{text}"
        );
        // Durations are right-aligned at column 80; steps without one have none.
        assert!(lines[1].ends_with(" 1.50 ms") && lines[1].chars().count() == EXPLAIN_WIDTH);
        assert!(!lines[2].contains("ms"));
    }

    #[test]
    fn a_deep_tree_is_cut_short_and_says_how_much_is_left() {
        let mut spans_list = vec![span(1, 0, spans::RPC, &[], 0)];
        let depth = EXPLAIN_MAX_LINES as u64 + 50;
        for id in 2..2 + depth {
            let addr = format!("{id:064x}");
            spans_list.push(span(
                id,
                id - 1,
                spans::MATERIALIZE,
                &[(field::ADDR, &addr), (field::RESULT, "computed")],
                id,
            ));
        }
        let resp = ExplainResponse {
            spans: spans_list,
            dropped_spans: 3,
            ..Default::default()
        };
        let text = format_explain(&resp);
        assert!(text.contains("  … 50 more steps\n"), "{text}");
        assert!(text.contains("(3 spans were too many to keep)"), "{text}");
        // Past the deepest indent, a line shows its depth instead of indenting further.
        assert!(text.contains("[17] materialize"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= EXPLAIN_WIDTH));
    }

    #[test]
    fn a_hit_of_a_computed_output_names_its_origin() {
        let (hit, plain, odd) = ("ab".repeat(32), "cd".repeat(32), "ef".repeat(32));
        let resp = ExplainResponse {
            spans: vec![
                span(1, 0, spans::RPC, &[], 0),
                span(
                    2,
                    1,
                    spans::MATERIALIZE,
                    &[
                        (field::ADDR, &hit),
                        (field::RESULT, "hit"),
                        (field::ORIGIN_NODE, "node-a"),
                        // 3 days and an hour, as the f64 the server records.
                        (field::ORIGIN_AGE_SECONDS, "262800.25"),
                        (field::ORIGIN_DURATION_SECONDS, "3.1"),
                        (field::ORIGIN_TRACE_ID, "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ],
                    1,
                ),
                // A hit without a record (a leaf, or an output from before records).
                span(
                    3,
                    1,
                    spans::MATERIALIZE,
                    &[(field::ADDR, &plain), (field::RESULT, "hit")],
                    2,
                ),
                // Values that are not seconds are left out, never misread.
                span(
                    4,
                    1,
                    spans::MATERIALIZE,
                    &[
                        (field::ADDR, &odd),
                        (field::RESULT, "hit"),
                        // The default name, a UUID, is cut to stay within the width.
                        (field::ORIGIN_NODE, "a421be75-5bf6-4acd-a88d-1ad445b0a77c"),
                        (field::ORIGIN_AGE_SECONDS, "-1"),
                        (field::ORIGIN_DURATION_SECONDS, "0.000042"),
                    ],
                    3,
                ),
            ],
            ..Default::default()
        };
        let text = format_explain(&resp);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("materialize"))
            .map(|l| l.trim_end_matches(" 1.50 ms").trim_end())
            .collect();
        assert_eq!(
            rows,
            [
                "  materialize abababab hit · computed on node-a 3 d ago in 3.10 s",
                "  materialize cdcdcdcd hit",
                "  materialize efefefef hit · computed on a421be75-5bf6-4… in 42 µs",
            ],
            "{text}"
        );
        assert!(
            text.lines().all(|l| l.chars().count() <= EXPLAIN_WIDTH),
            "{text}"
        );
    }
}
