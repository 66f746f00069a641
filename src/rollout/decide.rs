//! The per-node state machine behind [`super::decide`]. See `docs/rollout.md` for the table;
//! each row's identifier is a [`Row`] that the step taking it records.
//!
//! [`decide`] builds one [`Ctx`] (the status being written, the effects, the notes, the rows
//! taken) and runs the handler of the node's phase until one settles. The handlers live by
//! phase:
//!
//! | file | phases, and what they do |
//! | --- | --- |
//! | `decide.rs` | the entry, the loop over phases, the shared helpers, `spec.drain.timeout` parsing |
//! | `staging.rs` | UpToDate, Staging, Waiting: a new revision, staging, waiting for a slot, admission |
//! | `draining.rs` | Draining: eviction passes, the drain timeout (Abort with backoff, or Force) |
//! | `activation.rs` | Activating, Rebooting: the activation grant, the agent's report, the new boot |
//! | `verification.rs` | Verifying: booted system, Ready; success, then the uncordon and the slot's release |
//! | `failure.rs` | Degraded: failing a target, and resuming on a new target or retry token |
//! | `conditions.rs` | the conditions written from the outcome (UpToDate, Progressing, Degraded, …) |

mod activation;
mod conditions;
pub(crate) use conditions::set_condition;
mod draining;
mod failure;
mod staging;
mod verification;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Action, Decision, DrainProgress, NodeView, Note, Policy, Row, reason, window};
use crate::api::{ActivationReport, AgentStatus, HistoryEntry, NixOSNodeStatus, Phase, Slot, installable};
use conditions::secrets_missing_message;

pub use conditions::{condition, invalid_spec_status};

/// How many history entries are kept (newest first).
pub const HISTORY_LIMIT: usize = 10;
/// How often to look again while pods are being evicted.
pub const DRAIN_PASS_INTERVAL: SignedDuration = SignedDuration::from_secs(5);
/// How soon to look again after asking for an uncordon that has not been observed yet.
pub const UNCORDON_RECHECK: SignedDuration = SignedDuration::from_secs(2);
/// How soon to look again while a verified node waits for its post-gates (their verdicts
/// change without a change of the NixOSNode or its Node).
pub const POST_GATE_RECHECK: SignedDuration = SignedDuration::from_secs(5);
/// Upper bound of the drain backoff multiplier (2^6 × `drain_backoff`).
pub const MAX_BACKOFF_DOUBLINGS: u32 = 6;

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

    /// When this attempt started, for its history entry: the slot's grant (a disruptive
    /// attempt), else the current phase's start.
    fn attempt_started(&self) -> Timestamp {
        self.st
            .slot
            .as_ref()
            .map(|s| s.granted_at.0)
            .unwrap_or_else(|| self.since())
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
}
