//! The single admission point: the gate ([`crate::rollout::admit`]) run over the cache united
//! with this process's own not-yet-visible writes, the targeted wake-ups and the periodic sweep
//! built on it, and that memory of its own writes ([`PendingWrites`]).
//!
//! The reflector store lags behind the API: right after the controller persisted "node A holds
//! a slot", the store may still show A without one. Admitting from the store alone would then
//! hand out A's slot a second time. [`PendingWrites`] remembers the controller-owned status this
//! process last persisted for each node, and [`PendingWrites::effective`] answers with it until
//! the store shows the same phase and slot. It lives inside the admission mutex, so grant →
//! persist → record is one critical section.
//!
//! A grant whose write *failed* may still have landed (a timeout after the request was sent).
//! Such a grant is kept as *uncertain*: admission counts it until the store shows it or until a
//! deadline passes, but the node's own next reconcile does not take it for granted.
//!
//! After a restart the map is empty and the store (waited on until it is synced) is the truth:
//! slots are persisted in `status.slot`, so nothing is over-admitted.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tracing::debug;

use super::Context;
use super::observe::view_of;
use crate::api::{NixOSNode, NixOSNodeStatus, Phase};
use crate::rollout::{ClusterState, NodeObservation, NodeView};

/// What admission needs to agree on between the store and our last write.
fn key(s: &NixOSNodeStatus) -> (Option<Phase>, bool) {
    (s.phase, s.slot.is_some())
}

/// Statuses this process persisted that the store may not show yet, per node name, each with
/// the `metadata.uid` of the object it was written to: a NixOSNode deleted and created again
/// under the same name is a new object, and what was written to the old one must not shadow
/// the new one's (empty) status.
#[derive(Debug, Default)]
pub struct PendingWrites {
    by_node: HashMap<String, (Option<String>, NixOSNodeStatus)>,
    /// Grants whose write failed ambiguously, counted by admission until the deadline.
    uncertain: HashMap<String, (Option<String>, NixOSNodeStatus, Instant)>,
}

impl PendingWrites {
    /// Remember that `status` (controller-owned part) was persisted for `node` (object `uid`).
    pub fn record(&mut self, node: &str, uid: Option<&str>, status: &NixOSNodeStatus) {
        let mut s = status.clone();
        s.agent = None;
        self.uncertain.remove(node);
        self.by_node.insert(node.to_string(), (uid.map(str::to_owned), s));
    }

    /// Remember a grant whose write failed but may have landed; admission counts it until
    /// `until` or until the store shows it.
    pub fn record_uncertain(
        &mut self,
        node: &str,
        uid: Option<&str>,
        status: &NixOSNodeStatus,
        until: Instant,
    ) {
        let mut s = status.clone();
        s.agent = None;
        self.uncertain
            .insert(node.to_string(), (uid.map(str::to_owned), s, until));
    }

    /// The status admission uses for `node`: [`Self::effective`], else an uncertain grant that
    /// has neither expired nor shown up in the store.
    pub fn effective_for_admission(
        &mut self,
        node: &str,
        uid: Option<&str>,
        stored: &NixOSNodeStatus,
        now: Instant,
    ) -> Option<NixOSNodeStatus> {
        if let Some(s) = self.effective(node, uid, stored) {
            return Some(s);
        }
        let (for_uid, pending, until) = self.uncertain.get(node)?;
        if for_uid.as_deref() != uid || now >= *until || key(pending) == key(stored) {
            self.uncertain.remove(node);
            return None;
        }
        let mut s = pending.clone();
        s.agent.clone_from(&stored.agent);
        Some(s)
    }

    /// The status admission must use for `node` (object `uid`): our last write while the store
    /// has not caught up with its phase and slot, else the stored one (and the entry is
    /// dropped, as it is when it was written to another object of that name).
    pub fn effective(
        &mut self,
        node: &str,
        uid: Option<&str>,
        stored: &NixOSNodeStatus,
    ) -> Option<NixOSNodeStatus> {
        let (for_uid, pending) = self.by_node.get(node)?;
        if for_uid.as_deref() != uid || key(pending) == key(stored) {
            self.by_node.remove(node);
            return None;
        }
        let mut s = pending.clone();
        s.agent.clone_from(&stored.agent);
        Some(s)
    }

    /// Forget nodes that no longer exist.
    pub fn retain_present(&mut self, present: &HashSet<&str>) {
        self.by_node.retain(|n, _| present.contains(n.as_str()));
        self.uncertain.retain(|n, _| present.contains(n.as_str()));
    }

    pub fn len(&self) -> usize {
        self.by_node.len() + self.uncertain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty() && self.uncertain.is_empty()
    }
}

/// The admission gate run over the cache, under the admission mutex.
impl Context {
    /// Run the admission gate over every NixOSNode in the store, each with its effective status
    /// (the store united with our own pending writes). Caller holds the admission mutex.
    /// The nodes the gate admits now. `me`: the node asking, which may replace its own
    /// uncertain grant (it is one slot).
    pub(super) fn admissible(
        &self,
        pending: &mut PendingWrites,
        me: Option<&str>,
        now: Timestamp,
    ) -> Vec<String> {
        self.admissible_and_why(pending, me, now).0
    }

    /// [`Self::admissible`], and why the pool of `me` admits nothing now (for its conditions).
    pub(super) fn admissible_and_why(
        &self,
        pending: &mut PendingWrites,
        me: Option<&str>,
        now: Timestamp,
    ) -> (Vec<String>, Option<(&'static str, String)>) {
        let objs = self.follow.effective_all(self.nixosnodes.state());
        let present: HashSet<&str> = objs.iter().filter_map(|o| o.metadata.name.as_deref()).collect();
        pending.retain_present(&present);
        if let Ok(mut drains) = self.drains.lock() {
            drains.retain(|n, _| present.contains(n.as_str()));
        }
        let empty = NixOSNodeStatus::default();
        let rows: Vec<(&NixOSNode, Cow<'_, NixOSNodeStatus>, NodeObservation)> = objs
            .iter()
            .map(|o| {
                let name = o.metadata.name.as_deref().unwrap_or_default();
                let stored = o.status.as_ref().unwrap_or(&empty);
                // A node asking again may replace its own uncertain grant (it is one slot).
                let uid = o.metadata.uid.as_deref();
                let effective = if Some(name) == me {
                    pending.effective(name, uid, stored)
                } else {
                    pending.effective_for_admission(name, uid, stored, Instant::now())
                };
                let status = match effective {
                    Some(s) => Cow::Owned(s),
                    None => Cow::Borrowed(stored),
                };
                (o.as_ref(), status, self.observe(name))
            })
            .collect();
        let views: Vec<NodeView<'_>> = rows
            .iter()
            .map(|(o, status, node)| view_of(o, status, node))
            .collect();
        let pool_objs = self.pools.state();
        let mut pools = super::pools::build_pools(&pool_objs, &objs);
        if let (Ok(v), Ok(d)) = (self.gate_verdicts.lock(), self.default_gates.lock()) {
            super::pools::apply_verdicts(&mut pools, &pool_objs, &v, &d);
        }
        let why = me
            .and_then(|me| views.iter().position(|v| v.name == me))
            .and_then(|i| crate::rollout::node_blocker(&pools, i, &views, now));
        let cluster = ClusterState {
            paused: !self.pause.is_empty(),
            pools,
        };
        (
            (self.rollout.admit)(&views, &cluster, &self.config.policy, now),
            why,
        )
    }

    /// A slot was released or a blocker went away: send the nodes the gate would admit now
    /// (other than `except`) to the work queue. Only those, not every Waiting node: with 1,000
    /// nodes waiting, waking them all on each release made a rollout O(nodes²) reconciles. A
    /// woken node runs the gate again itself, under the admission lock, before it takes a slot.
    pub(super) async fn wake_admissible(&self, except: &str) {
        let admissible = {
            let mut gate = self.admission.lock().await;
            self.admissible(&mut gate, None, Timestamp::now())
        };
        if self.config.lose_wakeups {
            debug!(
                lost = admissible.len(),
                "fault injection: dropping targeted wake-ups"
            );
            return;
        }
        for name in admissible.iter().filter(|n| n.as_str() != except) {
            let _ = self.wake.send(ObjectRef::new(name));
        }
    }

    /// The Waiting nodes the gate admits now, for the periodic sweep (nothing while standing
    /// by or before the caches are synced).
    pub(super) async fn sweep(&self) -> Vec<ObjectRef<NixOSNode>> {
        if !self.leading.load(Ordering::SeqCst) || !self.synced.is_synced() {
            return Vec::new();
        }
        let admissible = {
            let mut gate = self.admission.lock().await;
            self.admissible(&mut gate, None, Timestamp::now())
        };
        if !admissible.is_empty() {
            debug!(nodes = ?admissible, "admission sweep");
        }
        admissible.iter().map(|n| ObjectRef::new(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tokio::sync::Mutex;

    use super::*;
    use crate::api::Slot;

    fn waiting() -> NixOSNodeStatus {
        NixOSNodeStatus {
            phase: Some(Phase::Waiting),
            ..NixOSNodeStatus::default()
        }
    }

    fn draining() -> NixOSNodeStatus {
        NixOSNodeStatus {
            phase: Some(Phase::Draining),
            slot: Some(Slot {
                granted_at: Time(jiff::Timestamp::UNIX_EPOCH),
                was_unschedulable: false,
                cordoned_by_nixroll: false,
                drain_started_at: None,
                forced: false,
                verified_at: None,
            }),
            ..NixOSNodeStatus::default()
        }
    }

    #[test]
    fn pending_write_wins_until_the_store_catches_up() {
        let mut p = PendingWrites::default();
        p.record("a", None, &draining());
        // Store still shows Waiting: our grant is what counts.
        assert_eq!(
            p.effective("a", None, &waiting()).unwrap().phase,
            Some(Phase::Draining)
        );
        assert_eq!(p.len(), 1);
        // Store caught up: entry dropped, store is the truth again.
        assert!(p.effective("a", None, &draining()).is_none());
        assert!(p.is_empty());
        // Release recorded while the store still shows the slot: the release counts.
        p.record("a", None, &waiting());
        assert!(p.effective("a", None, &draining()).unwrap().slot.is_none());
        let present: HashSet<&str> = HashSet::new();
        p.retain_present(&present);
        assert!(p.is_empty());
    }

    #[test]
    fn a_node_created_again_under_the_same_name_is_not_shadowed_by_the_old_ones_writes() {
        let mut p = PendingWrites::default();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        // Written to the first object named "a"; it is deleted before the store shows it.
        p.record("a", Some("uid-1"), &draining());
        assert!(p.effective("a", Some("uid-1"), &waiting()).is_some());
        // The new object "a" (uid-2) starts empty: its own status is the truth.
        assert!(
            p.effective("a", Some("uid-2"), &NixOSNodeStatus::default())
                .is_none()
        );
        assert!(p.is_empty());
        // The same for an uncertain grant, and for admission.
        p.record_uncertain("a", Some("uid-1"), &draining(), later);
        assert!(
            p.effective_for_admission("a", Some("uid-2"), &NixOSNodeStatus::default(), now)
                .is_none()
        );
        assert!(p.is_empty());
    }

    #[test]
    fn uncertain_grant_counts_for_admission_only_until_seen_or_expired() {
        let mut p = PendingWrites::default();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        p.record_uncertain("a", None, &draining(), later);
        // The node's own view does not assume the grant landed.
        assert!(p.effective("a", None, &waiting()).is_none());
        // Admission counts it.
        assert!(
            p.effective_for_admission("a", None, &waiting(), now)
                .unwrap()
                .slot
                .is_some()
        );
        // Expired: forgotten.
        assert!(p.effective_for_admission("a", None, &waiting(), later).is_none());
        assert!(p.is_empty());
        // Seen in the store: forgotten.
        p.record_uncertain("a", None, &draining(), later);
        assert!(p.effective_for_admission("a", None, &draining(), now).is_none());
        assert!(p.is_empty());
    }

    /// A toy admission gate with budget 1: `me` may take a slot when it is Waiting and no
    /// node holds one (the real gate is `crate::rollout::admit`).
    fn toy_admit(statuses: &[(&str, NixOSNodeStatus)], me: &str) -> bool {
        let busy = statuses.iter().filter(|(_, s)| s.slot.is_some()).count();
        busy < 1
            && statuses
                .iter()
                .any(|(n, s)| *n == me && s.phase == Some(Phase::Waiting))
    }

    /// Both reconciles run concurrently against a store that never sees a grant; returns how
    /// many slots were granted.
    async fn race(use_pending: bool) -> usize {
        let store: Arc<Vec<(&'static str, NixOSNodeStatus)>> =
            Arc::new(vec![("a", waiting()), ("b", waiting())]);
        let gate = Arc::new(Mutex::new(PendingWrites::default()));
        let persisted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for me in ["a", "b"] {
            let (store, gate, persisted) = (store.clone(), gate.clone(), persisted.clone());
            tasks.push(tokio::spawn(async move {
                let mut pending = gate.lock().await;
                let effective: Vec<(&str, NixOSNodeStatus)> = store
                    .iter()
                    .map(|(n, s)| {
                        let e = if use_pending {
                            pending.effective(n, None, s)
                        } else {
                            None
                        };
                        (*n, e.unwrap_or_else(|| s.clone()))
                    })
                    .collect();
                if toy_admit(&effective, me) {
                    // The status write happens under the lock (simulated API latency).
                    tokio::task::yield_now().await;
                    persisted.lock().unwrap().push(me.to_string());
                    pending.record(me, None, &draining());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        persisted.lock().unwrap().len()
    }

    /// [`PendingWrites`] alone, under a toy gate (budget 1) that two tasks run at once over a
    /// store that has not seen the first grant: exactly one task records the slot. The real
    /// reconciles against a stale cache are `tests/controller_admission.rs`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_writes_keep_two_racing_toy_gates_from_both_taking_the_slot() {
        for _ in 0..100 {
            assert_eq!(race(true).await, 1, "budget 1 over-admitted");
        }
    }

    /// Without the pending writes the same race over-admits: the test above can fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_pending_writes_a_stale_store_over_admits() {
        assert_eq!(race(false).await, 2);
    }
}

/// The gate through a [`Context`] over filled caches.
#[cfg(test)]
mod gate_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{ConfigMap, Node};
    use kube::Client;
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::controller::{ControllerConfig, Metrics, Stores, Synced, observe};

    /// Cost of one admission decision over 1,000 nodes (view building; the real `admit` adds its
    /// own). Printed, and bounded loosely so a quadratic slip fails.
    #[tokio::test]
    async fn admission_over_1000_nodes_is_cheap() {
        let (svc, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let client = Client::new(svc, "default");
        let (nxn, mut w) = reflector::store::<NixOSNode>();
        let (nodes, mut wn) = reflector::store::<Node>();
        let (pause, mut wp) = reflector::store::<ConfigMap>();
        w.apply_watcher_event(&watcher::Event::Init);
        wn.apply_watcher_event(&watcher::Event::Init);
        for i in 0..1000 {
            let name = format!("node-{i:04}");
            let mut o = crate::sim::fixtures::nixos_node(&name, "github:me/infra", &"c".repeat(40));
            o.status = Some(NixOSNodeStatus {
                phase: Some(Phase::Waiting),
                ..NixOSNodeStatus::default()
            });
            w.apply_watcher_event(&watcher::Event::InitApply(o));
            let mut n: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .unwrap();
            observe::trim_node(&mut n);
            wn.apply_watcher_event(&watcher::Event::InitApply(n));
        }
        w.apply_watcher_event(&watcher::Event::InitDone);
        wn.apply_watcher_event(&watcher::Event::InitDone);
        wp.apply_watcher_event(&watcher::Event::InitDone);
        let (ctx, _rx) = Context::new(
            client,
            ControllerConfig::new("t"),
            Stores {
                nixosnodes: nxn,
                nodes,
                pause,
                pools: kube::runtime::reflector::store().0,
                synced: Synced::ready(),
            },
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
        );
        let started = Instant::now();
        let rounds = 200;
        for _ in 0..rounds {
            let mut gate = ctx.admission.lock().await;
            let _ = ctx.admissible(&mut gate, Some("node-0001"), Timestamp::now());
        }
        let per = started.elapsed() / rounds;
        eprintln!("admission over 1000 nodes: {per:?} per decision (debug build)");
        assert!(per < Duration::from_millis(50), "{per:?}");
    }
}
