//! Pools (PURE): which pool each node is in, each pool's budget, pause and order, and the
//! status a `NixOSPool` shows. The admission gate ([`super::admit`]) uses [`Pools`] through
//! [`super::ClusterState`]; the controller builds it from the NixOSPool objects with
//! [`Pools::build`] and writes [`pool_status`].
//!
//! Rules (docs/pools.md):
//! * a node selected by no pool is in the implicit default pool, whose budget is the
//!   controller's `--max-unavailable` over the default pool's nodes (a cluster without pools
//!   rolls exactly as before);
//! * a node selected by two or more pools is never admitted, and counts against the budget of
//!   every pool that selects it while it is unavailable;
//! * a paused (or invalid) pool admits nothing new, nor does a pool with a Degraded node (a
//!   post-gate that timed out, or any other failure), whatever `--failure-threshold` says;
//! * a pool with `after` admits a node for revision R only once every node of each named pool
//!   runs R, is UpToDate, Ready, schedulable and not Degraded, and the last of them finished R
//!   at least `soak` ago. A named pool that does not exist or selects no node blocks.
//!
//! The cluster-wide rules hold across pools: the pause, the failure threshold, staging first,
//! never two control-plane nodes at once and none while another is unavailable.

use crate::rollout::decide::set_condition;
use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::admit::{budget, is_degraded, is_unavailable};
use super::{MaxUnavailable, NodeView, Policy};
use crate::api::{NixOSPoolSpec, NixOSPoolStatus, Phase, PoolSelector, pool_condition, short_revision};

/// Reasons of the pool conditions.
pub mod pool_reason {
    pub const ALL_UPDATED: &str = "AllNodesUpdated";
    pub const ROLLING: &str = "Rolling";
    pub const WAITING_FOR_POOL: &str = "WaitingForPool";
    pub const SOAKING: &str = "Soaking";
    pub const PAUSED: &str = "Paused";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NODE_DEGRADED: &str = "NodeDegraded";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const NODE_IN_MULTIPLE_POOLS: &str = "NodeInMultiplePools";
    pub const NO_CONFLICT: &str = "NoConflict";
    pub const IDLE: &str = "Idle";
    pub const GATE_BLOCKING: &str = "GateBlocking";
    /// The pools' `after` lists form a cycle through this pool: none of them can ever start.
    pub const ORDER_CYCLE: &str = "OrderCycle";
    /// The reasons of `Updating` under which the pool admits nothing.
    pub const BLOCKING: [&str; 7] = [
        ORDER_CYCLE,
        WAITING_FOR_POOL,
        SOAKING,
        PAUSED,
        INVALID_SPEC,
        GATE_BLOCKING,
        NODE_DEGRADED,
    ];
}

/// One pool as the gate sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub max_unavailable: MaxUnavailable,
    pub paused: bool,
    pub after: Vec<String>,
    pub soak: SignedDuration,
    /// `spec.nodeSoak`; `None`: the controller's default ([`Policy::node_soak`]).
    pub node_soak: Option<SignedDuration>,
    /// What is wrong with the spec (an unparsable `soak` or `maxUnavailable`): the pool then
    /// admits nothing, as if paused.
    pub invalid: Option<String>,
}

impl Pool {
    /// The pool a NixOSPool's spec describes.
    pub fn from_spec(name: &str, spec: &NixOSPoolSpec) -> Pool {
        let mut invalid = None;
        let max_unavailable = match &spec.max_unavailable {
            None => MaxUnavailable::Count(1),
            Some(IntOrString::Int(n)) if *n >= 1 => MaxUnavailable::Count(*n as u32),
            Some(IntOrString::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<u32>().ok()) {
                Some(p) if (1..=100).contains(&p) => MaxUnavailable::Percent(p),
                _ => {
                    invalid = Some(format!(
                        "maxUnavailable {s:?} must be a count or a percentage from 1% to 100%"
                    ));
                    MaxUnavailable::Count(1)
                }
            },
            Some(IntOrString::Int(n)) => {
                invalid = Some(format!("maxUnavailable {n} must be at least 1"));
                MaxUnavailable::Count(1)
            }
        };
        let soak = match spec.soak.as_deref().map(super::parse_duration) {
            None => SignedDuration::ZERO,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                invalid = Some(e.to_string());
                SignedDuration::ZERO
            }
        };
        let node_soak = match spec.node_soak.as_deref().map(super::parse_duration) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                invalid = Some(e.to_string());
                None
            }
        };
        Pool {
            name: name.to_owned(),
            max_unavailable,
            paused: spec.paused,
            after: spec.after.clone(),
            soak,
            node_soak,
            invalid,
        }
    }
}

/// Where a node belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Selected by no pool: the implicit default pool.
    Default,
    /// Selected by exactly this pool (index into [`Pools::pools`]).
    Pool(usize),
    /// Selected by several pools (indices): refused by all of them.
    Conflict(Vec<usize>),
}

/// The pools and which pool each node is in. Empty (the default) = no pools: every node is in
/// the default pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pools {
    pub pools: Vec<Pool>,
    /// Node name → indices of the pools selecting it; a node missing here is in the default pool.
    pub selected_by: BTreeMap<String, Vec<usize>>,
    /// Pool name → why one of its health gates blocks (a failing gate, or one not evaluated
    /// yet): the pool admits nothing.
    pub gate_blocks: BTreeMap<String, String>,
    /// Why a cluster-default health gate blocks the implicit default pool: it admits nothing.
    pub default_gate_block: Option<String>,
}

impl Pools {
    /// Pools from `(name, spec)` pairs and the nodes' labels.
    pub fn build<'a>(
        pools: impl IntoIterator<Item = (&'a str, &'a NixOSPoolSpec)>,
        nodes: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    ) -> Pools {
        let specs: Vec<(&str, &NixOSPoolSpec)> = pools.into_iter().collect();
        let selectors: Vec<&PoolSelector> = specs.iter().map(|(_, s)| &s.selector).collect();
        let mut selected_by = BTreeMap::new();
        if !selectors.is_empty() {
            for (name, labels) in nodes {
                let by: Vec<usize> = selectors
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.matches(labels))
                    .map(|(i, _)| i)
                    .collect();
                if !by.is_empty() {
                    selected_by.insert(name.to_owned(), by);
                }
            }
        }
        Pools {
            pools: specs.iter().map(|(n, s)| Pool::from_spec(n, s)).collect(),
            selected_by,
            gate_blocks: BTreeMap::new(),
            default_gate_block: None,
        }
    }

    pub fn membership(&self, node: &str) -> Membership {
        match self.selected_by.get(node).map(Vec::as_slice) {
            None | Some([]) => Membership::Default,
            Some([p]) => Membership::Pool(*p),
            Some(ps) => Membership::Conflict(ps.to_vec()),
        }
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// Whether pool `p` (None: the default pool) selects `node` (alone or with others).
    fn selects(&self, p: Option<usize>, node: &str) -> bool {
        match (p, self.selected_by.get(node)) {
            (None, None) => true,
            (None, Some(by)) => by.is_empty(),
            (Some(p), Some(by)) => by.contains(&p),
            (Some(_), None) => false,
        }
    }

    /// Indices into `nodes` of the nodes pool `p` (None: the default pool) selects, conflicts
    /// included.
    pub fn members(&self, p: Option<usize>, nodes: &[NodeView<'_>]) -> Vec<usize> {
        (0..nodes.len())
            .filter(|&i| self.selects(p, nodes[i].name))
            .collect()
    }
}

/// The budget of pool `p` (None: the default pool, `policy.max_unavailable`) over its members.
pub fn pool_budget(pools: &Pools, p: Option<usize>, members: usize, policy: &Policy) -> usize {
    let max = match p {
        None => policy.max_unavailable,
        Some(p) => pools.pools[p].max_unavailable,
    };
    budget(max, members)
}

/// The node soak of pool `p` (None: the default pool).
pub fn node_soak(pools: &Pools, p: Option<usize>, policy: &Policy) -> SignedDuration {
    p.and_then(|p| pools.pools[p].node_soak)
        .unwrap_or(policy.node_soak)
}

/// Whether a node still soaks after its update: UpToDate, and its newest history entry
/// (Succeeded) finished less than `soak` ago. It counts against its pool's budget until then.
pub fn is_soaking(v: &NodeView<'_>, soak: SignedDuration, now: Timestamp) -> bool {
    if soak.is_zero() || v.status.phase != Some(Phase::UpToDate) {
        return false;
    }
    v.status
        .history
        .first()
        .filter(|h| h.result == "Succeeded")
        .is_some_and(|h| now < h.finished_at.0.saturating_add(soak).unwrap_or(h.finished_at.0))
}

/// Why pool `p` may not admit a node for `revision` now; `None`: its order allows it. Also
/// says why a paused or invalid pool admits nothing.
pub fn pool_blocker(
    pools: &Pools,
    p: usize,
    revision: &str,
    nodes: &[NodeView<'_>],
    now: Timestamp,
) -> Option<(&'static str, String)> {
    let pool = &pools.pools[p];
    if let Some(problem) = &pool.invalid {
        return Some((pool_reason::INVALID_SPEC, format!("invalid spec: {problem}")));
    }
    if pool.paused {
        return Some((pool_reason::PAUSED, "paused (spec.paused)".to_owned()));
    }
    let degraded: Vec<&str> = pools
        .members(Some(p), nodes)
        .into_iter()
        .filter(|&i| is_degraded(&nodes[i]))
        .map(|i| nodes[i].name)
        .collect();
    if !degraded.is_empty() {
        let reasons: Vec<String> = degraded
            .iter()
            .filter_map(|n| nodes.iter().find(|v| v.name == *n))
            .map(|v| {
                let why = v.status.failed.as_ref().map_or("Failed", |f| f.reason.as_str());
                format!("{} ({why})", v.name)
            })
            .collect();
        return Some((
            pool_reason::NODE_DEGRADED,
            format!(
                "halted: {} Degraded; the pool admits nothing until it is fixed or retried",
                reasons.join(", ")
            ),
        ));
    }
    if let Some(why) = pools.gate_blocks.get(&pool.name) {
        return Some((pool_reason::GATE_BLOCKING, why.clone()));
    }
    if let Some(cycle) = order_cycle(pools, p) {
        return Some((
            pool_reason::ORDER_CYCLE,
            format!(
                "the pools' order is a cycle: {}; none of them can start until one leaves its after list",
                cycle.join(" after ")
            ),
        ));
    }
    let short = short_revision(revision);
    for before in &pool.after {
        let Some(q) = pools.index(before) else {
            return Some((
                pool_reason::WAITING_FOR_POOL,
                format!("waiting for pool {before}, which does not exist"),
            ));
        };
        if q == p {
            return Some((
                pool_reason::WAITING_FOR_POOL,
                "the pool names itself in after".to_owned(),
            ));
        }
        let members = pools.members(Some(q), nodes);
        if members.is_empty() {
            return Some((
                pool_reason::WAITING_FOR_POOL,
                format!("waiting for pool {before}, which selects no node"),
            ));
        }
        let done = members
            .iter()
            .filter(|&&i| runs_healthy(&nodes[i], revision))
            .count();
        if done < members.len() {
            return Some((
                pool_reason::WAITING_FOR_POOL,
                format!(
                    "waiting for pool {before} to run {short} and be healthy ({done}/{} nodes)",
                    members.len()
                ),
            ));
        }
        let finished = members
            .iter()
            .filter_map(|&i| finished_at(&nodes[i], revision))
            .max();
        if let Some(f) = finished {
            let until = f.saturating_add(pool.soak).unwrap_or(f);
            if now < until {
                return Some((
                    pool_reason::SOAKING,
                    format!("pool {before} runs {short}; soaking until {until}"),
                ));
            }
        }
    }
    None
}

/// The cycle of `after` edges through pool `p`, if there is one: the pool names from `p` back
/// to `p` (`["a", "b", "a"]`: a comes after b, which comes after a). Pools named in `after`
/// that do not exist end a path; a pool naming itself is a cycle of one.
pub fn order_cycle(pools: &Pools, p: usize) -> Option<Vec<String>> {
    fn walk(
        pools: &Pools,
        start: usize,
        at: usize,
        path: &mut Vec<usize>,
        seen: &mut BTreeSet<usize>,
    ) -> bool {
        for name in &pools.pools[at].after {
            let Some(q) = pools.index(name) else { continue };
            if q == start {
                path.push(q);
                return true;
            }
            if seen.insert(q) {
                path.push(q);
                if walk(pools, start, q, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![p];
    let mut seen = BTreeSet::from([p]);
    walk(pools, p, p, &mut path, &mut seen)
        .then(|| path.iter().map(|&q| pools.pools[q].name.clone()).collect())
}

/// Why the pool of `nodes[i]` admits nothing now, with a message naming the pool (for the
/// node's own conditions): its NixOSPool's order, soak, pause, gates, a Degraded node or an
/// invalid spec; the default pool's cluster-default gates; or a selection by several pools.
/// `None`: its pool would admit it (it may still wait for room in the budget).
pub fn node_blocker(
    pools: &Pools,
    i: usize,
    nodes: &[NodeView<'_>],
    now: Timestamp,
) -> Option<(&'static str, String)> {
    let v = &nodes[i];
    match pools.membership(v.name) {
        Membership::Default => pools
            .default_gate_block
            .as_ref()
            .map(|why| (pool_reason::GATE_BLOCKING, format!("default pool: {why}"))),
        Membership::Pool(p) => {
            let revision = v.status.target.as_ref().map_or("", |t| t.revision.as_str());
            pool_blocker(pools, p, revision, nodes, now)
                .map(|(r, why)| (r, format!("pool {}: {why}", pools.pools[p].name)))
        }
        Membership::Conflict(ps) => {
            let names: Vec<&str> = ps.iter().map(|&p| pools.pools[p].name.as_str()).collect();
            Some((
                pool_reason::NODE_IN_MULTIPLE_POOLS,
                format!(
                    "selected by pools {}: admitted by none until one selector leaves it out",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The node runs `revision`, is UpToDate, and its Node is Ready, schedulable and it is not
/// Degraded.
fn runs_healthy(v: &NodeView<'_>, revision: &str) -> bool {
    v.status.revision.as_deref() == Some(revision)
        && v.status.phase == Some(Phase::UpToDate)
        && v.node.exists
        && v.node.ready
        && !v.node.unschedulable
}

/// When the node last finished applying `revision` (its newest successful history entry);
/// `None` when it ran it before nixroll recorded any (adopted): soaked long ago.
fn finished_at(v: &NodeView<'_>, revision: &str) -> Option<Timestamp> {
    v.status
        .history
        .iter()
        .filter(|h| h.revision == revision && h.result == "Succeeded")
        .map(|h| h.finished_at.0)
        .max()
}

/// The status a NixOSPool shows: counts, revisions and conditions (transition times kept from
/// `previous`). `p` is the pool's index in `pools`.
pub fn pool_status(
    pools: &Pools,
    p: usize,
    nodes: &[NodeView<'_>],
    policy: &Policy,
    previous: &NixOSPoolStatus,
    generation: i64,
    now: Timestamp,
) -> NixOSPoolStatus {
    let members = pools.members(Some(p), nodes);
    let exclusive: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| pools.membership(nodes[i].name) == Membership::Pool(p))
        .collect();
    let conflicts: Vec<&str> = members
        .iter()
        .filter(|&&i| matches!(pools.membership(nodes[i].name), Membership::Conflict(_)))
        .map(|&i| nodes[i].name)
        .collect();
    let count = |f: &dyn Fn(&NodeView<'_>) -> bool| members.iter().filter(|&&i| f(&nodes[i])).count() as u32;
    let updated = count(&|v| {
        v.status.phase == Some(Phase::UpToDate)
            && v.status.revision.is_some()
            && v.status.revision.as_deref() == Some(v.spec.revision.as_str())
    });
    let revisions: BTreeSet<String> = members
        .iter()
        .filter_map(|&i| nodes[i].status.revision.clone())
        .collect();
    let revisions: Vec<String> = revisions.into_iter().collect();
    let degraded = count(&|v| is_degraded(v));
    let soak = node_soak(pools, Some(p), policy);
    let mut st = NixOSPoolStatus {
        observed_generation: Some(generation),
        nodes: members.len() as u32,
        updated,
        ready: count(&|v| v.node.exists && v.node.ready),
        unavailable: count(&|v| is_unavailable(v) || is_soaking(v, soak, now)),
        degraded,
        max_unavailable: Some(pool_budget(pools, Some(p), members.len(), policy) as u32),
        revision: (!revisions.is_empty()).then(|| {
            revisions
                .iter()
                .map(|r| short_revision(r))
                .collect::<Vec<_>>()
                .join(",")
        }),
        revisions,
        message: None,
        conditions: previous.conditions.clone(),
    };
    let all_updated = !members.is_empty() && updated as usize == members.len();
    let disrupting: Vec<&str> = members
        .iter()
        .filter(|&&i| {
            nodes[i].status.slot.is_some() || nodes[i].status.phase.unwrap_or_default().is_disruptive()
        })
        .map(|&i| nodes[i].name)
        .collect();
    // The first revision a member waits for, for the order's explanation.
    let waiting_for = exclusive.iter().find_map(|&i| {
        let v = &nodes[i];
        (v.status.phase == Some(Phase::Waiting))
            .then(|| v.status.target.as_ref().map(|t| t.revision.clone()))
            .flatten()
    });
    let blocker = waiting_for
        .as_deref()
        .and_then(|r| pool_blocker(pools, p, r, nodes, now))
        .or_else(|| {
            let pool = &pools.pools[p];
            pool.invalid
                .as_ref()
                .map(|e| (pool_reason::INVALID_SPEC, format!("invalid spec: {e}")))
                .or_else(|| {
                    pool.paused
                        .then(|| (pool_reason::PAUSED, "paused (spec.paused)".to_owned()))
                })
        });
    let (updating, reason, message) = if let Some((reason, why)) = &blocker {
        (!all_updated, *reason, why.clone())
    } else if !disrupting.is_empty() {
        (
            true,
            pool_reason::ROLLING,
            format!("updating {}", disrupting.join(", ")),
        )
    } else if all_updated {
        (
            false,
            pool_reason::ALL_UPDATED,
            format!("all {} nodes run the revision they want", members.len()),
        )
    } else if members.is_empty() {
        (
            false,
            pool_reason::IDLE,
            "the selector matches no NixOSNode".to_owned(),
        )
    } else {
        (
            true,
            pool_reason::ROLLING,
            format!("{updated}/{} nodes updated", members.len()),
        )
    };
    set_condition(
        &mut st.conditions,
        pool_condition::UPDATED,
        all_updated,
        if all_updated {
            pool_reason::ALL_UPDATED
        } else {
            pool_reason::ROLLING
        },
        &format!("{updated}/{} nodes run the revision they want", members.len()),
        now,
        generation,
    );
    set_condition(
        &mut st.conditions,
        pool_condition::UPDATING,
        updating,
        reason,
        &message,
        now,
        generation,
    );
    let degraded_names: Vec<&str> = members
        .iter()
        .filter(|&&i| is_degraded(&nodes[i]))
        .map(|&i| nodes[i].name)
        .collect();
    if degraded_names.is_empty() {
        set_condition(
            &mut st.conditions,
            pool_condition::DEGRADED,
            false,
            pool_reason::AS_EXPECTED,
            "no node is Degraded",
            now,
            generation,
        );
    } else {
        set_condition(
            &mut st.conditions,
            pool_condition::DEGRADED,
            true,
            pool_reason::NODE_DEGRADED,
            &format!(
                "Degraded: {}; the rollout is halted until they are fixed or retried",
                degraded_names.join(", ")
            ),
            now,
            generation,
        );
    }
    if conflicts.is_empty() {
        set_condition(
            &mut st.conditions,
            pool_condition::CONFLICT,
            false,
            pool_reason::NO_CONFLICT,
            "every selected node is in this pool alone",
            now,
            generation,
        );
    } else {
        let others: BTreeSet<&str> = conflicts
            .iter()
            .filter_map(|n| pools.selected_by.get(*n))
            .flatten()
            .filter(|&&q| q != p)
            .map(|&q| pools.pools[q].name.as_str())
            .collect();
        set_condition(
            &mut st.conditions,
            pool_condition::CONFLICT,
            true,
            pool_reason::NODE_IN_MULTIPLE_POOLS,
            &format!(
                "{} also selected by pool {}: such nodes are admitted by no pool until one selector leaves them out",
                conflicts.join(", "),
                others.into_iter().collect::<Vec<_>>().join(", ")
            ),
            now,
            generation,
        );
    }
    st.message = Some(if !degraded_names.is_empty() {
        format!("halted: {} Degraded", degraded_names.join(", "))
    } else if !conflicts.is_empty() {
        format!("{} in more than one pool; {message}", conflicts.join(", "))
    } else {
        message
    });
    st
}
