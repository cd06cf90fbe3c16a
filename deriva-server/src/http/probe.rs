//! [`ProbeCache`]: the outcome of the last backend probe of `/health` and `/readyz`, shared.
//!
//! Both pages are open to anyone, and each probe is a real round trip to both halves of the
//! store (on the remote backend: a PostgreSQL query on the pool the RPCs wait on, and a signed
//! object store request). So a probe's outcome answers every request for [`PROBE_TTL`] after it
//! finished, and a request that comes while a probe runs waits for that probe instead of
//! starting its own: a flood of N concurrent requests makes one probe, and any flood at most
//! about one a second.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How long the outcome of a backend probe answers `/health` and `/readyz`.
pub const PROBE_TTL: Duration = Duration::from_secs(1);

/// What failed in a probe, each naming its backend; empty when both answered.
pub type Failures = Arc<[String]>;

/// See the module docs. Cheap to clone; clones share the outcome.
#[derive(Debug, Clone, Default)]
pub struct ProbeCache {
    /// When the last probe finished, and what it found. The lock is held while a probe runs,
    /// so that the requests coming meanwhile wait for its outcome.
    last: Arc<tokio::sync::Mutex<Option<(Instant, Failures)>>>,
}

impl ProbeCache {
    /// The outcome of a probe that finished less than [`PROBE_TTL`] ago, or of the one running
    /// now, or else of `probe`, run now. A caller that goes away while its probe runs leaves
    /// the next caller to probe.
    pub async fn outcome<F>(&self, probe: impl FnOnce() -> F) -> Failures
    where
        F: Future<Output = Vec<String>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, failures)) = last.as_ref()
            && at.elapsed() < PROBE_TTL
        {
            return failures.clone();
        }
        let failures: Failures = probe().await.into();
        *last = Some((Instant::now(), failures.clone()));
        failures
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A probe that counts its runs and takes `takes` (of the paused clock) to fail with `n`.
    fn counting(runs: &Arc<AtomicUsize>, takes: Duration) -> impl Future<Output = Vec<String>> {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(takes).await;
            vec![format!("probe {n}")]
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_probe_and_its_outcome_lasts_a_second() {
        let cache = ProbeCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let flood = futures::future::join_all((0..100).map(|_| {
            let (cache, runs) = (cache.clone(), runs.clone());
            async move {
                cache
                    .outcome(|| counting(&runs, Duration::from_millis(300)))
                    .await
            }
        }))
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one probe for 100 requests");
        assert!(flood.iter().all(|f| f[..] == ["probe 1".to_owned()]));

        tokio::time::advance(PROBE_TTL - Duration::from_millis(1)).await;
        let again = cache.outcome(|| counting(&runs, Duration::ZERO)).await;
        assert_eq!((runs.load(Ordering::SeqCst), &again[0][..]), (1, "probe 1"));

        tokio::time::advance(Duration::from_millis(1)).await;
        let fresh = cache.outcome(|| counting(&runs, Duration::ZERO)).await;
        assert_eq!((runs.load(Ordering::SeqCst), &fresh[0][..]), (2, "probe 2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_mid_probe_leaves_the_next_to_probe() {
        let cache = ProbeCache::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let abandoned = tokio::time::timeout(
            Duration::from_millis(10),
            cache.outcome(|| counting(&runs, Duration::from_secs(5))),
        )
        .await;
        assert!(abandoned.is_err());
        let next = cache.outcome(|| counting(&runs, Duration::ZERO)).await;
        assert_eq!((runs.load(Ordering::SeqCst), &next[0][..]), (2, "probe 2"));
    }
}
