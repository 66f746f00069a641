//! Activating and Rebooting: the activation grant (switch, or boot and reboot), the agent's
//! report on it, and the new boot id that ends a reboot. A node in these phases stays cordoned.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Ctx, add, short_rev};
use crate::api::{ActivationAction, ActivationGrant, ActivationState, Phase, RebootPolicy};
use crate::rollout::{Action, Row, reason};

impl Ctx<'_, '_> {
    /// Grant an activation (a new id every time).
    pub(super) fn grant(&mut self, force_action: Option<ActivationAction>) {
        let Some(system) = self
            .target_system()
            .or_else(|| self.staged().map(|s| s.system.clone()))
        else {
            self.fail(reason::STAGING_TIMEOUT, "no staged system to activate".into());
            return;
        };
        let reboot_required = self.staged().is_none_or(|s| s.reboot_required);
        let action = force_action.unwrap_or(match self.view.spec.reboot {
            RebootPolicy::IfNeeded if reboot_required => ActivationAction::Boot,
            RebootPolicy::IfNeeded => ActivationAction::Switch,
            RebootPolicy::Always => ActivationAction::Boot,
            RebootPolicy::Never => ActivationAction::Switch,
        });
        let rev = self
            .st
            .target
            .as_ref()
            .map(|t| short_rev(&t.revision))
            .unwrap_or_else(|| self.rev8());
        let mut id = format!("{rev}-{}", self.now.as_millisecond());
        if self.st.activation.as_ref().is_some_and(|g| g.id == id) {
            id.push_str("-2");
        }
        let boot_id_before = self
            .view
            .node
            .boot_id
            .clone()
            .or_else(|| self.agent.and_then(|a| a.boot_id.clone()));
        self.st.activation = Some(ActivationGrant {
            id: id.clone(),
            action,
            system: system.clone(),
            granted_at: Time(self.now),
            boot_id_before,
        });
        let msg = format!(
            "activation {id} granted: {action:?} {}",
            crate::api::short_system(&system)
        );
        self.note(reason::ACTIVATION_GRANTED, msg.clone(), false);
        self.enter(Phase::Activating, reason::ACTIVATING, msg);
        self.wake_in(self.policy.timeouts.activating);
    }

    pub(super) fn boot_changed(&self, g: &ActivationGrant) -> bool {
        match g.boot_id_before.as_deref() {
            Some(b) => {
                self.view.node.boot_id.as_deref().is_some_and(|x| x != b) || self.agent_booted_again(g)
            }
            None => self
                .report()
                .is_some_and(|r| r.state == ActivationState::Rebooted),
        }
    }

    /// The agent reported from a boot other than the one before the grant.
    pub(super) fn agent_booted_again(&self, g: &ActivationGrant) -> bool {
        match g.boot_id_before.as_deref() {
            Some(b) => self
                .agent
                .and_then(|a| a.boot_id.as_deref())
                .is_some_and(|x| x != b),
            None => self
                .report()
                .is_some_and(|r| r.state == ActivationState::Rebooted),
        }
    }

    /// A node in a disruptive phase found schedulable (someone uncordoned it) is cordoned
    /// again; nixroll then owns that cordon.
    pub(super) fn keep_cordoned(&mut self) {
        if !self.view.node.unschedulable && !self.actions.contains(&Action::Cordon) {
            self.actions.push(Action::Cordon);
            if let Some(s) = self.st.slot.as_mut() {
                s.cordoned_by_nixroll = true;
            }
        }
    }

    pub(super) fn activating(&mut self) -> bool {
        self.keep_cordoned();
        let Some(g) = self.st.activation.clone() else {
            // Not written by this module: grant as if the drain had just finished.
            self.took(Row::Drained);
            self.grant(None);
            return false;
        };
        let state = self.report().map(|r| (r.state, r.message.clone()));
        match state {
            Some((ActivationState::Switched, _)) => {
                self.took(Row::Switched);
                self.enter(Phase::Verifying, reason::VERIFYING, "switched; verifying".into());
                true
            }
            // `Rebooted` before the controller saw `RebootRequested`: through `Rebooting`,
            // which sees the new boot at once.
            Some((ActivationState::RebootRequested | ActivationState::Rebooted, _)) => {
                self.took(Row::RebootRequested);
                self.enter(
                    Phase::Rebooting,
                    reason::REBOOTING,
                    "reboot requested; waiting for a new boot id".into(),
                );
                true
            }
            Some((ActivationState::NeedsReboot, _)) => {
                if self.view.spec.reboot == RebootPolicy::Never || g.action != ActivationAction::Switch {
                    if g.action != ActivationAction::Switch {
                        self.took(Row::ActivationFailed);
                        self.fail(
                            reason::ACTIVATION_FAILED,
                            format!("activation {} ({:?}) reported NeedsReboot", g.id, g.action),
                        );
                        return false;
                    }
                    self.took(Row::NeedsRebootNever);
                    self.enter(
                        Phase::Verifying,
                        reason::VERIFYING,
                        "switch needs a reboot (exit 100) and reboot is Never; verifying the running system"
                            .into(),
                    );
                    return true;
                }
                self.took(Row::NeedsReboot);
                self.note(
                    reason::REBOOT_NEEDED,
                    format!("activation {} exited 100: the new system needs a reboot", g.id),
                    false,
                );
                self.grant(Some(ActivationAction::Boot));
                false
            }
            Some((ActivationState::Failed, m)) => {
                self.took(Row::ActivationFailed);
                self.fail(
                    reason::ACTIVATION_FAILED,
                    format!("activation {} failed: {}", g.id, m.unwrap_or_default()),
                );
                false
            }
            // `Blessed` answers a Bless grant, which is never made in Activating.
            Some((ActivationState::Running | ActivationState::Blessed, _)) | None => {
                // No word from the agent: the timeout counts from the grant. While the agent
                // reports the switch running, its verdict is waited for: the agent stops a
                // switch that outlives its own activation timeout and reports `Failed` with
                // what it saw, so a slow switch is not declared dead while it still runs (and
                // may yet finish). A silent or hung agent is bounded by twice the timeout.
                let running = state.is_some();
                let timeout = if running {
                    self.policy.timeouts.activating.saturating_mul(2)
                } else {
                    self.policy.timeouts.activating
                };
                let deadline = add(g.granted_at.0, timeout);
                if self.now >= deadline {
                    self.took(Row::ActivationTimeout);
                    self.fail(
                        reason::ACTIVATION_TIMEOUT,
                        if running {
                            format!(
                                "activation {} did not finish within {timeout}: the agent still reports it running (check the node's console and `journalctl -u 'nixroll-activate-*'`)",
                                g.id
                            )
                        } else {
                            format!(
                                "activation {} did not finish within {timeout}: the agent never reported it started",
                                g.id
                            )
                        },
                    );
                    return false;
                }
                self.took(Row::ActivatingWait);
                self.reason = reason::ACTIVATING.into();
                self.wake_at(deadline);
                false
            }
        }
    }

    pub(super) fn rebooting(&mut self) -> bool {
        self.keep_cordoned();
        let Some(g) = self.st.activation.clone() else {
            // Not written by this module: nothing to compare the boot id with.
            self.took(Row::Rebooted);
            self.enter(Phase::Verifying, reason::VERIFYING, "verifying".into());
            return true;
        };
        if self.boot_changed(&g) {
            self.took(Row::Rebooted);
            self.enter(Phase::Verifying, reason::VERIFYING, "rebooted; verifying".into());
            return true;
        }
        if let Some(r) = self.report().filter(|r| r.state == ActivationState::Failed) {
            let m = r.message.clone().unwrap_or_default();
            self.took(Row::ActivationFailed);
            self.fail(
                reason::ACTIVATION_FAILED,
                format!("activation {} failed: {m}", g.id),
            );
            return false;
        }
        let deadline = add(self.since(), self.policy.timeouts.rebooting);
        if self.now >= deadline {
            self.took(Row::RebootTimeout);
            self.fail(
                reason::REBOOT_TIMEOUT,
                format!("no new boot id within {}", self.policy.timeouts.rebooting),
            );
            return false;
        }
        self.took(Row::RebootingWait);
        self.wake_at(deadline);
        false
    }
}
