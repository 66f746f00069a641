//! Whether a staged system needs a reboot: the components of a NixOS toplevel compared with
//! the booted system (and `switch-inhibitors` with the running one).

use std::path::{Path, PathBuf};

use super::{NodeAgent, read_bounded};
use crate::agent::host::{Host, resolve};

/// Components of a NixOS toplevel whose change needs a reboot (compared with the booted
/// system). `reboot-triggers` is only compared when both systems have it. `systemd` is not
/// among them: `switch-to-configuration` re-executes PID 1 (`systemctl daemon-reexec`) when
/// systemd changed, and an incompatible one changes `init-interface-version` (exit 100); see
/// [`HostOptions::systemd_needs_reboot`](super::HostOptions::systemd_needs_reboot) and docs/agent.md.
pub const REBOOT_COMPONENTS: [&str; 6] = [
    "kernel",
    "initrd",
    "kernel-modules",
    "kernel-params",
    "firmware",
    "init-interface-version",
];

/// Counted as a reboot reason only with [`HostOptions::systemd_needs_reboot`](super::HostOptions::systemd_needs_reboot).
pub const SYSTEMD_COMPONENT: &str = "systemd";

/// The reboot reason given when `switch-inhibitors` of the running and the new system differ:
/// NixOS refuses `switch` then ("You probably want to run nixos-rebuild boot").
pub const SWITCH_INHIBITORS: &str = "switch-inhibitors";

impl NodeAgent {
    /// [`reboot_reasons`] plus `systemd` when [`HostOptions::systemd_needs_reboot`](super::HostOptions::systemd_needs_reboot).
    pub(super) fn reasons(&self, booted: Option<&str>, current: Option<&str>, new: &str) -> Vec<String> {
        let mut reasons = reboot_reasons(self.host.as_ref(), booted, current, new);
        if self.options.systemd_needs_reboot && differs(self.host.as_ref(), booted, new, SYSTEMD_COMPONENT) {
            reasons.push(SYSTEMD_COMPONENT.to_string());
        }
        reasons
    }
}

/// Why booting `new` would differ from the running kernel/initrd/…: the names of
/// [`REBOOT_COMPONENTS`] that differ between `booted` and `new`, plus `reboot-triggers` when
/// both have it. Unknown booted system ⇒ every component present in `new` counts. Plus
/// [`SWITCH_INHIBITORS`] when the running system (`current`) and `new` both have
/// `switch-inhibitors` and they differ: NixOS would refuse to `switch` to it.
pub fn reboot_reasons(
    host: &dyn Host,
    booted: Option<&str>,
    current: Option<&str>,
    new: &str,
) -> Vec<String> {
    let mut reasons = Vec::new();
    for name in REBOOT_COMPONENTS {
        if differs(host, booted, new, name) {
            reasons.push(name.to_string());
        }
    }
    if let Some(b) = booted {
        let (b, n) = (
            component(host, b, "reboot-triggers"),
            component(host, new, "reboot-triggers"),
        );
        if b.is_some() && n.is_some() && !same_component(host, b.as_deref(), n.as_deref()) {
            reasons.push("reboot-triggers".to_string());
        }
    }
    if let Some(c) = current
        && let (Some(a), Some(b)) = (
            component(host, c, SWITCH_INHIBITORS),
            component(host, new, SWITCH_INHIBITORS),
        )
        && a != b
        && inhibitors_differ(&host.fs_path(&a), &host.fs_path(&b))
    {
        reasons.push(SWITCH_INHIBITORS.to_string());
    }
    reasons
}

/// NixOS's check: every name present in both JSON objects must map to the same value (files
/// that are not JSON objects are compared whole). Unreadable counts as different.
fn inhibitors_differ(a: &Path, b: &Path) -> bool {
    let (Some(ta), Some(tb)) = (read_bounded(a, 1 << 20), read_bounded(b, 1 << 20)) else {
        return true;
    };
    let parse = |t: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok();
    match (parse(&ta), parse(&tb)) {
        (Some(ma), Some(mb)) => ma.iter().any(|(k, v)| mb.get(k).is_some_and(|w| w != v)),
        _ => ta.trim() != tb.trim(),
    }
}

/// Whether component `name` of `new` differs from the booted system's; with the booted
/// system unknown, whether `new` has it.
fn differs(host: &dyn Host, booted: Option<&str>, new: &str, name: &str) -> bool {
    let b = booted.map(|b| component(host, b, name));
    let n = component(host, new, name);
    match b {
        None => n.is_some(),
        Some(b) => !same_component(host, b.as_deref(), n.as_deref()),
    }
}

fn component(host: &dyn Host, system: &str, name: &str) -> Option<PathBuf> {
    resolve(host, &Path::new(system).join(name))
}

/// Same resolved store path, or regular files with equal contents (files inside a toplevel
/// such as `kernel-params` differ in path whenever anything changed).
fn same_component(host: &dyn Host, a: Option<&Path>, b: Option<&Path>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => {
            let (la, lb) = (host.fs_path(a), host.fs_path(b));
            match (std::fs::metadata(&la), std::fs::metadata(&lb)) {
                (Ok(ma), Ok(mb)) if ma.is_file() && mb.is_file() && ma.len() == mb.len() => {
                    // Bounded: kernels are ~10-20 MiB; anything larger counts as different.
                    ma.len() <= 256 * 1024 * 1024
                        && matches!((std::fs::read(&la), std::fs::read(&lb)), (Ok(x), Ok(y)) if x == y)
                }
                _ => false,
            }
        }
        _ => false,
    }
}
