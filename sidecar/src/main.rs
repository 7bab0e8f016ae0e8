//! `modelpool-sidecar`: see the library docs.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use modelpool_sidecar::{
    args::{Cli, Command},
    status, telemetry, validate,
};

fn main() -> ExitCode {
    // One thread: the sidecar's work per request is microseconds, and on a multi-thread
    // runtime waking a second worker for each request cost more than the request (admission
    // p50 100-125 us here against 148-162 us, idle CPU 0.6 % against 0.8 % at 100 heartbeats/s).
    // Blocking reads (the tick's /proc and NVML readings, the server's process tree, pool file
    // reloads) run on the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(Cli::parse()));
    // A task stuck in a system call must not keep the process alive: give the rest 2 s.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Validate(args)) => {
            let report = validate::run(&args.files);
            print!("{}", report.text);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(Command::Status(args)) => match status::run(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {}", validate::error_chain(&error));
                ExitCode::FAILURE
            }
        },
        None => {
            telemetry::init(cli.serve.log_format, cli.serve.log_level.as_deref());
            // The longest a clean shutdown takes: the grace, then followers (3 s) and
            // listeners (2 s); past that plus a margin, something is stuck.
            modelpool_sidecar::spawn_shutdown_watchdog(
                Duration::from_millis(cli.serve.shutdown_grace_ms) + Duration::from_secs(15),
            );
            match modelpool_sidecar::run(cli.serve).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("sidecar failed: {}", validate::error_chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
