//! Logging: `tracing` with an `EnvFilter` from `--log-level`, else `RUST_LOG`, else `info`; as
//! text (coloured only on a terminal: `kubectl logs` shows escape codes verbatim) or JSON.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::args::LogFormat;

/// The filter: `level` (the flag) wins over `RUST_LOG`; an invalid one is reported on stderr
/// and `info` is used, so a typo never silences the logs.
fn filter(level: Option<&str>) -> EnvFilter {
    let requested = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|v| !v.trim().is_empty());
    match requested {
        Some(directives) => EnvFilter::try_new(&directives).unwrap_or_else(|error| {
            eprintln!("invalid log level {directives:?} ({error}): using info");
            EnvFilter::new("info")
        }),
        None => EnvFilter::new("info"),
    }
}

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(format: LogFormat, level: Option<&str>) {
    let registry = tracing_subscriber::registry().with(filter(level));
    let result = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
}
