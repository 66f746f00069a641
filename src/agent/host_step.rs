//! One pass of the agent's host logic without Kubernetes (`nixroll host-step`, hidden): the
//! grant comes from the command line instead of `status.activation`, and the facts the agent
//! would report are printed as JSON instead of applied to `status.agent`.
//!
//! It exists for the real-bootloader test (`tests/bootloader_qemu.rs`, docs/bootloader.md):
//! inside a QEMU guest booted by OVMF and systemd-boot, the unchanged [`NodeAgent`] runs on
//! the guest's own `/` ([`HostRoot`] at `/`, commands run directly, `bootctl` against the
//! firmware's real EFI variables), so the one-time boot and the bless are the agent's own code
//! path. The only stand-in is the system profile: the guest has no Nix, so the profile's
//! generations are kept by [`SimNix`] (the same `system-N-link` symlinks `nix-env` makes).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::host::{Host, HostRoot, RebootHook};
use super::node::{HostOptions, NodeAgent, NodeError};
use crate::api::{ActivationAction, ActivationGrant, AgentStatus};
use crate::nix::Nix;
use crate::sim::host::SimNix;

/// What one pass does.
#[derive(Clone, Debug)]
pub struct HostStep {
    /// The host's `/` (the guest's own root: `/`).
    pub root: PathBuf,
    /// The reboot (`reboot -f` in the guest).
    pub reboot_command: String,
    /// The grant to carry out (`None`: only resume an unfinished activation and report).
    pub grant: Option<(String, ActivationAction, String)>,
    /// Bound on `switch-to-configuration`.
    pub activation_timeout: Duration,
}

/// Run one [`NodeAgent::reconcile`] pass on `step.root`; returns the facts it reports.
pub async fn run(step: &HostStep) -> Result<AgentStatus, NodeError> {
    let host: Arc<dyn Host> = Arc::new(HostRoot::new(
        step.root.clone(),
        RebootHook::command_line(&step.reboot_command),
    ));
    let nix: Arc<dyn Nix> = Arc::new(SimNix::at_root(step.root.clone()));
    let mut agent = NodeAgent::new(
        host,
        nix,
        HostOptions {
            activation_timeout: step.activation_timeout,
            result_poll: Duration::from_millis(50),
            ..HostOptions::default()
        },
    );
    let grant = step.grant.as_ref().map(|(id, action, system)| ActivationGrant {
        id: id.clone(),
        action: *action,
        system: system.clone(),
        granted_at: Time(Timestamp::now()),
        boot_id_before: None,
    });
    agent.reconcile(None, grant.as_ref()).await
}
