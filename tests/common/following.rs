//! A simulated cluster whose nodes follow a FlakeSource (`infra` in `nixroll-system`) on a real
//! git repository: the set-up `follow.rs`, `signed.rs` and `push.rs` share, and watch-driven
//! waits on the source and the nodes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use nixroll::api::{FlakeSource, NixOSNode, NixOSNodeStatus, Phase, SourceKind, SourceRef};
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::cluster::Timing;
use nixroll::sim::world::{NixMode, World, WorldOptions};
use serde_json::{Value, json};

/// Where the source lives and what it is called.
pub const NAMESPACE: &str = "nixroll-system";
pub const SOURCE: &str = "infra";
/// The bound of every wait here.
pub const WAIT: Duration = Duration::from_secs(90);

/// `nodes` simulated nodes (one control plane, one pod each, simulated Nix) with fast pods and
/// reboots (50 ms termination, 100 ms start-up, 300 ms reboot).
pub fn simulated(nodes: usize) -> WorldOptions {
    WorldOptions {
        nodes,
        control_planes: 1,
        nix: NixMode::Simulated,
        timing: Timing {
            pod_termination: Duration::from_millis(50),
            pod_startup: Duration::from_millis(100),
            reboot: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
        },
        pods_per_node: 1,
        apps: None,
    }
}

/// A controller that rolls one node at a time, retries drains fast and resolves sources at
/// least every 200 ms, with its git cache in `cache`; its lease and identity start with `prefix`.
pub fn follow_config(prefix: &str, cache: &Path) -> ControllerConfig {
    let mut c = ControllerConfig::new(&format!("{prefix}-{}", fastrand::u32(..)));
    c.policy.max_unavailable = MaxUnavailable::Count(1);
    c.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
    c.follow.source_controller.cache_dir = cache.to_path_buf();
    c.follow.source_controller.min_interval = Duration::from_millis(200);
    c
}

/// The spec of a source on `repo`'s `branch` polled every `interval`; `extra` fields (e.g.
/// `verify`) are merged in.
pub fn source_spec(repo: &Path, branch: &str, interval: &str, extra: Value) -> Value {
    let mut spec = json!({"url": format!("file://{}", repo.display()), "ref": {"branch": branch},
                          "interval": interval, "timeout": "10s", "insecure": true});
    if let (Some(s), Value::Object(extra)) = (spec.as_object_mut(), extra) {
        s.extend(extra);
    }
    spec
}

/// Create the source with `spec` and make every node of `world` follow it; the source's API.
pub async fn follow_source(world: &World, spec: Value) -> Api<FlakeSource> {
    let sources: Api<FlakeSource> = Api::namespaced(world.client.clone(), NAMESPACE);
    let fs: FlakeSource = serde_json::from_value(json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": SOURCE, "namespace": NAMESPACE},
        "spec": spec
    }))
    .unwrap();
    sources.create(&PostParams::default(), &fs).await.unwrap();
    let mut node_spec = world.spec("");
    node_spec.flake = String::new();
    node_spec.source_ref = Some(SourceRef {
        kind: SourceKind::FlakeSource,
        name: SOURCE.into(),
        namespace: None,
    });
    world.apply_all(&node_spec).await.unwrap();
    sources
}

/// Watch the source until its state satisfies `pred` (bounded by [`WAIT`]).
pub async fn wait_source(
    api: &Api<FlakeSource>,
    what: &str,
    pred: impl Fn(&FlakeSource) -> bool,
) -> FlakeSource {
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let mut last = None;
    let found = tokio::time::timeout(WAIT, async {
        while let Ok(Some(fs)) = stream.try_next().await {
            if fs.metadata.name.as_deref() != Some(SOURCE) {
                continue;
            }
            if pred(&fs) {
                return Some(fs);
            }
            last = Some(fs);
        }
        None
    })
    .await;
    match found {
        Ok(Some(fs)) => fs,
        _ => panic!(
            "timed out waiting for {what}: {:?}",
            last.and_then(|fs| fs.status)
        ),
    }
}

/// The commit the source accepted.
pub fn commit_of(fs: &FlakeSource) -> Option<&str> {
    fs.status.as_ref().and_then(|s| s.commit.as_deref())
}

/// The source's condition `t` as (status, reason, message).
pub fn condition(fs: &FlakeSource, t: &str) -> Option<(String, String, String)> {
    fs.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn status_of(o: &NixOSNode) -> NixOSNodeStatus {
    o.status.clone().unwrap_or_default()
}

/// The node is up to date on `rev`.
pub fn runs(o: &NixOSNode, rev: &str) -> bool {
    let s = status_of(o);
    s.phase == Some(Phase::UpToDate) && s.revision.as_deref() == Some(rev)
}

/// Watch the NixOSNodes until all `world`'s nodes were seen and `pred` holds for them (bounded
/// by [`WAIT`]); `check` sees every intermediate state. On a timeout the panic lists the nodes.
pub async fn wait_nodes(
    world: &World,
    what: &str,
    pred: impl Fn(&BTreeMap<String, NixOSNode>) -> bool,
    check: impl FnMut(&BTreeMap<String, NixOSNode>),
) -> BTreeMap<String, NixOSNode> {
    let all = world.nodes.len();
    super::world::watch_nodes(world, what, WAIT, |m| m.len() >= all && pred(m), check).await
}

/// Every node of `world` is up to date on `rev`.
pub async fn wait_all_on(world: &World, what: &str, rev: &str) -> BTreeMap<String, NixOSNode> {
    wait_nodes(world, what, |m| m.values().all(|o| runs(o, rev)), |_| {}).await
}
