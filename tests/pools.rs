//! NixOSPools end to end over the embedded Kubernetes API: the real controller, one real agent
//! per simulated NixOS host, simulated kubelets and workloads with PodDisruptionBudgets, and the
//! invariant monitor. The pools are labels on the NixOSNodes and NixOSPool objects, as a user
//! keeps them in git.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use nixroll::api::{NixOSNode, NixOSPool, NixOSPoolStatus, Phase};
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::monitor::Monitor;
use nixroll::sim::world::{World, WorldOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn fast() -> WorldOptions {
    common::world::fast_world(5, 2)
}

fn controller_config() -> ControllerConfig {
    let mut c = ControllerConfig::new(&format!("test-{}", fastrand::u32(..)));
    c.policy.max_unavailable = MaxUnavailable::Count(1);
    c.policy.drain_backoff = jiff::SignedDuration::from_secs(1);
    c.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
    c.admission_sweep = Duration::from_millis(500);
    c
}

fn phase(o: &NixOSNode) -> Phase {
    o.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// Poll (every 100 ms, bounded) until `pred` holds over the NixOSNodes, or panic with a table.
async fn wait_nodes(
    world: &World,
    what: &str,
    pred: impl Fn(&BTreeMap<String, NixOSNode>) -> bool,
) -> BTreeMap<String, NixOSNode> {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m: BTreeMap<String, NixOSNode> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| (o.metadata.name.clone().unwrap_or_default(), o))
            .collect();
        if pred(&m) {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            let table: Vec<String> = m
                .values()
                .map(|o| {
                    format!(
                        "{:?} {:?} {:?}",
                        o.metadata.name,
                        phase(o),
                        o.status.as_ref().and_then(|s| s.message.clone())
                    )
                })
                .collect();
            panic!("timed out waiting for {what}:\n{}", table.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll (bounded) until the pool's status satisfies `pred`; returns it.
async fn wait_pool(
    world: &World,
    pool: &str,
    what: &str,
    pred: impl Fn(&NixOSPoolStatus) -> bool,
) -> NixOSPoolStatus {
    let api: Api<NixOSPool> = Api::all(world.client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = api.get(pool).await.unwrap().status.unwrap_or_default();
        if pred(&st) {
            return st;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for pool {pool}: {what}; status: {st:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_on(rev: &str) -> impl Fn(&BTreeMap<String, NixOSNode>) -> bool + '_ {
    move |m| {
        m.len() >= 5
            && m.values().all(|o| {
                phase(o) == Phase::UpToDate
                    && o.status.as_ref().and_then(|s| s.revision.as_deref()) == Some(rev)
            })
    }
}

async fn label(world: &World, node: &str, labels: serde_json::Value) {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    api.patch(
        node,
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": labels}})),
    )
    .await
    .unwrap();
}

async fn create_pool(world: &World, name: &str, spec: serde_json::Value) {
    let api: Api<NixOSPool> = Api::all(world.client.clone());
    let pool: NixOSPool = serde_json::from_value(json!({
        "apiVersion": "nixroll.io/v1alpha1", "kind": "NixOSPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &pool).await.unwrap();
}

fn condition<'a>(
    st: &'a NixOSPoolStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

/// A canary pool of one node takes a kernel bump first; the rest (a pool after the canary with
/// a soak of 3 s and a budget of 2) starts only once the canary runs it, is healthy and soaked,
/// and its pool status says so while it waits. A node selected by both pools is refused until
/// its labels are fixed, and both pools name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_pool_soaks_before_the_rest_and_a_node_in_two_pools_waits() {
    let mut world = World::start(fast()).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    // node-1 is the k3s server; node-2 the canary; node-5 is (by mistake) in both pools.
    label(&world, "node-2", json!({"pool": "canary"})).await;
    for n in ["node-1", "node-3", "node-4"] {
        label(&world, n, json!({"pool": "rest"})).await;
    }
    label(&world, "node-5", json!({"pool": "rest", "canary": "also"})).await;
    create_pool(
        &world,
        "canary",
        json!({"selector": {"matchExpressions": [
        {"key": "pool", "operator": "In", "values": ["canary"]}]}}),
    )
    .await;
    create_pool(
        &world,
        "rest",
        json!({"selector": {"matchLabels": {"pool": "rest"}},
        "maxUnavailable": 2, "after": ["canary"], "soak": "3s"}),
    )
    .await;
    create_pool(
        &world,
        "extra",
        json!({"selector": {"matchLabels": {"canary": "also"}}}),
    )
    .await;

    let c = world.start_controller(controller_config()).await.unwrap();
    wait_nodes(&world, "adoption", all_on(&first)).await;
    // Both pools that select node-5 say so.
    for pool in ["rest", "extra"] {
        let st = wait_pool(&world, pool, "Conflict", |s| {
            condition(s, "Conflict").is_some_and(|c| c.status == "True")
        })
        .await;
        let msg = &condition(&st, "Conflict").unwrap().message;
        assert!(msg.contains("node-5 also selected by pool"), "{msg}");
    }

    let monitor = Monitor::start(world.client.clone(), 2, &[]);
    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();

    // While the canary runs or soaks, the rest pool waits and says why.
    let st = wait_pool(&world, "rest", "waiting for the canary", |s| {
        condition(s, "Updating").is_some_and(|c| c.reason == "WaitingForPool" || c.reason == "Soaking")
    })
    .await;
    assert!(
        st.message.as_deref().unwrap_or_default().contains("canary"),
        "{st:?}"
    );
    wait_pool(&world, "rest", "soaking", |s| {
        condition(s, "Updating").is_some_and(|c| c.reason == "Soaking")
    })
    .await;

    // Every node but node-5 (in two pools) ends on the new revision.
    let done = wait_nodes(&world, "the rollout except node-5", |m| {
        m.len() == 5
            && m.iter().filter(|(n, _)| n.as_str() != "node-5").all(|(_, o)| {
                phase(o) == Phase::UpToDate
                    && o.status.as_ref().and_then(|s| s.revision.as_deref()) == Some(next.as_str())
            })
    })
    .await;
    assert_eq!(phase(&done["node-5"]), Phase::Waiting, "node-5 is in two pools");
    let history = |n: &str| done[n].status.as_ref().unwrap().history.first().cloned().unwrap();
    let canary_done = history("node-2").finished_at.0;
    for n in ["node-1", "node-3", "node-4"] {
        let h = history(n);
        assert_eq!(h.revision, next);
        let waited = h.started_at.0.duration_since(canary_done);
        assert!(
            waited >= jiff::SignedDuration::from_secs(3),
            "{n} started {waited:?} after the canary finished, before the 3 s soak"
        );
    }
    // The user fixes node-5's labels: it rolls in pool rest.
    let nn: Api<NixOSNode> = Api::all(world.client.clone());
    nn.patch(
        "node-5",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"canary": null}}})),
    )
    .await
    .unwrap();
    wait_nodes(&world, "the whole rollout", all_on(&next)).await;
    let st = wait_pool(&world, "rest", "all updated", |s| {
        s.updated == 4 && condition(s, "Updated").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!((st.nodes, st.degraded, st.max_unavailable), (4, 0, Some(2)));
    assert_eq!(st.revisions, vec![next.clone()]);
    assert!(condition(&st, "Conflict").is_some_and(|c| c.status == "False"));
    let st = wait_pool(&world, "canary", "updated", |s| s.updated == 1).await;
    assert_eq!(st.nodes, 1);
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert!(monitor.max_concurrent() <= 2);
    c.stop().await;
}

/// A CEL health gate over a ConfigMap blocks a pool while the "storage" is rebuilding: nothing
/// is admitted and the pool says which gate and why; once it reads healthy the rollout runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cel_gate_blocks_its_pool_until_it_passes() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut world = World::start(fast()).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "storage-health"}, "data": {"state": "rebuilding"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    create_pool(
        &world,
        "all",
        json!({"selector": {}, "maxUnavailable": 1, "healthGates": {"cel": [{
        "name": "storage", "apiVersion": "v1", "kind": "ConfigMap", "namespace": "default",
        "objectName": "storage-health", "expression": "object.data.state == 'healthy'", "timeout": "5s"}]}}),
    )
    .await;
    let c = world.start_controller(controller_config()).await.unwrap();
    wait_nodes(&world, "adoption", all_on(&first)).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
        })
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();
    let st = wait_pool(&world, "all", "the gate blocking", |s| {
        condition(s, "Updating").is_some_and(|c| c.reason == "GateBlocking")
    })
    .await;
    let msg = st.message.unwrap_or_default();
    assert!(
        msg.contains("health gate storage") && msg.contains("is false"),
        "{msg}"
    );
    // An Event on the pool says so too (kubectl describe nixospool all).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(world.client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("GateBlocking")
                    && e.involved_object.kind.as_deref() == Some("NixOSPool")
                    && e.involved_object.name.as_deref() == Some("all")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("health gate storage"))
            });
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no GateBlocking Event on NixOSPool all"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Blocked for a while: every node staged and Waiting, none admitted.
    wait_nodes(&world, "all staged", |m| {
        m.len() == 5 && m.values().all(|o| phase(o) == Phase::Waiting)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    for o in api.list(&Default::default()).await.unwrap() {
        assert_eq!(
            phase(&o),
            Phase::Waiting,
            "{:?} admitted while the gate blocks",
            o.metadata.name
        );
    }
    cms.patch(
        "storage-health",
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": {"state": "healthy"}})),
    )
    .await
    .unwrap();
    wait_nodes(&world, "the rollout after the gate passed", all_on(&next)).await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    c.stop().await;
}

/// Post-gates: a pool's CEL gate over a ConfigMap ("storage rebuilding" while a node is away)
/// keeps the node that just rebooted cordoned, holding its slot, until the gate passes in an
/// evaluation made after the node was verified; then it is uncordoned. With a short
/// `postTimeout` the next node is Degraded (`GateFailed`), stays cordoned and halts the pool
/// (nothing else admitted) until the user retries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_gates_hold_the_slot_until_they_pass_and_a_timeout_degrades_and_halts_the_pool() {
    use k8s_openapi::api::core::v1::{ConfigMap, Node};
    let t0 = std::time::Instant::now();
    let lap = |what: &str| eprintln!("{:>6.1} s {what}", t0.elapsed().as_secs_f64());
    let mut opts = fast();
    // Long enough a reboot that the test can make the gate block before the node is back.
    opts.timing.reboot = Duration::from_secs(3);
    let mut world = World::start(opts).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "storage-health"}, "data": {"state": "healthy"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let gate = |post_timeout: &str| {
        json!({"selector": {}, "maxUnavailable": 1, "healthGates": {"cel": [{
        "name": "storage", "apiVersion": "v1", "kind": "ConfigMap", "namespace": "default",
        "objectName": "storage-health", "expression": "object.data.state == 'healthy'",
        "timeout": "5s", "postTimeout": post_timeout}]}})
    };
    create_pool(&world, "all", gate("60s")).await;
    let c = world.start_controller(controller_config()).await.unwrap();
    wait_nodes(&world, "adoption", all_on(&first)).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = world
        .commit("new kernel", |s| s.kernel.push_str("-next"))
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();
    let set_state = |state: &'static str| {
        let cms = cms.clone();
        async move {
            cms.patch(
                "storage-health",
                &PatchParams::default(),
                &Patch::Merge(&json!({"data": {"state": state}})),
            )
            .await
            .unwrap();
        }
    };
    let disrupted = |m: &BTreeMap<String, NixOSNode>| {
        m.iter()
            .find(|(_, o)| phase(o) == Phase::Draining || phase(o) == Phase::Rebooting)
            .map(|(n, _)| n.clone())
    };
    // The first node goes down: the storage rebuilds.
    let m = wait_nodes(&world, "a node disrupted", |m| disrupted(m).is_some()).await;
    let first_node = disrupted(&m).unwrap();
    lap("first node disrupted");
    set_state("rebuilding").await;
    let m = wait_nodes(&world, "the node back and waiting for its post-gate", |m| {
        m[&first_node]
            .status
            .as_ref()
            .and_then(|s| s.message.as_deref())
            .is_some_and(|msg| msg.contains("post-gate storage"))
    })
    .await;
    let st = m[&first_node].status.as_ref().unwrap();
    assert_eq!(st.phase, Some(Phase::Verifying), "{st:?}");
    assert!(st.slot.as_ref().unwrap().verified_at.is_some());
    let nodes: Api<Node> = Api::all(world.client.clone());
    let cordoned = |n: Node| n.spec.and_then(|s| s.unschedulable).unwrap_or(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    assert_eq!(phase(&api.get(&first_node).await.unwrap()), Phase::Verifying);
    assert!(
        cordoned(nodes.get(&first_node).await.unwrap()),
        "uncordoned before its post-gate passed"
    );
    lap("first node held");
    // The storage is healthy again: the node is done and uncordoned.
    set_state("healthy").await;
    wait_nodes(&world, "the first node done", |m| {
        phase(&m[&first_node]) == Phase::UpToDate && m[&first_node].status.as_ref().unwrap().slot.is_none()
    })
    .await;
    assert!(!cordoned(nodes.get(&first_node).await.unwrap()));

    // A short post-gate timeout, and the storage does not recover in time for the next node.
    let pools: Api<NixOSPool> = Api::all(world.client.clone());
    pools
        .patch(
            "all",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": gate("3s")})),
        )
        .await
        .unwrap();
    let m = wait_nodes(&world, "a second node disrupted", |m| {
        disrupted(m).is_some_and(|n| n != first_node)
    })
    .await;
    let second = disrupted(&m).unwrap();
    lap("second node disrupted");
    set_state("rebuilding").await;
    let m = wait_nodes(&world, "the second node Degraded", |m| {
        phase(&m[&second]) == Phase::Degraded
    })
    .await;
    lap("second node Degraded");
    let failed = m[&second].status.as_ref().unwrap().failed.clone().unwrap();
    assert_eq!(failed.reason, "GateFailed");
    assert!(failed.message.contains("post-gate storage"), "{}", failed.message);
    assert!(
        cordoned(nodes.get(&second).await.unwrap()),
        "a GateFailed node stays cordoned"
    );
    // The pool is halted, even once the gate passes again: nothing else is admitted.
    set_state("healthy").await;
    let st = wait_pool(&world, "all", "halted by the Degraded node", |s| {
        condition(s, "Degraded").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(st.message.unwrap_or_default().contains(&second));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for o in api.list(&Default::default()).await.unwrap() {
        let n = o.metadata.name.clone().unwrap_or_default();
        if n != first_node && n != second {
            assert_eq!(
                phase(&o),
                Phase::Waiting,
                "{n} admitted while {second} is Degraded"
            );
        }
    }
    lap("pool halted");
    // The user retries the node: it finishes, and so does the rollout.
    api.patch(
        &second,
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"nixroll.io/retry": "1"}}})),
    )
    .await
    .unwrap();
    wait_nodes(&world, "the whole rollout", all_on(&next)).await;
    lap("rollout done");
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    c.stop().await;
}

/// Cluster-default gates (ConfigMap `nixroll-gates` in nixroll-system, no NixOSPool at all):
/// they gate the implicit default pool before admission, and as post-gates; the time they
/// block is counted per gate (`nixroll_gate_blocked_seconds_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_default_gates_gate_the_default_pool() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut world = World::start(fast()).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "storage-health"}, "data": {"state": "rebuilding"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let system: Api<ConfigMap> = Api::namespaced(world.client.clone(), "nixroll-system");
    let defaults: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "nixroll-gates"},
        "data": {"healthGates": "cel:\n  - name: storage\n    apiVersion: v1\n    kind: ConfigMap\n    namespace: default\n    objectName: storage-health\n    expression: object.data.state == 'healthy'\n"}
    }))
    .unwrap();
    system.create(&PostParams::default(), &defaults).await.unwrap();
    let mut config = controller_config();
    config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = config.metrics_bound.clone();
    let c = world.start_controller(config).await.unwrap();
    wait_nodes(&world, "adoption", all_on(&first)).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = world
        .commit("new kernel", |s| s.kernel.push_str("-next"))
        .unwrap();
    world.apply_all(&world.spec(&next)).await.unwrap();
    // Blocked before admission: every node staged and Waiting, none admitted for a while.
    wait_nodes(&world, "all staged", |m| {
        m.len() == 5 && m.values().all(|o| phase(o) == Phase::Waiting)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    for o in api.list(&Default::default()).await.unwrap() {
        assert_eq!(
            phase(&o),
            Phase::Waiting,
            "{:?} admitted while the default gate blocks",
            o.metadata.name
        );
        // The node says which gate holds it.
        let st = o.status.unwrap();
        assert!(
            st.message
                .as_deref()
                .unwrap_or_default()
                .contains("default pool: health gate storage"),
            "{:?}",
            st.message
        );
    }
    let blocked = common::world::metric(
        &bound,
        "nixroll_gate_blocked_seconds_total{pool=\"(default)\",gate=\"storage\"}",
    )
    .await
    .unwrap_or_default();
    assert!(blocked >= 1.0, "blocked {blocked} s");
    assert_eq!(
        common::world::metric(
            &bound,
            "nixroll_gate_passing{pool=\"(default)\",gate=\"storage\"}"
        )
        .await,
        Some(0.0)
    );
    cms.patch(
        "storage-health",
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": {"state": "healthy"}})),
    )
    .await
    .unwrap();
    let done = all_on(&next);
    wait_nodes(
        &world,
        "the rollout after the default gate passed, every slot freed",
        |m| {
            done(m)
                && m.values()
                    .all(|o| o.status.as_ref().is_some_and(|s| s.slot.is_none()))
        },
    )
    .await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}
