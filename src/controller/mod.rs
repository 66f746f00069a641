//! The controller's Kubernetes side: observe → decide → act → write status.
//!
//! * **observe**: reflector stores (trimmed, see [`observe`]) of NixOSNodes, Nodes and the pause
//!   ConfigMap; pods are listed per node only while it drains ([`crate::drain`]) or waits for
//!   its post-gates ([`post_gates`]).
//! * **decide**: [`crate::rollout::admit`] (under one async mutex, the single admission point,
//!   over the store united with this process's own not-yet-visible writes, see [`admission`])
//!   and [`crate::rollout::decide`].
//! * **write status**: server-side apply of the controller-owned status (never `agent`) under
//!   `nixroll-controller`, *before* acting, so a restart can finish or undo the step.
//! * **act**: cordon / uncordon / one eviction pass / force delete, Events, requeue.
//!
//! One replica leads (a Lease, see [`leader`]); standbys write nothing. [`run`] is usable
//! in-process: no global state, everything in [`ControllerConfig`], clean shutdown.
//!
//! Where each part lives (one reason to change per file):
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | [`ControllerConfig`], [`default_identity`], this map |
//! | `error.rs` | [`ControllerError`]: categories, transient or not |
//! | `context.rs` | [`Context`] (the state shared by one leadership term), [`Stores`], [`Synced`], [`RolloutFns`] |
//! | `observe.rs` | trimming the watched objects; Node → `NodeObservation`; the decision's `NodeView` |
//! | `admission.rs` | the single admission point: the gate over the cache, wake-ups, the sweep, [`PendingWrites`] |
//! | `reconcile.rs` | one reconcile: observe → decide → write status → act; [`execute`], [`error_policy`] |
//! | `draining.rs` | drain bookkeeping: pass progress and backoff, the pod and PDB watches that wake a drain |
//! | `cordon.rs` | the Node patches: cordon and uncordon (conditional, with nixroll's mark) |
//! | `pools.rs` | NixOSPools: the pools the gate sees (selectors over NixOSNode labels), the gate pass, the pools' status writer |
//! | `post_gates.rs` | a Verifying node's post-gates: its pools' gate verdicts, its own pods |
//! | `run.rs` | [`run`]: metrics server, standby / lead, the watches and triggers, clean shutdown |
//! | `leader.rs` | the Lease elector |
//! | `events.rs`, `metrics.rs` | Events; Prometheus metrics, `/healthz`, `/readyz` |

pub mod admission;
mod build;
mod context;
mod cordon;
mod draining;
mod error;
pub mod events;
pub mod follow;
pub mod leader;
pub mod metrics;
pub mod observe;
mod pools;
pub mod post_gates;
mod reconcile;
mod run;
pub mod webhook;

use std::net::SocketAddr;
use std::time::Duration;

use crate::names::NAMESPACE;
use crate::rollout::Policy;

pub use admission::PendingWrites;
pub use context::{Context, RolloutFns, Stores, Synced, SyncedSetter};
pub use error::ControllerError;
pub use leader::{LeaderElectionConfig, LeaderElector, LeaseOutcome};
pub use metrics::{Health, Metrics};
pub use reconcile::{error_policy, execute, reconcile};
pub use run::run;

/// Everything `nixroll controller` is configured with.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Budget, failure threshold, phase timeouts, drain backoff.
    pub policy: Policy,
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; `None`: no server (tests).
    pub metrics_addr: Option<SocketAddr>,
    /// Set once the metrics server is bound: its address (port 0 resolved), e.g. for the
    /// demo to print.
    pub metrics_bound: std::sync::Arc<std::sync::OnceLock<SocketAddr>>,
    /// `None`: act as leader at once (single replica, tests).
    pub leader_election: Option<LeaderElectionConfig>,
    /// Namespace of the pause ConfigMap (`nixroll-system`).
    pub pause_namespace: String,
    /// Reporting instance of Events and Lease holder identity.
    pub identity: String,
    /// Bound of every single API request.
    pub api_timeout: Duration,
    /// How long a reconcile waits for the stores' first sync before failing (transient).
    pub sync_timeout: Duration,
    /// Parallel reconciles (0: unbounded).
    pub concurrency: u16,
    /// The decision functions; the real ones unless a test substitutes fakes.
    pub rollout: RolloutFns,
    /// First and longest wait between two eviction passes of a draining node.
    pub drain_pass_backoff: (Duration, Duration),
    /// The safety net behind targeted wake-ups: this often, the admission gate runs over the
    /// cache and every Waiting node it admits is reconciled, so a lost wake-up delays a
    /// rollout by at most this long. Costs no API request unless a node is admitted.
    pub admission_sweep: Duration,
    /// Fault injection (tests, simulation): drop every targeted wake-up, as if each one was
    /// lost, so that only the sweep admits Waiting nodes.
    pub lose_wakeups: bool,
    /// Following sources: the FlakeSource controller and the source watches (`follow`).
    pub follow: follow::FollowConfig,
    /// The push webhook receiver (`None`: off, the default).
    pub webhook: Option<webhook::WebhookConfig>,
    /// Set once the webhook receiver is bound: its address.
    pub webhook_bound: std::sync::Arc<std::sync::OnceLock<SocketAddr>>,
}

impl ControllerConfig {
    pub fn new(identity: &str) -> Self {
        ControllerConfig {
            policy: Policy::default(),
            metrics_addr: None,
            metrics_bound: std::sync::Arc::default(),
            leader_election: None,
            pause_namespace: NAMESPACE.to_string(),
            identity: identity.to_string(),
            api_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(60),
            concurrency: 16,
            rollout: RolloutFns::default(),
            drain_pass_backoff: (Duration::from_secs(2), Duration::from_secs(30)),
            admission_sweep: Duration::from_secs(5),
            lose_wakeups: false,
            follow: follow::FollowConfig::default(),
            webhook: None,
            webhook_bound: std::sync::Arc::default(),
        }
    }
}

/// `POD_NAME` (or `HOSTNAME`, or `nixroll`) plus a random suffix: unique per process.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "nixroll".to_string());
    let suffix: String = (0..6).map(|_| fastrand::alphanumeric()).collect();
    format!("{base}-{}", suffix.to_lowercase())
}
