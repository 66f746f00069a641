//! [`ControllerError`]: what can fail in the controller layer, with a fixed [`ControllerError::category`]
//! (Event reason, metric label) and [`ControllerError::is_transient`] (which backoff).

use std::net::SocketAddr;
use std::time::Duration;

use super::leader;
use crate::drain::{self, DrainError};

/// Errors of the controller layer.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("writing the status of {node}: {source}")]
    WriteStatus {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of NixOSPool {pool}: {source}")]
    WritePoolStatus {
        pool: String,
        #[source]
        source: kube::Error,
    },
    #[error("cordoning node {node}: {source}")]
    Cordon {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("uncordoning node {node}: {source}")]
    Uncordon {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("draining node {node}: {source}")]
    Drain {
        node: String,
        #[source]
        source: DrainError,
    },
    #[error("{operation} on {node} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        node: String,
        timeout: Duration,
    },
    #[error("the watch caches did not sync within {0:?}")]
    StoresNotReady(Duration),
    #[error("leader election: {0}")]
    Lease(#[from] leader::LeaderError),
    #[error("serving metrics on {addr}: {source}")]
    MetricsServer {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the webhook receiver on {addr}: {source}")]
    WebhookServer {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ControllerError {
    /// Fixed category: Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ControllerError::WriteStatus { .. } | ControllerError::WritePoolStatus { .. } => {
                "StatusWriteFailed"
            }
            ControllerError::Cordon { .. } => "CordonFailed",
            ControllerError::Uncordon { .. } => "UncordonFailed",
            ControllerError::Drain { source, .. } => source.category(),
            ControllerError::Timeout { .. } => "ApiTimeout",
            ControllerError::StoresNotReady(_) => "CacheNotSynced",
            ControllerError::Lease(e) => e.category(),
            ControllerError::MetricsServer { .. } => "MetricsServerFailed",
            ControllerError::WebhookServer { .. } => "WebhookServerFailed",
        }
    }

    /// Transient errors (API 5xx, 429, 409, timeouts, transport) get a short backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            ControllerError::WriteStatus { source, .. }
            | ControllerError::WritePoolStatus { source, .. }
            | ControllerError::Cordon { source, .. }
            | ControllerError::Uncordon { source, .. } => drain::is_transient_kube(source),
            ControllerError::Drain { source, .. } => source.is_transient(),
            ControllerError::Timeout { .. } | ControllerError::StoresNotReady(_) => true,
            ControllerError::Lease(_) => true,
            ControllerError::MetricsServer { .. } | ControllerError::WebhookServer { .. } => false,
        }
    }
}
