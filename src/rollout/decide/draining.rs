//! Draining: one eviction pass after another until no pod is left (then the activation grant),
//! or the drain timeout: `Abort` gives the slot back and backs off, `Force` deletes.

use jiff::SignedDuration;

use super::{
    Ctx, DRAIN_PASS_INTERVAL, MAX_BACKOFF_DOUBLINGS, UNCORDON_RECHECK, add, drain_timeout, fmt_time,
    is_fresh, one_line,
};
use crate::api::{Backoff, DrainTimeoutAction, Phase, Slot};
use crate::rollout::{Action, DrainProgress, Row, reason};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

impl Ctx<'_, '_> {
    pub(super) fn draining(&mut self, drain: Option<&DrainProgress>) -> bool {
        let node = self.view.node;
        let slot = match self.st.slot.clone() {
            Some(s) => s,
            None => {
                // Cannot happen with a status this module wrote; never claim a cordon we do
                // not know we made.
                let s = Slot {
                    granted_at: Time(self.now),
                    was_unschedulable: node.unschedulable,
                    cordoned_by_nixroll: false,
                    drain_started_at: Some(Time(self.now)),
                    forced: false,
                    verified_at: None,
                };
                self.st.slot = Some(s.clone());
                s
            }
        };
        let started = slot
            .drain_started_at
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(|| self.since());
        let timeout = drain_timeout(self.view.spec, self.policy).unwrap_or(self.policy.timeouts.draining);
        let on_timeout = self
            .view
            .spec
            .drain
            .as_ref()
            .map(|d| d.on_timeout)
            .unwrap_or_default();
        let deadline = add(started, timeout);
        let cordoned = node.unschedulable;
        if let Some(p) = drain {
            if p.remaining == 0 && cordoned {
                if let Some(m) = self.secrets_missing() {
                    self.reason = reason::SECRETS_MISSING.into();
                    self.st.message = Some(one_line(&format!("drained; activation waits: {m}")));
                    return false;
                }
                self.took(Row::Drained);
                self.grant(None);
                return false;
            }
            if p.remaining > 0 && self.now >= deadline {
                match on_timeout {
                    DrainTimeoutAction::Abort => {
                        self.took(Row::DrainAbort);
                        self.abort_drain(&slot, p, timeout);
                        return false;
                    }
                    DrainTimeoutAction::Force => {
                        self.took(Row::DrainForce);
                        if !slot.forced {
                            self.note(
                                reason::DRAIN_FORCED,
                                format!(
                                    "drain did not finish within {timeout}; deleting {} pod(s) without the Eviction API (onTimeout: Force)",
                                    p.remaining
                                ),
                                true,
                            );
                        }
                        if let Some(s) = self.st.slot.as_mut() {
                            s.forced = true;
                        }
                        if !cordoned {
                            self.actions.push(Action::Cordon);
                            if let Some(s) = self.st.slot.as_mut() {
                                s.cordoned_by_nixroll = true;
                            }
                        }
                        self.actions.push(Action::ForceDelete);
                        self.reason = reason::DRAIN_FORCED.into();
                        self.st.message =
                            Some(format!("drain timed out; force-deleting {} pod(s)", p.remaining));
                        self.wake_in(DRAIN_PASS_INTERVAL);
                        return false;
                    }
                }
            }
        }
        self.took(Row::DrainPass);
        if !cordoned {
            // Schedulable again (someone uncordoned it mid-drain): nixroll cordons it now, so
            // nixroll owns this cordon.
            self.actions.push(Action::Cordon);
            if let Some(s) = self.st.slot.as_mut() {
                s.cordoned_by_nixroll = true;
            }
        }
        if slot.forced {
            self.actions.push(Action::ForceDelete);
        } else {
            self.actions.push(Action::Evict);
        }
        self.reason = reason::DRAINING.into();
        self.st.message = Some(match drain {
            Some(p) => {
                let mut m = format!("draining: {} pod(s) left", p.remaining);
                if p.blocked_by_pdb > 0 {
                    m.push_str(&format!(", {} blocked by PodDisruptionBudgets", p.blocked_by_pdb));
                }
                if !p.refused.is_empty() {
                    m.push_str(&format!(", not evictable: {}", p.refused.join("; ")));
                }
                m.push_str(&format!("; timeout at {}", fmt_time(deadline)));
                m
            }
            None => format!("draining; timeout at {}", fmt_time(deadline)),
        });
        self.wake_in(DRAIN_PASS_INTERVAL);
        self.wake_at(deadline);
        false
    }

    pub(super) fn abort_drain(&mut self, slot: &Slot, p: &DrainProgress, timeout: SignedDuration) {
        // A slot granted for this very drain is given back: uncordon (only what nixroll
        // cordoned) and drop the slot once the uncordon is observed. A slot kept from an
        // earlier failed attempt (a retried node that stayed cordoned) stays, and so does its
        // cordon.
        let fresh = is_fresh(slot);
        let uncordon =
            fresh && slot.cordoned_by_nixroll && self.view.node.unschedulable && self.view.node.cordon_mark;
        if uncordon {
            self.actions.push(Action::Uncordon);
            self.wake_in(UNCORDON_RECHECK);
        } else if fresh {
            self.st.slot = None;
        }
        let attempts = self.st.backoff.as_ref().map_or(0, |b| b.attempts) + 1;
        let doublings = (attempts - 1).min(MAX_BACKOFF_DOUBLINGS);
        let factor = 1i32 << doublings;
        let delay = self
            .policy
            .drain_backoff
            .checked_mul(factor)
            .unwrap_or(self.policy.drain_backoff);
        let not_before = add(self.now, delay);
        self.st.backoff = Some(Backoff {
            attempts,
            not_before: Time(not_before),
        });
        let msg = format!(
            "drain did not finish within {timeout} ({} pod(s) left, {} blocked by PodDisruptionBudgets); {}released the slot, next attempt not before {}",
            p.remaining,
            p.blocked_by_pdb,
            if uncordon {
                "uncordoned, "
            } else if fresh {
                ""
            } else {
                "kept the cordon of the earlier failure, "
            },
            fmt_time(not_before)
        );
        self.note(reason::DRAIN_TIMEOUT, msg.clone(), true);
        self.enter(Phase::Waiting, reason::DRAIN_BACKOFF, msg);
        self.wake_at(not_before);
    }
}
