//! Build once per distinct system, in the controller: with builders (Nodes labelled
//! `nixroll.io/builder=true`) the target of a staging node names the build it fetches
//! (`status.target.build`) instead of being evaluated on the node, and each builder's
//! `status.builds` lists the distinct systems its agent is to build. Without builders for a
//! node's Nix system nothing changes (the node builds its own target). The choices are the
//! pure [`crate::rollout::build`]; this reads them off the caches and wakes whoever waits.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use crate::api::{BuildReport, NixOSNode, Phase, TargetBuild};
use crate::names::BUILDER_LABEL;
use crate::rollout::Decision;
use crate::rollout::build::{BuilderInfo, Fetch, Wanted, fetch_for, plan, progress};

/// A builder's facts, owned (the caches hand out `Arc`s).
struct Builder {
    name: String,
    nix_system: String,
    cache: Option<String>,
    reports: Vec<BuildReport>,
    available: bool,
}

/// Outside its own disruption window: schedulable, Ready, and its NixOSNode in no disruptive
/// phase (Draining, Activating, Rebooting, Verifying). Builds start only on such a builder.
fn available(node: &Node, o: &NixOSNode) -> bool {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let disrupted = o
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_disruptive());
    !cordoned && ready && !disrupted
}

fn is_builder(node: &Node) -> bool {
    node.labels().get(BUILDER_LABEL).is_some_and(|v| v == "true")
}

fn builders(ctx: &Context) -> Vec<Builder> {
    let mut out: Vec<Builder> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| is_builder(n))
        .filter_map(|n| {
            let o = ctx.nixosnodes.get(&ObjectRef::new(&n.name_any()))?;
            let agent = o.status.as_ref()?.agent.as_ref()?;
            Some(Builder {
                name: n.name_any(),
                nix_system: agent.nix_system.clone()?,
                cache: agent.cache.clone(),
                reports: agent.builds.clone(),
                available: available(n, &o),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn infos(builders: &[Builder]) -> Vec<BuilderInfo<'_>> {
    builders
        .iter()
        .map(|b| BuilderInfo {
            name: &b.name,
            nix_system: &b.nix_system,
            cache: b.cache.as_deref(),
            reports: &b.reports,
            available: b.available,
        })
        .collect()
}

fn staged_system(o: &NixOSNode) -> Option<&str> {
    Some(
        o.status
            .as_ref()?
            .agent
            .as_ref()?
            .staged
            .as_ref()?
            .system
            .as_str(),
    )
}

fn nix_system(o: &NixOSNode) -> Option<&str> {
    o.status.as_ref()?.agent.as_ref()?.nix_system.as_deref()
}

/// `decision` for `obj`, with its target's build and (for a builder) its builds filled in.
pub(super) fn with_builds(ctx: &Context, obj: &NixOSNode, mut decision: Decision) -> Decision {
    let builders = builders(ctx);
    if builders.is_empty() {
        return decision;
    }
    let infos = infos(&builders);
    let name = obj.name_any();

    // A builder: the distinct systems of every node's target of its Nix system.
    if infos.iter().any(|b| b.name == name) {
        let all = ctx.nixosnodes.state();
        // Every other node's target from the cache, this node's from the decision.
        type Row = (String, Option<String>, String, Option<String>);
        let targets: Vec<Row> = all
            .iter()
            .filter(|o| o.name_any() != name)
            .filter_map(|o| {
                let s = o.status.as_ref()?;
                let t = s.target.as_ref()?;
                Some((
                    o.name_any(),
                    nix_system(o).map(str::to_string),
                    t.installable.clone(),
                    s.retry_token.clone(),
                ))
            })
            .chain(decision.status.target.as_ref().map(|t| {
                (
                    name.clone(),
                    nix_system(obj).map(str::to_string),
                    t.installable.clone(),
                    decision.status.retry_token.clone(),
                )
            }))
            .collect();
        let wanted = targets.iter().map(|(n, sys, i, retry)| Wanted {
            node: n,
            nix_system: sys.as_deref(),
            installable: i,
            retry: retry.as_deref(),
        });
        let mut p = plan(&infos, wanted);
        let mine = p.remove(name.as_str()).unwrap_or_default();
        // Its plan changed (e.g. it left or entered its disruption window), or its agent's
        // reports may have: every staging node of its system looks again.
        let plan_changed = mine != decision.status.builds;
        if plan_changed {
            decision.status.builds = mine;
        }
        let reports_changed = obj
            .status
            .as_ref()
            .and_then(|s| s.agent.as_ref())
            .map(|a| &a.builds);
        if plan_changed || reports_changed.is_some_and(|r| !r.is_empty()) {
            let sys = nix_system(obj);
            for o in all.iter() {
                if o.name_any() != name
                    && nix_system(o) == sys
                    && o.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Staging))
                {
                    let _ = ctx.wake.send(ObjectRef::new(&o.name_any()));
                }
            }
        }
    } else {
        decision.status.builds = Vec::new();
    }

    // A staging node: fetch the build of its system, or wait for it.
    let staged = staged_system(obj);
    if decision.status.phase != Some(Phase::Staging) {
        // The phase moved on: staged, or failed by the builder (the Build column says so).
        if let Some(t) = decision.status.target.as_mut()
            && let Some(b) = t.build.as_mut()
        {
            if !b.system.is_empty() && staged == Some(b.system.as_str()) {
                b.progress = Some(crate::api::BuildProgress::Staged);
            } else if b.system.is_empty() {
                let w = Wanted {
                    node: &name,
                    nix_system: nix_system(obj),
                    installable: &t.installable,
                    retry: decision.status.retry_token.as_deref(),
                };
                if let Fetch::Failed { .. } = fetch_for(&w, &infos) {
                    b.progress = Some(crate::api::BuildProgress::Failed);
                }
            }
        }
        return decision;
    }
    let Some(target) = decision.status.target.as_mut() else {
        return decision;
    };
    let w = Wanted {
        node: &name,
        nix_system: nix_system(obj),
        installable: &target.installable,
        retry: decision.status.retry_token.as_deref(),
    };
    let fetch = fetch_for(&w, &infos);
    let at = progress(&fetch, &name, staged);
    match fetch {
        Fetch::Itself => target.build = None,
        Fetch::Ready(mut build) => {
            build.progress = at;
            let msg = format!(
                "fetching {} from builder {}",
                crate::api::short_system(&build.system),
                build.builder.as_deref().unwrap_or("?")
            );
            target.build = Some(build);
            decision.status.message = Some(msg);
        }
        Fetch::Waiting { builder, message, .. } => {
            let asked = builders
                .iter()
                .find(|b| b.name == builder)
                .and_then(|b| ctx.nixosnodes.get(&ObjectRef::new(&b.name)))
                .and_then(|o| o.status.clone())
                .is_some_and(|s| s.builds.iter().any(|r| r.installable == target.installable));
            if !asked {
                let _ = ctx.wake.send(ObjectRef::new(&builder));
            }
            target.build = Some(TargetBuild {
                system: String::new(),
                builder: Some(builder),
                cache: None,
                progress: at,
                built_at: None,
            });
            decision.status.message = Some(message);
        }
        Fetch::Failed { builder, message } => {
            target.build = Some(TargetBuild {
                system: String::new(),
                builder: Some(builder),
                cache: None,
                progress: at,
                built_at: None,
            });
            decision.status.message = Some(message);
        }
    }
    decision
}

/// `status` of a staging node whose builder failed the build of its target, with that
/// failure put where the decision looks for a failed staging (the agent's last error, for the
/// target's revision): the node fails once, `StageFailed`, with the builder's message, as a
/// failed build of its own would. Other nodes are returned unchanged. Only this reconcile's
/// view changes; the agent's status is never written by the controller.
pub(super) fn with_builder_failure(
    ctx: &Context,
    obj: &NixOSNode,
    mut status: crate::api::NixOSNodeStatus,
    now: jiff::Timestamp,
) -> crate::api::NixOSNodeStatus {
    if status.phase != Some(Phase::Staging) {
        return status;
    }
    let Some(target) = status.target.as_ref() else {
        return status;
    };
    if !target.build.as_ref().is_some_and(|b| b.system.is_empty()) {
        return status;
    }
    let builders = builders(ctx);
    let infos = infos(&builders);
    let w = Wanted {
        node: obj.metadata.name.as_deref().unwrap_or_default(),
        nix_system: nix_system(obj),
        installable: &target.installable,
        retry: status.retry_token.as_deref(),
    };
    if let Fetch::Failed { message, .. } = fetch_for(&w, &infos) {
        let revision = target.revision.clone();
        let agent = status.agent.get_or_insert_with(Default::default);
        agent.last_error = Some(crate::api::HostError {
            operation: crate::api::HostOperation::Stage,
            revision: Some(revision),
            message,
            at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        });
    }
    status
}
