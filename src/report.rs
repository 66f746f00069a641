//! `nixroll status`: one line per NixOSNode — node, wanted and running revision, phase,
//! maintenance window, last change — read from the API.

use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::api::{NixOSNode, short_revision};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("listing NixOSNodes failed: {0} (is the CRD installed? kubectl apply -f crds/)")]
    List(#[source] kube::Error),
    #[error("listing NixOSNodes timed out after {0:?}")]
    Timeout(Duration),
}

/// Describes whether a node's maintenance windows are open at `now` (or when they open).
pub type WindowText<'a> = &'a dyn Fn(&NixOSNode, Timestamp) -> String;

/// Fetch all NixOSNodes and render the table.
pub async fn fetch(client: Client, limit: Duration) -> Result<Vec<NixOSNode>, ReportError> {
    let api: Api<NixOSNode> = Api::all(client);
    let list = tokio::time::timeout(limit, api.list(&ListParams::default()))
        .await
        .map_err(|_| ReportError::Timeout(limit))?
        .map_err(ReportError::List)?;
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
    let mut rows: Vec<[String; 6]> = vec![[
        "NODE".into(),
        "WANTED".into(),
        "RUNNING".into(),
        "PHASE".into(),
        "WINDOW".into(),
        "LAST CHANGE".into(),
    ]];
    let mut sorted: Vec<&NixOSNode> = nodes.iter().collect();
    sorted.sort_by_key(|n| n.name_any());
    for n in sorted {
        let status = n.status.clone().unwrap_or_default();
        let running = status
            .revision
            .as_deref()
            .map(short_revision)
            .unwrap_or_else(|| "-".into());
        let phase = status.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let last = status
            .last_transition_time
            .map(|t| format!("{} ago", human(now.duration_since(t.0))))
            .unwrap_or_else(|| "-".into());
        let mut phase_col = phase;
        if n.spec.suspend {
            phase_col.push_str(" (suspended)");
        }
        rows.push([
            n.name_any(),
            short_revision(&n.spec.revision),
            running,
            phase_col,
            window(n, now),
            last,
        ]);
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
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
                flake: "path:/f".into(),
                revision: "b".repeat(40),
                configuration: None,
                maintenance_windows: vec![],
                reboot: Default::default(),
                drain: None,
                suspend: true,
                secrets: Vec::new(),
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

    #[test]
    fn window_column_says_open_or_when_it_opens() {
        let mut n = NixOSNode::new(
            "n",
            NixOSNodeSpec {
                flake: "path:/f".into(),
                revision: "b".repeat(40),
                configuration: None,
                maintenance_windows: vec![],
                reboot: Default::default(),
                drain: None,
                suspend: false,
                secrets: Vec::new(),
            },
        );
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
}
