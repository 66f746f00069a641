//! A FlakeSource's next status from what one resolution found (pure), and the Events a status
//! change deserves.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::refspec::ResolvedRef;
use super::resolve::Poll;
use super::revision::Revision;
use super::url::SourceUrl;
use super::verify::VerifyError;
use crate::api::{FlakeSourceSpec, FlakeSourceStatus, source_condition};
use crate::controller::events::Note;

/// The last accepted revision, if the status describes the same URL and ref as the spec (a
/// changed URL or ref starts afresh: the ancestry check compares commits of one ref only).
pub fn last_accepted(st: &FlakeSourceStatus, url: &SourceUrl, spec: &FlakeSourceSpec) -> Option<ResolvedRef> {
    if st.url.as_deref() != Some(url.redacted().as_str())
        || st.git_ref.as_deref() != Some(spec.git_ref.display().as_str())
    {
        return None;
    }
    let revision = Revision::parse(st.revision.as_deref()?).ok()?;
    Some(ResolvedRef {
        full_name: st.full_ref.clone()?,
        revision,
    })
}

/// What one reconcile found.
#[derive(Debug)]
pub enum Outcome {
    Polled(Poll),
    /// `spec.verify` is set and the head's signatures verified (`signers`: who signed what).
    Verified {
        poll: Poll,
        signers: Vec<String>,
    },
    /// `spec.verify` is set and the head (`refused`) is not signed by a trusted key: `what`
    /// (its commit or tag) and why. `kept` stays.
    Unverified {
        kept: Option<ResolvedRef>,
        refused: ResolvedRef,
        what: String,
        error: VerifyError,
    },
    /// The spec or the Secret cannot be used; nothing was fetched.
    Refused {
        reason: &'static str,
        message: String,
    },
    Suspended,
}

/// The next status (pure). `kept` decides what stays when nothing new was accepted.
pub fn next_status(
    prev: &FlakeSourceStatus,
    spec: &FlakeSourceSpec,
    generation: Option<i64>,
    url: Option<&SourceUrl>,
    outcome: &Outcome,
    now: Timestamp,
) -> FlakeSourceStatus {
    let mut st = FlakeSourceStatus {
        observed_generation: generation,
        url: url.map(SourceUrl::redacted).or_else(|| prev.url.clone()),
        git_ref: Some(spec.git_ref.display()),
        ..FlakeSourceStatus::default()
    };
    let same = url.is_some_and(|u| last_accepted(prev, u, spec).is_some());
    let keep = |st: &mut FlakeSourceStatus| {
        if same {
            st.full_ref = prev.full_ref.clone();
            st.revision = prev.revision.clone();
            st.commit = prev.commit.clone();
        }
    };
    let accept = |st: &mut FlakeSourceStatus, r: &ResolvedRef| {
        st.full_ref = Some(r.full_name.clone());
        st.revision = Some(r.revision.flux_display());
        st.commit = Some(r.revision.commit.to_string());
    };
    let mut conds: Vec<(&str, &str, String, String)> = Vec::new();
    let ready = source_condition::READY;
    match outcome {
        Outcome::Suspended => {
            keep(&mut st);
            st.last_fetch_time = prev.last_fetch_time.clone();
            conds.push((
                ready,
                "False",
                "Suspended".into(),
                "spec.suspend is set; the last revision stays".into(),
            ));
        }
        Outcome::Refused { reason, message } => {
            keep(&mut st);
            st.last_fetch_time = prev.last_fetch_time.clone();
            conds.push((ready, "False", (*reason).into(), message.clone()));
            conds.push((
                source_condition::FETCH_FAILED,
                "True",
                (*reason).into(),
                message.clone(),
            ));
        }
        Outcome::Unverified {
            kept,
            refused,
            what,
            error,
        } => {
            st.last_fetch_time = Some(Time(now));
            match kept {
                Some(k) if same => accept(&mut st, k),
                _ => {}
            }
            st.refused_revision = Some(refused.revision.flux_display());
            let m = format!(
                "{what} ({}) is not followed: {error}",
                refused.revision.flux_display()
            );
            let m = match &st.revision {
                Some(r) => format!("{m}; the last revision {r} stays"),
                None => m,
            };
            conds.push((ready, "False", "VerificationFailed".into(), m.clone()));
            conds.push((
                source_condition::SOURCE_VERIFIED,
                "False",
                "VerificationFailed".into(),
                m,
            ));
        }
        Outcome::Polled(poll) | Outcome::Verified { poll, .. } => {
            st.last_fetch_time = Some(Time(now));
            match poll {
                Poll::Unchanged(r) | Poll::Advanced(r) => {
                    accept(&mut st, r);
                    conds.push((
                        ready,
                        "True",
                        "Succeeded".into(),
                        format!("revision {}", r.revision.flux_display()),
                    ));
                }
                Poll::NonFastForward { kept, refused } => {
                    accept(&mut st, kept);
                    st.refused_revision = Some(refused.revision.flux_display());
                    let m = format!(
                        "the head {} does not descend from {}: not followed (set allowNonFastForward: true to follow it)",
                        refused.revision.flux_display(),
                        kept.revision.flux_display()
                    );
                    conds.push((ready, "False", "NonFastForward".into(), m.clone()));
                    conds.push((
                        source_condition::NON_FAST_FORWARD,
                        "True",
                        "NonFastForward".into(),
                        m,
                    ));
                }
                Poll::Failed { kept, error } => {
                    match kept {
                        Some(k) if same => accept(&mut st, k),
                        _ => {}
                    }
                    let m: String = error.to_string().chars().take(1000).collect();
                    let m = match &st.revision {
                        Some(r) => format!("{m}; the last revision {r} stays"),
                        None => m,
                    };
                    conds.push((ready, "False", error.reason().into(), m.clone()));
                    conds.push((source_condition::FETCH_FAILED, "True", error.reason().into(), m));
                }
            }
            if let Outcome::Verified { signers, .. } = outcome {
                conds.push((
                    source_condition::SOURCE_VERIFIED,
                    "True",
                    "Succeeded".into(),
                    signers.join("; "),
                ));
            }
        }
    }
    st.conditions = conds
        .into_iter()
        .map(|(t, status, reason, message)| {
            let since = prev
                .conditions
                .iter()
                .find(|c| c.type_ == t && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: t.to_owned(),
                status: status.to_owned(),
                reason,
                message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    st
}

/// The Events a status change deserves: `NewRevision` when the accepted revision changes; a
/// Warning named after `Ready`'s reason when it turns False for a new reason (`Timeout`,
/// `AuthenticationFailed`, `NonFastForward`, `SecretNotFound`, …; `Suspended` is Normal); and
/// `Succeeded` when `Ready` turns True again without a new revision. Notes are the status's own
/// messages, which never carry credentials.
pub fn status_notes<'a>(prev: &FlakeSourceStatus, next: &'a FlakeSourceStatus) -> Vec<Note<'a>> {
    fn ready(st: &FlakeSourceStatus) -> Option<&Condition> {
        st.conditions.iter().find(|c| c.type_ == source_condition::READY)
    }
    let (was, now) = (ready(prev), ready(next));
    let mut notes = Vec::new();
    let new_revision = next.revision.is_some() && next.revision != prev.revision;
    if let Some(r) = next.revision.as_deref().filter(|_| new_revision) {
        notes.push(Note {
            reason: "NewRevision",
            action: "Fetch",
            note: match prev.revision.as_deref() {
                Some(old) => format!("revision {r} accepted (was {old})"),
                None => format!("revision {r} accepted"),
            },
            warning: false,
        });
    }
    if let Some(c) = now {
        let changed = was.is_none_or(|w| w.status != c.status || w.reason != c.reason);
        if c.status == "False" && changed {
            notes.push(Note {
                reason: &c.reason,
                action: "Fetch",
                note: c.message.clone(),
                warning: c.reason != "Suspended",
            });
        } else if c.status == "True" && was.is_some_and(|w| w.status == "False") && !new_revision {
            notes.push(Note {
                reason: &c.reason,
                action: "Fetch",
                note: format!("{} again", c.message),
                warning: false,
            });
        }
    }
    notes
}
