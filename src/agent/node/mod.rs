//! The agent's host logic, independent of Kubernetes: given what the controller wants
//! (`status.target`, `status.activation`), stage and activate on the [`Host`] with [`Nix`],
//! persist progress in [`state`], and compute the facts to report
//! ([`AgentStatus`]). The Kubernetes loop in `super` only feeds it and writes its output.
//!
//! [`NodeAgent`] is one type whose methods live in one file per concern:
//!
//! * `mod.rs` (here): the type, its options, errors and test hooks, the state file, and
//!   [`NodeAgent::reconcile`], the one pass that decides what to do next.
//! * `staging.rs`: building the target (`nix build` to a GC root), the staged record and the
//!   retry backoff of a failed build.
//! * `reboot_reasons.rs`: whether a staged system needs a reboot (components compared with
//!   the booted and the running system).
//! * `activation.rs`: a granted activation as a persisted state machine (profile, switch,
//!   outcome), resumed after a restart.
//! * `switch.rs`: running `switch-to-configuration` as a detached job: other activators, the
//!   launch wrapper, following its unit, its result and log files.
//! * `reboot.rs`: requesting the reboot, after the report saying so is stored.
//! * `facts.rs`: reading the host's facts (boot id, systems, profile, configuration revision).
//! * `report.rs`: the facts to report and publishing them to the status writer.
//! * `secret_files.rs`: the secret files of `spec.secrets` on the host.
//! * `tests.rs`: unit tests of the above.

mod activation;
mod facts;
mod reboot;
mod reboot_reasons;
mod report;
mod secret_files;
mod staging;
mod switch;
#[cfg(test)]
mod tests;

pub use reboot_reasons::{REBOOT_COMPONENTS, SWITCH_INHIBITORS, SYSTEMD_COMPONENT, reboot_reasons};
pub use report::activation_report;
pub(in crate::agent) use report::send_report;
pub use switch::{ACTIVATION_WRAPPER, SWITCH_LOCK};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::host::Host;
use super::secrets::WriteCrash;
use super::state::{self, HostState, STATE_FILE, StateError, Step};
use crate::api::{
    ActivationAction, ActivationGrant, AgentStatus, HostError as ReportedError, HostOperation, MissingSecret,
    Target,
};
use crate::nix::Nix;
use staging::FailedStage;

/// Test hook: stop ("crash") at this point of an activation, as if the agent died there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Record written, profile not yet set.
    BeforeProfileSet,
    /// Profile set and recorded, `switch-to-configuration` not yet launched.
    AfterProfileSet,
    /// `switch-to-configuration` finished, its exit status not yet recorded.
    AfterSwitch,
    /// `RebootIssued` recorded, reboot not yet requested.
    BeforeReboot,
    /// Reboot requested, nothing reported yet.
    AfterReboot,
    /// The old default restored (`Boot` with boot-once), the one-shot entry not yet set.
    AfterKeepDefault,
}

/// Tunables of the host logic.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// How long to wait for `switch-to-configuration`'s result file.
    pub activation_timeout: Duration,
    /// How often to look for that file while waiting.
    pub result_poll: Duration,
    /// Longest wait, before rebooting, for the writer to acknowledge that `RebootRequested`
    /// is stored in the API (only with a progress channel). The reboot waits for the
    /// acknowledgement, not for this long; the bound only keeps an API outage from holding
    /// the grant forever (the new boot id proves the reboot anyway).
    pub report_timeout: Duration,
    /// First wait before staging a failed target again; doubles per attempt.
    pub stage_retry: Duration,
    /// Longest wait between staging attempts.
    pub stage_retry_max: Duration,
    /// Count a changed `systemd` as a reboot reason (off: `switch` re-executes systemd).
    pub systemd_needs_reboot: bool,
    /// Caches and trusted keys for targets a builder built (`status.target.build`).
    pub substitution: crate::nix::Substitution,
    /// Never boot a new system once: make it the default before the reboot (the behaviour
    /// before boot-once; for hosts whose bootloader cannot boot once reliably).
    pub no_boot_once: bool,
    /// How many staged systems stay pinned (GC roots), the current target included: a revert
    /// to one of them is staged without evaluation or build. At least 1.
    pub keep_staged: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            activation_timeout: Duration::from_secs(15 * 60),
            result_poll: Duration::from_millis(250),
            report_timeout: Duration::from_secs(10),
            stage_retry: Duration::from_secs(60),
            stage_retry_max: Duration::from_secs(30 * 60),
            systemd_needs_reboot: false,
            substitution: crate::nix::Substitution::default(),
            no_boot_once: false,
            keep_staged: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    State(#[from] StateError),
    /// Only with a [`CrashPoint`] set (tests).
    #[error("simulated crash at {0:?}")]
    Crashed(CrashPoint),
    /// Only with [`NodeAgent::crash_secret_write`] (tests).
    #[error("simulated crash while writing a secret file")]
    SecretWriteCrashed,
}

/// `(current system, its configurationRevision)`, shared with the background lookup.
type RevisionCache = Arc<std::sync::Mutex<Option<(String, Option<String>)>>>;

/// Host logic of one node. Holds no state that matters across restarts (that lives in the
/// state file); a new `NodeAgent` over the same host continues where the last one stopped.
#[derive(Debug)]
pub struct NodeAgent {
    host: Arc<dyn Host>,
    nix: Arc<dyn Nix>,
    options: HostOptions,
    crash_at: Option<CrashPoint>,
    /// The target whose staging failed in this process; retried with backoff (a flaky
    /// network or a retry the user asked for), immediately when the target changes.
    failed_stage: Option<FailedStage>,
    /// Where to publish the facts before long or final steps (switch running, reboot).
    progress: Option<tokio::sync::watch::Sender<Option<AgentStatus>>>,
    /// What the writer has stored in the API (the last acknowledged report).
    acked: Option<tokio::sync::watch::Receiver<Option<AgentStatus>>>,
    /// `configurationRevision` of a current system: (system, revision), computed once per
    /// system, in the background (a slow `nixos-version` must not delay any report).
    revision_cache: RevisionCache,
    /// The current system whose `nixos-version --json` runs in the background.
    revision_pending: Option<String>,
    /// Secret files of the spec that are not on the host as asked (reported; block activation).
    secrets_missing: Vec<MissingSecret>,
    /// Stale temporary files of secret writes were removed (once per process).
    secrets_swept: bool,
    /// Test hook: make the next secret write stop halfway.
    secret_crash: Option<WriteCrash>,
}

impl NodeAgent {
    pub fn new(host: Arc<dyn Host>, nix: Arc<dyn Nix>, options: HostOptions) -> Self {
        NodeAgent {
            host,
            nix,
            options,
            crash_at: None,
            failed_stage: None,
            progress: None,
            acked: None,
            revision_cache: Arc::default(),
            revision_pending: None,
            secrets_missing: Vec::new(),
            secrets_swept: false,
            secret_crash: None,
        }
    }

    /// Test hook: fail with [`NodeError::Crashed`] when the activation reaches `point`.
    pub fn crash_at(mut self, point: CrashPoint) -> Self {
        self.crash_at = Some(point);
        self
    }

    pub fn host(&self) -> &Arc<dyn Host> {
        &self.host
    }

    fn crash(&self, point: CrashPoint) -> Result<(), NodeError> {
        if self.crash_at == Some(point) {
            return Err(NodeError::Crashed(point));
        }
        Ok(())
    }

    fn state_path(&self) -> PathBuf {
        self.host.fs_path(Path::new(STATE_FILE))
    }

    fn load(&self) -> Result<HostState, NodeError> {
        Ok(state::load(&self.state_path())?)
    }

    fn save(&self, s: &HostState) -> Result<(), NodeError> {
        Ok(state::save(&self.state_path(), s)?)
    }

    /// One pass: finish or start the activation the controller granted, stage the target,
    /// then return the facts to report.
    pub async fn reconcile(
        &mut self,
        target: Option<&Target>,
        grant: Option<&ActivationGrant>,
    ) -> Result<AgentStatus, NodeError> {
        let mut st = self.load()?;
        // An unfinished activation (agent restarted mid-way) is resumed, never restarted.
        if st.activation.as_ref().is_some_and(|r| r.step != Step::Finished) {
            self.drive_activation(&mut st).await?;
        }
        if let Some(g) = grant {
            let known = st.activation.as_ref().is_some_and(|r| r.id == g.id);
            let boot_id = self.boot_id();
            let stale = matches!((&g.boot_id_before, &boot_id), (Some(b), Some(c)) if b != c);
            if !known && stale {
                // Granted before the last reboot and never recorded here (state lost?): acting
                // now could repeat a finished activation or reboot. Report, do nothing.
                let message = format!(
                    "activation {} was granted before the last reboot (boot id {}, now {}); not executed",
                    g.id,
                    g.boot_id_before.as_deref().unwrap_or_default(),
                    boot_id.as_deref().unwrap_or_default()
                );
                if st.last_error.as_ref().map(|e| &e.message) != Some(&message) {
                    tracing::warn!(id = %g.id, "{message}");
                    st.last_error = Some(ReportedError {
                        operation: HostOperation::Activate,
                        revision: None,
                        message,
                        at: Time(now()),
                    });
                    self.save(&st)?;
                }
            } else if !known
                && self.secrets_blocked()
                && !matches!(g.action, ActivationAction::Rollback | ActivationAction::Bless)
            {
                // Never activate a system whose secret files are missing (the controller does
                // not grant then; this covers a Secret deleted right after the grant).
                tracing::warn!(id = %g.id, "activation waits: secret files are missing on the host");
            } else if !known {
                self.start_activation(&mut st, g)?;
                self.drive_activation(&mut st).await?;
            }
        }
        if let Some(t) = target
            && self.needs_staging(&st, t)
        {
            self.stage(&mut st, t).await?;
        }
        self.refresh_reboot_reasons(&mut st)?;
        self.refresh_configuration_revision();
        Ok(self.observe_with(&st))
    }
}

fn read_bounded(path: &Path, max: u64) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    f.take(max).read_to_string(&mut s).ok()?;
    Some(s)
}

/// `[A-Za-z0-9_-]`, at most 64 characters (file and systemd unit names).
pub fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// Now, truncated to whole seconds: Kubernetes `Time` has second precision, so reported
/// timestamps compare equal after a round trip through the API server.
fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}
