//! Builders of nixroll's API objects for tests, unit and integration alike: the fields a test
//! cares about are given, the rest are the defaults a user gets by leaving them out.

use crate::api::{
    FlakeSourceRef, FlakeSourceSpec, NixOSNode, NixOSNodeSpec, NixOSNodeStatus, Phase, SourceKind, SourceRef,
};

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

/// The spec of a NixOSNode that follows the FlakeSource `source` in nixroll's namespace, with no
/// `revision` and the given `flake` (empty: derived from the source); otherwise as [`spec`].
pub fn following_spec(flake: &str, source: &str) -> NixOSNodeSpec {
    NixOSNodeSpec {
        source_ref: Some(SourceRef {
            kind: SourceKind::FlakeSource,
            name: source.into(),
            namespace: None,
        }),
        ..spec(flake, "")
    }
}

/// The spec of a FlakeSource following `branch` of `url` with the defaults a user gets by
/// leaving the rest out (every 5 minutes, 60 s timeout, no credentials, fast-forward only).
pub fn flake_source_spec(url: &str, branch: &str) -> FlakeSourceSpec {
    FlakeSourceSpec {
        url: url.into(),
        git_ref: FlakeSourceRef {
            branch: Some(branch.into()),
            ..FlakeSourceRef::default()
        },
        interval: "5m".into(),
        timeout: "60s".into(),
        suspend: false,
        secret_ref: None,
        insecure: false,
        allow_non_fast_forward: false,
        verify: None,
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
