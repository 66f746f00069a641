//! The node agent (`nixroll agent --node NAME`): one per node, a privileged DaemonSet pod.
//!
//! It watches only its own `NixOSNode` (field selector `metadata.name=NAME`), acts on
//! `status.target` (stage) and `status.activation` (activate, once per grant id) through
//! [`node::NodeAgent`], and writes only `status.agent` with server-side apply as
//! `nixroll-agent`, and only when the facts changed. No polling: an idle agent makes no API
//! request besides its watch. See docs/agent.md.
//!
//! * [`host`]: how the agent reaches the machine (real NixOS host or a directory).
//! * [`state`]: progress persisted on the host, so restarts never repeat a step.
//! * [`node`]: the host logic (stage, activate, report), without Kubernetes.
//! * [`watch`]: host changes (system links repointed by someone else) reported promptly.

pub mod host;
pub mod node;
pub mod secrets;
pub mod state;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::{AgentStatus, NixOSNode, SECRETS_NAMESPACE};
use crate::names::{AGENT_MANAGER, GROUP, VERSION};
use crate::nix::Nix;
use host::Host;
use k8s_openapi::api::core::v1::Secret;
use node::{HostOptions, NodeAgent, NodeError};
use secrets::{Fetched, SecretsView};
use std::collections::{BTreeMap, BTreeSet};

/// Everything `run` needs besides the client.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Name of the Node (and of its NixOSNode).
    pub node: String,
    pub host: Arc<dyn Host>,
    pub nix: Arc<dyn Nix>,
    pub options: HostOptions,
    /// Bound on every single API request (the watch has its own server-side timeout).
    pub api_timeout: Duration,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>, host: Arc<dyn Host>, nix: Arc<dyn Nix>) -> Self {
        AgentConfig {
            node: node.into(),
            host,
            nix,
            options: HostOptions::default(),
            api_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The host state could not be read or written: acting on would risk repeating a step.
    #[error("node {node}: {source}")]
    HostState {
        node: String,
        #[source]
        source: NodeError,
    },
}

/// Run the agent until `shutdown` completes. Returns an error only when continuing would be
/// unsafe (the host state file cannot be read or written); API outages are retried.
pub async fn run(
    client: Client,
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let api: Api<NixOSNode> = Api::all(client.clone());
    let patch_api = api.clone();
    let (tx, rx) = tokio::sync::watch::channel::<Option<NixOSNode>>(None);
    let selector = format!("metadata.name={}", config.node);
    let node = config.node.clone();

    let watch = async move {
        let stream = watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    tx.send_replace(Some(o));
                }
                Ok(watcher::Event::Delete(_)) => {
                    tx.send_replace(None);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => tracing::warn!(node = %node, error = %e, "watch failed; retrying"),
            }
        }
    };

    // Reports flow through a watch channel to one writer: only the newest matters.
    let (report_tx, report_rx) = tokio::sync::watch::channel::<Option<AgentStatus>>(None);
    // What the writer has stored: the host logic waits for it before rebooting.
    let (acked_tx, acked_rx) = tokio::sync::watch::channel::<Option<AgentStatus>>(None);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let secrets: Api<Secret> = Api::namespaced(client, SECRETS_NAMESPACE);
    let work = work(config.clone(), rx, secrets, report_tx, acked_rx, seen.clone());
    let write = write(patch_api, config, report_rx, acked_tx, seen);

    tokio::select! {
        _ = shutdown => Ok(()),
        _ = watch => Ok(()),
        _ = write => Ok(()),
        r = work => r,
    }
}

/// What the server holds in `status.agent` when the agent starts (so an unchanged report is
/// not rewritten after a restart); `None` until the first object arrives.
type Seen = Arc<std::sync::Mutex<Option<Option<AgentStatus>>>>;

/// Reconcile the newest object each time it changes and publish the facts.
async fn work(
    config: AgentConfig,
    mut rx: tokio::sync::watch::Receiver<Option<NixOSNode>>,
    secrets_api: Api<Secret>,
    report: tokio::sync::watch::Sender<Option<AgentStatus>>,
    acked: tokio::sync::watch::Receiver<Option<AgentStatus>>,
    seen: Seen,
) -> Result<(), AgentError> {
    let mut agent = NodeAgent::new(config.host.clone(), config.nix.clone(), config.options.clone())
        .with_progress(report.clone(), acked);
    let mut host_changed = watch::host_changes(config.host.as_ref());
    // One watch per Secret the NixOSNode names (by name; never a list of all Secrets). The
    // JoinSet aborts them when the agent stops.
    let (secrets_tx, mut secrets_rx) = tokio::sync::watch::channel(SecretsView::new());
    let mut watchers = tokio::task::JoinSet::new();
    let mut watching: BTreeMap<String, tokio::task::AbortHandle> = BTreeMap::new();
    loop {
        // Wait for a change of the object or of a named Secret, or for a failed staging's
        // retry time (a local timer: no request is made unless the facts change).
        let retry = agent.next_retry();
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Ok(()) },
            r = secrets_rx.changed() => if r.is_err() { return Ok(()) },
            _ = sleep_until(retry) => {}
            _ = changed(&mut host_changed) => {}
        }
        let Some(obj) = rx.borrow_and_update().clone() else {
            continue;
        };
        let status = obj.status.clone().unwrap_or_default();
        if let Ok(mut s) = seen.lock()
            && s.is_none()
        {
            *s = Some(status.agent.clone());
        }
        // Follow the names in spec.secrets: start new watches, stop those no longer named.
        let names: BTreeSet<String> = obj
            .spec
            .secrets
            .iter()
            .map(|s| s.secret_ref.name.clone())
            .collect();
        watching.retain(|name, handle| {
            let keep = names.contains(name);
            if !keep {
                handle.abort();
                secrets_tx.send_modify(|v| {
                    v.remove(name);
                });
            }
            keep
        });
        let mut started = false;
        for name in &names {
            if !watching.contains_key(name) {
                secrets_tx.send_modify(|v| {
                    v.insert(name.clone(), Fetched::Pending);
                });
                let handle = watchers.spawn(secrets::watch_secret(
                    secrets_api.clone(),
                    name.clone(),
                    secrets_tx.clone(),
                    config.api_timeout,
                ));
                watching.insert(name.clone(), handle);
                started = true;
            }
        }
        while watchers.try_join_next().is_some() {}
        if started {
            // Files before any activation: wait (bounded) until every named Secret was read.
            let read = tokio::time::timeout(
                config.api_timeout,
                secrets_rx.wait_for(|v| {
                    names
                        .iter()
                        .all(|n| !matches!(v.get(n), None | Some(Fetched::Pending)))
                }),
            )
            .await;
            if read.is_err() {
                tracing::warn!(node = %config.node, "some Secrets could not be read in time");
            }
        }
        let fetched = secrets_rx.borrow_and_update().clone();
        agent
            .sync_secrets(&obj.spec.secrets, &fetched)
            .await
            .map_err(|source| AgentError::HostState {
                node: config.node.clone(),
                source,
            })?;
        let facts = agent
            .reconcile(status.target.as_ref(), status.activation.as_ref())
            .await
            .map_err(|source| AgentError::HostState {
                node: config.node.clone(),
                source,
            })?;
        report.send_if_modified(|r| {
            let changed = r.as_ref() != Some(&facts);
            *r = Some(facts);
            changed
        });
    }
}

/// A change seen on the host (or never, without a watcher).
async fn changed(rx: &mut Option<tokio::sync::watch::Receiver<()>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Write each new report (server-side apply, bounded); retry failed writes with backoff.
async fn write(
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
