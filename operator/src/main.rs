//! `modelpool-operator`: `crd` prints the CRD, `run` runs the operator.

use clap::Parser;
use modelpool_operator::args::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", modelpool_crds::crd_yaml()?),
        Command::Run(args) => {
            let filter =
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
            let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
            if args.log_format == "json" {
                subscriber.json().init();
            } else {
                subscriber.init();
            }
            modelpool_operator::run::run(*args).await?;
        }
    }
    Ok(())
}
