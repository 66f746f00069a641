//! The embedded API server, driven through the real `kube::Client` over HTTP (and `kubectl`).
//! Custom resources are the `Machine` of `fixtures/machine-crd.yaml`, registered at run time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod events;
mod scale;
mod watches;
mod workloads;
mod writes;
