//! What the controller keeps of the objects it watches (trimmed so 1,000 Nodes stay small) and
//! what it reads from them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo};
use kube::ResourceExt;

use crate::api::{NixOSNode, NixOSNodeStatus};
use crate::names::{BUILDER_LABEL, CONTROL_PLANE_LABEL, CORDON_ANNOTATION, MASTER_LABEL, RETRY_ANNOTATION};
use crate::rollout::{NodeObservation, NodeView};

/// The Node condition k3s sets on its servers with embedded etcd: `True` (reason
/// `MemberNotLearner`) for a voting member its etcd leader found healthy; `False` for a learner
/// (`MemberIsLearner`), an unhealthy member (`Unhealthy`) or a server that is not a member
/// (`NotAMember`). k3s-io/k3s `pkg/etcd/etcd.go`: `etcdStatusType`, `setEtcdStatusCondition`,
/// refreshed by `manageLearners` every 15 s (`manageTickerTime`) on the etcd leader.
pub const ETCD_VOTER_CONDITION: &str = "EtcdIsVoter";

/// Keep only what [`observe_node`] reads: name, uid, resourceVersion, the control-plane labels,
/// `spec.unschedulable`, the `Ready` and `EtcdIsVoter` conditions (status only) and `nodeInfo.bootID`. Drops
/// managedFields, images, addresses, capacity, taints, annotations (but nixroll's cordon mark),
/// heartbeat times.
pub fn trim_node(node: &mut Node) {
    let m = &mut node.metadata;
    m.managed_fields = None;
    if let Some(annotations) = m.annotations.take() {
        let kept: BTreeMap<String, String> = annotations
            .into_iter()
            .filter(|(k, _)| k == CORDON_ANNOTATION)
            .collect();
        m.annotations = (!kept.is_empty()).then_some(kept);
    }
    m.owner_references = None;
    m.finalizers = None;
    if let Some(labels) = m.labels.take() {
        let kept: BTreeMap<String, String> = labels
            .into_iter()
            .filter(|(k, _)| k == CONTROL_PLANE_LABEL || k == MASTER_LABEL || k == BUILDER_LABEL)
            .collect();
        m.labels = (!kept.is_empty()).then_some(kept);
    }
    let unschedulable = node.spec.as_ref().and_then(|s| s.unschedulable);
    node.spec = Some(NodeSpec {
        unschedulable,
        ..NodeSpec::default()
    });
    let status = node.status.take().unwrap_or_default();
    let ready: Vec<NodeCondition> = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == "Ready" || c.type_ == ETCD_VOTER_CONDITION)
        .map(|c| NodeCondition {
            type_: c.type_,
            status: c.status,
            ..NodeCondition::default()
        })
        .collect();
    let boot_id = status.node_info.map(|i| i.boot_id).unwrap_or_default();
    node.status = Some(NodeStatus {
        conditions: Some(ready),
        node_info: Some(NodeSystemInfo {
            boot_id,
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    });
}

/// Drop managedFields and every annotation but `nixroll.io/retry`.
pub fn trim_nixosnode(obj: &mut NixOSNode) {
    obj.metadata.managed_fields = None;
    if let Some(annotations) = obj.metadata.annotations.take() {
        let kept: BTreeMap<String, String> = annotations
            .into_iter()
            .filter(|(k, _)| k == RETRY_ANNOTATION)
            .collect();
        obj.metadata.annotations = (!kept.is_empty()).then_some(kept);
    }
}

/// The decision's view of a Node (absent Node: `exists: false`).
pub fn observe_node(node: Option<&Node>) -> NodeObservation {
    let Some(node) = node else {
        return NodeObservation::default();
    };
    let labels = node.labels();
    let control_plane = labels
        .get(CONTROL_PLANE_LABEL)
        .or_else(|| labels.get(MASTER_LABEL))
        .is_some_and(|v| v != "false");
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let etcd_voter = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == ETCD_VOTER_CONDITION))
        .map(|c| c.status == "True");
    let boot_id = status
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.boot_id.clone())
        .filter(|b| !b.is_empty());
    NodeObservation {
        exists: true,
        ready,
        unschedulable: node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        cordon_mark: node.annotations().contains_key(CORDON_ANNOTATION),
        control_plane,
        boot_id,
        etcd_voter,
        post_gates: Vec::new(),
        held_by: None,
    }
}

/// Keep of a PodDisruptionBudget what the drain and its wake-ups use: namespace, name,
/// resourceVersion, selector, `status.disruptionsAllowed` and `status.disruptedPods` (pods
/// evicted but not yet seen terminating by the budget's controller: few, and dropped again
/// within moments; see [`crate::drain::BudgetWatch`]).
pub fn trim_budget(b: &mut k8s_openapi::api::policy::v1::PodDisruptionBudget) {
    b.metadata.managed_fields = None;
    b.metadata.annotations = None;
    b.metadata.labels = None;
    b.metadata.owner_references = None;
    if let Some(st) = b.status.as_mut() {
        st.conditions = None;
    }
}

/// The decision's view of one NixOSNode: its metadata and spec, the status to decide from (the
/// store's, or this process's own newer write) and the observation of its Node.
pub(super) fn view_of<'a>(
    o: &'a NixOSNode,
    status: &'a NixOSNodeStatus,
    node: &'a NodeObservation,
) -> NodeView<'a> {
    NodeView {
        name: o.metadata.name.as_deref().unwrap_or_default(),
        generation: o.metadata.generation.unwrap_or_default(),
        retry_token: o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::names::RETRY_ANNOTATION))
            .map(String::as_str),
        spec: &o.spec,
        status,
        node,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn big_node() -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": "true", "kubernetes.io/hostname": "n1"},
                "annotations": {"k3s.io/node-args": "[...]", "nixroll.io/cordoned": "true"},
                "managedFields": [{"manager": "k3s", "operation": "Update"}]},
            "spec": {"unschedulable": true, "podCIDR": "10.42.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "EtcdIsVoter", "status": "False", "reason": "MemberIsLearner", "lastHeartbeatTime": "2026-01-01T00:00:00Z"},
                    {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "reason": "KubeletReady"}],
                "images": [{"names": ["docker.io/library/nginx:1"], "sizeBytes": 1}],
                "nodeInfo": {"bootID": "b-1", "architecture": "amd64", "containerRuntimeVersion": "c", "kernelVersion": "k",
                    "kubeProxyVersion": "", "kubeletVersion": "v", "machineID": "m", "operatingSystem": "linux", "osImage": "NixOS", "systemUUID": "u"}
            }
        }))
        .unwrap()
    }

    #[test]
    fn trimming_keeps_exactly_what_the_observation_needs() {
        let full = big_node();
        let before = observe_node(Some(&full));
        let mut trimmed = full.clone();
        trim_node(&mut trimmed);
        assert_eq!(observe_node(Some(&trimmed)), before);
        assert_eq!(
            before,
            NodeObservation {
                exists: true,
                ready: true,
                unschedulable: true,
                cordon_mark: true,
                control_plane: true,
                boot_id: Some("b-1".into()),
                etcd_voter: Some(false),
                post_gates: Vec::new(),
                held_by: None,
            }
        );
        let s = serde_json::to_string(&trimmed).unwrap();
        for gone in [
            "managedFields",
            "nginx",
            "k3s.io/node-args",
            "podCIDR",
            "MemoryPressure",
            "lastHeartbeatTime",
            "hostname",
        ] {
            assert!(!s.contains(gone), "{gone} kept in {s}");
        }
        assert_eq!(observe_node(None), NodeObservation::default());
    }
}
