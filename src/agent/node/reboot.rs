//! Rebooting for an activation: record `RebootIssued` with the boot id before, wait until
//! the report saying `RebootRequested` is stored in the API, then reboot; a new boot id
//! later proves that the reboot happened.

use super::{CrashPoint, NodeAgent, NodeError};
use crate::agent::state::{ActivationRecord, HostState, Step};
use crate::api::ActivationState;

impl NodeAgent {
    /// Request the reboot that finishes `rec` (its switch succeeded): at most once per grant,
    /// since `RebootIssued` is recorded first. A failed request finishes the activation as
    /// failed.
    pub(super) async fn request_reboot(
        &self,
        st: &mut HostState,
        rec: &ActivationRecord,
    ) -> Result<(), NodeError> {
        let boot_id = self.boot_id();
        self.update(st, |r| {
            r.boot_id_before = boot_id;
            r.step = Step::RebootIssued;
        })?;
        self.crash(CrashPoint::BeforeReboot)?;
        // RebootRequested is in the API before the machine goes down.
        self.published_and_stored(st).await;
        tracing::info!(id = %rec.id, "rebooting");
        if let Err(e) = self.host.reboot().await {
            return self.finish(st, ActivationState::Failed, e.to_string());
        }
        self.crash(CrashPoint::AfterReboot)?;
        // On a real host the machine is going down; a simulated reboot has already happened:
        // the RebootIssued step tells them apart.
        Ok(())
    }

    /// Wait until the writer acknowledges that the facts of `st` are stored (no-op without a
    /// progress channel). Bounded: an API outage must not hold a granted step forever.
    async fn published_and_stored(&self, st: &HostState) {
        self.publish(st);
        let Some(mut acked) = self.acked.clone() else {
            return;
        };
        let facts = self.observe_with(st);
        let stored = tokio::time::timeout(
            self.options.report_timeout,
            acked.wait_for(|a| a.as_ref() == Some(&facts)),
        )
        .await;
        match stored {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tracing::debug!("the report writer is gone; going on"),
            Err(_) => tracing::warn!(
                timeout = ?self.options.report_timeout,
                "the report was not acknowledged in time; going on (the new boot id proves the reboot)"
            ),
        }
    }
}

/// Whether the machine rebooted since `before` was read: a boot id is known now and differs.
pub(super) fn rebooted_since(before: Option<&str>, now: Option<&str>) -> bool {
    now.is_some() && now != before
}
