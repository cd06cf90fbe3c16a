//! Compute: a flight's work once the read path found nothing. The recipe is read and checked
//! against its function and the memory budget, the shared output tier is asked, the inputs are
//! materialized (each through the read path), and the function runs on the blocking pool under
//! a compute permit and a memory reservation, twice when verifying. The output is then kept in
//! the memory cache or the spill directory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deriva_core::{CAddr, DerivaError, FunctionId, Recipe, Result, SignedRecord};
use deriva_store::task::spawn_blocking_in;
use deriva_store::{Found, LeaseEnd, Located, StoredOutput};
use tracing::field::Empty;
use tracing::{Instrument, Span, info_span};

use super::lease::Leased;
use super::single_flight::{FlightResult, Known, ReservedOutput};
use super::{AsyncExecutor, DepthTracker, as_i64, invalid_recipe};
use crate::budget::Reservation;
use crate::function::{CancelToken, ComputeContext, ComputeFunction, FunctionError};
use crate::metrics::{ExecStats, Outcome};
use crate::spans::{self, field};

/// What [`AsyncExecutor::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Whether both runs gave the same bytes.
    pub deterministic: bool,
    /// BLAKE3 of the first run's output.
    pub output_hash: CAddr,
    /// BLAKE3 of the second run's output (equal to `output_hash` when deterministic).
    pub second_hash: CAddr,
    /// Size of the output in bytes (0 when the runs disagreed).
    pub output_size: u64,
    /// Time of the first run (zero when the runs disagreed).
    pub compute_time: Duration,
}

/// What a flight found at its address.
enum LeafOrRecipe {
    Leaf(Bytes),
    Recipe(Recipe),
}

/// Where [`AsyncExecutor::cache_or_spill`] kept an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeptIn {
    /// The memory cache, whose budget covers it from then on.
    Cache,
    /// The spill directory.
    Spill,
    /// Nowhere: an invalidation came first, or the write failed.
    Nowhere,
}

impl AsyncExecutor {
    /// The work of a flight: the leaf `addr` read whole, or its recipe computed (from what
    /// the caller already `known`). Runs inside the flight's task.
    pub(super) async fn resolve(
        &self,
        addr: CAddr,
        depth: u32,
        tracker: Arc<DepthTracker>,
        known: Known,
    ) -> FlightResult {
        // Noted before anything is read: an invalidation from now on keeps this output out of
        // the cache.
        let generation = self.state.cache.generation(&addr);
        let recipe = match known {
            Known::Recipe(recipe) => recipe,
            known => match self.leaf_or_recipe(addr, known).await? {
                LeafOrRecipe::Leaf(bytes) => {
                    // Known from now on, for the budget checks of the recipes that use it.
                    self.state.budget.record_leaf(addr, bytes.len() as u64);
                    let leaf = ReservedOutput {
                        bytes,
                        reservation: None,
                        spilled: false,
                    };
                    return Ok((leaf, Outcome::Leaf));
                }
                LeafOrRecipe::Recipe(recipe) => recipe,
            },
        };
        // Before anything is read: refuse a recipe its function does not accept (stored before
        // a bound existed, or planted in the store), and what could never fit the memory budget.
        let function = self.runnable(Some(addr), &recipe)?;
        let inputs_known = self.check_budget(addr, &recipe, &function).await?;
        let outputs = self.state.store.outputs();
        let mut lease = None;
        if let Some(outputs) = outputs {
            let stored = match self.read_output_tier(outputs, addr).await {
                Some(output) => Some(output),
                // With leases, another node may be computing it: wait for its output, or take
                // the lease and compute.
                None => match self.state.store.leases() {
                    Some(leases) => match self.lease_or_output(leases, outputs, addr).await {
                        Leased::Output(output) => Some(*output),
                        Leased::Lease(held) => {
                            lease = held;
                            None
                        }
                    },
                    None => None,
                },
            };
            if let Some(output) = stored {
                return self.stored_output(addr, output, generation).await;
            }
        }
        let inputs =
            futures::future::try_join_all(recipe.inputs().iter().zip(inputs_known).map(
                |(input, known)| self.materialize_at(*input, depth + 1, tracker.clone(), known),
            ))
            .await?;
        let inputs: Vec<Bytes> = inputs.into_iter().map(|(bytes, _)| bytes).collect();
        // Held until the output is kept (cache or spill) and handed to the callers.
        let (output, cost, reserved, record) = self
            .compute(addr, &recipe, &function, inputs, false)
            .await?;
        let kept = self
            .cache_or_spill(addr, &output, cost, generation, Some(record.clone()))
            .await;
        // Not after an invalidation that came in meanwhile: that output is what it evicted.
        if self.state.cache.generation(&addr) == generation {
            let mut recorded = false;
            if let Some(outputs) = outputs {
                let write =
                    info_span!(spans::OUTPUT_WRITE, { field::BYTES } = as_i64(output.len()));
                match outputs
                    .put(addr, output.clone(), Some(&record))
                    .instrument(write)
                    .await
                {
                    // The nodes waiting on this lease read it from the tier now.
                    Ok(()) => {
                        recorded = true;
                        if let Some(lease) = lease.take() {
                            lease.release(LeaseEnd::Done).await;
                        }
                    }
                    // The output tier saves recomputes; losing a write costs one later (the
                    // lease, dropped below, ends failed: its waiters compute).
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "could not keep the output in the output tier");
                    }
                }
            }
            // The tier keeps the record with the output; else the store's records do.
            if !recorded {
                self.keep_record(&record).await;
            }
        }
        if let Some(lease) = lease {
            lease.release(LeaseEnd::Failed).await;
        }
        // A cached output counts against the cache's budget from now on; any other stays
        // covered while its callers hold it.
        let computed = ReservedOutput {
            bytes: output,
            reservation: (kept != KeptIn::Cache).then_some(reserved),
            spilled: kept == KeptIn::Spill,
        };
        Ok((computed, Outcome::Computed))
    }

    /// The output of `addr` read from the output tier, recorded and kept like a computed one;
    /// a hit of its origin.
    async fn stored_output(
        &self,
        addr: CAddr,
        stored: StoredOutput,
        generation: u64,
    ) -> FlightResult {
        let StoredOutput {
            bytes: output,
            record,
        } = stored;
        let record = record.map(Arc::new);
        self.state.budget.record(addr, output.len() as u64);
        self.hit_origin(addr, record.clone());
        let cost = record
            .as_ref()
            .map_or(Duration::ZERO, |r| r.record.duration());
        let kept = self
            .cache_or_spill(addr, &output, cost, generation, record)
            .await;
        let stored = ReservedOutput {
            bytes: output,
            reservation: None,
            spilled: kept == KeptIn::Spill,
        };
        Ok((stored, Outcome::Stored))
    }

    /// What materializing the recipe `addr` is known to need in memory before anything is
    /// read: its inputs' sizes where known (recorded sizes, else leaf sizes from one question
    /// to the store per input, [`deriva_core::Store::locate`]) and its output's (from the
    /// function, or recorded). Refused with [`DerivaError::OverBudget`] if that alone exceeds
    /// the memory budget. Returns what it learnt of each input, for its materialization: a
    /// leaf found here is read without asking the store what it is, and a recipe found here is
    /// not read again.
    async fn check_budget(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        function: &Arc<dyn ComputeFunction>,
    ) -> Result<Vec<Known>> {
        let budget = &self.state.budget;
        let answers = futures::future::join_all(recipe.inputs().iter().map(|input| async move {
            if let Some(size) = budget.recorded_leaf(input) {
                return (Some(size), Known::Leaf);
            }
            if let Some(size) = budget.recorded(input) {
                return (Some(size), Known::Nothing);
            }
            match self.state.store.locate(*input).await {
                Ok(Some(Located::Leaf { size })) => {
                    budget.record_leaf(*input, size);
                    (Some(size), Known::Leaf)
                }
                // A recipe's output size is known only once computed.
                Ok(Some(Located::Recipe(stored))) => (None, Known::Recipe(stored.recipe)),
                // Nothing, or an error: the input's own materialization asks again and reports
                // it.
                Ok(None) | Err(_) => (None, Known::Nothing),
            }
        }))
        .await;
        let known: u64 = answers.iter().filter_map(|(size, _)| *size).sum();
        let all: Option<Vec<u64>> = answers.iter().map(|(size, _)| *size).collect();
        // The store is asked only for what neither this process nor the function can tell.
        let output = match budget.recorded(&addr) {
            Some(size) => Some(size),
            None => match all.and_then(|all| function.output_size(&all, recipe.params())) {
                Some(size) => Some(size),
                None => self.stored_output_size(addr).await,
            },
        };
        budget.check(
            || format!("materializing {addr} ({})", recipe.function()),
            known.saturating_add(output.unwrap_or(0)),
        )?;
        Ok(answers.into_iter().map(|(_, known)| known).collect())
    }

    /// The output size of `addr` recorded by the store ([`Store::sizes`], kept across
    /// restarts), which is then remembered in memory. A store that fails is no answer.
    ///
    /// [`Store::sizes`]: deriva_store::Store::sizes
    async fn stored_output_size(&self, addr: CAddr) -> Option<u64> {
        let sizes = self.state.store.sizes()?;
        match sizes.recorded(addr).await {
            Ok(Some(size)) => {
                self.state.budget.record(addr, size);
                Some(size)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "could not read a recorded output size");
                None
            }
        }
    }

    /// Records the output size of `addr` in memory and, if the function could not tell it
    /// (`estimated` is `None`), on a task of its own (a hint, off the compute's path) in the
    /// store: a size the function computes from its inputs needs no record that outlives the
    /// process.
    fn record_output_size(&self, addr: CAddr, size: u64, estimated: Option<u64>) {
        self.state.budget.record(addr, size);
        if estimated.is_none()
            && let Some(sizes) = self.state.store.sizes().cloned()
        {
            tokio::spawn(async move {
                if let Err(e) = sizes.record(addr, size).await {
                    tracing::debug!(%addr, error = %e, "could not record an output size");
                }
            });
        }
    }

    /// In a `leaf_read` span: the leaf `addr` read whole and verified, or the recipe stored
    /// there, [`DerivaError::NotFound`] if neither. The leaf store and the recipe index are
    /// asked at once ([`deriva_store::Store::find`]) unless `known` says it is a leaf.
    async fn leaf_or_recipe(&self, addr: CAddr, known: Known) -> Result<LeafOrRecipe> {
        let read = info_span!(spans::LEAF_READ, { field::FOUND } = Empty);
        let found = async {
            let found = if matches!(known, Known::Leaf) {
                self.state
                    .store
                    .get_leaf(addr)
                    .await?
                    .map(LeafOrRecipe::Leaf)
            } else {
                self.state.store.find(addr).await?.map(|found| match found {
                    Found::Leaf(bytes) => LeafOrRecipe::Leaf(bytes),
                    Found::Recipe(stored) => LeafOrRecipe::Recipe(stored.recipe),
                })
            };
            // A leaf gone since it was found (garbage collection): as if it never was.
            found.ok_or(DerivaError::NotFound { addr })
        }
        .instrument(read.clone())
        .await;
        read.record(field::FOUND, matches!(found, Ok(LeafOrRecipe::Leaf(_))));
        self.count_corruption(found)
    }

    /// The output of `addr` from the shared output tier, if it holds one. A tier that fails
    /// is logged and skipped: the recipe is computed instead.
    pub(super) async fn read_output_tier(
        &self,
        outputs: &Arc<dyn deriva_store::OutputStore>,
        addr: CAddr,
    ) -> Option<StoredOutput> {
        let read = info_span!(spans::OUTPUT_READ, { field::FOUND } = Empty);
        let found = outputs.get(addr).instrument(read.clone()).await;
        read.record(field::FOUND, matches!(found, Ok(Some(_))));
        match found {
            Ok(found) => found,
            Err(e) => {
                if let DerivaError::Corrupted { .. } = e {
                    self.state.stats.record_corruption();
                }
                let _entered = read.enter();
                tracing::warn!(%addr, error = %e, "the output tier failed; computing instead");
                None
            }
        }
    }

    /// Runs `function`, the recipe's (from [`AsyncExecutor::runnable`]), on the blocking pool
    /// (and again to verify, when `force_verify` or the mode says so). Returns the output, the
    /// compute time, the memory reservation that covers the output, and its record.
    pub(super) async fn compute(
        &self,
        addr: CAddr,
        recipe: &Recipe,
        function: &Arc<dyn ComputeFunction>,
        inputs: Vec<Bytes>,
        force_verify: bool,
    ) -> Result<(Bytes, Duration, Arc<Reservation>, Arc<SignedRecord>)> {
        let id = recipe.function();
        let inputs: Arc<[Bytes]> = inputs.into();
        let input_bytes: u64 = inputs.iter().map(|i| i.len() as u64).sum();
        let params = Arc::new(recipe.params().clone());
        // The inputs and the output (two with a verification), reserved before the function
        // runs; the output's size from the function, else the last compute's, else the inputs'.
        let verifying = force_verify || self.state.config.verification.should_verify();
        let sizes: Vec<u64> = inputs.iter().map(|i| i.len() as u64).collect();
        let estimated = function.output_size(&sizes, &params);
        let output_guess = estimated
            .or_else(|| self.state.budget.recorded(&addr))
            .unwrap_or(input_bytes);
        let needed =
            input_bytes.saturating_add(output_guess.saturating_mul(if verifying { 2 } else { 1 }));
        // Shared with every run's blocking closure: a run that outlives its caller (cancelled,
        // but not returned yet) keeps the bytes it still uses reserved.
        let reserved = Arc::new(
            self.state
                .budget
                .reserve(|| format!("computing {addr} ({id})"), needed)
                .await?,
        );
        let job = Job {
            addr,
            id,
            function,
            inputs: &inputs,
            params: &params,
            reserved: &reserved,
        };
        let span = info_span!(
            spans::COMPUTE,
            { field::FUNCTION } = %id,
            { field::INPUT_BYTES } = as_i64(input_bytes),
            { field::OUTPUT_BYTES } = Empty
        );

        let (output, elapsed) = self.run_function(&job, span.clone()).await?;
        span.record(field::OUTPUT_BYTES, as_i64(output.len()));
        let record = self.record_of(addr, recipe, &output, elapsed, &span).await;
        self.record_output_size(addr, output.len() as u64, estimated);
        let attrs = self.state.metrics.function_attrs(id);
        let m = &self.state.metrics;
        m.compute_duration.record(elapsed.as_secs_f64(), attrs);
        m.compute_input_bytes.record(input_bytes, attrs);
        m.compute_output_bytes.record(output.len() as u64, attrs);
        if elapsed >= self.state.config.slow_compute_threshold {
            span.in_scope(|| {
                tracing::warn!(
                    function = %id,
                    %addr,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "slow compute"
                );
            });
        }

        if verifying {
            let span =
                info_span!(spans::VERIFY, { field::FUNCTION } = %id, { field::PASSED } = Empty);
            let (second, _) = self.run_function(&job, span.clone()).await?;
            let passed = second == output;
            span.record(field::PASSED, passed);
            self.state.stats.record_verification(passed);
            if !passed {
                let (first, second) = (CAddr::for_leaf(&output), CAddr::for_leaf(&second));
                span.in_scope(|| {
                    tracing::error!(
                        function = %id,
                        %addr,
                        %first,
                        %second,
                        "determinism violation: two runs of the same recipe gave different outputs"
                    );
                });
                return Err(DerivaError::DeterminismViolation {
                    function: id.clone(),
                    addr,
                    first,
                    second,
                });
            }
        }
        Ok((output, elapsed, reserved, record))
    }

    /// One run of `job`'s function on the blocking pool, under a compute permit, within the
    /// compute timeout. The permit and the reservation move into the blocking closure, so a
    /// run holds them until its function returns, even when its callers have gone or it was
    /// cancelled: abandoned work never pushes the engine past `max_concurrent_computes` or
    /// the memory budget.
    ///
    /// The run's token is cancelled when the timeout passes (the answer is then
    /// [`DerivaError::DeadlineExceeded`], at once, whether or not the function has noticed)
    /// and when this future is dropped (every caller has gone).
    async fn run_function(&self, job: &Job<'_>, span: Span) -> Result<(Bytes, Duration)> {
        let (addr, id) = (job.addr, job.id);
        let permit = match self.state.computes.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = self.state.stats.waiting_guard();
                self.state
                    .computes
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| DerivaError::TaskCancelled {
                        task: format!("{addr}: waiting for a compute slot"),
                    })?
            }
        };
        let run = Arc::new(Run::new(self.state.stats.clone()));
        // Dropped with this future: on an early return, and when the task is aborted.
        let _cancel_on_drop = CancelOnDrop(run.clone());
        let ctx = ComputeContext::with_shutdown(run.token.clone(), self.state.shutdown.clone());
        let (function, inputs, params) =
            (job.function.clone(), job.inputs.clone(), job.params.clone());
        // Made out here so that it also ends the run if the closure is dropped unrun (the
        // runtime shutting down).
        let (reserved, finished) = (job.reserved.clone(), Finished(run.clone()));
        let handle = spawn_blocking_in(span, move || {
            let _held = (finished, permit, reserved);
            let start = Instant::now();
            let out = function.compute(&ctx, &inputs, &params);
            (out, start.elapsed())
        });
        let ran = match self.state.config.compute_timeout {
            Some(limit) => match tokio::time::timeout(limit, handle).await {
                Ok(ran) => ran,
                Err(_) => {
                    run.cancel();
                    self.state.metrics.record_timeout(id);
                    tracing::warn!(
                        function = %id,
                        %addr,
                        timeout_secs = limit.as_secs_f64(),
                        "compute timed out; cancelled"
                    );
                    return Err(DerivaError::DeadlineExceeded {
                        function: id.clone(),
                        addr,
                        limit,
                    });
                }
            },
            None => handle.await,
        };
        match ran {
            Ok((Ok(bytes), elapsed)) => Ok((bytes, elapsed)),
            Ok((Err(e), _)) if e.is_invalid_recipe() => Err(invalid_recipe(id, Some(addr), &e)),
            Ok((Err(FunctionError::Cancelled), _)) if self.state.shutdown.is_cancelled() => {
                Err(DerivaError::TaskCancelled {
                    task: format!("{addr}: the compute of {id}"),
                })
            }
            Ok((Err(e), _)) => Err(DerivaError::ComputeFailed {
                function: id.clone(),
                addr,
                message: e.to_string(),
            }),
            Err(join) => match join.try_into_panic() {
                Ok(payload) => Err(DerivaError::ComputeFailed {
                    function: id.clone(),
                    addr,
                    message: format!(
                        "the function panicked: {}",
                        deriva_core::error::panic_text(payload.as_ref())
                    ),
                }),
                Err(_) => Err(DerivaError::TaskCancelled {
                    task: format!("{addr}: the compute of {id}"),
                }),
            },
        }
    }

    /// Keeps the output of `addr` for later calls: in the memory cache, or, above the spill
    /// threshold, in the spill directory (not after an invalidation since `generation`).
    /// Returns where it went.
    async fn cache_or_spill(
        &self,
        addr: CAddr,
        output: &Bytes,
        cost: Duration,
        generation: u64,
        record: Option<Arc<SignedRecord>>,
    ) -> KeptIn {
        let spill = self.state.config.spill.as_ref();
        if let Some(spill) = spill.filter(|_| self.spills(output.len())) {
            if self.state.cache.generation(&addr) != generation {
                return KeptIn::Nowhere;
            }
            let (store, data) = (spill.store.clone(), output.clone());
            let write = info_span!(spans::SPILL_WRITE, { field::BYTES } = as_i64(output.len()));
            let written = spawn_blocking_in(write, move || store.put_recorded(addr, &data, record))
                .await
                .unwrap_or_else(|e| Err(DerivaError::from_join("spilling an output", e)));
            return match written {
                // An invalidation that came in while it was written wins.
                Ok(_) if self.state.cache.generation(&addr) != generation => {
                    spill.store.remove(&addr);
                    KeptIn::Nowhere
                }
                Ok(true) => KeptIn::Spill,
                Ok(false) => KeptIn::Nowhere,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "could not spill an output; it will be recomputed");
                    KeptIn::Nowhere
                }
            };
        }
        let cached = info_span!(spans::CACHE_PUT, { field::BYTES } = as_i64(output.len()))
            .in_scope(|| {
                self.state
                    .cache
                    .insert_if_current(addr, (output.clone(), record), cost, generation)
                    .is_some()
            });
        if cached {
            KeptIn::Cache
        } else {
            KeptIn::Nowhere
        }
    }

    /// The function of `recipe` (stored at `addr`, if it is), once it is registered and
    /// accepts the recipe's params and inputs ([`ComputeFunction::validate`]).
    pub(super) fn runnable(
        &self,
        addr: Option<CAddr>,
        recipe: &Recipe,
    ) -> Result<Arc<dyn ComputeFunction>> {
        let function = self.function(recipe.function())?;
        function
            .validate(recipe.inputs().len(), recipe.params())
            .map_err(|e| invalid_recipe(recipe.function(), addr, &e))?;
        Ok(function)
    }

    pub(super) fn function(&self, id: &FunctionId) -> Result<Arc<dyn ComputeFunction>> {
        self.state
            .registry
            .get(id)
            .cloned()
            .ok_or_else(|| DerivaError::UnknownFunction {
                function: id.clone(),
            })
    }

    /// Computes the recipe at `addr` twice, whatever the verification mode, and compares. The
    /// inputs are materialized as usual. A deterministic output is cached. A mismatch is a
    /// report with `deterministic: false` (and counts as a failed verification), not an error;
    /// a leaf is [`DerivaError::InvalidInput`], an unknown address [`DerivaError::NotFound`].
    pub async fn verify(&self, addr: CAddr) -> Result<VerifyReport> {
        let span = info_span!(spans::VERIFY_RECIPE, { field::ADDR } = %addr, { field::DETERMINISTIC } = Empty);
        async move {
            let generation = self.state.cache.generation(&addr);
            let Some(stored) = self.state.store.get_recipe(addr).await? else {
                return Err(match self.state.store.kind_of(addr).await? {
                    Some(_) => DerivaError::InvalidInput(format!(
                        "{addr} is a leaf; only recipes can be verified"
                    )),
                    None => DerivaError::NotFound { addr },
                });
            };
            let recipe = stored.recipe;
            let function = self.runnable(Some(addr), &recipe)?;
            let inputs = self.inputs_of(&recipe).await?;
            let (report, fresh) = match self.compute(addr, &recipe, &function, inputs, true).await {
                Ok((output, cost, _reserved, record)) => {
                    let hash = CAddr::for_leaf(&output);
                    let size = output.len() as u64;
                    self.cache_or_spill(addr, &output, cost, generation, Some(record.clone()))
                        .await;
                    (
                        VerifyReport {
                            deterministic: true,
                            output_hash: hash,
                            second_hash: hash,
                            output_size: size,
                            compute_time: cost,
                        },
                        Some(record),
                    )
                }
                Err(DerivaError::DeterminismViolation { first, second, .. }) => (
                    VerifyReport {
                        deterministic: false,
                        output_hash: first,
                        second_hash: second,
                        output_size: 0,
                        compute_time: Duration::ZERO,
                    },
                    None,
                ),
                Err(e) => return Err(e),
            };
            self.verify_audit(addr, &recipe, report.deterministic, fresh)
                .await;
            Span::current().record(field::DETERMINISTIC, report.deterministic);
            Ok(report)
        }
        .instrument(span)
        .await
    }
}

impl AsyncExecutor {
    /// The inputs of `recipe`, each materialized through the read path (for a compute outside
    /// a flight: `Verify`, an audit).
    pub(super) async fn inputs_of(&self, recipe: &Recipe) -> Result<Vec<Bytes>> {
        let tracker = Arc::new(DepthTracker::default());
        let inputs = futures::future::try_join_all(
            recipe
                .inputs()
                .iter()
                .map(|input| self.materialize_at(*input, 1, tracker.clone(), Known::Nothing)),
        )
        .await?;
        Ok(inputs.into_iter().map(|(bytes, _)| bytes).collect())
    }
}

/// What one compute runs: the function, on these inputs and params, for the recipe `addr`,
/// under `reserved`.
struct Job<'a> {
    addr: CAddr,
    id: &'a FunctionId,
    function: &'a Arc<dyn ComputeFunction>,
    inputs: &'a Arc<[Bytes]>,
    params: &'a Arc<deriva_core::Params>,
    reserved: &'a Arc<Reservation>,
}

/// One run of a function on the blocking pool, as the task awaiting it and the blocking closure
/// both see it: its token, and whether it was cancelled while running (counted in
/// `deriva_compute_cancelled_running` until the function returns).
struct Run {
    token: CancelToken,
    state: std::sync::atomic::AtomicU8,
    stats: Arc<ExecStats>,
}

impl Run {
    const RUNNING: u8 = 0;
    const CANCELLED: u8 = 1;
    const RETURNED: u8 = 2;

    fn new(stats: Arc<ExecStats>) -> Self {
        Self {
            token: CancelToken::new(),
            state: Self::RUNNING.into(),
            stats,
        }
    }

    /// Asks the function to stop; until it returns, it counts as cancelled and running.
    fn cancel(&self) {
        self.token.cancel();
        if self
            .state
            .compare_exchange(
                Self::RUNNING,
                Self::CANCELLED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.stats.cancelled_running_add(1);
        }
    }

    /// The function has returned (or panicked).
    fn returned(&self) {
        if self.state.swap(Self::RETURNED, Ordering::AcqRel) == Self::CANCELLED {
            self.stats.cancelled_running_add(-1);
        }
    }
}

/// Cancels its run when dropped: the task awaiting the run ended, so nobody wants its output
/// (after the function returned, a no-op).
struct CancelOnDrop(Arc<Run>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Marks its run returned when dropped: at the end of the blocking closure (a panic included),
/// or with the closure if it never ran.
struct Finished(Arc<Run>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.returned();
    }
}
