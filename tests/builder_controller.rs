//! The controller with a builder, over the embedded API with real agents (simulated hosts): a
//! Node labelled `nixroll.io/builder=true` gets the distinct systems of its Nix system in
//! `status.builds`, every staging node's target names that builder's pending build, and no
//! node evaluates its flake while it waits. (Fetching and signing with real Nix:
//! tests/builder_nix.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use nixroll::api::{BuildProgress, NixOSNode, Phase};
use nixroll::controller::ControllerConfig;
use nixroll::sim::world::{NixMode, World};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

async fn wait_for(
    world: &World,
    what: &str,
    pred: impl Fn(&BTreeMap<String, NixOSNode>) -> bool,
) -> BTreeMap<String, NixOSNode> {
    common::world::watch_nodes(world, what, WAIT, pred, |_| {}).await
}

fn all_on(rev: &str) -> impl Fn(&BTreeMap<String, NixOSNode>) -> bool + '_ {
    |m| {
        m.len() == 4
            && m.values().all(|o| {
                let s = o.status.as_ref();
                s.and_then(|s| s.revision.as_deref()) == Some(rev)
                    && s.and_then(|s| s.phase) == Some(Phase::UpToDate)
            })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_builder_nodes_wait_for_its_build_and_never_evaluate() {
    let mut opts = common::world::fast_world(4, 0);
    opts.nix = NixMode::Simulated;
    let mut world = World::start(opts).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let c = world
        .start_controller(ControllerConfig::new(&format!("test-{}", fastrand::u32(..))))
        .await
        .unwrap();
    wait_for(&world, "adoption", all_on(&first)).await;

    let nodes: Api<Node> = Api::all(world.client.clone());
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"nixroll.io/builder": "true"}}})),
        )
        .await
        .unwrap();
    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();

    let pending = |o: &NixOSNode| {
        o.status
            .as_ref()
            .and_then(|s| s.target.as_ref())
            .filter(|t| t.revision == next)
            .and_then(|t| t.build.as_ref())
            .is_some_and(|b| {
                b.system.is_empty()
                    && b.builder.as_deref() == Some("node-1")
                    && b.progress == Some(BuildProgress::Queued)
            })
    };
    let seen = wait_for(&world, "every node waiting for node-1's builds", |m| {
        m.len() == 4
            && m.values().all(pending)
            && m["node-1"].status.as_ref().is_some_and(|s| s.builds.len() == 4)
    })
    .await;
    let builds = &seen["node-1"].status.as_ref().unwrap().builds;
    for (name, o) in &seen {
        let t = o.status.as_ref().unwrap().target.as_ref().unwrap();
        let r = builds.iter().find(|r| r.installable == t.installable);
        assert_eq!(r.map(|r| r.nodes), Some(1), "{name}: {builds:?}");
    }

    // Nobody evaluates or builds while the builder has not built: no node stages the revision.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    for o in api.list(&Default::default()).await.unwrap().items {
        let s = o.status.unwrap();
        assert_eq!(s.phase, Some(Phase::Staging), "{:?}", o.metadata.name);
        assert!(
            s.message
                .as_deref()
                .unwrap_or_default()
                .contains("builder node-1"),
            "{:?}",
            s.message
        );
        let staged = s.agent.and_then(|a| a.staged).map(|st| st.revision);
        assert_ne!(
            staged.as_deref(),
            Some(next.as_str()),
            "{:?} staged without the builder",
            o.metadata.name
        );
    }

    // The build of node-2's system fails on the builder: node-2 fails once with the builder's
    // message (StageFailed, Degraded); the others keep waiting. (The test writes the report
    // the builder agent would, under a field manager of its own.)
    let node2 = seen["node-2"]
        .status
        .as_ref()
        .unwrap()
        .target
        .as_ref()
        .unwrap()
        .installable
        .clone();
    let report = json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": "node-1"},
        "status": {"agent": {"builds": [{
            "installable": node2, "state": "Failed",
            "message": "error: nixroll-test: this configuration is broken",
            "at": "2026-12-07T08:00:00Z"
        }]}}
    });
    api.patch_status(
        "node-1",
        &PatchParams::apply("builder-test").force(),
        &Patch::Apply(&report),
    )
    .await
    .unwrap();
    let before = seen.clone();
    let seen = wait_for(&world, "node-2 failed by its builder", |m| {
        m.get("node-2")
            .and_then(|o| o.status.as_ref())
            .is_some_and(|s| s.phase == Some(Phase::Degraded))
    })
    .await;
    let s = seen["node-2"].status.as_ref().unwrap();
    let failed = s.failed.as_ref().unwrap();
    assert_eq!(failed.reason, "StageFailed");
    assert_eq!(failed.revision, next);
    assert!(failed.message.contains("builder node-1"), "{}", failed.message);
    assert!(
        failed.message.contains("this configuration is broken"),
        "{}",
        failed.message
    );
    let progress = |s: &nixroll::api::NixOSNodeStatus| {
        s.target
            .as_ref()
            .and_then(|t| t.build.as_ref())
            .and_then(|b| b.progress)
    };
    assert_eq!(progress(s), Some(BuildProgress::Failed));

    // node-3's system built: node-3 fetches it (Fetching, the builder's cache in its target);
    // the builder's own system built is Built on the builder. (The simulated agents cannot
    // fetch; the real-Nix fetch is tests/builder_nix.rs.)
    let installable = |n: &str| {
        before[n]
            .status
            .as_ref()
            .unwrap()
            .target
            .as_ref()
            .unwrap()
            .installable
            .clone()
    };
    let path = |h: &str| format!("/nix/store/{}-nixos-system-{h}", "1".repeat(32));
    let report = json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode", "metadata": {"name": "node-1"},
        "status": {"agent": {"cache": "http://127.0.0.1:5080", "builds": [
            {"installable": node2, "state": "Failed", "message": "error: broken", "at": "2026-12-07T08:00:00Z"},
            {"installable": installable("node-3"), "state": "Built", "system": path("node-3"), "at": "2026-12-07T08:00:00Z"},
            {"installable": installable("node-1"), "state": "Built", "system": path("node-1"), "at": "2026-12-07T08:00:00Z"},
            {"installable": installable("node-4"), "state": "Building", "at": "2026-12-07T08:00:00Z"},
        ]}}
    });
    api.patch_status(
        "node-1",
        &PatchParams::apply("builder-test").force(),
        &Patch::Apply(&report),
    )
    .await
    .unwrap();
    let at = |m: &BTreeMap<String, NixOSNode>, n: &str| {
        m.get(n).and_then(|o| o.status.as_ref()).and_then(progress)
    };
    let seen = wait_for(&world, "node-3 fetching, node-1 built, node-4 building", |m| {
        at(m, "node-3") == Some(BuildProgress::Fetching)
            && at(m, "node-1") == Some(BuildProgress::Built)
            && at(m, "node-4") == Some(BuildProgress::Building)
    })
    .await;
    let b = seen["node-3"]
        .status
        .as_ref()
        .unwrap()
        .target
        .as_ref()
        .unwrap()
        .build
        .clone()
        .unwrap();
    assert_eq!(b.system, path("node-3"));
    assert_eq!(b.cache.as_deref(), Some("http://127.0.0.1:5080"));
    // `nixroll status` shows the same.
    let table = nixroll::report::table(
        &seen.values().cloned().collect::<Vec<_>>(),
        jiff::Timestamp::now(),
        &|_, _| "open".into(),
    );
    for want in [
        "Fetching from node-1",
        "Building on node-1",
        "Built; builder 2/4 built",
        "Failed on node-1",
    ] {
        assert!(table.contains(want), "{want:?} not in\n{table}");
    }
    c.stop().await;
}

/// No build starts on a builder inside its own disruption window: with the only builder
/// cordoned (by an admin), its `status.builds` stays empty and the nodes wait, saying why;
/// uncordoned, it gets the builds and the nodes queue for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_build_is_asked_of_a_cordoned_builder() {
    let mut opts = common::world::fast_world(3, 0);
    opts.nix = NixMode::Simulated;
    let mut world = World::start(opts).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let c = world
        .start_controller(ControllerConfig::new(&format!("test-{}", fastrand::u32(..))))
        .await
        .unwrap();
    let all_on = |m: &BTreeMap<String, NixOSNode>| {
        m.len() == 3
            && m.values()
                .all(|o| o.status.as_ref().and_then(|s| s.revision.as_deref()) == Some(first.as_str()))
    };
    wait_for(&world, "adoption", all_on).await;
    let nodes: Api<Node> = Api::all(world.client.clone());
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"nixroll.io/builder": "true"}}, "spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let next = world
        .commit("new kernel", |s| s.kernel.push_str("-next"))
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();
    let waiting = |o: &NixOSNode| {
        o.status.as_ref().is_some_and(|s| {
            s.target.as_ref().is_some_and(|t| t.revision == next)
                && s.message
                    .as_deref()
                    .unwrap_or_default()
                    .contains("disruption window")
        })
    };
    let seen = wait_for(&world, "nodes waiting for the cordoned builder", |m| {
        m.len() == 3 && m.values().all(waiting)
    })
    .await;
    assert!(
        seen["node-1"].status.as_ref().unwrap().builds.is_empty(),
        "a cordoned builder is asked to build"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    assert!(api.get("node-1").await.unwrap().status.unwrap().builds.is_empty());

    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": false}})),
        )
        .await
        .unwrap();
    wait_for(
        &world,
        "the builder asked for 3 builds, the nodes queued for it",
        |m| {
            m.len() == 3
                && m["node-1"].status.as_ref().is_some_and(|s| s.builds.len() == 3)
                && m.values().all(|o| {
                    o.status
                        .as_ref()
                        .and_then(|s| s.message.as_deref())
                        .is_some_and(|msg| msg.contains("queued for builder node-1"))
                })
        },
    )
    .await;
    c.stop().await;
}
