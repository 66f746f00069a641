//! Host changes the agent reports without being asked: `/run/current-system` or
//! `/run/booted-system` repointed (an admin's `nixos-rebuild switch`, `system.autoUpgrade`),
//! or the system profile changed. inotify on two directories (`/run` and
//! `/nix/var/nix/profiles`, through the backend's path mapping), filtered to those names:
//! no cost while nothing changes, a re-read of the facts within [`DEBOUNCE`] when they do.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use inotify::{Inotify, WatchMask};

use super::host::Host;

/// Events arriving within this time after the first are handled together.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The directories watched and the entries in them that matter.
const WATCHED: &[(&str, &[&str])] = &[
    ("/run", &["current-system", "booted-system"]),
    ("/nix/var/nix/profiles", &["system"]),
];

fn relevant(dir: &str, name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    WATCHED.iter().any(|(d, names)| {
        *d == dir
            && names.iter().any(|n| {
                name == *n || (*n == "system" && name.starts_with("system-") && name.ends_with("-link"))
            })
    })
}

/// Start watching; the receiver gets `()` (coalesced) whenever a watched entry changed.
/// `None` when inotify is unavailable (then changes are seen at the next reconcile).
pub fn host_changes(host: &dyn Host) -> Option<tokio::sync::watch::Receiver<()>> {
    let inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            // (Debug: the simulation runs hundreds of agents in one process, past the default
            // limit of 128 inotify instances per user.)
            tracing::debug!(error = %e, "inotify unavailable: host changes are seen at the next reconcile only");
            return None;
        }
    };
    let mask = WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::DELETE | WatchMask::MOVED_FROM;
    let mut dirs = Vec::new();
    for (dir, _) in WATCHED {
        let local = host.fs_path(Path::new(dir));
        match inotify.watches().add(&local, mask) {
            Ok(wd) => dirs.push((wd, *dir)),
            Err(e) => tracing::debug!(path = %local.display(), error = %e, "cannot watch"),
        }
    }
    if dirs.is_empty() {
        return None;
    }
    let mut stream = match inotify.into_event_stream([0u8; 4096]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "inotify stream unavailable");
            return None;
        }
    };
    let (tx, rx) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            let Ok(ev) = ev else { continue };
            let dir = dirs.iter().find(|(wd, _)| *wd == ev.wd).map(|(_, d)| *d);
            let hit = matches!((dir, &ev.name), (Some(d), Some(n)) if relevant(d, n));
            if !hit {
                continue;
            }
            // Coalesce a burst (`ln -sfn` is a create and a rename).
            tokio::time::sleep(DEBOUNCE).await;
            tracing::debug!("host change seen");
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    Some(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::host::{HostRoot, RebootHook};

    #[test]
    fn only_the_system_links_matter() {
        assert!(relevant("/run", OsStr::new("current-system")));
        assert!(relevant("/run", OsStr::new("booted-system")));
        assert!(!relevant("/run", OsStr::new("utmp")));
        assert!(relevant("/nix/var/nix/profiles", OsStr::new("system-7-link")));
        assert!(relevant("/nix/var/nix/profiles", OsStr::new("system")));
        assert!(!relevant("/nix/var/nix/profiles", OsStr::new("default")));
    }

    #[tokio::test]
    async fn a_repointed_current_system_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["run", "nix/var/nix/profiles", "a", "b"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let host = HostRoot::new(dir.path(), RebootHook::None);
        let mut rx = host_changes(&host).unwrap();
        std::fs::write(dir.path().join("run/utmp"), "").unwrap();
        std::os::unix::fs::symlink("/a", dir.path().join("run/.tmp")).unwrap();
        std::fs::rename(dir.path().join("run/.tmp"), dir.path().join("run/current-system")).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
    }
}
