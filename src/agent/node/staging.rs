//! Staging: building `status.target` (`nix build` to a GC root) without changing what the
//! next boot runs, recording the staged system, retrying a failed build with backoff, and
//! keeping its reboot reasons up to date.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{NodeAgent, NodeError, now, sanitize};
use crate::agent::host::resolve;
use crate::agent::state::{GCROOTS_DIR, HostState, StagedRecord};
use crate::api::{HostError as ReportedError, HostOperation, StagedSystem, Target};

#[derive(Clone, Debug)]
pub(super) struct FailedStage {
    revision: String,
    installable: String,
    /// The built system it was to fetch (`status.target.build.system`), if any.
    built: Option<String>,
    attempts: u32,
    retry_at: tokio::time::Instant,
}

impl FailedStage {
    fn is_for(&self, t: &Target) -> bool {
        self.revision == t.revision && self.installable == t.installable && self.built.as_deref() == built(t)
    }
}

/// The store path a builder built for `t`, when one did.
fn built(t: &Target) -> Option<&str> {
    t.build.as_ref().map(|b| b.system.as_str())
}

impl NodeAgent {
    /// When a failed staging should be tried again (the loop wakes up then).
    pub fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.failed_stage.as_ref().map(|f| f.retry_at)
    }

    pub(super) fn needs_staging(&self, st: &HostState, t: &Target) -> bool {
        if t.build.as_ref().is_some_and(|b| b.system.is_empty()) {
            // The builder has not built it yet: nothing to fetch, and never evaluate here.
            return false;
        }
        if let Some(f) = &self.failed_stage
            && f.is_for(t)
            && tokio::time::Instant::now() < f.retry_at
        {
            return false;
        }
        match &st.staged {
            Some(r)
                if r.staged.revision == t.revision
                    && r.staged.installable == t.installable
                    && built(t).is_none_or(|b| b == r.staged.system) =>
            {
                // Still pinned? (someone may have deleted the root or collected the path)
                let root = self.host.fs_path(&r.gc_root);
                !(std::fs::symlink_metadata(&root).is_ok()
                    && resolve(self.host.as_ref(), &r.gc_root).is_some())
            }
            _ => true,
        }
    }

    pub(super) async fn stage(&mut self, st: &mut HostState, t: &Target) -> Result<(), NodeError> {
        let keep = self.options.keep_staged.saturating_sub(1);
        if let Some(i) = st.pinned.iter().take(keep).position(|p| {
            p.staged.revision == t.revision
                && p.staged.installable == t.installable
                && resolve(self.host.as_ref(), &p.gc_root).is_some()
        }) {
            // Staged before and still pinned (a revert): no evaluation, no build.
            let mut rec = st.pinned.remove(i);
            let booted = self.booted_system();
            let current = self.current_system();
            let reasons = self.reasons(booted.as_deref(), current.as_deref(), &rec.staged.system);
            tracing::info!(revision = %t.revision, system = %rec.staged.system, "staged: still pinned from before, nothing evaluated or built");
            rec.staged.reboot_required = !reasons.is_empty();
            rec.staged.reboot_reasons = reasons;
            rec.staged.staged_at = Some(Time(now()));
            rec.compared_with = booted;
            rec.compared_current = current;
            let gc_root = rec.gc_root.clone();
            self.push_pinned(st, rec);
            self.remove_stale_roots(&gc_root, st);
            st.clear_error_of(HostOperation::Stage);
            self.failed_stage = None;
            return self.save(st);
        }
        let gc_root = Path::new(GCROOTS_DIR).join(format!("system-{}", sanitize(&t.revision)));
        tracing::info!(
            revision = %t.revision,
            installable = %crate::nix::mask_credentials(&t.installable),
            "staging"
        );
        let realised = match &t.build {
            // Built once by the cluster's builder: fetch exactly that path, signed, never
            // evaluate here.
            Some(b) => {
                let from = self.options.substitution.with_cache_first(b.cache.as_deref());
                tracing::info!(system = %b.system, builder = ?b.builder, "fetching the built system");
                self.nix.substitute(&b.system, &from, &gc_root).await
            }
            None => self.nix.realise(&t.installable, &gc_root).await,
        };
        match realised {
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
                tracing::info!(%system, ?reasons, "staged");
                let rec = StagedRecord {
                    staged: StagedSystem {
                        revision: t.revision.clone(),
                        installable: t.installable.clone(),
                        system,
                        closure_bytes,
                        reboot_required: !reasons.is_empty(),
                        reboot_reasons: reasons,
                        staged_at: Some(Time(now())),
                    },
                    gc_root: gc_root.clone(),
                    compared_with: booted,
                    compared_current: current,
                };
                self.push_pinned(st, rec);
                self.remove_stale_roots(&gc_root, st);
                st.clear_error_of(HostOperation::Stage);
                self.failed_stage = None;
            }
            Err(e) => {
                let attempts = match &self.failed_stage {
                    Some(f) if f.is_for(t) => f.attempts + 1,
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
                    built: built(t).map(str::to_string),
                    attempts,
                    retry_at: tokio::time::Instant::now() + backoff,
                });
            }
        }
        self.save(st)
    }

    /// `rec` becomes the staged system; the one staged before joins the pinned ones (newest
    /// first, at most `keep_staged - 1`, none for the same target as `rec`).
    fn push_pinned(&self, st: &mut HostState, rec: StagedRecord) {
        let same = |a: &StagedRecord, b: &StagedRecord| {
            a.staged.revision == b.staged.revision && a.staged.installable == b.staged.installable
        };
        if let Some(prev) = st.staged.take()
            && !same(&prev, &rec)
        {
            st.pinned.insert(0, prev);
        }
        st.pinned.retain(|p| !same(p, &rec));
        st.pinned.truncate(self.options.keep_staged.saturating_sub(1));
        st.staged = Some(rec);
    }

    /// Remove every root in the gcroots directory except `keep` and the pinned systems' roots
    /// (superseded targets beyond `keep_staged`).
    fn remove_stale_roots(&self, keep: &Path, st: &HostState) {
        let dir = self.host.fs_path(Path::new(GCROOTS_DIR));
        let mut keep_names: Vec<_> = st
            .pinned
            .iter()
            .filter_map(|p| p.gc_root.file_name().map(|n| n.to_os_string()))
            .collect();
        keep_names.extend(keep.file_name().map(|n| n.to_os_string()));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if !keep_names.contains(&e.file_name())
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove stale GC root");
            }
        }
    }

    /// Recompute the reboot reasons when the booted or the running system changed since
    /// staging.
    pub(super) fn refresh_reboot_reasons(&self, st: &mut HostState) -> Result<(), NodeError> {
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
}
