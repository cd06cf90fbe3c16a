//! The local read-through cache: a directory on this node's disk holding copies of remote
//! leaves (and outputs), bounded in bytes, least recently used evicted first.
//!
//! Its files are named by address and are verified on every read like any stored bytes: a
//! damaged copy is deleted and the read goes to the object store. Nothing in it is the only
//! copy of anything, so it is written without fsync and may be deleted at any time while the
//! server is stopped.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use deriva_core::error::Result;
use deriva_core::{CAddr, DerivaError};
use parking_lot::Mutex;

/// A bounded directory of verified copies.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    tmp_seq: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Address → (size, last use).
    entries: HashMap<CAddr, (u64, u64)>,
    /// Last use → address, oldest first.
    by_use: BTreeMap<u64, CAddr>,
    bytes: u64,
    clock: u64,
}

impl State {
    fn touch(&mut self, addr: CAddr) -> bool {
        self.clock += 1;
        let now = self.clock;
        match self.entries.get_mut(&addr) {
            Some((_, used)) => {
                self.by_use.remove(used);
                *used = now;
                self.by_use.insert(now, addr);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, addr: &CAddr) -> bool {
        match self.entries.remove(addr) {
            Some((size, used)) => {
                self.by_use.remove(&used);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
}

impl DiskCache {
    /// Opens the cache in `dir` (created if needed) with room for `max_bytes`. Copies left by an
    /// earlier run are kept (oldest first to go) up to the bound; temporary files are removed.
    /// Blocks while it scans the directory.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| DerivaError::io(format!("creating {}", dir.display()), &e))?;
        let cache = Self {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(State::default()),
            tmp_seq: AtomicU64::new(0),
        };
        let listing = fs::read_dir(dir)
            .map_err(|e| DerivaError::io(format!("listing {}", dir.display()), &e))?;
        let mut victims = Vec::new();
        {
            let mut state = cache.state.lock();
            for entry in listing.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                    continue;
                }
                let Some(addr) = parse_name(&name) else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                state.clock += 1;
                let now = state.clock;
                state.entries.insert(addr, (meta.len(), now));
                state.by_use.insert(now, addr);
                state.bytes += meta.len();
            }
            victims.extend(cache.evict(&mut state));
        }
        for addr in victims {
            let _ = fs::remove_file(cache.path_of(&addr));
        }
        Ok(cache)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    fn path_of(&self, addr: &CAddr) -> PathBuf {
        self.dir.join(addr.to_hex())
    }

    /// Removes the least recently used entries until the cache fits; returns them.
    fn evict(&self, state: &mut State) -> Vec<CAddr> {
        let mut out = Vec::new();
        while state.bytes > self.max_bytes {
            let Some((_, addr)) = state.by_use.pop_first() else {
                break;
            };
            if let Some((size, _)) = state.entries.remove(&addr) {
                state.bytes -= size;
            }
            out.push(addr);
        }
        out
    }

    /// The verified copy of `addr`, if the cache holds one. A damaged copy is dropped.
    /// Blocking: call it on the blocking pool.
    pub(crate) fn get(&self, addr: &CAddr) -> Option<Bytes> {
        if !self.state.lock().touch(*addr) {
            return None;
        }
        match fs::read(self.path_of(addr)) {
            Ok(bytes) if CAddr::for_leaf(&bytes) == *addr => Some(Bytes::from(bytes)),
            Ok(_) => {
                tracing::warn!(%addr, "dropping a damaged copy from the local cache");
                self.remove(addr);
                None
            }
            Err(_) => {
                self.state.lock().remove(addr);
                None
            }
        }
    }

    /// Keeps a copy of `bytes` (whose address is `addr`), evicting older copies to make room.
    /// Data larger than a quarter of the cache is not kept. Failures are logged, never
    /// returned: the cache is an optimisation. Blocking: call it on the blocking pool.
    pub(crate) fn put(&self, addr: &CAddr, bytes: &[u8]) {
        let size = bytes.len() as u64;
        if size > self.max_bytes / 4 || self.state.lock().touch(*addr) {
            return;
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{}.{seq}.tmp", addr.to_hex()));
        let path = self.path_of(addr);
        if let Err(e) = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(%addr, error = %e, "could not keep a copy in the local cache");
            return;
        }
        let victims = {
            let mut state = self.state.lock();
            state.clock += 1;
            let now = state.clock;
            if state.entries.insert(*addr, (size, now)).is_none() {
                state.bytes += size;
            }
            state.by_use.insert(now, *addr);
            self.evict(&mut state)
        };
        for victim in victims {
            let _ = fs::remove_file(self.path_of(&victim));
        }
    }

    /// Drops the copy of `addr`, if any. Blocking.
    pub(crate) fn remove(&self, addr: &CAddr) {
        if self.state.lock().remove(addr) {
            let _ = fs::remove_file(self.path_of(addr));
        }
    }
}

fn parse_name(name: &str) -> Option<CAddr> {
    if name.len() != 64 {
        return None;
    }
    let bytes = hex::decode(name).ok()?;
    CAddr::from_slice(&bytes).ok()
}

/// Runs `f` with the cache on the blocking pool, in the caller's trace.
pub(crate) async fn on_pool<T: Send + 'static>(
    cache: &Arc<DiskCache>,
    f: impl FnOnce(&DiskCache) -> T + Send + 'static,
) -> Option<T> {
    let cache = cache.clone();
    deriva_store::task::spawn_blocking_in(tracing::Span::current(), move || f(&cache))
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lru_with_verified_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 100).unwrap();
        let blob = |b: u8| vec![b; 20];
        let addrs: Vec<CAddr> = (0..5).map(|b| CAddr::for_leaf(&blob(b))).collect();
        for (i, addr) in addrs.iter().enumerate() {
            cache.put(addr, &blob(i as u8));
        }
        assert_eq!(cache.bytes(), 100);
        // Use the oldest, then add one more: the second oldest goes.
        assert!(cache.get(&addrs[0]).is_some());
        let extra = CAddr::for_leaf(&blob(9));
        cache.put(&extra, &blob(9));
        assert_eq!(cache.bytes(), 100);
        assert!(cache.get(&addrs[1]).is_none());
        assert!(cache.get(&addrs[0]).is_some());
        // Too large for the cache: not kept.
        let big = vec![1u8; 26];
        cache.put(&CAddr::for_leaf(&big), &big);
        assert!(cache.get(&CAddr::for_leaf(&big)).is_none());
        // A damaged copy is never served, and is dropped.
        fs::write(dir.path().join(addrs[2].to_hex()), b"not the bytes").unwrap();
        assert!(cache.get(&addrs[2]).is_none());
        assert!(!dir.path().join(addrs[2].to_hex()).exists());
        // Reopening keeps the copies.
        drop(cache);
        let cache = DiskCache::open(dir.path(), 100).unwrap();
        assert!(cache.get(&addrs[0]).is_some());
        assert_eq!(cache.bytes(), 80);
    }
}
