//! Verifying: the node is done only when it runs the target (after a reboot: a new boot into the
//! staged system) and its Node is Ready. Then success is recorded, and the slot is released:
//! uncordon (only what nixroll cordoned), drop the slot once the uncordon is observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Ctx, UNCORDON_RECHECK, add, short_rev};
use crate::api::{ActivationAction, ActivationState, HistoryEntry, Phase, RebootPolicy};
use crate::rollout::{Action, Row, reason};

impl Ctx<'_, '_> {
    pub(super) fn verifying(&mut self) -> bool {
        self.keep_cordoned();
        let Some(target_sys) = self.target_system() else {
            // Not written by this module: nothing can ever be verified.
            self.took(Row::VerifyTimeout);
            self.fail(reason::VERIFY_TIMEOUT, "no target system to verify".into());
            return false;
        };
        let g = self.st.activation.clone();
        let expect_reboot = g.as_ref().is_some_and(|g| g.action != ActivationAction::Switch);
        let agent = self.agent;
        let booted = agent.and_then(|a| a.booted_system.clone());
        let current = agent.and_then(|a| a.current_system.clone());
        let ready = self.view.node.ready;
        let waiting_for: String;
        if let (true, Some(g)) = (expect_reboot, g.as_ref()) {
            if !self.boot_changed(g) || !self.agent_booted_again(g) {
                waiting_for = "the agent to report from the new boot".into();
            } else if booted.as_deref() != Some(target_sys.as_str()) {
                let got = booted.unwrap_or_else(|| "nothing".into());
                self.took(Row::BootedWrongSystem);
                self.fail(
                    reason::BOOTED_WRONG_SYSTEM,
                    format!("after reboot the node booted {got}, not {target_sys} (bootloader fallback?)"),
                );
                return false;
            } else if !ready {
                waiting_for = "the Node to become Ready".into();
            } else {
                self.took(Row::Verified);
                self.succeed(true, "rebooted into the new system");
                return false;
            }
        } else {
            let needs_reboot = self
                .report()
                .is_some_and(|r| r.state == ActivationState::NeedsReboot)
                && self.view.spec.reboot == RebootPolicy::Never;
            if !needs_reboot && current.as_deref() != Some(target_sys.as_str()) {
                waiting_for = "the agent to report the new current system".into();
            } else if !ready {
                waiting_for = "the Node to become Ready".into();
            } else {
                let how = if needs_reboot {
                    "switch needs a reboot (exit 100); reboot: Never leaves it to a human"
                } else {
                    "switched live"
                };
                self.took(Row::Verified);
                self.succeed(false, how);
                return false;
            }
        }
        let deadline = add(self.since(), self.policy.timeouts.verifying);
        if self.now >= deadline {
            self.took(Row::VerifyTimeout);
            self.fail(
                reason::VERIFY_TIMEOUT,
                format!(
                    "not verified within {}: still waiting for {waiting_for}",
                    self.policy.timeouts.verifying
                ),
            );
            return false;
        }
        self.took(Row::VerifyingWait);
        self.st.message = Some(format!("verifying: waiting for {waiting_for}"));
        self.reason = reason::VERIFYING.into();
        self.wake_at(deadline);
        false
    }

    /// Verified success: record what runs, uncordon if nixroll cordoned.
    pub(super) fn succeed(&mut self, rebooted: bool, how: &str) {
        let Some(target) = self.st.target.take() else {
            return;
        };
        let started = self.attempt_started();
        self.st.revision = Some(target.revision.clone());
        self.st.running = Some(short_rev(&target.revision));
        self.st.system = target.system.clone();
        self.st.activation = None;
        self.st.backoff = None;
        self.st.failed = None;
        self.push_history(HistoryEntry {
            revision: target.revision.clone(),
            system: target.system.clone(),
            result: "Succeeded".into(),
            started_at: Time(started),
            finished_at: Time(self.now),
            rebooted,
            message: Some(how.to_string()),
        });
        let msg = format!(
            "running {} ({})",
            short_rev(&target.revision),
            target
                .system
                .as_deref()
                .map_or_else(|| "?".into(), crate::api::short_system)
        );
        self.note(reason::UPDATED, format!("{how}; {msg}"), false);
        self.enter(Phase::UpToDate, reason::REVISION_RUNNING, msg);
        self.release_slot();
    }

    /// After success: uncordon (only what nixroll cordoned, only when Ready), then drop the
    /// slot once the uncordon is observed.
    pub(super) fn release_slot(&mut self) {
        let Some(slot) = self.st.slot.clone() else {
            return;
        };
        if self.actions.contains(&Action::Cordon) {
            // Found schedulable in this very pass: do not cordon what is done.
            self.actions.retain(|a| *a != Action::Cordon);
            self.st.slot = None;
            return;
        }
        if slot.cordoned_by_nixroll && self.view.node.unschedulable && self.view.node.cordon_mark {
            if self.view.node.ready {
                self.actions.push(Action::Uncordon);
                self.note(reason::UNCORDONED, "uncordoning the node".into(), false);
            }
            self.wake_in(UNCORDON_RECHECK);
        } else {
            self.st.slot = None;
        }
    }
}
