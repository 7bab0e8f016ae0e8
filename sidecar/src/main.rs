//! `modelpool-sidecar`: see the library docs.

use std::process::ExitCode;

use clap::Parser;
use modelpool_sidecar::{
    args::{Cli, Command},
    status, telemetry,
};

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Status(args)) => match status::run(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {}", chain(&error));
                ExitCode::FAILURE
            }
        },
        None => {
            telemetry::init(cli.serve.log_format);
            match modelpool_sidecar::run(cli.serve).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("sidecar failed: {}", chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
