//! `deriva-server`: parses its flags, binds, serves until SIGINT or SIGTERM, shuts down.

use std::process::ExitCode;

use clap::Parser;
use deriva_server::{Server, ServerArgs};
use opentelemetry::metrics::MeterProvider as _;

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("deriva-server: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "deriva=info,deriva_server=info,deriva_core=info,deriva_compute=info".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
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
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("deriva-server: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        // Telemetry export arrives with its own issue; until then instruments are no-ops.
        let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("deriva-server");
        let data_dir = config.data_dir.clone();
        let server = match Server::open(config, &meter) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "deriva-server: cannot open the store in {}: {e}",
                    data_dir.display()
                );
                return ExitCode::FAILURE;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(%addr, data_dir = %data_dir.display(), "deriva-server listening");
        match server.serve(listener, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("deriva-server stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("deriva-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
