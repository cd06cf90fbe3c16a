//! [`Cache`]: the in-memory, byte-budgeted, cost-aware cache of materialized outputs and of
//! hot small leaves.
//!
//! Eviction follows GreedyDual-Size: each entry has a priority `clock + cost/size`, where `cost`
//! is the measured compute time. The entry with the lowest priority is evicted first and the
//! clock advances to its priority, so entries that are cheap to recompute per byte go first,
//! while entries that are not used age out however costly they were. A hit refreshes the entry's
//! priority against the current clock.
//!
//! Each address has a generation that [`Cache::invalidate`] advances. A compute notes the
//! generation when it starts ([`Cache::generation`]) and caches its output with
//! [`Cache::insert_if_current`], which refuses it if an invalidation came in between: an
//! invalidation always wins over a compute that started before it. Generations are kept per
//! stripe of addresses (4096 stripes), so memory stays fixed; an invalidation of another address
//! of the same stripe only costs a compute its cache slot, never correctness.
//!
//! An entry is of one [`EntryKind`]: a recipe's output or a leaf. Both kinds share the byte budget
//! and the eviction order; a leaf's cost is the time its read from the store took, which is what
//! a hit on it saves. A leaf never goes stale (its bytes are its address) but it can be deleted,
//! so a read notes the leaf's generation before it starts and caches it with
//! [`Cache::insert_leaf_if_current`]: a deletion, which invalidates the address, wins over a
//! read that started before it. The cache admits a leaf only on its second read in recent
//! memory ([`Cache::admit_leaf`]), so a scan that reads many leaves once evicts nothing.
//!
//! A hit takes the lock shared: hits on many threads do not wait for one another. Only a hit on
//! an entry whose priority is stale (the clock has moved since its last refresh: something was
//! evicted) takes it exclusively, to re-rank the entry. Between two evictions every entry's
//! priority is already current, so a hot entry costs one shared lookup. (Among entries of equal
//! priority, eviction then follows the order of their last refresh, not of their last hit.)
//!
//! Hits, misses, evictions, bytes and entries (in all, and of leaves alone) are atomics in
//! [`CacheStats`], read without locks by `Status` and by the metrics callbacks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deriva_core::{CAddr, SignedRecord};
use parking_lot::RwLock;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// The computed output of a recipe.
    Output,
    /// The bytes of a leaf, verified when they were read from the store.
    Leaf,
}

/// Live cache counters.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    size_bytes: AtomicU64,
    entries: AtomicU64,
    leaf_hits: AtomicU64,
    leaf_bytes: AtomicU64,
    leaf_entries: AtomicU64,
}

impl CacheStats {
    /// Lookups that found an entry (of any kind).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that found nothing.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Entries evicted to stay within the byte budget (explicit invalidations not included).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Bytes held, outputs and leaves.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Relaxed)
    }

    /// Entries held, outputs and leaves.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Lookups that found a leaf (also counted in [`CacheStats::hits`]).
    pub fn leaf_hits(&self) -> u64 {
        self.leaf_hits.load(Ordering::Relaxed)
    }

    /// Bytes held by leaves (also counted in [`CacheStats::size_bytes`]).
    pub fn leaf_size_bytes(&self) -> u64 {
        self.leaf_bytes.load(Ordering::Relaxed)
    }

    /// Leaves held (also counted in [`CacheStats::entries`]).
    pub fn leaf_entries(&self) -> u64 {
        self.leaf_entries.load(Ordering::Relaxed)
    }

    /// `hits / (hits + misses)` since the cache was created; 0 before the first lookup.
    pub fn hit_rate(&self) -> f64 {
        let (h, m) = (self.hits(), self.misses());
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }

    /// Counts an entry of `kind` and `size` bytes in (`added`) or out.
    fn count(&self, kind: EntryKind, size: u64, added: bool) {
        let step = |counter: &AtomicU64, n: u64| {
            if added {
                counter.fetch_add(n, Ordering::Relaxed);
            } else {
                counter.fetch_sub(n, Ordering::Relaxed);
            }
        };
        step(&self.size_bytes, size);
        step(&self.entries, 1);
        if kind == EntryKind::Leaf {
            step(&self.leaf_bytes, size);
            step(&self.leaf_entries, 1);
        }
    }
}

/// A cache hit: the bytes, what they are, and what producing them cost.
#[derive(Debug, Clone)]
pub struct CacheHit {
    /// The cached bytes.
    pub data: Bytes,
    /// How long the compute that produced an output took, or the read of a leaf.
    pub cost: Duration,
    /// An output or a leaf.
    pub kind: EntryKind,
    /// An output's materialization record, if it came with one.
    pub record: Option<Arc<SignedRecord>>,
}

#[derive(Debug)]
struct Entry {
    data: Bytes,
    cost: Duration,
    kind: EntryKind,
    record: Option<Arc<SignedRecord>>,
    /// Key in `CacheEntries::order`.
    rank: (u64, u64),
}

impl Entry {
    fn hit(&self) -> CacheHit {
        CacheHit {
            data: self.data.clone(),
            cost: self.cost,
            kind: self.kind,
            record: self.record.clone(),
        }
    }
}

/// Number of generation stripes.
const STRIPES: usize = 4096;

/// Slots of the admission filter of leaves: each remembers the last leaf read whose address
/// falls in it.
const READ_SLOTS: usize = 4096;

/// The entries, their eviction order and the invalidation generations, under one lock.
#[derive(Debug)]
struct CacheEntries {
    map: HashMap<CAddr, Entry>,
    /// (priority, sequence) → address, lowest first.
    order: BTreeSet<(u64, u64, CAddr)>,
    clock: u64,
    seq: u64,
    /// Invalidation generations, by stripe of address.
    generations: Box<[u64]>,
}

impl Default for CacheEntries {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeSet::new(),
            clock: 0,
            seq: 0,
            generations: vec![0; STRIPES].into_boxed_slice(),
        }
    }
}

/// The generation stripe of an address (its bytes are a uniform hash already).
fn stripe(addr: &CAddr) -> usize {
    let b = addr.as_bytes();
    usize::from(u16::from_le_bytes([b[0], b[1]])) % STRIPES
}

/// The admission slot of a leaf, and the fingerprint it leaves there (never 0, which is an
/// empty slot).
fn read_slot(addr: &CAddr) -> (usize, u64) {
    let b = addr.as_bytes();
    let slot = usize::from(u16::from_le_bytes([b[2], b[3]])) % READ_SLOTS;
    let mut fingerprint = [0; 8];
    fingerprint.copy_from_slice(&b[8..16]);
    (slot, u64::from_le_bytes(fingerprint) | 1)
}

impl CacheEntries {
    /// The priority an entry of `cost` and `size` has against the current clock.
    fn priority(&self, cost: Duration, size: usize) -> u64 {
        // Nanoseconds of compute per KiB held; an empty output counts as one byte.
        let per_kib = (cost.as_nanos().saturating_mul(1024) / size.max(1) as u128) as u64;
        self.clock.saturating_add(per_kib)
    }

    fn rank(&mut self, cost: Duration, size: usize) -> (u64, u64) {
        self.seq += 1;
        (self.priority(cost, size), self.seq)
    }
}

/// The cache. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Cache {
    budget: u64,
    inner: RwLock<CacheEntries>,
    stats: Arc<CacheStats>,
    /// The admission filter of leaves (see [`Cache::admit_leaf`]).
    reads: Box<[AtomicU64]>,
}

impl Cache {
    /// A cache that holds at most `budget_bytes` of data.
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget: budget_bytes,
            inner: RwLock::default(),
            stats: Arc::default(),
            reads: (0..READ_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// Looks `addr` up, counting a hit or a miss, and refreshes the entry's priority on a hit.
    pub fn get(&self, addr: &CAddr) -> Option<CacheHit> {
        {
            let inner = self.inner.read();
            let Some(entry) = inner.map.get(addr) else {
                drop(inner);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if inner.priority(entry.cost, entry.data.len()) == entry.rank.0 {
                let hit = entry.hit();
                drop(inner);
                return Some(self.count_hit(hit));
            }
        }
        // The clock moved since the entry's last refresh: re-rank it.
        let mut inner = self.inner.write();
        let Some((cost, size, old)) = inner.map.get(addr).map(|e| (e.cost, e.data.len(), e.rank))
        else {
            drop(inner);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let rank = inner.rank(cost, size);
        inner.order.remove(&(old.0, old.1, *addr));
        inner.order.insert((rank.0, rank.1, *addr));
        let entry = inner.map.get_mut(addr)?;
        entry.rank = rank;
        let hit = entry.hit();
        drop(inner);
        Some(self.count_hit(hit))
    }

    fn count_hit(&self, hit: CacheHit) -> CacheHit {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        if hit.kind == EntryKind::Leaf {
            self.stats.leaf_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Whether `addr` is cached, without counting a lookup or touching its priority.
    pub fn contains(&self, addr: &CAddr) -> bool {
        self.inner.read().map.contains_key(addr)
    }

    /// What the entry of `addr` holds, if there is one, without counting a lookup or touching
    /// its priority.
    pub fn kind_of(&self, addr: &CAddr) -> Option<EntryKind> {
        self.inner.read().map.get(addr).map(|e| e.kind)
    }

    /// The record of the cached output of `addr`, if it has one, without counting a lookup or
    /// touching its priority.
    pub fn record_of(&self, addr: &CAddr) -> Option<Arc<SignedRecord>> {
        self.inner.read().map.get(addr)?.record.clone()
    }

    /// The size of the cached entry of `addr`, if any, without counting a lookup or changing
    /// its rank.
    pub fn size_of(&self, addr: &CAddr) -> Option<u64> {
        self.inner.read().map.get(addr).map(|e| e.data.len() as u64)
    }

    /// Caches `data` as the output of `addr`, evicting lower-priority entries as needed.
    /// Returns the addresses evicted. An output larger than the whole budget is not cached.
    pub fn insert(&self, addr: CAddr, data: Bytes, cost: Duration) -> Vec<CAddr> {
        let inner = self.inner.write();
        self.insert_locked(inner, addr, (data, None), cost, EntryKind::Output)
    }

    /// The invalidation generation of `addr`, to pass to [`Cache::insert_if_current`] or
    /// [`Cache::insert_leaf_if_current`].
    pub fn generation(&self, addr: &CAddr) -> u64 {
        self.inner.read().generations[stripe(addr)]
    }

    /// Like [`Cache::insert`], with the output's materialization `record`, unless `addr` was
    /// invalidated since `generation` was read: then nothing is cached and this returns `None`.
    pub fn insert_if_current(
        &self,
        addr: CAddr,
        (data, record): (Bytes, Option<Arc<SignedRecord>>),
        cost: Duration,
        generation: u64,
    ) -> Option<Vec<CAddr>> {
        self.insert_kind_if_current(addr, (data, record), cost, generation, EntryKind::Output)
    }

    /// Caches `data`, the verified bytes of the leaf `addr` whose read took `cost`, like an
    /// output (same budget, same eviction order), unless `addr` was invalidated (deleted) since
    /// `generation` was read: then nothing is cached and this returns `None`. `data` is held
    /// as it is: pass bytes that own no more memory than their length.
    pub fn insert_leaf_if_current(
        &self,
        addr: CAddr,
        data: Bytes,
        cost: Duration,
        generation: u64,
    ) -> Option<Vec<CAddr>> {
        self.insert_kind_if_current(addr, (data, None), cost, generation, EntryKind::Leaf)
    }

    /// Notes a read of the leaf `addr` from the store, and tells whether to cache it: whether
    /// the same leaf was the last one read of its slot (one of 4096, by address). So a leaf is
    /// cached on its second read, unless other leaves of its slot were read in between, and
    /// leaves read once never take the place of anything. Lock-free; costs one atomic swap.
    pub fn admit_leaf(&self, addr: &CAddr) -> bool {
        let (slot, fingerprint) = read_slot(addr);
        self.reads[slot].swap(fingerprint, Ordering::Relaxed) == fingerprint
    }

    fn insert_kind_if_current(
        &self,
        addr: CAddr,
        data: (Bytes, Option<Arc<SignedRecord>>),
        cost: Duration,
        generation: u64,
        kind: EntryKind,
    ) -> Option<Vec<CAddr>> {
        let inner = self.inner.write();
        if inner.generations[stripe(&addr)] != generation {
            tracing::debug!(%addr, ?kind, "invalidated while it was read or computed; not cached");
            return None;
        }
        Some(self.insert_locked(inner, addr, data, cost, kind))
    }

    /// Advances the generation of `addr`, so no compute or leaf read that started earlier
    /// caches it, and removes it; returns whether it was cached.
    pub fn invalidate(&self, addr: &CAddr) -> bool {
        let mut inner = self.inner.write();
        let g = &mut inner.generations[stripe(addr)];
        *g = g.wrapping_add(1);
        self.remove_locked(&mut inner, addr)
    }

    /// Invalidates everything: every generation advances and every entry goes (after a node
    /// may have missed invalidations from other nodes). Returns how many entries were cached.
    pub fn invalidate_all(&self) -> usize {
        let mut inner = self.inner.write();
        for g in inner.generations.iter_mut() {
            *g = g.wrapping_add(1);
        }
        let gone = inner.map.len();
        for entry in inner.map.values() {
            self.stats.count(entry.kind, entry.data.len() as u64, false);
        }
        inner.map.clear();
        inner.order.clear();
        gone
    }

    fn insert_locked(
        &self,
        mut inner: parking_lot::RwLockWriteGuard<'_, CacheEntries>,
        addr: CAddr,
        (data, record): (Bytes, Option<Arc<SignedRecord>>),
        cost: Duration,
        kind: EntryKind,
    ) -> Vec<CAddr> {
        let size = data.len() as u64;
        if size > self.budget {
            drop(inner);
            tracing::debug!(%addr, size, budget = self.budget, ?kind, "larger than the cache budget; not cached");
            return Vec::new();
        }
        let mut evicted = Vec::new();
        self.remove_locked(&mut inner, &addr);
        while self.stats.size_bytes() + size > self.budget {
            let Some((priority, _, victim)) = inner.order.pop_first() else {
                break;
            };
            inner.clock = priority;
            if let Some(gone) = inner.map.remove(&victim) {
                self.stats.count(gone.kind, gone.data.len() as u64, false);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                evicted.push(victim);
            }
        }
        let rank = inner.rank(cost, data.len());
        inner.order.insert((rank.0, rank.1, addr));
        inner.map.insert(
            addr,
            Entry {
                data,
                cost,
                kind,
                record,
                rank,
            },
        );
        self.stats.count(kind, size, true);
        drop(inner);
        if !evicted.is_empty() {
            tracing::debug!(%addr, evicted = evicted.len(), "cache evicted entries to stay within budget");
        }
        evicted
    }

    /// Removes `addr`; returns whether it was cached.
    pub fn remove(&self, addr: &CAddr) -> bool {
        let mut inner = self.inner.write();
        self.remove_locked(&mut inner, addr)
    }

    fn remove_locked(&self, inner: &mut CacheEntries, addr: &CAddr) -> bool {
        let Some(old) = inner.map.remove(addr) else {
            return false;
        };
        inner.order.remove(&(old.rank.0, old.rank.1, *addr));
        self.stats.count(old.kind, old.data.len() as u64, false);
        true
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> CAddr {
        CAddr::from_bytes([n; 32])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn get_counts_hits_and_misses() {
        let cache = Cache::new(1024);
        assert!(cache.get(&addr(1)).is_none());
        cache.insert(addr(1), Bytes::from_static(b"abc"), ms(5));
        let hit = cache.get(&addr(1)).unwrap();
        assert_eq!(hit.data, &b"abc"[..]);
        assert_eq!(hit.cost, ms(5));
        let s = cache.stats();
        assert_eq!(
            (s.hits(), s.misses(), s.entries(), s.size_bytes()),
            (1, 1, 1, 3)
        );
        assert!((s.hit_rate() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn stays_within_budget_and_evicts_cheap_per_byte_first() {
        let cache = Cache::new(300);
        // Same size, different compute cost: the cheap one must go first.
        cache.insert(addr(1), Bytes::from(vec![0; 100]), ms(100));
        cache.insert(addr(2), Bytes::from(vec![0; 100]), ms(1));
        cache.insert(addr(3), Bytes::from(vec![0; 100]), ms(50));
        let evicted = cache.insert(addr(4), Bytes::from(vec![0; 100]), ms(20));
        assert_eq!(evicted, vec![addr(2)]);
        assert!(cache.stats().size_bytes() <= 300);
        assert_eq!(cache.stats().evictions(), 1);
        // A large cheap entry is worth less per byte than a small costly one.
        let cache = Cache::new(1000);
        cache.insert(addr(1), Bytes::from(vec![0; 900]), ms(10));
        cache.insert(addr(2), Bytes::from(vec![0; 10]), ms(5));
        let evicted = cache.insert(addr(3), Bytes::from(vec![0; 500]), ms(10));
        assert_eq!(evicted, vec![addr(1)]);
        assert!(cache.contains(&addr(2)) && cache.contains(&addr(3)));
    }

    #[test]
    fn invalidate_all_empties_and_outdates_every_generation() {
        let cache = Cache::new(1000);
        let generations: Vec<u64> = (1..=3).map(|i| cache.generation(&addr(i))).collect();
        cache.insert(addr(1), Bytes::from(vec![0; 100]), ms(1));
        cache.insert(addr(2), Bytes::from(vec![0; 50]), ms(1));
        assert_eq!(cache.invalidate_all(), 2);
        assert_eq!(
            (cache.stats().entries(), cache.stats().size_bytes()),
            (0, 0)
        );
        assert!(!cache.contains(&addr(1)));
        // A compute that noted its generation before cannot cache its output now.
        for (i, g) in (1..=3).zip(generations) {
            assert!(
                cache
                    .insert_if_current(addr(i), (Bytes::from_static(b"x"), None), ms(1), g)
                    .is_none()
            );
        }
        let fresh = cache.generation(&addr(3));
        assert!(
            cache
                .insert_if_current(addr(3), (Bytes::from_static(b"x"), None), ms(1), fresh)
                .is_some()
        );
    }

    #[test]
    fn unused_costly_entries_age_out() {
        let cache = Cache::new(200);
        cache.insert(addr(1), Bytes::from(vec![0; 100]), ms(30));
        // Keep inserting cheap entries; each eviction advances the clock, so the costly entry,
        // never used again, is eventually evicted too.
        for i in 2..40u8 {
            cache.insert(addr(i), Bytes::from(vec![0; 100]), ms(2));
        }
        assert!(!cache.contains(&addr(1)));
        assert!(cache.stats().size_bytes() <= 200);
    }

    /// A hit between two evictions reads under the shared lock; after an eviction moved the
    /// clock, a hit re-ranks its entry, which then outlives one of equal cost that was not hit.
    /// Hits from many threads at once all count.
    #[test]
    fn hits_share_the_lock_and_a_hit_after_an_eviction_re_ranks() {
        let cache = std::sync::Arc::new(Cache::new(3));
        cache.insert(addr(1), Bytes::from_static(b"a"), ms(10));
        cache.insert(addr(2), Bytes::from_static(b"b"), ms(10));
        cache.insert(addr(3), Bytes::from_static(b"c"), ms(1));
        // addr(3) is the cheapest: evicted, and the clock moves to its priority.
        assert_eq!(
            cache.insert(addr(4), Bytes::from_static(b"d"), ms(20)),
            [addr(3)]
        );
        assert!(
            cache.get(&addr(2)).is_some(),
            "re-ranked against the new clock"
        );
        // addr(1) and addr(2) cost the same; only addr(2) was refreshed since the clock moved.
        assert_eq!(
            cache.insert(addr(5), Bytes::from_static(b"e"), ms(20)),
            [addr(1)]
        );
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| cache.get(&addr(4)).is_some()).count()
                })
            })
            .collect();
        let hits: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(hits, 4000);
        assert_eq!(cache.stats().hits(), 4001);
    }

    #[test]
    fn oversized_outputs_are_not_cached_and_remove_works() {
        let cache = Cache::new(10);
        assert!(
            cache
                .insert(addr(1), Bytes::from(vec![0; 11]), ms(1))
                .is_empty()
        );
        assert!(!cache.contains(&addr(1)));
        cache.insert(addr(2), Bytes::from_static(b"12345"), ms(1));
        cache.insert(addr(2), Bytes::from_static(b"1234"), ms(1));
        assert_eq!(
            (cache.stats().entries(), cache.stats().size_bytes()),
            (1, 4)
        );
        assert!(cache.remove(&addr(2)));
        assert!(!cache.remove(&addr(2)));
        assert_eq!(
            (cache.stats().entries(), cache.stats().size_bytes()),
            (0, 0)
        );
    }

    #[test]
    fn leaves_share_the_budget_and_are_counted_apart() {
        let cache = Cache::new(300);
        let g = |n| cache.generation(&addr(n));
        cache.insert(addr(1), Bytes::from(vec![0; 100]), ms(50));
        let (g2, g3) = (g(2), g(3));
        assert_eq!(
            cache.insert_leaf_if_current(addr(2), Bytes::from(vec![0; 100]), ms(40), g2),
            Some(vec![])
        );
        cache.insert_leaf_if_current(addr(3), Bytes::from(vec![0; 50]), ms(1), g3);
        let s = cache.stats().clone();
        assert_eq!((s.entries(), s.size_bytes()), (3, 250));
        assert_eq!((s.leaf_entries(), s.leaf_size_bytes()), (2, 150));
        assert_eq!(cache.kind_of(&addr(2)), Some(EntryKind::Leaf));
        assert_eq!(cache.kind_of(&addr(1)), Some(EntryKind::Output));
        // A hit says what it found; leaf hits are hits too.
        assert_eq!(cache.get(&addr(2)).unwrap().kind, EntryKind::Leaf);
        assert_eq!(cache.get(&addr(1)).unwrap().kind, EntryKind::Output);
        assert_eq!((s.hits(), s.leaf_hits()), (2, 1));
        // An output that needs room evicts by priority, whatever the kind: the cheap leaf first.
        let evicted = cache.insert(addr(4), Bytes::from(vec![0; 100]), ms(30));
        assert_eq!(evicted, vec![addr(3)]);
        assert!(s.size_bytes() <= 300);
        assert_eq!((s.leaf_entries(), s.leaf_size_bytes()), (1, 100));
        // A leaf deleted (invalidated) while it was read is not cached.
        let g5 = g(5);
        assert!(!cache.invalidate(&addr(5)));
        assert!(
            cache
                .insert_leaf_if_current(addr(5), Bytes::from_static(b"x"), ms(1), g5)
                .is_none()
        );
        assert!(cache.invalidate(&addr(2)));
        assert_eq!((s.leaf_entries(), s.leaf_size_bytes()), (0, 0));
        assert_eq!((s.entries(), s.size_bytes()), (2, 200));
        let g6 = g(6);
        cache.insert_leaf_if_current(addr(6), Bytes::from_static(b"leaf"), ms(1), g6);
        assert_eq!(cache.invalidate_all(), 3);
        assert_eq!(
            (
                s.entries(),
                s.size_bytes(),
                s.leaf_entries(),
                s.leaf_size_bytes()
            ),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn a_leaf_is_admitted_on_its_second_read() {
        let cache = Cache::new(1000);
        assert!(!cache.admit_leaf(&addr(1)), "first read");
        assert!(cache.admit_leaf(&addr(1)), "second read");
        assert!(cache.admit_leaf(&addr(1)), "and on");
        // Another leaf of the same slot read in between: the first one starts over.
        let mut other = [1u8; 32];
        other[8] = 2;
        let other = CAddr::from_bytes(other);
        assert_eq!(read_slot(&other).0, read_slot(&addr(1)).0);
        assert!(!cache.admit_leaf(&other));
        assert!(!cache.admit_leaf(&addr(1)));
        assert!(cache.admit_leaf(&addr(1)));
        // Admission is only a note: nothing is cached by it.
        assert_eq!(cache.stats().entries(), 0);
    }
}
