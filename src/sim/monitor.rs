//! Watches a (simulated or real) cluster and records every violation of the rollout
//! invariants of DESIGN.md §7 it can observe from the API: the disruption budget, one
//! control-plane node at a time, no uncordon before the node runs its target and is Ready,
//! no uncordon of a node nixroll did not cordon. Used by the end-to-end tests and the demo.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::{NixOSNode, Phase};
use crate::sim::cluster::node_ready;

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<String, bool>,
    control_plane: BTreeSet<String>,
    unschedulable: BTreeMap<String, bool>,
    max_slots: usize,
    violations: Vec<String>,
}

/// A running monitor; read the results with [`Monitor::violations`] and
/// [`Monitor::max_concurrent`].
pub struct Monitor {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Start watching. `budget`: the most nodes that may hold a disruption slot at once.
    /// `admin_cordoned`: nodes an administrator cordoned; they must never be uncordoned.
    pub fn start(client: Client, budget: usize, admin_cordoned: &[&str]) -> Monitor {
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let admin: BTreeSet<String> = admin_cordoned.iter().map(|s| s.to_string()).collect();
        let task = tokio::spawn(async move {
            let nn: Api<NixOSNode> = Api::all(client.clone());
            let nodes: Api<Node> = Api::all(client.clone());
            let a = watcher(nn.clone(), watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .map(|r| r.map(|o| Either::NixOSNode(Box::new(o))));
            let b = watcher(nodes, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .map(|r| r.map(|n| Either::Node(Box::new(n))));
            let merged = futures::stream::select(a.boxed(), b.boxed());
            futures::pin_mut!(merged);
            while let Some(ev) = merged.next().await {
                let Ok(ev) = ev else { continue };
                match ev {
                    Either::NixOSNode(o) => {
                        let holds = o.status.as_ref().is_some_and(|s| s.slot.is_some());
                        let mut s = lock(&st);
                        s.slots.insert(o.name_any(), holds);
                        check_budget(&mut s, budget);
                    }
                    Either::Node(n) => {
                        let name = n.name_any();
                        let unsched = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
                        let was = {
                            let mut s = lock(&st);
                            if n.labels().contains_key(crate::names::CONTROL_PLANE_LABEL) {
                                s.control_plane.insert(name.clone());
                            }
                            s.unschedulable.insert(name.clone(), unsched)
                        };
                        if was == Some(true) && !unsched {
                            let verdict = check_uncordon(&nn, &name, node_ready(&n), &admin).await;
                            if let Some(v) = verdict {
                                lock(&st).violations.push(v);
                            }
                        }
                    }
                }
            }
        });
        Monitor { state, task }
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    /// The most nodes seen holding a slot at the same time.
    pub fn max_concurrent(&self) -> usize {
        lock(&self.state).max_slots
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Either {
    NixOSNode(Box<NixOSNode>),
    Node(Box<Node>),
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_budget(s: &mut State, budget: usize) {
    let held: Vec<&String> = s.slots.iter().filter(|(_, h)| **h).map(|(n, _)| n).collect();
    let n = held.len();
    let cp = held.iter().filter(|h| s.control_plane.contains(**h)).count();
    s.max_slots = s.max_slots.max(n);
    if n > budget {
        let v = format!("{n} nodes hold a disruption slot at once (budget {budget}): {held:?}");
        s.violations.push(v);
    }
    if cp > 1 {
        let v = format!("{cp} control-plane nodes hold a slot at once: {held:?}");
        s.violations.push(v);
    }
}

/// A node was just uncordoned: nixroll must have cordoned it, and (its status is written
/// before the uncordon) it must be UpToDate on its spec revision and Ready — or have given
/// the slot back after a drain abort without activating anything.
async fn check_uncordon(
    api: &Api<NixOSNode>,
    name: &str,
    ready: bool,
    admin: &BTreeSet<String>,
) -> Option<String> {
    if admin.contains(name) {
        return Some(format!(
            "{name}: uncordoned although an administrator had cordoned it"
        ));
    }
    let obj = match tokio::time::timeout(Duration::from_secs(10), api.get(name)).await {
        Ok(Ok(o)) => o,
        _ => return None,
    };
    let status = obj.status.unwrap_or_default();
    let activated = status.activation.is_some()
        || status
            .agent
            .as_ref()
            .and_then(|a| a.activation.as_ref())
            .is_some_and(|r| {
                r.system
                    == status
                        .target
                        .as_ref()
                        .and_then(|t| t.system.clone())
                        .unwrap_or_default()
            });
    match status.phase {
        Some(Phase::UpToDate) => {
            // A node that follows a source has no spec.revision: the revision the controller
            // resolved for it is its target's (or, once the target is cleared, `wanted`).
            let wanted = if !obj.spec.revision.is_empty() {
                Some(obj.spec.revision.clone())
            } else {
                status.target.as_ref().map(|t| t.revision.clone())
            };
            let runs_wanted = match &wanted {
                Some(w) => status.revision.as_deref() == Some(w.as_str()),
                None => status.running.is_some() && status.running == status.wanted,
            };
            if !runs_wanted {
                Some(format!(
                    "{name}: uncordoned as UpToDate but runs {:?}, not {:?}",
                    status.revision,
                    wanted.or(status.wanted.clone())
                ))
            } else if !ready {
                Some(format!("{name}: uncordoned while not Ready"))
            } else {
                None
            }
        }
        // A drain that was aborted before activation gives the node back unchanged.
        Some(Phase::Waiting) | Some(Phase::Staging) if !activated => None,
        other => Some(format!(
            "{name}: uncordoned in phase {other:?} (activation {:?})",
            status.activation
        )),
    }
}
