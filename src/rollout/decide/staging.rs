//! UpToDate, Staging and Waiting: the phases before anything is disrupted. A new revision starts
//! staging; a staged target waits for the window, the secrets, the backoff and a slot; an
//! admitted node takes its slot, is cordoned and starts draining.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Ctx, DRAIN_PASS_INTERVAL, UNCORDON_RECHECK, add, fmt_time, is_fresh, one_line};
use crate::api::{HostOperation, Phase, Slot, Target};
use crate::rollout::{Action, Row, reason, window};

impl Ctx<'_, '_> {
    pub(super) fn start_staging(&mut self) {
        let installable = self.wanted_installable();
        self.st.target = Some(Target {
            revision: self.view.spec.revision.clone(),
            installable: installable.clone(),
            system: None,
            build: None,
        });
        self.st.activation = None;
        self.st.backoff = None;
        let msg = format!("staging {} ({installable})", self.rev8());
        self.enter(Phase::Staging, reason::STAGING, msg);
        // A new target is a new staging: its timeout counts from now, also when the node was
        // already staging another one (else a revision pushed while a long build ran would
        // time out at once).
        self.st.last_transition_time = Some(Time(self.now));
    }

    pub(super) fn up_to_date(&mut self) -> bool {
        if self.st.slot.is_some() {
            self.took(Row::UpToDateReleaseSlot);
            self.release_slot();
            if self.st.slot.is_some() {
                // Finish the uncordon before anything else.
                if self.st.phase.is_none() {
                    self.enter(Phase::UpToDate, reason::REVISION_RUNNING, "uncordoning".into());
                }
                return false;
            }
        }
        if self.st.revision.as_deref() != Some(self.view.spec.revision.as_str()) {
            self.took(Row::NewRevision);
            self.start_staging();
            return true;
        }
        self.took(Row::UpToDateIdle);
        self.st.target = None;
        self.st.activation = None;
        self.st.backoff = None;
        let msg = format!(
            "running {} ({})",
            self.rev8(),
            self.st
                .system
                .as_deref()
                .map_or_else(|| "?".into(), crate::api::short_system)
        );
        self.enter(Phase::UpToDate, reason::REVISION_RUNNING, msg);
        false
    }

    pub(super) fn staging(&mut self) -> bool {
        if !self.target_is_wanted() {
            self.took(Row::TargetChanged);
            self.start_staging();
        }
        if let Some(staged) = self.staged().cloned() {
            if let Some(t) = self.st.target.as_mut() {
                t.system = Some(staged.system.clone());
            }
            let agent = self.agent;
            let booted = agent.and_then(|a| a.booted_system.as_deref());
            let current = agent.and_then(|a| a.current_system.as_deref());
            if booted == Some(staged.system.as_str()) && current == Some(staged.system.as_str()) {
                if self.st.slot.is_some() {
                    // Retried after a failure while holding the slot: verify, then uncordon.
                    self.took(Row::AlreadyRunningHoldsSlot);
                    self.st.activation = None;
                    self.enter(
                        Phase::Verifying,
                        reason::VERIFYING,
                        "the node already runs the staged system; verifying".into(),
                    );
                    return true;
                }
                self.took(Row::AlreadyRunning);
                self.succeed(false, "already running the staged system; nothing disrupted");
                return true;
            }
            let msg = format!(
                "staged {} ({}{})",
                self.rev8(),
                crate::api::short_system(&staged.system),
                if staged.reboot_required {
                    format!("; reboot needed: {}", staged.reboot_reasons.join(", "))
                } else {
                    String::new()
                }
            );
            self.took(Row::Staged);
            self.note(reason::STAGED, msg.clone(), false);
            self.enter(Phase::Waiting, reason::WAITING_FOR_SLOT, msg);
            return true;
        }
        let since = self.since();
        let target_rev = self.st.target.as_ref().map(|t| t.revision.clone());
        if let Some(err) = self.agent.and_then(|a| a.last_error.as_ref())
            && err.operation == HostOperation::Stage
            && err.revision == target_rev
            && err.at.0 >= since
        {
            let m = err.message.clone();
            self.took(Row::StageFailed);
            self.fail(reason::STAGE_FAILED, format!("staging failed: {m}"));
            return false;
        }
        // Waiting for a builder that has not built the system yet: no staging deadline (the
        // builder's own build timeout bounds the build, and a failed build fails the node once,
        // `StageFailed`, above). Once built, the deadline counts from the builder's report (or
        // from `since`, if later): fetching is what the staging timeout bounds.
        let build = self.st.target.as_ref().and_then(|t| t.build.as_ref());
        if let Some(b) = build
            && b.system.is_empty()
        {
            self.took(Row::StagingWaitBuilder);
            return false;
        }
        let start = match build.and_then(|b| b.built_at.as_ref()) {
            Some(t) if t.0 > since => t.0,
            _ => since,
        };
        let deadline = add(start, self.policy.timeouts.staging);
        if self.now >= deadline {
            self.took(Row::StagingTimeout);
            self.fail(
                reason::STAGING_TIMEOUT,
                format!(
                    "the agent did not stage {} within {}",
                    self.rev8(),
                    self.policy.timeouts.staging
                ),
            );
            return false;
        }
        self.took(Row::StagingWait);
        self.wake_at(deadline);
        false
    }

    pub(super) fn waiting(&mut self, admitted: bool) -> bool {
        // After a drain Abort: finish giving the slot back.
        if let Some(slot) = self.st.slot.clone()
            && self.st.backoff.is_some()
            && is_fresh(&slot)
        {
            self.took(Row::WaitingReleaseSlot);
            if slot.cordoned_by_nixroll && self.view.node.unschedulable && self.view.node.cordon_mark {
                self.actions.push(Action::Uncordon);
                self.wake_in(UNCORDON_RECHECK);
                return false;
            }
            self.st.slot = None;
        }
        if !self.target_is_wanted() || self.target_system().is_none() {
            self.took(Row::TargetChanged);
            self.start_staging();
            return true;
        }
        let holds = if self.st.slot.is_some() {
            " (holds its slot)"
        } else {
            ""
        };
        if let Some(b) = self.st.backoff.clone()
            && b.not_before.0 > self.now
        {
            self.took(Row::WaitingHeld);
            self.reason = reason::DRAIN_BACKOFF.into();
            self.st.message = Some(format!(
                "drain aborted {} time(s); next attempt not before {}",
                b.attempts,
                fmt_time(b.not_before.0)
            ));
            self.wake_at(b.not_before.0);
            return false;
        }
        if let Some(e) = self.invalid_spec.clone() {
            self.took(Row::WaitingHeld);
            self.reason = reason::INVALID_SPEC.into();
            self.st.message = Some(format!("staged, but the spec is invalid: {e}"));
            return false;
        }
        if let Some(m) = self.secrets_missing() {
            self.reason = reason::SECRETS_MISSING.into();
            self.st.message = Some(one_line(&format!("staged{holds}; {m}")));
            return false;
        }
        if self.view.spec.suspend {
            self.took(Row::WaitingHeld);
            self.reason = reason::SUSPENDED.into();
            self.st.message = Some(format!("staged{holds}; spec.suspend is set"));
            return false;
        }
        match window::is_open_parsed(&self.windows, self.now) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                self.took(Row::WaitingHeld);
                self.reason = reason::WAITING_FOR_WINDOW.into();
                let next = window::next_opening_parsed(&self.windows, self.now)
                    .ok()
                    .flatten();
                self.st.message = Some(match next {
                    Some(t) => format!(
                        "staged{holds}; waiting for the maintenance window opening {}",
                        fmt_time(t)
                    ),
                    None => format!("staged{holds}; waiting for a maintenance window"),
                });
                if let Some(t) = next {
                    self.wake_at(t);
                }
                return false;
            }
        }
        if !admitted {
            self.took(Row::WaitingHeld);
            if let Some((why, message)) = &self.view.node.held_by {
                self.reason = why.clone();
                self.st.message = Some(format!("staged {}{holds}; {message}", self.rev8()));
            } else {
                self.reason = reason::WAITING_FOR_SLOT.into();
                self.st.message = Some(format!("staged {}{holds}; waiting for a slot", self.rev8()));
            }
            return false;
        }
        self.start_drain();
        false
    }

    pub(super) fn start_drain(&mut self) {
        let node = self.view.node;
        let cordon_now = !node.unschedulable;
        self.took(if self.st.slot.is_some() {
            Row::Readmitted
        } else {
            Row::Admitted
        });
        let slot = match self.st.slot.take() {
            Some(mut s) => {
                s.cordoned_by_nixroll |= cordon_now;
                s.drain_started_at = Some(Time(self.now));
                s.forced = false;
                s
            }
            None => Slot {
                granted_at: Time(self.now),
                was_unschedulable: node.unschedulable,
                cordoned_by_nixroll: cordon_now,
                drain_started_at: Some(Time(self.now)),
                forced: false,
                verified_at: None,
            },
        };
        self.st.slot = Some(slot);
        self.st.activation = None;
        let msg = if cordon_now {
            "admitted; cordoning and draining".to_string()
        } else {
            "admitted; node already unschedulable (left so afterwards); draining".to_string()
        };
        self.enter(Phase::Draining, reason::DRAINING, msg.clone());
        if cordon_now {
            self.actions.push(Action::Cordon);
        }
        self.actions.push(Action::Evict);
        self.note(reason::ADMITTED, msg, false);
        self.wake_in(DRAIN_PASS_INTERVAL);
    }
}
