//! Health gates of a NixOSPool (docs/pools.md): checks that must pass before a node of the pool
//! is admitted. Each gate is evaluated by the controller under a timeout; its verdict is a
//! [`Verdict`], which the admission gate reads through [`crate::rollout::Pools`] (a pool whose
//! gate fails, or has no verdict yet, admits nothing: fail closed).
//!
//! * [`cel`]: a CEL expression over Kubernetes objects of any kind;
//! * [`prometheus`]: no matching alert firing on a Prometheus server.

pub mod cel;
pub mod prometheus;

/// The outcome of one evaluation of a gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Why the gate blocks, for conditions and Events.
    Block(String),
}

/// What can go wrong evaluating a gate (every variant blocks: fail closed).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("apiVersion {0:?} is not group/version or version")]
    BadApiVersion(String),
    #[error("kind {kind} of {api_version} is not served by the API server: {source}")]
    Discovery {
        api_version: String,
        kind: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing {kind}: {source}")]
    List {
        kind: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "more than {limit} {kind} objects match; narrow the gate with namespace, objectName or labelSelector"
    )]
    TooManyObjects { kind: String, limit: u32 },
    #[error("the expression does not compile: {0}")]
    Compile(String),
    #[error(
        "the expression nests more than {0} comprehensions (all, exists, exists_one, map, filter); its cost is bounded by refusing deeper ones"
    )]
    TooCostly(usize),
    #[error("evaluating the expression: {0}")]
    Evaluate(String),
    #[error("the expression returned {0}, not a bool")]
    NotBool(String),
    #[error("the evaluation took longer than its timeout of {0:?}")]
    Timeout(std::time::Duration),
}

impl GateError {
    /// Fixed category (metric label).
    pub fn category(&self) -> &'static str {
        match self {
            GateError::BadApiVersion(_)
            | GateError::Compile(_)
            | GateError::TooCostly(_)
            | GateError::NotBool(_) => "InvalidGate",
            GateError::Discovery { .. } | GateError::List { .. } | GateError::TooManyObjects { .. } => {
                "ObjectsUnavailable"
            }
            GateError::Evaluate(_) => "EvaluationFailed",
            GateError::Timeout(_) => "Timeout",
        }
    }
}
