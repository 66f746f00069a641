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
    /// Run the node agent: stage and activate what the controller grants on this node.
    Agent(AgentArgs),
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Name of this Node (and of its NixOSNode).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Treat DIR as the host's root and run host commands directly (tests, demo). Nix then
    /// uses a private store inside DIR (DIR/nix/store, DIR/nix/var/nix).
    #[arg(long, value_name = "DIR")]
    host_root: Option<std::path::PathBuf>,
    /// With --host-root: the command that "reboots" (split on whitespace, no shell).
    #[arg(long, value_name = "CMD", requires = "host_root")]
    reboot_command: Option<String>,
    /// Where the host's `/` is mounted in the agent's container (real hosts).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/host",
        conflicts_with = "host_root"
    )]
    host_fs: std::path::PathBuf,
    /// Never use binary caches (air-gapped hosts, tests).
    #[arg(long)]
    offline: bool,
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use nixroll::agent::host::{Host, HostRoot, RealHost, RebootHook};
    use nixroll::nix::{Nix, NixCli};

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let host: Arc<dyn Host> = match &args.host_root {
        Some(dir) => {
            let reboot = args
                .reboot_command
                .as_deref()
                .map(RebootHook::command_line)
                .unwrap_or_default();
            Arc::new(HostRoot::new(dir, reboot).with_private_nix_store())
        }
        None => Arc::new(RealHost::new(&args.host_fs)),
    };
    let mut nix = NixCli::new(host.clone());
    if args.offline {
        nix = nix.offline();
    }
    let nix: Arc<dyn Nix> = Arc::new(nix);
    let config = nixroll::agent::AgentConfig::new(args.node, host, nix);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default().await?;
        nixroll::agent::run(client, config, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
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
        Command::Agent(args) => match run_agent(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nixroll agent: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
