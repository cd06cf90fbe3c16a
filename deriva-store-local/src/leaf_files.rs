//! Leaf bytes as content-addressed files: `blobs/<first two hex chars>/<64 hex chars>`.
//!
//! A write goes to `blobs/tmp/`, is fsynced, and is then renamed into place and the shard
//! directory fsynced, so a crash never leaves a partial file under a real address. `open`
//! deletes whatever is left in `tmp/`. Every read re-hashes the bytes and reports a mismatch as
//! [`DerivaError::Corrupted`].
//!
//! Small leaves are rows of redb instead, written with group commit (`small.rs`); every method
//! here looks at both, so a store written with another threshold reads the same.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use parking_lot::Mutex;

use deriva_core::CAddr;
use deriva_core::{DerivaError, Result};
use deriva_store::observe::BackendMetrics;
use deriva_store::{AgedLeaf, LeafStat, StoreCounters};

use crate::calls;

use super::small::{Deleted, LEAVES_FILE, SmallLeaves};

const TMP_DIR: &str = "tmp";

/// The on-disk blob store. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub(super) struct BlobFiles {
    root: PathBuf,
    counters: Arc<StoreCounters>,
    /// Serializes "is it there yet? then rename and count" so concurrent puts of the same bytes
    /// count once. Data is written and fsynced before the lock is taken.
    publish: Arc<Mutex<()>>,
    tmp_seq: AtomicU64,
    /// Leaves of at most `inline_max` bytes are written here.
    small: SmallLeaves,
    inline_max: u64,
    /// The file operations are observed here (`backend="files"`), the small leaves' redb
    /// transactions in [`SmallLeaves`].
    metrics: Arc<BackendMetrics>,
}

impl BlobFiles {
    /// Opens (creating if needed) the blob directory and the small-leaf file in `data_dir`,
    /// removes temporary leftovers, and counts the blobs and their bytes once. Leaves of at most
    /// `inline_max` bytes will be written as small leaves.
    pub(super) fn open(
        data_dir: &Path,
        root: &Path,
        inline_max: u64,
        counters: Arc<StoreCounters>,
        metrics: Arc<BackendMetrics>,
    ) -> Result<Self> {
        let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
        fs::create_dir_all(root.join(TMP_DIR))
            .map_err(|e| DerivaError::io(ctx("creating", root), &e))?;
        let mut removed = 0usize;
        for entry in read_dir(&root.join(TMP_DIR))? {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| DerivaError::io(ctx("removing", &path), &e))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::warn!(
                removed,
                "removed leftover temporary blob files from an interrupted write"
            );
        }
        let (mut count, mut bytes) = (0u64, 0u64);
        // Whether some file is small enough to be a row: a put of a small leaf must then look
        // for its file first. No such file is made while the store is open (a small leaf is
        // always written as a row), so without one at open the look, a failed open(2) per put,
        // is skipped.
        let mut small_files = false;
        for shard in 0..=255u8 {
            let dir = root.join(hex::encode([shard]));
            fs::create_dir_all(&dir).map_err(|e| DerivaError::io(ctx("creating", &dir), &e))?;
            for entry in read_dir(&dir)? {
                let name = entry.file_name();
                // Exactly what `put` writes: the lowercase hex of an address in this shard.
                let valid = name
                    .to_str()
                    .and_then(|n| n.parse::<CAddr>().ok().filter(|a| a.to_hex() == n))
                    .is_some_and(|a| a.as_bytes()[0] == shard);
                let meta = entry
                    .metadata()
                    .map_err(|e| DerivaError::io(ctx("reading", &entry.path()), &e))?;
                if !valid || !meta.is_file() {
                    tracing::warn!(path = %entry.path().display(), "ignoring a stray entry in the blob store");
                    continue;
                }
                count += 1;
                bytes += meta.len();
                small_files |= meta.len() <= inline_max;
            }
        }
        sync_dir(root)?;
        let publish = Arc::new(Mutex::new(()));
        let touch_file = {
            let (root, publish, counters) = (root.to_owned(), publish.clone(), counters.clone());
            Box::new(move |addr: &CAddr| {
                if !small_files {
                    return Ok(false);
                }
                touch_or_drop(&root, &publish, &counters, addr)
            })
        };
        let on_commit = {
            let counters = counters.clone();
            Box::new(move |added: &[u64]| {
                counters.count_leaf_commit();
                for len in added {
                    counters.count_blob(true, *len);
                }
            })
        };
        let (small, loaded) = SmallLeaves::open(
            &data_dir.join(LEAVES_FILE),
            touch_file,
            on_commit,
            metrics.clone(),
        )?;
        counters.set_blobs(count + loaded.count, bytes + loaded.bytes);
        Ok(Self {
            root: root.to_owned(),
            counters,
            publish,
            tmp_seq: AtomicU64::new(0),
            small,
            inline_max,
            metrics,
        })
    }

    /// Whether a leaf of `len` bytes is written as a small leaf.
    pub(super) fn is_small(&self, len: u64) -> bool {
        self.inline_max > 0 && len <= self.inline_max
    }

    /// The small-leaf table.
    pub(super) fn small(&self) -> &SmallLeaves {
        &self.small
    }

    fn path_of(&self, addr: &CAddr) -> PathBuf {
        path_of(&self.root, addr)
    }

    /// Stores `data` under its BLAKE3 address and returns the address. Idempotent: a second put
    /// of the same bytes writes nothing (and repairs a corrupted copy if it finds one).
    pub(super) fn put(&self, data: &[u8]) -> Result<CAddr> {
        let addr = CAddr::for_leaf(data);
        if self.is_small(data.len() as u64) {
            self.small
                .put_blocking(addr, Bytes::copy_from_slice(data))?;
            return Ok(addr);
        }
        self.metrics
            .call_blocking(calls::FILE_PUT, || self.put_file(addr, data))?;
        Ok(addr)
    }

    /// [`BlobFiles::put`] of a leaf that is not small: its file.
    fn put_file(&self, addr: CAddr, data: &[u8]) -> Result<()> {
        let path = self.path_of(&addr);
        match read_verified(&addr, &path) {
            // Stored again: its time is refreshed, unless garbage collection removed it in
            // between (then it is written afresh).
            Ok(Some(_)) if self.touch(&addr)? => return Ok(()),
            Ok(_) => {}
            Err(DerivaError::Corrupted { .. }) => {
                tracing::warn!(%addr, "rewriting a corrupted blob with the correct bytes");
            }
            Err(e) => return Err(e),
        }

        let tmp = self.tmp_path(Some(&addr));
        let written = write_synced(&tmp, data);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(DerivaError::io(format!("writing blob {addr}"), &e));
        }
        self.publish(&addr, &tmp, data.len() as u64)
    }

    fn touch(&self, addr: &CAddr) -> Result<bool> {
        touch(&self.root, &self.publish, addr)
    }

    /// Calls `f` with every blob, its size and its time of last put (a small leaf's row time,
    /// a file's modification time), holding one shard directory's names at a time.
    pub(super) fn for_each_aged(&self, mut f: impl FnMut(AgedLeaf) -> Result<()>) -> Result<()> {
        self.small.for_each_aged(&mut f)?;
        self.metrics.call_blocking(calls::FILE_LIST, || {
            for shard in 0..=255u8 {
                for addr in self.shard_files(shard)? {
                    let path = self.path_of(&addr);
                    let meta = match fs::metadata(&path) {
                        Ok(m) => m,
                        // Deleted since the listing.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(DerivaError::io(format!("reading blob {addr}"), &e)),
                    };
                    let at = meta.modified().map_err(|e| {
                        DerivaError::io(format!("reading the time of blob {addr}"), &e)
                    })?;
                    f(AgedLeaf {
                        addr,
                        size: meta.len(),
                        at,
                    })?;
                }
            }
            Ok(())
        })
    }

    /// Removes the blob file of `addr` and counts it if it was last put before `cutoff`: its
    /// size, or `None` if it is newer or gone.
    pub(super) fn delete_if_older(&self, addr: &CAddr, cutoff: SystemTime) -> Result<Option<u64>> {
        match self.small.delete(addr, Some(cutoff))? {
            Deleted::Removed(len) => {
                self.counters.count_blob(false, len);
                return Ok(Some(len));
            }
            Deleted::Kept => return Ok(None),
            Deleted::Absent => {}
        }
        self.metrics.call_blocking(calls::FILE_DELETE, || {
            self.delete_file_if_older(addr, cutoff)
        })
    }

    /// [`BlobFiles::delete_if_older`] of a blob file.
    fn delete_file_if_older(&self, addr: &CAddr, cutoff: SystemTime) -> Result<Option<u64>> {
        let path = self.path_of(addr);
        let _guard = self.publish.lock();
        let ctx = || format!("deleting blob {addr}");
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DerivaError::io(ctx(), &e)),
        };
        if meta.modified().map_err(|e| DerivaError::io(ctx(), &e))? >= cutoff {
            return Ok(None);
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DerivaError::io(ctx(), &e)),
        }
        sync_dir(path.parent().unwrap_or(&self.root))?;
        self.counters.count_blob(false, meta.len());
        Ok(Some(meta.len()))
    }

    /// A fresh path in `tmp/` for a write of `addr` (of a leaf whose address is not known yet
    /// when `None`).
    fn tmp_path(&self, addr: Option<&CAddr>) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let name = addr.map_or_else(|| "incoming".to_owned(), CAddr::to_hex);
        self.root
            .join(TMP_DIR)
            .join(format!("{name}.{}.{seq}.tmp", std::process::id()))
    }

    /// Moves the written and fsynced file `tmp`, `len` bytes that hash to `addr`, into place,
    /// fsyncs its directory and counts it. On failure `tmp` is removed.
    fn publish(&self, addr: &CAddr, tmp: &Path, len: u64) -> Result<()> {
        let path = self.path_of(addr);
        let _guard = self.publish.lock();
        let already = fs::metadata(&path).ok().map(|m| m.len());
        if let Err(e) = fs::rename(tmp, &path) {
            let _ = fs::remove_file(tmp);
            return Err(DerivaError::io(format!("publishing blob {addr}"), &e));
        }
        sync_dir(path.parent().unwrap_or(&self.root))?;
        if already.is_none() {
            self.counters.count_blob(true, len);
        }
        // Replacing a file (a concurrent put of the same bytes, or a repair) changes no count: a
        // blob is counted at its correct length. One damaged *before* the store opened was
        // counted at its on-disk size and is counted right again from the next open.
        Ok(())
    }

    /// Opens the blob file of `addr` for a streamed read; `None` if there is none. A blob of
    /// at most `whole_up_to` bytes is read and verified at once instead.
    pub(super) fn open_read(&self, addr: &CAddr, whole_up_to: u64) -> Result<Option<Opened>> {
        if let Some(data) = self.small.get_unverified(addr)? {
            if data.len() as u64 <= whole_up_to {
                return Ok(Some(Opened::Whole(super::small::verified(addr, data)?)));
            }
            return Ok(Some(Opened::Row(data)));
        }
        self.metrics
            .call_blocking(calls::FILE_OPEN, || self.open_file(addr, whole_up_to))
    }

    /// [`BlobFiles::open_read`] of a blob file.
    fn open_file(&self, addr: &CAddr, whole_up_to: u64) -> Result<Option<Opened>> {
        let path = self.path_of(addr);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DerivaError::io(format!("reading blob {addr}"), &e)),
        };
        let len = file
            .metadata()
            .map_err(|e| DerivaError::io(format!("reading blob {addr}"), &e))?
            .len();
        if len <= whole_up_to {
            drop(file);
            return Ok(read_verified(addr, &path)?.map(Opened::Whole));
        }
        Ok(Some(Opened::File(file, path)))
    }

    /// Starts a streamed write of the leaf `addr` (of a leaf whose address its bytes will tell
    /// when `None`): a new file in `tmp/`.
    pub(super) fn start_write(&self, addr: Option<CAddr>) -> Result<StreamedWrite> {
        let tmp = self.tmp_path(addr.as_ref());
        let file = self.metrics.call_blocking(calls::FILE_WRITE, || {
            File::create_new(&tmp).map_err(|e| DerivaError::io(what_of(addr), &e))
        })?;
        Ok(StreamedWrite {
            addr,
            tmp,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            len: 0,
        })
    }

    /// Appends `chunk` to the streamed write `write`.
    pub(super) fn write_chunk(&self, write: &mut StreamedWrite, chunk: &[u8]) -> Result<()> {
        self.metrics
            .call_blocking(calls::FILE_WRITE, || write.write(chunk))
    }

    /// Ends a streamed write: fsyncs it and, if its bytes hash to the address it was started
    /// with (any address when none), publishes it (see [`BlobFiles::publish`]) and returns
    /// that address and the length; else removes it and reports [`DerivaError::Corrupted`].
    pub(super) fn finish_write(&self, mut write: StreamedWrite) -> Result<(CAddr, u64)> {
        let file = write.file.take();
        if let Some(f) = file {
            self.metrics.call_blocking(calls::FILE_WRITE, || {
                f.sync_all()
                    .map_err(|e| DerivaError::io(what_of(write.addr), &e))
            })?;
        }
        let found = CAddr::from(*write.hasher.finalize().as_bytes());
        if let Some(addr) = write.addr
            && found != addr
        {
            return Err(DerivaError::Corrupted {
                addr,
                detail: format!("the {} bytes given hash to {found}", write.len),
            });
        }
        let tmp = std::mem::take(&mut write.tmp);
        if self.is_small(write.len) {
            // Small: a row like any other small leaf (the committer deduplicates).
            let data = fs::read(&tmp);
            let _ = fs::remove_file(&tmp);
            let data = data.map_err(|e| DerivaError::io(what_of(write.addr), &e))?;
            self.small.put_blocking(found, Bytes::from(data))?;
            return Ok((found, write.len));
        }
        self.metrics
            .call_blocking(calls::FILE_PUT, || self.publish(&found, &tmp, write.len))?;
        Ok((found, write.len))
    }

    /// Reads and verifies a blob. `Ok(None)` when there is no such blob.
    pub(super) fn get(&self, addr: &CAddr) -> Result<Option<Bytes>> {
        if let Some(data) = self.small.get(addr)? {
            return Ok(Some(data));
        }
        self.metrics
            .call_blocking(calls::FILE_GET, || read_verified(addr, &self.path_of(addr)))
    }

    /// Whether a blob exists for `addr` (without reading or verifying it).
    pub(super) fn contains(&self, addr: &CAddr) -> Result<bool> {
        if self.small.stat(addr)?.is_some() {
            return Ok(true);
        }
        self.metrics
            .call_blocking(calls::FILE_HEAD, || Ok(self.path_of(addr).is_file()))
    }

    /// Of `addrs`, those with neither a row nor a file, in order: the rows looked up in one
    /// read transaction.
    pub(super) fn missing(&self, addrs: &[CAddr]) -> Result<Vec<CAddr>> {
        let no_row = self.small.missing(addrs)?;
        self.metrics.call_blocking(calls::FILE_HEAD, || {
            Ok(no_row
                .into_iter()
                .filter(|addr| !self.path_of(addr).is_file())
                .collect())
        })
    }

    /// The size of the blob for `addr`, if there is one.
    pub(super) fn size(&self, addr: &CAddr) -> Result<Option<u64>> {
        Ok(self.stat(addr)?.map(|stat| stat.size))
    }

    /// The size of the blob for `addr` and the time of its last put (its row's, or its file's
    /// mtime), if there is one.
    pub(super) fn stat(&self, addr: &CAddr) -> Result<Option<LeafStat>> {
        if let Some(stat) = self.small.stat(addr)? {
            return Ok(Some(stat));
        }
        self.metrics.call_blocking(calls::FILE_HEAD, || {
            let ctx = || format!("reading the size of blob {addr}");
            match fs::metadata(self.path_of(addr)) {
                Ok(m) => Ok(Some(LeafStat {
                    size: m.len(),
                    stored_at: Some(m.modified().map_err(|e| DerivaError::io(ctx(), &e))?),
                })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(DerivaError::io(ctx(), &e)),
            }
        })
    }

    /// Removes the blob for `addr` and counts it; `false` if there was none.
    pub(super) fn delete(&self, addr: &CAddr) -> Result<bool> {
        if let Deleted::Removed(len) = self.small.delete(addr, None)? {
            self.counters.count_blob(false, len);
            return Ok(true);
        }
        self.metrics
            .call_blocking(calls::FILE_DELETE, || self.delete_file(addr))
    }

    /// [`BlobFiles::delete`] of a blob file.
    fn delete_file(&self, addr: &CAddr) -> Result<bool> {
        let path = self.path_of(addr);
        let _guard = self.publish.lock();
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(DerivaError::io(format!("deleting blob {addr}"), &e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(DerivaError::io(format!("deleting blob {addr}"), &e)),
        }
        sync_dir(path.parent().unwrap_or(&self.root))?;
        self.counters.count_blob(false, len);
        Ok(true)
    }

    /// A read of an absent blob and of the blob directory itself: fails if the directory is
    /// gone or unreadable.
    pub(super) fn check(&self) -> Result<()> {
        self.small.get(&CAddr::from_bytes([0; 32]))?;
        self.get(&CAddr::from_bytes([0; 32]))?;
        self.metrics.call_blocking(calls::FILE_CHECK, || {
            fs::metadata(&self.root).map(drop).map_err(|e| {
                DerivaError::io(
                    format!("reading the blob directory {}", self.root.display()),
                    &e,
                )
            })
        })
    }

    /// At most `limit` blobs whose address sorts after `after` (from the first when `None`),
    /// in address order, with their sizes: the small leaves' rows and the files of the shard
    /// directories merged. Holds one page of rows and the names of one shard directory at a
    /// time (a shard is 1/256 of the files); reads only the shards the page can reach.
    pub(super) fn list_page(
        &self,
        after: Option<CAddr>,
        limit: usize,
    ) -> Result<Vec<(CAddr, u64)>> {
        let rows = self.small.list_page(after, limit)?;
        // With a full page of rows, no file beyond the last row's shard can be in the page.
        let last_shard = match rows.last() {
            Some((last, _)) if rows.len() == limit => last.as_bytes()[0],
            _ => u8::MAX,
        };
        let files = self.metrics.call_blocking(calls::FILE_LIST, || {
            self.list_files(after, limit, last_shard)
        })?;
        let mut page: Vec<(CAddr, Option<u64>)> = rows
            .into_iter()
            .map(|(addr, size)| (addr, Some(size)))
            .chain(files.into_iter().map(|addr| (addr, None)))
            .collect();
        page.sort_by_key(|a| a.0);
        // A leaf that is both a row and a file (written under another threshold) once.
        page.dedup_by(|a, b| a.0 == b.0);
        page.truncate(limit);
        page.into_iter()
            .map(|(addr, size)| match size {
                Some(size) => Ok((addr, size)),
                // A file deleted since its shard was read: listed with size 0 (a reader finds
                // it gone, as it would had it gone just after the listing).
                None => match fs::metadata(path_of(&self.root, &addr)) {
                    Ok(meta) => Ok((addr, meta.len())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((addr, 0)),
                    Err(e) => Err(DerivaError::io(format!("sizing blob {addr}"), &e)),
                },
            })
            .collect()
    }

    /// The addresses of blob files after `after`, in order, from the shards from `after`'s
    /// to `last_shard`: whole shards, until at least `limit` are found.
    fn list_files(&self, after: Option<CAddr>, limit: usize, last_shard: u8) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        let first_shard = after.map_or(0, |a| a.as_bytes()[0]);
        for shard in first_shard..=last_shard {
            let mut names = self.shard_files(shard)?;
            names.retain(|a| after.is_none_or(|after| *a > after));
            names.sort();
            out.extend(names);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The addresses with a blob file in the directory of shard `shard`, in no order.
    fn shard_files(&self, shard: u8) -> Result<Vec<CAddr>> {
        let mut out = Vec::new();
        for entry in read_dir(&self.root.join(hex::encode([shard])))? {
            let name = entry.file_name();
            if let Some(addr) = name
                .to_str()
                .and_then(|n| n.parse::<CAddr>().ok().filter(|a| a.to_hex() == n))
                .filter(|a| a.as_bytes()[0] == shard)
            {
                out.push(addr);
            }
        }
        Ok(out)
    }
}

/// A blob opened for a streamed read: small enough to have been read whole, or a file.
#[derive(Debug)]
pub(super) enum Opened {
    Whole(Bytes),
    /// A small leaf larger than one chunk, to verify as it streams.
    Row(Bytes),
    File(File, PathBuf),
}

/// A streamed write of one leaf in progress: a file in `tmp/`, the hash and length so far.
/// Dropped before [`BlobFiles::finish_write`] publishes it, it removes its file.
#[derive(Debug)]
pub(super) struct StreamedWrite {
    addr: Option<CAddr>,
    tmp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    len: u64,
}

impl StreamedWrite {
    /// Appends `chunk` (blocking I/O: call it on the blocking pool).
    pub(super) fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let addr = self.addr;
        let file = self.file.as_mut().ok_or_else(|| {
            DerivaError::io(
                what_of(addr),
                &io::Error::other("the write was already finished"),
            )
        })?;
        file.write_all(chunk)
            .map_err(|e| DerivaError::io(what_of(addr), &e))?;
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }
}

impl Drop for StreamedWrite {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The context of a streamed write's I/O error.
fn what_of(addr: Option<CAddr>) -> String {
    match addr {
        Some(addr) => format!("writing blob {addr}"),
        None => "writing a streamed leaf".to_owned(),
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let entries =
        fs::read_dir(dir).map_err(|e| DerivaError::io(format!("listing {}", dir.display()), &e))?;
    entries
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| DerivaError::io(format!("listing {}", dir.display()), &e))
}

fn path_of(root: &Path, addr: &CAddr) -> PathBuf {
    let hex = addr.to_hex();
    root.join(&hex[..2]).join(hex)
}

fn read_verified(addr: &CAddr, path: &Path) -> Result<Option<Bytes>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DerivaError::io(format!("reading blob {addr}"), &e)),
    };
    let actual = CAddr::for_leaf(&data);
    if actual != *addr {
        tracing::error!(%addr, %actual, len = data.len(), path = %path.display(), "blob content does not match its address");
        return Err(DerivaError::Corrupted {
            addr: *addr,
            detail: format!("the {} bytes on disk hash to {actual}", data.len()),
        });
    }
    Ok(Some(Bytes::from(data)))
}

/// Sets the modification time of the blob file of `addr`, its last put, to now; `false` if
/// there is no such file. Under the publish lock, so a conditional delete sees either the old
/// time and deletes first, or the new one.
fn touch(root: &Path, publish: &Mutex<()>, addr: &CAddr) -> Result<bool> {
    let path = path_of(root, addr);
    let _guard = publish.lock();
    let file = match File::options().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DerivaError::io(format!("touching blob {addr}"), &e)),
    };
    file.set_modified(SystemTime::now())
        .map_err(|e| DerivaError::io(format!("touching blob {addr}"), &e))?;
    Ok(true)
}

/// For a small leaf being put: if it is a file already (written before small leaves were
/// rows, or with another threshold), refreshes the file's time and answers `true`; a damaged
/// file is removed (and uncounted), so the put writes the row instead; `false` if no file.
fn touch_or_drop(
    root: &Path,
    publish: &Mutex<()>,
    counters: &StoreCounters,
    addr: &CAddr,
) -> Result<bool> {
    let path = path_of(root, addr);
    match read_verified(addr, &path) {
        Ok(Some(_)) => touch(root, publish, addr),
        Ok(None) => Ok(false),
        Err(DerivaError::Corrupted { .. }) => {
            tracing::warn!(%addr, "replacing a corrupted blob file with a small leaf row");
            let _guard = publish.lock();
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => counters.count_blob(false, len),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DerivaError::io(format!("removing blob {addr}"), &e)),
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create_new(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DerivaError::io(format!("syncing directory {}", dir.display()), &e))
}
