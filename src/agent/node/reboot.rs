//! Requesting a reboot: the report saying so is stored in the API before the machine goes
//! down.

use super::NodeAgent;
use crate::agent::state::HostState;

impl NodeAgent {
    /// Wait until the writer acknowledges that the facts of `st` are stored (no-op without a
    /// progress channel). Bounded: an API outage must not hold a granted step forever.
    pub(super) async fn published_and_stored(&self, st: &HostState) {
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
