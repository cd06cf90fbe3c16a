//! `deriva`: the command-line client of a Deriva server. It parses its flags, runs one command
//! with [`deriva_cli::run_until_interrupted`] and turns a failure into a one-line
//! `deriva: ...` message and an exit code (2 for usage errors, 130 for Ctrl-C, 1 for server and
//! I/O errors).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use deriva_cli::CliArgs;

fn main() -> ExitCode {
    let args = CliArgs::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "deriva: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(deriva_cli::run_until_interrupted(args));
    // Do not wait for a blocking stdin read that an interrupt left behind.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{}", deriva_cli::error_line(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
