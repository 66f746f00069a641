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
            default_before: self.profile_system(),
            bootloader: None,
            boot_once: None,
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
                        (ActivationAction::Bless, 0 | 4) => {
                            self.finish(st, ActivationState::Blessed, String::new())?
                        }
                        (ActivationAction::Boot, 0 | 4) if self.can_boot_once(&rec).is_some() => {
                            let bootloader = self.can_boot_once(&rec);
                            self.update(st, |r| {
                                r.bootloader = bootloader;
                                r.step = Step::KeepingDefault;
                            })?;
                        }
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
                Step::KeepingDefault => {
                    if let Err(message) = self.keep_old_default(&rec).await {
                        self.finish(st, ActivationState::Failed, message)?;
                        continue;
                    }
                    self.update(st, |r| r.step = Step::SettingOneshot)?;
                    self.crash(CrashPoint::AfterKeepDefault)?;
                }
                Step::SettingOneshot => {
                    let Some(bootloader) = rec.bootloader else {
                        self.finish(st, ActivationState::Failed, "no bootloader recorded".into())?;
                        continue;
                    };
                    let system = self.host.cmd_path(Path::new(&rec.system));
                    match crate::agent::bootloader::set_oneshot(
                        self.host.as_ref(),
                        bootloader,
                        &system.to_string_lossy(),
                    )
                    .await
                    {
                        Ok(entry) => {
                            tracing::info!(id = %rec.id, %entry, "the new system boots once; the old one stays the default");
                            self.update(st, |r| r.boot_once = Some(entry))?;
                            let rec = st.activation.clone().unwrap_or(rec);
                            self.request_reboot(st, &rec).await?;
                        }
                        Err(e) => self.finish(
                            st,
                            ActivationState::Failed,
                            format!(
                                "cannot set the new system to boot once ({}): {e}; the old system stays the default and nothing was rebooted",
                                bootloader.name()
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
                    // A generation of this system already exists (a retry after a one-time
                    // boot that was not blessed): go back to it rather than add another.
                    match self.generation_of(&rec.system) {
                        Some(g) => self.nix.switch_generation(profile, g).await,
                        None => self.nix.set_profile(profile, &rec.system).await,
                    }
                    .map_err(|e| e.report())?;
                }
                Ok(rec.system.clone())
            }
            ActivationAction::Bless => {
                // Only the system this boot started; the profile moves to its generation.
                let booted = self.booted_system();
                let system = resolve(self.host.as_ref(), Path::new(&rec.system))
                    .map(|p| p.to_string_lossy().into_owned());
                if booted.is_none() || booted != system {
                    return Err(format!(
                        "not made the default: the node runs {}, not {} (rebooted before the bless step?)",
                        booted.as_deref().unwrap_or("nothing"),
                        rec.system
                    ));
                }
                match self.generation_of(&rec.system) {
                    Some(g) if self.profile_generation() == Some(g) => {}
                    Some(g) => self
                        .nix
                        .switch_generation(profile, g)
                        .await
                        .map_err(|e| e.report())?,
                    None => self
                        .nix
                        .set_profile(profile, &rec.system)
                        .await
                        .map_err(|e| e.report())?,
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

    /// The bootloader to boot the new system of a `Boot` grant once with, when that is possible:
    /// one is detected, and an old system to keep as the default is known (and differs).
    fn can_boot_once(&self, rec: &ActivationRecord) -> Option<crate::agent::bootloader::Bootloader> {
        if let Some(b) = rec.bootloader {
            return Some(b);
        }
        let old = rec.default_before.as_deref()?;
        if old == rec.system || rec.generation_before.is_none() || self.options.no_boot_once {
            return None;
        }
        crate::agent::bootloader::detect(self.host.as_ref())
    }

    /// Put the profile back on the generation before the grant and run the old system's
    /// `switch-to-configuration boot`: the old system is the boot default again, and the new
    /// generation keeps its entry (NixOS's bootloader installers write one per generation and
    /// make the default the one of the system that runs the installer). Repeatable.
    async fn keep_old_default(&self, rec: &ActivationRecord) -> Result<(), String> {
        let (Some(old), Some(generation)) = (rec.default_before.as_deref(), rec.generation_before) else {
            return Err("no previous default recorded".into());
        };
        if self.profile_generation() != Some(generation) {
            self.nix
                .switch_generation(Path::new(SYSTEM_PROFILE), generation)
                .await
                .map_err(|e| format!("keeping the old default: {}", e.report()))?;
        }
        match self.keep_default(rec, old).await {
            Ok(0 | 4) => Ok(()),
            Ok(code) => Err(format!(
                "keeping the old default: switch-to-configuration boot of {old} exited {code}"
            )),
            Err(m) => Err(format!("keeping the old default: {m}")),
        }
    }

    /// The newest generation of the system profile that points at `system`.
    fn generation_of(&self, system: &str) -> Option<i64> {
        let profile = self.host.fs_path(Path::new(SYSTEM_PROFILE));
        let dir = profile.parent()?;
        let want = resolve(self.host.as_ref(), Path::new(system))?;
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let n: i64 = name
                    .strip_prefix("system-")?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()?;
                let host = self.host.host_path(&e.path())?;
                (resolve(self.host.as_ref(), &host)? == want).then_some(n)
            })
            .max()
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
        ActivationAction::Boot | ActivationAction::Rollback | ActivationAction::Bless => "boot",
    }
}
