//! Simulations that tests and `nixroll demo` share: test flakes, simulated hosts.

pub mod flake;
pub mod host;
