//! What the agent remembers, persisted on the HOST (`/var/lib/nixroll/state.json`) so that a
//! restarted agent — a new pod, a new binary — continues where the last one stopped. Written
//! atomically (temp file, fsync, rename, fsync of the directory) before every step that has an
//! effect on the host.

use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::api::{
    ActivationAction, ActivationState, HostError as ReportedError, HostOperation, SecretFileStatus,
    StagedSystem,
};

/// Host path of the state file.
pub const STATE_FILE: &str = "/var/lib/nixroll/state.json";
/// Host directory of the GC roots of staged systems.
pub const GCROOTS_DIR: &str = "/var/lib/nixroll/gcroots";
/// Host directory of activation result files.
pub const ACTIVATION_DIR: &str = "/var/lib/nixroll/activation";

/// Everything persisted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedRecord>,
    /// Systems staged before `staged`, newest first, still pinned by their GC roots (at most
    /// `keep_staged - 1`): going back to one of them (a reverted revision) needs no
    /// evaluation and no build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<StagedRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ReportedError>,
    /// Secret files nixroll wrote (path, source, resourceVersion, time; never content). Only
    /// these are removed when they leave `spec.secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretFileStatus>,
    /// Units to `systemctl try-restart` because their file changed; recorded before the file
    /// is replaced, cleared once restarted (an agent killed in between restarts them after).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restarts: Vec<String>,
}

impl HostState {
    /// Forget the last error if it was one of `operation` (which has succeeded since).
    pub fn clear_error_of(&mut self, operation: HostOperation) {
        if self.last_error.as_ref().is_some_and(|e| e.operation == operation) {
            self.last_error = None;
        }
    }
}

/// The staged system and what its reboot reasons were computed against.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StagedRecord {
    pub staged: StagedSystem,
    /// Host path of the GC root pinning it.
    pub gc_root: PathBuf,
    /// `/run/booted-system` when the reasons were computed (recomputed when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_with: Option<String>,
    /// `/run/current-system` when the reasons were computed (`switch-inhibitors` are compared
    /// with the running system; recomputed when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_current: Option<String>,
}

/// Progress of one activation grant. `step` is written BEFORE the step it names is performed,
/// so after a crash the agent knows which effect may or may not have happened.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// About to set (or roll back) the system profile; may have happened.
    SettingProfile,
    /// The profile points at the system to activate.
    ProfileSet,
    /// `switch-to-configuration` launched (or about to be); its result file and its unit decide.
    Switching,
    /// `switch-to-configuration` finished; `exitCode` holds its status.
    Switched,
    /// `Boot` with a bootloader that can boot once: about to put the profile back on
    /// `generationBefore` and run `switch-to-configuration boot` of `defaultBefore`, so the old
    /// system stays the boot default while the new one keeps its entry. Repeatable.
    KeepingDefault,
    /// The old default is back; about to look the new system's entry up and set it to boot
    /// once. Repeatable (the same entry is set again).
    SettingOneshot,
    /// About to reboot (or rebooted); `bootIdBefore` is the boot id before. Never reboots
    /// again from this step.
    RebootIssued,
    /// Done; `outcome` says how.
    Finished,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActivationRecord {
    pub id: String,
    pub action: ActivationAction,
    /// `status.activation.system` of the grant.
    pub system: String,
    pub step: Step,
    /// Profile generation before the grant was started (makes `--rollback` idempotent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_before: Option<i64>,
    /// The system `switch-to-configuration` runs from (for Rollback: the previous generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id_before: Option<String>,
    /// The system the profile (and the boot default) pointed at before the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_before: Option<String>,
    /// The bootloader found able to boot the new system once (`Boot` grants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<crate::agent::bootloader::Bootloader>,
    /// The entry set to boot once, as reported (`bootOnce`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_once: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ActivationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub updated_at: Timestamp,
    /// Launches of `switch-to-configuration` before this one that lost the race for NixOS's
    /// activation lock to another activator (0: the first launch).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read agent state {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent state {path} is corrupt: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write agent state {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Read the state; a missing file is the empty state.
pub fn load(path: &Path) -> Result<HostState, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostState::default()),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write the state atomically and durably.
pub fn save(path: &Path, state: &HostState) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| err(std::io::Error::other(e)))?;
    write_atomic(path, &bytes).map_err(err)
}

/// temp file in the same directory + fsync + rename + fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("var/lib/nixroll/state.json");
        assert_eq!(load(&p).unwrap(), HostState::default());
        let s = HostState {
            activation: Some(ActivationRecord {
                id: "g1".into(),
                action: ActivationAction::Boot,
                system: "/nix/store/x".into(),
                step: Step::RebootIssued,
                generation_before: Some(3),
                activated: None,
                boot_id_before: Some("b1".into()),
                default_before: None,
                bootloader: None,
                boot_once: None,
                exit_code: Some(0),
                outcome: None,
                message: None,
                updated_at: Timestamp::UNIX_EPOCH,
                attempt: 0,
            }),
            ..Default::default()
        };
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), s);
        // no temp files left behind
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
