//! Test helpers (feature `test-util`): compute functions that a test controls, so that a test
//! waits for events ("the compute has started") instead of sleeping and hoping the machine was
//! fast enough.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::Params;
use tokio::sync::Notify;

use crate::function::{ComputeContext, ComputeFunction, FunctionError};

/// How long a test waits on a [`Gate`] for calls to start or finish before it fails: far longer
/// than any test needs, so reaching it means a bug. Tests use it for their other waits too.
pub const GATE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a call is held before it fails on its own (should its gate be leaked): longer than
/// any wait of the test, so a test that waits for the held work to be cancelled fails rather
/// than sees it end this way.
const HOLD_DEADLINE: Duration = Duration::from_secs(2 * GATE_DEADLINE.as_secs());

/// Holds every call of its compute function ([`Gate::function`]) until the test
/// [`Gate::open`]s it, and tells the test how many calls have started, are running and have
/// finished.
///
/// Once open, a call returns its inputs concatenated, followed by its `tag` param (if any), or
/// fails with [`FunctionError::Failed`] when built with [`Gate::failing`]. Dropping the gate
/// opens it, so a test that fails while calls are held does not leave them blocking the
/// runtime's shutdown; a call held for twice [`GATE_DEADLINE`] fails on its own.
#[derive(Default)]
pub struct Gate {
    inner: Arc<GateInner>,
    fail: bool,
}

/// The compute function of a [`Gate`], to register under any id.
#[derive(Clone)]
pub struct GateFunction {
    inner: Arc<GateInner>,
    fail: bool,
}

impl std::fmt::Debug for GateFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateFunction")
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct GateInner {
    state: Mutex<GateState>,
    /// Wakes calls held in `compute` (blocking threads).
    opened: Condvar,
    /// Wakes tests waiting in `wait_*` (async tasks).
    changed: Notify,
}

/// What a [`Gate`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Calls that have entered `compute`.
    pub started: usize,
    /// Calls that have returned.
    pub finished: usize,
    /// The most calls ever inside `compute` at once.
    pub max_running: usize,
}

#[derive(Default)]
struct GateState {
    open: bool,
    counts: GateCounts,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("open", &self.inner.state().open)
            .field("counts", &self.counts())
            .field("fail", &self.fail)
            .finish()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

impl GateInner {
    fn state(&self) -> MutexGuard<'_, GateState> {
        // A panicking test thread must not turn every later call into a second panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Gate {
    /// A closed gate whose calls succeed once it opens.
    pub fn new() -> Self {
        Self::default()
    }

    /// A closed gate whose calls fail once it opens.
    pub fn failing() -> Self {
        Self {
            inner: Arc::default(),
            fail: true,
        }
    }

    /// Its compute function: register it under any id; every clone belongs to this gate.
    pub fn function(&self) -> GateFunction {
        GateFunction {
            inner: self.inner.clone(),
            fail: self.fail,
        }
    }

    /// Lets every held call, and every later one, run to completion.
    pub fn open(&self) {
        self.inner.state().open = true;
        self.inner.opened.notify_all();
        self.inner.changed.notify_waiters();
    }

    /// What the gate has seen so far.
    pub fn counts(&self) -> GateCounts {
        self.inner.state().counts
    }

    /// Waits until at least `n` calls have started; panics after [`GATE_DEADLINE`].
    pub async fn wait_started(&self, n: usize) {
        self.wait_for(&format!("{n} started calls"), |c| c.started >= n)
            .await;
    }

    /// Waits until at least `n` calls have finished; panics after [`GATE_DEADLINE`].
    pub async fn wait_finished(&self, n: usize) {
        self.wait_for(&format!("{n} finished calls"), |c| c.finished >= n)
            .await;
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&GateCounts) -> bool) {
        let deadline = tokio::time::Instant::now() + GATE_DEADLINE;
        loop {
            // Registered before the check, so a change between the check and the await is
            // not missed.
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let counts = self.counts();
            if done(&counts) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("the gate never saw {what} within {GATE_DEADLINE:?}: {counts:?}");
            }
        }
    }
}

/// Polls `done` every few milliseconds until it holds; panics, naming `what`, after
/// [`GATE_DEADLINE`]. For conditions nothing notifies about (a counter, a log line); a gate's
/// own counts have [`Gate::wait_started`] and [`Gate::wait_finished`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + GATE_DEADLINE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {GATE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl ComputeFunction for GateFunction {
    fn compute(
        &self,
        _: &ComputeContext,
        inputs: &[Bytes],
        params: &Params,
    ) -> Result<Bytes, FunctionError> {
        let deadline = Instant::now() + HOLD_DEADLINE;
        let mut state = self.inner.state();
        state.counts.started += 1;
        let running = state.counts.started - state.counts.finished;
        state.counts.max_running = state.counts.max_running.max(running);
        self.inner.changed.notify_waiters();
        let mut held_too_long = false;
        while !state.open {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                held_too_long = true;
                break;
            };
            state = self
                .inner
                .opened
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        state.counts.finished += 1;
        drop(state);
        self.inner.changed.notify_waiters();
        if held_too_long {
            return Err(FunctionError::Failed(format!(
                "the gate was not opened within {HOLD_DEADLINE:?}"
            )));
        }
        if self.fail {
            return Err(FunctionError::Failed("the gate was built to fail".into()));
        }
        let mut out = inputs.concat();
        if let Some(tag) = params.get("tag") {
            out.extend_from_slice(tag.as_bytes());
        }
        Ok(out.into())
    }
}
