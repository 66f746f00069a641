//! Options of a simulated cluster (`nixroll::sim::world`) for tests that watch a rollout.

use std::time::Duration;

use nixroll::sim::cluster::Timing;
use nixroll::sim::world::{NixMode, WorldOptions};

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
