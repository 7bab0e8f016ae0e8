//! `modelpool-operator`: prints the CRD today; reconciles pools once the operator lands.

use clap::{Parser, Subcommand};

/// Reconciles ModelPools and their pods.
#[derive(Parser)]
#[command(name = "modelpool-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ModelPool CustomResourceDefinition as YAML (what `crds/modelpool.yaml` holds).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", modelpool_crds::crd_yaml()?),
    }
    Ok(())
}
