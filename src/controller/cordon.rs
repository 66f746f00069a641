//! Node patches: cordon (with nixroll's mark) and uncordon (removing it) in one conditional
//! merge patch, logged and told as an Event on the Node.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use tracing::{debug, info};

use super::{Context, ControllerError};

/// When a conditional cordon or uncordon met a newer Node: decide again this soon at the latest.
pub(super) const NODE_CHANGED_RECHECK: Duration = Duration::from_secs(1);

/// Cordon or uncordon `name` (see [`set_cordon`]), log it and record an Event on the Node.
/// `Ok(false)`: skipped, the Node changed since the decision (409).
pub(super) async fn set_cordon_and_tell(
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
