//! Simulated kubelets, scheduler and ReplicaSet controller, talking to an API server through
//! the ordinary `kube` client (so they exercise the same HTTP path as the controller).
//!
//! * Nodes: created Ready with a boot id; [`SimCluster::reboot`] turns a node NotReady, waits
//!   the simulated reboot time, then reports the new boot id and Ready again.
//! * Pods: a pod that gets a `deletionTimestamp` (eviction or graceful delete) finishes
//!   terminating after the simulated termination time (the kubelet's final delete with grace
//!   period 0); a terminating pod owned by a ReplicaSet is replaced on another schedulable,
//!   Ready node and becomes Ready after the simulated start-up time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

/// Namespace of the simulated workloads.
pub const WORKLOAD_NAMESPACE: &str = "demo";

/// Simulated durations (wall clock).
#[derive(Clone, Debug)]
pub struct Timing {
    pub pod_termination: Duration,
    pub pod_startup: Duration,
    pub reboot: Duration,
    /// Per API call.
    pub request_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pod_termination: Duration::from_millis(150),
            pod_startup: Duration::from_millis(250),
            reboot: Duration::from_millis(1200),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// One application: a ReplicaSet with `replicas` pods and a PodDisruptionBudget.
#[derive(Clone, Debug)]
pub struct App {
    pub name: String,
    pub replicas: usize,
    /// `minAvailable` of its PDB (None: no PDB).
    pub min_available: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulated cluster: {operation} failed: {source}")]
    Api {
        operation: String,
        #[source]
        source: kube::Error,
    },
    #[error("simulated cluster: {operation} timed out")]
    Timeout { operation: String },
}

async fn call<T>(
    operation: impl Into<String>,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, SimError> {
    let operation = operation.into();
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(SimError::Api { operation, source }),
        Err(_) => Err(SimError::Timeout { operation }),
    }
}

/// Handle to the simulated kubelets & co.
#[derive(Clone)]
pub struct SimCluster {
    client: Client,
    timing: Timing,
    /// Nodes currently rebooting (pods are not scheduled there).
    rebooting: Arc<Mutex<HashSet<String>>>,
    /// Pods whose termination / replacement is already in hand.
    handled: Arc<Mutex<HashSet<String>>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    /// The scheduler's view of nodes and pods, fed by the watches in [`SimCluster::run`] (like
    /// the real scheduler's informer cache), so placing a pod costs no API request.
    sched: Arc<std::sync::Mutex<SchedCache>>,
}

/// Which nodes can take pods and how many pods each runs.
#[derive(Default)]
struct SchedCache {
    /// Node name → schedulable (not cordoned) and Ready.
    nodes: BTreeMap<String, bool>,
    /// "namespace/name" → node, for the pods not yet fully deleted.
    pods: HashMap<String, String>,
    /// Node → number of pods on it.
    load: HashMap<String, usize>,
}

impl SchedCache {
    fn place(&mut self, pod: &str, node: Option<&str>) {
        if let Some(old) = self.pods.remove(pod)
            && let Some(n) = self.load.get_mut(&old)
        {
            *n = n.saturating_sub(1);
        }
        if let Some(node) = node.filter(|n| !n.is_empty()) {
            self.pods.insert(pod.to_owned(), node.to_owned());
            *self.load.entry(node.to_owned()).or_default() += 1;
        }
    }

    fn clear_pods(&mut self) {
        self.pods.clear();
        self.load.clear();
    }

    /// The least loaded usable node other than `avoid` and the `rebooting` ones (ties broken by
    /// name); the pod is counted there at once (the scheduler's "assume").
    fn pick(&mut self, pod: &str, avoid: &str, rebooting: &HashSet<String>) -> Option<String> {
        let node = self
            .nodes
            .iter()
            .filter(|(n, usable)| **usable && n.as_str() != avoid && !rebooting.contains(n.as_str()))
            .min_by_key(|(n, _)| (self.load.get(n.as_str()).copied().unwrap_or(0), n.as_str()))
            .map(|(n, _)| n.clone())?;
        self.place(pod, Some(&node));
        Some(node)
    }
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

impl SimCluster {
    pub fn new(client: Client, timing: Timing) -> Self {
        SimCluster {
            client,
            timing,
            rebooting: Arc::default(),
            handled: Arc::default(),
            seq: Arc::default(),
            sched: Arc::default(),
        }
    }

    fn t(&self) -> Duration {
        self.timing.request_timeout
    }

    /// Create the Node objects, Ready, with the given boot ids. `control_plane` nodes get the
    /// k3s server labels.
    pub async fn create_nodes(&self, nodes: &[(String, bool, String)]) -> Result<(), SimError> {
        let api: Api<Node> = Api::all(self.client.clone());
        for (name, control_plane, boot_id) in nodes {
            let mut labels = BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
            ]);
            if *control_plane {
                labels.insert(crate::names::CONTROL_PLANE_LABEL.to_string(), "true".to_string());
                labels.insert(crate::names::MASTER_LABEL.to_string(), "true".to_string());
            }
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {},
            }))
            .map_err(|e| SimError::Api {
                operation: format!("build node {name}"),
                source: kube::Error::SerdeError(e),
            })?;
            call(
                format!("create node {name}"),
                self.t(),
                api.create(&PostParams::default(), &node),
            )
            .await?;
            self.set_node_status(name, true, boot_id).await?;
        }
        Ok(())
    }

    /// Report the Node's Ready condition and boot id (the kubelet's status update).
    pub async fn set_node_status(&self, name: &str, ready: bool, boot_id: &str) -> Result<(), SimError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let now = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let (status, reason, message) = if ready {
            ("True", "KubeletReady", "kubelet is posting ready status")
        } else {
            ("False", "KubeletNotReady", "node is rebooting")
        };
        let patch = json!({"status": {
            "conditions": [{
                "type": "Ready", "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now.to_string(), "lastTransitionTime": now.to_string(),
            }],
            "nodeInfo": {
                "bootID": boot_id, "machineID": name, "systemUUID": name,
                "kernelVersion": "6.12.0", "osImage": "NixOS", "containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": "v1.33.5+k3s1", "kubeProxyVersion": "v1.33.5+k3s1",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }});
        call(
            format!("update node status {name}"),
            self.t(),
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    /// Simulate a reboot of `node`: NotReady, wait, run `boot` (which must return the new boot
    /// id, e.g. by rebooting the simulated host), Ready again with that boot id.
    pub async fn reboot<F>(&self, node: &str, old_boot_id: &str, boot: F) -> Result<String, SimError>
    where
        F: FnOnce() -> String,
    {
        self.rebooting.lock().await.insert(node.to_string());
        self.set_node_status(node, false, old_boot_id).await?;
        tokio::time::sleep(self.timing.reboot).await;
        let new_boot_id = boot();
        let res = self.set_node_status(node, true, &new_boot_id).await;
        self.rebooting.lock().await.remove(node);
        res.map(|()| new_boot_id)
    }

    /// Create the workload namespace, one DaemonSet pod per node (skipped by drains), and the
    /// apps spread round-robin over the nodes.
    pub async fn create_workloads(&self, nodes: &[String], apps: &[App]) -> Result<usize, SimError> {
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        for ns in [WORKLOAD_NAMESPACE, crate::names::NAMESPACE] {
            let obj: Namespace =
                serde_json::from_value(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name": ns}}))
                    .map_err(|e| SimError::Api {
                        operation: "build namespace".into(),
                        source: kube::Error::SerdeError(e),
                    })?;
            match call(
                format!("create namespace {ns}"),
                self.t(),
                ns_api.create(&PostParams::default(), &obj),
            )
            .await
            {
                Ok(_) => {}
                Err(SimError::Api {
                    source: kube::Error::Api(s),
                    ..
                }) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        let mut pods = Vec::new();
        // A DaemonSet (the agent's), one pod per node.
        let ds_api: Api<DaemonSet> = Api::namespaced(self.client.clone(), crate::names::NAMESPACE);
        let ds: DaemonSet = from_json(json!({
            "apiVersion":"apps/v1","kind":"DaemonSet",
            "metadata":{"name":"nixroll-agent","namespace":crate::names::NAMESPACE},
            "spec":{"selector":{"matchLabels":{"app":"nixroll-agent"}},
                    "template":{"metadata":{"labels":{"app":"nixroll-agent"}},"spec":{"containers":[{"name":"agent","image":"nixroll"}]}}}
        }))?;
        // On a real API server `kubectl apply -k deploy/` created it already (no DaemonSet
        // controller runs there: the pods below are this simulation's).
        let ds = match call(
            "create daemonset",
            self.t(),
            ds_api.create(&PostParams::default(), &ds),
        )
        .await
        {
            Err(SimError::Api {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 409 => call("get daemonset", self.t(), ds_api.get("nixroll-agent")).await?,
            other => other?,
        };
        let ds_uid = ds.uid().unwrap_or_default();
        for node in nodes {
            let mut pod = pod_json(
                crate::names::NAMESPACE,
                &format!("nixroll-agent-{node}"),
                node,
                "nixroll-agent",
                ("DaemonSet", "nixroll-agent", &ds_uid),
            );
            // The agent's identity: on a real API server its token is bound to this pod.
            pod["spec"]["serviceAccountName"] = json!(crate::names::AGENT_SERVICE_ACCOUNT);
            pod["spec"]["automountServiceAccountToken"] = json!(false);
            pods.push(pod);
        }
        let rs_api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), WORKLOAD_NAMESPACE);
        let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), WORKLOAD_NAMESPACE);
        let mut i = 0usize;
        for app in apps {
            let rs: ReplicaSet = from_json(json!({
                "apiVersion":"apps/v1","kind":"ReplicaSet",
                "metadata":{"name": app.name, "namespace": WORKLOAD_NAMESPACE},
                "spec":{"replicas": app.replicas, "selector":{"matchLabels":{"app": app.name}},
                        "template":{"metadata":{"labels":{"app": app.name}},"spec":{"containers":[{"name":"app","image":"app"}]}}}
            }))?;
            let rs = call(
                format!("create replicaset {}", app.name),
                self.t(),
                rs_api.create(&PostParams::default(), &rs),
            )
            .await?;
            let rs_uid = rs.uid().unwrap_or_default();
            if let Some(min) = app.min_available {
                let pdb: PodDisruptionBudget = from_json(json!({
                    "apiVersion":"policy/v1","kind":"PodDisruptionBudget",
                    "metadata":{"name": app.name, "namespace": WORKLOAD_NAMESPACE},
                    "spec":{"minAvailable": min, "selector":{"matchLabels":{"app": app.name}}}
                }))?;
                call(
                    format!("create pdb {}", app.name),
                    self.t(),
                    pdb_api.create(&PostParams::default(), &pdb),
                )
                .await?;
            }
            for r in 0..app.replicas {
                let node = &nodes[i % nodes.len().max(1)];
                i += 1;
                let pod = pod_json(
                    WORKLOAD_NAMESPACE,
                    &format!("{}-{r}", app.name),
                    node,
                    &app.name,
                    ("ReplicaSet", &app.name, &rs_uid),
                );
                pods.push(pod);
            }
        }
        let created = pods.len();
        // Like a cluster's many kubelets: pods come up concurrently.
        futures::stream::iter(pods)
            .map(|pod| self.create_pod(pod, true))
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(created)
    }

    async fn create_pod(&self, pod: serde_json::Value, ready: bool) -> Result<Pod, SimError> {
        let pod: Pod = from_json(pod)?;
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let created = call(
            format!("create pod {ns}/{name}"),
            self.t(),
            api.create(&PostParams::default(), &pod),
        )
        .await?;
        self.set_pod_ready(&ns, &name, ready).await?;
        Ok(created)
    }

    async fn set_pod_ready(&self, ns: &str, name: &str, ready: bool) -> Result<(), SimError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let status = if ready { "True" } else { "False" };
        // As a kubelet reports it: the pod's Ready condition and the state of its container
        // (kubectl's READY column counts containers that are ready and running).
        let started = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let patch = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ],
            "containerStatuses": [{
                "name": APP_CONTAINER, "image": APP_CONTAINER, "imageID": "",
                "containerID": format!("sim://{ns}/{name}"),
                "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }],
        }});
        call(
            format!("update pod status {ns}/{name}"),
            self.t(),
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    /// Run the kubelets' pod handling and the scheduler's caches until the watches end or
    /// `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let pods =
            watcher(Api::<Pod>::all(self.client.clone()), watcher::Config::default()).default_backoff();
        let nodes =
            watcher(Api::<Node>::all(self.client.clone()), watcher::Config::default()).default_backoff();
        futures::pin_mut!(pods, nodes);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                next = pods.try_next() => match next {
                    Ok(Some(ev)) => self.on_pod_event(ev).await,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "simulated kubelet: pod watch error (the watcher retries)");
                    }
                },
                next = nodes.try_next() => match next {
                    Ok(Some(ev)) => self.on_node_event(ev),
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "simulated scheduler: node watch error (the watcher retries)");
                    }
                },
            }
        }
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, SchedCache> {
        // A poisoned lock only means another task panicked while holding it; the cache is
        // still usable (it is rebuilt on the next relist).
        self.sched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn on_node_event(&self, ev: watcher::Event<Node>) {
        let usable =
            |n: &Node| node_ready(n) && !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        let mut sched = self.sched();
        match ev {
            watcher::Event::Init => sched.nodes.clear(),
            watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                sched.nodes.insert(n.name_any(), usable(&n));
            }
            watcher::Event::Delete(n) => {
                sched.nodes.remove(&n.name_any());
            }
            watcher::Event::InitDone => {}
        }
    }

    async fn on_pod_event(&self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => self.sched().clear_pods(),
            watcher::Event::InitDone => {}
            watcher::Event::Delete(pod) => self.sched().place(&pod_key(&pod), None),
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                self.sched().place(&pod_key(&pod), pod_node(&pod));
                self.on_pod(pod).await;
            }
        }
    }

    async fn on_pod(&self, pod: Pod) {
        if pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if !self.handled.lock().await.insert(key.clone()) {
            return;
        }
        // The ReplicaSet controller replaces a terminating pod at once, while the kubelet
        // terminates the old one: the two run side by side, as in a cluster.
        if let Some(owner) = pod.owner_references().iter().find(|o| o.kind == "ReplicaSet") {
            let (this, pod, key) = (self.clone(), pod.clone(), key.clone());
            let (rs, uid) = (owner.name.clone(), owner.uid.clone());
            tokio::spawn(async move {
                if let Err(e) = this.replace(&pod, &rs, &uid).await {
                    tracing::warn!(pod = %key, error = %e, "simulated ReplicaSet could not replace a pod");
                }
            });
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.timing.pod_termination).await;
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(this.client.clone(), &ns);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            // Like the kubelet, keep trying until the pod is gone (bounded: a pod left behind
            // would hold its node's drain until the drain timeout).
            for attempt in 1..=10u32 {
                match call(
                    format!("finish pod {key}"),
                    this.t(),
                    api.delete(&pod.name_any(), &dp),
                )
                .await
                {
                    Ok(_) => break,
                    Err(SimError::Api {
                        source: kube::Error::Api(s),
                        ..
                    }) if s.code == 404 => break,
                    Err(e) => {
                        tracing::warn!(pod = %key, attempt, error = %e, "simulated kubelet: final delete failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    }
                }
            }
            this.handled.lock().await.remove(&key);
        });
    }

    async fn replace(&self, old: &Pod, rs_name: &str, rs_uid: &str) -> Result<(), SimError> {
        let old_node = old
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let ns = old.namespace().unwrap_or_default();
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{rs_name}-r{n}");
        let Some(node) = self.pick_node(&format!("{ns}/{name}"), &old_node).await else {
            tracing::debug!(pod = %old.name_any(), "simulated scheduler: no schedulable node; pod stays pending");
            return Ok(());
        };
        let app = old.labels().get("app").cloned().unwrap_or_default();
        let pod = pod_json(&ns, &name, &node, &app, ("ReplicaSet", rs_name, rs_uid));
        self.create_pod(pod, false).await?;
        tokio::time::sleep(self.timing.pod_startup).await;
        self.set_pod_ready(&ns, &name, true).await
    }

    /// The least loaded schedulable, Ready node other than `avoid`, from the watch-fed cache.
    async fn pick_node(&self, pod: &str, avoid: &str) -> Option<String> {
        let rebooting = self.rebooting.lock().await.clone();
        self.sched().pick(pod, avoid, &rebooting)
    }
}

/// `Ready` condition is `True`.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, SimError> {
    serde_json::from_value(v).map_err(|e| SimError::Api {
        operation: "build object".into(),
        source: kube::Error::SerdeError(e),
    })
}

/// The one container of every simulated workload pod.
const APP_CONTAINER: &str = "app";

fn pod_json(ns: &str, name: &str, node: &str, app: &str, owner: (&str, &str, &str)) -> serde_json::Value {
    let (kind, owner_name, uid) = owner;
    let api_version = "apps/v1";
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "labels": {"app": app},
            "ownerReferences": [{"apiVersion": api_version, "kind": kind, "name": owner_name, "uid": uid, "controller": true}],
        },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": APP_CONTAINER, "image": APP_CONTAINER}],
        },
    })
}
