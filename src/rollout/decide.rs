//! The per-node state machine behind [`super::decide`]. See `docs/rollout.md` for the table.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{Action, Decision, DrainProgress, NodeView, Note, Policy, Row, reason, window};
use crate::api::{
    ActivationAction, ActivationGrant, ActivationReport, ActivationState, AgentStatus, Backoff,
    DrainTimeoutAction, FailedTarget, HistoryEntry, HostOperation, NixOSNodeStatus, Phase, RebootPolicy,
    Slot, Target, installable,
};

/// How many history entries are kept (newest first).
pub const HISTORY_LIMIT: usize = 10;
/// How often to look again while pods are being evicted.
pub const DRAIN_PASS_INTERVAL: SignedDuration = SignedDuration::from_secs(5);
/// How soon to look again after asking for an uncordon that has not been observed yet.
pub const UNCORDON_RECHECK: SignedDuration = SignedDuration::from_secs(2);
/// Upper bound of the drain backoff multiplier (2^6 × `drain_backoff`).
pub const MAX_BACKOFF_DOUBLINGS: u32 = 6;

/// Condition types written by the controller.
pub mod condition {
    pub const UP_TO_DATE: &str = "UpToDate";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const REBOOT_REQUIRED: &str = "RebootRequired";
    pub const SECRETS_MISSING: &str = "SecretsMissing";
}

/// A drain timeout that could not be parsed (`spec.drain.timeout`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("drain timeout {value:?} is not a duration such as 90s, 15m or 1h30m")]
pub struct ParseDurationError {
    pub value: String,
}

/// Parse durations like `90s`, `15m`, `1h30m`, `500ms` (the CRD's pattern
/// `^([0-9]+(ms|s|m|h))+$`).
pub fn parse_duration(value: &str) -> Result<SignedDuration, ParseDurationError> {
    let err = || ParseDurationError {
        value: value.to_string(),
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(err());
    }
    let mut total = SignedDuration::ZERO;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(err());
        }
        let n: i64 = value[start..i].parse().map_err(|_| err())?;
        let rest = &value[i..];
        let (unit, len) = if rest.starts_with("ms") {
            (SignedDuration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (SignedDuration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (SignedDuration::from_mins(1), 1)
        } else if rest.starts_with('h') {
            (SignedDuration::from_hours(1), 1)
        } else {
            return Err(err());
        };
        i += len;
        let part = unit
            .checked_mul(i32::try_from(n).map_err(|_| err())?)
            .ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

/// The drain timeout of a node: `spec.drain.timeout` or the policy default.
pub fn drain_timeout(
    spec: &crate::api::NixOSNodeSpec,
    policy: &Policy,
) -> Result<SignedDuration, ParseDurationError> {
    match spec.drain.as_ref().and_then(|d| d.timeout.as_deref()) {
        Some(s) => parse_duration(s),
        None => Ok(policy.timeouts.draining),
    }
}

/// `crate::api::short_revision`, without a char iterator for the (always ASCII) hex case.
fn short_rev(revision: &str) -> String {
    match revision.get(..8) {
        Some(s) if revision.is_ascii() => s.to_string(),
        _ => crate::api::short_revision(revision),
    }
}

/// Longest `status.message` / failure message kept.
pub const MESSAGE_LIMIT: usize = 512;

/// One human line: whitespace runs (newlines from host errors) collapsed, bounded length.
fn one_line(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() <= MESSAGE_LIMIT && !b.contains(&b'\n') && !b.contains(&b'\r') && !b.contains(&b'\t') {
        return s.to_string();
    }
    let mut out = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > MESSAGE_LIMIT {
        let mut cut = MESSAGE_LIMIT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// A slot granted for the current drain (not one kept from an earlier failed attempt).
fn is_fresh(slot: &Slot) -> bool {
    slot.drain_started_at.as_ref() == Some(&slot.granted_at)
}

fn add(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.saturating_add(d).unwrap_or(t)
}

fn fmt_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

struct Ctx<'v, 'a> {
    view: &'v NodeView<'a>,
    agent: Option<&'a AgentStatus>,
    policy: &'v Policy,
    now: Timestamp,
    st: NixOSNodeStatus,
    actions: Vec<Action>,
    notes: Vec<Note>,
    requeue: Option<SignedDuration>,
    /// Reason of the Progressing / Degraded condition for the current phase.
    reason: String,
    invalid_spec: Option<String>,
    /// The parsed maintenance windows (empty = always open).
    windows: Vec<window::Window>,
    /// The rows of the state table taken, in order.
    rows: Vec<Row>,
}

pub(super) fn decide(
    view: &NodeView<'_>,
    admitted: bool,
    drain: Option<&DrainProgress>,
    policy: &Policy,
    now: Timestamp,
) -> Decision {
    let mut st = view.status.clone();
    st.agent = None;
    let spec_changed = view
        .status
        .observed_generation
        .is_some_and(|g| g != view.generation);
    let retried = view.retry_token.is_some() && view.retry_token != st.retry_token.as_deref();
    if let Some(t) = view.retry_token {
        st.retry_token = Some(t.to_string());
    }
    st.observed_generation = Some(view.generation);
    st.wanted = Some(short_rev(&view.spec.revision));
    st.running = st.revision.as_deref().map(short_rev);

    let mut c = Ctx {
        view,
        agent: view.status.agent.as_ref(),
        policy,
        now,
        st,
        actions: Vec::new(),
        notes: Vec::new(),
        requeue: None,
        reason: String::new(),
        invalid_spec: None,
        windows: Vec::new(),
        rows: Vec::new(),
    };
    if !view.spec.maintenance_windows.is_empty() {
        match window::parse_all(&view.spec.maintenance_windows) {
            Ok(w) => c.windows = w,
            Err(e) => c.invalid_spec = Some(e.to_string()),
        }
    }
    if c.invalid_spec.is_none()
        && let Err(e) = drain_timeout(view.spec, policy)
    {
        c.invalid_spec = Some(e.to_string());
    }

    if !view.node.exists {
        c.took(Row::NodeMissing);
        c.reason = reason::NODE_MISSING.into();
        c.st.message = Some(format!(
            "Node {} does not exist; nothing disruptive happens until it does",
            view.name
        ));
        if c.st.phase.is_none() {
            c.enter(
                Phase::Staging,
                reason::NODE_MISSING,
                c.st.message.clone().unwrap_or_default(),
            );
        }
        return c.finish();
    }

    for _ in 0..8 {
        let again = match c.st.phase {
            None | Some(Phase::UpToDate) => c.up_to_date(),
            Some(Phase::Staging) => c.staging(),
            Some(Phase::Waiting) => c.waiting(admitted),
            Some(Phase::Draining) => c.draining(drain),
            Some(Phase::Activating) => c.activating(),
            Some(Phase::Rebooting) => c.rebooting(),
            Some(Phase::Verifying) => c.verifying(),
            Some(Phase::Degraded) => {
                // The failed (revision, system) is not retried until the spec asks for a
                // different target or the user sets a new retry token. Other spec edits
                // (suspend, windows, drain policy) do not retry.
                // A followed source that offers a new commit (the spec itself unchanged) asks
                // for a different target just as a spec edit would.
                let new_commit =
                    c.st.failed
                        .as_ref()
                        .is_some_and(|f| f.revision != view.spec.revision);
                let resumed = if retried {
                    Some(Row::RetryRequested)
                } else if (spec_changed || new_commit) && !c.target_is_wanted() {
                    Some(Row::NewTarget)
                } else {
                    None
                };
                c.degraded(resumed)
            }
        };
        if !again {
            break;
        }
    }
    c.finish()
}

impl Ctx<'_, '_> {
    fn rev8(&self) -> String {
        short_rev(&self.view.spec.revision)
    }

    fn wanted_installable(&self) -> String {
        installable(
            &self.view.spec.flake,
            &self.view.spec.revision,
            self.view.spec.configuration_for(self.view.name),
        )
    }

    fn target_is_wanted(&self) -> bool {
        self.st.target.as_ref().is_some_and(|t| {
            t.revision == self.view.spec.revision && t.installable == self.wanted_installable()
        })
    }

    fn since(&self) -> Timestamp {
        self.st
            .last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(self.now)
    }

    fn wake_at(&mut self, t: Timestamp) {
        let d = t.duration_since(self.now).max(SignedDuration::from_secs(1));
        self.requeue = Some(self.requeue.map_or(d, |r| r.min(d)));
    }

    fn wake_in(&mut self, d: SignedDuration) {
        self.wake_at(add(self.now, d));
    }

    fn took(&mut self, row: Row) {
        self.rows.push(row);
    }

    fn note(&mut self, reason: &str, message: String, warning: bool) {
        self.notes.push(Note {
            reason: reason.to_string(),
            message,
            warning,
        });
    }

    fn enter(&mut self, phase: Phase, reason: &str, message: String) {
        if self.st.phase != Some(phase) {
            self.st.last_transition_time = Some(Time(self.now));
        }
        self.st.phase = Some(phase);
        self.reason = reason.to_string();
        self.st.message = Some(one_line(&message));
    }

    fn push_history(&mut self, entry: HistoryEntry) {
        self.st.history.insert(0, entry);
        self.st.history.truncate(HISTORY_LIMIT);
    }

    fn staged(&self) -> Option<&crate::api::StagedSystem> {
        let t = self.st.target.as_ref()?;
        self.agent
            .and_then(|a| a.staged.as_ref())
            .filter(|s| s.revision == t.revision && s.installable == t.installable)
    }

    fn report(&self) -> Option<&ActivationReport> {
        let g = self.st.activation.as_ref()?;
        self.agent
            .and_then(|a| a.activation.as_ref())
            .filter(|r| r.id == g.id)
    }

    /// What the agent reports missing of `spec.secrets` (names only), if anything: nothing is
    /// admitted or activated until the files are on the host.
    fn secrets_missing(&self) -> Option<String> {
        secrets_missing_message(self.agent)
    }

    fn target_system(&self) -> Option<String> {
        self.st.target.as_ref().and_then(|t| t.system.clone())
    }

    // ---- transitions -----------------------------------------------------------------------

    fn start_staging(&mut self) {
        let installable = self.wanted_installable();
        self.st.target = Some(Target {
            revision: self.view.spec.revision.clone(),
            installable: installable.clone(),
            system: None,
        });
        self.st.activation = None;
        self.st.backoff = None;
        let msg = format!("staging {} ({installable})", self.rev8());
        self.enter(Phase::Staging, reason::STAGING, msg);
    }

    fn fail(&mut self, why: &str, message: String) {
        let revision = self
            .st
            .target
            .as_ref()
            .map(|t| t.revision.clone())
            .unwrap_or_else(|| self.view.spec.revision.clone());
        let system = self.target_system();
        let started = self
            .st
            .slot
            .as_ref()
            .map(|s| s.granted_at.0)
            .unwrap_or_else(|| self.since());
        let message = one_line(&message);
        self.st.failed = Some(FailedTarget {
            revision: revision.clone(),
            system: system.clone(),
            reason: why.to_string(),
            message: message.clone(),
            at: Time(self.now),
        });
        self.push_history(HistoryEntry {
            revision,
            system,
            result: "Failed".into(),
            started_at: Time(started),
            finished_at: Time(self.now),
            rebooted: false,
            message: Some(message.clone()),
        });
        let keeps = if self.st.slot.is_some() {
            "; the node stays cordoned and holds its slot"
        } else {
            ""
        };
        let msg = format!("{why}: {message}{keeps}");
        self.note(why, msg.clone(), true);
        self.enter(Phase::Degraded, why, msg);
    }

    /// Verified success: record what runs, uncordon if nixroll cordoned.
    fn succeed(&mut self, rebooted: bool, how: &str) {
        let Some(target) = self.st.target.take() else {
            return;
        };
        let started = self
            .st
            .slot
            .as_ref()
            .map(|s| s.granted_at.0)
            .unwrap_or_else(|| self.since());
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
    fn release_slot(&mut self) {
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

    fn up_to_date(&mut self) -> bool {
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

    fn staging(&mut self) -> bool {
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
        let deadline = add(since, self.policy.timeouts.staging);
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

    fn waiting(&mut self, admitted: bool) -> bool {
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
            self.reason = reason::WAITING_FOR_SLOT.into();
            self.st.message = Some(format!("staged {}{holds}; waiting for a slot", self.rev8()));
            return false;
        }
        self.start_drain();
        false
    }

    fn start_drain(&mut self) {
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

    fn draining(&mut self, drain: Option<&DrainProgress>) -> bool {
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

    fn abort_drain(&mut self, slot: &Slot, p: &DrainProgress, timeout: SignedDuration) {
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

    /// Grant an activation (a new id every time).
    fn grant(&mut self, force_action: Option<ActivationAction>) {
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

    fn boot_changed(&self, g: &ActivationGrant) -> bool {
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
    fn agent_booted_again(&self, g: &ActivationGrant) -> bool {
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
    fn keep_cordoned(&mut self) {
        if !self.view.node.unschedulable && !self.actions.contains(&Action::Cordon) {
            self.actions.push(Action::Cordon);
            if let Some(s) = self.st.slot.as_mut() {
                s.cordoned_by_nixroll = true;
            }
        }
    }

    fn activating(&mut self) -> bool {
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
            Some((ActivationState::Running, _)) | None => {
                let deadline = add(g.granted_at.0, self.policy.timeouts.activating);
                if self.now >= deadline {
                    self.took(Row::ActivationTimeout);
                    self.fail(
                        reason::ACTIVATION_TIMEOUT,
                        format!(
                            "activation {} did not finish within {}",
                            g.id, self.policy.timeouts.activating
                        ),
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

    fn rebooting(&mut self) -> bool {
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

    fn verifying(&mut self) -> bool {
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

    fn degraded(&mut self, resumed: Option<Row>) -> bool {
        if let Some(row) = resumed {
            self.took(row);
            let what = self
                .st
                .failed
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_default();
            self.st.failed = None;
            self.note(
                reason::RETRY,
                format!(
                    "retrying after {what} (new target in the spec or a new {} value)",
                    crate::names::RETRY_ANNOTATION
                ),
                false,
            );
            self.start_staging();
            return true;
        }
        self.took(Row::DegradedHeld);
        self.reason = self
            .st
            .failed
            .as_ref()
            .map(|f| f.reason.clone())
            .unwrap_or_else(|| "Failed".into());
        false
    }

    // ---- conditions ------------------------------------------------------------------------

    fn finish(mut self) -> Decision {
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
        if pending {
            let m = format!(
                "reboot: Never; the node must be rebooted by a person to boot {}",
                self.st.system.as_deref().unwrap_or("?")
            );
            let had = self
                .st
                .conditions
                .iter()
                .any(|c| c.type_ == condition::REBOOT_REQUIRED && c.status == "True");
            if !had {
                self.notes.push(Note {
                    reason: reason::REBOOT_REQUIRED.into(),
                    message: m.clone(),
                    warning: true,
                });
            }
            set_condition(
                &mut self.st.conditions,
                condition::REBOOT_REQUIRED,
                true,
                reason::REBOOT_POLICY_NEVER,
                &m,
                now,
                generation,
            );
        } else if self
            .st
            .conditions
            .iter()
            .any(|c| c.type_ == condition::REBOOT_REQUIRED)
        {
            set_condition(
                &mut self.st.conditions,
                condition::REBOOT_REQUIRED,
                false,
                reason::NOT_REQUIRED,
                "the node boots the system it runs",
                now,
                generation,
            );
        }
        // SecretsMissing: set while the agent reports secret files it cannot write.
        match secrets_missing_message(self.agent) {
            Some(m) => {
                let had = self
                    .st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == condition::SECRETS_MISSING && c.status == "True");
                if !had {
                    self.notes.push(Note {
                        reason: reason::SECRETS_MISSING.into(),
                        message: format!("{m}; nothing is activated until they are written"),
                        warning: true,
                    });
                }
                set_condition(
                    &mut self.st.conditions,
                    condition::SECRETS_MISSING,
                    true,
                    reason::SECRETS_MISSING,
                    &m,
                    now,
                    generation,
                )
            }
            None if self
                .st
                .conditions
                .iter()
                .any(|c| c.type_ == condition::SECRETS_MISSING) =>
            {
                set_condition(
                    &mut self.st.conditions,
                    condition::SECRETS_MISSING,
                    false,
                    reason::SECRETS_PRESENT,
                    "every secret file of spec.secrets is on the host",
                    now,
                    generation,
                )
            }
            None => {}
        }
        self.st.agent = None;
        Decision {
            status: self.st,
            actions: self.actions,
            notes: self.notes,
            requeue_after: self.requeue,
            rows: self.rows,
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

fn set_condition(
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
