//! Failure: a failed target makes the node Degraded (the slot and the cordon kept, the failure
//! recorded in `status.failed` and the history), which holds the rollout until the spec wants
//! another target or a new retry token is set.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Ctx, one_line};
use crate::api::{FailedTarget, HistoryEntry, Phase};
use crate::rollout::{Row, reason};

impl Ctx<'_, '_> {
    pub(super) fn fail(&mut self, why: &str, message: String) {
        let revision = self
            .st
            .target
            .as_ref()
            .map(|t| t.revision.clone())
            .unwrap_or_else(|| self.view.spec.revision.clone());
        let system = self.target_system();
        let started = self.attempt_started();
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

    pub(super) fn degraded(&mut self, resumed: Option<Row>) -> bool {
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
}
