//! PURE rollout logic: no kube client, no tokio, no clock. Everything the decision needs —
//! the NixOSNode, what was observed of its Node, the policy and `now` — is passed in; the
//! result says what to write and which single effect to perform next.
//!
//! * [`decide`]: the next step of one node (DESIGN.md §5).
//! * [`admit`]: the admission gate over all nodes (budget, control plane, windows, pause,
//!   failure threshold).
//! * [`window`]: weekly maintenance windows in IANA time zones.
//!
//! CONTRACT between this module and `crate::controller`: the names and shapes below. Fields and
//! variants may be added; existing ones keep their meaning.

mod admit;
pub mod build;
pub(crate) mod decide;
pub mod pools;
mod rows;
pub mod window;

#[cfg(test)]
mod tests;

pub use admit::{budget, is_admitted, is_candidate, is_degraded, is_unavailable};
pub use decide::{
    DRAIN_PASS_INTERVAL, HISTORY_LIMIT, MAX_BACKOFF_DOUBLINGS, MESSAGE_LIMIT, POST_GATE_RECHECK,
    ParseDurationError, UNCORDON_RECHECK, condition, drain_timeout, invalid_spec_status, parse_duration,
};
pub use pools::{Membership, Pool, Pools, node_blocker, pool_blocker, pool_status};
pub use rows::Row;

/// PascalCase reasons used in conditions, `status.failed.reason` and Events.
pub mod reason {
    pub const STAGING: &str = "Staging";
    pub const STAGED: &str = "Staged";
    pub const WAITING_FOR_SLOT: &str = "WaitingForSlot";
    pub const WAITING_FOR_WINDOW: &str = "WaitingForWindow";
    pub const SUSPENDED: &str = "Suspended";
    pub const DRAIN_BACKOFF: &str = "DrainBackoff";
    pub const ADMITTED: &str = "Admitted";
    pub const DRAINING: &str = "Draining";
    pub const DRAIN_TIMEOUT: &str = "DrainTimeout";
    pub const DRAIN_FORCED: &str = "DrainForced";
    pub const ACTIVATION_GRANTED: &str = "ActivationGranted";
    pub const ACTIVATING: &str = "Activating";
    pub const REBOOT_NEEDED: &str = "RebootNeeded";
    pub const REBOOTING: &str = "Rebooting";
    pub const VERIFYING: &str = "Verifying";
    pub const UPDATED: &str = "Updated";
    pub const UNCORDONED: &str = "Uncordoned";
    pub const REVISION_RUNNING: &str = "RevisionRunning";
    pub const NEW_REVISION: &str = "NewRevision";
    pub const IDLE: &str = "Idle";
    pub const HALTED: &str = "Halted";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const RETRY: &str = "Retry";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NODE_MISSING: &str = "NodeMissing";
    pub const REBOOT_REQUIRED: &str = "RebootRequired";
    pub const REBOOT_POLICY_NEVER: &str = "RebootPolicyNever";
    pub const NOT_REQUIRED: &str = "NotRequired";
    /// `status.agent.secretsMissing` is not empty: nothing is admitted or activated.
    pub const SECRETS_MISSING: &str = "SecretsMissing";
    pub const SECRETS_PRESENT: &str = "SecretsPresent";
    // Failures (Degraded reasons, also `status.failed.reason`).
    pub const STAGE_FAILED: &str = "StageFailed";
    pub const STAGING_TIMEOUT: &str = "StagingTimeout";
    pub const ACTIVATION_FAILED: &str = "ActivationFailed";
    pub const ACTIVATION_TIMEOUT: &str = "ActivationTimeout";
    pub const REBOOT_TIMEOUT: &str = "RebootTimeout";
    pub const VERIFY_TIMEOUT: &str = "VerifyTimeout";
    pub const BOOTED_WRONG_SYSTEM: &str = "BootedWrongSystem";
    /// A one-time boot of the new system ended on the old default (the new one failed to boot,
    /// or the node rebooted before the bless step).
    pub const ROLLED_BACK: &str = "RolledBack";
    pub const BLESSING: &str = "Blessing";
    /// Verified, waiting for its post-gates before the slot is freed.
    pub const POST_GATES: &str = "PostGates";
    /// A post-gate still blocked at its timeout: Degraded, kept cordoned, its pool halted.
    pub const GATE_FAILED: &str = "GateFailed";

    /// Every reason a node goes Degraded with (`status.failed.reason`): also the bounded
    /// `category` label set of `nixroll_failures_total`.
    pub const FAILURES: [&str; 9] = [
        STAGE_FAILED,
        STAGING_TIMEOUT,
        ACTIVATION_FAILED,
        ACTIVATION_TIMEOUT,
        REBOOT_TIMEOUT,
        VERIFY_TIMEOUT,
        BOOTED_WRONG_SYSTEM,
        ROLLED_BACK,
        GATE_FAILED,
    ];
}

use jiff::{SignedDuration, Timestamp};

use crate::api::{NixOSNodeSpec, NixOSNodeStatus, Phase};

/// Cluster-wide budget of unavailable nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxUnavailable {
    Count(u32),
    /// Percentage of all managed nodes, rounded down, at least 1.
    Percent(u32),
}

impl Default for MaxUnavailable {
    fn default() -> Self {
        MaxUnavailable::Count(1)
    }
}

/// Timeouts of each phase. Draining uses the node's `spec.drain.timeout` when set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseTimeouts {
    pub staging: SignedDuration,
    pub draining: SignedDuration,
    pub activating: SignedDuration,
    pub rebooting: SignedDuration,
    pub verifying: SignedDuration,
}

impl Default for PhaseTimeouts {
    fn default() -> Self {
        PhaseTimeouts {
            staging: SignedDuration::from_mins(60),
            draining: SignedDuration::from_mins(15),
            activating: SignedDuration::from_mins(15),
            rebooting: SignedDuration::from_mins(15),
            verifying: SignedDuration::from_mins(10),
        }
    }
}

/// Controller-wide policy (flags of `nixroll controller`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub max_unavailable: MaxUnavailable,
    /// Admissions halt while at least this many nodes are Degraded.
    pub failure_threshold: u32,
    pub timeouts: PhaseTimeouts,
    /// First wait after a drain `Abort`; doubles per attempt.
    pub drain_backoff: SignedDuration,
    /// How long a node that finished an update keeps counting against its pool's budget (it
    /// must stay Ready that long before the next node takes its slot): the default pool's,
    /// and every pool's that does not set `spec.nodeSoak`. Zero: none.
    pub node_soak: SignedDuration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_unavailable: MaxUnavailable::default(),
            failure_threshold: 1,
            timeouts: PhaseTimeouts::default(),
            drain_backoff: SignedDuration::from_mins(5),
            node_soak: SignedDuration::ZERO,
        }
    }
}

/// What the controller observed of the Kubernetes Node named like the NixOSNode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeObservation {
    pub exists: bool,
    /// `Ready` condition is `True`.
    pub ready: bool,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// The Node carries nixroll's cordon mark (`nixroll.io/cordoned`), which nixroll sets in
    /// the same write as its cordon and removes in the same write as its uncordon. A cordon
    /// without the mark is someone else's, whatever `status.slot` says.
    pub cordon_mark: bool,
    /// k3s server (control-plane label).
    pub control_plane: bool,
    /// `status.nodeInfo.bootID`.
    pub boot_id: Option<String>,
    /// The `EtcdIsVoter` condition k3s sets on its servers with embedded etcd: `Some(true)`
    /// for a healthy voting member, `Some(false)` for a learner, an unhealthy member or a
    /// server that is not a member; `None` when the Node has no such condition (no embedded
    /// etcd). A server with `Some(false)` blocks the admission of every server and is not done
    /// (its post-gates) until it is `Some(true)` again.
    pub etcd_voter: Option<bool>,
    /// The node's post-gates other than the built-in k3s one, as last observed (pool or
    /// cluster-default health gates, the node's own pods): checked once the node runs its
    /// target and is Ready, before its slot is freed. Empty: none.
    pub post_gates: Vec<GateObservation>,
    /// Why the node's pool admits nothing now (a pool reason such as `WaitingForPool`,
    /// `GateBlocking`, `NodeDegraded`, and a message naming the pool), computed by the
    /// controller for a `Waiting` node with [`pools::node_blocker`]; the decision shows it in
    /// the node's `Progressing` condition instead of a bare `WaitingForSlot`.
    pub held_by: Option<(String, String)>,
}

/// The name of the built-in k3s post-gate (a server is a healthy etcd voter again).
pub const K3S_GATE: &str = "k3s-etcd-voter";
/// The name of the built-in post-gate over the node's own pods (every one Ready again).
pub const PODS_GATE: &str = "node-pods";

/// Whether a decision over a node with this status may find it verified (and so needs its
/// post-gates in [`NodeObservation::post_gates`]): it holds a slot and is past its drain. One
/// decision can go from `Activating` or `Rebooting` (or from `Degraded` through a retry of a
/// system that already runs) all the way to `UpToDate`, so "is `Verifying`" is not enough.
pub fn needs_post_gates(status: &NixOSNodeStatus) -> bool {
    status.slot.is_some() && !matches!(status.phase, Some(Phase::Waiting | Phase::Draining))
}

/// One post-gate of a node as the controller last observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateObservation {
    /// As conditions show it (`pods`, or the health gate's name).
    pub name: String,
    /// How long after the node was verified this gate may keep blocking before the node is
    /// Degraded (`GateFailed`).
    pub timeout: SignedDuration,
    pub verdict: GateVerdict,
}

/// The last verdict of a gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateVerdict {
    /// Passed when evaluated at `at`.
    Pass { at: Timestamp },
    /// Blocked when evaluated at `at`, with why.
    Block { at: Timestamp, why: String },
    /// Not evaluated yet (blocks).
    Unknown,
}

impl GateVerdict {
    /// Passed in an evaluation made at or after `since` (a pass from before the node was
    /// verified says nothing about the node after its update).
    pub fn passed_since(&self, since: Timestamp) -> bool {
        matches!(self, GateVerdict::Pass { at } if *at >= since)
    }
}

/// Result of the last drain pass over the node's pods (only while Draining).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Pods that still have to leave (DaemonSet and mirror pods excluded).
    pub remaining: usize,
    /// Evictions refused with 429 (a PodDisruptionBudget allows no disruption now).
    pub blocked_by_pdb: usize,
    /// Pods the policy does not allow to evict (unmanaged / emptyDir), with a reason.
    pub refused: Vec<String>,
}

/// One node as the decision sees it.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub name: &'a str,
    /// `metadata.generation`.
    pub generation: i64,
    /// Value of the `nixroll.io/retry` annotation, if set.
    pub retry_token: Option<&'a str>,
    pub spec: &'a NixOSNodeSpec,
    pub status: &'a NixOSNodeStatus,
    pub node: &'a NodeObservation,
}

/// A side effect on Kubernetes the controller performs for a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set `spec.unschedulable = true` on the Node.
    Cordon,
    /// Set `spec.unschedulable = false` on the Node.
    Uncordon,
    /// Run one eviction pass over the node's pods (Eviction API).
    Evict,
    /// Delete the remaining pods directly (`onTimeout: Force`).
    ForceDelete,
}

/// An Event a person would want to see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// PascalCase reason (`Cordoned`, `DrainTimeout`, …).
    pub reason: String,
    pub message: String,
    pub warning: bool,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The complete controller-owned status to apply (`agent` is always `None`).
    pub status: NixOSNodeStatus,
    /// Effects to perform *after* `status` was persisted (intent is written first, so a
    /// controller restart can finish or undo them).
    pub actions: Vec<Action>,
    pub notes: Vec<Note>,
    /// When to look again even if nothing changes (timeouts, window opening, backoff).
    pub requeue_after: Option<SignedDuration>,
    /// The rows of the state table in `docs/rollout.md` this decision took, in order (one
    /// pass can take several: `Staged` then `Admitted`). For tests and tracing; the controller
    /// needs nothing from it.
    pub rows: Vec<Row>,
}

/// Decide the next step of one node. `admitted` says whether the admission gate granted this
/// node a disruption slot now (compute it with [`is_admitted`]); `drain` is the result of the
/// last eviction pass, if any.
pub fn decide(
    view: &NodeView<'_>,
    admitted: bool,
    drain: Option<&DrainProgress>,
    policy: &Policy,
    now: Timestamp,
) -> Decision {
    decide::decide(view, admitted, drain, policy, now)
}

/// Cluster-wide inputs of the admission gate besides the nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// The `nixroll-pause` ConfigMap exists.
    pub paused: bool,
    /// The NixOSPools and which pool each node is in (empty: every node is in the default pool).
    pub pools: pools::Pools,
}

/// The admission gate: which nodes in `Waiting` may take a disruption slot now. Nodes already
/// holding a slot keep it and are not listed. Never returns more than the budget allows.
pub fn admit(nodes: &[NodeView<'_>], cluster: &ClusterState, policy: &Policy, now: Timestamp) -> Vec<String> {
    admit::admit(nodes, cluster, policy, now)
}
