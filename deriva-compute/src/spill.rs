//! [`SpillStore`]: computed outputs too large for the in-memory cache, kept as files in a local
//! directory with their own byte budget and least-recently-used eviction.
//!
//! The key of an entry is a *recipe* address, not the hash of its bytes, so each file starts
//! with a 32-byte header holding the BLAKE3 hash of its content, and every read checks the
//! content against it:
//!
//! ```text
//! <dir>/<64 hex of the recipe address>      header (32 bytes) ‖ content
//! <dir>/<64 hex>.<sequence>.tmp             a put in progress
//! ```
//!
//! A put writes a temporary file and renames it into place; the rename and the accounting happen
//! under one lock, as do removals, so the byte count always matches the files. Nothing is
//! fsynced: the spill is a cache, and [`SpillStore::open`] empties the directory anyway, since an
//! invalidation may have been missed while the process was down.
//!
//! The byte budget and [`SpillStats::bytes`] count content bytes only (the 32-byte headers are
//! not included).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, Result, SignedRecord};
use deriva_store::ByteStream;
use deriva_store::stream;
use futures::StreamExt as _;
use parking_lot::Mutex;

/// Length of the header: the BLAKE3 hash of the content.
const HEADER_LEN: usize = 32;

/// Live spill counters, read without locks by the metrics callbacks.
#[derive(Debug, Default)]
pub struct SpillStats {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    writes: AtomicU64,
}

impl SpillStats {
    /// Lookups ([`SpillStore::get`], [`SpillStore::stream`]) that found an entry, including
    /// entries whose bytes then proved corrupted.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that found nothing.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Entries evicted to stay within the byte budget (removals and clears not included).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Content bytes held, headers excluded.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Outputs written by [`SpillStore::put`].
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Entry {
    /// Content bytes (without the header).
    len: u64,
    /// Key in `SpillIndex::order`.
    tick: u64,
    /// The sequence number of the put that wrote the file, so that a reader that found the
    /// file corrupted removes that file and not a newer one a concurrent put renamed over it.
    id: u64,
    /// The output's materialization record, if it came with one (kept in memory only: the
    /// directory is emptied when it is opened).
    record: Option<Arc<SignedRecord>>,
}

/// What the directory holds, in memory: its entries, their recency and their total size.
#[derive(Debug, Default)]
struct SpillIndex {
    map: HashMap<CAddr, Entry>,
    /// Last use → address, least recently used first.
    order: BTreeMap<u64, CAddr>,
    tick: u64,
    /// Content bytes of all entries.
    total: u64,
}

impl SpillIndex {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `addr` as just used.
    fn touch(&mut self, addr: &CAddr) {
        let tick = self.next_tick();
        if let Some(entry) = self.map.get_mut(addr) {
            self.order.remove(&entry.tick);
            entry.tick = tick;
            self.order.insert(tick, *addr);
        }
    }

    /// Drops `addr` from the accounting; its entry, if it had one.
    fn forget(&mut self, addr: &CAddr) -> Option<Entry> {
        let entry = self.map.remove(addr)?;
        self.order.remove(&entry.tick);
        self.total -= entry.len;
        Some(entry)
    }
}

/// An entry found by a lookup: its open file, the file's path and the put that wrote it.
struct Found {
    file: File,
    path: PathBuf,
    id: u64,
}

/// The on-disk store of spilled outputs. All methods take `&self`; share it behind an `Arc`.
#[derive(Debug)]
pub struct SpillStore {
    dir: PathBuf,
    budget: u64,
    inner: Mutex<SpillIndex>,
    stats: Arc<SpillStats>,
    seq: AtomicU64,
}

impl SpillStore {
    /// Opens the spill directory `dir`, creating it if needed and removing everything already
    /// in it (spilled outputs do not outlive the process: an invalidation may have been missed
    /// while it was down). `max_bytes` is the budget of content bytes.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| DerivaError::io(format!("creating {}", dir.display()), &e))?;
        let listing = fs::read_dir(dir)
            .map_err(|e| DerivaError::io(format!("listing {}", dir.display()), &e))?;
        let mut removed = 0usize;
        for entry in listing {
            let entry =
                entry.map_err(|e| DerivaError::io(format!("listing {}", dir.display()), &e))?;
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let result = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DerivaError::io(format!("removing {}", path.display()), &e));
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                dir = %dir.display(),
                "removed spilled outputs left by an earlier run"
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
            budget: max_bytes,
            inner: Mutex::new(SpillIndex::default()),
            stats: Arc::new(SpillStats::default()),
            seq: AtomicU64::new(0),
        })
    }

    /// The budget of content bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<SpillStats> {
        &self.stats
    }

    fn path_of(&self, addr: &CAddr) -> PathBuf {
        self.dir.join(addr.to_hex())
    }

    /// Publishes the counters from `inner`; called with the lock held after every change.
    fn publish_stats(&self, inner: &SpillIndex) {
        self.stats.bytes.store(inner.total, Ordering::Relaxed);
        self.stats
            .entries
            .store(inner.map.len() as u64, Ordering::Relaxed);
    }

    /// Removes the file of `addr`. A file already gone is fine: the entry is gone either way.
    fn unlink(&self, addr: &CAddr) {
        let path = self.path_of(addr);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a spilled output");
        }
    }

    /// BLOCKING. Writes `data` as the output of `addr`, replacing any entry it has, and evicts
    /// least-recently-used entries until the total fits the budget. Returns `Ok(false)`, writing
    /// nothing (an existing entry stays), if `data` alone is larger than the budget.
    pub fn put(&self, addr: CAddr, data: &[u8]) -> Result<bool> {
        self.put_recorded(addr, data, None)
    }

    /// BLOCKING. [`SpillStore::put`], with the output's materialization `record`, which
    /// [`SpillStore::record`] answers for as long as the entry stays.
    pub fn put_recorded(
        &self,
        addr: CAddr,
        data: &[u8],
        record: Option<Arc<SignedRecord>>,
    ) -> Result<bool> {
        let len = data.len() as u64;
        if len > self.budget {
            tracing::debug!(%addr, len, budget = self.budget, "output larger than the spill budget; not spilled");
            return Ok(false);
        }
        let hash = CAddr::for_leaf(data);
        let id = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{}.{id}.tmp", addr.to_hex()));
        let written = File::create_new(&tmp).and_then(|mut file| {
            file.write_all(hash.as_bytes())?;
            file.write_all(data)
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(DerivaError::io(
                format!("writing spilled output {addr} to {}", tmp.display()),
                &e,
            ));
        }

        let path = self.path_of(&addr);
        let mut inner = self.inner.lock();
        if let Err(e) = fs::rename(&tmp, &path) {
            drop(inner);
            let _ = fs::remove_file(&tmp);
            return Err(DerivaError::io(
                format!("moving spilled output {addr} to {}", path.display()),
                &e,
            ));
        }
        // The rename replaced the old file, if any; only its accounting is left to drop.
        inner.forget(&addr);
        let tick = inner.next_tick();
        inner.map.insert(
            addr,
            Entry {
                len,
                tick,
                id,
                record,
            },
        );
        inner.order.insert(tick, addr);
        inner.total += len;
        let mut evicted = 0u64;
        while inner.total > self.budget {
            let Some((_, victim)) = inner.order.first_key_value() else {
                break;
            };
            let victim = *victim;
            if victim == addr {
                // Cannot happen: `addr` was used last and fits the budget alone.
                break;
            }
            inner.forget(&victim);
            self.unlink(&victim);
            evicted += 1;
        }
        self.publish_stats(&inner);
        drop(inner);

        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        if evicted > 0 {
            self.stats.evictions.fetch_add(evicted, Ordering::Relaxed);
            tracing::debug!(%addr, evicted, "spill evicted entries to stay within budget");
        }
        Ok(true)
    }

    /// BLOCKING. Whether `addr` has an entry (no LRU touch, no hit or miss counted).
    pub fn contains(&self, addr: &CAddr) -> bool {
        self.inner.lock().map.contains_key(addr)
    }

    /// The materialization record of the spilled output of `addr`, if it has an entry with one
    /// (no LRU touch, no hit or miss).
    pub fn record(&self, addr: &CAddr) -> Option<Arc<SignedRecord>> {
        self.inner.lock().map.get(addr)?.record.clone()
    }

    /// The size of the spilled output of `addr`, if any (no LRU touch, no hit or miss).
    pub fn size_of(&self, addr: &CAddr) -> Option<u64> {
        self.inner.lock().map.get(addr).map(|e| e.len)
    }

    /// Looks `addr` up, opens its file, touches it and counts a hit; or counts a miss.
    fn lookup(&self, addr: &CAddr) -> Result<Option<Found>> {
        let path = self.path_of(addr);
        let mut inner = self.inner.lock();
        let Some(id) = inner.map.get(addr).map(|e| e.id) else {
            drop(inner);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        match File::open(&path) {
            Ok(file) => {
                inner.touch(addr);
                drop(inner);
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Found { file, path, id }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed behind the store's back: drop it from the accounting.
                inner.forget(addr);
                self.publish_stats(&inner);
                drop(inner);
                tracing::warn!(path = %path.display(), "a spilled output's file disappeared");
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(DerivaError::io(
                format!("opening spilled output {addr} at {}", path.display()),
                &e,
            )),
        }
    }

    /// Removes the entry of `addr` if it is still the one written by the put `id`.
    fn remove_corrupt(&self, addr: &CAddr, id: u64) {
        let mut inner = self.inner.lock();
        if inner.map.get(addr).is_some_and(|e| e.id == id) {
            inner.forget(addr);
            self.unlink(addr);
            self.publish_stats(&inner);
        }
    }

    /// The error for a corrupted entry, after removing it.
    fn corrupted(&self, addr: CAddr, id: u64, detail: String) -> DerivaError {
        // The file's path goes to the log only; the error names the address.
        let path = self.path_of(&addr);
        tracing::warn!(%addr, path = %path.display(), %detail, "a spilled output is corrupted; removed it");
        self.remove_corrupt(&addr, id);
        DerivaError::Corrupted { addr, detail }
    }

    /// BLOCKING. The whole output of `addr`, checked against its header hash; `Ok(None)` if it
    /// has no entry. Counts a hit or a miss and marks the entry used. Content that does not
    /// match its header removes the entry and is reported as [`DerivaError::Corrupted`] of
    /// `addr`.
    pub fn get(&self, addr: &CAddr) -> Result<Option<Bytes>> {
        let Some(Found { mut file, path, id }) = self.lookup(addr)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        if let Some(len) = file
            .metadata()
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
        {
            buf.reserve_exact(len);
        }
        file.read_to_end(&mut buf).map_err(|e| {
            DerivaError::io(
                format!("reading spilled output {addr} at {}", path.display()),
                &e,
            )
        })?;
        if buf.len() < HEADER_LEN {
            let detail = format!(
                "the spill file is {} bytes, shorter than its {HEADER_LEN}-byte header",
                buf.len()
            );
            return Err(self.corrupted(*addr, id, detail));
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&buf[..HEADER_LEN]);
        let expected = CAddr::from(header);
        let data = Bytes::from(buf).slice(HEADER_LEN..);
        let found = CAddr::for_leaf(&data);
        if found != expected {
            let detail = format!(
                "the spill file, whose header records {expected}, holds {} bytes that hash to {found}",
                data.len()
            );
            return Err(self.corrupted(*addr, id, detail));
        }
        Ok(Some(data))
    }

    /// The output of `addr` as a stream of chunks of at most `chunk_bytes` (an empty output is
    /// one empty chunk); `Ok(None)` if it has no entry. Counts a hit or a miss and marks the
    /// entry used. Each chunk is read on tokio's blocking pool, so about one chunk is in memory
    /// at a time. Follows the contract of [`deriva_store::stream`]: content that does not
    /// match its header passes every chunk and then ends the stream with
    /// [`DerivaError::Corrupted`] of `addr` (and the entry is removed); a file too short to hold
    /// its header is that error from this call itself. The stream keeps its file
    /// open, so removing or evicting the entry meanwhile does not disturb it.
    pub async fn stream(
        self: &Arc<Self>,
        addr: CAddr,
        chunk_bytes: usize,
    ) -> Result<Option<ByteStream>> {
        let chunk = chunk_bytes.max(1);
        let store = Arc::clone(self);
        let opened = on_pool("opening a spilled output", move || {
            let Some(Found { mut file, path, id }) = store.lookup(&addr)? else {
                return Ok(None);
            };
            let mut header = [0u8; HEADER_LEN];
            match file.read_exact(&mut header) {
                Ok(()) => Ok(Some((file, id, CAddr::from(header)))),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    let detail =
                        format!("the spill file is shorter than its {HEADER_LEN}-byte header");
                    Err(store.corrupted(addr, id, detail))
                }
                Err(e) => Err(DerivaError::io(
                    format!("reading spilled output {addr} at {}", path.display()),
                    &e,
                )),
            }
        })
        .await?;
        let Some((file, id, expected)) = opened else {
            return Ok(None);
        };

        // Read on the blocking pool, a block at a time, and cut into chunks.
        let chunks = stream::file_chunks(file, chunk, format!("reading spilled output {addr}"), ());

        let source = format!("the spill file, whose header records {expected},");
        let store = Arc::clone(self);
        let verified = stream::verified(expected, source, chunks)
            .then(move |item| {
                let store = Arc::clone(&store);
                async move {
                    match item {
                        // The hash check names the header's hash; report the recipe address.
                        Err(DerivaError::Corrupted { detail, .. }) => {
                            let err = on_pool("removing a corrupted spilled output", move || {
                                Ok(store.corrupted(addr, id, detail))
                            })
                            .await
                            .unwrap_or_else(|e| e);
                            Err(err)
                        }
                        other => other,
                    }
                }
            })
            .boxed();
        Ok(Some(verified))
    }

    /// BLOCKING. Removes the entry of `addr`; whether there was one.
    pub fn remove(&self, addr: &CAddr) -> bool {
        let mut inner = self.inner.lock();
        if inner.forget(addr).is_none() {
            return false;
        }
        self.unlink(addr);
        self.publish_stats(&inner);
        true
    }

    /// BLOCKING. Removes every entry; how many there were.
    pub fn clear(&self) -> usize {
        let mut inner = self.inner.lock();
        let addrs: Vec<CAddr> = inner.map.keys().copied().collect();
        for addr in &addrs {
            inner.forget(addr);
            self.unlink(addr);
        }
        self.publish_stats(&inner);
        addrs.len()
    }
}

/// Runs `f` on tokio's blocking pool, in the caller's span.
async fn on_pool<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    deriva_store::task::spawn_blocking_in(tracing::Span::current(), f)
        .await
        .map_err(|e| DerivaError::from_join(what, e))?
}

#[cfg(test)]
mod tests;
