//! `deriva-server migrate`: copies a store from one backend to another (the local store to
//! the remote one when a team moves to several nodes, or back, or between two buckets and
//! schemas for a backup), verified, resumable and bounded.
//!
//! - **Paged.** The source is read a page at a time (keyset pages of [`BATCH`] objects, see
//!   [`deriva_store::pages`]): the command holds one page and its copies in flight, whatever
//!   the store's size. Per page, one lookup of what the destination lacks, and one batch of
//!   writes: small leaves through [`BlobStore::put_many`](deriva_store::BlobStore::put_many)
//!   (one multi-row `INSERT` on the remote backend), recipes through [`Store::put_recipes`].
//!   The progress bar's total comes from the stores' counters, not from a listing.
//! - **Order.** Leaves are copied first, then recipes in pages ordered by DAG depth, then
//!   address, through [`Store::put_recipes`], which refuses a recipe whose inputs are not in
//!   the destination: every recipe's inputs come before it, and the destination never holds a
//!   recipe whose input is missing, whenever the migration stops. On a live remote source, a
//!   recipe stored after the leaf pages went past one of its new inputs is refused (counted as
//!   failed, naming the input); a second run copies it. Then the output tier
//!   (`--include-outputs`), each output put with the record stored on it, and the
//!   materialization records ([`deriva_store::Records::list_pages`]), each put unless the
//!   destination has the same one (their audits start again there: a put resets them).
//! - **Verified.** A leaf is hashed when it is read from the source (every backend's read
//!   verifies) and again by the destination's write, whose address must be the same; a
//!   mismatch or a damaged source object stops the migration with `DATA_LOSS` naming the
//!   address. Recipes are verified against their address when read.
//! - **Resumable.** What the destination already holds is skipped, never rewritten, so running
//!   the command again after a kill copies only the rest.
//! - **Bounded.** At most `--concurrency` objects are in flight, holding at most
//!   `--max-buffer-bytes` of leaf bytes: leaves above [`STREAM_ABOVE`] are streamed, each
//!   holding a bounded part of itself whatever its size.
//!
//! Here: the flags, [`run`] and the state the tasks share (`Migration` and its counters). The
//! parts: `location.rs` (where each side's store is, and opening it), `copy.rs` (the copy and the
//! dry run), `verify.rs` (`--verify`), `report.rs` (what the command prints).

use std::collections::HashSet;
use std::fmt;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use deriva_core::{CAddr, DerivaError};
use deriva_store::Store;
use deriva_util::size::parse_size;
use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tonic::Code;

use crate::config::defaults;
use crate::error::{code_name, code_of};

mod copy;
mod location;
mod report;
mod verify;

use copy::copy;
use location::StoreLocation;
pub use report::{ObjectCounts, Report};
use verify::verify;

/// `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// `--max-buffer-bytes`.
pub const DEFAULT_MAX_BUFFER_BYTES: &str = "256MiB";
/// Leaves larger than this are streamed from the source to the destination, never held whole.
pub const STREAM_ABOVE: u64 = 8 << 20;
/// Chunks of a streamed leaf.
const STREAM_CHUNK: usize = 1 << 20;
/// What one streamed leaf may hold in memory at most, counted against `--max-buffer-bytes`: the
/// remote backend holds up to 16 MiB before it starts a multipart upload, then 8 MiB parts,
/// two in flight, and the part being filled.
const STREAM_MEMORY: u64 = 48 << 20;
/// The least `--max-buffer-bytes`: one streamed leaf fits.
pub const MIN_BUFFER_BYTES: u64 = 64 << 20;
/// Objects per page of a listing: leaves or recipes looked up in the destination per query;
/// recipes written per transaction.
const BATCH: usize = 500;
/// The most bytes of small leaves read and written as one batch (a page's small leaves, unless
/// they are larger than this).
const SMALL_BATCH_BYTES: u64 = 16 << 20;
/// Failures quoted in the report (all are counted).
const ERRORS_KEPT: usize = 20;

/// `deriva-server migrate`'s flags. The source is named as the server names its store; the
/// destination by the same flags with `--to-`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "deriva-server migrate",
    version,
    about = "Copy a Deriva store to another backend: verified, resumable, bounded",
    long_about = "Copy a Deriva store (leaves, recipes with their edges and depths, the \
materialization records of computed outputs, pins, and with --include-outputs the output tier) \
to another backend. The source is named by --data-dir, or \
--blob-store and --index; the destination by --to-data-dir, or --to-blob-store and --to-index. \
What the destination holds already is skipped, so running it again after an interruption copies \
only the rest. A local source must not be in use by a server (it is refused if it is); a remote \
source may be live: the source is read a page at a time, and what it gains meanwhile is copied only if \
its page is still to come; a second run picks up the rest.\n\n\
Exit status: 0 done; 1 something failed (the report says what); 2 bad flags; 3 DATA_LOSS (a \
damaged object, named on stderr)."
)]
pub struct MigrateArgs {
    /// Source: a local store's data directory (must exist).
    #[arg(long, env = "DERIVA_DATA_DIR", default_value = defaults::DATA_DIR, help_heading = "Source")]
    pub data_dir: PathBuf,
    /// Source: object store for leaves, s3://BUCKET[/PREFIX] (with --index). Endpoint and
    /// credentials come from the AWS_* variables, for both sides.
    #[arg(
        long,
        env = "DERIVA_BLOB_STORE",
        hide_env_values = true,
        help_heading = "Source"
    )]
    pub blob_store: Option<String>,
    /// Source: PostgreSQL index, postgres://USER:PASSWORD@HOST:PORT/DATABASE (with --blob-store).
    #[arg(
        long,
        env = "DERIVA_INDEX_URL",
        hide_env_values = true,
        help_heading = "Source"
    )]
    pub index: Option<String>,
    /// Source: PostgreSQL schema of the index.
    #[arg(long, env = "DERIVA_INDEX_SCHEMA", default_value = defaults::INDEX_SCHEMA, help_heading = "Source")]
    pub index_schema: String,
    /// Destination: a local data directory (created if missing).
    #[arg(long, help_heading = "Destination")]
    pub to_data_dir: Option<PathBuf>,
    /// Destination: object store for leaves, s3://BUCKET[/PREFIX] (with --to-index).
    #[arg(long, help_heading = "Destination")]
    pub to_blob_store: Option<String>,
    /// Destination: PostgreSQL index URL (with --to-blob-store); its schema is created and
    /// migrated if needed.
    #[arg(long, help_heading = "Destination")]
    pub to_index: Option<String>,
    /// Destination: PostgreSQL schema of the index.
    #[arg(long, default_value = defaults::INDEX_SCHEMA, help_heading = "Destination")]
    pub to_index_schema: String,
    /// Copy the output tier too (outputs/<hex>; both sides remote).
    #[arg(long)]
    pub include_outputs: bool,
    /// Copy nothing: read back every object of the destination and verify it, and check that
    /// every object of the source is there.
    #[arg(long, conflicts_with = "dry_run")]
    pub verify: bool,
    /// Copy nothing: count what would be copied.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the final report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Objects copied at once.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub concurrency: usize,
    /// Most leaf bytes held in memory at once, in bytes or with a unit (at least 64MiB). Leaves
    /// above 8 MiB are streamed, holding at most 48 MiB each whatever their size.
    #[arg(long, default_value = DEFAULT_MAX_BUFFER_BYTES, value_parser = parse_size)]
    pub max_buffer_bytes: u64,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Why a migration stopped, with the gRPC code that names its kind.
#[derive(Debug)]
pub struct MigrateError {
    /// `DATA_LOSS` for damaged data, `UNAVAILABLE` for a backend that cannot be reached,
    /// `INVALID_ARGUMENT` for bad flags, …
    pub code: Code,
    /// What went wrong, naming the object or the backend.
    pub message: String,
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", code_name(self.code), self.message)
    }
}

impl std::error::Error for MigrateError {}

impl MigrateError {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            message: message.into(),
        }
    }

    fn store(context: impl fmt::Display, err: &DerivaError) -> Self {
        Self {
            code: code_of(err),
            message: format!("{context}: {err}"),
        }
    }

    /// The process exit status: 2 for bad flags, 3 for `DATA_LOSS`, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.code {
            Code::InvalidArgument => 2,
            Code::DataLoss => 3,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Copy,
    DryRun,
    Verify,
}

/// Live counts of one kind, shared by the tasks that copy it; [`LiveCounters::snapshot`] turns
/// them into the report's [`ObjectCounts`].
#[derive(Debug, Default)]
struct LiveCounters {
    copied: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    checked: AtomicU64,
    missing: AtomicU64,
    bytes: AtomicU64,
}

impl LiveCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ObjectCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ObjectCounts {
            copied: get(&self.copied),
            skipped: get(&self.skipped),
            failed: get(&self.failed),
            checked: get(&self.checked),
            missing: get(&self.missing),
            bytes: get(&self.bytes),
        }
    }
}

/// One migration in progress: both stores, the mode, the byte budget, the counters and the
/// progress bar, everything the copying tasks share.
struct Migration {
    src: Store,
    dst: Store,
    mode: Mode,
    concurrency: usize,
    /// Leaf bytes in flight, in KiB permits.
    budget: Semaphore,
    budget_kib: u32,
    leaves: LiveCounters,
    recipes: LiveCounters,
    outputs: LiveCounters,
    records: LiveCounters,
    pins: LiveCounters,
    errors: Mutex<Vec<String>>,
    bar: ProgressBar,
    started: Instant,
    /// Print phase lines on stderr (when there is no progress bar and no --json).
    chatty: bool,
}

impl Migration {
    /// Counts a failure of one object and keeps its message for the report.
    fn failed(&self, counts: &LiveCounters, message: String) {
        LiveCounters::add(&counts.failed, 1);
        let mut errors = self.errors.lock();
        if errors.len() < ERRORS_KEPT {
            errors.push(message);
        }
    }

    /// One object done, with `bytes` of its data: the bar moves, and its message shows the
    /// bytes so far and the rates since the start.
    fn step(&self, bytes: u64) {
        self.bar.inc(1);
        if bytes > 0 {
            let total: u64 = [&self.leaves, &self.outputs]
                .iter()
                .map(|c| c.bytes.load(Ordering::Relaxed))
                .sum();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            self.bar.set_message(format!(
                "{}, {}/s, {:.0} objects/s",
                HumanBytes(total),
                HumanBytes((total as f64 / secs) as u64),
                self.bar.position() as f64 / secs
            ));
        }
    }

    /// `n` objects done with `bytes` of data between them, as [`Migration::step`] for each.
    fn steps(&self, n: u64, bytes: u64) {
        if n == 0 {
            return;
        }
        self.bar.inc(n - 1);
        self.step(bytes);
    }

    fn say(&self, line: impl fmt::Display) {
        if self.chatty {
            eprintln!("migrate: {line}");
        }
    }

    /// What a read of `what` from the source gave: its value; or `None` if it is gone since the
    /// listing (counted as a failure); `DATA_LOSS` if it is damaged; any other error stops.
    fn source_read<T>(
        &self,
        counts: &LiveCounters,
        what: &str,
        read: deriva_core::Result<Option<T>>,
    ) -> Result<Option<T>, MigrateError> {
        match read {
            Ok(Some(value)) => Ok(Some(value)),
            Ok(None) => {
                self.failed(counts, format!("{what}: no longer in the source"));
                self.step(0);
                Ok(None)
            }
            Err(e @ DerivaError::Corrupted { .. }) => {
                Err(data_loss(format!("{what} in the source: {e}")))
            }
            Err(e) => Err(MigrateError::store(
                format!("reading {what} from the source"),
                &e,
            )),
        }
    }

    /// KiB permits for a leaf of `size` bytes: at most the whole budget.
    fn permits(&self, size: u64) -> u32 {
        u32::try_from(size.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget_kib)
    }
}

/// The kind of object looked up in the destination in batches: a leaf or a recipe.
#[derive(Debug, Clone, Copy)]
enum ObjectKind {
    Leaf,
    Recipe,
}

impl ObjectKind {
    fn name(self) -> &'static str {
        match self {
            Self::Leaf => "leaf",
            Self::Recipe => "recipe",
        }
    }
}

/// Of `addrs`, those the destination lacks, in one query.
async fn absent(
    run: &Migration,
    kind: ObjectKind,
    addrs: &[CAddr],
) -> Result<Vec<CAddr>, MigrateError> {
    let lacking = match kind {
        ObjectKind::Leaf => run.dst.blobs().missing(addrs.to_vec()).await,
        ObjectKind::Recipe => run.dst.recipes().missing(addrs.to_vec()).await,
    };
    lacking.map_err(|e| {
        MigrateError::store(
            format!("looking up {}s in the destination", kind.name()),
            &e,
        )
    })
}

/// Whether the destination's output tier holds the output of `recipe` (false without a tier).
async fn output_in_destination(run: &Migration, recipe: CAddr) -> Result<bool, MigrateError> {
    let Some(tier) = run.dst.outputs() else {
        return Ok(false);
    };
    tier.contains(recipe).await.map_err(|e| {
        MigrateError::store(
            format!("looking up the output of {recipe} in the destination"),
            &e,
        )
    })
}

/// Runs `task` on every item (an address, a record), at most `run.concurrency` at once; stops
/// at the first error.
async fn for_each<T, F, Fut>(
    run: &Arc<Migration>,
    items: Vec<T>,
    task: F,
) -> Result<(), MigrateError>
where
    F: Fn(Arc<Migration>, T) -> Fut,
    Fut: Future<Output = Result<(), MigrateError>>,
{
    futures::stream::iter(items)
        .map(|item| task(run.clone(), item))
        .buffer_unordered(run.concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// The pins of the source, in order, and the set of the destination's.
async fn pin_sets(run: &Migration) -> Result<(Vec<CAddr>, HashSet<CAddr>), MigrateError> {
    let src = run
        .src
        .pins()
        .await
        .map_err(|e| MigrateError::store("listing the source's pins", &e))?;
    let dst = run
        .dst
        .pins()
        .await
        .map_err(|e| MigrateError::store("listing the destination's pins", &e))?;
    Ok((src, dst.into_iter().collect()))
}

/// The leaves and recipes `store` holds, from its counters.
fn totals(store: &Store) -> (u64, u64) {
    let counters = store.counters();
    (counters.blobs(), counters.recipes())
}

/// A DATA_LOSS error naming the object.
fn data_loss(message: String) -> MigrateError {
    MigrateError {
        code: Code::DataLoss,
        message,
    }
}

/// Runs the migration the flags describe and returns its report. A report with
/// [`Report::problems`] is a partial success; an `Err` stopped it.
pub async fn run(args: MigrateArgs) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let src = StoreLocation::from_flags(
        ("--data-dir", "--blob-store", "--index"),
        Some(args.data_dir),
        args.blob_store,
        args.index,
        args.index_schema,
    )?;
    let dst = StoreLocation::from_flags(
        ("--to-data-dir", "--to-blob-store", "--to-index"),
        args.to_data_dir,
        args.to_blob_store,
        args.to_index,
        args.to_index_schema,
    )?;
    if src == dst {
        return Err(MigrateError::usage(format!(
            "the source and the destination are the same store ({})",
            src.describe()
        )));
    }
    if args.include_outputs
        && let Some(side) = [&src, &dst]
            .into_iter()
            .find(|s| matches!(s, StoreLocation::Local(_)))
    {
        return Err(MigrateError::usage(format!(
            "--include-outputs needs the remote backend on both sides: {} has no output tier",
            side.describe()
        )));
    }
    let mode = if args.verify {
        Mode::Verify
    } else if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Copy
    };
    if args.max_buffer_bytes < MIN_BUFFER_BYTES {
        return Err(MigrateError::usage(format!(
            "--max-buffer-bytes must be at least {MIN_BUFFER_BYTES} (64MiB): one streamed leaf \
             holds up to {STREAM_MEMORY} bytes"
        )));
    }
    let budget_kib = u32::try_from(args.max_buffer_bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, Semaphore::MAX_PERMITS as u32);
    let show_bar = !args.no_progress && std::io::stderr().is_terminal();
    let bar = if show_bar {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    let source_store = src.open("source", args.include_outputs).await?;
    let destination_store = dst.open("destination", args.include_outputs).await?;
    let run = Arc::new(Migration {
        src: source_store,
        dst: destination_store,
        mode,
        concurrency: args.concurrency,
        budget: Semaphore::new(budget_kib as usize),
        budget_kib,
        leaves: LiveCounters::default(),
        recipes: LiveCounters::default(),
        outputs: LiveCounters::default(),
        records: LiveCounters::default(),
        pins: LiveCounters::default(),
        errors: Mutex::new(Vec::new()),
        bar,
        started,
        chatty: !show_bar && !args.json,
    });

    // The totals come from the counters: a listing would hold the whole store.
    let (leaves, recipes) = totals(&run.src);
    run.say(format_args!(
        "{leaves} leaves, {recipes} recipes in {}",
        src.describe()
    ));
    if show_bar {
        let mut total = leaves + recipes;
        if mode == Mode::Verify {
            let (leaves, recipes) = totals(&run.dst);
            total += leaves + recipes;
        }
        run.bar.set_length(total);
        run.bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>7} [{bar:20}] {human_pos}/{human_len} objects, {msg}, ETA {eta}",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        run.bar.set_message(HumanBytes(0).to_string());
    }

    let result = match mode {
        Mode::Verify => verify(&run, args.include_outputs).await,
        Mode::Copy | Mode::DryRun => copy(&run, args.include_outputs).await,
    };
    run.bar.finish_and_clear();
    result?;
    let outputs_tally = args.include_outputs.then(|| run.outputs.snapshot());
    let leaves_tally = run.leaves.snapshot();
    let bytes = leaves_tally.bytes + outputs_tally.as_ref().map_or(0, |t| t.bytes);
    Ok(Report {
        mode: match mode {
            Mode::Copy => "copy",
            Mode::DryRun => "dry-run",
            Mode::Verify => "verify",
        }
        .to_owned(),
        source: src.describe(),
        destination: dst.describe(),
        leaves: leaves_tally,
        recipes: run.recipes.snapshot(),
        outputs: outputs_tally,
        records: run.records.snapshot(),
        pins: run.pins.snapshot(),
        bytes,
        duration_seconds: started.elapsed().as_secs_f64(),
        errors: std::mem::take(&mut *run.errors.lock()),
    })
}
