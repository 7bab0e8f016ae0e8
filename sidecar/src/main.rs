//! `modelpool-sidecar`: see the library docs.

use std::process::ExitCode;

use clap::Parser;
use modelpool_sidecar::{
    args::{Cli, Command},
    status, telemetry, validate,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
