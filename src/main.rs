use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// nixroll: roll NixOS flake revisions across k3s nodes, safely, one node at a time.
#[derive(Parser, Debug)]
#[command(name = "nixroll", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the NixOSNode CustomResourceDefinition (the same as crds/).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match nixroll::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nixroll: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
