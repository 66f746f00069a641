//! Errors of the embedded API server. [`StoreError`] variants are the Kubernetes `Status`
//! reasons the real server answers with; each renders as a `Status` object with its code.

use serde_json::{Value, json};

/// One `details.causes` entry of a `Status`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// Machine-readable cause (`FieldManagerConflict`, `DisruptionBudget`, ...).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// The field concerned, if any.
    pub field: String,
}

/// A failed API operation, as the real kube-apiserver would report it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// 404: the object does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Group-resource, e.g. `pods`.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 404: the server does not serve this resource.
    #[error("the server could not find the requested resource")]
    UnknownResource {
        /// The path asked for.
        path: String,
    },
    /// 409: create of an existing name.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Group-resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// 409: stale resourceVersion, failed precondition or server-side apply conflict.
    #[error("{message}")]
    Conflict {
        /// Group-resource.
        resource: String,
        /// Object name.
        name: String,
        /// Message as the real server words it.
        message: String,
        /// Conflicting fields (server-side apply).
        causes: Vec<Cause>,
    },
    /// 422: the object is invalid.
    #[error("{message}")]
    Invalid {
        /// Group-resource (or `Kind.group` for field errors, as the real server reports them).
        resource: String,
        /// Object name.
        name: String,
        /// Message.
        message: String,
        /// Field errors.
        causes: Vec<Cause>,
    },
    /// 400: malformed request.
    #[error("{message}")]
    BadRequest {
        /// Message.
        message: String,
    },
    /// 429: e.g. an eviction that would violate a PodDisruptionBudget.
    #[error("{message}")]
    TooManyRequests {
        /// Message.
        message: String,
        /// Causes (the budget concerned).
        causes: Vec<Cause>,
    },
    /// 403.
    #[error("{message}")]
    Forbidden {
        /// Message.
        message: String,
    },
    /// 410: resourceVersion too old (compacted), or a watcher that fell behind.
    #[error("{message}")]
    Gone {
        /// Message.
        message: String,
    },
    /// 405.
    #[error("{message}")]
    MethodNotAllowed {
        /// Message.
        message: String,
    },
    /// 415.
    #[error("{message}")]
    UnsupportedMediaType {
        /// Message.
        message: String,
    },
    /// 500.
    #[error("{message}")]
    Internal {
        /// Message.
        message: String,
    },
}

impl StoreError {
    /// HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NotFound { .. } | StoreError::UnknownResource { .. } => 404,
            StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => 409,
            StoreError::Invalid { .. } => 422,
            StoreError::BadRequest { .. } => 400,
            StoreError::TooManyRequests { .. } => 429,
            StoreError::Forbidden { .. } => 403,
            StoreError::Gone { .. } => 410,
            StoreError::MethodNotAllowed { .. } => 405,
            StoreError::UnsupportedMediaType { .. } => 415,
            StoreError::Internal { .. } => 500,
        }
    }

    /// `Status.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } | StoreError::UnknownResource { .. } => "NotFound",
            StoreError::AlreadyExists { .. } => "AlreadyExists",
            StoreError::Conflict { .. } => "Conflict",
            StoreError::Invalid { .. } => "Invalid",
            StoreError::BadRequest { .. } => "BadRequest",
            StoreError::TooManyRequests { .. } => "TooManyRequests",
            StoreError::Forbidden { .. } => "Forbidden",
            StoreError::Gone { .. } => "Expired",
            StoreError::MethodNotAllowed { .. } => "MethodNotAllowed",
            StoreError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            StoreError::Internal { .. } => "InternalError",
        }
    }

    /// The `Status` object the server answers with.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let (resource, name, causes): (&str, &str, &[Cause]) = match self {
            StoreError::NotFound { resource, name } | StoreError::AlreadyExists { resource, name } => {
                (resource, name, &[])
            }
            StoreError::Conflict {
                resource,
                name,
                causes,
                ..
            } => (resource, name, causes),
            StoreError::Invalid {
                resource,
                name,
                causes,
                ..
            } => (resource, name, causes),
            StoreError::TooManyRequests { causes, .. } => ("", "", causes),
            _ => return status,
        };
        let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
        let mut details = json!({});
        if !name.is_empty() {
            details["name"] = json!(name);
        }
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        if !kind.is_empty() {
            details["kind"] = json!(kind);
        }
        if !causes.is_empty() {
            details["causes"] = causes
                .iter()
                .map(|c| {
                    let mut v = json!({"reason": c.reason, "message": c.message});
                    if !c.field.is_empty() {
                        v["field"] = json!(c.field);
                    }
                    v
                })
                .collect();
        }
        status["details"] = details;
        status
    }
}

/// Failures of the [`super::ApiServer`] handle itself.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Binding the listen address failed.
    #[error("binding the embedded API server to {addr} failed: {source}")]
    Bind {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The generated kubeconfig could not be parsed by kube.
    #[error("parsing the generated kubeconfig failed: {source}")]
    Kubeconfig {
        /// Cause.
        source: kube::config::KubeconfigError,
    },
    /// Building the kube client failed.
    #[error("building a kube client for the embedded API server failed: {source}")]
    Client {
        /// Cause.
        source: kube::Error,
    },
}
