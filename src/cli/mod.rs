//! The subcommands of the `nixroll` binary: their flags (clap) and how each starts.

pub mod agent;
pub mod controller;
pub mod demo;
pub mod image;
pub mod parse;
