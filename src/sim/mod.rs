//! Simulation and test infrastructure: the embedded Kubernetes API server (which the real
//! `kube` client and `kubectl` talk to over HTTP), simulated kubelets and NixOS hosts, test
//! flakes, and `nixroll demo`.

pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod demo;
pub mod demo_follow;
pub mod flake;
pub mod host;
pub mod monitor;
pub mod progress;
pub mod steps;
pub mod world;
