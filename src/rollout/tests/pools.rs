//! The state machine with NixOSPools (src/rollout/pools.rs): membership, budgets per pool,
//! order and soak, gates, pool status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::api::{HistoryEntry, NixOSPoolSpec, NixOSPoolStatus, PoolSelector, pool_condition};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn pool_spec(label: &str, max: Option<IntOrString>, after: &[&str], soak: Option<&str>) -> NixOSPoolSpec {
    NixOSPoolSpec {
        selector: PoolSelector {
            match_labels: labels(&[("pool", label)]),
            ..PoolSelector::default()
        },
        max_unavailable: max,
        paused: false,
        after: after.iter().map(|s| (*s).to_owned()).collect(),
        soak: soak.map(str::to_owned),
        node_soak: None,
        health_gates: None,
    }
}

/// Nodes `ns` with the labels `node_labels[i]`, pools `(name, spec)`.
fn cluster(
    ns: &[N],
    node_labels: &[BTreeMap<String, String>],
    pools: &[(&str, NixOSPoolSpec)],
) -> ClusterState {
    ClusterState {
        paused: false,
        pools: Pools::build(
            pools.iter().map(|(n, s)| (*n, s)),
            ns.iter().zip(node_labels).map(|(n, l)| (n.name.as_str(), l)),
        ),
    }
}

fn admit_at(ns: &[N], c: &ClusterState, p: &Policy, now: Timestamp) -> Vec<String> {
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    admit(&views, c, p, now)
}

/// The node runs REV2, UpToDate, finished at `finished`.
fn mk_done(name: &str, finished: Timestamp) -> N {
    let mut n = mk_node(name);
    n.spec.revision = REV2.into();
    n.status.phase = Some(Phase::UpToDate);
    n.status.revision = Some(REV2.into());
    n.status.history = vec![HistoryEntry {
        revision: REV2.into(),
        system: Some(SYS2.into()),
        result: "Succeeded".into(),
        started_at: Time(t0()),
        finished_at: Time(finished),
        rebooted: true,
        message: None,
    }];
    n
}

#[test]
fn pools_roll_concurrently_each_within_its_own_budget() {
    let ns: Vec<N> = ["a1", "a2", "b1", "b2", "d1", "d2"]
        .iter()
        .map(|x| mk_waiting(x, false))
        .collect();
    let ls = [
        labels(&[("pool", "a")]),
        labels(&[("pool", "a")]),
        labels(&[("pool", "b")]),
        labels(&[("pool", "b")]),
        labels(&[]),
        labels(&[]),
    ];
    let c = cluster(
        &ns,
        &ls,
        &[
            ("a", pool_spec("a", None, &[], None)),
            ("b", pool_spec("b", None, &[], None)),
        ],
    );
    // One from each pool and one from the default pool (the controller's budget, 1).
    assert_eq!(
        admit_at(&ns, &c, &Policy::default(), at(20)),
        vec!["a1", "b1", "d1"]
    );
    // A percentage: 100% of pool a's two nodes.
    let c = cluster(
        &ns,
        &ls,
        &[
            (
                "a",
                pool_spec("a", Some(IntOrString::String("100%".into())), &[], None),
            ),
            ("b", pool_spec("b", None, &[], None)),
        ],
    );
    assert_eq!(
        admit_at(&ns, &c, &Policy::default(), at(20)),
        vec!["a1", "a2", "b1", "d1"]
    );
    // Without pools: exactly the old gate.
    assert_eq!(
        admit_at(&ns, &ClusterState::default(), &Policy::default(), at(20)),
        vec!["a1"]
    );
}

#[test]
fn an_unavailable_node_uses_its_own_pools_budget_only() {
    let mut ns: Vec<N> = ["a1", "a2", "b1"].iter().map(|x| mk_waiting(x, false)).collect();
    ns[0].node.unschedulable = true; // an admin cordon in pool a
    let ls = [
        labels(&[("pool", "a")]),
        labels(&[("pool", "a")]),
        labels(&[("pool", "b")]),
    ];
    let c = cluster(
        &ns,
        &ls,
        &[
            ("a", pool_spec("a", None, &[], None)),
            ("b", pool_spec("b", None, &[], None)),
        ],
    );
    assert_eq!(admit_at(&ns, &c, &Policy::default(), at(20)), vec!["b1"]);
}

#[test]
fn a_node_in_two_pools_is_refused_and_both_pools_say_so() {
    let ns: Vec<N> = ["x", "a1"].iter().map(|x| mk_waiting(x, false)).collect();
    let ls = [labels(&[("pool", "a"), ("tier", "b")]), labels(&[("pool", "a")])];
    let mut b = pool_spec("b", None, &[], None);
    b.selector.match_labels = labels(&[("tier", "b")]);
    let c = cluster(&ns, &ls, &[("a", pool_spec("a", None, &[], None)), ("b", b)]);
    assert_eq!(admit_at(&ns, &c, &Policy::default(), at(20)), vec!["a1"]);
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    for (p, other) in [(0, "b"), (1, "a")] {
        let st = pool_status(
            &c.pools,
            p,
            &views,
            &Policy::default(),
            &NixOSPoolStatus::default(),
            1,
            at(20),
        );
        let cond = st
            .conditions
            .iter()
            .find(|c| c.type_ == pool_condition::CONFLICT)
            .unwrap();
        assert_eq!(cond.status, "True", "{cond:?}");
        assert_eq!(cond.reason, "NodeInMultiplePools");
        assert!(
            cond.message.contains("x also selected by pool") && cond.message.contains(other),
            "{}",
            cond.message
        );
    }
}

#[test]
fn a_paused_pool_admits_nothing_while_the_others_go_on() {
    let ns: Vec<N> = ["a1", "b1"].iter().map(|x| mk_waiting(x, false)).collect();
    let ls = [labels(&[("pool", "a")]), labels(&[("pool", "b")])];
    let mut a = pool_spec("a", None, &[], None);
    a.paused = true;
    let c = cluster(&ns, &ls, &[("a", a), ("b", pool_spec("b", None, &[], None))]);
    assert_eq!(admit_at(&ns, &c, &Policy::default(), at(20)), vec!["b1"]);
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    let st = pool_status(
        &c.pools,
        0,
        &views,
        &Policy::default(),
        &NixOSPoolStatus::default(),
        1,
        at(20),
    );
    let cond = st
        .conditions
        .iter()
        .find(|c| c.type_ == pool_condition::UPDATING)
        .unwrap();
    assert_eq!(cond.reason, "Paused");
}

#[test]
fn an_ordered_pool_waits_for_its_predecessor_to_run_the_revision_be_healthy_and_soak() {
    // The canary c1 is still Waiting for REV2: pool rest waits.
    let mut ns: Vec<N> = ["c1", "r1", "r2"].iter().map(|x| mk_waiting(x, false)).collect();
    let ls = [
        labels(&[("pool", "canary")]),
        labels(&[("pool", "rest")]),
        labels(&[("pool", "rest")]),
    ];
    let pools = [
        ("canary", pool_spec("canary", None, &[], None)),
        (
            "rest",
            pool_spec("rest", Some(IntOrString::Int(2)), &["canary"], Some("1h")),
        ),
    ];
    let c = cluster(&ns, &ls, &pools);
    assert_eq!(admit_at(&ns, &c, &Policy::default(), at(20)), vec!["c1"]);
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    let (reason, why) = pool_blocker(&c.pools, 1, REV2, &views, at(20)).unwrap();
    assert_eq!(reason, "WaitingForPool");
    assert!(
        why.contains("waiting for pool canary to run 22222222 and be healthy (0/1 nodes)"),
        "{why}"
    );
    // The canary finished REV2 at t=100: rest soaks for an hour.
    ns[0] = mk_done("c1", at(100));
    let finished = at(100);
    assert_eq!(
        admit_at(&ns, &c, &Policy::default(), at(200)),
        Vec::<String>::new()
    );
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    let (reason, why) = pool_blocker(&c.pools, 1, REV2, &views, at(200)).unwrap();
    assert_eq!(reason, "Soaking", "{why}");
    let st = pool_status(
        &c.pools,
        1,
        &views,
        &Policy::default(),
        &NixOSPoolStatus::default(),
        1,
        at(200),
    );
    assert!(
        st.message.as_deref().unwrap().contains("soaking until"),
        "{:?}",
        st.message
    );
    let soaked = finished.checked_add(SignedDuration::from_hours(1)).unwrap();
    assert_eq!(admit_at(&ns, &c, &Policy::default(), soaked), vec!["r1", "r2"]);
    // After soaking, the canary must still be healthy: cordoned, NotReady or Degraded blocks.
    ns[0].node.ready = false;
    assert!(admit_at(&ns, &c, &Policy::default(), soaked).is_empty());
    ns[0].node.ready = true;
    ns[0].status.phase = Some(Phase::Degraded);
    let st = pool_status(
        &c.pools,
        0,
        &ns.iter().map(|n| n.view()).collect::<Vec<_>>(),
        &Policy::default(),
        &NixOSPoolStatus::default(),
        1,
        soaked,
    );
    assert_eq!(st.degraded, 1);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True")
    );
}

#[test]
fn an_order_on_a_missing_or_empty_pool_blocks() {
    let ns: Vec<N> = ["r1"].iter().map(|x| mk_waiting(x, false)).collect();
    let ls = [labels(&[("pool", "rest")])];
    let c = cluster(&ns, &ls, &[("rest", pool_spec("rest", None, &["canary"], None))]);
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
    let c = cluster(
        &ns,
        &ls,
        &[
            ("canary", pool_spec("canary", None, &[], None)),
            ("rest", pool_spec("rest", None, &["canary"], None)),
        ],
    );
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    assert!(
        pool_blocker(&c.pools, 1, REV2, &views, at(20))
            .unwrap()
            .1
            .contains("selects no node")
    );
}

#[test]
fn never_two_control_plane_nodes_across_pools() {
    let mut ns: Vec<N> = ["cp1", "cp2"].iter().map(|x| mk_waiting(x, false)).collect();
    ns[0].node.control_plane = true;
    ns[1].node.control_plane = true;
    let ls = [labels(&[("pool", "a")]), labels(&[("pool", "b")])];
    let c = cluster(
        &ns,
        &ls,
        &[
            ("a", pool_spec("a", None, &[], None)),
            ("b", pool_spec("b", None, &[], None)),
        ],
    );
    assert_eq!(admit_at(&ns, &c, &Policy::default(), at(20)), vec!["cp1"]);
    // cp1 unready: cp2 may not go either, though its pool has room.
    ns[0].node.ready = false;
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
}

#[test]
fn pool_specs_parse_budgets_and_soak_and_refuse_bad_ones() {
    let mut s = pool_spec("a", Some(IntOrString::String("25%".into())), &[], Some("1h30m"));
    let p = Pool::from_spec("a", &s);
    assert_eq!(p.max_unavailable, MaxUnavailable::Percent(25));
    assert_eq!(p.soak, SignedDuration::from_mins(90));
    assert!(p.invalid.is_none());
    // 25% of 3 nodes rounds down to 0, and is at least 1.
    assert_eq!(budget(p.max_unavailable, 3), 1);
    assert_eq!(budget(MaxUnavailable::Percent(50), 5), 2);
    s.soak = Some("soon".into());
    assert!(Pool::from_spec("a", &s).invalid.is_some());
    s.soak = None;
    s.max_unavailable = Some(IntOrString::String("0%".into()));
    assert!(Pool::from_spec("a", &s).invalid.is_some());
    // An invalid pool admits nothing.
    let ns: Vec<N> = ["a1"].iter().map(|x| mk_waiting(x, false)).collect();
    let c = cluster(&ns, &[labels(&[("pool", "a")])], &[("a", s)]);
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
}

/// An order cycle blocks its pools and is named; a pool after the cycle waits for it; a
/// Waiting node says which pool holds it and why in its own conditions.
#[test]
fn an_order_cycle_is_named_and_a_waiting_node_says_which_pool_holds_it() {
    let ns: Vec<N> = ["a1", "b1", "c1"].iter().map(|x| mk_waiting(x, false)).collect();
    let ls = [
        labels(&[("pool", "a")]),
        labels(&[("pool", "b")]),
        labels(&[("pool", "c")]),
    ];
    let c = cluster(
        &ns,
        &ls,
        &[
            ("a", pool_spec("a", None, &["b"], None)),
            ("b", pool_spec("b", None, &["a"], None)),
            ("c", pool_spec("c", None, &["a"], None)),
        ],
    );
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    let (why, msg) = pool_blocker(&c.pools, 0, REV2, &views, at(20)).unwrap();
    assert_eq!(why, crate::rollout::pools::pool_reason::ORDER_CYCLE);
    assert!(msg.contains("a after b after a"), "{msg}");
    assert_eq!(
        crate::rollout::pools::order_cycle(&c.pools, 1),
        Some(vec!["b".to_owned(), "a".to_owned(), "b".to_owned()])
    );
    assert_eq!(crate::rollout::pools::order_cycle(&c.pools, 2), None);
    let (why, msg) = node_blocker(&c.pools, 2, &views, at(20)).unwrap();
    assert_eq!(why, crate::rollout::pools::pool_reason::WAITING_FOR_POOL);
    assert!(msg.starts_with("pool c: waiting for pool a"), "{msg}");
    // The node's own Progressing condition carries it.
    let mut n = mk_waiting("c1", false);
    n.node.held_by = Some((why.to_owned(), msg.clone()));
    let d = n.step(false, None, at(21));
    assert_eq!(d.rows, vec![Row::WaitingHeld]);
    let cond = n.cond(condition::PROGRESSING);
    assert_eq!(cond.reason, "WaitingForPool");
    assert!(
        cond.message.contains("pool c: waiting for pool a"),
        "{}",
        cond.message
    );
    // A node of the default pool held by a cluster-default gate.
    let mut pools = c.pools.clone();
    pools.default_gate_block = Some("health gate alerts: NodeDown firing".into());
    pools.selected_by.remove("a1");
    let (why, msg) = node_blocker(&pools, 0, &views, at(20)).unwrap();
    assert_eq!(
        (why, msg.as_str()),
        (
            "GateBlocking",
            "default pool: health gate alerts: NodeDown firing"
        )
    );
}

/// A Degraded node halts its own pool whatever the failure threshold; the other pool goes
/// on when the threshold allows.
#[test]
fn a_degraded_node_halts_its_pool_only() {
    let mut ns: Vec<N> = ["a1", "a2", "b1"].iter().map(|x| mk_waiting(x, false)).collect();
    ns[0].status.phase = Some(Phase::Degraded);
    ns[0].status.failed = Some(crate::api::FailedTarget {
        revision: REV2.into(),
        system: Some(SYS2.into()),
        reason: reason::GATE_FAILED.into(),
        message: "post-gate x".into(),
        at: Time(at(5)),
    });
    let ls = [
        labels(&[("pool", "a")]),
        labels(&[("pool", "a")]),
        labels(&[("pool", "b")]),
    ];
    let two = || Some(IntOrString::Int(2));
    let c = cluster(
        &ns,
        &ls,
        &[
            ("a", pool_spec("a", two(), &[], None)),
            ("b", pool_spec("b", two(), &[], None)),
        ],
    );
    let lenient = Policy {
        failure_threshold: 5,
        ..Policy::default()
    };
    assert_eq!(admit_at(&ns, &c, &lenient, at(20)), vec!["b1"]);
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    let (why, msg) = pool_blocker(&c.pools, 0, REV2, &views, at(20)).unwrap();
    assert_eq!(why, crate::rollout::pools::pool_reason::NODE_DEGRADED);
    assert!(msg.contains("a1 (GateFailed)"), "{msg}");
    // The default threshold (1) halts every pool.
    assert!(admit_at(&ns, &c, &Policy::default(), at(20)).is_empty());
}
