//! `NixOSNode.status`: the controller's rollout part and the agent's report (`status.agent`).
//! One writer per field (DESIGN.md §3); optional fields are omitted when empty so that neither
//! writer clears the other's under server-side apply.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use super::{Phase, SecretKeyRef};

/// The schema of a [`SecretKeyRef`] in status: the same shape without its CEL rules.
///
/// Status is written only by nixroll's own agent, from a `spec.secrets` entry the API server
/// already validated; a rule there would check nothing a user wrote, and under a list it costs
/// CEL budget per item (kube-apiserver refused the CRD for exactly that). The lengths stay, so
/// the schema still bounds what a writer can put there.
fn reported_secret_ref(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "The Secret (in `nixroll-system`) and key the file comes from.",
        "properties": {
            "name": {"type": "string", "maxLength": 253, "description": "Name of the Secret."},
            "key": {"type": "string", "maxLength": 253, "description": "Key in the Secret's data."}
        },
        "required": ["key", "name"]
    })
}

/// Status. Everything but `agent` is written by `nixroll-controller`; `agent` by
/// `nixroll-agent`. All optional fields are omitted when empty so that neither writer clears
/// the other's fields under server-side apply.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NixOSNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// One line for humans: what is happening and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `spec.revision`, shortened (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<String>,
    /// The revision the node is proven to run, shortened (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Full revision the node is proven to run (booted, or switched live with `reboot: Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Store path of the system that revision built to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The target the controller admitted for staging (and later activation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The disruption slot this node holds. Persisted so a restarted controller never
    /// over-admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
    /// The activation the controller granted to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationGrant>,
    /// A target that failed on this node; not retried until the spec changes or the user sets
    /// the `nixroll.io/retry` annotation to a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedTarget>,
    /// The last value of the `nixroll.io/retry` annotation the controller acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_token: Option<String>,
    /// Drain attempts that ended in `Abort` for the current target, and when the next may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    /// Standard conditions: `UpToDate`, `Progressing`, `Degraded`, `RebootRequired` and `SecretsMissing`, each with a reason and a message that says what to do.
    pub conditions: Vec<Condition>,
    /// Applied revisions, newest first (the last 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub history: Vec<HistoryEntry>,
    /// When `phase` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// On a builder's NixOSNode only: the distinct systems it is to build for the nodes of its
    /// Nix system (docs/builder.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<BuildRequest>,
    /// What the host really runs; written only by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
}

/// One system a builder is to build (`status.builds`), for every node that wants it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    /// The installable (flake, revision, configuration), as in `status.target.installable`.
    pub installable: String,
    /// How many nodes wait for it.
    #[serde(default)]
    pub nodes: u32,
    /// The newest `nixroll.io/retry` value among those nodes (their `status.retryToken`): a
    /// build that failed under an older one (or none) is built again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
}

/// Where a build is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum BuildState {
    /// Evaluating and building.
    Building,
    /// Built, signed and served by the builder's cache.
    Built,
    /// Evaluation or build failed; `message` says why.
    Failed,
}

/// A builder agent's report on one build (`status.agent.builds`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildReport {
    /// The installable built (as in `status.builds`).
    pub installable: String,
    /// `Building`, `Built` or `Failed`.
    pub state: BuildState,
    /// The built toplevel, once built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Nix's error (trimmed) when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the build reached this state.
    pub at: Time,
    /// The request's `retry` this build ran under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
}

/// What the controller admitted for this node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The full 40-hex revision admitted.
    pub revision: String,
    /// The full installable, `<flake>?rev=<revision>#nixosConfigurations.<cfg>.config.system.build.toplevel`.
    pub installable: String,
    /// Store path, once the agent staged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Set only where a builder is configured: the system the builder built for this target.
    /// The agent then realises exactly that store path from binary caches, signatures
    /// required, and never evaluates the flake (docs/builder.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<TargetBuild>,
}

/// The built system a node fetches instead of building it (`status.target.build`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetBuild {
    /// Store path of the built toplevel (`/nix/store/…`); empty while the builder has not
    /// built it yet (the agent then waits and evaluates nothing).
    pub system: String,
    /// The builder node that built it (its agent's log has the build output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// The binary cache that serves it (the builder's, `http://…`), tried before the agent's
    /// own substituters. Only keys the agent is configured to trust are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Where this node's system is: `Queued` (the builder has not started it), `Building`,
    /// `Built` (on the builder itself), `Fetching` (the agent realises it from the cache),
    /// `Staged`, or `Failed` (on the builder). The `Build` column of `kubectl get nixosnodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<BuildProgress>,
    /// When the builder reported it built: the node's staging timeout counts from here (or
    /// from the phase start, if later), not while it waits for the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_at: Option<Time>,
}

/// Where a node's system is on its way from the builder (`status.target.build.progress`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum BuildProgress {
    /// The builder has not started it yet.
    Queued,
    /// The builder evaluates and builds it.
    Building,
    /// Built, on the builder's own node (nothing to fetch).
    Built,
    /// Built; this node's agent realises it from the builder's cache.
    Fetching,
    /// Staged on this node.
    Staged,
    /// The evaluation or build failed on the builder.
    Failed,
}

impl std::fmt::Display for BuildProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A disruption slot held by this node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Slot {
    pub granted_at: Time,
    /// Whether the Node was unschedulable before nixroll touched it (then it stays so).
    pub was_unschedulable: bool,
    /// Whether nixroll set `spec.unschedulable` (only then does it uncordon).
    #[serde(default)]
    pub cordoned_by_nixroll: bool,
    /// When draining started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_started_at: Option<Time>,
    /// Whether the drain fell back to deleting pods (`onTimeout: Force`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// When the node was first found running its target and Ready: from then on its
    /// post-gates are checked (docs/pools.md), and their timeouts count from then. The slot is
    /// freed only once every post-gate passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
}

/// What the agent should do on the host.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ActivationAction {
    /// Set the profile, `switch-to-configuration switch`, no reboot.
    Switch,
    /// Set the profile, `switch-to-configuration boot`, then reboot.
    Boot,
    /// Set the profile back to the previous generation, `boot`, then reboot.
    Rollback,
    /// After a verified one-time boot of a `Boot` grant: make the booted system the boot
    /// default (profile + `switch-to-configuration boot`), no reboot.
    Bless,
}

/// The controller's grant to activate. The agent acts on each `id` at most once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivationGrant {
    /// Unique per grant; the agent records the id it executed.
    pub id: String,
    pub action: ActivationAction,
    /// The staged store path to activate (for `Rollback`: the path being rolled back from).
    pub system: String,
    pub granted_at: Time,
    /// The boot id the node had when the grant was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id_before: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedTarget {
    /// The revision that failed.
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The store path of the system that failed, when it was staged.
    pub system: Option<String>,
    /// Condition reason (`StageFailed`, `DrainTimeout`, `ActivationFailed`, `BootedWrongSystem`, …).
    pub reason: String,
    /// What failed, for humans.
    pub message: String,
    pub at: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// How many drains of the current target ended in `Abort`.
    pub attempts: u32,
    /// The next drain starts no earlier than this.
    pub not_before: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The revision applied.
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The store path of the system applied.
    pub system: Option<String>,
    /// `Succeeded`, `Failed` or `RolledBack`.
    pub result: String,
    pub started_at: Time,
    pub finished_at: Time,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    /// Whether the node rebooted for it.
    pub rebooted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// What happened, for humans.
    pub message: Option<String>,
}

/// The host's real state, reported by the agent. Written only by `nixroll-agent`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// `/proc/sys/kernel/random/boot_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// `readlink -f /run/booted-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_system: Option<String>,
    /// `readlink -f /run/current-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_system: Option<String>,
    /// `readlink -f /nix/var/nix/profiles/system`: the system the next boot starts by default
    /// (nixroll keeps the bootloader's default entry and the profile in step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_system: Option<String>,
    /// Generation number the system profile points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_generation: Option<i64>,
    /// `nixos-version` of the current system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos_version: Option<String>,
    /// `configurationRevision` of the current system, when the flake sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_revision: Option<String>,
    /// The host's Nix system (`x86_64-linux`, `aarch64-linux`): which builder builds for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_system: Option<String>,
    /// On a builder: the builds it was asked for and where each is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<BuildReport>,
    /// Where this builder serves its binary cache (`http://ADDRESS:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// The staged (realised, GC-rooted, not activated) target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedSystem>,
    /// Outcome of the last activation grant the agent executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationReport>,
    /// The last host error (trimmed; never contains secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<HostError>,
    /// Secret files written on the host (never their content, nor a hash of it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub secrets: Vec<SecretFileStatus>,
    /// Secret files of `spec.secrets` that could not be written (Secret or key missing, too
    /// large, unknown owner). While this is not empty the controller activates nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub secrets_missing: Vec<MissingSecret>,
}

/// A secret file the agent wrote.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretFileStatus {
    /// The absolute path of the file on the host.
    pub path: String,
    #[schemars(schema_with = "reported_secret_ref")]
    pub secret_ref: SecretKeyRef,
    /// `metadata.resourceVersion` of the Secret the content was last written from.
    pub resource_version: String,
    pub written_at: Time,
}

/// A secret file that is not on the host as `spec.secrets` asks, and why (names only).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MissingSecret {
    /// The absolute path of the file on the host.
    pub path: String,
    #[schemars(schema_with = "reported_secret_ref")]
    pub secret_ref: SecretKeyRef,
    /// `SecretNotFound`, `KeyNotFound`, `TooLarge`, `UnknownOwner`, `InvalidMode`, `NotRead`,
    /// `ReadFailed`, `WriteFailed`.
    pub reason: String,
    /// What is missing or wrong, by name (never the content).
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StagedSystem {
    /// The revision staged.
    pub revision: String,
    /// The installable that was realised.
    pub installable: String,
    /// The store path of the staged system (pinned by a GC root).
    pub system: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The size of the staged closure in bytes, when known.
    pub closure_bytes: Option<u64>,
    /// Whether activating the staged system needs a reboot (see `rebootReasons`).
    pub reboot_required: bool,
    /// Why a reboot is needed: `kernel`, `initrd`, `kernel-modules`, `kernel-params`,
    /// `firmware`, `init-interface-version`, `reboot-triggers`, `switch-inhibitors` (NixOS
    /// would refuse a live switch), `systemd` (only when the agent is told to count it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reboot_reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ActivationState {
    /// `switch-to-configuration` is running.
    Running,
    /// Activated live (`Switch`), nothing more to do.
    Switched,
    /// `boot` done and reboot issued; waiting for a new boot id.
    RebootRequested,
    /// Booted after the reboot.
    Rebooted,
    /// `switch` exited 100: the new system needs a reboot to activate.
    NeedsReboot,
    /// Activation failed; see `message`.
    Failed,
    /// `Bless` done: the booted system is the boot default.
    Blessed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivationReport {
    /// The grant id this report answers.
    pub id: String,
    /// The action of the grant.
    pub action: ActivationAction,
    /// Where the activation is.
    pub state: ActivationState,
    /// The store path being activated.
    pub system: String,
    /// Boot id recorded before the reboot was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The exit code of `switch-to-configuration`, once it ended.
    pub exit_code: Option<i32>,
    /// The system was activated (and the bootloader updated), but some units failed to start
    /// (`switch-to-configuration` exit code 4); `message` names them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub units_failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// What happened, for humans (failed units, errors).
    pub message: Option<String>,
    /// The boot entry set to boot once (`Boot` grants): the new system was installed without
    /// becoming the default, so a failed boot returns to the old one; a `Bless` grant follows
    /// its verification. Absent: the bootloader could not boot once (the new system was made
    /// the default before the reboot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_once: Option<String>,
    pub updated_at: Time,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum HostOperation {
    Stage,
    Activate,
    Report,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostError {
    /// The host operation that failed.
    pub operation: HostOperation,
    /// The revision the failed operation was about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// What failed (trimmed; never contains secrets).
    pub message: String,
    pub at: Time,
}
