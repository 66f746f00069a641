//! The same host logic on a simulated host with the simulated Nix (`SimNix`): what the demo
//! runs, with nothing but the binary and /bin/sh. No skipping: this needs no Nix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::host::{SimNixHost, grant, stage};
use nixroll::agent::node::CrashPoint;
use nixroll::api::{ActivationAction, ActivationState, HostOperation, Target};
use nixroll::sim::flake::SystemSpec;

fn target(rev: &str) -> Target {
    Target {
        revision: rev.into(),
        installable: nixroll::api::installable("git+https://example.org/infra.git", rev, "n1"),
        system: None,
        build: None,
    }
}

#[tokio::test]
async fn sim_nix_stages_activates_reboots_and_rolls_back() {
    let h = SimNixHost::new();
    let (tmp, sim, simnix) = (&h.tmp, &h.sim, &h.simnix);
    let agent = || h.agent();

    let (r0, r1, r2, bad) = ("a".repeat(40), "b".repeat(40), "c".repeat(40), "d".repeat(40));
    let base = SystemSpec::default();
    simnix.publish(&target(&r0).installable, base.clone());
    simnix.publish(
        &target(&r1).installable,
        SystemSpec {
            kernel: "linux-6.7".into(),
            ..base.clone()
        },
    );
    simnix.publish(
        &target(&r2).installable,
        SystemSpec {
            service: "svc-2".into(),
            ..base.clone()
        },
    );
    simnix.publish_error(
        &target(&bad).installable,
        "error: Cannot find Git revision 'dddd'",
    );

    let sys0 = stage(&mut agent(), &target(&r0)).await;
    sim.install(&sys0).unwrap();

    let mut a = agent();
    let st = a.reconcile(Some(&target(&bad)), None).await.unwrap();
    assert_eq!(st.last_error.unwrap().operation, HostOperation::Stage);

    let staged = a
        .reconcile(Some(&target(&r2)), None)
        .await
        .unwrap()
        .staged
        .unwrap();
    assert!(!staged.reboot_required, "{:?}", staged.reboot_reasons);
    let staged = a
        .reconcile(Some(&target(&r1)), None)
        .await
        .unwrap()
        .staged
        .unwrap();
    assert_eq!(staged.reboot_reasons, vec!["kernel"]);
    assert!(staged.closure_bytes.unwrap() > 0);
    assert!(
        tmp.path()
            .join(format!("host/var/lib/nixroll/gcroots/system-{r1}"))
            .exists()
    );
    // The previous target stays pinned (keep_staged = 2: a revert builds nothing); older ones
    // are released.
    assert!(
        tmp.path()
            .join(format!("host/var/lib/nixroll/gcroots/system-{r2}"))
            .exists()
    );
    assert!(
        !tmp.path()
            .join(format!("host/var/lib/nixroll/gcroots/system-{r0}"))
            .exists()
    );

    // Boot with a crash before the reboot is requested, then a restart: no reboot at all.
    let g = grant("g1", ActivationAction::Boot, &staged.system);
    assert!(
        agent()
            .crash_at(CrashPoint::BeforeReboot)
            .reconcile(Some(&target(&r1)), Some(&g))
            .await
            .is_err()
    );
    let st = agent().reconcile(Some(&target(&r1)), Some(&g)).await.unwrap();
    assert_eq!(st.activation.unwrap().state, ActivationState::RebootRequested);
    assert_eq!(sim.reboot_count(), 0);
    // Boot once: the old system stays the default; the new one is the one-shot entry.
    assert_eq!(sim.boot_default().as_deref(), Some(sys0.as_str()));
    assert_eq!(sim.boot_oneshot().as_deref(), Some(staged.system.as_str()));

    // A new grant after the controller's timeout: boots, one reboot.
    let st = agent()
        .reconcile(
            Some(&target(&r1)),
            Some(&grant("g2", ActivationAction::Boot, &staged.system)),
        )
        .await
        .unwrap();
    assert_eq!(st.activation.unwrap().state, ActivationState::Rebooted);
    assert_eq!(sim.reboot_count(), 1);
    assert_eq!(st.booted_system.as_deref(), Some(staged.system.as_str()));
    assert_eq!(st.profile_generation, Some(1));
    assert_eq!(st.default_system.as_deref(), Some(sys0.as_str()));

    // Bless: the booted system becomes the default (its existing generation 2).
    let mut b = grant("g-bless", ActivationAction::Bless, &staged.system);
    b.boot_id_before = st.boot_id.clone();
    let st = agent().reconcile(Some(&target(&r1)), Some(&b)).await.unwrap();
    assert_eq!(st.activation.unwrap().state, ActivationState::Blessed);
    assert_eq!(st.profile_generation, Some(2));
    assert_eq!(sim.boot_default().as_deref(), Some(staged.system.as_str()));

    let st = agent()
        .reconcile(
            Some(&target(&r1)),
            Some(&grant("g3", ActivationAction::Rollback, &staged.system)),
        )
        .await
        .unwrap();
    assert_eq!(st.activation.unwrap().state, ActivationState::Rebooted);
    assert_eq!(st.profile_generation, Some(1));
    assert_eq!(st.booted_system.as_deref(), Some(sys0.as_str()));
    assert_eq!(sim.reboot_count(), 2);
}
