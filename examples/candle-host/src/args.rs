//! Command-line arguments.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A reference model host for ModelPool's `Http` driver: reads `{models-dir}/{name}.safetensors`
/// with candle and copies the tensors to the GPU with cudarc through pinned buffers; without a
/// GPU the tensors stay on the CPU.
#[derive(Debug, Clone, Parser)]
#[command(name = "modelpool-candle-host", version)]
pub struct Args {
    /// Directory holding `{name}.safetensors` files.
    #[arg(
        long,
        env = "CANDLE_HOST_MODELS_DIR",
        required_unless_present = "bench_h2d"
    )]
    pub models_dir: Option<PathBuf>,

    /// Address to serve the API on (port 0 picks a free port; the log says which).
    #[arg(long, env = "CANDLE_HOST_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// CUDA device ordinal.
    #[arg(long, env = "CANDLE_HOST_DEVICE", default_value_t = 0)]
    pub device: usize,

    /// Keep tensors on the CPU even when a GPU is present.
    #[arg(long, env = "CANDLE_HOST_CPU")]
    pub cpu: bool,

    /// Size of each of the two pinned staging buffers, MiB.
    #[arg(long, env = "CANDLE_HOST_STAGING_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub staging_mib: u64,

    /// Measure this safetensors file's load-path and raw pinned host-to-device rates, print
    /// them as JSON and exit (exit code 77 without a GPU, after printing the CPU figures).
    #[arg(long, value_name = "FILE")]
    pub bench_h2d: Option<PathBuf>,

    /// Repeats of each benchmark measurement (the fastest counts).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub bench_repeats: u64,

    /// Log format.
    #[arg(long, env = "CANDLE_HOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Args {
    /// `--staging-mib` in bytes.
    pub fn staging_bytes(&self) -> usize {
        (self.staging_mib as usize) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_dir_is_required_except_for_the_benchmark() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("host").chain(args.iter().copied()))
        };
        assert!(parse(&[]).is_err());
        let args = parse(&["--models-dir", "/m"]).unwrap();
        assert_eq!(args.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(args.staging_bytes(), 64 << 20);
        parse(&["--bench-h2d", "/m/a.safetensors"]).unwrap();
        assert!(parse(&["--models-dir", "/m", "--staging-mib", "0"]).is_err());
    }
}
