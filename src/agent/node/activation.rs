//! A granted activation (`status.activation`) as a state machine persisted on the host:
//! set (or roll back) the system profile, switch, then finish, need or request a reboot.
//! Each step is recorded before it is taken, so a restarted agent resumes, never repeats.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::reboot::rebooted_since;
use super::{CrashPoint, NodeAgent, NodeError, now, sanitize};
use crate::agent::host::resolve;
use crate::agent::state::{ACTIVATION_DIR, ActivationRecord, HostState, Step};
use crate::api::{
    ActivationAction, ActivationGrant, ActivationState, HostError as ReportedError, HostOperation,
};
use crate::names::SYSTEM_PROFILE;

/// How many times an activation that lost the race for [`SWITCH_LOCK`](super::SWITCH_LOCK) is tried again.
const LOCK_RETRIES: u32 = 3;

impl NodeAgent {
    pub(super) fn start_activation(&self, st: &mut HostState, g: &ActivationGrant) -> Result<(), NodeError> {
        tracing::info!(id = %g.id, action = ?g.action, system = %g.system, "activation granted");
        // Files of earlier grants (lock dirs, logs, results) are no longer needed.
        let dir = self.host.fs_path(Path::new(ACTIVATION_DIR));
        let keep = sanitize(&g.id);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.split('.').next() != Some(keep.as_str()) {
                let _ = std::fs::remove_dir(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
        st.activation = Some(ActivationRecord {
            id: g.id.clone(),
            action: g.action,
            system: g.system.clone(),
            step: Step::SettingProfile,
            generation_before: self.profile_generation(),
            activated: None,
            boot_id_before: None,
            exit_code: None,
            outcome: None,
            message: None,
            updated_at: now(),
            attempt: 0,
        });
        self.save(st)
    }

    /// Run the recorded activation from its persisted step to the end (or to the reboot).
    pub(super) async fn drive_activation(&self, st: &mut HostState) -> Result<(), NodeError> {
        loop {
            let Some(rec) = st.activation.clone() else {
                return Ok(());
            };
            match rec.step {
                Step::SettingProfile => {
                    self.crash(CrashPoint::BeforeProfileSet)?;
                    if let Err(message) = self.wait_for_other_activators(st).await {
                        self.finish(st, ActivationState::Failed, message)?;
                        continue;
                    }
                    match self.set_profile(&rec).await {
                        Ok(activated) => {
                            self.update(st, |r| {
                                r.activated = Some(activated);
                                r.step = Step::ProfileSet;
                            })?;
                            self.crash(CrashPoint::AfterProfileSet)?;
                        }
                        Err(message) => self.finish(st, ActivationState::Failed, message)?,
                    }
                }
                Step::ProfileSet => self.update(st, |r| r.step = Step::Switching)?,
                Step::Switching => {
                    self.publish(st);
                    match self.switch(&rec).await {
                        Ok(code) => {
                            self.crash(CrashPoint::AfterSwitch)?;
                            self.update(st, |r| {
                                r.exit_code = Some(code);
                                r.step = Step::Switched;
                            })?;
                        }
                        Err(message) => self.finish(st, ActivationState::Failed, message)?,
                    }
                }
                Step::Switched => {
                    let code = rec.exit_code.unwrap_or(-1);
                    let verb = switch_verb(rec.action);
                    match (rec.action, code) {
                        (_, 1) if rec.attempt < LOCK_RETRIES && self.lost_lock_race(&rec) => {
                            // Another activator started between our check and our launch:
                            // wait for it to end, then launch again (under a new unit name).
                            tracing::warn!(id = %rec.id, attempt = rec.attempt + 1, "switch-to-configuration could not take NixOS's activation lock; trying again");
                            self.update(st, |r| {
                                r.attempt += 1;
                                r.exit_code = None;
                                r.step = Step::ProfileSet;
                            })?;
                        }
                        (ActivationAction::Switch, 0) => {
                            self.finish(st, ActivationState::Switched, String::new())?
                        }
                        (ActivationAction::Switch, 4) => self.finish(
                            st,
                            ActivationState::Switched,
                            format!(
                                "switch-to-configuration switch exited 4: the new system is active and the bootloader updated, but some units failed{}",
                                self.failed_units(&rec)
                            ),
                        )?,
                        (ActivationAction::Switch, 100) => self.finish(
                            st,
                            ActivationState::NeedsReboot,
                            "switch-to-configuration switch exited 100: the new system needs a reboot".into(),
                        )?,
                        (_, 0 | 4) => self.request_reboot(st, &rec).await?,
                        (_, code) => self.finish(
                            st,
                            ActivationState::Failed,
                            format!(
                                "switch-to-configuration {verb} exited {code}{}",
                                self.switch_log_tail(&rec)
                            ),
                        )?,
                    }
                }
                Step::RebootIssued => {
                    // Never reboot again from here. A new boot id means it happened.
                    if rebooted_since(rec.boot_id_before.as_deref(), self.boot_id().as_deref()) {
                        self.finish(st, ActivationState::Rebooted, String::new())?;
                    }
                    return Ok(());
                }
                Step::Finished => return Ok(()),
            }
        }
    }

    pub(super) fn update(
        &self,
        st: &mut HostState,
        f: impl FnOnce(&mut ActivationRecord),
    ) -> Result<(), NodeError> {
        if let Some(r) = st.activation.as_mut() {
            f(r);
            r.updated_at = now();
        }
        self.save(st)
    }

    pub(super) fn finish(
        &self,
        st: &mut HostState,
        outcome: ActivationState,
        message: String,
    ) -> Result<(), NodeError> {
        let id = st.activation.as_ref().map(|r| r.id.clone());
        tracing::info!(id = ?id, ?outcome, %message, "activation finished");
        if outcome == ActivationState::Failed {
            st.last_error = Some(ReportedError {
                operation: HostOperation::Activate,
                revision: st
                    .staged
                    .as_ref()
                    .filter(|s| {
                        st.activation
                            .as_ref()
                            .is_some_and(|a| a.system == s.staged.system)
                    })
                    .map(|s| s.staged.revision.clone()),
                message: message.clone(),
                at: Time(now()),
            });
        } else {
            st.clear_error_of(HostOperation::Activate);
        }
        self.update(st, |r| {
            r.step = Step::Finished;
            r.outcome = Some(outcome);
            r.message = (!message.is_empty()).then_some(message);
        })
    }

    /// Set (or roll back) the profile; idempotent across restarts. Returns the system to run
    /// `switch-to-configuration` from.
    async fn set_profile(&self, rec: &ActivationRecord) -> Result<String, String> {
        let profile = Path::new(SYSTEM_PROFILE);
        match rec.action {
            ActivationAction::Switch | ActivationAction::Boot => {
                if resolve(self.host.as_ref(), Path::new(&rec.system)).is_none() {
                    return Err(format!("system {} is not in the store (not staged?)", rec.system));
                }
                self.check_toplevel(&rec.system)?;
                if self.profile_system().as_deref() != Some(rec.system.as_str()) {
                    self.nix
                        .set_profile(profile, &rec.system)
                        .await
                        .map_err(|e| e.report())?;
                }
                Ok(rec.system.clone())
            }
            ActivationAction::Rollback => {
                // Roll back only if no earlier attempt of this grant already did.
                if rec.generation_before.is_some() && self.profile_generation() == rec.generation_before {
                    self.nix.rollback_profile(profile).await.map_err(|e| e.report())?;
                }
                self.profile_system()
                    .ok_or_else(|| "the system profile resolves to nothing".to_string())
            }
        }
    }

    /// A switchable NixOS toplevel has `nixos-version` and an executable
    /// `bin/switch-to-configuration`: checked before the profile is pointed at it.
    fn check_toplevel(&self, system: &str) -> Result<(), String> {
        let sys = Path::new(system);
        let exe = resolve(self.host.as_ref(), &sys.join("bin/switch-to-configuration")).and_then(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(self.host.fs_path(&p))
                .ok()
                .filter(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
        if resolve(self.host.as_ref(), &sys.join("nixos-version")).is_none() || exe.is_none() {
            return Err(format!(
                "{system} is not a switchable NixOS system (no nixos-version or no executable bin/switch-to-configuration); the system profile was not changed"
            ));
        }
        Ok(())
    }
}

pub(super) fn switch_verb(action: ActivationAction) -> &'static str {
    match action {
        ActivationAction::Switch => "switch",
        ActivationAction::Boot | ActivationAction::Rollback => "boot",
    }
}
