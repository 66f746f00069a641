//! `nixroll bench --builders`: how many evaluations and builds staging one revision takes on a
//! large cluster with builders (docs/builder.md, "Scale"). N nodes spread over S Nix systems,
//! one configuration per system (a fleet of identical workers per architecture), one builder
//! per system plus a standby for the first. Every node "reconciles" several times, as the
//! controller does while a rollout stages: each round the controller's pure planner
//! ([`crate::rollout::build::plan`], [`crate::rollout::build::fetch_for`]) hands each builder
//! its requests and the REAL builder role ([`crate::builder::Builder`]: dedupe, batching,
//! results kept, signing and publishing in its cache) runs them on a Nix that counts what it
//! is asked to do (nothing is really evaluated). Counted: evaluations (Nix processes on an
//! installable), builds started, fetches (nodes pointed at a built store path), and nodes that
//! would evaluate themselves (none, with a builder for every system).
//!
//! Not measured here: the API server, the agents and their watches (`nixroll bench` without
//! `--builders` measures those at the same scale).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use crate::agent::host::{Host, HostRoot, RebootHook};
use crate::api::BuildReport;
use crate::builder::{BinaryCache, Builder, CacheOptions, NarInfo, SigningKey, nix_base32};
use crate::nix::{Nix, NixError};
use crate::rollout::build::{BuilderInfo, Fetch, Wanted, fetch_for, plan};

/// The Nix systems the nodes are spread over (first `systems` of these).
const SYSTEMS: [&str; 4] = ["x86_64-linux", "aarch64-linux", "riscv64-linux", "armv7l-linux"];

#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildCounts {
    pub nodes: usize,
    pub nix_systems: usize,
    pub builders: usize,
    /// Planning rounds (each: every node asks once; every builder runs its requests).
    pub rounds: usize,
    /// Nix processes that evaluated an installable (`nix build` of a flake), all builders.
    pub evaluations: usize,
    /// Distinct systems built (one per request the builders started).
    pub builds: usize,
    /// Nodes pointed at a built store path to fetch.
    pub fetches: usize,
    /// Nodes that would evaluate and build by themselves (no builder for their system).
    pub self_builds: usize,
    /// Requests the builders were handed over all rounds (repeats are not rebuilt).
    pub requests_seen: usize,
}

/// A Nix that only counts: a realise returns a made-up store path of the installable.
#[derive(Debug, Default)]
struct CountingNix {
    evaluations: AtomicUsize,
}

fn fake_path(installable: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, installable.as_bytes());
    let hash: String = nix_base32(digest.as_ref()).chars().take(32).collect();
    let host = installable
        .split("nixosConfigurations.")
        .nth(1)
        .and_then(|s| s.split(".config.").next())
        .unwrap_or("host");
    format!("/nix/store/{hash}-nixos-system-{host}")
}

impl Nix for CountingNix {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        _gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        self.evaluations.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(fake_path(installable)) })
    }

    fn realise_many<'a>(
        &'a self,
        installables: &'a [String],
        _gc_roots: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Vec<String>, NixError>> {
        self.evaluations.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(installables.iter().map(|i| fake_path(i)).collect()) })
    }

    fn closure_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<NarInfo>, NixError>> {
        Box::pin(async move {
            let digest = ring::digest::digest(&ring::digest::SHA256, path.as_bytes());
            Ok(vec![NarInfo {
                path: path.to_string(),
                nar_hash: format!("sha256:{}", nix_base32(digest.as_ref())),
                nar_size: 1,
                references: Vec::new(),
                deriver: None,
                ca: None,
            }])
        })
    }

    fn closure_bytes<'a>(&'a self, _path: &'a str) -> BoxFuture<'a, Result<u64, NixError>> {
        Box::pin(async { Ok(0) })
    }

    fn set_profile<'a>(&'a self, _p: &'a Path, _s: &'a str) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async { Ok(()) })
    }

    fn rollback_profile<'a>(&'a self, _p: &'a Path) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A new signing key.
fn random_key(name: &str) -> Result<SigningKey, String> {
    SigningKey::generate_secret(name)
        .and_then(|s| SigningKey::parse(&s))
        .map_err(|e| e.to_string())
}

/// Stage one revision on `nodes` nodes of `systems` Nix systems (at most 4) with one builder
/// per system (and a standby for the first), over `rounds` planning rounds.
pub async fn run(nodes: usize, systems: usize, rounds: usize) -> Result<BuildCounts, String> {
    let systems = systems.clamp(1, SYSTEMS.len());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let installables: Vec<String> = SYSTEMS[..systems]
        .iter()
        .map(|s| {
            crate::api::installable(
                "git+https://git.example.org/infra.git",
                &"a".repeat(40),
                &format!("worker-{s}"),
            )
        })
        .collect();
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:04}")).collect();
    // Builders: one per system, and an idle standby of the first.
    let mut builder_names: Vec<(String, &str)> = SYSTEMS[..systems]
        .iter()
        .map(|s| (format!("builder-{s}"), *s))
        .collect();
    builder_names.push((format!("builder-{}-standby", SYSTEMS[0]), SYSTEMS[0]));
    let nix = Arc::new(CountingNix::default());
    let mut roles: BTreeMap<String, Builder> = BTreeMap::new();
    for (name, _) in &builder_names {
        let host: Arc<dyn Host> = Arc::new(HostRoot::new(dir.path().join(name), RebootHook::None));
        let cache = BinaryCache::new(host.clone(), random_key(name)?, CacheOptions::default());
        roles.insert(name.clone(), Builder::new(host, nix.clone(), cache));
    }
    let mut reports: BTreeMap<String, Vec<BuildReport>> = BTreeMap::new();
    let mut counts = BuildCounts {
        nodes,
        nix_systems: systems,
        builders: builder_names.len(),
        rounds,
        evaluations: 0,
        builds: 0,
        fetches: 0,
        self_builds: 0,
        requests_seen: 0,
    };
    for _ in 0..rounds.max(1) {
        let infos: Vec<BuilderInfo<'_>> = builder_names
            .iter()
            .map(|(name, sys)| BuilderInfo {
                name,
                nix_system: sys,
                cache: Some("http://builder:5080"),
                reports: reports.get(name).map(Vec::as_slice).unwrap_or_default(),
                available: true,
            })
            .collect();
        let wanted: Vec<Wanted<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Wanted {
                node: n,
                nix_system: Some(SYSTEMS[i % systems]),
                installable: &installables[i % systems],
                retry: None,
            })
            .collect();
        let p = plan(&infos, wanted.iter().copied());
        counts.fetches = 0;
        counts.self_builds = 0;
        for w in &wanted {
            match fetch_for(w, &infos) {
                Fetch::Ready(_) => counts.fetches += 1,
                Fetch::Itself => counts.self_builds += 1,
                _ => {}
            }
        }
        let mut next = BTreeMap::new();
        for (name, requests) in p {
            counts.requests_seen += requests.len();
            if let Some(role) = roles.get_mut(name) {
                next.insert(name.to_string(), role.run(&requests).await);
            }
        }
        reports = next;
    }
    counts.evaluations = nix.evaluations.load(Ordering::SeqCst);
    counts.builds = roles.values().map(Builder::builds_started).sum();
    Ok(counts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// 1,000 nodes of 3 Nix systems: 3 evaluations and 3 builds, every node fetches, asked
    /// over and over (5 rounds) nothing is built again, the standby builds nothing.
    #[tokio::test]
    async fn a_thousand_nodes_of_three_systems_evaluate_and_build_three_times() {
        let c = run(1000, 3, 5).await.unwrap();
        assert_eq!((c.evaluations, c.builds), (3, 3), "{c:?}");
        assert_eq!(c.fetches, 1000, "{c:?}");
        assert_eq!(c.self_builds, 0);
        assert_eq!(c.requests_seen, 15, "3 requests a round, 5 rounds: {c:?}");
    }
}
