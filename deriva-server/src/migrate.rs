//! `deriva-server migrate`: copies a store from one backend to another (the local store to
//! the remote one when a team moves to several nodes, or back, or between two buckets and
//! schemas for a backup), verified, resumable and bounded.
//!
//! - **Order.** The source's recipes are listed first, then its leaves: recipes and leaves are
//!   only ever added while a server runs, so every listed recipe's inputs are among the listed
//!   leaves and recipes, even on a live remote source. Leaves are copied first, then recipes
//!   level by level (by DAG depth) through [`Store::put_recipes`], which refuses a recipe whose
//!   inputs are not in the destination: the destination never holds a recipe whose input is
//!   missing, whenever the migration stops.
//! - **Verified.** A leaf is hashed when it is read from the source (every backend's read
//!   verifies) and again by the destination's write, whose address must be the same; a
//!   mismatch or a damaged source object stops the migration with `DATA_LOSS` naming the
//!   address. Recipes are verified against their address when read.
//! - **Resumable.** What the destination already holds is skipped, never rewritten, so running
//!   the command again after a kill copies only the rest.
//! - **Bounded.** At most `--concurrency` objects are in flight, holding at most
//!   `--max-buffer-bytes` of leaf bytes: leaves above [`STREAM_ABOVE`] are streamed, each
//!   holding a bounded part of itself whatever its size.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use deriva_core::{CAddr, DerivaError, Recipe};
use deriva_store::Store;
use deriva_store_local::LocalOptions;
use deriva_util::size::parse_size;
use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use opentelemetry::metrics::{MeterProvider as _, NoopMeterProvider};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::Code;

use crate::config::{defaults, redact_url};
use crate::error::{code_name, code_of};
use crate::store_spec::StoreSpec;

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
/// Leaves or recipes looked up in the destination per query; recipes written per transaction.
const BATCH: usize = 500;
/// Failures quoted in the report (all are counted).
const ERRORS_KEPT: usize = 20;

/// `deriva-server migrate`'s flags. The source is named as the server names its store; the
/// destination by the same flags with `--to-`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "deriva-server migrate",
    version,
    about = "Copy a Deriva store to another backend: verified, resumable, bounded",
    long_about = "Copy a Deriva store (leaves, recipes with their edges and depths, and with \
--include-outputs the output tier) to another backend. The source is named by --data-dir, or \
--blob-store and --index; the destination by --to-data-dir, or --to-blob-store and --to-index. \
What the destination holds already is skipped, so running it again after an interruption copies \
only the rest. A local source must not be in use by a server (it is refused if it is); a remote \
source may be live: what it gains after the listing is not copied, and a second run picks it up.\n\n\
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

/// Counts of one kind of object. In a copy: `copied` were written now, `skipped` were in the
/// destination already, `failed` could not be copied (gone from the source, or an input
/// missing). In a dry run, `copied` would be. In `--verify`: `checked` were read back and
/// verified, `failed` are damaged (or a recipe's input is missing), `missing` are in the
/// source but not in the destination. `bytes` were copied (or would be, or were read back).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ObjectCounts {
    /// Written now (or, in a dry run, to be written).
    pub copied: u64,
    /// Already in the destination.
    pub skipped: u64,
    /// Could not be copied, or (verify) damaged in the destination.
    pub failed: u64,
    /// (verify) Read back and verified.
    pub checked: u64,
    /// (verify) In the source, not in the destination.
    pub missing: u64,
    /// Bytes copied, to be copied, or read back.
    pub bytes: u64,
}

/// The final report (`--json` prints it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    /// `copy`, `dry-run` or `verify`.
    pub mode: String,
    /// The source, as the logs name it (passwords hidden).
    pub source: String,
    /// The destination, likewise.
    pub destination: String,
    /// Leaves.
    pub leaves: ObjectCounts,
    /// Recipes (with their edges and depths).
    pub recipes: ObjectCounts,
    /// The output tier (`--include-outputs` only).
    pub outputs: Option<ObjectCounts>,
    /// Pins (the roots garbage collection keeps), copied after what they name.
    #[serde(default)]
    pub pins: ObjectCounts,
    /// Leaf and output bytes copied (or to be, or read back).
    pub bytes: u64,
    /// Seconds from start to end.
    pub duration_seconds: f64,
    /// The first failures, each naming its object (all are counted in the tallies).
    pub errors: Vec<String>,
}

impl Report {
    /// Objects that failed, or (verify) are damaged or missing.
    pub fn problems(&self) -> u64 {
        [
            Some(&self.leaves),
            Some(&self.recipes),
            self.outputs.as_ref(),
            Some(&self.pins),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.failed + t.missing)
        .sum()
    }

    /// The report for a person, one line per kind.
    pub fn human(&self) -> String {
        let mut out = format!(
            "{} {} -> {} in {:.1} s, {}\n",
            self.mode,
            self.source,
            self.destination,
            self.duration_seconds,
            HumanBytes(self.bytes)
        );
        let kinds = [
            ("leaves", Some(&self.leaves)),
            ("recipes", Some(&self.recipes)),
        ];
        for (name, tally) in kinds.into_iter().chain([
            ("outputs", self.outputs.as_ref()),
            ("pins", Some(&self.pins)),
        ]) {
            let Some(t) = tally else { continue };
            let line = if self.mode == "verify" {
                format!(
                    "  {name}: {} verified, {} damaged, {} missing\n",
                    t.checked, t.failed, t.missing
                )
            } else {
                let verb = if self.mode == "dry-run" {
                    "to copy"
                } else {
                    "copied"
                };
                format!(
                    "  {name}: {} {verb}, {} already there, {} failed\n",
                    t.copied, t.skipped, t.failed
                )
            };
            out.push_str(&line);
        }
        for e in &self.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}

/// Where one side of a migration (the source or the destination) keeps its store: a local
/// directory, or a remote object store and index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreLocation {
    Local(PathBuf),
    Remote {
        blob_store: String,
        index: String,
        schema: String,
    },
}

impl StoreLocation {
    fn from_flags(
        flags: (&str, &str, &str),
        dir: Option<PathBuf>,
        blob_store: Option<String>,
        index: Option<String>,
        schema: String,
    ) -> Result<Self, MigrateError> {
        let (dir_flag, blob_flag, index_flag) = flags;
        let blob_store = blob_store.filter(|s| !s.is_empty());
        let index = index.filter(|s| !s.is_empty());
        match (blob_store, index) {
            (Some(blob_store), Some(index)) => Ok(Self::Remote {
                blob_store,
                index,
                schema,
            }),
            (Some(_), None) => Err(MigrateError::usage(format!(
                "{blob_flag} needs {index_flag} too"
            ))),
            (None, Some(_)) => Err(MigrateError::usage(format!(
                "{index_flag} needs {blob_flag} too"
            ))),
            (None, None) => dir.map(Self::Local).ok_or_else(|| {
                MigrateError::usage(format!(
                    "no destination: give {dir_flag}, or {blob_flag} and {index_flag}"
                ))
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Local(dir) => format!("local {}", dir.display()),
            Self::Remote {
                blob_store,
                index,
                schema,
            } => format!(
                "remote {} + {} (schema {schema})",
                redact_url(blob_store),
                redact_url(index)
            ),
        }
    }

    /// The store this side is, as the `role` (`source`, `destination`) of a migration: a
    /// remote one with no local cache nor upload spool (a migration puts leaves by their
    /// addresses), with the output tier if `outputs`; a remote source's schema is never
    /// created (a mistyped one must not be created, empty).
    fn spec(&self, role: &str, outputs: bool) -> StoreSpec {
        match self {
            Self::Local(dir) => StoreSpec::Local {
                dir: dir.clone(),
                options: LocalOptions::default(),
            },
            Self::Remote {
                blob_store,
                index,
                schema,
            } => StoreSpec::Remote(deriva_store_remote::RemoteConfig {
                blob_store: blob_store.clone(),
                aws: deriva_store_remote::aws_env(),
                index: index.clone(),
                schema: schema.clone(),
                pool_size: 16,
                local_cache: None,
                spool_dir: None,
                output_tier: outputs,
                create_schema: role != "source",
                node_id: format!("migrate-{}", std::process::id()),
            }),
        }
    }

    /// Opens this side. A local source must exist already (opening creates a store); a remote
    /// side must answer (its object store too).
    async fn open(&self, role: &str, outputs: bool) -> Result<Store, MigrateError> {
        let what = format!("opening the {role}, {}", self.describe());
        if let Self::Local(dir) = self
            && role == "source"
            && !dir.join("deriva.redb").is_file()
        {
            return Err(MigrateError {
                code: Code::NotFound,
                message: format!(
                    "the source {} holds no Deriva store (no deriva.redb)",
                    dir.display()
                ),
            });
        }
        let meter = NoopMeterProvider::new().meter("deriva-server-migrate");
        let opened = self
            .spec(role, outputs)
            .open(&meter)
            .await
            .map_err(|e| MigrateError::store(&what, &e))?;
        if opened.cluster.is_some() {
            opened
                .store
                .check()
                .await
                .map_err(|e| MigrateError::store(&what, &e))?;
        }
        Ok(opened.store)
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

    fn say(&self, line: impl fmt::Display) {
        if self.chatty {
            eprintln!("migrate: {line}");
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
        pins: LiveCounters::default(),
        errors: Mutex::new(Vec::new()),
        bar,
        started,
        chatty: !show_bar && !args.json,
    });

    // Recipes first, then leaves: see the module's doc.
    run.bar.set_message("listing the source");
    let recipes = run
        .src
        .recipes()
        .list()
        .await
        .map_err(|e| MigrateError::store("listing the source's recipes", &e))?;
    let leaves = run
        .src
        .blobs()
        .list()
        .await
        .map_err(|e| MigrateError::store("listing the source's leaves", &e))?;
    let outputs = match run.src.outputs() {
        Some(tier) if args.include_outputs => tier
            .list()
            .await
            .map_err(|e| MigrateError::store("listing the source's output tier", &e))?,
        _ => Vec::new(),
    };
    run.say(format_args!(
        "{} leaves, {} recipes, {} outputs in {}",
        leaves.len(),
        recipes.len(),
        outputs.len(),
        src.describe()
    ));
    if show_bar {
        run.bar
            .set_length((leaves.len() + recipes.len() + outputs.len()) as u64);
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
        Mode::Verify => verify(&run, leaves, recipes, outputs).await,
        Mode::Copy | Mode::DryRun => copy(&run, leaves, recipes, outputs).await,
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
        pins: run.pins.snapshot(),
        bytes,
        duration_seconds: started.elapsed().as_secs_f64(),
        errors: std::mem::take(&mut *run.errors.lock()),
    })
}

async fn copy(
    run: &Arc<Migration>,
    leaves: Vec<CAddr>,
    recipes: Vec<(CAddr, u32)>,
    outputs: Vec<CAddr>,
) -> Result<(), MigrateError> {
    run.bar.set_prefix("leaves");
    for chunk in leaves.chunks(BATCH) {
        // One lookup per batch of what the destination lacks; the rest is skipped.
        let absent = absent(run, ObjectKind::Leaf, chunk).await?;
        let present = (chunk.len() - absent.len()) as u64;
        LiveCounters::add(&run.leaves.skipped, present);
        run.bar.inc(present);
        for_each(run, absent, copy_leaf).await?;
    }
    run.say("leaves done");
    run.bar.set_prefix("recipes");
    copy_recipes(run, recipes).await?;
    run.say("recipes done");
    if !outputs.is_empty() {
        run.bar.set_prefix("outputs");
        for_each(run, outputs, copy_output).await?;
        run.say("outputs done");
    }
    copy_pins(run).await
}

/// Pins the destination's copies of what the source pins (last: a pin names something that
/// must be there).
async fn copy_pins(run: &Migration) -> Result<(), MigrateError> {
    let (src, dst) = pin_sets(run).await?;
    for addr in src {
        if dst.contains(&addr) {
            LiveCounters::add(&run.pins.skipped, 1);
        } else if run.mode == Mode::DryRun {
            LiveCounters::add(&run.pins.copied, 1);
        } else {
            match run.dst.pin(addr).await {
                Ok(_) => LiveCounters::add(&run.pins.copied, 1),
                Err(e) if code_of(&e) == Code::Unavailable => {
                    return Err(MigrateError::store(format!("pinning {addr}"), &e));
                }
                Err(e) => run.failed(&run.pins, format!("pin {addr}: {e}")),
            }
        }
    }
    Ok(())
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

/// Runs `task` on every address, at most `run.concurrency` at once; stops at the first error.
async fn for_each<F, Fut>(
    run: &Arc<Migration>,
    addrs: Vec<CAddr>,
    task: F,
) -> Result<(), MigrateError>
where
    F: Fn(Arc<Migration>, CAddr) -> Fut,
    Fut: Future<Output = Result<(), MigrateError>>,
{
    futures::stream::iter(addrs)
        .map(|addr| task(run.clone(), addr))
        .buffer_unordered(run.concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// Copies one leaf that the destination lacks.
async fn copy_leaf(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let counts = &run.leaves;
    let dst = run.dst.blobs();
    let size = run
        .src
        .blobs()
        .size(addr)
        .await
        .map_err(|e| MigrateError::store(format!("sizing leaf {addr} in the source"), &e))?;
    let Some(size) = size else {
        run.failed(counts, format!("leaf {addr}: no longer in the source"));
        run.step(0);
        return Ok(());
    };
    if run.mode == Mode::DryRun {
        LiveCounters::add(&counts.copied, 1);
        LiveCounters::add(&counts.bytes, size);
        run.step(size);
        return Ok(());
    }
    if size > STREAM_ABOVE {
        return stream_leaf(run, addr, size).await;
    }
    let _permit = run
        .budget
        .acquire_many(run.permits(size))
        .await
        .expect("the budget semaphore is never closed");
    // The source's read verifies the bytes against the address (a damaged leaf is Corrupted).
    let read = run.src.blobs().get(addr).await;
    let Some(data) = run.source_read(counts, &format!("leaf {addr}"), read)? else {
        return Ok(());
    };
    let len = data.len() as u64;
    // The destination hashes what it writes: the address it returns is that hash.
    let written = dst
        .put(data)
        .await
        .map_err(|e| MigrateError::store(format!("writing leaf {addr} to the destination"), &e))?;
    if written != addr {
        return Err(data_loss(format!(
            "leaf {addr}: the bytes written to the destination hash to {written}"
        )));
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, len);
    run.step(len);
    Ok(())
}

/// Copies a large leaf as a stream: the source's read hashes it as it goes (a damaged source
/// ends the stream with an error, which stops the write), and the destination's write hashes
/// it again and commits only if it matches the address.
async fn stream_leaf(run: Arc<Migration>, addr: CAddr, size: u64) -> Result<(), MigrateError> {
    let counts = &run.leaves;
    let _permit = run
        .budget
        .acquire_many(run.permits(size.min(STREAM_MEMORY)))
        .await
        .expect("the budget semaphore is never closed");
    let read = run.src.blobs().get_stream(addr, STREAM_CHUNK).await;
    let Some(chunks) = run.source_read(counts, &format!("leaf {addr}"), read)? else {
        return Ok(());
    };
    match run.dst.blobs().put_stream(addr, chunks).await {
        Ok(()) => {}
        Err(e @ DerivaError::Corrupted { .. }) => {
            return Err(data_loss(format!("leaf {addr}: {e}")));
        }
        Err(e) => {
            return Err(MigrateError::store(
                format!("streaming leaf {addr} to the destination"),
                &e,
            ));
        }
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, size);
    run.step(size);
    Ok(())
}

/// Copies recipes level by level, shallowest first, so that each one's inputs are in the
/// destination before it is.
async fn copy_recipes(
    run: &Arc<Migration>,
    recipes: Vec<(CAddr, u32)>,
) -> Result<(), MigrateError> {
    let mut levels: BTreeMap<u32, Vec<CAddr>> = BTreeMap::new();
    for (addr, depth) in recipes {
        levels.entry(depth).or_default().push(addr);
    }
    let counts = &run.recipes;
    for addrs in levels.into_values() {
        for chunk in addrs.chunks(BATCH) {
            let missing = absent(run, ObjectKind::Recipe, chunk).await?;
            let present = (chunk.len() - missing.len()) as u64;
            LiveCounters::add(&counts.skipped, present);
            run.bar.inc(present);
            if run.mode == Mode::DryRun {
                LiveCounters::add(&counts.copied, missing.len() as u64);
                run.bar.inc(missing.len() as u64);
                continue;
            }
            let read: Vec<(CAddr, Option<Recipe>)> = futures::stream::iter(missing)
                .map(|addr| {
                    let run = run.clone();
                    async move {
                        match run.src.get_recipe(addr).await {
                            Ok(found) => Ok((addr, found.map(|s| s.recipe))),
                            Err(e @ DerivaError::Corrupted { .. }) => {
                                Err(data_loss(format!("recipe {addr} in the source: {e}")))
                            }
                            Err(e) => Err(MigrateError::store(
                                format!("reading recipe {addr} from the source"),
                                &e,
                            )),
                        }
                    }
                })
                .buffered(run.concurrency)
                .try_collect()
                .await?;
            let mut batch = Vec::with_capacity(read.len());
            for (addr, recipe) in read {
                match recipe {
                    Some(recipe) => batch.push(recipe),
                    None => {
                        run.failed(counts, format!("recipe {addr}: no longer in the source"));
                        run.bar.inc(1);
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            match run.dst.put_recipes(batch.clone()).await {
                Ok(_) => {
                    LiveCounters::add(&counts.copied, n);
                    run.bar.inc(n);
                }
                // An input failed to copy: write the others one by one.
                Err(DerivaError::MissingInput { .. }) => {
                    for recipe in batch {
                        put_one_recipe(run, recipe).await?;
                    }
                }
                Err(e) => {
                    return Err(MigrateError::store(
                        "writing recipes to the destination",
                        &e,
                    ));
                }
            }
        }
    }
    Ok(())
}

async fn put_one_recipe(run: &Migration, recipe: Recipe) -> Result<(), MigrateError> {
    let addr = recipe.addr();
    match run.dst.put_recipe(recipe).await {
        Ok(_) => LiveCounters::add(&run.recipes.copied, 1),
        Err(DerivaError::MissingInput { input }) => run.failed(
            &run.recipes,
            format!("recipe {addr}: its input {input} is not in the destination"),
        ),
        Err(e) => {
            return Err(MigrateError::store(
                format!("writing recipe {addr} to the destination"),
                &e,
            ));
        }
    }
    run.bar.inc(1);
    Ok(())
}

async fn copy_output(run: Arc<Migration>, recipe: CAddr) -> Result<(), MigrateError> {
    let counts = &run.outputs;
    let (Some(src), Some(dst)) = (run.src.outputs(), run.dst.outputs()) else {
        return Ok(());
    };
    if output_in_destination(&run, recipe).await? {
        LiveCounters::add(&counts.skipped, 1);
        run.step(0);
        return Ok(());
    }
    let read = src.get(recipe).await;
    let Some(output) = run.source_read(counts, &format!("the output of {recipe}"), read)? else {
        return Ok(());
    };
    let len = output.len() as u64;
    if run.mode == Mode::Copy {
        dst.put(recipe, output).await.map_err(|e| {
            MigrateError::store(
                format!("writing the output of {recipe} to the destination"),
                &e,
            )
        })?;
    }
    LiveCounters::add(&counts.copied, 1);
    LiveCounters::add(&counts.bytes, len);
    run.step(len);
    Ok(())
}

/// `--verify`: every destination object read back and verified; every source object looked
/// up in the destination. Damage is counted and reported, not a stop.
async fn verify(
    run: &Arc<Migration>,
    src_leaves: Vec<CAddr>,
    src_recipes: Vec<(CAddr, u32)>,
    src_outputs: Vec<CAddr>,
) -> Result<(), MigrateError> {
    let list = |what: &'static str, e: DerivaError| {
        MigrateError::store(format!("listing the destination's {what}"), &e)
    };
    let dst_leaves = run
        .dst
        .blobs()
        .list()
        .await
        .map_err(|e| list("leaves", e))?;
    let dst_recipes = run
        .dst
        .recipes()
        .list()
        .await
        .map_err(|e| list("recipes", e))?;
    let dst_outputs = match (run.src.outputs(), run.dst.outputs()) {
        (Some(_), Some(tier)) => tier.list().await.map_err(|e| list("outputs", e))?,
        _ => Vec::new(),
    };
    run.say(format_args!(
        "the destination holds {} leaves, {} recipes, {} outputs",
        dst_leaves.len(),
        dst_recipes.len(),
        dst_outputs.len()
    ));
    run.bar.set_length(
        (dst_leaves.len() + dst_recipes.len() + dst_outputs.len()) as u64
            + (src_leaves.len() + src_recipes.len() + src_outputs.len()) as u64,
    );
    run.bar.set_prefix("leaves");
    for_each(run, dst_leaves, verify_leaf).await?;
    run.bar.set_prefix("recipes");
    let dst_recipes = dst_recipes.into_iter().map(|(a, _)| a).collect();
    for_each(run, dst_recipes, verify_recipe).await?;
    run.bar.set_prefix("outputs");
    for_each(run, dst_outputs, verify_output).await?;

    // Everything of the source is in the destination.
    run.bar.set_prefix("source");
    let src_recipes: Vec<CAddr> = src_recipes.into_iter().map(|(a, _)| a).collect();
    for (kind, addrs) in [
        (ObjectKind::Leaf, &src_leaves),
        (ObjectKind::Recipe, &src_recipes),
    ] {
        for chunk in addrs.chunks(BATCH) {
            let absent = absent(run, kind, chunk).await?;
            run.bar.inc((chunk.len() - absent.len()) as u64);
            for addr in absent {
                let counts = match kind {
                    ObjectKind::Leaf => &run.leaves,
                    ObjectKind::Recipe => &run.recipes,
                };
                run.missing_unless(counts, false, || format!("{} {addr}", kind.name()));
            }
        }
    }
    for_each(run, src_outputs, |run, recipe| async move {
        let present = output_in_destination(&run, recipe).await?;
        run.missing_unless(&run.outputs, present, || format!("output of {recipe}"));
        Ok(())
    })
    .await?;
    let (src_pins, dst_pins) = pin_sets(run).await?;
    for addr in src_pins {
        let present = dst_pins.contains(&addr);
        if present {
            LiveCounters::add(&run.pins.checked, 1);
        }
        run.missing_unless(&run.pins, present, || format!("pin {addr}"));
    }
    Ok(())
}

impl Migration {
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

    /// Counts an object of the source that the destination lacks, unless `present`.
    fn missing_unless(&self, counts: &LiveCounters, present: bool, what: impl FnOnce() -> String) {
        if !present {
            LiveCounters::add(&counts.missing, 1);
            let mut errors = self.errors.lock();
            if errors.len() < ERRORS_KEPT {
                errors.push(format!("{}: not in the destination", what()));
            }
        }
        self.bar.inc(1);
    }

    /// Counts the outcome of reading one destination object back: verified, or damaged.
    fn checked<T>(
        &self,
        counts: &LiveCounters,
        what: String,
        read: deriva_core::Result<Option<T>>,
        len: impl FnOnce(&T) -> u64,
    ) -> Result<(), MigrateError> {
        match read {
            Ok(Some(value)) => {
                let n = len(&value);
                LiveCounters::add(&counts.checked, 1);
                LiveCounters::add(&counts.bytes, n);
                self.step(n);
            }
            Ok(None) => {
                self.failed(counts, format!("{what}: listed but cannot be read"));
                self.step(0);
            }
            Err(e @ DerivaError::Corrupted { .. }) => {
                self.failed(counts, format!("{what}: {e}"));
                self.step(0);
            }
            Err(e) => return Err(MigrateError::store(format!("reading {what}"), &e)),
        }
        Ok(())
    }
}

async fn verify_leaf(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let size = run
        .dst
        .blobs()
        .size(addr)
        .await
        .map_err(|e| MigrateError::store(format!("sizing leaf {addr} in the destination"), &e))?
        .unwrap_or(0);
    if size > STREAM_ABOVE {
        // Read through, a chunk at a time; the stream's end says whether the bytes match.
        let read = match run.dst.blobs().get_stream(addr, STREAM_CHUNK).await {
            Ok(Some(chunks)) => chunks
                .try_fold(0u64, |n, chunk| async move { Ok(n + chunk.len() as u64) })
                .await
                .map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        return run.checked(&run.leaves, format!("leaf {addr}"), read, |n| *n);
    }
    let _permit = run
        .budget
        .acquire_many(run.permits(size))
        .await
        .expect("the budget semaphore is never closed");
    let read = run.dst.blobs().get(addr).await;
    run.checked(&run.leaves, format!("leaf {addr}"), read, |b| {
        b.len() as u64
    })
}

async fn verify_recipe(run: Arc<Migration>, addr: CAddr) -> Result<(), MigrateError> {
    let read = run.dst.get_recipe(addr).await;
    if let Ok(Some(stored)) = &read {
        let inputs = stored.recipe.inputs().to_vec();
        let absent = run
            .dst
            .recipes()
            .first_missing_input(inputs, run.dst.blobs().as_ref())
            .await
            .map_err(|e| {
                MigrateError::store(format!("checking the inputs of recipe {addr}"), &e)
            })?;
        if let Some(input) = absent {
            run.failed(
                &run.recipes,
                format!("recipe {addr}: its input {input} is not in the destination"),
            );
            run.step(0);
            return Ok(());
        }
    }
    run.checked(&run.recipes, format!("recipe {addr}"), read, |_| 0)
}

async fn verify_output(run: Arc<Migration>, recipe: CAddr) -> Result<(), MigrateError> {
    let Some(tier) = run.dst.outputs() else {
        return Ok(());
    };
    let read = tier.get(recipe).await;
    run.checked(&run.outputs, format!("the output of {recipe}"), read, |b| {
        b.len() as u64
    })
}
