//! Eviction-based drain of one node.
//!
//! One call is one *pass* over the node's pods: list them (`spec.nodeName=NODE`, never a
//! cluster-wide pod watch), skip DaemonSet and mirror pods, count pods that are already
//! terminating as remaining until they are gone, refuse pods the node's [`DrainPolicy`] does not
//! allow to remove (unmanaged pods, emptyDir data), and ask the Eviction API to evict the rest.
//! A `429 Too Many Requests` means a PodDisruptionBudget allows no disruption now: the pod is
//! counted in [`DrainProgress::blocked_by_pdb`] and tried again on the next pass (the caller
//! spaces passes with a backoff). Every request is bounded by `timeout`.
//!
//! [`force_delete_pass`] is the explicit `onTimeout: Force` policy: it deletes the remaining pods
//! directly, which ignores PodDisruptionBudgets.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{Eviction, PodDisruptionBudget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use tracing::{debug, info};

use crate::api::DrainPolicy;
use crate::rollout::DrainProgress;

/// Annotation the kubelet puts on mirror pods of static pods (they cannot be evicted).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Errors of a drain pass. Per-pod transient failures do not fail the pass (the pod counts as
/// remaining); these end the pass.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("listing the pods of node {node}: {source}")]
    ListPods {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("evicting pod {pod}: {source}")]
    Evict {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting pod {pod}: {source}")]
    Delete {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("building the eviction request for pod {pod}: {message}")]
    BuildRequest { pod: String, message: String },
    #[error("{operation} timed out after {timeout:?}")]
    Timeout { operation: String, timeout: Duration },
}

impl DrainError {
    /// Fixed category, used as Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            DrainError::ListPods { .. } => "DrainListPodsFailed",
            DrainError::Evict { .. } => "DrainEvictFailed",
            DrainError::Delete { .. } => "DrainDeleteFailed",
            DrainError::BuildRequest { .. } => "DrainRequestInvalid",
            DrainError::Timeout { .. } => "DrainTimeout",
        }
    }

    /// Whether retrying soon may succeed (timeouts, 5xx, 429, 409, transport errors).
    pub fn is_transient(&self) -> bool {
        match self {
            DrainError::ListPods { source, .. }
            | DrainError::Evict { source, .. }
            | DrainError::Delete { source, .. } => is_transient_kube(source),
            DrainError::BuildRequest { .. } => false,
            DrainError::Timeout { .. } => true,
        }
    }
}

/// Whether a kube error is worth a quick retry.
pub fn is_transient_kube(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429 || s.code == 409 || s.code == 408,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

async fn timed<T, E>(
    operation: impl FnOnce() -> String,
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, DrainError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| DrainError::Timeout {
            operation: operation(),
            timeout,
        })
}

/// How a pod is treated by a drain pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDisposition {
    /// DaemonSet-owned or mirror pod: stays, does not count.
    Skip,
    /// Already terminating: counts as remaining until it is gone.
    Terminating,
    /// The policy does not allow removing it; the reason is reported.
    Refuse(String),
    /// Evict it.
    Evict,
}

/// Classify one pod under `policy`.
pub fn classify(pod: &Pod, policy: &DrainPolicy) -> PodDisposition {
    if pod.annotations().contains_key(MIRROR_POD_ANNOTATION) {
        return PodDisposition::Skip;
    }
    let controller = pod.owner_references().iter().find(|o| o.controller == Some(true));
    if controller.is_some_and(|o| o.kind == "DaemonSet") {
        return PodDisposition::Skip;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodDisposition::Terminating;
    }
    // Finished pods hold nothing; evicting them is harmless and lets the node drain.
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if finished {
        return PodDisposition::Evict;
    }
    let id = pod_id(pod);
    if controller.is_none() && !policy.delete_unmanaged_pods {
        return PodDisposition::Refuse(format!(
            "{id}: not managed by a controller (set drain.deleteUnmanagedPods to allow)"
        ));
    }
    let empty_dir = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|vs| vs.iter().any(|v| v.empty_dir.is_some()));
    if empty_dir && !policy.delete_empty_dir_data {
        return PodDisposition::Refuse(format!(
            "{id}: uses emptyDir data (set drain.deleteEmptyDirData to allow)"
        ));
    }
    PodDisposition::Evict
}

fn pod_id(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

async fn list_node_pods(client: &Client, node: &str, timeout: Duration) -> Result<Vec<Pod>, DrainError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let list = timed(
        || format!("listing the pods of node {node}"),
        timeout,
        pods.list(&lp),
    )
    .await?
    .map_err(|source| DrainError::ListPods {
        node: node.to_string(),
        source,
    })?;
    Ok(list.items)
}

/// POST `/api/v1/namespaces/NS/pods/NAME/eviction` with a `policy/v1` Eviction body.
///
/// Written out rather than `Api<Pod>::evict` because kube 5 serialises the delete options of
/// the body as `delete_options`, which the API server ignores (its field is `deleteOptions`),
/// so the grace period of the drain policy would be lost.
async fn evict(
    client: &Client,
    pod: &Pod,
    grace_period_seconds: Option<i64>,
    timeout: Duration,
) -> Result<Result<(), kube::Error>, DrainError> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let body = Eviction {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        delete_options: grace_period_seconds.map(|g| DeleteOptions {
            grace_period_seconds: Some(g),
            ..DeleteOptions::default()
        }),
    };
    let build_error = |message: String| DrainError::BuildRequest {
        pod: format!("{ns}/{name}"),
        message,
    };
    let bytes = serde_json::to_vec(&body).map_err(|e| build_error(e.to_string()))?;
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/eviction"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .map_err(|e| build_error(e.to_string()))?;
    let res = timed(
        || format!("evicting pod {ns}/{name}"),
        timeout,
        client.request::<serde_json::Value>(req),
    )
    .await?;
    Ok(res.map(|_| ()))
}

/// The PodDisruptionBudgets as the controller's watch sees them, and a signal on every
/// change: between two evictions under one budget the drain waits here until the budget's
/// writers have taken in the first and gone quiet (see [`evict_pass_with`]).
#[derive(Clone)]
pub struct BudgetWatch {
    pub store: kube::runtime::reflector::Store<PodDisruptionBudget>,
    /// Bumped after the store took in a change (of any budget).
    pub changed: tokio::sync::watch::Receiver<()>,
    /// How long the budget must stay unchanged before the next eviction under it.
    pub quiet: Duration,
    /// The longest such wait; the eviction is sent anyway afterwards.
    pub settle_limit: Duration,
}

/// [`BudgetWatch::quiet`] of the controller. After an eviction, kube-controller-manager's
/// disruption controller rewrites the budget's status once per event of the pods it covers:
/// the evicted pod terminating, its replacement created, scheduled, started. On the real API
/// tier (`nixroll bench --kube-assets`, audit log) those writes came 5–15 ms apart right after
/// the eviction, then nothing for about the pod's termination time.
pub const QUIET: Duration = Duration::from_millis(30);

/// [`BudgetWatch::settle_limit`] of the controller: half of kube-apiserver's
/// `EvictionsRetry` step (500 ms), which is what an eviction that runs into the budget
/// controller's write costs.
pub const SETTLE_LIMIT: Duration = Duration::from_millis(250);

impl BudgetWatch {
    fn budget(&self, key: &(String, String)) -> Option<std::sync::Arc<PodDisruptionBudget>> {
        let r = kube::runtime::reflector::ObjectRef::<PodDisruptionBudget>::new(&key.1).within(&key.0);
        self.store.get(&r)
    }

    /// The budget's resourceVersion now.
    fn version(&self, key: &(String, String)) -> Option<String> {
        self.budget(key).and_then(|b| b.metadata.resource_version.clone())
    }

    /// Wait (at most [`BudgetWatch::settle_limit`]) until the budget changed since `before`,
    /// no longer lists `pod` in `status.disruptedPods` (its controller has seen the pod
    /// terminating), and then stayed unchanged for [`BudgetWatch::quiet`]. Returns whether it
    /// did.
    async fn settled(&self, key: &(String, String), pod: &str, before: Option<&str>) -> bool {
        let mut changed = self.changed.clone();
        let took_in = |b: Option<std::sync::Arc<PodDisruptionBudget>>| {
            b.is_none_or(|b| {
                b.metadata.resource_version.as_deref() != before
                    && !b
                        .status
                        .as_ref()
                        .and_then(|s| s.disrupted_pods.as_ref())
                        .is_some_and(|d| d.contains_key(pod))
            })
        };
        tokio::time::timeout(self.settle_limit, async {
            loop {
                changed.borrow_and_update();
                if took_in(self.budget(key)) {
                    break;
                }
                if changed.changed().await.is_err() {
                    // No watch any more: nothing to wait for.
                    return;
                }
            }
            // Quiet: no change of this budget for `quiet` (changes of others do not count).
            let mut version = self.version(key);
            let mut until = tokio::time::Instant::now() + self.quiet;
            loop {
                match tokio::time::timeout_at(until, changed.changed()).await {
                    Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(())) => {
                        changed.borrow_and_update();
                        let now = self.version(key);
                        if now != version {
                            version = now;
                            until = tokio::time::Instant::now() + self.quiet;
                        }
                    }
                }
            }
        })
        .await
        .is_ok()
    }
}

/// Eviction groups one pass keeps in flight at once (a group: the pods one
/// PodDisruptionBudget covers, or a single pod no budget covers).
const GROUPS_IN_FLIGHT: usize = 32;

/// One eviction pass over the pods of `node`, knowing no PodDisruptionBudget: every pod is
/// its own group (all in flight together). See [`evict_pass_with`].
pub async fn evict_pass(
    client: &Client,
    node: &str,
    policy: &DrainPolicy,
    timeout: Duration,
) -> Result<DrainProgress, DrainError> {
    evict_pass_with(client, node, policy, &[], None, timeout).await
}

/// One eviction pass over the pods of `node`. Never waits for pods to go: the result says how
/// many are left; call again later (bounded by the caller's backoff or a watch).
///
/// Pods that no budget in `budgets` covers are evicted all at once. Pods one budget covers
/// are evicted one after another, and the rest of that group is skipped after the first 429:
/// kube-apiserver updates the budget's status on every eviction, and two evictions that race
/// for one budget conflict, the loser retrying inside the server after about 500 ms
/// (`EvictionsRetry`). One after another, each eviction takes one round trip. Groups of
/// different budgets run concurrently.
///
/// The same conflict happens with the budget's controller (kube-controller-manager's
/// disruption controller), which rewrites the budget's status as soon as it sees the evicted
/// pod terminating: measured on the real API tier (`nixroll bench --kube-assets`), most second
/// evictions under one budget took 0.6 s instead of 0.04 s. With `watch`, the next eviction
/// under a budget waits (bounded by [`BudgetWatch::settle_limit`]) until the watch shows that
/// write (the budget changed and no longer lists the evicted pod in `status.disruptedPods`)
/// and the budget then stayed unchanged for [`BudgetWatch::quiet`]: its controller writes
/// again for the replacement pod within milliseconds, and an eviction in between conflicts
/// just the same.
pub async fn evict_pass_with(
    client: &Client,
    node: &str,
    policy: &DrainPolicy,
    budgets: &[std::sync::Arc<PodDisruptionBudget>],
    watch: Option<BudgetWatch>,
    timeout: Duration,
) -> Result<DrainProgress, DrainError> {
    let pods = list_node_pods(client, node, timeout).await?;
    let mut progress = DrainProgress::default();
    let mut evictable = Vec::new();
    for pod in pods {
        match classify(&pod, policy) {
            PodDisposition::Skip => {}
            PodDisposition::Terminating => progress.remaining += 1,
            PodDisposition::Refuse(reason) => {
                progress.remaining += 1;
                progress.refused.push(reason);
            }
            PodDisposition::Evict => evictable.push(pod),
        }
    }
    let groups = group_by_budget(evictable, budgets);
    // Owned items: the stream lives inside the controller's Send future, where borrowed
    // closures trip the compiler's higher-ranked lifetime inference.
    let (client, grace) = (client.clone(), policy.grace_period_seconds);
    let results = futures::stream::iter(groups)
        .map(move |(budget, group)| {
            let client = client.clone();
            let watch = budget.as_ref().and(watch.clone());
            async move {
                let mut out = Vec::with_capacity(group.len());
                let mut blocked = false;
                // The pod evicted last in this group and the budget's version before it.
                let mut last: Option<(String, Option<String>)> = None;
                for pod in group {
                    if blocked {
                        out.push((pod, Outcome::Blocked { asked: false }));
                        continue;
                    }
                    let mut before = None;
                    if let (Some(w), Some(key)) = (&watch, &budget) {
                        if let Some((prev, version)) = last.take()
                            && !w.settled(key, &prev, version.as_deref()).await
                        {
                            debug!(pod = %prev, budget = %key.1, "the budget did not take in the last eviction in time; evicting the next anyway");
                        }
                        before = w.version(key);
                    }
                    let outcome = match evict(&client, &pod, grace, timeout).await {
                        Ok(Ok(())) => Outcome::Evicted,
                        Ok(Err(e)) if api_code(&e) == Some(404) => Outcome::Gone,
                        Ok(Err(e)) if api_code(&e) == Some(429) => Outcome::Blocked { asked: true },
                        Ok(Err(e)) if is_transient_kube(&e) => Outcome::Retry(e.to_string()),
                        Ok(Err(e)) => Outcome::Failed(e),
                        Err(e) => Outcome::Retry(e.to_string()),
                    };
                    blocked = matches!(outcome, Outcome::Blocked { .. });
                    if matches!(outcome, Outcome::Evicted) {
                        last = Some((pod.name_any(), before));
                    }
                    out.push((pod, outcome));
                }
                out
            }
        })
        .buffer_unordered(GROUPS_IN_FLIGHT);
    futures::pin_mut!(results);
    let mut failed = None;
    while let Some(group) = results.next().await {
        for (pod, outcome) in group {
            match outcome {
                Outcome::Evicted => {
                    info!(node, pod = %pod_id(&pod), "evicted");
                    progress.remaining += 1;
                }
                Outcome::Gone => {}
                Outcome::Blocked { asked } => {
                    debug!(node, pod = %pod_id(&pod), asked, "eviction blocked by a PodDisruptionBudget");
                    progress.remaining += 1;
                    progress.blocked_by_pdb += 1;
                }
                Outcome::Retry(error) => {
                    debug!(node, pod = %pod_id(&pod), %error, "eviction failed; retried next pass");
                    progress.remaining += 1;
                }
                Outcome::Failed(source) => {
                    progress.remaining += 1;
                    failed.get_or_insert(DrainError::Evict {
                        pod: pod_id(&pod),
                        source,
                    });
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(progress),
    }
}

/// What became of one eviction.
enum Outcome {
    Evicted,
    /// 404: the pod is gone already.
    Gone,
    /// 429 (`asked`), or skipped after a 429 of its group.
    Blocked {
        asked: bool,
    },
    /// Transient failure or timeout: the next pass tries again.
    Retry(String),
    Failed(kube::Error),
}

/// Split `pods` into eviction groups: the pods each budget covers (in pod order), and every
/// other pod on its own. A pod that several budgets cover goes with the first by name (the
/// API server refuses to evict it anyway, and says so). Each group with its budget's
/// (namespace, name).
type Group = (Option<(String, String)>, Vec<Pod>);
fn group_by_budget(pods: Vec<Pod>, budgets: &[std::sync::Arc<PodDisruptionBudget>]) -> Vec<Group> {
    let mut selectors: Vec<(&str, &str, kube::core::Selector)> = budgets
        .iter()
        .filter_map(|b| {
            let ns = b.metadata.namespace.as_deref()?;
            let name = b.metadata.name.as_deref()?;
            let selector = b.spec.as_ref()?.selector.clone()?;
            Some((ns, name, kube::core::Selector::try_from(selector).ok()?))
        })
        .collect();
    selectors.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut groups: Vec<Group> = Vec::new();
    let mut by_budget: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
    for pod in pods {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let empty = std::collections::BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        let budget = selectors
            .iter()
            .find(|(bns, _, sel)| *bns == ns && kube::core::SelectorExt::matches(sel, labels))
            .map(|(bns, bname, _)| (*bns, *bname));
        match budget.and_then(|k| by_budget.get(&k).copied().map(|i| (k, i))) {
            Some((_, i)) => groups[i].1.push(pod),
            None => {
                if let Some(k) = budget {
                    by_budget.insert(k, groups.len());
                }
                let key = budget.map(|(ns, name)| (ns.to_owned(), name.to_owned()));
                groups.push((key, vec![pod]));
            }
        }
    }
    groups
}

/// `onTimeout: Force`: delete the node's remaining pods directly (no Eviction API, so
/// PodDisruptionBudgets are not consulted). Pods the policy refuses stay refused.
pub async fn force_delete_pass(
    client: &Client,
    node: &str,
    policy: &DrainPolicy,
    timeout: Duration,
) -> Result<DrainProgress, DrainError> {
    let pods = list_node_pods(client, node, timeout).await?;
    let mut progress = DrainProgress::default();
    let dp = DeleteParams {
        grace_period_seconds: policy.grace_period_seconds.and_then(|g| u32::try_from(g).ok()),
        ..DeleteParams::default()
    };
    for pod in &pods {
        match classify(pod, policy) {
            PodDisposition::Skip => {}
            PodDisposition::Terminating => progress.remaining += 1,
            PodDisposition::Refuse(reason) => {
                progress.remaining += 1;
                progress.refused.push(reason);
            }
            PodDisposition::Evict => {
                let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                let name = pod.name_any();
                match timed(
                    || format!("deleting pod {}", pod_id(pod)),
                    timeout,
                    api.delete(&name, &dp),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        info!(node, pod = %pod_id(pod), "force-deleted");
                        progress.remaining += 1;
                    }
                    Ok(Err(e)) if api_code(&e) == Some(404) => {}
                    Ok(Err(e)) if is_transient_kube(&e) => progress.remaining += 1,
                    Ok(Err(source)) => {
                        return Err(DrainError::Delete {
                            pod: pod_id(pod),
                            source,
                        });
                    }
                    Err(_) => progress.remaining += 1,
                }
            }
        }
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn classify_skips_daemonset_and_mirror_and_refuses_per_policy() {
        let strict = DrainPolicy::default();
        let ds = pod(serde_json::json!({"metadata": {"name": "ds", "namespace": "a",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "1", "controller": true}]}}));
        assert_eq!(classify(&ds, &strict), PodDisposition::Skip);
        let mirror = pod(
            serde_json::json!({"metadata": {"name": "m", "namespace": "kube-system",
            "annotations": {MIRROR_POD_ANNOTATION: "abc"}}}),
        );
        assert_eq!(classify(&mirror, &strict), PodDisposition::Skip);
        let bare = pod(serde_json::json!({"metadata": {"name": "bare", "namespace": "a"}}));
        assert!(matches!(classify(&bare, &strict), PodDisposition::Refuse(r) if r.starts_with("a/bare")));
        let lenient = DrainPolicy {
            delete_unmanaged_pods: true,
            delete_empty_dir_data: true,
            ..DrainPolicy::default()
        };
        assert_eq!(classify(&bare, &lenient), PodDisposition::Evict);
        let rs = serde_json::json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "1", "controller": true}]);
        let scratch = pod(
            serde_json::json!({"metadata": {"name": "s", "namespace": "a", "ownerReferences": rs},
            "spec": {"containers": [], "volumes": [{"name": "tmp", "emptyDir": {}}]}}),
        );
        assert!(matches!(classify(&scratch, &strict), PodDisposition::Refuse(r) if r.contains("emptyDir")));
        assert_eq!(classify(&scratch, &lenient), PodDisposition::Evict);
        let going = pod(
            serde_json::json!({"metadata": {"name": "g", "namespace": "a", "ownerReferences": rs,
            "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        );
        assert_eq!(classify(&going, &strict), PodDisposition::Terminating);
    }

    #[test]
    fn error_categories_and_transience() {
        let e = DrainError::Timeout {
            operation: "x".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(e.is_transient());
        assert_eq!(e.category(), "DrainTimeout");
        let status = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        let e = DrainError::Evict {
            pod: "a/b".into(),
            source: kube::Error::Api(Box::new(status)),
        };
        assert!(!e.is_transient());
        assert_eq!(e.category(), "DrainEvictFailed");
    }
}
