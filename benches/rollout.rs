//! `cargo bench --bench rollout`: cost of one `decide` and one `admit` call on a cluster of
//! 1,000 nodes in mixed phases (no criterion: `std::time::Instant`, median and p99).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nixroll::api::{
    AgentStatus, HistoryEntry, MaintenanceWindow, NixOSNodeSpec, NixOSNodeStatus, Phase, RebootPolicy, Slot,
    StagedSystem, Target, Weekday, installable,
};
use nixroll::rollout::{
    ClusterState, DrainProgress, MaxUnavailable, NodeObservation, NodeView, Policy, admit, decide,
};

const NODES: usize = 1000;
const FLAKE: &str = "git+https://git.example.org/infra.git";
const OLD: &str = "1111111111111111111111111111111111111111";
const NEW: &str = "2222222222222222222222222222222222222222";

struct Fixture {
    names: Vec<String>,
    specs: Vec<NixOSNodeSpec>,
    statuses: Vec<NixOSNodeStatus>,
    obs: Vec<NodeObservation>,
}

fn fixture(now: Timestamp) -> Fixture {
    let mut f = Fixture {
        names: vec![],
        specs: vec![],
        statuses: vec![],
        obs: vec![],
    };
    for i in 0..NODES {
        let name = format!("node-{i:04}");
        let windows = if i % 2 == 0 {
            vec![MaintenanceWindow {
                days: vec![Weekday::Sat, Weekday::Sun],
                start: "01:00".into(),
                end: "05:00".into(),
                time_zone: "Europe/Berlin".into(),
            }]
        } else {
            vec![]
        };
        let spec = NixOSNodeSpec {
            flake: FLAKE.into(),
            revision: NEW.into(),
            source_ref: None,
            configuration: None,
            maintenance_windows: windows,
            reboot: RebootPolicy::IfNeeded,
            drain: None,
            suspend: false,
            secrets: Vec::new(),
        };
        let new_sys = format!("/nix/store/bbbb-nixos-system-{name}");
        let old_sys = format!("/nix/store/aaaa-nixos-system-{name}");
        let target = Target {
            revision: NEW.into(),
            installable: installable(FLAKE, NEW, &name),
            system: Some(new_sys.clone()),
            build: None,
        };
        let history: Vec<HistoryEntry> = (0..10)
            .map(|k| HistoryEntry {
                revision: OLD.into(),
                system: Some(old_sys.clone()),
                result: "Succeeded".into(),
                started_at: Time(now),
                finished_at: Time(now),
                rebooted: k % 2 == 0,
                message: Some("rebooted into the new system".into()),
            })
            .collect();
        // 60 % Waiting (the admission candidates), 40 % UpToDate; a few draining. (No node is
        // Staging: admission waits until staging is over, which would make `admit` trivial.)
        let phase = match i % 10 {
            0..=5 => Phase::Waiting,
            _ => Phase::UpToDate,
        };
        let phase = if i < 3 { Phase::Draining } else { phase };
        let status = NixOSNodeStatus {
            phase: Some(phase),
            message: Some("staged".into()),
            observed_generation: Some(2),
            wanted: Some("22222222".into()),
            running: Some("11111111".into()),
            revision: Some(if phase == Phase::UpToDate { NEW } else { OLD }.into()),
            system: Some(old_sys.clone()),
            target: (phase != Phase::UpToDate).then(|| target.clone()),
            slot: (phase == Phase::Draining).then_some(Slot {
                granted_at: Time(now),
                was_unschedulable: false,
                cordoned_by_nixroll: true,
                drain_started_at: Some(Time(now)),
                forced: false,
                verified_at: None,
            }),
            history,
            last_transition_time: Some(Time(now)),
            agent: Some(AgentStatus {
                boot_id: Some("b1".into()),
                booted_system: Some(old_sys.clone()),
                current_system: Some(old_sys.clone()),
                staged: (phase != Phase::Staging).then(|| StagedSystem {
                    revision: NEW.into(),
                    installable: target.installable.clone(),
                    system: new_sys.clone(),
                    closure_bytes: None,
                    reboot_required: true,
                    reboot_reasons: vec!["kernel".into()],
                    staged_at: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        f.names.push(name);
        f.specs.push(spec);
        f.statuses.push(status);
        f.obs.push(NodeObservation {
            exists: true,
            ready: true,
            unschedulable: phase == Phase::Draining,
            cordon_mark: phase == Phase::Draining,
            control_plane: i < 3,
            boot_id: Some("b1".into()),
            ..NodeObservation::default()
        });
    }
    // Run decide once so the statuses carry their conditions, like a live cluster.
    let policy = Policy::default();
    for i in 0..NODES {
        let v = NodeView {
            name: &f.names[i],
            generation: 2,
            retry_token: None,
            spec: &f.specs[i],
            status: &f.statuses[i],
            node: &f.obs[i],
        };
        let d = decide(&v, false, None, &policy, now);
        let agent = f.statuses[i].agent.take();
        f.statuses[i] = d.status;
        f.statuses[i].agent = agent;
    }
    f
}

fn views(f: &Fixture) -> Vec<NodeView<'_>> {
    (0..NODES)
        .map(|i| NodeView {
            name: &f.names[i],
            generation: 2,
            retry_token: None,
            spec: &f.specs[i],
            status: &f.statuses[i],
            node: &f.obs[i],
        })
        .collect()
}

fn report(what: &str, mut ns: Vec<u128>) {
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() as f64 - 1.0) * p) as usize];
    println!(
        "{what:<40} n={:>7}  median {:>9} ns  p99 {:>9} ns  max {:>9} ns",
        ns.len(),
        pct(0.5),
        pct(0.99),
        ns[ns.len() - 1]
    );
}

fn main() {
    // Saturday 02:00 in Berlin: the windows are open, so admit evaluates them all.
    let now: Timestamp = "2026-03-07T01:00:00Z".parse().unwrap();
    let f = fixture(now);
    let vs = views(&f);
    let policy = Policy {
        max_unavailable: MaxUnavailable::Percent(10),
        ..Default::default()
    };
    let drain = DrainProgress {
        remaining: 4,
        blocked_by_pdb: 1,
        refused: vec![],
    };

    // decide: one call per node, every node, many rounds.
    let mut per_call = Vec::with_capacity(NODES * 50);
    for round in 0..50 {
        let t = now.checked_add(SignedDuration::from_secs(round)).unwrap();
        for v in &vs {
            let d = (v.status.phase == Some(Phase::Draining)).then_some(&drain);
            let s = Instant::now();
            let out = decide(black_box(v), black_box(true), d, &policy, t);
            per_call.push(s.elapsed().as_nanos());
            black_box(out);
        }
    }
    report("decide (one node, mixed phases)", per_call);

    // decide for Waiting nodes only (window evaluation included).
    let mut waiting = Vec::new();
    for v in vs
        .iter()
        .filter(|v| v.status.phase == Some(Phase::Waiting))
        .take(200)
    {
        for _ in 0..20 {
            let s = Instant::now();
            black_box(decide(black_box(v), false, None, &policy, now));
            waiting.push(s.elapsed().as_nanos());
        }
    }
    report("decide (Waiting node)", waiting);

    // admit over all 1,000 nodes.
    let mut per_admit = Vec::with_capacity(200);
    let mut admitted = 0;
    for _ in 0..200 {
        let s = Instant::now();
        let out = admit(black_box(&vs), &ClusterState::default(), &policy, now);
        per_admit.push(s.elapsed().as_nanos());
        admitted = out.len();
        black_box(out);
    }
    report(&format!("admit (1,000 nodes, {admitted} admitted)"), per_admit);

    // A full reconcile sweep: admit once + decide for every node.
    let mut sweep = Vec::new();
    for _ in 0..20 {
        let s = Instant::now();
        let adm = admit(&vs, &ClusterState::default(), &policy, now);
        for v in &vs {
            black_box(decide(v, adm.iter().any(|a| a == v.name), None, &policy, now));
        }
        sweep.push(s.elapsed().as_nanos());
    }
    report("sweep (admit + 1,000 decide)", sweep);
}
