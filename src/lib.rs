//! nixroll: roll NixOS flake revisions across k3s nodes. See README.md for the map.
#![deny(unsafe_code)] // one audited exception: src/source/socket_timeouts.rs

pub mod agent;
pub mod api;
pub mod builder;
pub mod connect;
pub mod controller;
pub mod drain;
pub mod gates;
pub mod image;
pub mod names;
pub mod nix;
pub mod report;
pub mod rollout;
pub mod sim;
pub mod source;
