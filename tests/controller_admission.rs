//! The single admission point through the real `reconcile`: concurrent reconciles of Waiting
//! nodes with a budget of 1 and a watch cache that never shows the first grant must not hand
//! out a second slot. The rollout functions are replaced by a tiny fake (the real ones live in
//! `crate::rollout` and are tested there); the mock API answers status writes slowly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::{reflector, watcher};
use nixroll::api::{NixOSNode, NixOSNodeStatus, Phase, Slot, Target};
use nixroll::controller::{Context, ControllerConfig, Metrics, RolloutFns, Stores, Synced};
use nixroll::rollout::{ClusterState, Decision, DrainProgress, NodeView, Policy};
use nixroll::sim::fixtures::{in_phase, nixos_node};

/// Budget 1, first come first served: every Waiting node may go while no node holds a slot or
/// is in a disruptive phase.
fn fake_admit(nodes: &[NodeView<'_>], _: &ClusterState, _: &Policy, _: Timestamp) -> Vec<String> {
    let busy = nodes
        .iter()
        .filter(|v| v.status.slot.is_some() || v.status.phase.is_some_and(Phase::is_disruptive))
        .count();
    if busy >= 1 {
        return Vec::new();
    }
    nodes
        .iter()
        .filter(|v| v.status.phase == Some(Phase::Waiting))
        .map(|v| v.name.to_string())
        .collect()
}

/// Admitted → Draining with a slot; otherwise keep the status.
fn fake_decide(
    view: &NodeView<'_>,
    admitted: bool,
    _: Option<&DrainProgress>,
    _: &Policy,
    now: Timestamp,
) -> Decision {
    let mut status = view.status.clone();
    status.agent = None;
    if admitted {
        status.phase = Some(Phase::Draining);
        status.slot = Some(Slot {
            granted_at: Time(now),
            was_unschedulable: false,
            cordoned_by_nixroll: false,
            drain_started_at: None,
            forced: false,
            verified_at: None,
        });
    }
    Decision {
        status,
        actions: Vec::new(),
        notes: Vec::new(),
        requeue_after: None,
        rows: Vec::new(),
    }
}

fn waiting(name: &str) -> NixOSNode {
    in_phase(
        nixos_node(name, "github:me/infra", &"b".repeat(40)),
        Phase::Waiting,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_waiting_nodes_with_a_stale_cache_never_both_get_the_slot() {
    for round in 0..20 {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        // The cache shows both nodes Waiting and is never updated (maximally stale).
        let stores = stores(vec![waiting("a"), waiting("b")], Vec::new());
        let (ctx, _wake) = Context::with_rollout(
            client,
            ControllerConfig::new("test"),
            stores,
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
            RolloutFns {
                decide: fake_decide,
                admit: fake_admit,
            },
        );

        // The API: answer each status write after a delay, remember which node got a slot.
        let granted = Arc::new(Mutex::new(Vec::<String>::new()));
        let g = granted.clone();
        let api = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                assert_eq!(req.method(), "PATCH", "only status writes expected");
                let path = req.uri().path().to_string();
                let body: serde_json::Value =
                    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
                if body["status"].get("slot").is_some() {
                    let node = path.trim_end_matches("/status").rsplit('/').next().unwrap();
                    g.lock().unwrap().push(node.to_string());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut obj = body.clone();
                obj["metadata"] = serde_json::json!({"name": "x", "resourceVersion": "5"});
                obj["spec"] = serde_json::json!({"flake": "github:me/infra", "revision": "b".repeat(40)});
                send.send_response(common::json_response(200, &obj));
            }
        });

        let mut tasks = Vec::new();
        // Two reconciles per node, all at once.
        for name in ["a", "b", "a", "b"] {
            let ctx = ctx.clone();
            let obj = Arc::new(waiting(name));
            tasks.push(tokio::spawn(async move {
                nixroll::controller::reconcile(obj, ctx).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(ctx);
        api.abort();
        let granted = granted.lock().unwrap().clone();
        assert_eq!(granted.len(), 1, "round {round}: slots granted to {granted:?}");
    }
}

/// Synced caches holding `objects` and `nodes` (no pause ConfigMap); never updated after.
fn stores(objects: Vec<NixOSNode>, nodes: Vec<k8s_openapi::api::core::v1::Node>) -> Stores {
    let (nixosnodes, mut w) = reflector::store::<NixOSNode>();
    w.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        w.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
    let (node_store, mut wn) = reflector::store();
    wn.apply_watcher_event(&watcher::Event::Init);
    for n in nodes {
        wn.apply_watcher_event(&watcher::Event::InitApply(n));
    }
    wn.apply_watcher_event(&watcher::Event::InitDone);
    let (pause, mut wp) = reflector::store();
    wp.apply_watcher_event(&watcher::Event::InitDone);
    Stores {
        nixosnodes,
        nodes: node_store,
        pause,
        pools: kube::runtime::reflector::store().0,
        synced: Synced::ready(),
    }
}

fn with_status(name: &str, status: NixOSNodeStatus) -> NixOSNode {
    let mut n = waiting(name);
    n.status = Some(status);
    n
}

/// A Waiting node that has staged its target and whose Node is Ready: a candidate.
fn staged(name: &str) -> NixOSNode {
    let mut n = waiting(name);
    if let Some(st) = n.status.as_mut() {
        st.target = Some(Target {
            revision: "b".repeat(40),
            installable: "github:me/infra#x".into(),
            system: Some(format!("/nix/store/{name}-system")),
            build: None,
        });
    }
    n
}

fn ready_node(name: &str) -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap()
}

/// Releasing a slot sends the nodes the gate would now admit — and only those, not every
/// Waiting node — to the work queue at once, and the finished phase's duration is recorded.
#[tokio::test]
async fn releasing_a_slot_wakes_the_next_admissible_node() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let since = Timestamp::now() - jiff::SignedDuration::from_secs(90);
    let draining = NixOSNodeStatus {
        phase: Some(Phase::Draining),
        last_transition_time: Some(Time(since)),
        slot: Some(Slot {
            granted_at: Time(since),
            was_unschedulable: false,
            cordoned_by_nixroll: false,
            drain_started_at: None,
            forced: false,
            verified_at: None,
        }),
        ..NixOSNodeStatus::default()
    };
    let up_to_date = NixOSNodeStatus {
        phase: Some(Phase::UpToDate),
        ..NixOSNodeStatus::default()
    };
    let objects = vec![
        with_status("a", draining.clone()),
        staged("b"),
        with_status("c", up_to_date),
        staged("d"),
        waiting("e"),
    ];
    let nodes = ["a", "b", "c", "d", "e"].map(ready_node).to_vec();
    let metrics = Arc::new(Metrics::new());
    let (ctx, mut wake) = Context::new(
        client,
        ControllerConfig::new("test"),
        stores(objects, nodes),
        metrics.clone(),
        Arc::new(AtomicBool::new(true)),
    );
    let done = NixOSNodeStatus {
        phase: Some(Phase::UpToDate),
        last_transition_time: Some(Time(Timestamp::now())),
        ..NixOSNodeStatus::default()
    };
    let decision = Decision {
        status: done,
        actions: Vec::new(),
        notes: Vec::new(),
        requeue_after: None,
        rows: Vec::new(),
    };
    let obj = with_status("a", draining.clone());
    let task =
        tokio::spawn(async move { nixroll::controller::execute(&ctx, &obj, &draining, decision).await });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/apis/nixroll.io/v1alpha1/nixosnodes/a/status");
    send.send_response(common::json_response(200, &serde_json::json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
                    "metadata": {"name": "a"}, "spec": {"flake": "github:me/infra", "revision": "b".repeat(40)}})));
    task.await.unwrap().unwrap();
    let woken = wake.recv().await.unwrap();
    assert_eq!(woken.name, "b", "the first admissible node by name");
    assert!(
        wake.try_recv().is_err(),
        "budget 1: d waits for the next release; e has not staged, c is not Waiting"
    );
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("nixroll_phase_duration_seconds_count{phase=\"Draining\"} 1"),
        "{text}"
    );
}

/// A grant whose write failed may still have landed: until the watch shows it (or a window
/// passes) no other node is admitted, while the node itself does not assume the slot.
#[tokio::test]
async fn failed_grant_write_still_blocks_other_admissions() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (ctx, _wake) = Context::with_rollout(
        client,
        ControllerConfig::new("test"),
        stores(vec![waiting("a"), waiting("b")], Vec::new()),
        Arc::new(Metrics::new()),
        Arc::new(AtomicBool::new(true)),
        RolloutFns {
            decide: fake_decide,
            admit: fake_admit,
        },
    );
    let c = ctx.clone();
    let task = tokio::spawn(async move { nixroll::controller::reconcile(Arc::new(waiting("a")), c).await });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/apis/nixroll.io/v1alpha1/nixosnodes/a/status");
    send.send_response(common::json_response(
        504,
        &serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Timeout", "message": "etcd timeout", "code": 504}),
    ));
    let err = task.await.unwrap().unwrap_err();
    assert!(err.is_transient(), "{err}");

    // b asks: nothing is written, the uncertain grant of a still counts.
    nixroll::controller::reconcile(Arc::new(waiting("b")), ctx.clone())
        .await
        .unwrap();
    if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
    {
        panic!("b was admitted: {} {}", req.method(), req.uri());
    }

    // a asks again: its own uncertain grant does not block it; the grant is written again.
    let c = ctx.clone();
    let task = tokio::spawn(async move { nixroll::controller::reconcile(Arc::new(waiting("a")), c).await });
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/apis/nixroll.io/v1alpha1/nixosnodes/a/status");
    send.send_response(common::json_response(200, &serde_json::json!({"apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSNode",
                    "metadata": {"name": "a"}, "spec": {"flake": "github:me/infra", "revision": "b".repeat(40)}})));
    task.await.unwrap().unwrap();
}
