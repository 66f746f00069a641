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
    /// Print nixroll's CustomResourceDefinitions, NixOSNode, FlakeSource and NixOSPool (the same
    /// as crds/).
    Crd {
        /// Print only this one: `nixosnodes` (crds/nixosnodes.yaml), `flakesources`
        /// (crds/flakesources.yaml) or `nixospools` (crds/nixospools.yaml).
        #[arg(long, value_name = "PLURAL", value_parser = ["nixosnodes", "flakesources", "nixospools"])]
        only: Option<String>,
    },
    /// Run the controller (kubeconfig or in-cluster config).
    Controller(ControllerArgs),
    /// Run the node agent: stage and activate what the controller grants on this node.
    Agent(AgentArgs),
    /// The embedded default: an in-memory Kubernetes API, simulated NixOS hosts, the real
    /// controller and agents; rolls a new revision across the cluster and shows it live.
    Demo(DemoArgs),
    /// Scale benchmark: N simulated nodes and P pods on the embedded API, the controller as
    /// a child process; prints memory, requests per node update, reconcile latency, overhead.
    Bench(BenchArgs),
    /// Show a table of NixOSNodes: node, revision wanted/running, phase, window, last change.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// How long to wait for the API server.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// Keep the table live: redrawn on every change (watch-driven), with a rollout summary
        /// (paused? halted? how many done), time in phase, next window and last error.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Build a bootable disk image from the flake with root-only secret files written into it
    /// (outside the Nix store), or write such files into an existing image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the agent's host logic once on a machine without Kubernetes and print its report
    /// as JSON (the real-bootloader test's guest, docs/bootloader.md).
    #[command(hide = true)]
    HostStep(HostStepArgs),
    /// Print a shell completion script: `nixroll completions bash >
    /// ~/.local/share/bash-completion/completions/nixroll` (zsh: into a directory of $fpath as
    /// `_nixroll`; fish: `~/.config/fish/completions/nixroll.fish`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args, Debug)]
struct HostStepArgs {
    /// The host's root directory.
    #[arg(long, default_value = "/")]
    host_root: std::path::PathBuf,
    /// How to reboot (split on whitespace).
    #[arg(long, default_value = "reboot -f")]
    reboot_command: String,
    /// Carry out this grant: `ID:ACTION:SYSTEM` (ACTION: Boot, Bless, Switch, Rollback).
    #[arg(long, value_name = "ID:ACTION:SYSTEM")]
    grant: Option<String>,
    /// Bound on `switch-to-configuration`.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    activation_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build `nixosConfigurations.HOST.config.system.build.images.VARIANT`, copy it out of the
    /// store, write the secrets into its ext4 root, verify, convert if asked.
    Build(ImageBuildArgs),
    /// Write secrets into an existing image (re-imaging, rotation), replacing it atomically.
    Inject(ImageInjectArgs),
    /// Benchmark: write a secret into a sparse image copied out of a private Nix store.
    #[command(hide = true)]
    Bench(ImageBenchArgs),
}

#[derive(clap::Args, Debug)]
struct ImageSecretArgs {
    /// Write the file SRC to DEST in the image's root filesystem (mode 0400, owner 0:0 unless
    /// given; owners are numeric). SRC is read once, so `<(command)` works. Repeatable.
    #[arg(long = "secret", value_name = "DEST=SRC[,mode=0400][,owner=UID:GID]")]
    secrets: Vec<String>,
    /// Write every file DIR/REL to /REL (DIR/etc/k3s/token → /etc/k3s/token), mode 0400, root.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<std::path::PathBuf>,
    /// The root filesystem: the GPT partition name or filesystem label to look for.
    #[arg(long, value_name = "NAME", default_value = "nixos")]
    root_label: String,
    /// Print what was written as JSON (paths, modes, owners, sizes; never contents).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ImageBuildArgs {
    /// The flake and host: REF#HOST (e.g. `.#node1`, `github:me/infra#node1`).
    #[arg(
        long,
        value_name = "REF#HOST",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    flake: Option<String>,
    /// Use an image that is already built instead: a store path (as `nix build` printed it)
    /// or an image file.
    #[arg(long, value_name = "PATH")]
    image: Option<std::path::PathBuf>,
    /// The image file to write (replaced atomically; mode 0600).
    #[arg(long, value_name = "FILE")]
    out: std::path::PathBuf,
    /// Which of `config.system.build.images` to build.
    #[arg(long, default_value = "raw-efi")]
    variant: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "raw")]
    format: ImageFormat,
    /// Never use binary caches.
    #[arg(long)]
    offline: bool,
    /// Give up on `nix build` after this long.
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    build_timeout: Duration,
    #[command(flatten)]
    secrets: ImageSecretArgs,
}

#[derive(clap::Args, Debug)]
struct ImageInjectArgs {
    /// The image (raw or qcow2) to write into.
    file: std::path::PathBuf,
    /// Write the result here instead of replacing FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<std::path::PathBuf>,
    /// Output format (default: the input's).
    #[arg(long, value_enum)]
    format: Option<ImageFormat>,
    #[command(flatten)]
    secrets: ImageSecretArgs,
}

#[derive(clap::Args, Debug)]
struct ImageBenchArgs {
    /// Apparent size of the image in MiB.
    #[arg(long, default_value_t = 4096)]
    size_mib: u64,
    /// MiB of file data to put into the root filesystem first.
    #[arg(long, default_value_t = 256)]
    data_mib: u64,
    /// Work here (default: a temporary directory under /var/tmp).
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ImageFormat {
    Raw,
    Qcow2,
}

impl From<ImageFormat> for nixroll::image::Format {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Raw => nixroll::image::Format::Raw,
            ImageFormat::Qcow2 => nixroll::image::Format::Qcow2,
        }
    }
}

fn run_image(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    use nixroll::image;
    init_tracing(false);
    let load = |a: &ImageSecretArgs| -> anyhow::Result<Vec<image::secret::Secret>> {
        let mut specs = a
            .secrets
            .iter()
            .map(|s| image::secret::parse_spec(s))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(dir) = &a.secrets_dir {
            specs.extend(image::secret::specs_from_dir(dir)?);
        }
        Ok(image::secret::load(specs)?)
    };
    let print = |report: &image::Report, json: bool| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            print!("{}", report.text());
        }
        Ok(())
    };
    let ui = image::Ui::detect();
    // On Ctrl-C or SIGTERM: stop the running tool, remove the work directory (it may hold a
    // copy with the secrets) and exit; destructors do not run when a signal ends the process.
    // The handlers are installed before anything is created.
    image_signal_handler()?;
    match cmd {
        ImageCommand::Build(args) => {
            let secrets = load(&args.secrets)?;
            let source = match (&args.flake, &args.image) {
                (Some(f), _) => {
                    let (flake, host) = image::nixbuild::split_flake(f)?;
                    image::Source::Flake {
                        flake,
                        host,
                        variant: args.variant.clone(),
                        offline: args.offline,
                        timeout: args.build_timeout,
                    }
                }
                (None, Some(p)) => image::Source::Path(p.clone()),
                (None, None) => anyhow::bail!("give --flake REF#HOST or --image PATH"),
            };
            let report = image::build(
                &source,
                &args.out,
                args.format.into(),
                &args.secrets.root_label,
                &secrets,
                &ui,
            )?;
            print(&report, args.secrets.json)?;
        }
        ImageCommand::Inject(args) => {
            let secrets = load(&args.secrets)?;
            let report = image::inject(
                &args.file,
                args.out.as_deref(),
                args.format.map(Into::into),
                &args.secrets.root_label,
                &secrets,
                &ui,
            )?;
            print(&report, args.secrets.json)?;
        }
        ImageCommand::Bench(args) => {
            let opts = image::bench::BenchOptions {
                size_mib: args.size_mib,
                data_mib: args.data_mib,
                dir: args.dir,
            };
            let report = image::bench::run(&opts, &ui)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Install the SIGINT/SIGTERM handler of `nixroll image` and return once it is installed.
fn image_signal_handler() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            {
                (Ok(t), Ok(i)) => (t, i),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let done = nixroll::image::cleanup::stop_all_and_remove();
        eprintln!(
            "nixroll: interrupted; work directory removed ({} running tool(s) stopped)",
            done.stopped
        );
        std::process::exit(130);
    });
    match ready_rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("cannot install the SIGINT/SIGTERM handler: {e}"),
        Err(e) => anyhow::bail!("the SIGINT/SIGTERM handler did not start: {e}"),
    }
}

/// Where the cluster is, as kubectl takes it.
#[derive(clap::Args, Debug, Clone)]
struct ClusterArgs {
    /// The kubeconfig file to use. Default: the files in $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
}

impl ClusterArgs {
    fn target(&self) -> nixroll::connect::Target {
        nixroll::connect::Target {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Nodes that may be disrupted at once: a count (`2`) or a percentage of managed nodes (`10%`).
    #[arg(long, env = "NIXROLL_MAX_UNAVAILABLE", default_value = "1", value_parser = parse_max_unavailable)]
    max_unavailable: nixroll::rollout::MaxUnavailable,
    /// Admissions halt while at least this many nodes are Degraded.
    #[arg(long, env = "NIXROLL_FAILURE_THRESHOLD", default_value_t = 1)]
    failure_threshold: u32,
    /// How long a node that finished its update must stay Ready, still counting against its
    /// pool's budget, before the next node takes its slot (`0s`: none); a NixOSPool's
    /// spec.nodeSoak overrides it.
    #[arg(long, env = "NIXROLL_NODE_SOAK", default_value = "0s", value_parser = parse_soak)]
    node_soak: jiff::SignedDuration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "NIXROLL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Serve the push webhook receiver (GitHub, GitLab, Gitea/Forgejo, generic) on this
    /// address, e.g. 0.0.0.0:9292. Off unless set (docs/source.md).
    #[arg(long, env = "NIXROLL_WEBHOOK_ADDR")]
    webhook_addr: Option<std::net::SocketAddr>,
    /// Secret in the controller's namespace with the webhook key (`token`, and
    /// `previousToken` while rotating).
    #[arg(long, env = "NIXROLL_WEBHOOK_SECRET", default_value = "nixroll-webhook")]
    webhook_secret: String,
    /// Largest webhook body accepted, in bytes (larger: 413).
    #[arg(long, env = "NIXROLL_WEBHOOK_MAX_BODY", default_value_t = 1024 * 1024)]
    webhook_max_body: usize,
    /// Take part in leader election over a Lease, so that one replica acts and the others
    /// stand by. This is the default; the flag exists to undo an earlier
    /// --no-leader-election.
    #[arg(long, overrides_with = "no_leader_election", default_value_t = true)]
    leader_election: bool,
    /// Act as leader at once, without a Lease: only for a single replica.
    #[arg(long, env = "NIXROLL_NO_LEADER_ELECTION", overrides_with = "leader_election")]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "NIXROLL_LEASE_NAMESPACE", default_value = nixroll::names::NAMESPACE)]
    lease_namespace: String,
    /// How long a node may stay in Staging (the agent building or fetching the new system)
    /// before it is Degraded with StagingTimeout, e.g. `60m`.
    #[arg(long, env = "NIXROLL_STAGING_TIMEOUT", default_value = "60m", value_parser = parse_signed_duration)]
    staging_timeout: jiff::SignedDuration,
    /// How long the drain (cordon, then evictions) of a node may take before the node's
    /// `spec.drain.onTimeout` applies (Abort gives the node back, Force deletes), e.g. `15m`.
    #[arg(long, env = "NIXROLL_DRAINING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    draining_timeout: jiff::SignedDuration,
    /// How long the controller waits for the agent to report the switch it granted; a switch
    /// the agent reports running gets up to twice this before the node is Degraded. Not the
    /// agent's --activation-timeout (how long the agent lets switch-to-configuration run).
    #[arg(long, env = "NIXROLL_ACTIVATING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    activating_timeout: jiff::SignedDuration,
    /// How long a node may take from the reboot request to reporting a new boot id before it
    /// is Degraded with RebootTimeout, e.g. `15m`.
    #[arg(long, env = "NIXROLL_REBOOTING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    rebooting_timeout: jiff::SignedDuration,
    /// How long a node that is back may take to prove it runs the new system and is Ready
    /// before it is Degraded with VerifyTimeout, e.g. `10m`; also the default time its
    /// post-gates may block after that before it is Degraded with GateFailed.
    #[arg(long, env = "NIXROLL_VERIFYING_TIMEOUT", default_value = "10m", value_parser = parse_signed_duration)]
    verifying_timeout: jiff::SignedDuration,
    /// Output logs as JSON lines.
    #[arg(long, env = "NIXROLL_LOG_JSON")]
    log_json: bool,
    /// Where FlakeSources keep their cached bare repositories (the ancestry check).
    #[arg(
        long,
        env = "NIXROLL_SOURCE_CACHE",
        value_name = "DIR",
        default_value = "/var/cache/nixroll/sources"
    )]
    source_cache: std::path::PathBuf,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Name of this Node (and of its NixOSNode). The DaemonSet sets NODE_NAME from the
    /// downward API.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Treat DIR as the host's root and run host commands directly (tests, demo). Nix then
    /// uses a private store inside DIR (DIR/nix/store, DIR/nix/var/nix).
    #[arg(long, env = "NIXROLL_HOST_ROOT", value_name = "DIR")]
    host_root: Option<std::path::PathBuf>,
    /// With --host-root: the command that "reboots" (split on whitespace, no shell).
    #[arg(
        long,
        env = "NIXROLL_REBOOT_COMMAND",
        value_name = "CMD",
        requires = "host_root"
    )]
    reboot_command: Option<String>,
    /// Where the host's `/` is mounted in the agent's container (real hosts).
    #[arg(
        long,
        env = "NIXROLL_HOST_FS",
        value_name = "DIR",
        default_value = "/host",
        conflicts_with = "host_root"
    )]
    host_fs: std::path::PathBuf,
    /// Never use binary caches (air-gapped hosts, tests).
    #[arg(long, env = "NIXROLL_OFFLINE")]
    offline: bool,
    /// How long switch-to-configuration may run on the host before the agent asks systemd
    /// whether it still runs (it is followed, never abandoned, while its unit runs), e.g.
    /// `15m`. Not the controller's --activating-timeout (how long the controller waits for
    /// the agent's report).
    #[arg(long, env = "NIXROLL_ACTIVATION_TIMEOUT", value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    activation_timeout: Duration,
    /// Count a changed systemd as a reason to reboot (by default it is switched to live:
    /// switch-to-configuration re-executes PID 1).
    #[arg(long, env = "NIXROLL_REBOOT_ON_SYSTEMD_CHANGE")]
    reboot_on_systemd_change: bool,
    /// Binary cache to fetch a builder's systems from, after the builder's own cache
    /// (repeat, or comma-separated in the variable). See docs/builder.md.
    #[arg(
        long = "substituter",
        env = "NIXROLL_SUBSTITUTERS",
        value_name = "URL",
        value_delimiter = ','
    )]
    substituters: Vec<String>,
    /// Public key (Nix's `name:base64`) a fetched system must be signed by (repeat, or
    /// comma-separated). Without one, a node never fetches a builder's system.
    #[arg(
        long = "trusted-public-key",
        env = "NIXROLL_TRUSTED_PUBLIC_KEYS",
        value_name = "KEY",
        value_delimiter = ','
    )]
    trusted_public_keys: Vec<String>,
    /// Act as this node's builder: build what the controller lists in status.builds, sign it
    /// and serve it as a binary cache (label the Node nixroll.io/builder=true too).
    #[arg(long, env = "NIXROLL_BUILDER", requires = "cache_url")]
    builder: bool,
    /// With --builder: the Secret in nixroll-system holding the signing key.
    #[arg(
        long,
        env = "NIXROLL_BUILDER_KEY_SECRET",
        value_name = "NAME",
        default_value = "nixroll-builder-key"
    )]
    builder_key_secret: String,
    /// With --builder: the key of that Secret (Nix's name:base64 secret-key format).
    #[arg(
        long,
        env = "NIXROLL_BUILDER_KEY_FIELD",
        value_name = "KEY",
        default_value = "secret-key"
    )]
    builder_key_field: String,
    /// With --builder: where the binary cache listens.
    #[arg(
        long,
        env = "NIXROLL_CACHE_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:5080"
    )]
    cache_listen: std::net::SocketAddr,
    /// With --builder: the URL other nodes fetch from (e.g. http://NODE_IP:5080).
    #[arg(long, env = "NIXROLL_CACHE_URL", value_name = "URL")]
    cache_url: Option<String>,
    /// With --builder: also push every built closure, signed, to this binary cache
    /// (`file:///DIR` written by nixroll; `http(s)://…`, `s3://…` with `nix copy`, the key in
    /// an in-memory file: docs/builder.md).
    #[arg(long, env = "NIXROLL_BUILDER_PUSH_TO", value_name = "URL", requires = "builder", value_parser = nixroll::builder::PushTo::parse)]
    builder_push_to: Option<nixroll::builder::PushTo>,
    /// Staged systems kept pinned (GC roots), the current target included: reverting to one
    /// of them needs no evaluation or build. At least 1.
    #[arg(long, env = "NIXROLL_KEEP_STAGED", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    keep_staged: u16,
    /// Never boot a new system once: make it the boot default before the reboot (for hosts
    /// whose bootloader cannot boot an entry once).
    #[arg(long, env = "NIXROLL_NO_BOOT_ONCE")]
    no_boot_once: bool,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=2000))]
    nodes: u16,
    /// Of which k3s servers (control plane).
    #[arg(long, default_value_t = 1)]
    control_planes: u16,
    /// Nodes that may be disrupted at once: `N` or `N%`.
    #[arg(long, default_value = "1", value_parser = parse_max_unavailable)]
    max_unavailable: nixroll::rollout::MaxUnavailable,
    /// Print one JSON object per phase change (time, node, phase, revision) instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the cluster up after convergence until Ctrl-C (for kubectl).
    #[arg(long)]
    hold: bool,
    /// Nix for the simulated hosts: real if installed (auto), real, or simulated.
    #[arg(long, value_enum, default_value = "auto")]
    nix: DemoNix,
    /// Give up when the rollout has not converged after this long.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    timeout: Duration,
    /// The nodes follow a branch of the demo's flake repository (a FlakeSource); the demo
    /// commits twice and both rollouts start by themselves.
    #[arg(long)]
    follow: bool,
    /// The nodes in NixOSPools: a canary pool of one node takes the revision and soaks, then
    /// two pools roll concurrently, one behind a health gate that blocks for a while.
    #[arg(long, conflicts_with = "follow")]
    pools: bool,
    /// After the rollout, revert every node to the revision before (as a `git revert` of the
    /// NixOSNode manifests would): prints how long until all are UpToDate on it again and how
    /// many `nix build`s the nodes ran for it (0: the previous system stays pinned).
    #[arg(long, conflicts_with_all = ["follow", "pools", "builder"])]
    revert: bool,
    /// One more node, node-1, is a builder: it evaluates and builds every node's system once,
    /// signs it and serves it; the other nodes fetch it (real Nix; docs/builder.md).
    #[arg(long, conflicts_with_all = ["follow", "pools"])]
    builder: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DemoNix {
    Auto,
    Real,
    Simulated,
}

fn run_demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
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
struct BenchArgs {
    /// Simulated nodes (NixOSNodes, Nodes and hosts).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Pods spread over the nodes (with PodDisruptionBudgets), all evicted by the drains.
    #[arg(long, default_value_t = 30_000)]
    pods: usize,
    /// The controller's `--max-unavailable`.
    #[arg(long, default_value = "10")]
    max_unavailable: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Stop once the NixOSNodes are adopted (no rollout, no drains).
    #[arg(long)]
    adopt_only: bool,
    /// Run on a real control plane (etcd, kube-apiserver, kube-controller-manager) started
    /// from this directory of binaries (envtest's layout, e.g. target/kube-bin) instead of the
    /// embedded API; use a few nodes (e.g. --nodes 6 --pods 12).
    #[arg(long, value_name = "DIR")]
    kube_assets: Option<std::path::PathBuf>,
    /// After the rollout, revert every node to the revision before: reports how long until
    /// all are UpToDate on it again and the nodes' `nix build`s for it (`revert` in the report).
    #[arg(long, conflicts_with_all = ["adopt_only", "builders"])]
    revert: bool,
    /// Instead: count the evaluations and builds of staging one revision with builders, on
    /// --nodes nodes of --nix-systems Nix systems (docs/builder.md, "Scale").
    #[arg(long, conflicts_with_all = ["adopt_only", "kube_assets"])]
    builders: bool,
    /// With --builders: how many Nix systems the nodes are spread over (1–4).
    #[arg(long, default_value_t = 3, requires = "builders", value_parser = clap::value_parser!(u8).range(1..=4))]
    nix_systems: u8,
}

fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
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

fn parse_signed_duration(s: &str) -> Result<jiff::SignedDuration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("expected a duration such as 90s, 15m or 1h30m: {e}"))?;
    if d.is_negative() || d.is_zero() {
        return Err("must be positive".to_string());
    }
    Ok(d)
}

fn parse_soak(s: &str) -> Result<jiff::SignedDuration, String> {
    nixroll::rollout::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 10s, 5m or 1h30m: {e}"))?;
    Duration::try_from(d).map_err(|e| format!("{s:?} must not be negative: {e}"))
}

/// Logs of the simulation's commands (`demo`, `bench`): errors only unless `RUST_LOG` says
/// more, to stderr, so that stdout holds only the report.
fn init_quiet_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn init_tracing(json: bool) {
    init_tracing_with(json, "info");
}

/// Logs to stderr at `default` unless `RUST_LOG` says otherwise.
fn init_tracing_with(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
    config.policy.node_soak = args.node_soak;
    config.policy.timeouts = nixroll::rollout::PhaseTimeouts {
        staging: args.staging_timeout,
        draining: args.draining_timeout,
        activating: args.activating_timeout,
        rebooting: args.rebooting_timeout,
        verifying: args.verifying_timeout,
    };
    config.metrics_addr = Some(args.metrics_addr);
    if let Some(addr) = args.webhook_addr {
        let mut wh = nixroll::controller::webhook::WebhookConfig::new(addr);
        wh.secret_name = args.webhook_secret.clone();
        wh.namespace = args.lease_namespace.clone();
        wh.max_body = args.webhook_max_body;
        config.webhook = Some(wh);
    }
    config.follow.source_controller.cache_dir = args.source_cache;
    if args.leader_election && !args.no_leader_election {
        config.leader_election = Some(LeaderElectionConfig::new(
            &args.lease_namespace,
            nixroll::names::LEADER_LEASE,
            &identity,
        ));
    }
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut kube_config = args
            .cluster
            .target()
            .config(&nixroll::connect::user_agent("controller"))
            .await?;
        // The drain handles 429 (PodDisruptionBudget) itself, with its own backoff and timeout;
        // kube's built-in retry would hold each refused eviction for minutes.
        kube_config.default_retry = false;
        let (client, _) = nixroll::connect::client(kube_config)?;
        nixroll::controller::run(client, config, shutdown_signal())
            .await
            .context("controller")
    })
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use nixroll::agent::host::{Host, HostRoot, RealHost, RebootHook};
    use nixroll::nix::{Nix, NixCli};

    init_tracing(false);
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
    let mut config = nixroll::agent::AgentConfig::new(args.node.clone(), host, nix);
    config.options.activation_timeout = args.activation_timeout;
    config.options.systemd_needs_reboot = args.reboot_on_systemd_change;
    if args.builder {
        config.builder = Some(nixroll::agent::building::BuilderConfig {
            key_secret: args.builder_key_secret.clone(),
            key_field: args.builder_key_field.clone(),
            listen: args.cache_listen,
            url: args.cache_url.clone().unwrap_or_default(),
            cache: nixroll::builder::CacheOptions::default(),
            push_to: args.builder_push_to.clone(),
        });
    }
    config.options.substitution = nixroll::nix::Substitution {
        substituters: args.substituters.clone(),
        trusted_public_keys: args.trusted_public_keys.clone(),
    };
    config.options.keep_staged = usize::from(args.keep_staged);
    config.options.no_boot_once = args.no_boot_once;
    let runtime = runtime()?;
    runtime.block_on(async move {
        let target = args.cluster.target();
        let (client, _) = target.client(&nixroll::connect::user_agent("agent")).await?;
        nixroll::agent::run(client, config, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_host_step(args: HostStepArgs) -> anyhow::Result<ExitCode> {
    init_tracing(false);
    let grant = match args.grant.as_deref() {
        None => None,
        Some(g) => {
            let mut parts = g.splitn(3, ':');
            let (Some(id), Some(action), Some(system)) = (parts.next(), parts.next(), parts.next()) else {
                anyhow::bail!("--grant takes ID:ACTION:SYSTEM, got {g}");
            };
            let action: nixroll::api::ActivationAction =
                serde_json::from_value(serde_json::Value::String(action.to_string()))
                    .with_context(|| format!("unknown action {action} in --grant"))?;
            Some((id.to_string(), action, system.to_string()))
        }
    };
    let step = nixroll::agent::host_step::HostStep {
        root: args.host_root,
        reboot_command: args.reboot_command,
        grant,
        activation_timeout: args.activation_timeout,
    };
    let status = runtime()?.block_on(nixroll::agent::host_step::run(&step))?;
    println!("{}", serde_json::to_string(&status)?);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain: the context (which address, which file) is in the outer errors.
            let error: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("nixroll: {}", nixroll::connect::error_chain(error));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd { only } => {
            let yaml = match only.as_deref() {
                Some("nixosnodes") => nixroll::api::crd_yaml(),
                Some("nixospools") => nixroll::api::nixospool_crd_yaml(),
                Some(_) => nixroll::api::flakesource_crd_yaml(),
                None => nixroll::api::all_crds_yaml(),
            }
            .context("cannot render the CRDs")?;
            // `nixroll crd | head` closes the pipe early: that is the reader's choice, not an
            // error (print! would panic on it).
            use std::io::Write;
            match std::io::stdout().lock().write_all(yaml.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::Error::new(e).context("writing the CRDs to stdout"))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Controller(args) => {
            run_controller(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            run_agent(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => run_demo(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Into memory first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "nixroll", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("writing the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => run_bench(args),
        Command::Image(cmd) => run_image(cmd),
        Command::HostStep(args) => run_host_step(args),
        Command::Status {
            cluster,
            timeout,
            watch,
        } => {
            // The command's own messages say what failed; kube's logs only with RUST_LOG.
            init_tracing_with(false, "off");
            runtime()?.block_on(async {
                let (client, server) = cluster
                    .target()
                    .client(&nixroll::connect::user_agent("status"))
                    .await?;
                if watch {
                    use std::io::IsTerminal as _;
                    let opts = nixroll::report::WatchOptions {
                        timeout,
                        terminal: std::io::stdout().is_terminal(),
                        server,
                    };
                    let mut out = std::io::stdout();
                    nixroll::report::watch(client, &mut out, opts, shutdown_signal()).await?;
                    return Ok(ExitCode::SUCCESS);
                }
                let nodes = nixroll::report::fetch(client, &server, timeout).await?;
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
    use clap::CommandFactory as _;

    /// Every argument of `cmd` and its subcommands, as `path --flag`.
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            let name = arg
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| arg.get_id().to_string());
            out.push((format!("{path} {name}"), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn all_args() -> Vec<(String, clap::Arg)> {
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut out = Vec::new();
        walk(&cmd, "nixroll", &mut out);
        out
    }

    #[test]
    fn every_flag_of_every_subcommand_has_help_text() {
        let args = all_args();
        assert!(
            args.len() > 50,
            "the walk sees the subcommands' flags: {}",
            args.len()
        );
        let missing: Vec<&str> = args
            .iter()
            .filter(|(_, a)| !a.is_hide_set())
            .filter(|(_, a)| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
            .map(|(p, _)| p.as_str())
            .collect();
        assert!(missing.is_empty(), "flags without help text: {missing:?}");
        let mut cmd = super::Cli::command();
        cmd.build();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
        }
    }

    #[test]
    fn the_pod_commands_take_every_setting_from_the_environment() {
        // controller and agent run as pods: each setting can come from an environment variable
        // (shown as [env: …] in --help); --kubeconfig follows kubectl ($KUBECONFIG, a list)
        // and --context and --leader-election (the default) need none.
        let without: Vec<String> = all_args()
            .into_iter()
            .filter(|(p, _)| p.starts_with("nixroll controller ") || p.starts_with("nixroll agent "))
            .filter(|(p, _)| !p.ends_with(" --help") && !p.ends_with(" --version"))
            .filter(|(p, _)| {
                !p.ends_with(" --kubeconfig")
                    && !p.ends_with(" --context")
                    && !p.ends_with(" --leader-election")
            })
            .filter(|(_, a)| a.get_env().is_none())
            .map(|(p, _)| p)
            .collect();
        assert!(without.is_empty(), "no environment variable: {without:?}");
    }

    #[test]
    fn the_two_activation_timeouts_say_which_is_which() {
        let args = all_args();
        let help = |path: &str| {
            args.iter()
                .find(|(p, _)| p == path)
                .and_then(|(_, a)| a.get_help().map(ToString::to_string))
                .unwrap_or_default()
        };
        let controller = help("nixroll controller --activating-timeout");
        let agent = help("nixroll agent --activation-timeout");
        assert!(
            controller.contains("agent's --activation-timeout"),
            "{controller}"
        );
        assert!(agent.contains("controller's --activating-timeout"), "{agent}");
    }

    #[test]
    fn completions_are_generated_for_bash_zsh_and_fish() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut super::Cli::command(), "nixroll", &mut out);
            let text = String::from_utf8(out).unwrap_or_default();
            assert!(text.contains("activating-timeout"), "{shell}: {text}");
            assert!(text.contains("kubeconfig"), "{shell}");
        }
    }

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
