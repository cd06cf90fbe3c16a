//! The scope of a request that is not traced.
//!
//! The server decides once, when a request arrives, whether it is traced: sampled for export,
//! captured by the in-process trace store, or forced by its caller. A request that is none of
//! these runs inside an [`Untraced`] scope: the server's span layers see that the scope is
//! active ([`active`]) and build no span, so the request pays for no span objects and no field
//! formatting. It keeps its trace id and request id here, for the log lines written inside it.
//!
//! The scope is a thread-local set while the request's future is polled ([`Scoped`]); work the
//! request hands to another task or thread carries it along ([`current`] before, [`Scoped`] or
//! [`enter`] there), so the spans of that work are not built either (they would otherwise start
//! traces of their own).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The ids of an untraced request, for its log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untraced {
    trace_id: u128,
    request_id: Arc<str>,
}

impl Untraced {
    /// The scope of a request with this W3C trace id (not zero) and request id.
    pub fn new(trace_id: u128, request_id: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            trace_id,
            request_id,
        })
    }

    /// The W3C trace id.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The request id.
    pub fn request_id(&self) -> &Arc<str> {
        &self.request_id
    }
}

thread_local! {
    static CURRENT: Cell<Option<Arc<Untraced>>> = const { Cell::new(None) };
}

/// Whether this thread is running an untraced request now.
pub fn active() -> bool {
    CURRENT.with(|c| {
        let scope = c.take();
        let active = scope.is_some();
        c.set(scope);
        active
    })
}

/// The untraced request this thread is running, if any (to carry to other work).
pub fn current() -> Option<Arc<Untraced>> {
    CURRENT.with(|c| {
        let scope = c.take();
        let copy = scope.clone();
        c.set(scope);
        copy
    })
}

/// Puts the previous scope back when dropped, also when the work inside panics (a tokio
/// worker thread goes on to run other tasks).
struct Restore<'a> {
    slot: &'a mut Option<Arc<Untraced>>,
    previous: Option<Option<Arc<Untraced>>>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            *self.slot = CURRENT.with(|c| c.replace(previous));
        }
    }
}

/// Runs `f` in `scope` (`None`: outside any untraced request), then restores the thread's scope.
pub fn enter<R>(mut scope: Option<Arc<Untraced>>, f: impl FnOnce() -> R) -> R {
    within(&mut scope, f)
}

/// Runs `f` in the scope `slot` holds, then restores the thread's scope. The scope moves into
/// the thread-local and back into `slot`: no reference count changes, so a future or stream
/// can hold its scope and run every poll in it.
pub fn within<R>(slot: &mut Option<Arc<Untraced>>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(slot.take()));
    let _restore = Restore {
        slot,
        previous: Some(previous),
    };
    f()
}

pin_project_lite::pin_project! {
    /// A future polled in a scope: see [`scoped`].
    #[derive(Debug)]
    pub struct Scoped<F> {
        scope: Option<Arc<Untraced>>,
        #[pin]
        inner: F,
    }
}

/// `inner`, polled in `scope` each time (`None`: outside any untraced request).
pub fn scoped<F: Future>(scope: Option<Arc<Untraced>>, inner: F) -> Scoped<F> {
    Scoped { scope, inner }
}

/// `inner`, polled in the scope of the current thread (see [`current`]): for work a request
/// spawns.
pub fn in_current<F: Future>(inner: F) -> Scoped<F> {
    scoped(current(), inner)
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        within(this.scope, || inner.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_is_active_inside_and_restored_after_even_a_panic() {
        assert!(!active());
        let scope = Untraced::new(0xabc, "req-1".into());
        enter(Some(scope.clone()), || {
            assert!(active());
            assert_eq!(current().unwrap().request_id().as_ref(), "req-1");
            assert_eq!(current().unwrap().trace_hex(), format!("{:032x}", 0xabc));
            // Nested work outside any request (a background task run inline) sees none.
            enter(None, || assert!(!active()));
            assert!(active());
        });
        assert!(!active());
        let panicked = std::panic::catch_unwind(|| enter(Some(scope), || panic!("inside")));
        assert!(panicked.is_err());
        assert!(!active(), "the scope does not outlive a panic");
    }

    #[test]
    fn a_scoped_future_sees_its_scope_on_every_poll_and_keeps_it_between_polls() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let scope = Untraced::new(7, "req-7".into());
        let seen = rt.block_on(scoped(Some(scope), async {
            let first = current().map(|s| s.trace_id());
            tokio::task::yield_now().await;
            let second = current().map(|s| s.trace_id());
            // Spawned work does not inherit it unless it is carried.
            let spawned = tokio::spawn(async { active() }).await.unwrap();
            let carried = tokio::spawn(in_current(async { active() })).await.unwrap();
            (first, second, spawned, carried)
        }));
        assert_eq!(seen, (Some(7), Some(7), false, true));
        assert!(!active());
    }
}
