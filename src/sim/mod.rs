//! The simulated cluster around nixroll, for `nixroll demo`, `nixroll bench` and the tests.
//!
//! The Kubernetes API server itself is the `embedded-apiserver` crate (`crates/`), which knows
//! nothing of nixroll. What lives here is everything that plays the *rest* of a cluster as
//! clients of that server, the way they would talk to a real kube-apiserver: the kubelets,
//! scheduler and ReplicaSet controller ([`cluster`], which also runs the agent's DaemonSet
//! pods), NixOS hosts and a Nix that builds test flakes ([`host`], [`flake`], implementing the
//! agent's `Host` and `Nix` traits), and the harness that wires them to the real controller and
//! agents ([`world`], [`demo`], [`bench`], [`monitor`], [`progress`], [`steps`]). The arrows
//! point one way: `sim` → nixroll's operator code and → `embedded-apiserver`; the operator never
//! uses `sim`, and the API server uses neither. The same simulated cluster also runs against a
//! real kube-apiserver ([`controlplane`], [`world::ExternalApi`]) in the real-API tests.

pub mod agent_memory;
pub mod bench;
pub mod bench_builders;
pub mod cluster;
pub mod controlplane;
pub mod counting_nix;
pub mod demo;
pub mod demo_follow;
pub mod demo_pools;
pub mod fixtures;
pub mod flake;
pub mod host;
pub mod monitor;
pub mod progress;
pub mod steps;
pub mod world;
