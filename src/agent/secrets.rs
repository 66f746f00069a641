//! Secret files on the host (`spec.secrets`): what the agent fetched of each named Secret
//! ([`Fetched`]), the per-Secret watch by name ([`watch_secret`]), and the file operations
//! (atomic write with the final mode and owner set before any byte is written, owner lookup in
//! the host's `/etc/passwd` and `/etc/group`, stale temp file cleanup).
//!
//! Secret bytes live only in memory and in the file on the host: no `Debug`, log line, error
//! message, status field or command line carries them, nor a hash of them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{WatchEvent, WatchParams};

use super::host::Host;

/// Name prefix of the temporary files next to a secret file (removed on start).
pub const TEMP_PREFIX: &str = ".nixroll-tmp.";

/// What the agent knows of one Secret. `Debug` shows names and sizes, never content.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Fetched {
    /// Not read yet.
    #[default]
    Pending,
    /// The Secret does not exist.
    NotFound,
    /// The first read failed (e.g. 403: RBAC); retried with backoff. Never replaces data
    /// already read (a transient error must not make a written file count as missing).
    Unreadable(String),
    /// The Secret's data (values decoded).
    Found {
        resource_version: String,
        data: BTreeMap<String, Vec<u8>>,
    },
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fetched::Pending => f.write_str("Pending"),
            Fetched::NotFound => f.write_str("NotFound"),
            Fetched::Unreadable(e) => f.debug_tuple("Unreadable").field(e).finish(),
            Fetched::Found {
                resource_version,
                data,
            } => f
                .debug_struct("Found")
                .field("resource_version", resource_version)
                .field("keys", &data.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl Fetched {
    fn from_secret(s: &Secret) -> Fetched {
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in s.data.iter().flatten() {
            data.insert(k.clone(), v.0.clone());
        }
        // A real API server never returns stringData; an object built by hand may carry it.
        for (k, v) in s.string_data.iter().flatten() {
            data.insert(k.clone(), v.clone().into_bytes());
        }
        Fetched::Found {
            resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
            data,
        }
    }
}

/// The Secrets the agent's NixOSNode names, by Secret name.
pub type SecretsView = BTreeMap<String, Fetched>;

/// Keep `view[name]` up to date: `get` by name, then a watch with field selector
/// `metadata.name=NAME` from that resourceVersion (re-read after an error or 410 Gone).
/// Never lists Secrets and never reads a Secret it was not asked for. Runs until dropped.
pub async fn watch_secret(
    api: Api<Secret>,
    name: String,
    view: tokio::sync::watch::Sender<SecretsView>,
    timeout: Duration,
) {
    let publish = |f: Fetched| {
        view.send_if_modified(|v| match v.get_mut(&name) {
            Some(cur) if *cur != f => {
                *cur = f;
                true
            }
            _ => false,
        });
    };
    let selector = format!("metadata.name={name}");
    let mut backoff = Duration::from_secs(1);
    let mut resume: Option<String> = None;
    loop {
        // (Re-)read the object unless a watch can resume from a known resourceVersion.
        let version = match resume.take() {
            Some(rv) => rv,
            None => match tokio::time::timeout(timeout, api.get_opt(&name)).await {
                Ok(Ok(Some(s))) => {
                    let f = Fetched::from_secret(&s);
                    let rv = s.metadata.resource_version.clone().unwrap_or_default();
                    publish(f);
                    rv
                }
                Ok(Ok(None)) => {
                    publish(Fetched::NotFound);
                    // No version: the watch starts at the newest state with a synthetic ADDED
                    // if the Secret was created in between.
                    String::new()
                }
                Ok(Err(e)) => {
                    tracing::warn!(secret = %name, error = %e, retry_in = ?backoff, "cannot read Secret");
                    let message = e.to_string();
                    view.send_if_modified(|v| match v.get_mut(&name) {
                        Some(cur @ (Fetched::Pending | Fetched::Unreadable(_))) => {
                            let new = Fetched::Unreadable(message);
                            let changed = *cur != new;
                            *cur = new;
                            changed
                        }
                        _ => false,
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
                Err(_) => {
                    tracing::warn!(secret = %name, retry_in = ?backoff, "reading Secret timed out");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            },
        };
        let wp = WatchParams::default().fields(&selector).timeout(290);
        let stream = match tokio::time::timeout(timeout, api.watch(&wp, &version)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(secret = %name, error = %e, retry_in = ?backoff, "cannot watch Secret");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        futures::pin_mut!(stream);
        let mut last = (!version.is_empty()).then_some(version);
        let mut clean_end = true;
        // Bounded: the server ends the watch after `timeout` (290 s); a silent connection is
        // given up a little later.
        loop {
            let next = tokio::time::timeout(Duration::from_secs(300), stream.next()).await;
            match next {
                Ok(Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)))) => {
                    last = s.metadata.resource_version.clone();
                    publish(Fetched::from_secret(&s));
                    backoff = Duration::from_secs(1);
                }
                Ok(Some(Ok(WatchEvent::Deleted(s)))) => {
                    last = s.metadata.resource_version.clone();
                    publish(Fetched::NotFound);
                }
                Ok(Some(Ok(WatchEvent::Bookmark(b)))) => last = Some(b.metadata.resource_version),
                Ok(Some(Ok(WatchEvent::Error(e)))) => {
                    tracing::debug!(secret = %name, code = e.code, "Secret watch ended; re-reading");
                    clean_end = false;
                    break;
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(secret = %name, error = %e, "Secret watch failed; re-reading");
                    clean_end = false;
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    clean_end = false;
                    break;
                }
            }
        }
        if clean_end && let Some(rv) = last {
            resume = Some(rv);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Failures of a secret file, each with a fixed reason for `status.agent.secretsMissing`.
/// Messages name paths, Secrets and keys, never content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("Secret {name} not found in nixroll-system")]
    SecretNotFound { name: String },
    #[error("Secret {name} not read yet")]
    NotRead { name: String },
    #[error("cannot read Secret {name}: {message}")]
    Unreadable { name: String, message: String },
    #[error("Secret {name} has no key {key}")]
    KeyNotFound { name: String, key: String },
    #[error("Secret {name} key {key} holds {size} bytes; at most {max} are written")]
    TooLarge {
        name: String,
        key: String,
        size: usize,
        max: usize,
    },
    #[error("owner {owner:?}: {message}")]
    UnknownOwner { owner: String, message: String },
    #[error("mode {mode:?} is not octal permission digits")]
    InvalidMode { mode: String },
    #[error("path {path}: {why}")]
    InvalidPath { path: String, why: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SecretFileError {
    /// The `reason` reported in `status.agent.secretsMissing`.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretFileError::SecretNotFound { .. } => "SecretNotFound",
            SecretFileError::NotRead { .. } => "NotRead",
            SecretFileError::Unreadable { .. } => "ReadFailed",
            SecretFileError::KeyNotFound { .. } => "KeyNotFound",
            SecretFileError::TooLarge { .. } => "TooLarge",
            SecretFileError::UnknownOwner { .. } => "UnknownOwner",
            SecretFileError::InvalidMode { .. } => "InvalidMode",
            SecretFileError::InvalidPath { .. } => "InvalidPath",
            SecretFileError::Write { .. } => "WriteFailed",
        }
    }
}

/// The agent's own check of `spec.secrets[].path`, the same as the CRD's rules (which an old
/// CRD or another API server may not have enforced): absolute, no `.` or `..` segment, and
/// outside `/nix`.
pub fn check_path(path: &str) -> Result<(), SecretFileError> {
    let bad = |why: &str| SecretFileError::InvalidPath {
        path: path.to_string(),
        why: why.to_string(),
    };
    if !path.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if path.split('/').any(|p| p == "." || p == "..") {
        return Err(bad("must not contain `.` or `..` segments"));
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(bad("must name a file: no trailing or doubled `/`"));
    }
    if crate::nix::under_nix(path) {
        return Err(bad("must be outside /nix: the Nix store is world-readable"));
    }
    Ok(())
}

/// `0400`, `640` → permission bits (no setuid/setgid/sticky).
pub fn parse_mode(mode: &str) -> Result<u32, SecretFileError> {
    let ok = (3..=4).contains(&mode.len())
        && mode.bytes().all(|b| (b'0'..=b'7').contains(&b))
        && (mode.len() == 3 || mode.starts_with('0'));
    match u32::from_str_radix(mode, 8) {
        Ok(m) if ok => Ok(m),
        _ => Err(SecretFileError::InvalidMode {
            mode: mode.to_string(),
        }),
    }
}

/// `USER:GROUP` → (uid, gid): numeric ids as given, names from the host's `/etc/passwd` and
/// `/etc/group` (read through the backend; `root` is 0 even without those files).
pub fn resolve_owner(host: &dyn Host, owner: &str) -> Result<(u32, u32), SecretFileError> {
    let err = |message: String| SecretFileError::UnknownOwner {
        owner: owner.to_string(),
        message,
    };
    let (user, group) = owner
        .split_once(':')
        .ok_or_else(|| err("expected USER:GROUP".into()))?;
    let lookup = |db: &str, name: &str| -> Result<u32, SecretFileError> {
        if let Ok(id) = name.parse::<u32>() {
            return Ok(id);
        }
        let file = host.fs_path(Path::new(db));
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let found = text.lines().find_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let _pw = f.next()?;
            let id = f.next()?;
            (n == name).then(|| id.parse::<u32>().ok()).flatten()
        });
        match found {
            Some(id) => Ok(id),
            None if name == "root" => Ok(0),
            None => Err(err(format!("{name:?} does not exist in the host's {db}"))),
        }
    };
    Ok((lookup("/etc/passwd", user)?, lookup("/etc/group", group)?))
}

/// Whether the file at `local` already has exactly this content, mode and owner.
pub fn is_current(local: &Path, bytes: &[u8], mode: u32, uid: u32, gid: u32) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(local) else {
        return false;
    };
    if !meta.is_file()
        || meta.mode() & 0o7777 != mode
        || meta.uid() != uid
        || meta.gid() != gid
        || meta.len() != bytes.len() as u64
    {
        return false;
    }
    std::fs::read(local).is_ok_and(|b| b == bytes)
}

/// Test hook: where a write "crashes" (returns early as if the agent were killed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteCrash {
    /// Half of the content is in the temporary file; nothing renamed.
    MidWrite,
}

/// Write `bytes` to `local` atomically: a temporary file in the same directory, created
/// with the final mode and owner before any byte is written, written, fsynced, renamed over
/// `local`, then the directory fsynced. A reader sees the old file or the new one, never a
/// partial one. Missing parent directories are created (0755).
pub fn write_atomic(
    local: &Path,
    bytes: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
    crash: Option<WriteCrash>,
) -> std::io::Result<()> {
    let dir = local
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent directory"))?;
    let base = local
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{TEMP_PREFIX}{base}.{:016x}", fastrand::u64(..)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600 & mode)
        .open(&tmp)?;
    let result = (|| {
        // Owner first, then the mode (fchmod also defeats the umask), then the content.
        let meta = f.metadata()?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if crash == Some(WriteCrash::MidWrite) {
            f.write_all(&bytes[..bytes.len() / 2])?;
            f.sync_all()?;
            return Err(std::io::Error::other("simulated crash mid-write"));
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, local)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() && crash.is_none() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove the temporary files an agent killed mid-write left in `dir`; returns how many.
pub fn remove_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) && std::fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::host::{HostRoot, RebootHook};

    #[test]
    fn paths_are_checked_like_the_crd_does() {
        for bad in [
            "etc/x",
            "/nix",
            "/nix/store/x",
            "/nix/var/nix/x",
            "//nix/x",
            "/a/../b",
            "/a/./b",
            "/a/",
            "/a//b",
        ] {
            assert!(check_path(bad).is_err(), "{bad} accepted");
        }
        for good in ["/etc/k3s/token", "/nixos/x", "/etc/nix/netrc", "/var/lib/nix"] {
            check_path(good).unwrap();
        }
    }

    #[test]
    fn modes_parse_as_octal_permission_digits() {
        assert_eq!(parse_mode("0400").unwrap(), 0o400);
        assert_eq!(parse_mode("640").unwrap(), 0o640);
        for bad in ["", "4755", "0800", "rw-r", "00400", "1400"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn owners_resolve_numerically_or_from_the_hosts_databases() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostRoot::new(dir.path(), RebootHook::None);
        assert_eq!(resolve_owner(&host, "root:root").unwrap(), (0, 0));
        assert_eq!(resolve_owner(&host, "1000:100").unwrap(), (1000, 100));
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nk3s:x:990:989::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nk3s:x:989:\n").unwrap();
        assert_eq!(resolve_owner(&host, "k3s:k3s").unwrap(), (990, 989));
        let e = resolve_owner(&host, "nobody-here:root").unwrap_err();
        assert_eq!(e.reason(), "UnknownOwner");
        assert!(e.to_string().contains("nobody-here"), "{e}");
        assert!(e.to_string().contains("/etc/passwd"), "{e}");
    }

    #[test]
    fn debug_never_shows_content() {
        let f = Fetched::Found {
            resource_version: "7".into(),
            data: [("token".to_string(), b"hunter2-secret".to_vec())].into(),
        };
        let s = format!("{f:?}");
        assert!(s.contains("token") && !s.contains("hunter2"), "{s}");
    }

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp_file_and_crash_leaves_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/token");
        let (uid, gid) = (own_ids().0, own_ids().1);
        write_atomic(&p, b"one", 0o440, uid, gid, None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o440);
        assert!(is_current(&p, b"one", 0o440, uid, gid));
        assert!(!is_current(&p, b"two", 0o440, uid, gid));
        assert!(!is_current(&p, b"one", 0o400, uid, gid));
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        // killed mid-write: the old file is intact, a temp file is left, cleanup removes it
        let e = write_atomic(&p, b"second value", 0o440, uid, gid, Some(WriteCrash::MidWrite));
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 2);
        assert_eq!(remove_temp_files(p.parent().unwrap()), 1);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    /// The ids files created by this process get (so the test also runs unprivileged).
    fn own_ids() -> (u32, u32) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, "").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        (m.uid(), m.gid())
    }
}
