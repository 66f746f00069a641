//! `nixroll status`: one line per NixOSNode — node, wanted and running revision, phase,
//! maintenance window, last change — read from the API. `nixroll status --watch`: the same,
//! live, redrawn on every watch event (no polling), with a rollout summary (paused? halted?
//! how many done) and per node the time in phase, next window and last error.

use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::api::{NixOSNode, NixOSNodeStatus, short_revision};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("could not reach the Kubernetes API server at {server}")]
    Unreachable {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the API server at {server} has no NixOSNode CRD (kubectl apply -f crds/, or install nixroll: see README.md)"
    )]
    NoCrd { server: String },
    #[error("the API server at {server} refused to list NixOSNodes")]
    Refused {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("watching NixOSNodes on {server}")]
    Watch {
        server: String,
        #[source]
        source: kube::runtime::watcher::Error,
    },
    #[error("no answer from the Kubernetes API server at {server} within {limit:?}")]
    Timeout { server: String, limit: Duration },
    #[error("writing the status table failed: {0}")]
    Write(#[source] std::io::Error),
}

/// Describes whether a node's maintenance windows are open at `now` (or when they open).
pub type WindowText<'a> = &'a dyn Fn(&NixOSNode, Timestamp) -> String;

/// What a failed list or watch of NixOSNodes on `server` means: the server could not be
/// reached, it has no NixOSNode CRD (404 on the kind's path), or it refused (403, …).
pub fn listing_failed(server: &str, error: kube::Error) -> ReportError {
    let server = server.to_string();
    match error {
        kube::Error::Api(s) if s.code == 404 => ReportError::NoCrd { server },
        e @ kube::Error::Api(_) => ReportError::Refused { server, source: e },
        e => ReportError::Unreachable { server, source: e },
    }
}

/// Fetch all NixOSNodes from `server` (the client's URL, for messages).
pub async fn fetch(client: Client, server: &str, limit: Duration) -> Result<Vec<NixOSNode>, ReportError> {
    let api: Api<NixOSNode> = Api::all(client);
    let list = tokio::time::timeout(limit, api.list(&ListParams::default()))
        .await
        .map_err(|_| ReportError::Timeout {
            server: server.to_string(),
            limit,
        })?
        .map_err(|e| listing_failed(server, e))?;
    Ok(list.items)
}

/// The WINDOW column: `any time` without windows, `open` inside one, else when the next
/// one opens (or what is wrong with them).
pub fn window_text(node: &NixOSNode, now: Timestamp) -> String {
    use crate::rollout::window;
    let windows = &node.spec.maintenance_windows;
    if windows.is_empty() {
        return "any time".into();
    }
    match window::is_open(windows, now) {
        Ok(true) => "open".into(),
        Ok(false) => match window::next_opening(windows, now) {
            Ok(Some(t)) => format!("opens in {}", human(t.duration_since(now))),
            Ok(None) => "closed".into(),
            Err(e) => format!("invalid: {e}"),
        },
        Err(e) => format!("invalid: {e}"),
    }
}

/// Render the table (sorted by node name).
pub fn table(nodes: &[NixOSNode], now: Timestamp, window: WindowText<'_>) -> String {
    let mut rows = vec![
        [
            "NODE",
            "WANTED",
            "RUNNING",
            "PHASE",
            "BUILD",
            "WINDOW",
            "LAST CHANGE",
        ]
        .map(String::from),
    ];
    for n in by_name(nodes) {
        let status = n.status.clone().unwrap_or_default();
        let last = status
            .last_transition_time
            .as_ref()
            .map(|t| format!("{} ago", human(now.duration_since(t.0))))
            .unwrap_or_else(|| "-".into());
        rows.push([
            n.name_any(),
            wanted(n),
            running_text(&status),
            phase_text(n, &status),
            build_text(&status),
            window(n, now),
            last,
        ]);
    }
    columns(&rows)
}

/// The nodes sorted by name.
fn by_name(nodes: &[NixOSNode]) -> Vec<&NixOSNode> {
    let mut sorted: Vec<&NixOSNode> = nodes.iter().collect();
    sorted.sort_by_key(|n| n.name_any());
    sorted
}

/// The running revision, short, or `-`.
fn running_text(status: &NixOSNodeStatus) -> String {
    status
        .revision
        .as_deref()
        .map(short_revision)
        .unwrap_or_else(|| "-".into())
}

/// The phase (or `-`), with ` (suspended)` when the node's rollout is suspended.
fn phase_text(n: &NixOSNode, status: &NixOSNodeStatus) -> String {
    let mut phase = status.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    if n.spec.suspend {
        phase.push_str(" (suspended)");
    }
    phase
}

/// With a builder: where the node's system is and which builder it comes from
/// (`Building on node-1`, `Fetching from node-1`, `Staged`), or what a builder builds for
/// others (`builds 2`); `-` otherwise.
fn build_text(status: &NixOSNodeStatus) -> String {
    use crate::api::BuildProgress as P;
    let own = status
        .target
        .as_ref()
        .and_then(|t| t.build.as_ref())
        .and_then(|b| {
            let p = b.progress?;
            let from = b.builder.as_deref().unwrap_or("?");
            Some(match p {
                P::Queued => format!("Queued for {from}"),
                P::Building => format!("Building on {from}"),
                P::Fetching => format!("Fetching from {from}"),
                P::Failed => format!("Failed on {from}"),
                P::Built | P::Staged => p.to_string(),
            })
        });
    let serving = (!status.builds.is_empty()).then(|| {
        let reports = status
            .agent
            .as_ref()
            .map(|a| a.builds.as_slice())
            .unwrap_or_default();
        let built = status
            .builds
            .iter()
            .filter(|r| {
                reports
                    .iter()
                    .any(|x| x.installable == r.installable && x.state == crate::api::BuildState::Built)
            })
            .count();
        format!("builder {built}/{} built", status.builds.len())
    });
    match (own, serving) {
        (Some(o), Some(s)) => format!("{o}; {s}"),
        (Some(o), None) => o,
        (None, Some(s)) => s,
        (None, None) => "-".into(),
    }
}

/// Whether the cluster-wide pause switch is set, as far as this client can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pause {
    Paused,
    Running,
    /// Not known yet, or not readable (for example no RBAC on ConfigMaps in nixroll-system).
    Unknown(String),
}

/// The rollout summary line: how many nodes run their wanted revision, how many are being
/// disrupted, waiting, staging or Degraded, and whether admissions are paused or halted.
/// The wanted revision, shortened: `spec.revision`, or for a node that follows a source what
/// the controller wants (`status.wanted`), marked with `~`.
fn wanted(n: &NixOSNode) -> String {
    if !n.spec.revision.is_empty() {
        return short_revision(&n.spec.revision);
    }
    match n.status.as_ref().and_then(|s| s.wanted.as_deref()) {
        Some(w) if !w.is_empty() => format!("~{w}"),
        _ => "~".into(),
    }
}

pub fn summary(nodes: &[NixOSNode], pause: &Pause) -> String {
    use crate::api::Phase;
    let mut done = 0;
    let (mut disrupted, mut waiting, mut staging, mut degraded, mut suspended) = (0, 0, 0, 0, 0);
    for n in nodes {
        let status = n.status.as_ref();
        let phase = status.and_then(|s| s.phase);
        let running_wanted = if n.spec.revision.is_empty() {
            // Following a source: the controller's wanted revision.
            let running = status.and_then(|s| s.running.as_deref());
            running.is_some() && running == status.and_then(|s| s.wanted.as_deref())
        } else {
            status.and_then(|s| s.revision.as_deref()) == Some(n.spec.revision.as_str())
        };
        if n.spec.suspend {
            suspended += 1;
        }
        match phase {
            Some(Phase::UpToDate) if running_wanted => done += 1,
            Some(Phase::Draining | Phase::Activating | Phase::Rebooting | Phase::Verifying) => disrupted += 1,
            Some(Phase::Waiting) => waiting += 1,
            Some(Phase::Staging) => staging += 1,
            Some(Phase::Degraded) => degraded += 1,
            _ => {}
        }
    }
    let pause = match pause {
        Pause::Paused => {
            "yes (kubectl -n nixroll-system delete configmap nixroll-pause to resume)".to_string()
        }
        Pause::Running => "no".to_string(),
        Pause::Unknown(why) => format!("unknown ({why})"),
    };
    let halted = if degraded > 0 {
        format!(
            "yes, {degraded} Degraded (admissions stop at the controller's --failure-threshold, default 1)"
        )
    } else {
        "no".to_string()
    };
    let mut line = format!(
        "rollout: {done}/{} done, {disrupted} disrupted, {waiting} waiting, {staging} staging",
        nodes.len()
    );
    if suspended > 0 {
        line.push_str(&format!(", {suspended} suspended"));
    }
    line.push_str(&format!("\npaused: {pause}\nhalted: {halted}\n"));
    line
}

/// The node's last error: the failure that made it Degraded, else the agent's last host error.
fn last_error(n: &NixOSNode) -> String {
    let Some(status) = n.status.as_ref() else {
        return "-".into();
    };
    let text = if status.phase == Some(crate::api::Phase::Degraded) {
        status
            .failed
            .as_ref()
            .map(|f| format!("{}: {}", f.reason, f.message))
            .or_else(|| status.message.clone())
    } else {
        None
    }
    .or_else(|| {
        status
            .agent
            .as_ref()
            .and_then(|a| a.last_error.as_ref())
            .map(|e| e.message.clone())
    });
    match text {
        Some(t) => {
            let one_line = t.split_whitespace().collect::<Vec<_>>().join(" ");
            if one_line.chars().count() > 60 {
                format!("{}…", one_line.chars().take(59).collect::<String>())
            } else {
                one_line
            }
        }
        None => "-".into(),
    }
}

/// One frame of `nixroll status --watch`: summary, then per node wanted/running revision,
/// phase, time in phase, next window and last error.
pub fn live_table(nodes: &[NixOSNode], pause: &Pause, now: Timestamp, window: WindowText<'_>) -> String {
    let mut rows = vec![
        [
            "NODE",
            "WANTED",
            "RUNNING",
            "PHASE",
            "IN PHASE",
            "NEXT WINDOW",
            "LAST ERROR",
        ]
        .map(String::from),
    ];
    for n in by_name(nodes) {
        let status = n.status.clone().unwrap_or_default();
        rows.push([
            n.name_any(),
            wanted(n),
            running_text(&status),
            phase_text(n, &status),
            status
                .last_transition_time
                .map(|t| human(now.duration_since(t.0)))
                .unwrap_or_else(|| "-".into()),
            window(n, now),
            last_error(n),
        ]);
    }
    let mut out = summary(nodes, pause);
    out.push('\n');
    out.push_str(&columns(&rows));
    out
}

fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A watch error before the first complete list, explained as [`listing_failed`] does.
fn watch_failed(server: &str, error: kube::runtime::watcher::Error) -> ReportError {
    use kube::runtime::watcher::Error;
    match error {
        Error::InitialListFailed(e) | Error::WatchStartFailed(e) | Error::WatchFailed(e) => {
            listing_failed(server, e)
        }
        Error::WatchError(s) if s.code == 404 => ReportError::NoCrd {
            server: server.to_string(),
        },
        e => ReportError::Watch {
            server: server.to_string(),
            source: e,
        },
    }
}

/// How `nixroll status --watch` draws.
pub struct WatchOptions {
    /// How long to wait for the first complete list of NixOSNodes.
    pub timeout: Duration,
    /// A terminal: clear the screen before each frame and refresh the ages every second
    /// (locally, no request). Otherwise frames are appended, separated by a blank line, and
    /// drawn only when something changed.
    pub terminal: bool,
    /// The API server's URL, for messages.
    pub server: String,
}

/// `nixroll status --watch`: redraw the live table on every change of a NixOSNode or of the
/// pause switch, until `stop` completes. Watch-driven: one list + watch of NixOSNodes and one
/// field-selected list + watch of the pause ConfigMap; nothing is polled.
pub async fn watch(
    client: Client,
    out: &mut (dyn std::io::Write + Send),
    opts: WatchOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ReportError> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::{WatchStreamExt, reflector};

    let (reader, writer) = reflector::store::<NixOSNode>();
    let nodes = reflector(
        writer,
        watcher::watcher(Api::<NixOSNode>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    let pause_cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", crate::names::PAUSE_CONFIGMAP));
    let pauses = watcher::watcher(
        Api::<ConfigMap>::namespaced(client, crate::names::NAMESPACE),
        pause_cfg,
    )
    .default_backoff();
    futures::pin_mut!(nodes, pauses, stop);

    let mut pause = Pause::Unknown("not read yet".into());
    let mut listed_pause = false;
    let mut synced = false;
    let deadline = tokio::time::sleep(opts.timeout);
    futures::pin_mut!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let mut dirty = false;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = &mut deadline, if !synced => return Err(ReportError::Timeout {
                server: opts.server.clone(),
                limit: opts.timeout,
            }),
            _ = tick.tick(), if opts.terminal && synced => dirty = true,
            ev = nodes.next() => match ev {
                Some(Ok(Event::InitDone)) => { synced = true; dirty = true; }
                Some(Ok(Event::Apply(_) | Event::Delete(_))) => dirty = synced,
                Some(Ok(Event::Init | Event::InitApply(_))) => {}
                Some(Err(e)) if !synced => return Err(watch_failed(&opts.server, e)),
                Some(Err(_)) => {}
                None => return Ok(()),
            },
            ev = pauses.next() => {
                let before = pause.clone();
                // A (re)list is Init, InitApply per object, InitDone: the switch is set or
                // unset only once the list is complete.
                match ev {
                    Some(Ok(Event::Init)) => listed_pause = false,
                    Some(Ok(Event::InitApply(_))) => listed_pause = true,
                    Some(Ok(Event::InitDone)) => {
                        pause = if listed_pause { Pause::Paused } else { Pause::Running };
                    }
                    Some(Ok(Event::Apply(_))) => pause = Pause::Paused,
                    Some(Ok(Event::Delete(_))) => pause = Pause::Running,
                    Some(Err(e)) => pause = Pause::Unknown(format!("cannot watch the pause switch: {e}")),
                    None => {}
                }
                dirty = synced && pause != before;
            }
        }
        if !dirty {
            continue;
        }
        let snapshot: Vec<NixOSNode> = reader.state().iter().map(|n| (**n).clone()).collect();
        let now = Timestamp::now();
        let frame = live_table(&snapshot, &pause, now, &window_text);
        let text = if opts.terminal {
            format!("\x1b[H\x1b[2J{frame}")
        } else {
            format!("{}\n{frame}\n", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        };
        out.write_all(text.as_bytes()).map_err(ReportError::Write)?;
        out.flush().map_err(ReportError::Write)?;
    }
}

/// `3m12s`-style rendering of a non-negative duration.
pub fn human(d: jiff::SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h >= 48 {
        format!("{}d", h / 24)
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::api::{NixOSNodeSpec, NixOSNodeStatus, Phase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn table_shows_wanted_running_phase_window_and_age() {
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let mut a = NixOSNode::new(
            "node-b",
            NixOSNodeSpec {
                suspend: true,
                ..crate::sim::fixtures::spec("path:/f", &"b".repeat(40))
            },
        );
        a.status = Some(NixOSNodeStatus {
            phase: Some(Phase::Waiting),
            revision: Some("a".repeat(40)),
            last_transition_time: Some(Time("2026-11-26T09:56:30Z".parse().unwrap())),
            ..Default::default()
        });
        let mut b = a.clone();
        b.metadata.name = Some("node-a".into());
        b.status = None;
        b.spec.suspend = false;
        let t = table(&[a, b], now, &|_, _| "open".into());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE"));
        assert!(lines[1].starts_with("node-a"), "{t}");
        assert!(
            lines[2].contains("bbbbbbbb") && lines[2].contains("aaaaaaaa"),
            "{t}"
        );
        assert!(
            lines[2].contains("Waiting (suspended)") && lines[2].contains("3m30s ago"),
            "{t}"
        );
        assert!(lines[2].contains("open"));
    }

    /// The BUILD column: where each node's system is on its way from the builder, and on the
    /// builder how many of its builds are done.
    #[test]
    fn build_column_shows_building_built_fetching_staged() {
        use crate::api::{
            AgentStatus, BuildProgress, BuildReport, BuildRequest, BuildState, Target, TargetBuild,
        };
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let node = |name: &str, progress: Option<BuildProgress>| {
            let mut n = crate::sim::fixtures::nixos_node(name, "path:/f", &"b".repeat(40));
            n.status = Some(NixOSNodeStatus {
                phase: Some(Phase::Staging),
                target: Some(Target {
                    build: progress.map(|p| TargetBuild {
                        builder: Some("node-1".into()),
                        progress: Some(p),
                        built_at: None,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            n
        };
        let mut b = node("node-1", Some(BuildProgress::Built));
        let st = b.status.as_mut().unwrap();
        st.builds = ["a", "b"]
            .map(|i| BuildRequest {
                installable: i.into(),
                nodes: 1,
                retry: None,
            })
            .to_vec();
        st.agent = Some(AgentStatus {
            builds: vec![BuildReport {
                installable: "a".into(),
                state: BuildState::Built,
                system: None,
                message: None,
                at: Time(now),
                retry: None,
            }],
            ..Default::default()
        });
        let nodes = [
            b,
            node("node-2", Some(BuildProgress::Building)),
            node("node-3", Some(BuildProgress::Fetching)),
            node("node-4", Some(BuildProgress::Staged)),
            node("node-5", None),
            node("node-6", Some(BuildProgress::Queued)),
        ];
        let t = table(&nodes, now, &|_, _| "open".into());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("BUILD"), "{t}");
        for (line, want) in lines[1..].iter().zip([
            "Built; builder 1/2 built",
            "Building on node-1",
            "Fetching from node-1",
            "Staged",
            "Staging  -",
            "Queued for node-1",
        ]) {
            assert!(line.contains(want), "{want:?} not in {line:?}");
        }
    }

    #[test]
    fn window_column_says_open_or_when_it_opens() {
        let mut n = crate::sim::fixtures::nixos_node("n", "path:/f", &"b".repeat(40));
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        assert_eq!(window_text(&n, now), "any time");
        n.spec.maintenance_windows = vec![crate::api::MaintenanceWindow {
            days: vec![],
            start: "09:00".into(),
            end: "11:00".into(),
            time_zone: "UTC".into(),
        }];
        assert_eq!(window_text(&n, now), "open");
        n.spec.maintenance_windows[0].start = "12:30".into();
        n.spec.maintenance_windows[0].end = "13:00".into();
        assert_eq!(window_text(&n, now), "opens in 2h30m");
    }

    #[test]
    fn summary_counts_done_disrupted_and_says_paused_and_halted() {
        let spec = crate::sim::fixtures::spec("path:/f", &"b".repeat(40));
        let node = |name: &str, phase: Phase, running: &str| {
            let mut n = NixOSNode::new(name, spec.clone());
            n.status = Some(NixOSNodeStatus {
                phase: Some(phase),
                revision: Some(running.repeat(40)),
                ..Default::default()
            });
            n
        };
        let mut degraded = node("d", Phase::Degraded, "a");
        if let Some(s) = degraded.status.as_mut() {
            s.failed = Some(crate::api::FailedTarget {
                revision: "b".repeat(40),
                system: None,
                reason: "BootedWrongSystem".into(),
                message: "booted /nix/store/old, expected /nix/store/new ".repeat(3),
                at: Time("2026-11-26T09:00:00Z".parse().unwrap()),
            });
        }
        let nodes = vec![
            node("a", Phase::UpToDate, "b"),
            node("b", Phase::UpToDate, "a"),
            node("c", Phase::Draining, "a"),
            degraded,
        ];
        let s = summary(&nodes, &Pause::Paused);
        assert!(
            s.starts_with("rollout: 1/4 done, 1 disrupted, 0 waiting, 0 staging"),
            "{s}"
        );
        assert!(
            s.contains("paused: yes") && s.contains("halted: yes, 1 Degraded"),
            "{s}"
        );
        let s = summary(&nodes[..3], &Pause::Unknown("forbidden".into()));
        assert!(
            s.contains("paused: unknown (forbidden)") && s.contains("halted: no"),
            "{s}"
        );
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let t = live_table(&nodes, &Pause::Running, now, &|_, _| "open".into());
        let line = t.lines().find(|l| l.starts_with("d ")).unwrap();
        assert!(
            line.contains("Degraded") && line.contains("BootedWrongSystem: booted"),
            "{line}"
        );
        assert!(line.ends_with('…') && line.len() < 200, "{line}");
    }
}
