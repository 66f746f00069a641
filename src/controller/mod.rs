//! The controller's Kubernetes side: observe → decide → act → write status.
//!
//! * **observe**: reflector stores (trimmed, see [`observe`]) of NixOSNodes, Nodes and the pause
//!   ConfigMap; pods are listed per node only while it drains ([`crate::drain`]).
//! * **decide**: [`crate::rollout::admit`] (under one async mutex, the single admission point,
//!   over the store united with this process's own not-yet-visible writes, see [`admission`])
//!   and [`crate::rollout::decide`].
//! * **write status**: server-side apply of the controller-owned status (never `agent`) under
//!   `nixroll-controller`, *before* acting, so a restart can finish or undo the step.
//! * **act**: cordon / uncordon / one eviction pass / force delete, Events, requeue.
//!
//! One replica leads (a Lease, see [`leader`]); standbys write nothing. [`run`] is usable
//! in-process: no global state, everything in [`ControllerConfig`], clean shutdown.

pub mod admission;
pub mod events;
pub mod follow;
pub mod leader;
pub mod metrics;
pub mod observe;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action as Requeue, Config as ControllerRuntimeConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{debug, info, warn};

use crate::api::{NixOSNode, NixOSNodeStatus, Phase};
use crate::drain::{self, DrainError};
use crate::names::{CONTROLLER_MANAGER, NAMESPACE, PAUSE_CONFIGMAP};
use crate::rollout::{
    Action, ClusterState, Decision, DrainProgress, NodeObservation, NodeView, Policy, admit, decide,
};
use events::EventWriter;

pub use admission::PendingWrites;
pub use leader::{LeaderElectionConfig, LeaderElector, LeaseOutcome};
pub use metrics::{Health, Metrics};

/// Everything `nixroll controller` is configured with.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Budget, failure threshold, phase timeouts, drain backoff.
    pub policy: Policy,
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; `None`: no server (tests).
    pub metrics_addr: Option<SocketAddr>,
    /// `None`: act as leader at once (single replica, tests).
    pub leader_election: Option<LeaderElectionConfig>,
    /// Namespace of the pause ConfigMap (`nixroll-system`).
    pub pause_namespace: String,
    /// Reporting instance of Events and Lease holder identity.
    pub identity: String,
    /// Bound of every single API request.
    pub api_timeout: Duration,
    /// How long a reconcile waits for the stores' first sync before failing (transient).
    pub sync_timeout: Duration,
    /// Parallel reconciles (0: unbounded).
    pub concurrency: u16,
    /// The decision functions; the real ones unless a test substitutes fakes.
    pub rollout: RolloutFns,
    /// First and longest wait between two eviction passes of a draining node.
    pub drain_pass_backoff: (Duration, Duration),
    /// The safety net behind targeted wake-ups: this often, the admission gate runs over the
    /// cache and every Waiting node it admits is reconciled, so a lost wake-up delays a
    /// rollout by at most this long. Costs no API request unless a node is admitted.
    pub admission_sweep: Duration,
    /// Fault injection (tests, simulation): drop every targeted wake-up, as if each one was
    /// lost, so that only the sweep admits Waiting nodes.
    pub lose_wakeups: bool,
    /// Following sources: the FlakeSource controller and the source watches (`follow`).
    pub follow: follow::FollowConfig,
}

impl ControllerConfig {
    pub fn new(identity: &str) -> Self {
        ControllerConfig {
            policy: Policy::default(),
            metrics_addr: None,
            leader_election: None,
            pause_namespace: NAMESPACE.to_string(),
            identity: identity.to_string(),
            api_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(60),
            concurrency: 16,
            rollout: RolloutFns::default(),
            drain_pass_backoff: (Duration::from_secs(2), Duration::from_secs(30)),
            admission_sweep: Duration::from_secs(5),
            lose_wakeups: false,
            follow: follow::FollowConfig::default(),
        }
    }
}

/// `POD_NAME` (or `HOSTNAME`, or `nixroll`) plus a random suffix: unique per process.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "nixroll".to_string());
    let suffix: String = (0..6).map(|_| fastrand::alphanumeric()).collect();
    format!("{base}-{}", suffix.to_lowercase())
}

/// Errors of the controller layer.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("writing the status of {node}: {source}")]
    WriteStatus {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("cordoning node {node}: {source}")]
    Cordon {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("uncordoning node {node}: {source}")]
    Uncordon {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("draining node {node}: {source}")]
    Drain {
        node: String,
        #[source]
        source: DrainError,
    },
    #[error("{operation} on {node} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        node: String,
        timeout: Duration,
    },
    #[error("the watch caches did not sync within {0:?}")]
    StoresNotReady(Duration),
    #[error("leader election: {0}")]
    Lease(#[from] leader::LeaderError),
    #[error("serving metrics on {addr}: {source}")]
    MetricsServer {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ControllerError {
    /// Fixed category: Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ControllerError::WriteStatus { .. } => "StatusWriteFailed",
            ControllerError::Cordon { .. } => "CordonFailed",
            ControllerError::Uncordon { .. } => "UncordonFailed",
            ControllerError::Drain { source, .. } => source.category(),
            ControllerError::Timeout { .. } => "ApiTimeout",
            ControllerError::StoresNotReady(_) => "CacheNotSynced",
            ControllerError::Lease(e) => e.category(),
            ControllerError::MetricsServer { .. } => "MetricsServerFailed",
        }
    }

    /// Transient errors (API 5xx, 429, 409, timeouts, transport) get a short backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            ControllerError::WriteStatus { source, .. }
            | ControllerError::Cordon { source, .. }
            | ControllerError::Uncordon { source, .. } => drain::is_transient_kube(source),
            ControllerError::Drain { source, .. } => source.is_transient(),
            ControllerError::Timeout { .. } | ControllerError::StoresNotReady(_) => true,
            ControllerError::Lease(_) => true,
            ControllerError::MetricsServer { .. } => false,
        }
    }
}

/// In-memory drain bookkeeping of one node (only while Draining).
#[derive(Clone, Debug)]
struct DrainState {
    progress: DrainProgress,
    /// Passes in a row that ended with pods left.
    attempts: u32,
    not_before: Instant,
    /// Wake-ups from the pod and PDB watches so far. A pass compares it before and after: a
    /// wake-up that lands while the pass runs must not be lost to the pass's own backoff.
    wakes: u64,
    /// PodDisruptionBudgets that allowed disruptions again, seen while this node drains. A pass
    /// refused by a PDB (429) that overlaps one looks again at once: the PDB watch only wakes
    /// drains already recorded as blocked, which this pass was not yet.
    pdb_wakes: u64,
}

/// Everything a reconcile needs; one per leadership term.
pub struct Context {
    client: Client,
    config: ControllerConfig,
    nixosnodes: Store<NixOSNode>,
    nodes: Store<Node>,
    pause: Store<ConfigMap>,
    synced: Synced,
    /// The single admission point: held while admitting, deciding and persisting a grant.
    admission: Mutex<PendingWrites>,
    drains: Arc<std::sync::Mutex<HashMap<String, DrainState>>>,
    /// While a node drains: a watch on its pods (field-selected) that wakes its reconcile as
    /// soon as a pod is gone, so the drain is event-driven rather than paced by the backoff.
    pod_watches: std::sync::Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// A watch on PodDisruptionBudgets: when one allows disruptions again, drains that were
    /// refused with 429 retry at once instead of after their backoff.
    pdb_watch: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// The PodDisruptionBudgets (selector and namespace kept), filled by that watch: a drain
    /// pass evicts the pods one budget covers one after another.
    budgets: Store<PodDisruptionBudget>,
    budgets_writer: std::sync::Mutex<Option<reflector::store::Writer<PodDisruptionBudget>>>,
    recorder: EventWriter,
    metrics: Arc<Metrics>,
    /// Reconcile these (Waiting) nodes: a slot was released.
    wake: mpsc::UnboundedSender<ObjectRef<NixOSNode>>,
    leading: Arc<AtomicBool>,
    rollout: RolloutFns,
    /// NixOSNodes that follow a source: the effective spec, the groups' pins, the source watches.
    follow: follow::Following,
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
    /// Becomes true once all three caches hold their first full list.
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
    fn listed(&self) {
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
        let follow = follow::Following::new(
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
            synced: stores.synced,
            admission: Mutex::new(PendingWrites::default()),
            drains: Arc::default(),
            pod_watches: std::sync::Mutex::default(),
            pdb_watch: std::sync::Mutex::default(),
            budgets,
            budgets_writer: std::sync::Mutex::new(Some(budgets_writer)),
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

fn to_std(d: jiff::SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

fn min_requeue(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

fn controller_part(status: &NixOSNodeStatus) -> NixOSNodeStatus {
    let mut s = status.clone();
    s.agent = None;
    s
}

/// Condition reasons as bounded metric labels.
fn failure_category(reason: &str) -> &'static str {
    match reason {
        "StageFailed" => "StageFailed",
        "StageTimeout" => "StageTimeout",
        "DrainTimeout" => "DrainTimeout",
        "DrainFailed" => "DrainFailed",
        "ActivationFailed" => "ActivationFailed",
        "ActivationTimeout" => "ActivationTimeout",
        "RebootTimeout" => "RebootTimeout",
        "BootedWrongSystem" => "BootedWrongSystem",
        "VerifyTimeout" => "VerifyTimeout",
        "NodeNotReady" => "NodeNotReady",
        "RebootRequired" => "RebootRequired",
        _ => "Other",
    }
}

impl Context {
    async fn timed<T>(
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

    async fn wait_synced(&self) -> Result<(), ControllerError> {
        let t = self.config.sync_timeout;
        match tokio::time::timeout(t, self.synced.wait()).await {
            Ok(true) => Ok(()),
            _ => Err(ControllerError::StoresNotReady(t)),
        }
    }

    /// The observation of a Node and the resourceVersion it was made from (one snapshot).
    fn observe_versioned(&self, name: &str) -> (NodeObservation, Option<String>) {
        let node = self.nodes.get(&ObjectRef::new(name));
        let rv = node.as_ref().and_then(|n| n.metadata.resource_version.clone());
        (observe::observe_node(node.as_deref()), rv)
    }

    fn observe(&self, name: &str) -> NodeObservation {
        observe::observe_node(self.nodes.get(&ObjectRef::new(name)).as_deref())
    }

    /// Run the admission gate over every NixOSNode in the store, each with its effective status
    /// (the store united with our own pending writes). Caller holds the admission mutex.
    /// The nodes the gate admits now. `me`: the node asking, which may replace its own
    /// uncertain grant (it is one slot).
    fn admissible(&self, pending: &mut PendingWrites, me: Option<&str>, now: Timestamp) -> Vec<String> {
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
                let effective = if Some(name) == me {
                    pending.effective(name, stored)
                } else {
                    pending.effective_for_admission(name, stored, Instant::now())
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
        let cluster = ClusterState {
            paused: !self.pause.is_empty(),
        };
        (self.rollout.admit)(&views, &cluster, &self.config.policy, now)
    }

    fn drain_progress(&self, name: &str) -> Option<DrainProgress> {
        let drains = self.drains.lock().ok()?;
        drains.get(name).map(|d| d.progress.clone())
    }

    /// Time left before the next eviction pass may run, if any.
    fn drain_wait(&self, name: &str) -> Option<Duration> {
        let drains = self.drains.lock().ok()?;
        let d = drains.get(name)?;
        let left = d.not_before.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// The wake-up counts (any, PDB) of a drain, taken before a pass.
    fn drain_wakes(&self, name: &str) -> (u64, u64) {
        self.drains
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|d| (d.wakes, d.pdb_wakes)))
            .unwrap_or((0, 0))
    }

    /// Record a pass that started at wake-up count `wakes_before`; returns when to look again
    /// (at once when a watch woke the drain while the pass ran).
    fn record_drain(&self, name: &str, progress: DrainProgress, wakes_before: (u64, u64)) -> Duration {
        let (first, max) = self.config.drain_pass_backoff;
        let Ok(mut drains) = self.drains.lock() else {
            return first;
        };
        let (prev, wakes, pdb_wakes) = drains
            .get(name)
            .map_or((0, 0, 0), |d| (d.attempts, d.wakes, d.pdb_wakes));
        let done = progress.remaining == 0;
        let attempts = if done { 0 } else { prev.saturating_add(1) };
        let woken = wakes != wakes_before.0 || (progress.blocked_by_pdb > 0 && pdb_wakes != wakes_before.1);
        let wait = if done || woken {
            Duration::ZERO
        } else {
            first
                .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
                .min(max)
        };
        drains.insert(
            name.to_string(),
            DrainState {
                progress,
                attempts,
                not_before: Instant::now() + wait,
                wakes,
                pdb_wakes,
            },
        );
        wait
    }

    fn clear_drain(&self, name: &str) {
        if let Ok(mut drains) = self.drains.lock() {
            drains.remove(name);
        }
        if let Some(w) = self.pod_watches.lock().ok().and_then(|mut w| w.remove(name)) {
            w.abort();
        }
    }

    /// Start the PodDisruptionBudget watch (once per leadership term). PDBs are few and small;
    /// no cache is kept, each event is looked at and dropped.
    pub fn watch_disruption_budgets(&self) {
        let Ok(mut slot) = self.pdb_watch.lock() else {
            return;
        };
        if slot.is_some() {
            return;
        }
        let Some(writer) = self.budgets_writer.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let api: Api<PodDisruptionBudget> = Api::all(self.client.clone());
        let drains = self.drains.clone();
        let wake = self.wake.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(observe::trim_budget)
                .reflect(writer)
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(pdb) = ev else { continue };
                let allows = pdb.status.as_ref().is_some_and(|st| st.disruptions_allowed > 0);
                if !allows {
                    continue;
                }
                let blocked: Vec<String> = match drains.lock() {
                    Ok(mut d) => d
                        .iter_mut()
                        .filter_map(|(n, s)| {
                            s.pdb_wakes += 1;
                            (s.progress.blocked_by_pdb > 0).then_some((n, s))
                        })
                        .map(|(n, s)| {
                            s.not_before = Instant::now();
                            s.wakes += 1;
                            n.clone()
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                for n in blocked {
                    if wake.send(ObjectRef::new(&n)).is_err() {
                        return;
                    }
                }
            }
        });
        *slot = Some(task.abort_handle());
    }

    /// Start (once per drain) the watch on the pods of `name`: every pod that leaves the
    /// node allows the next eviction pass at once and wakes the node's reconcile.
    fn watch_pods(&self, name: &str) {
        let Ok(mut watches) = self.pod_watches.lock() else {
            return;
        };
        if watches.contains_key(name) {
            return;
        }
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={name}"));
        let drains = self.drains.clone();
        let wake = self.wake.clone();
        let node = name.to_string();
        let task = tokio::spawn(async move {
            let stream = watcher(api, cfg).default_backoff();
            futures::pin_mut!(stream);
            // Pods known on the node; one that appears later (scheduled there before the
            // cordon took effect) needs a pass of its own.
            let mut known: HashSet<(String, String)> = HashSet::new();
            let key = |p: &k8s_openapi::api::core::v1::Pod| (p.namespace().unwrap_or_default(), p.name_any());
            while let Some(ev) = stream.next().await {
                // A pod that left between the last pass and the watch's start shows up as a
                // smaller initial list: look again once the list is in, on every delete and on
                // every newly arrived pod.
                let look = match &ev {
                    Ok(watcher::Event::Delete(p)) => {
                        known.remove(&key(p));
                        true
                    }
                    Ok(watcher::Event::InitApply(p)) => {
                        known.insert(key(p));
                        false
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        known.insert(key(p)) && p.metadata.deletion_timestamp.is_none()
                    }
                    Ok(watcher::Event::InitDone) => true,
                    Ok(watcher::Event::Init) => {
                        known.clear();
                        false
                    }
                    Err(_) => false,
                };
                if look {
                    if let Ok(mut d) = drains.lock()
                        && let Some(s) = d.get_mut(&node)
                    {
                        s.not_before = Instant::now();
                        s.wakes += 1;
                    }
                    if wake.send(ObjectRef::new(&node)).is_err() {
                        return;
                    }
                }
            }
        });
        watches.insert(name.to_string(), task.abort_handle());
    }

    async fn write_status(&self, name: &str, status: &NixOSNodeStatus) -> Result<(), ControllerError> {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let body = serde_json::json!({
            "apiVersion": NixOSNode::api_version(&()),
            "kind": NixOSNode::kind(&()),
            "status": status,
        });
        let pp = PatchParams::apply(CONTROLLER_MANAGER).force();
        self.timed(
            "status write",
            name,
            api.patch_status(name, &pp, &Patch::Apply(&body)),
        )
        .await?
        .map_err(|source| ControllerError::WriteStatus {
            node: name.to_string(),
            source,
        })?;
        Ok(())
    }

    async fn publish(
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
    fn node_version(&self, name: &str) -> Option<String> {
        self.nodes
            .get(&ObjectRef::new(name))
            .and_then(|n| n.metadata.resource_version.clone())
    }

    fn node_ref(&self, name: &str) -> ObjectReference {
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

    /// A slot was released or a blocker went away: send the nodes the gate would admit now
    /// (other than `except`) to the work queue. Only those, not every Waiting node: with 1,000
    /// nodes waiting, waking them all on each release made a rollout O(nodes²) reconciles. A
    /// woken node runs the gate again itself, under the admission lock, before it takes a slot.
    async fn wake_admissible(&self, except: &str) {
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
    async fn sweep(&self) -> Vec<ObjectRef<NixOSNode>> {
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

    fn update_phase_gauge(&self) {
        let mut counts: HashMap<Phase, i64> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
        for o in self.nixosnodes.state() {
            if let Some(p) = o.status.as_ref().and_then(|s| s.phase) {
                *counts.entry(p).or_default() += 1;
            }
        }
        let counts: Vec<(Phase, i64)> = counts.into_iter().collect();
        self.metrics.set_phase_counts(&counts);
    }
}

fn view_of<'a>(o: &'a NixOSNode, status: &'a NixOSNodeStatus, node: &'a NodeObservation) -> NodeView<'a> {
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

/// One reconcile of one NixOSNode.
pub async fn reconcile(obj: Arc<NixOSNode>, ctx: Arc<Context>) -> Result<Requeue, ControllerError> {
    let started = Instant::now();
    let result = reconcile_node(obj, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.update_phase_gauge();
    result
}

async fn reconcile_node(obj: Arc<NixOSNode>, ctx: &Context) -> Result<Requeue, ControllerError> {
    let name = obj.name_any();
    ctx.wait_synced().await?;
    if !ctx.leading.load(Ordering::SeqCst) {
        return Ok(Requeue::await_change());
    }
    let obj = ctx.nixosnodes.get(&ObjectRef::new(&name)).unwrap_or(obj);
    // A node following a source works with its group's pinned revision (docs/source.md).
    let obj = match ctx.follow.effective(obj.clone()) {
        Ok(o) => o,
        Err(e) => {
            // Only a node that never started has nothing to target: say why in its status.
            debug!(error = %e, "nothing to roll out yet");
            let mut st = controller_part(obj.status.as_ref().unwrap_or(&NixOSNodeStatus::default()));
            let message = e.to_string();
            if st.phase.is_none() && st.message.as_deref() != Some(message.as_str()) {
                st.message = Some(message);
                st.observed_generation = obj.metadata.generation;
                ctx.write_status(&name, &st).await?;
                ctx.admission.lock().await.record(&name, &st);
            }
            return Ok(Requeue::await_change());
        }
    };
    let now = Timestamp::now();
    let (observation, node_version) = ctx.observe_versioned(&name);
    let stored = obj.status.clone().unwrap_or_default();

    // Our own last write is the truth while the store lags behind it.
    let mut gate = ctx.admission.lock().await;
    let status = gate.effective(&name, &stored).unwrap_or(stored);
    // A Waiting node the gate returns is admitted, also when it already holds its slot (a
    // retried node that stayed cordoned: docs/rollout.md, "Re-admission"). The gate runs only
    // for Waiting nodes.
    let admitted = status.phase == Some(Phase::Waiting)
        && crate::rollout::is_admitted(
            &view_of(&obj, &status, &observation),
            &ctx.admissible(&mut gate, Some(&name), now),
        );
    let gate = if admitted {
        Some(gate)
    } else {
        drop(gate);
        None
    };

    let drain_progress = if status.phase == Some(Phase::Draining) {
        ctx.drain_progress(&name)
    } else {
        None
    };
    let view = view_of(&obj, &status, &observation);
    let decision: Decision =
        (ctx.rollout.decide)(&view, admitted, drain_progress.as_ref(), &ctx.config.policy, now);
    execute_with_gate(ctx, &obj, &status, decision, gate, node_version).await
}

/// Perform a decision for `obj` whose current controller-owned status is `current`: persist
/// `decision.status` (when it changed), then the actions in order, then the notes as Events.
/// Exactly what the decision says, nothing more. Public for request-level tests.
pub async fn execute(
    ctx: &Context,
    obj: &NixOSNode,
    current: &NixOSNodeStatus,
    decision: Decision,
) -> Result<Requeue, ControllerError> {
    let node_version = ctx.node_version(&obj.name_any());
    execute_with_gate(ctx, obj, current, decision, None, node_version).await
}

async fn execute_with_gate(
    ctx: &Context,
    obj: &NixOSNode,
    current: &NixOSNodeStatus,
    mut decision: Decision,
    gate: Option<tokio::sync::MutexGuard<'_, PendingWrites>>,
    // The Node's resourceVersion the decision saw: cordon and uncordon are conditional on it.
    node_version: Option<String>,
) -> Result<Requeue, ControllerError> {
    let name = obj.name_any();
    let now = Timestamp::now();
    decision.status.agent = None;
    let before = controller_part(current);

    // Persist intent first (under the admission gate when this is a grant).
    if before != decision.status {
        if !ctx.leading.load(Ordering::SeqCst) {
            return Ok(Requeue::await_change());
        }
        match gate {
            Some(mut gate) => match ctx.write_status(&name, &decision.status).await {
                Ok(()) => gate.record(&name, &decision.status),
                Err(e) => {
                    // The grant may have landed (e.g. a timeout after sending): keep counting it
                    // until the watch shows it or the uncertainty window passes.
                    let until = Instant::now() + ctx.config.api_timeout.saturating_mul(6);
                    gate.record_uncertain(&name, &decision.status, until);
                    return Err(e);
                }
            },
            None => {
                ctx.write_status(&name, &decision.status).await?;
                ctx.admission.lock().await.record(&name, &decision.status);
            }
        }
        info!(node = %name, from = ?before.phase, phase = ?decision.status.phase, "status written");
        observe_transition(ctx, &before, &decision.status, now);
        let held = before.slot.is_some() || before.phase.is_some_and(Phase::is_disruptive);
        let holds = decision.status.slot.is_some() || decision.status.phase.is_some_and(Phase::is_disruptive);
        let left = |p: Phase| before.phase == Some(p) && decision.status.phase != Some(p);
        // Admission waits for every node to finish staging and for Degraded nodes to recover:
        // when one does, the Waiting nodes get another look.
        let unblocks_others = left(Phase::Degraded) || left(Phase::Staging);
        if (held && !holds) || unblocks_others {
            ctx.wake_admissible(&name).await;
        }
    } else {
        drop(gate);
    }

    let mut requeue = decision.requeue_after.map(to_std);
    let policy = obj.spec.drain.clone().unwrap_or_default();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    for action in &decision.actions {
        if !ctx.leading.load(Ordering::SeqCst) {
            return Ok(Requeue::await_change());
        }
        match action {
            Action::Cordon | Action::Uncordon => {
                let cordon = *action == Action::Cordon;
                if !set_cordon_and_tell(ctx, &nodes, &name, cordon, node_version.clone()).await? {
                    // Decided on an older Node (for an uncordon usually our own earlier one,
                    // not yet in the cache): look again once the cache has the new one (its
                    // watch event usually triggers that sooner). No later action runs.
                    requeue = min_requeue(requeue, NODE_CHANGED_RECHECK);
                    break;
                }
            }
            Action::Evict | Action::ForceDelete => {
                if let Some(wait) = ctx.drain_wait(&name) {
                    requeue = min_requeue(requeue, wait);
                    continue;
                }
                let force = *action == Action::ForceDelete;
                let wakes_before = ctx.drain_wakes(&name);
                let pass = if force {
                    drain::force_delete_pass(&ctx.client, &name, &policy, ctx.config.api_timeout).await
                } else {
                    let budgets = ctx.budgets.state();
                    drain::evict_pass_with(&ctx.client, &name, &policy, &budgets, ctx.config.api_timeout)
                        .await
                };
                let progress = pass.map_err(|source| ControllerError::Drain {
                    node: name.clone(),
                    source,
                })?;
                debug!(node = %name, action = ?action, remaining = progress.remaining, blocked_by_pdb = progress.blocked_by_pdb, refused = progress.refused.len(), "drain pass");
                let (reason, warning) =
                    match (force, progress.blocked_by_pdb > 0, progress.refused.is_empty()) {
                        (true, _, _) => ("ForceDeleting", true),
                        (false, true, _) => ("EvictionBlocked", true),
                        (false, false, false) => ("DrainRefused", true),
                        (false, false, true) => ("Draining", false),
                    };
                let note = format!(
                    "{} pods left, {} blocked by a PodDisruptionBudget{}",
                    progress.remaining,
                    progress.blocked_by_pdb,
                    progress
                        .refused
                        .first()
                        .map(|r| format!("; refused {r}"))
                        .unwrap_or_default()
                );
                ctx.publish(&ctx.node_ref(&name), "Drain", reason, note, warning)
                    .await;
                let remaining = progress.remaining;
                let wait = ctx.record_drain(&name, progress, wakes_before);
                if remaining > 0 {
                    // After recording, so the watch's first wake-up finds the drain's state.
                    ctx.watch_pods(&name);
                }
                requeue = min_requeue(requeue, wait);
            }
        }
    }
    if decision.status.phase != Some(Phase::Draining) {
        ctx.clear_drain(&name);
    }

    let reference = obj.object_ref(&());
    for n in &decision.notes {
        ctx.publish(&reference, "Reconcile", &n.reason, n.message.clone(), n.warning)
            .await;
    }
    Ok(match requeue {
        Some(d) => Requeue::requeue(d),
        None => Requeue::await_change(),
    })
}

fn observe_transition(ctx: &Context, before: &NixOSNodeStatus, after: &NixOSNodeStatus, now: Timestamp) {
    if before.phase == after.phase {
        return;
    }
    if let (Some(phase), Some(since)) = (before.phase, before.last_transition_time.as_ref()) {
        let secs = now.duration_since(since.0).as_secs_f64().max(0.0);
        ctx.metrics
            .phase_duration
            .get_or_create(&metrics::PhaseLabel {
                phase: phase.as_str(),
            })
            .observe(secs);
    }
    if after.phase == Some(Phase::Degraded) {
        let reason = after
            .failed
            .as_ref()
            .map_or("Other", |f| failure_category(&f.reason));
        ctx.metrics
            .failures
            .get_or_create(&metrics::CategoryLabel { category: reason })
            .inc();
    }
}

/// Requeue policy after an error: short for transient errors, long for permanent ones.
pub fn error_policy(obj: Arc<NixOSNode>, err: &ControllerError, ctx: Arc<Context>) -> Requeue {
    let category = err.category();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&metrics::CategoryLabel { category })
        .inc();
    warn!(node = %obj.name_any(), category, transient = err.is_transient(), error = %err, "reconcile failed");
    let jitter = Duration::from_millis(fastrand::u64(0..1000));
    if err.is_transient() {
        Requeue::requeue(Duration::from_secs(5) + jitter)
    } else {
        Requeue::requeue(Duration::from_secs(60) + jitter)
    }
}

type StopSignal = Shared<BoxFuture<'static, ()>>;

fn stop_signal(rx: &watch::Receiver<bool>) -> StopSignal {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
    .boxed()
    .shared()
}

/// When a conditional cordon or uncordon met a newer Node: decide again this soon at the latest.
const NODE_CHANGED_RECHECK: Duration = Duration::from_secs(1);

/// Cordon or uncordon `name` (see [`set_cordon`]), log it and record an Event on the Node.
/// `Ok(false)`: skipped, the Node changed since the decision (409).
async fn set_cordon_and_tell(
    ctx: &Context,
    nodes: &Api<Node>,
    name: &str,
    cordon: bool,
    seen: Option<String>,
) -> Result<bool, ControllerError> {
    let (op, what, reason, note) = if cordon {
        (
            "cordon",
            "Cordon",
            "Cordoned",
            format!("nixroll cordoned {name} for a NixOS rollout"),
        )
    } else {
        (
            "uncordon",
            "Uncordon",
            "Uncordoned",
            format!("nixroll uncordoned {name}"),
        )
    };
    let result = ctx.timed(op, name, set_cordon(nodes, name, cordon, seen)).await?;
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(node = %name, action = what, "skipped: the Node changed since the decision");
            return Ok(false);
        }
        Err(source) => {
            let node = name.to_string();
            return Err(if cordon {
                ControllerError::Cordon { node, source }
            } else {
                ControllerError::Uncordon { node, source }
            });
        }
    }
    info!(node = %name, action = what, "node {op}ed");
    ctx.publish(&ctx.node_ref(name), what, reason, note, false).await;
    Ok(true)
}

/// Cordon (with nixroll's mark) or uncordon (removing it) in one merge patch, so the mark and
/// the cordon can never disagree because of a crash between two writes. `seen`: the Node's
/// resourceVersion the decision was made on; the patch is refused (409, retried) if the Node
/// changed since, so an admin's cordon that the cache has not shown yet is never marked as
/// nixroll's, nor lifted.
async fn set_cordon(
    nodes: &Api<Node>,
    name: &str,
    cordon: bool,
    seen: Option<String>,
) -> Result<Node, kube::Error> {
    let mark = if cordon {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let mut patch = serde_json::json!({
        "metadata": {"annotations": {crate::names::CORDON_ANNOTATION: mark}},
        "spec": {"unschedulable": cordon},
    });
    if let Some(rv) = seen {
        patch["metadata"]["resourceVersion"] = serde_json::json!(rv);
    }
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

/// An `inspect` callback counting a watch as listed at its first `InitDone`.
fn counts_listing<K>(set: SyncedSetter) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    let mut done = false;
    move |ev| {
        if !done && matches!(ev, Ok(watcher::Event::InitDone)) {
            done = true;
            set.listed();
        }
    }
}

/// Only forward Node events that change what the rollout observes (heartbeats do not).
fn node_triggers(
    stream: impl futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<Node, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<String, NodeObservation> = HashMap::new();
    stream.flat_map(move |ev| {
        let out: Vec<Result<Node, watcher::Error>> = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                let obs = observe::observe_node(Some(&n));
                let name = n.name_any();
                if seen.get(&name) == Some(&obs) {
                    Vec::new()
                } else {
                    seen.insert(name, obs);
                    vec![Ok(n)]
                }
            }
            Ok(watcher::Event::Delete(n)) => {
                seen.remove(&n.name_any());
                vec![Ok(n)]
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => Vec::new(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(out)
    })
}

/// Lead: run the kube-runtime Controller until `stop` (graceful) or until dropped (forceful).
async fn lead(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    leading: Arc<AtomicBool>,
    stop: StopSignal,
) {
    // Readiness comes from the watch streams themselves: each counts once when its first
    // list is in the store (the `InitDone` after `reflect`).
    let (set_synced, synced) = Synced::new(3);
    let (nxn_reader, nxn_writer) = reflector::store::<NixOSNode>();
    let nxn_stream = watcher(Api::<NixOSNode>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(observe::trim_nixosnode)
        .reflect(nxn_writer)
        .inspect(counts_listing(set_synced.clone()))
        .applied_objects();

    let (node_reader, node_writer) = reflector::store::<Node>();
    let node_stream = node_triggers(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(observe::trim_node)
            .reflect(node_writer)
            .inspect(counts_listing(set_synced.clone())),
    );

    let (pause_reader, pause_writer) = reflector::store::<ConfigMap>();
    let pause_stream = watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &config.pause_namespace),
        watcher::Config::default().fields(&format!("metadata.name={PAUSE_CONFIGMAP}")),
    )
    .default_backoff()
    .modify(|cm: &mut ConfigMap| {
        cm.metadata.managed_fields = None;
        cm.data = None;
        cm.binary_data = None;
    })
    .reflect(pause_writer)
    .inspect(counts_listing(set_synced.clone()))
    .touched_objects()
    .filter_map(|r| std::future::ready(r.ok().map(|_| ())));

    let concurrency = config.concurrency;
    let stores = Stores {
        nixosnodes: nxn_reader,
        nodes: node_reader,
        pause: pause_reader,
        synced: synced.clone(),
    };
    let (ctx, wake_rx) = Context::new(client, config, stores, metrics, leading);
    ctx.watch_disruption_budgets();
    ctx.follow.start(&ctx.config.follow, ctx.config.api_timeout).await;
    let wake_stream =
        futures::stream::unfold(wake_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });

    // Triggers that arrive while the caches are still filling (the initial list) find nothing
    // in the store and are dropped by kube-runtime; so once the caches are synced, every
    // NixOSNode is reconciled once.
    let (resync_tx, resync_rx) = tokio::sync::oneshot::channel::<()>();
    let synced = {
        let health = health.clone();
        async move {
            if synced.wait().await {
                info!("watch caches synced");
                health.synced.store(true, Ordering::SeqCst);
                let _ = resync_tx.send(());
            }
        }
    };
    let resync_stream = futures::stream::once(resync_rx).filter_map(|r| std::future::ready(r.ok()));
    let pause_stream = futures::stream::select(pause_stream, resync_stream);

    // The safety net: however a wake-up got lost, an admissible node waits one sweep at most.
    let sweep_stream = {
        let ctx = ctx.clone();
        let mut every = tokio::time::interval(ctx.config.admission_sweep.max(Duration::from_millis(100)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        futures::stream::unfold((every, ctx), |(mut every, ctx)| async move {
            every.tick().await;
            let refs = ctx.sweep().await;
            Some((futures::stream::iter(refs), (every, ctx)))
        })
        .flatten()
    };

    let controller = Controller::for_stream(nxn_stream, ctx.nixosnodes.clone())
        .watches_stream(node_stream, |n: Node| {
            Some(ObjectRef::<NixOSNode>::new(&n.name_any()))
        })
        .reconcile_all_on(pause_stream)
        .reconcile_on(wake_stream)
        .reconcile_on(sweep_stream)
        .with_config(ControllerRuntimeConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(e) = res {
                debug!(error = %e, "controller stream");
            }
            std::future::ready(())
        });
    futures::future::join(controller, synced).await;
    health.synced.store(false, Ordering::SeqCst);
}

/// Keep renewing; return when leadership is lost (held by another, or no renewal succeeded
/// within the renew deadline).
async fn keep_lease(elector: &mut LeaderElector) {
    let cfg = elector.config().clone();
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_period).await;
        let left = cfg.renew_deadline.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(left.max(Duration::from_millis(1)), elector.try_acquire_or_renew()).await {
            Ok(Ok(LeaseOutcome::Renewed | LeaseOutcome::Acquired)) => last_ok = Instant::now(),
            Ok(Ok(LeaseOutcome::HeldByOther { holder, .. })) => {
                warn!(holder, "lease taken by another replica");
                return;
            }
            Ok(Ok(LeaseOutcome::LostRace)) => debug!("lease renewal conflicted; retrying"),
            Ok(Err(e)) => warn!(category = e.category(), error = %e, "lease renewal failed"),
            Err(_) => debug!("lease renewal timed out"),
        }
        if last_ok.elapsed() >= cfg.renew_deadline {
            warn!("no lease renewal within the deadline");
            return;
        }
    }
}

/// Wait until this replica holds the Lease. `Ok(false)`: stopped first.
async fn acquire(elector: &mut LeaderElector, stop: StopSignal) -> bool {
    let retry = elector.config().renew_period;
    loop {
        let step = tokio::select! {
            _ = stop.clone() => return false,
            r = elector.try_acquire_or_renew() => r,
        };
        let wait = match step {
            Ok(LeaseOutcome::Acquired | LeaseOutcome::Renewed) => return true,
            Ok(LeaseOutcome::HeldByOther { holder, retry_in }) => {
                debug!(holder, ?retry_in, "standing by");
                retry_in
            }
            Ok(LeaseOutcome::LostRace) => Duration::from_millis(fastrand::u64(100..500)),
            Err(e) => {
                warn!(category = e.category(), error = %e, "lease acquisition failed");
                retry
            }
        };
        tokio::select! {
            _ = stop.clone() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Run the controller until `shutdown` resolves: serve metrics, take part in leader election
/// (when configured) and reconcile while leading. Returns after a clean shutdown (in-flight
/// reconciles finished, Lease released).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControllerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let main = run_until_stopped(client, config, stop_rx);
    tokio::pin!(main);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut main => return r,
        _ = &mut shutdown => {
            info!("shutting down");
            let _ = stop_tx.send(true);
        }
    }
    main.await
}

async fn run_until_stopped(
    client: Client,
    config: ControllerConfig,
    stop_rx: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    if let Some(addr) = config.metrics_addr {
        let (local, _server) = metrics::serve(addr, metrics.clone(), health.clone(), stop_signal(&stop_rx))
            .await
            .map_err(|source| ControllerError::MetricsServer { addr, source })?;
        info!(%local, "serving metrics");
    }
    let leading = Arc::new(AtomicBool::new(false));
    let Some(le) = config.leader_election.clone() else {
        leading.store(true, Ordering::SeqCst);
        lead(client, config, metrics, health, leading, stop_signal(&stop_rx)).await;
        return Ok(());
    };
    let mut elector = LeaderElector::new(client.clone(), le, config.api_timeout);
    loop {
        health.standby.store(true, Ordering::SeqCst);
        if !acquire(&mut elector, stop_signal(&stop_rx)).await {
            return Ok(());
        }
        health.standby.store(false, Ordering::SeqCst);
        leading.store(true, Ordering::SeqCst);
        info!(identity = %config.identity, "leading");
        let controller = lead(
            client.clone(),
            config.clone(),
            metrics.clone(),
            health.clone(),
            leading.clone(),
            stop_signal(&stop_rx),
        );
        let lost = tokio::select! {
            _ = controller => false,
            _ = keep_lease(&mut elector) => true,
        };
        leading.store(false, Ordering::SeqCst);
        health.synced.store(false, Ordering::SeqCst);
        if !lost {
            if let Err(e) = elector.release().await {
                warn!(category = e.category(), error = %e, "could not release the lease");
            }
            return Ok(());
        }
        warn!("lost leadership; stopped reconciling, standing by");
        if *stop_rx.borrow() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::api::NixOSNodeSpec;

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
            let mut o = NixOSNode::new(
                &name,
                NixOSNodeSpec {
                    flake: "github:me/infra".into(),
                    revision: "c".repeat(40),
                    source_ref: None,
                    configuration: None,
                    maintenance_windows: Vec::new(),
                    reboot: Default::default(),
                    drain: None,
                    suspend: false,
                    secrets: Vec::new(),
                },
            );
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

    fn empty_context() -> Arc<Context> {
        let (svc, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let (nixosnodes, _) = reflector::store::<NixOSNode>();
        let (nodes, _) = reflector::store::<Node>();
        let (pause, _) = reflector::store::<ConfigMap>();
        let stores = Stores {
            nixosnodes,
            nodes,
            pause,
            synced: Synced::ready(),
        };
        let metrics = Arc::new(Metrics::new());
        let leading = Arc::new(AtomicBool::new(true));
        Context::new(
            Client::new(svc, "default"),
            ControllerConfig::new("t"),
            stores,
            metrics,
            leading,
        )
        .0
    }

    /// Every task waiting for the caches is woken (kube-runtime's `wait_until_ready` wakes only
    /// the last one to poll), and readiness needs the first list of all three watches.
    #[tokio::test]
    async fn synced_wakes_every_waiter_once_all_watches_listed() {
        let (set, synced) = Synced::new(3);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let s = synced.clone();
                tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(5), s.wait()).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let mut nxn = counts_listing::<NixOSNode>(set.clone());
        let mut nodes = counts_listing::<Node>(set.clone());
        let mut pause = counts_listing::<ConfigMap>(set.clone());
        nxn(&Ok(watcher::Event::InitDone));
        nxn(&Ok(watcher::Event::InitDone)); // a relist does not count twice
        nodes(&Ok(watcher::Event::Init));
        nodes(&Ok(watcher::Event::InitDone));
        assert!(!synced.is_synced(), "the pause watch has not listed yet");
        pause(&Ok(watcher::Event::InitDone));
        assert!(synced.is_synced());
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(true), "a waiter was not woken");
        }
    }

    /// A wake-up (pod gone, PDB allows again) that lands while an eviction pass runs makes the
    /// next pass run at once instead of after the pass's backoff.
    #[tokio::test]
    async fn a_drain_wake_during_a_pass_is_not_lost() {
        let ctx = empty_context();
        let left = DrainProgress {
            remaining: 3,
            ..DrainProgress::default()
        };
        // Passes with pods left back off.
        let before = ctx.drain_wakes("n");
        assert!(ctx.record_drain("n", left.clone(), before) > Duration::ZERO);
        assert!(ctx.drain_wait("n").is_some());
        // The next pass starts; while it runs, the pod watch wakes the drain.
        let before = ctx.drain_wakes("n");
        if let Some(d) = ctx.drains.lock().unwrap().get_mut("n") {
            d.not_before = Instant::now();
            d.wakes += 1;
        }
        assert_eq!(ctx.record_drain("n", left.clone(), before), Duration::ZERO);
        assert!(ctx.drain_wait("n").is_none(), "look again at once");
        // A pass without a wake-up backs off again.
        let before = ctx.drain_wakes("n");
        assert!(ctx.record_drain("n", left.clone(), before) > Duration::ZERO);
        // A PDB that allows disruptions again during a pass: only a pass refused by a PDB
        // looks again at once.
        let blocked = DrainProgress {
            remaining: 3,
            blocked_by_pdb: 1,
            ..DrainProgress::default()
        };
        for (progress, at_once) in [(left, false), (blocked, true)] {
            let before = ctx.drain_wakes("n");
            if let Some(d) = ctx.drains.lock().unwrap().get_mut("n") {
                d.pdb_wakes += 1;
            }
            let wait = ctx.record_drain("n", progress, before);
            assert_eq!(wait == Duration::ZERO, at_once, "{wait:?}");
        }
    }
}
