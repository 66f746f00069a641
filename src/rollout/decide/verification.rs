//! Verifying: the node is done only when it runs the target (after a reboot: a new boot into the
//! staged system) and its Node is Ready. Then success is recorded, and the slot is released:
//! uncordon (only what nixroll cordoned), drop the slot once the uncordon is observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Ctx, POST_GATE_RECHECK, UNCORDON_RECHECK, add, short_rev};
use crate::api::{ActivationAction, ActivationGrant, ActivationState, HistoryEntry, Phase, RebootPolicy};
use crate::rollout::{Action, GateVerdict, K3S_GATE, Row, reason};

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
        if let Some(g) = g.as_ref().filter(|g| g.action == ActivationAction::Bless) {
            return self.blessing(g.clone(), target_sys);
        }
        let boot_once = self.report().and_then(|r| r.boot_once.clone());
        let expect_reboot = g.as_ref().is_some_and(|g| g.action != ActivationAction::Switch);
        let agent = self.agent;
        let booted = agent.and_then(|a| a.booted_system.clone());
        let current = agent.and_then(|a| a.current_system.clone());
        let ready = self.view.node.ready;
        let waiting_for: String;
        if let (true, Some(g)) = (expect_reboot, g.as_ref()) {
            if !self.boot_changed(g) || !self.agent_booted_again(g) {
                waiting_for = "the agent to report from the new boot".into();
            } else if booted.as_deref() != Some(target_sys.as_str()) && boot_once.is_some() {
                let got = booted.unwrap_or_else(|| "nothing".into());
                self.took(Row::RolledBack);
                self.fail(
                    reason::ROLLED_BACK,
                    format!(
                        "the one-time boot of {target_sys} ({}) did not come up; the node went back to its default {got}, which it runs now",
                        boot_once.unwrap_or_default()
                    ),
                );
                return false;
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
            } else if let Some(entry) = boot_once {
                self.took(Row::BlessGranted);
                self.grant_bless(&target_sys, &format!("booted {entry} once; "));
                return false;
            } else {
                self.verified(Row::Verified, true, "rebooted into the new system");
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
                self.verified(Row::Verified, false, how);
                return false;
            }
        }
        self.wait_verifying(&waiting_for, reason::VERIFYING)
    }

    /// Grant the bless step: make the booted target the boot default. The node stays in
    /// `Verifying` (the verify timeout keeps running) and cordoned.
    fn grant_bless(&mut self, system: &str, why: &str) {
        let mut id = format!("{}-bless-{}", self.rev8(), self.now.as_millisecond());
        if self.st.activation.as_ref().is_some_and(|g| g.id == id) {
            id.push_str("-2");
        }
        let boot_id_before = self
            .agent
            .and_then(|a| a.boot_id.clone())
            .or_else(|| self.view.node.boot_id.clone());
        self.st.activation = Some(ActivationGrant {
            id: id.clone(),
            action: ActivationAction::Bless,
            system: system.to_string(),
            granted_at: Time(self.now),
            boot_id_before,
        });
        let msg = format!(
            "{why}verified; bless {id} granted: make {} the boot default",
            crate::api::short_system(system)
        );
        self.note(reason::BLESSING, msg.clone(), false);
        self.enter(Phase::Verifying, reason::BLESSING, msg);
        self.wake_at(add(self.since(), self.policy.timeouts.verifying));
    }

    /// Verifying with a `Bless` grant: success once the agent reports `Blessed` (and the target
    /// still runs, Ready); a reboot before that ends on the old default (`RolledBack`).
    fn blessing(&mut self, g: ActivationGrant, target_sys: String) -> bool {
        let agent = self.agent;
        let booted = agent.and_then(|a| a.booted_system.clone());
        let report = self.report().map(|r| (r.state, r.message.clone()));
        let rebooted = self.agent_booted_again(&g)
            || self
                .view
                .node
                .boot_id
                .as_deref()
                .zip(g.boot_id_before.as_deref())
                .is_some_and(|(n, b)| n != b);
        let blessed = report
            .as_ref()
            .is_some_and(|(s, _)| *s == ActivationState::Blessed);
        if rebooted && !blessed {
            if booted.as_deref() == Some(target_sys.as_str()) {
                if self.agent_booted_again(&g) {
                    // Still (or again) the target: bless in this boot.
                    self.took(Row::BlessGranted);
                    self.grant_bless(&target_sys, "rebooted into the target again; ");
                    return false;
                }
            } else if self.agent_booted_again(&g) {
                let got = booted.unwrap_or_else(|| "nothing".into());
                self.took(Row::RebootedBeforeBless);
                self.fail(
                    reason::ROLLED_BACK,
                    format!(
                        "the node rebooted before {target_sys} was made the default (bless {}); it booted its default {got}, which it runs now",
                        g.id
                    ),
                );
                return false;
            }
        }
        let waiting_for = match report {
            Some((ActivationState::Blessed, _)) => {
                if booted.as_deref() != Some(target_sys.as_str()) {
                    "the agent to report the blessed system booted".to_string()
                } else if !self.view.node.ready {
                    "the Node to become Ready".to_string()
                } else {
                    self.verified(
                        Row::Blessed,
                        true,
                        "booted once into the new system, verified, made it the default",
                    );
                    return false;
                }
            }
            Some((ActivationState::Failed, m)) => {
                self.took(Row::BlessFailed);
                self.fail(
                    reason::ACTIVATION_FAILED,
                    format!("bless {} failed: {}", g.id, m.unwrap_or_default()),
                );
                return false;
            }
            _ => format!("the agent to make the new system the default (bless {})", g.id),
        };
        self.wait_verifying(&waiting_for, reason::BLESSING)
    }

    /// Still verifying (`waiting_for` says on what, `why` is the reason shown): wait until the
    /// verify deadline, then fail with `VerifyTimeout`.
    fn wait_verifying(&mut self, waiting_for: &str, why: &str) -> bool {
        let mut deadline = add(self.since(), self.policy.timeouts.verifying);
        // Verified once and waiting for post-gates when the Node flapped: the verify timeout
        // counts again from that verification.
        if let Some(v) = self.st.slot.as_ref().and_then(|s| s.verified_at.as_ref()) {
            deadline = deadline.max(add(v.0, self.policy.timeouts.verifying));
        }
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
        self.reason = why.into();
        self.wake_at(deadline);
        false
    }

    /// The node runs its target and is Ready: from now on (`slot.verifiedAt`, set the first
    /// time) its post-gates are checked. Once every one has passed in an evaluation made since
    /// then, it is done (`row`, then [`Self::succeed`]); a gate that has not passed within its
    /// timeout fails the node (`GateFailed`: it stays cordoned and holds its slot, which halts
    /// its pool); otherwise it waits, cordoned.
    fn verified(&mut self, row: Row, rebooted: bool, how: &str) {
        let now = self.now;
        let since = match self.st.slot.as_mut() {
            Some(slot) => slot.verified_at.get_or_insert(Time(now)).0,
            None => now,
        };
        let mut waiting: Vec<String> = Vec::new();
        let mut deadline: Option<jiff::Timestamp> = None;
        for (name, timeout, passed, why) in self.post_gates(since) {
            if passed {
                continue;
            }
            let until = add(since, timeout);
            if now >= until {
                self.took(Row::PostGateFailed);
                self.fail(
                    reason::GATE_FAILED,
                    format!(
                        "post-gate {name} did not pass within {timeout} after the node was verified: {why}"
                    ),
                );
                return;
            }
            deadline = Some(deadline.map_or(until, |d: jiff::Timestamp| d.min(until)));
            waiting.push(format!("{name} ({why})"));
        }
        if waiting.is_empty() {
            self.took(row);
            self.succeed(rebooted, how);
            return;
        }
        self.took(Row::PostGateWait);
        let msg = format!("verified; waiting for post-gate {}", waiting.join(", "));
        self.enter(Phase::Verifying, reason::POST_GATES, msg);
        if let Some(d) = deadline {
            self.wake_at(d);
        }
        self.wake_in(POST_GATE_RECHECK);
    }

    /// Every post-gate of the node: (name, timeout, passed since `since`, why not). The
    /// built-in k3s gate first: a server whose Node carries `EtcdIsVoter` is done only when it
    /// is a healthy voter again (its timeout: the verify timeout).
    fn post_gates(&self, since: jiff::Timestamp) -> Vec<(String, jiff::SignedDuration, bool, String)> {
        let node = self.view.node;
        let mut out = Vec::new();
        if node.control_plane
            && let Some(voter) = node.etcd_voter
        {
            out.push((
                K3S_GATE.to_owned(),
                self.policy.timeouts.verifying,
                voter,
                "k3s does not report the server as a healthy etcd voter (EtcdIsVoter)".to_owned(),
            ));
        }
        for g in &node.post_gates {
            let why = match &g.verdict {
                GateVerdict::Block { why, .. } => why.clone(),
                GateVerdict::Pass { .. } => "no evaluation since the node was verified yet".to_owned(),
                GateVerdict::Unknown => "not evaluated yet".to_owned(),
            };
            out.push((g.name.clone(), g.timeout, g.verdict.passed_since(since), why));
        }
        out
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
