//! Simulation and test infrastructure: the embedded API server, simulated hosts and
//! kubelets, and `nixroll demo`.

pub mod cluster;
pub mod progress;
