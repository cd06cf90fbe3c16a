//! What every `/debug` HTML page shares: escaping, the frame (inline stylesheet, navigation),
//! the security headers with a fresh script nonce, and the formatting of times, sizes and gRPC
//! codes.

use std::fmt::{self, Write};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Writes its text HTML-escaped (`& < > " '`), safe both in element text and in quoted
/// attribute values.
pub(super) struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// The stylesheet of every page, inline (the pages load nothing from anywhere).
const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1d2330;--muted:#667085;--bg:#fff;--line:#e3e6ec;--soft:#f5f6f8;\
--hit:#2e9d57;--leaf:#3a73d6;--computed:#e08a1e;--error:#d43d3d;--other:#98a2b3}\
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#98a2b3;--bg:#14171c;--line:#2a2f38;--soft:#1c2027}}\
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:var(--fg);background:var(--bg)}\
header{padding:.6em 1.2em;border-bottom:1px solid var(--line);display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}\
header b{font-size:1.1em}a{color:var(--leaf)}nav a{margin-right:1em}\
main{padding:.8em 1.2em}h1.mono{font-size:1.3em}h2{font-size:1.05em;margin:1.2em 0 .4em}\
table{border-collapse:collapse;margin-bottom:1em}\
th,td{text-align:left;padding:.2em .7em;border-bottom:1px solid var(--line);white-space:nowrap}\
th{color:var(--muted);font-weight:600}td.wrap{white-space:normal;word-break:break-all}\
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.92em}\
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:var(--muted)}\
.st-ok{color:var(--hit)}.st-err{color:var(--error);font-weight:600}\
.controls{display:flex;gap:1.2em;align-items:center;margin:.4em 0}\
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:-.1em;margin:0 .3em 0 .8em}\
.o-hit{--c:var(--hit)}.o-leaf{--c:var(--leaf)}.o-computed{--c:var(--computed)}.o-error{--c:var(--error)}.o-other{--c:var(--other)}\
.swatch,.bar{background:var(--c,var(--other))}\
.wf{font-size:13px}\
.wf summary,.wf .axis{display:grid;grid-template-columns:minmax(18em,36%) 1fr 6.5em;gap:.6em;align-items:center;\
padding:1px 0;border-bottom:1px solid var(--line);list-style:none;cursor:pointer}\
.wf summary::-webkit-details-marker{display:none}.wf summary:hover{background:var(--soft)}\
.wf .axis{cursor:default;color:var(--muted);font-size:.85em}\
.name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.name .lbl{color:var(--muted);margin-left:.5em}\
.deep{color:var(--muted);font-size:.85em;margin-right:.3em}\
.track{position:relative;height:12px;background:linear-gradient(90deg,var(--line) 1px,transparent 1px) 0 0/25% 100%}\
.ticks{position:relative;height:1.2em}.ticks span{position:absolute;white-space:nowrap;transform:translateX(-50%)}\
.ticks span:first-child{transform:none}.ticks span:last-child{transform:translateX(-100%)}\
.bar{position:absolute;top:1px;bottom:1px;min-width:2px;border-radius:2px}\
.attrs{margin:.2em 0 .6em 2em;font-size:.95em}.attrs td{white-space:normal;word-break:break-all}\
details.more>summary{display:block;color:var(--leaf);padding:.4em 0}\
";

/// One HTML page: a title, a body, and perhaps one inline script.
pub(super) struct Page {
    pub title: String,
    pub body: String,
    /// Runs under the page's nonce; nothing else may run.
    pub script: Option<&'static str>,
}

impl Page {
    /// The whole document, with `nonce` on its script.
    pub fn html(&self, nonce: &str) -> String {
        let mut out = String::with_capacity(self.body.len() + STYLE.len() + 1024);
        let _ = write!(
            out,
            "<!doctype html><html lang=en><head><meta charset=utf-8>\
             <meta name=viewport content=\"width=device-width,initial-scale=1\">\
             <title>{title} · deriva</title><style>{STYLE}</style></head><body>\
             <header><b>deriva</b><nav><a href=\"/debug\">debug</a><a href=\"/debug/traces\">traces</a>\
             <a href=\"/metrics\">metrics</a><a href=\"/health\">health</a><a href=\"/readyz\">readyz</a></nav></header>\
             <main>{body}</main>",
            title = Esc(&self.title),
            body = self.body,
        );
        if let Some(script) = self.script {
            let _ = write!(out, "<script nonce=\"{nonce}\">{script}</script>");
        }
        out.push_str("</body></html>\n");
        out
    }
}

/// The `Content-Security-Policy` of a page whose only script carries `nonce`: nothing loads
/// from anywhere, styles are inline only, no form posts, no framing.
pub(super) fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        // 128 random bits (UUID v4 draws them from the OS), in hex: a valid CSP nonce.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let csp = content_security_policy(&nonce);
        let mut response = self.html(&nonce).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        if let Ok(csp) = HeaderValue::from_str(&csp) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The canonical name of a gRPC status code (`OK`, `NOT_FOUND`, ...); `UNKNOWN` for a number
/// that is none.
pub(super) fn status_name(code: i64) -> String {
    let code = i32::try_from(code).map_or(tonic::Code::Unknown, tonic::Code::from_i32);
    crate::error::code_name(code)
}

/// A duration given in microseconds: `850 µs`, `1.61 ms`, `2.30 s`.
pub(super) fn duration(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A size in bytes given as text (a span field): `11 B`, `64.0 KiB`; the text itself when it
/// is not a number.
pub(super) fn bytes(value: &str) -> String {
    let Ok(n) = value.parse::<u64>() else {
        return value.to_owned();
    };
    let units = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut size = n as f64 / 1024.0;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < units.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.1} {}", units[unit])
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub(super) fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = deriva_util::time::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        unix_ms % 1000
    )
}

/// The first 8 characters of an address, for a table cell (the whole one in its title).
pub(super) fn short(addr: &str) -> &str {
    addr.get(..8).unwrap_or(addr)
}

/// Whether a trace id can go into a link as it is.
pub(super) fn linkable(trace_id: &str) -> bool {
    !trace_id.is_empty() && trace_id.len() <= 64 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_character_that_could_leave_text_or_an_attribute() {
        assert_eq!(
            Esc("<script>alert(1)</script> \"'&").to_string(),
            "&lt;script&gt;alert(1)&lt;/script&gt; &quot;&#39;&amp;"
        );
        assert_eq!(Esc("plain µs").to_string(), "plain µs");
    }

    #[test]
    fn formats_codes_times_and_sizes() {
        assert_eq!(status_name(0), "OK");
        assert_eq!(status_name(5), "NOT_FOUND");
        assert_eq!(status_name(16), "UNAUTHENTICATED");
        assert_eq!(status_name(99), "UNKNOWN");
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_709_210_096_789), "2024-02-29 12:34:56.789");
        assert_eq!(duration(850), "850 µs");
        assert_eq!(duration(1_610), "1.61 ms");
        assert_eq!(bytes("11"), "11 B");
        assert_eq!(bytes("65536"), "64.0 KiB");
        assert!(linkable(&"a1".repeat(16)) && !linkable("x\"><") && !linkable(""));
    }
}
