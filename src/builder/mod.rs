//! The builder role: build each distinct system once and serve it, signed, as a Nix binary
//! cache that the other nodes fetch from (docs/builder.md).
//!
//! * `key.rs`: the signing key, in Nix's `name:base64` secret-key format, held in memory only
//!   (from a Kubernetes Secret; never a file or a command line); narinfo signatures.
//! * `narinfo.rs`: what a `.narinfo` says and the fingerprint that is signed.
//! * `nar.rs`: a store path as a NAR, written in Rust straight from the store's files and
//!   streamed in bounded chunks (no process, no temporary file).
//! * `cache.rs`: the HTTP binary cache (`nix-cache-info`, `<hash>.narinfo`, `nar/<hash>.nar`)
//!   serving only the closures the builder published, with bounded concurrency.
//! * `push.rs`: `--builder-push-to`: a `file:///DIR` written by nixroll, any other cache by
//!   `nix copy` with the key in a sealed in-memory file (never on disk or a command line).

mod cache;
mod key;
mod nar;
mod narinfo;
mod push;
mod role;

pub use cache::{BinaryCache, CacheError, CacheOptions, CacheStats};
pub use key::{KeyError, SigningKey};
pub use nar::{NarError, write_nar};
pub use narinfo::{NarInfo, nix_base32, sri_to_nix32};
pub use push::{PUSH_TIMEOUT, PushError, PushTo, key_memfd, nix_copy, url_with_key_fd};
pub use role::{BUILDS_DIR, Builder, root_name};

/// The Nix system of the machine the agent runs on (`x86_64-linux`, `aarch64-linux`): the agent
/// runs on its host's CPU, and nixroll manages Linux hosts only.
pub fn host_nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}
