//! [`TraceStore`]: the finished span trees of recent requests, kept in process so a
//! materialization can be explained without any tracing backend (`deriva get --explain`,
//! `GET /debug/traces`).
//!
//! [`TraceStoreLayer`] is a `tracing` layer. For every request span (the `rpc` span that
//! `rpc::layer` opens) it collects the spans below it — name, parent, fields, start offset
//! and duration — and when the request span closes, files the finished tree:
//!
//! - in a ring of the last `capacity` requests (default 256);
//! - among the slowest [`SLOWEST_KEPT`] requests of the last [`SLOWEST_WINDOW`];
//! - among the last [`FAILED_KEPT`] failed requests.
//!
//! A request that the RPC layer decided not to trace (not sampled, not forced, not among the
//! [`UNTRACED_CAPTURES_PER_SECOND`] captured anyway) builds no spans
//! ([`deriva_core::untraced`]). If it fails, or is slow enough to enter the slowest list
//! ([`TraceStore::would_keep_as_slow`], one atomic read), its request span alone is filed
//! when it ends ([`TraceStore::file_untraced`]): tail capture from what the layer knows
//! anyway.
//!
//! Memory is bounded: at most [`MAX_SPANS_PER_TRACE`] spans per request (the rest are counted,
//! not kept) and [`MAX_FIELD_LEN`] bytes per field value. The work per span is one small
//! allocation; nothing is formatted unless a field is recorded, and nothing is read unless
//! someone asks.

mod layer;

pub use layer::TraceStoreLayer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use deriva_core::spans;

use parking_lot::Mutex;
use serde::Serialize;

/// The name of the span that roots a request's tree.
pub const REQUEST_SPAN: &str = deriva_core::spans::RPC;
/// Most spans kept per request.
pub const MAX_SPANS_PER_TRACE: usize = 2000;
/// Longest field value kept, in bytes.
pub const MAX_FIELD_LEN: usize = 256;
/// Most events kept per span (the first ones).
pub const MAX_EVENTS_PER_SPAN: usize = 16;
/// How many of the slowest recent requests are kept.
pub const SLOWEST_KEPT: usize = 16;
/// How far back "recent" goes for the slowest requests.
pub const SLOWEST_WINDOW: Duration = Duration::from_secs(300);
/// How many failed requests are kept.
pub const FAILED_KEPT: usize = 64;
/// How many requests a second that are neither sampled nor forced are traced anyway, so the
/// debug pages show recent requests whatever the sample ratio.
pub const UNTRACED_CAPTURES_PER_SECOND: u32 = 10;
/// The field of a request filed without its spans (`untraced`: the request was not traced).
pub const CAPTURE_FIELD: &str = "deriva.capture";

/// An event written inside a span (a log line).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventRecord {
    /// When, in microseconds after the request span started.
    pub at_us: u64,
    /// Its level (`INFO`, `WARN`, ...).
    pub level: &'static str,
    /// Its fields, `message` among them: names (`tracing`'s, static) and values.
    pub fields: Vec<(&'static str, String)>,
}

/// A link from a span to another (`follows_from`): a call that joined the in-flight
/// materialization another request started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkRecord {
    /// The trace of the span linked to.
    pub trace_id: String,
    /// The name of the span linked to.
    pub name: &'static str,
}

/// One finished span of a trace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpanRecord {
    /// Unique within the trace.
    pub id: u64,
    /// The parent's `id`; `None` for the request span.
    pub parent: Option<u64>,
    /// The span name (`rpc`, `materialize`, `compute`, ...).
    pub name: &'static str,
    /// Recorded fields, in order: names (`tracing`'s, static, so not copied per span) and
    /// values.
    pub fields: Vec<(&'static str, String)>,
    /// Start, in microseconds after the request span started.
    pub start_us: u64,
    /// Duration in microseconds.
    pub duration_us: u64,
    /// Events written inside it, at most [`MAX_EVENTS_PER_SPAN`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
    /// Links to spans of other requests.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkRecord>,
}

impl SpanRecord {
    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One finished request.
#[derive(Debug, Clone, Serialize)]
pub struct TraceRecord {
    /// The W3C trace id (32 hex characters), or empty when no OpenTelemetry layer runs.
    pub trace_id: String,
    /// The request id.
    pub request_id: String,
    /// The RPC method, such as `Get`.
    pub method: String,
    /// The address the request materialized, if any.
    pub addr: Option<String>,
    /// The gRPC status code (0 is OK; 1 is also used for a client that went away).
    pub status_code: i64,
    /// Unix time of the start, in milliseconds.
    pub started_unix_ms: u64,
    /// Duration in microseconds.
    pub duration_us: u64,
    /// Spans not kept because of [`MAX_SPANS_PER_TRACE`].
    pub dropped_spans: u64,
    /// The spans, request span first, then in the order they closed.
    pub spans: Vec<SpanRecord>,
}

impl TraceRecord {
    /// Whether the request failed.
    pub fn failed(&self) -> bool {
        self.status_code != 0
    }

    /// The caller that made the request (its `auth.name` under `--auth-tokens`), if known.
    pub fn caller(&self) -> Option<&str> {
        self.spans
            .first()
            .filter(|s| s.parent.is_none())
            .and_then(|s| s.field(crate::auth::AUTH_NAME))
    }

    /// The summary line of `/debug/traces`.
    pub fn summary(&self) -> TraceSummary {
        TraceSummary {
            trace_id: self.trace_id.clone(),
            request_id: self.request_id.clone(),
            method: self.method.clone(),
            addr: self.addr.clone(),
            status_code: self.status_code,
            started_unix_ms: self.started_unix_ms,
            duration_us: self.duration_us,
            spans: self.spans.len(),
        }
    }
}

/// A request without its spans.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    /// See [`TraceRecord::trace_id`].
    pub trace_id: String,
    /// See [`TraceRecord::request_id`].
    pub request_id: String,
    /// See [`TraceRecord::method`].
    pub method: String,
    /// See [`TraceRecord::addr`].
    pub addr: Option<String>,
    /// See [`TraceRecord::status_code`].
    pub status_code: i64,
    /// See [`TraceRecord::started_unix_ms`].
    pub started_unix_ms: u64,
    /// See [`TraceRecord::duration_us`].
    pub duration_us: u64,
    /// Number of spans kept.
    pub spans: usize,
}

/// The three views of `/debug/traces`.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLists {
    /// Most recent first.
    pub recent: Vec<TraceSummary>,
    /// Slowest first.
    pub slowest: Vec<TraceSummary>,
    /// Most recent first.
    pub failed: Vec<TraceSummary>,
}

#[derive(Debug, Default)]
struct Kept {
    recent: VecDeque<Arc<TraceRecord>>,
    /// (finished at, trace), slowest first.
    slowest: Vec<(Instant, Arc<TraceRecord>)>,
    failed: VecDeque<Arc<TraceRecord>>,
}

/// The store. Cheap to clone; clones share the same traces.
#[derive(Debug, Clone)]
pub struct TraceStore {
    capacity: usize,
    kept: Arc<Mutex<Kept>>,
    pub(super) next_id: Arc<AtomicU64>,
    /// Trace ids of the request spans open right now (not `Explain`'s), with how many.
    open: Arc<Mutex<HashMap<String, usize>>>,
    /// Notified whenever a request span closes.
    closed: Arc<tokio::sync::Notify>,
    /// What it takes to enter the slowest list, readable without the lock.
    bar: Arc<SlowBar>,
}

/// The slowest list's entry bar: a request longer than `floor_us` enters it, and so does any
/// request once `until_us` is past (an entry of the list has left the window).
#[derive(Debug)]
struct SlowBar {
    epoch: Instant,
    floor_us: AtomicU64,
    /// Microseconds after `epoch`.
    until_us: AtomicU64,
}

impl Default for SlowBar {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            floor_us: AtomicU64::new(0),
            until_us: AtomicU64::new(0),
        }
    }
}

/// How an untraced request ended, for [`TraceStore::file_untraced`].
#[derive(Debug)]
pub struct UntracedEnd<'a> {
    /// Its trace id (the caller's, or the one its log lines carry).
    pub trace_id: String,
    /// Its request id.
    pub request_id: &'a str,
    /// The RPC method, such as `Get`.
    pub method: &'static str,
    /// The gRPC status code.
    pub status_code: i64,
    /// How long it took.
    pub duration: Duration,
    /// The caller's token name, under `--auth-tokens`.
    pub caller: Option<&'a str>,
}

impl TraceStore {
    /// A store keeping the last `capacity` requests (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            kept: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            open: Arc::default(),
            closed: Arc::default(),
            bar: Arc::default(),
        }
    }

    /// Whether a request of `duration_us` would enter the slowest list now. Lock-free: the
    /// RPC layer asks it at the end of every untraced request.
    pub fn would_keep_as_slow(&self, duration_us: u64) -> bool {
        let bar = &self.bar;
        duration_us > bar.floor_us.load(Ordering::Relaxed)
            || bar.epoch.elapsed().as_micros() as u64 >= bar.until_us.load(Ordering::Relaxed)
    }

    /// Files an untraced request that failed or was slow: its request span alone, with the
    /// fields the RPC layer knows and [`CAPTURE_FIELD`] `= "untraced"`. `Explain` is never
    /// filed, as for traced requests.
    pub fn file_untraced(&self, end: UntracedEnd<'_>) {
        if end.method == "Explain" {
            return;
        }
        let duration_us = end.duration.as_micros() as u64;
        let started_unix_ms = SystemTime::now()
            .checked_sub(end.duration)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let mut fields = vec![
            (spans::field::RPC_METHOD, end.method.to_owned()),
            (spans::field::REQUEST_ID, end.request_id.to_owned()),
            (spans::field::TRACE_ID, end.trace_id.clone()),
            ("rpc.grpc.status_code", end.status_code.to_string()),
            (CAPTURE_FIELD, "untraced".to_owned()),
        ];
        if let Some(name) = end.caller {
            fields.push((crate::auth::AUTH_NAME, name.to_owned()));
        }
        self.insert(TraceRecord {
            trace_id: end.trace_id,
            request_id: end.request_id.to_owned(),
            method: end.method.to_owned(),
            addr: None,
            status_code: end.status_code,
            started_unix_ms,
            duration_us,
            dropped_spans: 0,
            spans: vec![SpanRecord {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                parent: None,
                name: REQUEST_SPAN,
                fields,
                start_us: 0,
                duration_us,
                events: Vec::new(),
                links: Vec::new(),
            }],
        });
    }

    /// The layer that fills this store.
    pub fn layer(&self) -> TraceStoreLayer {
        TraceStoreLayer {
            store: self.clone(),
        }
    }

    pub(crate) fn insert(&self, trace: TraceRecord) {
        let trace = Arc::new(trace);
        let now = Instant::now();
        let mut kept = self.kept.lock();
        if kept.recent.len() == self.capacity {
            kept.recent.pop_back();
        }
        kept.recent.push_front(trace.clone());
        if trace.failed() {
            if kept.failed.len() == FAILED_KEPT {
                kept.failed.pop_back();
            }
            kept.failed.push_front(trace.clone());
        }
        kept.slowest
            .retain(|(at, _)| now.duration_since(*at) <= SLOWEST_WINDOW);
        let slower_than_kept = kept.slowest.len() < SLOWEST_KEPT
            || kept
                .slowest
                .last()
                .is_some_and(|(_, t)| t.duration_us < trace.duration_us);
        if slower_than_kept {
            let at = kept
                .slowest
                .partition_point(|(_, t)| t.duration_us >= trace.duration_us);
            kept.slowest.insert(at, (now, trace));
            kept.slowest.truncate(SLOWEST_KEPT);
        }
        let floor = match kept.slowest.len() < SLOWEST_KEPT {
            true => 0,
            false => kept.slowest.last().map_or(0, |(_, t)| t.duration_us),
        };
        let until = kept
            .slowest
            .iter()
            .map(|(at, _)| {
                (*at + SLOWEST_WINDOW)
                    .duration_since(self.bar.epoch)
                    .as_micros() as u64
            })
            .min()
            .unwrap_or(u64::MAX);
        self.bar.floor_us.store(floor, Ordering::Relaxed);
        self.bar.until_us.store(until, Ordering::Relaxed);
    }

    /// Recent, slowest and failed requests.
    pub fn lists(&self) -> TraceLists {
        let kept = self.kept.lock();
        TraceLists {
            recent: kept.recent.iter().map(|t| t.summary()).collect(),
            slowest: kept.slowest.iter().map(|(_, t)| t.summary()).collect(),
            failed: kept.failed.iter().map(|t| t.summary()).collect(),
        }
    }

    /// The trace with this id, if it is still kept.
    pub fn get(&self, trace_id: &str) -> Option<Arc<TraceRecord>> {
        self.find(trace_id, &|_| true)
    }

    /// A kept trace with this id for which `visible` holds. (Several requests may share a trace
    /// id: a caller's `traceparent` chooses it.)
    fn find(
        &self,
        trace_id: &str,
        visible: &dyn Fn(&TraceRecord) -> bool,
    ) -> Option<Arc<TraceRecord>> {
        let kept = self.kept.lock();
        let found = kept
            .recent
            .iter()
            .chain(kept.failed.iter())
            .chain(kept.slowest.iter().map(|(_, t)| t))
            .find(|t| {
                !trace_id.is_empty() && t.trace_id.eq_ignore_ascii_case(trace_id) && visible(t)
            });
        found.cloned()
    }

    /// The trace with this id, waiting for it while a request of that trace is still open
    /// (its request span closes just after the client saw the last byte), for at most
    /// `patience`. `None` at once when no such request is open: the trace cannot arrive.
    pub async fn wait_for(&self, trace_id: &str, patience: Duration) -> Option<Arc<TraceRecord>> {
        self.wait_for_visible(trace_id, patience, |_| true).await
    }

    /// [`TraceStore::wait_for`] a trace with this id for which `visible` holds (`Explain`: one
    /// the caller may see).
    pub async fn wait_for_visible(
        &self,
        trace_id: &str,
        patience: Duration,
        visible: impl Fn(&TraceRecord) -> bool,
    ) -> Option<Arc<TraceRecord>> {
        let deadline = tokio::time::Instant::now() + patience;
        let key = trace_id.to_ascii_lowercase();
        loop {
            // Registered before the checks, so a close between them still wakes this.
            let closed = self.closed.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            if let Some(t) = self.find(trace_id, &visible) {
                return Some(t);
            }
            if !self.open.lock().contains_key(&key) {
                return None;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return self.find(trace_id, &visible);
            }
        }
    }

    pub(super) fn opened(&self, trace_id: &str) {
        *self
            .open
            .lock()
            .entry(trace_id.to_ascii_lowercase())
            .or_default() += 1;
    }

    pub(super) fn closed(&self, trace_id: Option<&str>) {
        if let Some(id) = trace_id {
            let mut open = self.open.lock();
            let key = id.to_ascii_lowercase();
            if let Some(n) = open.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
        self.closed.notify_waiters();
    }

    /// Number of traces held in all three views (a trace in several counts once per view).
    pub fn held(&self) -> (usize, usize, usize) {
        let kept = self.kept.lock();
        (kept.recent.len(), kept.slowest.len(), kept.failed.len())
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn with_store<T>(store: &TraceStore, f: impl FnOnce() -> T) -> T {
        let subscriber = tracing_subscriber::registry().with(store.layer());
        tracing::subscriber::with_default(subscriber, f)
    }

    fn request(i: u64, code: i64, children: usize) {
        let rpc = tracing::info_span!(
            "rpc",
            rpc.method = "Get",
            request_id = i,
            trace_id = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        rpc.record("trace_id", format!("{i:032x}").as_str());
        rpc.in_scope(|| {
            let m = tracing::info_span!("materialize", addr = "ab".repeat(32).as_str(), depth = 0);
            m.in_scope(|| {
                for _ in 0..children {
                    tracing::info_span!("cache_check", hit = true).in_scope(|| {});
                }
            });
        });
        rpc.record("rpc.grpc.status_code", code);
    }

    /// Race 5 of RELIABILITY.md: `Explain` of a trace no open request can produce answers at
    /// once, without waiting out its patience (time is simulated: any wait would show as
    /// elapsed time).
    #[tokio::test(start_paused = true)]
    async fn an_unknown_trace_is_not_found_at_once() {
        let store = TraceStore::new(8);
        with_store(&store, || request(1, 0, 1));
        let start = tokio::time::Instant::now();
        assert!(
            store
                .wait_for(&format!("{:032x}", 2), Duration::from_secs(2))
                .await
                .is_none()
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Race 5 of RELIABILITY.md: a trace whose request is still closing is waited for, and
    /// returned the moment its request span closes.
    #[tokio::test(start_paused = true)]
    async fn a_trace_still_closing_is_returned_when_it_closes() {
        let store = TraceStore::new(8);
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(store.layer()));
        let _guard = tracing::dispatcher::set_default(&dispatch);
        let id = format!("{:032x}", 3);
        let rpc = tracing::info_span!("rpc", rpc.method = "Get", trace_id = tracing::field::Empty,);
        rpc.record("trace_id", id.as_str());
        let start = tokio::time::Instant::now();
        let (found, ()) = tokio::join!(store.wait_for(&id, Duration::from_secs(2)), async {
            tokio::task::yield_now().await;
            drop(rpc);
        });
        assert_eq!(found.expect("filed when it closed").trace_id, id);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Closed now: another ask for an absent trace does not wait either.
        assert!(
            store
                .wait_for(&"f".repeat(32), Duration::from_secs(2))
                .await
                .is_none()
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A call that joins another request's materialization keeps its event and a link to the
    /// leader's trace; events per span are bounded.
    #[test]
    fn events_and_joins_are_kept_with_their_span() {
        let store = TraceStore::new(8);
        with_store(&store, || {
            let leader_rpc =
                tracing::info_span!("rpc", rpc.method = "Get", trace_id = tracing::field::Empty);
            leader_rpc.record("trace_id", format!("{:032x}", 1).as_str());
            let leader = leader_rpc.in_scope(|| tracing::info_span!("materialize", addr = "ab"));
            let joiner_rpc =
                tracing::info_span!("rpc", rpc.method = "Get", trace_id = tracing::field::Empty);
            joiner_rpc.record("trace_id", format!("{:032x}", 2).as_str());
            joiner_rpc.in_scope(|| {
                let joined = tracing::info_span!("materialize", addr = "ab");
                joined.follows_from(&leader);
                joined.in_scope(|| {
                    for i in 0..MAX_EVENTS_PER_SPAN + 3 {
                        tracing::info!(n = i, "joined an in-flight materialization");
                    }
                });
            });
            drop(joiner_rpc);
            drop(leader);
            drop(leader_rpc);
        });
        let trace = store.get(&format!("{:032x}", 2)).expect("kept");
        let joined = trace
            .spans
            .iter()
            .find(|s| s.name == "materialize")
            .unwrap();
        assert_eq!(joined.events.len(), MAX_EVENTS_PER_SPAN);
        assert_eq!(joined.events[0].level, "INFO");
        assert!(
            joined.events[0]
                .fields
                .iter()
                .any(|(k, v)| *k == "message" && v == "joined an in-flight materialization")
        );
        assert_eq!(joined.links.len(), 1);
        assert_eq!(joined.links[0].trace_id, format!("{:032x}", 1));
        assert_eq!(joined.links[0].name, "materialize");
        let leader = store.get(&format!("{:032x}", 1)).expect("kept");
        assert!(
            leader
                .spans
                .iter()
                .all(|s| s.events.is_empty() && s.links.is_empty())
        );
    }

    #[test]
    fn a_request_becomes_a_tree_with_parents_fields_and_summary() {
        let store = TraceStore::new(8);
        with_store(&store, || {
            tracing::info_span!("not_a_request").in_scope(|| {});
            request(7, 0, 2);
        });
        let trace = store.get(&format!("{:032x}", 7)).expect("kept");
        assert_eq!(trace.method, "Get");
        assert_eq!(trace.request_id, "7");
        assert_eq!(trace.addr.as_deref(), Some("ab".repeat(32).as_str()));
        let names: Vec<&str> = trace.spans.iter().map(|s| s.name).collect();
        assert_eq!(names, ["rpc", "cache_check", "cache_check", "materialize"]);
        let (rpc, materialize) = (&trace.spans[0], &trace.spans[3]);
        assert_eq!(rpc.parent, None);
        assert_eq!(materialize.parent, Some(rpc.id));
        assert!(
            trace.spans[1..3]
                .iter()
                .all(|s| s.parent == Some(materialize.id))
        );
        assert_eq!(trace.spans[1].field("hit"), Some("true"));
        assert!(materialize.start_us <= trace.spans[1].start_us);
        assert_eq!(
            store.lists().recent.len(),
            1,
            "spans outside a request are not kept"
        );
    }

    #[test]
    fn the_store_stays_within_its_bounds_after_ten_thousand_requests() {
        let store = TraceStore::new(256);
        with_store(&store, || {
            for i in 0..10_000u64 {
                request(i, if i % 10 == 0 { 13 } else { 0 }, 1);
            }
        });
        let (recent, slowest, failed) = store.held();
        assert_eq!(recent, 256);
        assert!(slowest <= SLOWEST_KEPT);
        assert_eq!(failed, FAILED_KEPT);
        let lists = store.lists();
        assert_eq!(
            lists.recent[0].trace_id,
            format!("{:032x}", 9_999),
            "newest first"
        );
        assert!(lists.failed.iter().all(|t| t.status_code == 13));
        assert!(
            lists
                .slowest
                .windows(2)
                .all(|w| w[0].duration_us >= w[1].duration_us)
        );
        let distinct: std::collections::HashSet<&str> = lists
            .recent
            .iter()
            .chain(&lists.slowest)
            .chain(&lists.failed)
            .map(|t| t.trace_id.as_str())
            .collect();
        assert!(distinct.len() <= 256 + SLOWEST_KEPT + FAILED_KEPT);
    }

    fn untraced(store: &TraceStore, i: u64, code: i64, micros: u64) {
        store.file_untraced(UntracedEnd {
            trace_id: format!("{i:032x}"),
            request_id: "req",
            method: "Get",
            status_code: code,
            duration: Duration::from_micros(micros),
            caller: Some("ci"),
        });
    }

    /// The bar an untraced request must pass to be filed as slow: anything until the slowest
    /// list is full, then only what is slower than its slowest-but-fifteen; a filed request
    /// has its request span alone, marked untraced.
    #[test]
    fn untraced_requests_enter_as_the_slowest_list_would_have_them() {
        let store = TraceStore::new(8);
        assert!(store.would_keep_as_slow(1), "an empty list takes anything");
        for i in 0..SLOWEST_KEPT as u64 {
            untraced(&store, i, 0, 1_000 + i);
        }
        assert!(!store.would_keep_as_slow(1_000), "faster than all sixteen");
        assert!(store.would_keep_as_slow(1_001), "slower than the sixteenth");
        untraced(&store, 99, 0, 5_000);
        assert!(!store.would_keep_as_slow(1_001), "the bar rose");
        assert!(store.would_keep_as_slow(1_002));
        untraced(&store, 100, 14, 10);
        let failed = store.lists().failed;
        assert_eq!(failed.len(), 1);
        let trace = store.get(&format!("{:032x}", 100)).unwrap();
        assert_eq!(trace.spans.len(), 1);
        let rpc = &trace.spans[0];
        assert_eq!(rpc.field(CAPTURE_FIELD), Some("untraced"));
        assert_eq!(rpc.field("rpc.grpc.status_code"), Some("14"));
        assert_eq!(trace.caller(), Some("ci"));
        assert_eq!(store.lists().slowest[0].duration_us, 5_000);
        // `Explain` is never filed.
        store.file_untraced(UntracedEnd {
            trace_id: "e".repeat(32),
            request_id: "x",
            method: "Explain",
            status_code: 2,
            duration: Duration::from_secs(9),
            caller: None,
        });
        assert!(store.get(&"e".repeat(32)).is_none());
    }

    #[test]
    fn huge_traces_keep_a_bounded_number_of_spans() {
        let store = TraceStore::new(4);
        with_store(&store, || request(1, 0, MAX_SPANS_PER_TRACE + 500));
        let trace = store.get(&format!("{:032x}", 1)).unwrap();
        assert_eq!(trace.spans.len(), MAX_SPANS_PER_TRACE + 1);
        assert_eq!(trace.dropped_spans, 501);
    }
}
