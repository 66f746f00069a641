//! NixOSPools on the controller side: the pools as the admission gate sees them (built from the
//! pool cache and the NixOSNodes' labels) and the pools' status, computed purely by
//! [`crate::rollout::pool_status`] and written with server-side apply under
//! `nixroll-controller` whenever it changed (a periodic pass while leading, bounded by the API
//! timeout).

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use kube::api::{Api, Patch, PatchParams};
use tracing::{debug, warn};

use super::observe::view_of;
use super::{Context, ControllerError};
use crate::api::{NixOSNode, NixOSNodeStatus, NixOSPool, NixOSPoolStatus, Phase};
use crate::gates::Verdict;
use crate::names::CONTROLLER_MANAGER;
use crate::rollout::{NodeObservation, NodeView, Pools, pool_status};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The last verdict of each health gate and when it was made: pool → gate → (verdict, at).
pub(crate) type GateVerdicts = BTreeMap<String, BTreeMap<String, (Verdict, Timestamp)>>;

/// The pools from the cache, with every node in `objs` assigned by its labels.
pub(super) fn build_pools(pools: &[Arc<NixOSPool>], objs: &[Arc<NixOSNode>]) -> Pools {
    let mut sorted: Vec<&NixOSPool> = pools.iter().map(AsRef::as_ref).collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Pools::build(
        sorted
            .iter()
            .map(|p| (p.metadata.name.as_deref().unwrap_or_default(), &p.spec)),
        objs.iter().map(|o| {
            (
                o.metadata.name.as_deref().unwrap_or_default(),
                o.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            )
        }),
    )
}

/// The names of a pool's health gates (CEL, then Prometheus).
fn gate_names(spec: &crate::api::NixOSPoolSpec) -> impl Iterator<Item = &str> {
    spec.health_gates.iter().flat_map(|h| {
        h.cel
            .iter()
            .map(|g| g.name.as_str())
            .chain(h.prometheus.iter().map(|g| g.name.as_str()))
    })
}

/// Fill `pools.gate_blocks` from the last verdicts (`pool → gate → verdict`): a pool with a
/// gate that blocks, or that has no verdict yet, admits nothing (fail closed).
pub(super) fn apply_verdicts(
    pools: &mut Pools,
    pool_objs: &[Arc<NixOSPool>],
    verdicts: &GateVerdicts,
) {
    for p in pool_objs {
        let name = p.metadata.name.clone().unwrap_or_default();
        let of_pool = verdicts.get(&name);
        let why = gate_names(&p.spec).find_map(|g| match of_pool.and_then(|v| v.get(g)) {
            Some((Verdict::Pass, _)) => None,
            Some((Verdict::Block(why), _)) => Some(format!("health gate {g}: {why}")),
            None => Some(format!("health gate {g} not evaluated yet")),
        });
        if let Some(why) = why {
            pools.gate_blocks.insert(name, why);
        }
    }
}

/// Whether two pool statuses differ in anything but the conditions' transition times.
fn same(a: &NixOSPoolStatus, b: &NixOSPoolStatus) -> bool {
    let strip = |s: &NixOSPoolStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time =
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
        }
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    };
    strip(a) == strip(b)
}

impl Context {
    /// Evaluate every health gate of every pool (each under its own timeout, one after the
    /// other) and remember the verdicts; gates of pools that are gone are forgotten.
    pub(super) async fn gate_pass(&self) {
        if !self.leading.load(std::sync::atomic::Ordering::SeqCst) || !self.synced.is_synced() {
            return;
        }
        let mut next = GateVerdicts::new();
        for p in self.pools.state() {
            let name = p.metadata.name.clone().unwrap_or_default();
            // Each verdict carries when its evaluation started: a pass counts as a post-gate
            // only when it started after the node was verified.
            let mut verdicts: Vec<(String, Verdict, Timestamp)> = Vec::new();
            for g in p.spec.health_gates.iter().flat_map(|h| h.cel.iter()) {
                let started = Timestamp::now();
                let v = crate::gates::cel::check(&self.client, g).await;
                verdicts.push((g.name.clone(), v, started));
            }
            for g in p.spec.health_gates.iter().flat_map(|h| h.prometheus.iter()) {
                let started = Timestamp::now();
                let v = crate::gates::prometheus::check(g).await;
                verdicts.push((g.name.clone(), v, started));
            }
            for (gate, v, at) in verdicts {
                self.metrics.set_gate(&name, &gate, v == Verdict::Pass);
                if let Verdict::Block(why) = &v {
                    debug!(pool = %name, %gate, %why, "health gate blocks");
                }
                next.entry(name.clone()).or_default().insert(gate, (v, at));
            }
        }
        if let Ok(mut v) = self.gate_verdicts.lock() {
            *v = next;
        }
        // The nodes waiting for their post-gates look at the new verdicts at once, rather than
        // at their next requeue.
        for o in self.nixosnodes.state() {
            let waits = o.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Verifying) && s.slot.as_ref().is_some_and(|sl| sl.verified_at.is_some())
            });
            if waits {
                let _ = self.wake.send(ObjectRef::new(&o.name_any()));
            }
        }
    }

    /// Compute every pool's status and write those that changed. Returns how many were written.
    pub(super) async fn write_pool_statuses(&self, now: Timestamp) -> Result<usize, ControllerError> {
        let pool_objs = self.pools.state();
        if pool_objs.is_empty() {
            return Ok(0);
        }
        let objs = self.follow.effective_all(self.nixosnodes.state());
        let mut pools = build_pools(&pool_objs, &objs);
        if let Ok(v) = self.gate_verdicts.lock() {
            apply_verdicts(&mut pools, &pool_objs, &v);
        }
        let empty = NixOSNodeStatus::default();
        let observations: Vec<NodeObservation> = objs
            .iter()
            .map(|o| self.observe(o.metadata.name.as_deref().unwrap_or_default()))
            .collect();
        let views: Vec<NodeView<'_>> = objs
            .iter()
            .zip(&observations)
            .map(|(o, n)| view_of(o, o.status.as_ref().unwrap_or(&empty), n))
            .collect();
        let api: Api<NixOSPool> = Api::all(self.client.clone());
        let pp = PatchParams::apply(CONTROLLER_MANAGER).force();
        let mut written = 0;
        for (i, pool) in pools.pools.iter().enumerate() {
            let Some(obj) = pool_objs
                .iter()
                .find(|o| o.metadata.name.as_deref() == Some(pool.name.as_str()))
            else {
                continue;
            };
            let previous = obj.status.clone().unwrap_or_default();
            let generation = obj.metadata.generation.unwrap_or_default();
            let next = pool_status(&pools, i, &views, &self.config.policy, &previous, generation, now);
            self.metrics.set_pool(&pool.name, &next);
            if same(&previous, &next) {
                continue;
            }
            let body = serde_json::json!({
                "apiVersion": NixOSPool::api_version(&()),
                "kind": NixOSPool::kind(&()),
                "status": next,
            });
            match tokio::time::timeout(
                self.config.api_timeout,
                api.patch_status(&pool.name, &pp, &Patch::Apply(&body)),
            )
            .await
            {
                Ok(Ok(_)) => {
                    written += 1;
                    self.pool_events(obj, &previous, &next).await;
                }
                Ok(Err(source)) => {
                    return Err(ControllerError::WritePoolStatus {
                        pool: pool.name.clone(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(ControllerError::Timeout {
                        operation: "write pool status",
                        node: pool.name.clone(),
                        timeout: self.config.api_timeout,
                    });
                }
            }
        }
        if written > 0 {
            debug!(written, "pool statuses written");
        }
        Ok(written)
    }

    /// One Event per change of a pool condition's reason (a pool starts waiting for its
    /// predecessor, a gate starts or stops blocking, a node goes Degraded, a conflict appears).
    async fn pool_events(&self, obj: &NixOSPool, previous: &NixOSPoolStatus, next: &NixOSPoolStatus) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(NixOSPool::api_version(&()).into_owned()),
            kind: Some(NixOSPool::kind(&()).into_owned()),
            name: obj.metadata.name.clone(),
            uid: obj.metadata.uid.clone(),
            ..Default::default()
        };
        for c in &next.conditions {
            let before = previous.conditions.iter().find(|p| p.type_ == c.type_);
            if before.is_some_and(|b| b.reason == c.reason && b.status == c.status) {
                continue;
            }
            // The first status of a pool says nothing new unless something is wrong.
            let warning = matches!(
                c.reason.as_str(),
                "NodeDegraded" | "NodeInMultiplePools" | "GateBlocking" | "InvalidSpec"
            );
            if before.is_none() && !warning && c.reason != "WaitingForPool" {
                continue;
            }
            if c.type_ == crate::api::pool_condition::UPDATED {
                continue;
            }
            self.publish(&reference, "Roll", &c.reason, c.message.clone(), warning)
                .await;
        }
    }

    /// One pass of the pool status writer (leader only, caches synced); errors are logged here.
    pub(super) async fn pool_status_pass(&self) {
        if !self.leading.load(std::sync::atomic::Ordering::SeqCst) || !self.synced.is_synced() {
            return;
        }
        if let Err(e) = self.write_pool_statuses(Timestamp::now()).await {
            warn!(category = e.category(), error = %e, "pool status not written");
        }
    }
}
