//! Reading the host's facts: boot id, booted, current and profile systems, the profile's
//! generation, and the current system's `configurationRevision` (looked up in the background).

use std::path::Path;
use std::time::Duration;

use super::{NodeAgent, read_bounded};
use crate::agent::host::{HostCommand, resolve};
use crate::names::SYSTEM_PROFILE;

impl NodeAgent {
    pub(super) fn read_trimmed(&self, host_path: &Path) -> Option<String> {
        // Symlinks (a store path's files often are) are followed on the host's side.
        let local = self.host.fs_path(&resolve(self.host.as_ref(), host_path)?);
        let s = read_bounded(&local, 4096)?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    pub fn boot_id(&self) -> Option<String> {
        self.read_trimmed(Path::new("/proc/sys/kernel/random/boot_id"))
    }

    pub fn booted_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new("/run/booted-system")).map(|p| p.to_string_lossy().into_owned())
    }

    pub fn current_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new("/run/current-system"))
            .map(|p| p.to_string_lossy().into_owned())
    }

    pub(super) fn profile_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new(SYSTEM_PROFILE)).map(|p| p.to_string_lossy().into_owned())
    }

    /// `system` → `system-N-link` → N.
    pub fn profile_generation(&self) -> Option<i64> {
        let link = std::fs::read_link(self.host.fs_path(Path::new(SYSTEM_PROFILE))).ok()?;
        let name = link.file_name()?.to_str()?;
        name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
    }

    /// `<current>/configuration-revision` if the system has that file, else
    /// `configurationRevision` of `<current>/sw/bin/nixos-version --json` (NixOS embeds
    /// `system.configurationRevision` there). Once per current system; the command runs in the
    /// background (10 s timeout) and its answer is published when it comes, so no report waits
    /// for this optional fact.
    pub(super) fn refresh_configuration_revision(&mut self) {
        let Some(current) = self.current_system() else {
            if let Ok(mut c) = self.revision_cache.lock() {
                *c = None;
            }
            return;
        };
        let cached = self
            .revision_cache
            .lock()
            .map(|c| c.as_ref().is_some_and(|(s, _)| *s == current))
            .unwrap_or(false);
        if cached || self.revision_pending.as_deref() == Some(current.as_str()) {
            return;
        }
        let system = Path::new(&current);
        let from_file = self.read_trimmed(&system.join("configuration-revision"));
        let tool = system.join("sw/bin/nixos-version");
        // Resolved on the host: `sw` is a symlink into the store, whose absolute target means
        // nothing in the agent's own filesystem.
        if from_file.is_some() || resolve(self.host.as_ref(), &tool).is_none() {
            if let Ok(mut c) = self.revision_cache.lock() {
                *c = Some((current, from_file));
            }
            return;
        }
        self.revision_pending = Some(current.clone());
        let (host, cache, progress) = (
            self.host.clone(),
            self.revision_cache.clone(),
            self.progress.clone(),
        );
        tokio::spawn(async move {
            let cmd = HostCommand::new(host.cmd_path(&tool), Duration::from_secs(10)).arg("--json");
            let revision = match host.run(cmd).await {
                Ok(out) if out.success() => serde_json::from_str::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v.get("configurationRevision")?.as_str().map(str::to_string))
                    .filter(|r| !r.is_empty()),
                Ok(out) => {
                    tracing::info!(code = ?out.code, "nixos-version --json failed; configurationRevision unknown");
                    None
                }
                Err(e) => {
                    tracing::info!(error = %e, "nixos-version --json failed; configurationRevision unknown");
                    None
                }
            };
            if let Ok(mut c) = cache.lock() {
                *c = Some((current.clone(), revision.clone()));
            }
            // Publish it into the newest report, if that is still about this system.
            if let Some(tx) = progress {
                tx.send_if_modified(|r| match r {
                    Some(r)
                        if r.current_system.as_deref() == Some(current.as_str())
                            && r.configuration_revision != revision =>
                    {
                        r.configuration_revision = revision;
                        true
                    }
                    _ => false,
                });
            }
        });
    }
}
