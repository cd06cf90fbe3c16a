//! `deriva-server`: parses its flags, binds, serves until SIGINT or SIGTERM, shuts down; SIGHUP
//! reloads the token file and the TLS files, and never ends the process. With
//! `--print-config` it prints the configuration and exits instead; `deriva-server migrate …`
//! copies a store between backends ([`deriva_server::migrate`]).

use std::process::ExitCode;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use deriva_server::migrate::{self, MigrateArgs};
use deriva_server::server::Reloader;
use deriva_server::telemetry::Telemetry;
use deriva_server::{Config, Server, ServerArgs};
use tokio::net::TcpListener;

/// jemalloc rather than glibc's malloc, configured at build time to return freed memory
/// promptly (`.cargo/config.toml`): chosen by measurement (BENCHMARKS.md §14).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "migrate") {
        return migrate();
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "keygen") {
        return keygen();
    }
    let args = ServerArgs::parse();
    let print_only = args.print_config;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("deriva-server: {e}");
            return ExitCode::from(2);
        }
    };
    if print_only {
        return print_config(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deriva-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // First of all, before anything is bound or announced: from here on SIGINT and SIGTERM
        // are caught and lead to the graceful path, never to the default action (which would
        // end the process without draining calls or flushing telemetry).
        let signals = match ShutdownSignals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("deriva-server: cannot install the SIGINT and SIGTERM handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Next to them, before the store opens: SIGHUP is a reload, never the default action
        // (which would end the process).
        let reloads = match Reloads::install() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("deriva-server: cannot install the SIGHUP handler: {e}");
                return ExitCode::FAILURE;
            }
        };
        let telemetry = match Telemetry::new(config.telemetry.clone()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("deriva-server: {e}");
                return ExitCode::FAILURE;
            }
        };
        match telemetry.subscriber(std::io::stderr) {
            Ok(dispatch) => {
                // The only global install in Deriva: the binary's subscriber.
                let _ = tracing::dispatcher::set_global_default(dispatch);
                for warning in &telemetry.plan().warnings {
                    tracing::warn!("{warning}");
                }
            }
            Err(e) => {
                eprintln!("deriva-server: {e}");
                return ExitCode::from(2);
            }
        }
        let code = run(config, &telemetry, signals, &reloads).await;
        telemetry.shutdown(TELEMETRY_FLUSH_TIMEOUT).await;
        code
    });
    // Dropping the runtime would wait for every blocking-pool thread: a compute cancelled at
    // the end of the grace period that ignores its cancellation would keep the process alive.
    // The store is closed by now; such a thread is abandoned when the process exits.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    code
}

/// How long the exit waits for blocking-pool threads still running once serving has stopped.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// `deriva-server migrate …`: the migration, its report on stdout (JSON with `--json`), and
/// the exit status of [`MigrateError::exit_code`].
fn migrate() -> ExitCode {
    let args = MigrateArgs::parse_from(
        std::iter::once(std::ffi::OsString::from("deriva-server migrate"))
            .chain(std::env::args_os().skip(2)),
    );
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deriva-server migrate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(migrate::run(args));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => eprintln!("deriva-server migrate: cannot print the report: {e}"),
                }
            } else {
                print!("{}", report.human());
            }
            match report.problems() {
                0 => ExitCode::SUCCESS,
                n => {
                    eprintln!(
                        "deriva-server migrate: {n} object(s) failed, damaged or missing{}",
                        report
                            .errors
                            .first()
                            .map(|e| format!("; the first: {e}"))
                            .unwrap_or_default()
                    );
                    let damaged = report.mode == "verify"
                        && [
                            Some(&report.leaves),
                            Some(&report.recipes),
                            report.outputs.as_ref(),
                        ]
                        .into_iter()
                        .flatten()
                        .any(|t| t.failed > 0);
                    ExitCode::from(if damaged { 3 } else { 1 })
                }
            }
        }
        Err(e) => {
            eprintln!("deriva-server migrate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `--print-config`: one `key = value` line per setting on stdout; nothing opened or bound.
fn print_config(config: &Config) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let written = config
        .describe()
        .iter()
        .try_for_each(|(key, value)| writeln!(out, "{key} = {value}"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deriva-server: cannot print the configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP, caught from [`Reloads::install`] on. Until the server is built a SIGHUP has nothing
/// to reload (the files are being read for the first time) and says so; then each one runs
/// [`Reloader::reload`] on the blocking pool, one after the other.
#[derive(Clone, Default)]
struct Reloads(Arc<OnceLock<Reloader>>);

impl Reloads {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())?;
        let reloads = Self::default();
        let target = reloads.0.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let Some(reloader) = target.get().cloned() else {
                    tracing::info!(
                        "SIGHUP received while starting: nothing to reload yet (the files are being read now)"
                    );
                    continue;
                };
                tracing::info!("SIGHUP received: reloading the configuration files");
                if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload()).await {
                    tracing::error!(error = %e, "SIGHUP: the reload failed");
                }
            }
        });
        Ok(reloads)
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self::default())
    }

    /// From now on SIGHUP reloads what `reloader` holds.
    fn serve(&self, reloader: Reloader) {
        let _ = self.0.set(reloader);
    }
}

/// How long shutdown may spend flushing spans and metrics (a dead collector costs no more).
const TELEMETRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("deriva-server: cannot listen for {what} on {addr}: {e}");
        ExitCode::FAILURE
    })
}

async fn run(
    config: Config,
    telemetry: &Telemetry,
    signals: ShutdownSignals,
    reloads: &Reloads,
) -> ExitCode {
    let grpc = match bind("gRPC", config.listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let http = match config.metrics_addr {
        Some(addr) => match bind("HTTP (metrics)", addr).await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
        None => None,
    };
    let data_dir = config.data_dir.clone();
    let tls = config.tls.is_some();
    let otlp = telemetry.exports();
    let meter = telemetry.meter();
    let server = match Server::connect(config, &meter, telemetry.instance_id()).await {
        Ok(s) => s
            .with_registry(telemetry.registry().clone())
            .with_trace_store(telemetry.traces().clone())
            .with_edge(telemetry.edge()),
        Err(e @ deriva_core::DerivaError::InvalidInput(_)) => {
            // A flag's file (the token file, a certificate) is wrong.
            eprintln!("deriva-server: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("deriva-server: cannot open the store: {e}");
            return ExitCode::FAILURE;
        }
    };
    reloads.serve(server.reloader());
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        addr = %local(&grpc),
        metrics = %http.as_ref().map(local).unwrap_or_else(|| "off".into()),
        otlp = %otlp,
        tls = %if tls { "on" } else { "off" },
        data_dir = %data_dir.display(),
        store = %server.executor().store().description(),
        "deriva-server listening"
    );
    match server.serve(grpc, http, signals.recv()).await {
        Ok(()) => {
            tracing::info!("deriva-server stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("deriva-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, caught on Unix from the moment [`ShutdownSignals::install`]
/// returns: a signal that arrives before [`ShutdownSignals::recv`] is first polled is kept, not
/// lost. (Elsewhere only Ctrl-C, caught once `recv` is polled.)
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers now (tokio registers a signal's handler when its stream is created,
    /// whereas `tokio::signal::ctrl_c()` would register only when first polled). Needs the runtime.
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Completes on the first SIGINT or SIGTERM.
    #[cfg(unix)]
    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }

    /// Completes on the first Ctrl-C.
    #[cfg(not(unix))]
    async fn recv(self) {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("SIGINT received"),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// `deriva-server keygen OUT`: a new ed25519 signing key in `OUT` and its public key in
/// `OUT.pub` (see [`deriva_server::provenance::keygen`]).
fn keygen() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let out = match args.as_slice() {
        [flag] if flag == "--help" || flag == "-h" => {
            println!(
                "Usage: deriva-server keygen OUT\n\nWrites a new ed25519 private key to OUT (PKCS#8 PEM, mode 0600; for --signing-key)\nand its public key to OUT.pub (for deriva provenance --verify-key). Never overwrites a file."
            );
            return ExitCode::SUCCESS;
        }
        [out] if !out.is_empty() => std::path::PathBuf::from(out),
        _ => {
            eprintln!(
                "deriva-server keygen: usage: deriva-server keygen OUT (one path: the private key; OUT.pub gets the public key)"
            );
            return ExitCode::from(2);
        }
    };
    match deriva_server::provenance::keygen(&out) {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("deriva-server keygen: {e}");
            ExitCode::FAILURE
        }
    }
}
