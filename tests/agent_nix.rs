//! The agent's host logic against REAL Nix (a private store per test inside a simulated host
//! root) and real test flakes in git repositories. Skips when `nix` is not installed (fails under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::host::{HostRoot, activate, grant, installed_host, stage};
use nixroll::agent::node::{CrashPoint, HostOptions, NodeError};
use nixroll::api::{ActivationAction, ActivationState, AgentStatus, HostOperation};
use nixroll::sim::host::BootFault;

const NODE: &str = "node-1";

fn state_of(st: &AgentStatus) -> ActivationState {
    st.activation.as_ref().expect("activation reported").state
}

#[tokio::test]
async fn stages_a_pinned_revision_without_touching_profile_or_boot() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let boot_id = f.sim.boot_id();
    let rev1 = f.flake.commit_kernel_change().unwrap();

    let mut agent = f.agent();
    let st = agent.reconcile(Some(&f.target(&rev1)), None).await.unwrap();

    let staged = st.staged.clone().expect("staged");
    assert_eq!(staged.revision, rev1);
    assert_eq!(staged.installable, f.target(&rev1).installable);
    assert_ne!(staged.system, sys0);
    assert!(
        staged
            .system
            .starts_with(&f.root().join("nix/store").display().to_string())
    );
    assert!(
        Path::new(&staged.system)
            .join("bin/switch-to-configuration")
            .exists()
    );
    assert!(staged.closure_bytes.unwrap() > 0);
    assert!(staged.reboot_required);
    assert_eq!(staged.reboot_reasons, vec!["kernel", "kernel-modules"]);
    assert!(st.last_error.is_none());

    // Pinned by a GC root owned by nixroll, registered with Nix as an indirect root.
    let root = f.root().join(format!("var/lib/nixroll/gcroots/system-{rev1}"));
    assert_eq!(std::fs::read_link(&root).unwrap(), Path::new(&staged.system));
    let registered: Vec<_> = std::fs::read_dir(f.root().join("nix/var/nix/gcroots/auto"))
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    assert!(registered.contains(&root), "{registered:?} lacks {root:?}");

    // Nothing the next boot or the running system depends on changed.
    assert_eq!(f.sim.profile_system().as_deref(), Some(sys0.as_str()));
    assert_eq!(st.profile_generation, Some(1));
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(st.current_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(st.boot_id.as_deref(), Some(boot_id.as_str()));
    assert_eq!(st.nixos_version.as_deref(), Some("24.05.1"));
    assert!(f.sim.switch_log().is_empty());

    // Same target again: nothing rebuilt, same answer. A superseding target keeps the old root
    // (keep_staged = 2: a revert needs no build); the one after it drops it.
    let again = agent.reconcile(Some(&f.target(&rev1)), None).await.unwrap();
    assert_eq!(again.staged, st.staged);
    let rev2 = f.flake.commit_service_change().unwrap();
    let st2 = agent.reconcile(Some(&f.target(&rev2)), None).await.unwrap();
    assert_eq!(st2.staged.unwrap().revision, rev2);
    assert!(root.exists(), "the previous target stays pinned");
    let rev3 = f.flake.commit_service_change().unwrap();
    let st3 = agent.reconcile(Some(&f.target(&rev3)), None).await.unwrap();
    assert_eq!(st3.staged.unwrap().revision, rev3);
    assert!(!root.exists(), "stale root beyond keep_staged was kept");
    assert!(
        f.root()
            .join(format!("var/lib/nixroll/gcroots/system-{rev2}"))
            .exists()
    );
}

#[tokio::test]
async fn a_service_only_change_needs_no_reboot() {
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_service_change().unwrap();
    let st = f.agent().reconcile(Some(&f.target(&rev1)), None).await.unwrap();
    let staged = st.staged.unwrap();
    assert_eq!(staged.revision, rev1);
    assert!(!staged.reboot_required, "reasons: {:?}", staged.reboot_reasons);
    assert!(staged.reboot_reasons.is_empty());
}

#[tokio::test]
async fn staging_failures_are_reported_and_leave_the_host_untouched() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev0 = f.flake.head().to_string();
    let mut agent = f.agent();

    let wrong = "0123456789abcdef0123456789abcdef01234567";
    let broken = f.flake.commit_broken_build().unwrap();
    let eval = f
        .flake
        .commit_eval_error("nixroll-test: this configuration is broken")
        .unwrap();
    let missing = f.flake.commit_without_host(NODE).unwrap();
    let cases = [
        (wrong, "Cannot find Git revision"),
        (broken.as_str(), "have the same priority"),
        (eval.as_str(), "nixroll-test: this configuration is broken"),
        (missing.as_str(), "does not provide attribute"),
    ];
    for (rev, expected) in cases {
        let st = agent.reconcile(Some(&f.target(rev)), None).await.unwrap();
        let err = st.last_error.expect("lastError reported");
        assert_eq!(err.operation, HostOperation::Stage);
        assert_eq!(err.revision.as_deref(), Some(rev));
        assert!(err.message.contains(expected), "{rev}: {:?}", err.message);
        assert!(err.message.len() <= 1000 * 4);
        assert!(!err.message.contains("--show-trace"), "{:?}", err.message);
        // still the old staged system; the host is as it was
        assert_eq!(st.staged.unwrap().revision, rev0);
        assert_eq!(f.sim.profile_system().as_deref(), Some(sys0.as_str()));
        assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
        assert_eq!(f.sim.current_system().as_deref(), Some(sys0.as_str()));
        assert!(
            !f.root()
                .join(format!("var/lib/nixroll/gcroots/system-{rev}"))
                .exists()
        );
    }
    // A good target afterwards stages and clears the error.
    f.flake
        .commit("fixed", |s| {
            s.broken_build = false;
            s.eval_error = None;
        })
        .unwrap();
    let good = f.flake.commit_hosts(&[NODE]).unwrap();
    let st = agent.reconcile(Some(&f.target(&good)), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    assert_eq!(st.staged.unwrap().revision, good);
}

#[tokio::test]
async fn a_failed_staging_is_retried_with_backoff() {
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_service_change().unwrap();
    let t = f.target(&rev1);
    let options = HostOptions {
        result_poll: Duration::from_millis(10),
        stage_retry: Duration::from_millis(300),
        ..Default::default()
    };
    let mut agent = f.agent_with(options);

    // The repository is unreachable for a while (a flaky remote).
    let away = f.flake.dir().with_extension("away");
    std::fs::rename(f.flake.dir(), &away).unwrap();
    let st = agent.reconcile(Some(&t), None).await.unwrap();
    let err = st.last_error.clone().expect("error reported");
    assert_eq!(err.operation, HostOperation::Stage);
    let retry = agent.next_retry().expect("a retry is scheduled");

    // Before the retry time: not tried again, same report.
    assert_eq!(agent.reconcile(Some(&t), None).await.unwrap(), st);
    // The same failure after the retry time keeps its timestamp (no needless status write).
    tokio::time::sleep_until(retry).await;
    let again = agent.reconcile(Some(&t), None).await.unwrap();
    assert_eq!(again.last_error, st.last_error);
    let retry2 = agent.next_retry().unwrap();
    assert!(retry2 - retry >= Duration::from_millis(500), "backoff doubles");

    // The remote is back: the next retry stages and clears the error.
    std::fs::rename(&away, f.flake.dir()).unwrap();
    tokio::time::sleep_until(retry2).await;
    let st = agent.reconcile(Some(&t), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    assert_eq!(st.staged.unwrap().revision, rev1);
    assert!(agent.next_retry().is_none());
}

#[tokio::test]
async fn switch_activates_live_once() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let boot_id = f.sim.boot_id();
    let rev1 = f
        .flake
        .commit("service change, with configurationRevision", |s| {
            s.service.push('+');
            s.nixos_version_revision = Some("0123abcd".into());
        })
        .unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let st = agent.reconcile(Some(&t), None).await.unwrap();
    assert_eq!(st.configuration_revision, None);
    let sys1 = st.staged.unwrap().system;

    let g = grant("g-1", ActivationAction::Switch, &sys1);
    let st = agent.reconcile(Some(&t), Some(&g)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Switched);
    assert_eq!(st.activation.as_ref().unwrap().id, "g-1");
    assert_eq!(st.activation.as_ref().unwrap().exit_code, Some(0));
    assert_eq!(st.profile_generation, Some(2));
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys1.as_str()));
    assert_eq!(f.sim.reboot_count(), 0);
    assert_eq!(f.sim.boot_id(), boot_id);
    assert_eq!(f.sim.switch_log(), vec![format!("switch {sys1}")]);
    // read from `<current>/sw/bin/nixos-version --json`, in the background: the report of the
    // switch did not wait for it; it comes with a later report.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = agent.observe().unwrap();
        if st.configuration_revision.as_deref() == Some("0123abcd") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "configurationRevision never came"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The same grant again (and a restarted agent): nothing is repeated.
    agent.reconcile(Some(&t), Some(&g)).await.unwrap();
    let st = f.agent().reconcile(Some(&t), Some(&g)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Switched);
    assert_eq!(f.sim.switch_log().len(), 1);
    assert_eq!(st.profile_generation, Some(2));
}

/// Boot once, bless later: the new system is installed as an entry, the old one stays the
/// default (profile and bootloader), the new one boots once; the bless makes it the default.
#[tokio::test]
async fn boot_installs_without_changing_the_default_boots_once_and_bless_makes_it_the_default() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let boot_id = f.sim.boot_id();
    let rev1 = f.flake.commit_kernel_change().unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let sys1 = stage(&mut agent, &t).await;

    let g = grant("g-boot", ActivationAction::Boot, &sys1);
    let st = agent.reconcile(Some(&t), Some(&g)).await.unwrap();
    assert_eq!(f.sim.reboot_count(), 1);
    // The new system's installer, then the old one's (which makes the old one the default again).
    assert_eq!(
        f.sim.switch_log(),
        vec![format!("boot {sys1}"), format!("boot {sys0}")]
    );
    assert_eq!(state_of(&st), ActivationState::Rebooted);
    let report = st.activation.clone().unwrap();
    assert_eq!(
        report.boot_once.as_deref(),
        Some("simulated /boot/oneshot-system")
    );
    assert_eq!(report.boot_id_before.as_deref(), Some(boot_id.as_str()));
    assert_ne!(st.boot_id.as_deref(), Some(boot_id.as_str()));
    // Booted the new system once; the old one is still the default, in the profile too.
    assert_eq!(st.booted_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(
        f.sim.boot_oneshot(),
        None,
        "the one-shot entry is consumed by the boot"
    );
    assert_eq!(st.default_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(st.profile_generation, Some(1));
    assert!(!st.staged.as_ref().unwrap().reboot_required);

    let st = f.agent().reconcile(Some(&t), Some(&g)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Rebooted);
    assert_eq!(f.sim.reboot_count(), 1);

    // Bless (granted in this boot): the booted system becomes the default, no reboot, no new
    // generation (the profile goes to the new system's generation 2).
    let mut b = grant("g-bless", ActivationAction::Bless, &sys1);
    b.boot_id_before = st.boot_id.clone();
    let st = agent.reconcile(Some(&t), Some(&b)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Blessed, "{:?}", st.activation);
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys1.as_str()));
    assert_eq!(st.default_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(st.profile_generation, Some(2));
    assert_eq!(f.sim.reboot_count(), 1);
    assert_eq!(f.sim.switch_log().last().unwrap(), &format!("boot {sys1}"));
    // Not repeated by a restarted agent.
    let st = f.agent().reconcile(Some(&t), Some(&b)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Blessed);
    assert_eq!(f.sim.switch_log().len(), 3);
    // An unplanned reboot now boots the blessed default.
    f.sim.reboot().unwrap();
    assert_eq!(f.sim.booted_system().as_deref(), Some(sys1.as_str()));

    // Rollback: back to generation 1, boot it, reboot.
    let g2 = grant("g-rollback", ActivationAction::Rollback, &sys1);
    let st = agent.reconcile(Some(&t), Some(&g2)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Rebooted);
    assert_eq!(st.profile_generation, Some(1));
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.reboot_count(), 3);
    assert_eq!(f.sim.switch_log().last().unwrap(), &format!("boot {sys0}"));
}

/// Real Nix that counts `nix build` calls (each one evaluates the flake).
#[derive(Debug)]
struct CountingNix {
    inner: std::sync::Arc<dyn nixroll::nix::Nix>,
    builds: std::sync::atomic::AtomicUsize,
}

impl nixroll::nix::Nix for CountingNix {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> futures::future::BoxFuture<'a, Result<String, nixroll::nix::NixError>> {
        self.builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.realise(installable, gc_root)
    }
    fn closure_bytes<'a>(
        &'a self,
        path: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<u64, nixroll::nix::NixError>> {
        self.inner.closure_bytes(path)
    }
    fn set_profile<'a>(
        &'a self,
        profile: &'a Path,
        system: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), nixroll::nix::NixError>> {
        self.inner.set_profile(profile, system)
    }
    fn rollback_profile<'a>(
        &'a self,
        profile: &'a Path,
    ) -> futures::future::BoxFuture<'a, Result<(), nixroll::nix::NixError>> {
        self.inner.rollback_profile(profile)
    }
}

/// Quick rollback: the previous target stays pinned (keep_staged = 2, the default), so
/// reverting to it stages with no `nix build` (no evaluation, no build), also in a restarted
/// agent; with `keep_staged: 1` (the behaviour before) a revert runs `nix build` again.
#[tokio::test]
async fn a_reverted_revision_is_staged_from_its_pin_with_no_evaluation() {
    let Some((mut f, _sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_kernel_change().unwrap();
    let rev2 = f.flake.commit_kernel_change().unwrap();
    let nix = std::sync::Arc::new(CountingNix {
        inner: f.nix.clone(),
        builds: Default::default(),
    });
    let agent = |keep_staged| {
        nixroll::agent::node::NodeAgent::new(
            f.host.clone(),
            nix.clone(),
            HostOptions {
                keep_staged,
                ..Default::default()
            },
        )
    };
    let builds = || nix.builds.load(std::sync::atomic::Ordering::SeqCst);
    let sys1 = stage(&mut agent(2), &f.target(&rev1)).await;
    let sys2 = stage(&mut agent(2), &f.target(&rev2)).await;
    assert_ne!(sys1, sys2);
    assert_eq!(builds(), 2);

    // The revert, by a restarted agent (the pins are in its state file): nothing built.
    let st = agent(2).reconcile(Some(&f.target(&rev1)), None).await.unwrap();
    assert_eq!(st.last_error, None);
    let staged = st.staged.unwrap();
    assert_eq!(
        (staged.revision.as_str(), staged.system.as_str()),
        (rev1.as_str(), sys1.as_str())
    );
    assert!(staged.reboot_required);
    // And forward again: rev2 is now the pinned one.
    let st = agent(2).reconcile(Some(&f.target(&rev2)), None).await.unwrap();
    assert_eq!(st.staged.unwrap().system, sys2);
    assert_eq!(builds(), 2, "a revert evaluates or builds nothing");
    assert!(
        f.sim
            .root()
            .join(format!("var/lib/nixroll/gcroots/system-{rev1}"))
            .exists()
    );

    // keep_staged: 1: nothing is kept but the target, so the revert runs `nix build`.
    let st = agent(1).reconcile(Some(&f.target(&rev1)), None).await.unwrap();
    assert_eq!(st.staged.unwrap().system, sys1);
    assert_eq!(builds(), 3);
    assert!(
        !f.sim
            .root()
            .join(format!("var/lib/nixroll/gcroots/system-{rev2}"))
            .exists()
    );
}

/// A reboot between the one-time boot and the bless boots the old default; the bless granted
/// before it is not executed, and a bless of a system that is not booted is refused.
#[tokio::test]
async fn a_reboot_before_the_bless_boots_the_old_default_and_the_stale_bless_is_refused() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_kernel_change().unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let sys1 = stage(&mut agent, &t).await;
    let st = activate(&mut agent, &t, "g", ActivationAction::Boot, &sys1).await;
    assert_eq!(st.booted_system.as_deref(), Some(sys1.as_str()));
    let once_boot = st.boot_id.clone();

    f.sim.reboot().unwrap(); // power cut
    let st = agent.reconcile(Some(&t), None).await.unwrap();
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    let mut b = grant("g-bless", ActivationAction::Bless, &sys1);
    b.boot_id_before = once_boot;
    let st = agent.reconcile(Some(&t), Some(&b)).await.unwrap();
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(
        f.sim.switch_log().len(),
        2,
        "nothing ran: {:?}",
        f.sim.switch_log()
    );
    assert!(
        st.last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("before the last reboot")),
        "{:?}",
        st.last_error
    );
    // A bless of the system that is not booted (granted in this boot) is refused.
    let mut b = grant("g-bless-2", ActivationAction::Bless, &sys1);
    b.boot_id_before = st.boot_id.clone();
    let st = agent.reconcile(Some(&t), Some(&b)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Failed);
    assert!(
        st.activation
            .as_ref()
            .unwrap()
            .message
            .as_deref()
            .unwrap_or("")
            .contains("not made the default"),
        "{:?}",
        st.activation
    );
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(st.profile_generation, Some(1));
}

#[tokio::test]
async fn switch_exit_100_means_needs_reboot_and_failures_are_reported() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f
        .flake
        .commit("new init", |s| s.init_interface_version = "systemd-2".into())
        .unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let staged = agent.reconcile(Some(&t), None).await.unwrap().staged.unwrap();
    assert_eq!(staged.reboot_reasons, vec!["init-interface-version"]);
    let st = agent
        .reconcile(
            Some(&t),
            Some(&grant("g1", ActivationAction::Switch, &staged.system)),
        )
        .await
        .unwrap();
    assert_eq!(state_of(&st), ActivationState::NeedsReboot);
    assert_eq!(st.activation.as_ref().unwrap().exit_code, Some(100));
    assert_eq!(st.current_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.boot_default().as_deref(), Some(staged.system.as_str()));
    assert_eq!(f.sim.reboot_count(), 0);

    let rev2 = f
        .flake
        .commit("switch fails", |s| s.switch_exit = Some(3))
        .unwrap();
    let t2 = f.target(&rev2);
    let sys2 = stage(&mut agent, &t2).await;
    let st = activate(&mut agent, &t2, "g2", ActivationAction::Switch, &sys2).await;
    assert_eq!(state_of(&st), ActivationState::Failed);
    let err = st.last_error.unwrap();
    assert_eq!(err.operation, HostOperation::Activate);
    assert_eq!(err.revision.as_deref(), Some(rev2.as_str()));
    assert!(err.message.contains("exited 3"), "{}", err.message);
    assert!(
        err.message.contains("sim: switch-to-configuration switch fails"),
        "{}",
        err.message
    );

    // A grant for a path that is not in the store fails before touching the profile.
    let gen_before = st.profile_generation;
    let st = agent
        .reconcile(
            Some(&t2),
            Some(&grant(
                "g3",
                ActivationAction::Switch,
                "/nix/store/00000000000000000000000000000000-missing",
            )),
        )
        .await
        .unwrap();
    assert_eq!(state_of(&st), ActivationState::Failed);
    assert_eq!(st.profile_generation, gen_before);
}

#[tokio::test]
async fn fallback_boot_is_visible_in_the_report() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_kernel_change().unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let sys1 = stage(&mut agent, &t).await;
    f.sim.set_fault(Some(BootFault::FallbackToPrevious));
    let st = activate(&mut agent, &t, "g", ActivationAction::Boot, &sys1).await;
    // Rebooted (new boot id), but the one-time boot of the new system failed and the machine
    // came back on its default: the controller sees booted != staged with `bootOnce` set.
    assert_eq!(state_of(&st), ActivationState::Rebooted);
    assert!(st.activation.as_ref().unwrap().boot_once.is_some());
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(st.default_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.boot_oneshot(), None);
    assert!(st.staged.unwrap().reboot_required);
    // Another reboot (the watchdog again, a power cut) stays on the known-good default.
    f.sim.set_fault(None);
    f.sim.reboot().unwrap();
    assert_eq!(f.sim.booted_system().as_deref(), Some(sys0.as_str()));
}

/// Kill the agent logic at every step of a Boot activation; a new agent over the same host
/// finishes the job, reports correctly and never reboots or switches a second time.
#[tokio::test]
async fn restarts_at_any_step_never_repeat_a_reboot_or_a_switch() {
    if !common::require_nix() {
        return;
    }
    for point in [
        CrashPoint::BeforeProfileSet,
        CrashPoint::AfterProfileSet,
        CrashPoint::AfterSwitch,
        CrashPoint::AfterKeepDefault,
        CrashPoint::BeforeReboot,
        CrashPoint::AfterReboot,
    ] {
        let mut f = HostRoot::new(NODE);
        let sys0 = f.installed().await;
        let boot_id = f.sim.boot_id();
        let rev1 = f.flake.commit_kernel_change().unwrap();
        let t = f.target(&rev1);
        let sys1 = stage(&mut f.agent(), &t).await;
        let g = grant("g-crash", ActivationAction::Boot, &sys1);

        let crashed = f.agent().crash_at(point).reconcile(Some(&t), Some(&g)).await;
        assert!(
            matches!(crashed, Err(NodeError::Crashed(p)) if p == point),
            "{point:?}: {crashed:?}"
        );
        // The restarted agent, twice (a second restart must not change anything either).
        let st = f.agent().reconcile(Some(&t), Some(&g)).await.unwrap();
        let st2 = f.agent().reconcile(Some(&t), Some(&g)).await.unwrap();
        assert_eq!(st, st2, "{point:?}: a second restart changed the report");

        // The new system's `boot` once, then the old one's once (keeping the old default).
        assert_eq!(
            f.sim.switch_log(),
            vec![format!("boot {sys1}"), format!("boot {sys0}")],
            "{point:?}"
        );
        assert_eq!(st.profile_generation, Some(1), "{point:?}");
        assert_eq!(f.sim.boot_default().as_deref(), Some(sys0.as_str()), "{point:?}");
        assert!(st.activation.as_ref().unwrap().boot_once.is_some(), "{point:?}");
        let report = st.activation.unwrap();
        assert_eq!(
            report.boot_id_before.as_deref(),
            Some(boot_id.as_str()),
            "{point:?}"
        );
        if point == CrashPoint::BeforeReboot {
            // Recorded "reboot issued" but died before asking: never reboot from that record;
            // report and let the controller's timeout decide.
            assert_eq!(f.sim.reboot_count(), 0, "{point:?}");
            assert_eq!(report.state, ActivationState::RebootRequested);
            assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
        } else {
            assert_eq!(f.sim.reboot_count(), 1, "{point:?}");
            assert_eq!(report.state, ActivationState::Rebooted, "{point:?}");
            assert_eq!(st.booted_system.as_deref(), Some(sys1.as_str()), "{point:?}");
        }
    }
}

/// The agent dies (its future is dropped, like a killed pod) while `switch-to-configuration`
/// runs: the detached job finishes anyway and the next agent picks up its result without
/// running it again.
#[tokio::test]
async fn switch_survives_the_agent_dying_mid_run() {
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f
        .flake
        .commit("slow switch", |s| {
            s.service.push('+');
            s.switch_delay = Some("1".into());
        })
        .unwrap();
    let t = f.target(&rev1);
    let sys1 = stage(&mut f.agent(), &t).await;
    let g = grant("g-slow", ActivationAction::Switch, &sys1);

    let mut dying = f.agent();
    let (t2, g2) = (t.clone(), g.clone());
    let task = tokio::spawn(async move { dying.reconcile(Some(&t2), Some(&g2)).await });
    let started = f.root().join("var/lib/nixroll/activation/g-slow.started");
    tokio::time::timeout(Duration::from_secs(20), async {
        while !started.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("switch launched");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        f.sim.current_system().as_deref() != Some(sys1.as_str()),
        "switch still running"
    );

    let st = f.agent().reconcile(Some(&t), Some(&g)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Switched);
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(f.sim.switch_log(), vec![format!("switch {sys1}")]);
}

#[tokio::test]
async fn restarted_rollback_rolls_back_only_once() {
    let Some((mut f, sys0)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_service_change().unwrap();
    let t = f.target(&rev1);
    let mut agent = f.agent();
    let sys1 = stage(&mut agent, &t).await;
    activate(&mut agent, &t, "g1", ActivationAction::Switch, &sys1).await;
    let rev2 = f.flake.commit_service_change().unwrap();
    let t2 = f.target(&rev2);
    let sys2 = stage(&mut agent, &t2).await;
    let st = activate(&mut agent, &t2, "g2", ActivationAction::Switch, &sys2).await;
    assert_eq!(st.profile_generation, Some(3));

    let g = grant("g-rb", ActivationAction::Rollback, &sys2);
    let crashed = f
        .agent()
        .crash_at(CrashPoint::AfterProfileSet)
        .reconcile(Some(&t2), Some(&g))
        .await;
    assert!(matches!(crashed, Err(NodeError::Crashed(_))));
    let st = f.agent().reconcile(Some(&t2), Some(&g)).await.unwrap();
    assert_eq!(state_of(&st), ActivationState::Rebooted);
    assert_eq!(st.profile_generation, Some(2), "rolled back more than once");
    assert_eq!(st.booted_system.as_deref(), Some(sys1.as_str()));
    assert_ne!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(f.sim.reboot_count(), 1);
}

/// Before rebooting, the agent waits until the writer acknowledges that `RebootRequested` is
/// stored in the API, and no longer: no fixed pause on the critical path. Without an
/// acknowledgement it goes on after `report_timeout` (an API outage must not hold the grant).
#[tokio::test]
async fn the_reboot_waits_for_the_stored_report_and_no_longer() {
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    for acknowledge in [true, false] {
        let rev = f.flake.commit_kernel_change().unwrap();
        let t = f.target(&rev);
        let (tx, mut reports) = tokio::sync::watch::channel::<Option<AgentStatus>>(None);
        let (acked_tx, acked_rx) = tokio::sync::watch::channel::<Option<AgentStatus>>(None);
        let options = HostOptions {
            activation_timeout: Duration::from_secs(30),
            result_poll: Duration::from_millis(10),
            report_timeout: if acknowledge {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(300)
            },
            ..Default::default()
        };
        let mut agent = f.agent_with(options).with_progress(tx, acked_rx);
        let sys1 = stage(&mut agent, &t).await;
        let sim = f.sim.clone();
        let reboots_before = sim.reboot_count();
        // The writer: acknowledges RebootRequested (after checking that no reboot happened yet).
        let writer = tokio::spawn(async move {
            let seen = reports
                .wait_for(|r| {
                    r.as_ref()
                        .and_then(|r| r.activation.as_ref())
                        .is_some_and(|a| a.state == ActivationState::RebootRequested)
                })
                .await
                .unwrap()
                .clone();
            assert_eq!(
                sim.reboot_count(),
                reboots_before,
                "rebooted before the report was stored"
            );
            if acknowledge {
                acked_tx.send_replace(seen);
            }
            acked_tx
        });
        let g = grant(&format!("g-{acknowledge}"), ActivationAction::Boot, &sys1);
        let started = std::time::Instant::now();
        let st = tokio::time::timeout(Duration::from_secs(60), agent.reconcile(Some(&t), Some(&g)))
            .await
            .expect("the reboot did not wait for the acknowledgement only")
            .unwrap();
        let _keep = writer.await.unwrap();
        assert_eq!(f.sim.reboot_count(), reboots_before + 1);
        assert_eq!(state_of(&st), ActivationState::Rebooted);
        if !acknowledge {
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "waited for the bound"
            );
        }
    }
}

/// Exit code 4 (the system was activated, some units failed) is not a failed activation:
/// `Switched`, `unitsFailed`, the units named. And a held activation lock (another
/// activator) is waited for, not raced.
#[tokio::test]
async fn exit_4_is_switched_with_failed_units_and_a_held_lock_is_waited_for() {
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f
        .flake
        .commit("a unit fails", |s| {
            s.service.push('+');
            s.failed_units = Some("k3s.service".into());
        })
        .unwrap();
    let mut agent = f.agent();
    let t = f.target(&rev1);
    let sys1 = stage(&mut agent, &t).await;
    let st = activate(&mut agent, &t, "g1", ActivationAction::Switch, &sys1).await;
    let a = st.activation.clone().unwrap();
    assert_eq!(
        (a.state, a.exit_code, a.units_failed),
        (ActivationState::Switched, Some(4), true)
    );
    assert!(a.message.unwrap().contains("k3s.service"));
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
    assert_eq!(st.last_error, None);

    // Another activator holds NixOS's lock for 1.5 s: the switch starts after it.
    let rev2 = f
        .flake
        .commit("service", |s| {
            s.failed_units = None;
            s.service.push('+');
        })
        .unwrap();
    let t2 = f.target(&rev2);
    let sys2 = stage(&mut agent, &t2).await;
    let lock = f.sim.root().join("run/nixos/switch-to-configuration.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = std::fs::File::create(&lock).unwrap();
    held.lock().unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    });
    let t0 = std::time::Instant::now();
    let st = activate(&mut agent, &t2, "g2", ActivationAction::Switch, &sys2).await;
    release.join().unwrap();
    assert_eq!(state_of(&st), ActivationState::Switched);
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "waited for the other activator"
    );
    assert_eq!(
        f.sim
            .switch_log()
            .iter()
            .filter(|l| l.starts_with("switch "))
            .count(),
        2
    );
}

/// `nix build --no-update-lock-file`: a revision whose `flake.lock` lacks an input is an
/// error, never inputs resolved at build time (which could differ per node and per time).
#[tokio::test]
async fn a_revision_without_a_complete_lock_file_is_not_built() {
    if !common::require_nix() {
        return;
    }
    let f = HostRoot::new(NODE);
    let tmp = tempfile::tempdir().unwrap();
    let dep = tmp.path().join("dep");
    std::fs::create_dir_all(&dep).unwrap();
    std::fs::write(dep.join("flake.nix"), "{ outputs = { self }: { x = 1; }; }\n").unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            "{{ inputs.dep.url = \"path:{}\"; outputs = {{ self, dep }}: {{ nixosConfigurations.{NODE}.config.system.build.toplevel = derivation {{ name = \"t\"; system = \"{}\"; builder = \"builtin:buildenv\"; derivations = [ ]; manifest = builtins.toFile \"manifest.nix\" \"[ ]\"; }}; }}; }}\n",
            dep.display(),
            nixroll::sim::flake::nix_system()
        ),
    )
    .unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "no lock file"]);
    let url = format!("git+file://{}", repo.display());
    let installable = format!("{url}#nixosConfigurations.{NODE}.config.system.build.toplevel");
    let err = f
        .nix
        .realise(&installable, Path::new("/var/lib/nixroll/gcroots/t"))
        .await
        .unwrap_err()
        .report();
    assert!(err.contains("requires lock file changes"), "{err}");
    assert!(!repo.join("flake.lock").exists());
}

/// A switch that lost the race for NixOS's activation lock (another activator started between
/// the agent's check and its launch: exit 1, "Could not acquire lock") is launched again,
/// under a new unit name, and succeeds: a lock failure is retryable, not `Failed`.
#[tokio::test]
async fn a_lost_lock_race_is_retried() {
    use nixroll::agent::state::{self, ACTIVATION_DIR, ActivationRecord, STATE_FILE, Step};
    let Some((mut f, _)) = installed_host(NODE).await else {
        return;
    };
    let rev1 = f.flake.commit_service_change().unwrap();
    let t = f.target(&rev1);
    let mut agent = f.agent();
    let sys1 = stage(&mut agent, &t).await;
    // The state a lost race leaves: the first launch ended with 1 and the lock message.
    let root = f.sim.root().to_path_buf();
    let host_file = |p: &str| root.join(p.trim_start_matches('/'));
    let dir = host_file(ACTIVATION_DIR);
    std::fs::create_dir_all(dir.join("g1.started")).unwrap();
    std::fs::write(dir.join("g1.result"), "1\n").unwrap();
    std::fs::write(
        dir.join("g1.log"),
        "Could not acquire lock on /run/nixos/switch-to-configuration.lock: another switch-to-configuration is running\n",
    )
    .unwrap();
    let mut st = state::load(&host_file(STATE_FILE)).unwrap();
    st.activation = Some(ActivationRecord {
        id: "g1".into(),
        action: ActivationAction::Switch,
        system: sys1.clone(),
        step: Step::Switched,
        generation_before: Some(1),
        activated: Some(sys1.clone()),
        boot_id_before: None,
        default_before: None,
        bootloader: None,
        boot_once: None,
        exit_code: Some(1),
        outcome: None,
        message: None,
        updated_at: jiff::Timestamp::now(),
        attempt: 0,
    });
    state::save(&host_file(STATE_FILE), &st).unwrap();

    let g = grant("g1", ActivationAction::Switch, &sys1);
    let st = agent.reconcile(Some(&t), Some(&g)).await.unwrap();
    let a = st.activation.unwrap();
    assert_eq!(
        (a.state, a.exit_code),
        (ActivationState::Switched, Some(0)),
        "{a:?}"
    );
    assert!(dir.join("g1-r1.result").exists(), "launched again as g1-r1");
    assert_eq!(f.sim.switch_log(), vec![format!("switch {sys1}")]);
    assert_eq!(st.current_system.as_deref(), Some(sys1.as_str()));
}

/// A node that follows a Flux GitRepository on a branch that is neither the remote's default
/// nor `master` (issue 20): its effective spec adds `?ref=refs/heads/dev` to `spec.flake`, and
/// real Nix stages the commit from a bare remote. The same flake without the ref (what nixroll
/// built before) fails: Nix 2.8 fetches `refs/heads/master` then.
#[tokio::test]
async fn a_gitrepository_on_another_branch_is_staged_through_its_ref() {
    use nixroll::api::{NixOSNode, SourceKind, Target};
    use nixroll::source::follow;
    let Some((mut f, _sys0)) = installed_host(NODE).await else {
        return;
    };
    let repo = f.flake.dir().to_path_buf();
    let git = |dir: &Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let default_branch = f.flake.branch().unwrap();
    git(&repo, &["checkout", "-q", "-b", "dev"]);
    let rev = f.flake.commit_kernel_change().unwrap();
    // The remote: bare (Nix treats a local non-bare repository as a work tree and reads its
    // HEAD), its HEAD on the default branch, which does not hold `rev`.
    let remote = f.tmp.path().join("remote.git");
    git(
        f.tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            repo.to_str().unwrap(),
            remote.to_str().unwrap(),
        ],
    );
    git(
        &remote,
        &["symbolic-ref", "HEAD", &format!("refs/heads/{default_branch}")],
    );
    assert_ne!(git(&remote, &["rev-parse", "HEAD"]), rev);
    let url = format!("git+file://{}", remote.display());

    // What a GitRepository following `dev` offers, and the spec the rollout then works with.
    let repo_obj = serde_json::json!({
        "metadata": {"name": "infra", "namespace": "flux-system", "generation": 1},
        "spec": {"url": remote.display().to_string(), "ref": {"branch": "dev"}},
        "status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": ""}],
            "artifact": {"revision": format!("dev@sha1:{rev}")}
        }
    });
    let offer = follow::gitrepository_offer(&repo_obj).unwrap();
    let mut spec = nixroll::sim::fixtures::following_spec(&url, "infra");
    if let Some(r) = spec.source_ref.as_mut() {
        r.kind = SourceKind::GitRepository;
    }
    let node = NixOSNode::new(NODE, spec);
    let eff = follow::effective_spec(&node, Some(&offer)).unwrap();
    assert_eq!(eff.flake, format!("{url}?ref=refs/heads/dev"));
    let target = Target {
        revision: rev.clone(),
        installable: nixroll::api::installable(&eff.flake, &rev, NODE),
        system: None,
        build: None,
    };

    // Without the ref first (before Nix has fetched `rev` at all): Nix looks for master.
    let without = nixroll::api::installable(&url, &rev, NODE);
    let err = f
        .nix
        .realise(&without, Path::new("/var/lib/nixroll/gcroots/without-ref"))
        .await
        .unwrap_err()
        .report();
    assert!(
        err.contains("refs/heads/master") || err.contains("Cannot find Git revision"),
        "{err}"
    );

    let st = f.agent().reconcile(Some(&target), None).await.unwrap();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    let staged = st.staged.unwrap();
    assert_eq!(
        (staged.revision.as_str(), staged.installable.as_str()),
        (rev.as_str(), target.installable.as_str())
    );
    assert!(
        Path::new(&staged.system)
            .join("bin/switch-to-configuration")
            .exists()
    );
}
