//! The commands: [`run`] executes one [`CliArgs`] against a server and prints its answer on
//! stdout; [`run_until_interrupted`] adds Ctrl-C. The `format_*` functions turn each answer
//! into the text `deriva` prints (`format.rs`); `put` and `get`, which move files, are in
//! `transfer.rs`; `provenance` is in `provenance.rs`.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};

use deriva_core::CAddr;
use deriva_proto::{
    CascadeInvalidateRequest, ClusterStatusRequest, ExplainRequest, GcRequest, InvalidateRequest,
    ListPinsRequest, PinRequest, PutRecipeRequest, ResolveRequest, StatusRequest, UnpinRequest,
    VerifyRequest, addr_bytes, addr_from_bytes,
};

use crate::args::{CliArgs, Command, TokenCommand, parse_addr, parse_params};
use crate::client::{CliError, Target, connect, error_line};
use crate::explain::format_explain;

mod format;
mod provenance;
mod transfer;

pub use format::{
    format_cascade, format_cluster, format_gc, format_invalidate, format_resolve, format_status,
    format_verify,
};
use transfer::{get, put};

/// `get` shows a progress counter on a terminal once this many bytes have arrived.
pub const PROGRESS_THRESHOLD_BYTES: u64 = 8 << 20;

/// `put` sends a leaf larger than this with `PutLeafStream` (with a progress bar on a
/// terminal), a smaller one as one `PutLeaf`.
pub const STREAM_PUT_THRESHOLD_BYTES: u64 = 8 << 20;

/// The chunk size of a streamed `put`.
pub const PUT_CHUNK_BYTES: usize = 1 << 20;

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
            // The tree must be kept whatever the server's sampling.
            let server = if explain { server.capturing() } else { server };
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
            let mut client = connect(&server).await?;
            // On a terminal, a bar that follows the collection through `Status`.
            let bar = std::io::stderr()
                .is_terminal()
                .then(|| tokio::spawn(gc_progress(client.clone())));
            let answer = client
                .garbage_collect(GcRequest {
                    grace_period_secs: grace.as_secs(),
                    dry_run,
                    detail_addrs: detail,
                    max_removals: max,
                })
                .await;
            if let Some(bar) = bar {
                bar.abort();
                // The bar is cleared when its task drops it.
                let _ = bar.await;
            }
            let answer = answer.map_err(|s| CliError::rpc(context, s))?.into_inner();
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
        Command::Provenance {
            addr,
            depth,
            json,
            verify_key,
        } => provenance::provenance(&server, &addr, depth, json, verify_key.as_deref()).await,
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

/// Shows the progress of the server's garbage collection on stderr until aborted: its phase
/// and how far it got, polled from `Status` every 200 ms. A server too old to tell (no
/// `gc_phase`) or an error shows nothing.
async fn gc_progress(mut client: crate::client::Client) {
    /// Clears the bar however the task ends (aborted, mostly).
    struct Clear(indicatif::ProgressBar);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    let bar = Clear(indicatif::ProgressBar::hidden());
    bar.0.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {human_pos}/{human_len} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut shown = false;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let Ok(status) = client.status(StatusRequest {}).await else {
            continue;
        };
        let status = status.into_inner();
        if status.gc_phase.is_empty() || status.gc_phase == "idle" {
            continue;
        }
        if !shown {
            bar.0
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.0.set_prefix(status.gc_phase);
        bar.0.set_length(status.gc_total.max(status.gc_done));
        bar.0.set_position(status.gc_done);
    }
}
