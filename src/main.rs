//! The `nixroll` binary: parse the command line, set up logging, call into the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
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
    /// Show a table of NixOSNodes: node, revision wanted/running, phase, window, last change.
    Status {
        /// How long to wait for the API server.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 10s, 5m or 1h30m: {e}"))?;
    Duration::try_from(d).map_err(|e| format!("{s:?} must not be negative: {e}"))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let root = e.root_cause().to_string();
            if root == e.to_string() {
                eprintln!("nixroll: {e}");
            } else {
                eprintln!("nixroll: {e}: {root}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd => {
            let yaml = nixroll::api::crd_yaml().context("cannot render the CRD")?;
            print!("{yaml}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { timeout } => {
            init_tracing();
            runtime()?.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("no Kubernetes configuration (set KUBECONFIG or run in a cluster)")?;
                let nodes = nixroll::report::fetch(client, timeout).await?;
                let now = jiff::Timestamp::now();
                print!(
                    "{}",
                    nixroll::report::table(&nodes, now, &nixroll::report::window_text)
                );
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_in_kubernetes_style() {
        assert_eq!(
            super::parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            super::parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert!(super::parse_duration("-5s").is_err());
        assert!(super::parse_duration("soon").is_err());
    }
}
