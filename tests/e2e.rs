//! End to end over the embedded Kubernetes API: the real controller (one or two replicas) and
//! one real agent per simulated NixOS host, simulated kubelets and workloads with
//! PodDisruptionBudgets. A [`Monitor`] watches every test for invariant violations (budget,
//! control plane, uncordon rules) and records every disruptive act; tests that say "nothing
//! disruptive happened while …" ask it what happened between two of their own writes. Faults
//! (a killed controller or agent) land while a node is held in the phase the test names
//! ([`HoldPoint`]), and the test checks the phase at the moment of the kill. Hosts use real Nix when it is installed (CI installs it),
//! else the simulated store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use nixroll::api::{DrainPolicy, DrainTimeoutAction, MaintenanceWindow, NixOSNode, Phase};
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::cluster::WORKLOAD_NAMESPACE;
use nixroll::sim::host::{BootFault, HoldPoint};
use nixroll::sim::monitor::{ActKind, Monitor, rv_of};
use nixroll::sim::world::{World, WorldOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn fast() -> WorldOptions {
    common::world::fast_world(5, 2)
}

fn controller_config(budget: u32) -> ControllerConfig {
    let mut c = ControllerConfig::new(&format!("test-{}", fastrand::u32(..)));
    c.policy.max_unavailable = MaxUnavailable::Count(budget);
    c.policy.drain_backoff = jiff::SignedDuration::from_secs(1);
    c.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
    c
}

/// [`controller_config`] serving /metrics on a free local port; the second value gives its
/// address once bound.
fn with_metrics(
    budget: u32,
) -> (
    ControllerConfig,
    std::sync::Arc<std::sync::OnceLock<std::net::SocketAddr>>,
) {
    let mut c = controller_config(budget);
    c.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = c.metrics_bound.clone();
    (c, bound)
}

/// Wait (watch-driven, bounded) until `pred` holds for the NixOSNodes.
async fn wait_for(
    world: &World,
    what: &str,
    limit: Duration,
    pred: impl Fn(&BTreeMap<String, NixOSNode>) -> bool,
) -> BTreeMap<String, NixOSNode> {
    common::world::watch_nodes(world, what, limit, pred, |_| {}).await
}

/// The resource version of a write of the test's own (a no-op annotation of the node's Node),
/// as a mark in the API's history for [`Monitor::acts_between`].
async fn mark(world: &World) -> u64 {
    let nodes: Api<Node> = Api::all(world.client.clone());
    let patch = json!({"metadata": {"annotations": {"test.nixroll.io/mark": fastrand::u64(..).to_string()}}});
    let n = nodes
        .patch(
            "node-1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    rv_of(&n.metadata)
}

/// The node's phase now, read from the API.
async fn phase_now(world: &World, node: &str) -> Phase {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    phase(&api.get(node).await.unwrap())
}

/// Every node rebooted once and the monitor saw each one cordoned, evicted and granted an
/// activation (so "the monitor saw nothing" elsewhere in the test means something).
fn assert_monitor_saw_the_rollout(world: &World, monitor: &Monitor) {
    let acts = monitor.acts();
    for n in &world.nodes {
        for want in [
            ActKind::Cordoned,
            ActKind::ActivationGranted,
            ActKind::SlotGranted,
        ] {
            assert!(
                acts.iter().any(|a| a.node == n.name && a.kind == want),
                "the monitor never saw {want:?} on {}: {acts:?}",
                n.name
            );
        }
        assert!(
            acts.iter()
                .any(|a| a.node == n.name && matches!(a.kind, ActKind::PodDeleted(_))),
            "the monitor never saw an eviction on {}",
            n.name
        );
    }
}

fn phase(o: &NixOSNode) -> Phase {
    o.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
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

async fn unschedulable(world: &World, node: &str) -> bool {
    let nodes: Api<Node> = Api::all(world.client.clone());
    nodes
        .get(node)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// The world with NixOSNodes on the first revision, adopted (UpToDate) by a controller.
async fn adopted(opts: WorldOptions, budget: u32) -> (World, nixroll::sim::world::ControllerHandle) {
    adopted_with(opts, controller_config(budget)).await
}

/// [`adopted`] with a controller configured by the test.
async fn adopted_with(
    opts: WorldOptions,
    config: ControllerConfig,
) -> (World, nixroll::sim::world::ControllerHandle) {
    let world = World::start(opts).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let c = world.start_controller(config).await.unwrap();
    wait_for(&world, "adoption", WAIT, all_on(&first)).await;
    (world, c)
}

fn kernel_bump(world: &mut World) -> String {
    world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap()
}

/// Commit a kernel bump and ask every NixOSNode for it; returns the new revision.
async fn roll_out_kernel_bump(world: &mut World) -> String {
    let next = kernel_bump(world);
    world.apply_all(&world.spec(&next)).await.unwrap();
    next
}

/// Every host's bootloader falls back to the previous generation; roll out a kernel bump and
/// wait until a node is Degraded. Returns the new revision and the NixOSNodes then.
async fn kernel_bump_until_degraded(world: &mut World) -> (String, BTreeMap<String, NixOSNode>) {
    for n in &world.nodes {
        n.host.set_fault(Some(BootFault::FallbackToPrevious));
    }
    let next = roll_out_kernel_bump(world).await;
    let m = wait_for(world, "a Degraded node", WAIT, |m| {
        m.values().any(|o| phase(o) == Phase::Degraded)
    })
    .await;
    (next, m)
}

/// Wait (watch-driven, bounded) for an Event with `reason` (Events are published after the
/// status write they describe).
async fn wait_event(world: &World, reason: &str) -> Event {
    let api: Api<Event> = Api::all(world.client.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let found = tokio::time::timeout(WAIT, async {
        while let Ok(Some(e)) = stream.try_next().await {
            if e.reason.as_deref() == Some(reason) {
                return Some(e);
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no {reason} event"))
}

/// Wait (watch-driven, bounded) until the Node's `spec.unschedulable` is `want` (nixroll
/// cordons and uncordons right after writing the status that says so).
async fn wait_unschedulable(world: &World, node: &str, want: bool) {
    let api: Api<Node> = Api::all(world.client.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher(api, cfg).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let ok = tokio::time::timeout(WAIT, async {
        while let Ok(Some(n)) = stream.try_next().await {
            if n.spec.and_then(|s| s.unschedulable).unwrap_or(false) == want {
                return true;
            }
        }
        false
    })
    .await;
    assert!(ok.unwrap_or(false), "{node}: unschedulable never became {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_one_node_at_a_time_reboots_each_node_once() {
    let (mut world, c) = adopted(fast(), 1).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = roll_out_kernel_bump(&mut world).await;
    let done = wait_for(&world, "rollout", WAIT, all_on(&next)).await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted once", n.name);
        wait_unschedulable(&world, &n.name, false).await;
        let s = done[&n.name].status.clone().unwrap();
        assert_eq!(s.history.first().map(|h| h.result.as_str()), Some("Succeeded"));
        // The MESSAGE column names the revision and the system's hash and name, not a path.
        let msg = s.message.clone().unwrap_or_default();
        let system = s.system.clone().unwrap();
        assert!(msg.contains(&next[..8]), "{msg}");
        assert!(msg.contains(&nixroll::api::short_system(&system)), "{msg}");
        assert!(!msg.contains('/'), "{msg}");
        assert_eq!(
            n.host.booted_system(),
            s.system,
            "{} booted what the status says",
            n.name
        );
        // Booted once, verified, then blessed: the new system is the default only now.
        assert_eq!(n.host.boot_default(), s.system, "{} blessed", n.name);
        assert!(
            s.history[0]
                .message
                .as_deref()
                .unwrap_or("")
                .contains("made it the default"),
            "{:?}",
            s.history[0]
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_two_disrupts_two_nodes_at_once_but_never_three() {
    let (mut world, c) = adopted(fast(), 2).await;
    let monitor = Monitor::start(world.client.clone(), 2, &[]);
    let next = roll_out_kernel_bump(&mut world).await;
    wait_for(&world, "rollout", WAIT, all_on(&next)).await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 2);
    c.stop().await;
}

/// A PDB that allows no disruption: `Abort` gives the node back (uncordoned, Waiting), the
/// rollout of that node waits; `Force` deletes the pods and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pdb_abort_restores_the_node_and_force_proceeds() {
    let (mut world, c) = adopted(fast(), 1).await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(world.client.clone(), WORKLOAD_NAMESPACE);
    let block: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "block", "namespace": WORKLOAD_NAMESPACE},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}}
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &block).await.unwrap();
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = kernel_bump(&mut world);
    let mut spec = world.spec(&next);
    spec.drain = Some(DrainPolicy {
        timeout: Some("2s".into()),
        on_timeout: DrainTimeoutAction::Abort,
        ..Default::default()
    });
    world.apply_all(&spec).await.unwrap();
    // The first admitted node times out and is given back.
    let m = wait_for(&world, "a drain abort", WAIT, |m| {
        m.values()
            .any(|o| o.status.as_ref().and_then(|s| s.backoff.as_ref()).is_some())
    })
    .await;
    let (aborted, _) = m
        .iter()
        .find(|(_, o)| o.status.as_ref().and_then(|s| s.backoff.as_ref()).is_some())
        .unwrap();
    let aborted = aborted.clone();
    wait_for(&world, "the aborted node back to Waiting", WAIT, |m| {
        m.get(&aborted).is_some_and(|o| phase(o) == Phase::Waiting)
    })
    .await;
    wait_unschedulable(&world, &aborted, false).await; // Abort uncordons the node
    wait_event(&world, "DrainTimeout").await;
    for n in &world.nodes {
        assert_eq!(
            n.host.reboot_count(),
            0,
            "nothing was activated while the PDB blocks"
        );
    }

    // Force: the same rollout goes through, deleting what the PDB protects, and says so.
    spec.drain = Some(DrainPolicy {
        timeout: Some("2s".into()),
        on_timeout: DrainTimeoutAction::Force,
        ..Default::default()
    });
    world.apply_all(&spec).await.unwrap();
    wait_for(&world, "forced rollout", Duration::from_secs(150), all_on(&next)).await;
    wait_event(&world, "DrainForced").await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_to_stage_is_degraded_and_nothing_is_disrupted() {
    let (mut world, c) = adopted(fast(), 1).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let start = mark(&world).await;
    let next = roll_out_kernel_bump(&mut world).await;
    // node-3 points at a configuration the flake does not have.
    let mut bad = world.spec(&next);
    bad.configuration = Some("no-such-host".into());
    world.apply("node-3", &bad).await.unwrap();
    let m = wait_for(&world, "node-3 Degraded", WAIT, |m| {
        m.get("node-3").is_some_and(|o| phase(o) == Phase::Degraded)
    })
    .await;
    let s = m["node-3"].status.clone().unwrap();
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "StageFailed");
    // The failure halts admissions (threshold 1): nothing is disrupted anywhere, from the
    // bump until the fix (the monitor watches the whole time; 3 s give the controller room
    // to do something wrong).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fixed = mark(&world).await;
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 0);
    }
    // A way out of Degraded: the user fixes the spec (the configuration). The node stages
    // again, and the halted rollout goes on to the end.
    world.apply("node-3", &world.spec(&next)).await.unwrap();
    wait_for(&world, "the rollout after the fixed spec", WAIT, all_on(&next)).await;
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted once", n.name);
    }
    assert_eq!(
        monitor.acts_between(start, fixed),
        vec![],
        "disrupted while a node was Degraded"
    );
    assert_monitor_saw_the_rollout(&world, &monitor);
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_boots_the_old_generation_is_degraded_stays_cordoned_and_halts_the_rollout() {
    let (config, bound) = with_metrics(1);
    let (mut world, c) = adopted_with(fast(), config).await;
    assert_eq!(common::world::metric(&bound, "nixroll_halted").await, Some(0.0));
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    // Workers go first (node-2 … node-5); make the first one's bootloader fall back.
    let (_, m) = kernel_bump_until_degraded(&mut world).await;
    let (bad, o) = m.iter().find(|(_, o)| phase(o) == Phase::Degraded).unwrap();
    let s = o.status.clone().unwrap();
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    // The new system was booted once and failed; the machine came back on its default, the
    // old system, which it runs, and which is still its boot default (invariant 9).
    assert_eq!(degraded.reason, "RolledBack", "{degraded:?}");
    let host = &world.nodes.iter().find(|n| &n.name == bad).unwrap().host;
    let agent = s.agent.clone().unwrap();
    assert_eq!(
        host.booted_system(),
        s.system.clone(),
        "runs its known-good system"
    );
    assert_eq!(
        host.boot_default(),
        s.system.clone(),
        "the old system is still the default"
    );
    assert_eq!(agent.default_system, s.system.clone());
    assert_eq!(host.boot_oneshot(), None);
    assert!(agent.activation.unwrap().boot_once.is_some());
    // The good nodes were blessed: their default is what they run.
    for n in world
        .nodes
        .iter()
        .filter(|n| &n.name != bad && n.host.reboot_count() > 0)
    {
        assert_eq!(n.host.boot_default(), n.host.booted_system(), "{}", n.name);
    }
    let failed = mark(&world).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let halted = mark(&world).await;
    assert!(unschedulable(&world, bad).await, "the failed node stays cordoned");
    let total: usize = world.nodes.iter().map(|n| n.host.reboot_count()).sum();
    assert_eq!(total, 1, "no other node was admitted after the failure");
    assert_eq!(
        common::world::metric(&bound, "nixroll_halted").await,
        Some(1.0),
        "halted shows in the metrics"
    );
    assert_eq!(monitor.violations(), Vec::<String>::new());
    // Another way out of Degraded: a new revision (the fix-forward commit). The failed node
    // keeps its slot and cordon, stages the new target, is re-admitted, and all converge.
    for n in &world.nodes {
        n.host.set_fault(None);
    }
    let fixed = world
        .commit("bootloader fix", |s| s.service.push_str("-fixed"))
        .unwrap();
    world.apply_all(&world.spec(&fixed)).await.unwrap();
    wait_for(&world, "the fix-forward rollout", WAIT, all_on(&fixed)).await;
    wait_unschedulable(&world, bad, false).await;
    // Between the failure and the fix nothing disruptive happened anywhere (the failed node
    // keeps the slot and cordon it had).
    assert_eq!(
        monitor.acts_between(failed, halted),
        vec![],
        "disrupted after the failure"
    );
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    c.stop().await;
}

/// Annotate `node` with a new `nixroll.io/retry` value, as `kubectl annotate … --overwrite`.
async fn retry(world: &World, node: &str) {
    let api: Api<NixOSNode> = Api::all(world.client.clone());
    let token = format!("{}", fastrand::u64(..));
    let patch = json!({"metadata": {"annotations": {"nixroll.io/retry": token}}});
    api.patch(
        node,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

/// The way out of `Degraded` that a user takes after a bootloader fallback: fix the cause, ask
/// for a retry. The node keeps its slot and its cordon while it stages again, is re-admitted
/// (it holds its slot), reboots into the new system and the rollout finishes. The sweep is off
/// (one hour), so this is the targeted path alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_node_that_holds_its_slot_is_readmitted_and_the_rollout_finishes() {
    let mut config = controller_config(1);
    config.admission_sweep = Duration::from_secs(3600);
    let (mut world, c) = adopted_with(fast(), config).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let (next, m) = kernel_bump_until_degraded(&mut world).await;
    let bad = m
        .iter()
        .find(|(_, o)| phase(o) == Phase::Degraded)
        .unwrap()
        .0
        .clone();
    assert!(
        m[&bad].status.as_ref().unwrap().slot.is_some(),
        "Degraded keeps the slot"
    );
    for n in &world.nodes {
        n.host.set_fault(None);
    }
    retry(&world, &bad).await;
    let done = wait_for(&world, "the rollout after the retry", WAIT, all_on(&next)).await;
    let s = done[&bad].status.clone().unwrap();
    assert_eq!(s.history.first().map(|h| h.result.as_str()), Some("Succeeded"));
    assert!(s.slot.is_none() || s.phase == Some(Phase::UpToDate));
    wait_unschedulable(&world, &bad, false).await;
    let node = world.node(&bad).unwrap();
    assert_eq!(
        node.host.reboot_count(),
        2,
        "{bad}: the fallback boot and the retried one"
    );
    for n in world.nodes.iter().filter(|n| n.name != bad) {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted once", n.name);
    }
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    c.stop().await;
}

/// Every targeted wake-up is lost (fault injection): the admission sweep alone carries the
/// rollout to the end, one node at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_wake_ups_are_all_lost_still_finishes_through_the_sweep() {
    let mut config = controller_config(1);
    config.admission_sweep = Duration::from_millis(500);
    config.lose_wakeups = true;
    let (mut world, c) = adopted_with(fast(), config).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = roll_out_kernel_bump(&mut world).await;
    wait_for(&world, "the rollout with lost wake-ups", WAIT, all_on(&next)).await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted once", n.name);
    }
    c.stop().await;
}

/// Kill `controller` (a crashed pod) while `node` is held in `phase`, check that it was in
/// that phase at the moment of the kill, and start a new replica.
async fn restart_in(
    world: &World,
    controller: nixroll::sim::world::ControllerHandle,
    node: &str,
    phase: Phase,
) -> nixroll::sim::world::ControllerHandle {
    controller.kill();
    assert_eq!(phase_now(world, node).await, phase, "{node} at the kill");
    world.start_controller(controller_config(1)).await.unwrap()
}

/// The node that holds the slot (budget 1), once one is in `p`.
async fn node_in(world: &World, p: Phase) -> String {
    let m = wait_for(world, &format!("a node in {p}"), WAIT, |m| {
        m.values().any(|o| phase(o) == p)
    })
    .await;
    m.iter().find(|(_, o)| phase(o) == p).unwrap().0.clone()
}

/// The controller is killed while the first admitted node is in each disruptive phase. Each
/// phase is held until the kill is done: Draining by a PodDisruptionBudget that allows no
/// eviction, Activating by holding `switch-to-configuration`, Rebooting by holding the machine
/// before it goes down, Verifying by holding the agent's start after the reboot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restarted_in_every_phase_resumes_without_over_admission() {
    let (mut world, c) = adopted(fast(), 1).await;
    c.kill();
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(world.client.clone(), WORKLOAD_NAMESPACE);
    let block: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "hold", "namespace": WORKLOAD_NAMESPACE},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}}
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &block).await.unwrap();
    for n in &world.nodes {
        n.host.hold(HoldPoint::Switch).unwrap();
        n.host.hold(HoldPoint::Reboot).unwrap();
    }
    let next = roll_out_kernel_bump(&mut world).await;
    let mut controller = world.start_controller(controller_config(1)).await.unwrap();

    let node = node_in(&world, Phase::Draining).await;
    controller = restart_in(&world, controller, &node, Phase::Draining).await;
    pdbs.delete("hold", &DeleteParams::default()).await.unwrap();

    let host = world.node(&node).unwrap().host.clone();
    assert!(
        host.wait_until_waiting(HoldPoint::Switch, WAIT).await,
        "{node}: no switch"
    );
    assert_eq!(node_in(&world, Phase::Activating).await, node);
    controller = restart_in(&world, controller, &node, Phase::Activating).await;
    assert!(
        host.is_waiting(HoldPoint::Switch),
        "the switch still runs after the kill"
    );
    for n in &world.nodes {
        n.host.hold(HoldPoint::AgentStart).unwrap();
        n.host.release(HoldPoint::Switch).unwrap();
    }

    assert!(
        host.wait_until_waiting(HoldPoint::Reboot, WAIT).await,
        "{node}: no reboot"
    );
    assert_eq!(node_in(&world, Phase::Rebooting).await, node);
    controller = restart_in(&world, controller, &node, Phase::Rebooting).await;
    assert!(host.is_waiting(HoldPoint::Reboot));
    for n in &world.nodes {
        n.host.release(HoldPoint::Reboot).unwrap();
    }

    assert!(
        host.wait_until_waiting(HoldPoint::AgentStart, WAIT).await,
        "{node}: not back"
    );
    assert_eq!(node_in(&world, Phase::Verifying).await, node);
    controller = restart_in(&world, controller, &node, Phase::Verifying).await;
    assert!(host.is_waiting(HoldPoint::AgentStart));
    for n in &world.nodes {
        n.host.release(HoldPoint::AgentStart).unwrap();
    }

    wait_for(&world, "rollout", Duration::from_secs(120), all_on(&next)).await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(monitor.max_concurrent(), 1);
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted exactly once", n.name);
    }
    controller.stop().await;
}

/// The agent is killed while `switch-to-configuration boot` runs (held until the kill is done,
/// and the new agent held from starting until then): the switch survives it, and the node
/// reboots once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_mid_activation_never_reboots_twice() {
    let (mut world, c) = adopted(fast(), 1).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    for n in &world.nodes {
        n.host.hold(HoldPoint::Switch).unwrap();
    }
    let next = roll_out_kernel_bump(&mut world).await;
    let name = node_in(&world, Phase::Activating).await;
    let host = world.node(&name).unwrap().host.clone();
    assert!(
        host.wait_until_waiting(HoldPoint::Switch, WAIT).await,
        "{name}: no switch"
    );
    host.hold(HoldPoint::AgentStart).unwrap();
    world.node(&name).unwrap().restart_agent();
    assert!(
        host.wait_until_waiting(HoldPoint::AgentStart, WAIT).await,
        "{name}: the agent was not killed"
    );
    assert!(host.is_waiting(HoldPoint::Switch), "the kill landed mid-switch");
    assert_eq!(phase_now(&world, &name).await, Phase::Activating);
    host.release(HoldPoint::AgentStart).unwrap();
    for n in &world.nodes {
        n.host.release(HoldPoint::Switch).unwrap();
    }
    wait_for(&world, "rollout", WAIT, all_on(&next)).await;
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1, "{} rebooted exactly once", n.name);
    }
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cordoned_by_an_admin_is_updated_and_stays_cordoned() {
    // The cordoned node counts against the budget all along (DESIGN.md §5): with a budget of
    // 2 the others go one at a time beside it.
    let (mut world, c) = adopted(fast(), 2).await;
    let nodes: Api<Node> = Api::all(world.client.clone());
    nodes.cordon("node-4").await.unwrap();
    let monitor = Monitor::start(world.client.clone(), 2, &["node-4"]);
    let next = roll_out_kernel_bump(&mut world).await;
    let done = wait_for(&world, "rollout", WAIT, all_on(&next)).await;
    assert!(unschedulable(&world, "node-4").await, "still cordoned");
    wait_unschedulable(&world, "node-3", false).await;
    assert_eq!(
        done["node-4"].status.as_ref().unwrap().revision.as_deref(),
        Some(next.as_str())
    );
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_outside_the_maintenance_window() {
    let (mut world, c) = adopted(fast(), 1).await;
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let closed = mark(&world).await;
    let next = kernel_bump(&mut world);
    let later =
        jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC) + jiff::SignedDuration::from_hours(6);
    let hhmm = |z: &jiff::Zoned| format!("{:02}:{:02}", z.hour(), z.minute());
    let mut spec = world.spec(&next);
    spec.maintenance_windows = vec![MaintenanceWindow {
        days: vec![],
        start: hhmm(&later),
        end: hhmm(&(later.clone() + jiff::SignedDuration::from_mins(30))),
        time_zone: "UTC".into(),
    }];
    world.apply_all(&spec).await.unwrap();
    let m = wait_for(&world, "all staged and waiting", WAIT, |m| {
        m.len() == 5 && m.values().all(|o| phase(o) == Phase::Waiting)
    })
    .await;
    assert!(
        m.values().all(|o| o
            .status
            .as_ref()
            .and_then(|s| s.target.as_ref())
            .and_then(|t| t.system.clone())
            .is_some()),
        "staging is not limited by the window"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opened = mark(&world).await;
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 0);
    }
    // Opening the window (here: removing it) lets the rollout run.
    world.apply_all(&world.spec(&next)).await.unwrap();
    wait_for(&world, "rollout", WAIT, all_on(&next)).await;
    assert_eq!(
        monitor.acts_between(closed, opened),
        vec![],
        "disrupted outside the window"
    );
    assert_monitor_saw_the_rollout(&world, &monitor);
    assert_eq!(monitor.violations(), Vec::<String>::new());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_pause_and_resume() {
    let (config, bound) = with_metrics(1);
    let (mut world, c) = adopted_with(fast(), config).await;
    assert_eq!(common::world::metric(&bound, "nixroll_paused").await, Some(0.0));
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), nixroll::names::NAMESPACE);
    let pause: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": nixroll::names::PAUSE_CONFIGMAP, "namespace": nixroll::names::NAMESPACE}
    }))
    .unwrap();
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let paused = rv_of(&cms.create(&PostParams::default(), &pause).await.unwrap().metadata);
    let next = roll_out_kernel_bump(&mut world).await;
    wait_for(&world, "all waiting while paused", WAIT, |m| {
        m.len() == 5 && m.values().all(|o| phase(o) == Phase::Waiting)
    })
    .await;
    // Room for the controller to do something wrong; the monitor watches all of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(world.nodes.iter().all(|n| n.host.reboot_count() == 0));
    assert_eq!(
        common::world::metric(&bound, "nixroll_paused").await,
        Some(1.0),
        "paused shows in the metrics"
    );
    let resumed = mark(&world).await;
    cms.delete(nixroll::names::PAUSE_CONFIGMAP, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&world, "rollout after resume", WAIT, all_on(&next)).await;
    // No slot, cordon, eviction or activation grant while paused.
    assert_eq!(
        monitor.acts_between(paused, resumed),
        vec![],
        "disrupted while paused"
    );
    assert_monitor_saw_the_rollout(&world, &monitor);
    assert_eq!(monitor.violations(), Vec::<String>::new());
    assert_eq!(common::world::metric(&bound, "nixroll_paused").await, Some(0.0));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_between_two_replicas() {
    let mut world = World::start(fast()).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let elected = |id: &str| {
        let mut c = controller_config(1);
        let mut le = nixroll::controller::LeaderElectionConfig::new(
            nixroll::names::NAMESPACE,
            nixroll::names::LEADER_LEASE,
            id,
        );
        le.lease_duration = Duration::from_secs(3);
        le.renew_period = Duration::from_secs(1);
        c.identity = id.to_string();
        c.leader_election = Some(le);
        c
    };
    let a = world.start_controller(elected("replica-a")).await.unwrap();
    wait_for(&world, "adoption", WAIT, all_on(&first)).await;
    let b = world.start_controller(elected("replica-b")).await.unwrap();
    let monitor = Monitor::start(world.client.clone(), 1, &[]);
    let next = roll_out_kernel_bump(&mut world).await;
    wait_for(&world, "a node rebooting", WAIT, |m| {
        m.values().any(|o| phase(o) == Phase::Rebooting)
    })
    .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(world.client.clone(), nixroll::names::NAMESPACE);
    let holder = leases
        .get(nixroll::names::LEADER_LEASE)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("replica-a"), "the killed replica led");
    a.kill(); // the leader's pod dies without releasing the Lease
    wait_for(
        &world,
        "rollout finished by the standby",
        Duration::from_secs(150),
        all_on(&next),
    )
    .await;
    assert_eq!(monitor.violations(), Vec::<String>::new());
    for n in &world.nodes {
        assert_eq!(n.host.reboot_count(), 1);
    }
    b.stop().await;
}

/// The embedded API does not evaluate the CRD's CEL rules, so it accepts a NixOSNode with both
/// `revision` and `sourceRef`; the controller refuses it itself: `InvalidSpec` conditions that
/// say what to fix, the node untouched (not cordoned, still on its revision), the others
/// rolled out; once fixed, the node rolls out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_the_crd_rules_refuse_is_refused_by_the_controller_too() {
    use nixroll::rollout::{condition, reason};
    let (mut world, c) = adopted(common::world::fast_world(5, 0), 1).await;
    let first = world.head().to_string();
    let next = kernel_bump(&mut world);
    let mut both = world.spec(&next);
    both.source_ref = Some(nixroll::api::SourceRef {
        kind: nixroll::api::SourceKind::FlakeSource,
        name: "infra".into(),
        namespace: None,
    });
    world.apply("node-3", &both).await.unwrap();
    for n in ["node-1", "node-2", "node-4", "node-5"] {
        world.apply(n, &world.spec(&next)).await.unwrap();
    }
    let invalid = |o: &NixOSNode| {
        o.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == condition::UP_TO_DATE
                    && c.status == "False"
                    && c.reason == reason::INVALID_SPEC
                    && c.message.contains("exactly one of spec.revision")
            })
        })
    };
    let seen = wait_for(&world, "node-3 refused, the others rolled out", WAIT, |m| {
        m.get("node-3").is_some_and(invalid)
            && m.iter().filter(|(n, _)| n.as_str() != "node-3").all(|(_, o)| {
                phase(o) == Phase::UpToDate
                    && o.status.as_ref().and_then(|s| s.revision.as_deref()) == Some(next.as_str())
            })
            && m.len() == 5
    })
    .await;
    let node3 = seen
        .get("node-3")
        .and_then(|o| o.status.clone())
        .unwrap_or_default();
    assert_eq!(
        node3.revision.as_deref(),
        Some(first.as_str()),
        "node-3 still runs its revision"
    );
    assert!(
        node3.slot.is_none() && node3.activation.is_none(),
        "nothing disruptive: {node3:?}"
    );
    assert!(!unschedulable(&world, "node-3").await, "node-3 was not cordoned");
    let message = node3.message.unwrap_or_default();
    assert!(message.contains("invalid spec"), "{message}");

    // Fixed: it rolls out like the others.
    world.apply("node-3", &world.spec(&next)).await.unwrap();
    wait_for(&world, "node-3 rolled out once fixed", WAIT, all_on(&next)).await;
    c.stop().await;
}
