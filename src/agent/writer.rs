//! The status writer: the only place that writes `status.agent` (server-side apply as
//! `nixroll-agent`, bounded, retried with backoff), and only when the facts changed; it
//! acknowledges what is stored so that the host logic can wait for it before a reboot.

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};

use super::AgentConfig;
use crate::api::{AgentStatus, NixOSNode};
use crate::names::{AGENT_MANAGER, GROUP, VERSION};

/// What the server holds in `status.agent` when the agent starts (so an unchanged report is
/// not rewritten after a restart); `None` until the first object arrives.
pub(super) type Seen = Arc<std::sync::Mutex<Option<Option<AgentStatus>>>>;

/// Write each new report (server-side apply, bounded); retry failed writes with backoff.
pub(super) async fn write(
    api: Api<NixOSNode>,
    config: AgentConfig,
    mut rx: tokio::sync::watch::Receiver<Option<AgentStatus>>,
    acked: tokio::sync::watch::Sender<Option<AgentStatus>>,
    seen: Seen,
) {
    let mut written: Option<AgentStatus> = None;
    let mut seeded = false;
    let mut retry_in: Option<Duration> = None;
    loop {
        match retry_in {
            Some(d) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
        if !seeded
            && let Ok(s) = seen.lock()
            && let Some(server) = s.as_ref()
        {
            written = server.clone();
            seeded = true;
        }
        let Some(facts) = rx.borrow_and_update().clone() else {
            continue;
        };
        if written.as_ref() == Some(&facts) {
            acked.send_replace(Some(facts));
            retry_in = None;
            continue;
        }
        match apply_status(&api, &config.node, &facts, config.api_timeout).await {
            Ok(()) => {
                tracing::debug!(node = %config.node, "reported status.agent");
                written = Some(facts.clone());
                acked.send_replace(Some(facts));
                retry_in = None;
            }
            Err(e) => {
                let next = retry_in.map_or(Duration::from_secs(1), |d| (d * 2).min(Duration::from_secs(60)));
                tracing::warn!(node = %config.node, error = %e, retry_in = ?next, "cannot write status.agent");
                retry_in = Some(next);
            }
        }
    }
}

/// The server-side apply body: `status.agent` only.
pub fn status_patch(status: &AgentStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "NixOSNode",
        "status": { "agent": status },
    })
}

/// Write `status.agent` (server-side apply, field manager `nixroll-agent`, bounded).
pub async fn apply_status(
    api: &Api<NixOSNode>,
    node: &str,
    status: &AgentStatus,
    timeout: Duration,
) -> Result<(), String> {
    let params = PatchParams::apply(AGENT_MANAGER).force();
    let patch = Patch::Apply(status_patch(status));
    match tokio::time::timeout(timeout, api.patch_status(node, &params, &patch)).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}
