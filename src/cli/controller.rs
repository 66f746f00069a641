//! `nixroll controller`: its flags and start-up, and where the cluster is (also for `status`).

use crate::*;

/// Where the cluster is, as kubectl takes it.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ClusterArgs {
    /// The kubeconfig file to use. Default: the files in $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account.
    #[arg(long, value_name = "FILE")]
    pub(crate) kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub(crate) context: Option<String>,
}

impl ClusterArgs {
    pub(crate) fn target(&self) -> nixroll::connect::Target {
        nixroll::connect::Target {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct ControllerArgs {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Nodes that may be disrupted at once: a count (`2`) or a percentage of managed nodes (`10%`).
    #[arg(long, env = "NIXROLL_MAX_UNAVAILABLE", default_value = "1", value_parser = parse_max_unavailable)]
    pub(crate) max_unavailable: nixroll::rollout::MaxUnavailable,
    /// Admissions halt while at least this many nodes are Degraded.
    #[arg(long, env = "NIXROLL_FAILURE_THRESHOLD", default_value_t = 1)]
    pub(crate) failure_threshold: u32,
    /// How long a node that finished its update must stay Ready, still counting against its
    /// pool's budget, before the next node takes its slot (`0s`: none); a NixOSPool's
    /// spec.nodeSoak overrides it.
    #[arg(long, env = "NIXROLL_NODE_SOAK", default_value = "0s", value_parser = parse_soak)]
    pub(crate) node_soak: jiff::SignedDuration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "NIXROLL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub(crate) metrics_addr: std::net::SocketAddr,
    /// Serve the push webhook receiver (GitHub, GitLab, Gitea/Forgejo, generic) on this
    /// address, e.g. 0.0.0.0:9292. Off unless set (docs/source.md).
    #[arg(long, env = "NIXROLL_WEBHOOK_ADDR")]
    pub(crate) webhook_addr: Option<std::net::SocketAddr>,
    /// Secret in the controller's namespace with the webhook key (`token`, and
    /// `previousToken` while rotating).
    #[arg(long, env = "NIXROLL_WEBHOOK_SECRET", default_value = "nixroll-webhook")]
    pub(crate) webhook_secret: String,
    /// Largest webhook body accepted, in bytes (larger: 413).
    #[arg(long, env = "NIXROLL_WEBHOOK_MAX_BODY", default_value_t = 1024 * 1024)]
    pub(crate) webhook_max_body: usize,
    /// Take part in leader election over a Lease, so that one replica acts and the others
    /// stand by. This is the default; the flag exists to undo an earlier
    /// --no-leader-election.
    #[arg(long, overrides_with = "no_leader_election", default_value_t = true)]
    pub(crate) leader_election: bool,
    /// Act as leader at once, without a Lease: only for a single replica.
    #[arg(long, env = "NIXROLL_NO_LEADER_ELECTION", overrides_with = "leader_election")]
    pub(crate) no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "NIXROLL_LEASE_NAMESPACE", default_value = nixroll::names::NAMESPACE)]
    pub(crate) lease_namespace: String,
    /// How long a node may stay in Staging (the agent building or fetching the new system)
    /// before it is Degraded with StagingTimeout, e.g. `60m`.
    #[arg(long, env = "NIXROLL_STAGING_TIMEOUT", default_value = "60m", value_parser = parse_signed_duration)]
    pub(crate) staging_timeout: jiff::SignedDuration,
    /// How long the drain (cordon, then evictions) of a node may take before the node's
    /// `spec.drain.onTimeout` applies (Abort gives the node back, Force deletes), e.g. `15m`.
    #[arg(long, env = "NIXROLL_DRAINING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    pub(crate) draining_timeout: jiff::SignedDuration,
    /// How long the controller waits for the agent to report the switch it granted; a switch
    /// the agent reports running gets up to twice this before the node is Degraded. Not the
    /// agent's --activation-timeout (how long the agent lets switch-to-configuration run).
    #[arg(long, env = "NIXROLL_ACTIVATING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    pub(crate) activating_timeout: jiff::SignedDuration,
    /// How long a node may take from the reboot request to reporting a new boot id before it
    /// is Degraded with RebootTimeout, e.g. `15m`.
    #[arg(long, env = "NIXROLL_REBOOTING_TIMEOUT", default_value = "15m", value_parser = parse_signed_duration)]
    pub(crate) rebooting_timeout: jiff::SignedDuration,
    /// How long a node that is back may take to prove it runs the new system and is Ready
    /// before it is Degraded with VerifyTimeout, e.g. `10m`; also the default time its
    /// post-gates may block after that before it is Degraded with GateFailed.
    #[arg(long, env = "NIXROLL_VERIFYING_TIMEOUT", default_value = "10m", value_parser = parse_signed_duration)]
    pub(crate) verifying_timeout: jiff::SignedDuration,
    /// Output logs as JSON lines.
    #[arg(long, env = "NIXROLL_LOG_JSON")]
    pub(crate) log_json: bool,
    /// Where FlakeSources keep their cached bare repositories (the ancestry check).
    #[arg(
        long,
        env = "NIXROLL_SOURCE_CACHE",
        value_name = "DIR",
        default_value = "/var/cache/nixroll/sources"
    )]
    pub(crate) source_cache: std::path::PathBuf,
}

pub(crate) fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
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
