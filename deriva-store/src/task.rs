//! [`spawn_blocking_in`]: blocking work on tokio's blocking pool that stays in its caller's
//! trace.

use tracing::Span;

/// Runs `f` on the blocking pool inside `span`, with the caller's `tracing` subscriber and
/// untraced scope ([`deriva_core::untraced`]), so spans and logs from the pool thread join the
/// caller's trace (or, for a request that is not traced, build no spans). Used for computes
/// (`deriva-compute`'s executor) and for the local store's file and redb I/O.
pub async fn spawn_blocking_in<T: Send + 'static>(
    span: Span,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let scope = deriva_core::untraced::current();
    tokio::task::spawn_blocking(move || {
        deriva_core::untraced::enter(scope, || {
            tracing::dispatcher::with_default(&dispatch, move || {
                let out = span.in_scope(f);
                // Closed while `dispatch` is the default, so its parent is released too (a
                // subscriber that is not global closes a parent through the thread's default).
                drop(span);
                out
            })
        })
    })
    .await
}
