//! The `deriva` command-line client: [`CliArgs`] (its flags and subcommands), [`run`] (which
//! executes one command against a server) and the helpers that format each answer.
//!
//! Everything local is checked before any RPC — addresses must be 64 hex characters, params
//! `key=value` — so bad input fails the same way whether or not a server is running. Errors are
//! [`CliError`]s; [`CliError::exit_code`] is 2 for usage errors and 1 for server and I/O errors,
//! and [`error_line`] renders one as the single `deriva: ...` line the binary prints.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use deriva_core::CAddr;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::deriva_client::DerivaClient;
use crate::proto::{
    ExplainRequest, ExplainResponse, GetRequest, GetResponse, InvalidateRequest,
    InvalidateResponse, PutLeafRequest, PutRecipeRequest, ResolveRequest, ResolveResponse,
    StatusRequest, StatusResponse, TraceSpan, VerifyRequest, VerifyResponse,
};

/// The server the client talks to when given neither `--server` nor `DERIVA_SERVER`.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The client's own gRPC message limit, both ways. The server enforces its own (smaller) one.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// `get` shows a progress counter on a terminal once this many bytes have arrived.
pub const PROGRESS_THRESHOLD_BYTES: u64 = 8 << 20;

/// How long to wait for the TCP (and HTTP/2) connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `deriva`: the command-line client of a Deriva server.
#[derive(Debug, Parser)]
#[command(
    name = "deriva",
    version,
    about = "Command-line client of a Deriva server: store leaves and recipes, fetch their bytes",
    long_about = "Command-line client of a Deriva server, a computation-addressed store. Leaves \
                  are stored by their BLAKE3 address; recipes (a function, input addresses and \
                  params) have addresses too and are materialized on demand. Addresses are \
                  printed and accepted as 64 hex characters."
)]
pub struct CliArgs {
    /// URL of the server (a bare HOST:PORT means http://HOST:PORT).
    #[arg(
        long,
        global = true,
        env = "DERIVA_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "URL"
    )]
    pub server: String,
    /// Print this command's trace id to stderr (to look it up in Jaeger), and ask the server to
    /// sample the trace whatever its sampling ratio.
    #[arg(long, global = true)]
    pub trace: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `deriva` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a file (or stdin) as a leaf and print its address.
    Put {
        /// The file to store, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Store a recipe and print its address.
    Recipe {
        /// Function name, such as `concat`.
        function: String,
        /// Function version, such as `v1`.
        version: String,
        /// An input address; repeat for several inputs, in order.
        #[arg(short = 'i', long = "input", value_name = "ADDR")]
        inputs: Vec<String>,
        /// A parameter, as key=value; repeat for several.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Materialize an address and write its bytes to stdout or to a file.
    Get {
        /// The address (64 hex characters).
        addr: String,
        /// Write to FILE instead of stdout. The bytes go to a temporary file in the same
        /// directory, renamed to FILE only once the transfer is complete.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// After the transfer, print the materialization tree of this Get to stderr: cache hits
        /// and misses, leaves, computes with their sizes, and the time of each step.
        #[arg(long)]
        explain: bool,
    },
    /// Show the recipe behind an address (function, version, inputs, params).
    Resolve {
        /// The address (64 hex characters).
        addr: String,
    },
    /// Evict an address from the server's cache; print whether it was cached and the count
    /// evicted.
    Invalidate {
        /// The address (64 hex characters).
        addr: String,
        /// Also evict every recipe that depends on it, directly or not.
        #[arg(long)]
        cascade: bool,
    },
    /// Print the server's store, cache and verification counters.
    Status,
    /// Compute a recipe twice and compare; exits with 1 if the two outputs differ.
    Verify {
        /// The address of a recipe (64 hex characters).
        addr: String,
    },
    /// Load-test the server: prepare data, run a workload from concurrent clients, report
    /// throughput and latency (p50/p99/p999).
    Bench(crate::bench::BenchArgs),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong (a bad address, a param without `=`, a bad URL). Exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot reach the server at {url}: {reason}")]
    Connect {
        /// The `--server` URL.
        url: String,
        /// Why, from the transport.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{context}: {}", describe_status(.status))]
    Rpc {
        /// The command and its subject, such as `get 1a2b3c4d…`.
        context: String,
        /// The status, whose code is printed in words, followed by the server's message.
        status: tonic::Status,
    },
    /// Reading input or writing output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The command ran but its answer is a failure (a non-deterministic recipe, a malformed
    /// answer).
    #[error("{context}: {message}")]
    Failed {
        /// The command and its subject.
        context: String,
        /// What went wrong.
        message: String,
    },
    /// Interrupted by Ctrl-C. Exit code 130.
    #[error("interrupted")]
    Interrupted,
}

impl CliError {
    /// The process exit code: 2 for usage errors, 130 for an interrupt, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Interrupted => 130,
            _ => 1,
        }
    }

    fn rpc(context: &str, status: tonic::Status) -> Self {
        Self::Rpc {
            context: context.to_owned(),
            status,
        }
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The one line `deriva` prints for `err` on stderr: `deriva: ...`, line breaks flattened.
pub fn error_line(err: &CliError) -> String {
    let text = err.to_string();
    let flat: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    format!("deriva: {}", flat.join(" "))
}

/// A gRPC status as `code in words: message`.
fn describe_status(status: &tonic::Status) -> String {
    let words = code_words(status.code());
    if status.message().is_empty() {
        words.to_owned()
    } else {
        format!("{words}: {}", status.message())
    }
}

/// A gRPC code in words, such as `not found`.
pub fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Parses a command-line address, naming `what` (such as `get` or `-i #2`) when it is wrong.
pub fn parse_addr(what: &str, s: &str) -> Result<CAddr, CliError> {
    s.parse::<CAddr>()
        .map_err(|e| CliError::Usage(format!("{what}: {s:?} is not an address: {e}")))
}

/// Parses `key=value` (split at the first `=`; the value may be empty or contain `=`).
pub fn parse_param(s: &str) -> Result<(String, String), CliError> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => Err(CliError::Usage(format!(
            "-p {s:?}: a param is key=value (no '=' found)"
        ))),
    }
}

/// The params of a recipe command line; a key given twice is a usage error.
pub fn parse_params(raw: &[String]) -> Result<std::collections::HashMap<String, String>, CliError> {
    let mut params = std::collections::HashMap::new();
    for p in raw {
        let (k, v) = parse_param(p)?;
        if params.contains_key(&k) {
            return Err(CliError::Usage(format!("-p: param {k:?} is given twice")));
        }
        params.insert(k, v);
    }
    Ok(params)
}

/// Lowercase hex of raw bytes (for a 32-byte address, the same as `CAddr`'s `Display`).
fn hex(raw: &[u8]) -> String {
    raw.iter()
        .fold(String::with_capacity(raw.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn short(addr: &CAddr) -> String {
    format!("{}…", addr.short())
}

fn wire(addr: &CAddr) -> Bytes {
    Bytes::copy_from_slice(addr.as_bytes())
}

/// The address in a server answer, or a [`CliError::Failed`] if it is not 32 bytes.
fn answered_addr(context: &str, raw: &[u8]) -> Result<CAddr, CliError> {
    CAddr::from_slice(raw).map_err(|e| CliError::Failed {
        context: context.to_owned(),
        message: format!("the server answered a malformed address: {e}"),
    })
}

/// `ResolveResponse` as text: `function:`, `version:`, `inputs:` and `params:` (sorted by
/// key), one item per indented line; or a line saying the address is not a recipe.
pub fn format_resolve(addr: &CAddr, r: &ResolveResponse) -> String {
    if !r.found {
        return format!("{addr}: not a recipe (a leaf, or an address the server does not know)\n");
    }
    let mut out = format!(
        "function: {}\nversion: {}\n",
        r.function_name, r.function_version
    );
    if r.inputs.is_empty() {
        out.push_str("inputs: (none)\n");
    } else {
        out.push_str("inputs:\n");
        for input in &r.inputs {
            let _ = writeln!(out, "  {}", hex(input));
        }
    }
    if r.params.is_empty() {
        out.push_str("params: (none)\n");
    } else {
        out.push_str("params:\n");
        let mut params: Vec<_> = r.params.iter().collect();
        params.sort();
        for (k, v) in params {
            let _ = writeln!(out, "  {k}={v}");
        }
    }
    out
}

/// `InvalidateResponse` as `was_cached:` and `evicted_count:` lines.
pub fn format_invalidate(r: &InvalidateResponse) -> String {
    format!(
        "was_cached: {}\nevicted_count: {}\n",
        r.was_cached, r.evicted_count
    )
}

/// Every field of `StatusResponse`, one `key: value` per line, in the proto's order.
pub fn format_status(s: &StatusResponse) -> String {
    format!(
        "recipe_count: {}\nblob_count: {}\ncache_entries: {}\ncache_size_bytes: {}\n\
         cache_hit_rate: {}\nverification_mode: {}\nverification_total: {}\n\
         verification_passed: {}\nverification_failed: {}\nverification_failure_rate: {}\n",
        s.recipe_count,
        s.blob_count,
        s.cache_entries,
        s.cache_size_bytes,
        s.cache_hit_rate,
        s.verification_mode,
        s.verification_total,
        s.verification_passed,
        s.verification_failed,
        s.verification_failure_rate,
    )
}

/// `VerifyResponse` as `deterministic:`, `output_hash:`, `output_size:` and `compute_time_us:`
/// lines, plus `error:` when the server gave one.
pub fn format_verify(v: &VerifyResponse) -> String {
    let mut out = format!(
        "deterministic: {}\noutput_hash: {}\noutput_size: {}\ncompute_time_us: {}\n",
        v.deterministic, v.output_hash, v.output_size, v.compute_time_us
    );
    if !v.error.is_empty() {
        let _ = writeln!(out, "error: {}", v.error.replace('\n', " "));
    }
    out
}

/// Writes `text` to stdout. A closed pipe (`deriva status | head -1`) is not an error.
fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::io("cannot write to stdout", e))
        }
        _ => Ok(()),
    }
}

/// The server a command talks to, and the W3C trace context every request of this command
/// carries, so the server's spans join one trace per command.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server URL as given.
    pub url: String,
    /// `traceparent`: a fresh trace id and span id, sampled; `None` sends none (bench), leaving
    /// the sampling decision to the server.
    pub traceparent: Option<MetadataValue<Ascii>>,
    /// The trace id of this command (32 hex characters).
    pub trace_id: String,
    /// Whether to ask the server to sample whatever its ratio (`x-deriva-trace: force`).
    pub force: bool,
}

impl Target {
    /// A target with a new random trace context.
    pub fn new(url: &str, force: bool) -> Self {
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let traceparent = format!("00-{trace_id}-{span_id}-01")
            .parse()
            .expect("hex and dashes are valid metadata");
        Self {
            url: url.to_owned(),
            traceparent: Some(traceparent),
            trace_id,
            force,
        }
    }
}

/// Adds the command's trace context to every request.
#[derive(Debug, Clone)]
pub struct TraceContext {
    traceparent: Option<MetadataValue<Ascii>>,
    force: bool,
}

impl Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(traceparent) = &self.traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.clone());
        }
        if self.force {
            request
                .metadata_mut()
                .insert("x-deriva-trace", MetadataValue::from_static("force"));
        }
        Ok(request)
    }
}

/// A connected client.
pub type Client = DerivaClient<InterceptedService<Channel, TraceContext>>;

/// The tree of this command's request, for `get --explain`, or a line saying why there is none.
async fn explain_trace(target: &Target) -> String {
    let asked = async {
        connect(target)
            .await?
            .explain(ExplainRequest {
                trace_id: target.trace_id.clone(),
            })
            .await
            .map_err(|s| CliError::rpc("explain", s))
    };
    match asked.await {
        Ok(resp) => format_explain(&resp.into_inner()),
        Err(e) => format!("{}\n", error_line(&e)),
    }
}

/// Width of the `--explain` output.
const EXPLAIN_WIDTH: usize = 80;
/// Deepest level indented; deeper levels show their depth instead.
const EXPLAIN_MAX_INDENT: usize = 16;
/// Most lines printed before the rest is summarized.
const EXPLAIN_MAX_LINES: usize = 200;

/// Renders an `Explain` answer as a tree, one line per step, indented by depth, with each
/// step's duration right-aligned within 80 columns, and the total at the end.
pub fn format_explain(resp: &ExplainResponse) -> String {
    use std::collections::HashMap;
    let mut children: HashMap<u64, Vec<&TraceSpan>> = HashMap::new();
    for span in &resp.spans {
        children.entry(span.parent).or_default().push(span);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (s.start_us, s.id));
    }
    let field = |span: &TraceSpan, key: &str| {
        span.fields
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.value.clone())
            .unwrap_or_default()
    };
    let short_addr = |a: String| a.get(..8).map_or(a.clone(), str::to_owned);
    let mut lines: Vec<(usize, String, Option<u64>)> = Vec::new();
    // Depth-first, iteratively: a deep recipe chain must not recurse.
    let root = resp.spans.first();
    let mut stack: Vec<(&TraceSpan, usize)> = root
        .map(|r| {
            children
                .get(&r.id)
                .into_iter()
                .flatten()
                .rev()
                .map(|c| (*c, 0))
                .collect()
        })
        .unwrap_or_default();
    while let Some((span, depth)) = stack.pop() {
        let line = match span.name.as_str() {
            "materialize" => Some((
                format!(
                    "materialize {} {}",
                    short_addr(field(span, "addr")),
                    field(span, "result")
                ),
                Some(span.duration_us),
            )),
            "cache_check" => Some((
                if field(span, "hit") == "true" {
                    "cache hit"
                } else {
                    "cache miss"
                }
                .to_owned(),
                None,
            )),
            "leaf_read" if field(span, "found") == "true" => {
                Some(("leaf read".to_owned(), Some(span.duration_us)))
            }
            "leaf_read" => None,
            "compute" => Some((
                format!(
                    "compute {} {} → {}",
                    field(span, "function"),
                    bytes_text(&field(span, "input_bytes")),
                    bytes_text(&field(span, "output_bytes"))
                ),
                Some(span.duration_us),
            )),
            "verify" => Some((
                format!(
                    "verify {}",
                    if field(span, "passed") == "true" {
                        "passed"
                    } else {
                        "FAILED"
                    }
                ),
                Some(span.duration_us),
            )),
            "cache_put" => Some((
                format!("cache put {}", bytes_text(&field(span, "bytes"))),
                None,
            )),
            other => Some((other.to_owned(), Some(span.duration_us))),
        };
        if let Some((text, duration)) = line {
            lines.push((depth, text, duration));
        }
        for child in children.get(&span.id).into_iter().flatten().rev() {
            stack.push((child, depth + 1));
        }
    }
    let mut out = String::new();
    let status = if resp.status_code == 0 {
        "ok".to_owned()
    } else {
        format!("status {}", resp.status_code)
    };
    let _ = writeln!(out, "{} trace {} ({status})", resp.method, resp.trace_id);
    for (depth, text, duration) in lines.iter().take(EXPLAIN_MAX_LINES) {
        let indent = if *depth <= EXPLAIN_MAX_INDENT {
            "  ".repeat(*depth + 1)
        } else {
            format!("{}[{depth}] ", "  ".repeat(EXPLAIN_MAX_INDENT + 1))
        };
        let left = format!("{indent}{text}");
        match duration {
            Some(us) => {
                let right = duration_text(*us);
                let pad = EXPLAIN_WIDTH
                    .saturating_sub(left.chars().count() + right.chars().count() + 1)
                    .max(1);
                let _ = writeln!(out, "{left}{} {right}", " ".repeat(pad));
            }
            None => {
                let _ = writeln!(out, "{left}");
            }
        }
    }
    if lines.len() > EXPLAIN_MAX_LINES {
        let _ = writeln!(out, "  … {} more steps", lines.len() - EXPLAIN_MAX_LINES);
    }
    if resp.dropped_spans > 0 {
        let _ = writeln!(
            out,
            "  ({} spans were too many to keep)",
            resp.dropped_spans
        );
    }
    let total = format!("total {}", duration_text(resp.duration_us));
    let _ = writeln!(out, "{total}");
    out
}

fn duration_text(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn bytes_text(raw: &str) -> String {
    let Ok(n) = raw.parse::<u64>() else {
        return format!("{raw} B");
    };
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Connects to `target` with the client's message limits and its trace context.
pub async fn connect(target: &Target) -> Result<Client, CliError> {
    let server = target.url.as_str();
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    if !url
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
    {
        // Without a TLS stack, an https URL would silently be served in plain text.
        return Err(CliError::Usage(format!(
            "--server {server:?}: only http:// URLs are supported"
        )));
    }
    let endpoint = Endpoint::from_shared(url).map_err(|e| {
        CliError::Usage(format!(
            "--server {server:?} is not a valid URL: {}",
            error_chain(&e)
        ))
    })?;
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| CliError::Connect {
            url: server.to_owned(),
            reason: error_chain(&e),
        })?;
    let trace = TraceContext {
        traceparent: target.traceparent.clone(),
        force: target.force,
    };
    Ok(DerivaClient::with_interceptor(channel, trace)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// An error and its sources as `a: b: c`, leaving out the generic `transport error` wrapper and
/// any message that only repeats the next one.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    let keep: Vec<&str> = parts
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            let later = parts.get(i + 1);
            p.as_str() != "transport error" && !later.is_some_and(|l| p.ends_with(l.as_str()))
        })
        .map(|(_, p)| p.as_str())
        .collect();
    if keep.is_empty() {
        parts.join(": ")
    } else {
        keep.join(": ")
    }
}

/// Runs `run(args)`, stopping it on Ctrl-C with [`CliError::Interrupted`]. Stopping drops the
/// command, which removes a `get -o` temporary file.
pub async fn run_until_interrupted(args: CliArgs) -> Result<(), CliError> {
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handler: never interrupt.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = run(args) => result,
        () = interrupted => Err(CliError::Interrupted),
    }
}

/// Runs one command against `args.server`, printing its answer on stdout.
pub async fn run(args: CliArgs) -> Result<(), CliError> {
    let server = Target::new(&args.server, args.trace);
    if args.trace {
        let _ = writeln!(std::io::stderr(), "deriva: trace id {}", server.trace_id);
    }
    match args.command {
        Command::Put { file } => put(&server, &file).await,
        Command::Recipe {
            function,
            version,
            inputs,
            params,
        } => recipe(&server, function, version, &inputs, &params).await,
        Command::Get {
            addr,
            output,
            explain,
        } => {
            let addr = parse_addr("get", &addr)?;
            let result = get(&server, addr, output.as_deref()).await;
            if explain {
                // Explain failures too: the tree shows where it went wrong.
                let tree = explain_trace(&server).await;
                let _ = std::io::stderr().write_all(tree.as_bytes());
            }
            result
        }
        Command::Resolve { addr } => {
            let addr = parse_addr("resolve", &addr)?;
            let context = format!("resolve {}", short(&addr));
            let answer = connect(&server)
                .await?
                .resolve(ResolveRequest { addr: wire(&addr) })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_resolve(&addr, &answer))
        }
        Command::Invalidate { addr, cascade } => {
            let addr = parse_addr("invalidate", &addr)?;
            let context = format!("invalidate {}", short(&addr));
            let answer = connect(&server)
                .await?
                .invalidate(InvalidateRequest {
                    addr: wire(&addr),
                    cascade,
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_invalidate(&answer))
        }
        Command::Status => {
            let answer = connect(&server)
                .await?
                .status(StatusRequest {})
                .await
                .map_err(|s| CliError::rpc("status", s))?
                .into_inner();
            emit(&format_status(&answer))
        }
        Command::Bench(bench) => {
            let target = Target {
                traceparent: None,
                ..server
            };
            let report = crate::bench::run(&target, &bench).await?;
            if bench.json {
                let json = serde_json::to_string_pretty(&report).map_err(|e| CliError::Failed {
                    context: "bench".into(),
                    message: e.to_string(),
                })?;
                emit(&format!("{json}\n"))
            } else {
                emit(&report.text())
            }
        }
        Command::Verify { addr } => {
            let addr = parse_addr("verify", &addr)?;
            let context = format!("verify {}", short(&addr));
            let answer = connect(&server)
                .await?
                .verify(VerifyRequest { addr: wire(&addr) })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_verify(&answer))?;
            if answer.deterministic {
                Ok(())
            } else {
                Err(CliError::Failed {
                    context,
                    message: if answer.error.is_empty() {
                        "not deterministic".to_owned()
                    } else {
                        format!("not deterministic: {}", answer.error)
                    },
                })
            }
        }
    }
}

async fn put(server: &Target, file: &Path) -> Result<(), CliError> {
    let stdin = file == Path::new("-");
    let context = if stdin {
        "put stdin".to_owned()
    } else {
        format!("put {}", file.display())
    };
    // Open before connecting, so a missing file is reported as such whatever the server.
    let mut source: Box<dyn AsyncRead + Unpin + Send> = if stdin {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(file)
                .await
                .map_err(|e| CliError::io(&context, e))?,
        )
    };
    let mut client = connect(server).await?;
    let mut data = Vec::new();
    source
        .read_to_end(&mut data)
        .await
        .map_err(|e| CliError::io(&context, e))?;
    let answer = client
        .put_leaf(PutLeafRequest {
            data: Bytes::from(data),
        })
        .await
        .map_err(|s| CliError::rpc(&context, s))?
        .into_inner();
    let addr = answered_addr(&context, &answer.addr)?;
    emit(&format!("{addr}\n"))
}

async fn recipe(
    server: &Target,
    function: String,
    version: String,
    inputs: &[String],
    params: &[String],
) -> Result<(), CliError> {
    let inputs = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| parse_addr(&format!("-i #{}", i + 1), s).map(|a| wire(&a)))
        .collect::<Result<Vec<_>, _>>()?;
    let params = parse_params(params)?;
    let context = format!("recipe {function}/{version}");
    let answer = connect(server)
        .await?
        .put_recipe(PutRecipeRequest {
            function_name: function,
            function_version: version,
            inputs,
            params,
        })
        .await
        .map_err(|s| CliError::rpc(&context, s))?
        .into_inner();
    let addr = answered_addr(&context, &answer.addr)?;
    emit(&format!("{addr}\n"))
}

async fn get(server: &Target, addr: CAddr, output: Option<&Path>) -> Result<(), CliError> {
    let context = format!("get {}", short(&addr));
    let output = output.filter(|p| *p != Path::new("-"));
    // Create the temporary file before connecting, so an unwritable directory fails before the
    // server computes anything.
    let mut temp = match output {
        Some(path) => Some(TempOutput::create(&context, path).await?),
        None => None,
    };
    let mut stream = connect(server)
        .await?
        .get(GetRequest { addr: wire(&addr) })
        .await
        .map_err(|s| CliError::rpc(&context, s))?
        .into_inner();
    match temp.as_mut() {
        None => {
            let mut stdout = tokio::io::stdout();
            match copy_chunks(&mut stream, &mut stdout).await {
                Ok(_) => Ok(()),
                Err(CopyError::Rpc(s)) => Err(CliError::rpc(&context, s)),
                // The reader went away (`deriva get X | head`): stop quietly.
                Err(CopyError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(CopyError::Write(e)) => Err(CliError::io(
                    format!("{context}: cannot write to stdout"),
                    e,
                )),
            }
        }
        Some(temp) => {
            match copy_chunks(&mut stream, &mut temp.file).await {
                Ok(_) => {}
                Err(CopyError::Rpc(s)) => return Err(CliError::rpc(&context, s)),
                Err(CopyError::Write(e)) => {
                    return Err(CliError::io(
                        format!("{context}: cannot write to {}", temp.path.display()),
                        e,
                    ));
                }
            }
            temp.persist()
                .await
                .map_err(|e| CliError::io(context.clone(), e))
        }
    }
}

enum CopyError {
    Rpc(tonic::Status),
    Write(std::io::Error),
}

/// Writes each chunk as it arrives, with a progress counter once it is worth one. Returns the
/// byte count.
async fn copy_chunks<W: AsyncWrite + Unpin>(
    stream: &mut tonic::Streaming<GetResponse>,
    out: &mut W,
) -> Result<u64, CopyError> {
    let mut progress = Progress::new();
    let mut total = 0u64;
    while let Some(message) = stream.message().await.map_err(CopyError::Rpc)? {
        out.write_all(&message.chunk)
            .await
            .map_err(CopyError::Write)?;
        total += message.chunk.len() as u64;
        progress.update(total);
    }
    out.flush().await.map_err(CopyError::Write)?;
    Ok(total)
}

/// A bytes-received spinner on stderr, shown only when stderr is a terminal and the transfer
/// has passed [`PROGRESS_THRESHOLD_BYTES`] (`Get` has no total size up front). Cleared when
/// dropped.
struct Progress {
    /// Counting hidden from the first byte, so the rate is right once it shows.
    bar: Option<ProgressBar>,
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bytes} received ({binary_bytes_per_sec}, {elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        });
        Self { bar, shown: false }
    }

    fn update(&mut self, received: u64) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(received);
        if !self.shown && received > PROGRESS_THRESHOLD_BYTES {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(100));
            self.shown = true;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A temporary file next to the `-o` destination; removed when dropped unless
/// [`TempOutput::persist`] renamed it into place.
struct TempOutput {
    file: tokio::fs::File,
    path: PathBuf,
    dest: PathBuf,
    persisted: bool,
}

impl TempOutput {
    async fn create(context: &str, dest: &Path) -> Result<Self, CliError> {
        let name = dest
            .file_name()
            .ok_or_else(|| CliError::Usage(format!("-o {}: not a file name", dest.display())))?;
        if tokio::fs::metadata(dest).await.is_ok_and(|m| m.is_dir()) {
            return Err(CliError::Usage(format!(
                "-o {}: is a directory",
                dest.display()
            )));
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut attempt = 0u32;
        loop {
            let path = dir.join(format!(
                ".{}.{}-{}.deriva-tmp",
                name.to_string_lossy(),
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        path,
                        dest: dest.to_owned(),
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(CliError::io(
                        format!(
                            "{context}: cannot create a temporary file in {}",
                            dir.display()
                        ),
                        e,
                    ));
                }
            }
        }
    }

    /// Flushes the file to disk and renames it to the destination.
    async fn persist(&mut self) -> std::io::Result<()> {
        self.file.sync_all().await?;
        tokio::fs::rename(&self.path, &self.dest)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot rename {} to {}: {e}",
                        self.path.display(),
                        self.dest.display()
                    ),
                )
            })?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
