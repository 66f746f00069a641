//! The CustomResourceDefinition, generated from the Rust types. `crds/nixosnodes.yaml` is the
//! committed copy of [`crd_yaml`]; a test fails when they differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::NixOSNode;

/// The CRD object.
pub fn crd() -> CustomResourceDefinition {
    NixOSNode::crd()
}

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}
