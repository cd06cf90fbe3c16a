//! Invalidations across nodes through PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! [`PgBus::publish`] sends `NOTIFY deriva_invalidate_<schema>` with the sending node's id and
//! the addresses in hex. [`PgBus::listen`] keeps one connection outside the pool listening on
//! that channel and hands every other node's addresses to a callback. PostgreSQL delivers a
//! notification only to connections listening when it is committed, so after the listening
//! connection was lost (a database restart) the callback gets [`Invalidation::All`]: this
//! node may have missed some, and must forget everything it cached.
//!
//! The same connection listens for the ends of compute leases (`leases.rs`,
//! `deriva_leases_<schema>`) and wakes this node's waiters on them; after a reconnection it
//! wakes them all.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deriva_core::CAddr;
use deriva_core::error::Result;
use deriva_store::InvalidationBus;
use futures::StreamExt as _;
use tokio_postgres::AsyncMessage;

use crate::leases::{self, LeaseWaiters};
use crate::pg::Pg;

/// The largest payload sent in one notification (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7900;

/// What another node invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// These addresses.
    Addrs(Vec<CAddr>),
    /// Possibly anything: this node was not listening for a while.
    All,
}

/// The invalidation channel of one schema.
#[derive(Debug, Clone)]
pub struct PgBus {
    pg: Arc<Pg>,
    node: String,
    channel: String,
    /// The channel of compute lease ends, and this node's waiters on them.
    lease_channel: String,
    waiters: Arc<LeaseWaiters>,
}

/// Stops the listening task when dropped.
#[derive(Debug)]
pub struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgBus {
    pub(crate) fn new(pg: Arc<Pg>, node: String, waiters: Arc<LeaseWaiters>) -> Self {
        let channel = format!("deriva_invalidate_{}", pg.schema_name());
        let lease_channel = leases::channel(pg.schema_name());
        Self {
            pg,
            node,
            channel,
            lease_channel,
            waiters,
        }
    }

    /// Listens for the other nodes' invalidations until the returned [`Listener`] is dropped,
    /// reconnecting (with backoff up to 2 s) whenever the connection is lost.
    pub fn listen(&self, on: impl Fn(Invalidation) + Send + Sync + 'static) -> Listener {
        let bus = self.clone();
        Listener(tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut connected_before = false;
            loop {
                match bus.listen_once(&on, &mut connected_before).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        let error = crate::pg::describe_error(&e);
                        tracing::warn!(%error, channel = %bus.channel, "not listening for invalidations; retrying");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }))
    }

    /// One listening connection, until it ends.
    async fn listen_once(
        &self,
        on: &(impl Fn(Invalidation) + Send + Sync),
        connected_before: &mut bool,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let (client, mut connection) = self.pg.config().connect(self.pg.tls()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx
                            .send((n.channel().to_owned(), n.payload().to_owned()))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the invalidation connection failed");
                        break;
                    }
                }
            }
        });
        let listening = client
            .batch_execute(&format!(
                "LISTEN {}; LISTEN {}",
                self.channel, self.lease_channel
            ))
            .await;
        if let Err(e) = listening {
            driver.abort();
            return Err(e);
        }
        if *connected_before {
            tracing::warn!("listening for invalidations again; forgetting this node's cache");
            on(Invalidation::All);
            self.waiters.wake_all();
        }
        *connected_before = true;
        tracing::debug!(channel = %self.channel, "listening for invalidations");
        while let Some((channel, payload)) = rx.recv().await {
            if channel == self.lease_channel {
                if let Some(recipe) = leases::ended_recipe(&payload) {
                    self.waiters.wake(&recipe);
                }
                continue;
            }
            let mut words = payload.split(' ');
            if words.next() == Some(self.node.as_str()) {
                continue;
            }
            let addrs: Vec<CAddr> = words
                .filter_map(|hex| {
                    let bytes = hex::decode(hex).ok()?;
                    CAddr::from_slice(&bytes).ok()
                })
                .collect();
            if !addrs.is_empty() {
                on(Invalidation::Addrs(addrs));
            }
        }
        drop(client);
        driver.abort();
        Ok(())
    }
}

#[async_trait]
impl InvalidationBus for PgBus {
    async fn publish(&self, addrs: &[CAddr]) -> Result<()> {
        const CTX: &str = "publishing an invalidation";
        let mut payloads = Vec::new();
        let mut payload = self.node.clone();
        for addr in addrs {
            if payload.len() + 65 > MAX_PAYLOAD {
                payloads.push(std::mem::replace(&mut payload, self.node.clone()));
            }
            payload.push(' ');
            payload.push_str(&addr.to_hex());
        }
        payloads.push(payload);
        let pg = &self.pg;
        pg.call("notify", "NOTIFY", "invalidations", async {
            let conn = pg.conn().await?;
            let stmt = conn
                .prepare_cached("SELECT pg_notify($1, $2)")
                .await
                .map_err(|e| pg.error(CTX, e))?;
            for payload in &payloads {
                conn.execute(&stmt, &[&self.channel, payload])
                    .await
                    .map_err(|e| pg.error(CTX, e))?;
            }
            Ok(())
        })
        .await
    }
}
