//! `nixroll status --watch`, the real binary, against the embedded Kubernetes API during a
//! rollout (real controller and agents, simulated hosts and kubelets): it draws a frame on every
//! change — the rollout summary moving from 3/3 done through disrupted nodes back to 3/3 done
//! on the new revision — shows the cluster-wide pause when it is set, and sends nothing but
//! one list and one watch per resource (no polling). Its API requests are counted on a port
//! of its own of the same API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use embedded_apiserver::ApiServer;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use nixroll::controller::ControllerConfig;
use nixroll::rollout::MaxUnavailable;
use nixroll::sim::world::World;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(120);

/// The child, killed when the test ends, also when it fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One frame: the lines between two timestamps.
#[derive(Default, Debug, Clone)]
struct Frame(Vec<String>);

impl Frame {
    fn text(&self) -> String {
        self.0.join("\n")
    }
    fn node_line(&self, node: &str) -> Option<&String> {
        self.0.iter().find(|l| l.starts_with(&format!("{node} ")))
    }
}

/// Frames as the child prints them (non-terminal output: a timestamp line, the summary, a
/// blank line, the table, a blank line). A frame is complete at the blank line after its table.
fn read_frames(stdout: std::process::ChildStdout, tx: mpsc::UnboundedSender<Frame>) {
    let mut frame = Frame::default();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { return };
        let complete = line.is_empty() && frame.0.iter().any(|l| l.starts_with("NODE "));
        frame.0.push(line);
        if complete && tx.send(std::mem::take(&mut frame)).is_err() {
            return;
        }
    }
}

async fn until(rx: &mut mpsc::UnboundedReceiver<Frame>, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
    let mut last = Frame::default();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(f) = rx.recv().await {
            if pred(&f) {
                return Some(f);
            }
            last = f;
        }
        None
    })
    .await;
    match found {
        Ok(Some(f)) => f,
        _ => panic!("no frame with {what}; last frame:\n{}", last.text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_follows_a_rollout_and_the_pause_switch() {
    let mut world = World::start(common::world::fast_world(3, 1)).await.unwrap();
    let first = world.head().to_string();
    world.apply_all(&world.spec(&first)).await.unwrap();
    let mut config = ControllerConfig::new("status-watch-test");
    config.policy.max_unavailable = MaxUnavailable::Count(1);
    let controller = world.start_controller(config).await.unwrap();

    // The status client gets a port of its own, so its requests are counted apart.
    let port = ApiServer::start_on(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        world.embedded("test").unwrap().store(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    port.write_kubeconfig(&kubeconfig).unwrap();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_nixroll"))
            .args(["status", "--watch", "--timeout", "30s"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || read_frames(stdout, tx));

    let adopted = until(&mut rx, "3/3 done on the first revision", |f| {
        f.text().contains("rollout: 3/3 done") && f.text().contains("paused: no")
    })
    .await;
    assert!(adopted.text().contains("halted: no"), "{}", adopted.text());
    assert!(
        adopted.0.iter().any(|l| l.starts_with("NODE")
            && l.contains("IN PHASE")
            && l.contains("NEXT WINDOW")
            && l.contains("LAST ERROR")),
        "{}",
        adopted.text()
    );

    let next = world
        .commit("new kernel", |s| {
            s.kernel.push_str("-next");
            s.kernel_modules.push_str("-next");
        })
        .unwrap();
    let short = &next[..8];
    world.apply_all(&world.spec(&next)).await.unwrap();
    let disrupting = until(&mut rx, "a node being disrupted", |f| {
        f.text().contains(", 1 disrupted")
    })
    .await;
    assert!(
        ["Draining", "Activating", "Rebooting", "Verifying"]
            .iter()
            .any(|p| disrupting.text().contains(p)),
        "{}",
        disrupting.text()
    );
    let done = until(&mut rx, "3/3 done on the new revision", |f| {
        f.text().contains("rollout: 3/3 done")
            && ["node-1", "node-2", "node-3"]
                .iter()
                .all(|n| f.node_line(n).is_some_and(|l| l.matches(short).count() == 2))
    })
    .await;
    for n in ["node-1", "node-2", "node-3"] {
        let line = done.node_line(n).unwrap();
        assert!(line.contains("UpToDate") && line.contains("any time"), "{line}");
    }

    // The pause switch, set with one kubectl-equivalent create.
    let cms: Api<ConfigMap> = Api::namespaced(world.client.clone(), nixroll::names::NAMESPACE);
    let mut pause = ConfigMap::default();
    pause.metadata.name = Some(nixroll::names::PAUSE_CONFIGMAP.to_string());
    cms.create(&PostParams::default(), &pause).await.unwrap();
    until(&mut rx, "paused: yes", |f| f.text().contains("paused: yes")).await;

    drop(child);
    controller.stop().await;

    // Watch-driven: a list and a watch of each resource, nothing polled.
    let counts = port.request_counts();
    assert_eq!(counts.verb("get"), 0, "{counts:?}");
    assert_eq!(counts.get("list", "nixosnodes.nixroll.io"), 1, "{counts:?}");
    assert_eq!(counts.get("list", "configmaps"), 1, "{counts:?}");
    assert!(counts.get("watch", "nixosnodes.nixroll.io") >= 1, "{counts:?}");
    assert_eq!(
        counts.total(),
        counts.verb("list") + counts.verb("watch"),
        "only lists and watches: {counts:?}"
    );
    assert!(counts.total() <= 6, "{counts:?}");
}

/// On a terminal the table is redrawn in place (cursor home, clear) and refreshed every second
/// for the ages — locally: the refreshes send no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_frames_redraw_in_place_and_refresh_without_requests() {
    use nixroll::api::NixOSNode;

    let (api, client) = common::api::start_with_crd().await;
    let node = nixroll::sim::fixtures::nixos_node("node-1", "path:/f", &"c".repeat(40));
    Api::<NixOSNode>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let (port, watcher_client) = common::api::second_server(&api).await;
    let mut out: Vec<u8> = Vec::new();
    let opts = nixroll::report::WatchOptions {
        timeout: Duration::from_secs(10),
        terminal: true,
        server: "embedded".into(),
    };
    nixroll::report::watch(
        watcher_client,
        &mut out,
        opts,
        tokio::time::sleep(Duration::from_millis(3500)),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let frames: Vec<&str> = text.split("\x1b[H\x1b[2J").filter(|f| !f.is_empty()).collect();
    assert!(text.starts_with("\x1b[H\x1b[2J"), "{text:?}");
    assert!(
        frames.len() >= 3,
        "one frame at sync, then one per second: {}",
        frames.len()
    );
    for f in &frames {
        assert!(f.starts_with("rollout: 0/1 done"), "{f}");
        assert!(f.contains("node-1  cccccccc  -"), "{f}");
    }
    let counts = port.request_counts();
    assert_eq!(
        counts.total(),
        counts.verb("list") + counts.verb("watch"),
        "refreshes are local: {counts:?}"
    );
    assert!(counts.total() <= 4, "{counts:?}");
}
