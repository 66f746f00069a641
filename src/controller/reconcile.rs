//! One reconcile of one NixOSNode: observe (the caches, under the admission mutex when the node
//! is Waiting) → decide ([`crate::rollout::decide`]) → write the controller-owned status (before
//! acting, so a restart can finish or undo the step) → act (cordon, uncordon, one eviction pass,
//! Events) → requeue; and the requeue policy after an error.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::cordon::{NODE_CHANGED_RECHECK, set_cordon_and_tell};
use super::observe::view_of;
use super::{Context, ControllerError, PendingWrites, metrics};
use crate::api::{NixOSNode, NixOSNodeStatus, Phase};
use crate::names::CONTROLLER_MANAGER;
use crate::rollout::{Action, Decision, reason};

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

/// Write `st` as the controller's status of `obj` and remember the write in the admission
/// gate (so a stale cache cannot hide it).
async fn write_and_remember(
    ctx: &Context,
    obj: &NixOSNode,
    st: &NixOSNodeStatus,
) -> Result<(), ControllerError> {
    let name = obj.name_any();
    ctx.write_status(&name, st).await?;
    ctx.admission
        .lock()
        .await
        .record(&name, obj.metadata.uid.as_deref(), st);
    Ok(())
}

async fn reconcile_node(obj: Arc<NixOSNode>, ctx: &Context) -> Result<Requeue, ControllerError> {
    let name = obj.name_any();
    ctx.wait_synced().await?;
    if !ctx.leading.load(Ordering::SeqCst) {
        return Ok(Requeue::await_change());
    }
    let obj = ctx.nixosnodes.get(&ObjectRef::new(&name)).unwrap_or(obj);
    // The CRD's rules, checked here too: an API server that does not evaluate CEL lets a bad
    // spec in, and it must never be rolled out (nor reported UpToDate).
    if let Some(problem) = obj.spec.problem() {
        let current = controller_part(obj.status.as_ref().unwrap_or(&NixOSNodeStatus::default()));
        let generation = obj.metadata.generation.unwrap_or_default();
        let st = crate::rollout::invalid_spec_status(&current, &problem, generation, Timestamp::now());
        if st.message != current.message || st.conditions != current.conditions {
            debug!(%problem, "invalid spec");
            write_and_remember(ctx, &obj, &st).await?;
        }
        return Ok(Requeue::await_change());
    }
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
                write_and_remember(ctx, &obj, &st).await?;
            }
            return Ok(Requeue::await_change());
        }
    };
    let now = Timestamp::now();
    let (mut observation, node_version) = ctx.observe_versioned(&name);
    let stored = obj.status.clone().unwrap_or_default();

    // Our own last write is the truth while the store lags behind it.
    let mut gate = ctx.admission.lock().await;
    let status = gate
        .effective(&name, obj.metadata.uid.as_deref(), &stored)
        .unwrap_or(stored);
    // A Waiting node the gate returns is admitted, also when it already holds its slot (a
    // retried node that stayed cordoned: docs/rollout.md, "Re-admission"). The gate runs only
    // for Waiting nodes.
    let admitted = status.phase == Some(Phase::Waiting) && {
        let (admissible, why) = ctx.admissible_and_why(&mut gate, Some(&name), now);
        observation.held_by = why.map(|(r, m)| (r.to_owned(), m));
        crate::rollout::is_admitted(&view_of(&obj, &status, &observation), &admissible)
    };
    let gate = if admitted {
        Some(gate)
    } else {
        drop(gate);
        None
    };

    let status = super::build::with_builder_failure(ctx, &obj, status, now);
    // The post-gates (its pools' health gates, its pods) of a node this decision may verify.
    if crate::rollout::needs_post_gates(&status) {
        observation.post_gates = ctx.post_gates(&obj, &observation, now).await;
    }
    let drain_progress = if status.phase == Some(Phase::Draining) {
        ctx.drain_progress(&name)
    } else {
        None
    };
    let view = view_of(&obj, &status, &observation);
    let decision: Decision =
        (ctx.rollout.decide)(&view, admitted, drain_progress.as_ref(), &ctx.config.policy, now);
    let decision = super::build::with_builds(ctx, &obj, decision);
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
                Ok(()) => gate.record(&name, obj.metadata.uid.as_deref(), &decision.status),
                Err(e) => {
                    // The grant may have landed (e.g. a timeout after sending): keep counting it
                    // until the watch shows it or the uncertainty window passes.
                    let until = Instant::now() + ctx.config.api_timeout.saturating_mul(6);
                    gate.record_uncertain(&name, obj.metadata.uid.as_deref(), &decision.status, until);
                    return Err(e);
                }
            },
            None => write_and_remember(ctx, obj, &decision.status).await?,
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
                let wait = ctx.drain_pass(&name, action, &policy).await?;
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
/// The metric category of a failure reason: the reason itself when it is one of
/// [`reason::FAILURES`], else `Other` (the label set stays bounded).
fn failure_category(why: &str) -> &'static str {
    reason::FAILURES
        .iter()
        .find(|r| **r == why)
        .copied()
        .unwrap_or("Other")
}

impl Context {
    pub(super) async fn write_status(
        &self,
        name: &str,
        status: &NixOSNodeStatus,
    ) -> Result<(), ControllerError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each Degraded reason counts under its own category. (A staging timeout, written as
    /// `StagingTimeout`, used to be counted as `Other`.)
    #[test]
    fn every_failure_reason_is_its_own_metric_category() {
        for why in reason::FAILURES {
            assert_eq!(failure_category(why), why);
        }
        assert_eq!(failure_category(reason::STAGING_TIMEOUT), "StagingTimeout");
        assert_eq!(failure_category("SomethingNew"), "Other");
    }

    /// Every reason `decide` fails a node with is in [`reason::FAILURES`], so that no failure
    /// is counted as `Other` by mistake.
    #[test]
    fn decide_fails_only_with_listed_reasons() {
        let sources = [
            include_str!("../rollout/decide.rs"),
            include_str!("../rollout/decide/staging.rs"),
            include_str!("../rollout/decide/draining.rs"),
            include_str!("../rollout/decide/activation.rs"),
            include_str!("../rollout/decide/verification.rs"),
            include_str!("../rollout/decide/failure.rs"),
            include_str!("../rollout/decide/conditions.rs"),
        ];
        let call = regex::Regex::new(r"\.fail\(\s*reason::([A-Z_]+)").unwrap();
        let mut seen = 0;
        for text in sources {
            for c in call.captures_iter(text) {
                seen += 1;
                let name = &c[1];
                let listed = include_str!("../rollout/mod.rs")
                    .lines()
                    .find(|l| l.contains(&format!("pub const {name}: &str")))
                    .and_then(|l| l.split('"').nth(1))
                    .unwrap_or_else(|| panic!("reason::{name} is not a string constant"));
                assert!(
                    reason::FAILURES.contains(&listed),
                    "reason::{name} ({listed}) is not in reason::FAILURES"
                );
            }
        }
        assert!(seen >= 8, "found only {seen} fail(reason::…) calls");
    }
}
