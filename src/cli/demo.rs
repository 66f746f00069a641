//! `nixroll demo` and `nixroll bench`: the embedded default and the scale benchmark.

use std::process::ExitCode;
use std::time::Duration;

use crate::*;

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub(crate) nodes: u16,
    /// Of which k3s servers (control plane).
    #[arg(long, default_value_t = 1)]
    pub(crate) control_planes: u16,
    /// Nodes that may be disrupted at once: `N` or `N%`.
    #[arg(long, default_value = "1", value_parser = parse_max_unavailable)]
    pub(crate) max_unavailable: nixroll::rollout::MaxUnavailable,
    /// Print one JSON object per phase change (time, node, phase, revision) instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Keep the cluster up after convergence until Ctrl-C (for kubectl).
    #[arg(long)]
    pub(crate) hold: bool,
    /// Nix for the simulated hosts: real if installed (auto), real, or simulated.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) nix: DemoNix,
    /// Give up when the rollout has not converged after this long.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
    /// The nodes follow a branch of the demo's flake repository (a FlakeSource); the demo
    /// commits twice and both rollouts start by themselves.
    #[arg(long)]
    pub(crate) follow: bool,
    /// The nodes in NixOSPools: a canary pool of one node takes the revision and soaks, then
    /// two pools roll concurrently, one behind a health gate that blocks for a while.
    #[arg(long, conflicts_with = "follow")]
    pub(crate) pools: bool,
    /// After the rollout, revert every node to the revision before (as a `git revert` of the
    /// NixOSNode manifests would): prints how long until all are UpToDate on it again and how
    /// many `nix build`s the nodes ran for it (0: the previous system stays pinned).
    #[arg(long, conflicts_with_all = ["follow", "pools", "builder"])]
    pub(crate) revert: bool,
    /// One more node, node-1, is a builder: it evaluates and builds every node's system once,
    /// signs it and serves it; the other nodes fetch it (real Nix; docs/builder.md).
    #[arg(long, conflicts_with_all = ["follow", "pools"])]
    pub(crate) builder: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum DemoNix {
    Auto,
    Real,
    Simulated,
}

pub(crate) fn run_demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    use nixroll::sim::world::NixMode;
    init_quiet_tracing();
    let mut opts = nixroll::sim::demo::DemoOptions::default();
    opts.world.nodes = usize::from(args.nodes);
    opts.world.control_planes = usize::from(args.control_planes);
    opts.world.nix = match args.nix {
        DemoNix::Auto => NixMode::Auto,
        DemoNix::Real => NixMode::Real,
        DemoNix::Simulated => NixMode::Simulated,
    };
    opts.max_unavailable = args.max_unavailable;
    opts.json = args.json;
    opts.hold = args.hold;
    opts.timeout = args.timeout;
    opts.pools = args.pools;
    opts.revert = args.revert;
    if args.builder {
        opts.builder = true;
        opts.world.nodes += 1;
    }
    runtime()?.block_on(async {
        if args.follow {
            nixroll::sim::demo_follow::run(opts, shutdown_signal()).await?;
        } else {
            nixroll::sim::demo::run(opts, shutdown_signal()).await?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Simulated nodes (NixOSNodes, Nodes and hosts).
    #[arg(long, default_value_t = 1000)]
    pub(crate) nodes: usize,
    /// Pods spread over the nodes (with PodDisruptionBudgets), all evicted by the drains.
    #[arg(long, default_value_t = 30_000)]
    pub(crate) pods: usize,
    /// The controller's `--max-unavailable`.
    #[arg(long, default_value = "10")]
    pub(crate) max_unavailable: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Stop once the NixOSNodes are adopted (no rollout, no drains).
    #[arg(long)]
    pub(crate) adopt_only: bool,
    /// Run on a real control plane (etcd, kube-apiserver, kube-controller-manager) started
    /// from this directory of binaries (envtest's layout, e.g. target/kube-bin) instead of the
    /// embedded API; use a few nodes (e.g. --nodes 6 --pods 12).
    #[arg(long, value_name = "DIR")]
    pub(crate) kube_assets: Option<std::path::PathBuf>,
    /// After the rollout, revert every node to the revision before: reports how long until
    /// all are UpToDate on it again and the nodes' `nix build`s for it (`revert` in the report).
    #[arg(long, conflicts_with_all = ["adopt_only", "builders"])]
    pub(crate) revert: bool,
    /// Instead: count the evaluations and builds of staging one revision with builders, on
    /// --nodes nodes of --nix-systems Nix systems (docs/builder.md, "Scale").
    #[arg(long, conflicts_with_all = ["adopt_only", "kube_assets"])]
    pub(crate) builders: bool,
    /// With --builders: how many Nix systems the nodes are spread over (1–4).
    #[arg(long, default_value_t = 3, requires = "builders", value_parser = clap::value_parser!(u8).range(1..=4))]
    pub(crate) nix_systems: u8,
}

pub(crate) fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    init_quiet_tracing();
    if args.builders {
        let counts = runtime()?
            .block_on(nixroll::sim::bench_builders::run(
                args.nodes.max(1),
                usize::from(args.nix_systems),
                5,
            ))
            .map_err(anyhow::Error::msg)?;
        if args.json {
            println!("{}", serde_json::to_string(&counts)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&counts)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = nixroll::sim::bench::BenchOptions {
        nodes: args.nodes.max(1),
        pods: args.pods,
        max_unavailable: args.max_unavailable,
        adopt_only: args.adopt_only,
        kube_assets: args.kube_assets,
        revert: args.revert,
        ..Default::default()
    };
    let report = runtime()?.block_on(nixroll::sim::bench::run(opts))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}
