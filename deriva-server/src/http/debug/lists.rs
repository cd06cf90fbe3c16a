//! `/debug/traces` for a browser: the recent, slowest and failed requests as three tables, each
//! row linking to its waterfall, with a filter by method and status (also given by the
//! fragment: `#method=Get&status=NOT_FOUND`) and an optional reload every few seconds (a small
//! inline script; the rows are all there without it).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::page::{self, Esc, Page};
use crate::trace_store::{SLOWEST_WINDOW, TraceLists, TraceSummary};

/// Filters the rows, remembers the choices for the tab, and reloads when asked.
const SCRIPT: &str = r#"(function () {
  var method = document.getElementById("f-method"), status = document.getElementById("f-status"),
      refresh = document.getElementById("f-refresh"), timer = null, saved = {};
  function load() { try { saved = JSON.parse(sessionStorage.getItem("deriva.traces") || "{}"); } catch (e) {} }
  function save() {
    try { sessionStorage.setItem("deriva.traces", JSON.stringify(
      { method: method.value, status: status.value, refresh: refresh.checked })); } catch (e) {}
  }
  function apply() {
    var rows = document.querySelectorAll("tr[data-method]");
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      row.hidden = (method.value !== "" && row.dataset.method !== method.value) ||
                   (status.value !== "" && row.dataset.status !== status.value);
    }
    clearTimeout(timer);
    if (refresh.checked) { timer = setTimeout(function () { location.reload(); }, 5000); }
    save();
  }
  load();
  // A link may choose: /debug/traces#method=Get&status=NOT_FOUND.
  var asked = new URLSearchParams(location.hash.slice(1));
  ["method", "status"].forEach(function (k) { if (asked.has(k)) { saved[k] = asked.get(k); } });
  if (saved.method) { method.value = saved.method; }
  if (saved.status) { status.value = saved.status; }
  refresh.checked = !!saved.refresh;
  [method, status, refresh].forEach(function (el) { el.addEventListener("change", apply); });
  apply();
  document.documentElement.setAttribute("data-script", "ran");
})();"#;

/// The page of the three lists.
pub(super) fn page(lists: &TraceLists) -> Page {
    let all = || {
        lists
            .recent
            .iter()
            .chain(&lists.slowest)
            .chain(&lists.failed)
    };
    let methods: BTreeSet<&str> = all().map(|t| t.method.as_str()).collect();
    let statuses: BTreeSet<String> = all().map(|t| page::status_name(t.status_code)).collect();
    let mut body = String::from(
        "<h1>Requests</h1><div class=controls><label>method <select id=f-method>\
         <option value=\"\">all</option>",
    );
    for m in methods {
        let _ = write!(body, "<option>{}</option>", Esc(m));
    }
    body.push_str(
        "</select></label><label>status <select id=f-status><option value=\"\">all</option>",
    );
    for s in statuses {
        let _ = write!(body, "<option>{s}</option>");
    }
    body.push_str(
        "</select></label><label><input type=checkbox id=f-refresh> reload every 5 s</label>\
         </div>",
    );
    let slowest = format!(
        "Slowest of the last {} minutes",
        SLOWEST_WINDOW.as_secs() / 60
    );
    for (id, title, rows) in [
        ("recent", "Recent", &lists.recent),
        ("slowest", slowest.as_str(), &lists.slowest),
        ("failed", "Failed", &lists.failed),
    ] {
        table(&mut body, id, title, rows);
    }
    Page {
        title: "requests".into(),
        body,
        script: Some(SCRIPT),
    }
}

fn table(out: &mut String, id: &str, title: &str, rows: &[TraceSummary]) {
    let _ = write!(
        out,
        "<h2>{title} <span class=muted>({n})</span></h2><table id={id}><thead><tr>\
         <th>time (UTC)</th><th>method</th><th>address</th><th class=num>duration</th>\
         <th>status</th><th>request id</th><th class=num>spans</th></tr></thead><tbody>",
        n = rows.len(),
    );
    if rows.is_empty() {
        out.push_str("<tr><td colspan=7 class=muted>none</td></tr>");
    }
    for t in rows {
        let status = page::status_name(t.status_code);
        let time = page::utc(t.started_unix_ms);
        let _ = write!(
            out,
            "<tr data-method=\"{method}\" data-status=\"{status}\"><td>",
            method = Esc(&t.method),
        );
        if page::linkable(&t.trace_id) {
            let _ = write!(
                out,
                "<a href=\"/debug/traces/{id}\" title=\"trace {id}\">{time}</a>",
                id = Esc(&t.trace_id),
            );
        } else {
            out.push_str(&time);
        }
        let addr = t.addr.as_deref().unwrap_or("");
        let _ = write!(
            out,
            "</td><td>{method}</td><td class=mono title=\"{addr}\">{short}</td>\
             <td class=num>{duration}</td><td class={class}>{status}</td>\
             <td class=mono>{request}</td><td class=num>{spans}</td></tr>",
            method = Esc(&t.method),
            addr = Esc(addr),
            // An address links to where its bytes came from.
            short = if addr.len() == 64 && page::linkable(addr) {
                format!(
                    "<a href=\"/debug/provenance/{addr}\">{}</a>",
                    page::short(addr)
                )
            } else {
                Esc(page::short(addr)).to_string()
            },
            duration = page::duration(t.duration_us),
            class = if t.status_code == 0 {
                "st-ok"
            } else {
                "st-err"
            },
            request = Esc(&t.request_id),
            spans = t.spans,
        );
    }
    out.push_str("</tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(method: &str, code: i64, request_id: &str) -> TraceSummary {
        TraceSummary {
            trace_id: "0f".repeat(16),
            request_id: request_id.into(),
            method: method.into(),
            addr: Some("ab".repeat(32)),
            status_code: code,
            started_unix_ms: 0,
            duration_us: 1_500,
            spans: 3,
        }
    }

    #[test]
    fn three_tables_with_status_names_links_and_escaped_values() {
        let hostile = "<script>alert(1)</script>";
        let lists = TraceLists {
            recent: vec![summary("Get", 0, "r1"), summary(hostile, 5, hostile)],
            slowest: vec![summary("Get", 0, "r1")],
            failed: vec![summary(hostile, 5, hostile)],
        };
        let html = page(&lists).html("n");
        for id in ["recent", "slowest", "failed"] {
            assert!(html.contains(&format!("<table id={id}>")));
        }
        assert_eq!(html.matches("<tr data-method=").count(), 4);
        assert!(html.contains(">NOT_FOUND</td>") && html.contains(">OK</td>"));
        assert!(html.contains(&format!("href=\"/debug/traces/{}\"", "0f".repeat(16))));
        assert!(html.contains("<option>NOT_FOUND</option>"));
        // The page's own script is the only one.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }
}
