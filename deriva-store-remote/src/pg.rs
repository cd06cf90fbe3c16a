//! The PostgreSQL index: a connection pool, the schema Deriva migrates itself, and the mapping
//! of PostgreSQL errors to Deriva's.
//!
//! Tables, in the schema named by `--index-schema` (default `deriva`):
//! - `schema_version(version, applied_at)`: one row per applied migration;
//! - `leaves(addr, size)`: every leaf whose bytes are durable in the object store;
//! - `recipes(addr, encoding, depth)`: the canonical encoding and DAG depth of every recipe;
//! - `edges(input, recipe)`: one row per input of a recipe, keyed by input (for dependents);
//! - `pins(addr, pinned_at)`: the pinned addresses (migration 2);
//! - `nodes(name, grpc_addr, role, incarnation, started_at, heartbeat_at, …)`: one row per
//!   node, refreshed by its heartbeat, deleted by the live nodes' heartbeats once it is older
//!   than `--node-forget-after` (migration 2);
//! - `counts(shard, recipes, leaves, leaf_bytes, pins)`: 16 rows whose sums are
//!   the rows of `recipes`, `leaves` (and the sum of their sizes) and `pins` (migration 3).
//!   Statement-level triggers on those tables keep them, in the transaction of each insert,
//!   delete or truncate, whoever writes (a node, `deriva-server migrate`, a script): each
//!   transaction adds to the shard its transaction id picks, so concurrent writers seldom
//!   wait for the same row, and one transaction never holds two of them. An insert of a row
//!   already there (`ON CONFLICT DO UPDATE`, a put's refresh) is not in the trigger's
//!   transition table, so it counts nothing. An `UPDATE` of a leaf's `size` is not counted:
//!   Deriva never changes one. Nodes read the counts from these rows, never by scanning.
//! - `compute_leases(recipe, node, token, traceparent, started_at, expires_at)`: one row per
//!   recipe being computed by a node with the output tier, so that the others wait for its
//!   output instead of computing it too; deleted when the compute ends, taken over once
//!   `expires_at` (renewed by the holder) has passed (migration 5, see `leases.rs`).
//! - `outputs(recipe, size, hash, written_at, record, audit_match, audit_mismatch,
//!   audit_error, stored)`: one row per computed output the store knows of (migration 6, see
//!   `outputs.rs`). A row with `stored` names an object of the output tier (`outputs/<hex>`),
//!   written after the object and deleted before it, so that whether an output is stored is
//!   asked here, never of the object store. `record` is the output's materialization record
//!   (`SignedRecord` envelope) and the three `audit_*` its tallies (migration 7, see
//!   `records.rs`); a node without the output tier keeps its records in rows with `stored =
//!   false`, which garbage collection deletes with their recipe.
//!
//! Indexes beyond the primary keys: `edges_by_recipe` (a recipe's inputs, for deletes) and
//! `recipes_by_depth(depth, addr)` (migration 4): the keyset pages of the recipe listing, in
//! the order that puts every recipe after its inputs (`deriva-server migrate` copies page by
//! page). The leaf listing pages through the primary key of `leaves`.
//!
//! Garbage collection's mark adds temporary tables (`gc_live`, `gc_front`, `gc_dead_recipes`,
//! `gc_dead_leaves`) on a connection of its own, gone with it (see `gc.rs`).
//!
//! Deleting a recipe deletes its edges. `created_at` of a leaf or recipe is the time of its
//! last put (a put of what is stored refreshes it): garbage collection's clock.
//!
//! Every call is bounded: [`CONNECT_TIMEOUT`] to connect, [`POOL_WAIT`] for a free
//! connection, and [`STATEMENT_TIMEOUT_MS`] per statement on the server side. A database that
//! cannot be reached is [`DerivaError::Unavailable`], naming it.

use std::sync::Arc;
use std::time::Duration;

use crate::pgtls::{PgTls, Target};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use deriva_core::DerivaError;
use deriva_core::error::Result;
use tokio_postgres::error::SqlState;

use deriva_store::observe::{self, Backend, BackendMetrics, Call as Observed};

/// Time allowed to open one connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a call waits for a free pooled connection before it fails.
pub const POOL_WAIT: Duration = Duration::from_secs(5);
/// PostgreSQL's `statement_timeout` on every connection of the pool.
pub const STATEMENT_TIMEOUT_MS: u32 = 30_000;
/// The schema version this build knows; a database migrated by a newer build is refused.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The migrations, in order; migration `i` brings the schema to version `i + 1`. `{s}` is the
/// quoted schema name.
const MIGRATIONS: [&str; 7] = [
    r#"
CREATE TABLE {s}.leaves (
    addr bytea PRIMARY KEY CHECK (length(addr) = 32),
    size bigint NOT NULL CHECK (size >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.recipes (
    addr bytea PRIMARY KEY CHECK (length(addr) = 32),
    encoding bytea NOT NULL,
    depth integer NOT NULL CHECK (depth >= 1),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.edges (
    input bytea NOT NULL,
    recipe bytea NOT NULL REFERENCES {s}.recipes (addr) ON DELETE CASCADE,
    PRIMARY KEY (input, recipe)
);
CREATE INDEX edges_by_recipe ON {s}.edges (recipe);
"#,
    r#"
CREATE TABLE {s}.pins (
    addr bytea PRIMARY KEY CHECK (length(addr) = 32),
    pinned_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.nodes (
    name text PRIMARY KEY,
    grpc_addr text NOT NULL,
    role text NOT NULL,
    incarnation bigint NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    cache_entries bigint NOT NULL,
    cache_bytes bigint NOT NULL,
    blob_count bigint NOT NULL,
    cpu_load real NOT NULL
);
"#,
    // The counts, kept by triggers (see the module docs). The tables are locked against
    // writers (SHARE) while the existing rows are counted, so no write falls between the
    // count and the triggers; that count may outlast the pool's statement timeout on a large
    // index, so this transaction has none. A transition table of `INSERT … ON CONFLICT DO UPDATE` holds the
    // rows inserted only; one of a statement that changed nothing is empty, and then no shard
    // row is touched.
    r#"
SET LOCAL statement_timeout = 0;
LOCK TABLE {s}.leaves, {s}.recipes, {s}.pins IN SHARE MODE;
CREATE TABLE {s}.counts (
    shard integer PRIMARY KEY CHECK (shard >= 0 AND shard < 16),
    recipes bigint NOT NULL DEFAULT 0,
    leaves bigint NOT NULL DEFAULT 0,
    leaf_bytes bigint NOT NULL DEFAULT 0,
    pins bigint NOT NULL DEFAULT 0
);
INSERT INTO {s}.counts (shard) SELECT generate_series(0, 15);
UPDATE {s}.counts SET
    recipes = (SELECT count(*) FROM {s}.recipes),
    leaves = (SELECT count(*) FROM {s}.leaves),
    leaf_bytes = (SELECT coalesce(sum(size), 0) FROM {s}.leaves),
    pins = (SELECT count(*) FROM {s}.pins)
WHERE shard = 0;

CREATE FUNCTION {s}.count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    bytes bigint := 0;
    sign bigint := CASE TG_OP WHEN 'DELETE' THEN -1 ELSE 1 END;
    pick integer := (pg_current_xact_id()::text::bigint % 16)::integer;
BEGIN
    IF TG_TABLE_NAME = 'leaves' THEN
        SELECT count(*), coalesce(sum(size), 0) INTO n, bytes FROM changed;
    ELSE
        SELECT count(*) INTO n FROM changed;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'leaves' THEN
        UPDATE {s}.counts
        SET leaves = leaves + sign * n, leaf_bytes = leaf_bytes + sign * bytes
        WHERE shard = pick;
    ELSIF TG_TABLE_NAME = 'recipes' THEN
        UPDATE {s}.counts SET recipes = recipes + sign * n WHERE shard = pick;
    ELSE
        UPDATE {s}.counts SET pins = pins + sign * n WHERE shard = pick;
    END IF;
    RETURN NULL;
END
$$;
CREATE FUNCTION {s}.count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'leaves' THEN
        UPDATE {s}.counts SET leaves = 0, leaf_bytes = 0;
    ELSIF TG_TABLE_NAME = 'recipes' THEN
        UPDATE {s}.counts SET recipes = 0;
    ELSIF TG_TABLE_NAME = 'pins' THEN
        UPDATE {s}.counts SET pins = 0;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER count_inserts AFTER INSERT ON {s}.leaves
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_deletes AFTER DELETE ON {s}.leaves
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_truncates AFTER TRUNCATE ON {s}.leaves
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_truncated();
CREATE TRIGGER count_inserts AFTER INSERT ON {s}.recipes
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_deletes AFTER DELETE ON {s}.recipes
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_truncates AFTER TRUNCATE ON {s}.recipes
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_truncated();
CREATE TRIGGER count_inserts AFTER INSERT ON {s}.pins
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_deletes AFTER DELETE ON {s}.pins
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_changes();
CREATE TRIGGER count_truncates AFTER TRUNCATE ON {s}.pins
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_truncated();
"#,
    r#"
CREATE INDEX IF NOT EXISTS recipes_by_depth ON {s}.recipes (depth, addr);
"#,
    r#"
CREATE TABLE {s}.compute_leases (
    recipe bytea PRIMARY KEY CHECK (length(recipe) = 32),
    node text NOT NULL,
    token bigint NOT NULL,
    traceparent text,
    started_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
"#,
    r#"
CREATE TABLE {s}.outputs (
    recipe bytea PRIMARY KEY CHECK (length(recipe) = 32),
    size bigint NOT NULL CHECK (size >= 0),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    written_at timestamptz NOT NULL DEFAULT now()
);
"#,
    // Columns with constant defaults: no rewrite of the table. Every row there so far names an
    // object of the output tier.
    r#"
ALTER TABLE {s}.outputs
    ADD COLUMN record bytea,
    ADD COLUMN audit_match bigint NOT NULL DEFAULT 0,
    ADD COLUMN audit_mismatch bigint NOT NULL DEFAULT 0,
    ADD COLUMN audit_error bigint NOT NULL DEFAULT 0,
    ADD COLUMN stored boolean NOT NULL DEFAULT true;
"#,
];

/// A pool of connections to the index database, with its schema migrated.
#[derive(Debug)]
pub(crate) struct Pg {
    pool: Pool,
    /// The connection settings, for connections outside the pool (the LISTEN connection).
    config: tokio_postgres::Config,
    /// Their TLS connector (`sslmode`; see [`crate::pgtls`]).
    tls: PgTls,
    /// The quoted schema name, for queries.
    schema: String,
    /// `the index database postgres://host:port/db`, for errors.
    name: String,
    metrics: Arc<BackendMetrics>,
    /// The connection that holds the sweep lock while garbage collection deletes (see
    /// [`Pg::hold_sweep`]): the sweep's statements run on it, so writers waiting for the lock
    /// on pooled connections can never starve the sweep of one.
    sweep: parking_lot::Mutex<Option<Conn>>,
}

/// What one index call is, for its span, its metrics and its errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    /// The `op` label of `deriva_backend_*`.
    pub op: &'static str,
    /// `db.operation.name`: `SELECT`, `INSERT`, `DELETE`.
    pub operation: &'static str,
    /// `db.collection.name`: the main table.
    pub table: &'static str,
    /// What was being done, for error messages.
    pub context: &'static str,
}

/// A pooled connection.
pub(crate) type Conn = deadpool_postgres::Object;

/// The sweep's connection, lent to one statement. Given back, it returns to its slot; dropped
/// otherwise (the statement's future was dropped), it is closed, which lets go of the lock.
struct Lent<'a> {
    conn: Option<Conn>,
    slot: &'a parking_lot::Mutex<Option<Conn>>,
}

impl Lent<'_> {
    fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            *self.slot.lock() = Some(conn);
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}

/// Checks a schema name: lower-case letters, digits and `_`, not starting with a digit.
fn check_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit()
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(DerivaError::InvalidInput(format!(
            "--index-schema {schema:?}: use lower-case letters, digits and _ (at most 63), \
             not starting with a digit or pg_ (PostgreSQL reserves those)"
        )))
    }
}

/// A PostgreSQL error in one line: the server's message, or the client's with its cause
/// (`error connecting to server: Connection refused (os error 111)`).
pub(crate) fn describe_error(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.message().to_owned();
    }
    crate::with_causes(err)
}

impl Pg {
    /// Connects to the database at `url` (a libpq URL or key=value string), and migrates
    /// `schema` to [`SCHEMA_VERSION`].
    pub(crate) async fn open(
        url: &str,
        schema: &str,
        pool_size: usize,
        metrics: Arc<BackendMetrics>,
        create: bool,
    ) -> Result<Self> {
        check_schema(schema)?;
        let Target { mut config, tls } = crate::pgtls::parse(url)
            .map_err(|e| DerivaError::InvalidInput(format!("--index: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("deriva-server");
        }
        config.options(format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        config.keepalives(true);
        let name = format!(
            "the index database {}",
            deriva_util::redact::redact_url_without_query(url)
        );
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DerivaError::InvalidInput(format!("--index: {e}")))?;
        let pg = Self {
            pool,
            config,
            tls,
            schema: format!("\"{schema}\""),
            name,
            metrics,
            sweep: parking_lot::Mutex::new(None),
        };
        if !create {
            pg.require_schema().await?;
        }
        pg.migrate().await?;
        Ok(pg)
    }

    /// Fails, naming it, if the schema does not exist (for a store that is only read).
    async fn require_schema(&self) -> Result<()> {
        const CALL: Call = Call {
            op: "find_schema",
            operation: "SELECT",
            table: "information_schema.schemata",
            context: "looking up the index schema",
        };
        let name = self.schema_name().to_owned();
        let found = self
            .query_opt(
                CALL,
                "SELECT 1 FROM information_schema.schemata WHERE schema_name = $1",
                &[&name],
            )
            .await?;
        match found {
            Some(_) => Ok(()),
            None => Err(DerivaError::InvalidInput(format!(
                "{} has no schema {name}: there is no Deriva index to read (check --index-schema)",
                self.name
            ))),
        }
    }

    /// The connection settings.
    pub(crate) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS connector for connections outside the pool.
    pub(crate) fn tls(&self) -> PgTls {
        self.tls.clone()
    }

    /// The schema name, unquoted.
    pub(crate) fn schema_name(&self) -> &str {
        self.schema.trim_matches('"')
    }

    /// Names the database in messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `sql` with `{s}` replaced by the quoted schema name.
    pub(crate) fn sql(&self, sql: &str) -> String {
        sql.replace("{s}", &self.schema)
    }

    /// Turns a PostgreSQL error into Deriva's: a database that cannot be reached, is shutting
    /// down or has no free connection is [`DerivaError::Unavailable`]; anything else (a
    /// constraint, a bad statement) is [`DerivaError::Database`].
    pub(crate) fn error(&self, context: &str, err: tokio_postgres::Error) -> DerivaError {
        let unavailable = match err.code() {
            None => true,
            Some(code) => {
                *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || *code == SqlState::QUERY_CANCELED
                    || code.code().starts_with("08")
            }
        } || err.is_closed();
        let message = describe_error(&err);
        if unavailable {
            DerivaError::Unavailable {
                backend: self.name.clone(),
                message: format!("{context}: {message}"),
            }
        } else {
            DerivaError::database(context, message)
        }
    }

    /// A connection from the pool.
    pub(crate) async fn conn(&self) -> Result<Conn> {
        self.pool.get().await.map_err(|e| {
            let message = match e {
                deadpool_postgres::PoolError::Backend(e) => describe_error(&e),
                deadpool_postgres::PoolError::Timeout(_) => {
                    "timed out waiting for a connection".to_owned()
                }
                other => other.to_string(),
            };
            DerivaError::Unavailable {
                backend: self.name.clone(),
                message,
            }
        })
    }

    /// Runs one index call through the store's instrumentation (`deriva_store::observe`): a
    /// client span with its metrics.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        operation: &'static str,
        table: &'static str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let observed = Observed::Database {
            backend: Backend::Postgres,
            op,
            operation,
            table,
        };
        self.metrics
            .call(observed, observe::Target::None, call)
            .await
    }

    /// Runs one statement (prepared once per connection) on a pooled connection, inside a
    /// client span with its metrics: the rows it returns. `sql` names tables as `{s}.table`.
    pub(crate) async fn query(
        &self,
        call: Call,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.call(call.op, call.operation, call.table, async {
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&self.sql(sql))
                .await
                .map_err(|e| self.error(call.context, e))?;
            conn.query(&stmt, params)
                .await
                .map_err(|e| self.error(call.context, e))
        })
        .await
    }

    /// Takes [`Pg::sweep_key`] exclusively on a connection of its own and keeps that
    /// connection for the sweep's statements ([`Pg::query_in_sweep`]) until
    /// [`Pg::release_sweep`].
    pub(crate) async fn hold_sweep(&self) -> Result<()> {
        const CTX: &str = "holding off writers for garbage collection";
        self.call("lock_sweep", "SELECT", "pins", async {
            let conn = self.conn().await?;
            conn.execute("SELECT pg_advisory_lock($1)", &[&self.sweep_key()])
                .await
                .map_err(|e| self.error(CTX, e))?;
            if let Some(stale) = self.sweep.lock().replace(conn) {
                // Never expected (one sweep at a time per store); closing lets go of its lock.
                drop(deadpool_postgres::Object::take(stale));
            }
            Ok(())
        })
        .await
    }

    /// Lets go of the sweep lock on a task of its own; a connection that cannot let go is
    /// closed, which lets go too.
    pub(crate) fn release_sweep(&self) {
        let Some(conn) = self.sweep.lock().take() else {
            return;
        };
        let key = self.sweep_key();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if conn
                        .execute("SELECT pg_advisory_unlock($1)", &[&key])
                        .await
                        .is_err()
                    {
                        drop(deadpool_postgres::Object::take(conn));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(conn)),
        }
    }

    /// [`Pg::query`] on the connection that holds the sweep lock ([`DerivaError::Unavailable`]
    /// if none does: the sweep's deletes are only safe under it). If the call is dropped
    /// midway, that connection is closed rather than returned with the lock held.
    pub(crate) async fn query_in_sweep(
        &self,
        call: Call,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.call(call.op, call.operation, call.table, async move {
            let Some(conn) = self.sweep.lock().take() else {
                // Only a sweep holding the lock deletes: never on a pooled connection.
                return Err(DerivaError::Unavailable {
                    backend: self.name.clone(),
                    message: format!(
                        "{}: garbage collection does not hold its lock (lost with its connection)",
                        call.context
                    ),
                });
            };
            let lent = Lent {
                conn: Some(conn),
                slot: &self.sweep,
            };
            let rows = match lent.conn.as_ref() {
                Some(conn) => match conn.prepare_cached(&self.sql(sql)).await {
                    Ok(stmt) => conn.query(&stmt, params).await,
                    Err(e) => Err(e),
                },
                None => unreachable!("lent until given back"),
            };
            // Given back whatever the statement did; only a dropped call closes it.
            lent.give_back();
            rows.map_err(|e| self.error(call.context, e))
        })
        .await
    }

    /// [`Pg::query`] for a statement that returns at most one row.
    pub(crate) async fn query_opt(
        &self,
        call: Call,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>> {
        Ok(self.query(call, sql, params).await?.into_iter().next())
    }

    /// An advisory lock key of this schema: `tag` in the high bits, the schema name's hash
    /// below, so two schemas in one database never share a lock.
    fn lock_key(&self, tag: u32) -> i64 {
        (i64::from(tag) << 32)
            | i64::from(u32::from_le_bytes(
                blake3::hash(self.schema.as_bytes()).as_bytes()[..4]
                    .try_into()
                    .expect("4 bytes"),
            ))
    }

    /// The advisory lock that keeps garbage collection's deletes and the puts that add
    /// references apart: every such put holds it shared in its transaction
    /// (`pg_advisory_xact_lock_shared`), a sweep holds it exclusively on its own connection.
    pub(crate) fn sweep_key(&self) -> i64 {
        self.lock_key(0x4465_7267)
    }

    /// Brings the schema to [`SCHEMA_VERSION`], under an advisory lock so that nodes starting
    /// together migrate once.
    async fn migrate(&self) -> Result<()> {
        const CTX: &str = "migrating the index schema";
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(|e| self.error(CTX, e))?;
        let key = self.lock_key(0x4465_7269);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&key])
            .await
            .map_err(|e| self.error(CTX, e))?;
        tx.batch_execute(&self.sql(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        ))
        .await
        .map_err(|e| self.error(CTX, e))?;
        let row = tx
            .query_one(
                &self.sql("SELECT coalesce(max(version), 0) FROM {s}.schema_version"),
                &[],
            )
            .await
            .map_err(|e| self.error(CTX, e))?;
        let current: i32 = row.get(0);
        if current > SCHEMA_VERSION {
            return Err(DerivaError::InvalidInput(format!(
                "{} has index schema version {current} in {}, newer than this server's \
                 {SCHEMA_VERSION}: upgrade deriva-server",
                self.name, self.schema
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i as i32 + 1;
            tx.batch_execute(&self.sql(migration))
                .await
                .map_err(|e| self.error(CTX, e))?;
            tx.execute(
                &self.sql("INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                &[&version],
            )
            .await
            .map_err(|e| self.error(CTX, e))?;
            tracing::info!(schema = %self.schema, version, "index schema migrated");
        }
        tx.commit().await.map_err(|e| self.error(CTX, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["deriva", "d_1", "_x"] {
            check_schema(good).unwrap();
        }
        for bad in ["", "1x", "Deriva", "a-b", "a\"b", "pg_x", &"x".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_name_hides_the_password_where_tokio_postgres_finds_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Nothing listens on port 1; the name is in the error, the password is not.
        let url = "postgres://u:S3c/re?t#@127.0.0.1:1/idx?connect_timeout=1";
        let opened = runtime.block_on(Pg::open(
            url,
            "deriva",
            1,
            Arc::new(BackendMetrics::noop()),
            true,
        ));
        let Err(err) = opened else {
            panic!("nothing listens on port 1, yet the index opened");
        };
        let shown = err.to_string();
        assert!(
            shown.contains("the index database postgres://u:***@127.0.0.1:1/idx"),
            "{shown}"
        );
        assert!(!shown.contains("S3c"), "{shown}");
    }
}
