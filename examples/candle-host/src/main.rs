//! `modelpool-candle-host`: see the library docs.

use clap::Parser;
use modelpool_candle_host::{args::Args, init_logging, run_bench, serve};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    if args.bench_h2d.is_some() {
        let code = run_bench(&args)?;
        std::process::exit(code);
    }
    tokio::runtime::Runtime::new()?.block_on(serve(&args))
}
