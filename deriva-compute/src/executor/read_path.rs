//! The read path: one level of materialization, in its `materialize` span, looks in the memory
//! cache, then the spill directory, then (for a Get) asks the leaf store and the recipe index
//! at once, which opens a leaf or finds a recipe; a recipe, or an input found in neither, joins or starts a flight
//! (`super::single_flight`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, Recipe, Result};
use deriva_store::task::spawn_blocking_in;
use deriva_store::{ByteStream, Found, stream};
use futures::StreamExt as _;
use tracing::field::Empty;
use tracing::{Instrument, Span, info_span};

use super::single_flight::{Known, Materialized, ReservedOutput};
use super::{AsyncExecutor, DepthTracker, as_i64};
use crate::memory_cache::EntryKind;
use crate::metrics::Outcome;
use crate::spans::{self, field};

/// What a Get found at its address.
enum Opened {
    /// A leaf, opened.
    Leaf(LeafRead),
    /// A recipe, to materialize.
    Recipe(Recipe),
}

/// A leaf opened for a Get.
enum LeafRead {
    /// Read whole and verified (a small leaf the cache admitted), with the time it took.
    Whole(Bytes, Duration),
    /// Its chunks as they are read (the first ones may have been read already).
    Streaming(ByteStream),
}

impl AsyncExecutor {
    /// One level of materialization, in its own `materialize` span, starting from what the
    /// caller already `known` of `addr`.
    pub(super) fn materialize_at(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        known: Known,
    ) -> impl Future<Output = Materialized> + Send + 'static {
        let this = self.clone();
        let inner_tracker = tracker.clone();
        self.in_materialize_span(addr, depth, tracker, async move {
            this.lookup_or_resolve(addr, depth, inner_tracker, known)
                .await
        })
    }

    /// Runs `body`, one level of materialization, in its own `materialize` span, and counts
    /// its outcome and its time.
    pub(super) fn in_materialize_span<T: Send + 'static>(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        body: impl Future<Output = Result<(T, Outcome)>> + Send + 'static,
    ) -> impl Future<Output = Result<(T, Outcome)>> + Send + 'static {
        tracker.0.fetch_max(depth, Ordering::Relaxed);
        let span = info_span!(
            spans::MATERIALIZE,
            { field::ADDR } = %addr,
            { field::DEPTH } = i64::from(depth),
            { field::RESULT } = Empty,
            { field::ORIGIN_NODE } = Empty,
            { field::ORIGIN_AGE_SECONDS } = Empty,
            { field::ORIGIN_DURATION_SECONDS } = Empty,
            { field::ORIGIN_TRACE_ID } = Empty,
            { field::ORIGIN_SPAN_ID } = Empty
        );
        let this = self.clone();
        async move {
            let _active = this.state.stats.active_guard();
            let start = Instant::now();
            let result = body.await;
            let outcome = match &result {
                Ok((_, outcome)) => *outcome,
                Err(_) => Outcome::Error,
            };
            this.state.stats.record(outcome);
            this.state
                .metrics
                .materialize_duration
                .record(start.elapsed().as_secs_f64(), &[]);
            Span::current().record(field::RESULT, outcome.as_str());
            result
        }
        .instrument(span)
    }

    /// A Get's level: the cache, the spill directory, the leaf (see
    /// [`AsyncExecutor::get_stream`]), else the flight of the recipe found.
    pub(super) async fn cached_leaf_or_resolve(
        &self,
        addr: CAddr,
        chunk_bytes: usize,
        tracker: Arc<DepthTracker>,
    ) -> Result<(ByteStream, Outcome)> {
        if let Some(hit) = self.cache_check(&addr) {
            return Ok((stream::chunks(hit, chunk_bytes), Outcome::Hit));
        }
        if let Some(chunks) = self.spilled_stream(addr, chunk_bytes).await {
            self.spilled_origin(addr);
            return Ok((chunks, Outcome::Hit));
        }
        // Noted before the read: a deletion (garbage collection) from now on keeps this leaf
        // out of the cache.
        let generation = self.state.cache.generation(&addr);
        let read = info_span!(spans::LEAF_READ, { field::FOUND } = Empty);
        let opened = self
            .open_leaf_or_find_recipe(addr, chunk_bytes)
            .instrument(read.clone())
            .await;
        read.record(field::FOUND, matches!(opened, Ok(Opened::Leaf(_))));
        drop(read);
        let recipe = match self.count_corruption(opened)? {
            Opened::Leaf(LeafRead::Whole(bytes, cost)) => {
                self.cache_leaf(addr, &bytes, cost, generation);
                return Ok((stream::chunks(bytes, chunk_bytes), Outcome::Leaf));
            }
            Opened::Leaf(LeafRead::Streaming(chunks)) => {
                return Ok((self.counting_corruption(chunks), Outcome::Leaf));
            }
            Opened::Recipe(recipe) => recipe,
        };
        let (output, outcome) = self
            .join_or_start(addr, 0, tracker, Known::Recipe(recipe))
            .await?;
        // A spilled output streams from its file, so this call does not hold it while a slow
        // client reads; its reservation goes once every caller has let it go.
        if output.spilled
            && let Some(chunks) = self.open_spilled(addr, chunk_bytes).await
        {
            drop(output);
            return Ok((chunks, outcome));
        }
        let ReservedOutput {
            bytes, reservation, ..
        } = output;
        let chunks = stream::chunks(bytes, chunk_bytes).map(move |chunk| {
            let _covered = &reservation;
            chunk
        });
        Ok((chunks.boxed(), outcome))
    }

    /// An input's level: the cache, the spill directory, then its flight.
    async fn lookup_or_resolve(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        known: Known,
    ) -> Materialized {
        if let Some(hit) = self.cache_check(&addr) {
            return Ok((hit, Outcome::Hit));
        }
        if let Some(spilled) = self.spilled_bytes(addr).await {
            self.spilled_origin(addr);
            return Ok((spilled, Outcome::Hit));
        }
        // An input is covered by the reservation of the compute that uses it.
        let (output, outcome) = self.join_or_start(addr, depth, tracker, known).await?;
        Ok((output.bytes, outcome))
    }

    /// The cached output or leaf of `addr`, if any, in a `cache_check` span.
    fn cache_check(&self, addr: &CAddr) -> Option<Bytes> {
        let hit = info_span!(spans::CACHE_CHECK, { field::HIT } = Empty).in_scope(|| {
            let hit = self.state.cache.get(addr);
            Span::current().record(field::HIT, hit.is_some());
            hit
        })?;
        // Compute time saved: a leaf's cost is a read, not a compute.
        if hit.kind == EntryKind::Output {
            self.state.stats.record_saved(hit.cost);
            self.hit_origin(*addr, hit.record);
        }
        Some(hit.data)
    }

    /// A hit of the spilled output of `addr`: its origin, from the spill index.
    fn spilled_origin(&self, addr: CAddr) {
        let record = self.spill().and_then(|s| s.record(&addr));
        self.hit_origin(addr, record);
    }

    /// The spilled output of `addr` as a stream, if the spill directory holds it. A damaged
    /// file ends the stream with [`DerivaError::Corrupted`], counted as a corruption; a file
    /// that cannot be opened is logged and treated as absent.
    async fn spilled_stream(&self, addr: CAddr, chunk_bytes: usize) -> Option<ByteStream> {
        let spill = self.state.config.spill.as_ref()?;
        if !spill.store.contains(&addr) {
            return None;
        }
        self.open_spilled(addr, chunk_bytes).await
    }

    /// The spilled output of `addr` as a stream, as [`AsyncExecutor::spilled_stream`] opens
    /// it, for an output known to have been spilled (the directory is not asked first).
    async fn open_spilled(&self, addr: CAddr, chunk_bytes: usize) -> Option<ByteStream> {
        let spill = self.state.config.spill.as_ref()?;
        let opened = self.count_corruption(spill.store.stream(addr, chunk_bytes).await);
        self.absent_if_failed(addr, opened)
            .map(|chunks| self.counting_corruption(chunks))
    }

    /// The spilled output of `addr`, read whole and verified, if the spill directory holds it
    /// (as an input of another compute).
    async fn spilled_bytes(&self, addr: CAddr) -> Option<Bytes> {
        let spill = self.state.config.spill.as_ref()?;
        if !spill.store.contains(&addr) {
            return None;
        }
        let store = spill.store.clone();
        let read = spawn_blocking_in(Span::current(), move || store.get(&addr))
            .await
            .unwrap_or_else(|e| Err(DerivaError::from_join("reading a spilled output", e)));
        let read = self.count_corruption(read);
        self.absent_if_failed(addr, read)
    }

    /// For a Get: the leaf `addr` opened, or the recipe stored there, or
    /// [`DerivaError::NotFound`]. The leaf store and the recipe index are asked at once
    /// ([`deriva_store::Store::open`]), unless `addr` was read as a leaf before (its size is
    /// recorded): then the leaf store is the only one asked.
    async fn open_leaf_or_find_recipe(&self, addr: CAddr, chunk_bytes: usize) -> Result<Opened> {
        let start = Instant::now();
        let chunks = if self.state.budget.recorded_leaf(&addr).is_some() {
            // Gone since it was read (garbage collection): as if it never was.
            self.state
                .store
                .blobs()
                .get_stream(addr, chunk_bytes)
                .await?
                .ok_or(DerivaError::NotFound { addr })?
        } else {
            match self.state.store.open(addr, chunk_bytes).await? {
                Some(Found::Recipe(stored)) => return Ok(Opened::Recipe(stored.recipe)),
                Some(Found::Leaf(chunks)) => chunks,
                None => return Err(DerivaError::NotFound { addr }),
            }
        };
        let read = self.read_admitted(addr, chunks, start).await;
        if let LeafRead::Whole(bytes, _) = &read {
            self.state.budget.record_leaf(addr, bytes.len() as u64);
        }
        Ok(Opened::Leaf(read))
    }

    /// The leaf `addr`, opened as `chunks` at `start`. A leaf the cache admits (see
    /// [`Cache::admit_leaf`]) is read on while it fits the leaf limit
    /// ([`ExecutorConfig::leaf_cache_max_bytes`], within a sixteenth of the budget): whole if
    /// its stream ends cleanly there (so its bytes match its address), else streaming on from
    /// what was read, errors included.
    async fn read_admitted(&self, addr: CAddr, mut chunks: ByteStream, start: Instant) -> LeafRead {
        let limit = self.state.leaf_limit;
        if limit == 0 || !self.state.cache.admit_leaf(&addr) {
            return LeafRead::Streaming(chunks);
        }
        let mut read: Vec<Result<Bytes>> = Vec::new();
        let mut len = 0u64;
        loop {
            match chunks.next().await {
                None => {
                    // One exact copy: a chunk may be a slice of a much larger read buffer.
                    let mut whole = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                    for chunk in read.iter().flatten() {
                        whole.extend_from_slice(chunk);
                    }
                    return LeafRead::Whole(whole.into(), start.elapsed());
                }
                Some(Ok(chunk)) => {
                    len += chunk.len() as u64;
                    read.push(Ok(chunk));
                    if len > limit {
                        break;
                    }
                }
                Some(Err(e)) => {
                    read.push(Err(e));
                    break;
                }
            }
        }
        let rest = futures::stream::iter(read).chain(chunks);
        LeafRead::Streaming(rest.boxed())
    }

    /// Caches the verified bytes of the leaf `addr`, read in `cost`, unless it was deleted or
    /// invalidated since `generation`; in a `cache_put` span.
    fn cache_leaf(&self, addr: CAddr, bytes: &Bytes, cost: Duration, generation: u64) {
        info_span!(spans::CACHE_PUT, { field::BYTES } = as_i64(bytes.len())).in_scope(|| {
            self.state
                .cache
                .insert_leaf_if_current(addr, bytes.clone(), cost, generation)
        });
    }

    /// Whether an output of `len` bytes goes to the spill directory rather than the cache.
    pub(super) fn spills(&self, len: usize) -> bool {
        self.state
            .config
            .spill
            .as_ref()
            .is_some_and(|s| len as u64 > s.threshold)
    }

    /// `chunks`, with a [`DerivaError::Corrupted`] at their end counted as a corruption.
    fn counting_corruption(&self, chunks: ByteStream) -> ByteStream {
        let stats = self.state.stats.clone();
        chunks
            .inspect(move |item| {
                if let Err(DerivaError::Corrupted { .. }) = item {
                    stats.record_corruption();
                }
            })
            .boxed()
    }

    /// What a read of the spill directory found; a failed read is logged and taken as absent
    /// (the output is computed again).
    fn absent_if_failed<T>(&self, addr: CAddr, read: Result<Option<T>>) -> Option<T> {
        read.unwrap_or_else(|e| {
            tracing::warn!(%addr, error = %e, "could not read a spilled output; computing it instead");
            None
        })
    }
}
