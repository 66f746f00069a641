//! The agent, unchanged and with its real backend, on a real systemd host (e2e/: a
//! `systemd-nspawn` container booting Debian's systemd, with Debian's Nix, a NixOS-like
//! system profile, bootloader entry and stage 2), against the embedded API server and the
//! real controller. Skipped with a reason where the test bed cannot run (not root, no
//! systemd-nspawn); in CI (`CI=true`) that is a failure. See e2e/README.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

#[path = "../e2e/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedded_apiserver::ApiServer;
use futures::TryStreamExt;
use harness::{Agent, Boot, TestHost};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use nixroll::api::{ActivationAction, ActivationState, NixOSNode, Phase};
use nixroll::controller::ControllerConfig;
use nixroll::sim::cluster::{SimCluster, Timing};
use nixroll::sim::flake::{SystemSpec, TestFlake};

const NODE: &str = "node-1";
const FLAKE_URL: &str = "git+file:///srv/flake";
const WAIT: Duration = Duration::from_secs(120);

/// What the agent's pod has in its environment: none of it may reach a host command.
const POD_ENV: &[(&str, &str)] = &[
    ("HOME", "/agent-home"),
    ("SSL_CERT_FILE", "/image/ca.pem"),
    ("http_proxy", "http://agent-proxy.invalid:1"),
    ("NIXROLL_POD_ONLY", "leak"),
];

/// A test bed: one real host, the embedded API, the real controller, and a "kubelet" that
/// reports the Node (Ready, boot id) and (re)starts the agent's pod at every boot.
struct Bed {
    host: Arc<TestHost>,
    flake: TestFlake,
    client: kube::Client,
    _api: ApiServer,
    agent: Arc<Mutex<Option<Agent>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    kubelet: Option<std::thread::JoinHandle<()>>,
    controller: tokio::task::JoinHandle<()>,
}

impl Bed {
    async fn start(name: &str, agent_args: &[&str], first: impl FnOnce(&mut SystemSpec)) -> Option<Bed> {
        let rootfs = tokio::task::spawn_blocking(harness::rootfs).await.unwrap()?;
        let name = name.to_string();
        let host = Arc::new(
            tokio::task::spawn_blocking(move || TestHost::boot(&rootfs, &name))
                .await
                .unwrap(),
        );
        let mut flake = TestFlake::create_for_real_host(host.root.join("srv/flake"), &[NODE]).unwrap();
        let rev = flake
            .commit("first system", |s| {
                s.nixos_version_revision = Some("first".into());
                first(s);
            })
            .unwrap();
        let h = host.clone();
        let installable = nixroll::api::installable(FLAKE_URL, &rev, NODE);
        tokio::task::spawn_blocking(move || h.install(&installable))
            .await
            .unwrap();

        let (api, client) = common::api::start_with_crd().await;
        let cluster = SimCluster::new(client.clone(), Timing::default());
        cluster
            .create_nodes(&[(NODE.to_string(), false, host.boot_id())])
            .await
            .unwrap();

        let mut config = ControllerConfig::new("real-host-test");
        config.policy.drain_backoff = jiff::SignedDuration::from_secs(1);
        config.drain_pass_backoff = (Duration::from_millis(100), Duration::from_secs(1));
        let controller_client = client.clone();
        let controller = tokio::spawn(async move {
            let _ = nixroll::controller::run(controller_client, config, std::future::pending::<()>()).await;
        });

        // The kubelet: Node status and the agent's pod, at every boot.
        let agent: Arc<Mutex<Option<Agent>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kubelet = {
            let (host, agent, stop) = (host.clone(), agent.clone(), stop.clone());
            let kubeconfig = api.kubeconfig_yaml();
            let args: Vec<String> = ["--node", NODE, "--offline"]
                .iter()
                .map(|s| s.to_string())
                .chain(agent_args.iter().map(|s| s.to_string()))
                .collect();
            let rt = tokio::runtime::Handle::current();
            std::thread::spawn(move || {
                let mut boots = host.boots();
                let mut seen = Boot { n: 0, pid1: 0 };
                let mut last_boot_id = String::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let b = *boots.borrow_and_update();
                    if b != seen {
                        seen = b;
                        eprintln!("kubelet: boot {} pid1 {}", b.n, b.pid1);
                        if b.pid1 == 0 {
                            // The machine went down: the pod died with it.
                            agent.lock().unwrap().take();
                            let _ = rt.block_on(cluster.set_node_status(NODE, false, &last_boot_id));
                        } else {
                            host.wait_running(Duration::from_secs(60));
                            last_boot_id = host.boot_id();
                            let _ = rt.block_on(cluster.set_node_status(NODE, true, &last_boot_id));
                            let a: Vec<&str> = args.iter().map(String::as_str).collect();
                            agent.lock().unwrap().take();
                            *agent.lock().unwrap() = Some(host.start_agent(&kubeconfig, &a, POD_ENV));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Some(Bed {
            host,
            flake,
            client,
            _api: api,
            agent,
            stop,
            kubelet: Some(kubelet),
            controller,
        })
    }

    /// Apply the NixOSNode for `revision` (as Flux would).
    async fn apply(&self, revision: &str) {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let obj = serde_json::json!({
            "apiVersion": "nixroll.io/v1alpha1",
            "kind": "NixOSNode",
            "metadata": {"name": NODE},
            "spec": {"flake": FLAKE_URL, "revision": revision},
        });
        api.patch(NODE, &PatchParams::apply("flux").force(), &Patch::Apply(&obj))
            .await
            .unwrap();
    }

    /// Wait (watch-driven, bounded) until `pred` holds for the NixOSNode.
    async fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&NixOSNode) -> bool) -> NixOSNode {
        let api: Api<NixOSNode> = Api::all(self.client.clone());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        let mut last = None;
        let res = tokio::time::timeout(limit, async {
            while let Ok(Some(o)) = stream.try_next().await {
                if pred(&o) {
                    return Some(o);
                }
                last = Some(o);
            }
            None
        })
        .await;
        match res {
            Ok(Some(o)) => o,
            _ => panic!(
                "timed out waiting for {what}; last status: {}\nagent log (tail):\n{}",
                serde_json::to_string_pretty(&last.and_then(|o| o.status)).unwrap_or_default(),
                tail(&self.host.agent_log(), 40)
            ),
        }
    }

    async fn up_to_date(&self, rev: &str) -> NixOSNode {
        self.wait_for(&format!("UpToDate on {rev}"), WAIT, |o| {
            let s = o.status.clone().unwrap_or_default();
            s.phase == Some(Phase::UpToDate) && s.revision.as_deref() == Some(rev)
        })
        .await
    }

    fn kill_agent(&self) {
        if let Some(a) = self.agent.lock().unwrap().take() {
            a.kill();
        }
    }

    /// Start the agent's pod again (after [`Bed::kill_agent`]), as the kubelet would.
    fn restart_agent(&self, args: &[&str], kubeconfig: &str) {
        let mut a: Vec<&str> = vec!["--node", NODE, "--offline"];
        a.extend_from_slice(args);
        *self.agent.lock().unwrap() = Some(self.host.start_agent(kubeconfig, &a, POD_ENV));
    }

    async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

impl Drop for Bed {
    /// Also on a failed assertion: stop the kubelet and the pod, so the host is torn down.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(k) = self.kubelet.take() {
            let _ = k.join();
        }
        if let Ok(mut a) = self.agent.lock() {
            a.take();
        }
        self.controller.abort();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn agent_status(o: &NixOSNode) -> nixroll::api::AgentStatus {
    o.status.clone().unwrap_or_default().agent.unwrap_or_default()
}

/// A live switch, then a kernel change: `boot`, one real `systemctl reboot`, a new boot id,
/// verified. Along the way: host Nix work runs outside the pod's cgroup, and host commands
/// see the host's environment, not the pod's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_then_one_real_reboot() {
    let Some(mut bed) = Bed::start("switch", &[], |_| {}).await else {
        return;
    };
    let first = bed.flake.head().to_string();
    let t0 = Instant::now();
    bed.apply(&first).await;
    bed.up_to_date(&first).await;
    eprintln!("adopted in {:?}", t0.elapsed());
    // `nixos-version --json` (a host command) gave the configuration revision.
    bed.wait_for("configurationRevision", Duration::from_secs(30), |o| {
        agent_status(o).configuration_revision.as_deref() == Some("first")
    })
    .await;

    // Host commands saw a clean environment: the host's proxy and CA, HOME=/root, the
    // system path; nothing of the pod's.
    let env = bed.host.sh_ok("cat /var/lib/sim/nixos-version-env");
    let vars: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("HOME"), Some(&"/root"), "{env}");
    assert_eq!(
        vars.get("http_proxy"),
        Some(&"http://proxy.host.invalid:3128"),
        "{env}"
    );
    assert_eq!(
        vars.get("SSL_CERT_FILE"),
        Some(&"/etc/ssl/certs/ca-certificates.crt"),
        "{env}"
    );
    assert!(
        vars.get("PATH")
            .is_some_and(|p| p.starts_with("/run/current-system/sw/bin:")),
        "{env}"
    );
    assert!(
        !env.contains("NIXROLL_POD_ONLY") && !env.contains("agent") && !env.contains("/image/"),
        "{env}"
    );
    assert!(
        !vars.contains_key("KUBECONFIG") && !vars.contains_key("RUST_LOG"),
        "{env}"
    );

    // A live switch (a service changed). The build runs in a transient unit of the host's
    // systemd, not in the pod's cgroup (the probe records its builder's cgroup).
    let t1 = Instant::now();
    let svc = bed
        .flake
        .commit("service change", |s| {
            s.service.push('+');
            s.probe = Some("1".into());
        })
        .unwrap();
    bed.apply(&svc).await;
    let done = bed.up_to_date(&svc).await;
    eprintln!("live switch in {:?}", t1.elapsed());
    let st = agent_status(&done);
    let system = st.current_system.clone().unwrap();
    assert_eq!(
        st.activation.as_ref().map(|a| a.state),
        Some(ActivationState::Switched)
    );
    assert_eq!(
        st.booted_system,
        Some(bed.host.readlink("/run/booted-system").unwrap())
    );
    let cgroup = bed.host.sh_ok(&format!("cat {system}/build-probe/build-cgroup"));
    for pod in bed.host.pod_cgroup_names() {
        assert!(
            !cgroup.contains(&pod),
            "the build ran in the pod's cgroup {pod}:\n{cgroup}"
        );
    }
    assert!(cgroup.contains("system.slice/nixroll-cmd-"), "{cgroup}");

    // A new kernel: boot + one real reboot.
    let boot_id = bed.host.boot_id();
    let boots_before = bed.host.boot_info().n;
    let t2 = Instant::now();
    let kernel = bed.flake.commit_kernel_change().unwrap();
    bed.apply(&kernel).await;
    let done = bed.up_to_date(&kernel).await;
    eprintln!("boot + reboot in {:?}", t2.elapsed());
    let st = agent_status(&done);
    assert_ne!(st.boot_id.as_deref(), Some(boot_id.as_str()), "new boot id");
    assert_eq!(st.boot_id, Some(bed.host.boot_id()));
    // Booted once, verified, then blessed: the last grant is the Bless, and the default is
    // now the booted system (the stand-in bootloader's entry and the profile).
    assert_eq!(
        st.activation.as_ref().map(|a| (a.action, a.state)),
        Some((ActivationAction::Bless, ActivationState::Blessed))
    );
    assert_eq!(st.booted_system, bed.host.readlink("/run/booted-system"));
    assert_eq!(st.default_system, st.booted_system);
    assert_eq!(bed.host.readlink("/boot/default-system"), st.booted_system);
    assert_eq!(
        st.booted_system.as_deref(),
        Some(
            done.status
                .as_ref()
                .unwrap()
                .agent
                .as_ref()
                .unwrap()
                .staged
                .as_ref()
                .unwrap()
                .system
                .as_str()
        )
    );
    // One reboot only, also after the agent restarted on the new boot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bed.host.boot_info().n, boots_before + 1, "exactly one reboot");

    // An admin repoints /run/current-system by hand (as `nixos-rebuild test` would): reported
    // promptly (inotify), with no change of the NixOSNode.
    let t3 = Instant::now();
    bed.host.sh_ok(&format!("ln -sfn {system} /run/current-system"));
    bed.wait_for("the hand-made change reported", Duration::from_secs(5), |o| {
        agent_status(o).current_system.as_deref() == Some(system.as_str())
    })
    .await;
    eprintln!("host change reported in {:?}", t3.elapsed());
    let _ = &mut bed;
    bed.shutdown().await;
}

/// The agent SIGKILLed while `switch-to-configuration` runs: the switch (a transient unit of
/// the host) finishes anyway and the new agent picks its result up. Then a switch that runs
/// longer than the agent's activation timeout: followed through systemd, not abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_survives_the_agent_and_outlives_the_activation_timeout() {
    let Some(mut bed) = Bed::start("sigkill", &["--activation-timeout", "2s"], |_| {}).await else {
        return;
    };
    let first = bed.flake.head().to_string();
    bed.apply(&first).await;
    bed.up_to_date(&first).await;

    let slow = bed
        .flake
        .commit("slow switch", |s| {
            s.service.push('+');
            s.switch_delay = Some("4".into());
        })
        .unwrap();
    bed.apply(&slow).await;
    bed.wait_for("the switch running", WAIT, |o| {
        agent_status(o)
            .activation
            .is_some_and(|a| a.state == ActivationState::Running)
    })
    .await;
    // ("Running" is reported right before the launch: wait for the process itself.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed
        .host
        .pids_matching("switch-to-configuration switch")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the switch never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bed.kill_agent();
    let kubeconfig = bed._api.kubeconfig_yaml();
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.restart_agent(&["--activation-timeout", "2s"], &kubeconfig);
    let done = bed.up_to_date(&slow).await;
    let a = agent_status(&done).activation.unwrap();
    assert_eq!(a.state, ActivationState::Switched);
    assert_eq!(
        bed.host
            .sh_ok("grep -c '^switch ' /var/lib/sim/switch-log")
            .trim(),
        "1",
        "one switch per grant"
    );

    // 4 s switch, 2 s activation timeout: followed to its end, Switched (not Failed).
    let slower = bed
        .flake
        .commit("slower switch", |s| {
            s.service.push('+');
            s.switch_delay = Some("5".into());
        })
        .unwrap();
    bed.apply(&slower).await;
    let done = bed.up_to_date(&slower).await;
    let a = agent_status(&done).activation.unwrap();
    assert_eq!(a.state, ActivationState::Switched, "{a:?}");
    assert!(bed.host.agent_log().contains("still runs; following it"));
    bed.shutdown().await;
}

/// switch-to-configuration's exit codes, each reported as what it is: 100 (a reboot is
/// needed: the controller turns it into a Boot), 4 (activated, some units failed), 1 (failed).
/// And a second activator holding NixOS's lock: the agent waits for it, then switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_a_second_activator() {
    let Some(mut bed) = Bed::start("exits", &[], |_| {}).await else {
        return;
    };
    let first = bed.flake.head().to_string();
    bed.apply(&first).await;
    bed.up_to_date(&first).await;

    // 4: some units failed; the system is active.
    let four = bed
        .flake
        .commit("a unit fails", |s| {
            s.service.push('+');
            s.failed_units = Some("k3s.service".into());
        })
        .unwrap();
    bed.apply(&four).await;
    let o = bed
        .wait_for("exit 4 reported", WAIT, |o| {
            agent_status(o)
                .activation
                .is_some_and(|a| a.exit_code == Some(4) && a.state != ActivationState::Running)
        })
        .await;
    let a = agent_status(&o).activation.unwrap();
    assert_eq!(a.state, ActivationState::Switched, "{a:?}");
    assert!(a.units_failed);
    assert!(
        a.message.as_deref().unwrap_or_default().contains("k3s.service"),
        "{a:?}"
    );
    let st = agent_status(&o);
    assert_eq!(st.current_system, Some(a.system.clone()));
    bed.up_to_date(&four).await;

    // 100: the new init is incompatible: NeedsReboot, then the controller's Boot and one reboot.
    let boots = bed.host.boot_info().n;
    let hundred = bed
        .flake
        .commit("new init", |s| {
            s.failed_units = None;
            s.init_interface_version = "systemd-2".into();
        })
        .unwrap();
    bed.apply(&hundred).await;
    let o = bed.up_to_date(&hundred).await;
    assert_eq!(bed.host.boot_info().n, boots + 1);
    assert_eq!(
        agent_status(&o).activation.unwrap().state,
        ActivationState::Blessed
    );

    // A second activator holds NixOS's lock: the agent waits (Running, saying why), then
    // switches when it is gone.
    bed.host.sh_ok(
        "mkdir -p /run/nixos && systemd-run --unit=other-activator --collect flock /run/nixos/switch-to-configuration.lock sleep 6",
    );
    let svc = bed.flake.commit("service", |s| s.service.push('+')).unwrap();
    bed.apply(&svc).await;
    let o = bed
        .wait_for("waiting for the other activator", WAIT, |o| {
            agent_status(o).activation.is_some_and(|a| {
                a.message
                    .as_deref()
                    .unwrap_or_default()
                    .contains("another activator")
            })
        })
        .await;
    assert_eq!(
        agent_status(&o).activation.unwrap().state,
        ActivationState::Running
    );
    let o = bed.up_to_date(&svc).await;
    assert_eq!(
        agent_status(&o).activation.unwrap().state,
        ActivationState::Switched
    );

    // The same with `system.autoUpgrade` running (its unit, not the lock).
    bed.host.sh_ok(
        "systemd-run --unit=nixos-upgrade.service --service-type=oneshot --collect sleep 6 >/dev/null 2>&1 &",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bed
        .host
        .sh_ok("systemctl is-active nixos-upgrade.service || true")
        .contains("activ")
    {
        assert!(Instant::now() < deadline, "nixos-upgrade.service never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let svc2 = bed.flake.commit("service", |s| s.service.push('+')).unwrap();
    bed.apply(&svc2).await;
    bed.wait_for("waiting for nixos-upgrade", WAIT, |o| {
        agent_status(o).activation.is_some_and(|a| {
            a.message
                .as_deref()
                .unwrap_or_default()
                .contains("nixos-upgrade.service")
        })
    })
    .await;
    bed.up_to_date(&svc2).await;

    // 1: a failing switch is Failed, and the node Degraded.
    let one = bed
        .flake
        .commit("failing switch", |s| {
            s.service.push('+');
            s.switch_exit = Some(1);
        })
        .unwrap();
    bed.apply(&one).await;
    let o = bed
        .wait_for("Degraded", WAIT, |o| {
            o.status.as_ref().and_then(|s| s.phase) == Some(Phase::Degraded)
        })
        .await;
    let a = agent_status(&o).activation.unwrap();
    assert_eq!((a.state, a.exit_code), (ActivationState::Failed, Some(1)));
    bed.shutdown().await;
}

/// A hanging optional fact (`nixos-version --json`) delays no report, and its host command,
/// killed by its timeout, leaves no process behind. A kernel-less change that NixOS would
/// refuse to switch to (`switch-inhibitors` changed) is staged as needing a reboot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_facts_delay_nothing_and_leave_nothing_behind() {
    let Some(mut bed) = Bed::start("facts", &[], |s| {
        s.switch_inhibitors = Some(r#"{"systemd":"/nix/store/aaa-systemd-257"}"#.into());
    })
    .await
    else {
        return;
    };
    let first = bed.flake.head().to_string();
    bed.apply(&first).await;
    bed.up_to_date(&first).await;

    let hang = bed
        .flake
        .commit("nixos-version hangs", |s| {
            s.service.push('+');
            s.nixos_version_revision = Some("hanging".into());
            s.nixos_version_delay = Some("600".into());
        })
        .unwrap();
    let t = Instant::now();
    bed.apply(&hang).await;
    bed.wait_for("Switched", WAIT, |o| {
        agent_status(o)
            .activation
            .is_some_and(|a| a.state == ActivationState::Switched)
    })
    .await;
    let took = t.elapsed();
    eprintln!("switch with a hanging nixos-version: {took:?}");
    assert!(
        took < Duration::from_secs(9),
        "the Switched report waited for nixos-version: {took:?}"
    );
    bed.up_to_date(&hang).await;
    // The hanging command runs until its 10 s timeout, then nothing of it is left.
    let deadline = Instant::now() + Duration::from_secs(8);
    while bed.host.pids_matching("sleep 600").is_empty() {
        assert!(Instant::now() < deadline, "the slow nixos-version never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bed.host.pids_matching("sleep 600").is_empty() {
        assert!(
            Instant::now() < deadline,
            "a timed-out host command left processes behind"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        bed.host
            .sh_ok("systemctl list-units --no-legend --all 'nixroll-cmd-*' | wc -l")
            .trim(),
        "0"
    );

    // switch-inhibitors changed (a new systemd in newer NixOS): a reboot reason, so the
    // controller grants Boot rather than a switch NixOS would refuse. nixos-version still
    // hangs: the report after the reboot does not wait for it either.
    let inhibited = bed
        .flake
        .commit("new systemd", |s| {
            s.systemd = "systemd-257.1".into();
            s.switch_inhibitors = Some(r#"{"systemd":"/nix/store/bbb-systemd-257.1"}"#.into());
        })
        .unwrap();
    let t = Instant::now();
    bed.apply(&inhibited).await;
    let o = bed.up_to_date(&inhibited).await;
    let took = t.elapsed();
    eprintln!("boot + reboot with a hanging nixos-version: {took:?}");
    assert!(
        took < Duration::from_secs(11),
        "stage, Boot, reboot and the report after it waited for nixos-version: {took:?}"
    );
    // (The reasons are recomputed against the new booted system, so they are empty now.)
    let a = agent_status(&o).activation.unwrap();
    assert_eq!(
        (a.action, a.state),
        (ActivationAction::Bless, ActivationState::Blessed)
    );
    assert!(
        bed.host.agent_log().contains("switch-inhibitors"),
        "staged with the reason switch-inhibitors"
    );
    bed.shutdown().await;
}
