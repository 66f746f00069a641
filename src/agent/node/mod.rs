//! The agent's host logic, independent of Kubernetes: given what the controller wants
//! (`status.target`, `status.activation`), stage and activate on the [`Host`] with [`Nix`],
//! persist progress in [`state`](super::state), and compute the facts to report
//! ([`AgentStatus`]). The Kubernetes loop in `super` only feeds it and writes its output.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::host::{DetachedJob, Host, HostCommand, JobState, resolve};
use super::secrets::{self, Fetched, SecretFileError, SecretsView, WriteCrash};
use super::state::{
    self, ACTIVATION_DIR, ActivationRecord, GCROOTS_DIR, HostState, STATE_FILE, StagedRecord, StateError,
    Step,
};
use crate::api::{
    ActivationAction, ActivationGrant, ActivationReport, ActivationState, AgentStatus,
    HostError as ReportedError, HostOperation, MissingSecret, SECRET_MAX_BYTES, SecretFile, SecretFileStatus,
    StagedSystem, Target,
};
use crate::names::SYSTEM_PROFILE;
use crate::nix::Nix;

/// Components of a NixOS toplevel whose change needs a reboot (compared with the booted
/// system). `reboot-triggers` is only compared when both systems have it. `systemd` is not
/// among them: `switch-to-configuration` re-executes PID 1 (`systemctl daemon-reexec`) when
/// systemd changed, and an incompatible one changes `init-interface-version` (exit 100); see
/// [`HostOptions::systemd_needs_reboot`] and docs/agent.md.
pub const REBOOT_COMPONENTS: [&str; 6] = [
    "kernel",
    "initrd",
    "kernel-modules",
    "kernel-params",
    "firmware",
    "init-interface-version",
];

/// Counted as a reboot reason only with [`HostOptions::systemd_needs_reboot`].
pub const SYSTEMD_COMPONENT: &str = "systemd";

/// The reboot reason given when `switch-inhibitors` of the running and the new system differ:
/// NixOS refuses `switch` then ("You probably want to run nixos-rebuild boot").
pub const SWITCH_INHIBITORS: &str = "switch-inhibitors";

/// NixOS's activation lock (`switch-to-configuration` holds it while it runs).
pub const SWITCH_LOCK: &str = "/run/nixos/switch-to-configuration.lock";

/// How often a running activation's unit is asked about.
const UNIT_CHECK: Duration = Duration::from_secs(5);

/// How often other activators are looked for while waiting for them to end.
const ACTIVATOR_POLL: Duration = Duration::from_secs(1);

/// How many times an activation that lost the race for [`SWITCH_LOCK`] is tried again.
const LOCK_RETRIES: u32 = 3;

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
}

#[derive(Clone, Debug)]
struct FailedStage {
    revision: String,
    installable: String,
    attempts: u32,
    retry_at: tokio::time::Instant,
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
        }
    }
}

/// Why one secret file was not written: a problem of that file (reported), or of the host
/// state (fatal, as everywhere else).
enum SecretWrite {
    File(SecretFileError),
    Host(NodeError),
}

impl From<SecretFileError> for SecretWrite {
    fn from(e: SecretFileError) -> Self {
        SecretWrite::File(e)
    }
}

impl From<NodeError> for SecretWrite {
    fn from(e: NodeError) -> Self {
        SecretWrite::Host(e)
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

    /// Test hook: the next secret file write stops halfway, as if the agent were killed.
    pub fn crash_secret_write(mut self, crash: WriteCrash) -> Self {
        self.secret_crash = Some(crash);
        self
    }

    /// Whether some secret file of the spec is missing on the host (activation waits).
    pub fn secrets_blocked(&self) -> bool {
        !self.secrets_missing.is_empty()
    }

    /// Bring the secret files of the spec onto the host: write each file whose content, mode
    /// or owner differs (atomically; never when nothing changed), remove files nixroll wrote
    /// that left the list, then `systemctl try-restart` the units of the changed files, once.
    /// Problems with one file (Secret or key missing, too large, unknown owner) are reported
    /// in `secretsMissing` and leave the file on the host as it is.
    pub async fn sync_secrets(
        &mut self,
        specs: &[SecretFile],
        fetched: &SecretsView,
    ) -> Result<(), NodeError> {
        let mut st = self.load()?;
        if !self.secrets_swept {
            let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
            for p in specs
                .iter()
                .map(|s| s.path.as_str())
                .chain(st.secrets.iter().map(|s| s.path.as_str()))
            {
                if let Some(d) = self.secret_local_path(p).parent() {
                    dirs.insert(d.to_path_buf());
                }
            }
            for d in dirs {
                let n = secrets::remove_temp_files(&d);
                if n > 0 {
                    tracing::info!(dir = %d.display(), removed = n, "removed temporary files of an interrupted secret write");
                }
            }
            self.secrets_swept = true;
        }
        let mut missing = Vec::new();
        let mut restarts: BTreeSet<String> = st.pending_restarts.iter().cloned().collect();
        for spec in specs {
            match self.write_secret(&mut st, spec, fetched, &mut restarts) {
                Ok(()) => {}
                Err(SecretWrite::Host(e)) => return Err(e),
                Err(SecretWrite::File(e)) => {
                    tracing::warn!(path = %spec.path, secret = %spec.secret_ref, reason = e.reason(), error = %e, "secret file not written");
                    missing.push(MissingSecret {
                        path: spec.path.clone(),
                        secret_ref: spec.secret_ref.clone(),
                        reason: e.reason().to_string(),
                        message: e.to_string(),
                    });
                }
            }
        }
        // Files nixroll wrote that left the list.
        let wanted: BTreeSet<&str> = specs.iter().map(|s| s.path.as_str()).collect();
        let before = st.secrets.len();
        let mut kept = Vec::new();
        for rec in std::mem::take(&mut st.secrets) {
            if wanted.contains(rec.path.as_str()) {
                kept.push(rec);
                continue;
            }
            match std::fs::remove_file(self.secret_local_path(&rec.path)) {
                Ok(()) => tracing::info!(path = %rec.path, "removed a secret file that left spec.secrets"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %rec.path, error = %e, "cannot remove a secret file that left spec.secrets");
                    kept.push(rec);
                }
            }
        }
        st.secrets = kept;
        if st.secrets.len() != before {
            self.save(&st)?;
        }
        if !restarts.is_empty() {
            let units: Vec<String> = restarts.into_iter().collect();
            match self.host.restart_units(units.clone()).await {
                Ok(out) if out.success() => {
                    tracing::info!(?units, "restarted units after their secret files changed");
                }
                Ok(out) => {
                    tracing::warn!(?units, code = ?out.code, stderr = %out.stderr.trim(), "systemctl try-restart failed")
                }
                Err(e) => tracing::warn!(?units, error = %e, "systemctl try-restart failed"),
            }
            // Once per change: a failed restart is logged, not repeated.
            st.pending_restarts.clear();
            self.save(&st)?;
        }
        self.secrets_missing = missing;
        Ok(())
    }

    /// Where the agent writes the host file `path`: its deepest existing ancestor resolved
    /// with the host's symlinks (NixOS links much of `/etc` into the store; seen through a
    /// mount such as `/host`, an absolute link would otherwise point into the agent's own
    /// filesystem), then the rest of the path. The last component is never followed: the
    /// rename replaces a link instead of writing through it.
    fn secret_local_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(name) = p.file_name() {
            rest.push(name);
        }
        let mut dir = p.parent();
        while let Some(d) = dir {
            if let Some(resolved) = resolve(self.host.as_ref(), d) {
                let mut local = self.host.fs_path(&resolved);
                for part in rest.iter().rev() {
                    local.push(part);
                }
                return local;
            }
            if let Some(name) = d.file_name() {
                rest.push(name);
            }
            dir = d.parent();
        }
        self.host.fs_path(p)
    }

    /// Write one secret file if it differs from what the Secret says.
    fn write_secret(
        &self,
        st: &mut HostState,
        spec: &SecretFile,
        fetched: &SecretsView,
        restarts: &mut BTreeSet<String>,
    ) -> Result<(), SecretWrite> {
        let name = &spec.secret_ref.name;
        let key = &spec.secret_ref.key;
        let (rv, bytes) = match fetched.get(name) {
            None | Some(Fetched::Pending) => {
                return Err(SecretFileError::NotRead { name: name.clone() }.into());
            }
            Some(Fetched::NotFound) => {
                return Err(SecretFileError::SecretNotFound { name: name.clone() }.into());
            }
            Some(Fetched::Unreadable(message)) => {
                return Err(SecretFileError::Unreadable {
                    name: name.clone(),
                    message: message.clone(),
                }
                .into());
            }
            Some(Fetched::Found {
                resource_version,
                data,
            }) => match data.get(key) {
                None => {
                    return Err(SecretFileError::KeyNotFound {
                        name: name.clone(),
                        key: key.clone(),
                    }
                    .into());
                }
                Some(b) if b.len() > SECRET_MAX_BYTES => {
                    return Err(SecretFileError::TooLarge {
                        name: name.clone(),
                        key: key.clone(),
                        size: b.len(),
                        max: SECRET_MAX_BYTES,
                    }
                    .into());
                }
                Some(b) => (resource_version, b),
            },
        };
        let mode = secrets::parse_mode(&spec.mode)?;
        let (uid, gid) = secrets::resolve_owner(self.host.as_ref(), &spec.owner)?;
        let local = self.secret_local_path(&spec.path);
        let recorded = st.secrets.iter().position(|r| r.path == spec.path);
        if secrets::is_current(&local, bytes, mode, uid, gid) {
            // Same data (whatever the resourceVersion): nothing to do. A changed source
            // (another Secret with equal content) only updates the record.
            if let Some(i) = recorded
                && st.secrets[i].secret_ref != spec.secret_ref
            {
                st.secrets[i].secret_ref = spec.secret_ref.clone();
                st.secrets[i].resource_version = rv.clone();
                self.save(st)?;
            }
            return Ok(());
        }
        // Intent first: the units restart even if the agent dies right after the rename.
        let before = st.pending_restarts.clone();
        if !spec.restart_units.is_empty() {
            let mut intent: BTreeSet<String> = restarts.clone();
            intent.extend(spec.restart_units.iter().cloned());
            st.pending_restarts = intent.into_iter().collect();
            self.save(st)?;
        }
        if let Err(source) = secrets::write_atomic(&local, bytes, mode, uid, gid, self.secret_crash) {
            if self.secret_crash.is_some() {
                // Test hook: the agent "dies" here, leaving the host as a kill would.
                return Err(NodeError::SecretWriteCrashed.into());
            }
            if st.pending_restarts != before {
                st.pending_restarts = before;
                self.save(st)?;
            }
            return Err(SecretFileError::Write {
                path: PathBuf::from(&spec.path),
                source,
            }
            .into());
        }
        restarts.extend(spec.restart_units.iter().cloned());
        tracing::info!(path = %spec.path, secret = %spec.secret_ref, resource_version = %rv, "wrote secret file");
        let rec = SecretFileStatus {
            path: spec.path.clone(),
            secret_ref: spec.secret_ref.clone(),
            resource_version: rv.clone(),
            written_at: Time(now()),
        };
        match recorded {
            Some(i) => st.secrets[i] = rec,
            None => {
                st.secrets.push(rec);
                st.secrets.sort_by(|a, b| a.path.cmp(&b.path));
            }
        }
        self.save(st)?;
        Ok(())
    }

    /// Publish intermediate reports (`Running` while `switch-to-configuration` runs,
    /// `RebootRequested` before rebooting) to `tx`.
    /// `acked` carries what the writer has stored: before rebooting, the agent waits until the
    /// `RebootRequested` report is there (bounded by `report_timeout`).
    pub fn with_progress(
        mut self,
        tx: tokio::sync::watch::Sender<Option<AgentStatus>>,
        acked: tokio::sync::watch::Receiver<Option<AgentStatus>>,
    ) -> Self {
        self.progress = Some(tx);
        self.acked = Some(acked);
        self
    }

    /// Wait until the writer acknowledges that the facts of `st` are stored (no-op without a
    /// progress channel). Bounded: an API outage must not hold a granted step forever.
    async fn published_and_stored(&self, st: &HostState) {
        self.publish(st);
        let Some(mut acked) = self.acked.clone() else {
            return;
        };
        let facts = self.observe_with(st);
        let stored = tokio::time::timeout(
            self.options.report_timeout,
            acked.wait_for(|a| a.as_ref() == Some(&facts)),
        )
        .await;
        match stored {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tracing::debug!("the report writer is gone; going on"),
            Err(_) => tracing::warn!(
                timeout = ?self.options.report_timeout,
                "the report was not acknowledged in time; going on (the new boot id proves the reboot)"
            ),
        }
    }

    fn publish(&self, st: &HostState) {
        if let Some(tx) = &self.progress {
            let facts = self.observe_with(st);
            tx.send_if_modified(|r| {
                let changed = r.as_ref() != Some(&facts);
                *r = Some(facts);
                changed
            });
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
            } else if !known && self.secrets_blocked() && g.action != ActivationAction::Rollback {
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

    /// `<current>/configuration-revision` if the system has that file, else
    /// `configurationRevision` of `<current>/sw/bin/nixos-version --json` (NixOS embeds
    /// `system.configurationRevision` there). Once per current system; the command runs in the
    /// background (10 s timeout) and its answer is published when it comes, so no report waits
    /// for this optional fact.
    fn refresh_configuration_revision(&mut self) {
        let Some(current) = self.current_system() else {
            if let Ok(mut c) = self.revision_cache.lock() {
                *c = None;
            }
            return;
        };
        let cached = self
            .revision_cache
            .lock()
            .map(|c| c.as_ref().is_some_and(|(s, _)| *s == current))
            .unwrap_or(false);
        if cached || self.revision_pending.as_deref() == Some(current.as_str()) {
            return;
        }
        let system = Path::new(&current);
        let from_file = self.read_trimmed(&system.join("configuration-revision"));
        let tool = system.join("sw/bin/nixos-version");
        // Resolved on the host: `sw` is a symlink into the store, whose absolute target means
        // nothing in the agent's own filesystem.
        if from_file.is_some() || resolve(self.host.as_ref(), &tool).is_none() {
            if let Ok(mut c) = self.revision_cache.lock() {
                *c = Some((current, from_file));
            }
            return;
        }
        self.revision_pending = Some(current.clone());
        let (host, cache, progress) = (
            self.host.clone(),
            self.revision_cache.clone(),
            self.progress.clone(),
        );
        tokio::spawn(async move {
            let cmd = HostCommand::new(host.cmd_path(&tool), Duration::from_secs(10)).arg("--json");
            let revision = match host.run(cmd).await {
                Ok(out) if out.success() => serde_json::from_str::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v.get("configurationRevision")?.as_str().map(str::to_string))
                    .filter(|r| !r.is_empty()),
                Ok(out) => {
                    tracing::info!(code = ?out.code, "nixos-version --json failed; configurationRevision unknown");
                    None
                }
                Err(e) => {
                    tracing::info!(error = %e, "nixos-version --json failed; configurationRevision unknown");
                    None
                }
            };
            if let Ok(mut c) = cache.lock() {
                *c = Some((current.clone(), revision.clone()));
            }
            // Publish it into the newest report, if that is still about this system.
            if let Some(tx) = progress {
                tx.send_if_modified(|r| match r {
                    Some(r)
                        if r.current_system.as_deref() == Some(current.as_str())
                            && r.configuration_revision != revision =>
                    {
                        r.configuration_revision = revision;
                        true
                    }
                    _ => false,
                });
            }
        });
    }

    /// When a failed staging should be tried again (the loop wakes up then).
    pub fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.failed_stage.as_ref().map(|f| f.retry_at)
    }

    /// The facts to report, without acting.
    pub fn observe(&self) -> Result<AgentStatus, NodeError> {
        let st = self.load()?;
        Ok(self.observe_with(&st))
    }

    // ---------------------------------------------------------------- staging

    fn needs_staging(&self, st: &HostState, t: &Target) -> bool {
        if let Some(f) = &self.failed_stage
            && f.revision == t.revision
            && f.installable == t.installable
            && tokio::time::Instant::now() < f.retry_at
        {
            return false;
        }
        match &st.staged {
            Some(r) if r.staged.revision == t.revision && r.staged.installable == t.installable => {
                // Still pinned? (someone may have deleted the root or collected the path)
                let root = self.host.fs_path(&r.gc_root);
                !(std::fs::symlink_metadata(&root).is_ok()
                    && resolve(self.host.as_ref(), &r.gc_root).is_some())
            }
            _ => true,
        }
    }

    async fn stage(&mut self, st: &mut HostState, t: &Target) -> Result<(), NodeError> {
        let gc_root = Path::new(GCROOTS_DIR).join(format!("system-{}", sanitize(&t.revision)));
        tracing::info!(
            revision = %t.revision,
            installable = %crate::nix::mask_credentials(&t.installable),
            "staging"
        );
        match self.nix.realise(&t.installable, &gc_root).await {
            Ok(system) => {
                let closure_bytes = match self.nix.closure_bytes(&system).await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "closure size unknown");
                        None
                    }
                };
                let booted = self.booted_system();
                let current = self.current_system();
                let reasons = self.reasons(booted.as_deref(), current.as_deref(), &system);
                self.remove_stale_roots(&gc_root);
                tracing::info!(%system, ?reasons, "staged");
                st.staged = Some(StagedRecord {
                    staged: StagedSystem {
                        revision: t.revision.clone(),
                        installable: t.installable.clone(),
                        system,
                        closure_bytes,
                        reboot_required: !reasons.is_empty(),
                        reboot_reasons: reasons,
                        staged_at: Some(Time(now())),
                    },
                    gc_root,
                    compared_with: booted,
                    compared_current: current,
                });
                if st
                    .last_error
                    .as_ref()
                    .is_some_and(|e| e.operation == HostOperation::Stage)
                {
                    st.last_error = None;
                }
                self.failed_stage = None;
            }
            Err(e) => {
                let attempts = match &self.failed_stage {
                    Some(f) if f.revision == t.revision && f.installable == t.installable => f.attempts + 1,
                    _ => 1,
                };
                let backoff = self
                    .options
                    .stage_retry
                    .saturating_mul(1 << attempts.min(16).saturating_sub(1))
                    .min(self.options.stage_retry_max);
                tracing::warn!(revision = %t.revision, error = %e, attempts, retry_in = ?backoff, "staging failed");
                let message = e.report();
                // Same failure again: keep its time, so the report does not change.
                let same = st.last_error.as_ref().is_some_and(|l| {
                    l.operation == HostOperation::Stage
                        && l.revision.as_deref() == Some(t.revision.as_str())
                        && l.message == message
                });
                if !same {
                    st.last_error = Some(ReportedError {
                        operation: HostOperation::Stage,
                        revision: Some(t.revision.clone()),
                        message,
                        at: Time(now()),
                    });
                }
                self.failed_stage = Some(FailedStage {
                    revision: t.revision.clone(),
                    installable: t.installable.clone(),
                    attempts,
                    retry_at: tokio::time::Instant::now() + backoff,
                });
            }
        }
        self.save(st)
    }

    /// Remove every root in the gcroots directory except `keep` (superseded targets).
    fn remove_stale_roots(&self, keep: &Path) {
        let dir = self.host.fs_path(Path::new(GCROOTS_DIR));
        let keep_name = keep.file_name();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if Some(e.file_name().as_os_str()) != keep_name
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove stale GC root");
            }
        }
    }

    /// Recompute the reboot reasons when the booted or the running system changed since
    /// staging.
    fn refresh_reboot_reasons(&self, st: &mut HostState) -> Result<(), NodeError> {
        let booted = self.booted_system();
        let current = self.current_system();
        let Some(rec) = st.staged.as_ref() else {
            return Ok(());
        };
        if rec.compared_with == booted && rec.compared_current == current {
            return Ok(());
        }
        let reasons = self.reasons(booted.as_deref(), current.as_deref(), &rec.staged.system);
        if let Some(rec) = st.staged.as_mut() {
            rec.staged.reboot_required = !reasons.is_empty();
            rec.staged.reboot_reasons = reasons;
            rec.compared_with = booted;
            rec.compared_current = current;
        }
        self.save(st)
    }

    /// [`reboot_reasons`] plus `systemd` when [`HostOptions::systemd_needs_reboot`].
    fn reasons(&self, booted: Option<&str>, current: Option<&str>, new: &str) -> Vec<String> {
        let mut reasons = reboot_reasons(self.host.as_ref(), booted, current, new);
        if self.options.systemd_needs_reboot {
            let b = booted.map(|b| component(self.host.as_ref(), b, SYSTEMD_COMPONENT));
            let n = component(self.host.as_ref(), new, SYSTEMD_COMPONENT);
            let same = match b {
                None => n.is_none(),
                Some(b) => same_component(self.host.as_ref(), b.as_deref(), n.as_deref()),
            };
            if !same {
                reasons.push(SYSTEMD_COMPONENT.to_string());
            }
        }
        reasons
    }

    // ------------------------------------------------------------- activation

    fn start_activation(&self, st: &mut HostState, g: &ActivationGrant) -> Result<(), NodeError> {
        tracing::info!(id = %g.id, action = ?g.action, system = %g.system, "activation granted");
        // Files of earlier grants (lock dirs, logs, results) are no longer needed.
        let dir = self.host.fs_path(Path::new(ACTIVATION_DIR));
        let keep = sanitize(&g.id);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.split('.').next() != Some(keep.as_str()) {
                let _ = std::fs::remove_dir(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
        st.activation = Some(ActivationRecord {
            id: g.id.clone(),
            action: g.action,
            system: g.system.clone(),
            step: Step::SettingProfile,
            generation_before: self.profile_generation(),
            activated: None,
            boot_id_before: None,
            exit_code: None,
            outcome: None,
            message: None,
            updated_at: now(),
            attempt: 0,
        });
        self.save(st)
    }

    /// Run the recorded activation from its persisted step to the end (or to the reboot).
    async fn drive_activation(&self, st: &mut HostState) -> Result<(), NodeError> {
        loop {
            let Some(rec) = st.activation.clone() else {
                return Ok(());
            };
            match rec.step {
                Step::SettingProfile => {
                    self.crash(CrashPoint::BeforeProfileSet)?;
                    if let Err(message) = self.wait_for_other_activators(st).await {
                        self.finish(st, ActivationState::Failed, message)?;
                        continue;
                    }
                    match self.set_profile(&rec).await {
                        Ok(activated) => {
                            self.update(st, |r| {
                                r.activated = Some(activated);
                                r.step = Step::ProfileSet;
                            })?;
                            self.crash(CrashPoint::AfterProfileSet)?;
                        }
                        Err(message) => self.finish(st, ActivationState::Failed, message)?,
                    }
                }
                Step::ProfileSet => self.update(st, |r| r.step = Step::Switching)?,
                Step::Switching => {
                    self.publish(st);
                    match self.switch(&rec).await {
                        Ok(code) => {
                            self.crash(CrashPoint::AfterSwitch)?;
                            self.update(st, |r| {
                                r.exit_code = Some(code);
                                r.step = Step::Switched;
                            })?;
                        }
                        Err(message) => self.finish(st, ActivationState::Failed, message)?,
                    }
                }
                Step::Switched => {
                    let code = rec.exit_code.unwrap_or(-1);
                    let verb = switch_verb(rec.action);
                    match (rec.action, code) {
                        (_, 1) if rec.attempt < LOCK_RETRIES && self.lost_lock_race(&rec) => {
                            // Another activator started between our check and our launch:
                            // wait for it to end, then launch again (under a new unit name).
                            tracing::warn!(id = %rec.id, attempt = rec.attempt + 1, "switch-to-configuration could not take NixOS's activation lock; trying again");
                            self.update(st, |r| {
                                r.attempt += 1;
                                r.exit_code = None;
                                r.step = Step::ProfileSet;
                            })?;
                        }
                        (ActivationAction::Switch, 0) => {
                            self.finish(st, ActivationState::Switched, String::new())?
                        }
                        (ActivationAction::Switch, 4) => self.finish(
                            st,
                            ActivationState::Switched,
                            format!(
                                "switch-to-configuration switch exited 4: the new system is active and the bootloader updated, but some units failed{}",
                                self.failed_units(&rec)
                            ),
                        )?,
                        (ActivationAction::Switch, 100) => self.finish(
                            st,
                            ActivationState::NeedsReboot,
                            "switch-to-configuration switch exited 100: the new system needs a reboot".into(),
                        )?,
                        (_, 0 | 4) => {
                            let boot_id = self.boot_id();
                            self.update(st, |r| {
                                r.boot_id_before = boot_id;
                                r.step = Step::RebootIssued;
                            })?;
                            self.crash(CrashPoint::BeforeReboot)?;
                            // RebootRequested is in the API before the machine goes down.
                            self.published_and_stored(st).await;
                            tracing::info!(id = %rec.id, "rebooting");
                            if let Err(e) = self.host.reboot().await {
                                self.finish(st, ActivationState::Failed, e.to_string())?;
                                return Ok(());
                            }
                            self.crash(CrashPoint::AfterReboot)?;
                            // On a real host the machine is going down; a simulated reboot
                            // has already happened: RebootIssued below tells them apart.
                        }
                        (_, code) => self.finish(
                            st,
                            ActivationState::Failed,
                            format!(
                                "switch-to-configuration {verb} exited {code}{}",
                                self.switch_log_tail(&rec)
                            ),
                        )?,
                    }
                }
                Step::RebootIssued => {
                    // Never reboot again from here. A new boot id means it happened.
                    if self.boot_id().is_some() && self.boot_id() != rec.boot_id_before {
                        self.finish(st, ActivationState::Rebooted, String::new())?;
                    }
                    return Ok(());
                }
                Step::Finished => return Ok(()),
            }
        }
    }

    fn update(&self, st: &mut HostState, f: impl FnOnce(&mut ActivationRecord)) -> Result<(), NodeError> {
        if let Some(r) = st.activation.as_mut() {
            f(r);
            r.updated_at = now();
        }
        self.save(st)
    }

    fn finish(&self, st: &mut HostState, outcome: ActivationState, message: String) -> Result<(), NodeError> {
        let id = st.activation.as_ref().map(|r| r.id.clone());
        tracing::info!(id = ?id, ?outcome, %message, "activation finished");
        if outcome == ActivationState::Failed {
            st.last_error = Some(ReportedError {
                operation: HostOperation::Activate,
                revision: st
                    .staged
                    .as_ref()
                    .filter(|s| {
                        st.activation
                            .as_ref()
                            .is_some_and(|a| a.system == s.staged.system)
                    })
                    .map(|s| s.staged.revision.clone()),
                message: message.clone(),
                at: Time(now()),
            });
        } else if st
            .last_error
            .as_ref()
            .is_some_and(|e| e.operation == HostOperation::Activate)
        {
            st.last_error = None;
        }
        self.update(st, |r| {
            r.step = Step::Finished;
            r.outcome = Some(outcome);
            r.message = (!message.is_empty()).then_some(message);
        })
    }

    /// Set (or roll back) the profile; idempotent across restarts. Returns the system to run
    /// `switch-to-configuration` from.
    async fn set_profile(&self, rec: &ActivationRecord) -> Result<String, String> {
        let profile = Path::new(SYSTEM_PROFILE);
        match rec.action {
            ActivationAction::Switch | ActivationAction::Boot => {
                if resolve(self.host.as_ref(), Path::new(&rec.system)).is_none() {
                    return Err(format!("system {} is not in the store (not staged?)", rec.system));
                }
                self.check_toplevel(&rec.system)?;
                if self.profile_system().as_deref() != Some(rec.system.as_str()) {
                    self.nix
                        .set_profile(profile, &rec.system)
                        .await
                        .map_err(|e| e.report())?;
                }
                Ok(rec.system.clone())
            }
            ActivationAction::Rollback => {
                // Roll back only if no earlier attempt of this grant already did.
                if rec.generation_before.is_some() && self.profile_generation() == rec.generation_before {
                    self.nix.rollback_profile(profile).await.map_err(|e| e.report())?;
                }
                self.profile_system()
                    .ok_or_else(|| "the system profile resolves to nothing".to_string())
            }
        }
    }

    /// Launch `switch-to-configuration` detached (at most once per grant, guarded by a lock
    /// directory the wrapper creates) and wait for its result file.
    async fn switch(&self, rec: &ActivationRecord) -> Result<i32, String> {
        let name = job_name(rec);
        let dir = Path::new(ACTIVATION_DIR);
        let result = self.host.fs_path(&dir.join(format!("{name}.result")));
        if let Some(code) = read_result(&result) {
            return Ok(code);
        }
        let system = rec.activated.clone().unwrap_or_else(|| rec.system.clone());
        let started = self.host.fs_path(&dir.join(format!("{name}.started")));
        if !started.exists() {
            self.wait_for_other_activators_quietly().await?;
            let _ = std::fs::create_dir_all(self.host.fs_path(dir));
            let script = Path::new(&system).join("bin/switch-to-configuration");
            let argv: Vec<OsString> = vec![
                "/bin/sh".into(),
                "-c".into(),
                ACTIVATION_WRAPPER.into(),
                "nixroll-activate".into(),
                self.host.cmd_path(dir).into(),
                name.clone().into(),
                self.host.cmd_path(&script).into(),
                switch_verb(rec.action).into(),
            ];
            tracing::info!(id = %rec.id, %system, verb = switch_verb(rec.action), "launching switch-to-configuration");
            self.host
                .spawn_detached(DetachedJob {
                    name: name.clone(),
                    argv,
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        // Follow the job: its result file, and the host's service manager for whether it still
        // runs. A switch that runs is never abandoned (switch-to-configuration waits for start
        // jobs, e.g. a k3s server waiting for etcd quorum); no new grant is taken meanwhile.
        let start = tokio::time::Instant::now();
        let deadline = start + self.options.activation_timeout;
        let mut next_check = start + UNIT_CHECK;
        let mut ended: Option<String> = None;
        let mut warned = false;
        // A local file check: first every 10 ms, doubling up to `result_poll`, so that a quick
        // switch is seen at once and a long one costs a few checks a second.
        let mut pause = Duration::from_millis(10).min(self.options.result_poll);
        loop {
            if let Some(code) = read_result(&result) {
                return Ok(code);
            }
            let now = tokio::time::Instant::now();
            if now >= next_check || now >= deadline {
                next_check = now + UNIT_CHECK;
                match self.host.job_state(&name).await {
                    Ok(JobState::Running { state }) => {
                        ended = None;
                        if now >= deadline && !warned {
                            warned = true;
                            tracing::warn!(id = %rec.id, %state, waited = ?now.duration_since(start), "switch-to-configuration still runs; following it, not abandoning it");
                        }
                    }
                    Ok(JobState::Ended { detail }) => {
                        // Twice in a row (a start job that is only queued looks alike once).
                        if let Some(first) = ended.take() {
                            if let Some(code) = read_result(&result) {
                                return Ok(code);
                            }
                            return Err(format!(
                                "switch-to-configuration ended without a result ({first}){}",
                                self.switch_log_tail(rec)
                            ));
                        }
                        ended = Some(detail);
                    }
                    Ok(JobState::Unknown) | Err(_) if now >= deadline => {
                        return Err(format!(
                            "switch-to-configuration gave no result within {:?}",
                            self.options.activation_timeout
                        ));
                    }
                    Ok(JobState::Unknown) => {}
                    Err(e) => {
                        tracing::warn!(id = %rec.id, error = %e, "cannot ask systemd about the activation")
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(self.options.result_poll);
        }
    }

    /// Wait (bounded by the activation timeout) until no other activator runs: NixOS's
    /// activation lock is free and no `nixos-upgrade`/`nixos-rebuild` unit is active. While
    /// waiting, the activation reports `Running` with a message saying what it waits for.
    async fn wait_for_other_activators(&self, st: &mut HostState) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.options.activation_timeout;
        let mut said = None;
        loop {
            let busy = self.other_activators().await;
            if busy.is_empty() {
                if said.is_some() {
                    let _ = self.update(st, |r| r.message = None);
                }
                return Ok(());
            }
            let message = format!("waiting for another activator to finish: {}", busy.join(", "));
            if said.as_ref() != Some(&message) {
                tracing::warn!("{message}");
                let _ = self.update(st, |r| r.message = Some(message.clone()));
                self.publish(st);
                said = Some(message.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{message} (still running after {:?})",
                    self.options.activation_timeout
                ));
            }
            tokio::time::sleep(ACTIVATOR_POLL.min(self.options.activation_timeout)).await;
        }
    }

    /// [`Self::wait_for_other_activators`] without a record to annotate (right before launch).
    async fn wait_for_other_activators_quietly(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.options.activation_timeout;
        loop {
            let busy = self.other_activators().await;
            if busy.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "another activator kept running for {:?}: {}",
                    self.options.activation_timeout,
                    busy.join(", ")
                ));
            }
            tokio::time::sleep(ACTIVATOR_POLL.min(self.options.activation_timeout)).await;
        }
    }

    /// Who else activates now: a holder of NixOS's activation lock (from `/proc/locks`, which
    /// does not disturb it) and the host's activator units.
    async fn other_activators(&self) -> Vec<String> {
        let mut busy = Vec::new();
        if lock_held(&self.host.fs_path(Path::new(SWITCH_LOCK))) {
            busy.push(format!("a process holds {SWITCH_LOCK}"));
        }
        match self.host.other_activators().await {
            Ok(units) => busy.extend(units),
            Err(e) => tracing::warn!(error = %e, "cannot ask systemd about other activators"),
        }
        busy
    }

    /// Whether the switch failed because another activator held NixOS's activation lock.
    fn lost_lock_race(&self, rec: &ActivationRecord) -> bool {
        let log = self
            .host
            .fs_path(&Path::new(ACTIVATION_DIR).join(format!("{}.log", job_name(rec))));
        read_bounded(&log, 64 * 1024).is_some_and(|t| {
            t.lines()
                .any(|l| l.contains("switch-to-configuration.lock") || l.contains("Could not acquire lock"))
        })
    }

    /// `: <the line naming the failed units>` from the switch's output, if any.
    fn failed_units(&self, rec: &ActivationRecord) -> String {
        let log = self
            .host
            .fs_path(&Path::new(ACTIVATION_DIR).join(format!("{}.log", job_name(rec))));
        read_bounded(&log, 64 * 1024)
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| l.contains("units failed") || l.contains("failed units"))
                    .map(|l| {
                        format!(
                            ": {}",
                            crate::nix::trim_nix_error(l.trim_start_matches("warning: "))
                        )
                    })
            })
            .unwrap_or_default()
    }

    /// A switchable NixOS toplevel has `nixos-version` and an executable
    /// `bin/switch-to-configuration`: checked before the profile is pointed at it.
    fn check_toplevel(&self, system: &str) -> Result<(), String> {
        let sys = Path::new(system);
        let exe = resolve(self.host.as_ref(), &sys.join("bin/switch-to-configuration")).and_then(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(self.host.fs_path(&p))
                .ok()
                .filter(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
        if resolve(self.host.as_ref(), &sys.join("nixos-version")).is_none() || exe.is_none() {
            return Err(format!(
                "{system} is not a switchable NixOS system (no nixos-version or no executable bin/switch-to-configuration); the system profile was not changed"
            ));
        }
        Ok(())
    }

    fn switch_log_tail(&self, rec: &ActivationRecord) -> String {
        let log = self
            .host
            .fs_path(&Path::new(ACTIVATION_DIR).join(format!("{}.log", job_name(rec))));
        let text = read_bounded(&log, 64 * 1024).unwrap_or_default();
        let t = crate::nix::trim_nix_error(&text);
        if t.is_empty() {
            String::new()
        } else {
            format!(": {t}")
        }
    }

    // ------------------------------------------------------------------ facts

    fn read_trimmed(&self, host_path: &Path) -> Option<String> {
        // Symlinks (a store path's files often are) are followed on the host's side.
        let local = self.host.fs_path(&resolve(self.host.as_ref(), host_path)?);
        let s = read_bounded(&local, 4096)?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    pub fn boot_id(&self) -> Option<String> {
        self.read_trimmed(Path::new("/proc/sys/kernel/random/boot_id"))
    }

    pub fn booted_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new("/run/booted-system")).map(|p| p.to_string_lossy().into_owned())
    }

    pub fn current_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new("/run/current-system"))
            .map(|p| p.to_string_lossy().into_owned())
    }

    fn profile_system(&self) -> Option<String> {
        resolve(self.host.as_ref(), Path::new(SYSTEM_PROFILE)).map(|p| p.to_string_lossy().into_owned())
    }

    /// `system` → `system-N-link` → N.
    pub fn profile_generation(&self) -> Option<i64> {
        let link = std::fs::read_link(self.host.fs_path(Path::new(SYSTEM_PROFILE))).ok()?;
        let name = link.file_name()?.to_str()?;
        name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
    }

    fn observe_with(&self, st: &HostState) -> AgentStatus {
        let boot_id = self.boot_id();
        let current = self.current_system();
        let nixos_version = current
            .as_ref()
            .and_then(|c| self.read_trimmed(&Path::new(c).join("nixos-version")));
        let cache = self.revision_cache.lock().ok().and_then(|c| c.clone());
        let configuration_revision = match (&current, cache) {
            (Some(c), Some((s, r))) if *c == s => r,
            (Some(c), _) => self.read_trimmed(&Path::new(c).join("configuration-revision")),
            (None, _) => None,
        };
        AgentStatus {
            booted_system: self.booted_system(),
            current_system: current,
            profile_generation: self.profile_generation(),
            nixos_version,
            configuration_revision,
            staged: st.staged.as_ref().map(|r| r.staged.clone()),
            activation: st
                .activation
                .as_ref()
                .map(|r| activation_report(r, boot_id.as_deref())),
            last_error: st.last_error.clone(),
            boot_id,
            secrets: st.secrets.clone(),
            secrets_missing: self.secrets_missing.clone(),
        }
    }
}

/// The report of a recorded activation, given the current boot id.
pub fn activation_report(r: &ActivationRecord, boot_id: Option<&str>) -> ActivationReport {
    let state = match r.step {
        Step::Finished => r.outcome.unwrap_or(ActivationState::Failed),
        Step::RebootIssued => {
            if boot_id.is_some() && boot_id != r.boot_id_before.as_deref() {
                ActivationState::Rebooted
            } else {
                ActivationState::RebootRequested
            }
        }
        _ => ActivationState::Running,
    };
    ActivationReport {
        id: r.id.clone(),
        action: r.action,
        state,
        system: r.system.clone(),
        boot_id_before: r.boot_id_before.clone(),
        exit_code: r.exit_code,
        units_failed: r.exit_code == Some(4) && state != ActivationState::Failed,
        message: r.message.clone(),
        updated_at: Time(r.updated_at),
    }
}

/// Runs as `sh -c WRAPPER nixroll-activate DIR NAME SCRIPT VERB`: takes the lock directory
/// `DIR/NAME.started` (a second launch exits at once), runs `SCRIPT VERB` with its output in
/// `DIR/NAME.log`, then publishes the exit status atomically as `DIR/NAME.result`.
pub const ACTIVATION_WRAPPER: &str = r#"d="$1"; n="$2"; shift 2
mkdir "$d/$n.started" 2>/dev/null || exit 0
"$@" >"$d/$n.log" 2>&1
echo "$?" >"$d/$n.result.tmp"
sync "$d/$n.result.tmp" 2>/dev/null
mv "$d/$n.result.tmp" "$d/$n.result"
"#;

/// The detached job's name (unit `nixroll-activate-<name>`, files `<name>.*`): the grant id,
/// plus `-r<N>` for the N-th launch after losing the activation lock.
fn job_name(rec: &ActivationRecord) -> String {
    if rec.attempt == 0 {
        sanitize(&rec.id)
    } else {
        format!("{}-r{}", sanitize(&rec.id), rec.attempt)
    }
}

/// Whether some process holds a lock on `path` (per `/proc/locks`, which lists the locks of
/// the processes in our PID namespace: with `hostPID`, the host's).
fn lock_held(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let Some(locks) = read_bounded(Path::new("/proc/locks"), 1 << 20) else {
        return false;
    };
    let dev = meta.dev();
    let (major, minor) = (
        ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff),
        ((dev >> 12) & 0xffff_ff00) | (dev & 0xff),
    );
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    locks.lines().any(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (blocked waiters start with "->")
        !l.contains("->") && l.split_whitespace().any(|f| f == want)
    })
}

fn switch_verb(action: ActivationAction) -> &'static str {
    match action {
        ActivationAction::Switch => "switch",
        ActivationAction::Boot | ActivationAction::Rollback => "boot",
    }
}

fn read_result(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
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

/// Why booting `new` would differ from the running kernel/initrd/…: the names of
/// [`REBOOT_COMPONENTS`] that differ between `booted` and `new`, plus `reboot-triggers` when
/// both have it. Unknown booted system ⇒ every component present in `new` counts. Plus
/// [`SWITCH_INHIBITORS`] when the running system (`current`) and `new` both have
/// `switch-inhibitors` and they differ: NixOS would refuse to `switch` to it.
pub fn reboot_reasons(
    host: &dyn Host,
    booted: Option<&str>,
    current: Option<&str>,
    new: &str,
) -> Vec<String> {
    let mut reasons = Vec::new();
    for name in REBOOT_COMPONENTS {
        let b = booted.map(|b| component(host, b, name));
        let n = component(host, new, name);
        let same = match b {
            None => n.is_none(),
            Some(b) => same_component(host, b.as_deref(), n.as_deref()),
        };
        if !same {
            reasons.push(name.to_string());
        }
    }
    if let Some(b) = booted {
        let (b, n) = (
            component(host, b, "reboot-triggers"),
            component(host, new, "reboot-triggers"),
        );
        if b.is_some() && n.is_some() && !same_component(host, b.as_deref(), n.as_deref()) {
            reasons.push("reboot-triggers".to_string());
        }
    }
    if let Some(c) = current
        && let (Some(a), Some(b)) = (
            component(host, c, SWITCH_INHIBITORS),
            component(host, new, SWITCH_INHIBITORS),
        )
        && a != b
        && inhibitors_differ(&host.fs_path(&a), &host.fs_path(&b))
    {
        reasons.push(SWITCH_INHIBITORS.to_string());
    }
    reasons
}

/// NixOS's check: every name present in both JSON objects must map to the same value (files
/// that are not JSON objects are compared whole). Unreadable counts as different.
fn inhibitors_differ(a: &Path, b: &Path) -> bool {
    let (Some(ta), Some(tb)) = (read_bounded(a, 1 << 20), read_bounded(b, 1 << 20)) else {
        return true;
    };
    let parse = |t: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok();
    match (parse(&ta), parse(&tb)) {
        (Some(ma), Some(mb)) => ma.iter().any(|(k, v)| mb.get(k).is_some_and(|w| w != v)),
        _ => ta.trim() != tb.trim(),
    }
}

fn component(host: &dyn Host, system: &str, name: &str) -> Option<PathBuf> {
    resolve(host, &Path::new(system).join(name))
}

/// Same resolved store path, or regular files with equal contents (files inside a toplevel
/// such as `kernel-params` differ in path whenever anything changed).
fn same_component(host: &dyn Host, a: Option<&Path>, b: Option<&Path>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => {
            let (la, lb) = (host.fs_path(a), host.fs_path(b));
            match (std::fs::metadata(&la), std::fs::metadata(&lb)) {
                (Ok(ma), Ok(mb)) if ma.is_file() && mb.is_file() && ma.len() == mb.len() => {
                    // Bounded: kernels are ~10-20 MiB; anything larger counts as different.
                    ma.len() <= 256 * 1024 * 1024
                        && matches!((std::fs::read(&la), std::fs::read(&lb)), (Ok(x), Ok(y)) if x == y)
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Now, truncated to whole seconds: Kubernetes `Time` has second precision, so reported
/// timestamps compare equal after a round trip through the API server.
fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::agent::host::{HostRoot, RebootHook};

    fn file(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn reboot_reasons_compare_paths_then_contents() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let host = HostRoot::new(r, RebootHook::None);
        // shared store paths: kernel and modules identical by path
        file(r, "store/k1/bzImage", "k1");
        file(r, "store/m1/lib/x.ko", "m");
        for sys in ["store/a", "store/b"] {
            std::fs::create_dir_all(r.join(sys)).unwrap();
            std::os::unix::fs::symlink("/store/k1/bzImage", r.join(sys).join("kernel")).unwrap();
            std::os::unix::fs::symlink("/store/m1", r.join(sys).join("kernel-modules")).unwrap();
        }
        // files inside each toplevel: equal content = same, different content = reason
        file(r, "store/a/kernel-params", "quiet");
        file(r, "store/b/kernel-params", "quiet");
        file(r, "store/a/init-interface-version", "systemd");
        file(r, "store/b/init-interface-version", "systemd-2");
        // initrd only in the new system; reboot-triggers on both sides, different
        file(r, "store/b/initrd", "i");
        file(r, "store/a/reboot-triggers", "{\"a\":1}");
        file(r, "store/b/reboot-triggers", "{\"a\":2}");
        let a = r.join("store/a").display().to_string();
        let b = r.join("store/b").display().to_string();
        assert_eq!(
            reboot_reasons(&host, Some(&a), None, &b),
            vec!["initrd", "init-interface-version", "reboot-triggers"]
        );
        assert!(reboot_reasons(&host, Some(&a), None, &a).is_empty());
        // reboot-triggers only counts when both have it
        std::fs::remove_file(r.join("store/a/reboot-triggers")).unwrap();
        assert_eq!(
            reboot_reasons(&host, Some(&a), None, &b),
            vec!["initrd", "init-interface-version"]
        );
        // unknown booted system: every component the new one has
        assert_eq!(
            reboot_reasons(&host, None, None, &b),
            vec![
                "kernel",
                "initrd",
                "kernel-modules",
                "kernel-params",
                "init-interface-version"
            ]
        );
    }

    #[test]
    fn switch_inhibitors_count_and_systemd_alone_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let host = HostRoot::new(r, RebootHook::None);
        file(
            r,
            "store/cur/switch-inhibitors",
            r#"{"systemd":"/s/1","dbus":"/d/1"}"#,
        );
        file(
            r,
            "store/new/switch-inhibitors",
            r#"{"systemd":"/s/2","dbus":"/d/1","x":"1"}"#,
        );
        file(
            r,
            "store/same/switch-inhibitors",
            r#"{"systemd":"/s/1","other":"y"}"#,
        );
        for sys in ["cur", "new", "same"] {
            file(r, &format!("store/{sys}/systemd/version"), sys);
        }
        let p = |s: &str| r.join("store").join(s).display().to_string();
        // compared with the running system (current), not the booted one
        assert_eq!(
            reboot_reasons(&host, Some(&p("cur")), Some(&p("cur")), &p("new")),
            vec!["switch-inhibitors"]
        );
        assert!(reboot_reasons(&host, Some(&p("cur")), Some(&p("cur")), &p("same")).is_empty());
        assert!(reboot_reasons(&host, Some(&p("cur")), None, &p("new")).is_empty());
        // a new systemd is no reboot reason by default; it is with the option
        let agent = |systemd_needs_reboot| {
            NodeAgent::new(
                Arc::new(host.clone()),
                Arc::new(NoNix),
                HostOptions {
                    systemd_needs_reboot,
                    ..HostOptions::default()
                },
            )
        };
        assert!(agent(false).reasons(Some(&p("cur")), None, &p("same")).is_empty());
        assert_eq!(
            agent(true).reasons(Some(&p("cur")), None, &p("same")),
            vec!["systemd"]
        );
    }

    /// Nix that must not be called.
    #[derive(Debug)]
    struct NoNix;
    impl Nix for NoNix {
        fn realise<'a>(
            &'a self,
            _: &'a str,
            _: &'a Path,
        ) -> futures::future::BoxFuture<'a, Result<String, crate::nix::NixError>> {
            unreachable!()
        }
        fn closure_bytes<'a>(
            &'a self,
            _: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<u64, crate::nix::NixError>> {
            unreachable!()
        }
        fn set_profile<'a>(
            &'a self,
            _: &'a Path,
            _: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::nix::NixError>> {
            unreachable!("the profile must not be set")
        }
        fn rollback_profile<'a>(
            &'a self,
            _: &'a Path,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::nix::NixError>> {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn a_path_that_is_no_nixos_system_never_reaches_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        file(r, "nix/store/abc-hello/bin/hello", "#!/bin/sh\n");
        let host = HostRoot::new(r, RebootHook::None);
        let mut agent = NodeAgent::new(Arc::new(host), Arc::new(NoNix), HostOptions::default());
        let g = ActivationGrant {
            id: "g".into(),
            action: ActivationAction::Switch,
            system: r.join("nix/store/abc-hello").display().to_string(),
            granted_at: Time(Timestamp::UNIX_EPOCH),
            boot_id_before: None,
        };
        let st = agent.reconcile(None, Some(&g)).await.unwrap();
        let a = st.activation.unwrap();
        assert_eq!(a.state, ActivationState::Failed);
        assert!(a.message.unwrap().contains("not a switchable NixOS system"));
    }

    #[test]
    fn a_held_activation_lock_is_seen_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switch-to-configuration.lock");
        let f = std::fs::File::create(&path).unwrap();
        assert!(!lock_held(&path));
        f.lock().unwrap();
        assert!(lock_held(&path));
        f.unlock().unwrap();
        assert!(!lock_held(&path));
    }

    #[test]
    fn sanitize_makes_unit_and_file_names() {
        assert_eq!(sanitize("node-1/7:abc.def"), "node-1_7_abc_def");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn activation_report_states() {
        let mut r = ActivationRecord {
            id: "g".into(),
            action: ActivationAction::Boot,
            system: "/nix/store/x".into(),
            step: Step::Switching,
            generation_before: None,
            activated: None,
            boot_id_before: Some("b1".into()),
            exit_code: None,
            outcome: None,
            message: None,
            updated_at: Timestamp::UNIX_EPOCH,
            attempt: 0,
        };
        assert_eq!(activation_report(&r, Some("b1")).state, ActivationState::Running);
        r.step = Step::RebootIssued;
        assert_eq!(
            activation_report(&r, Some("b1")).state,
            ActivationState::RebootRequested
        );
        assert_eq!(activation_report(&r, Some("b2")).state, ActivationState::Rebooted);
        r.step = Step::Finished;
        r.outcome = Some(ActivationState::NeedsReboot);
        assert_eq!(
            activation_report(&r, Some("b2")).state,
            ActivationState::NeedsReboot
        );
    }
}
