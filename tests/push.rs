//! A push applies in seconds: the `nixroll.io/requested-at` annotation on a FlakeSource resolves
//! it at once, whatever its interval; over the embedded API with the real controller and a
//! real git repository (`file://`). See docs/source.md, "A push applies in seconds".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixroll::api::{FlakeSource, SourceKind, SourceRef};
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::cluster::Timing;
use nixroll::sim::world::{NixMode, World, WorldOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn opts() -> WorldOptions {
    WorldOptions {
        nodes: 2,
        control_planes: 1,
        nix: NixMode::Simulated,
        timing: Timing {
            pod_termination: Duration::from_millis(50),
            pod_startup: Duration::from_millis(100),
            reboot: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
        },
        pods_per_node: 1,
        apps: None,
    }
}

async fn wait_source(api: &Api<FlakeSource>, what: &str, pred: impl Fn(&FlakeSource) -> bool) -> FlakeSource {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let fs = api.get("infra").await.unwrap();
        if pred(&fs) {
            return fs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            fs.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn commit_of(fs: &FlakeSource) -> Option<&str> {
    fs.status.as_ref().and_then(|s| s.commit.as_deref())
}

async fn request(api: &Api<FlakeSource>, value: &str) {
    let patch = json!({"metadata": {"annotations": {"nixroll.io/requested-at": value}}});
    api.patch("infra", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// With `interval: 1h`, a new commit is not seen until the annotation gets a new value; then
/// it is resolved at once (well under a second here), and the value handled is in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requested_at_resolves_at_once() {
    let mut world = World::start(opts()).await.unwrap();
    let (repo, branch) = world.follow_in_git().unwrap();
    world.publish_flake(&format!("git+file://{}?ref=refs/heads/{branch}", repo.display()));
    let head0 = world.head().to_string();
    let sources: Api<FlakeSource> = Api::namespaced(world.client.clone(), "nixroll-system");
    let fs: FlakeSource = serde_json::from_value(json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "FlakeSource",
        "metadata": {"name": "infra", "namespace": "nixroll-system"},
        "spec": {"url": format!("file://{}", repo.display()), "ref": {"branch": branch},
                 "interval": "1h", "timeout": "10s", "insecure": true}
    }))
    .unwrap();
    sources.create(&PostParams::default(), &fs).await.unwrap();
    let mut spec = world.spec("");
    spec.flake = String::new();
    spec.source_ref = Some(SourceRef {
        kind: SourceKind::FlakeSource,
        name: "infra".into(),
        namespace: None,
    });
    world.apply_all(&spec).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut config = ControllerConfig::new(&format!("push-{}", fastrand::u32(..)));
    config.policy.max_unavailable = MaxUnavailable::Count(1);
    config.follow.source_controller.cache_dir = cache.path().to_path_buf();
    let c = world.start_controller(config).await.unwrap();
    wait_source(&sources, "the first resolution", |fs| commit_of(fs) == Some(head0.as_str())).await;

    for (i, value) in ["2026-12-07T08:00:00Z", "2026-12-07T08:00:01Z"].iter().enumerate() {
        let next = world.commit(&format!("push {i}"), |s| s.service.push('+')).unwrap();
        // The interval is an hour: nothing resolves the new commit by itself.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let fs = sources.get("infra").await.unwrap();
        assert_ne!(commit_of(&fs), Some(next.as_str()), "resolved without a request");
        let asked = Instant::now();
        request(&sources, value).await;
        let fs = wait_source(&sources, "the requested resolution", |fs| commit_of(fs) == Some(next.as_str())).await;
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(
            fs.status.unwrap().last_handled_requested_at.as_deref(),
            Some(*value)
        );
        eprintln!("push {i}: requested-at → resolved in {:.0} ms", took.as_secs_f64() * 1000.0);
    }
    c.stop().await;
}
