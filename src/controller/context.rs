//! The state one leadership term shares between its reconciles: the [`Context`] (client,
//! configuration, the watch caches, the admission mutex, drain bookkeeping, the Event recorder,
//! metrics, the wake-up queue), the [`Stores`] it is built from, the [`Synced`] flag of those
//! caches and the [`RolloutFns`] it decides with; plus the small helpers every step uses (bounded
//! API calls, reading the caches, publishing Events).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::runtime::reflector::{self, ObjectRef, Store};
use tokio::sync::{Mutex, mpsc, watch};
use tracing::debug;

use super::draining::DrainState;
use super::events::{self, EventWriter};
use super::{ControllerConfig, ControllerError, Metrics, PendingWrites, observe};
use crate::api::{NixOSNode, NixOSPool, Phase};
use crate::names::CONTROLLER_MANAGER;
use crate::rollout::{
    ClusterState, Decision, DrainProgress, NodeObservation, NodeView, Policy, admit, decide,
};

/// Everything a reconcile needs; one per leadership term.
pub struct Context {
    pub(super) client: Client,
    pub(super) config: ControllerConfig,
    pub(super) nixosnodes: Store<NixOSNode>,
    pub(super) nodes: Store<Node>,
    pub(super) pause: Store<ConfigMap>,
    /// NixOSPools (empty when there are none or their CRD is not installed).
    pub(super) pools: Store<NixOSPool>,
    /// The last verdict of each pool's health gates and when it was made (pool → gate →
    /// (verdict, evaluated at)).
    pub(super) gate_verdicts: std::sync::Mutex<super::pools::GateVerdicts>,
    /// The cluster-default health gates as the last gate pass read them.
    pub(super) default_gates: std::sync::Mutex<super::pools::DefaultGates>,
    pub(super) synced: Synced,
    /// The single admission point: held while admitting, deciding and persisting a grant.
    pub(super) admission: Mutex<PendingWrites>,
    pub(super) drains: Arc<std::sync::Mutex<HashMap<String, DrainState>>>,
    /// While a node drains: a watch on its pods (field-selected) that wakes its reconcile as
    /// soon as a pod is gone, so the drain is event-driven rather than paced by the backoff.
    pub(super) pod_watches: std::sync::Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// A watch on PodDisruptionBudgets: when one allows disruptions again, drains that were
    /// refused with 429 retry at once instead of after their backoff.
    pub(super) pdb_watch: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// The PodDisruptionBudgets (selector and namespace kept), filled by that watch: a drain
    /// pass evicts the pods one budget covers one after another.
    pub(super) budgets: Store<PodDisruptionBudget>,
    pub(super) budgets_writer: std::sync::Mutex<Option<reflector::store::Writer<PodDisruptionBudget>>>,
    /// Bumped by the PodDisruptionBudget watch after each change it stored.
    pub(super) budgets_changed: tokio::sync::watch::Sender<()>,
    pub(super) recorder: EventWriter,
    pub(super) metrics: Arc<Metrics>,
    /// Reconcile these (Waiting) nodes: a slot was released.
    pub(super) wake: mpsc::UnboundedSender<ObjectRef<NixOSNode>>,
    pub(super) leading: Arc<AtomicBool>,
    pub(super) rollout: RolloutFns,
    /// NixOSNodes that follow a source: the effective spec, the groups' pins, the source watches.
    pub(super) follow: super::follow::Following,
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(w) = self.pdb_watch.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
        if let Ok(watches) = self.pod_watches.lock() {
            for w in watches.values() {
                w.abort();
            }
        }
    }
}

/// The pure rollout functions the controller calls: [`crate::rollout::decide`] and
/// [`crate::rollout::admit`] unless a test substitutes its own.
#[derive(Clone, Copy, Debug)]
pub struct RolloutFns {
    pub decide:
        for<'a, 'b> fn(&'a NodeView<'b>, bool, Option<&'a DrainProgress>, &'a Policy, Timestamp) -> Decision,
    pub admit: for<'a, 'b> fn(&'a [NodeView<'b>], &'a ClusterState, &'a Policy, Timestamp) -> Vec<String>,
}

impl Default for RolloutFns {
    fn default() -> Self {
        RolloutFns { decide, admit }
    }
}

/// The watch caches a [`Context`] reads.
#[derive(Clone)]
pub struct Stores {
    pub nixosnodes: Store<NixOSNode>,
    pub nodes: Store<Node>,
    pub pause: Store<ConfigMap>,
    /// NixOSPools; a store no watch fills means no pools.
    pub pools: Store<NixOSPool>,
    /// Becomes true once all four caches hold their first full list.
    pub synced: Synced,
}

/// Whether the watch caches are filled, as a `tokio::sync::watch` flag that any number of
/// tasks can wait on.
///
/// Hand-written instead of `Store::wait_until_ready`: kube-runtime 5 keeps the store's
/// readiness in a oneshot receiver that remembers only the last waker, so when several
/// reconciles wait at once all but one are never woken — at 100 nodes a reconcile that
/// started during the initial list sat out the whole sync timeout (60 s).
#[derive(Clone, Debug)]
pub struct Synced(watch::Receiver<bool>);

impl Synced {
    /// A flag and the handle that raises it once `watches` watches have listed.
    pub fn new(watches: u8) -> (SyncedSetter, Synced) {
        let (tx, rx) = watch::channel(false);
        let setter = SyncedSetter(Arc::new(SetterInner {
            tx,
            listed: AtomicU8::new(0),
            watches,
        }));
        (setter, Synced(rx))
    }

    /// Already synced (stores filled by hand, e.g. in tests).
    pub fn ready() -> Synced {
        Synced(watch::channel(true).1)
    }

    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until synced; false when the setter went away first.
    pub async fn wait(&self) -> bool {
        if self.is_synced() {
            return true;
        }
        let mut rx = self.0.clone();
        rx.wait_for(|s| *s).await.is_ok()
    }
}

/// Raises [`Synced`] once each watch has delivered its first `InitDone`.
#[derive(Clone)]
pub struct SyncedSetter(Arc<SetterInner>);

struct SetterInner {
    tx: watch::Sender<bool>,
    listed: AtomicU8,
    watches: u8,
}

impl SyncedSetter {
    /// Count one watch as listed.
    pub(super) fn listed(&self) {
        let s = &self.0;
        if s.listed.fetch_add(1, Ordering::SeqCst) + 1 == s.watches {
            s.tx.send_replace(true);
        }
    }
}

impl Context {
    /// The same context calling `rollout` instead of the real decision functions (tests).
    pub fn with_rollout(
        client: Client,
        config: ControllerConfig,
        stores: Stores,
        metrics: Arc<Metrics>,
        leading: Arc<AtomicBool>,
        rollout: RolloutFns,
    ) -> (Arc<Context>, mpsc::UnboundedReceiver<ObjectRef<NixOSNode>>) {
        let mut config = config;
        config.rollout = rollout;
        Self::new(client, config, stores, metrics, leading)
    }

    /// A context over `stores`; the receiver yields the Waiting nodes to reconcile after a slot
    /// was released (the controller feeds it to `reconcile_on`).
    pub fn new(
        client: Client,
        config: ControllerConfig,
        stores: Stores,
        metrics: Arc<Metrics>,
        leading: Arc<AtomicBool>,
    ) -> (Arc<Context>, mpsc::UnboundedReceiver<ObjectRef<NixOSNode>>) {
        let rollout = config.rollout;
        let (wake, wake_rx) = mpsc::unbounded_channel();
        let (budgets, budgets_writer) = reflector::store::<PodDisruptionBudget>();
        let recorder = EventWriter::new(client.clone(), CONTROLLER_MANAGER, &config.identity);
        let follow = super::follow::Following::new(
            client.clone(),
            stores.nixosnodes.clone(),
            wake.clone(),
            config.policy.failure_threshold,
        );
        let ctx = Context {
            client,
            config,
            nixosnodes: stores.nixosnodes,
            nodes: stores.nodes,
            pause: stores.pause,
            pools: stores.pools,
            gate_verdicts: std::sync::Mutex::default(),
            default_gates: std::sync::Mutex::default(),
            synced: stores.synced,
            admission: Mutex::new(PendingWrites::default()),
            drains: Arc::default(),
            pod_watches: std::sync::Mutex::default(),
            pdb_watch: std::sync::Mutex::default(),
            budgets,
            budgets_writer: std::sync::Mutex::new(Some(budgets_writer)),
            budgets_changed: tokio::sync::watch::Sender::new(()),
            recorder,
            metrics,
            wake,
            leading,
            rollout,
            follow,
        };
        (Arc::new(ctx), wake_rx)
    }
}

impl Context {
    pub(super) async fn timed<T>(
        &self,
        operation: &'static str,
        node: &str,
        fut: impl Future<Output = T>,
    ) -> Result<T, ControllerError> {
        tokio::time::timeout(self.config.api_timeout, fut)
            .await
            .map_err(|_| ControllerError::Timeout {
                operation,
                node: node.to_string(),
                timeout: self.config.api_timeout,
            })
    }

    pub(super) async fn wait_synced(&self) -> Result<(), ControllerError> {
        let t = self.config.sync_timeout;
        match tokio::time::timeout(t, self.synced.wait()).await {
            Ok(true) => Ok(()),
            _ => Err(ControllerError::StoresNotReady(t)),
        }
    }

    /// The observation of a Node and the resourceVersion it was made from (one snapshot).
    pub(super) fn observe_versioned(&self, name: &str) -> (NodeObservation, Option<String>) {
        let node = self.nodes.get(&ObjectRef::new(name));
        let rv = node.as_ref().and_then(|n| n.metadata.resource_version.clone());
        (observe::observe_node(node.as_deref()), rv)
    }

    pub(super) fn observe(&self, name: &str) -> NodeObservation {
        observe::observe_node(self.nodes.get(&ObjectRef::new(name)).as_deref())
    }

    pub(super) async fn publish(
        &self,
        reference: &ObjectReference,
        action: &str,
        reason: &str,
        note: String,
        warning: bool,
    ) {
        let ev = events::Note {
            reason,
            action,
            note,
            warning,
        };
        match tokio::time::timeout(self.config.api_timeout, self.recorder.publish(&ev, reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(reason, error = %e, "event not recorded"),
            Err(_) => debug!(reason, "event not recorded: timeout"),
        }
    }

    /// The resourceVersion of the Node as the cache shows it (what decisions were made on).
    pub(super) fn node_version(&self, name: &str) -> Option<String> {
        self.nodes
            .get(&ObjectRef::new(name))
            .and_then(|n| n.metadata.resource_version.clone())
    }

    pub(super) fn node_ref(&self, name: &str) -> ObjectReference {
        let uid = self
            .nodes
            .get(&ObjectRef::new(name))
            .and_then(|n| n.metadata.uid.clone());
        ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(name.to_string()),
            uid,
            ..ObjectReference::default()
        }
    }

    pub(super) fn update_phase_gauge(&self) {
        let mut counts: HashMap<Phase, i64> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
        for o in self.nixosnodes.state() {
            if let Some(p) = o.status.as_ref().and_then(|s| s.phase) {
                *counts.entry(p).or_default() += 1;
            }
        }
        let degraded = counts.get(&Phase::Degraded).copied().unwrap_or(0);
        let halted = degraded >= i64::from(self.config.policy.failure_threshold);
        self.metrics.halted.set(i64::from(halted));
        self.metrics.paused.set(i64::from(!self.pause.is_empty()));
        let counts: Vec<(Phase, i64)> = counts.into_iter().collect();
        self.metrics.set_phase_counts(&counts);
    }
}
