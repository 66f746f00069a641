//! The real Kubernetes API tier: the same nixroll against an upstream kube-apiserver and
//! kube-controller-manager (v1.36, `../shared/kube/`) on etcd, started once for this test
//! binary (`plane.rs`). What only the real server shows: the CRDs' CEL cost budget, CEL
//! messages as users read them, the agent's ValidatingAdmissionPolicy with node-bound
//! service-account tokens, RBAC with deploy/'s roles, server-side apply and managed fields,
//! eviction against PodDisruptionBudget status computed by the disruption controller — and
//! where the embedded API server (the demo's and the fast tests') differs from it.
//!
//! The binaries are found through `KUBEBUILDER_ASSETS` (envtest's convention) or in
//! `target/kube-bin` (where `.ci/run` unpacks them); without them the tests skip, and under
//! `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod crds;
mod differential;
mod gates;
mod plane;
mod policy;
mod rollout;
