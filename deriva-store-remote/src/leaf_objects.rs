//! [`RemoteBlobStore`]: leaf bytes in the object store, the record of which leaves exist (and
//! their sizes) in PostgreSQL's `leaves` table.
//!
//! - A put writes the bytes first (a conditional create), then the row: an object without a row
//!   is garbage for the collector, never a row without its bytes. A batch (`put_many`, for
//!   `deriva-server migrate`) uploads its objects concurrently, then records them all in one
//!   multi-row `INSERT`, with the same guarantees.
//! - Existence, size and listing are index questions, answered by PostgreSQL, never by object
//!   listings.
//! - A read goes to the local read-through cache, then, if the index records the leaf, to the
//!   object store, and is verified against the address either way. Asking the index first
//!   spares the object store a GET that would miss (the executor asks for a leaf at every
//!   recipe's address) and never serves an object the index does not know.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError};
use deriva_store::{BlobStore, ByteStream, LeafStat, StoreCounters, stream};
use futures::{StreamExt as _, TryStreamExt as _};

use crate::disk_cache::{self, DiskCache};
use crate::index::{self, addr_of};
use crate::objects::{MULTIPART_THRESHOLD, Objects, Written};
use crate::pg::{Call, Pg};
use crate::spool::Spool;
use deriva_store::observe::BackendMetrics;

/// Concurrent object uploads of one [`BlobStore::put_many`].
const PUT_MANY_AT_ONCE: usize = 16;

/// The listing of the `leaves` table (`list_page`, `list_aged`).
const LIST_LEAVES: Call = Call {
    op: "list_leaves",
    operation: "SELECT",
    table: "leaves",
    context: "listing leaves",
};

/// Leaves in an S3-compatible bucket, recorded in PostgreSQL.
#[derive(Debug, Clone)]
pub struct RemoteBlobStore {
    objects: Arc<Objects>,
    pg: Arc<Pg>,
    counters: Arc<StoreCounters>,
    cache: Option<Arc<DiskCache>>,
    spool: Option<Arc<Spool>>,
    metrics: Arc<BackendMetrics>,
}

impl RemoteBlobStore {
    pub(crate) fn new(
        objects: Arc<Objects>,
        pg: Arc<Pg>,
        counters: Arc<StoreCounters>,
        (cache, spool): (Option<Arc<DiskCache>>, Option<Arc<Spool>>),
        metrics: Arc<BackendMetrics>,
    ) -> Self {
        Self {
            objects,
            pg,
            counters,
            cache,
            spool,
            metrics,
        }
    }

    /// Records the leaf `addr` of `size` bytes, or refreshes the time of its row (its last
    /// put); returns whether the row is new. Holds the sweep lock shared, so a garbage
    /// collection's delete of the row and its object comes wholly before or after.
    async fn record(&self, addr: CAddr, size: u64) -> Result<bool> {
        const CALL: Call = Call {
            op: "put_leaf",
            operation: "INSERT",
            table: "leaves",
            context: "recording a leaf",
        };
        Ok(!self.record_rows(CALL, &[(addr, size)]).await?.is_empty())
    }

    /// Writes the object of the leaf `data` (a conditional create), repairing a stored copy
    /// that is damaged or gone: its address, and whether the object existed already.
    async fn write_object(&self, data: Bytes) -> Result<(CAddr, bool)> {
        let addr = CAddr::for_leaf(&data);
        let key = self.objects.leaf_key(&addr);
        let existed = self.objects.create(&key, data.clone()).await? == Written::Existed;
        if existed {
            // Same address, same bytes, unless the stored copy was damaged: check, and repair.
            match self.fetch(addr).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(DerivaError::Corrupted { .. }) => {
                    tracing::warn!(%addr, "rewriting a damaged or vanished object");
                    self.objects.overwrite(&key, data).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok((addr, existed))
    }

    /// After the row of `addr` was recorded anew: counts the leaf and, if this put did not
    /// create its object, makes sure garbage collection did not remove it meanwhile.
    async fn recorded_new(&self, addr: CAddr, data: Bytes, existed: bool) -> Result<()> {
        self.counters.count_blob(true, data.len() as u64);
        if existed && !self.object_survived(addr).await? {
            tracing::info!(%addr, "rewriting an object garbage collection removed during the put");
            self.objects
                .overwrite(&self.objects.leaf_key(&addr), data)
                .await?;
        }
        Ok(())
    }

    /// [`RemoteBlobStore::record`] for several leaves (distinct addresses) in one statement:
    /// the addresses whose rows are new.
    async fn record_many(&self, rows: &[(CAddr, u64)]) -> Result<HashSet<CAddr>> {
        const CALL: Call = Call {
            op: "put_leaves",
            operation: "INSERT",
            table: "leaves",
            context: "recording leaves",
        };
        self.record_rows(CALL, rows).await
    }

    /// Records `rows` (distinct addresses with their sizes) in one `INSERT`, or refreshes the
    /// time of those already there (their last put), holding the sweep lock shared so that a
    /// garbage collection's delete of a row and its object comes wholly before or after: the
    /// addresses whose rows are new.
    async fn record_rows(&self, call: Call, rows: &[(CAddr, u64)]) -> Result<HashSet<CAddr>> {
        if rows.is_empty() {
            return Ok(HashSet::new());
        }
        let keys: Vec<&[u8]> = rows.iter().map(|(a, _)| a.as_bytes().as_slice()).collect();
        let sizes: Vec<i64> = rows
            .iter()
            .map(|(_, size)| i64::try_from(*size).unwrap_or(i64::MAX))
            .collect();
        let lock = self.pg.sweep_key();
        let found = self
            .pg
            .query(
                call,
                "WITH held AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared($3::bigint))
                 INSERT INTO {s}.leaves (addr, size)
                 SELECT t.addr, t.size FROM held, unnest($1::bytea[], $2::bigint[]) AS t (addr, size)
                 ON CONFLICT (addr) DO UPDATE SET created_at = clock_timestamp()
                 RETURNING addr, (xmax = 0)",
                &[&keys, &sizes, &lock],
            )
            .await?;
        let mut new = HashSet::new();
        for row in &found {
            if row.get::<_, bool>(1) {
                new.insert(addr_of(row.get(0), call.context)?);
            }
        }
        Ok(new)
    }

    /// After a new row for a leaf whose object this put did not create: garbage collection may
    /// have deleted the object between the write and the row (it deletes a row, then its
    /// object). Whether the object is there now; the row is young, so it stays.
    async fn object_survived(&self, addr: CAddr) -> Result<bool> {
        Ok(self
            .objects
            .size(&self.objects.leaf_key(&addr))
            .await?
            .is_some())
    }

    /// The leaf `addr` from the local read-through cache, verified, if it holds it.
    async fn cached(&self, addr: CAddr) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        let hit = disk_cache::on_pool(cache, move |c| c.get(&addr))
            .await
            .flatten();
        if hit.is_some() {
            self.metrics.cache_read(true);
        }
        hit
    }

    /// Reads the leaf `addr` from the object store, verified, and keeps it in the local cache.
    async fn fetch_and_keep(&self, addr: CAddr) -> Result<Option<Bytes>> {
        let bytes = self.fetch(addr).await?;
        // A miss is a leaf the cache did not hold; an address that is no leaf at all (the
        // executor asks here first for recipes too) is neither a hit nor a miss.
        if let (Some(cache), Some(bytes)) = (&self.cache, &bytes) {
            self.metrics.cache_read(false);
            let bytes = bytes.clone();
            disk_cache::on_pool(cache, move |c| c.put(&addr, &bytes)).await;
        }
        Ok(bytes)
    }

    /// Reads the object at `addr` and verifies it. `Ok(None)` if there is none.
    async fn fetch(&self, addr: CAddr) -> Result<Option<Bytes>> {
        let Some(bytes) = self.objects.get(&self.objects.leaf_key(&addr)).await? else {
            return Ok(None);
        };
        let found = CAddr::for_leaf(&bytes);
        if found != addr {
            return Err(DerivaError::Corrupted {
                addr,
                detail: format!(
                    "{} holds {} bytes that hash to {found}",
                    self.objects.name(),
                    bytes.len()
                ),
            });
        }
        Ok(Some(bytes))
    }
}

#[async_trait]
impl BlobStore for RemoteBlobStore {
    async fn put(&self, data: Bytes) -> Result<CAddr> {
        let (addr, existed) = self.write_object(data.clone()).await?;
        if self.record(addr, data.len() as u64).await? {
            self.recorded_new(addr, data, existed).await?;
        }
        Ok(addr)
    }

    async fn put_many(&self, data: Vec<Bytes>) -> Result<Vec<CAddr>> {
        // Every object durable first (uploaded concurrently), then one row per leaf in one
        // statement: a row never exists before its object.
        let written: Vec<(CAddr, bool)> = futures::stream::iter(data.iter().cloned())
            .map(|leaf| self.write_object(leaf))
            .buffered(PUT_MANY_AT_ONCE)
            .try_collect()
            .await?;
        let mut rows: Vec<(CAddr, u64)> = Vec::with_capacity(data.len());
        for ((addr, _), leaf) in written.iter().zip(&data) {
            if !rows.iter().any(|(a, _)| a == addr) {
                rows.push((*addr, leaf.len() as u64));
            }
        }
        let mut new = self.record_many(&rows).await?;
        for ((addr, existed), leaf) in written.iter().zip(data) {
            // A leaf given twice counts once.
            if new.remove(addr) {
                self.recorded_new(*addr, leaf, *existed).await?;
            }
        }
        Ok(written.into_iter().map(|(addr, _)| addr).collect())
    }

    async fn get(&self, addr: CAddr) -> Result<Option<Bytes>> {
        if let Some(hit) = self.cached(addr).await {
            return Ok(Some(hit));
        }
        if self.size(addr).await?.is_none() {
            return Ok(None);
        }
        self.fetch_and_keep(addr).await
    }

    async fn get_stream(&self, addr: CAddr, chunk_bytes: usize) -> Result<Option<ByteStream>> {
        if let Some(hit) = self.cached(addr).await {
            return Ok(Some(stream::once(hit)));
        }
        // Only what the index records; a leaf of one chunk or less is read whole (and kept in
        // the local cache), a larger one streams from the object store.
        let Some(size) = self.size(addr).await? else {
            return Ok(None);
        };
        if size <= chunk_bytes as u64 {
            return Ok(self.fetch_and_keep(addr).await?.map(stream::once));
        }
        let key = self.objects.leaf_key(&addr);
        let Some(chunks) = self.objects.get_stream(&key, chunk_bytes).await? else {
            return Ok(None);
        };
        Ok(Some(stream::verified(
            addr,
            self.objects.name().to_owned(),
            chunks,
        )))
    }

    async fn put_stream(&self, addr: CAddr, mut data: ByteStream) -> Result<()> {
        // Up to the multipart threshold, a leaf is held and put whole (a conditional create).
        let mut head = Vec::new();
        let mut len = 0usize;
        while len <= MULTIPART_THRESHOLD {
            let Some(chunk) = data.next().await else {
                let whole = Bytes::from(head.concat());
                let found = CAddr::for_leaf(&whole);
                if found != addr {
                    return Err(DerivaError::Corrupted {
                        addr,
                        detail: format!("the {len} bytes given hash to {found}"),
                    });
                }
                self.put(whole).await?;
                return Ok(());
            };
            let chunk: Bytes = chunk?;
            len += chunk.len();
            head.push(chunk);
        }
        // Larger: uploaded in parts as it comes, completed only if the hash matches.
        let key = self.objects.leaf_key(&addr);
        let rest = futures::stream::iter(head.into_iter().map(Ok))
            .chain(data)
            .boxed();
        let size = self.objects.upload_stream(&key, Some(addr), rest).await?;
        if self.record(addr, size).await? {
            if !self.object_survived(addr).await? {
                // Garbage collection removed the object of an old row just after the upload
                // replaced it; the bytes are gone from here too, so the row goes and the
                // client is told to put again.
                self.forget_row(addr).await?;
                return Err(DerivaError::Unavailable {
                    backend: self.objects.name().to_owned(),
                    message: format!(
                        "garbage collection removed leaf {addr} while it was being uploaded; \
                         put it again"
                    ),
                });
            }
            self.counters.count_blob(true, size);
        }
        Ok(())
    }

    async fn put_unaddressed(&self, data: ByteStream) -> Result<(CAddr, u64)> {
        // The object's key is the address: the bytes wait in a local file until it is known.
        let Some(spool) = &self.spool else {
            return Err(DerivaError::InvalidInput(
                "this store was opened without a spool directory, so it takes no streamed uploads"
                    .into(),
            ));
        };
        let spooled = spool.take(data).await?;
        let (addr, len) = (spooled.addr, spooled.len);
        self.put_stream(addr, spooled.stream()?).await?;
        Ok((addr, len))
    }

    async fn contains(&self, addr: CAddr) -> Result<bool> {
        Ok(self.size(addr).await?.is_some())
    }

    async fn missing(&self, addrs: Vec<CAddr>) -> Result<Vec<CAddr>> {
        const CALL: Call = Call {
            op: "find_leaves",
            operation: "SELECT",
            table: "leaves",
            context: "looking up leaves",
        };
        let sql = "SELECT addr FROM {s}.leaves WHERE addr = ANY($1)";
        index::absent(&self.pg, CALL, sql, addrs).await
    }

    async fn size(&self, addr: CAddr) -> Result<Option<u64>> {
        Ok(self.stat(addr).await?.map(|stat| stat.size))
    }

    /// The row's size and time (its last put: garbage collection's clock).
    async fn stat(&self, addr: CAddr) -> Result<Option<LeafStat>> {
        const CALL: Call = Call {
            op: "find_leaf",
            operation: "SELECT",
            table: "leaves",
            context: "looking up a leaf",
        };
        let key = addr.as_bytes().as_slice();
        let row = self
            .pg
            .query_opt(
                CALL,
                "SELECT size, created_at FROM {s}.leaves WHERE addr = $1",
                &[&key],
            )
            .await?;
        Ok(row.map(|r| LeafStat {
            size: r.get::<_, i64>(0).max(0) as u64,
            stored_at: Some(r.get(1)),
        }))
    }

    async fn delete(&self, addr: CAddr) -> Result<bool> {
        const CALL: Call = Call {
            op: "delete_leaf",
            operation: "DELETE",
            table: "leaves",
            context: "deleting a leaf",
        };
        // The row first: a crash between the two leaves an object without a row, which is
        // garbage, never a row whose bytes are gone.
        let key = addr.as_bytes().as_slice();
        let size = self
            .pg
            .query_opt(
                CALL,
                "DELETE FROM {s}.leaves WHERE addr = $1 RETURNING size",
                &[&key],
            )
            .await?
            .map(|r| r.get::<_, i64>(0).max(0) as u64);
        self.objects.delete(&self.objects.leaf_key(&addr)).await?;
        if let Some(cache) = &self.cache {
            disk_cache::on_pool(cache, move |c| c.remove(&addr)).await;
        }
        match size {
            Some(size) => {
                self.counters.count_blob(false, size);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn list_page(&self, after: Option<CAddr>, limit: usize) -> Result<Vec<(CAddr, u64)>> {
        const CALL: Call = LIST_LEAVES;
        // The primary key's order: bytea compares byte by byte.
        let after = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .pg
            .query(
                CALL,
                "SELECT addr, size FROM {s}.leaves WHERE addr > $1 ORDER BY addr LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    addr_of(row.get(0), CALL.context)?,
                    row.get::<_, i64>(1).max(0) as u64,
                ))
            })
            .collect()
    }

    async fn delete_if_older(&self, addr: CAddr, cutoff: SystemTime) -> Result<Option<u64>> {
        const CALL: Call = Call {
            op: "collect_leaf",
            operation: "DELETE",
            table: "leaves",
            context: "collecting a leaf",
        };
        // The row first, as in `delete`: a crash between the two leaves an object without a
        // row (garbage), never a row without its object. The caller holds the sweep lock, so
        // no put records the leaf again before its object is gone.
        let key = addr.as_bytes().as_slice();
        let Some(size) = self
            .pg
            .query_in_sweep(
                CALL,
                "DELETE FROM {s}.leaves WHERE addr = $1 AND created_at < $2 RETURNING size",
                &[&key, &cutoff],
            )
            .await?
            .first()
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
        else {
            return Ok(None);
        };
        self.counters.count_blob(false, size);
        self.forget_object(addr).await?;
        Ok(Some(size))
    }

    async fn delete_older_many(
        &self,
        addrs: Vec<CAddr>,
        cutoff: SystemTime,
    ) -> Result<Vec<(CAddr, u64)>> {
        const CALL: Call = Call {
            op: "collect_leaves",
            operation: "DELETE",
            table: "leaves",
            context: "collecting leaves",
        };
        use futures::StreamExt as _;
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        // The rows first, in one statement, as in `delete_if_older`: a crash before the
        // objects are gone leaves objects without rows (garbage), never a row without its
        // object.
        let keys: Vec<&[u8]> = addrs.iter().map(|a| a.as_bytes().as_slice()).collect();
        let rows = self
            .pg
            .query_in_sweep(
                CALL,
                "DELETE FROM {s}.leaves WHERE addr = ANY($1) AND created_at < $2
                 RETURNING addr, size",
                &[&keys, &cutoff],
            )
            .await?;
        let mut gone = Vec::with_capacity(rows.len());
        for row in &rows {
            let size = row.get::<_, i64>(1).max(0) as u64;
            gone.push((addr_of(row.get(0), CALL.context)?, size));
            self.counters.count_blob(false, size);
        }
        let addrs_gone: Vec<CAddr> = gone.iter().map(|(addr, _)| *addr).collect();
        let deletes: Vec<_> = addrs_gone
            .into_iter()
            .map(|addr| self.forget_object(addr))
            .collect();
        let results: Vec<Result<()>> = futures::stream::iter(deletes)
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        // In the order asked.
        Ok(addrs
            .into_iter()
            .filter_map(|a| gone.iter().find(|(g, _)| *g == a).copied())
            .collect())
    }

    async fn check(&self) -> Result<()> {
        self.objects.check().await
    }
}

impl RemoteBlobStore {
    /// Deletes the object of `addr` and its copy in the local cache (not its row).
    fn forget_object(
        &self,
        addr: CAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            self.objects.delete(&self.objects.leaf_key(&addr)).await?;
            if let Some(cache) = &self.cache {
                disk_cache::on_pool(cache, move |c| c.remove(&addr)).await;
            }
            Ok(())
        })
    }

    /// Deletes the row of `addr` (not its object).
    async fn forget_row(&self, addr: CAddr) -> Result<()> {
        const CALL: Call = Call {
            op: "delete_leaf",
            operation: "DELETE",
            table: "leaves",
            context: "deleting a leaf",
        };
        let key = addr.as_bytes().as_slice();
        self.pg
            .query(CALL, "DELETE FROM {s}.leaves WHERE addr = $1", &[&key])
            .await?;
        Ok(())
    }
}
