//! The commands: [`run`] executes one [`CliArgs`] against a server and prints its answer on
//! stdout; [`run_until_interrupted`] adds Ctrl-C. The `format_*` functions turn each answer
//! into the text `deriva` prints.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deriva_core::CAddr;
use deriva_proto::{
    CascadeInvalidateRequest, CascadeInvalidateResponse, ClusterStatusRequest,
    ClusterStatusResponse, ExplainRequest, GcRequest, GcResponse, GetRequest, GetResponse,
    InvalidateRequest, InvalidateResponse, ListPinsRequest, PinRequest, PutLeafRequest,
    PutRecipeRequest, ResolveRequest, ResolveResponse, StatusRequest, StatusResponse, UnpinRequest,
    VerifyRequest, VerifyResponse, addr_bytes, addr_from_bytes,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::args::{CliArgs, Command, TokenCommand, parse_addr, parse_params};
use crate::client::{CliError, Target, connect, error_line};
use crate::explain::format_explain;

/// `get` shows a progress counter on a terminal once this many bytes have arrived.
pub const PROGRESS_THRESHOLD_BYTES: u64 = 8 << 20;

/// `put` sends a leaf larger than this with `PutLeafStream` (with a progress bar on a
/// terminal), a smaller one as one `PutLeaf`.
pub const STREAM_PUT_THRESHOLD_BYTES: u64 = 8 << 20;

/// The chunk size of a streamed `put`.
pub const PUT_CHUNK_BYTES: usize = 1 << 20;

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

/// The address in a server answer, or a [`CliError::Failed`] if it is not 32 bytes.
fn answered_addr(context: &str, raw: &[u8]) -> Result<CAddr, CliError> {
    addr_from_bytes("addr", raw).map_err(|e| CliError::Failed {
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

/// `CascadeInvalidateResponse` as `key: value` lines (`dry_run: true` first for a dry run),
/// then the evicted addresses, if the server listed them, one per line after `evicted:`.
pub fn format_cascade(r: &CascadeInvalidateResponse, dry_run: bool) -> String {
    let mut out = String::new();
    if dry_run {
        out.push_str("dry_run: true\n");
    }
    let _ = write!(
        out,
        "evicted_count: {}\ntraversed_count: {}\nmax_depth: {}\nbytes_reclaimed: {}\n",
        r.evicted_count, r.traversed_count, r.max_depth, r.bytes_reclaimed
    );
    if !r.evicted_addrs.is_empty() {
        out.push_str("evicted:\n");
        for raw in &r.evicted_addrs {
            let _ = writeln!(out, "  {}", hex(raw));
        }
    }
    out
}

/// `GcResponse` as `key: value` lines in the proto's order, `dry_run:` first (for a dry run
/// with a note that nothing was removed and the counts are what would be); with `detail`, the
/// removed addresses after `removed:` (`would_remove:` in a dry run), one per line, or
/// `(none)`.
pub fn format_gc(r: &GcResponse, detail: bool) -> String {
    let mut out = if r.dry_run {
        "dry_run: true (nothing was removed: the counts are what would be removed)\n".to_owned()
    } else {
        "dry_run: false\n".to_owned()
    };
    let _ = write!(
        out,
        "blobs_removed: {}\nrecipes_removed: {}\ncache_entries_removed: {}\n\
         bytes_reclaimed_blobs: {}\nbytes_reclaimed_cache: {}\ntotal_bytes_reclaimed: {}\n\
         live_blobs: {}\nlive_recipes: {}\npinned_count: {}\nduration_micros: {}\n",
        r.blobs_removed,
        r.recipes_removed,
        r.cache_entries_removed,
        r.bytes_reclaimed_blobs,
        r.bytes_reclaimed_cache,
        r.total_bytes_reclaimed,
        r.live_blobs,
        r.live_recipes,
        r.pinned_count,
        r.duration_micros,
    );
    if detail {
        let header = if r.dry_run { "would_remove" } else { "removed" };
        if r.removed_addrs.is_empty() {
            let _ = writeln!(out, "{header}: (none)");
        } else {
            let _ = writeln!(out, "{header}:");
            for raw in &r.removed_addrs {
                let _ = writeln!(out, "  {}", hex(raw));
            }
        }
    }
    out
}

/// `ClusterStatusResponse`: one line per node (name, state, role, gRPC address, uptime,
/// cache entries and bytes, blobs, load per CPU), then the counts by state.
pub fn format_cluster(r: &ClusterStatusResponse) -> String {
    let mut out = String::new();
    for n in &r.nodes {
        let _ = writeln!(
            out,
            "{} {} {} {} up {}s cache {} entries {} B blobs {} load {:.2}",
            n.name,
            n.state,
            n.role,
            n.grpc_addr,
            n.uptime_secs,
            n.cache_entries,
            n.cache_bytes,
            n.blob_count,
            n.cpu_load
        );
    }
    let _ = writeln!(
        out,
        "alive: {}, suspect: {}, dead: {}",
        r.alive_count, r.suspect_count, r.dead_count
    );
    out
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

/// `deriva token new`: a fresh token on the first line, the token file's line on the second.
fn new_token(scopes: &str, name: &str) -> Result<(), CliError> {
    let token = deriva_util::token::new_token().map_err(|message| CliError::Failed {
        context: "token new".into(),
        message,
    })?;
    let _ = writeln!(
        std::io::stderr(),
        "deriva: the token (line 1) is shown only now; add line 2 to the server's --auth-tokens file"
    );
    emit(&format!(
        "{token}\n{} {scopes} {name}\n",
        deriva_util::token::hashed(&token)
    ))
}

/// Runs one command against `args.server`, printing its answer on stdout.
pub async fn run(args: CliArgs) -> Result<(), CliError> {
    if let Command::Token {
        action: TokenCommand::New { scopes, name },
    } = &args.command
    {
        // Needs no server (nor a valid --token).
        return new_token(scopes, name);
    }
    let server = Target::new(&args.server, args.trace)
        .with_token(args.token.as_deref())?
        .with_tls(crate::client::TlsFiles {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
        });
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
                .resolve(ResolveRequest {
                    addr: addr_bytes(&addr),
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_resolve(&addr, &answer))
        }
        Command::Invalidate {
            addr,
            cascade: false,
            ..
        } => {
            let addr = parse_addr("invalidate", &addr)?;
            let context = format!("invalidate {}", short(&addr));
            let answer = connect(&server)
                .await?
                .invalidate(InvalidateRequest {
                    addr: addr_bytes(&addr),
                    cascade: false,
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_invalidate(&answer))
        }
        Command::Invalidate {
            addr,
            cascade: true,
            dry_run,
            detail,
        } => {
            let addr = parse_addr("invalidate", &addr)?;
            let context = format!("invalidate --cascade {}", short(&addr));
            let answer = connect(&server)
                .await?
                .cascade_invalidate(CascadeInvalidateRequest {
                    addr: addr_bytes(&addr),
                    policy: if dry_run { "dry_run" } else { "immediate" }.into(),
                    include_root: true,
                    detail_addrs: detail,
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format_cascade(&answer, dry_run))
        }
        Command::Pin { addr } => {
            let addr = parse_addr("pin", &addr)?;
            let context = format!("pin {}", short(&addr));
            let answer = connect(&server)
                .await?
                .pin(PinRequest {
                    addr: addr_bytes(&addr),
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format!("was_new: {}\n", answer.was_new))
        }
        Command::Unpin { addr } => {
            let addr = parse_addr("unpin", &addr)?;
            let context = format!("unpin {}", short(&addr));
            let answer = connect(&server)
                .await?
                .unpin(UnpinRequest {
                    addr: addr_bytes(&addr),
                })
                .await
                .map_err(|s| CliError::rpc(&context, s))?
                .into_inner();
            emit(&format!("was_pinned: {}\n", answer.was_pinned))
        }
        Command::Pins => {
            let answer = connect(&server)
                .await?
                .list_pins(ListPinsRequest {})
                .await
                .map_err(|s| CliError::rpc("pins", s))?
                .into_inner();
            let mut out = String::new();
            for raw in &answer.addrs {
                let _ = writeln!(out, "{}", answered_addr("pins", raw)?);
            }
            emit(&out)
        }
        Command::Gc {
            dry_run,
            grace,
            max,
            detail,
        } => {
            let context = if dry_run { "gc --dry-run" } else { "gc" };
            let answer = connect(&server)
                .await?
                .garbage_collect(GcRequest {
                    grace_period_secs: grace.as_secs(),
                    dry_run,
                    detail_addrs: detail,
                    max_removals: max,
                })
                .await
                .map_err(|s| CliError::rpc(context, s))?
                .into_inner();
            emit(&format_gc(&answer, detail))
        }
        Command::Token { .. } => unreachable!("handled before connecting"),
        Command::Cluster => {
            let answer = connect(&server)
                .await?
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(|s| CliError::rpc("cluster", s))?
                .into_inner();
            emit(&format_cluster(&answer))
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
                .verify(VerifyRequest {
                    addr: addr_bytes(&addr),
                })
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
    let (mut source, total): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = if stdin {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let opened = tokio::fs::File::open(file)
            .await
            .map_err(|e| CliError::io(&context, e))?;
        let len = opened.metadata().await.ok().map(|m| m.len());
        (Box::new(opened), len)
    };
    let mut client = connect(server).await?;
    // Up to the threshold, one PutLeaf (which any Deriva server answers); beyond it, the bytes
    // stream in chunks and only a chunk or two is held at a time.
    let mut head = Vec::new();
    (&mut source)
        .take(STREAM_PUT_THRESHOLD_BYTES + 1)
        .read_to_end(&mut head)
        .await
        .map_err(|e| CliError::io(&context, e))?;
    let answer = if head.len() as u64 <= STREAM_PUT_THRESHOLD_BYTES {
        client
            .put_leaf(PutLeafRequest {
                data: Bytes::from(head),
            })
            .await
            .map_err(|s| CliError::rpc(&context, s))?
            .into_inner()
    } else {
        put_streamed(&mut client, &context, Bytes::from(head), source, total).await?
    };
    let addr = answered_addr(&context, &answer.addr)?;
    emit(&format!("{addr}\n"))
}

/// `put` of more than [`STREAM_PUT_THRESHOLD_BYTES`]: `PutLeafStream` of `head` and then the
/// rest of `source`, in chunks of [`PUT_CHUNK_BYTES`], with a progress bar on a terminal. A
/// read error cancels the call, so the server stores nothing.
async fn put_streamed(
    client: &mut crate::client::Client,
    context: &str,
    head: Bytes,
    source: Box<dyn AsyncRead + Unpin + Send>,
    total: Option<u64>,
) -> Result<deriva_proto::PutLeafResponse, CliError> {
    let progress = UploadProgress::new(total);
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
    struct Reading {
        head: Option<Bytes>,
        source: Box<dyn AsyncRead + Unpin + Send>,
        failed: Option<tokio::sync::oneshot::Sender<std::io::Error>>,
        sent: u64,
        progress: UploadProgress,
    }
    let reading = Reading {
        head: Some(head),
        source,
        failed: Some(failed_tx),
        sent: 0,
        progress: progress.clone(),
    };
    let chunks = futures::stream::unfold(reading, |mut r| async move {
        let chunk = match r.head.take() {
            // What was read to choose the call goes first, in chunks like the rest.
            Some(mut head) if !head.is_empty() => {
                let chunk = head.split_to(head.len().min(PUT_CHUNK_BYTES));
                r.head = Some(head);
                chunk
            }
            _ => {
                let mut buf = Vec::with_capacity(PUT_CHUNK_BYTES);
                match (&mut r.source)
                    .take(PUT_CHUNK_BYTES as u64)
                    .read_to_end(&mut buf)
                    .await
                {
                    Ok(0) => return None,
                    Ok(_) => Bytes::from(buf),
                    Err(e) => {
                        // Never end the stream cleanly after a failed read: the caller
                        // cancels the call instead.
                        if let Some(tx) = r.failed.take() {
                            let _ = tx.send(e);
                        }
                        futures::future::pending::<()>().await;
                        return None;
                    }
                }
            }
        };
        r.sent += chunk.len() as u64;
        r.progress.update(r.sent);
        Some((deriva_proto::PutLeafStreamRequest { chunk }, r))
    });
    let call = client.put_leaf_stream(chunks);
    let answer = tokio::select! {
        answer = call => answer
            .map(tonic::Response::into_inner)
            .map_err(|s| CliError::rpc(context, s)),
        Ok(e) = failed_rx => Err(CliError::io(context, e)),
    };
    progress.finish();
    answer
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
        .map(|(i, s)| parse_addr(&format!("-i #{}", i + 1), s).map(|a| addr_bytes(&a)))
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
        .get(GetRequest {
            addr: addr_bytes(&addr),
        })
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

/// The progress bar of a streamed `put` on stderr, when it is a terminal: bytes sent of the
/// file's size (a counter for stdin). Cheap to clone; the clones share the bar.
#[derive(Clone)]
struct UploadProgress(Option<ProgressBar>);

impl UploadProgress {
    fn new(total: Option<u64>) -> Self {
        Self(std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total {
                Some(len) => (
                    ProgressBar::new(len),
                    "{bar:30} {bytes}/{total_bytes} sent ({binary_bytes_per_sec}, {eta} left)",
                ),
                None => (
                    ProgressBar::no_length(),
                    "{spinner} {bytes} sent ({binary_bytes_per_sec}, {elapsed})",
                ),
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        }))
    }

    fn update(&self, sent: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(sent);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// A temporary file next to the `-o` destination; removed when dropped unless
/// [`TempOutput::persist`] renamed it into place. A destination that exists and is not a regular
/// file (a device, a pipe) is written directly instead, and `persisted` from the start.
struct TempOutput {
    file: tokio::fs::File,
    path: PathBuf,
    dest: PathBuf,
    persisted: bool,
}

impl TempOutput {
    async fn create(context: &str, dest: &Path) -> Result<Self, CliError> {
        let existing = tokio::fs::metadata(dest).await.ok();
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(CliError::Usage(format!(
                "-o {}: is a directory",
                dest.display()
            )));
        }
        // A device, a pipe or a socket (`-o /dev/null`, `-o /dev/stdout`, a FIFO) takes the
        // bytes as they come: renaming a file over it would replace it (as root, /dev/null
        // itself) instead of writing to it.
        if existing.is_some_and(|m| !m.is_file()) {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(dest)
                .await
                .map_err(|e| {
                    CliError::io(format!("{context}: cannot open {}", dest.display()), e)
                })?;
            return Ok(Self {
                file,
                path: dest.to_owned(),
                dest: dest.to_owned(),
                persisted: true,
            });
        }
        let name = dest
            .file_name()
            .ok_or_else(|| CliError::Usage(format!("-o {}: not a file name", dest.display())))?;
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

    /// Flushes the file to disk and renames it to the destination (a destination that is not a
    /// regular file was written in place: nothing to do).
    async fn persist(&mut self) -> std::io::Result<()> {
        if self.persisted {
            return Ok(());
        }
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
