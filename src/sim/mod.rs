//! Simulation infrastructure for tests and `nixroll demo`: an embedded, in-memory Kubernetes API
//! server that the real `kube` client and `kubectl` talk to over HTTP.

pub mod apiserver;
