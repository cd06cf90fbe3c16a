//! [`PgLeases`]: compute leases in the `compute_leases` table, so that the nodes sharing an
//! output tier compute each recipe once.
//!
//! - **Acquire** is one statement: an `INSERT … ON CONFLICT (recipe) DO UPDATE … WHERE
//!   expires_at < now()` that takes a free lease or one whose holder let it expire, and
//!   otherwise returns the holder's row (node, `traceparent`, time left). Every time is the
//!   database's `now()`, never a node's clock.
//! - **Renew**: the holder pushes `expires_at` to `now() + ttl` every third of the ttl while it
//!   computes, on a task of its own.
//! - **Release**: one statement deletes the row (if it is still this holder's) and sends
//!   `NOTIFY deriva_leases_<schema>` with the recipe's hex and how it ended. The invalidation
//!   listener's connection (`bus.rs`) listens on that channel too and wakes this node's
//!   waiters ([`LeaseWaiters`]); after that connection was lost it wakes them all, since an
//!   end may have been missed. Waiters also poll (the engine bounds each wait), so a lost
//!   notification costs time, never a hang.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deriva_core::CAddr;
use deriva_core::error::Result;
use deriva_store::{ComputeLease, ComputeLeases, HeldBy, LeaseAttempt, LeaseEnd, LeaseRelease};
use futures::FutureExt as _;
use tokio::sync::Notify;

use crate::pg::{Call, Pg};

/// The default time a lease lasts unless renewed (`--compute-lease-ttl`).
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// The waiters of this node, by recipe: woken when the lease of their recipe ends.
#[derive(Debug, Default)]
pub(crate) struct LeaseWaiters {
    waiting: parking_lot::Mutex<HashMap<CAddr, Weak<Notify>>>,
}

impl LeaseWaiters {
    /// The notification of `recipe`'s lease ending, shared by this node's waiters on it.
    fn register(&self, recipe: CAddr) -> Arc<Notify> {
        let mut waiting = self.waiting.lock();
        if let Some(notify) = waiting.get(&recipe).and_then(Weak::upgrade) {
            return notify;
        }
        // Entries whose waiters have all gone are dropped as new ones come.
        if waiting.len() >= 64 {
            waiting.retain(|_, w| w.strong_count() > 0);
        }
        let notify = Arc::new(Notify::new());
        waiting.insert(recipe, Arc::downgrade(&notify));
        notify
    }

    /// Wakes the waiters of `recipe`.
    pub(crate) fn wake(&self, recipe: &CAddr) {
        let notify = self.waiting.lock().get(recipe).and_then(Weak::upgrade);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter (an end may have been missed).
    pub(crate) fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .waiting
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

/// The channel on which lease ends are announced, for `schema`.
pub(crate) fn channel(schema: &str) -> String {
    format!("deriva_leases_{schema}")
}

/// The recipe whose lease a notification on [`channel`] announces the end of.
pub(crate) fn ended_recipe(payload: &str) -> Option<CAddr> {
    let hex = payload.split(' ').next()?;
    CAddr::from_slice(&hex::decode(hex).ok()?).ok()
}

/// The compute leases of one schema.
#[derive(Debug, Clone)]
pub struct PgLeases {
    pg: Arc<Pg>,
    node: String,
    ttl: Duration,
    channel: String,
    waiters: Arc<LeaseWaiters>,
}

impl PgLeases {
    pub(crate) fn new(
        pg: Arc<Pg>,
        node: String,
        ttl: Duration,
        waiters: Arc<LeaseWaiters>,
    ) -> Self {
        let channel = channel(pg.schema_name());
        Self {
            pg,
            node,
            ttl,
            channel,
            waiters,
        }
    }
}

const ACQUIRE: Call = Call {
    op: "lease_acquire",
    operation: "INSERT",
    table: "compute_leases",
    context: "taking a compute lease",
};
const RENEW: Call = Call {
    op: "lease_renew",
    operation: "UPDATE",
    table: "compute_leases",
    context: "renewing a compute lease",
};
const RELEASE: Call = Call {
    op: "lease_release",
    operation: "DELETE",
    table: "compute_leases",
    context: "ending a compute lease",
};

#[async_trait]
impl ComputeLeases for PgLeases {
    async fn acquire(&self, recipe: CAddr, traceparent: Option<String>) -> Result<LeaseAttempt> {
        // Registered before the statement: an end announced from now on is not missed.
        let notify = self.waiters.register(recipe);
        let ended = notify.clone().notified_owned();
        let token = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as i64;
        let key = recipe.as_bytes().to_vec();
        let rows = self
            .pg
            .query(
                ACQUIRE,
                "WITH taken AS (
                    INSERT INTO {s}.compute_leases AS l
                        (recipe, node, token, traceparent, started_at, expires_at)
                    VALUES ($1, $2, $3, $4, now(), now() + make_interval(secs => $5))
                    ON CONFLICT (recipe) DO UPDATE SET
                        node = excluded.node, token = excluded.token,
                        traceparent = excluded.traceparent,
                        started_at = excluded.started_at, expires_at = excluded.expires_at
                    WHERE l.expires_at < now()
                    RETURNING (l.xmax::text <> '0') AS took_over
                 )
                 SELECT true, took_over, NULL::text, NULL::text, 0::float8 FROM taken
                 UNION ALL
                 SELECT false, false, node, traceparent,
                        greatest(extract(epoch FROM expires_at - now()), 0)::float8
                 FROM {s}.compute_leases
                 WHERE recipe = $1 AND NOT EXISTS (SELECT 1 FROM taken)",
                &[
                    &key,
                    &self.node,
                    &token,
                    &traceparent,
                    &self.ttl.as_secs_f64(),
                ],
            )
            .await?;
        let Some(row) = rows.into_iter().next() else {
            // Taken by a statement that committed after this one's snapshot: held, by a
            // holder this statement cannot see; a fresh lease has the whole ttl to go.
            return Ok(LeaseAttempt::Held(HeldBy {
                node: String::new(),
                traceparent: None,
                expires_in: self.ttl,
                ended: ended.boxed(),
            }));
        };
        if row.get::<_, bool>(0) {
            let held = Held {
                pg: self.pg.clone(),
                recipe,
                token,
                channel: self.channel.clone(),
                renewal: renew(self.pg.clone(), recipe, token, self.ttl),
            };
            return Ok(LeaseAttempt::Acquired(ComputeLease::new(
                Box::new(held),
                row.get(1),
            )));
        }
        Ok(LeaseAttempt::Held(HeldBy {
            node: row.get(2),
            traceparent: row.get(3),
            expires_in: Duration::from_secs_f64(row.get::<_, f64>(4)),
            ended: ended.boxed(),
        }))
    }
}

/// Renews the lease `token` of `recipe` every third of `ttl` until aborted.
fn renew(pg: Arc<Pg>, recipe: CAddr, token: i64, ttl: Duration) -> tokio::task::JoinHandle<()> {
    let pg = Arc::downgrade(&pg);
    tokio::spawn(async move {
        let key = recipe.as_bytes().to_vec();
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(pg) = pg.upgrade() else { return };
            let renewed = pg
                .query(
                    RENEW,
                    "UPDATE {s}.compute_leases
                     SET expires_at = now() + make_interval(secs => $3)
                     WHERE recipe = $1 AND token = $2
                     RETURNING 1",
                    &[&key, &token, &ttl.as_secs_f64()],
                )
                .await;
            match renewed {
                Ok(rows) if rows.is_empty() => {
                    tracing::warn!(%recipe, "lost the compute lease (it expired and another node took it); computing on");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%recipe, error = %e, "could not renew the compute lease; retrying");
                }
            }
        }
    })
}

/// A lease this node holds, renewed until released.
struct Held {
    pg: Arc<Pg>,
    recipe: CAddr,
    token: i64,
    channel: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

#[async_trait]
impl LeaseRelease for Held {
    async fn release(self: Box<Self>, end: LeaseEnd) {
        self.renewal.abort();
        let key = self.recipe.as_bytes().to_vec();
        let word = match end {
            LeaseEnd::Done => "done",
            LeaseEnd::Failed => "failed",
        };
        let payload = format!("{} {word}", self.recipe.to_hex());
        let released = self
            .pg
            .query(
                RELEASE,
                "WITH gone AS (
                    DELETE FROM {s}.compute_leases WHERE recipe = $1 AND token = $2
                 )
                 SELECT pg_notify($3, $4)",
                &[&key, &self.token, &self.channel, &payload],
            )
            .await;
        if let Err(e) = released {
            // The waiters find out when it expires.
            tracing::warn!(recipe = %self.recipe, error = %e, "could not end the compute lease; it ends when it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_names_its_recipe() {
        let recipe = CAddr::from([7; 32]);
        let payload = format!("{} done", recipe.to_hex());
        assert_eq!(ended_recipe(&payload), Some(recipe));
        assert_eq!(ended_recipe("zz done"), None);
        assert_eq!(ended_recipe(""), None);
    }

    #[tokio::test]
    async fn waiters_registered_before_an_end_are_woken_by_it() {
        let waiters = LeaseWaiters::default();
        let recipe = CAddr::from([1; 32]);
        let ended = waiters.register(recipe).notified_owned();
        let other = waiters.register(CAddr::from([2; 32])).notified_owned();
        waiters.wake(&recipe);
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("woken");
        let mut other = Box::pin(other);
        assert!(
            futures::poll!(other.as_mut()).is_pending(),
            "not its recipe"
        );
        waiters.wake_all();
        tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .expect("woken by wake_all");
    }
}
