//! `/debug`: what this server is (version, uptime, store, effective settings) and links to
//! every other page of the listener.

use std::fmt::Write;
use std::time::Duration;

use super::page::{Esc, Page};
use crate::http::HttpState;

/// The index page.
pub(super) fn page(state: &HttpState) -> Page {
    let mut body = String::new();
    let uptime = state.started.elapsed();
    let _ = write!(
        body,
        "<h1>deriva-server {version}</h1><table>\
         <tr><th>uptime</th><td>{uptime}</td></tr>\
         <tr><th>store</th><td class=\"mono wrap\">{store}</td></tr>",
        version = Esc(state.about.version),
        uptime = human(uptime),
        store = Esc(state.exec.store().description()),
    );
    if let Some(traces) = &state.traces {
        let (recent, slowest, failed) = traces.held();
        let _ = write!(
            body,
            "<tr><th>traces kept</th><td>{recent} recent, {slowest} slowest, {failed} failed</td></tr>"
        );
    }
    body.push_str(
        "</table><h2>Pages</h2><ul>\
         <li><a href=\"/debug/traces\">/debug/traces</a>: recent, slowest and failed requests, \
         each with its waterfall</li>\
         <li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li>\
         <li><a href=\"/health\">/health</a>: the store and its backends, as JSON</li>\
         <li><a href=\"/readyz\">/readyz</a>: readiness</li></ul>\
         <h2>Effective configuration</h2><table>",
    );
    for (key, value) in &state.about.settings {
        let _ = write!(
            body,
            "<tr><th class=mono>{}</th><td class=\"mono wrap\">{}</td></tr>",
            Esc(key),
            Esc(&shown(value))
        );
    }
    body.push_str("</table>");
    Page {
        title: "debug".into(),
        body,
        script: None,
    }
}

/// `3 d 4 h 5 min 6 s`, leaving out the leading zero units.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let parts = [
        (s / 86_400, "d"),
        (s / 3600 % 24, "h"),
        (s / 60 % 60, "min"),
        (s % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    parts[first..]
        .iter()
        .map(|(n, unit)| format!("{n} {unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A setting as the page shows it: `Config::describe` (in `config.rs`) already hides header
/// values and the index URL's secrets; any other URL (an OTLP endpoint) goes through the same
/// [`deriva_util::redact::redact_url`].
fn shown(value: &str) -> String {
    if value.contains("://") {
        deriva_util::redact::redact_url(value)
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_urls_are_hidden() {
        assert_eq!(
            shown("postgres://u:pw@db:5432/d?sslmode=require&password=pw2&sslpassword=x"),
            "postgres://u:***@db:5432/d?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            shown("https://user:hunter2@otel:4318"),
            "https://user:***@otel:4318"
        );
        assert_eq!(shown("./deriva-data"), "./deriva-data");
        assert_eq!(human(Duration::from_secs(3_725)), "1 h 2 min 5 s");
        assert_eq!(human(Duration::from_secs(7)), "7 s");
    }
}
