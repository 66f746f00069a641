#![allow(clippy::unwrap_used)]
use super::switch::lock_held;
use super::*;
use crate::agent::host::{HostRoot, RebootHook};
use crate::agent::state::ActivationRecord;
use crate::api::ActivationState;

fn file(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

#[test]
fn reboot_reasons_compare_paths_then_contents() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let host = HostRoot::new(r, RebootHook::None);
    // shared store paths: kernel and modules identical by path
    file(r, "store/k1/bzImage", "k1");
    file(r, "store/m1/lib/x.ko", "m");
    for sys in ["store/a", "store/b"] {
        std::fs::create_dir_all(r.join(sys)).unwrap();
        std::os::unix::fs::symlink("/store/k1/bzImage", r.join(sys).join("kernel")).unwrap();
        std::os::unix::fs::symlink("/store/m1", r.join(sys).join("kernel-modules")).unwrap();
    }
    // files inside each toplevel: equal content = same, different content = reason
    file(r, "store/a/kernel-params", "quiet");
    file(r, "store/b/kernel-params", "quiet");
    file(r, "store/a/init-interface-version", "systemd");
    file(r, "store/b/init-interface-version", "systemd-2");
    // initrd only in the new system; reboot-triggers on both sides, different
    file(r, "store/b/initrd", "i");
    file(r, "store/a/reboot-triggers", "{\"a\":1}");
    file(r, "store/b/reboot-triggers", "{\"a\":2}");
    let a = r.join("store/a").display().to_string();
    let b = r.join("store/b").display().to_string();
    assert_eq!(
        reboot_reasons(&host, Some(&a), None, &b),
        vec!["initrd", "init-interface-version", "reboot-triggers"]
    );
    assert!(reboot_reasons(&host, Some(&a), None, &a).is_empty());
    // reboot-triggers only counts when both have it
    std::fs::remove_file(r.join("store/a/reboot-triggers")).unwrap();
    assert_eq!(
        reboot_reasons(&host, Some(&a), None, &b),
        vec!["initrd", "init-interface-version"]
    );
    // unknown booted system: every component the new one has
    assert_eq!(
        reboot_reasons(&host, None, None, &b),
        vec![
            "kernel",
            "initrd",
            "kernel-modules",
            "kernel-params",
            "init-interface-version"
        ]
    );
}

#[test]
fn switch_inhibitors_count_and_systemd_alone_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let host = HostRoot::new(r, RebootHook::None);
    file(
        r,
        "store/cur/switch-inhibitors",
        r#"{"systemd":"/s/1","dbus":"/d/1"}"#,
    );
    file(
        r,
        "store/new/switch-inhibitors",
        r#"{"systemd":"/s/2","dbus":"/d/1","x":"1"}"#,
    );
    file(
        r,
        "store/same/switch-inhibitors",
        r#"{"systemd":"/s/1","other":"y"}"#,
    );
    for sys in ["cur", "new", "same"] {
        file(r, &format!("store/{sys}/systemd/version"), sys);
    }
    let p = |s: &str| r.join("store").join(s).display().to_string();
    // compared with the running system (current), not the booted one
    assert_eq!(
        reboot_reasons(&host, Some(&p("cur")), Some(&p("cur")), &p("new")),
        vec!["switch-inhibitors"]
    );
    assert!(reboot_reasons(&host, Some(&p("cur")), Some(&p("cur")), &p("same")).is_empty());
    assert!(reboot_reasons(&host, Some(&p("cur")), None, &p("new")).is_empty());
    // a new systemd is no reboot reason by default; it is with the option
    let agent = |systemd_needs_reboot| {
        NodeAgent::new(
            Arc::new(host.clone()),
            Arc::new(NoNix),
            HostOptions {
                systemd_needs_reboot,
                ..HostOptions::default()
            },
        )
    };
    assert!(agent(false).reasons(Some(&p("cur")), None, &p("same")).is_empty());
    assert_eq!(
        agent(true).reasons(Some(&p("cur")), None, &p("same")),
        vec!["systemd"]
    );
}

/// Nix that must not be called.
#[derive(Debug)]
struct NoNix;
impl Nix for NoNix {
    fn realise<'a>(
        &'a self,
        _: &'a str,
        _: &'a Path,
    ) -> futures::future::BoxFuture<'a, Result<String, crate::nix::NixError>> {
        unreachable!()
    }
    fn closure_bytes<'a>(
        &'a self,
        _: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<u64, crate::nix::NixError>> {
        unreachable!()
    }
    fn set_profile<'a>(
        &'a self,
        _: &'a Path,
        _: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::nix::NixError>> {
        unreachable!("the profile must not be set")
    }
    fn rollback_profile<'a>(
        &'a self,
        _: &'a Path,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::nix::NixError>> {
        unreachable!()
    }
}

#[tokio::test]
async fn a_path_that_is_no_nixos_system_never_reaches_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    file(r, "nix/store/abc-hello/bin/hello", "#!/bin/sh\n");
    let host = HostRoot::new(r, RebootHook::None);
    let mut agent = NodeAgent::new(Arc::new(host), Arc::new(NoNix), HostOptions::default());
    let g = ActivationGrant {
        id: "g".into(),
        action: ActivationAction::Switch,
        system: r.join("nix/store/abc-hello").display().to_string(),
        granted_at: Time(Timestamp::UNIX_EPOCH),
        boot_id_before: None,
    };
    let st = agent.reconcile(None, Some(&g)).await.unwrap();
    let a = st.activation.unwrap();
    assert_eq!(a.state, ActivationState::Failed);
    assert!(a.message.unwrap().contains("not a switchable NixOS system"));
}

#[test]
fn a_held_activation_lock_is_seen_without_taking_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switch-to-configuration.lock");
    let f = std::fs::File::create(&path).unwrap();
    assert!(!lock_held(&path));
    f.lock().unwrap();
    assert!(lock_held(&path));
    f.unlock().unwrap();
    assert!(!lock_held(&path));
}

#[test]
fn sanitize_makes_unit_and_file_names() {
    assert_eq!(sanitize("node-1/7:abc.def"), "node-1_7_abc_def");
    assert_eq!(sanitize(""), "_");
    assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
}

#[test]
fn activation_report_states() {
    let mut r = ActivationRecord {
        id: "g".into(),
        action: ActivationAction::Boot,
        system: "/nix/store/x".into(),
        step: Step::Switching,
        generation_before: None,
        activated: None,
        boot_id_before: Some("b1".into()),
        default_before: None,
        bootloader: None,
        boot_once: None,
        exit_code: None,
        outcome: None,
        message: None,
        updated_at: Timestamp::UNIX_EPOCH,
        attempt: 0,
    };
    assert_eq!(activation_report(&r, Some("b1")).state, ActivationState::Running);
    r.step = Step::RebootIssued;
    assert_eq!(
        activation_report(&r, Some("b1")).state,
        ActivationState::RebootRequested
    );
    assert_eq!(activation_report(&r, Some("b2")).state, ActivationState::Rebooted);
    r.step = Step::Finished;
    r.outcome = Some(ActivationState::NeedsReboot);
    assert_eq!(
        activation_report(&r, Some("b2")).state,
        ActivationState::NeedsReboot
    );
}
