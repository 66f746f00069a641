//! Connecting the commands that talk to a cluster (`controller`, `agent`, `status`): kubectl's
//! `--kubeconfig` and `--context`, a User-Agent naming the component and its version, and the
//! text of a fatal error with its whole chain of causes.

use std::path::{Path, PathBuf};

use http::{HeaderName, HeaderValue};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

/// Where the cluster is: kubectl's `--kubeconfig` and `--context`. Without either, the
/// kubeconfig of `KUBECONFIG` (or `~/.kube/config`), else the in-cluster service account.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading the kubeconfig {path}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("using context {context} of the kubeconfig")]
    Context {
        context: String,
        #[source]
        source: KubeconfigError,
    },
    #[error("no Kubernetes configuration (give --kubeconfig, set KUBECONFIG, or run in a cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("the User-Agent {0:?} is not a valid header value")]
    UserAgent(String),
    #[error("building the Kubernetes client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
}

/// `nixroll-<component>/<version>`, e.g. `nixroll-controller/0.1.0`.
pub fn user_agent(component: &str) -> String {
    format!("nixroll-{component}/{}", env!("CARGO_PKG_VERSION"))
}

impl Target {
    /// The client configuration, with `user_agent` on every request.
    pub async fn config(&self, user_agent: &str) -> Result<kube::Config, ConnectError> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let context_error = |source| ConnectError::Context {
            context: self.context.clone().unwrap_or_default(),
            source,
        };
        let mut config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let kubeconfig = read(path)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|source| match &self.context {
                        Some(_) => context_error(source),
                        None => ConnectError::ReadKubeconfig {
                            path: path.clone(),
                            source,
                        },
                    })?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(context_error)?,
            (None, None) => kube::Config::infer().await.map_err(ConnectError::Infer)?,
        };
        let value =
            HeaderValue::from_str(user_agent).map_err(|_| ConnectError::UserAgent(user_agent.to_string()))?;
        config
            .headers
            .push((HeaderName::from_static("user-agent"), value));
        Ok(config)
    }

    /// A client for the cluster and the API server's URL (for messages).
    pub async fn client(&self, user_agent: &str) -> Result<(kube::Client, String), ConnectError> {
        let config = self.config(user_agent).await?;
        client(config)
    }
}

/// The client of `config` and the API server's URL.
pub fn client(config: kube::Config) -> Result<(kube::Client, String), ConnectError> {
    let url = config.cluster_url.to_string().trim_end_matches('/').to_string();
    let client = kube_client(config).map_err(|source| ConnectError::Client {
        url: url.clone(),
        source,
    })?;
    Ok((client, url))
}

/// `kube::Client::try_from(config)`, with `TCP_NODELAY` on its connections.
///
/// Built here because kube-client 5 gives no way to set it (kube-rs/kube#2056). Without it,
/// the first request on a new TLS connection waits for the server's delayed ACK of the
/// client's handshake `Finished` (Nagle's algorithm): 40 ms on Linux, measured on the real API
/// tier's audit log as the gap between an agent's start and its first LIST, and again before
/// its first status write (its first connection is held by its watch). The stack is kube's
/// own (base URI, retry policy if configured, auth, extra headers such as the User-Agent,
/// connect/read/write timeouts) minus its request tracing layer; an exec credential plugin's
/// client certificate expiry is not tracked (nixroll uses tokens and kubeconfig
/// certificates).
pub fn kube_client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    use kube::client::ConfigExt;
    if config.proxy_url.is_some() {
        // kube's own builder decides what a proxy needs (and refuses the kinds nixroll is
        // built without).
        return kube::Client::try_from(config);
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http_client);
    Ok(kube::Client::new(service, config.default_namespace))
}

fn read(path: &Path) -> Result<Kubeconfig, ConnectError> {
    Kubeconfig::read_from(path).map_err(|source| ConnectError::ReadKubeconfig {
        path: path.to_path_buf(),
        source,
    })
}

/// An error and all its causes, `outer: inner: root`, each said once: a cause whose text its
/// parent already includes (thiserror's `{source}` in a message) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("serving metrics on {addr}: {source}")]
        Embeds { addr: String, source: std::io::Error },
        #[error("controller")]
        Wraps(#[source] Box<Outer>),
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let embeds = Outer::Embeds {
            addr: "0.0.0.0:8080".into(),
            source: io(),
        };
        assert_eq!(
            error_chain(&Outer::Wraps(Box::new(embeds))),
            "controller: serving metrics on 0.0.0.0:8080: Address already in use"
        );
        let read = ConnectError::ReadKubeconfig {
            path: "/nope".into(),
            source: KubeconfigError::ReadConfig(io(), "/nope".into()),
        };
        let text = error_chain(&read);
        assert!(text.starts_with("reading the kubeconfig /nope: "), "{text}");
        assert!(text.ends_with("Address already in use"), "{text}");
    }

    #[test]
    fn the_user_agent_names_the_component_and_version() {
        assert_eq!(
            user_agent("agent"),
            format!("nixroll-agent/{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
