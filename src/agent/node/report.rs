//! What the agent reports (`status.agent`), computed from the host state file and the host's
//! facts, and publishing it to the status writer while a long step runs.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::reboot::rebooted_since;
use super::{NodeAgent, NodeError};
use crate::agent::state::{ActivationRecord, HostState, Step};
use crate::api::{ActivationReport, ActivationState, AgentStatus};

impl NodeAgent {
    /// Publish intermediate reports (`Running` while `switch-to-configuration` runs,
    /// `RebootRequested` before rebooting) to `tx`.
    /// `acked` carries what the writer has stored: before rebooting, the agent waits until the
    /// `RebootRequested` report is there (bounded by `report_timeout`).
    pub fn with_progress(
        mut self,
        tx: tokio::sync::watch::Sender<Option<AgentStatus>>,
        acked: tokio::sync::watch::Receiver<Option<AgentStatus>>,
    ) -> Self {
        self.progress = Some(tx);
        self.acked = Some(acked);
        self
    }

    pub(super) fn publish(&self, st: &HostState) {
        if let Some(tx) = &self.progress {
            send_report(tx, self.observe_with(st));
        }
    }

    /// The facts to report, without acting.
    pub fn observe(&self) -> Result<AgentStatus, NodeError> {
        let st = self.load()?;
        Ok(self.observe_with(&st))
    }

    pub(super) fn observe_with(&self, st: &HostState) -> AgentStatus {
        let boot_id = self.boot_id();
        let current = self.current_system();
        let nixos_version = current
            .as_ref()
            .and_then(|c| self.read_trimmed(&Path::new(c).join("nixos-version")));
        let cache = self.revision_cache.lock().ok().and_then(|c| c.clone());
        let configuration_revision = match (&current, cache) {
            (Some(c), Some((s, r))) if *c == s => r,
            (Some(c), _) => self.read_trimmed(&Path::new(c).join("configuration-revision")),
            (None, _) => None,
        };
        AgentStatus {
            booted_system: self.booted_system(),
            current_system: current,
            default_system: self.profile_system(),
            profile_generation: self.profile_generation(),
            nixos_version,
            configuration_revision,
            staged: st.staged.as_ref().map(|r| r.staged.clone()),
            activation: st
                .activation
                .as_ref()
                .map(|r| activation_report(r, boot_id.as_deref())),
            last_error: st.last_error.clone(),
            boot_id,
            secrets: st.secrets.clone(),
            secrets_missing: self.secrets_missing.clone(),
            nix_system: Some(crate::builder::host_nix_system()),
            builds: Vec::new(),
            cache: None,
        }
    }
}

/// The report of a recorded activation, given the current boot id.
pub fn activation_report(r: &ActivationRecord, boot_id: Option<&str>) -> ActivationReport {
    let state = match r.step {
        Step::Finished => r.outcome.unwrap_or(ActivationState::Failed),
        Step::RebootIssued => {
            if rebooted_since(r.boot_id_before.as_deref(), boot_id) {
                ActivationState::Rebooted
            } else {
                ActivationState::RebootRequested
            }
        }
        _ => ActivationState::Running,
    };
    ActivationReport {
        id: r.id.clone(),
        action: r.action,
        state,
        system: r.system.clone(),
        boot_id_before: r.boot_id_before.clone(),
        exit_code: r.exit_code,
        units_failed: r.exit_code == Some(4) && state != ActivationState::Failed,
        message: r.message.clone(),
        boot_once: r.boot_once.clone(),
        updated_at: Time(r.updated_at),
    }
}

/// Hand `facts` to the status writer, which is woken only when they changed.
pub(in crate::agent) fn send_report(
    tx: &tokio::sync::watch::Sender<Option<AgentStatus>>,
    facts: AgentStatus,
) {
    tx.send_if_modified(|r| {
        let changed = r.as_ref() != Some(&facts);
        *r = Some(facts);
        changed
    });
}
