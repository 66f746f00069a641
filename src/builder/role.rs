//! The builder role on a builder node's agent: build each requested system once, publish its
//! closure in the cache, report where each build is.
//!
//! Builds run one at a time through [`Nix::realise`] (on a real host a transient systemd unit
//! outside the pod's cgroup, bounded by the build timeout), each pinned by a GC root in
//! `/var/lib/nixroll/builds`. A result is kept for the life of the process, so a request is
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
use crate::agent::host::Host;
use crate::api::{BuildReport, BuildRequest, BuildState};
use crate::nix::Nix;

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
}

impl Builder {
    pub fn new(host: Arc<dyn Host>, nix: Arc<dyn Nix>, cache: BinaryCache) -> Builder {
        Builder {
            host,
            nix,
            cache,
            done: HashMap::new(),
            started: 0,
        }
    }

    pub fn cache(&self) -> &BinaryCache {
        &self.cache
    }

    /// How many builds (evaluation + build) this process ran.
    pub fn builds_started(&self) -> usize {
        self.started
    }

    /// Build what `requests` name and was not built (or failed) yet, one at a time; publish
    /// each result; drop the roots of builds no longer requested. Returns one report per
    /// request, in order.
    pub async fn run(&mut self, requests: &[BuildRequest]) -> Vec<BuildReport> {
        for r in requests {
            if self.done.contains_key(&r.installable) {
                continue;
            }
            self.started += 1;
            let report = self.build(&r.installable).await;
            self.done.insert(r.installable.clone(), report);
        }
        self.done
            .retain(|k, _| requests.iter().any(|r| &r.installable == k));
        self.prune_roots(requests);
        self.reports(requests)
    }

    /// The reports of `requests`; `Building` for one not finished.
    pub fn reports(&self, requests: &[BuildRequest]) -> Vec<BuildReport> {
        requests
            .iter()
            .map(|r| {
                self.done
                    .get(&r.installable)
                    .cloned()
                    .unwrap_or_else(|| BuildReport {
                        installable: r.installable.clone(),
                        state: BuildState::Building,
                        system: None,
                        message: None,
                        at: now(),
                    })
            })
            .collect()
    }

    async fn build(&self, installable: &str) -> BuildReport {
        let root = Path::new(BUILDS_DIR).join(root_name(installable));
        tracing::info!(installable = %crate::nix::mask_credentials(installable), "building");
        let result = match self.nix.realise(installable, &root).await {
            Ok(system) => match self.nix.closure_info(&system).await {
                Ok(closure) => match self.cache.publish(&closure) {
                    Ok(n) => {
                        tracing::info!(%system, paths = n, "built and published");
                        Ok(system)
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.report()),
            },
            Err(e) => Err(e.report()),
        };
        let at = now();
        match result {
            Ok(system) => BuildReport {
                installable: installable.to_string(),
                state: BuildState::Built,
                system: Some(system),
                message: None,
                at,
            },
            Err(message) => {
                tracing::warn!(installable = %crate::nix::mask_credentials(installable), error = %message, "build failed");
                BuildReport {
                    installable: installable.to_string(),
                    state: BuildState::Failed,
                    system: None,
                    message: Some(message),
                    at,
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
