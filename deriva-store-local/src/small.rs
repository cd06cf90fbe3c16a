//! Small leaves in redb, with group commit.
//!
//! A leaf of at most [`LocalOptions::inline_leaf_bytes`](super::LocalOptions) bytes is a row of
//! the `leaves` table of `<data-dir>/leaves.redb`: address → `last put (u64 LE, milliseconds
//! since the Unix epoch) ‖ bytes`. One thread, the committer, writes every row: a put hands its
//! leaf to the committer and waits; the committer takes every put waiting at that moment, writes
//! them in one transaction and commits it durably (one fsync for the batch), then answers each.
//! While it commits, the next puts queue up and form the next batch, so concurrent puts share
//! their fsyncs and a lone put waits for one commit, as before.
//!
//! A put is acknowledged only after the commit that holds it returned: what a client was told
//! is stored survives a crash. Reads re-hash the row, like a blob file: a mismatch is
//! [`DerivaError::Corrupted`].
//!
//! Larger leaves, streamed ones written before this module existed, and every leaf of a store
//! opened with `inline_leaf_bytes = 0` stay files (see `leaf_files.rs`). Reads look in both places.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use deriva_core::CAddr;
use deriva_core::{DerivaError, Result};
use deriva_store::observe::{BackendMetrics, Target};
use deriva_store::{AgedLeaf, LeafStat};

use crate::calls;

/// Name of the redb file of small leaves inside the data directory.
pub const LEAVES_FILE: &str = "leaves.redb";

const LEAVES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("leaves");

/// The most puts one commit takes, and the most bytes: bounds a transaction's memory.
const BATCH_PUTS: usize = 1024;
const BATCH_BYTES: usize = 16 << 20;

/// Milliseconds since the Unix epoch.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

fn db_error(context: &str, err: impl Into<redb::Error>) -> DerivaError {
    super::recipes::db_error(context, err.into())
}

/// A row: its time and its bytes.
fn split_row(addr: &CAddr, row: &[u8]) -> Result<(u64, usize)> {
    if row.len() < 8 {
        return Err(DerivaError::Corrupted {
            addr: *addr,
            detail: format!("the stored row of {} bytes has no time", row.len()),
        });
    }
    let ms = u64::from_le_bytes(row[..8].try_into().unwrap_or_default());
    Ok((ms, row.len() - 8))
}

fn make_row(ms: u64, data: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + data.len());
    row.extend_from_slice(&ms.to_le_bytes());
    row.extend_from_slice(data);
    row
}

/// Checks a row's bytes against its address.
pub(super) fn verified(addr: &CAddr, data: Bytes) -> Result<Bytes> {
    let actual = CAddr::for_leaf(&data);
    if actual != *addr {
        tracing::error!(%addr, %actual, len = data.len(), "small leaf does not match its address");
        return Err(DerivaError::Corrupted {
            addr: *addr,
            detail: format!("the {} bytes stored hash to {actual}", data.len()),
        });
    }
    Ok(data)
}

/// The answer to a put whose committer went away before answering.
fn committer_gone() -> DerivaError {
    DerivaError::io(
        "storing a small leaf",
        &std::io::Error::other("the leaf committer stopped"),
    )
}

/// What a put asks the committer, and where it wants the answer.
struct Pending {
    addr: CAddr,
    data: Bytes,
    reply: tokio::sync::oneshot::Sender<Result<()>>,
}

/// What the committer does for a leaf that already has a file (written before this store kept
/// small leaves in redb): refresh the file's time; `false` if there is no file.
pub(super) type TouchFile = Box<dyn Fn(&CAddr) -> Result<bool> + Send>;

/// What the committer calls after each durable commit, with the sizes of the leaves it added.
pub(super) type OnCommit = Box<dyn Fn(&[u64]) + Send>;

/// The small-leaf table and its committer. Dropping it stops the committer once it has
/// answered every put already handed to it.
pub(super) struct SmallLeaves {
    db: Arc<Database>,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Pending>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Every transaction is observed here (`backend="redb"`); the committer's puts are timed
    /// from the caller's side, hand-over and durable commit included.
    metrics: Arc<BackendMetrics>,
}

impl std::fmt::Debug for SmallLeaves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmallLeaves")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What [`SmallLeaves::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deleted {
    /// The row is gone; it held this many bytes.
    Removed(u64),
    /// The row was put at or after the cutoff, and stays.
    Kept,
    /// There is no row.
    Absent,
}

/// Count and bytes of the rows, read at open.
pub(super) struct Loaded {
    pub(super) count: u64,
    pub(super) bytes: u64,
}

impl SmallLeaves {
    /// Opens (creating) `path`, counts its rows, and starts the committer, which calls
    /// `on_commit(new leaves' sizes)` after each durable commit and `touch_file` for leaves
    /// that are files already.
    pub(super) fn open(
        path: &Path,
        touch_file: TouchFile,
        on_commit: OnCommit,
        metrics: Arc<BackendMetrics>,
    ) -> Result<(Self, Loaded)> {
        let ctx = format!("opening {}", path.display());
        let db = super::recipes::open_database(path)?;
        let txn = db.begin_write().map_err(|e| db_error(&ctx, e))?;
        let mut loaded = Loaded { count: 0, bytes: 0 };
        {
            let table = txn.open_table(LEAVES).map_err(|e| db_error(&ctx, e))?;
            for entry in table.iter().map_err(|e| db_error(&ctx, e))? {
                let (_, row) = entry.map_err(|e| db_error(&ctx, e))?;
                loaded.count += 1;
                loaded.bytes += row.value().len().saturating_sub(8) as u64;
            }
        }
        txn.commit().map_err(|e| db_error(&ctx, e))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let committer = {
            let db = db.clone();
            std::thread::Builder::new()
                .name("deriva-leaf-commit".into())
                .spawn(move || commit_loop(&db, &rx, &touch_file, &*on_commit))
                .map_err(|e| DerivaError::io("starting the leaf committer", &e))?
        };
        Ok((
            Self {
                db,
                path: path.to_owned(),
                queue: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
                metrics,
            },
            loaded,
        ))
    }

    /// Stores `data` (whose address is `addr`) through the committer: done once it is
    /// durable. No thread waits meanwhile.
    pub(super) async fn put(&self, addr: CAddr, data: Bytes) -> Result<()> {
        let committed = async {
            self.submit(addr, data)
                .await
                .unwrap_or_else(|_| Err(committer_gone()))
        };
        self.metrics
            .call(calls::PUT_LEAF, Target::None, committed)
            .await
    }

    /// Stores several leaves (with their addresses) through the committer, handed over all
    /// at once so that they share its transactions (a commit takes up to 1024 puts or 16 MiB);
    /// done once all are durable, or the first error.
    pub(super) async fn put_many(&self, leaves: Vec<(CAddr, Bytes)>) -> Result<()> {
        let answers: Vec<_> = leaves
            .into_iter()
            .map(|(addr, data)| self.submit(addr, data))
            .collect();
        let committed = async {
            for answer in answers {
                answer.await.unwrap_or_else(|_| Err(committer_gone()))?;
            }
            Ok(())
        };
        self.metrics
            .call(calls::PUT_LEAF, Target::None, committed)
            .await
    }

    /// [`SmallLeaves::put`] for a caller on the blocking pool: blocks until it is durable.
    pub(super) fn put_blocking(&self, addr: CAddr, data: Bytes) -> Result<()> {
        self.metrics.call_blocking(calls::PUT_LEAF, || {
            self.submit(addr, data)
                .blocking_recv()
                .unwrap_or_else(|_| Err(committer_gone()))
        })
    }

    /// Hands `data` (whose address is `addr`) to the committer; the receiver answers once it is
    /// durable, or with the error that kept it from being.
    fn submit(&self, addr: CAddr, data: Bytes) -> tokio::sync::oneshot::Receiver<Result<()>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending { addr, data, reply };
        let refused = match self.queue.lock().as_ref() {
            Some(queue) => queue.send(pending).err().map(|e| e.0),
            None => Some(pending),
        };
        if let Some(p) = refused {
            // The file's path is for the log (the store logged it when it opened), not for a
            // client.
            let _ = p.reply.send(Err(DerivaError::Unavailable {
                backend: "the local store's small-leaf table".into(),
                message: "the store is closing".into(),
            }));
        }
        answer
    }

    /// The verified bytes of `addr`; `None` if it has no row.
    pub(super) fn get(&self, addr: &CAddr) -> Result<Option<Bytes>> {
        self.get_unverified(addr)?
            .map(|data| verified(addr, data))
            .transpose()
    }

    /// The bytes of `addr`'s row, not verified yet (a streamed read verifies them as it
    /// goes); `None` if it has no row.
    pub(super) fn get_unverified(&self, addr: &CAddr) -> Result<Option<Bytes>> {
        self.metrics.call_blocking(calls::GET_LEAF, || {
            const CTX: &str = "reading a small leaf";
            let txn = self.db.begin_read().map_err(|e| db_error(CTX, e))?;
            let table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
            let row = table.get(addr.as_bytes()).map_err(|e| db_error(CTX, e))?;
            let Some(row) = row else { return Ok(None) };
            split_row(addr, row.value())?;
            Ok(Some(Bytes::copy_from_slice(&row.value()[8..])))
        })
    }

    /// The size of the leaf `addr` and the time of its last put, if it has a row.
    pub(super) fn stat(&self, addr: &CAddr) -> Result<Option<LeafStat>> {
        self.metrics.call_blocking(calls::FIND_LEAF, || {
            const CTX: &str = "sizing a small leaf";
            let txn = self.db.begin_read().map_err(|e| db_error(CTX, e))?;
            let table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
            let Some(row) = table.get(addr.as_bytes()).map_err(|e| db_error(CTX, e))? else {
                return Ok(None);
            };
            // A row too short to hold its time still exists (a read says it is damaged).
            let row = row.value();
            Ok(Some(LeafStat {
                size: row.len().saturating_sub(8) as u64,
                stored_at: split_row(addr, row).ok().map(|(ms, _)| from_millis(ms)),
            }))
        })
    }

    /// Of `addrs`, those with no row, in order, from one read transaction.
    pub(super) fn missing(&self, addrs: &[CAddr]) -> Result<Vec<CAddr>> {
        self.metrics.call_blocking(calls::FIND_LEAF, || {
            const CTX: &str = "looking up small leaves";
            let txn = self.db.begin_read().map_err(|e| db_error(CTX, e))?;
            let table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
            let mut out = Vec::new();
            for addr in addrs {
                if table
                    .get(addr.as_bytes())
                    .map_err(|e| db_error(CTX, e))?
                    .is_none()
                {
                    out.push(*addr);
                }
            }
            Ok(out)
        })
    }

    /// At most `limit` rows whose address sorts after `after` (all when `None`), in address
    /// order, with their sizes, from one read transaction.
    pub(super) fn list_page(
        &self,
        after: Option<CAddr>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u64)>> {
        self.metrics.call_blocking(calls::LIST_LEAVES, || {
            const CTX: &str = "listing small leaves";
            let txn = self.db.begin_read().map_err(|e| db_error(CTX, e))?;
            let table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
            let after = after.map(|a| *a.as_bytes());
            let range = table
                .range::<&[u8; 32]>(super::recipes::keys_after(after.as_ref()))
                .map_err(|e| db_error(CTX, e))?;
            let mut out = Vec::with_capacity(limit.min(super::PAGE_CAPACITY));
            for entry in range.take(limit) {
                let (key, row) = entry.map_err(|e| db_error(CTX, e))?;
                let size = row.value().len().saturating_sub(8) as u64;
                out.push((CAddr::from_bytes(*key.value()), size));
            }
            Ok(out)
        })
    }

    /// Calls `f` with every row's address, size and last put, from one read transaction,
    /// holding one row at a time.
    pub(super) fn for_each_aged(&self, mut f: impl FnMut(AgedLeaf) -> Result<()>) -> Result<()> {
        self.metrics.call_blocking(calls::LIST_LEAVES, || {
            const CTX: &str = "listing small leaves";
            let txn = self.db.begin_read().map_err(|e| db_error(CTX, e))?;
            let table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
            for entry in table.iter().map_err(|e| db_error(CTX, e))? {
                let (key, row) = entry.map_err(|e| db_error(CTX, e))?;
                let addr = CAddr::from_bytes(*key.value());
                let (ms, size) = split_row(&addr, row.value())?;
                f(AgedLeaf {
                    addr,
                    size: size as u64,
                    at: from_millis(ms),
                })?;
            }
            Ok(())
        })
    }

    /// Removes the row of `addr` if there is one and (with a cutoff) it was last put before
    /// `cutoff`. A write transaction, so it is ordered with the committer's: a put either
    /// refreshed the time first, or writes the row afresh after.
    pub(super) fn delete(&self, addr: &CAddr, cutoff: Option<SystemTime>) -> Result<Deleted> {
        self.metrics.call_blocking(calls::DELETE_LEAF, || {
            const CTX: &str = "deleting a small leaf";
            let txn = self.db.begin_write().map_err(|e| db_error(CTX, e))?;
            let removed = {
                let mut table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
                let found = match table.get(addr.as_bytes()).map_err(|e| db_error(CTX, e))? {
                    None => None,
                    Some(row) => {
                        let row = row.value();
                        // A row too short to hold its time is damaged: old enough to go.
                        let (ms, size) = split_row(addr, row).unwrap_or((0, row.len()));
                        Some((from_millis(ms), size as u64))
                    }
                };
                match found {
                    Some((at, size)) if cutoff.is_none_or(|c| at < c) => {
                        table
                            .remove(addr.as_bytes())
                            .map_err(|e| db_error(CTX, e))?;
                        Deleted::Removed(size)
                    }
                    Some(_) => Deleted::Kept,
                    None => Deleted::Absent,
                }
            };
            if matches!(removed, Deleted::Removed(_)) {
                txn.commit().map_err(|e| db_error(CTX, e))?;
            } else {
                txn.abort().map_err(|e| db_error(CTX, e))?;
            }
            Ok(removed)
        })
    }
}

impl Drop for SmallLeaves {
    fn drop(&mut self) {
        // Closing the queue ends the committer after the puts it holds; wait for it, so the
        // redb file is closed when the store is.
        self.queue.lock().take();
        if let Some(handle) = self.committer.lock().take() {
            let _ = handle.join();
        }
    }
}

/// The committer: a batch of every put waiting, one transaction, one durable commit, answers.
fn commit_loop(
    db: &Database,
    queue: &mpsc::Receiver<Pending>,
    touch_file: &TouchFile,
    on_commit: &dyn Fn(&[u64]),
) {
    let mut batch: Vec<Pending> = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut bytes = first.data.len();
        batch.push(first);
        while batch.len() < BATCH_PUTS && bytes < BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += p.data.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (committed, results, added) = commit_batch(db, &batch, touch_file);
        if committed {
            on_commit(&added);
        }
        for (p, result) in batch.drain(..).zip(results) {
            // A put whose caller went away (a cancelled call) is stored all the same.
            let _ = p.reply.send(result);
        }
    }
}

/// Writes one batch: whether it committed, each put's answer, and the sizes of the leaves
/// that are new.
fn commit_batch(
    db: &Database,
    batch: &[Pending],
    touch_file: &TouchFile,
) -> (bool, Vec<Result<()>>, Vec<u64>) {
    const CTX: &str = "storing small leaves";
    let failed = |e: DerivaError| {
        let answers = batch.iter().map(|_| Err(e.clone())).collect();
        (false, answers, Vec::new())
    };
    let txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return failed(db_error(CTX, e)),
    };
    let now = millis(SystemTime::now());
    let mut results = Vec::with_capacity(batch.len());
    let mut added = Vec::new();
    let mut written = false;
    {
        let mut table = match txn.open_table(LEAVES) {
            Ok(t) => t,
            Err(e) => return failed(db_error(CTX, e)),
        };
        for (i, p) in batch.iter().enumerate() {
            // The same leaf twice in one batch: the first write does for both.
            if batch[..i].iter().any(|q| q.addr == p.addr) {
                results.push(Ok(()));
                continue;
            }
            let existing = match table.get(p.addr.as_bytes()) {
                Ok(row) => row.map(|row| {
                    let row = row.value();
                    split_row(&p.addr, row).is_ok() && CAddr::for_leaf(&row[8..]) == p.addr
                }),
                Err(e) => return failed(db_error(CTX, e)),
            };
            match existing {
                // Stored: refresh its time (below, with the rewrite).
                Some(true) => {}
                Some(false) => {
                    tracing::warn!(addr = %p.addr, "rewriting a corrupted small leaf with the correct bytes");
                }
                // Not a row: perhaps a file from before; then its time is refreshed instead.
                None => match touch_file(&p.addr) {
                    Ok(true) => {
                        results.push(Ok(()));
                        continue;
                    }
                    Ok(false) => added.push(p.data.len() as u64),
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                },
            }
            if let Err(e) = table.insert(p.addr.as_bytes(), make_row(now, &p.data).as_slice()) {
                return failed(db_error(CTX, e));
            }
            written = true;
            results.push(Ok(()));
        }
    }
    let done = if written {
        txn.commit().map_err(|e| db_error(CTX, e))
    } else {
        txn.abort().map_err(|e| db_error(CTX, e))
    };
    match done {
        Ok(()) => (written, results, added),
        Err(e) => failed(e),
    }
}

/// Replaces the bytes of the row of `addr` in the small-leaf file of the local store in
/// `data_dir` (which must be closed) with `bytes`, keeping its time; `false` if it has none.
#[cfg(feature = "conformance")]
pub(super) fn damage_row(path: &Path, addr: &CAddr, bytes: &[u8]) -> Result<bool> {
    const CTX: &str = "damaging a small leaf";
    let db = Database::create(path).map_err(|e| db_error(CTX, e))?;
    let txn = db.begin_write().map_err(|e| db_error(CTX, e))?;
    let found = {
        let mut table = txn.open_table(LEAVES).map_err(|e| db_error(CTX, e))?;
        let ms = match table.get(addr.as_bytes()).map_err(|e| db_error(CTX, e))? {
            Some(row) => Some(split_row(addr, row.value())?.0),
            None => None,
        };
        if let Some(ms) = ms {
            table
                .insert(addr.as_bytes(), make_row(ms, bytes).as_slice())
                .map_err(|e| db_error(CTX, e))?;
        }
        ms.is_some()
    };
    txn.commit().map_err(|e| db_error(CTX, e))?;
    Ok(found)
}
