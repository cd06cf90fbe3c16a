//! The `/debug` pages in a real browser: the server binary serves real traffic (a recipe
//! computed, a cached Get, a NOT_FOUND Get, a hostile `x-request-id`), then headless Chromium
//! loads the index, the request lists and the waterfall of the computed Get. The DOM it builds
//! is checked (rows, status names, one bar per span, hostile strings as text only, the page's
//! own script run and filtering) and a screenshot of each page goes to `target/debug-pages/`.
//!
//! Chromium must be installed (`apt-get install chromium`; `.ci/run` does it): without it the
//! test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use deriva_server::proto::GetRequest;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_testkit::http::http_get_with;
use deriva_testkit::{ServerProcess, put_leaf, put_recipe};
use rustix::process::{Pid, Signal};
use tonic::transport::Channel;

/// Longest a Chromium run may take.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the screenshots go.
const SHOTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug-pages");
/// A request id meant to run as a script if a page ever wrote it unescaped.
const HOSTILE_ID: &str = "<script>alert(1)</script>";
/// The last two components of the data directory: its path, shown on `/debug`, becomes
/// `.../<script>alert(1)</script>"'&`.
const HOSTILE_DIR: [&str; 2] = ["<script>alert(1)<", "script>\"'&"];

/// The browser: `$CHROMIUM`, else `chromium` or `chromium-browser` on the `PATH`.
fn chromium() -> PathBuf {
    let named = std::env::var_os("CHROMIUM").map(PathBuf::from);
    let on_path = ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        });
    named.or(on_path).unwrap_or_else(|| {
        panic!(
            "Chromium is needed to test the /debug pages in a browser: install it \
             (`apt-get install -y --no-install-recommends chromium`) or set CHROMIUM to its path"
        )
    })
}

/// Runs headless Chromium on `url` with `args`, in a process group of its own that is killed
/// if the run takes longer than [`CHROMIUM_TIMEOUT`]; its stdout.
async fn run_chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium());
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args([
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    let pid = child.id().and_then(|id| Pid::from_raw(id as i32));
    match tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.unwrap();
            assert!(
                output.status.success(),
                "chromium {args:?} {url}: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
        Err(_) => {
            // The browser and its helpers, by the group this test made for them.
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
            panic!("chromium {args:?} {url} took longer than {CHROMIUM_TIMEOUT:?}");
        }
    }
}

/// The DOM Chromium built from `url`, and a screenshot of it in `SHOTS/name.png`.
async fn browse(url: &str, name: &str) -> String {
    let dom = run_chromium(url, &["--dump-dom"]).await;
    let shot = Path::new(SHOTS).join(format!("{name}.png"));
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,900",
        ],
    )
    .await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot {shot:?}: {e}"));
    assert!(png.starts_with(b"\x89PNG"), "{shot:?} is not a PNG");
    dom
}

/// A Get with `x-request-id`, drained: its status, and the trace and request ids it answered.
async fn get(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
    request_id: Option<&str>,
) -> (tonic::Code, String, String) {
    let mut request = tonic::Request::new(GetRequest { addr: addr.clone() });
    if let Some(id) = request_id {
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
    }
    let header = |m: &tonic::metadata::MetadataMap, k| {
        m.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    match client.get(request).await {
        Ok(response) => {
            let (trace, req) = (
                header(response.metadata(), "x-trace-id"),
                header(response.metadata(), "x-request-id"),
            );
            let mut stream = response.into_inner();
            let code = loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break tonic::Code::Ok,
                    Err(status) => break status.code(),
                }
            };
            (code, trace, req)
        }
        Err(status) => (
            status.code(),
            header(status.metadata(), "x-trace-id"),
            header(status.metadata(), "x-request-id"),
        ),
    }
}

/// The texts of the cells whose opening tag ends with `open` (as Chromium serializes it).
fn cells<'a>(dom: &'a str, open: &str) -> Vec<&'a str> {
    dom.match_indices(open)
        .map(|(at, _)| {
            let text = &dom[at + open.len()..];
            &text[..text.find('<').unwrap_or(text.len())]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_pages_render_in_chromium_with_hostile_values_as_text() {
    // Fails here, before anything starts, when the browser is missing.
    chromium();
    std::fs::create_dir_all(SHOTS).unwrap();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join(HOSTILE_DIR[0]).join(HOSTILE_DIR[1]);
    std::fs::create_dir_all(&dir).unwrap();
    let server = ServerProcess::options().dir(&dir).start();
    let http = server.metrics_addr().to_owned();
    let mut client = server.client().await;

    // Traffic: a recipe computed, then cached, an unknown address, a hostile request id.
    let a = put_leaf(&mut client, b"hello ").await;
    let b = put_leaf(&mut client, b"world").await;
    let recipe = put_recipe(&mut client, "concat", &[&a, &b], &[]).await;
    let (code, computed_trace, _) = get(&mut client, &recipe, Some("computed-get")).await;
    assert_eq!(code, tonic::Code::Ok);
    let (code, cached_trace, _) = get(&mut client, &recipe, Some("cached-get")).await;
    assert_eq!(code, tonic::Code::Ok);
    let unknown = Bytes::from(vec![7u8; 32]);
    let (code, missing_trace, _) = get(&mut client, &unknown, Some("missing-get")).await;
    assert_eq!(code, tonic::Code::NotFound);
    let (code, hostile_trace, hostile_answer) = get(&mut client, &a, Some(HOSTILE_ID)).await;
    assert_eq!(code, tonic::Code::Ok);
    // The server keeps such an id (it cannot leave a log field): every page must escape it.
    assert_eq!(hostile_answer, HOSTILE_ID);

    // Each request is filed once its span closes, just after its answer: wait for all four.
    let traces = [
        &computed_trace,
        &cached_trace,
        &missing_trace,
        &hostile_trace,
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let lists = loop {
        let json = http_get_with(&http, "/debug/traces", &[]).await.unwrap();
        assert_eq!(json.status, 200);
        let lists: serde_json::Value = serde_json::from_str(&json.body).unwrap();
        let filed = |id: &String| {
            lists["recent"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["trace_id"] == id.as_str())
        };
        if traces.iter().all(|id| filed(id)) {
            break lists;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "traces not filed: {lists}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(lists["failed"].as_array().unwrap().len() == 1, "{lists}");

    // Every page is HTML for a browser, with the headers that keep foreign scripts out.
    for path in [
        "/debug",
        "/debug/traces",
        &format!("/debug/traces/{computed_trace}"),
    ] {
        let page = http_get_with(&http, path, &[("accept", "text/html")])
            .await
            .unwrap();
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
        let csp = page.header("content-security-policy").unwrap_or_default();
        for directive in [
            "default-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        let nonce = csp
            .split("'nonce-")
            .nth(1)
            .and_then(|n| n.split('\'').next())
            .unwrap_or_else(|| panic!("{path}: no script nonce in {csp}"));
        // Any script on the page is one of its own, under this response's nonce.
        let scripts = page.body.matches("<script").count();
        assert_eq!(
            scripts,
            page.body
                .matches(&format!("<script nonce=\"{nonce}\">"))
                .count(),
            "{path}"
        );
        assert!(!page.body.contains("<script>alert"), "{path}");
        assert!(
            !page.body.contains("src=\"http"),
            "{path} loads from elsewhere"
        );
    }

    // The index: version, store, settings, links; the data directory as text.
    let url = |path: &str| format!("http://{http}{path}");
    let index = browse(&url("/debug"), "index").await;
    for link in ["/metrics", "/health", "/readyz", "/debug/traces"] {
        assert!(index.contains(&format!("href=\"{link}\"")), "{link}");
    }
    assert!(index.contains(&format!("deriva-server {}", env!("CARGO_PKG_VERSION"))));
    assert!(index.contains(">data-dir<") && index.contains(">cache-bytes<"));
    assert!(
        index.contains("&lt;script&gt;alert(1)&lt;/script&gt;\"'&amp;"),
        "the data directory is not shown as text:\n{index}"
    );
    assert_no_script_but_ours(&index, 0, "/debug");

    // The lists: rows of all four requests, status names, request ids, links.
    let listed = browse(&url("/debug/traces"), "traces").await;
    for id in traces {
        assert!(
            listed.contains(&format!("href=\"/debug/traces/{id}\"")),
            "no row links to {id}"
        );
    }
    for id in ["computed-get", "cached-get", "missing-get"] {
        assert!(listed.contains(&format!(">{id}</td>")), "no row for {id}");
    }
    // The hostile request id is a row's text, escaped, never an element.
    assert!(
        listed.contains(">&lt;script&gt;alert(1)&lt;/script&gt;</td>"),
        "no row shows the hostile request id as text"
    );
    let statuses: Vec<&str> = cells(&listed, "class=\"st-ok\">")
        .into_iter()
        .chain(cells(&listed, "class=\"st-err\">"))
        .collect();
    assert!(statuses.contains(&"OK") && statuses.contains(&"NOT_FOUND"));
    assert!(
        statuses
            .iter()
            .all(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_uppercase() || c == b'_')),
        "a status that is not a name: {statuses:?}"
    );
    assert!(listed.contains("id=\"f-method\"") && listed.contains("id=\"f-refresh\""));
    assert_no_script_but_ours(&listed, 1, "/debug/traces");
    // The page's script ran: the policy lets its nonce through.
    assert!(
        listed.contains("data-script=\"ran\""),
        "the script did not run"
    );

    // The filter, chosen by the fragment: only the failed Get's rows stay visible.
    let filtered = run_chromium(&url("/debug/traces#status=NOT_FOUND"), &["--dump-dom"]).await;
    let rows: Vec<&str> = filtered
        .match_indices("<tr data-method=")
        .map(|(at, _)| {
            let row = &filtered[at..];
            &row[..row.find('>').unwrap()]
        })
        .collect();
    assert!(rows.len() >= 4, "{rows:?}");
    for row in &rows {
        let hidden = row.contains(" hidden");
        assert_eq!(hidden, !row.contains("data-status=\"NOT_FOUND\""), "{row}");
    }

    // The waterfall of the computed Get: one bar per span, colored, the compute labelled.
    let tree = http_get_with(&http, &format!("/debug/traces/{computed_trace}"), &[])
        .await
        .unwrap();
    let tree: serde_json::Value = serde_json::from_str(&tree.body).unwrap();
    let spans = tree["spans"].as_array().unwrap().len();
    let waterfall = browse(
        &url(&format!("/debug/traces/{computed_trace}")),
        "waterfall",
    )
    .await;
    assert_eq!(waterfall.matches("class=\"bar\"").count(), spans);
    assert_eq!(waterfall.matches("<details class=\"span ").count(), spans);
    for outcome in ["o-computed", "o-leaf"] {
        assert!(
            waterfall.contains(&format!("<details class=\"span {outcome}\"")),
            "{outcome}"
        );
    }
    assert!(
        waterfall.contains("concat/v1 · 11 B → 11 B"),
        "no compute label:\n{waterfall}"
    );
    assert!(waterfall.contains(">computed-get</code>"));
    assert_no_script_but_ours(&waterfall, 0, "the waterfall");
}

/// No element the page did not mean: `expected` scripts at most, none with `alert`.
fn assert_no_script_but_ours(dom: &str, expected: usize, what: &str) {
    assert!(
        !dom.contains("<script>alert"),
        "{what}: a hostile script element"
    );
    assert_eq!(dom.matches("<script").count(), expected, "{what}");
}
