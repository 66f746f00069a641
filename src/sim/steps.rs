//! Where a node's disruption time goes: the per-step breakdown of `nixroll demo` and
//! `nixroll bench --json`.
//!
//! A [`StepClock`] follows Nodes, Pods and NixOSNodes and stamps each step of every node's
//! disruption with the local monotonic clock. Two sources: [`StepClock::start`] takes
//! in-process watches on the embedded API's store (no HTTP, no extra load on the controller's
//! API port; stamped when the store commits), [`StepClock::watching`] takes kube watches
//! through any API server (a real kube-apiserver in `nixroll bench --kube-assets`; stamped
//! when each event arrives, so every stamp carries the same watch-delivery delay):
//!
//! | step | from | to |
//! | --- | --- | --- |
//! | `cordon_to_first_eviction` | nixroll's cordon | the first pod marked for deletion |
//! | `first_to_last_eviction` | that | the last pod marked for deletion |
//! | `last_eviction_to_pods_gone` | that | the last evictable pod gone (includes the simulated termination) |
//! | `pods_gone_to_activation_granted` | that | `status.activation` granted |
//! | `activation_granted_to_reboot_requested` | that | the agent reports `RebootRequested` |
//! | `reboot_requested_to_ready` | that | the Node Ready with a new boot id (includes the simulated reboot) |
//! | `ready_to_uncordon` | that | nixroll's uncordon |
//!
//! A node without evictable pods has no eviction steps; a live switch has no reboot steps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::names::CORDON_ANNOTATION;
use embedded_apiserver::resources::Gvr;
use embedded_apiserver::store::{Store, WatchOptions};
use embedded_apiserver::watch::WatchEvent;

/// The steps, in order.
pub const STEPS: [&str; 7] = [
    "cordon_to_first_eviction",
    "first_to_last_eviction",
    "last_eviction_to_pods_gone",
    "pods_gone_to_activation_granted",
    "activation_granted_to_reboot_requested",
    "reboot_requested_to_ready",
    "ready_to_uncordon",
];

/// The time stamps of one disruption of one node.
#[derive(Clone, Debug, Default)]
pub struct Disruption {
    pub cordoned: Option<Instant>,
    pub first_eviction: Option<Instant>,
    pub last_eviction: Option<Instant>,
    pub pods_gone: Option<Instant>,
    pub activation_granted: Option<Instant>,
    pub reboot_requested: Option<Instant>,
    pub ready: Option<Instant>,
    pub uncordoned: Option<Instant>,
    boot_id: Option<String>,
}

impl Disruption {
    /// Each step's duration, where both of its ends were seen.
    pub fn steps(&self) -> Vec<(&'static str, Duration)> {
        let ends = [
            (self.cordoned, self.first_eviction),
            (self.first_eviction, self.last_eviction),
            (self.last_eviction, self.pods_gone),
            (self.pods_gone, self.activation_granted),
            (self.activation_granted, self.reboot_requested),
            (self.reboot_requested, self.ready),
            (self.ready, self.uncordoned),
        ];
        STEPS
            .iter()
            .zip(ends)
            .filter_map(|(name, (a, b))| Some((*name, b?.saturating_duration_since(a?))))
            .collect()
    }
}

/// Mean and p99 of one step over all finished disruptions, in seconds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepStats {
    pub count: usize,
    pub mean_s: f64,
    pub p99_s: f64,
}

#[derive(Default)]
struct State {
    /// The disruption in progress per node.
    open: HashMap<String, Disruption>,
    /// Finished disruptions (uncordoned), in order.
    done: Vec<(String, Disruption)>,
    /// Evictable (not DaemonSet, not mirror) pods per node, by namespace/name.
    pods: HashMap<String, HashSet<String>>,
    /// Pods already marked for deletion.
    terminating: HashSet<String>,
}

/// Follows the store; see the module docs. Stops when dropped.
pub struct StepClock {
    state: Arc<Mutex<State>>,
    /// Notified after every event the clock took in.
    changed: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StepClock {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StepClock {
    /// Start following `store`.
    pub fn start(store: &Store) -> StepClock {
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let kinds = [
            (Gvr::new("", "v1", "nodes"), Kind::Node),
            (Gvr::new("", "v1", "pods"), Kind::Pod),
            (
                Gvr::new(crate::names::GROUP, crate::names::VERSION, "nixosnodes"),
                Kind::NixOSNode,
            ),
        ];
        let tasks = kinds
            .into_iter()
            .map(|(gvr, kind)| {
                let (store, state, changed) = (store.clone(), state.clone(), changed.clone());
                tokio::spawn(follow(store, gvr, kind, state, changed))
            })
            .collect();
        StepClock {
            state,
            changed,
            tasks,
        }
    }

    /// Follow the same three collections through kube watches on `client` (any API server),
    /// stamping each event when it arrives here.
    pub fn watching(client: kube::Client) -> StepClock {
        use kube::core::{ApiResource, DynamicObject};
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let kinds = [
            (
                ApiResource::erase::<k8s_openapi::api::core::v1::Node>(&()),
                Kind::Node,
            ),
            (
                ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                Kind::Pod,
            ),
            (ApiResource::erase::<crate::api::NixOSNode>(&()), Kind::NixOSNode),
        ];
        let tasks = kinds
            .into_iter()
            .map(|(ar, kind)| {
                let api: kube::Api<DynamicObject> = kube::Api::all_with(client.clone(), &ar);
                let (state, changed) = (state.clone(), changed.clone());
                tokio::spawn(follow_api(api, kind, state, changed))
            })
            .collect();
        StepClock {
            state,
            changed,
            tasks,
        }
    }

    /// Forget everything finished so far (for example the adoption before a rollout).
    pub fn reset(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.done.clear();
        }
    }

    /// Wait until `n` disruptions finished (their uncordon was seen), at most `limit`.
    pub async fn wait_finished(&self, n: usize, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                // Registered before the check, so an event in between is not missed.
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let seen = { self.state.lock().map(|s| s.done.len()).unwrap_or(n) };
                if seen >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// The finished disruptions, per node, in order.
    pub fn finished(&self) -> Vec<(String, Disruption)> {
        self.state.lock().map(|s| s.done.clone()).unwrap_or_default()
    }

    /// Mean and p99 per step over the finished disruptions.
    pub fn stats(&self) -> BTreeMap<&'static str, StepStats> {
        stats(&self.finished())
    }
}

/// Mean and p99 per step.
pub fn stats(done: &[(String, Disruption)]) -> BTreeMap<&'static str, StepStats> {
    let mut by_step: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for (_, d) in done {
        for (name, t) in d.steps() {
            by_step.entry(name).or_default().push(t.as_secs_f64());
        }
    }
    by_step
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_by(f64::total_cmp);
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let idx = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            let p99 = v.get(idx).copied().unwrap_or(0.0);
            (
                name,
                StepStats {
                    count: v.len(),
                    mean_s: mean,
                    p99_s: p99,
                },
            )
        })
        .collect()
}

/// The breakdown as lines for a terminal.
pub fn render(stats: &BTreeMap<&'static str, StepStats>) -> Vec<String> {
    let mut lines = vec![format!(
        "  {:<40} {:>8} {:>8} {:>6}",
        "step", "mean", "p99", "nodes"
    )];
    for name in STEPS {
        if let Some(s) = stats.get(name) {
            lines.push(format!(
                "  {name:<40} {:>7.3}s {:>7.3}s {:>6}",
                s.mean_s, s.p99_s, s.count
            ));
        }
    }
    lines
}

#[derive(Clone, Copy)]
enum Kind {
    Node,
    Pod,
    NixOSNode,
}

/// Watch one collection until the task is aborted; a watch closed by the store (fell behind)
/// is opened again with the current objects.
async fn follow(
    store: Store,
    gvr: Gvr,
    kind: Kind,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
) {
    loop {
        let Ok(mut watch) = store.watch(&gvr, None, &WatchOptions::default()) else {
            return;
        };
        while let Some(ev) = watch.next().await {
            let now = Instant::now();
            let (obj, deleted) = match &ev {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
                WatchEvent::Deleted(o) => (o, true),
                WatchEvent::Bookmark { .. } | WatchEvent::Error(_) => continue,
            };
            if !take(&state, kind, obj, deleted, now) {
                return;
            }
            changed.notify_waiters();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One event into the state; false when the state is poisoned.
fn take(state: &Mutex<State>, kind: Kind, obj: &Value, deleted: bool, now: Instant) -> bool {
    let Ok(mut s) = state.lock() else {
        return false;
    };
    match kind {
        Kind::Node => on_node(&mut s, obj, deleted, now),
        Kind::Pod => on_pod(&mut s, obj, deleted, now),
        Kind::NixOSNode => on_nixosnode(&mut s, obj, now),
    }
    true
}

/// Watch one collection through the API until the task is aborted (kube's watcher relists
/// and re-watches after an error, with its default backoff).
async fn follow_api(
    api: kube::Api<kube::core::DynamicObject>,
    kind: Kind,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let now = Instant::now();
        let (obj, deleted) = match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
            Ok(watcher::Event::Delete(o)) => (o, true),
            Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => continue,
        };
        let Ok(obj) = serde_json::to_value(&obj) else {
            continue;
        };
        if !take(&state, kind, &obj, deleted, now) {
            return;
        }
        changed.notify_waiters();
    }
}

fn name_of(o: &Value) -> String {
    o["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn on_node(s: &mut State, o: &Value, deleted: bool, now: Instant) {
    let name = name_of(o);
    if deleted {
        s.open.remove(&name);
        return;
    }
    let cordoned = o["spec"]["unschedulable"].as_bool().unwrap_or(false)
        && o["metadata"]["annotations"][CORDON_ANNOTATION].is_string();
    let boot_id = o["status"]["nodeInfo"]["bootID"].as_str().map(str::to_owned);
    let ready = o["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    match s.open.get_mut(&name) {
        None if cordoned => {
            let empty = s.pods.get(&name).is_none_or(HashSet::is_empty);
            s.open.insert(
                name,
                Disruption {
                    cordoned: Some(now),
                    pods_gone: empty.then_some(now),
                    boot_id,
                    ..Disruption::default()
                },
            );
        }
        None => {}
        Some(d) if !o["spec"]["unschedulable"].as_bool().unwrap_or(false) => {
            d.uncordoned = Some(now);
            if let Some(d) = s.open.remove(&name) {
                s.done.push((name, d));
            }
        }
        Some(d) if d.ready.is_none() && d.reboot_requested.is_some() && ready && boot_id != d.boot_id => {
            d.ready = Some(now);
        }
        Some(_) => {}
    }
}

fn evictable(o: &Value) -> bool {
    let daemon = o["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r["kind"] == "DaemonSet"));
    let mirror = o["metadata"]["annotations"][crate::drain::MIRROR_POD_ANNOTATION].is_string();
    !daemon && !mirror
}

fn on_pod(s: &mut State, o: &Value, deleted: bool, now: Instant) {
    let node = o["spec"]["nodeName"].as_str().unwrap_or_default().to_string();
    if node.is_empty() || !evictable(o) {
        return;
    }
    let key = format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        name_of(o)
    );
    if deleted {
        s.terminating.remove(&key);
        let left = s.pods.get_mut(&node).map(|p| {
            p.remove(&key);
            p.len()
        });
        if left == Some(0)
            && let Some(d) = s.open.get_mut(&node)
            && d.pods_gone.is_none()
        {
            d.pods_gone = Some(now);
        }
        return;
    }
    s.pods.entry(node.clone()).or_default().insert(key.clone());
    if o["metadata"]["deletionTimestamp"].is_string()
        && s.terminating.insert(key)
        && let Some(d) = s.open.get_mut(&node)
    {
        d.first_eviction.get_or_insert(now);
        d.last_eviction = Some(now);
    }
}

fn on_nixosnode(s: &mut State, o: &Value, now: Instant) {
    let Some(d) = s.open.get_mut(&name_of(o)) else {
        return;
    };
    let status = &o["status"];
    if d.activation_granted.is_none() && status["activation"]["id"].is_string() {
        d.activation_granted = Some(now);
    }
    if d.reboot_requested.is_none() && status["agent"]["activation"]["state"] == "RebootRequested" {
        d.reboot_requested = Some(now);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn steps_need_both_ends_and_stats_give_mean_and_p99() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        let d = Disruption {
            cordoned: at(0),
            first_eviction: at(100),
            last_eviction: at(300),
            pods_gone: at(400),
            activation_granted: at(450),
            reboot_requested: at(500),
            ready: at(1500),
            uncordoned: at(1600),
            boot_id: None,
        };
        let steps = d.steps();
        assert_eq!(steps.len(), 7);
        assert_eq!(steps[0], ("cordon_to_first_eviction", Duration::from_millis(100)));
        assert_eq!(steps[6], ("ready_to_uncordon", Duration::from_millis(100)));
        let live = Disruption {
            cordoned: at(0),
            pods_gone: at(0),
            activation_granted: at(200),
            uncordoned: at(900),
            ..Disruption::default()
        };
        assert_eq!(
            live.steps(),
            vec![("pods_gone_to_activation_granted", Duration::from_millis(200))]
        );
        let st = stats(&[("a".into(), d), ("b".into(), live)]);
        let s = &st["pods_gone_to_activation_granted"];
        assert_eq!(s.count, 2);
        assert!((s.mean_s - 0.125).abs() < 1e-9, "{s:?}");
        assert!((s.p99_s - 0.2).abs() < 1e-9, "{s:?}");
        assert_eq!(st["cordon_to_first_eviction"].count, 1);
        assert_eq!(render(&st).len(), 8);
    }
}
