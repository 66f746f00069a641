//! The builder role in the agent (only with `--builder`): load the signing key from its
//! Secret, serve the binary cache, and build what the controller lists in `status.builds`,
//! one at a time, beside the node's own work (a build never holds up a staging, an
//! activation or a report). See docs/builder.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::api::{BuildReport, BuildRequest};
use crate::builder::{BinaryCache, Builder, CacheOptions, SigningKey};

/// How a builder agent signs and serves.
#[derive(Clone, Debug)]
pub struct BuilderConfig {
    /// The Secret (in `nixroll-system`) and key holding the signing key in Nix's
    /// `name:base64` secret-key format.
    pub key_secret: String,
    pub key_field: String,
    /// Where the cache listens.
    pub listen: SocketAddr,
    /// The URL other nodes fetch from (reported as `status.agent.cache`).
    pub url: String,
    pub cache: CacheOptions,
    /// A binary cache every built closure is also pushed to, signed (`--builder-push-to`:
    /// `file:///DIR` written by nixroll, other URLs with `nix copy`).
    pub push_to: Option<crate::builder::PushTo>,
}

/// How long to wait before trying again to read the key or to bind the cache's address.
const RETRY: Duration = Duration::from_secs(30);

/// Read the signing key; the error names the Secret and key, never the value.
pub async fn load_key(
    api: &Api<Secret>,
    name: &str,
    field: &str,
    timeout: Duration,
) -> Result<SigningKey, String> {
    let secret = tokio::time::timeout(timeout, api.get(name))
        .await
        .map_err(|_| format!("reading Secret {name} timed out after {timeout:?}"))?
        .map_err(|e| format!("cannot read Secret {name}: {e}"))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(field))
        .ok_or_else(|| format!("Secret {name} has no key {field}"))?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| format!("Secret {name} key {field} is not text"))?;
    SigningKey::parse(text).map_err(|e| format!("Secret {name} key {field}: {e}"))
}

/// Run the builder until the request channel closes: key (retried every 30 s until it can be
/// read), cache server, builds. Reports go to `reports` as builds start and end.
pub async fn run(
    config: BuilderConfig,
    host: Arc<dyn crate::agent::host::Host>,
    nix: Arc<dyn crate::nix::Nix>,
    secrets: Api<Secret>,
    api_timeout: Duration,
    mut requests: tokio::sync::watch::Receiver<Vec<BuildRequest>>,
    reports: tokio::sync::watch::Sender<Vec<BuildReport>>,
) {
    let key = loop {
        match load_key(&secrets, &config.key_secret, &config.key_field, api_timeout).await {
            Ok(k) => break k,
            Err(e) => {
                tracing::warn!(error = %e, "builder: no signing key; nothing is built until it can be read");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    tracing::info!(key = %key.public_key(), url = %config.url, "builder: serving a signed binary cache");
    let cache = BinaryCache::new(host.clone(), key, config.cache.clone());
    let server = cache.clone();
    let listen = config.listen;
    tokio::spawn(async move {
        loop {
            match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => {
                    if let Err(e) = server.clone().serve(l).await {
                        tracing::warn!(error = %e, "builder: cache server stopped");
                    }
                }
                Err(e) => tracing::warn!(%listen, error = %e, "builder: cannot listen"),
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    let mut builder = Builder::new(host, nix, cache).with_push_to(config.push_to.clone());
    loop {
        let wanted = requests.borrow_and_update().clone();
        reports.send_if_modified(|r| {
            let now = builder.reports(&wanted);
            let changed = r
                .iter()
                .map(|x| (&x.installable, x.state))
                .ne(now.iter().map(|x| (&x.installable, x.state)));
            if changed {
                *r = now;
            }
            changed
        });
        let done = builder.run(&wanted).await;
        reports.send_if_modified(|r| {
            let changed = *r != done;
            if changed {
                *r = done;
            }
            changed
        });
        if requests.changed().await.is_err() {
            return;
        }
    }
}
