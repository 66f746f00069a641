//! Builders of nixroll's API objects for tests, unit and integration alike: the fields a test
//! cares about are given, the rest are the defaults a user gets by leaving them out.

use crate::api::{NixOSNode, NixOSNodeSpec, NixOSNodeStatus, Phase};

/// The spec of a NixOSNode that follows `flake` at `revision`: the node's own configuration,
/// no maintenance windows (any time), reboot if needed, the default drain, not suspended, no
/// secrets. Change a field with struct update syntax: `NixOSNodeSpec { suspend: true,
/// ..spec(flake, rev) }`.
pub fn spec(flake: &str, revision: &str) -> NixOSNodeSpec {
    NixOSNodeSpec {
        flake: flake.into(),
        revision: revision.into(),
        source_ref: None,
        configuration: None,
        maintenance_windows: Vec::new(),
        reboot: Default::default(),
        drain: None,
        suspend: false,
        secrets: Vec::new(),
    }
}

/// The NixOSNode `name` following `flake` at `revision` (see [`spec`]), without a status.
pub fn nixos_node(name: &str, flake: &str, revision: &str) -> NixOSNode {
    NixOSNode::new(name, spec(flake, revision))
}

/// `node` with a status that says only `phase`.
pub fn in_phase(mut node: NixOSNode, phase: Phase) -> NixOSNode {
    node.status = Some(NixOSNodeStatus {
        phase: Some(phase),
        ..NixOSNodeStatus::default()
    });
    node
}
