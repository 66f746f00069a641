//! Watches a (simulated or real) cluster and records every violation of the rollout
//! invariants of DESIGN.md §7 it can observe from the API: the disruption budget, one
//! control-plane node at a time, no uncordon before the node runs its target and is Ready,
//! no uncordon of a node nixroll did not cordon. It also records every disruptive act it sees
//! (a slot or an activation granted, a cordon, a pod marked for deletion) with the resource
//! version of the write that made it, so a test can ask what happened between two writes of its
//! own ([`Monitor::acts_between`]). Used by the end-to-end tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::{NixOSNode, Phase};
use crate::sim::cluster::node_ready;

/// A disruptive act the monitor saw, with the resource version of the write that made it
/// (the embedded API's resource versions are one global counter, like etcd's revision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Act {
    pub resource_version: u64,
    pub node: String,
    pub kind: ActKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActKind {
    /// `status.slot` set on the NixOSNode.
    SlotGranted,
    /// `status.activation` set (or a new grant id) on the NixOSNode.
    ActivationGranted,
    /// The Node became unschedulable.
    Cordoned,
    /// A pod on the node was marked for deletion (an eviction, or a forced delete).
    PodDeleted(String),
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<String, bool>,
    grants: BTreeMap<String, String>,
    deleting: BTreeSet<String>,
    acts: Vec<Act>,
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
            let pods: Api<Pod> = Api::all(client.clone());
            let c = watcher(pods, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .map(|r| r.map(|p| Either::Pod(Box::new(p))));
            let merged = futures::stream::select(futures::stream::select(a.boxed(), b.boxed()), c.boxed());
            futures::pin_mut!(merged);
            while let Some(ev) = merged.next().await {
                let Ok(ev) = ev else { continue };
                match ev {
                    Either::NixOSNode(o) => {
                        let holds = o.status.as_ref().is_some_and(|s| s.slot.is_some());
                        let grant = o
                            .status
                            .as_ref()
                            .and_then(|s| s.activation.as_ref())
                            .map(|g| g.id.clone());
                        let rv = rv_of(&o.metadata);
                        let name = o.name_any();
                        let mut s = lock(&st);
                        let held = s.slots.insert(name.clone(), holds).unwrap_or(false);
                        if holds && !held {
                            s.act(rv, &name, ActKind::SlotGranted);
                        }
                        match grant {
                            Some(id) if s.grants.get(&name) != Some(&id) => {
                                s.grants.insert(name.clone(), id);
                                s.act(rv, &name, ActKind::ActivationGranted);
                            }
                            Some(_) => {}
                            None => {
                                s.grants.remove(&name);
                            }
                        }
                        check_budget(&mut s, budget);
                    }
                    Either::Pod(p) => {
                        if p.metadata.deletion_timestamp.is_none() {
                            continue;
                        }
                        let uid = p.metadata.uid.clone().unwrap_or_default();
                        let node = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default();
                        let mut s = lock(&st);
                        if s.deleting.insert(uid) {
                            let rv = rv_of(&p.metadata);
                            s.act(rv, &node, ActKind::PodDeleted(p.name_any()));
                        }
                    }
                    Either::Node(n) => {
                        let name = n.name_any();
                        let unsched = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
                        let was = {
                            let mut s = lock(&st);
                            if n.labels().contains_key(crate::names::CONTROL_PLANE_LABEL) {
                                s.control_plane.insert(name.clone());
                            }
                            let was = s.unschedulable.insert(name.clone(), unsched);
                            if unsched && was == Some(false) {
                                s.act(rv_of(&n.metadata), &name, ActKind::Cordoned);
                            }
                            was
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

    /// Every disruptive act seen so far, in the order the watches delivered them.
    pub fn acts(&self) -> Vec<Act> {
        lock(&self.state).acts.clone()
    }

    /// The acts made by writes after resource version `after` and up to `until` (both the
    /// resource versions of the test's own writes). Acts are delivered by watches, so call this
    /// once the monitor has seen later writes (e.g. after a whole rollout).
    pub fn acts_between(&self, after: u64, until: u64) -> Vec<Act> {
        lock(&self.state)
            .acts
            .iter()
            .filter(|a| a.resource_version > after && a.resource_version <= until)
            .cloned()
            .collect()
    }
}

/// The resource version of an object as a number (0 if it is not one).
pub fn rv_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl State {
    fn act(&mut self, resource_version: u64, node: &str, kind: ActKind) {
        self.acts.push(Act {
            resource_version,
            node: node.to_string(),
            kind,
        });
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
    Pod(Box<Pod>),
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
