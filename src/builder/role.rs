//! The builder role on a builder node's agent: build each requested system once, publish its
//! closure in the cache, report where each build is.
//!
//! What is pending is built in one `nix build` with several installables ([`Nix::realise_many`]:
//! one evaluator process for every configuration of a revision; on a real host a transient
//! systemd unit outside the pod's cgroup, bounded by the build timeout), each pinned by a GC
//! root in `/var/lib/nixroll/builds`; when that fails, each alone, so a failure is reported on
//! the system that failed. A result is kept for the life of the process, so a request is
//! built once however many nodes want it and however often it is asked for; after a restart
//! the same request realises again, which for a system already built is a look-up in the store,
//! not a build (Nix keeps the output; the root keeps it from the garbage collector), and for a
//! build that was killed halfway is the build again, once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::BinaryCache;
use super::push::{PushTo, nix_copy};
use crate::agent::host::Host;
use crate::api::{BuildReport, BuildRequest, BuildState};
use crate::nix::Nix;
use crate::rollout::build::newer;

/// Where a builder pins what it built (host path).
pub const BUILDS_DIR: &str = "/var/lib/nixroll/builds";

/// A builder's state: the cache it serves and what it built in this process.
#[derive(Debug)]
pub struct Builder {
    host: Arc<dyn Host>,
    nix: Arc<dyn Nix>,
    cache: BinaryCache,
    done: HashMap<String, BuildReport>,
    /// How many builds this process started (tests, the benchmark).
    started: usize,
    /// How many evaluations (`nix build` calls on installables) it ran.
    evaluations: usize,
    /// A binary cache each built closure is also pushed to (`--builder-push-to`).
    push_to: Option<PushTo>,
}

impl Builder {
    pub fn new(host: Arc<dyn Host>, nix: Arc<dyn Nix>, cache: BinaryCache) -> Builder {
        Builder {
            host,
            nix,
            cache,
            done: HashMap::new(),
            started: 0,
            evaluations: 0,
            push_to: None,
        }
    }

    /// Also push each built closure, signed, to `to` (`push.rs`).
    pub fn with_push_to(mut self, to: Option<PushTo>) -> Self {
        self.push_to = to;
        self
    }

    pub fn cache(&self) -> &BinaryCache {
        &self.cache
    }

    /// How many builds (evaluation + build) this process ran.
    pub fn builds_started(&self) -> usize {
        self.started
    }

    /// Build what `requests` name and was not built yet (or failed under an older retry
    /// token than the request's), all in one evaluation where the flake allows; publish each
    /// result; drop the roots of builds no longer requested. Returns one report per request,
    /// in order.
    pub async fn run(&mut self, requests: &[BuildRequest]) -> Vec<BuildReport> {
        let pending: Vec<&BuildRequest> = requests
            .iter()
            .filter(|r| match self.done.get(&r.installable) {
                None => true,
                Some(d) => d.state == BuildState::Failed && newer(r.retry.as_deref(), d.retry.as_deref()),
            })
            .collect();
        if !pending.is_empty() {
            self.started += pending.len();
            for (r, report) in pending.iter().zip(self.build_all(&pending).await) {
                self.done.insert(r.installable.clone(), report);
            }
        }
        self.done
            .retain(|k, _| requests.iter().any(|r| &r.installable == k));
        self.prune_roots(requests);
        self.reports(requests)
    }

    /// How many evaluations (`nix build` calls on installables) this process ran.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// The reports of `requests`; `Building` for one not finished.
    pub fn reports(&self, requests: &[BuildRequest]) -> Vec<BuildReport> {
        requests
            .iter()
            .map(|r| {
                self.done
                    .get(&r.installable)
                    .filter(|d| {
                        !(d.state == BuildState::Failed && newer(r.retry.as_deref(), d.retry.as_deref()))
                    })
                    .cloned()
                    .unwrap_or_else(|| BuildReport {
                        installable: r.installable.clone(),
                        state: BuildState::Building,
                        system: None,
                        message: None,
                        at: now(),
                        retry: r.retry.clone(),
                    })
            })
            .collect()
    }

    /// Several requests in one `nix build` (one evaluator); when that fails, each alone, so
    /// that a failure is reported on the system that failed and the others still build.
    async fn build_all(&mut self, pending: &[&BuildRequest]) -> Vec<BuildReport> {
        if pending.len() > 1 {
            let installables: Vec<String> = pending.iter().map(|r| r.installable.clone()).collect();
            let roots: Vec<std::path::PathBuf> = installables
                .iter()
                .map(|i| Path::new(BUILDS_DIR).join(root_name(i)))
                .collect();
            tracing::info!(builds = installables.len(), "building in one evaluation");
            self.evaluations += 1;
            match self.nix.realise_many(&installables, &roots).await {
                Ok(systems) => {
                    let mut out = Vec::with_capacity(pending.len());
                    for (r, system) in pending.iter().zip(systems) {
                        out.push(self.finish(r, Ok(system)).await);
                    }
                    return out;
                }
                Err(e) => {
                    tracing::info!(error = %e.report(), "the builds of one evaluation failed; building each alone");
                }
            }
        }
        let mut out = Vec::with_capacity(pending.len());
        for r in pending {
            out.push(self.build(r).await);
        }
        out
    }

    async fn build(&mut self, r: &BuildRequest) -> BuildReport {
        let root = Path::new(BUILDS_DIR).join(root_name(&r.installable));
        tracing::info!(installable = %crate::nix::mask_credentials(&r.installable), "building");
        self.evaluations += 1;
        let mut result = self.nix.realise(&r.installable, &root).await;
        if let Err(e @ crate::nix::NixError::Interrupted { .. }) = &result {
            // Killed halfway (its unit stopped, the process killed): nothing was built, and
            // Nix's locks keep two builds of one path from running at once; build again, once.
            tracing::warn!(installable = %crate::nix::mask_credentials(&r.installable), error = %e, "build interrupted; building again once");
            self.evaluations += 1;
            result = self.nix.realise(&r.installable, &root).await;
        }
        self.finish(r, result.map_err(|e| e.report())).await
    }

    /// Publish a built system's closure, and the report.
    async fn finish(&self, r: &BuildRequest, built: Result<String, String>) -> BuildReport {
        let installable = r.installable.as_str();
        let result = match built {
            Ok(system) => match self.nix.closure_info(&system).await {
                Ok(closure) => match self.cache.publish(&closure) {
                    Ok(n) => {
                        tracing::info!(%system, paths = n, "built and published");
                        match &self.push_to {
                            Some(PushTo::Dir(dir)) => match self.cache.export(&closure, dir) {
                                Ok(w) => {
                                    tracing::info!(%system, written = w, dir = %dir.display(), "pushed");
                                    Ok(system)
                                }
                                Err(e) => Err(format!("built, but not pushed: {e}")),
                            },
                            Some(to @ PushTo::NixCopy(url)) => {
                                match nix_copy(
                                    self.host.as_ref(),
                                    url,
                                    std::slice::from_ref(&system),
                                    self.cache.key(),
                                )
                                .await
                                {
                                    Ok(()) => {
                                        tracing::info!(%system, to = %to.display(), "pushed with nix copy");
                                        Ok(system)
                                    }
                                    Err(e) => Err(format!("built, but not pushed: {e}")),
                                }
                            }
                            None => Ok(system),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.report()),
            },
            Err(e) => Err(e),
        };
        let at = now();
        match result {
            Ok(system) => BuildReport {
                installable: installable.to_string(),
                state: BuildState::Built,
                system: Some(system),
                message: None,
                at,
                retry: r.retry.clone(),
            },
            Err(message) => {
                tracing::warn!(installable = %crate::nix::mask_credentials(installable), error = %message, "build failed");
                BuildReport {
                    installable: installable.to_string(),
                    state: BuildState::Failed,
                    system: None,
                    message: Some(message),
                    at,
                    retry: r.retry.clone(),
                }
            }
        }
    }

    fn prune_roots(&self, requests: &[BuildRequest]) {
        let keep: Vec<String> = requests.iter().map(|r| root_name(&r.installable)).collect();
        let dir = self.host.fs_path(Path::new(BUILDS_DIR));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name)
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale build root");
            }
        }
    }
}

/// The GC root's file name of a build: its revision and attribute, never the flake URL (which
/// may carry a credential).
pub fn root_name(installable: &str) -> String {
    let rev = installable
        .split("rev=")
        .nth(1)
        .map(|r| r.split(['&', '#']).next().unwrap_or(r))
        .unwrap_or("norev");
    let attr = installable.rsplit_once('#').map_or("default", |(_, a)| a);
    let attr = attr
        .strip_prefix("nixosConfigurations.")
        .unwrap_or(attr)
        .trim_end_matches(".config.system.build.toplevel");
    format!("{rev}-{attr}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect()
}

/// Now in whole seconds (what a Kubernetes `Time` keeps).
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_names_hold_revision_and_attribute_only() {
        let i = "git+https://bot:s3cret@example.org/infra.git?rev=0123456789abcdef0123456789abcdef01234567#nixosConfigurations.\"node-1\".config.system.build.toplevel";
        let n = root_name(i);
        assert_eq!(n, "0123456789abcdef0123456789abcdef01234567-_node-1_");
        assert!(!n.contains("s3cret"));
    }
}
