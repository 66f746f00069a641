//! Options of a simulated cluster (`nixroll::sim::world`) for tests that watch a rollout, and
//! the watch-driven wait on its NixOSNodes.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use nixroll::api::NixOSNode;
use nixroll::sim::cluster::Timing;
use nixroll::sim::world::{NixMode, World, WorldOptions};

/// `nodes` nodes (one control plane) with `pods_per_node` workload pods each, real Nix when
/// installed, and fast pods and reboots (50 ms termination, 100 ms start-up, 400 ms reboot).
pub fn fast_world(nodes: usize, pods_per_node: usize) -> WorldOptions {
    WorldOptions {
        nodes,
        control_planes: 1,
        nix: NixMode::Auto,
        timing: Timing {
            pod_termination: Duration::from_millis(50),
            pod_startup: Duration::from_millis(100),
            reboot: Duration::from_millis(400),
            request_timeout: Duration::from_secs(10),
        },
        pods_per_node,
        apps: None,
    }
}

/// Watch the NixOSNodes until `pred` holds for those seen so far (bounded by `limit`); `check`
/// sees every intermediate state. On a timeout the panic lists each node's phase, revision,
/// message, target and builds.
pub async fn watch_nodes(
    world: &World,
    what: &str,
    limit: Duration,
    pred: impl Fn(&BTreeMap<String, NixOSNode>) -> bool,
    mut check: impl FnMut(&BTreeMap<String, NixOSNode>),
) -> BTreeMap<String, NixOSNode> {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let mut seen = BTreeMap::new();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let res = tokio::time::timeout(limit, async {
        while let Ok(Some(o)) = stream.try_next().await {
            seen.insert(o.metadata.name.clone().unwrap_or_default(), o);
            check(&seen);
            if pred(&seen) {
                return;
            }
        }
    })
    .await;
    if res.is_err() {
        let table: Vec<String> = seen
            .values()
            .map(|o| {
                let s = o.status.clone().unwrap_or_default();
                format!(
                    "{:?} {:?} {:?} {:?} {:?} {:?}",
                    o.metadata.name, s.phase, s.revision, s.message, s.target, s.builds
                )
            })
            .collect();
        panic!("timed out waiting for {what}:\n{}", table.join("\n"));
    }
    seen
}

/// The value of the metric sample `name` the controller serves at `bound` (its /metrics).
pub async fn metric(bound: &std::sync::OnceLock<std::net::SocketAddr>, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = nixroll::sim::demo::wait_for_bound(bound)
        .await
        .expect("metrics bound");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
