//! `nixroll agent`: its flags and start-up, and the hidden `host-step` that runs its host logic
//! once without Kubernetes.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::*;

#[derive(clap::Args, Debug)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Name of this Node (and of its NixOSNode). The DaemonSet sets NODE_NAME from the
    /// downward API.
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node: String,
    /// Treat DIR as the host's root and run host commands directly (tests, demo). Nix then
    /// uses a private store inside DIR (DIR/nix/store, DIR/nix/var/nix).
    #[arg(long, env = "NIXROLL_HOST_ROOT", value_name = "DIR")]
    pub(crate) host_root: Option<std::path::PathBuf>,
    /// With --host-root: the command that "reboots" (split on whitespace, no shell).
    #[arg(
        long,
        env = "NIXROLL_REBOOT_COMMAND",
        value_name = "CMD",
        requires = "host_root"
    )]
    pub(crate) reboot_command: Option<String>,
    /// Where the host's `/` is mounted in the agent's container (real hosts).
    #[arg(
        long,
        env = "NIXROLL_HOST_FS",
        value_name = "DIR",
        default_value = "/host",
        conflicts_with = "host_root"
    )]
    pub(crate) host_fs: std::path::PathBuf,
    /// Never use binary caches (air-gapped hosts, tests).
    #[arg(long, env = "NIXROLL_OFFLINE")]
    pub(crate) offline: bool,
    /// How long switch-to-configuration may run on the host before the agent asks systemd
    /// whether it still runs (it is followed, never abandoned, while its unit runs), e.g.
    /// `15m`. Not the controller's --activating-timeout (how long the controller waits for
    /// the agent's report).
    #[arg(long, env = "NIXROLL_ACTIVATION_TIMEOUT", value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub(crate) activation_timeout: Duration,
    /// Count a changed systemd as a reason to reboot (by default it is switched to live:
    /// switch-to-configuration re-executes PID 1).
    #[arg(long, env = "NIXROLL_REBOOT_ON_SYSTEMD_CHANGE")]
    pub(crate) reboot_on_systemd_change: bool,
    /// Binary cache to fetch a builder's systems from, after the builder's own cache
    /// (repeat, or comma-separated in the variable). See docs/builder.md.
    #[arg(
        long = "substituter",
        env = "NIXROLL_SUBSTITUTERS",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub(crate) substituters: Vec<String>,
    /// Public key (Nix's `name:base64`) a fetched system must be signed by (repeat, or
    /// comma-separated). Without one, a node never fetches a builder's system.
    #[arg(
        long = "trusted-public-key",
        env = "NIXROLL_TRUSTED_PUBLIC_KEYS",
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub(crate) trusted_public_keys: Vec<String>,
    /// Act as this node's builder: build what the controller lists in status.builds, sign it
    /// and serve it as a binary cache (label the Node nixroll.io/builder=true too).
    #[arg(long, env = "NIXROLL_BUILDER", requires = "cache_url")]
    pub(crate) builder: bool,
    /// With --builder: the Secret in nixroll-system holding the signing key.
    #[arg(
        long,
        env = "NIXROLL_BUILDER_KEY_SECRET",
        value_name = "NAME",
        default_value = "nixroll-builder-key"
    )]
    pub(crate) builder_key_secret: String,
    /// With --builder: the key of that Secret (Nix's name:base64 secret-key format).
    #[arg(
        long,
        env = "NIXROLL_BUILDER_KEY_FIELD",
        value_name = "KEY",
        default_value = "secret-key"
    )]
    pub(crate) builder_key_field: String,
    /// With --builder: where the binary cache listens.
    #[arg(
        long,
        env = "NIXROLL_CACHE_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:5080"
    )]
    pub(crate) cache_listen: std::net::SocketAddr,
    /// With --builder: the URL other nodes fetch from (e.g. http://NODE_IP:5080).
    #[arg(long, env = "NIXROLL_CACHE_URL", value_name = "URL")]
    pub(crate) cache_url: Option<String>,
    /// With --builder: also push every built closure, signed, to this binary cache
    /// (`file:///DIR` written by nixroll; `http(s)://…`, `s3://…` with `nix copy`, the key in
    /// an in-memory file: docs/builder.md).
    #[arg(long, env = "NIXROLL_BUILDER_PUSH_TO", value_name = "URL", requires = "builder", value_parser = nixroll::builder::PushTo::parse)]
    pub(crate) builder_push_to: Option<nixroll::builder::PushTo>,
    /// Staged systems kept pinned (GC roots), the current target included: reverting to one
    /// of them needs no evaluation or build. At least 1.
    #[arg(long, env = "NIXROLL_KEEP_STAGED", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) keep_staged: u16,
    /// Never boot a new system once: make it the boot default before the reboot (for hosts
    /// whose bootloader cannot boot an entry once).
    #[arg(long, env = "NIXROLL_NO_BOOT_ONCE")]
    pub(crate) no_boot_once: bool,
}

pub(crate) fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
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

#[derive(clap::Args, Debug)]
pub(crate) struct HostStepArgs {
    /// The host's root directory.
    #[arg(long, default_value = "/")]
    pub(crate) host_root: std::path::PathBuf,
    /// How to reboot (split on whitespace).
    #[arg(long, default_value = "reboot -f")]
    pub(crate) reboot_command: String,
    /// Carry out this grant: `ID:ACTION:SYSTEM` (ACTION: Boot, Bless, Switch, Rollback).
    #[arg(long, value_name = "ID:ACTION:SYSTEM")]
    pub(crate) grant: Option<String>,
    /// Bound on `switch-to-configuration`.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(crate) activation_timeout: Duration,
}

pub(crate) fn run_host_step(args: HostStepArgs) -> anyhow::Result<ExitCode> {
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
