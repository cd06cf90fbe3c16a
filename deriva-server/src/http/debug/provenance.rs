//! `/debug/provenance/{addr}`: where the bytes of an address came from, as
//! [`deriva_compute::AsyncExecutor::provenance`] answers it: one row per address of its
//! closure (to `?depth=N`, default [`DEPTH`]), indented by depth, with the function, the node,
//! when, how long, the compute's trace (a link to this node's waterfall when the trace store
//! still holds it, else to `--trace-url-template`), the audits and the signature. JSON
//! without `Accept: text/html`.

use std::fmt::Write;
use std::time::SystemTime;

use deriva_compute::{Described, ProvenanceTree};
use deriva_core::SignedRecord;
use serde::Serialize;

use super::page::{self, Esc, Page};

/// The depth shown unless `?depth=` asks otherwise.
pub(super) const DEPTH: u32 = 4;
/// The deepest a page may ask for: a page is for reading, the RPC for everything.
pub(super) const MAX_DEPTH: u32 = 64;

/// One address of the tree, as the JSON answer lists it.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    addr: String,
    depth: u32,
    kind: &'static str,
    function: Option<String>,
    inputs: Vec<String>,
    node: Option<String>,
    computed_at_unix_ms: Option<u64>,
    duration_seconds: Option<f64>,
    trace_id: Option<String>,
    span_id: Option<String>,
    output_hash: Option<String>,
    output_bytes: Option<u64>,
    signed: bool,
    audits: Option<[u64; 3]>,
    disputed: bool,
    size: Option<u64>,
    stored_at_unix_ms: Option<u64>,
}

/// The rows of `tree`, in its order.
pub(super) fn rows(tree: &ProvenanceTree) -> Vec<Row> {
    tree.entries
        .iter()
        .map(|entry| {
            let mut row = Row {
                addr: entry.addr.to_hex(),
                depth: entry.depth,
                kind: "missing",
                function: None,
                inputs: Vec::new(),
                node: None,
                computed_at_unix_ms: None,
                duration_seconds: None,
                trace_id: None,
                span_id: None,
                output_hash: None,
                output_bytes: None,
                signed: false,
                audits: None,
                disputed: false,
                size: None,
                stored_at_unix_ms: None,
            };
            match &entry.described {
                Described::Leaf(stat) => {
                    row.kind = "leaf";
                    row.size = Some(stat.size);
                    row.stored_at_unix_ms = stat.stored_at.map(unix_ms);
                }
                Described::Recipe { recipe, record } => {
                    row.kind = "recipe";
                    row.function = Some(recipe.function().to_string());
                    row.inputs = recipe.inputs().iter().map(|a| a.to_hex()).collect();
                    if let Some(p) = record {
                        fill(&mut row, &p.signed);
                        let a = p.audits;
                        row.audits = Some([a.matches, a.mismatches, a.errors]);
                        row.disputed = a.disputed();
                    }
                }
                Described::Missing => {}
            }
            row
        })
        .collect()
}

fn fill(row: &mut Row, signed: &SignedRecord) {
    let r = &signed.record;
    row.node = Some(r.node.clone());
    row.computed_at_unix_ms = Some(r.started_at_micros / 1000);
    row.duration_seconds = Some(r.duration().as_secs_f64());
    row.trace_id = r.span.map(|s| s.trace_hex());
    row.span_id = r.span.map(|s| s.span_hex());
    row.output_hash = Some(r.output_hash.to_hex());
    row.output_bytes = Some(r.output_bytes);
    row.signed = signed.signature.is_some();
}

fn unix_ms(at: SystemTime) -> u64 {
    deriva_core::provenance::unix_micros(at) / 1000
}

/// The page of `rows` (of the address `addr`, to `depth`); `trace_href` gives the link of a
/// trace id, if there is one.
pub(super) fn page(
    addr: &str,
    depth: u32,
    rows: &[Row],
    truncated: bool,
    trace_href: &dyn Fn(&str) -> Option<String>,
) -> Page {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1 class=mono>provenance <span class=muted>{}</span></h1>\
         <p>{} addresses to depth {depth}{}</p><table><thead><tr><th>address</th><th>what</th>\
         <th>node</th><th>computed (UTC)</th><th class=num>took</th><th>trace</th>\
         <th>audits</th><th>signature</th></tr></thead><tbody>",
        Esc(addr),
        rows.len(),
        if truncated {
            " · <b>cut at the server's limit</b>"
        } else {
            ""
        },
    );
    let now = unix_ms(SystemTime::now());
    for row in rows {
        let _ = write!(
            body,
            "<tr><td class=mono style=\"padding-left:{indent}em\" title=\"{addr}\">\
             <a href=\"/debug/provenance/{addr}\">{short}</a></td>",
            indent = 0.7 + f64::from(row.depth.min(32)) * 1.2,
            addr = Esc(&row.addr),
            short = Esc(page::short(&row.addr)),
        );
        let what = match (row.kind, &row.function) {
            ("leaf", _) => format!(
                "leaf, {}{}",
                page::bytes(&row.size.unwrap_or(0).to_string()),
                row.stored_at_unix_ms
                    .map(|ms| format!(", put {}", page::utc(ms)))
                    .unwrap_or_default()
            ),
            ("recipe", Some(f)) if row.node.is_none() => format!("{f} · not computed"),
            ("recipe", Some(f)) => f.clone(),
            _ => "missing".to_owned(),
        };
        let _ = write!(body, "<td>{}</td>", Esc(&what));
        let Some(node) = &row.node else {
            body.push_str("<td colspan=5></td></tr>");
            continue;
        };
        let when = row.computed_at_unix_ms.unwrap_or(0);
        let trace = match &row.trace_id {
            Some(id) => match trace_href(id) {
                Some(href) => format!(
                    "<a href=\"{}\" class=mono>{}</a>",
                    Esc(&href),
                    Esc(page::short(id))
                ),
                None => format!("<span class=mono title=\"{id}\">{}</span>", page::short(id)),
            },
            None => "<span class=muted>none</span>".to_owned(),
        };
        let audits = row.audits.unwrap_or_default();
        let _ = write!(
            body,
            "<td>{node}</td><td title=\"{ago} ago\">{time}</td><td class=num>{took}</td>\
             <td>{trace}</td><td{class}>{m} match, {x} mismatch, {e} error{disputed}</td>\
             <td>{signed}</td></tr>",
            node = Esc(node),
            ago = page::duration(now.saturating_sub(when).saturating_mul(1000)),
            time = page::utc(when),
            took = page::duration(
                (row.duration_seconds.unwrap_or(0.0) * 1e6).clamp(0.0, u64::MAX as f64) as u64
            ),
            class = if row.disputed { " class=st-err" } else { "" },
            m = audits[0],
            x = audits[1],
            e = audits[2],
            disputed = if row.disputed { " · DISPUTED" } else { "" },
            signed = if row.signed { "signed" } else { "unsigned" },
        );
    }
    body.push_str("</tbody></table>");
    Page {
        title: format!("provenance {}", page::short(addr)),
        body,
        script: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deriva_compute::ProvenanceEntry;
    use deriva_core::{CAddr, FunctionId, Provenance, Recipe, Record, SpanRef};
    use deriva_store::LeafStat;

    fn tree(node: &str) -> ProvenanceTree {
        let leaf = CAddr::for_leaf(b"x");
        let recipe = Recipe::new(
            FunctionId::new("concat", "v1").unwrap(),
            vec![leaf],
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        let mut provenance = Provenance::new(SignedRecord {
            record: Record {
                recipe: recipe.addr(),
                function: recipe.function().clone(),
                inputs: vec![leaf],
                output_hash: CAddr::for_leaf(b"x"),
                output_bytes: 1,
                node: node.into(),
                started_at_micros: 1_765_000_000_000_000,
                duration_micros: 3_100_000,
                span: SpanRef::from_traceparent(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            },
            signature: None,
        });
        provenance.audits.mismatches = 1;
        ProvenanceTree {
            entries: vec![
                ProvenanceEntry {
                    addr: recipe.addr(),
                    depth: 0,
                    described: Described::Recipe {
                        recipe,
                        record: Some(provenance),
                    },
                },
                ProvenanceEntry {
                    addr: leaf,
                    depth: 1,
                    described: Described::Leaf(LeafStat {
                        size: 1,
                        stored_at: None,
                    }),
                },
            ],
            truncated: true,
        }
    }

    #[test]
    fn rows_link_their_trace_and_escape_what_the_store_holds() {
        let tree = tree("<script>alert(1)</script>");
        let rows = rows(&tree);
        assert_eq!(rows[0].kind, "recipe");
        assert!(rows[0].disputed);
        assert_eq!(rows[1].kind, "leaf");
        let href = |id: &str| Some(format!("https://jaeger.example/trace/{id}"));
        let html = page("abc", 4, &rows, true, &href).body;
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(
            html.contains("href=\"https://jaeger.example/trace/4bf92f3577b34da6a3ce929d0e0e4736\"")
        );
        assert!(html.contains("DISPUTED"));
        assert!(html.contains("cut at the server"));
        assert!(html.contains(&format!("href=\"/debug/provenance/{}\"", rows[1].addr)));
        let none = |_: &str| None;
        let html = page("abc", 4, &rows, false, &none).body;
        assert!(!html.contains("jaeger"));
        assert!(html.contains("4bf92f35"));
    }
}
