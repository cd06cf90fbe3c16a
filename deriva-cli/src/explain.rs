//! [`format_explain`]: the `get --explain` tree, rendered from an `Explain` answer.

use std::fmt::Write as _;

use deriva_proto::{ExplainResponse, TraceSpan};

/// Width of the `--explain` output.
const EXPLAIN_WIDTH: usize = 80;
/// Deepest level indented; deeper levels show their depth instead.
const EXPLAIN_MAX_INDENT: usize = 16;
/// Most lines printed before the rest is summarized.
const EXPLAIN_MAX_LINES: usize = 200;

/// Renders an `Explain` answer as a tree, one line per step, indented by depth, with each
/// step's duration right-aligned within 80 columns, and the total at the end.
pub fn format_explain(resp: &ExplainResponse) -> String {
    use std::collections::HashMap;
    let mut children: HashMap<u64, Vec<&TraceSpan>> = HashMap::new();
    for span in &resp.spans {
        children.entry(span.parent).or_default().push(span);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (s.start_us, s.id));
    }
    let field = |span: &TraceSpan, key: &str| {
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
            "materialize" => Some((
                format!(
                    "materialize {} {}",
                    short_addr(field(span, "addr")),
                    field(span, "result")
                ),
                Some(span.duration_us),
            )),
            "cache_check" => Some((
                if field(span, "hit") == "true" {
                    "cache hit"
                } else {
                    "cache miss"
                }
                .to_owned(),
                None,
            )),
            "leaf_read" if field(span, "found") == "true" => {
                Some(("leaf read".to_owned(), Some(span.duration_us)))
            }
            "leaf_read" => None,
            "compute" => Some((
                format!(
                    "compute {} {} → {}",
                    field(span, "function"),
                    bytes_text(&field(span, "input_bytes")),
                    bytes_text(&field(span, "output_bytes"))
                ),
                Some(span.duration_us),
            )),
            "verify" => Some((
                format!(
                    "verify {}",
                    if field(span, "passed") == "true" {
                        "passed"
                    } else {
                        "FAILED"
                    }
                ),
                Some(span.duration_us),
            )),
            "cache_put" => Some((
                format!("cache put {}", bytes_text(&field(span, "bytes"))),
                None,
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
        let indent = if *depth <= EXPLAIN_MAX_INDENT {
            "  ".repeat(*depth + 1)
        } else {
            format!("{}[{depth}] ", "  ".repeat(EXPLAIN_MAX_INDENT + 1))
        };
        let left = format!("{indent}{text}");
        match duration {
            Some(us) => {
                let right = duration_text(*us);
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

fn duration_text(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn bytes_text(raw: &str) -> String {
    let Ok(n) = raw.parse::<u64>() else {
        return format!("{raw} B");
    };
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
