//! The agent's work loop: waits for a change of its `NixOSNode`, of a Secret it names, of the
//! host, or for a staging retry; follows one watch per named Secret; then runs one
//! [`NodeAgent::reconcile`] pass and hands the facts to the status writer.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::node::{NodeAgent, send_report};
use super::secrets::{self, Fetched, SecretsView};
use super::writer::Seen;
use super::{AgentConfig, AgentError, watch};
use crate::api::{AgentStatus, NixOSNode};

/// Reconcile the newest object each time it changes and publish the facts.
pub(super) async fn work(
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
    // The builder role runs beside the node's own work: requests in, reports out.
    let (build_requests, requests_rx) = tokio::sync::watch::channel(Vec::new());
    let (reports_tx, mut build_reports) = tokio::sync::watch::channel(Vec::new());
    if let Some(b) = &config.builder {
        watchers.spawn(super::building::run(
            b.clone(),
            config.host.clone(),
            config.nix.clone(),
            secrets_api.clone(),
            config.api_timeout,
            requests_rx,
            reports_tx,
        ));
    } else {
        drop((requests_rx, reports_tx));
    }
    loop {
        // Wait for a change of the object or of a named Secret, or for a failed staging's
        // retry time (a local timer: no request is made unless the facts change).
        let retry = agent.next_retry();
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Ok(()) },
            r = secrets_rx.changed() => if r.is_err() { return Ok(()) },
            _ = sleep_until(retry) => {}
            _ = changed(&mut host_changed) => {}
            r = build_reports.changed(), if config.builder.is_some() => if r.is_err() { return Ok(()) },
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
        let host_state = |source| AgentError::HostState {
            node: config.node.clone(),
            source,
        };
        agent
            .sync_secrets(&obj.spec.secrets, &fetched)
            .await
            .map_err(host_state)?;
        build_requests.send_if_modified(|r| {
            let changed = *r != status.builds;
            if changed {
                r.clone_from(&status.builds);
            }
            changed
        });
        let mut facts = agent
            .reconcile(status.target.as_ref(), status.activation.as_ref())
            .await
            .map_err(host_state)?;
        if let Some(b) = &config.builder {
            facts.builds = build_reports.borrow_and_update().clone();
            facts.cache = Some(b.url.clone());
        }
        send_report(&report, facts);
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
