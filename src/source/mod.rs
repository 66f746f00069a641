//! Revision sources: follow a branch, tag or semver range of a flake's git repository.
//!
//! The pieces here are self-contained (see docs/source.md): revision forms, URL policy, ref
//! choice, known_hosts pinning and the git2 resolver with its timeouts. Nothing in the
//! controller or the agent uses them yet.

pub mod known_hosts;
pub mod refspec;
pub mod resolve;
pub mod revision;
pub mod socket_timeouts;
pub mod url;
