//! The `NixOSNode` API (`nixroll.io/v1alpha1`): what the user asks for (`spec`), what the
//! controller decided (`status` minus `status.agent`) and what the host really runs
//! (`status.agent`). One writer per field: see DESIGN.md §3 and `crate::names`.

mod crd;
mod pool;
mod source;
mod status;

pub use crd::{
    all_crds_yaml, crd, crd_yaml, flakesource_crd, flakesource_crd_yaml, nixospool_crd, nixospool_crd_yaml,
};
pub use pool::{
    CelGate, HealthGates, NixOSPool, NixOSPoolSpec, NixOSPoolStatus, PoolSelector, PoolSelectorRequirement,
    PrometheusGate, SelectorOperator, pool_condition,
};
pub use source::{
    FlakeSource, FlakeSourceRef, FlakeSourceSpec, FlakeSourceStatus, FlakeSourceVerify, LocalSecretRef,
    SourceKind, SourceRef, VerifyMode, condition as source_condition,
};
pub use status::*;

use kube::CustomResource;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Desired NixOS system of one Kubernetes Node. The object is cluster-scoped and named exactly
/// like its Node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nixroll.io",
    version = "v1alpha1",
    kind = "NixOSNode",
    plural = "nixosnodes",
    shortname = "nxn",
    status = "NixOSNodeStatus",
    doc = "The NixOS system one Kubernetes Node should run: a flake and a revision (or a source to follow), rolled out by nixroll one node at a time with cordon, drain, switch and reboot. Cluster-scoped, named exactly like its Node.",
    printcolumn = r#"{"name":"Wanted","type":"string","jsonPath":".status.wanted","description":"The revision wanted (spec.revision or the followed source's), shortened."}"#,
    printcolumn = r#"{"name":"Running","type":"string","jsonPath":".status.running","description":"The revision the node is proven to run, shortened."}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Build","type":"string","jsonPath":".status.target.build.progress","description":"With a builder: Queued, Building, Built, Fetching, Staged or Failed."}"#,
    printcolumn = r#"{"name":"Reboot","type":"string","jsonPath":".status.agent.staged.rebootRequired","priority":1,"description":"Whether the staged system needs a reboot."}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.revision) != has(self.sourceRef)").message("set exactly one of revision (a fixed commit) and sourceRef (follow a FlakeSource or GitRepository)"),
    validation = Rule::new("has(self.flake) || (has(self.sourceRef) && self.sourceRef.kind == 'FlakeSource')").message("flake is required unless sourceRef names a FlakeSource (whose URL gives the flake)")
)]
pub struct NixOSNodeSpec {
    /// Flake reference without a revision: `git+https://…`, `git+ssh://…`, `git+file://…`,
    /// `github:owner/repo`, `path:/…`. May be omitted with a `FlakeSource` in `sourceRef`: the
    /// flake is then `git+<url>?ref=<full ref>` (docs/source.md).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new("self.matches('^(git\\\\+(https|ssh|http|file)://[^?#]+|github:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|gitlab:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|path:/[^?#]*)$')").message("flake must be a flake reference without revision or fragment, e.g. git+https://git.example.org/infra.git or github:owner/repo; put the commit in spec.revision and the host in spec.configuration"))]
    #[schemars(length(min = 1, max = 1024))]
    pub flake: String,

    /// Full 40-hex git commit to run. Exactly one of `revision` and `sourceRef` is set; empty
    /// (omitted) when the node follows `sourceRef`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{40}$')").message("revision must be a full 40-character lowercase hex git commit (git rev-parse HEAD), not a branch, tag or short hash"))]
    #[schemars(length(min = 40, max = 40))]
    pub revision: String,

    /// Follow a source instead of a fixed `revision`: a `FlakeSource` (resolved by nixroll) or
    /// a Flux `GitRepository`. The node's target is the source's accepted revision, pinned for
    /// a rollout in flight (docs/source.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<SourceRef>,

    /// Attribute under `nixosConfigurations`; defaults to the object (node) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]*$')").message("configuration must be a plain attribute name under nixosConfigurations"))]
    #[schemars(length(min = 1, max = 253))]
    pub configuration: Option<String>,

    /// Weekly windows in which disruptive steps may start. None means any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub maintenance_windows: Vec<MaintenanceWindow>,

    /// When to reboot after switching.
    #[serde(default)]
    pub reboot: RebootPolicy,

    /// How to drain the node before activating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainPolicy>,

    /// Stop any new disruptive step on this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// Files the agent writes on the host from Secrets in `nixroll-system` (never in git, the
    /// Nix store, logs, status or Events). Written before any activation and again whenever
    /// the Secret's data changes; a missing Secret or key blocks the next activation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Each path may appear once (the list is keyed by `path`).
    // Uniqueness through the list type, not CEL: the server refuses a duplicate as `Duplicate
    // value` at no CEL cost, where a rule comparing every pair cost about a sixth of the
    // per-rule budget at 64 entries (tests/real_api/crds.rs measures the margin).
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["path"]))]
    pub secrets: Vec<SecretFile>,
}

impl NixOSNodeSpec {
    /// What is wrong with this spec by the rules the CRD states (its CEL rules and patterns),
    /// said as what to fix; `None` when it is valid. The controller checks them itself because
    /// an API server that does not evaluate CEL (the embedded one, an old one) lets bad specs
    /// in.
    pub fn problem(&self) -> Option<String> {
        let follows_flake_source = self
            .source_ref
            .as_ref()
            .is_some_and(|s| s.kind == SourceKind::FlakeSource);
        match (self.revision.is_empty(), self.source_ref.is_some()) {
            (false, true) => {
                return Some(
                    "set exactly one of spec.revision (a fixed commit) and spec.sourceRef (follow a FlakeSource or GitRepository), not both".into(),
                );
            }
            (true, false) => {
                return Some(
                    "set spec.revision (a full 40-character git commit) or spec.sourceRef (follow a FlakeSource or GitRepository)".into(),
                );
            }
            _ => {}
        }
        let full_hex = self.revision.len() == 40
            && self
                .revision
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !self.revision.is_empty() && !full_hex {
            return Some(format!(
                "spec.revision {:?} must be a full 40-character lowercase hex git commit (git rev-parse HEAD), not a branch, tag or short hash",
                self.revision
            ));
        }
        if self.flake.is_empty() && !follows_flake_source {
            return Some(
                "spec.flake is required unless spec.sourceRef names a FlakeSource (whose URL gives the flake)".into(),
            );
        }
        if !self.flake.is_empty() && !flake_reference_shape(&self.flake) {
            return Some(format!(
                "spec.flake {:?} must be a flake reference without revision or fragment, e.g. git+https://git.example.org/infra.git or github:owner/repo",
                self.flake
            ));
        }
        if let Some(c) = &self.configuration {
            let mut chars = c.chars();
            let first_ok = chars
                .next()
                .is_some_and(|f| f.is_ascii_alphanumeric() || f == '_');
            if !first_ok || !chars.all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch)) {
                return Some(format!(
                    "spec.configuration {c:?} must be a plain attribute name under nixosConfigurations"
                ));
            }
        }
        None
    }

    /// The `nixosConfigurations` attribute to build for the node `node_name`.
    pub fn configuration_for<'a>(&'a self, node_name: &'a str) -> &'a str {
        self.configuration.as_deref().unwrap_or(node_name)
    }
}

/// The shape the CRD's pattern on `spec.flake` allows: `git+{https,ssh,http,file}://…`,
/// `github:owner/repo`, `gitlab:owner/repo` or `path:/…`, without `?` or `#`.
fn flake_reference_shape(flake: &str) -> bool {
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    let no_query = !flake.contains(['?', '#']);
    if let Some(rest) = flake.strip_prefix("git+") {
        return no_query
            && ["https://", "ssh://", "http://", "file://"]
                .iter()
                .any(|p| rest.strip_prefix(p).is_some_and(|r| !r.is_empty()));
    }
    for forge in ["github:", "gitlab:"] {
        if let Some(rest) = flake.strip_prefix(forge) {
            return rest
                .split_once('/')
                .is_some_and(|(owner, repo)| plain(owner) && plain(repo));
        }
    }
    no_query && flake.starts_with("path:/")
}

/// Namespace of the Secrets that `spec.secrets` names.
pub const SECRETS_NAMESPACE: &str = crate::names::NAMESPACE;
/// Largest secret value the agent writes (bytes).
pub const SECRET_MAX_BYTES: usize = 1024 * 1024;

/// One file on the host, from one key of one Secret in `nixroll-system`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretFile {
    /// The Secret (in `nixroll-system`) and the key whose value is the file's content.
    pub secret_ref: SecretKeyRef,
    /// Absolute path on the host, outside `/nix`, without `..`.
    #[x_kube(
        validation = Rule::new("self.startsWith('/')").message("path must be absolute, e.g. /var/lib/secrets/k3s-token"),
        validation = Rule::new("!self.matches('(^|/)[.][.]?(/|$)')").message("path must not contain `..` or `.` segments"),
        validation = Rule::new("!self.matches('^/+nix(/|$)')").message("path must be outside /nix: the Nix store is world-readable"),
        validation = Rule::new("!self.endsWith('/') && !self.matches('//')").message("path must name a file: no trailing or doubled `/`")
    )]
    #[schemars(length(min = 2, max = 1024))]
    pub path: String,
    /// File mode as octal digits. Default `0400`.
    #[serde(default = "default_secret_mode")]
    #[x_kube(validation = Rule::new("self.matches('^0?[0-7]{3}$')").message("mode must be octal permission digits such as 0400 or 0640"))]
    #[schemars(length(max = 4))]
    pub mode: String,
    /// `USER:GROUP`, names (resolved with the host's /etc/passwd and /etc/group) or numeric
    /// ids. Default `root:root`.
    #[serde(default = "default_secret_owner")]
    #[x_kube(validation = Rule::new("self.matches('^([a-z_][a-z0-9_.-]*[$]?|[0-9]+):([a-z_][a-z0-9_.-]*[$]?|[0-9]+)$')").message("owner must be USER:GROUP with names or numeric ids, e.g. root:root or 0:0"))]
    #[schemars(length(max = 130))]
    pub owner: String,
    /// systemd units to `systemctl try-restart` after this file changed (only then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(u, u.matches('^[A-Za-z0-9_@:][A-Za-z0-9_.@:-]*$'))").message("restartUnits must be systemd unit names such as k3s.service"))]
    #[schemars(length(max = 16), inner(length(min = 1, max = 256)))]
    pub restart_units: Vec<String>,
}

/// A key of a Secret in `nixroll-system`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (in `nixroll-system`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("secretRef.name must be a Secret name (lowercase DNS subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("secretRef.key must be a Secret data key ([-._a-zA-Z0-9]+)"))]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

impl std::fmt::Display for SecretKeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.name, self.key)
    }
}

fn default_secret_mode() -> String {
    "0400".to_string()
}

fn default_secret_owner() -> String {
    "root:root".to_string()
}

/// A weekly maintenance window. `end` earlier than `start` means the window crosses midnight
/// and ends on the following day.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.start != self.end").message("a maintenance window needs start != end; omit maintenanceWindows to allow any time"))]
pub struct MaintenanceWindow {
    /// Days on which the window opens (in `timeZone`). Empty means every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// Local opening time `HH:MM` (24 h).
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')").message("start must be HH:MM in 24-hour time, e.g. 02:00"))]
    #[schemars(length(max = 5))]
    pub start: String,
    /// Local closing time `HH:MM` (24 h); earlier than `start` means the next day.
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')").message("end must be HH:MM in 24-hour time, e.g. 05:30"))]
    #[schemars(length(max = 5))]
    pub end: String,
    /// IANA time zone, e.g. `Europe/Berlin`. Defaults to `UTC`.
    #[serde(default = "default_time_zone")]
    #[x_kube(validation = Rule::new("self.matches('^(UTC|[A-Za-z_]+(/[A-Za-z0-9_+-]+){1,2})$')").message("timeZone must be an IANA zone name such as Europe/Berlin or UTC"))]
    #[schemars(length(max = 64))]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub fn to_jiff(self) -> jiff::civil::Weekday {
        use jiff::civil::Weekday as W;
        match self {
            Weekday::Mon => W::Monday,
            Weekday::Tue => W::Tuesday,
            Weekday::Wed => W::Wednesday,
            Weekday::Thu => W::Thursday,
            Weekday::Fri => W::Friday,
            Weekday::Sat => W::Saturday,
            Weekday::Sun => W::Sunday,
        }
    }
}

/// When to reboot after switching to the new generation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum RebootPolicy {
    /// Reboot when the staged system differs from the booted one in kernel, initrd, modules,
    /// kernel parameters, systemd, firmware or init interface; otherwise `switch` live.
    #[default]
    IfNeeded,
    /// Always `switch-to-configuration boot` and reboot.
    Always,
    /// Always `switch` live; if a reboot is needed, report it and wait for a human.
    Never,
}

/// What to do when the drain timeout expires.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum DrainTimeoutAction {
    /// Uncordon (if nixroll cordoned), free the slot, back off and try again later.
    #[default]
    Abort,
    /// Delete the remaining pods without the Eviction API (ignores PodDisruptionBudgets).
    Force,
}

/// How the node is drained before a disruptive activation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DrainPolicy {
    /// How long evictions may take, as a duration such as `10m` or `1h30m`. Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("timeout must be a duration such as 90s, 15m or 1h30m"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
    /// What to do when `timeout` expires. Default `Abort`.
    #[serde(default)]
    pub on_timeout: DrainTimeoutAction,
    /// Grace period given to evicted pods; default: each pod's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub grace_period_seconds: Option<i64>,
    /// Evict pods that use emptyDir volumes (their data is lost). Default false: such pods
    /// block the drain.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_empty_dir_data: bool,
    /// Delete pods that no controller manages (they are not recreated). Default false: such
    /// pods block the drain.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_unmanaged_pods: bool,
}

/// Rollout phase of one node (DESIGN.md §5). Names are fixed; more may be added.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
pub enum Phase {
    /// Runs `spec.revision`; nothing to do.
    #[default]
    UpToDate,
    /// The agent is realising the target closure.
    Staging,
    /// Staged; waiting for a slot, a window, or a resume.
    Waiting,
    /// Cordoned, evicting pods.
    Draining,
    /// Profile set, `switch-to-configuration` running.
    Activating,
    /// Reboot requested; waiting for a new boot id.
    Rebooting,
    /// Node back; checking booted system, Ready, health gates.
    Verifying,
    /// Failed; the reason is in the conditions; holds the rollout.
    Degraded,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::UpToDate,
        Phase::Staging,
        Phase::Waiting,
        Phase::Draining,
        Phase::Activating,
        Phase::Rebooting,
        Phase::Verifying,
        Phase::Degraded,
    ];

    /// Whether the node is in a disruptive phase (holds a slot).
    pub fn is_disruptive(self) -> bool {
        matches!(
            self,
            Phase::Draining | Phase::Activating | Phase::Rebooting | Phase::Verifying
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::UpToDate => "UpToDate",
            Phase::Staging => "Staging",
            Phase::Waiting => "Waiting",
            Phase::Draining => "Draining",
            Phase::Activating => "Activating",
            Phase::Rebooting => "Rebooting",
            Phase::Verifying => "Verifying",
            Phase::Degraded => "Degraded",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `<flake>?rev=<revision>#nixosConfigurations.<configuration>.config.system.build.toplevel`,
/// using `/<rev>` for `github:`/`gitlab:` references (their syntax has no `?rev=`).
pub fn installable(flake: &str, revision: &str, configuration: &str) -> String {
    let attr = format!("nixosConfigurations.\"{configuration}\".config.system.build.toplevel");
    let attr = if configuration.contains('.') {
        attr
    } else {
        attr.replace('"', "")
    };
    if flake.starts_with("github:") || flake.starts_with("gitlab:") {
        format!("{}/{revision}#{attr}", flake.trim_end_matches('/'))
    } else if flake.contains('?') {
        // A flake derived from a FlakeSource carries `?ref=…` already.
        format!("{flake}&rev={revision}#{attr}")
    } else {
        format!("{flake}?rev={revision}#{attr}")
    }
}

/// The first 8 characters of a revision, for tables.
pub fn short_revision(revision: &str) -> String {
    revision.chars().take(8).collect()
}

/// A store path as people tell systems apart: the first 8 characters of its hash and its name
/// (`/nix/store/3k2j…-nixos-system-node-1-25.05` → `3k2jf0a1-nixos-system-node-1-25.05`),
/// without the store directory, which says nothing and eats a table's width.
pub fn short_system(path: &str) -> String {
    let base = path.trim_end_matches('/').rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => format!("{}-{name}", &hash[..8]),
        _ => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_finds_what_the_crd_rules_refuse() {
        use crate::sim::fixtures::{following_spec, spec};
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let flake = "git+https://git.example.org/infra.git";
        assert_eq!(spec(flake, rev).problem(), None);
        assert_eq!(following_spec(flake, "infra").problem(), None);
        assert_eq!(
            following_spec("", "infra").problem(),
            None,
            "a FlakeSource gives the flake"
        );
        for f in [
            "github:me/infra",
            "path:/srv/flake",
            "git+ssh://git@h/r.git",
            "git+file:///r",
        ] {
            assert_eq!(spec(f, rev).problem(), None, "{f}");
        }
        let mut both = spec(flake, rev);
        both.source_ref = following_spec(flake, "infra").source_ref;
        let mut neither = spec(flake, rev);
        neither.revision.clear();
        let mut gitrepo_without_flake = following_spec("", "infra");
        if let Some(s) = gitrepo_without_flake.source_ref.as_mut() {
            s.kind = SourceKind::GitRepository;
        }
        let mut bad_configuration = spec(flake, rev);
        bad_configuration.configuration = Some("a b".into());
        let cases = [
            (both, "exactly one of spec.revision"),
            (neither, "set spec.revision"),
            (spec(flake, "main"), "40-character"),
            (spec(flake, &rev.to_uppercase()), "40-character"),
            (spec("", rev), "spec.flake is required"),
            (gitrepo_without_flake, "spec.flake is required"),
            (spec("git+https://h/r?rev=abc", rev), "without revision"),
            (spec("https://h/r", rev), "flake reference"),
            (spec("github:me", rev), "flake reference"),
            (bad_configuration, "attribute name"),
        ];
        for (s, want) in cases {
            let problem = s.problem();
            assert!(
                problem.as_deref().is_some_and(|p| p.contains(want)),
                "{want}: {problem:?} for {s:?}"
            );
        }
    }

    #[test]
    fn short_system_keeps_hash_prefix_and_name() {
        assert_eq!(
            short_system("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-node-1-25.05"),
            "01234567-nixos-system-node-1-25.05"
        );
        assert_eq!(
            short_system("/tmp/x/hosts/node-1/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-n1/"),
            "01234567-nixos-system-n1"
        );
        assert_eq!(short_system("/nix/store/short-name"), "short-name");
    }

    #[test]
    fn installable_uses_query_for_git_and_path_for_github() {
        assert_eq!(
            installable("git+https://example.org/infra.git", "ab", "node-1"),
            "git+https://example.org/infra.git?rev=ab#nixosConfigurations.node-1.config.system.build.toplevel"
        );
        assert_eq!(
            installable("github:me/infra", "ab", "n1"),
            "github:me/infra/ab#nixosConfigurations.n1.config.system.build.toplevel"
        );
        assert_eq!(
            installable("git+file:///r?ref=refs/heads/main", "ab", "n1"),
            "git+file:///r?ref=refs/heads/main&rev=ab#nixosConfigurations.n1.config.system.build.toplevel"
        );
        assert_eq!(
            installable("path:/x", "ab", "a.b"),
            "path:/x?rev=ab#nixosConfigurations.\"a.b\".config.system.build.toplevel"
        );
    }

    #[test]
    fn empty_status_serialises_to_empty_object() {
        let s = serde_json::to_value(NixOSNodeStatus::default()).unwrap();
        assert_eq!(s, serde_json::json!({}));
        let a = serde_json::to_value(AgentStatus::default()).unwrap();
        assert_eq!(a, serde_json::json!({}));
    }
}
