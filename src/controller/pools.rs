//! NixOSPools on the controller side: the pools as the admission gate sees them (built from the
//! pool cache and the NixOSNodes' labels) and the pools' status, computed purely by
//! [`crate::rollout::pool_status`] and written with server-side apply under
//! `nixroll-controller` whenever it changed (a periodic pass while leading, bounded by the API
//! timeout).

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{debug, warn};

use super::observe::view_of;
use super::{Context, ControllerError};
use k8s_openapi::api::core::v1::ConfigMap;

use crate::api::{HealthGates, NixOSNode, NixOSNodeStatus, NixOSPool, NixOSPoolSpec, NixOSPoolStatus, Phase};
use crate::gates::Verdict;
use crate::names::CONTROLLER_MANAGER;
use crate::names::{GATES_CONFIGMAP, GATES_KEY};
use crate::rollout::{NodeObservation, NodeView, Pools, pool_status};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The last verdict of each health gate and when it was made: pool (or [`DEFAULT_GATES`]) →
/// gate → (verdict, at).
pub(crate) type GateVerdicts = BTreeMap<String, BTreeMap<String, (Verdict, Timestamp)>>;

/// The key of the cluster-default gates' verdicts in [`GateVerdicts`] and their `pool` label in
/// metrics (not a valid NixOSPool name, so it never clashes with one).
pub(crate) const DEFAULT_GATES: &str = "(default)";

/// The cluster-default health gates (ConfigMap `nixroll-gates` in the controller's namespace).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum DefaultGates {
    /// No such ConfigMap: no default gates.
    #[default]
    Absent,
    /// Not read yet since this replica started leading: blocks like a gate not evaluated yet
    /// (fail closed).
    NotReadYet,
    Gates(HealthGates),
    /// The ConfigMap cannot be read or parsed: every pool that would use it admits nothing.
    Invalid(String),
}

/// Whether a pool has gates of its own (else the cluster defaults apply to it).
pub(crate) fn has_own_gates(spec: &NixOSPoolSpec) -> bool {
    spec.health_gates
        .as_ref()
        .is_some_and(|h| !h.cel.is_empty() || !h.prometheus.is_empty())
}

/// The gates that apply to a pool (None: the implicit default pool) and the key of their
/// verdicts: its own, or the cluster defaults when it has none.
pub(crate) fn gates_of<'a>(
    pool: Option<(&'a str, &'a NixOSPoolSpec)>,
    defaults: &'a DefaultGates,
) -> (&'a str, Result<Option<&'a HealthGates>, &'a str>) {
    match (pool, defaults) {
        (Some((name, spec)), _) if has_own_gates(spec) => (name, Ok(spec.health_gates.as_ref())),
        (_, DefaultGates::Absent) => (DEFAULT_GATES, Ok(None)),
        (_, DefaultGates::Gates(h)) => (DEFAULT_GATES, Ok(Some(h))),
        (_, DefaultGates::Invalid(why)) => (DEFAULT_GATES, Err(why.as_str())),
        (_, DefaultGates::NotReadYet) => (DEFAULT_GATES, Err("not read yet")),
    }
}

/// The cluster-default gates from the ConfigMap's data (`healthGates`, YAML or JSON).
pub(crate) fn parse_default_gates(data: Option<&BTreeMap<String, String>>) -> DefaultGates {
    let Some(text) = data.and_then(|d| d.get(GATES_KEY)) else {
        return DefaultGates::Invalid(format!("ConfigMap {GATES_CONFIGMAP} has no key {GATES_KEY}"));
    };
    match serde_saphyr::from_str::<HealthGates>(text) {
        Ok(h) => DefaultGates::Gates(h),
        Err(e) => DefaultGates::Invalid(format!("ConfigMap {GATES_CONFIGMAP}, key {GATES_KEY}: {e}")),
    }
}

/// Why the gates with verdicts `of_source` block, if they do (the first one that does).
fn blocked(
    gates: Result<Option<&HealthGates>, &str>,
    of_source: Option<&BTreeMap<String, (Verdict, Timestamp)>>,
) -> Option<String> {
    let gates = match gates {
        Ok(Some(g)) => g,
        Ok(None) => return None,
        Err(why) => return Some(format!("cluster-default health gates unusable: {why}")),
    };
    gate_names(gates).find_map(|g| match of_source.and_then(|v| v.get(g)) {
        Some((Verdict::Pass, _)) => None,
        Some((Verdict::Block(why), _)) => Some(format!("health gate {g}: {why}")),
        None => Some(format!("health gate {g} not evaluated yet")),
    })
}

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

/// The names of health gates (CEL, then Prometheus).
fn gate_names(h: &HealthGates) -> impl Iterator<Item = &str> {
    h.cel
        .iter()
        .map(|g| g.name.as_str())
        .chain(h.prometheus.iter().map(|g| g.name.as_str()))
}

/// Fill `pools.gate_blocks` (and `default_gate_block`) from the last verdicts (`pool → gate →
/// verdict`): a pool with a gate that blocks, or that has no verdict yet, admits nothing (fail
/// closed). A pool without gates of its own, and the implicit default pool, use the
/// cluster-default gates.
pub(super) fn apply_verdicts(
    pools: &mut Pools,
    pool_objs: &[Arc<NixOSPool>],
    verdicts: &GateVerdicts,
    defaults: &DefaultGates,
) {
    for p in pool_objs {
        let name = p.metadata.name.clone().unwrap_or_default();
        let (source, gates) = gates_of(Some((name.as_str(), &p.spec)), defaults);
        if let Some(why) = blocked(gates, verdicts.get(source)) {
            pools.gate_blocks.insert(name, why);
        }
    }
    let (source, gates) = gates_of(None, defaults);
    pools.default_gate_block = blocked(gates, verdicts.get(source));
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
        let defaults = self.read_default_gates().await;
        let previous = self.gate_verdicts.lock().map(|v| v.clone()).unwrap_or_default();
        let mut next = GateVerdicts::new();
        let mut sources: Vec<(String, HealthGates)> = Vec::new();
        if let DefaultGates::Gates(h) = &defaults {
            sources.push((DEFAULT_GATES.to_owned(), h.clone()));
        }
        for p in self.pools.state() {
            if let Some(h) = p.spec.health_gates.as_ref().filter(|_| has_own_gates(&p.spec)) {
                sources.push((p.name_any(), h.clone()));
            }
        }
        for (name, h) in sources {
            // Each verdict carries when its evaluation started: a pass counts as a post-gate
            // only when it started after the node was verified.
            let mut verdicts: Vec<(String, Verdict, Timestamp)> = Vec::new();
            for g in &h.cel {
                let started = Timestamp::now();
                let v = crate::gates::cel::check(&self.client, g).await;
                verdicts.push((g.name.clone(), v, started));
            }
            for g in &h.prometheus {
                let started = Timestamp::now();
                let v = crate::gates::prometheus::check(g).await;
                verdicts.push((g.name.clone(), v, started));
            }
            for (gate, v, at) in verdicts {
                self.metrics.set_gate(&name, &gate, v == Verdict::Pass);
                // Blocked from the last evaluation (if it blocked) to this one.
                if let Some((Verdict::Block(_), before)) = previous.get(&name).and_then(|p| p.get(&gate)) {
                    let secs = at.duration_since(*before).as_secs_f64();
                    self.metrics.gate_blocked_for(&name, &gate, secs);
                }
                if let Verdict::Block(why) = &v {
                    debug!(pool = %name, %gate, %why, "health gate blocks");
                }
                next.entry(name.clone()).or_default().insert(gate, (v, at));
            }
        }
        if let Ok(mut v) = self.gate_verdicts.lock() {
            *v = next;
        }
        if let Ok(mut d) = self.default_gates.lock() {
            *d = defaults;
        }
        // The nodes waiting for their post-gates look at the new verdicts at once, rather than
        // at their next requeue.
        for o in self.nixosnodes.state() {
            let waits = o.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Verifying)
                    && s.slot.as_ref().is_some_and(|sl| sl.verified_at.is_some())
            });
            if waits {
                let _ = self.wake.send(ObjectRef::new(&o.name_any()));
            }
        }
    }

    /// The cluster-default gates: ConfigMap `nixroll-gates` in the controller's namespace, read
    /// on every gate pass (one GET under the API timeout; not found: none).
    async fn read_default_gates(&self) -> DefaultGates {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.config.pause_namespace);
        match tokio::time::timeout(self.config.api_timeout, api.get_opt(GATES_CONFIGMAP)).await {
            Ok(Ok(None)) => DefaultGates::Absent,
            Ok(Ok(Some(cm))) => parse_default_gates(cm.data.as_ref()),
            Ok(Err(e)) => DefaultGates::Invalid(format!("reading ConfigMap {GATES_CONFIGMAP}: {e}")),
            Err(_) => DefaultGates::Invalid(format!(
                "reading ConfigMap {GATES_CONFIGMAP}: no answer within {:?}",
                self.config.api_timeout
            )),
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
        if let (Ok(v), Ok(d)) = (self.gate_verdicts.lock(), self.default_gates.lock()) {
            apply_verdicts(&mut pools, &pool_objs, &v, &d);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(text: &str) -> BTreeMap<String, String> {
        [(GATES_KEY.to_owned(), text.to_owned())].into()
    }

    #[test]
    fn default_gates_parse_from_yaml_and_bad_ones_block() {
        let yaml = "cel:\n  - name: volumes\n    apiVersion: longhorn.io/v1beta2\n    kind: Volume\n    expression: objects.all(v, v.status.robustness == 'healthy')\n    postTimeout: 15m\n";
        let DefaultGates::Gates(h) = parse_default_gates(Some(&data(yaml))) else {
            panic!("not parsed");
        };
        assert_eq!(h.cel[0].name, "volumes");
        assert_eq!(h.cel[0].post_timeout.as_deref(), Some("15m"));
        assert!(matches!(
            parse_default_gates(Some(&data("cel: 3"))),
            DefaultGates::Invalid(_)
        ));
        assert!(
            matches!(parse_default_gates(None), DefaultGates::Invalid(m) if m.contains("no key healthGates"))
        );
    }

    #[test]
    fn pools_without_gates_and_the_default_pool_use_the_defaults() {
        let h: HealthGates = serde_json::from_value(serde_json::json!({"prometheus": [
            {"name": "alerts", "url": "http://prometheus:9090"}]}))
        .unwrap();
        let defaults = DefaultGates::Gates(h);
        let bare: NixOSPoolSpec = serde_json::from_value(serde_json::json!({"selector": {}})).unwrap();
        let own: NixOSPoolSpec =
            serde_json::from_value(serde_json::json!({"selector": {}, "healthGates": {"cel": [
            {"name": "x", "apiVersion": "v1", "kind": "ConfigMap", "expression": "true"}]}}))
            .unwrap();
        assert_eq!(gates_of(Some(("a", &bare)), &defaults).0, DEFAULT_GATES);
        assert_eq!(gates_of(Some(("b", &own)), &defaults).0, "b");
        assert_eq!(gates_of(None, &defaults).0, DEFAULT_GATES);
        let pool = |name: &str, spec: &NixOSPoolSpec| {
            let mut p = NixOSPool::new(name, spec.clone());
            p.metadata.name = Some(name.to_owned());
            Arc::new(p)
        };
        let objs = vec![pool("a", &bare), pool("b", &own)];
        let now = Timestamp::now();
        let mut verdicts = GateVerdicts::new();
        verdicts.entry(DEFAULT_GATES.to_owned()).or_default().insert(
            "alerts".to_owned(),
            (Verdict::Block("NodeDown firing".into()), now),
        );
        verdicts
            .entry("b".to_owned())
            .or_default()
            .insert("x".to_owned(), (Verdict::Pass, now));
        let mut pools = Pools::default();
        apply_verdicts(&mut pools, &objs, &verdicts, &defaults);
        assert_eq!(
            pools.gate_blocks.get("a").map(String::as_str),
            Some("health gate alerts: NodeDown firing")
        );
        assert!(!pools.gate_blocks.contains_key("b"));
        assert_eq!(
            pools.default_gate_block.as_deref(),
            Some("health gate alerts: NodeDown firing")
        );
        // Not read yet, or unreadable: fail closed.
        let mut pools = Pools::default();
        apply_verdicts(&mut pools, &objs, &verdicts, &DefaultGates::NotReadYet);
        assert!(pools.default_gate_block.unwrap().contains("not read yet"));
        assert!(pools.gate_blocks.contains_key("a") && !pools.gate_blocks.contains_key("b"));
        // No defaults: nothing blocks.
        let mut pools = Pools::default();
        apply_verdicts(&mut pools, &objs, &verdicts, &DefaultGates::Absent);
        assert!(pools.default_gate_block.is_none() && pools.gate_blocks.is_empty());
    }
}
