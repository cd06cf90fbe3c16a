//! Garbage collection's mark in PostgreSQL: set statements into temporary tables of one
//! connection, so the node holds a page, never the index.
//!
//! 1. `gc_live` gets the roots (pins, recipes put at or after the cutoff), then, level by
//!    level, the inputs of what the last level added (`edges`, by `edges_by_recipe`), until a
//!    level adds nothing: one statement per level of the DAG.
//! 2. `gc_dead_recipes` (depth, addr) gets the recipes not in `gc_live`. Their rows are read
//!    a page at a time, deepest first, and decoded: a recipe whose row does not decode is
//!    kept, with everything it reaches (a new walk from it), and reported.
//! 3. `gc_dead_leaves` (at, addr, size) gets the leaves put before the cutoff and not in
//!    `gc_live`.
//!
//! The sweep pages through the two tables by keyset. The connection is taken out of the
//! pool, has no statement timeout (a mark of a large index takes longer than one request may),
//! and is closed when the candidates are dropped, which drops the tables.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use deriva_core::Recipe;
use deriva_core::error::Result;
use deriva_store::AddrKind;
use deriva_store::gc::{Candidates, GcProgress, MarkTally, Removed};
use tokio_postgres::types::ToSql;

use crate::index::addr_of;
use crate::pg::Pg;

/// Rows of `gc_dead_recipes` decoded per statement while looking for damaged recipes.
const CHECK_PAGE: i64 = 1000;

/// The mark's own connection, outside the pool.
type Client = deadpool_postgres::ClientWrapper;

/// Runs one statement of the mark on its connection, as an observed index call.
async fn run(
    pg: &Pg,
    client: &Client,
    op: &'static str,
    table: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    const CTX: &str = "marking for garbage collection";
    pg.call(op, "INSERT", table, async {
        client
            .execute(&pg.sql(sql), params)
            .await
            .map_err(|e| pg.error(CTX, e))
    })
    .await
}

/// Runs one query of the mark or the sweep on its connection, as an observed index call.
async fn rows(
    pg: &Pg,
    client: &Client,
    op: &'static str,
    table: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    const CTX: &str = "reading garbage collection's candidates";
    pg.call(op, "SELECT", table, async {
        // Prepared once per collection: the sweep asks the same questions page after page.
        let statement = client
            .prepare_cached(&pg.sql(sql))
            .await
            .map_err(|e| pg.error(CTX, e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| pg.error(CTX, e))
    })
    .await
}

/// Adds to `gc_live` everything reachable from the rows of `gc_front`, level by level;
/// returns how many it added.
async fn walk(pg: &Pg, client: &Client, progress: &GcProgress) -> Result<u64> {
    let mut added = 0;
    loop {
        // One level: the front is replaced by the inputs of its recipes that were not live.
        let n = run(
            pg,
            client,
            "gc_walk",
            "edges",
            "WITH front AS (DELETE FROM pg_temp.gc_front RETURNING addr),
                  added AS (INSERT INTO pg_temp.gc_live
                                SELECT DISTINCT e.input FROM front f
                                JOIN {s}.edges e ON e.recipe = f.addr
                            ON CONFLICT DO NOTHING RETURNING addr)
             INSERT INTO pg_temp.gc_front SELECT addr FROM added",
            &[],
        )
        .await?;
        if n == 0 {
            return Ok(added);
        }
        added += n;
        progress.advance(n);
    }
}

/// The mark of the index in `pg` at `cutoff` (see the module docs).
pub(crate) async fn mark(
    pg: &Arc<Pg>,
    cutoff: SystemTime,
    progress: &GcProgress,
) -> Result<deriva_store::gc::Mark> {
    let client = deadpool_postgres::Object::take(pg.conn().await?);
    run(
        pg,
        &client,
        "gc_start",
        "gc_live",
        "SET statement_timeout = 0",
        &[],
    )
    .await?;
    for create in [
        "CREATE TEMP TABLE gc_live (addr bytea PRIMARY KEY)",
        "CREATE TEMP TABLE gc_front (addr bytea NOT NULL)",
    ] {
        run(pg, &client, "gc_start", "gc_live", create, &[]).await?;
    }
    let pinned = run(
        pg,
        &client,
        "gc_roots",
        "pins",
        "INSERT INTO pg_temp.gc_live SELECT addr FROM {s}.pins ON CONFLICT DO NOTHING",
        &[],
    )
    .await?;
    let recent = run(
        pg,
        &client,
        "gc_roots",
        "recipes",
        "INSERT INTO pg_temp.gc_live SELECT addr FROM {s}.recipes WHERE created_at >= $1
         ON CONFLICT DO NOTHING",
        &[&cutoff],
    )
    .await?;
    progress.advance(pinned + recent);
    run(
        pg,
        &client,
        "gc_roots",
        "gc_live",
        "INSERT INTO pg_temp.gc_front SELECT addr FROM pg_temp.gc_live",
        &[],
    )
    .await?;
    let mut live = pinned + recent + walk(pg, &client, progress).await?;

    // The recipes that are not live, then the damaged ones among them kept, with what they
    // reach.
    let mut dead_recipes = run(
        pg,
        &client,
        "gc_dead",
        "recipes",
        "CREATE TEMP TABLE gc_dead_recipes AS
             SELECT r.depth, r.addr FROM {s}.recipes r
             WHERE NOT EXISTS (SELECT 1 FROM pg_temp.gc_live l WHERE l.addr = r.addr)",
        &[],
    )
    .await?;
    run(
        pg,
        &client,
        "gc_dead",
        "gc_dead_recipes",
        "CREATE INDEX ON pg_temp.gc_dead_recipes (depth, addr)",
        &[],
    )
    .await?;
    let mut corrupted = 0u64;
    // Deepest first, from above every row.
    let mut after: (i32, Vec<u8>) = (i32::MAX, Vec::new());
    loop {
        let page = rows(
            pg,
            &client,
            "gc_check",
            "recipes",
            "SELECT d.depth, d.addr, r.encoding FROM pg_temp.gc_dead_recipes d
             JOIN {s}.recipes r ON r.addr = d.addr
             WHERE (d.depth, d.addr) < ($1, $2)
             ORDER BY d.depth DESC, d.addr DESC LIMIT $3",
            &[&after.0, &after.1, &CHECK_PAGE],
        )
        .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = (last.get(0), last.get::<_, &[u8]>(1).to_vec());
        let mut damaged: Vec<&[u8]> = Vec::new();
        for row in &page {
            let key: &[u8] = row.get(1);
            let addr = addr_of(key, "checking a recipe's row")?;
            let decodes = Recipe::from_canonical_bytes(row.get(2)).is_ok_and(|r| r.addr() == addr);
            if !decodes {
                tracing::error!(%addr, "a stored recipe does not decode; garbage collection keeps it and what it reaches");
                damaged.push(key);
            }
        }
        progress.advance(page.len() as u64);
        if damaged.is_empty() {
            continue;
        }
        corrupted += damaged.len() as u64;
        let kept = run(
            pg,
            &client,
            "gc_roots",
            "gc_live",
            "WITH kept AS (INSERT INTO pg_temp.gc_live SELECT unnest($1::bytea[])
                           ON CONFLICT DO NOTHING RETURNING addr)
             INSERT INTO pg_temp.gc_front SELECT addr FROM kept",
            &[&damaged],
        )
        .await?;
        live += kept + walk(pg, &client, progress).await?;
        // What they reach is shallower: not read yet, and now never a candidate.
        dead_recipes -= run(
            pg,
            &client,
            "gc_dead",
            "gc_dead_recipes",
            "DELETE FROM pg_temp.gc_dead_recipes d USING pg_temp.gc_live l WHERE d.addr = l.addr",
            &[],
        )
        .await?;
    }

    let dead_leaves = run(
        pg,
        &client,
        "gc_dead",
        "leaves",
        "CREATE TEMP TABLE gc_dead_leaves AS
             SELECT l.created_at AS at, l.addr, l.size FROM {s}.leaves l
             WHERE l.created_at < $1
               AND NOT EXISTS (SELECT 1 FROM pg_temp.gc_live g WHERE g.addr = l.addr)",
        &[&cutoff],
    )
    .await?;
    run(
        pg,
        &client,
        "gc_dead",
        "gc_dead_leaves",
        "CREATE INDEX ON pg_temp.gc_dead_leaves (at, addr)",
        &[],
    )
    .await?;
    progress.advance(dead_leaves);
    let totals = rows(
        pg,
        &client,
        "gc_totals",
        "counts",
        "SELECT coalesce(sum(recipes), 0)::bigint, coalesce(sum(leaves), 0)::bigint
         FROM {s}.counts",
        &[],
    )
    .await?;
    let (recipes, leaves) = totals.first().map_or((0, 0), |r| {
        (
            r.get::<_, i64>(0).max(0) as u64,
            r.get::<_, i64>(1).max(0) as u64,
        )
    });
    let tally = MarkTally {
        leaves,
        recipes,
        live,
        pinned,
        corrupted,
        candidates: dead_recipes + dead_leaves,
    };
    let candidates = PgCandidates {
        pg: pg.clone(),
        client,
        recipe_after: (i32::MAX, Vec::new()),
        leaf_after: (std::time::UNIX_EPOCH, Vec::new()),
        recipes_done: false,
    };
    Ok((tally, Box::new(candidates)))
}

/// The candidates in the mark's temporary tables.
struct PgCandidates {
    pg: Arc<Pg>,
    client: Client,
    /// The last recipe given, (depth, addr); before the first, above every row.
    recipe_after: (i32, Vec<u8>),
    /// The last leaf given, (at, addr); before the first, below every row.
    leaf_after: (SystemTime, Vec<u8>),
    recipes_done: bool,
}

#[async_trait]
impl Candidates for PgCandidates {
    async fn next(&mut self, limit: usize) -> Result<Vec<Removed>> {
        const CTX: &str = "reading garbage collection's candidates";
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let (pg, client) = (&*self.pg, &self.client);
        if !self.recipes_done {
            let (depth, addr) = &self.recipe_after;
            let page = rows(
                pg,
                client,
                "gc_candidates",
                "gc_dead_recipes",
                "SELECT depth, addr FROM pg_temp.gc_dead_recipes
                 WHERE (depth, addr) < ($1, $2)
                 ORDER BY depth DESC, addr DESC LIMIT $3",
                &[depth, addr, &limit],
            )
            .await?;
            if let Some(last) = page.last() {
                self.recipe_after = (last.get(0), last.get::<_, &[u8]>(1).to_vec());
                return page
                    .iter()
                    .map(|row| {
                        Ok(Removed {
                            addr: addr_of(row.get(1), CTX)?,
                            kind: AddrKind::Recipe,
                            bytes: 0,
                        })
                    })
                    .collect();
            }
            self.recipes_done = true;
        }
        let (at, addr) = &self.leaf_after;
        let page = rows(
            pg,
            client,
            "gc_candidates",
            "gc_dead_leaves",
            "SELECT at, addr, size FROM pg_temp.gc_dead_leaves
             WHERE (at, addr) > ($1, $2)
             ORDER BY at, addr LIMIT $3",
            &[at, addr, &limit],
        )
        .await?;
        if let Some(last) = page.last() {
            self.leaf_after = (last.get(0), last.get::<_, &[u8]>(1).to_vec());
        }
        page.iter()
            .map(|row| {
                Ok(Removed {
                    addr: addr_of(row.get(1), CTX)?,
                    kind: AddrKind::Leaf,
                    bytes: row.get::<_, i64>(2).max(0) as u64,
                })
            })
            .collect()
    }
}
