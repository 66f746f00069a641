//! The `FlakeSource` kind (`nixroll.io/v1alpha1`, namespaced) and `NixOSNode.spec.sourceRef`:
//! follow a branch, tag, semver range or full ref of a flake's git repository instead of
//! pinning `spec.revision` by hand. See docs/source.md.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A git repository and the ref nixroll follows in it. The controller resolves the ref to a
/// commit (one resolution per source, however many nodes use it) every `interval`, and
/// NixOSNodes with `spec.sourceRef` roll that commit out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nixroll.io",
    version = "v1alpha1",
    kind = "FlakeSource",
    plural = "flakesources",
    namespaced,
    status = "FlakeSourceStatus",
    doc = "A git repository and a branch, tag, semver range or ref in it that NixOSNodes follow through spec.sourceRef. nixroll resolves it to a commit and only ever moves forward (docs/source.md).",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Ref","type":"string","jsonPath":".status.ref","description":"The ref followed, e.g. branch main."}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.revision","description":"The accepted revision, main@sha1:<commit>."}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.insecure) && self.insecure) || self.url.startsWith('https://') || self.url.startsWith('ssh://')").message("url must be https:// or ssh://; http://, git:// and file:// need insecure: true"))]
#[x_kube(validation = Rule::new("!has(self.verify) || !has(self.verify.mode) || self.verify.mode == 'HEAD' || has(self.ref.tag) || has(self.ref.semver) || (has(self.ref.name) && self.ref.name.startsWith('refs/tags/'))").message("verify.mode Tag and TagAndHEAD need a tag to verify: set ref.tag, ref.semver or a ref.name under refs/tags/"))]
pub struct FlakeSourceSpec {
    /// `https://host/path` or `ssh://[user@]host[:port]/path` (no scp-like `git@host:path`);
    /// `http://`, `git://` and `file://` only with `insecure: true`. No credentials: they go in
    /// the Secret named by `secretRef`.
    #[x_kube(
        validation = Rule::new("self.matches('^(https|ssh|http|git|file)://[^?#[:space:]]+$')").message("url must be https://host/path or ssh://user@host/path, without a query or fragment"),
        validation = Rule::new("!self.matches('^[a-z]+://[^/@]*:[^/@]*@')").message("url must not carry a password or token: put it in the Secret named by secretRef (username/password)"),
        validation = Rule::new("self.startsWith('ssh://') || !self.matches('^[a-z]+://[^/]*@')").message("url must not carry a user or token (only ssh:// may name a user): put credentials in the Secret named by secretRef")
    )]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,

    /// The ref to follow: exactly one of `branch`, `tag`, `semver` or `name`.
    #[serde(rename = "ref")]
    pub git_ref: FlakeSourceRef,

    /// How often the remote is asked for the ref's head, e.g. `5m` (default), at least `30s`.
    /// Each wait gets up to 10% random jitter.
    #[serde(default = "default_interval")]
    #[x_kube(
        validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("interval must be a duration such as 30s, 5m or 1h"),
        validation = Rule::new("!self.matches('^([0-9]+(ms|s|m|h))+$') || duration(self) >= duration('30s')").message("interval must be at least 30s")
    )]
    #[schemars(length(max = 32))]
    pub interval: String,

    /// Bound of each remote operation (list the refs, fetch for the ancestry check). Default `60s`.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("timeout must be a duration such as 20s or 1m"))]
    #[schemars(length(max = 32))]
    pub timeout: String,

    /// Stop resolving: the last revision stays, nothing new starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// A Secret in the FlakeSource's namespace, with Flux's key names: `username` and `password`
    /// (a token goes in `password`) for HTTPS; `identity` (a private key), optional `password`
    /// (its passphrase) and `known_hosts` for SSH. Read with `get` by the controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalSecretRef>,

    /// Allow `http://`, `git://` and `file://` URLs (no transport authentication).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,

    /// Follow a head that does not descend from the last accepted revision (a force push, a
    /// reset, a rewritten branch). Default false: such a head is refused with the
    /// `NonFastForward` condition and the last revision stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_fast_forward: bool,

    /// Follow only signed revisions (like Flux's `GitRepository.spec.verify`): a head whose
    /// signature does not verify against the trusted keys is not followed, the last revision
    /// stays and `Ready=False` says why (reason `VerificationFailed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<FlakeSourceVerify>,
}

/// What must be signed, and by whom.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlakeSourceVerify {
    /// `HEAD` (default): the commit the ref points at; `Tag`: the annotated tag object;
    /// `TagAndHEAD`: both.
    #[serde(default)]
    pub mode: VerifyMode,
    /// A Secret in the FlakeSource's namespace holding the trusted keys: values with armored
    /// OpenPGP public keys (`-----BEGIN PGP PUBLIC KEY BLOCK-----`), values with SSH
    /// allowed-signers lines (git's `gpg.format=ssh`, e.g. key `allowed_signers`), and an
    /// optional `revoked_signers` of SSH public keys that are refused.
    pub secret_ref: LocalSecretRef,
}

/// Flux's verification modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum VerifyMode {
    #[default]
    #[serde(rename = "HEAD")]
    Head,
    Tag,
    #[serde(rename = "TagAndHEAD")]
    TagAndHead,
}

impl VerifyMode {
    /// Whether the commit must be signed.
    pub fn head(self) -> bool {
        matches!(self, VerifyMode::Head | VerifyMode::TagAndHead)
    }
    /// Whether the tag object must be signed.
    pub fn tag(self) -> bool {
        matches!(self, VerifyMode::Tag | VerifyMode::TagAndHead)
    }
}

fn default_interval() -> String {
    "5m".to_owned()
}

fn default_timeout() -> String {
    "60s".to_owned()
}

/// Exactly one of the four.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.branch) ? 1 : 0) + (has(self.tag) ? 1 : 0) + (has(self.semver) ? 1 : 0) + (has(self.name) ? 1 : 0) == 1").message("ref must set exactly one of branch, tag, semver and name"))]
pub struct FlakeSourceRef {
    /// A branch, e.g. `main` (exactly `refs/heads/main`, never `main-old`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub branch: Option<String>,
    /// A tag, e.g. `v1.2.0` (an annotated tag is peeled to its commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub tag: Option<String>,
    /// A semver range over the tags, e.g. `>=1.0, <2` (the highest matching tag wins; a
    /// leading `v` on tags is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub semver: Option<String>,
    /// A full ref name, e.g. `refs/pull/420/head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('refs/')").message("ref.name must be a full ref starting with refs/ (use branch or tag for short names)"))]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
}

impl FlakeSourceRef {
    /// `branch main`, `tag v1`, `semver >=1`, `name refs/pull/1/head` (status and printer column).
    pub fn display(&self) -> String {
        match (&self.branch, &self.tag, &self.semver, &self.name) {
            (Some(b), None, None, None) => format!("branch {b}"),
            (None, Some(t), None, None) => format!("tag {t}"),
            (None, None, Some(s), None) => format!("semver {s}"),
            (None, None, None, Some(n)) => format!("name {n}"),
            _ => "(invalid: set exactly one of branch, tag, semver, name)".to_owned(),
        }
    }
}

/// A Secret in the same namespace as the object naming it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("secretRef.name must be a Secret name (lowercase DNS subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    /// The name of the Secret.
    pub name: String,
}

/// Written by `nixroll-controller` only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlakeSourceStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The URL `revision` was resolved from (never with credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The ref `revision` belongs to, as `branch main`, `tag v1`, `semver >=1` or `name refs/…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The full ref that matched, e.g. `refs/heads/main` or `refs/tags/v1.2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_ref: Option<String>,
    /// The accepted revision, Flux-style: `main@sha1:<commit>`. It only moves forward (unless
    /// `allowNonFastForward`), and a failed fetch keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The accepted commit alone (40 hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// A head that was refused because it does not descend from `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_revision: Option<String>,
    /// The `nixroll.io/requested-at` annotation's value the last resolution ran for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_requested_at: Option<String>,
    /// When the remote was last asked (successfully or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch_time: Option<Time>,
    /// `Ready`, `FetchFailed`, `NonFastForward`, `SourceVerified`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// What a NixOSNode follows instead of a fixed `spec.revision`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// `FlakeSource` (resolved by nixroll) or `GitRepository` (Flux's, source.toolkit.fluxcd.io/v1).
    pub kind: SourceKind,
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("sourceRef.name must be an object name (lowercase DNS subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    /// The name of the FlakeSource or GitRepository.
    pub name: String,
    /// Namespace of the source. Default `nixroll-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("sourceRef.namespace must be a namespace name"))]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

impl SourceRef {
    /// The namespace, defaulted.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(crate::names::NAMESPACE)
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace(), self.name)
    }
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema,
)]
pub enum SourceKind {
    FlakeSource,
    GitRepository,
}

/// Condition types of a FlakeSource.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const FETCH_FAILED: &str = "FetchFailed";
    pub const NON_FAST_FORWARD: &str = "NonFastForward";
    /// Set when `spec.verify` is: `True` with the signer, or `False` (reason
    /// `VerificationFailed`) naming the commit and why.
    pub const SOURCE_VERIFIED: &str = "SourceVerified";
}
