//! Deterministic simulation of a cluster driven by the real `nixroll::rollout::{decide, admit}`
//! on a virtual clock. Every step asserts the invariants of DESIGN.md §7 that the rollout core
//! is responsible for; runs without injected faults must also converge.
//!
//! The simulated controller reconciles a node only on its own triggers, like the real one: a
//! change of its NixOSNode or Node, its requeue, a targeted wake-up (sent when a slot is released
//! or a node leaves `Staging` or `Degraded`, and lost at random in some seeds), a change of the
//! pause, a restart, and the safety net: a sweep every [`SWEEP_PERIOD`] that reconciles the
//! nodes `admit` returns. A node `admit` returns must be admitted within two sweep periods.
//! The run fails unless every row of the state table in `docs/rollout.md` (`Row`) was taken.
//!
//! Pools (about half of the seeds, from a second generator so the other choices of a seed stay
//! as they were): two concurrent pools, a canary pool with the rest after it (soak 0 s to 4 h),
//! or a canary and two concurrent pools after it; a node selected by two pools for a while; a
//! pool paused for a while. Checked on every answer of the gate: each pool and the default pool
//! within its own budget, no node of two pools admitted, nothing from a paused pool, a pool with
//! an order only after every node of its predecessors runs the revision, healthy, and soaked;
//! the control-plane rules cluster-wide; and at every step, per pool, the slots held.
//!
//! Gates (a third generator): in about two thirds of the seeds with pools, one or two pool
//! health gates, and in a third of all seeds a cluster-default gate (the default pool's, and
//! that of every pool without its own), that flap (and, in faulty seeds, sometimes stay blocked
//! past their timeout);
//! every node's own pods (DaemonSet pods Ready 5–60 s after a boot, sometimes much later in
//! faulty seeds); in half of the seeds embedded etcd on the servers (`EtcdIsVoter` back 10–60 s
//! after a boot, sometimes much later). Invariants: nothing admitted while a pre-gate of its
//! pool blocks or from a pool with a Degraded node; **post-gates before the slot is freed**: a
//! node leaves `Verifying` for `UpToDate` only when k3s reports a server a healthy voter, all
//! its pods are Ready and each of its pools' gates last passed in an evaluation made after the
//! node was verified; a post-gate timeout leaves the node Degraded, cordoned, holding its slot.
//!
//! * `cargo test --test simulation` runs 2,000 seeds;
//! * `NIXROLL_SIM_SEEDS=N` runs N seeds; `NIXROLL_SIM_SEED=S` runs only seed S with its log.
//!
//! A failing seed prints `NIXROLL_SIM_SEED=<seed>` and the step log of that seed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_range_loop
)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nixroll::api::{
    ActivationAction, ActivationReport, ActivationState, AgentStatus, DrainPolicy, DrainTimeoutAction,
    HostError, HostOperation, MaintenanceWindow, NixOSNodeSpec, NixOSNodeStatus, NixOSPoolSpec, Phase,
    PoolSelector, RebootPolicy, StagedSystem, TargetBuild, Weekday,
};
use nixroll::rollout::{
    Action, ClusterState, Decision, DrainProgress, GateObservation, GateVerdict, K3S_GATE, MaxUnavailable,
    NodeObservation, NodeView, PODS_GATE, Policy, Pools, Row, admit, budget, condition, decide, is_admitted,
    needs_post_gates, reason, window,
};

const FLAKE: &str = "git+https://git.example.org/infra.git";

/// Period of the controller's safety net: every sweep reconciles the nodes `admit` returns, so a
/// lost wake-up delays an admission by at most this long.
const SWEEP_PERIOD: i64 = 10;
/// A node `admit` returns must have left `Waiting` within this long.
const ADMISSION_BOUND: i64 = 2 * SWEEP_PERIOD;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Admin,
    Nixroll,
}

#[derive(Clone, Debug)]
struct StageOp {
    revision: String,
    installable: String,
    /// The configuration attribute the installable builds.
    config: String,
    done: Timestamp,
    fail: bool,
}

#[derive(Clone, Debug)]
struct ActOp {
    id: String,
    action: ActivationAction,
    system: String,
    done: Timestamp,
    fail: bool,
}

#[derive(Clone, Debug)]
struct Host {
    boot_seq: u64,
    booted: String,
    current: String,
    boot_default: String,
    /// The entry set to boot once at the next boot (consumed by it).
    oneshot: Option<String>,
    /// The bootloader can boot an entry once (else the new system is made the default first).
    boot_once: bool,
    up: bool,
    boot_done: Option<Timestamp>,
    ready_at: Timestamp,
    fallback_next_boot: bool,
    /// Grant ids executed (persisted on the host: survives agent restarts).
    executed: HashSet<String>,
    reboots_per_grant: HashMap<String, u32>,
    staging: Option<StageOp>,
    /// A hung build: no staging started before this instant finishes earlier (fault).
    stage_stuck_until: Option<Timestamp>,
    activation: Option<ActOp>,
    /// k3s reports this server a healthy etcd voter from this instant of its current boot on.
    voter_at: Timestamp,
    /// An activation ran since the node's current slot was granted.
    activated_in_slot: bool,
}

struct SimNode {
    name: String,
    generation: i64,
    retry: Option<String>,
    spec: NixOSNodeSpec,
    status: NixOSNodeStatus,
    control_plane: bool,
    unschedulable: bool,
    cordoned_by: Option<Who>,
    host: Host,
    retry_at: Option<Timestamp>,
    /// The Node object exists (a machine that joins late has none before).
    registered: bool,
    join_at: Option<Timestamp>,
    /// Left `Degraded` by a retry while holding its slot, after this failure reason; set until
    /// the node is re-admitted and verified (or fails again).
    retried_holding_slot: Option<String>,
    readmitted_after: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PodState {
    Running { ready_at: Timestamp },
    Terminating { until: Timestamp },
    Pending { schedule_at: Timestamp },
}

#[derive(Clone, Debug)]
struct Pod {
    app: usize,
    node: Option<usize>,
    daemonset: bool,
    state: PodState,
    slow: bool,
}

#[derive(Clone, Debug)]
struct App {
    min_available: usize,
}

#[derive(Clone, Debug)]
struct RevInfo {
    kernel: u32,
    init_change: bool,
    /// The revision before this one, and the configurations this one does not change (their
    /// system stays that of `prev`, as for a commit that touches other hosts only).
    prev: Option<String>,
    unchanged: HashSet<String>,
}

/// A NixOSPool of the simulated cluster.
#[derive(Clone, Debug)]
struct SimPool {
    name: String,
    max_unavailable: MaxUnavailable,
    after: Vec<usize>,
    soak: i64,
    /// `spec.nodeSoak` in seconds; `None`: the controller's `--node-soak`.
    node_soak: Option<i64>,
    /// `spec.paused` is true in this interval.
    paused_between: Option<(Timestamp, Timestamp)>,
}

/// A health gate of a pool, checked before admission and after each node's update (a
/// post-gate): it blocks in the intervals of `blocks` (short flaps; in faulty seeds sometimes an
/// outage longer than its timeout).
#[derive(Clone, Debug)]
struct SimGate {
    name: String,
    /// The pool it belongs to; `None`: a cluster-default gate (ConfigMap `nixroll-gates`), which
    /// applies to the default pool and to every pool without gates of its own.
    pool: Option<usize>,
    /// Post-gate timeout in seconds.
    timeout: i64,
    blocks: Vec<(Timestamp, Timestamp)>,
}

impl SimGate {
    fn passes(&self, t: Timestamp) -> bool {
        !self.blocks.iter().any(|&(a, b)| a <= t && t < b)
    }
}

/// How often the controller evaluates the pools' gates (`--admission-sweep`).
const GATE_PERIOD: i64 = 5;

/// What the controller last reconciled a node on (its watch cache).
type Seen = (i64, Option<String>, NodeObservation, Option<AgentStatus>);

struct Sim {
    rng: fastrand::Rng,
    now: Timestamp,
    step: usize,
    policy: Policy,
    faults: bool,
    nodes: Vec<SimNode>,
    pods: Vec<Pod>,
    apps: Vec<App>,
    forced_apps: HashSet<usize>,
    revs: HashMap<String, RevInfo>,
    rev_count: u32,
    bumps_left: u32,
    next_bump: Option<Timestamp>,
    paused: bool,
    /// After this instant no new admin cordon, pause or bump happens (convergence phase).
    quiet_after: Timestamp,
    // Controller memory (lost on restart).
    drain_mem: HashMap<usize, DrainProgress>,
    seen: Vec<Option<Seen>>,
    wake: Vec<Option<Timestamp>>,
    log: Option<String>,
    restarts: u32,
    /// How often each Event reason (and restart kind) happened: proves the paths are exercised.
    events: BTreeMap<String, usize>,
    /// How often `decide` took each row of the state table (index: `Row as usize`).
    rows: Vec<usize>,
    /// Percentage of targeted wake-ups lost (0 in about half of the seeds).
    wake_loss: u32,
    /// Controller memory: the next safety-net sweep, the pause it last saw, wake-ups it lost.
    next_sweep: Timestamp,
    paused_seen: bool,
    lost_wake: Vec<bool>,
    /// Since when `admit` has returned each node (liveness of admission).
    admissible_since: Vec<Option<Timestamp>>,
    /// NixOSPools (none in about half of the seeds) and the pools that select each node.
    pools: Vec<SimPool>,
    pool_of: Vec<Vec<usize>>,
    /// Until this instant, node `.0` is also selected by pool `.1` (a label mistake the user
    /// fixes later): it is in two pools and must not be admitted.
    conflict: Option<(usize, usize, Timestamp)>,
    /// The pools' health gates, and the controller's last evaluation of each (pass, when):
    /// lost on restart (the gates then block until evaluated again: fail closed).
    gates: Vec<SimGate>,
    gate_seen: Vec<Option<(bool, Timestamp)>>,
    next_gate_eval: Timestamp,
    /// The control-plane nodes run embedded etcd: k3s sets `EtcdIsVoter` on them.
    etcd: bool,
    /// Draws of the gates, DaemonSet pods and etcd (kept apart so the seeds' other draws stay).
    grng: fastrand::Rng,
    /// A builder (issue 21) in this seed: new targets wait for their build (`target.build`
    /// without a system) until it is done at the time drawn from `brng` per distinct target.
    builder: bool,
    brng: fastrand::Rng,
    build_done: HashMap<(String, String), Timestamp>,
}

macro_rules! check {
    ($sim:expr, $cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!("step {} at {}: invariant violated: {}", $sim.step, $sim.now, format!($($arg)*)));
        }
    };
}

fn rev_string(n: u32) -> String {
    format!("{:08x}", 0xabc0_0000u32 + n).repeat(5)
}

fn system_of(rev: &str, config: &str) -> String {
    format!("/nix/store/{}-nixos-system-{config}", &rev[..12])
}

/// The configuration attribute of an installable (`…#nixosConfigurations.NAME.config…`).
fn config_of(installable: &str) -> String {
    installable
        .split("nixosConfigurations.")
        .nth(1)
        .and_then(|r| r.split(".config.system").next())
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

fn rev_of_system(sys: &str) -> &str {
    sys.trim_start_matches("/nix/store/").get(..12).unwrap_or("")
}

fn add(t: Timestamp, secs: i64) -> Timestamp {
    t.checked_add(SignedDuration::from_secs(secs)).unwrap()
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let faults = rng.u32(0..100) < 45;
        let n = rng.usize(3..=6);
        let cps = rng.usize(1..=3.min(n - 1));
        let max_unavailable = if rng.bool() {
            MaxUnavailable::Count(rng.u32(1..=3))
        } else {
            MaxUnavailable::Percent(rng.u32(10..=60))
        };
        let policy = Policy {
            max_unavailable,
            failure_threshold: rng.u32(1..=2),
            drain_backoff: SignedDuration::from_secs(rng.i64(60..=300)),
            ..Default::default()
        };
        // Start somewhere in 2026, including DST transition days.
        let starts = [
            "2026-03-28T18:00:00Z",
            "2026-10-24T20:00:00Z",
            "2026-03-07T20:00:00Z",
            "2026-10-31T21:00:00Z",
            "2026-06-15T09:13:00Z",
        ];
        let now: Timestamp = starts[rng.usize(..starts.len())].parse().unwrap();
        let now = add(now, rng.i64(0..86_400));
        let windows: Vec<MaintenanceWindow> = if rng.u32(0..100) < 40 {
            let zones = ["UTC", "Europe/Berlin", "America/New_York"];
            let (s, e) = [
                ("01:00", "05:00"),
                ("22:00", "03:00"),
                ("02:30", "04:00"),
                ("01:00", "03:00"),
            ][rng.usize(..4)];
            vec![MaintenanceWindow {
                days: if rng.bool() {
                    vec![]
                } else {
                    vec![Weekday::Sat, Weekday::Sun, Weekday::Wed]
                },
                start: s.into(),
                end: e.into(),
                time_zone: zones[rng.usize(..3)].into(),
            }]
        } else {
            vec![]
        };
        let on_timeout = if rng.u32(0..100) < 30 {
            DrainTimeoutAction::Force
        } else {
            DrainTimeoutAction::Abort
        };
        let drain_timeout = ["10m", "15m", "5m", "1h"][rng.usize(..4)];
        let rev0 = rev_string(0);
        let mut revs = HashMap::new();
        revs.insert(
            rev0.clone(),
            RevInfo {
                kernel: 0,
                init_change: false,
                prev: None,
                unchanged: HashSet::new(),
            },
        );
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = if i < cps {
                format!("cp{i}")
            } else {
                format!("w{i}")
            };
            let reboot = match rng.u32(0..10) {
                0 => RebootPolicy::Always,
                1 => RebootPolicy::Never,
                _ => RebootPolicy::IfNeeded,
            };
            // Most hosts' bootloaders boot once (systemd-boot, GRUB); the rest make the new
            // system the default before the reboot, as before boot-once.
            let boot_once = rng.u32(0..100) < 85;
            let sys = system_of(&rev0, &name);
            nodes.push(SimNode {
                generation: 1,
                retry: None,
                spec: NixOSNodeSpec {
                    flake: FLAKE.into(),
                    revision: rev0.clone(),
                    source_ref: None,
                    configuration: None,
                    maintenance_windows: windows.clone(),
                    reboot,
                    drain: Some(DrainPolicy {
                        timeout: Some(drain_timeout.into()),
                        on_timeout,
                        ..Default::default()
                    }),
                    suspend: false,
                    secrets: Vec::new(),
                },
                status: NixOSNodeStatus::default(),
                control_plane: i < cps,
                unschedulable: false,
                cordoned_by: None,
                host: Host {
                    boot_seq: 1,
                    booted: sys.clone(),
                    current: sys.clone(),
                    boot_default: sys,
                    oneshot: None,
                    boot_once,
                    up: true,
                    boot_done: None,
                    ready_at: now,
                    fallback_next_boot: false,
                    executed: HashSet::new(),
                    reboots_per_grant: HashMap::new(),
                    staging: None,
                    stage_stuck_until: None,
                    activation: None,
                    voter_at: now,
                    activated_in_slot: false,
                },
                retry_at: None,
                registered: true,
                join_at: None,
                retried_holding_slot: None,
                readmitted_after: None,
                name,
            });
        }
        // Sometimes a worker's NixOSNode exists before its machine joined the cluster.
        let late = (rng.u32(0..100) < 6).then(|| rng.usize(cps..n));
        if let Some(j) = late {
            nodes[j].registered = false;
            nodes[j].host.up = false;
            nodes[j].join_at = Some(add(now, rng.i64(30..900)));
        }
        let placeable: Vec<usize> = (0..n).filter(|&i| Some(i) != late).collect();
        // Workloads: apps with PDBs (minAvailable = replicas - 1) and DaemonSet pods.
        let mut apps = Vec::new();
        let mut pods = Vec::new();
        for a in 0..rng.usize(1..=4) {
            let replicas = rng.usize(2..=n.min(4));
            apps.push(App {
                min_available: replicas - 1,
            });
            for _ in 0..replicas {
                pods.push(Pod {
                    app: a,
                    node: Some(placeable[rng.usize(..placeable.len())]),
                    daemonset: false,
                    state: PodState::Running { ready_at: now },
                    slow: faults && rng.u32(0..100) < 5,
                });
            }
        }
        let ds_app = apps.len();
        apps.push(App { min_available: 0 });
        for i in 0..n {
            pods.push(Pod {
                app: ds_app,
                node: Some(i),
                daemonset: true,
                state: PodState::Running { ready_at: now },
                slow: false,
            });
        }
        let bumps_left = rng.u32(1..=2);
        let wake_loss = if rng.bool() { 0 } else { rng.u32(30..=100) };
        // Pools from a second generator, so the seeds' other choices stay what they were.
        let (pools, pool_of, conflict) = pool_layout(seed, n, cps, now, add(now, 86_400));
        let mut grng = fastrand::Rng::with_seed(seed ^ 0x9a7e_5eed);
        let gates = gate_layout(&mut grng, &pools, faults, now, add(now, 86_400));
        let etcd = grng.bool();
        let mut policy = policy;
        policy.node_soak =
            SignedDuration::from_secs([0, 0, 60, 600][fastrand::Rng::with_seed(seed ^ 0x50a4).usize(..4)]);
        Sim {
            faults,
            now,
            step: 0,
            policy,
            wake: vec![Some(now); n],
            nodes,
            pods,
            apps,
            forced_apps: HashSet::new(),
            revs,
            rev_count: 0,
            bumps_left,
            next_bump: Some(add(now, rng.i64(0..600))),
            paused: false,
            quiet_after: add(now, 86_400),
            drain_mem: HashMap::new(),
            seen: vec![None; n],
            log: verbose.then(String::new),
            restarts: 0,
            events: BTreeMap::new(),
            rows: vec![0; Row::ALL.len()],
            wake_loss,
            next_sweep: add(now, SWEEP_PERIOD),
            paused_seen: false,
            lost_wake: vec![false; n],
            admissible_since: vec![None; n],
            pools,
            pool_of,
            conflict,
            gate_seen: vec![None; gates.len()],
            gates,
            next_gate_eval: now,
            etcd,
            grng,
            builder: fastrand::Rng::with_seed(seed ^ 0x00b0_1de4).u32(0..100) < 30,
            brng: fastrand::Rng::with_seed(seed ^ 0x00b0_1de5),
            build_done: HashMap::new(),
            rng,
        }
    }

    /// The pools that select node `i` now.
    fn pools_of(&self, i: usize) -> Vec<usize> {
        let mut of = self.pool_of[i].clone();
        if let Some((j, p, until)) = self.conflict
            && j == i
            && self.now < until
            && !of.contains(&p)
        {
            of.push(p);
        }
        of
    }

    fn pool_paused(&self, p: usize) -> bool {
        self.pools[p]
            .paused_between
            .is_some_and(|(a, b)| a <= self.now && self.now < b)
    }

    /// The pools as the controller builds them: NixOSPool specs and the nodes' labels.
    fn pool_state(&self) -> Pools {
        let specs: Vec<(String, NixOSPoolSpec)> = self
            .pools
            .iter()
            .enumerate()
            .map(|(p, sp)| {
                let spec = NixOSPoolSpec {
                    selector: PoolSelector {
                        match_labels: [(format!("pool-{}", sp.name), "true".to_owned())].into(),
                        ..PoolSelector::default()
                    },
                    max_unavailable: Some(match sp.max_unavailable {
                        MaxUnavailable::Count(c) => IntOrString::Int(c as i32),
                        MaxUnavailable::Percent(pc) => IntOrString::String(format!("{pc}%")),
                    }),
                    paused: self.pool_paused(p),
                    after: sp.after.iter().map(|&q| self.pools[q].name.clone()).collect(),
                    soak: Some(format!("{}s", sp.soak)),
                    node_soak: sp.node_soak.map(|s| format!("{s}s")),
                    health_gates: None,
                };
                (sp.name.clone(), spec)
            })
            .collect();
        let labels: Vec<BTreeMap<String, String>> = (0..self.nodes.len())
            .map(|i| {
                self.pools_of(i)
                    .iter()
                    .map(|&p| (format!("pool-{}", self.pools[p].name), "true".to_owned()))
                    .collect()
            })
            .collect();
        let mut pools = Pools::build(
            specs.iter().map(|(n, s)| (n.as_str(), s)),
            self.nodes.iter().zip(&labels).map(|(x, l)| (x.name.as_str(), l)),
        );
        // As the controller's `apply_verdicts`: a gate that blocked at its last evaluation, or
        // was not evaluated since this controller started, blocks its pool.
        let why = |gates: Vec<usize>| {
            gates.into_iter().find_map(|g| match self.gate_seen[g] {
                Some((true, _)) => None,
                Some((false, _)) => Some(format!("health gate {}: blocks", self.gates[g].name)),
                None => Some(format!("health gate {} not evaluated yet", self.gates[g].name)),
            })
        };
        for p in 0..self.pools.len() {
            if let Some(w) = why(self.gates_for(Some(p))) {
                pools.gate_blocks.insert(self.pools[p].name.clone(), w);
            }
        }
        pools.default_gate_block = why(self.gates_for(None));
        pools
    }

    /// The gates that apply to pool `p` (None: the default pool): its own, or the cluster
    /// defaults when it has none.
    fn gates_for(&self, p: Option<usize>) -> Vec<usize> {
        let own: Vec<usize> = (0..self.gates.len())
            .filter(|&g| p.is_some() && self.gates[g].pool == p)
            .collect();
        if !own.is_empty() {
            return own;
        }
        (0..self.gates.len())
            .filter(|&g| self.gates[g].pool.is_none())
            .collect()
    }

    /// The gates that apply to node `i`: those of every pool that selects it, or of the default
    /// pool.
    fn node_gates(&self, i: usize) -> Vec<usize> {
        let of = self.pools_of(i);
        if of.is_empty() {
            return self.gates_for(None);
        }
        let mut out: Vec<usize> = of.iter().flat_map(|&p| self.gates_for(Some(p))).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The controller's gate pass: every gate evaluated (every [`GATE_PERIOD`]).
    fn evaluate_gates(&mut self) {
        if self.now < self.next_gate_eval {
            return;
        }
        self.next_gate_eval = add(self.now, GATE_PERIOD);
        for g in 0..self.gates.len() {
            self.gate_seen[g] = Some((self.gates[g].passes(self.now), self.now));
        }
    }

    /// k3s's `EtcdIsVoter` on node `i` now (None: no embedded etcd, or not a server).
    fn etcd_voter(&self, i: usize) -> Option<bool> {
        let n = &self.nodes[i];
        (self.etcd && n.control_plane && n.registered).then(|| n.host.up && self.now >= n.host.voter_at)
    }

    /// Pods on node `i` that are not Ready (terminating ones left out).
    fn unready_pods_on(&self, i: usize) -> usize {
        self.pods
            .iter()
            .filter(|p| {
                p.node == Some(i) && !matches!(p.state, PodState::Terminating { .. }) && !self.pod_ready(p)
            })
            .count()
    }

    /// The post-gates of node `i` as the controller observes them now: the gates of every pool
    /// that selects it (their last evaluation) and the node's own pods (listed now).
    fn post_gates_of(&self, i: usize) -> Vec<GateObservation> {
        let mut out: Vec<GateObservation> = self
            .node_gates(i)
            .into_iter()
            .map(|g| (g, &self.gates[g]))
            .map(|(g, gate)| GateObservation {
                name: gate.name.clone(),
                timeout: SignedDuration::from_secs(gate.timeout),
                verdict: match self.gate_seen[g] {
                    None => GateVerdict::Unknown,
                    Some((true, at)) => GateVerdict::Pass { at },
                    Some((false, at)) => GateVerdict::Block {
                        at,
                        why: "blocks".into(),
                    },
                },
            })
            .collect();
        let unready = self.unready_pods_on(i);
        out.push(GateObservation {
            name: PODS_GATE.into(),
            timeout: self.policy.timeouts.verifying,
            verdict: if unready == 0 {
                GateVerdict::Pass { at: self.now }
            } else {
                GateVerdict::Block {
                    at: self.now,
                    why: format!("{unready} pods not Ready"),
                }
            },
        });
        out
    }

    /// The node finished its update less than `soak` seconds ago (UpToDate, newest history
    /// entry Succeeded): it still counts against its pool's budget.
    fn soaking(&self, i: usize, soak: i64) -> bool {
        let st = &self.nodes[i].status;
        soak > 0
            && st.phase == Some(Phase::UpToDate)
            && st
                .history
                .first()
                .is_some_and(|h| h.result == "Succeeded" && self.now < add(h.finished_at.0, soak))
    }

    /// The pool invariants over an answer of the gate: each pool (and the default pool) within
    /// its own budget, no node in two pools admitted, nothing from a paused pool, and a pool
    /// with an order only after its predecessors run the revision, are healthy and soaked.
    fn check_pools(&mut self, admitted: &[String]) -> Result<(), String> {
        let n = self.nodes.len();
        let idx = |a: &String| self.nodes.iter().position(|x| &x.name == a).unwrap();
        let new: Vec<usize> = admitted
            .iter()
            .map(idx)
            .filter(|&i| self.nodes[i].status.slot.is_none())
            .collect();
        let of: Vec<Vec<usize>> = (0..n).map(|i| self.pools_of(i)).collect();
        // Group g: None = the default pool, Some(p) = pool p.
        let groups: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..self.pools.len()).map(Some))
            .collect();
        for g in groups {
            let members: Vec<usize> = (0..n)
                .filter(|&i| match g {
                    None => of[i].is_empty(),
                    Some(p) => of[i].contains(&p),
                })
                .collect();
            let max = match g {
                None => self.policy.max_unavailable,
                Some(p) => self.pools[p].max_unavailable,
            };
            let budget = budget(max, members.len());
            let soak = g
                .and_then(|p| self.pools[p].node_soak)
                .unwrap_or(self.policy.node_soak.as_secs());
            let unavailable = members
                .iter()
                .filter(|&&i| self.unavailable(i) || self.soaking(i, soak))
                .count();
            let admits = new.iter().filter(|i| members.contains(i)).count();
            if admits > 0 && soak > 0 {
                *self.events.entry("(admitted with node soak)".into()).or_default() += 1;
            }
            let name = g.map_or("(default)".to_owned(), |p| self.pools[p].name.clone());
            check!(
                self,
                admits == 0 || unavailable + admits <= budget,
                "pool {name}: admitted {admitted:?} with {unavailable} unavailable, budget {budget}"
            );
            if admits > 0 {
                *self
                    .events
                    .entry(format!(
                        "(admitted in a {} pool)",
                        if g.is_none() { "default" } else { "named" }
                    ))
                    .or_default() += 1;
            }
        }
        for a in admitted {
            let i = idx(a);
            check!(
                self,
                of[i].len() <= 1,
                "admitted {a}, selected by pools {:?}",
                of[i]
            );
            // Pre-gates: every gate that applies to the node (its pool's, or the cluster
            // defaults) passed at its last evaluation.
            let gates = self.node_gates(i);
            for &g in &gates {
                let seen = self.gate_seen[g];
                check!(
                    self,
                    seen.is_some_and(|(pass, at)| pass && self.gates[g].passes(at)),
                    "admitted {a} while gate {} blocks ({seen:?})",
                    self.gates[g].name
                );
            }
            if !gates.is_empty() {
                *self
                    .events
                    .entry("(admitted past a pre-gate)".into())
                    .or_default() += 1;
            }
            if gates.iter().any(|&g| self.gates[g].pool.is_none()) {
                *self
                    .events
                    .entry("(admitted past a cluster-default gate)".into())
                    .or_default() += 1;
            }
            let Some(&p) = of[i].first() else { continue };
            check!(
                self,
                !self.pool_paused(p),
                "admitted {a} from paused pool {}",
                self.pools[p].name
            );
            // A Degraded node halts its pool (a post-gate that timed out, or any failure).
            let degraded: Vec<&str> = (0..n)
                .filter(|&m| of[m].contains(&p) && self.nodes[m].status.phase == Some(Phase::Degraded))
                .map(|m| self.nodes[m].name.as_str())
                .collect();
            check!(
                self,
                self.nodes[i].status.slot.is_some() || degraded.is_empty(),
                "admitted {a} from pool {} with Degraded {degraded:?}",
                self.pools[p].name
            );
            let rev = self.nodes[i]
                .status
                .target
                .as_ref()
                .map(|t| t.revision.clone())
                .unwrap_or_default();
            for &q in &self.pools[p].after.clone() {
                let members: Vec<usize> = (0..n).filter(|&m| of[m].contains(&q)).collect();
                check!(self, !members.is_empty(), "admitted {a} after an empty pool");
                let mut finished: Option<Timestamp> = None;
                for &m in &members {
                    let x = &self.nodes[m];
                    let healthy = x.status.revision.as_deref() == Some(rev.as_str())
                        && x.status.phase == Some(Phase::UpToDate)
                        && x.registered
                        && self.node_ready(m)
                        && !x.unschedulable;
                    check!(
                        self,
                        healthy,
                        "admitted {a} for {} while {} of pool {} is not healthy on it ({:?}, revision {:?})",
                        &rev[..8],
                        x.name,
                        self.pools[q].name,
                        x.status.phase,
                        x.status.revision
                    );
                    let f = x
                        .status
                        .history
                        .iter()
                        .filter(|h| h.revision == rev && h.result == "Succeeded")
                        .map(|h| h.finished_at.0)
                        .max();
                    finished = finished.max(f);
                }
                if let Some(f) = finished {
                    let soaked = add(f, self.pools[p].soak);
                    check!(
                        self,
                        self.now >= soaked,
                        "admitted {a} at {} before pool {} soaked (until {soaked})",
                        self.now,
                        self.pools[q].name
                    );
                    if self.pools[p].soak > 0 {
                        *self.events.entry("(admitted after a soak)".into()).or_default() += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn logf(&mut self, f: impl FnOnce() -> String) {
        if let Some(l) = self.log.as_mut() {
            let _ = writeln!(l, "[{} {}] {}", self.step, self.now, f());
        }
    }

    fn p(&mut self, percent: u32) -> bool {
        self.rng.u32(0..100) < percent
    }

    fn node_ready(&self, i: usize) -> bool {
        let h = &self.nodes[i].host;
        h.up && self.now >= h.ready_at
    }

    fn obs(&self, i: usize) -> NodeObservation {
        let n = &self.nodes[i];
        if !n.registered {
            return NodeObservation::default();
        }
        NodeObservation {
            exists: true,
            ready: n.host.up && self.now >= n.host.ready_at,
            unschedulable: n.unschedulable,
            cordon_mark: n.cordoned_by == Some(Who::Nixroll),
            control_plane: n.control_plane,
            boot_id: Some(format!("boot-{}-{}", n.name, n.host.boot_seq)),
            etcd_voter: self.etcd_voter(i),
            ..NodeObservation::default()
        }
    }

    fn pod_ready(&self, p: &Pod) -> bool {
        match (p.node, p.state) {
            (Some(i), PodState::Running { ready_at }) => {
                let h = &self.nodes[i].host;
                h.up && self.now >= ready_at
            }
            _ => false,
        }
    }

    fn non_ds_pods_on(&self, i: usize) -> usize {
        self.pods
            .iter()
            .filter(|p| !p.daemonset && p.node == Some(i))
            .count()
    }

    // ---- world ---------------------------------------------------------------------------

    fn world(&mut self) -> Result<(), String> {
        let now = self.now;
        // Spec bumps (a new commit reviewed and merged).
        if self.next_bump.is_some_and(|t| t <= now) {
            self.bump("spec bump");
            self.bumps_left -= 1;
            self.next_bump = if self.bumps_left > 0 {
                Some(add(now, self.rng.i64(60..4 * 3600)))
            } else {
                None
            };
        }
        let quiet = now >= self.quiet_after;
        // A machine joins the cluster: its Node appears as it boots.
        for i in 0..self.nodes.len() {
            if self.nodes[i].join_at.is_some_and(|t| t <= now) {
                let n = &mut self.nodes[i];
                n.join_at = None;
                n.registered = true;
                n.host.up = true;
                n.host.boot_seq += 1;
                n.host.ready_at = add(now, 10);
                let name = n.name.clone();
                self.logf(|| format!("{name} joins the cluster"));
            }
        }
        // Someone points a node at another configuration of the flake.
        if !quiet && self.rng.u32(0..1000) < 2 {
            let i = self.rng.usize(..self.nodes.len());
            self.change_configuration(i);
        }
        // Admin cordons / uncordons.
        if !quiet && self.p(2) {
            let i = self.rng.usize(..self.nodes.len());
            // Also on a node where nixroll holds a slot but has not cordoned yet (a crash
            // between writing the slot and cordoning): the Node's cordon mark tells the two
            // cordons apart, so nixroll must leave this one in place.
            if !self.nodes[i].unschedulable {
                self.nodes[i].unschedulable = true;
                self.nodes[i].cordoned_by = Some(Who::Admin);
                let name = self.nodes[i].name.clone();
                self.logf(|| format!("admin cordons {name}"));
            }
        }
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            // Admins uncordon their own cordons, but not while nixroll holds a slot there.
            if n.cordoned_by == Some(Who::Admin)
                && n.status.slot.is_none()
                && (quiet || self.rng.u32(0..100) < 3)
            {
                let n = &mut self.nodes[i];
                n.unschedulable = false;
                n.cordoned_by = None;
                let name = n.name.clone();
                self.logf(|| format!("admin uncordons {name}"));
            }
        }
        // Cluster pause toggles.
        if !quiet && self.p(1) {
            self.paused = !self.paused;
            let p = self.paused;
            self.logf(|| format!("cluster paused={p}"));
        } else if quiet && self.paused {
            self.paused = false;
        }
        // Suspend toggles.
        if !quiet && self.p(1) {
            let i = self.rng.usize(..self.nodes.len());
            self.nodes[i].spec.suspend = !self.nodes[i].spec.suspend;
            self.nodes[i].generation += 1;
        } else if quiet {
            for n in self.nodes.iter_mut() {
                if n.spec.suspend {
                    n.spec.suspend = false;
                    n.generation += 1;
                }
            }
        }
        // Users get degraded nodes going again after a while: mostly with the retry annotation,
        // sometimes by fixing the node's configuration or by a new commit.
        for i in 0..self.nodes.len() {
            if self.nodes[i].status.phase == Some(Phase::Degraded) {
                match self.nodes[i].retry_at {
                    None => self.nodes[i].retry_at = Some(add(now, self.rng.i64(600..7200))),
                    Some(t) if t <= now => {
                        self.nodes[i].retry_at = None;
                        let how = self.rng.u32(0..100);
                        if quiet || how < 70 {
                            let tok = format!("r{}", self.step);
                            self.nodes[i].retry = Some(tok);
                            let name = self.nodes[i].name.clone();
                            self.logf(|| format!("user retries {name}"));
                        } else if how < 85 {
                            self.change_configuration(i);
                        } else {
                            self.bump("fix-forward commit");
                        }
                    }
                    _ => {}
                }
            }
        }
        // Unplanned reboots (power cut, crash) between a one-time boot and its bless.
        for i in 0..self.nodes.len() {
            let before_bless = self.nodes[i].status.phase == Some(Phase::Verifying)
                && self.nodes[i].host.up
                && self.nodes[i].host.boot_default != self.nodes[i].host.booted
                && self.nodes[i]
                    .status
                    .activation
                    .as_ref()
                    .is_some_and(|g| g.action != ActivationAction::Switch);
            if before_bless && self.faults && self.rng.u32(0..1000) < 20 {
                let h = &mut self.nodes[i].host;
                h.up = false;
                h.activation = None;
                let d = self.rng.i64(20..300);
                self.nodes[i].host.boot_done = Some(add(now, d));
                *self
                    .events
                    .entry("(unplanned reboot before bless)".into())
                    .or_default() += 1;
                let name = self.nodes[i].name.clone();
                self.logf(|| format!("{name} reboots unplanned before the bless"));
            }
        }
        // Hosts: staging, activation, boots.
        for i in 0..self.nodes.len() {
            self.host_events(i)?;
        }
        // Pods.
        let n_nodes = self.nodes.len();
        for k in 0..self.pods.len() {
            match self.pods[k].state {
                PodState::Terminating { until } if until <= now => {
                    self.pods[k].node = None;
                    self.pods[k].state = PodState::Pending {
                        schedule_at: add(now, self.rng.i64(3..30)),
                    };
                }
                PodState::Pending { schedule_at } if schedule_at <= now => {
                    let ok: Vec<usize> = (0..n_nodes)
                        .filter(|&i| self.node_ready(i) && !self.nodes[i].unschedulable)
                        .collect();
                    if ok.is_empty() {
                        self.pods[k].state = PodState::Pending {
                            schedule_at: add(now, 30),
                        };
                    } else {
                        let i = ok[self.rng.usize(..ok.len())];
                        self.pods[k].node = Some(i);
                        self.pods[k].state = PodState::Running {
                            ready_at: add(now, self.rng.i64(2..20)),
                        };
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A new revision for every node. For some configurations it changes nothing (their system
    /// stays the one of the revision before).
    fn bump(&mut self, why: &str) {
        let prev = rev_string(self.rev_count);
        self.rev_count += 1;
        let rev = rev_string(self.rev_count);
        let kernel = if self.rng.bool() {
            self.rev_count
        } else {
            self.rev_count.saturating_sub(1)
        };
        let init_change = self.p(10);
        let mut unchanged = HashSet::new();
        if self.p(25) {
            for i in 0..self.nodes.len() {
                if self.p(50) {
                    let n = &self.nodes[i];
                    unchanged.insert(n.spec.configuration_for(&n.name).to_string());
                }
            }
        }
        self.revs.insert(
            rev.clone(),
            RevInfo {
                kernel,
                init_change,
                prev: Some(prev),
                unchanged,
            },
        );
        for n in self.nodes.iter_mut() {
            n.spec.revision = rev.clone();
            n.generation += 1;
        }
        self.logf(|| format!("{why} to {}", &rev[..12]));
    }

    fn change_configuration(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let k = n.generation;
        n.spec.configuration = Some(format!("{}-v{k}", n.name));
        n.generation += 1;
        let (name, c) = (n.name.clone(), n.spec.configuration.clone());
        self.logf(|| format!("{name} now builds configuration {c:?}"));
    }

    /// The system `config` builds at `rev`.
    fn system_for(&self, rev: &str, config: &str) -> String {
        let mut rev = rev;
        while let Some(info) = self.revs.get(rev)
            && info.unchanged.contains(config)
            && let Some(prev) = info.prev.as_deref()
        {
            rev = prev;
        }
        system_of(rev, config)
    }

    /// The kernel of a system (the one of the revision it was built from).
    fn kernel_of(&self, sys: &str) -> Option<u32> {
        let r = rev_of_system(sys);
        self.revs
            .iter()
            .find(|(k, _)| k[..12] == *r)
            .map(|(_, v)| v.kernel)
    }

    fn host_events(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        // Boot completes.
        if let Some(t) = self.nodes[i].host.boot_done
            && t <= now
        {
            let fallback = self.nodes[i].host.fallback_next_boot;
            let h = &mut self.nodes[i].host;
            h.boot_done = None;
            h.up = true;
            h.boot_seq += 1;
            h.ready_at = add(now, 10);
            if self.faults && self.rng.u32(0..100) < 3 {
                // The kubelet takes longer than the verify timeout to become Ready.
                self.nodes[i].host.ready_at = add(now, self.rng.i64(700..1500));
                *self.events.entry("(Node Ready late)".into()).or_default() += 1;
            }
            let h = &mut self.nodes[i].host;
            if let Some(once) = h.oneshot.take() {
                // The one-time entry is consumed; a new system that fails to boot (panic,
                // watchdog) brings the machine back on the default.
                h.booted = if fallback { h.boot_default.clone() } else { once };
            } else if !fallback {
                h.booted = h.boot_default.clone();
            }
            h.current = h.booted.clone();
            h.fallback_next_boot = false;
            // The DaemonSet pods start again after the kubelet, and k3s promotes the server
            // back to a voter (late, beyond the post-gate timeout, in some faulty seeds).
            let faults = self.faults;
            let late = |g: &mut fastrand::Rng| faults && g.u32(0..100) < 3;
            let voter_late = late(&mut self.grng);
            self.nodes[i].host.voter_at = add(
                now,
                if voter_late {
                    self.grng.i64(700..1500)
                } else {
                    self.grng.i64(10..60)
                },
            );
            if voter_late && self.etcd && self.nodes[i].control_plane {
                *self.events.entry("(etcd voter late)".into()).or_default() += 1;
            }
            for k in 0..self.pods.len() {
                if self.pods[k].daemonset && self.pods[k].node == Some(i) {
                    let pods_late = late(&mut self.grng);
                    let d = if pods_late {
                        self.grng.i64(700..1500)
                    } else {
                        self.grng.i64(5..60)
                    };
                    self.pods[k].state = PodState::Running {
                        ready_at: add(now, d),
                    };
                    if pods_late {
                        *self
                            .events
                            .entry("(DaemonSet pod Ready late)".into())
                            .or_default() += 1;
                    }
                }
            }
            let (name, b) = (self.nodes[i].name.clone(), self.nodes[i].host.booted.clone());
            self.logf(|| format!("{name} booted {b} (fallback={fallback})"));
        }
        if !self.nodes[i].host.up {
            return Ok(());
        }
        // Staging completes.
        if let Some(op) = self.nodes[i].host.staging.clone()
            && op.done <= now
        {
            self.nodes[i].host.staging = None;
            let name = self.nodes[i].name.clone();
            let agent = self.nodes[i].status.agent.get_or_insert_with(Default::default);
            if op.fail {
                agent.last_error = Some(HostError {
                    operation: HostOperation::Stage,
                    revision: Some(op.revision.clone()),
                    message: "error: build of '/nix/store/…' failed".into(),
                    at: Time(now),
                });
            } else {
                let sys = self.system_for(&op.revision, &op.config);
                let booted_kernel = self.kernel_of(&self.nodes[i].host.booted);
                let kernel = self.kernel_of(&sys);
                let reboot = booted_kernel != kernel;
                let agent = self.nodes[i].status.agent.get_or_insert_with(Default::default);
                agent.staged = Some(StagedSystem {
                    revision: op.revision.clone(),
                    installable: op.installable.clone(),
                    system: sys,
                    closure_bytes: None,
                    reboot_required: reboot,
                    reboot_reasons: if reboot { vec!["kernel".into()] } else { vec![] },
                    staged_at: Some(Time(now)),
                });
            }
            self.logf(|| format!("{name} staging {} done (fail={})", &op.revision[..12], op.fail));
        }
        // Activation completes.
        if let Some(op) = self.nodes[i].host.activation.clone()
            && op.done <= now
        {
            self.nodes[i].host.activation = None;
            let name = self.nodes[i].name.clone();
            let boot_before = format!("boot-{}-{}", name, self.nodes[i].host.boot_seq);
            let init_change = self
                .revs
                .iter()
                .find(|(r, _)| r[..12] == *rev_of_system(&op.system))
                .is_some_and(|(_, v)| v.init_change);
            let fallback = self.faults && self.rng.u32(0..100) < 8;
            let h = &mut self.nodes[i].host;
            let mut boot_once = None;
            let state = if op.fail {
                ActivationState::Failed
            } else {
                match op.action {
                    ActivationAction::Switch => {
                        h.boot_default = op.system.clone();
                        if init_change {
                            ActivationState::NeedsReboot
                        } else {
                            h.current = op.system.clone();
                            ActivationState::Switched
                        }
                    }
                    ActivationAction::Bless => {
                        // Only the system this boot started becomes the default.
                        if h.booted == op.system {
                            h.boot_default = op.system.clone();
                            ActivationState::Blessed
                        } else {
                            ActivationState::Failed
                        }
                    }
                    ActivationAction::Boot | ActivationAction::Rollback => {
                        if h.boot_once && h.boot_default != op.system {
                            // Installed as an entry, the old default kept; booted once.
                            h.oneshot = Some(op.system.clone());
                            boot_once = Some("simulated one-shot entry".to_string());
                        } else {
                            h.boot_default = op.system.clone();
                        }
                        let c = h.reboots_per_grant.entry(op.id.clone()).or_insert(0);
                        *c += 1;
                        if *c > 1 {
                            return Err(format!(
                                "step {}: invariant violated: second reboot for grant {}",
                                self.step, op.id
                            ));
                        }
                        h.up = false;
                        h.fallback_next_boot = fallback;
                        ActivationState::RebootRequested
                    }
                }
            };
            let down = !self.nodes[i].host.up;
            if down {
                let d = if self.faults && self.rng.u32(0..100) < 3 {
                    // A boot that takes longer than the reboot timeout.
                    *self.events.entry("(boot hangs)".into()).or_default() += 1;
                    self.rng.i64(950..2000)
                } else {
                    self.rng.i64(20..300)
                };
                self.nodes[i].host.boot_done = Some(add(now, d));
            }
            let agent = self.nodes[i].status.agent.get_or_insert_with(Default::default);
            agent.activation = Some(ActivationReport {
                id: op.id.clone(),
                action: op.action,
                state,
                system: op.system.clone(),
                boot_id_before: Some(boot_before),
                exit_code: (state == ActivationState::NeedsReboot).then_some(100),
                units_failed: false,
                message: (state == ActivationState::Failed).then(|| "switch-to-configuration failed".into()),
                boot_once,
                updated_at: Time(now),
            });
            self.logf(|| format!("{name} activation {} -> {state:?}", op.id));
            if down {
                // Pods still bound to a rebooting node go down: that must never include a
                // PDB-covered pod (checked globally), nor any undrained pod unless forced.
                self.check_drained(i, "reboot")?;
            }
        }
        Ok(())
    }

    fn check_drained(&self, i: usize, what: &str) -> Result<(), String> {
        let forced = self.nodes[i].status.slot.as_ref().is_some_and(|s| s.forced);
        let left = self.non_ds_pods_on(i);
        check!(
            self,
            forced || left == 0,
            "{what} on {} with {left} undrained pod(s)",
            self.nodes[i].name
        );
        Ok(())
    }

    /// The agent on node `i`: report the host, start staging / activation when asked.
    /// The controller's side of a builder (src/controller/build.rs) in the seeds that have one:
    /// a new target waits for its build (`target.build` with no system) until the builder
    /// reports it built (`builtAt`); that report wakes the node (the builder's status is watched).
    fn model_builder(&mut self, i: usize) {
        let st = &self.nodes[i].status;
        let Some(t) = st.target.as_ref() else {
            return;
        };
        match &t.build {
            Some(b) if !b.system.is_empty() => return,
            None if st.phase != Some(Phase::Staging) => return,
            _ => {}
        }
        let key = (t.revision.clone(), t.installable.clone());
        let now = self.now;
        let done = match self.build_done.get(&key) {
            Some(d) => *d,
            None => {
                // Mostly minutes; some builds (a kernel) outlast the staging timeout.
                let secs = if self.brng.u32(0..100) < 15 {
                    self.brng.i64(3000..7000)
                } else {
                    self.brng.i64(5..900)
                };
                let d = add(now, secs);
                self.build_done.insert(key.clone(), d);
                *self.events.entry("(built by the builder)".into()).or_default() += 1;
                d
            }
        };
        let built = done <= now;
        let system = if built {
            self.system_for(&key.0, &config_of(&key.1))
        } else {
            String::new()
        };
        if let Some(t) = self.nodes[i].status.target.as_mut() {
            t.build = Some(TargetBuild {
                system,
                builder: Some("builder-0".into()),
                cache: None,
                progress: None,
                built_at: built.then_some(Time(done)),
            });
        }
        if !built {
            self.wake[i] = Some(self.wake[i].map_or(done, |w| w.min(done)));
        }
    }

    fn agent(&mut self, i: usize) -> Result<(), String> {
        if !self.nodes[i].host.up {
            return Ok(());
        }
        if self.p(1) {
            // Agent restart: in-flight staging is lost; activations run as systemd units.
            self.nodes[i].host.staging = None;
            let h = &self.nodes[i].host;
            let st = &self.nodes[i].status;
            if h.oneshot.is_some()
                || (h.booted != h.boot_default
                    && st.phase == Some(Phase::Verifying)
                    && st
                        .activation
                        .as_ref()
                        .is_some_and(|g| g.action != ActivationAction::Switch))
            {
                *self
                    .events
                    .entry("(agent restart between one-shot and bless)".into())
                    .or_default() += 1;
            }
        }
        let now = self.now;
        let name = self.nodes[i].name.clone();
        let boot = format!("boot-{}-{}", name, self.nodes[i].host.boot_seq);
        let (booted, current) = (
            self.nodes[i].host.booted.clone(),
            self.nodes[i].host.current.clone(),
        );
        let ltt = self.nodes[i].status.last_transition_time.as_ref().map(|t| t.0);
        let target = self.nodes[i].status.target.clone();
        let grant = self.nodes[i].status.activation.clone();
        {
            let agent: &mut AgentStatus = self.nodes[i].status.agent.get_or_insert_with(Default::default);
            agent.boot_id = Some(boot.clone());
            agent.booted_system = Some(booted);
            agent.current_system = Some(current);
            if let Some(r) = agent.activation.as_mut()
                && r.state == ActivationState::RebootRequested
                && r.boot_id_before.as_deref() != Some(boot.as_str())
            {
                r.state = ActivationState::Rebooted;
            }
        }
        if let Some(t) = target {
            let agent = self.nodes[i].status.agent.as_ref().unwrap();
            let staged = agent
                .staged
                .as_ref()
                .is_some_and(|s| s.revision == t.revision && s.installable == t.installable);
            let err_blocks = agent.last_error.as_ref().is_some_and(|e| {
                e.operation == HostOperation::Stage
                    && e.revision.as_deref() == Some(t.revision.as_str())
                    && ltt.is_none_or(|l| e.at.0 >= l)
            });
            // Nothing to fetch yet while the builder builds (the agent evaluates nothing).
            let building = t.build.as_ref().is_some_and(|b| b.system.is_empty());
            if !staged && !err_blocks && !building && self.nodes[i].host.staging.is_none() {
                let fail = self.faults && self.rng.u32(0..100) < 8;
                if self.faults && self.rng.u32(0..1000) < 15 {
                    // A build that hangs (a stuck substituter): past the staging timeout, and
                    // restarting the agent does not help.
                    let until = add(now, self.rng.i64(3700..7200));
                    self.nodes[i].host.stage_stuck_until = Some(until);
                    *self.events.entry("(staging hangs)".into()).or_default() += 1;
                }
                let mut done = add(now, self.rng.i64(5..400));
                if let Some(u) = self.nodes[i].host.stage_stuck_until {
                    done = done.max(u);
                }
                self.nodes[i].host.staging = Some(StageOp {
                    revision: t.revision.clone(),
                    installable: t.installable.clone(),
                    config: config_of(&t.installable),
                    done,
                    fail,
                });
            }
        }
        if let Some(g) = grant
            && !self.nodes[i].host.executed.contains(&g.id)
            && self.nodes[i].host.activation.is_none()
            // A grant made before the last reboot is never executed (the real agent refuses
            // it and reports why): a stale Bless must not bless the old default.
            && (g.action != ActivationAction::Bless || g.boot_id_before.as_deref() == Some(boot.as_str()))
        {
            self.check_drained(i, "activation")?;
            let fail = self.faults && self.rng.u32(0..100) < 6;
            let d = if self.faults && self.rng.u32(0..100) < 2 {
                // Hangs past the activation timeout, then finishes anyway.
                *self.events.entry("(activation hangs)".into()).or_default() += 1;
                self.rng.i64(950..2400)
            } else {
                self.rng.i64(3..120)
            };
            let h = &mut self.nodes[i].host;
            h.executed.insert(g.id.clone());
            h.activated_in_slot = true;
            h.activation = Some(ActOp {
                id: g.id.clone(),
                action: g.action,
                system: g.system.clone(),
                done: add(now, d),
                fail,
            });
            let agent = self.nodes[i].status.agent.as_mut().unwrap();
            agent.activation = Some(ActivationReport {
                id: g.id.clone(),
                action: g.action,
                state: ActivationState::Running,
                system: g.system.clone(),
                boot_id_before: Some(boot),
                exit_code: None,
                units_failed: false,
                message: None,
                boot_once: None,
                updated_at: Time(now),
            });
            self.logf(|| format!("{name} executes grant {} {:?}", g.id, g.action));
        }
        Ok(())
    }

    // ---- controller --------------------------------------------------------------------------

    fn unavailable(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        let ph = n.status.phase.unwrap_or_default();
        n.status.slot.is_some()
            || ph.is_disruptive()
            || ph == Phase::Degraded
            || (n.registered && (n.unschedulable || !self.node_ready(i)))
    }

    fn evict_pass(&mut self, i: usize, force: bool) -> DrainProgress {
        let mut blocked = 0;
        for k in 0..self.pods.len() {
            let p = &self.pods[k];
            if p.daemonset || p.node != Some(i) || matches!(p.state, PodState::Terminating { .. }) {
                continue;
            }
            if force {
                self.forced_apps.insert(p.app);
                self.pods[k].node = None;
                self.pods[k].state = PodState::Pending {
                    schedule_at: add(self.now, 5),
                };
                continue;
            }
            // Eviction API: refused (429) when the PDB would be violated.
            let app = p.app;
            let healthy = self
                .pods
                .iter()
                .filter(|q| q.app == app && self.pod_ready(q))
                .count();
            let this_ready = usize::from(self.pod_ready(&self.pods[k]));
            if healthy - this_ready >= self.apps[app].min_available {
                let term = if self.pods[k].slow {
                    self.rng.i64(1800..4000)
                } else {
                    self.rng.i64(0..10)
                };
                self.pods[k].state = PodState::Terminating {
                    until: add(self.now, term),
                };
            } else {
                blocked += 1;
            }
        }
        DrainProgress {
            remaining: self.non_ds_pods_on(i),
            blocked_by_pdb: blocked,
            refused: vec![],
        }
    }

    /// The admission gate over the current state, with the admission invariants checked on
    /// its answer. The controller runs it under its admission lock, so every call sees the
    /// slots taken before.
    fn admit_checked(&mut self) -> Result<Vec<String>, String> {
        let n = self.nodes.len();
        let obs: Vec<NodeObservation> = (0..n).map(|i| self.obs(i)).collect();
        let cluster = ClusterState {
            paused: self.paused,
            pools: self.pool_state(),
        };
        let admitted: Vec<String> = {
            let views: Vec<NodeView<'_>> = (0..n).map(|i| self.view(i, &obs[i])).collect();
            admit(&views, &cluster, &self.policy, self.now)
        };
        let degraded = self
            .nodes
            .iter()
            .filter(|x| x.status.phase == Some(Phase::Degraded))
            .count();
        let unavailable = (0..n).filter(|&i| self.unavailable(i)).count();
        let budget = budget(self.policy.max_unavailable, n);
        let new_admits = admitted
            .iter()
            .filter(|a| {
                self.nodes
                    .iter()
                    .any(|x| &x.name == *a && x.status.slot.is_none())
            })
            .count();
        check!(
            self,
            !self.paused || admitted.is_empty(),
            "admitted {admitted:?} while paused"
        );
        check!(
            self,
            degraded < self.policy.failure_threshold as usize || admitted.is_empty(),
            "admitted {admitted:?} with {degraded} Degraded node(s)"
        );
        if self.pools.is_empty() {
            check!(
                self,
                new_admits == 0 || unavailable + new_admits <= budget,
                "admitted {admitted:?} with {unavailable} unavailable, budget {budget}"
            );
        }
        self.check_pools(&admitted)?;
        let cp_admitted: Vec<&String> = admitted.iter().filter(|a| a.starts_with("cp")).collect();
        check!(
            self,
            cp_admitted.len() <= 1,
            "two control-plane nodes admitted: {cp_admitted:?}"
        );
        if let Some(cp) = cp_admitted.first() {
            let other_busy = (0..n)
                .any(|i| self.nodes[i].control_plane && &&self.nodes[i].name != cp && self.unavailable(i));
            check!(
                self,
                !other_busy,
                "admitted {cp} while another control-plane node is unavailable"
            );
        }
        for a in &admitted {
            let i = self.nodes.iter().position(|x| &x.name == a).unwrap();
            let ok = window::is_open(&self.nodes[i].spec.maintenance_windows, self.now).unwrap();
            check!(self, ok, "admitted {a} outside its maintenance window");
            check!(self, !self.nodes[i].spec.suspend, "admitted suspended {a}");
            check!(
                self,
                self.nodes[i].status.phase == Some(Phase::Waiting),
                "admitted {a} in {:?}",
                self.nodes[i].status.phase
            );
        }
        Ok(admitted)
    }

    /// Liveness of admission: a node `admit` has returned for longer than [`ADMISSION_BOUND`]
    /// (at every step in between, since the controller last started) was never admitted: a
    /// stalled rollout.
    fn check_admission_liveness(&mut self, admissible: &[String]) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if admissible.contains(&self.nodes[i].name) {
                let since = *self.admissible_since[i].get_or_insert(self.now);
                let waited = self.now.duration_since(since).as_secs();
                check!(
                    self,
                    waited <= ADMISSION_BOUND,
                    "{} admissible since {since} ({waited} s) but not admitted: {:?}",
                    self.nodes[i].name,
                    self.nodes[i].status.message
                );
            } else {
                self.admissible_since[i] = None;
            }
        }
        Ok(())
    }

    fn controller(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        if self.rng.u32(0..1000) < 5 {
            self.restart();
            *self.events.entry("(controller restart)".into()).or_default() += 1;
            self.logf(|| "controller restart".into());
        }
        self.evaluate_gates();
        let admissible = self.admit_checked()?;
        self.check_admission_liveness(&admissible)?;
        // The safety net: a periodic sweep reconciles the nodes the gate admits now.
        let sweep = self.now >= self.next_sweep;
        if sweep {
            self.next_sweep = add(self.now, SWEEP_PERIOD);
        }
        // The pause ConfigMap's watch reconciles every node.
        let pause_changed = self.paused != self.paused_seen;
        self.paused_seen = self.paused;
        let mut queue = VecDeque::new();
        let mut swept_only = vec![false; n];
        for i in 0..n {
            // Watch-driven: reconcile when the object (spec, annotation, agent status) or the
            // Node changed, or when a requeue is due. Nothing else wakes a node up.
            let o = self.obs(i);
            let x = &self.nodes[i];
            let unchanged = self.seen[i].as_ref().is_some_and(|(g, r, so, a)| {
                *g == x.generation && *r == x.retry && *so == o && *a == x.status.agent
            });
            let due = self.wake[i].is_some_and(|t| t <= self.now) || !unchanged || pause_changed;
            let swept = sweep && admissible.contains(&x.name);
            if due || swept {
                queue.push_back(i);
                swept_only[i] = !due;
            }
        }
        // Bounded, in case wake-ups ping-pong between nodes.
        let mut left = 16 * n;
        while let Some(i) = queue.pop_front() {
            if left == 0 {
                break;
            }
            left -= 1;
            if !self.reconcile(i, std::mem::take(&mut swept_only[i]), &mut queue)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A controller restart: everything in memory is lost, the watches relist.
    fn restart(&mut self) {
        let n = self.nodes.len();
        self.drain_mem.clear();
        self.seen = vec![None; n];
        self.wake = vec![Some(self.now); n];
        self.next_sweep = add(self.now, SWEEP_PERIOD);
        self.paused_seen = self.paused;
        self.lost_wake = vec![false; n];
        self.gate_seen = vec![None; self.gates.len()];
        self.next_gate_eval = self.now;
        // The bound on admission holds while a controller runs: it starts again from here.
        self.admissible_since = vec![None; n];
        self.restarts += 1;
    }

    /// One reconcile of node `i` (with the passes its own writes and Node changes trigger).
    /// `swept`: only the sweep asked for it. Returns false when the controller crashed.
    fn reconcile(&mut self, i: usize, swept: bool, queue: &mut VecDeque<usize>) -> Result<bool, String> {
        let n = self.nodes.len();
        let woken_after_loss = std::mem::take(&mut self.lost_wake[i]);
        let o = self.obs(i);
        let x = &self.nodes[i];
        self.seen[i] = Some((x.generation, x.retry.clone(), o, x.status.agent.clone()));
        for _ in 0..4 {
            if self.nodes[i].status.phase != Some(Phase::Draining) {
                self.drain_mem.remove(&i);
            }
            if self.builder {
                self.model_builder(i);
            }
            let mut o = self.obs(i);
            if needs_post_gates(&self.nodes[i].status) {
                o.post_gates = self.post_gates_of(i);
            }
            // As the controller must: the node is admitted when it is Waiting and the gate
            // lists it, whether or not it already holds its slot.
            let is_admitted = if self.nodes[i].status.phase == Some(Phase::Waiting) {
                let admissible = self.admit_checked()?;
                let v = self.view(i, &o);
                is_admitted(&v, &admissible)
            } else {
                false
            };
            let degraded = self
                .nodes
                .iter()
                .filter(|x| x.status.phase == Some(Phase::Degraded))
                .count();
            let d: Decision = {
                let v = self.view(i, &o);
                decide(&v, is_admitted, self.drain_mem.get(&i), &self.policy, self.now)
            };
            check!(self, d.status.agent.is_none(), "decide wrote status.agent");
            check!(
                self,
                !d.rows.is_empty(),
                "decide reported no row of the state table"
            );
            self.transition_checks(i, &d, is_admitted, degraded)?;
            if d.rows.contains(&Row::StagingTimeout)
                && let Some(b) = self.nodes[i]
                    .status
                    .target
                    .as_ref()
                    .and_then(|t| t.build.as_ref())
            {
                let staging = self.policy.timeouts.staging;
                check!(
                    self,
                    b.built_at
                        .as_ref()
                        .is_some_and(|t| t.0.checked_add(staging).is_ok_and(|end| self.now >= end)),
                    "StagingTimeout less than the staging timeout after the builder built ({:?})",
                    b.built_at
                );
            }
            let Decision {
                status,
                actions,
                requeue_after,
                notes,
                rows,
            } = d;
            for note in &notes {
                *self.events.entry(note.reason.clone()).or_default() += 1;
                if note.reason == reason::GATE_FAILED {
                    let which = if note.message.contains(PODS_GATE) {
                        PODS_GATE
                    } else if note.message.contains(K3S_GATE) {
                        K3S_GATE
                    } else {
                        "a pool gate"
                    };
                    *self.events.entry(format!("(GateFailed by {which})")).or_default() += 1;
                }
            }
            self.count_paths(i, &rows, &status);
            let agent = self.nodes[i].status.agent.take();
            let changed = self.nodes[i].status != status;
            let mut before = std::mem::replace(&mut self.nodes[i].status, status);
            before.agent = None;
            self.nodes[i].status.agent = agent;
            if self.nodes[i].status.slot.is_none() && before.slot.is_some() {
                self.nodes[i].host.activated_in_slot = false;
            }
            let after = self.nodes[i].status.phase;
            if before.phase != after {
                let (name, msg) = (
                    self.nodes[i].name.clone(),
                    self.nodes[i].status.message.clone().unwrap_or_default(),
                );
                let r = rows.clone();
                self.logf(|| format!("{name} -> {after:?}: {msg} (rows {r:?})"));
                if before.phase == Some(Phase::Waiting) && after == Some(Phase::Draining) {
                    if swept {
                        *self.events.entry("(admitted by the sweep)".into()).or_default() += 1;
                        if self.wake_loss == 0 {
                            // No wake-up is lost in this seed: the targeted wake-ups missed it.
                            *self
                                .events
                                .entry("(admitted by the sweep, no wake-up lost)".into())
                                .or_default() += 1;
                        }
                    }
                    if woken_after_loss {
                        *self
                            .events
                            .entry("(admitted after a lost wake-up)".into())
                            .or_default() += 1;
                    }
                }
            }
            if self.rng.u32(0..1000) < 5 {
                // Crash after the status write, before the effects.
                self.restart();
                // The replacement controller starts within seconds and relists everything.
                self.wake = vec![Some(add(self.now, 10)); n];
                *self.events.entry("(crash before actions)".into()).or_default() += 1;
                if self.nodes.iter().any(|x| {
                    x.host.oneshot.is_some()
                        || (x.host.up
                            && x.host.booted != x.host.boot_default
                            && x.status.phase == Some(Phase::Verifying))
                }) {
                    *self
                        .events
                        .entry("(controller crash between one-shot and bless)".into())
                        .or_default() += 1;
                }
                self.logf(|| "controller crash before actions".into());
                // The adversary: an admin cordons the node nixroll meant to cordon, in the
                // gap before the replacement controller acts. The cordon is the admin's.
                if actions.contains(&Action::Cordon)
                    && !self.nodes[i].unschedulable
                    && self.now < self.quiet_after
                    && self.rng.bool()
                {
                    self.nodes[i].unschedulable = true;
                    self.nodes[i].cordoned_by = Some(Who::Admin);
                    *self
                        .events
                        .entry("(admin cordon in the crash gap)".into())
                        .or_default() += 1;
                    let name = self.nodes[i].name.clone();
                    self.logf(|| format!("admin cordons {name} in the crash gap"));
                }
                return Ok(false);
            }
            if changed {
                // The controller's targeted wake-ups: a slot was released, or a node left
                // Staging or Degraded (which halt admission). Some are lost.
                let st = &self.nodes[i].status;
                let held = before.slot.is_some() || before.phase.is_some_and(Phase::is_disruptive);
                let holds = st.slot.is_some() || st.phase.is_some_and(Phase::is_disruptive);
                let left = |p: Phase| before.phase == Some(p) && st.phase != Some(p);
                if (held && !holds) || left(Phase::Staging) || left(Phase::Degraded) {
                    self.wake_admissible(i, queue)?;
                }
            }
            for a in &actions {
                self.act(i, a)?;
            }
            self.wake[i] = requeue_after.map(|r| self.now.checked_add(r).unwrap());
            if self.builder {
                self.model_builder(i);
            }
            // The controller's own writes and Node changes trigger the next reconcile at
            // once (watch events); only then can the world (an admin) act again.
            let node_changed = actions
                .iter()
                .any(|a| matches!(a, Action::Cordon | Action::Uncordon));
            if !changed && !node_changed {
                break;
            }
        }
        Ok(true)
    }

    /// Send the nodes the gate admits now (other than `me`) to the work queue, losing each
    /// wake-up with probability `wake_loss` percent.
    fn wake_admissible(&mut self, me: usize, queue: &mut VecDeque<usize>) -> Result<(), String> {
        let admissible = self.admit_checked()?;
        for name in admissible {
            let j = self.nodes.iter().position(|x| x.name == name).unwrap();
            if j == me {
                continue;
            }
            if self.rng.u32(0..100) < self.wake_loss {
                self.lost_wake[j] = true;
                *self.events.entry("(wake-up lost)".into()).or_default() += 1;
                self.logf(|| format!("wake-up of {name} lost"));
            } else if !queue.contains(&j) {
                queue.push_back(j);
            }
        }
        Ok(())
    }

    /// Count the rows taken and the ways out of `Degraded`, and follow a node retried while
    /// holding its slot until it is re-admitted and verified.
    fn count_paths(&mut self, i: usize, rows: &[Row], next: &NixOSNodeStatus) {
        for r in rows {
            self.rows[*r as usize] += 1;
        }
        let before = &self.nodes[i].status;
        let failed = before
            .failed
            .as_ref()
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        let holding = before.slot.is_some();
        let new_revision = before
            .target
            .as_ref()
            .is_some_and(|t| t.revision != self.nodes[i].spec.revision);
        let mut ev = Vec::new();
        for r in rows {
            match r {
                Row::RetryRequested | Row::NewTarget => {
                    let how = if *r == Row::RetryRequested {
                        "retry"
                    } else if new_revision {
                        "new revision"
                    } else {
                        "new configuration"
                    };
                    let slot = if holding { " holding its slot" } else { "" };
                    ev.push(format!("(out of Degraded: {how} after {failed}{slot})"));
                    ev.push(format!("(out of Degraded: {how})"));
                    self.nodes[i].retried_holding_slot = holding.then(|| failed.clone());
                    self.nodes[i].readmitted_after = None;
                }
                Row::Readmitted => {
                    self.nodes[i].readmitted_after = self.nodes[i].retried_holding_slot.take();
                }
                Row::Verified => {
                    self.nodes[i].retried_holding_slot = None;
                    if let Some(f) = self.nodes[i].readmitted_after.take() {
                        ev.push(format!("(re-admitted after {f} and verified)"));
                    }
                }
                _ => {}
            }
        }
        if next.phase == Some(Phase::Degraded) {
            self.nodes[i].retried_holding_slot = None;
            self.nodes[i].readmitted_after = None;
        }
        for e in ev {
            *self.events.entry(e).or_default() += 1;
        }
    }

    fn act(&mut self, i: usize, a: &Action) -> Result<(), String> {
        let name = self.nodes[i].name.clone();
        self.logf(|| format!("{name} action {a:?}"));
        match a {
            Action::Cordon => {
                if !self.nodes[i].unschedulable {
                    self.nodes[i].unschedulable = true;
                    self.nodes[i].cordoned_by = Some(Who::Nixroll);
                }
            }
            Action::Uncordon => {
                let n = &self.nodes[i];
                check!(
                    self,
                    !n.unschedulable || n.cordoned_by == Some(Who::Nixroll),
                    "uncordoned {name}, cordoned by {:?}",
                    n.cordoned_by
                );
                if n.host.activated_in_slot {
                    let st = &n.status;
                    let o = self.obs(i);
                    let reboot_required = st
                        .conditions
                        .iter()
                        .any(|c| c.type_ == condition::REBOOT_REQUIRED && c.status == "True");
                    // Switch: the running (current) system; after a reboot current == booted.
                    let runs = st.system.as_deref() == Some(n.host.current.as_str());
                    check!(
                        self,
                        o.ready && (runs || reboot_required) && st.phase == Some(Phase::UpToDate),
                        "uncordoned {name} before it runs the target and is Ready (ready={}, current={}, booted={}, status.system={:?})",
                        o.ready,
                        n.host.current,
                        n.host.booted,
                        st.system
                    );
                }
                let n = &mut self.nodes[i];
                n.unschedulable = false;
                n.cordoned_by = None;
            }
            Action::Evict => {
                let p = self.evict_pass(i, false);
                self.drain_mem.insert(i, p);
            }
            Action::ForceDelete => {
                let p = self.evict_pass(i, true);
                self.drain_mem.insert(i, p);
            }
        }
        Ok(())
    }

    fn transition_checks(
        &self,
        i: usize,
        d: &Decision,
        admitted: bool,
        degraded: usize,
    ) -> Result<(), String> {
        let n = &self.nodes[i];
        let before = &n.status;
        let was = before.phase.unwrap_or_default();
        let now_ph = d.status.phase.unwrap_or_default();
        if !was.is_disruptive() && now_ph == Phase::Draining {
            let open = window::is_open(&n.spec.maintenance_windows, self.now).unwrap();
            check!(self, open, "{} started draining outside its window", n.name);
            check!(self, admitted, "{} started draining without admission", n.name);
            check!(self, !self.paused, "{} started draining while paused", n.name);
            check!(
                self,
                !n.spec.suspend,
                "{} started draining while suspended",
                n.name
            );
            check!(
                self,
                degraded < self.policy.failure_threshold as usize,
                "{} started draining with {degraded} Degraded node(s)",
                n.name
            );
        }
        // Invariant "post-gates before the slot is freed" (DESIGN.md §7.11): a node is done
        // (and may be uncordoned, its slot freed) only when k3s reports a server a healthy etcd
        // voter, every pod on the node is Ready, and the last evaluation of each of its pools'
        // gates passed and was made after the node was verified.
        if d.rows.iter().any(|r| matches!(r, Row::Verified | Row::Blessed)) {
            let since = before
                .slot
                .as_ref()
                .and_then(|s| s.verified_at.as_ref())
                .map_or(self.now, |t| t.0);
            check!(
                self,
                self.etcd_voter(i) != Some(false),
                "post-gates: {} done while k3s does not report it a healthy etcd voter",
                n.name
            );
            let unready = self.unready_pods_on(i);
            check!(
                self,
                unready == 0,
                "post-gates: {} done with {unready} of its pods not Ready",
                n.name
            );
            for g in self.node_gates(i) {
                let gate = &self.gates[g];
                let seen = self.gate_seen[g];
                check!(
                    self,
                    seen.is_some_and(|(pass, at)| pass && at >= since && gate.passes(at)),
                    "post-gates: {} done (verified at {since}) but gate {} last evaluated {seen:?}",
                    n.name,
                    gate.name
                );
            }
        }
        if d.rows.contains(&Row::PostGateFailed) {
            check!(
                self,
                now_ph == Phase::Degraded
                    && d.status.slot.is_some()
                    && !d.actions.contains(&Action::Uncordon),
                "post-gate timeout: {} must be Degraded, keep its slot and stay cordoned ({now_ph:?}, {:?})",
                n.name,
                d.actions
            );
        }
        if let (Some(a), Some(b)) = (before.activation.as_ref(), d.status.activation.as_ref()) {
            // A grant id, once issued, never changes meaning.
            if a.id == b.id {
                check!(self, a == b, "grant {} rewritten", a.id);
            }
        }
        Ok(())
    }

    fn view<'a>(&'a self, i: usize, obs: &'a NodeObservation) -> NodeView<'a> {
        let n = &self.nodes[i];
        NodeView {
            name: &n.name,
            generation: n.generation,
            retry_token: n.retry.as_deref(),
            spec: &n.spec,
            status: &n.status,
            node: obs,
        }
    }

    // ---- global ------------------------------------------------------------------------------

    fn global_checks(&self) -> Result<(), String> {
        let n = self.nodes.len();
        // Per pool (the default pool: every node when there are no pools): the slots held by
        // the nodes in that pool alone never exceed its budget.
        let of: Vec<Vec<usize>> = (0..n).map(|i| self.pools_of(i)).collect();
        for g in std::iter::once(None).chain((0..self.pools.len()).map(Some)) {
            let members: Vec<usize> = (0..n)
                .filter(|&i| match g {
                    None => of[i].is_empty(),
                    Some(p) => of[i].contains(&p),
                })
                .collect();
            let max = g.map_or(self.policy.max_unavailable, |p| self.pools[p].max_unavailable);
            let budget = budget(max, members.len());
            let slots = members
                .iter()
                .filter(|&&i| of[i].len() <= 1 && self.nodes[i].status.slot.is_some())
                .count();
            check!(
                self,
                slots <= budget,
                "{slots} slots held, budget {budget} (pool {g:?})"
            );
        }
        let cp_slots = self
            .nodes
            .iter()
            .filter(|x| {
                x.control_plane
                    && (x.status.slot.is_some() || x.status.phase.unwrap_or_default().is_disruptive())
            })
            .count();
        check!(
            self,
            cp_slots <= 1,
            "{cp_slots} control-plane nodes disrupted at once"
        );
        for x in &self.nodes {
            let ph = x.status.phase.unwrap_or_default();
            check!(
                self,
                !ph.is_disruptive() || x.status.slot.is_some(),
                "{} is {ph} without a slot",
                x.name
            );
        }
        // PodDisruptionBudgets.
        for (a, app) in self.apps.iter().enumerate() {
            if self.forced_apps.contains(&a) {
                continue;
            }
            let healthy = self
                .pods
                .iter()
                .filter(|q| q.app == a && self.pod_ready(q))
                .count();
            check!(
                self,
                healthy >= app.min_available,
                "PDB of app {a} violated: {healthy} < {}",
                app.min_available
            );
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        self.next_bump.is_none()
            && self.nodes.iter().all(|x| {
                let st = &x.status;
                let sys = st.system.as_deref();
                st.phase == Some(Phase::UpToDate)
                    && st.revision.as_deref() == Some(x.spec.revision.as_str())
                    && st.slot.is_none()
                    && x.unschedulable == (x.cordoned_by == Some(Who::Admin))
                    && x.host.up
                    && (sys == Some(x.host.current.as_str())
                        || st
                            .conditions
                            .iter()
                            .any(|c| c.type_ == condition::REBOOT_REQUIRED && c.status == "True"))
            })
    }

    fn next_time(&mut self) -> Timestamp {
        let mut next = add(self.now, 3600);
        let mut consider = |t: Timestamp| {
            if t > self.now && t < next {
                next = t;
            }
        };
        for w in self.wake.iter().flatten() {
            consider(*w);
        }
        for x in &self.nodes {
            let h = &x.host;
            for t in [
                h.boot_done,
                h.staging.as_ref().map(|s| s.done),
                h.activation.as_ref().map(|a| a.done),
                Some(h.ready_at),
                Some(h.voter_at),
                x.retry_at,
                x.join_at,
            ]
            .into_iter()
            .flatten()
            {
                consider(t);
            }
        }
        for p in &self.pods {
            match p.state {
                PodState::Running { ready_at } => consider(ready_at),
                PodState::Terminating { until } => consider(until),
                PodState::Pending { schedule_at } => consider(schedule_at),
            }
        }
        if let Some(t) = self.next_bump {
            consider(t);
        }
        // The sweep matters only while some node is admissible; skipping the idle ones keeps
        // the step count down.
        if self.admissible_since.iter().any(Option::is_some) {
            consider(self.next_sweep);
        }
        for g in &self.gates {
            for &(a, b) in &g.blocks {
                consider(a);
                consider(add(b, 1));
            }
        }
        consider(self.quiet_after);
        let base = next.max(add(self.now, 1));
        // Jitter, and sometimes a short step to interleave events differently.
        if self.rng.u32(0..100) < 5 {
            add(self.now, self.rng.i64(1..15)).min(base)
        } else {
            add(base, self.rng.i64(0..3))
        }
    }

    fn run(&mut self, max_steps: usize) -> Result<bool, String> {
        while self.step < max_steps {
            self.world()?;
            for i in 0..self.nodes.len() {
                self.agent(i)?;
            }
            self.controller()?;
            // Agents watch their NixOSNode: they react to the controller's writes at once.
            for i in 0..self.nodes.len() {
                self.agent(i)?;
            }
            self.global_checks()?;
            if self.now >= self.quiet_after && self.converged() {
                return Ok(true);
            }
            self.now = self.next_time();
            self.step += 1;
        }
        Ok(false)
    }
}

/// The pools, the pools selecting each node, and the temporary conflict (node, extra pool, until).
type PoolLayout = (Vec<SimPool>, Vec<Vec<usize>>, Option<(usize, usize, Timestamp)>);

/// The pools of a seed: none in about half; else concurrent pools, a canary pool with the rest
/// after it (with a soak), or a canary and two concurrent pools after it; sometimes one node is
/// in two pools for a while, and sometimes a pool is paused for a while.
fn pool_layout(seed: u64, n: usize, cps: usize, now: Timestamp, quiet_after: Timestamp) -> PoolLayout {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_9001);
    let mut pool_of = vec![Vec::new(); n];
    if rng.bool() {
        return (Vec::new(), pool_of, None);
    }
    let budget = |rng: &mut fastrand::Rng| {
        if rng.bool() {
            MaxUnavailable::Count(rng.u32(1..=2))
        } else {
            MaxUnavailable::Percent(rng.u32(20..=100))
        }
    };
    let node_soak = [None, None, Some(0), Some(120), Some(900)][rng.usize(..5)];
    let pool = |name: &str, max: MaxUnavailable, after: Vec<usize>, soak: i64| SimPool {
        name: name.to_owned(),
        max_unavailable: max,
        after,
        soak,
        node_soak,
        paused_between: None,
    };
    let soak = [0, 300, 3600, 4 * 3600][rng.usize(..4)];
    // Nodes cps.. are workers; the canary is the first worker.
    let pools = match rng.u32(0..3) {
        0 => {
            let pools = vec![
                pool("a", budget(&mut rng), vec![], 0),
                pool("b", budget(&mut rng), vec![], 0),
            ];
            for (i, of) in pool_of.iter_mut().enumerate() {
                match rng.u32(0..3) {
                    0 => of.push(0),
                    1 => of.push(1),
                    _ if i >= cps => of.push(0),
                    _ => {} // a control-plane node left in the default pool
                }
            }
            pools
        }
        1 => {
            let pools = vec![
                pool("canary", MaxUnavailable::Count(1), vec![], 0),
                pool("rest", budget(&mut rng), vec![0], soak),
            ];
            for (i, of) in pool_of.iter_mut().enumerate() {
                if i == cps {
                    of.push(0);
                } else if i >= cps || rng.bool() {
                    of.push(1);
                }
            }
            pools
        }
        _ => {
            let pools = vec![
                pool("canary", MaxUnavailable::Count(1), vec![], 0),
                pool("a", budget(&mut rng), vec![0], soak),
                pool("b", budget(&mut rng), vec![0], soak),
            ];
            for (i, of) in pool_of.iter_mut().enumerate() {
                if i == cps {
                    of.push(0);
                } else {
                    of.push(1 + rng.usize(..2));
                }
            }
            pools
        }
    };
    let mut pools = pools;
    let window = quiet_after.duration_since(now).as_secs();
    if rng.u32(0..100) < 25 {
        let p = rng.usize(..pools.len());
        let from = add(now, rng.i64(0..window / 2));
        pools[p].paused_between = Some((from, add(from, rng.i64(60..window / 2))));
    }
    // A node of a pool also selected by another pool for a while (never a node of the default
    // pool: that would move it, slot and all, into a pool, which is a relabelling, not a conflict).
    let in_pools: Vec<usize> = (0..n).filter(|&i| !pool_of[i].is_empty()).collect();
    let conflict = (rng.u32(0..100) < 25 && !in_pools.is_empty()).then(|| {
        let i = in_pools[rng.usize(..in_pools.len())];
        let other = (0..pools.len()).find(|p| !pool_of[i].contains(p)).unwrap_or(0);
        (i, other, add(now, rng.i64(0..window)))
    });
    (pools, pool_of, conflict)
}

/// The health gates of a seed: in about two thirds of the seeds with pools, one or two gates on
/// random pools, and in a third of all seeds a cluster-default gate; they flap (blocking 20 s to 4 min every half hour or so, shorter than
/// their timeout) and, in faulty seeds, sometimes an outage longer than their timeout. All
/// quiet after `quiet_after`.
fn gate_layout(
    rng: &mut fastrand::Rng,
    pools: &[SimPool],
    faults: bool,
    now: Timestamp,
    quiet_after: Timestamp,
) -> Vec<SimGate> {
    // Pool gates in two thirds of the seeds with pools; a cluster-default gate in a third of all.
    let pool_gates = if pools.is_empty() || rng.u32(0..3) == 0 {
        0
    } else {
        rng.usize(1..=2)
    };
    let default_gate = rng.u32(0..3) == 0;
    let mut gates = Vec::new();
    for k in 0..pool_gates + usize::from(default_gate) {
        let timeout = rng.i64(300..=900);
        let mut blocks = Vec::new();
        let mut t = add(now, rng.i64(0..1800));
        while t < quiet_after {
            let len = if faults && rng.u32(0..100) < 10 {
                rng.i64(timeout + 60..timeout * 3)
            } else {
                rng.i64(20..240)
            };
            let end = add(t, len).min(quiet_after);
            blocks.push((t, end));
            t = add(end, rng.i64(600..3600));
        }
        gates.push(SimGate {
            name: format!("gate-{k}"),
            pool: (k < pool_gates).then(|| rng.usize(..pools.len())),
            timeout,
            blocks,
        });
    }
    gates
}

const MAX_STEPS: usize = 6000;

struct SeedResult {
    faults: bool,
    converged: bool,
    steps: usize,
    events: BTreeMap<String, usize>,
    rows: Vec<usize>,
}

fn run_seed(seed: u64, verbose: bool) -> Result<SeedResult, (String, Option<String>)> {
    let mut sim = Sim::new(seed, verbose);
    match sim.run(MAX_STEPS) {
        Ok(conv) => {
            if !sim.faults && !conv {
                let states: Vec<String> = sim
                    .nodes
                    .iter()
                    .map(|x| {
                        format!(
                            "{}: {:?} {:?} unsched={} by={:?}",
                            x.name, x.status.phase, x.status.message, x.unschedulable, x.cordoned_by
                        )
                    })
                    .collect();
                return Err((
                    format!("no faults injected but did not converge within {MAX_STEPS} steps: {states:#?}"),
                    sim.log,
                ));
            }
            if !sim.faults {
                let failures: Vec<(&String, &usize)> = sim
                    .events
                    .iter()
                    .filter(|(k, _)| {
                        // A DrainTimeout can happen without faults: a PDB with nowhere to
                        // reschedule (other nodes cordoned) legitimately blocks a drain.
                        k.ends_with("Failed")
                            || (k.ends_with("Timeout") && k.as_str() != "DrainTimeout")
                            || k.as_str() == "BootedWrongSystem"
                            || k.as_str() == "RolledBack"
                    })
                    .collect();
                if !failures.is_empty() {
                    return Err((
                        format!("no faults injected but failures happened: {failures:?}"),
                        sim.log,
                    ));
                }
            }
            Ok(SeedResult {
                faults: sim.faults,
                converged: conv,
                steps: sim.step,
                events: sim.events,
                rows: sim.rows,
            })
        }
        Err(e) => Err((e, sim.log)),
    }
}

fn fail_with(seed: u64, e: String) -> ! {
    // Re-run deterministically with the log on.
    let log = match run_seed(seed, true) {
        Err((_, Some(log))) => log,
        _ => String::from("(log unavailable)"),
    };
    let tail: Vec<&str> = log.lines().collect();
    let from = tail.len().saturating_sub(400);
    panic!(
        "simulation failed: {e}\nreproduce with: NIXROLL_SIM_SEED={seed} cargo test --test simulation -- --nocapture\nlast steps:\n{}",
        tail[from..].join("\n")
    );
}

/// One line per row of the state table: how often `decide` took it.
fn row_report(rows: &[usize]) -> String {
    let mut out = String::new();
    for r in Row::ALL {
        let _ = writeln!(
            out,
            "  {:<24} {:>8}  {}",
            r.name(),
            rows[*r as usize],
            r.description()
        );
    }
    out
}

#[test]
fn simulated_rollouts_keep_invariants_and_converge() {
    if let Ok(s) = std::env::var("NIXROLL_SIM_SEED") {
        let seed: u64 = s.parse().unwrap();
        match run_seed(seed, true) {
            Ok(r) => {
                let mut sim = Sim::new(seed, true);
                let _ = sim.run(MAX_STEPS);
                println!("{}", sim.log.unwrap_or_default());
                println!("rows of the state table taken:\n{}", row_report(&r.rows));
                println!("events: {:?}", r.events);
                println!(
                    "NIXROLL_SIM_SEED={seed}: ok (faults={}, converged={}, steps={})",
                    r.faults, r.converged, r.steps
                );
            }
            Err((e, _)) => fail_with(seed, e),
        }
        return;
    }
    let seeds: u64 = std::env::var("NIXROLL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4) as u64;
    type Outcome = Result<SeedResult, String>;
    let results: Vec<(u64, Outcome)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let mut seed = t;
                    while seed < seeds {
                        out.push((seed, run_seed(seed, false).map_err(|(e, _)| e)));
                        seed += threads;
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut stats: BTreeMap<&str, usize> = BTreeMap::new();
    let mut steps = 0;
    let mut events: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = vec![0; Row::ALL.len()];
    for (seed, r) in results {
        match r {
            Ok(r) => {
                steps += r.steps;
                for (k, v) in r.events {
                    *events.entry(k).or_default() += v;
                }
                for (total, n) in rows.iter_mut().zip(&r.rows) {
                    *total += n;
                }
                *stats
                    .entry(if r.faults { "faulty" } else { "clean" })
                    .or_default() += 1;
                if r.converged {
                    *stats.entry("converged").or_default() += 1;
                }
            }
            Err(e) => fail_with(seed, e),
        }
    }
    println!("{seeds} seeds: {stats:?}, {steps} steps");
    println!("events: {events:?}");
    println!("rows of the state table taken:\n{}", row_report(&rows));
    if seeds >= 1000 {
        // A path the simulation never takes is a path nobody has tested.
        let never: Vec<&str> = Row::ALL
            .iter()
            .filter(|r| rows[**r as usize] == 0)
            .map(|r| r.name())
            .collect();
        assert!(
            never.is_empty(),
            "rows of the state table never taken in {seeds} seeds: {never:?}"
        );
        // The paths the invariants are about must actually be exercised.
        for reason in [
            "Admitted",
            "ActivationGranted",
            "Updated",
            "Uncordoned",
            "Staged",
            "DrainTimeout",
            "DrainForced",
            "StageFailed",
            "ActivationFailed",
            "BootedWrongSystem",
            "RolledBack",
            "Blessing",
            "(unplanned reboot before bless)",
            "(controller crash between one-shot and bless)",
            "(agent restart between one-shot and bless)",
            "RebootNeeded",
            "RebootRequired",
            "Retry",
            "(controller restart)",
            "(crash before actions)",
            "(admin cordon in the crash gap)",
            // Every way out of Degraded, and the retried node re-admitted to the end.
            "(out of Degraded: retry after BootedWrongSystem holding its slot)",
            "(out of Degraded: retry after ActivationFailed holding its slot)",
            "(out of Degraded: retry after RolledBack holding its slot)",
            "(re-admitted after RolledBack and verified)",
            "(out of Degraded: retry after StageFailed)",
            "(out of Degraded: retry after StagingTimeout)",
            "(out of Degraded: new revision)",
            "(out of Degraded: new configuration)",
            "(re-admitted after BootedWrongSystem and verified)",
            "(re-admitted after ActivationFailed and verified)",
            // Lost wake-ups, and the sweep that makes up for them.
            "(wake-up lost)",
            "(admitted by the sweep)",
            "(admitted after a lost wake-up)",
            // Pools: admissions in named and default pools, and after a soak.
            "(admitted in a named pool)",
            "(admitted in a default pool)",
            "(admitted after a soak)",
            "(admitted with node soak)",
            // Gates: admissions past pre-gates, and post-gates that time out, of each kind.
            "(admitted past a pre-gate)",
            "(admitted past a cluster-default gate)",
            "GateFailed",
            "(GateFailed by node-pods)",
            "(GateFailed by k3s-etcd-voter)",
            "(GateFailed by a pool gate)",
        ] {
            assert!(
                events.get(reason).copied().unwrap_or(0) > 0,
                "no {reason} in {seeds} seeds: {events:?}"
            );
        }
    }
    // Both kinds of cluster are simulated in earnest: a generator that stopped injecting faults
    // (or always did) would leave half of the claims above untested. (A clean seed that does
    // not converge already fails in `run_seed`.)
    let (clean, faulty) = (
        stats.get("clean").copied().unwrap_or(0),
        stats.get("faulty").copied().unwrap_or(0),
    );
    if seeds >= 100 {
        let tenth = seeds as usize / 10;
        assert!(
            clean >= tenth,
            "only {clean} of {seeds} seeds without faults: {stats:?}"
        );
        assert!(
            faulty >= tenth,
            "only {faulty} of {seeds} seeds with faults: {stats:?}"
        );
    }
}
