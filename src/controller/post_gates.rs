//! The post-gates of a node as the controller observes them, for the decision of a `Verifying`
//! node (docs/pools.md, "Post-gates"): the health gates of the pools that select it (their last
//! verdicts and when each evaluation started, kept by the gate pass) and the node's own pods
//! (listed now: every pod on the node Ready, DaemonSet pods included). The built-in k3s gate
//! needs nothing here: the decision reads the Node's `EtcdIsVoter` condition from the Node
//! cache ([`crate::rollout::NodeObservation::etcd_voter`]).
//!
//! Pods are listed (field-selected to the node, under the API timeout) only for a `Verifying`
//! node whose Node is Ready, as they are only while a node drains otherwise.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::Context;
use super::pools::{DEFAULT_GATES, gates_of};
use crate::api::{HealthGates, NixOSNode};
use crate::gates::Verdict;
use crate::rollout::{GateObservation, GateVerdict, NodeObservation, PODS_GATE, parse_duration};

/// At most this many pod names in the pods gate's message.
const NAMES_SHOWN: usize = 5;

/// Why the pods on a node do not all count as Ready: the names (`namespace/name`) of the pods
/// that are not, leaving out pods that are terminating or have finished (`Succeeded`, `Failed`).
pub fn unready_pods(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .filter(|p| {
            !p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect()
}

/// The gate names and post-gate timeouts (`postTimeout`) of a pool's health gates.
fn post_timeouts(h: &HealthGates) -> impl Iterator<Item = (&str, Option<&str>)> {
    h.cel
        .iter()
        .map(|g| (g.name.as_str(), g.post_timeout.as_deref()))
        .chain(
            h.prometheus
                .iter()
                .map(|g| (g.name.as_str(), g.post_timeout.as_deref())),
        )
}

impl Context {
    /// The post-gates of `obj` (other than the k3s one): its pools' health gates and, when its
    /// Node is Ready, its pods.
    pub(super) async fn post_gates(
        &self,
        obj: &NixOSNode,
        node: &NodeObservation,
        now: Timestamp,
    ) -> Vec<GateObservation> {
        let name = obj.name_any();
        let labels = obj.labels();
        let default_timeout = self.config.policy.timeouts.verifying;
        let mut out = Vec::new();
        let verdicts = self.gate_verdicts.lock().map(|v| v.clone()).unwrap_or_default();
        let defaults = self.default_gates.lock().map(|d| d.clone()).unwrap_or_default();
        let pools = self.pools.state();
        let selecting: Vec<_> = pools.iter().filter(|p| p.spec.selector.matches(labels)).collect();
        // The gates of each pool that selects the node (its own or the cluster defaults), or the
        // cluster defaults for a node in the implicit default pool; each set once.
        let mut sets: Vec<(&str, Result<Option<&HealthGates>, &str>)> = Vec::new();
        let names: Vec<String> = selecting.iter().map(|p| p.name_any()).collect();
        if selecting.is_empty() {
            sets.push(gates_of(None, &defaults));
        }
        for (p, n) in selecting.iter().zip(&names) {
            let set = gates_of(Some((n.as_str(), &p.spec)), &defaults);
            if !sets.iter().any(|(k, _)| *k == set.0) {
                sets.push(set);
            }
        }
        for (source, gates) in sets {
            let gates = match gates {
                Ok(Some(g)) => g,
                Ok(None) => continue,
                Err(why) => {
                    out.push(GateObservation {
                        name: DEFAULT_GATES.to_owned(),
                        timeout: default_timeout,
                        verdict: GateVerdict::Block {
                            at: now,
                            why: format!("cluster-default health gates unusable: {why}"),
                        },
                    });
                    continue;
                }
            };
            let of_pool = verdicts.get(source);
            for (gate, post_timeout) in post_timeouts(gates) {
                let timeout = post_timeout
                    .and_then(|t| parse_duration(t).ok())
                    .unwrap_or(default_timeout);
                let verdict = match of_pool.and_then(|v| v.get(gate)) {
                    Some((Verdict::Pass, at)) => GateVerdict::Pass { at: *at },
                    Some((Verdict::Block(why), at)) => GateVerdict::Block {
                        at: *at,
                        why: why.clone(),
                    },
                    None => GateVerdict::Unknown,
                };
                out.push(GateObservation {
                    name: gate.to_owned(),
                    timeout,
                    verdict,
                });
            }
        }
        if node.ready {
            out.push(GateObservation {
                name: PODS_GATE.to_owned(),
                timeout: default_timeout,
                verdict: self.pods_gate(&name, now).await,
            });
        }
        out
    }

    /// Every pod on the node Ready (listed now).
    async fn pods_gate(&self, node: &str, now: Timestamp) -> GateVerdict {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let listed = tokio::time::timeout(self.config.api_timeout, pods.list(&lp)).await;
        let why = match listed {
            Ok(Ok(list)) => {
                let unready = unready_pods(&list.items);
                if unready.is_empty() {
                    return GateVerdict::Pass { at: now };
                }
                let shown: Vec<&str> = unready.iter().take(NAMES_SHOWN).map(String::as_str).collect();
                let more = unready.len().saturating_sub(NAMES_SHOWN);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("not Ready: {}{more}", shown.join(", "))
            }
            Ok(Err(e)) => format!("listing its pods: {e}"),
            Err(_) => format!("listing its pods: no answer within {:?}", self.config.api_timeout),
        };
        GateVerdict::Block { at: now, why }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(name: &str, ready: Option<&str>, phase: &str, deleting: bool) -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "kube-system"},
            "status": {"phase": phase},
        });
        if let Some(r) = ready {
            v["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": r}]);
        }
        if deleting {
            v["metadata"]["deletionTimestamp"] = serde_json::json!("2026-12-07T10:00:00Z");
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_not_ready_block_finished_and_terminating_ones_do_not() {
        let pods = [
            pod("cilium-x", Some("True"), "Running", false),
            pod("longhorn-manager-y", Some("False"), "Running", false),
            pod("starting", None, "Pending", false),
            pod("job-done", Some("False"), "Succeeded", false),
            pod("job-failed", None, "Failed", false),
            pod("leaving", Some("False"), "Running", true),
        ];
        assert_eq!(
            unready_pods(&pods),
            vec!["kube-system/longhorn-manager-y", "kube-system/starting"]
        );
        assert!(unready_pods(&pods[..1]).is_empty());
    }
}
