//! The admission gate behind [`super::admit`]: one pure decision over all nodes.
//!
//! Nothing is admitted while any node is still Staging (a build failure anywhere stops the
//! rollout before it disrupts a node).
//!
//! Order of admission (deterministic): first nodes that already hold their slot (a retried
//! node that stayed cordoned), then workers, then control-plane nodes; by name within each
//! group. Workers go first so that a bad revision shows up on a node the cluster can lose
//! before it reaches a k3s server.

use jiff::Timestamp;

use super::pools::{Membership, is_soaking, node_soak, pool_blocker, pool_budget};
use super::{ClusterState, MaxUnavailable, NodeView, Policy, window};
use crate::api::Phase;

/// The budget of unavailable nodes for `total` managed nodes.
pub fn budget(max: MaxUnavailable, total: usize) -> usize {
    match max {
        MaxUnavailable::Count(n) => n as usize,
        MaxUnavailable::Percent(p) => (total.saturating_mul(p as usize) / 100).max(1),
    }
}

/// Whether a node counts against the budget: it holds a slot or is in a disruptive phase, its
/// Node is cordoned (by anyone) or not Ready, or it is Degraded. A NixOSNode whose Node does
/// not exist is not part of the cluster's capacity and does not count unless it holds a slot.
pub fn is_unavailable(v: &NodeView<'_>) -> bool {
    let phase = v.status.phase.unwrap_or_default();
    v.status.slot.is_some()
        || phase.is_disruptive()
        || phase == Phase::Degraded
        || (v.node.exists && (v.node.unschedulable || !v.node.ready))
}

/// Whether this node is Degraded (counts towards the failure threshold).
pub fn is_degraded(v: &NodeView<'_>) -> bool {
    v.status.phase == Some(Phase::Degraded)
}

/// Whether a Waiting node could start its disruptive step now, budget aside.
pub fn is_candidate(v: &NodeView<'_>, now: Timestamp) -> bool {
    let st = v.status;
    st.phase == Some(Phase::Waiting)
        && !v.spec.suspend
        && v.node.exists
        && v.node.ready
        && st.failed.is_none()
        && st.agent.as_ref().is_none_or(|a| a.secrets_missing.is_empty())
        && st
            .target
            .as_ref()
            .is_some_and(|t| t.system.is_some() && t.revision == v.spec.revision)
        && st.backoff.as_ref().is_none_or(|b| b.not_before.0 <= now)
        && window::is_open(&v.spec.maintenance_windows, now).unwrap_or(false)
}

pub(super) fn admit(
    nodes: &[NodeView<'_>],
    cluster: &ClusterState,
    policy: &Policy,
    now: Timestamp,
) -> Vec<String> {
    if cluster.paused {
        return Vec::new();
    }
    let degraded = nodes.iter().filter(|v| is_degraded(v)).count();
    if degraded >= policy.failure_threshold as usize {
        return Vec::new();
    }
    // Disruption starts only once every node has finished staging: a revision that fails to
    // build or evaluate anywhere is caught before any node is drained.
    if nodes.iter().any(|v| v.status.phase == Some(Phase::Staging)) {
        return Vec::new();
    }
    let pools = &cluster.pools;
    // Each pool's room: its budget over its members less its unavailable members. Index 0 is
    // the default pool, 1 + p is pool p. A node several pools select counts in each of them.
    let mut room: Vec<usize> = std::iter::once(None)
        .chain((0..pools.pools.len()).map(Some))
        .map(|p| {
            let members = pools.members(p, nodes);
            let soak = node_soak(pools, p, policy);
            let unavailable = members
                .iter()
                .filter(|&&i| is_unavailable(&nodes[i]) || is_soaking(&nodes[i], soak, now))
                .count();
            pool_budget(pools, p, members.len(), policy).saturating_sub(unavailable)
        })
        .collect();
    // Control-plane nodes that are unavailable, by index (cluster-wide, across pools): a k3s
    // server that is not a healthy etcd voter (its `EtcdIsVoter` condition False) counts too.
    let cp_unavailable: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, v)| v.node.control_plane && (is_unavailable(v) || v.node.etcd_voter == Some(false)))
        .map(|(i, _)| i)
        .collect();

    let mut cands: Vec<usize> = (0..nodes.len())
        .filter(|&i| is_candidate(&nodes[i], now))
        .collect();
    cands.sort_by(|&a, &b| {
        let ka = (
            nodes[a].status.slot.is_none(),
            nodes[a].node.control_plane,
            nodes[a].name,
        );
        let kb = (
            nodes[b].status.slot.is_none(),
            nodes[b].node.control_plane,
            nodes[b].name,
        );
        ka.cmp(&kb)
    });

    let mut out = Vec::new();
    let mut cp_admitted = false;
    for i in cands {
        let v = &nodes[i];
        let slot_index = match pools.membership(v.name) {
            Membership::Default if pools.default_gate_block.is_some() => continue,
            Membership::Default => 0,
            Membership::Pool(p) => {
                let revision = v.status.target.as_ref().map_or("", |t| t.revision.as_str());
                if pool_blocker(pools, p, revision, nodes, now).is_some() {
                    continue;
                }
                1 + p
            }
            // Refused by every pool that selects it.
            Membership::Conflict(_) => continue,
        };
        let holds_slot = v.status.slot.is_some();
        if v.node.control_plane {
            let other_cp_busy = cp_unavailable.iter().any(|&j| j != i);
            if cp_admitted || other_cp_busy {
                continue;
            }
        }
        if !holds_slot {
            if room[slot_index] == 0 {
                continue;
            }
            room[slot_index] -= 1;
        }
        if v.node.control_plane {
            cp_admitted = true;
        }
        out.push(v.name.to_string());
    }
    out
}

/// The `admitted` argument of [`super::decide`] for `view`, given what [`super::admit`] returned
/// over all nodes: the node is `Waiting` and the gate listed it. That includes a node that
/// already holds its slot (a retried node that stayed cordoned): the gate lists it first and
/// without using budget, and it must be admitted like any other, or it stays `Waiting` and
/// cordoned for good.
pub fn is_admitted(view: &NodeView<'_>, admissible: &[String]) -> bool {
    view.status.phase == Some(Phase::Waiting) && admissible.iter().any(|n| n == view.name)
}
