//! Unit tests of `decide` and `admit`, driven through `mk_*` builders.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::api::{
    ActivationAction, ActivationReport, ActivationState, AgentStatus, DrainPolicy, DrainTimeoutAction,
    HostError, HostOperation, MaintenanceWindow, NixOSNodeSpec, Phase, RebootPolicy, StagedSystem, Weekday,
};

const REV1: &str = "1111111111111111111111111111111111111111";
const REV2: &str = "2222222222222222222222222222222222222222";
const SYS1: &str = "/nix/store/aaaa-nixos-system-n1";
const SYS2: &str = "/nix/store/bbbb-nixos-system-n1";
const FLAKE: &str = "git+https://git.example.org/infra.git";

fn t0() -> Timestamp {
    "2026-03-02T10:00:00Z".parse().unwrap()
}
fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}
fn at(n: i64) -> Timestamp {
    t0().checked_add(secs(n)).unwrap()
}

fn mk_spec(rev: &str) -> NixOSNodeSpec {
    crate::sim::fixtures::spec(FLAKE, rev)
}

fn mk_obs() -> NodeObservation {
    NodeObservation {
        exists: true,
        ready: true,
        unschedulable: false,
        cordon_mark: false,
        control_plane: false,
        boot_id: Some("boot-1".into()),
        ..NodeObservation::default()
    }
}

fn mk_agent_running(sys: &str, boot: &str) -> AgentStatus {
    AgentStatus {
        boot_id: Some(boot.into()),
        booted_system: Some(sys.into()),
        current_system: Some(sys.into()),
        ..Default::default()
    }
}

fn mk_staged(rev: &str, name: &str, sys: &str, reboot: bool) -> StagedSystem {
    StagedSystem {
        revision: rev.into(),
        installable: crate::api::installable(FLAKE, rev, name),
        system: sys.into(),
        closure_bytes: None,
        reboot_required: reboot,
        reboot_reasons: if reboot { vec!["kernel".into()] } else { vec![] },
        staged_at: None,
    }
}

fn mk_report(id: &str, action: ActivationAction, state: ActivationState, sys: &str) -> ActivationReport {
    ActivationReport {
        id: id.into(),
        action,
        state,
        system: sys.into(),
        boot_id_before: None,
        exit_code: None,
        units_failed: false,
        message: Some("boom".into()),
        boot_once: None,
        updated_at: Time(t0()),
    }
}

/// The agent's error staging REV2: `message`, at `at(secs)`.
fn mk_stage_error(message: &str, secs: i64) -> HostError {
    HostError {
        operation: HostOperation::Stage,
        revision: Some(REV2.into()),
        message: message.into(),
        at: Time(at(secs)),
    }
}

/// One simulated NixOSNode with its Node.
struct N {
    name: String,
    generation: i64,
    retry: Option<String>,
    spec: NixOSNodeSpec,
    status: NixOSNodeStatus,
    node: NodeObservation,
}

impl N {
    fn view(&self) -> NodeView<'_> {
        NodeView {
            name: &self.name,
            generation: self.generation,
            retry_token: self.retry.as_deref(),
            spec: &self.spec,
            status: &self.status,
            node: &self.node,
        }
    }
    fn agent(&mut self) -> &mut AgentStatus {
        self.status.agent.get_or_insert_with(Default::default)
    }
    /// Run `decide` and apply its status (keeping the agent's part), like the controller.
    fn step(&mut self, admitted: bool, drain: Option<&DrainProgress>, now: Timestamp) -> Decision {
        let d = decide(&self.view(), admitted, drain, &Policy::default(), now);
        assert!(d.status.agent.is_none(), "decide must never write status.agent");
        let agent = self.status.agent.take();
        self.status = d.status.clone();
        self.status.agent = agent;
        for a in &d.actions {
            match a {
                Action::Cordon => {
                    self.node.unschedulable = true;
                    self.node.cordon_mark = true;
                }
                Action::Uncordon => {
                    self.node.unschedulable = false;
                    self.node.cordon_mark = false;
                }
                _ => {}
            }
        }
        d
    }
    fn phase(&self) -> Phase {
        self.status.phase.unwrap()
    }
    /// The agent reports `state` of `action` of SYS2 for the current grant; returns its id.
    fn report(&mut self, action: ActivationAction, state: ActivationState) -> String {
        let id = grant_id(self);
        self.agent().activation = Some(mk_report(&id, action, state, SYS2));
        id
    }
    /// The agent reports the current grant switched live to SYS2 and runs it.
    fn report_switched(&mut self) {
        self.report(ActivationAction::Switch, ActivationState::Switched);
        self.agent().current_system = Some(SYS2.into());
    }
    fn cond(&self, t: &str) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        self.status.conditions.iter().find(|c| c.type_ == t).unwrap()
    }
}

/// A node running REV1/SYS1, UpToDate, with spec now asking for REV2.
fn mk_node(name: &str) -> N {
    let mut n = N {
        name: name.into(),
        generation: 1,
        retry: None,
        spec: mk_spec(REV1),
        status: NixOSNodeStatus::default(),
        node: mk_obs(),
    };
    n.status.agent = Some(mk_agent_running(SYS1, "boot-1"));
    n.status.agent.as_mut().unwrap().staged = Some(mk_staged(REV1, name, SYS1, false));
    let d = n.step(false, None, at(-100));
    assert_eq!(n.phase(), Phase::UpToDate, "{d:?}");
    assert_eq!(n.status.revision.as_deref(), Some(REV1));
    n.spec = mk_spec(REV2);
    n.generation = 2;
    n
}

/// A node in Waiting with REV2 staged (reboot needed as given).
fn mk_waiting(name: &str, reboot: bool) -> N {
    let mut n = mk_node(name);
    n.step(false, None, at(0));
    assert_eq!(n.phase(), Phase::Staging);
    n.agent().staged = Some(mk_staged(REV2, name, SYS2, reboot));
    n.step(false, None, at(10));
    assert_eq!(n.phase(), Phase::Waiting);
    n
}

fn drained() -> DrainProgress {
    DrainProgress::default()
}

/// A drain pass that left `remaining` pods, `blocked_by_pdb` of them held by a budget.
fn pods_left(remaining: usize, blocked_by_pdb: usize) -> DrainProgress {
    DrainProgress {
        remaining,
        blocked_by_pdb,
        refused: vec![],
    }
}

fn mk_activating(name: &str, reboot: bool) -> N {
    let mut n = mk_waiting(name, reboot);
    n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Draining);
    n.step(false, Some(&drained()), at(30));
    assert_eq!(n.phase(), Phase::Activating);
    n
}

fn grant_id(n: &N) -> String {
    n.status.activation.as_ref().unwrap().id.clone()
}

// ---- staging ---------------------------------------------------------------------------------

#[test]
fn new_revision_starts_staging_with_installable() {
    let mut n = mk_node("n1");
    let d = n.step(false, None, at(0));
    assert_eq!(n.phase(), Phase::Staging);
    assert!(d.actions.is_empty());
    let t = n.status.target.as_ref().unwrap();
    assert_eq!(t.revision, REV2);
    assert_eq!(
        t.installable,
        "git+https://git.example.org/infra.git?rev=2222222222222222222222222222222222222222#nixosConfigurations.n1.config.system.build.toplevel"
    );
    assert_eq!(n.status.wanted.as_deref(), Some("22222222"));
    assert_eq!(n.status.running.as_deref(), Some("11111111"));
    assert_eq!(n.status.observed_generation, Some(2));
    assert_eq!(n.status.last_transition_time, Some(Time(at(0))));
    assert_eq!(n.cond(condition::PROGRESSING).status, "True");
    assert_eq!(n.cond(condition::UP_TO_DATE).status, "False");
    assert_eq!(d.requeue_after, Some(PhaseTimeouts::default().staging));
}

/// With a builder, the staging deadline does not run while the builder builds (a build longer
/// than the staging timeout used to fail every waiting node `StagingTimeout`); it counts from
/// when the build was reported built, i.e. it bounds the fetch.
#[test]
fn staging_timeout_counts_from_the_build_not_while_the_builder_builds() {
    let timeout = Policy::default().timeouts.staging.as_secs();
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    assert_eq!(n.phase(), Phase::Staging);
    // The controller names the builder; the system is not built yet.
    n.status.target.as_mut().unwrap().build = Some(crate::api::TargetBuild {
        builder: Some("builder-1".into()),
        progress: Some(crate::api::BuildProgress::Building),
        ..Default::default()
    });
    let d = n.step(false, None, at(timeout + 100));
    assert_eq!(n.phase(), Phase::Staging, "{:?}", n.status.message);
    assert_eq!(d.rows, vec![Row::StagingWaitBuilder]);
    assert!(n.status.failed.is_none());
    // Built long after the phase started: the node has the whole timeout to fetch it.
    let built = 2 * timeout;
    n.status.target.as_mut().unwrap().build = Some(crate::api::TargetBuild {
        system: SYS2.into(),
        builder: Some("builder-1".into()),
        progress: Some(crate::api::BuildProgress::Fetching),
        built_at: Some(Time(at(built))),
        ..Default::default()
    });
    let d = n.step(false, None, at(built + 10));
    assert_eq!(n.phase(), Phase::Staging, "{:?}", n.status.message);
    assert_eq!(d.rows, vec![Row::StagingWait]);
    assert_eq!(d.requeue_after, Some(SignedDuration::from_secs(timeout - 10)));
    let d = n.step(false, None, at(built + timeout));
    assert_eq!(d.rows, vec![Row::StagingTimeout]);
    assert_eq!(n.phase(), Phase::Degraded);
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::STAGING_TIMEOUT);
    // Without a builder the deadline still counts from the phase start.
    let mut n = mk_node("n2");
    n.step(false, None, at(0));
    let d = n.step(false, None, at(timeout));
    assert_eq!(d.rows, vec![Row::StagingTimeout]);
}

/// A revision pushed while the node still stages the previous one gets the whole staging
/// timeout: the clock restarts with the new target (it used to count from the first target's
/// start, so a long build followed by a push timed out at once; found by the simulation's
/// builder seeds).
#[test]
fn a_new_target_while_staging_gets_the_whole_staging_timeout() {
    let timeout = Policy::default().timeouts.staging.as_secs();
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    assert_eq!(n.phase(), Phase::Staging);
    let rev3 = "3333333333333333333333333333333333333333";
    n.spec.revision = rev3.into();
    let d = n.step(false, None, at(timeout - 60));
    assert_eq!(n.phase(), Phase::Staging, "{:?}", n.status.message);
    assert!(d.rows.contains(&Row::TargetChanged), "{:?}", d.rows);
    assert_eq!(n.status.target.as_ref().unwrap().revision, rev3);
    let d = n.step(false, None, at(timeout + 60));
    assert_eq!(n.phase(), Phase::Staging, "{:?}", n.status.message);
    assert_eq!(d.rows, vec![Row::StagingWait]);
    let d = n.step(false, None, at(2 * timeout - 60));
    assert_eq!(d.rows, vec![Row::StagingTimeout]);
}

#[test]
fn configuration_override_is_used_in_installable() {
    let mut n = mk_node("n1");
    n.spec.configuration = Some("web".into());
    n.step(false, None, at(0));
    assert!(
        n.status
            .target
            .as_ref()
            .unwrap()
            .installable
            .contains("nixosConfigurations.web.")
    );
}

#[test]
fn stage_failure_degrades_without_disruption() {
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    // A stale error from before staging began is ignored.
    n.agent().last_error = Some(mk_stage_error("old", -5));
    n.step(false, None, at(1));
    assert_eq!(n.phase(), Phase::Staging);
    n.agent().last_error = Some(mk_stage_error("error: attribute missing\n  at flake.nix:3", 5));
    let d = n.step(false, None, at(6));
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty());
    let f = n.status.failed.as_ref().unwrap();
    assert_eq!(
        (f.revision.as_str(), f.reason.as_str()),
        (REV2, reason::STAGE_FAILED)
    );
    assert_eq!(n.cond(condition::DEGRADED).status, "True");
    assert_eq!(n.cond(condition::DEGRADED).reason, reason::STAGE_FAILED);
    assert_eq!(n.status.history[0].result, "Failed");
    let m = n.status.message.as_deref().unwrap();
    assert!(
        !m.contains('\n') && m.contains("attribute missing at flake.nix:3"),
        "{m}"
    );
    assert!(
        d.notes
            .iter()
            .any(|x| x.warning && x.reason == reason::STAGE_FAILED)
    );
    // It stays Degraded on later passes.
    n.step(false, None, at(100));
    assert_eq!(n.phase(), Phase::Degraded);
}

#[test]
fn staged_goes_to_waiting_with_system() {
    let n = mk_waiting("n1", true);
    assert_eq!(n.status.target.as_ref().unwrap().system.as_deref(), Some(SYS2));
    assert!(n.status.slot.is_none());
}

#[test]
fn staged_equal_to_booted_and_current_is_up_to_date_without_disruption() {
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    n.agent().staged = Some(mk_staged(REV2, "n1", SYS1, false));
    let d = n.step(false, None, at(1));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert!(d.actions.is_empty());
    assert_eq!(n.status.revision.as_deref(), Some(REV2));
    assert_eq!(n.status.running.as_deref(), Some("22222222"));
    assert!(n.status.target.is_none());
    assert_eq!(n.status.history[0].result, "Succeeded");
}

#[test]
fn staging_timeout_degrades() {
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    let d = n.step(false, None, at(3599));
    assert_eq!(n.phase(), Phase::Staging);
    assert_eq!(d.requeue_after, Some(secs(1)));
    n.step(false, None, at(3600));
    assert_eq!(n.phase(), Phase::Degraded);
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::STAGING_TIMEOUT);
}

#[test]
fn spec_change_while_waiting_restages() {
    let mut n = mk_waiting("n1", false);
    n.spec = mk_spec("3333333333333333333333333333333333333333");
    n.generation = 3;
    n.step(false, None, at(20));
    assert_eq!(n.phase(), Phase::Staging);
    assert_eq!(
        n.status.target.as_ref().unwrap().revision,
        "3333333333333333333333333333333333333333"
    );
}

// ---- admission into draining ---------------------------------------------------------------

#[test]
fn waiting_not_admitted_stays() {
    let mut n = mk_waiting("n1", false);
    let d = n.step(false, None, at(20));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::WAITING_FOR_SLOT);
}

#[test]
fn admitted_cordons_and_drains_with_persisted_slot() {
    let mut n = mk_waiting("n1", false);
    let d = n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(d.actions, vec![Action::Cordon, Action::Evict]);
    let s = n.status.slot.as_ref().unwrap();
    assert!(!s.was_unschedulable);
    assert!(s.cordoned_by_nixroll);
    assert_eq!(s.granted_at, Time(at(20)));
    assert_eq!(s.drain_started_at, Some(Time(at(20))));
}

#[test]
fn already_cordoned_node_is_not_cordoned_nor_uncordoned_by_nixroll() {
    let mut n = mk_waiting("n1", false);
    n.node.unschedulable = true; // an admin cordoned it
    let d = n.step(true, None, at(20));
    assert_eq!(d.actions, vec![Action::Evict]);
    let s = n.status.slot.as_ref().unwrap();
    assert!(s.was_unschedulable && !s.cordoned_by_nixroll);
    n.step(false, Some(&drained()), at(30));
    n.report_switched();
    let d = n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert!(!d.actions.contains(&Action::Uncordon));
    assert!(n.node.unschedulable, "stays cordoned");
    assert!(n.status.slot.is_none());
}

#[test]
fn suspend_blocks_start_but_not_an_admitted_node() {
    let mut n = mk_waiting("n1", false);
    n.spec.suspend = true;
    let d = n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::SUSPENDED);
    n.spec.suspend = false;
    n.step(true, None, at(21));
    assert_eq!(n.phase(), Phase::Draining);
    n.spec.suspend = true;
    n.step(false, Some(&drained()), at(22));
    assert_eq!(n.phase(), Phase::Activating, "an admitted node finishes");
}

#[test]
fn closed_window_blocks_start_and_requeues_at_opening() {
    let mut n = mk_waiting("n1", false);
    // t0 is Monday 10:00Z; window Monday 22:00–02:00 UTC.
    n.spec.maintenance_windows = vec![MaintenanceWindow {
        days: vec![Weekday::Mon],
        start: "22:00".into(),
        end: "02:00".into(),
        time_zone: "UTC".into(),
    }];
    let d = n.step(true, None, at(0));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue_after, Some(SignedDuration::from_hours(12)));
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::WAITING_FOR_WINDOW);
    n.step(true, None, at(12 * 3600));
    assert_eq!(n.phase(), Phase::Draining);
}

#[test]
fn invalid_window_is_invalid_spec_and_nothing_disruptive() {
    let mut n = mk_waiting("n1", false);
    n.spec.maintenance_windows = vec![MaintenanceWindow {
        days: vec![],
        start: "01:00".into(),
        end: "03:00".into(),
        time_zone: "Nowhere/Land".into(),
    }];
    let d = n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::INVALID_SPEC);
    assert_eq!(n.cond(condition::PROGRESSING).status, "False");
}

// ---- draining ------------------------------------------------------------------------------

#[test]
fn draining_evicts_until_empty_then_grants() {
    let mut n = mk_waiting("n1", true);
    n.step(true, None, at(20));
    let p = pods_left(3, 1);
    let d = n.step(false, Some(&p), at(25));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(d.actions, vec![Action::Evict]);
    assert_eq!(d.requeue_after, Some(DRAIN_PASS_INTERVAL));
    assert!(n.status.message.as_ref().unwrap().contains("3 pod(s) left"));
    let d = n.step(false, Some(&drained()), at(30));
    assert_eq!(n.phase(), Phase::Activating);
    assert!(d.actions.is_empty());
    let g = n.status.activation.as_ref().unwrap();
    assert_eq!(g.action, ActivationAction::Boot);
    assert_eq!(g.system, SYS2);
    assert_eq!(g.boot_id_before.as_deref(), Some("boot-1"));
    assert!(g.id.starts_with("22222222-"));
}

#[test]
fn drained_but_not_cordoned_cordons_first() {
    let mut n = mk_waiting("n1", true);
    n.step(true, None, at(20));
    n.node.unschedulable = false; // someone uncordoned it mid-drain
    let d = n.step(false, Some(&drained()), at(30));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(d.actions, vec![Action::Cordon, Action::Evict]);
}

#[test]
fn drain_timeout_abort_uncordons_and_backs_off_exponentially() {
    let mut n = mk_waiting("n1", false);
    n.step(true, None, at(0));
    let p = pods_left(2, 2);
    let d = n.step(false, Some(&p), at(15 * 60));
    assert_eq!(n.phase(), Phase::Waiting);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    assert!(
        n.status.slot.is_some(),
        "slot kept until the uncordon is observed"
    );
    let b = n.status.backoff.clone().unwrap();
    assert_eq!(b.attempts, 1);
    let d2 = n.step(false, None, at(15 * 60 + 1));
    assert!(d2.actions.is_empty());
    assert!(n.status.slot.is_none());
    assert_eq!(b.not_before, Time(at(15 * 60 + 300)));
    assert!(
        d.notes
            .iter()
            .any(|x| x.reason == reason::DRAIN_TIMEOUT && x.warning)
    );
    // During the backoff, admission is refused.
    let d = n.step(true, None, at(15 * 60 + 10));
    assert_eq!(n.phase(), Phase::Waiting);
    assert_eq!(d.requeue_after, Some(secs(290)));
    assert!(d.actions.is_empty());
    // After it, the next attempt; a second abort doubles.
    n.step(true, None, at(1300));
    assert_eq!(n.phase(), Phase::Draining);
    n.step(false, Some(&p), at(1300 + 900));
    let b = n.status.backoff.clone().unwrap();
    assert_eq!(b.attempts, 2);
    assert_eq!(b.not_before, Time(at(2200 + 600)));
}

#[test]
fn drain_abort_uncordon_is_repeated_after_a_lost_action() {
    let mut n = mk_waiting("n1", false);
    n.step(true, None, at(0));
    let p = DrainProgress {
        remaining: 2,
        ..Default::default()
    };
    let d = decide(&n.view(), false, Some(&p), &Policy::default(), at(900));
    assert_eq!(d.actions, vec![Action::Uncordon]);
    // Crash: status written, uncordon never performed.
    let agent = n.status.agent.take();
    n.status = d.status;
    n.status.agent = agent;
    assert!(n.node.unschedulable);
    let d = n.step(false, None, at(1000));
    assert_eq!(d.actions, vec![Action::Uncordon]);
    n.step(false, None, at(1001));
    assert!(n.status.slot.is_none());
    assert!(!n.node.unschedulable);
}

#[test]
fn drain_abort_does_not_uncordon_admin_cordon() {
    let mut n = mk_waiting("n1", false);
    n.node.unschedulable = true;
    n.step(true, None, at(0));
    let p = DrainProgress {
        remaining: 1,
        ..Default::default()
    };
    let d = n.step(false, Some(&p), at(900));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
}

#[test]
fn drain_timeout_from_spec_and_force() {
    let mut n = mk_waiting("n1", false);
    n.spec.drain = Some(DrainPolicy {
        timeout: Some("1m30s".into()),
        on_timeout: DrainTimeoutAction::Force,
        ..Default::default()
    });
    n.step(true, None, at(0));
    let p = DrainProgress {
        remaining: 2,
        ..Default::default()
    };
    let d = n.step(false, Some(&p), at(89));
    assert_eq!(d.actions, vec![Action::Evict]);
    let d = n.step(false, Some(&p), at(90));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(d.actions, vec![Action::ForceDelete]);
    assert!(n.status.slot.as_ref().unwrap().forced);
    assert!(
        d.notes
            .iter()
            .any(|x| x.reason == reason::DRAIN_FORCED && x.warning)
    );
    n.step(false, Some(&drained()), at(95));
    assert_eq!(n.phase(), Phase::Activating);
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("90s").unwrap(), secs(90));
    assert_eq!(parse_duration("15m").unwrap(), secs(900));
    assert_eq!(parse_duration("1h30m").unwrap(), secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), SignedDuration::from_millis(500));
    for bad in ["", "m", "10", "1d", "1h 30m", "-5m"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

// ---- activation, reboot, verify ------------------------------------------------------------

#[test]
fn switch_path_verifies_then_uncordons_then_frees_slot() {
    let mut n = mk_activating("n1", false);
    let id = grant_id(&n);
    assert_eq!(
        n.status.activation.as_ref().unwrap().action,
        ActivationAction::Switch
    );
    n.agent().activation = Some(mk_report(
        &id,
        ActivationAction::Switch,
        ActivationState::Running,
        SYS2,
    ));
    n.step(false, None, at(35));
    assert_eq!(n.phase(), Phase::Activating);
    n.agent().activation = Some(mk_report(
        &id,
        ActivationAction::Switch,
        ActivationState::Switched,
        SYS2,
    ));
    let d = n.step(false, None, at(40));
    // current system not yet reported: verifying, still cordoned.
    assert_eq!(n.phase(), Phase::Verifying);
    assert!(d.actions.is_empty());
    n.agent().current_system = Some(SYS2.into());
    n.node.ready = false;
    let d = n.step(false, None, at(41));
    assert_eq!(n.phase(), Phase::Verifying);
    assert!(d.actions.is_empty(), "never uncordon before Ready");
    n.node.ready = true;
    let d = n.step(false, None, at(42));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    assert!(
        n.status.slot.is_some(),
        "slot kept until the uncordon is observed"
    );
    assert_eq!(n.status.revision.as_deref(), Some(REV2));
    assert_eq!(n.status.system.as_deref(), Some(SYS2));
    assert!(n.status.activation.is_none());
    let h = &n.status.history[0];
    assert_eq!((h.result.as_str(), h.rebooted), ("Succeeded", false));
    let d = n.step(false, None, at(43));
    assert!(d.actions.is_empty());
    assert!(n.status.slot.is_none());
    assert_eq!(n.cond(condition::UP_TO_DATE).status, "True");
}

#[test]
fn uncordon_is_repeated_after_a_lost_action() {
    let mut n = mk_activating("n1", false);
    n.report_switched();
    let d = decide(&n.view(), false, None, &Policy::default(), at(40));
    // The controller crashed after writing status, before uncordoning.
    let agent = n.status.agent.take();
    n.status = d.status;
    n.status.agent = agent;
    let d = n.step(false, None, at(50));
    assert_eq!(d.actions, vec![Action::Uncordon]);
    n.step(false, None, at(51));
    assert!(n.status.slot.is_none());
}

#[test]
fn boot_path_reboots_verifies_boot_id_and_booted_system() {
    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::RebootRequested);
    n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Rebooting);
    let d = n.step(false, None, at(50));
    assert_eq!(n.phase(), Phase::Rebooting);
    assert!(d.actions.is_empty());
    // Node comes back with a new boot id; the agent has not reported yet.
    n.node.boot_id = Some("boot-2".into());
    n.step(false, None, at(60));
    assert_eq!(n.phase(), Phase::Verifying);
    // The agent's stale report (old boot) must not be mistaken for a fallback.
    n.step(false, None, at(61));
    assert_eq!(n.phase(), Phase::Verifying);
    *n.agent() = AgentStatus {
        activation: n.agent().activation.clone(),
        staged: n.agent().staged.clone(),
        ..mk_agent_running(SYS2, "boot-2")
    };
    let d = n.step(false, None, at(70));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    assert!(n.status.history[0].rebooted);
}

#[test]
fn bootloader_fallback_is_booted_wrong_system_and_stays_cordoned() {
    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::RebootRequested);
    n.step(false, None, at(40));
    n.node.boot_id = Some("boot-2".into());
    n.agent().boot_id = Some("boot-2".into()); // booted SYS1 again
    let d = n.step(false, None, at(60));
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty());
    assert!(n.node.unschedulable);
    assert!(n.status.slot.is_some(), "slot kept: still counts");
    assert_eq!(
        n.status.failed.as_ref().unwrap().reason,
        reason::BOOTED_WRONG_SYSTEM
    );
    assert_eq!(n.status.failed.as_ref().unwrap().system.as_deref(), Some(SYS2));
    let d = n.step(false, None, at(600));
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty());
}

/// A node whose `Boot` grant booted SYS2 once (report with `bootOnce`), back from the reboot
/// with the agent reporting `booted` from boot-2.
fn mk_booted_once(booted: &str) -> N {
    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::RebootRequested);
    n.agent().activation.as_mut().unwrap().boot_once = Some("systemd-boot nixos-generation-8.conf".into());
    n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Rebooting);
    n.node.boot_id = Some("boot-2".into());
    let r = n.agent().activation.clone().map(|mut r| {
        r.state = ActivationState::Rebooted;
        r
    });
    *n.agent() = AgentStatus {
        activation: r,
        staged: n.agent().staged.clone(),
        ..mk_agent_running(booted, "boot-2")
    };
    n
}

#[test]
fn booted_once_is_verified_then_blessed_then_uncordoned() {
    let mut n = mk_booted_once(SYS2);
    let d = n.step(false, None, at(60));
    assert_eq!(n.phase(), Phase::Verifying);
    assert_eq!(d.rows, vec![Row::Rebooted, Row::BlessGranted]);
    assert!(d.actions.is_empty(), "no uncordon before the bless: {d:?}");
    let g = n.status.activation.clone().unwrap();
    assert_eq!(g.action, ActivationAction::Bless);
    assert_eq!(g.system, SYS2);
    assert_eq!(g.boot_id_before.as_deref(), Some("boot-2"));
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::BLESSING);
    // Idempotent while the agent works on it.
    let d = n.step(false, None, at(61));
    assert_eq!(d.rows, vec![Row::VerifyingWait]);
    assert_eq!(n.status.activation.as_ref().unwrap().id, g.id);
    n.agent().activation = Some(mk_report(
        &g.id,
        ActivationAction::Bless,
        ActivationState::Blessed,
        SYS2,
    ));
    let d = n.step(false, None, at(62));
    assert_eq!(d.rows, vec![Row::Blessed]);
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    assert!(n.status.history[0].rebooted);
}

#[test]
fn a_one_time_boot_that_came_back_on_the_old_default_is_rolled_back() {
    let mut n = mk_booted_once(SYS1);
    let d = n.step(false, None, at(60));
    assert_eq!(d.rows, vec![Row::Rebooted, Row::RolledBack]);
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty());
    assert!(n.node.unschedulable, "stays cordoned");
    assert!(n.status.slot.is_some(), "keeps its slot: halts the rollout");
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::ROLLED_BACK);
    assert_eq!(n.cond(condition::DEGRADED).reason, reason::ROLLED_BACK);
    // A retry proceeds as after any failure.
    n.retry = Some("1".into());
    let d = n.step(false, None, at(700));
    assert_eq!(d.rows[0], Row::RetryRequested);
}

#[test]
fn a_reboot_before_the_bless_is_reported_not_repeated() {
    let mut n = mk_booted_once(SYS2);
    n.step(false, None, at(60));
    let g = n.status.activation.clone().unwrap();
    // Power cut before the agent blessed: the default (SYS1) boots.
    n.node.boot_id = Some("boot-3".into());
    n.agent().boot_id = Some("boot-3".into());
    n.agent().booted_system = Some(SYS1.into());
    n.agent().current_system = Some(SYS1.into());
    let d = n.step(false, None, at(70));
    assert_eq!(d.rows, vec![Row::RebootedBeforeBless]);
    assert_eq!(n.phase(), Phase::Degraded);
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::ROLLED_BACK);
    assert!(n.status.failed.as_ref().unwrap().message.contains(&g.id));
    assert!(d.actions.is_empty());
    assert!(n.node.unschedulable);
    // Nothing new is granted.
    let d = n.step(false, None, at(800));
    assert_eq!(d.rows, vec![Row::DegradedHeld]);
    assert_eq!(n.status.activation.as_ref().unwrap().id, g.id);
}

#[test]
fn a_reboot_before_the_bless_back_into_the_target_is_blessed_anew_and_a_failed_bless_degrades() {
    let mut n = mk_booted_once(SYS2);
    n.step(false, None, at(60));
    let g = n.status.activation.clone().unwrap();
    n.node.boot_id = Some("boot-3".into());
    n.agent().boot_id = Some("boot-3".into());
    let d = n.step(false, None, at(70));
    assert_eq!(d.rows, vec![Row::BlessGranted]);
    let g2 = n.status.activation.clone().unwrap();
    assert_ne!(g2.id, g.id);
    assert_eq!(g2.boot_id_before.as_deref(), Some("boot-3"));
    n.agent().activation = Some(mk_report(
        &g2.id,
        ActivationAction::Bless,
        ActivationState::Failed,
        SYS2,
    ));
    let d = n.step(false, None, at(71));
    assert_eq!(d.rows, vec![Row::BlessFailed]);
    assert_eq!(
        n.status.failed.as_ref().unwrap().reason,
        reason::ACTIVATION_FAILED
    );
    assert!(n.node.unschedulable);
}

#[test]
fn a_bless_that_never_comes_times_out() {
    let mut n = mk_booted_once(SYS2);
    n.step(false, None, at(60));
    let d = n.step(
        false,
        None,
        at(60 + Policy::default().timeouts.verifying.as_secs() + 1),
    );
    assert_eq!(d.rows, vec![Row::VerifyTimeout]);
    assert_eq!(n.phase(), Phase::Degraded);
}

#[test]
fn activation_failure_degrades_and_keeps_cordon() {
    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::Failed);
    let d = n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty());
    assert!(n.node.unschedulable);
    assert_eq!(n.cond(condition::DEGRADED).reason, reason::ACTIVATION_FAILED);
}

#[test]
fn report_for_another_grant_is_ignored() {
    let mut n = mk_activating("n1", true);
    n.agent().activation = Some(mk_report(
        "old-id",
        ActivationAction::Boot,
        ActivationState::Failed,
        SYS2,
    ));
    n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Activating);
}

#[test]
fn activation_reboot_and_verify_timeouts() {
    let mut n = mk_activating("n1", true);
    n.step(false, None, at(30 + 899));
    assert_eq!(n.phase(), Phase::Activating);
    n.step(false, None, at(30 + 900));
    assert_eq!(
        n.status.failed.as_ref().unwrap().reason,
        reason::ACTIVATION_TIMEOUT
    );

    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::RebootRequested);
    n.step(false, None, at(40));
    n.step(false, None, at(40 + 900));
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::REBOOT_TIMEOUT);

    let mut n = mk_activating("n1", false);
    n.report(ActivationAction::Switch, ActivationState::Switched);
    n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Verifying);
    let d = n.step(false, None, at(40 + 599));
    assert_eq!(d.requeue_after, Some(secs(1)));
    n.step(false, None, at(40 + 600));
    assert_eq!(n.phase(), Phase::Degraded);
    assert_eq!(n.status.failed.as_ref().unwrap().reason, reason::VERIFY_TIMEOUT);
    assert!(n.node.unschedulable);
}

#[test]
fn a_running_switch_gets_the_agents_verdict_before_the_activation_timeout() {
    // Granted at 30 s; the agent reports the switch running.
    let mut n = mk_activating("n1", false);
    n.report(ActivationAction::Switch, ActivationState::Running);
    let d = n.step(false, None, at(30 + 900));
    assert_eq!(
        n.phase(),
        Phase::Activating,
        "still running: not declared dead at 15 min"
    );
    assert!(n.status.failed.is_none());
    assert!(
        d.requeue_after.is_some_and(|r| r <= secs(900)),
        "{:?}",
        d.requeue_after
    );
    // The agent's own timeout stopped the switch: its verdict, with its message, decides.
    n.report(ActivationAction::Switch, ActivationState::Failed);
    n.step(false, None, at(30 + 905));
    let failed = n.status.failed.as_ref().unwrap();
    assert_eq!(failed.reason, reason::ACTIVATION_FAILED);
    assert!(n.node.unschedulable, "a failed activation keeps the cordon");

    // A switch that still runs at twice the timeout (a hung agent or host) is a timeout.
    let mut n = mk_activating("n1", false);
    n.report(ActivationAction::Switch, ActivationState::Running);
    n.step(false, None, at(30 + 1799));
    assert_eq!(n.phase(), Phase::Activating);
    n.step(false, None, at(30 + 1800));
    assert_eq!(n.phase(), Phase::Degraded);
    let failed = n.status.failed.as_ref().unwrap();
    assert_eq!(failed.reason, reason::ACTIVATION_TIMEOUT);
    assert!(
        failed.message.contains("still reports it running"),
        "{}",
        failed.message
    );

    // No report at all: the timeout counts from the grant, once.
    let mut n = mk_activating("n1", false);
    n.step(false, None, at(30 + 900));
    let failed = n.status.failed.as_ref().unwrap();
    assert_eq!(failed.reason, reason::ACTIVATION_TIMEOUT);
    assert!(failed.message.contains("never reported"), "{}", failed.message);
}

#[test]
fn reboot_policy_selects_action() {
    let mut n = mk_waiting("n1", false);
    n.spec.reboot = RebootPolicy::Always;
    n.step(true, None, at(20));
    n.step(false, Some(&drained()), at(30));
    assert_eq!(
        n.status.activation.as_ref().unwrap().action,
        ActivationAction::Boot
    );

    let mut n = mk_waiting("n1", true);
    n.spec.reboot = RebootPolicy::Never;
    n.step(true, None, at(20));
    n.step(false, Some(&drained()), at(30));
    assert_eq!(
        n.status.activation.as_ref().unwrap().action,
        ActivationAction::Switch
    );
}

#[test]
fn exit_100_with_if_needed_grants_a_new_boot_activation() {
    let mut n = mk_activating("n1", false);
    let id = n.report(ActivationAction::Switch, ActivationState::NeedsReboot);
    let d = n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Activating);
    let g = n.status.activation.clone().unwrap();
    assert_ne!(g.id, id);
    assert_eq!(g.action, ActivationAction::Boot);
    assert_eq!(g.granted_at, Time(at(40)));
    assert!(d.notes.iter().any(|x| x.reason == reason::REBOOT_NEEDED));
    // Re-running on the new status does not grant again.
    let d2 = n.step(false, None, at(41));
    assert_eq!(grant_id(&n), g.id);
    assert!(d2.actions.is_empty());
}

#[test]
fn exit_100_with_never_finishes_with_reboot_required() {
    let mut n = mk_waiting("n1", true);
    n.spec.reboot = RebootPolicy::Never;
    n.step(true, None, at(20));
    n.step(false, Some(&drained()), at(30));
    n.report(ActivationAction::Switch, ActivationState::NeedsReboot);
    let d = n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    let c = n.cond(condition::REBOOT_REQUIRED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reason::REBOOT_POLICY_NEVER)
    );
    assert!(d.notes.iter().any(|x| x.reason == reason::REBOOT_REQUIRED));
    // A person reboots: the condition clears.
    *n.agent() = mk_agent_running(SYS2, "boot-9");
    n.step(false, None, at(100));
    assert_eq!(n.cond(condition::REBOOT_REQUIRED).status, "False");
}

#[test]
fn never_with_live_switch_and_kernel_change_sets_reboot_required() {
    let mut n = mk_waiting("n1", true);
    n.spec.reboot = RebootPolicy::Never;
    n.step(true, None, at(20));
    n.step(false, Some(&drained()), at(30));
    n.report_switched();
    n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(n.cond(condition::REBOOT_REQUIRED).status, "True");
}

// ---- failure memory, retry ------------------------------------------------------------------

fn mk_degraded_fallback() -> N {
    let mut n = mk_activating("n1", true);
    n.report(ActivationAction::Boot, ActivationState::RebootRequested);
    n.step(false, None, at(40));
    n.node.boot_id = Some("boot-2".into());
    n.agent().boot_id = Some("boot-2".into());
    n.step(false, None, at(60));
    assert_eq!(n.phase(), Phase::Degraded);
    n
}

#[test]
fn retry_annotation_restarts_from_staging_once() {
    let mut n = mk_degraded_fallback();
    n.retry = Some("a".into());
    n.step(false, None, at(100));
    // Staged already → straight to Waiting, holding its slot (no second staging).
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(n.status.failed.is_none());
    assert_eq!(n.status.retry_token.as_deref(), Some("a"));
    assert!(n.status.slot.is_some(), "still cordoned: keeps its slot");
    // Re-admitted, it drains without a new cordon.
    let d = n.step(true, None, at(110));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(d.actions, vec![Action::Evict]);
    assert!(n.status.slot.as_ref().unwrap().cordoned_by_nixroll);
}

#[test]
fn same_retry_token_does_not_retry_again() {
    let mut n = mk_degraded_fallback();
    n.retry = Some("a".into());
    n.status.retry_token = Some("a".into());
    n.step(false, None, at(100));
    assert_eq!(n.phase(), Phase::Degraded);
}

#[test]
fn spec_change_clears_failure() {
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    n.agent().last_error = Some(mk_stage_error("x", 1));
    n.step(false, None, at(2));
    assert_eq!(n.phase(), Phase::Degraded);
    n.step(false, None, at(3));
    assert_eq!(n.phase(), Phase::Degraded, "not retried without a spec change");
    n.spec.suspend = true;
    n.generation = 3;
    n.step(false, None, at(3));
    assert_eq!(
        n.phase(),
        Phase::Degraded,
        "an unrelated spec edit does not retry"
    );
    n.spec.suspend = false;
    n.spec = mk_spec("3333333333333333333333333333333333333333");
    n.generation = 4;
    n.step(false, None, at(4));
    assert_eq!(n.phase(), Phase::Staging);
    assert!(n.status.failed.is_none());
}

// ---- bookkeeping -----------------------------------------------------------------------------

#[test]
fn decide_is_idempotent_on_same_inputs() {
    let mut n = mk_waiting("n1", true);
    let a = decide(&n.view(), true, None, &Policy::default(), at(20));
    let b = decide(&n.view(), true, None, &Policy::default(), at(20));
    assert_eq!(a, b);
    n.step(true, None, at(20));
    n.step(false, Some(&drained()), at(30));
    let id = grant_id(&n);
    for k in 0..5 {
        let d = n.step(false, Some(&drained()), at(31 + k));
        assert_eq!(grant_id(&n), id, "never a second grant for the same step");
        assert!(d.actions.is_empty());
    }
}

#[test]
fn transition_times_change_only_on_change() {
    let mut n = mk_node("n1");
    n.step(false, None, at(0));
    let c0 = n.cond(condition::PROGRESSING).last_transition_time.clone();
    n.agent().staged = Some(mk_staged(REV2, "n1", SYS2, false));
    n.step(false, None, at(5));
    assert_eq!(n.status.last_transition_time, Some(Time(at(5))));
    n.step(false, None, at(9));
    assert_eq!(n.status.last_transition_time, Some(Time(at(5))));
    assert_eq!(n.cond(condition::PROGRESSING).last_transition_time, c0);
}

#[test]
fn history_is_bounded() {
    let mut n = mk_node("n1");
    for k in 0..15i64 {
        let rev = format!("{:040x}", k + 100);
        n.spec = mk_spec(&rev);
        n.generation += 1;
        n.step(false, None, at(k * 10));
        n.agent().staged = Some(mk_staged(&rev, "n1", SYS1, false));
        n.step(false, None, at(k * 10 + 1));
        assert_eq!(n.phase(), Phase::UpToDate);
    }
    assert_eq!(n.status.history.len(), HISTORY_LIMIT);
    assert_eq!(n.status.history[0].revision, format!("{:040x}", 114));
}

#[test]
fn missing_node_does_nothing_disruptive() {
    let mut n = mk_waiting("n1", false);
    n.node.exists = false;
    let d = n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Waiting);
    assert!(d.actions.is_empty());
    assert!(n.status.message.as_ref().unwrap().contains("does not exist"));
}

// ---- admit -----------------------------------------------------------------------------------

fn names(v: Vec<String>) -> Vec<String> {
    v
}

fn admit_all(ns: &[N], cluster: &ClusterState, policy: &Policy) -> Vec<String> {
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    names(admit(&views, cluster, policy, at(20)))
}

fn pol(max: MaxUnavailable) -> Policy {
    Policy {
        max_unavailable: max,
        ..Default::default()
    }
}

#[test]
fn admit_respects_count_budget_and_order() {
    let ns: Vec<N> = ["c", "a", "b"].iter().map(|x| mk_waiting(x, false)).collect();
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &Policy::default()),
        vec!["a"]
    );
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &pol(MaxUnavailable::Count(2))),
        vec!["a", "b"]
    );
}

#[test]
fn admit_percent_rounds_down_min_one() {
    assert_eq!(budget(MaxUnavailable::Percent(10), 5), 1);
    assert_eq!(budget(MaxUnavailable::Percent(50), 5), 2);
    assert_eq!(budget(MaxUnavailable::Percent(25), 1000), 250);
    let ns: Vec<N> = (0..10).map(|i| mk_waiting(&format!("n{i}"), false)).collect();
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &pol(MaxUnavailable::Percent(20))).len(),
        2
    );
}

#[test]
fn admin_cordoned_and_not_ready_nodes_count_against_budget() {
    let mut ns: Vec<N> = (0..4).map(|i| mk_waiting(&format!("n{i}"), false)).collect();
    ns[3].status = NixOSNodeStatus::default();
    ns[3].node.unschedulable = true; // admin cordon on an idle node
    let p = pol(MaxUnavailable::Count(2));
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["n0"]);
    ns[2].node.ready = false;
    assert!(admit_all(&ns, &ClusterState::default(), &p).is_empty());
}

#[test]
fn disruptive_and_slot_holding_nodes_count() {
    let mut ns: Vec<N> = (0..3).map(|i| mk_waiting(&format!("n{i}"), false)).collect();
    ns[0].step(true, None, at(20));
    assert!(admit_all(&ns, &ClusterState::default(), &Policy::default()).is_empty());
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &pol(MaxUnavailable::Count(2))),
        vec!["n1"]
    );
}

#[test]
fn control_plane_one_at_a_time_and_not_while_another_is_unready() {
    let mut ns: Vec<N> = ["w1", "cp1", "cp2"]
        .iter()
        .map(|x| mk_waiting(x, false))
        .collect();
    ns[1].node.control_plane = true;
    ns[2].node.control_plane = true;
    let p = pol(MaxUnavailable::Count(3));
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["w1", "cp1"]);
    ns[2].node.ready = false;
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["w1"]);
    ns[2].node.ready = true;
    ns[2].node.unschedulable = true;
    // cp2 is cordoned by an admin: cp1 must wait; cp2 itself may go (no *other* cp is busy).
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["w1", "cp2"]);
    ns[1].node.ready = false;
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["w1"]);
}

#[test]
fn pause_suspend_window_backoff_exclude() {
    let mut ns: Vec<N> = (0..4).map(|i| mk_waiting(&format!("n{i}"), false)).collect();
    let p = pol(MaxUnavailable::Count(4));
    assert!(
        admit_all(
            &ns,
            &ClusterState {
                paused: true,
                ..ClusterState::default()
            },
            &p
        )
        .is_empty()
    );
    ns[0].spec.suspend = true;
    ns[1].spec.maintenance_windows = vec![MaintenanceWindow {
        days: vec![Weekday::Sun],
        start: "01:00".into(),
        end: "02:00".into(),
        time_zone: "Europe/Berlin".into(),
    }];
    ns[2].status.backoff = Some(crate::api::Backoff {
        attempts: 1,
        not_before: Time(at(60)),
    });
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p), vec!["n3"]);
}

#[test]
fn failure_threshold_halts_admission() {
    let mut ns: Vec<N> = (0..3).map(|i| mk_waiting(&format!("n{i}"), false)).collect();
    ns[0].status.phase = Some(Phase::Degraded);
    let p = pol(MaxUnavailable::Count(3));
    assert!(admit_all(&ns, &ClusterState::default(), &p).is_empty());
    let p2 = Policy {
        failure_threshold: 2,
        ..p
    };
    assert_eq!(admit_all(&ns, &ClusterState::default(), &p2), vec!["n1", "n2"]);
}

#[test]
fn slot_holder_is_readmitted_without_extra_budget() {
    let mut ns = vec![mk_degraded_fallback(), mk_waiting("n2", false)];
    ns[0].retry = Some("go".into());
    ns[0].step(false, None, at(100));
    assert_eq!(ns[0].phase(), Phase::Waiting);
    // n1 holds the slot (and is cordoned): budget 1 is used by it, it alone may go on.
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &Policy::default()),
        vec!["n1"]
    );
}

#[test]
fn nothing_is_admitted_while_any_node_is_still_staging() {
    let mut ns: Vec<N> = ["a", "b"].iter().map(|x| mk_waiting(x, false)).collect();
    ns.push(mk_node("c"));
    ns[2].status.phase = Some(Phase::Staging);
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &Policy::default()),
        Vec::<String>::new()
    );
    ns[2].status.phase = Some(Phase::Waiting);
    assert_eq!(
        admit_all(&ns, &ClusterState::default(), &Policy::default()),
        vec!["a"]
    );
}

/// The controller wrote the slot (nixroll will cordon) and crashed before cordoning; an admin
/// cordoned the node in that gap. The cordon carries no nixroll mark, so nixroll drains and
/// updates the node but leaves the admin's cordon in place.
#[test]
fn an_admin_cordon_made_before_nixroll_cordoned_is_left_in_place() {
    let mut n = mk_waiting("n1", false);
    let d = decide(&n.view(), true, None, &Policy::default(), at(20));
    assert!(d.actions.contains(&Action::Cordon));
    // Crash: status written, cordon never performed. The admin cordons (no mark).
    let agent = n.status.agent.take();
    n.status = d.status;
    n.status.agent = agent;
    assert!(n.status.slot.as_ref().unwrap().cordoned_by_nixroll);
    n.node.unschedulable = true;
    let d = n.step(false, Some(&drained()), at(30));
    assert!(!d.actions.contains(&Action::Cordon), "already cordoned");
    n.report_switched();
    for t in 40..45 {
        let d = n.step(false, None, at(t));
        assert!(!d.actions.contains(&Action::Uncordon), "{:?}", d);
    }
    assert_eq!(n.phase(), Phase::UpToDate);
    assert!(n.status.slot.is_none(), "slot released without an uncordon");
    assert!(n.node.unschedulable, "the admin's cordon stays");
}

/// nixroll uncordoned (mark removed with it); before the slot is dropped an admin cordons the
/// node. Without a mark that cordon is not nixroll's: the slot is dropped, the cordon stays.
#[test]
fn an_admin_cordon_right_after_nixroll_uncordoned_is_not_lifted() {
    let mut n = mk_waiting("n1", false);
    n.step(true, None, at(0));
    let p = DrainProgress {
        remaining: 2,
        ..Default::default()
    };
    let d = n.step(false, Some(&p), at(900));
    assert_eq!(d.actions, vec![Action::Uncordon]);
    assert!(n.status.slot.is_some());
    // The admin cordons before nixroll's next pass.
    n.node.unschedulable = true;
    let d = n.step(false, None, at(901));
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert!(n.status.slot.is_none());
    assert!(n.node.unschedulable);
}

// ---- re-admission, rows of the state table ----------------------------------------------------

/// The bug of issue 8: a retried node that holds its slot is listed by `admit`, and must then be
/// admitted (the controller used to require `status.slot.is_none()`).
#[test]
fn a_retried_node_holding_its_slot_is_admitted_and_drains_again() {
    let mut ns = vec![mk_degraded_fallback(), mk_waiting("n2", false)];
    ns[0].retry = Some("go".into());
    let d = ns[0].step(false, None, at(100));
    assert_eq!(d.rows, vec![Row::RetryRequested, Row::Staged, Row::WaitingHeld]);
    assert!(ns[0].status.slot.is_some());
    let admissible = admit_all(&ns, &ClusterState::default(), &Policy::default());
    assert!(is_admitted(&ns[0].view(), &admissible), "{admissible:?}");
    assert!(!is_admitted(&ns[1].view(), &admissible), "no budget left for n2");
    let admitted = is_admitted(&ns[0].view(), &admissible);
    let d = ns[0].step(admitted, None, at(110));
    assert_eq!(d.rows, vec![Row::Readmitted]);
    assert_eq!(ns[0].phase(), Phase::Draining);
    // Only Waiting nodes are admitted, whatever the list says.
    let mut up = mk_node("n3");
    up.spec = mk_spec(REV1);
    assert!(!is_admitted(&up.view(), &["n3".to_string()]));
}

#[test]
fn decide_reports_the_rows_it_took() {
    let mut n = mk_node("n1");
    assert_eq!(
        n.step(false, None, at(0)).rows,
        vec![Row::NewRevision, Row::StagingWait]
    );
    n.agent().staged = Some(mk_staged(REV2, "n1", SYS2, false));
    // Staged and admitted in one pass.
    let d = n.step(true, None, at(10));
    assert_eq!(d.rows, vec![Row::Staged, Row::Admitted]);
    assert_eq!(n.step(false, None, at(11)).rows, vec![Row::DrainPass]);
    assert_eq!(n.step(false, Some(&drained()), at(12)).rows, vec![Row::Drained]);
    assert_eq!(n.step(false, None, at(13)).rows, vec![Row::ActivatingWait]);
    n.report(ActivationAction::Switch, ActivationState::Switched);
    n.agent().current_system = Some(SYS2.into());
    let d = n.step(false, None, at(14));
    assert_eq!(d.rows, vec![Row::Switched, Row::Verified]);
    assert_eq!(d.actions, vec![Action::Uncordon]);
    // The uncordon is observed: the slot goes.
    let d = n.step(false, None, at(15));
    assert_eq!(d.rows, vec![Row::UpToDateReleaseSlot, Row::UpToDateIdle]);
    assert!(n.status.slot.is_none());
    n.node.exists = false;
    assert_eq!(n.step(false, None, at(16)).rows, vec![Row::NodeMissing]);
}

#[test]
fn row_names_are_unique_and_described() {
    let mut seen = std::collections::HashSet::new();
    for r in Row::ALL {
        assert!(seen.insert(r.name()), "{r} twice");
        assert!(!r.description().is_empty());
        assert_eq!(r.to_string(), r.name());
    }
}

/// The state table of `docs/rollout.md` lists exactly the rows `decide` can report, in order.
#[test]
fn state_table_in_docs_lists_every_row() {
    let doc = include_str!("../../docs/rollout.md");
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("State machine"))
        .expect("a \"State machine\" section in docs/rollout.md");
    let mut lines = section.lines().skip_while(|l| !l.starts_with('|'));
    let header = lines.next().expect("a table");
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    assert_eq!(
        cells(header)[0],
        "row",
        "the first column names the row: {header}"
    );
    let ids: Vec<String> = lines
        .take_while(|l| l.starts_with('|'))
        .skip(1) // the --- line
        .map(|l| {
            let id = cells(l)[0].clone();
            assert!(
                id.len() > 2 && id.starts_with('`') && id.ends_with('`'),
                "row without an identifier: {l}"
            );
            id.trim_matches('`').to_string()
        })
        .collect();
    let names: Vec<String> = Row::ALL.iter().map(|r| r.name().to_string()).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !ids.contains(n)).collect();
    let unknown: Vec<&String> = ids.iter().filter(|n| !names.contains(n)).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "rows not in docs/rollout.md: {missing:?}; rows in the docs that Row lacks: {unknown:?}"
    );
    assert_eq!(ids, names, "the table lists the rows in the order of Row::ALL");
}

// ---- secrets ---------------------------------------------------------------------------------

fn mk_missing(name: &str) -> crate::api::MissingSecret {
    crate::api::MissingSecret {
        path: "/var/lib/secrets/token".into(),
        secret_ref: crate::api::SecretKeyRef {
            name: name.into(),
            key: "token".into(),
        },
        reason: "SecretNotFound".into(),
        message: format!("Secret {name} not found in nixroll-system"),
    }
}

#[test]
fn missing_secrets_block_admission_and_activation_until_present() {
    // Waiting: not a candidate, not started even when admitted; SecretsMissing names it.
    let mut n = mk_waiting("n1", true);
    n.agent().secrets_missing = vec![mk_missing("k3s-token")];
    let p = pol(MaxUnavailable::Count(1));
    assert!(admit_all(std::slice::from_ref(&n), &ClusterState::default(), &p).is_empty());
    let d = n.step(true, None, at(20));
    assert_eq!(n.phase(), Phase::Waiting, "{d:?}");
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert!(
        d.notes
            .iter()
            .any(|x| x.reason == reason::SECRETS_MISSING && x.warning)
    );
    let c = n.cond(condition::SECRETS_MISSING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reason::SECRETS_MISSING)
    );
    assert!(
        c.message.contains("/var/lib/secrets/token") && c.message.contains("k3s-token"),
        "{}",
        c.message
    );
    assert!(n.status.message.as_deref().unwrap().contains("k3s-token"));
    // Still missing: no second Event.
    let d = n.step(true, None, at(25));
    assert!(d.notes.iter().all(|x| x.reason != reason::SECRETS_MISSING));
    // The Secret appears: admitted, drained, granted; the condition turns False.
    n.agent().secrets_missing.clear();
    assert_eq!(
        admit_all(std::slice::from_ref(&n), &ClusterState::default(), &p),
        vec!["n1"]
    );
    n.step(true, None, at(30));
    assert_eq!(n.phase(), Phase::Draining);
    assert_eq!(n.cond(condition::SECRETS_MISSING).status, "False");
    // Missing again after the drain: no grant until it is back.
    n.agent().secrets_missing = vec![mk_missing("k3s-token")];
    let d = n.step(false, Some(&drained()), at(40));
    assert_eq!(n.phase(), Phase::Draining, "{d:?}");
    assert!(n.status.activation.is_none());
    n.agent().secrets_missing.clear();
    n.step(false, Some(&drained()), at(50));
    assert_eq!(n.phase(), Phase::Activating);
    assert!(n.status.activation.is_some());
}

#[test]
fn no_secrets_condition_unless_secrets_went_missing() {
    let n = mk_activating("n1", false);
    assert!(
        n.status
            .conditions
            .iter()
            .all(|c| c.type_ != condition::SECRETS_MISSING)
    );
}

// ---- Pools (src/rollout/pools.rs) ----

mod pools;

// ---- post-gates ------------------------------------------------------------------------------

/// A node on the switch path that runs SYS2 and is Ready: verified at `at(40)` unless a
/// post-gate holds it.
fn mk_switched() -> N {
    let mut n = mk_activating("n1", false);
    n.report_switched();
    n
}

fn gate(name: &str, timeout: i64, verdict: GateVerdict) -> GateObservation {
    GateObservation {
        name: name.into(),
        timeout: secs(timeout),
        verdict,
    }
}

#[test]
fn post_gates_hold_the_slot_until_they_pass_after_verification() {
    let mut n = mk_switched();
    // Passed before the node was verified: says nothing about the node after its update.
    n.node.post_gates = vec![
        gate("volumes", 600, GateVerdict::Pass { at: at(39) }),
        gate(PODS_GATE, 600, GateVerdict::Unknown),
    ];
    let d = n.step(false, None, at(40));
    assert_eq!(n.phase(), Phase::Verifying);
    assert_eq!(d.rows, vec![Row::Switched, Row::PostGateWait]);
    assert!(d.actions.is_empty(), "no uncordon while post-gates block: {d:?}");
    assert_eq!(n.status.slot.as_ref().unwrap().verified_at, Some(Time(at(40))));
    assert!(
        n.status.message.as_deref().unwrap().contains("volumes"),
        "{:?}",
        n.status.message
    );
    assert_eq!(n.cond(condition::PROGRESSING).reason, reason::POST_GATES);
    assert!(d.requeue_after.unwrap() <= POST_GATE_RECHECK);
    // One passes, the other blocks: still waiting, verifiedAt kept.
    n.node.post_gates = vec![
        gate("volumes", 600, GateVerdict::Pass { at: at(45) }),
        gate(
            PODS_GATE,
            600,
            GateVerdict::Block {
                at: at(45),
                why: "kube-proxy not Ready".into(),
            },
        ),
    ];
    let d = n.step(false, None, at(46));
    assert_eq!(d.rows, vec![Row::PostGateWait]);
    assert!(n.status.message.as_deref().unwrap().contains("kube-proxy"));
    assert_eq!(n.status.slot.as_ref().unwrap().verified_at, Some(Time(at(40))));
    // Both pass: done, uncordoned.
    n.node.post_gates[1].verdict = GateVerdict::Pass { at: at(50) };
    let d = n.step(false, None, at(51));
    assert_eq!(d.rows, vec![Row::Verified]);
    assert_eq!(n.phase(), Phase::UpToDate);
    assert_eq!(d.actions, vec![Action::Uncordon]);
}

#[test]
fn a_post_gate_that_times_out_degrades_the_node_and_keeps_it_cordoned() {
    let mut n = mk_switched();
    n.node.post_gates = vec![
        gate(
            "fast",
            30,
            GateVerdict::Block {
                at: at(40),
                why: "alert firing".into(),
            },
        ),
        gate("slow", 600, GateVerdict::Unknown),
    ];
    n.step(false, None, at(40));
    // Flaps: passes, then blocks again before the other gate passed.
    n.node.post_gates[0].verdict = GateVerdict::Pass { at: at(50) };
    let d = n.step(false, None, at(51));
    assert_eq!(d.rows, vec![Row::PostGateWait]);
    n.node.post_gates[0].verdict = GateVerdict::Block {
        at: at(60),
        why: "alert firing".into(),
    };
    let d = n.step(false, None, at(69));
    assert_eq!(d.rows, vec![Row::PostGateWait]);
    assert_eq!(n.phase(), Phase::Verifying);
    let d = n.step(false, None, at(70));
    assert_eq!(d.rows, vec![Row::PostGateFailed]);
    assert_eq!(n.phase(), Phase::Degraded);
    assert!(d.actions.is_empty(), "stays cordoned: {d:?}");
    assert!(n.status.slot.is_some(), "holds its slot");
    let f = n.status.failed.as_ref().unwrap();
    assert_eq!(f.reason, reason::GATE_FAILED);
    assert!(
        f.message.contains("fast") && f.message.contains("alert firing"),
        "{}",
        f.message
    );
    assert_eq!(n.cond(condition::DEGRADED).reason, reason::GATE_FAILED);
    // A Node that flaps while waiting for post-gates gets the verify timeout anew.
    let mut m = mk_switched();
    m.node.post_gates = vec![gate("slow", 3600, GateVerdict::Unknown)];
    m.step(false, None, at(40));
    m.node.ready = false;
    let d = m.step(false, None, at(40 + 599));
    assert_eq!(d.rows, vec![Row::VerifyingWait], "{d:?}");
}

#[test]
fn the_k3s_gate_waits_for_a_healthy_etcd_voter_and_blocks_other_servers() {
    let mut n = mk_switched();
    n.node.control_plane = true;
    n.node.etcd_voter = Some(false);
    let d = n.step(false, None, at(40));
    assert_eq!(d.rows, vec![Row::Switched, Row::PostGateWait]);
    assert!(n.status.message.as_deref().unwrap().contains(K3S_GATE));
    n.node.etcd_voter = Some(true);
    let d = n.step(false, None, at(45));
    assert_eq!(d.rows, vec![Row::Verified]);
    // A server without the condition (no embedded etcd) has no k3s gate.
    let mut m = mk_switched();
    m.node.control_plane = true;
    assert_eq!(
        m.step(false, None, at(40)).rows,
        vec![Row::Switched, Row::Verified]
    );
    // Admission: no server while another server is not a healthy voter, though it is Ready.
    let mut ns: Vec<N> = ["cp1", "cp2"].iter().map(|x| mk_waiting(x, false)).collect();
    for x in &mut ns {
        x.node.control_plane = true;
    }
    ns[1].node.etcd_voter = Some(false);
    let two = Policy {
        max_unavailable: MaxUnavailable::Count(2),
        ..Policy::default()
    };
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    // cp1 may not go while cp2 is not a healthy voter (cp2 itself may: it is the one behind).
    assert_eq!(admit(&views, &ClusterState::default(), &two, at(20)), vec!["cp2"]);
    ns[1].node.etcd_voter = Some(true);
    let views: Vec<NodeView<'_>> = ns.iter().map(|n| n.view()).collect();
    assert_eq!(admit(&views, &ClusterState::default(), &two, at(20)), vec!["cp1"]);
}
