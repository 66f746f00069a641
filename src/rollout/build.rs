//! Build once per distinct system (pure: no kube, no clock). Which builder builds what, and
//! what a node does about its target: build it itself (no builder for its Nix system: the
//! behaviour without builders), wait for the builder, fetch the built store path, or report
//! the builder's failure. See docs/builder.md.

use std::collections::BTreeMap;

use crate::api::{BuildProgress, BuildReport, BuildRequest, BuildState, TargetBuild};

/// A builder as the controller sees it: a Node labelled `nixroll.io/builder=true` whose agent
/// reported its Nix system.
#[derive(Clone, Copy, Debug)]
pub struct BuilderInfo<'a> {
    pub name: &'a str,
    pub nix_system: &'a str,
    /// Where it serves its cache (`status.agent.cache`).
    pub cache: Option<&'a str>,
    /// Its agent's reports (`status.agent.builds`).
    pub reports: &'a [BuildReport],
    /// Outside its own disruption window (not cordoned, draining, activating, rebooting or
    /// verifying, and Ready): only then does it start builds. What it already built it keeps
    /// serving.
    pub available: bool,
}

impl BuilderInfo<'_> {
    fn built(&self, installable: &str) -> bool {
        self.reports
            .iter()
            .any(|r| r.installable == installable && r.state == BuildState::Built && r.system.is_some())
    }
}

/// What one node wants built.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    pub node: &'a str,
    pub nix_system: Option<&'a str>,
    pub installable: &'a str,
    /// The node's `status.retryToken` (the last `nixroll.io/retry` value acted on).
    pub retry: Option<&'a str>,
}

/// Whether retry token `a` is newer than `b`: numbers (`$(date +%s)`) by value, other text by
/// its order; any token is newer than none.
pub fn newer(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(a), Some(b)) => match (a.parse::<u128>(), b.parse::<u128>()) {
            (Ok(x), Ok(y)) => x > y,
            _ => a > b,
        },
    }
}

/// Who builds `w`'s system, if any builder of its Nix system is configured.
#[derive(Clone, Copy, Debug)]
pub enum Choice<'a> {
    /// No builder for its Nix system (or the system is not known yet): the node builds itself.
    None,
    /// This builder built it or is to build it.
    Builder(BuilderInfo<'a>),
    /// Every builder of its Nix system is inside its own disruption window and none has built
    /// it: wait (the first by name is named).
    Unavailable(BuilderInfo<'a>),
}

/// The builder of `w`: one that already built it (whatever its state: it keeps serving what
/// it built), else the first by name of its Nix system outside its own disruption window, so
/// that each system is built once and never on a builder that is being cordoned, drained or
/// rebooted; others of the same system stay idle.
pub fn choose<'a>(w: &Wanted<'_>, builders: &[BuilderInfo<'a>]) -> Choice<'a> {
    let Some(sys) = w.nix_system else {
        return Choice::None;
    };
    let mut of_system: Vec<&BuilderInfo<'a>> = builders.iter().filter(|b| b.nix_system == sys).collect();
    of_system.sort_by_key(|b| b.name);
    let Some(first) = of_system.first() else {
        return Choice::None;
    };
    if let Some(b) = of_system.iter().find(|b| b.built(w.installable)) {
        return Choice::Builder(**b);
    }
    match of_system.iter().find(|b| b.available) {
        Some(b) => Choice::Builder(**b),
        None => Choice::Unavailable(**first),
    }
}

/// The builds each builder is to run (its `status.builds`): the distinct installables of the
/// nodes of its Nix system, each once, with how many nodes want it. Builders with nothing to
/// do get an empty list.
pub fn plan<'a>(
    builders: &[BuilderInfo<'a>],
    wanted: impl IntoIterator<Item = Wanted<'a>>,
) -> BTreeMap<&'a str, Vec<BuildRequest>> {
    let mut per: BTreeMap<&'a str, BTreeMap<&'a str, (u32, Option<&'a str>)>> =
        builders.iter().map(|b| (b.name, BTreeMap::new())).collect();
    for w in wanted {
        if let Choice::Builder(b) = choose(&w, builders) {
            let e = per.entry(b.name).or_default().entry(w.installable).or_default();
            e.0 += 1;
            if newer(w.retry, e.1) {
                e.1 = w.retry;
            }
        }
    }
    per.into_iter()
        .map(|(b, m)| {
            let reqs = m
                .into_iter()
                .map(|(installable, (nodes, retry))| BuildRequest {
                    installable: installable.to_string(),
                    nodes,
                    retry: retry.map(str::to_string),
                })
                .collect();
            (b, reqs)
        })
        .collect()
}

/// What a node does about its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// No builder for its Nix system: the node builds its target itself (as without builders).
    Itself,
    /// The builder has not built it yet (`Queued` or `Building`).
    Waiting {
        builder: String,
        message: String,
        progress: BuildProgress,
    },
    /// Built: the node fetches exactly this (`status.target.build`).
    Ready(TargetBuild),
    /// The evaluation or build failed on the builder: one failure, on the revision, for every
    /// node that wants it.
    Failed { builder: String, message: String },
}

/// What `w`'s node does, given the builders and their reports.
pub fn fetch_for(w: &Wanted<'_>, builders: &[BuilderInfo<'_>]) -> Fetch {
    let b = match choose(w, builders) {
        Choice::None => return Fetch::Itself,
        Choice::Builder(b) => b,
        Choice::Unavailable(b) => {
            return Fetch::Waiting {
                builder: b.name.to_string(),
                message: format!(
                    "queued: every builder of {} is in its disruption window (cordoned, draining, rebooting); waiting for {}",
                    b.nix_system, b.name
                ),
                progress: BuildProgress::Queued,
            };
        }
    };
    let report = b.reports.iter().find(|r| r.installable == w.installable);
    match report {
        Some(r) if r.state == BuildState::Built => match &r.system {
            Some(system) => Fetch::Ready(TargetBuild {
                system: system.clone(),
                builder: Some(b.name.to_string()),
                cache: b.cache.map(str::to_string),
                progress: None,
                built_at: Some(r.at.clone()),
            }),
            None => Fetch::Waiting {
                builder: b.name.to_string(),
                message: format!("builder {} reported a build without its store path", b.name),
                progress: BuildProgress::Building,
            },
        },
        // Failed before this node asked for a retry: built again (the request carries the
        // node's token), so it waits for that build.
        Some(r) if r.state == BuildState::Failed && newer(w.retry, r.retry.as_deref()) => Fetch::Waiting {
            builder: b.name.to_string(),
            message: format!("retrying the failed build on {}", b.name),
            progress: BuildProgress::Queued,
        },
        Some(r) if r.state == BuildState::Failed => Fetch::Failed {
            builder: b.name.to_string(),
            message: format!(
                "the build failed on builder {} (its agent's log has the output): {}",
                b.name,
                r.message.as_deref().unwrap_or("no message")
            ),
        },
        Some(_) => Fetch::Waiting {
            builder: b.name.to_string(),
            message: format!("building on {}", b.name),
            progress: BuildProgress::Building,
        },
        None => Fetch::Waiting {
            builder: b.name.to_string(),
            message: format!("queued for builder {}", b.name),
            progress: BuildProgress::Queued,
        },
    }
}

/// Where `node`'s system is (`status.target.build.progress`), given what it does about its
/// target and what its agent staged; `None` without a builder.
pub fn progress(fetch: &Fetch, node: &str, staged: Option<&str>) -> Option<BuildProgress> {
    Some(match fetch {
        Fetch::Itself => return None,
        Fetch::Waiting { progress, .. } => *progress,
        Fetch::Failed { .. } => BuildProgress::Failed,
        Fetch::Ready(b) if staged == Some(b.system.as_str()) => BuildProgress::Staged,
        Fetch::Ready(b) if b.builder.as_deref() == Some(node) => BuildProgress::Built,
        Fetch::Ready(_) => BuildProgress::Fetching,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const SYSTEMS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "riscv64-linux"];

    fn report(installable: &str, state: BuildState, system: Option<&str>) -> BuildReport {
        BuildReport {
            installable: installable.into(),
            state,
            system: system.map(str::to_string),
            message: (state == BuildState::Failed).then(|| "error: attribute missing".into()),
            at: Time(Timestamp::UNIX_EPOCH),
            retry: None,
        }
    }

    #[test]
    fn a_thousand_nodes_of_three_systems_make_three_builds() {
        let names: Vec<String> = (0..1000).map(|i| format!("node-{i:04}")).collect();
        let installables: Vec<String> = SYSTEMS
            .iter()
            .map(|s| format!("git+https://example.org/infra?rev={}#nixosConfigurations.worker-{s}.config.system.build.toplevel", "a".repeat(40)))
            .collect();
        let wanted: Vec<Wanted<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Wanted {
                node: n,
                nix_system: Some(SYSTEMS[i % 3]),
                installable: &installables[i % 3],
                retry: None,
            })
            .collect();
        // Two builders for x86_64: only one of them builds.
        let builders = [
            BuilderInfo {
                name: "b-x86-2",
                nix_system: SYSTEMS[0],
                cache: None,
                reports: &[],
                available: true,
            },
            BuilderInfo {
                name: "b-x86-1",
                nix_system: SYSTEMS[0],
                cache: None,
                reports: &[],
                available: true,
            },
            BuilderInfo {
                name: "b-arm",
                nix_system: SYSTEMS[1],
                cache: None,
                reports: &[],
                available: true,
            },
            BuilderInfo {
                name: "b-rv",
                nix_system: SYSTEMS[2],
                cache: None,
                reports: &[],
                available: true,
            },
        ];
        let p = plan(&builders, wanted.iter().copied());
        let builds: usize = p.values().map(Vec::len).sum();
        assert_eq!(builds, 3, "{p:?}");
        assert!(p["b-x86-2"].is_empty());
        assert_eq!(p["b-x86-1"].len(), 1);
        let nodes: u32 = p.values().flatten().map(|r| r.nodes).sum();
        assert_eq!(nodes, 1000);
        for w in &wanted {
            assert!(matches!(fetch_for(w, &builders), Fetch::Waiting { .. }));
        }
    }

    /// A builder inside its own disruption window starts no build: the next builder of its
    /// Nix system builds, or the nodes wait when there is none; what a builder already built
    /// stays where it is (no second build elsewhere), whatever its state.
    #[test]
    fn no_build_starts_on_a_builder_in_its_disruption_window() {
        let i = "f?rev=1#nixosConfigurations.a.config.system.build.toplevel";
        let j = "f?rev=1#nixosConfigurations.b.config.system.build.toplevel";
        let w = |installable| Wanted {
            node: "n",
            nix_system: Some("x86_64-linux"),
            installable,
            retry: None,
        };
        let b = |name, available, reports| BuilderInfo {
            name,
            nix_system: "x86_64-linux",
            cache: Some("http://b:5080"),
            reports,
            available,
        };
        // b-1 is draining: b-2 builds both.
        let two = [b("b-1", false, &[]), b("b-2", true, &[])];
        let p = plan(&two, [w(i), w(j)]);
        assert!(p["b-1"].is_empty(), "{p:?}");
        assert_eq!(p["b-2"].len(), 2);
        assert!(matches!(fetch_for(&w(i), &two), Fetch::Waiting { builder, .. } if builder == "b-2"));
        // The only builder is draining: nothing is built, the node waits and says why.
        let one = [b("b-1", false, &[])];
        assert!(plan(&one, [w(i)])["b-1"].is_empty());
        match fetch_for(&w(i), &one) {
            Fetch::Waiting {
                builder,
                message,
                progress,
            } => {
                assert_eq!(builder, "b-1");
                assert!(message.contains("disruption window"), "{message}");
                assert_eq!(progress, BuildProgress::Queued);
            }
            other => panic!("{other:?}"),
        }
        // b-1 built `i` before it was cordoned: it keeps it (no build on b-2) and serves it;
        // `j`, not built yet, goes to b-2.
        let built = [report(
            i,
            BuildState::Built,
            Some("/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-nixos-system-a"),
        )];
        let two = [b("b-1", false, &built), b("b-2", true, &[])];
        let p = plan(&two, [w(i), w(j)]);
        assert_eq!(
            p["b-1"]
                .iter()
                .map(|r| r.installable.as_str())
                .collect::<Vec<_>>(),
            [i]
        );
        assert_eq!(
            p["b-2"]
                .iter()
                .map(|r| r.installable.as_str())
                .collect::<Vec<_>>(),
            [j]
        );
        assert!(matches!(fetch_for(&w(i), &two), Fetch::Ready(t) if t.builder.as_deref() == Some("b-1")));
    }

    /// A failed build is not remembered forever: a node retried (`nixroll.io/retry`) asks for
    /// the build again under its token and waits for it; nodes that did not retry keep the
    /// failure; the failure of the retried build counts for the retried node.
    #[test]
    fn a_retried_node_asks_the_builder_again() {
        let i = "f?rev=1#nixosConfigurations.a.config.system.build.toplevel";
        let w = |node, retry| Wanted {
            node,
            nix_system: Some("x86_64-linux"),
            installable: i,
            retry,
        };
        let failed = |retry: Option<&str>| {
            let mut r = report(i, BuildState::Failed, None);
            r.retry = retry.map(str::to_string);
            [r]
        };
        let b = |reports| BuilderInfo {
            name: "b-1",
            nix_system: "x86_64-linux",
            cache: None,
            reports,
            available: true,
        };
        let before = failed(None);
        let builders = [b(&before)];
        // n2 retried with 1765100000: the request carries the newest token.
        let p = plan(
            &builders,
            [w("n1", None), w("n2", Some("1765100000")), w("n3", Some("999"))],
        );
        assert_eq!(p["b-1"][0].retry.as_deref(), Some("1765100000"));
        assert!(matches!(
            fetch_for(&w("n2", Some("1765100000")), &builders),
            Fetch::Waiting { .. }
        ));
        assert!(matches!(
            fetch_for(&w("n1", None), &builders),
            Fetch::Failed { .. }
        ));
        // The retried build failed again: that failure is n2's (and n1's) too.
        let again = failed(Some("1765100000"));
        let builders = [b(&again)];
        assert!(matches!(
            fetch_for(&w("n2", Some("1765100000")), &builders),
            Fetch::Failed { .. }
        ));
        assert!(matches!(
            fetch_for(&w("n3", Some("999")), &builders),
            Fetch::Failed { .. }
        ));
        assert!(newer(Some("10"), Some("9")) && !newer(Some("9"), Some("10")));
        assert!(newer(Some("b"), Some("a")) && newer(Some("a"), None) && !newer(None, Some("a")));
    }

    #[test]
    fn nodes_fetch_what_was_built_wait_share_a_failure_or_build_themselves() {
        let ok = "f?rev=1#nixosConfigurations.a.config.system.build.toplevel";
        let bad = "f?rev=1#nixosConfigurations.b.config.system.build.toplevel";
        let queued = "f?rev=1#nixosConfigurations.c.config.system.build.toplevel";
        let reports = [
            report(
                ok,
                BuildState::Built,
                Some("/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-nixos-system-a"),
            ),
            report(bad, BuildState::Failed, None),
        ];
        let builders = [BuilderInfo {
            name: "builder-1",
            nix_system: "x86_64-linux",
            cache: Some("http://10.0.0.5:5080"),
            reports: &reports,
            available: true,
        }];
        let w = |installable, sys| Wanted {
            node: "n",
            nix_system: sys,
            installable,
            retry: None,
        };
        match fetch_for(&w(ok, Some("x86_64-linux")), &builders) {
            Fetch::Ready(b) => {
                assert_eq!(
                    b.system,
                    "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-nixos-system-a"
                );
                assert_eq!(b.builder.as_deref(), Some("builder-1"));
                assert_eq!(b.cache.as_deref(), Some("http://10.0.0.5:5080"));
            }
            other => panic!("{other:?}"),
        }
        match fetch_for(&w(bad, Some("x86_64-linux")), &builders) {
            Fetch::Failed { builder, message } => {
                assert_eq!(builder, "builder-1");
                assert!(
                    message.contains("attribute missing") && message.contains("builder-1"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            fetch_for(&w(queued, Some("x86_64-linux")), &builders),
            Fetch::Waiting { .. }
        ));
        // Progress: queued, building, fetching (another node), built (the builder itself),
        // staged, failed.
        let building = [report(queued, BuildState::Building, None)];
        let busy = [BuilderInfo {
            reports: &building,
            ..builders[0]
        }];
        let at = |i, node, staged| progress(&fetch_for(&w(i, Some("x86_64-linux")), &builders), node, staged);
        let built = "/nix/store/snwk4inds1ls7q83128vqfxsjigdbl0q-nixos-system-a";
        assert_eq!(at(queued, "n", None), Some(BuildProgress::Queued));
        assert_eq!(
            progress(&fetch_for(&w(queued, Some("x86_64-linux")), &busy), "n", None),
            Some(BuildProgress::Building)
        );
        assert_eq!(at(ok, "n", None), Some(BuildProgress::Fetching));
        assert_eq!(
            at(ok, "n", Some("/nix/store/other")),
            Some(BuildProgress::Fetching)
        );
        assert_eq!(at(ok, "builder-1", None), Some(BuildProgress::Built));
        assert_eq!(at(ok, "n", Some(built)), Some(BuildProgress::Staged));
        assert_eq!(at(ok, "builder-1", Some(built)), Some(BuildProgress::Staged));
        assert_eq!(at(bad, "n", None), Some(BuildProgress::Failed));
        assert_eq!(progress(&Fetch::Itself, "n", Some(built)), None);
        // No builder for the system, or the system not reported yet: today's behaviour.
        assert_eq!(fetch_for(&w(ok, Some("aarch64-linux")), &builders), Fetch::Itself);
        assert_eq!(fetch_for(&w(ok, None), &builders), Fetch::Itself);
        assert_eq!(fetch_for(&w(ok, Some("x86_64-linux")), &[]), Fetch::Itself);
    }
}
