//! `nixroll demo --pools`: the demo's nodes in NixOSPools — a canary pool of one worker that
//! takes the revision first, then two pools that roll concurrently after the canary has run it
//! for a soak, one of them behind a CEL health gate over a ConfigMap ("storage health") that
//! blocks until the demo marks the storage healthy.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::api::{NixOSNode, NixOSPool};
use crate::sim::world::{World, WorldError, call};

/// The canary's soak before the other pools start.
pub const SOAK: &str = "5s";
/// How long the storage stays "rebuilding" after the rollout starts.
pub const GATE_BLOCKS_FOR: Duration = Duration::from_secs(8);
/// The ConfigMap (namespace `default`) the health gate reads.
pub const STORAGE_CONFIGMAP: &str = "storage-health";

/// Label the NixOSNodes and create the pools and the storage ConfigMap. Returns one line per
/// pool for the user. The first node (a k3s server) and every other worker go to `zone-a`; the
/// second node is the canary; the rest go to `zone-b`, which has the health gate.
pub async fn set_up(world: &World) -> Result<Vec<String>, WorldError> {
    let names: Vec<String> = world.nodes.iter().map(|n| n.name.clone()).collect();
    let mut members: [(String, Vec<String>); 3] = [
        ("canary".into(), Vec::new()),
        ("zone-a".into(), Vec::new()),
        ("zone-b".into(), Vec::new()),
    ];
    for (i, n) in names.iter().enumerate() {
        let pool = match i {
            1 => 0,
            0 => 1,
            _ if i % 2 == 0 => 1,
            _ => 2,
        };
        members[pool].1.push(n.clone());
    }
    let nn: Api<NixOSNode> = Api::all(world.client.clone());
    for (pool, nodes) in &members {
        for n in nodes {
            call(
                format!("label NixOSNode {n}"),
                nn.patch(
                    n,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"metadata": {"labels": {"nixroll.io/pool": pool}}})),
                ),
            )
            .await?;
        }
    }
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": STORAGE_CONFIGMAP}, "data": {"state": "rebuilding"}
    }))
    .map_err(|e| WorldError::Io(std::io::Error::other(e)))?;
    call(
        "create the storage ConfigMap",
        cms.create(&PostParams::default(), &cm),
    )
    .await?;
    let pools: Api<NixOSPool> = Api::all(world.client.clone());
    let specs = [
        json!({"selector": {"matchLabels": {"nixroll.io/pool": "canary"}}, "maxUnavailable": 1}),
        json!({"selector": {"matchLabels": {"nixroll.io/pool": "zone-a"}}, "maxUnavailable": 1,
            "after": ["canary"], "soak": SOAK}),
        json!({"selector": {"matchLabels": {"nixroll.io/pool": "zone-b"}}, "maxUnavailable": 1,
            "after": ["canary"], "soak": SOAK,
            "healthGates": {"cel": [{"name": "storage", "apiVersion": "v1", "kind": "ConfigMap",
                "namespace": "default", "objectName": STORAGE_CONFIGMAP,
                "expression": "object.data.state == 'healthy'", "timeout": "5s"}]}}),
    ];
    let mut lines = Vec::new();
    for ((name, nodes), spec) in members.iter().zip(specs) {
        let pool: NixOSPool = serde_json::from_value(json!({
            "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSPool",
            "metadata": {"name": name}, "spec": spec,
        }))
        .map_err(|e| WorldError::Io(std::io::Error::other(e)))?;
        call(
            format!("create NixOSPool {name}"),
            pools.create(&PostParams::default(), &pool),
        )
        .await?;
        let how = match name.as_str() {
            "canary" => "first".to_owned(),
            "zone-a" => format!("after canary, soak {SOAK}"),
            _ => format!(
                "after canary, soak {SOAK}, health gate: ConfigMap {STORAGE_CONFIGMAP} state == healthy"
            ),
        };
        lines.push(format!("  pool {name:<7} {:<24} {how}", nodes.join(",")));
    }
    Ok(lines)
}

/// Mark the storage healthy after [`GATE_BLOCKS_FOR`] (in the background).
pub fn heal_storage_later(world: &World) -> tokio::task::JoinHandle<()> {
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), "default");
    tokio::spawn(async move {
        tokio::time::sleep(GATE_BLOCKS_FOR).await;
        let patch = json!({"data": {"state": "healthy"}});
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            cms.patch(STORAGE_CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
    })
}
