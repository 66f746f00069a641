//! Following a source end to end over the embedded Kubernetes API: a FlakeSource on a real git
//! repository (`file://`, resolved by the real git2 resolver), the real controller (NixOSNodes
//! and FlakeSources) and one real agent per simulated host. And a Flux GitRepository (its CRD
//! applied to the embedded API, its status set by hand). See docs/source.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::following::{
    WAIT, commit_of, condition, follow_config, follow_source, runs, simulated, source_spec, status_of,
    wait_nodes, wait_source,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use nixroll::api::{NixOSNode, Phase, SourceKind, SourceRef};
use nixroll::controller::ControllerConfig;
use nixroll::sim::world::World;
use serde_json::json;

const NODES: usize = 3;

fn config(cache: &std::path::Path) -> ControllerConfig {
    follow_config("follow", cache)
}

async fn boot_ids(world: &World) -> Vec<String> {
    world.nodes.iter().map(|n| n.host.boot_id()).collect()
}

/// The follow flow: adoption and a commit that changes nothing disrupt nothing; two commits
/// roll out by themselves, the second (landing mid-rollout) only after the first is done
/// everywhere; an unreachable remote and a force push change nothing downstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_follow_a_branch() {
    let mut world = World::start(simulated(NODES)).await.unwrap();
    let (repo, branch) = world.follow_in_git().unwrap();
    let flake = format!("git+file://{}?ref=refs/heads/{branch}", repo.display());
    world.publish_flake(&flake);
    let head0 = world.head().to_string();

    let sources = follow_source(&world, source_spec(&repo, &branch, "1s", json!({}))).await;
    let cache = tempfile::tempdir().unwrap();
    let boots = boot_ids(&world).await;
    let c = world.start_controller(config(cache.path())).await.unwrap();

    // Adoption: the source resolves the branch, the nodes already run its system.
    let fs = wait_source(&sources, "the first resolution", |fs| {
        commit_of(fs) == Some(head0.as_str())
    })
    .await;
    let st = fs.status.clone().unwrap();
    assert_eq!(st.revision, Some(format!("{branch}@sha1:{head0}")));
    assert_eq!(condition(&fs, "Ready").unwrap().0, "True");
    wait_nodes(
        &world,
        "adoption",
        |m| m.values().all(|o| runs(o, &head0)),
        |_| {},
    )
    .await;

    // A commit that leaves the system unchanged: new revision everywhere, nothing disrupted.
    let same = world.commit("docs only", |_| {}).unwrap();
    wait_nodes(
        &world,
        "the no-op commit",
        |m| m.values().all(|o| runs(o, &same)),
        |_| {},
    )
    .await;
    assert_eq!(boot_ids(&world).await, boots, "a no-op commit rebooted a node");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(world.client.clone());
    for n in &world.nodes {
        let node = nodes.get(&n.name).await.unwrap();
        assert!(
            !node
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key("nixroll.io/cordoned")
        );
        assert!(!node.spec.unwrap_or_default().unschedulable.unwrap_or(false));
    }
    for o in world.nixosnodes().await.unwrap().values() {
        let h = &status_of(o).history[0];
        assert_eq!((h.revision.as_str(), h.rebooted), (same.as_str(), false));
        assert!(
            h.message.as_deref().unwrap_or("").contains("nothing disrupted"),
            "{h:?}"
        );
        assert!(status_of(o).slot.is_none());
    }

    // Commit 1 (a new kernel: every node reboots) rolls out by itself; commit 2 lands while
    // it is in flight and starts only once every node runs commit 1.
    let rev1 = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    wait_nodes(
        &world,
        "commit 1 in flight",
        |m| {
            m.values()
                .any(|o| status_of(o).phase.is_some_and(Phase::is_disruptive))
        },
        |_| {},
    )
    .await;
    let rev2 = world.commit("service change", |s| s.service.push('+')).unwrap();
    let mut mixed = Vec::new();
    wait_nodes(
        &world,
        "commit 2 everywhere",
        |m| m.values().all(|o| runs(o, &rev2)),
        |m| {
            // Never a node on commit 2 while another has not finished commit 1.
            let on2 = m.values().any(|o| {
                let s = status_of(o);
                s.target.as_ref().is_some_and(|t| t.revision == rev2) || s.revision.as_deref() == Some(&rev2)
            });
            let behind: Vec<&String> = m
                .iter()
                .filter(|(_, o)| {
                    let r = status_of(o).revision;
                    r.as_deref() != Some(rev1.as_str()) && r.as_deref() != Some(rev2.as_str())
                })
                .map(|(n, _)| n)
                .collect();
            let m = format!("{behind:?} not on {rev1} while commit 2 started");
            if on2 && !behind.is_empty() && mixed.last() != Some(&m) {
                mixed.push(m);
            }
        },
    )
    .await;
    assert!(mixed.is_empty(), "the fleet was mixed: {mixed:?}");
    let all = world.nixosnodes().await.unwrap();
    for o in all.values() {
        let st = status_of(o);
        let revs: Vec<&str> = st.history.iter().map(|h| h.revision.as_str()).collect();
        assert!(revs.starts_with(&[rev2.as_str(), rev1.as_str()]), "{revs:?}");
    }

    // An unreachable remote: FetchFailed, the revision stays, nothing starts.
    let moved = repo.with_extension("away");
    std::fs::rename(&repo, &moved).unwrap();
    let fs = wait_source(&sources, "FetchFailed", |fs| {
        condition(fs, "FetchFailed").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(commit_of(&fs), Some(rev2.as_str()), "the last revision stays");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for o in world.nixosnodes().await.unwrap().values() {
        assert!(runs(o, &rev2));
        assert!(status_of(o).target.is_none(), "nothing starts");
    }
    std::fs::rename(&moved, &repo).unwrap();
    wait_source(&sources, "recovery", |fs| {
        condition(fs, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;

    // A force push (the branch reset to commit 1) is refused: NonFastForward, nothing moves.
    // (Retried: once in a loaded run `git reset` failed; its stderr is in the message.)
    let mut out = None;
    for _ in 0..5 {
        let o = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["reset", "-q", "--hard", &rev1])
            .output()
            .unwrap();
        let ok = o.status.success();
        out = Some(o);
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "git reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fs = wait_source(&sources, "NonFastForward", |fs| {
        condition(fs, "NonFastForward").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(commit_of(&fs), Some(rev2.as_str()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for o in world.nixosnodes().await.unwrap().values() {
        assert!(runs(o, &rev2), "a force push moved a node backwards");
    }

    // A Secret that is not there: FetchFailed (SecretNotFound), the revision stays.
    let patch = json!({"spec": {"secretRef": {"name": "flake-source-credentials"}}});
    sources
        .patch("infra", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let fs = wait_source(&sources, "SecretNotFound", |fs| {
        fs.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "FetchFailed" && c.reason == "SecretNotFound")
        })
    })
    .await;
    assert_eq!(commit_of(&fs), Some(rev2.as_str()));

    // What `kubectl describe flakesource infra` shows: one Event per status change, in the
    // source's namespace; the same failure polled every second did not pile up.
    let events = wait_source_events(&world, &["NewRevision", "NonFastForward", "SecretNotFound"]).await;
    let new_revisions: Vec<&String> = events
        .iter()
        .filter(|(reason, _, _)| reason == "NewRevision")
        .map(|(_, _, note)| note)
        .collect();
    assert!(
        new_revisions
            .iter()
            .any(|n| n.contains(&rev2) && n.contains(&rev1)),
        "the second commit's Event names both revisions: {new_revisions:?}"
    );
    for (reason, kind, note) in &events {
        let warning = !matches!(reason.as_str(), "NewRevision" | "Succeeded");
        assert_eq!(
            kind,
            if warning { "Warning" } else { "Normal" },
            "{reason}: {note}"
        );
    }
    let warnings = events.iter().filter(|(_, kind, _)| kind == "Warning").count();
    assert!(
        (3..=6).contains(&warnings),
        "one Warning per new failure (gone repository, force push, missing Secret), not one per poll: {events:?}"
    );
    c.stop().await;
}

/// The Events about FlakeSource nixroll-system/infra as (reason, type, note), once every reason
/// in `reasons` is among them (bounded wait: Events are published after the status write).
async fn wait_source_events(world: &World, reasons: &[&str]) -> Vec<(String, String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(world.client.clone(), "nixroll-system");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events: Vec<(String, String, String)> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("FlakeSource") && r.name.as_deref() == Some("infra")
                })
            })
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect();
        if reasons
            .iter()
            .all(|r| events.iter().any(|(reason, _, _)| reason == r))
        {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for Events {reasons:?}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gitrepository_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gitrepositories.source.toolkit.fluxcd.io"},
        "spec": {
            "group": "source.toolkit.fluxcd.io",
            "names": {"kind": "GitRepository", "listKind": "GitRepositoryList", "plural": "gitrepositories", "singular": "gitrepository"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap()
}

fn gitrepository_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository"),
        "gitrepositories",
    )
}

/// Create the GitRepository `name` (spec only, as Flux's user writes it); its generation.
async fn create_repo(api: &Api<DynamicObject>, ar: &ApiResource, name: &str) -> i64 {
    let mut obj = DynamicObject::new(name, ar).within("nixroll-system");
    obj.data = json!({"spec": {"interval": "1m", "url": "https://example.org/infra.git", "ref": {"branch": "main"}}});
    let created = api.create(&PostParams::default(), &obj).await.unwrap();
    created.metadata.generation.unwrap_or(1)
}

/// Write the GitRepository `name`'s status as Flux's source-controller would.
async fn set_repo_status(api: &Api<DynamicObject>, name: &str, ready: &str, observed: i64, revision: &str) {
    let body = json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "status": {
            "observedGeneration": observed,
            "conditions": [{"type": "Ready", "status": ready, "reason": if ready == "True" { "Succeeded" } else { "GitOperationFailed" },
                            "message": "set by the test", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "artifact": {"revision": revision, "path": "x", "url": "http://x", "lastUpdateTime": "2026-01-01T00:00:00Z"}
        }
    });
    api.patch_status(
        name,
        &PatchParams::apply("source-controller").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

/// A new node's first status message: it has nothing to target, naming `source`; it did not
/// start (bounded wait).
async fn assert_nothing_to_target(api: &Api<NixOSNode>, node: &str, source: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status_of(&api.get(node).await.unwrap());
        if let Some(m) = &s.message {
            assert!(m.contains("nothing to roll out yet") && m.contains(source), "{m}");
            assert!(s.phase.is_none() && s.target.is_none(), "{s:?}");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Flux's GitRepository: Flux installed after nixroll is picked up at once; followed when
/// Ready at its generation (the legacy `main/<sha>` form parsed), ignored while not Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_follow_a_flux_gitrepository() {
    let mut world = World::start(simulated(NODES)).await.unwrap();
    let mut spec = world.spec("");
    spec.source_ref = Some(SourceRef {
        kind: SourceKind::GitRepository,
        name: "infra".into(),
        namespace: None,
    });
    world.apply_all(&spec).await.unwrap();
    // nixroll runs before Flux is installed: its nodes wait, saying why.
    let cache = tempfile::tempdir().unwrap();
    let c = world.start_controller(config(cache.path())).await.unwrap();
    wait_nodes(
        &world,
        "nodes saying their GitRepository is missing",
        |m| {
            m.values().all(|o| {
                status_of(o)
                    .message
                    .is_some_and(|m| m.contains("nothing to roll out yet") && m.contains("infra"))
            })
        },
        |_| {},
    )
    .await;
    // Flux is installed: its CRD, then the GitRepository.
    let crds: Api<CustomResourceDefinition> = Api::all(world.client.clone());
    crds.create(&PostParams::default(), &gitrepository_crd())
        .await
        .unwrap();
    let ar = gitrepository_resource();
    let repos: Api<DynamicObject> = Api::namespaced_with(world.client.clone(), "nixroll-system", &ar);
    let generation = create_repo(&repos, &ar, "infra").await;
    let head0 = world.head().to_string();
    set_repo_status(&repos, "infra", "True", generation, &format!("main/{head0}")).await;
    wait_nodes(
        &world,
        "adoption (legacy revision form)",
        |m| m.values().all(|o| runs(o, &head0)),
        |_| {},
    )
    .await;

    // A new artifact while the GitRepository is not Ready: ignored.
    let rev1 = world.commit("service change", |s| s.service.push('+')).unwrap();
    set_repo_status(&repos, "infra", "False", generation, &format!("main@sha1:{rev1}")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for o in world.nixosnodes().await.unwrap().values() {
        assert!(runs(o, &head0), "followed a GitRepository that is not Ready");
        assert!(status_of(o).target.is_none());
    }
    // Ready at another generation: still ignored.
    set_repo_status(
        &repos,
        "infra",
        "True",
        generation - 1,
        &format!("main@sha1:{rev1}"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for o in world.nixosnodes().await.unwrap().values() {
        assert!(
            status_of(o).target.is_none(),
            "followed a stale GitRepository status"
        );
    }
    // A second GitRepository, Ready, that no node follows (used after Flux is removed). It is
    // created before the next status change of "infra": the nodes reacting to that change
    // prove the controller's GitRepository watch has also seen this one (one watch, events in
    // resourceVersion order).
    let spare_generation = create_repo(&repos, &ar, "spare").await;
    set_repo_status(
        &repos,
        "spare",
        "True",
        spare_generation,
        &format!("main@sha1:{rev1}"),
    )
    .await;
    // Ready: followed.
    set_repo_status(&repos, "infra", "True", generation, &format!("main@sha1:{rev1}")).await;
    wait_nodes(
        &world,
        "the Ready revision",
        |m| m.values().all(|o| runs(o, &rev1)),
        |_| {},
    )
    .await;
    // A node following a source that does not exist: nothing starts, its status says why.
    let mut ghost = world.spec("");
    ghost.source_ref = Some(SourceRef {
        kind: SourceKind::FlakeSource,
        name: "nope".into(),
        namespace: None,
    });
    ghost.flake = String::new();
    world.apply("node-1", &ghost).await.unwrap();
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let o = api.get("node-1").await.unwrap();
        let s = status_of(&o);
        // node-1 runs rev1 and keeps it: a source that offers nothing changes nothing.
        assert!(s.target.is_none(), "{s:?}");
        if s.observed_generation == o.metadata.generation && s.revision.as_deref() == Some(rev1.as_str()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new node following it has nothing to target: its status says why.
    world.apply("node-9", &ghost).await.unwrap();
    assert_nothing_to_target(&api, "node-9", "nope").await;
    // Flux removed: its CRD, and with it every GitRepository, is gone and their offers are
    // forgotten, so a new node following "spare" has nothing to target. (A group already
    // pinned keeps its pin until its members run it, docs/source.md; "spare" has no pin.)
    crds.delete("gitrepositories.source.toolkit.fluxcd.io", &Default::default())
        .await
        .unwrap();
    // The deletion reaches the controller's CRD watch within milliseconds; a node created
    // before that would be pinned to the old offer, as any started node keeps its target.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut gitrepo = world.spec("");
    gitrepo.source_ref = Some(SourceRef {
        kind: SourceKind::GitRepository,
        name: "spare".into(),
        namespace: None,
    });
    world.apply("node-8", &gitrepo).await.unwrap();
    assert_nothing_to_target(&api, "node-8", "spare").await;
    for (name, o) in world.nixosnodes().await.unwrap() {
        if name != "node-8" && name != "node-9" && name != "node-1" {
            assert!(runs(&o, &rev1), "{name} kept what it runs");
        }
    }
    c.stop().await;
}
