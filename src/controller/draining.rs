//! The controller's drain bookkeeping: per draining node, the last eviction pass's progress,
//! its backoff and the wake-ups that cut the backoff short ([`DrainState`]); the watch on a
//! draining node's pods and the PodDisruptionBudget watch that deliver those wake-ups; one
//! pass as the reconcile runs it ([`Context::drain_pass`]). The passes themselves are
//! [`crate::drain`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, watcher};
use tracing::debug;

use super::{Context, ControllerError, observe};
use crate::api::DrainPolicy;
use crate::drain;
use crate::rollout::{Action, DrainProgress};

/// In-memory drain bookkeeping of one node (only while Draining).
#[derive(Clone, Debug)]
pub(super) struct DrainState {
    pub(super) progress: DrainProgress,
    /// Passes in a row that ended with pods left.
    pub(super) attempts: u32,
    pub(super) not_before: Instant,
    /// Wake-ups from the pod and PDB watches so far. A pass compares it before and after: a
    /// wake-up that lands while the pass runs must not be lost to the pass's own backoff.
    pub(super) wakes: u64,
    /// PodDisruptionBudgets that allowed disruptions again, seen while this node drains. A pass
    /// refused by a PDB (429) that overlaps one looks again at once: the PDB watch only wakes
    /// drains already recorded as blocked, which this pass was not yet.
    pub(super) pdb_wakes: u64,
}

impl Context {
    /// Run one pass for `action` (`Evict`: evictions, one PodDisruptionBudget's pods after
    /// another; `ForceDelete`: deletes) over the pods of `name`, unless the drain's backoff has
    /// not run out; tell it as an Event on the Node and record it. Returns when to look again.
    pub(super) async fn drain_pass(
        &self,
        name: &str,
        action: &Action,
        policy: &DrainPolicy,
    ) -> Result<Duration, ControllerError> {
        if let Some(wait) = self.drain_wait(name) {
            return Ok(wait);
        }
        let force = *action == Action::ForceDelete;
        let wakes_before = self.drain_wakes(name);
        let pass = if force {
            drain::force_delete_pass(&self.client, name, policy, self.config.api_timeout).await
        } else {
            let budgets = self.budgets.state();
            let watch = drain::BudgetWatch {
                store: self.budgets.clone(),
                changed: self.budgets_changed.subscribe(),
                quiet: drain::QUIET,
                settle_limit: drain::SETTLE_LIMIT,
            };
            drain::evict_pass_with(
                &self.client,
                name,
                policy,
                &budgets,
                Some(watch),
                self.config.api_timeout,
            )
            .await
        };
        let progress = pass.map_err(|source| ControllerError::Drain {
            node: name.to_string(),
            source,
        })?;
        debug!(node = %name, action = ?action, remaining = progress.remaining, blocked_by_pdb = progress.blocked_by_pdb, refused = progress.refused.len(), "drain pass");
        let (reason, warning) = match (force, progress.blocked_by_pdb > 0, progress.refused.is_empty()) {
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
        self.publish(&self.node_ref(name), "Drain", reason, note, warning)
            .await;
        let remaining = progress.remaining;
        let wait = self.record_drain(name, progress, wakes_before);
        if remaining > 0 {
            // After recording, so the watch's first wake-up finds the drain's state.
            self.watch_pods(name);
        }
        Ok(wait)
    }

    pub(super) fn drain_progress(&self, name: &str) -> Option<DrainProgress> {
        let drains = self.drains.lock().ok()?;
        drains.get(name).map(|d| d.progress.clone())
    }

    /// Time left before the next eviction pass may run, if any.
    pub(super) fn drain_wait(&self, name: &str) -> Option<Duration> {
        let drains = self.drains.lock().ok()?;
        let d = drains.get(name)?;
        let left = d.not_before.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// The wake-up counts (any, PDB) of a drain, taken before a pass.
    pub(super) fn drain_wakes(&self, name: &str) -> (u64, u64) {
        self.drains
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|d| (d.wakes, d.pdb_wakes)))
            .unwrap_or((0, 0))
    }

    /// Record a pass that started at wake-up count `wakes_before`; returns when to look again
    /// (at once when a watch woke the drain while the pass ran).
    pub(super) fn record_drain(
        &self,
        name: &str,
        progress: DrainProgress,
        wakes_before: (u64, u64),
    ) -> Duration {
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

    pub(super) fn clear_drain(&self, name: &str) {
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
        let changed = self.budgets_changed.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(observe::trim_budget)
                .reflect(writer)
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(pdb) = ev else { continue };
                // Stored already (`reflect` runs first): drains waiting for a budget to take
                // in an eviction look again.
                changed.send_replace(());
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
    pub(super) fn watch_pods(&self, name: &str) {
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use k8s_openapi::api::core::v1::{ConfigMap, Node};
    use kube::Client;
    use kube::runtime::reflector;

    use super::*;
    use crate::api::NixOSNode;
    use crate::controller::{ControllerConfig, Metrics, Stores, Synced};

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
            pools: kube::runtime::reflector::store().0,
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
