//! The `NixOSPool` kind (`nixroll.io/v1alpha1`, cluster-scoped, short name `nxp`): a group of
//! NixOSNodes, chosen by their labels, with its own disruption budget, a pause switch and an
//! order after other pools (canaries first). See docs/pools.md.
//!
//! A NixOSNode no pool selects belongs to the implicit default pool, whose budget is the
//! controller's `--max-unavailable`: a cluster without pools rolls exactly as before.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A group of NixOSNodes rolled within its own budget, optionally after other pools.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nixroll.io",
    version = "v1alpha1",
    kind = "NixOSPool",
    plural = "nixospools",
    shortname = "nxp",
    status = "NixOSPoolStatus",
    doc = "A group of NixOSNodes (chosen by their labels) with its own disruption budget and pause switch, which nixroll rolls after the pools it names in after once they run the revision, are healthy and have soaked. Cluster-scoped; a NixOSNode no pool selects is in the implicit default pool (docs/pools.md).",
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodes"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updated","description":"Nodes that run the revision they want and are UpToDate."}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Unavailable","type":"integer","jsonPath":".status.unavailable","description":"Nodes counted against the pool's maxUnavailable."}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.degraded"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.revision","description":"The revisions the pool's nodes run, shortened."}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NixOSPoolSpec {
    /// Which NixOSNodes belong to this pool, by the NixOSNode's labels (matchLabels and
    /// matchExpressions, as everywhere in Kubernetes; an empty selector selects every
    /// NixOSNode). A NixOSNode selected by two pools is admitted by neither, and both pools
    /// say so in their `Conflict` condition.
    pub selector: PoolSelector,

    /// How many of the pool's nodes may be unavailable at once: a count (at least 1) or a
    /// percentage of the pool's nodes such as `25%` (rounded down, at least 1). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 1 : self.matches('^[1-9][0-9]?%$|^100%$')").message("maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%, e.g. 25%"))]
    pub max_unavailable: Option<IntOrString>,

    /// Admit no new node of this pool (nodes already admitted finish).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,

    /// Pools this one comes after: a node of this pool takes a revision only once every node of
    /// each named pool runs that revision, is Ready, schedulable and not Degraded, and the last
    /// of them finished at least `soak` ago.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'))").message("after must list NixOSPool names (lowercase DNS subdomains)"))]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "set", "items" = {"type": "string", "maxLength": 253}))]
    pub after: Vec<String>,

    /// How long the pools in `after` must have run the revision before this pool takes it,
    /// e.g. `24h` or `30m`. Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("soak must be a duration such as 30m, 24h or 1h30m"))]
    #[schemars(length(max = 32))]
    pub soak: Option<String>,

    /// How long each node of this pool that finished its update must stay Ready before the
    /// next node of the pool takes its slot (it keeps counting against `maxUnavailable` until
    /// then), e.g. `5m`. Default: the controller's `--node-soak` (`0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("nodeSoak must be a duration such as 30s, 5m or 1h"))]
    #[schemars(length(max = 32))]
    pub node_soak: Option<String>,

    /// Health gates checked before a node of this pool is admitted (pre-gates: while one fails,
    /// or has not been evaluated yet since the controller started, the pool admits nothing and
    /// says which gate and why) and again after each node's update (post-gates: the node stays
    /// cordoned and holds its slot until each has passed in an evaluation made after the node
    /// was verified; one that does not within its `postTimeout` makes the node Degraded,
    /// `GateFailed`, which halts the pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_gates: Option<HealthGates>,
}

/// The health gates of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthGates {
    /// CEL expressions over Kubernetes objects, each of which must be true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub cel: Vec<CelGate>,
    /// Prometheus alert checks: no firing (or pending) alert may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub prometheus: Vec<PrometheusGate>,
}

/// No alert of a Prometheus server (its `/api/v1/alerts`) that matches may be firing. An alert
/// matches when its name is in `alertNames` (or that list is empty), not in
/// `ignoreAlertNames`, and it carries every label of `matchLabels`. An unreachable Prometheus
/// blocks unless `failOpen`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusGate {
    /// The gate's name, as conditions and metrics show it.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("a gate name must be lowercase letters, digits and dashes"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The Prometheus (or Alertmanager-compatible Thanos/Mimir ruler) base URL, e.g.
    /// `http://prometheus-operated.monitoring:9090`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^?#[:space:]]+$')").message("url must be an http:// or https:// URL without a query"))]
    #[schemars(length(min = 1, max = 1024))]
    pub url: String,
    /// Only these alert names count (empty: every alert).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 253}))]
    pub alert_names: Vec<String>,
    /// These alert names never count (e.g. `Watchdog`, `InfoInhibitor`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 253}))]
    pub ignore_alert_names: Vec<String>,
    /// Only alerts carrying all of these labels count, e.g. `severity: critical`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub match_labels: BTreeMap<String, String>,
    /// Pending alerts (not yet firing) do not count. Default false: they block too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_pending: bool,
    /// An unreachable Prometheus (or an answer that is not an alert list) lets the gate pass.
    /// Default false: it blocks (fail closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_open: bool,
    /// Bound of one query, e.g. `10s` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("timeout must be a duration such as 10s or 1m"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
    /// As a post-gate: how long after a node of the pool was verified (its new system runs,
    /// Ready) the gate may keep blocking before the node is Degraded (`GateFailed`), e.g.
    /// `15m`. Default: the controller's `--verifying-timeout` (10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("postTimeout must be a duration such as 10m or 1h"))]
    #[schemars(length(max = 32))]
    pub post_timeout: Option<String>,
}

/// A CEL expression over the objects of one kind: `objects` is the list of the objects
/// selected (namespace, label selector, object name), `object` the first of them (or null).
/// Example: every Longhorn volume healthy, `objects.all(v, v.status.robustness == 'healthy')`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CelGate {
    /// The gate's name, as conditions and metrics show it.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("a gate name must be lowercase letters, digits and dashes"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The objects' apiVersion, e.g. `longhorn.io/v1beta2` or `v1`.
    #[schemars(length(min = 1, max = 253))]
    pub api_version: String,
    /// The objects' kind, e.g. `Volume`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Only objects in this namespace (default: all namespaces, or none for a cluster-scoped kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Only the object of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub object_name: Option<String>,
    /// Only objects with these labels, as `kubectl get -l` takes them, e.g. `app=db,tier!=cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub label_selector: Option<String>,
    /// The CEL expression; it must evaluate to true for the gate to pass.
    #[schemars(length(min = 1, max = 1024))]
    pub expression: String,
    /// Bound of one evaluation (listing the objects and evaluating), e.g. `10s` (default).
    /// An evaluation that takes longer fails the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("timeout must be a duration such as 10s or 1m"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
    /// As a post-gate: how long after a node of the pool was verified (its new system runs,
    /// Ready) the gate may keep blocking before the node is Degraded (`GateFailed`), e.g.
    /// `15m`. Default: the controller's `--verifying-timeout` (10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("postTimeout must be a duration such as 10m or 1h"))]
    #[schemars(length(max = 32))]
    pub post_timeout: Option<String>,
}

/// A label selector over NixOSNodes (the shape of Kubernetes' `LabelSelector`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    /// Labels a NixOSNode must carry with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements a NixOSNode's labels must all meet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<PoolSelectorRequirement>,
}

/// One requirement of a pool selector: a label key, an operator and values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)").message("In and NotIn need values; Exists and DoesNotExist take none"))]
pub struct PoolSelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 63}))]
    pub values: Vec<String>,
}

/// The operator of a selector requirement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl PoolSelector {
    /// Whether a NixOSNode with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => v.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => v.is_some(),
                    SelectorOperator::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// Written by `nixroll-controller` only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NixOSPoolStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// NixOSNodes in the pool (selected by this pool alone).
    #[serde(default)]
    pub nodes: u32,
    /// Nodes that run the revision they want and are UpToDate.
    #[serde(default)]
    pub updated: u32,
    /// Nodes whose Node is Ready.
    #[serde(default)]
    pub ready: u32,
    /// Nodes counted against `maxUnavailable` (cordoned, not Ready, Degraded or being updated).
    #[serde(default)]
    pub unavailable: u32,
    /// Nodes in phase Degraded.
    #[serde(default)]
    pub degraded: u32,
    /// The budget in force: `maxUnavailable` resolved against `nodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    /// The full revisions the pool's nodes run (proven), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<String>,
    /// The same, shortened and joined with commas (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// One line for humans: what the pool waits for, or why it is halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Updated`, `Updating`, `Degraded` and `Conflict`, each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Condition types of a NixOSPool.
pub mod pool_condition {
    /// Every node runs the revision it wants.
    pub const UPDATED: &str = "Updated";
    /// A node is being updated, or waits to be (with the reason it waits).
    pub const UPDATING: &str = "Updating";
    /// A node of the pool is Degraded: the rollout is halted.
    pub const DEGRADED: &str = "Degraded";
    /// A node the pool selects is selected by another pool too: neither admits it.
    pub const CONFLICT: &str = "Conflict";
}
