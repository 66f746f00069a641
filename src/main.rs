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
    /// Run the controller (kubeconfig or in-cluster config).
    Controller(ControllerArgs),
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Nodes that may be disrupted at once: a count (`2`) or a percentage of managed nodes (`10%`).
    #[arg(long, default_value = "1", value_parser = parse_max_unavailable)]
    max_unavailable: nixroll::rollout::MaxUnavailable,
    /// Admissions halt while at least this many nodes are Degraded.
    #[arg(long, default_value_t = 1)]
    failure_threshold: u32,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Take part in leader election over a Lease (one active replica).
    #[arg(long, overrides_with = "no_leader_election", default_value_t = true)]
    leader_election: bool,
    /// Act as leader at once (a single replica).
    #[arg(long, overrides_with = "leader_election")]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = nixroll::names::NAMESPACE)]
    lease_namespace: String,
    /// Phase timeouts, e.g. `60m`, `15m`.
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    staging_timeout: jiff::SignedDuration,
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    draining_timeout: jiff::SignedDuration,
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    activating_timeout: jiff::SignedDuration,
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    rebooting_timeout: jiff::SignedDuration,
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    verifying_timeout: jiff::SignedDuration,
    /// Output logs as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn parse_max_unavailable(s: &str) -> Result<nixroll::rollout::MaxUnavailable, String> {
    use nixroll::rollout::MaxUnavailable;
    let (digits, percent) = match s.strip_suffix('%') {
        Some(d) => (d, true),
        None => (s, false),
    };
    let n: u32 = digits
        .parse()
        .map_err(|_| format!("expected N or N% (e.g. 1 or 10%), got {s:?}"))?;
    if n == 0 {
        return Err("must be at least 1".to_string());
    }
    if percent {
        if n > 100 {
            return Err("a percentage must be at most 100%".to_string());
        }
        Ok(MaxUnavailable::Percent(n))
    } else {
        Ok(MaxUnavailable::Count(n))
    }
}

fn parse_duration(s: &str) -> Result<jiff::SignedDuration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("expected a duration such as 90s, 15m or 1h30m: {e}"))?;
    if d.is_negative() || d.is_zero() {
        return Err("must be positive".to_string());
    }
    Ok(d)
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nixroll::controller::{ControllerConfig, LeaderElectionConfig, default_identity};
    init_tracing(args.log_json);
    let identity = default_identity();
    let mut config = ControllerConfig::new(&identity);
    config.policy.max_unavailable = args.max_unavailable;
    config.policy.failure_threshold = args.failure_threshold;
    config.policy.timeouts = nixroll::rollout::PhaseTimeouts {
        staging: args.staging_timeout,
        draining: args.draining_timeout,
        activating: args.activating_timeout,
        rebooting: args.rebooting_timeout,
        verifying: args.verifying_timeout,
    };
    config.metrics_addr = Some(args.metrics_addr);
    if args.leader_election && !args.no_leader_election {
        config.leader_election = Some(LeaderElectionConfig::new(
            &args.lease_namespace,
            nixroll::names::LEADER_LEASE,
            &identity,
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (kubeconfig or in-cluster config)")?;
        nixroll::controller::run(client, config, shutdown_signal())
            .await
            .context("controller")
    })
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
        Command::Controller(args) => match run_controller(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nixroll controller: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
