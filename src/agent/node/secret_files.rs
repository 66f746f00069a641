//! The secret files of `spec.secrets` on the host: written when they differ (atomically),
//! removed when they leave the list, their units restarted once per change; problems of one
//! file are reported in `secretsMissing`. The Secrets themselves are read in
//! [`crate::agent::secrets`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{NodeAgent, NodeError, now};
use crate::agent::host::resolve;
use crate::agent::secrets::{self, Fetched, SecretFileError, SecretsView, WriteCrash};
use crate::agent::state::HostState;
use crate::api::{MissingSecret, SECRET_MAX_BYTES, SecretFile, SecretFileStatus};

/// Why one secret file was not written: a problem of that file (reported), or of the host
/// state (fatal, as everywhere else).
enum SecretWrite {
    File(SecretFileError),
    Host(NodeError),
}

impl From<SecretFileError> for SecretWrite {
    fn from(e: SecretFileError) -> Self {
        SecretWrite::File(e)
    }
}

impl From<NodeError> for SecretWrite {
    fn from(e: NodeError) -> Self {
        SecretWrite::Host(e)
    }
}

impl NodeAgent {
    /// Test hook: the next secret file write stops halfway, as if the agent were killed.
    pub fn crash_secret_write(mut self, crash: WriteCrash) -> Self {
        self.secret_crash = Some(crash);
        self
    }

    /// Whether some secret file of the spec is missing on the host (activation waits).
    pub fn secrets_blocked(&self) -> bool {
        !self.secrets_missing.is_empty()
    }

    /// Bring the secret files of the spec onto the host: write each file whose content, mode
    /// or owner differs (atomically; never when nothing changed), remove files nixroll wrote
    /// that left the list, then `systemctl try-restart` the units of the changed files, once.
    /// Problems with one file (Secret or key missing, too large, unknown owner) are reported
    /// in `secretsMissing` and leave the file on the host as it is.
    pub async fn sync_secrets(
        &mut self,
        specs: &[SecretFile],
        fetched: &SecretsView,
    ) -> Result<(), NodeError> {
        let mut st = self.load()?;
        if !self.secrets_swept {
            let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
            for p in specs
                .iter()
                .map(|s| s.path.as_str())
                .chain(st.secrets.iter().map(|s| s.path.as_str()))
            {
                if let Some(d) = self.secret_local_path(p).parent() {
                    dirs.insert(d.to_path_buf());
                }
            }
            for d in dirs {
                let n = secrets::remove_temp_files(&d);
                if n > 0 {
                    tracing::info!(dir = %d.display(), removed = n, "removed temporary files of an interrupted secret write");
                }
            }
            self.secrets_swept = true;
        }
        let mut missing = Vec::new();
        let mut restarts: BTreeSet<String> = st.pending_restarts.iter().cloned().collect();
        for spec in specs {
            match self.write_secret(&mut st, spec, fetched, &mut restarts) {
                Ok(()) => {}
                Err(SecretWrite::Host(e)) => return Err(e),
                Err(SecretWrite::File(e)) => {
                    tracing::warn!(path = %spec.path, secret = %spec.secret_ref, reason = e.reason(), error = %e, "secret file not written");
                    missing.push(MissingSecret {
                        path: spec.path.clone(),
                        secret_ref: spec.secret_ref.clone(),
                        reason: e.reason().to_string(),
                        message: e.to_string(),
                    });
                }
            }
        }
        // Files nixroll wrote that left the list.
        let wanted: BTreeSet<&str> = specs.iter().map(|s| s.path.as_str()).collect();
        let before = st.secrets.len();
        let mut kept = Vec::new();
        for rec in std::mem::take(&mut st.secrets) {
            if wanted.contains(rec.path.as_str()) {
                kept.push(rec);
                continue;
            }
            match std::fs::remove_file(self.secret_local_path(&rec.path)) {
                Ok(()) => tracing::info!(path = %rec.path, "removed a secret file that left spec.secrets"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %rec.path, error = %e, "cannot remove a secret file that left spec.secrets");
                    kept.push(rec);
                }
            }
        }
        st.secrets = kept;
        if st.secrets.len() != before {
            self.save(&st)?;
        }
        if !restarts.is_empty() {
            let units: Vec<String> = restarts.into_iter().collect();
            match self.host.restart_units(units.clone()).await {
                Ok(out) if out.success() => {
                    tracing::info!(?units, "restarted units after their secret files changed");
                }
                Ok(out) => {
                    tracing::warn!(?units, code = ?out.code, stderr = %out.stderr.trim(), "systemctl try-restart failed")
                }
                Err(e) => tracing::warn!(?units, error = %e, "systemctl try-restart failed"),
            }
            // Once per change: a failed restart is logged, not repeated.
            st.pending_restarts.clear();
            self.save(&st)?;
        }
        self.secrets_missing = missing;
        Ok(())
    }

    /// Where the agent writes the host file `path`: its deepest existing ancestor resolved
    /// with the host's symlinks (NixOS links much of `/etc` into the store; seen through a
    /// mount such as `/host`, an absolute link would otherwise point into the agent's own
    /// filesystem), then the rest of the path. The last component is never followed: the
    /// rename replaces a link instead of writing through it.
    fn secret_local_path(&self, path: &str) -> PathBuf {
        self.host.fs_path(&self.secret_host_path(path))
    }

    /// The host path [`Self::secret_local_path`] writes: `path` with its deepest existing
    /// ancestor resolved through the host's symlinks.
    fn secret_host_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(name) = p.file_name() {
            rest.push(name);
        }
        let mut dir = p.parent();
        while let Some(d) = dir {
            if let Some(mut resolved) = resolve(self.host.as_ref(), d) {
                for part in rest.iter().rev() {
                    resolved.push(part);
                }
                return resolved;
            }
            if let Some(name) = d.file_name() {
                rest.push(name);
            }
            dir = d.parent();
        }
        p.to_path_buf()
    }

    /// Write one secret file if it differs from what the Secret says.
    fn write_secret(
        &self,
        st: &mut HostState,
        spec: &SecretFile,
        fetched: &SecretsView,
        restarts: &mut BTreeSet<String>,
    ) -> Result<(), SecretWrite> {
        secrets::check_path(&spec.path)?;
        let name = &spec.secret_ref.name;
        let key = &spec.secret_ref.key;
        let (rv, bytes) = match fetched.get(name) {
            None | Some(Fetched::Pending) => {
                return Err(SecretFileError::NotRead { name: name.clone() }.into());
            }
            Some(Fetched::NotFound) => {
                return Err(SecretFileError::SecretNotFound { name: name.clone() }.into());
            }
            Some(Fetched::Unreadable(message)) => {
                return Err(SecretFileError::Unreadable {
                    name: name.clone(),
                    message: message.clone(),
                }
                .into());
            }
            Some(Fetched::Found {
                resource_version,
                data,
            }) => match data.get(key) {
                None => {
                    return Err(SecretFileError::KeyNotFound {
                        name: name.clone(),
                        key: key.clone(),
                    }
                    .into());
                }
                Some(b) if b.len() > SECRET_MAX_BYTES => {
                    return Err(SecretFileError::TooLarge {
                        name: name.clone(),
                        key: key.clone(),
                        size: b.len(),
                        max: SECRET_MAX_BYTES,
                    }
                    .into());
                }
                Some(b) => (resource_version, b),
            },
        };
        let host_path = self.secret_host_path(&spec.path);
        // A host-root backend may answer with its local form (`DIR/nix/…`).
        let on_host = self
            .host
            .host_path(&host_path)
            .unwrap_or_else(|| host_path.clone());
        if crate::nix::under_nix(&on_host.to_string_lossy()) {
            return Err(SecretFileError::InvalidPath {
                path: spec.path.clone(),
                why: format!(
                    "leads into /nix through a symlink ({}); the Nix store is world-readable",
                    on_host.display()
                ),
            }
            .into());
        }
        let mode = secrets::parse_mode(&spec.mode)?;
        let (uid, gid) = secrets::resolve_owner(self.host.as_ref(), &spec.owner)?;
        let local = self.host.fs_path(&host_path);
        let recorded = st.secrets.iter().position(|r| r.path == spec.path);
        if secrets::is_current(&local, bytes, mode, uid, gid) {
            // Same data (whatever the resourceVersion): nothing to do. A changed source
            // (another Secret with equal content) only updates the record.
            if let Some(i) = recorded
                && st.secrets[i].secret_ref != spec.secret_ref
            {
                st.secrets[i].secret_ref = spec.secret_ref.clone();
                st.secrets[i].resource_version = rv.clone();
                self.save(st)?;
            }
            return Ok(());
        }
        // Intent first: the units restart even if the agent dies right after the rename.
        let before = st.pending_restarts.clone();
        if !spec.restart_units.is_empty() {
            let mut intent: BTreeSet<String> = restarts.clone();
            intent.extend(spec.restart_units.iter().cloned());
            st.pending_restarts = intent.into_iter().collect();
            self.save(st)?;
        }
        if let Err(source) = secrets::write_atomic(&local, bytes, mode, uid, gid, self.secret_crash) {
            if self.secret_crash.is_some() {
                // Test hook: the agent "dies" here, leaving the host as a kill would.
                return Err(NodeError::SecretWriteCrashed.into());
            }
            if st.pending_restarts != before {
                st.pending_restarts = before;
                self.save(st)?;
            }
            return Err(SecretFileError::Write {
                path: PathBuf::from(&spec.path),
                source,
            }
            .into());
        }
        restarts.extend(spec.restart_units.iter().cloned());
        tracing::info!(path = %spec.path, secret = %spec.secret_ref, resource_version = %rv, "wrote secret file");
        let rec = SecretFileStatus {
            path: spec.path.clone(),
            secret_ref: spec.secret_ref.clone(),
            resource_version: rv.clone(),
            written_at: Time(now()),
        };
        match recorded {
            Some(i) => st.secrets[i] = rec,
            None => {
                st.secrets.push(rec);
                st.secrets.sort_by(|a, b| a.path.cmp(&b.path));
            }
        }
        self.save(st)?;
        Ok(())
    }
}
