//! `modelpool-weights estimate PATH`: a model's size from its headers, as one JSON line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use modelpool_weights::{Options, Root, estimate};

#[derive(Debug, Parser)]
#[command(name = "modelpool-weights", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Estimate a model (a .gguf or .safetensors file, or a directory of them).
    Estimate {
        /// The file or directory, as seen from the root.
        path: PathBuf,
        /// Read through this root: a directory standing for `/` (a volume), or `/proc/PID/root`.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Read through process PID's filesystem view (`/proc/PID/root`).
        #[arg(long, conflicts_with = "root")]
        pid: Option<u32>,
        /// Context tokens for the KV cache (default: the model's own context length).
        #[arg(long)]
        context: Option<u64>,
        /// Header read cap, bytes.
        #[arg(long)]
        max_header_bytes: Option<u64>,
        /// Time budget per file, milliseconds.
        #[arg(long)]
        budget_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let Command::Estimate {
        path,
        root,
        pid,
        context,
        max_header_bytes,
        budget_ms,
    } = Cli::parse().command;
    let root = match pid {
        Some(pid) => Root::process(pid),
        None => Root::dir(root),
    };
    let mut options = Options {
        context,
        ..Options::default()
    };
    if let Some(cap) = max_header_bytes {
        options.limits.max_header_bytes = cap;
    }
    if let Some(ms) = budget_ms {
        options.limits.time_budget = Duration::from_millis(ms);
    }
    match estimate(&root, &path, &options) {
        Ok(estimate) => {
            let mut json = serde_json::to_value(&estimate).unwrap_or_default();
            json["total_bytes"] = estimate.total_bytes().into();
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
