//! `/debug/traces/{id}` for a browser: the request's spans as a waterfall. One row per span in
//! tree order, indented by depth, with a bar placed by start offset and sized by duration on
//! the request's time axis, colored by outcome (cache hit, leaf, computed, error); a click on a
//! row opens its attributes.
//!
//! Bounded whatever the tree: the first [`OPEN_ROWS`] rows are shown, the next ones wait behind
//! a "show more" (still at most [`MAX_ROWS`] in all), indentation stops growing at
//! [`MAX_INDENT`] levels (the depth is then written out), and the walk is iterative, so a
//! 10,000-deep chain neither overflows the stack nor makes the page wide.

use std::collections::HashMap;
use std::fmt::Write;

use deriva_core::spans::{self, field};

use super::page::{self, Esc, Page};
use crate::trace_store::{SpanRecord, TraceRecord};

/// Rows shown at once.
pub(super) const OPEN_ROWS: usize = 500;
/// Most rows on the page; the rest are counted, and the JSON of the same URL has them all.
pub(super) const MAX_ROWS: usize = 2_500;
/// Deepest indentation, in levels.
const MAX_INDENT: usize = 32;

/// How a span ended, as its bar's color.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Hit,
    Leaf,
    Computed,
    Error,
    Other,
}

impl Outcome {
    fn class(self) -> &'static str {
        match self {
            Self::Hit => "o-hit",
            Self::Leaf => "o-leaf",
            Self::Computed => "o-computed",
            Self::Error => "o-error",
            Self::Other => "o-other",
        }
    }

    /// The outcome of `span`, from its name and fields (`result` of `materialize`, `hit` of
    /// `cache_check`, ...); `root_code` is the request's gRPC status.
    pub(super) fn of(span: &SpanRecord, root_code: i64) -> Self {
        let is = |name: &str, value: &str| span.field(name) == Some(value);
        if is("otel.status_code", "ERROR") {
            return Self::Error;
        }
        match span.name {
            spans::RPC if root_code != 0 => Self::Error,
            spans::MATERIALIZE => match span.field(field::RESULT) {
                Some("hit") => Self::Hit,
                Some("leaf") => Self::Leaf,
                Some("computed") => Self::Computed,
                Some("error") => Self::Error,
                _ => Self::Other,
            },
            spans::CACHE_CHECK if is(field::HIT, "true") => Self::Hit,
            spans::OUTPUT_READ if is(field::FOUND, "true") => Self::Hit,
            spans::LEAF_READ if is(field::FOUND, "true") => Self::Leaf,
            spans::VERIFY if is(field::PASSED, "false") => Self::Error,
            spans::COMPUTE
            | spans::VERIFY
            | spans::CACHE_PUT
            | spans::SPILL_WRITE
            | spans::OUTPUT_WRITE => Self::Computed,
            _ => Self::Other,
        }
    }
}

/// The short text beside a span's name: the function and sizes of a compute, the address and
/// result of a materialization, ...
fn label(span: &SpanRecord, root_code: i64) -> String {
    let f = |name| span.field(name).unwrap_or("");
    match span.name {
        spans::RPC => format!("{} {}", f(field::RPC_METHOD), page::status_name(root_code)),
        spans::MATERIALIZE => format!("{} {}", page::short(f(field::ADDR)), f(field::RESULT)),
        spans::COMPUTE => format!(
            "{} · {} → {}",
            f(field::FUNCTION),
            page::bytes(f(field::INPUT_BYTES)),
            page::bytes(f(field::OUTPUT_BYTES))
        ),
        spans::VERIFY => format!("{} passed={}", f(field::FUNCTION), f(field::PASSED)),
        spans::CACHE_CHECK => match span.field(field::HIT) {
            Some("true") => "hit".into(),
            _ => "miss".into(),
        },
        spans::LEAF_READ | spans::OUTPUT_READ => match span.field(field::FOUND) {
            Some("true") => "found".into(),
            _ => "not found".into(),
        },
        spans::CACHE_PUT | spans::SPILL_WRITE | spans::OUTPUT_WRITE => page::bytes(f(field::BYTES)),
        _ => span
            .fields
            .iter()
            .take(2)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The spans in tree order (children by start), each with its depth. Spans whose parent is not
/// in the record (not kept) start trees of their own; a malformed record with a cycle is cut.
fn tree_order(spans: &[SpanRecord]) -> Vec<(usize, usize)> {
    let index: HashMap<u64, usize> = spans.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span.parent.and_then(|p| index.get(&p)) {
            Some(&parent) if parent != i => children.entry(parent).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let by_start = |v: &mut Vec<usize>| v.sort_by_key(|&i| (spans[i].start_us, spans[i].id));
    by_start(&mut roots);
    children.values_mut().for_each(by_start);
    let mut seen = vec![false; spans.len()];
    let mut order = Vec::with_capacity(spans.len());
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|i| (i, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        order.push((i, depth));
        if let Some(kids) = children.get(&i) {
            stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
        }
    }
    order
}

/// The page of one trace.
/// The waterfall of `trace`; `trace_href` links a trace id (a hit's origin) where it can.
pub(super) fn page(trace: &TraceRecord, trace_href: &dyn Fn(&str) -> Option<String>) -> Page {
    let mut body = String::new();
    let code = trace.status_code;
    let status_class = if code == 0 { "st-ok" } else { "st-err" };
    let _ = write!(
        body,
        "<h1 class=mono>{method} <span class=muted>{id}</span></h1>\
         <p><span class={status_class}>{status}</span> · {duration} · request id <code>{req}</code> · \
         started {time} UTC · {n} spans",
        method = Esc(&trace.method),
        id = Esc(&trace.trace_id),
        status = page::status_name(code),
        duration = page::duration(trace.duration_us),
        req = Esc(&trace.request_id),
        time = page::utc(trace.started_unix_ms),
        n = trace.spans.len(),
    );
    if let Some(addr) = &trace.addr {
        let _ = write!(body, " · address <code>{}</code>", Esc(addr));
    }
    if trace.dropped_spans > 0 {
        let _ = write!(
            body,
            " · <b>{} more spans not kept</b> by the trace store",
            trace.dropped_spans
        );
    }
    body.push_str("</p><p class=muted>");
    for (outcome, name) in [
        (Outcome::Hit, "cache hit"),
        (Outcome::Leaf, "leaf"),
        (Outcome::Computed, "computed"),
        (Outcome::Error, "error"),
        (Outcome::Other, "other"),
    ] {
        let _ = write!(
            body,
            "<span class=\"swatch {}\"></span>{name}",
            outcome.class()
        );
    }
    body.push_str(" · click a row for its attributes, events and joins</p>");

    // The axis: the request's duration, or further if a span outlived it.
    let total = trace
        .spans
        .iter()
        .map(|s| s.start_us.saturating_add(s.duration_us))
        .chain([trace.duration_us, 1])
        .max()
        .unwrap_or(1) as f64;
    body.push_str("<div class=wf><div class=axis><span>span</span><div class=ticks>");
    for quarter in 0..=4u32 {
        let _ = write!(
            body,
            "<span style=\"left:{}%\">{}</span>",
            quarter * 25,
            page::duration((total * f64::from(quarter) / 4.0) as u64)
        );
    }
    body.push_str("</div><span class=num>duration</span></div>");

    let order = tree_order(&trace.spans);
    for (row, &(i, depth)) in order.iter().take(MAX_ROWS).enumerate() {
        if row == OPEN_ROWS {
            let _ = write!(
                body,
                "<details class=more><summary>show {} more spans</summary>",
                order.len().min(MAX_ROWS) - OPEN_ROWS
            );
        }
        write_row(&mut body, &trace.spans[i], depth, total, code, trace_href);
    }
    if order.len() > OPEN_ROWS {
        body.push_str("</details>");
    }
    body.push_str("</div>");
    if order.len() > MAX_ROWS {
        let _ = write!(
            body,
            "<p class=muted>{} more spans are not drawn; the JSON of this page's address \
             (without <code>Accept: text/html</code>) has them all.</p>",
            order.len() - MAX_ROWS
        );
    }
    Page {
        title: format!("{} {}", trace.method, page::short(&trace.trace_id)),
        body,
        script: None,
    }
}

fn write_row(
    out: &mut String,
    span: &SpanRecord,
    depth: usize,
    total: f64,
    code: i64,
    trace_href: &dyn Fn(&str) -> Option<String>,
) {
    let outcome = Outcome::of(span, code);
    let left = span.start_us as f64 / total * 100.0;
    let width = span.duration_us as f64 / total * 100.0;
    let _ = write!(
        out,
        "<details class=\"span {class}\"><summary><span class=name style=\"padding-left:{indent}px\">",
        class = outcome.class(),
        indent = depth.min(MAX_INDENT) * 12,
    );
    if depth > MAX_INDENT {
        let _ = write!(out, "<span class=deep>↳{depth}</span>");
    }
    let _ = write!(
        out,
        "{name}<span class=lbl>{label}</span></span>\
         <span class=track><span class=bar style=\"left:{left:.3}%;width:{width:.3}%\"></span></span>\
         <span class=num>{duration}</span></summary><table class=attrs>\
         <tr><th>start</th><td>+{start}</td></tr><tr><th>depth</th><td>{depth}</td></tr>",
        name = Esc(span.name),
        label = Esc(&label(span, code)),
        duration = page::duration(span.duration_us),
        start = page::duration(span.start_us),
    );
    for (key, value) in &span.fields {
        let _ = write!(
            out,
            "<tr><th>{}</th><td class=mono>{}</td></tr>",
            Esc(key),
            Esc(value)
        );
    }
    for event in &span.events {
        let text: Vec<String> = event
            .fields
            .iter()
            .map(|(k, v)| {
                if *k == "message" {
                    v.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        let _ = write!(
            out,
            "<tr class=event><th>event +{}</th><td class=mono>{} {}</td></tr>",
            page::duration(event.at_us),
            Esc(event.level),
            Esc(&text.join(" "))
        );
    }
    // A hit's origin: the compute that made it, on whichever node, in whichever trace.
    if let Some(origin) = span.field(field::ORIGIN_TRACE_ID) {
        let target = match trace_href(origin) {
            Some(href) => format!("<a href=\"{}\">{}</a>", Esc(&href), Esc(origin)),
            None => Esc(origin).to_string(),
        };
        let _ = write!(
            out,
            "<tr class=link><th>computed in</th><td class=mono>trace {target} on {node}</td></tr>",
            node = Esc(span.field(field::ORIGIN_NODE).unwrap_or("?")),
        );
    }
    if span.name == spans::MATERIALIZE
        && let Some(addr) = span.field(field::ADDR).filter(|a| page::linkable(a))
    {
        let _ = write!(
            out,
            "<tr class=link><th>provenance</th><td class=mono><a href=\"/debug/provenance/{a}\">{a}</a></td></tr>",
            a = Esc(addr)
        );
    }
    for link in &span.links {
        let target =
            if link.trace_id.bytes().all(|b| b.is_ascii_hexdigit()) && !link.trace_id.is_empty() {
                format!(
                    "<a href=\"/debug/traces/{id}\">{id}</a>",
                    id = Esc(&link.trace_id)
                )
            } else {
                Esc(&link.trace_id).to_string()
            };
        let _ = write!(
            out,
            "<tr class=link><th>joined</th><td class=mono>{} of trace {target}</td></tr>",
            Esc(link.name)
        );
    }
    out.push_str("</table></details>");
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn span(id: u64, parent: Option<u64>, name: &'static str) -> SpanRecord {
        SpanRecord {
            id,
            parent,
            name,
            fields: Vec::new(),
            start_us: id,
            duration_us: 10,
            ..SpanRecord::default()
        }
    }

    fn trace(spans: Vec<SpanRecord>) -> TraceRecord {
        TraceRecord {
            trace_id: "ab".repeat(16),
            request_id: "req-1".into(),
            method: "Get".into(),
            addr: Some("cd".repeat(32)),
            status_code: 0,
            started_unix_ms: 1_700_000_000_000,
            duration_us: 50_000,
            dropped_spans: 0,
            spans,
        }
    }

    #[test]
    fn events_and_joins_show_in_the_details_escaped() {
        use crate::trace_store::{EventRecord, LinkRecord};
        let mut joined = span(2, Some(1), spans::MATERIALIZE);
        joined.events = vec![EventRecord {
            at_us: 5,
            level: "INFO",
            fields: vec![("message", "joined <b>".into()), ("addr", "ab".into())],
        }];
        joined.links = vec![LinkRecord {
            trace_id: "cd".repeat(16),
            name: "materialize",
        }];
        let (html, _) = rendered(&trace(vec![span(1, None, "rpc"), joined]));
        assert!(html.contains("INFO joined &lt;b&gt; addr=ab"), "{html}");
        assert!(
            html.contains(&format!(
                "<a href=\"/debug/traces/{id}\">{id}</a>",
                id = "cd".repeat(16)
            )),
            "{html}"
        );
    }

    fn rendered(trace: &TraceRecord) -> (String, Duration) {
        let start = Instant::now();
        let html = page(trace, &|_| None).html("n0nce");
        (html, start.elapsed())
    }

    #[test]
    fn a_ten_thousand_deep_chain_renders_bounded_and_quickly() {
        let spans = (1..=10_000u64)
            .map(|id| {
                let mut s = span(id, (id > 1).then(|| id - 1), spans::MATERIALIZE);
                s.fields = vec![
                    (field::ADDR, "ef".repeat(32)),
                    (field::RESULT, "computed".into()),
                ];
                s
            })
            .collect();
        let (html, took) = rendered(&trace(spans));
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(html.len() < 4 << 20, "{} bytes", html.len());
        assert_eq!(html.matches("class=bar ").count(), MAX_ROWS);
        assert!(html.contains("7500 more spans are not drawn"));
        // Indentation stops growing; the depth is written out instead.
        assert!(html.contains("<span class=deep>↳2499</span>"));
        assert!(html.contains(&format!("padding-left:{}px", MAX_INDENT * 12)));
        assert!(!html.contains(&format!("padding-left:{}px", (MAX_INDENT + 1) * 12)));
    }

    #[test]
    fn a_thousand_wide_fan_out_renders_every_span_behind_show_more() {
        let mut spans = vec![span(1, None, spans::RPC)];
        spans.extend((2..=1_001).map(|id| {
            let mut s = span(id, Some(1), spans::COMPUTE);
            s.fields = vec![
                (field::FUNCTION, "concat/v1".into()),
                (field::INPUT_BYTES, "2048".into()),
                (field::OUTPUT_BYTES, "11".into()),
            ];
            s
        }));
        let (html, took) = rendered(&trace(spans));
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(html.len() < 2 << 20, "{} bytes", html.len());
        assert_eq!(html.matches("class=bar ").count(), 1_001);
        assert_eq!(html.matches("concat/v1 · 2.0 KiB → 11 B").count(), 1_000);
        assert!(html.contains(&format!("show {} more spans", 1_001 - OPEN_ROWS)));
    }

    #[test]
    fn rows_follow_the_tree_and_bars_the_time_axis() {
        let mut compute = span(3, Some(2), spans::COMPUTE);
        (compute.start_us, compute.duration_us) = (25_000, 12_500);
        let mut materialize = span(2, Some(1), spans::MATERIALIZE);
        materialize.fields = vec![(field::RESULT, "hit".into())];
        let spans = vec![span(1, None, spans::RPC), compute, materialize];
        assert_eq!(tree_order(&spans), [(0, 0), (2, 1), (1, 2)]);
        let html = page(&trace(spans), &|_| None).html("n");
        assert!(html.contains("left:50.000%;width:25.000%"), "{html}");
        assert!(html.contains("class=\"span o-hit\""));
        assert!(html.contains("class=\"span o-computed\""));
    }

    #[test]
    fn hostile_values_are_escaped_everywhere() {
        let hostile = "<script>alert(1)</script>\"'&";
        let mut s = span(2, Some(1), spans::COMPUTE);
        s.fields = vec![(field::FUNCTION, hostile.into()), (hostile, hostile.into())];
        let mut t = trace(vec![span(1, None, spans::RPC), s]);
        t.request_id = hostile.into();
        t.method = hostile.into();
        t.trace_id = hostile.into();
        t.addr = Some(hostile.into());
        let html = page(&t, &|_| None).html("n");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("\"'&"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
    }
}
