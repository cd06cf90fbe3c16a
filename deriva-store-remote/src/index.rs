//! [`PgIndex`]: the [`RecipeIndex`] in PostgreSQL. Each method is one round trip (one
//! statement, or one transaction for a batch of puts), inside an `index_db` client span.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError, Recipe};
use deriva_store::{BlobStore, RecipeIndex, StoreCounters, StoredRecipe, SweepLock};

use crate::pg::{Call, Pg};

/// Of the addresses in `$1`, the first, in order, that is neither a recipe nor a leaf: the
/// input check of a recipe put (inside its transaction) and of `first_missing_input`.
const FIRST_MISSING_INPUT: &str = "SELECT a FROM unnest($1::bytea[]) WITH ORDINALITY AS t (a, i)
     WHERE NOT EXISTS (SELECT 1 FROM {s}.recipes WHERE addr = a)
       AND NOT EXISTS (SELECT 1 FROM {s}.leaves WHERE addr = a)
     ORDER BY i LIMIT 1";

/// Recipes, their depths and the dependency edges in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgIndex {
    pg: Arc<Pg>,
    counters: Arc<StoreCounters>,
}

pub(crate) fn addr_of(bytes: &[u8], context: &str) -> Result<CAddr> {
    CAddr::from_slice(bytes).map_err(|e| DerivaError::decode(context, e))
}

fn rows_to_addrs(rows: &[tokio_postgres::Row], context: &str) -> Result<Vec<CAddr>> {
    rows.iter()
        .map(|row| addr_of(row.get::<_, &[u8]>(0), context))
        .collect()
}

/// Of `addrs`, the ones `sql` (`SELECT addr FROM … WHERE addr = ANY($1)`) does not find, in
/// the given order: one query for the whole batch.
pub(crate) async fn absent(
    pg: &Pg,
    call: Call,
    sql: &str,
    addrs: Vec<CAddr>,
) -> Result<Vec<CAddr>> {
    let keys: Vec<&[u8]> = addrs.iter().map(|a| a.as_bytes().as_slice()).collect();
    let rows = pg.query(call, sql, &[&keys]).await?;
    let found: HashSet<CAddr> = rows_to_addrs(&rows, call.context)?.into_iter().collect();
    Ok(addrs.into_iter().filter(|a| !found.contains(a)).collect())
}

impl PgIndex {
    pub(crate) fn new(pg: Arc<Pg>, counters: Arc<StoreCounters>) -> Self {
        Self { pg, counters }
    }
}

/// The sweep lock of one batch of deletes: let go when dropped.
struct SweepGuard(Arc<Pg>);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        self.0.release_sweep();
    }
}

impl PgIndex {
    /// Stores `batch` in one transaction that holds the sweep lock shared, after checking
    /// that `inputs` exist (recipes or leaves): garbage collection deletes either before the
    /// check (which then fails) or after the commit (and then sees the new references).
    async fn put_tx(&self, batch: Vec<(CAddr, Recipe)>, inputs: Vec<CAddr>) -> Result<u64> {
        const CTX: &str = "storing recipes";
        let pg = &self.pg;
        pg.call("put_recipes", "INSERT", "recipes", async {
            let mut conn = pg.conn().await?;
            let tx = conn.transaction().await.map_err(|e| pg.error(CTX, e))?;
            let lock = tx
                .prepare_cached("SELECT pg_advisory_xact_lock_shared($1)")
                .await
                .map_err(|e| pg.error(CTX, e))?;
            tx.execute(&lock, &[&pg.sweep_key()])
                .await
                .map_err(|e| pg.error(CTX, e))?;
            if !inputs.is_empty() {
                let check = tx
                    .prepare_cached(&pg.sql(FIRST_MISSING_INPUT))
                    .await
                    .map_err(|e| pg.error(CTX, e))?;
                let keys: Vec<&[u8]> = inputs.iter().map(|a| a.as_bytes().as_slice()).collect();
                if let Some(row) = tx
                    .query_opt(&check, &[&keys])
                    .await
                    .map_err(|e| pg.error(CTX, e))?
                {
                    // The client's error, not the backend's: the call itself succeeded.
                    return Ok(Err(DerivaError::MissingInput {
                        input: addr_of(row.get(0), CTX)?,
                    }));
                }
            }
            // Depths of the inputs that are stored recipes; the rest of the inputs are
            // earlier recipes of the batch or leaves (depth 0).
            let mut inputs: Vec<&[u8]> = Vec::new();
            let mut seen = HashSet::new();
            for (_, recipe) in &batch {
                for input in recipe.inputs() {
                    if seen.insert(*input) {
                        inputs.push(input.as_bytes());
                    }
                }
            }
            let depth_of = tx
                .prepare_cached(&pg.sql("SELECT addr, depth FROM {s}.recipes WHERE addr = ANY($1)"))
                .await
                .map_err(|e| pg.error(CTX, e))?;
            let mut depths: HashMap<CAddr, i32> = HashMap::new();
            for row in tx
                .query(&depth_of, &[&inputs])
                .await
                .map_err(|e| pg.error(CTX, e))?
            {
                depths.insert(addr_of(row.get(0), CTX)?, row.get(1));
            }
            let mut addrs: Vec<&[u8]> = Vec::with_capacity(batch.len());
            let mut encodings: Vec<Vec<u8>> = Vec::with_capacity(batch.len());
            let mut levels: Vec<i32> = Vec::with_capacity(batch.len());
            let mut placed = HashSet::new();
            for (addr, recipe) in &batch {
                let depth = 1 + recipe
                    .inputs()
                    .iter()
                    .map(|i| depths.get(i).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                depths.entry(*addr).or_insert(depth);
                if placed.insert(*addr) {
                    addrs.push(addr.as_bytes());
                    encodings.push(recipe.canonical_bytes());
                    levels.push(depths[addr]);
                }
            }
            let insert = tx
                .prepare_cached(&pg.sql(
                    "INSERT INTO {s}.recipes (addr, encoding, depth)
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::integer[])
                     ON CONFLICT (addr) DO UPDATE SET created_at = clock_timestamp()
                     RETURNING addr, (xmax = 0)",
                ))
                .await
                .map_err(|e| pg.error(CTX, e))?;
            // Every row comes back; the ones inserted (not refreshed) are new.
            let mut new: HashSet<CAddr> = HashSet::new();
            for row in tx
                .query(&insert, &[&addrs, &encodings, &levels])
                .await
                .map_err(|e| pg.error(CTX, e))?
            {
                if row.get::<_, bool>(1) {
                    new.insert(addr_of(row.get(0), CTX)?);
                }
            }
            let (mut edge_inputs, mut edge_recipes): (Vec<&[u8]>, Vec<&[u8]>) = (vec![], vec![]);
            for (addr, recipe) in batch.iter().filter(|(a, _)| new.contains(a)) {
                let mut own = HashSet::new();
                for input in recipe.inputs().iter().filter(|i| own.insert(**i)) {
                    edge_inputs.push(input.as_bytes());
                    edge_recipes.push(addr.as_bytes());
                }
            }
            if !edge_inputs.is_empty() {
                let edges = tx
                    .prepare_cached(&pg.sql(
                        "INSERT INTO {s}.edges (input, recipe)
                         SELECT * FROM unnest($1::bytea[], $2::bytea[])
                         ON CONFLICT DO NOTHING",
                    ))
                    .await
                    .map_err(|e| pg.error(CTX, e))?;
                tx.execute(&edges, &[&edge_inputs, &edge_recipes])
                    .await
                    .map_err(|e| pg.error(CTX, e))?;
            }
            tx.commit().await.map_err(|e| pg.error(CTX, e))?;
            let added = new.len() as u64;
            self.counters.add_recipes(added as i64);
            Ok(Ok(added))
        })
        .await?
    }
}

#[async_trait]
impl RecipeIndex for PgIndex {
    async fn put_batch(&self, batch: Vec<(CAddr, Recipe)>) -> Result<u64> {
        self.put_tx(batch, Vec::new()).await
    }

    async fn put_checked(
        &self,
        batch: Vec<(CAddr, Recipe)>,
        inputs: Vec<CAddr>,
        _blobs: &dyn BlobStore,
    ) -> Result<u64> {
        // The leaves table is this database's record of the blob store.
        self.put_tx(batch, inputs).await
    }

    async fn clock(&self) -> Result<SystemTime> {
        const CALL: Call = Call {
            op: "clock",
            operation: "SELECT",
            table: "recipes",
            context: "reading the database's clock",
        };
        let row = self
            .pg
            .query_opt(CALL, "SELECT clock_timestamp()", &[])
            .await?;
        Ok(row.map_or_else(SystemTime::now, |r| r.get(0)))
    }

    async fn mark(&self, cutoff: SystemTime) -> Result<deriva_store::gc::Mark> {
        crate::gc::mark(&self.pg, cutoff, self.counters.gc_progress()).await
    }

    async fn delete_if_unused(&self, addr: CAddr, cutoff: SystemTime) -> Result<bool> {
        const CALL: Call = Call {
            op: "collect_recipe",
            operation: "DELETE",
            table: "recipes",
            context: "collecting a recipe",
        };
        let key = addr.as_bytes().as_slice();
        let deleted = !self
            .pg
            .query_in_sweep(
                CALL,
                "WITH gone AS (
                     DELETE FROM {s}.recipes WHERE addr = $1 AND created_at < $2
                       AND NOT EXISTS (SELECT 1 FROM {s}.edges WHERE input = $1)
                       AND NOT EXISTS (SELECT 1 FROM {s}.pins WHERE addr = $1)
                     RETURNING addr
                 ), records AS (
                     DELETE FROM {s}.outputs o USING gone
                     WHERE o.recipe = gone.addr AND NOT o.stored
                 )
                 SELECT addr FROM gone",
                &[&key, &cutoff],
            )
            .await?
            .is_empty();
        if deleted {
            self.counters.add_recipes(-1);
        }
        Ok(deleted)
    }

    async fn is_referenced(&self, addr: CAddr) -> Result<bool> {
        const CALL: Call = Call {
            op: "find_references",
            operation: "SELECT",
            table: "edges",
            context: "looking up references",
        };
        let key = addr.as_bytes().as_slice();
        let rows = self
            .pg
            .query_in_sweep(
                CALL,
                "SELECT EXISTS (SELECT 1 FROM {s}.edges WHERE input = $1)
                     OR EXISTS (SELECT 1 FROM {s}.pins WHERE addr = $1)",
                &[&key],
            )
            .await?;
        Ok(rows.first().is_some_and(|r| r.get(0)))
    }

    async fn delete_unused_many(
        &self,
        addrs: Vec<CAddr>,
        cutoff: SystemTime,
    ) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "collect_recipes",
            operation: "DELETE",
            table: "recipes",
            context: "collecting recipes",
        };
        let mut left: Vec<Vec<u8>> = addrs.iter().map(|a| a.as_bytes().to_vec()).collect();
        let mut deleted = Vec::new();
        // One statement sees the edges of the recipes it deletes: a recipe used only by
        // another of the batch goes in the next round.
        while !left.is_empty() {
            let rows = self
                .pg
                .query_in_sweep(
                    CALL,
                    "WITH gone AS (
                         DELETE FROM {s}.recipes r WHERE r.addr = ANY($1) AND r.created_at < $2
                           AND NOT EXISTS (SELECT 1 FROM {s}.edges WHERE input = r.addr)
                           AND NOT EXISTS (SELECT 1 FROM {s}.pins p WHERE p.addr = r.addr)
                         RETURNING r.addr
                     ), records AS (
                         DELETE FROM {s}.outputs o USING gone
                         WHERE o.recipe = gone.addr AND NOT o.stored
                     )
                     SELECT addr FROM gone",
                    &[&left, &cutoff],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            self.counters.add_recipes(-(rows.len() as i64));
            let gone = rows_to_addrs(&rows, CALL.context)?;
            left.retain(|a| !gone.iter().any(|g| g.as_bytes()[..] == a[..]));
            deleted.extend(gone);
        }
        // In the order asked.
        Ok(addrs.into_iter().filter(|a| deleted.contains(a)).collect())
    }

    async fn unreferenced(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "find_references",
            operation: "SELECT",
            table: "edges",
            context: "looking up references",
        };
        let keys: Vec<&[u8]> = addrs.iter().map(|a| a.as_bytes().as_slice()).collect();
        let rows = self
            .pg
            .query_in_sweep(
                CALL,
                "SELECT a FROM unnest($1::bytea[]) AS t (a)
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.edges WHERE input = a)
                   AND NOT EXISTS (SELECT 1 FROM {s}.pins WHERE addr = a)",
                &[&keys],
            )
            .await?;
        let free = rows_to_addrs(&rows, CALL.context)?;
        Ok(addrs.into_iter().filter(|a| free.contains(a)).collect())
    }

    async fn lock_for_sweep(&self) -> Result<SweepLock> {
        self.pg.hold_sweep().await?;
        Ok(SweepLock::new(SweepGuard(self.pg.clone())))
    }

    async fn get(&self, addr: CAddr) -> Result<Option<StoredRecipe>> {
        const CALL: Call = Call {
            op: "get_recipe",
            operation: "SELECT",
            table: "recipes",
            context: "reading a recipe",
        };
        let key = addr.as_bytes().as_slice();
        let Some(row) = self
            .pg
            .query_opt(
                CALL,
                "SELECT encoding, depth FROM {s}.recipes WHERE addr = $1",
                &[&key],
            )
            .await?
        else {
            return Ok(None);
        };
        let encoding: &[u8] = row.get(0);
        let depth: i32 = row.get(1);
        let recipe =
            Recipe::from_canonical_bytes(encoding).map_err(|e| DerivaError::Corrupted {
                addr,
                detail: format!("the stored recipe does not decode: {e}"),
            })?;
        if recipe.addr() != addr {
            return Err(DerivaError::Corrupted {
                addr,
                detail: format!("the stored recipe hashes to {}", recipe.addr()),
            });
        }
        let depth = u32::try_from(depth).map_err(|_| DerivaError::Corrupted {
            addr,
            detail: format!("the stored depth {depth} is negative"),
        })?;
        Ok(Some(StoredRecipe { recipe, depth }))
    }

    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "find_recipes",
            operation: "SELECT",
            table: "recipes",
            context: "looking up recipes",
        };
        let sql = "SELECT addr FROM {s}.recipes WHERE addr = ANY($1)";
        absent(&self.pg, CALL, sql, addrs).await
    }

    async fn first_missing_input(
        &self,
        addrs: Vec<CAddr>,
        _blobs: &dyn BlobStore,
    ) -> Result<Option<CAddr>> {
        // The leaves table is this database's record of the blob store (see RemoteBlobStore),
        // so one query answers for both.
        const CALL: Call = Call {
            op: "check_inputs",
            operation: "SELECT",
            table: "recipes",
            context: "checking the inputs of recipes",
        };
        let keys: Vec<&[u8]> = addrs.iter().map(|a| a.as_bytes().as_slice()).collect();
        self.pg
            .query_opt(CALL, FIRST_MISSING_INPUT, &[&keys])
            .await?
            .map(|row| addr_of(row.get(0), CALL.context))
            .transpose()
    }

    async fn dependents(&self, addr: CAddr) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "dependents",
            operation: "SELECT",
            table: "edges",
            context: "reading dependents",
        };
        let key = addr.as_bytes().as_slice();
        let rows = self
            .pg
            .query(
                CALL,
                "SELECT recipe FROM {s}.edges WHERE input = $1",
                &[&key],
            )
            .await?;
        rows_to_addrs(&rows, CALL.context)
    }

    async fn transitive_dependents(&self, addr: CAddr) -> Result<Vec<(CAddr, u32)>> {
        const CALL: Call = Call {
            op: "transitive_dependents",
            operation: "SELECT",
            table: "edges",
            context: "reading transitive dependents",
        };
        // Each recipe once, at its shortest distance from `addr`: breadth-first order.
        let key = addr.as_bytes().as_slice();
        let rows = self
            .pg
            .query(
                CALL,
                "WITH RECURSIVE walk (addr, dist) AS (
                     SELECT recipe, 1 FROM {s}.edges WHERE input = $1
                     UNION
                     SELECT e.recipe, w.dist + 1
                     FROM {s}.edges e JOIN walk w ON e.input = w.addr
                 )
                 SELECT addr, min(dist) FROM walk GROUP BY addr ORDER BY min(dist), addr",
                &[&key],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let dist = u32::try_from(row.get::<_, i32>(1)).unwrap_or(u32::MAX);
                addr_of(row.get(0), CALL.context).map(|a| (a, dist))
            })
            .collect()
    }

    async fn delete(&self, addr: CAddr) -> Result<bool> {
        const CALL: Call = Call {
            op: "delete_recipe",
            operation: "DELETE",
            table: "recipes",
            context: "deleting a recipe",
        };
        let key = addr.as_bytes().as_slice();
        let deleted = self
            .pg
            .query_opt(
                CALL,
                "WITH gone AS (DELETE FROM {s}.recipes WHERE addr = $1 RETURNING addr),
                 records AS (
                     DELETE FROM {s}.outputs o USING gone
                     WHERE o.recipe = gone.addr AND NOT o.stored
                 )
                 SELECT addr FROM gone",
                &[&key],
            )
            .await?
            .is_some();
        if deleted {
            self.counters.add_recipes(-1);
        }
        Ok(deleted)
    }

    async fn list_page(
        &self,
        after: Option<(u32, CAddr)>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u32)>> {
        const CALL: Call = Call {
            op: "list_recipes",
            operation: "SELECT",
            table: "recipes",
            context: "listing recipes",
        };
        // Walks the index `recipes_by_depth` (migration 4). Depths start at 1, so (0, '') sorts
        // before every row.
        let (depth, addr) = after.map_or((0, Vec::new()), |(d, a)| {
            (i32::try_from(d).unwrap_or(i32::MAX), a.as_bytes().to_vec())
        });
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .pg
            .query(
                CALL,
                "SELECT addr, depth FROM {s}.recipes WHERE (depth, addr) > ($1, $2)
                 ORDER BY depth, addr LIMIT $3",
                &[&depth, &addr, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let addr = addr_of(row.get(0), CALL.context)?;
                let depth: i32 = row.get(1);
                let depth = u32::try_from(depth).map_err(|_| DerivaError::Corrupted {
                    addr,
                    detail: format!("the stored depth {depth} is negative"),
                })?;
                Ok((addr, depth))
            })
            .collect()
    }

    async fn pin(&self, addr: CAddr, _blobs: &dyn BlobStore) -> Result<bool> {
        const CTX: &str = "pinning an address";
        let pg = &self.pg;
        let new = pg
            .call("pin", "INSERT", "pins", async {
                let mut conn = pg.conn().await?;
                let tx = conn.transaction().await.map_err(|e| pg.error(CTX, e))?;
                // Shared with puts, so a sweep deletes either before the check or not at all.
                tx.execute(
                    "SELECT pg_advisory_xact_lock_shared($1)",
                    &[&pg.sweep_key()],
                )
                .await
                .map_err(|e| pg.error(CTX, e))?;
                let key = addr.as_bytes().as_slice();
                let row = tx
                    .query_one(
                        &pg.sql(
                            "SELECT EXISTS (SELECT 1 FROM {s}.recipes WHERE addr = $1)
                                 OR EXISTS (SELECT 1 FROM {s}.leaves WHERE addr = $1)",
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|e| pg.error(CTX, e))?;
                if !row.get::<_, bool>(0) {
                    return Ok(Err(DerivaError::NotFound { addr }));
                }
                let new = tx
                    .query_opt(
                        &pg.sql(
                            "INSERT INTO {s}.pins (addr) VALUES ($1) ON CONFLICT (addr) DO NOTHING
                             RETURNING addr",
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|e| pg.error(CTX, e))?
                    .is_some();
                tx.commit().await.map_err(|e| pg.error(CTX, e))?;
                Ok(Ok(new))
            })
            .await??;
        if new {
            self.counters.add_pins(1);
        }
        Ok(new)
    }

    async fn unpin(&self, addr: CAddr) -> Result<bool> {
        const CALL: Call = Call {
            op: "unpin",
            operation: "DELETE",
            table: "pins",
            context: "unpinning an address",
        };
        let key = addr.as_bytes().as_slice();
        let was = self
            .pg
            .query_opt(
                CALL,
                "DELETE FROM {s}.pins WHERE addr = $1 RETURNING addr",
                &[&key],
            )
            .await?
            .is_some();
        if was {
            self.counters.add_pins(-1);
        }
        Ok(was)
    }

    async fn pins(&self) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "list_pins",
            operation: "SELECT",
            table: "pins",
            context: "listing pins",
        };
        let rows = self
            .pg
            .query(CALL, "SELECT addr FROM {s}.pins", &[])
            .await?;
        rows.iter()
            .map(|row| addr_of(row.get(0), CALL.context))
            .collect()
    }

    async fn count_by_scan(&self) -> Result<u64> {
        const CALL: Call = Call {
            op: "count_recipes",
            operation: "SELECT",
            table: "recipes",
            context: "counting recipes",
        };
        let row = self
            .pg
            .query_opt(CALL, "SELECT count(*) FROM {s}.recipes", &[])
            .await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    async fn check(&self) -> Result<()> {
        const CALL: Call = Call {
            op: "check",
            operation: "SELECT",
            table: "recipes",
            context: "checking the index",
        };
        self.pg.query(CALL, "SELECT 1", &[]).await.map(drop)
    }
}
