//! Revision sources: follow a branch, tag or semver range of a flake's git repository.
//!
//! Revision forms, URL policy, ref choice, known_hosts pinning and the git2 resolver with its
//! timeouts; the FlakeSource controller ([`controller`], with its pure status in [`status`] and
//! its Secrets in [`secrets`]) and the pure choice of a following
//! node's target ([`follow`]). The NixOSNode controller's side is `crate::controller::follow`.
//! See docs/source.md.

pub mod controller;
pub mod follow;
pub mod known_hosts;
pub mod refspec;
pub mod resolve;
pub mod revision;
pub mod secrets;
pub mod socket_timeouts;
pub mod status;
pub mod url;
pub mod verify;
