//! The conditions written from a decision's outcome: UpToDate, Progressing and Degraded from the
//! phase and its reason; RebootRequired and SecretsMissing while those problems last.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::Ctx;
use crate::api::{AgentStatus, Phase, RebootPolicy};
use crate::rollout::{Decision, Note, reason};

/// Condition types written by the controller.
pub mod condition {
    pub const UP_TO_DATE: &str = "UpToDate";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const REBOOT_REQUIRED: &str = "RebootRequired";
    pub const SECRETS_MISSING: &str = "SecretsMissing";
}

/// A problem a condition shows while it lasts: the condition's reason and message, and the
/// warning Event told when the condition turns `True`.
struct Problem {
    reason: &'static str,
    message: String,
    note: Note,
}

impl Ctx<'_, '_> {
    pub(super) fn finish(mut self) -> Decision {
        let phase = self.st.phase.unwrap_or_default();
        if self.reason.is_empty() {
            self.reason = match phase {
                Phase::UpToDate => reason::REVISION_RUNNING,
                Phase::Staging => reason::STAGING,
                Phase::Waiting => reason::WAITING_FOR_SLOT,
                Phase::Draining => reason::DRAINING,
                Phase::Activating => reason::ACTIVATING,
                Phase::Rebooting => reason::REBOOTING,
                Phase::Verifying => reason::VERIFYING,
                Phase::Degraded => "Failed",
            }
            .to_string();
        }
        let msg = self.st.message.clone().unwrap_or_default();
        let now = self.now;
        let generation = self.view.generation;
        let conds = &mut self.st.conditions;
        let (u, ur) = if phase == Phase::UpToDate {
            (true, reason::REVISION_RUNNING.to_string())
        } else if phase == Phase::Degraded {
            (false, self.reason.clone())
        } else {
            (false, reason::NEW_REVISION.to_string())
        };
        set_condition(conds, condition::UP_TO_DATE, u, &ur, &msg, now, generation);
        let progressing = !matches!(phase, Phase::UpToDate | Phase::Degraded);
        let pr = if progressing {
            self.reason.clone()
        } else if phase == Phase::Degraded {
            reason::HALTED.to_string()
        } else {
            reason::IDLE.to_string()
        };
        let (p, pr) = if self.reason == reason::INVALID_SPEC || self.reason == reason::NODE_MISSING {
            (false, self.reason.clone())
        } else {
            (progressing, pr)
        };
        set_condition(conds, condition::PROGRESSING, p, &pr, &msg, now, generation);
        let (d, dr) = if phase == Phase::Degraded {
            (true, self.reason.clone())
        } else {
            (false, reason::AS_EXPECTED.to_string())
        };
        set_condition(conds, condition::DEGRADED, d, &dr, &msg, now, generation);

        // RebootRequired: reboot: Never left the node running something other than what it
        // boots into.
        let booted = self.agent.and_then(|a| a.booted_system.as_deref());
        let pending = phase == Phase::UpToDate
            && self.view.spec.reboot == RebootPolicy::Never
            && self.st.system.is_some()
            && booted.is_some()
            && booted != self.st.system.as_deref();
        let reboot_required = pending.then(|| {
            let m = format!(
                "reboot: Never; the node must be rebooted by a person to boot {}",
                self.st.system.as_deref().unwrap_or("?")
            );
            Problem {
                reason: reason::REBOOT_POLICY_NEVER,
                note: Note {
                    reason: reason::REBOOT_REQUIRED.into(),
                    message: m.clone(),
                    warning: true,
                },
                message: m,
            }
        });
        self.problem_condition(
            condition::REBOOT_REQUIRED,
            reboot_required,
            (reason::NOT_REQUIRED, "the node boots the system it runs"),
        );
        // SecretsMissing: set while the agent reports secret files it cannot write.
        let secrets_missing = secrets_missing_message(self.agent).map(|m| Problem {
            reason: reason::SECRETS_MISSING,
            note: Note {
                reason: reason::SECRETS_MISSING.into(),
                message: format!("{m}; nothing is activated until they are written"),
                warning: true,
            },
            message: m,
        });
        self.problem_condition(
            condition::SECRETS_MISSING,
            secrets_missing,
            (
                reason::SECRETS_PRESENT,
                "every secret file of spec.secrets is on the host",
            ),
        );
        self.st.agent = None;
        Decision {
            status: self.st,
            actions: self.actions,
            notes: self.notes,
            requeue_after: self.requeue,
            rows: self.rows,
        }
    }

    /// Set the condition `type_` of a problem: `True` with the problem's reason and message
    /// while it lasts (and its warning Event when the condition turns `True`), `False` with
    /// `cleared` (reason, message) once it is over. A node that never had it does not get it.
    fn problem_condition(&mut self, type_: &str, problem: Option<Problem>, cleared: (&str, &str)) {
        let (now, generation) = (self.now, self.view.generation);
        let conds = &mut self.st.conditions;
        match problem {
            Some(p) => {
                let had = conds.iter().any(|c| c.type_ == type_ && c.status == "True");
                if !had {
                    self.notes.push(p.note);
                }
                set_condition(conds, type_, true, p.reason, &p.message, now, generation);
            }
            None if conds.iter().any(|c| c.type_ == type_) => {
                set_condition(conds, type_, false, cleared.0, cleared.1, now, generation);
            }
            None => {}
        }
    }
}

/// `secret files missing on the host: /path (Secret s key k: SecretNotFound), …`.
pub(super) fn secrets_missing_message(agent: Option<&AgentStatus>) -> Option<String> {
    let missing = &agent?.secrets_missing;
    if missing.is_empty() {
        return None;
    }
    let list: Vec<String> = missing
        .iter()
        .map(|m| {
            format!(
                "{} (Secret {} key {}: {})",
                m.path, m.secret_ref.name, m.secret_ref.key, m.reason
            )
        })
        .collect();
    Some(format!("secret files missing on the host: {}", list.join(", ")))
}

/// The status of a node whose spec breaks the CRD's rules (`problem`, from
/// [`crate::api::NixOSNodeSpec::problem`]): nothing else changes — no phase step, no slot, no
/// action — but the message and the conditions say what to fix: `UpToDate=False` and
/// `Progressing=False` with reason `InvalidSpec`.
pub fn invalid_spec_status(
    status: &crate::api::NixOSNodeStatus,
    problem: &str,
    generation: i64,
    now: Timestamp,
) -> crate::api::NixOSNodeStatus {
    let mut st = status.clone();
    st.agent = None;
    let message = format!("invalid spec: {problem}; nothing is rolled out on this node until it is fixed");
    st.message = Some(message.clone());
    st.observed_generation = Some(generation);
    for type_ in [condition::UP_TO_DATE, condition::PROGRESSING] {
        set_condition(
            &mut st.conditions,
            type_,
            false,
            reason::INVALID_SPEC,
            &message,
            now,
            generation,
        );
    }
    st
}

/// Set condition `type_` in `conds`: its transition time moves only when its status changes.
pub(crate) fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
    generation: i64,
) {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Time(now);
            c.status = status.to_string();
        }
        c.reason = reason.to_string();
        c.message = message.to_string();
        c.observed_generation = Some(generation);
    } else {
        conds.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: Time(now),
            observed_generation: Some(generation),
        });
    }
}
