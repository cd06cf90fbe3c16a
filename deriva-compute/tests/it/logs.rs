//! Log events: a slow compute warns, a determinism violation is an ERROR naming the function.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deriva_compute::{ExecutorConfig, FunctionRegistry};
use deriva_testkit::compute::{Harness, Slow, fid};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Captures (level, message, fields) of every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields.0));
    }
}

impl Capture {
    fn find(&self, level: Level, needle: &str) -> Option<String> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .find(|(l, f)| *l == level && f.contains(needle))
            .map(|(_, f)| f.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_compute_logs_a_warning_with_the_function() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let mut reg = FunctionRegistry::with_builtins();
    reg.register(fid("slow/v1"), Slow::new(Duration::from_millis(300)));
    // The production threshold is 1 s; a test lowers it rather than sleeping a second, but
    // keeps it far above what a one-byte `reverse` takes even on a loaded machine.
    let config = ExecutorConfig {
        slow_compute_threshold: Duration::from_millis(250),
        ..ExecutorConfig::default()
    };
    let h = Harness::with(reg, config, 1 << 20);
    let a = h.leaf(b"a").await;
    let slow = h.recipe("slow/v1", &[a], &[]).await;
    let fast = h.recipe("reverse/v1", &[a], &[]).await;
    h.exec.materialize(fast).await.unwrap();
    assert!(
        capture.find(Level::WARN, "slow compute").is_none(),
        "a fast compute must not warn"
    );
    h.exec.materialize(slow).await.unwrap();
    let warn = capture
        .find(Level::WARN, "slow compute")
        .expect("a WARN for the slow compute");
    assert!(warn.contains("function=slow/v1"), "{warn}");
    assert!(warn.contains(&format!("addr={slow}")), "{warn}");
}

#[tokio::test]
async fn a_determinism_violation_logs_an_error_naming_the_function() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let h = Harness::dual_with_counter();
    let a = h.leaf(b"a").await;
    let flaky = h.recipe("counter/v1", &[a], &[]).await;
    h.exec.materialize(flaky).await.unwrap_err();
    let err = capture
        .find(Level::ERROR, "determinism violation")
        .expect("an ERROR event");
    assert!(err.contains("function=counter/v1"), "{err}");
}
