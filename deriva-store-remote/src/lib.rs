//! Deriva's remote backends, for running any number of `deriva-server` nodes on engines that
//! operators already run:
//!
//! - [`RemoteBlobStore`]: leaf bytes in an S3-compatible object store at `leaves/<hex>`
//!   (conditional creates, bounded retries, hash-verified reads, multipart for large leaves),
//!   with a bounded local read-through cache ([`DiskCache`]);
//! - [`PgIndex`]: recipes, depths and dependency edges in PostgreSQL, in a schema the server
//!   migrates itself (see `pg.rs` for the tables). PostgreSQL also records which leaves exist:
//!   every index question is answered there, never from object listings;
//! - [`ObjectOutputs`]: with the output tier, computed outputs in the object store at
//!   `outputs/<hex>`, each with its materialization record, indexed by `outputs` rows;
//! - [`PgRecords`]: the materialization records of computed outputs and their audits, in the
//!   `outputs` rows, for every remote store.
//!
//! [`open`] connects both and returns a [`deriva_store::Store`] over them. Every request to
//! either engine is declared as a [`deriva_store::observe::Call`] and run through
//! [`deriva_store::observe::BackendMetrics`], which makes it a client span and measures it. A
//! backend that cannot be reached is [`deriva_core::DerivaError::Unavailable`], naming it.

mod bus;
mod disk_cache;
mod gc;
mod index;
mod leaf_objects;
mod leases;
mod nodes;
mod objects;
mod outputs;
mod pg;
mod pgtls;
mod records;
mod spool;

use std::path::PathBuf;
use std::sync::Arc;

use deriva_core::error::Result;
use deriva_store::{Store, StoreCounters, lease};

pub use bus::{Invalidation, Listener, PgBus};
use deriva_store::observe::BackendMetrics;
pub use disk_cache::DiskCache;
pub use index::PgIndex;
pub use leaf_objects::RemoteBlobStore;
pub use leases::{LEASE_TTL, PgLeases};
pub use nodes::{DEAD_AFTER, NodeBeat, NodeRow, PgNodes};
pub use objects::{CONNECT_TIMEOUT as S3_CONNECT_TIMEOUT, MULTIPART_THRESHOLD, PART_BYTES};
pub use objects::{REQUEST_TIMEOUT as S3_REQUEST_TIMEOUT, RETRY as S3_RETRY};
pub use outputs::ObjectOutputs;
pub use pg::{CONNECT_TIMEOUT as PG_CONNECT_TIMEOUT, POOL_WAIT as PG_POOL_WAIT};
pub use pg::{SCHEMA_VERSION, STATEMENT_TIMEOUT_MS};
pub use records::PgRecords;

/// Where the remote backends are. Its `Debug` hides the secrets: the password of `index`, and
/// the values of the `AWS_*` variables whose names say they are secrets.
#[derive(Clone)]
pub struct RemoteConfig {
    /// `s3://BUCKET[/PREFIX]`.
    pub blob_store: String,
    /// The object store's endpoint, region and credentials, as the standard `AWS_*` variables
    /// (name, value): `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, … The server
    /// passes its environment's ([`aws_env`]).
    pub aws: Vec<(String, String)>,
    /// A PostgreSQL URL (`postgres://user:pass@host:port/db`).
    pub index: String,
    /// The PostgreSQL schema that holds Deriva's tables.
    pub schema: String,
    /// Connections in the PostgreSQL pool.
    pub pool_size: usize,
    /// The local read-through cache: its directory and its bound in bytes; `None` for no cache.
    pub local_cache: Option<(PathBuf, u64)>,
    /// Where a streamed upload waits until its last byte tells its address (then it is
    /// uploaded under it); emptied when the store opens. `None` for a store that takes no
    /// streamed uploads (a migration's).
    pub spool_dir: Option<PathBuf>,
    /// Keep computed outputs in the object store too (the shared output tier).
    pub output_tier: bool,
    /// Create the schema if it does not exist (a server does); `false` for a store that is
    /// only read, such as a migration's source: a missing schema is then an error naming it.
    pub create_schema: bool,
    /// This node's id (its `service.instance.id`), so that it ignores its own invalidations.
    pub node_id: String,
    /// How long a compute lease lasts unless its holder renews it (with the output tier): the
    /// longest the other nodes wait for a node that died while computing.
    pub compute_lease_ttl: std::time::Duration,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use deriva_util::redact::{HIDDEN, is_secret_name, redact_url};
        let aws: Vec<String> = self
            .aws
            .iter()
            .map(|(name, value)| {
                let value = if is_secret_name(name) {
                    HIDDEN.to_owned()
                } else {
                    redact_url(value)
                };
                format!("{name}={value}")
            })
            .collect();
        f.debug_struct("RemoteConfig")
            .field("blob_store", &redact_url(&self.blob_store))
            .field("aws", &aws)
            .field("index", &redact_url(&self.index))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("local_cache", &self.local_cache)
            .field("spool_dir", &self.spool_dir)
            .field("output_tier", &self.output_tier)
            .field("create_schema", &self.create_schema)
            .field("node_id", &self.node_id)
            .field("compute_lease_ttl", &self.compute_lease_ttl)
            .finish()
    }
}

/// The remote store, and the invalidation channel its nodes share.
#[derive(Debug)]
pub struct Remote {
    /// The store: leaves, recipes, and (with the output tier) outputs; invalidations are
    /// published on [`Remote::bus`].
    pub store: Store,
    /// The channel to listen on for the other nodes' invalidations.
    pub bus: PgBus,
    /// The nodes serving this schema, by their heartbeats.
    pub nodes: PgNodes,
}

/// An error's message followed by those of its causes that it does not already include: the
/// cause is often where the reason is ("error sending request": "invalid peer certificate").
pub(crate) fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The process environment's `AWS_*` variables, for [`RemoteConfig::aws`].
pub fn aws_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| name.starts_with("AWS_"))
        .collect()
}

/// Opens the store over an object store and a PostgreSQL index: connects to the database,
/// migrates its schema, loads the counters, and opens the local cache. The object store is not
/// contacted here (see [`Store::check`]).
pub async fn open(config: &RemoteConfig, metrics: Arc<BackendMetrics>) -> Result<Remote> {
    let objects = Arc::new(objects::Objects::open(
        &config.blob_store,
        &config.aws,
        metrics.clone(),
    )?);
    let pg = Arc::new(
        pg::Pg::open(
            &config.index,
            &config.schema,
            config.pool_size,
            metrics.clone(),
            config.create_schema,
        )
        .await?,
    );
    let counters = Arc::new(StoreCounters::default());
    load_counters(&pg, &counters).await?;
    let cache = match &config.local_cache {
        Some((dir, bytes)) => {
            let (dir, bytes) = (dir.clone(), *bytes);
            let opened = tokio::task::spawn_blocking(move || DiskCache::open(&dir, bytes))
                .await
                .map_err(|e| deriva_core::DerivaError::from_join("opening the local cache", e))??;
            Some(Arc::new(opened))
        }
        None => None,
    };
    let spool = match config.spool_dir.clone() {
        Some(dir) => Some(Arc::new(
            tokio::task::spawn_blocking(move || spool::Spool::open(&dir))
                .await
                .map_err(|e| {
                    deriva_core::DerivaError::from_join("opening the upload spool", e)
                })??,
        )),
        None => None,
    };
    let description = format!("remote {} + {}", objects.name(), pg.name());
    let blobs = RemoteBlobStore::new(
        objects.clone(),
        pg.clone(),
        counters.clone(),
        (cache, spool),
        metrics,
    );
    let recipes = PgIndex::new(pg.clone(), counters.clone());
    refresh_counters(&pg, &counters);
    let nodes = PgNodes::new(pg.clone());
    let waiters = Arc::new(leases::LeaseWaiters::default());
    let bus = PgBus::new(pg.clone(), config.node_id.clone(), waiters.clone());
    tracing::info!(
        backend = %description,
        recipes = counters.recipes(),
        blobs = counters.blobs(),
        blob_bytes = counters.blob_bytes(),
        "store opened"
    );
    let mut store = Store::new(
        Arc::new(blobs),
        Arc::new(recipes),
        counters,
        lease(),
        description,
    )
    .with_bus(Arc::new(bus.clone()))
    // The records live in the `outputs` rows, with the output tier or without it.
    .with_records(Arc::new(PgRecords::new(pg.clone())));
    // Leases hand an output over through the output tier: without one, each node computes.
    if config.output_tier {
        let outputs = Arc::new(ObjectOutputs::new(objects, pg.clone()));
        store = store
            .with_outputs(outputs.clone())
            .with_sizes(outputs)
            .with_leases(Arc::new(PgLeases::new(
                pg,
                config.node_id.clone(),
                config.compute_lease_ttl,
                waiters,
            )));
    }
    Ok(Remote { store, bus, nodes })
}

/// How often a node reloads its counters from the index, to count the other nodes' writes.
/// A reload reads the 16 rows of the `counts` table (kept by triggers in the transaction of
/// every write, see `pg.rs`), whatever the size of the store.
pub const COUNTS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Reloads `counters` every [`COUNTS_REFRESH`] while the store is open: this node updates
/// them on its own writes at once, and learns the other nodes' writes here. Ends when the
/// store is dropped. A failed reload is logged and retried at the next tick.
fn refresh_counters(pg: &Arc<pg::Pg>, counters: &Arc<StoreCounters>) {
    let (pg, counters) = (Arc::downgrade(pg), Arc::downgrade(counters));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COUNTS_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (Some(pg), Some(counters)) = (pg.upgrade(), counters.upgrade()) else {
                return;
            };
            if let Err(e) = load_counters(&pg, &counters).await {
                tracing::debug!(error = %e, "could not reload the store's counters");
            }
        }
    });
}

/// Sets `counters` from the index: the totals of every node's writes, as the `counts` table's
/// shard rows add up (never a scan of the counted tables).
async fn load_counters(pg: &pg::Pg, counters: &StoreCounters) -> Result<()> {
    const CALL: pg::Call = pg::Call {
        op: "count",
        operation: "SELECT",
        table: "counts",
        context: "reading the index's counts",
    };
    let row = pg
        .query_opt(
            CALL,
            "SELECT coalesce(sum(recipes), 0)::bigint, coalesce(sum(leaves), 0)::bigint,
                    coalesce(sum(leaf_bytes), 0)::bigint, coalesce(sum(pins), 0)::bigint
             FROM {s}.counts",
            &[],
        )
        .await?;
    let n = |i: usize| row.as_ref().map_or(0, |r| r.get::<_, i64>(i).max(0) as u64);
    counters.set_recipes(n(0));
    counters.set_blobs(n(1), n(2));
    counters.set_pins(n(3));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_debug_hides_its_secrets() {
        let config = RemoteConfig {
            blob_store: "s3://b/p".into(),
            aws: vec![
                ("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:8333".into()),
                ("AWS_ACCESS_KEY_ID".into(), "AKID".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "aws-s3cret".into()),
                ("AWS_SESSION_TOKEN".into(), "aws-t0ken".into()),
            ],
            index: "postgres://u:pg/s3cret@db/idx".into(),
            schema: "deriva".into(),
            pool_size: 1,
            local_cache: None,
            spool_dir: None,
            output_tier: false,
            create_schema: true,
            node_id: String::new(),
            compute_lease_ttl: LEASE_TTL,
        };
        let shown = format!("{config:?}");
        for secret in ["aws-s3cret", "aws-t0ken", "pg/s3cret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        for kept in ["http://127.0.0.1:8333", "AKID", "postgres://u:***@db/idx"] {
            assert!(shown.contains(kept), "{shown}");
        }
    }
}
