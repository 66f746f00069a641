//! The node agent (`nixroll agent --node NAME`): one per node, a privileged DaemonSet pod.
//!
//! It watches only its own `NixOSNode` (field selector `metadata.name=NAME`), acts on
//! `status.target` (stage) and `status.activation` (activate, once per grant id) through
//! [`node::NodeAgent`], and writes only `status.agent` with server-side apply as
//! `nixroll-agent`, and only when the facts changed. No polling: an idle agent makes no API
//! request besides its watch. See docs/agent.md.
//!
//! This file wires the parts together ([`run`]). The files:
//!
//! * `worker.rs`: the work loop (object, Secret and host changes → one
//!   [`node::NodeAgent::reconcile`] pass → the facts to report).
//! * `writer.rs`: the status writer, the only writer of `status.agent`.
//! * [`node`]: the host logic (stage, activate, reboot, report), without Kubernetes; one file
//!   per concern, listed in its docs.
//! * [`host`]: how the agent reaches the machine (real NixOS host or a directory).
//! * [`state`]: progress persisted on the host, so restarts never repeat a step.
//! * [`secrets`]: the Secrets named in `spec.secrets` (one watch each) and writing their files.
//! * [`watch`]: host changes (system links repointed by someone else) reported promptly.

pub mod bootloader;
pub mod building;
pub mod host;
pub mod host_step;
pub mod node;
pub mod secrets;
pub mod state;
pub mod watch;
mod worker;
mod writer;

pub use writer::{apply_status, status_patch};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::{AgentStatus, NixOSNode, SECRETS_NAMESPACE};
use crate::nix::Nix;
use host::Host;
use node::{HostOptions, NodeError};

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
    /// This node is a builder (docs/builder.md).
    pub builder: Option<building::BuilderConfig>,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>, host: Arc<dyn Host>, nix: Arc<dyn Nix>) -> Self {
        AgentConfig {
            node: node.into(),
            host,
            nix,
            options: HostOptions::default(),
            api_timeout: Duration::from_secs(30),
            builder: None,
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
    let work = worker::work(config.clone(), rx, secrets, report_tx, acked_rx, seen.clone());
    let write = writer::write(patch_api, config, report_rx, acked_tx, seen);

    tokio::select! {
        _ = shutdown => Ok(()),
        _ = watch => Ok(()),
        _ = write => Ok(()),
        r = work => r,
    }
}
