//! [`PgNodes`]: the nodes that serve one schema, each known by the row its heartbeat refreshes
//! in the `nodes` table. A node whose row has not been refreshed for one missed interval is
//! `suspect`, for [`DEAD_AFTER`] intervals `dead`. The live nodes delete the rows whose last
//! heartbeat is older than `--node-forget-after` ([`PgNodes::forget_silent`]), so the table
//! holds the nodes of the recent past, not every node that ever started.

use std::sync::Arc;
use std::time::Duration;

use deriva_core::error::Result;

use crate::pg::{Call, Pg};

/// Intervals without a heartbeat after which a node is `dead` (after one it is `suspect`).
pub const DEAD_AFTER: u32 = 3;

/// What one node says of itself at each heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeBeat {
    /// Its name (`service.instance.id`).
    pub name: String,
    /// Its gRPC address.
    pub grpc_addr: String,
    /// `server`.
    pub role: String,
    /// When this process started, in seconds since the Unix epoch.
    pub incarnation: u64,
    /// Entries in its memory cache.
    pub cache_entries: u64,
    /// Bytes in its memory cache.
    pub cache_bytes: u64,
    /// Leaves in the store, as it counts them.
    pub blob_count: u64,
    /// Its 1-minute load average per CPU.
    pub cpu_load: f32,
}

/// A node as the table holds it, with its state.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// What it said at its last heartbeat.
    pub beat: NodeBeat,
    /// Seconds since it started, at its last heartbeat.
    pub uptime_secs: u64,
    /// `alive`, `suspect` or `dead`.
    pub state: &'static str,
}

/// The `nodes` table of one schema.
#[derive(Debug, Clone)]
pub struct PgNodes {
    pg: Arc<Pg>,
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgNodes {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        Self { pg }
    }

    /// Writes this node's row, with the heartbeat time of the database's clock.
    pub async fn beat(&self, beat: &NodeBeat) -> Result<()> {
        const CALL: Call = Call {
            op: "heartbeat",
            operation: "INSERT",
            table: "nodes",
            context: "writing this node's heartbeat",
        };
        let incarnation = as_i64(beat.incarnation);
        let (entries, bytes, blobs) = (
            as_i64(beat.cache_entries),
            as_i64(beat.cache_bytes),
            as_i64(beat.blob_count),
        );
        self.pg
            .query(
                CALL,
                "INSERT INTO {s}.nodes (name, grpc_addr, role, incarnation, started_at,
                     heartbeat_at, cache_entries, cache_bytes, blob_count, cpu_load)
                 VALUES ($1, $2, $3, $4, to_timestamp($9), now(), $5, $6, $7, $8)
                 ON CONFLICT (name) DO UPDATE SET grpc_addr = $2, role = $3, incarnation = $4,
                     started_at = to_timestamp($9), heartbeat_at = now(), cache_entries = $5,
                     cache_bytes = $6, blob_count = $7, cpu_load = $8",
                &[
                    &beat.name,
                    &beat.grpc_addr,
                    &beat.role,
                    &incarnation,
                    &entries,
                    &bytes,
                    &blobs,
                    &beat.cpu_load,
                    &(beat.incarnation as f64),
                ],
            )
            .await
            .map(drop)
    }

    /// Deletes the rows of the nodes whose last heartbeat is more than `after` old (by the
    /// database's clock); how many it deleted. The table is small (the nodes of the recent
    /// past), so reading it whole is cheap.
    pub async fn forget_silent(&self, after: Duration) -> Result<u64> {
        const CALL: Call = Call {
            op: "forget_nodes",
            operation: "DELETE",
            table: "nodes",
            context: "forgetting silent nodes",
        };
        // PostgreSQL's intervals end near 178 million years; a century is forever here.
        let secs = after
            .min(Duration::from_secs(100 * 365 * 86_400))
            .as_secs_f64();
        let rows = self
            .pg
            .query(
                CALL,
                "DELETE FROM {s}.nodes WHERE heartbeat_at < now() - make_interval(secs => $1)
                 RETURNING name",
                &[&secs],
            )
            .await?;
        for row in &rows {
            tracing::info!(
                node = row.get::<_, &str>(0),
                after_secs = secs,
                "forgot a node that sent no heartbeat for --node-forget-after"
            );
        }
        Ok(rows.len() as u64)
    }

    /// Every node with a row, by name, with its state for heartbeats every `interval`.
    pub async fn list(&self, interval: Duration) -> Result<Vec<NodeRow>> {
        const CALL: Call = Call {
            op: "list_nodes",
            operation: "SELECT",
            table: "nodes",
            context: "listing the nodes",
        };
        let rows = self
            .pg
            .query(
                CALL,
                "SELECT name, grpc_addr, role, incarnation, cache_entries, cache_bytes,
                        blob_count, cpu_load,
                        extract(epoch FROM heartbeat_at - started_at)::float8,
                        extract(epoch FROM now() - heartbeat_at)::float8
                 FROM {s}.nodes ORDER BY name",
                &[],
            )
            .await?;
        let interval = interval.as_secs_f64().max(0.001);
        Ok(rows
            .iter()
            .map(|row| {
                let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
                let silent: f64 = row.get(9);
                // Half an interval of slack for the beat itself and the clocks' rounding.
                let missed = (silent - interval * 0.5) / interval;
                let state = if missed < 1.0 {
                    "alive"
                } else if missed < f64::from(DEAD_AFTER) {
                    "suspect"
                } else {
                    "dead"
                };
                NodeRow {
                    beat: NodeBeat {
                        name: row.get(0),
                        grpc_addr: row.get(1),
                        role: row.get(2),
                        incarnation: n(3),
                        cache_entries: n(4),
                        cache_bytes: n(5),
                        blob_count: n(6),
                        cpu_load: row.get(7),
                    },
                    uptime_secs: row.get::<_, f64>(8).max(0.0) as u64,
                    state,
                }
            })
            .collect())
    }
}
