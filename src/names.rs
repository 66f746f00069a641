//! Every fixed string of the nixroll contract (DESIGN.md §2) in one place.

/// API group of the NixOSNode kind.
pub const GROUP: &str = "nixroll.io";
/// API version of the NixOSNode kind.
pub const VERSION: &str = "v1alpha1";
/// Field manager of the controller's server-side applies.
pub const CONTROLLER_MANAGER: &str = "nixroll-controller";
/// Field manager of the agent's server-side applies.
pub const AGENT_MANAGER: &str = "nixroll-agent";
/// Namespace nixroll's own deployment runs in.
pub const NAMESPACE: &str = "nixroll-system";
/// Name of the leader-election Lease in [`NAMESPACE`].
pub const LEADER_LEASE: &str = "nixroll-controller";
/// A ConfigMap of this name in [`NAMESPACE`] pauses every new disruptive step cluster-wide:
/// `kubectl -n nixroll-system create configmap nixroll-pause`; delete it to resume.
pub const PAUSE_CONFIGMAP: &str = "nixroll-pause";
/// A ConfigMap of this name in [`NAMESPACE`] holds the cluster-default health gates (key
/// [`GATES_KEY`], the shape of a NixOSPool's `spec.healthGates`): they apply to the implicit
/// default pool and to every NixOSPool without gates of its own (docs/pools.md).
pub const GATES_CONFIGMAP: &str = "nixroll-gates";
/// The key of [`GATES_CONFIGMAP`] that holds the gates (YAML or JSON).
pub const GATES_KEY: &str = "healthGates";
/// Annotation on a NixOSNode: set it to a new value to retry a failed target.
pub const RETRY_ANNOTATION: &str = "nixroll.io/retry";
/// On a FlakeSource: any new value resolves it at once (like Flux's
/// `reconcile.fluxcd.io/requestedAt`); the value handled last is in
/// `status.lastHandledRequestedAt`.
pub const REQUESTED_AT_ANNOTATION: &str = "nixroll.io/requested-at";
/// Annotation on a Node: nixroll's cordon mark, written in the same patch as its cordon and
/// removed in the same patch as its uncordon, so nixroll never lifts a cordon it did not make.
pub const CORDON_ANNOTATION: &str = "nixroll.io/cordoned";
/// Label a Node carries when it is a k3s server (control plane).
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// Label k3s sets on server nodes in older releases.
pub const MASTER_LABEL: &str = "node-role.kubernetes.io/master";
/// Node label of a builder (`true`): it builds each distinct system once for the nodes of its
/// Nix system and serves them from its binary cache (docs/builder.md).
pub const BUILDER_LABEL: &str = "nixroll.io/builder";
/// Where the agent keeps its state on the host.
pub const STATE_DIR: &str = "/var/lib/nixroll";
/// The system profile.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";
/// ServiceAccount of the agent's DaemonSet pods (deploy/agent-rbac.yaml).
pub const AGENT_SERVICE_ACCOUNT: &str = "nixroll-agent";
/// ServiceAccount of the controller's pods (deploy/controller-rbac.yaml).
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "nixroll-controller";
