//! [`SpanQueue`]: the span processor between the OpenTelemetry SDK and the OTLP span exporter.
//!
//! It takes the place of the SDK's `BatchSpanProcessor`, which batches the same way but keeps
//! its queue length and its count of dropped spans private (0.33: it only logs a warning at the
//! first drop and a total at shutdown). At 100% sampling a saturated server overflows that
//! queue, and an operator must be able to see it, so this one counts, in [`SpanQueueStats`]:
//! spans dropped because the queue was full, spans waiting now, spans exported, and spans whose
//! export failed. [`SpanExportMetrics`](super::metrics::SpanExportMetrics) exposes them as the
//! `deriva_telemetry_*` families.
//!
//! Batching follows `OTEL_BSP_*` ([`SpanBatching`]): at most `max_queue_size` spans wait; a
//! thread of the processor's own exports them, at most `max_export_batch_size` at a time, when a
//! batch is full or `scheduled_delay` has passed, and drives the exporter's future to completion
//! there (as the SDK's processor does; the tonic exporter's connection runs on the tokio runtime
//! it was built in). `force_flush` and `shutdown` export whatever is queued.
//!
//! Ending a span costs one atomic add on the queue length and one `try_send` on a bounded
//! channel (plus, once per full batch, a wake-up message); a full queue costs one more atomic
//! add, the drop. No lock is taken and nothing waits on an export.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use super::otlp::SpanBatching;

/// How long [`SpanProcessor::force_flush`] waits for the export thread (as long as the SDK's
/// own processor waits).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Messages to the export thread. They have a channel of their own, so that a full span queue
/// never holds back a flush or the shutdown.
enum Control {
    /// A batch is full: export now.
    Wake,
    /// Export everything queued, then answer.
    Flush(SyncSender<OTelSdkResult>),
    /// Export everything queued, shut the exporter down, answer, and stop.
    Shutdown(SyncSender<OTelSdkResult>),
    /// The tracer provider's resource, for the exporter.
    Resource(Resource),
}

/// What the span queue counts, read by the `deriva_telemetry_*` instruments.
#[derive(Debug)]
pub struct SpanQueueStats {
    capacity: usize,
    queued: AtomicUsize,
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

impl SpanQueueStats {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// The most spans that can wait (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Spans waiting now for export (never more than [`Self::capacity`]).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed).min(self.capacity)
    }

    /// Spans ended (and sampled) but dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans the exporter accepted, since start.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans of exports that failed (the receiver refused them, was unreachable, or did not
    /// answer within the OTLP timeout, retries included), since start.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// A batching span processor that counts what it drops; see the [module](self) docs.
#[derive(Debug)]
pub struct SpanQueue {
    spans: SyncSender<SpanData>,
    control: SyncSender<Control>,
    stats: Arc<SpanQueueStats>,
    /// A [`Control::Wake`] is on its way and not yet taken: no need for another.
    wake_sent: Arc<AtomicBool>,
    max_export_batch_size: usize,
    worker: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl SpanQueue {
    /// Starts the export thread over `exporter`. A queue size or batch size of 0 is taken as 1,
    /// and a batch larger than the queue as the queue's size.
    pub fn new<E>(exporter: E, batching: SpanBatching) -> std::io::Result<Self>
    where
        E: SpanExporter + 'static,
    {
        let capacity = batching.max_queue_size.max(1);
        let max_export_batch_size = batching.max_export_batch_size.clamp(1, capacity);
        let (spans, span_receiver) = sync_channel(capacity);
        // Wake-ups are never more than one at a time; the rest are rare.
        let (control, control_receiver) = sync_channel(64);
        let stats = Arc::new(SpanQueueStats::new(capacity));
        let wake_sent = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            exporter,
            spans: span_receiver,
            control: control_receiver,
            stats: stats.clone(),
            wake_sent: wake_sent.clone(),
            max_export_batch_size,
            scheduled_delay: batching.scheduled_delay,
        };
        let worker = std::thread::Builder::new()
            .name("deriva-span-export".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            spans,
            control,
            stats,
            wake_sent,
            max_export_batch_size,
            worker: parking_lot::Mutex::new(Some(worker)),
        })
    }

    /// The counts, for the instruments.
    pub fn stats(&self) -> Arc<SpanQueueStats> {
        self.stats.clone()
    }

    /// Counts a span dropped at a full queue; the first is also logged (the export thread may
    /// be stuck in an export, so it is logged here), and the family counts the rest.
    fn count_drop(&self) {
        if self.stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            first_drop(self.stats.capacity);
        }
    }

    /// Sends `make(reply)` to the export thread and waits up to `timeout` for its answer.
    fn ask(
        &self,
        make: impl FnOnce(SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = sync_channel(1);
        match self.control.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(OTelSdkError::InternalFailure(
                    "the span export thread has 64 messages waiting".into(),
                ));
            }
            Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
        }
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::InternalFailure(
                "the span export thread ended without answering".into(),
            )),
        }
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let stats = &*self.stats;
        // Counted before it is sent, so that the export thread never takes a span it has not
        // counted; the count is also the gate that bounds the queue.
        let before = stats.queued.fetch_add(1, Ordering::AcqRel);
        if before >= stats.capacity {
            stats.queued.fetch_sub(1, Ordering::AcqRel);
            self.count_drop();
            return;
        }
        match self.spans.try_send(span) {
            Ok(()) => {
                if before + 1 >= self.max_export_batch_size
                    && !self.wake_sent.load(Ordering::Relaxed)
                    && !self.wake_sent.swap(true, Ordering::AcqRel)
                    && self.control.try_send(Control::Wake).is_err()
                {
                    self.wake_sent.store(false, Ordering::Release);
                }
            }
            // The gate above keeps the channel from filling; counted all the same.
            Err(TrySendError::Full(_)) => {
                stats.queued.fetch_sub(1, Ordering::AcqRel);
                self.count_drop();
            }
            // After shutdown: nothing exports any more, and nothing is scraped either.
            Err(TrySendError::Disconnected(_)) => {
                stats.queued.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let dropped = self.stats.dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                queue = self.stats.capacity,
                "spans dropped because the export queue was full, since start"
            );
        }
        let result = self.ask(Control::Shutdown, timeout);
        if !matches!(result, Err(OTelSdkError::Timeout(_))) {
            // The thread has answered (or is gone): joining does not wait on an export.
            if let Some(worker) = self.worker.lock().take() {
                let _ = worker.join();
            }
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.try_send(Control::Resource(resource.clone()));
    }
}

#[cold]
fn first_drop(capacity: usize) {
    tracing::warn!(
        queue = capacity,
        "the span export queue is full and spans are being dropped: \
         deriva_telemetry_spans_dropped_total counts them (lower --trace-sample-ratio)"
    );
}

/// The export thread's state.
struct Worker<E> {
    exporter: E,
    spans: Receiver<SpanData>,
    control: Receiver<Control>,
    stats: Arc<SpanQueueStats>,
    wake_sent: Arc<AtomicBool>,
    max_export_batch_size: usize,
    scheduled_delay: Duration,
}

impl<E: SpanExporter> Worker<E> {
    fn run(mut self) {
        // The export's own work (tonic, h2) must not make spans that feed the queue.
        let _suppressed = Context::enter_telemetry_suppressed_scope();
        let mut due = Instant::now() + self.scheduled_delay;
        loop {
            let message = self
                .control
                .recv_timeout(due.saturating_duration_since(Instant::now()));
            match message {
                Ok(Control::Wake) => {
                    self.wake_sent.store(false, Ordering::Release);
                    let _ = self.export_queued();
                    due = Instant::now() + self.scheduled_delay;
                }
                Ok(Control::Flush(reply)) => {
                    let result = self.export_queued();
                    due = Instant::now() + self.scheduled_delay;
                    let _ = reply.send(result);
                }
                Ok(Control::Shutdown(reply)) => {
                    let result = self.export_queued();
                    let stopped = self.exporter.shutdown();
                    let _ = reply.send(result.and(stopped));
                    return;
                }
                Ok(Control::Resource(resource)) => self.exporter.set_resource(&resource),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.export_queued();
                    due = Instant::now() + self.scheduled_delay;
                }
                // The processor was dropped without a shutdown.
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.export_queued();
                    let _ = self.exporter.shutdown();
                    return;
                }
            }
        }
    }

    /// Exports the spans queued now, in batches; those that come meanwhile wait for the next
    /// round, so a steady stream cannot keep a flush or the shutdown waiting. The first
    /// failure is the result.
    fn export_queued(&mut self) -> OTelSdkResult {
        let mut left = self.stats.queued.load(Ordering::Acquire);
        let mut result = Ok(());
        while left > 0 {
            let limit = left.min(self.max_export_batch_size);
            let mut batch = Vec::with_capacity(limit);
            while batch.len() < limit {
                match self.spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            left -= n;
            self.stats.queued.fetch_sub(n, Ordering::AcqRel);
            match futures::executor::block_on(self.exporter.export(batch)) {
                Ok(()) => {
                    self.stats.exported.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.failed.fetch_add(n as u64, Ordering::Relaxed);
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// An exporter that keeps what it gets and, while held, blocks each export until released.
    #[derive(Debug, Clone, Default)]
    struct Held {
        inner: Arc<HeldInner>,
    }

    #[derive(Debug, Default)]
    struct HeldInner {
        state: Mutex<HeldState>,
        changed: std::sync::Condvar,
    }

    #[derive(Debug, Default)]
    struct HeldState {
        held: bool,
        /// Exports begun (blocked or not).
        started: usize,
        names: Vec<String>,
        resource: Option<Resource>,
        shut_down: bool,
    }

    impl Held {
        fn hold(&self) {
            self.inner.state.lock().unwrap().held = true;
        }

        fn release(&self) {
            self.inner.state.lock().unwrap().held = false;
            self.inner.changed.notify_all();
        }

        /// Waits (up to 10 s) until `exports` exports have begun.
        fn wait_started(&self, exports: usize) {
            let state = self.inner.state.lock().unwrap();
            let (state, timeout) = self
                .inner
                .changed
                .wait_timeout_while(state, Duration::from_secs(10), |s| s.started < exports)
                .unwrap();
            assert!(!timeout.timed_out(), "{} exports began", state.started);
        }

        fn names(&self) -> Vec<String> {
            self.inner.state.lock().unwrap().names.clone()
        }
    }

    impl SpanExporter for Held {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let mut state = self.inner.state.lock().unwrap();
            state.started += 1;
            self.inner.changed.notify_all();
            let mut state = self.inner.changed.wait_while(state, |s| s.held).unwrap();
            state
                .names
                .extend(batch.into_iter().map(|s| s.name.into_owned()));
            Ok(())
        }

        fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
            self.inner.state.lock().unwrap().shut_down = true;
            Ok(())
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.state.lock().unwrap().resource = Some(resource.clone());
        }
    }

    fn provider(
        exporter: Held,
        batching: SpanBatching,
    ) -> (SdkTracerProvider, Arc<SpanQueueStats>) {
        let queue = SpanQueue::new(exporter, batching).unwrap();
        let stats = queue.stats();
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name("span-queue-test")
                    .build(),
            )
            .with_span_processor(queue)
            .build();
        (provider, stats)
    }

    fn end_spans(provider: &SdkTracerProvider, names: std::ops::Range<usize>) {
        let tracer = provider.tracer("test");
        for i in names {
            tracer.in_span(format!("s{i}"), |_| {});
        }
    }

    #[test]
    fn a_full_queue_counts_its_drops_and_shutdown_exports_what_waits() {
        let exporter = Held::default();
        exporter.hold();
        let batching = SpanBatching {
            max_queue_size: 4,
            scheduled_delay: Duration::from_secs(3600),
            max_export_batch_size: 4,
        };
        let (provider, stats) = provider(exporter.clone(), batching);
        assert_eq!(stats.capacity(), 4);
        // A full batch wakes the thread, which takes it and blocks in the export.
        end_spans(&provider, 0..4);
        exporter.wait_started(1);
        assert_eq!(stats.queued(), 0);
        // Four more wait; the next three find the queue full.
        end_spans(&provider, 4..11);
        assert_eq!(stats.queued(), 4);
        assert_eq!(stats.dropped(), 3);
        assert_eq!(stats.exported(), 0);

        exporter.release();
        provider.shutdown().unwrap();
        let mut names = exporter.names();
        names.sort_by_key(|n| n[1..].parse::<usize>().unwrap());
        let want: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
        assert_eq!(
            names, want,
            "what was queued is exported, what was dropped is not"
        );
        assert_eq!(
            (
                stats.queued(),
                stats.dropped(),
                stats.exported(),
                stats.failed()
            ),
            (0, 3, 8, 0)
        );
        let state = exporter.inner.state.lock().unwrap();
        assert!(state.shut_down, "the exporter is shut down");
        let service = state
            .resource
            .as_ref()
            .and_then(|r| r.get(&opentelemetry::Key::from_static_str("service.name")));
        assert_eq!(
            service.map(|v| v.to_string()).as_deref(),
            Some("span-queue-test")
        );
    }

    #[test]
    fn force_flush_exports_a_partial_batch_and_failures_are_counted() {
        #[derive(Debug)]
        struct Refusing;
        impl SpanExporter for Refusing {
            async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
                Err(OTelSdkError::InternalFailure("refused".into()))
            }
        }

        let exporter = Held::default();
        let batching = SpanBatching {
            max_queue_size: 64,
            scheduled_delay: Duration::from_secs(3600),
            max_export_batch_size: 16,
        };
        let (provider, stats) = provider(exporter.clone(), batching);
        end_spans(&provider, 0..3);
        assert_eq!(stats.queued(), 3);
        provider.force_flush().unwrap();
        assert_eq!(exporter.names().len(), 3);
        assert_eq!((stats.queued(), stats.exported()), (0, 3));
        provider.shutdown().unwrap();
        assert!(provider.shutdown().is_err(), "a second shutdown");

        let queue = SpanQueue::new(Refusing, batching).unwrap();
        let stats = queue.stats();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build();
        let tracer = provider.tracer("test");
        tracer.in_span("refused", |_| {});
        assert!(provider.force_flush().is_err());
        assert_eq!(
            (stats.exported(), stats.failed(), stats.dropped()),
            (0, 1, 0)
        );
        let _ = provider.shutdown();
    }

    #[test]
    fn the_scheduled_delay_exports_without_a_full_batch() {
        let exporter = Held::default();
        let batching = SpanBatching {
            max_queue_size: 64,
            scheduled_delay: Duration::from_millis(20),
            max_export_batch_size: 64,
        };
        let (provider, stats) = provider(exporter.clone(), batching);
        end_spans(&provider, 0..2);
        exporter.wait_started(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.exported() < 2 {
            assert!(Instant::now() < deadline, "exported {}", stats.exported());
            std::thread::sleep(Duration::from_millis(5));
        }
        provider.shutdown().unwrap();
    }
}
