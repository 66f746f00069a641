//! Pushing built closures to another binary cache (`--builder-push-to URL`).
//!
//! * `file:///DIR` (no parameters): written by nixroll itself (`BinaryCache::export`): NARs
//!   streamed from the store's files, narinfos signed in memory; no process.
//! * Any other store URL Nix can write (`http(s)://…` with PUT, `s3://…`, `file:///DIR?…`):
//!   `nix copy --to URL?secret-key=/proc/self/fd/0 PATH`. Nix signs every narinfo it writes to
//!   a binary cache with the key file named by `secret-key=`; that file is an anonymous
//!   in-memory file (`memfd_create`, sealed against change) holding the key in Nix's
//!   `name:base64` format, given to `nix` as its standard input. The command line then holds
//!   only the fd's path, never the key; the key is never in a file on disk.
//!
//! The `nix copy` runs as a direct child of the agent ([`Host::run_with_stdin`]), not in a
//! transient systemd unit as the builds do: a unit's process is started by systemd and would
//! not inherit the in-memory file. It is bounded by [`PUSH_TIMEOUT`] and killed past it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};

use super::SigningKey;
use crate::agent::host::{Host, HostCommand};

/// How long one `nix copy` of a closure may take.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where `--builder-push-to` pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushTo {
    /// `file:///DIR`: written by nixroll (no process).
    Dir(PathBuf),
    /// Any other store URL: `nix copy --to` with the key in an in-memory file.
    NixCopy(String),
}

impl PushTo {
    /// `file:///DIR` → [`PushTo::Dir`]; `http://`, `https://`, `s3://` and `file:///DIR?…` →
    /// [`PushTo::NixCopy`]. A URL that already names a `secret-key=` is refused (the key comes
    /// from the Secret, never a file), as is any other scheme.
    pub fn parse(s: &str) -> Result<PushTo, String> {
        if s.contains("secret-key=") {
            return Err(format!(
                "the push URL must not name a secret-key= (the builder signs with the key of its Secret): {}",
                crate::nix::mask_credentials(s)
            ));
        }
        if let Some(p) = s.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(format!(
                    "a file:// push URL needs an absolute path (file:///DIR): {s:?}"
                ));
            }
            if !p.contains('?') {
                return Ok(PushTo::Dir(PathBuf::from(p)));
            }
            return Ok(PushTo::NixCopy(s.to_string()));
        }
        if ["http://", "https://", "s3://"].iter().any(|p| s.starts_with(p)) {
            return Ok(PushTo::NixCopy(s.to_string()));
        }
        Err(format!(
            "unsupported push URL (file:///DIR, http(s)://… or s3://…): {}",
            crate::nix::mask_credentials(s)
        ))
    }

    /// The URL as logs and messages show it (credentials masked).
    pub fn display(&self) -> String {
        match self {
            PushTo::Dir(d) => format!("file://{}", d.display()),
            PushTo::NixCopy(u) => crate::nix::mask_credentials(u),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot make the in-memory key file for nix copy: {source}")]
    KeyFile {
        #[source]
        source: std::io::Error,
    },
    #[error("nix copy to {url}: {source}")]
    Run {
        url: String,
        #[source]
        source: crate::agent::host::HostError,
    },
    #[error("nix copy to {url} failed: {message}")]
    Failed { url: String, message: String },
}

/// `url` with `secret-key=/proc/self/fd/0` added to its parameters.
pub fn url_with_key_fd(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}secret-key=/proc/self/fd/0")
}

/// A sealed anonymous in-memory file holding `key` in Nix's secret-key format.
pub fn key_memfd(key: &SigningKey) -> Result<std::fs::File, std::io::Error> {
    let fd = rustix::fs::memfd_create(
        "nixroll-push-key",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(key.nix_secret().as_bytes())?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(file)
}

/// `nix copy --to URL?secret-key=/proc/self/fd/0 PATHS…` with the key as that fd.
pub async fn nix_copy(
    host: &dyn Host,
    url: &str,
    paths: &[String],
    key: &SigningKey,
) -> Result<(), PushError> {
    let shown = crate::nix::mask_credentials(url);
    let file = key_memfd(key).map_err(|source| PushError::KeyFile { source })?;
    let cmd = HostCommand::new("nix", PUSH_TIMEOUT)
        .args(["--extra-experimental-features", "nix-command", "copy", "--to"])
        .arg(url_with_key_fd(url))
        .args(paths.iter().map(std::ffi::OsString::from));
    let out = host
        .run_with_stdin(cmd, file)
        .await
        .map_err(|source| PushError::Run {
            url: shown.clone(),
            source,
        })?;
    if out.success() {
        Ok(())
    } else {
        let mut message = crate::nix::trim_nix_error(&out.stderr);
        if message.is_empty() {
            message = format!("exited with {:?} and printed nothing", out.code);
        }
        Err(PushError::Failed { url: shown, message })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Seek};

    use super::*;

    #[test]
    fn push_urls() {
        assert_eq!(
            PushTo::parse("file:///srv/cache"),
            Ok(PushTo::Dir("/srv/cache".into()))
        );
        assert_eq!(
            PushTo::parse("http://cache:8080"),
            Ok(PushTo::NixCopy("http://cache:8080".into()))
        );
        assert_eq!(
            PushTo::parse("s3://bucket?region=eu-west-1"),
            Ok(PushTo::NixCopy("s3://bucket?region=eu-west-1".into()))
        );
        assert_eq!(
            PushTo::parse("file:///srv/c?compression=zstd"),
            Ok(PushTo::NixCopy("file:///srv/c?compression=zstd".into()))
        );
        assert!(PushTo::parse("file://relative").is_err());
        assert!(PushTo::parse("ssh://host").is_err());
        assert!(PushTo::parse("http://c?secret-key=/etc/k").is_err());
        assert_eq!(url_with_key_fd("http://c"), "http://c?secret-key=/proc/self/fd/0");
        assert_eq!(
            url_with_key_fd("s3://b?region=x"),
            "s3://b?region=x&secret-key=/proc/self/fd/0"
        );
    }

    #[test]
    fn the_key_file_is_in_memory_and_sealed() {
        let secret = SigningKey::generate_secret("push-1").unwrap();
        let key = SigningKey::parse(&secret).unwrap();
        let mut f = key_memfd(&key).unwrap();
        // Not a file of any filesystem on disk: a memfd (its link names `memfd:`).
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).unwrap();
        assert!(
            link.to_string_lossy().starts_with("/memfd:nixroll-push-key"),
            "{link:?}"
        );
        f.rewind().unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert_eq!(text, secret);
        // Sealed: it cannot be changed.
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(0).is_err());
    }
}
