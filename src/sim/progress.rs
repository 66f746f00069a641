//! Following a rollout from the NixOSNode objects: the live table and `--json` lines of
//! `nixroll demo`, and the timing summary (disruption time and orchestration overhead).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::api::{NixOSNode, Phase};

/// What the demo knows about one node.
#[derive(Clone, Debug)]
pub struct NodeProgress {
    pub phase: Phase,
    /// Full revision the node is proven to run.
    pub revision: Option<String>,
    pub message: Option<String>,
    pub since: Instant,
    /// When the node entered its first disruptive phase of this rollout.
    pub disrupted_at: Option<Instant>,
    /// Total time spent in disruptive phases (and Degraded while cordoned).
    pub disrupted_for: Duration,
    pub rebooted: bool,
}

/// One phase change, as printed by `--json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PhaseChange {
    pub time: String,
    pub node: String,
    pub phase: Phase,
    /// The revision the node runs (proven), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wanted: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The state of every node, updated from watch events.
#[derive(Debug, Default)]
pub struct Progress {
    pub nodes: BTreeMap<String, NodeProgress>,
}

impl Progress {
    /// Record the object; returns the phase change if the phase (or running revision) changed.
    pub fn observe(&mut self, obj: &NixOSNode, now: Instant) -> Option<PhaseChange> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let status = obj.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        let revision = status.revision.clone();
        let rebooted = status
            .agent
            .as_ref()
            .and_then(|a| a.activation.as_ref())
            .is_some_and(|a| a.state == crate::api::ActivationState::Rebooted);
        let entry = self.nodes.entry(name.clone()).or_insert_with(|| NodeProgress {
            phase,
            revision: revision.clone(),
            message: status.message.clone(),
            since: now,
            disrupted_at: None,
            disrupted_for: Duration::ZERO,
            rebooted: false,
        });
        let is_new = entry.since == now && entry.phase == phase;
        entry.message = status.message.clone();
        entry.rebooted |= rebooted;
        if !is_new && entry.phase == phase && entry.revision == revision {
            return None;
        }
        let was_disruptive = entry.phase.is_disruptive();
        if was_disruptive
            && !phase.is_disruptive()
            && let Some(at) = entry.disrupted_at.take()
        {
            entry.disrupted_for += now.saturating_duration_since(at);
        }
        if !was_disruptive && phase.is_disruptive() {
            entry.disrupted_at = Some(now);
        }
        if entry.phase != phase {
            entry.since = now;
        }
        entry.phase = phase;
        entry.revision = revision.clone();
        Some(PhaseChange {
            time: jiff::Timestamp::now().to_string(),
            node: name,
            phase,
            revision,
            wanted: if obj.spec.revision.is_empty() {
                // Following a source: what the controller targets.
                status
                    .target
                    .as_ref()
                    .map(|t| t.revision.clone())
                    .or(status.revision.clone())
            } else {
                Some(obj.spec.revision.clone())
            },
            message: status.message,
        })
    }

    /// Whether every node is UpToDate on `revision`.
    pub fn converged(&self, revision: &str, expected_nodes: usize) -> bool {
        self.nodes.len() == expected_nodes
            && self
                .nodes
                .values()
                .all(|n| n.phase == Phase::UpToDate && n.revision.as_deref() == Some(revision))
    }

    /// The table shown in the terminal.
    pub fn table(&self, now: Instant) -> Vec<String> {
        let mut lines = vec![format!(
            "{:<14} {:<11} {:<10} {:>9}  {}",
            "NODE", "PHASE", "RUNNING", "IN PHASE", "MESSAGE"
        )];
        for (name, n) in &self.nodes {
            let rev = n
                .revision
                .as_deref()
                .map(crate::api::short_revision)
                .unwrap_or_else(|| "-".into());
            let secs = now.saturating_duration_since(n.since).as_secs_f64();
            let mut msg = n.message.clone().unwrap_or_default();
            if msg.chars().count() > 60 {
                msg = msg.chars().take(57).collect::<String>() + "...";
            }
            lines.push(format!(
                "{name:<14} {:<11} {rev:<10} {secs:>8.1}s  {msg}",
                n.phase.as_str()
            ));
        }
        lines
    }
}

/// Draws the table in place on a terminal (ANSI), or prints a line per change otherwise.
pub struct Renderer {
    pub json: bool,
    pub tty: bool,
    drawn: usize,
}

impl Renderer {
    pub fn new(json: bool, tty: bool) -> Self {
        Renderer { json, tty, drawn: 0 }
    }

    pub fn change(&mut self, out: &mut impl Write, change: &PhaseChange) -> std::io::Result<()> {
        if self.json {
            let line = serde_json::to_string(change).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        } else if !self.tty {
            writeln!(
                out,
                "{} {:<14} {:<11} {}",
                change.time,
                change.node,
                change.phase.as_str(),
                change
                    .revision
                    .as_deref()
                    .map(crate::api::short_revision)
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        out.flush()
    }

    /// Take the table off the screen (terminal mode only), so that a message can be printed
    /// where it stood and the next redraw starts a whole table below it. Without this, a
    /// redraw after a message moved up over the message and left the top of the old table.
    pub fn clear(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.json || !self.tty || self.drawn == 0 {
            return Ok(());
        }
        write!(out, "\x1b[{}A\x1b[J", self.drawn)?;
        self.drawn = 0;
        out.flush()
    }

    /// Redraw the table (terminal mode only).
    pub fn redraw(&mut self, out: &mut impl Write, progress: &Progress, now: Instant) -> std::io::Result<()> {
        if self.json || !self.tty {
            return Ok(());
        }
        if self.drawn > 0 {
            write!(out, "\x1b[{}A", self.drawn)?;
        }
        let lines = progress.table(now);
        for l in &lines {
            writeln!(out, "\x1b[2K{l}")?;
        }
        self.drawn = lines.len();
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::api::NixOSNodeStatus;

    fn obj(name: &str, phase: Phase, rev: Option<&str>) -> NixOSNode {
        let mut o = crate::sim::fixtures::nixos_node(name, "path:/x", &"b".repeat(40));
        o.status = Some(NixOSNodeStatus {
            phase: Some(phase),
            revision: rev.map(str::to_string),
            ..Default::default()
        });
        o
    }

    #[test]
    fn disruption_time_accumulates_over_disruptive_phases_only() {
        let mut p = Progress::default();
        let t0 = Instant::now();
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        assert!(p.observe(&obj("n1", Phase::UpToDate, Some(&a)), t0).is_some());
        assert!(
            p.observe(&obj("n1", Phase::UpToDate, Some(&a)), t0 + Duration::from_secs(1))
                .is_none()
        );
        p.observe(&obj("n1", Phase::Waiting, Some(&a)), t0 + Duration::from_secs(2));
        p.observe(&obj("n1", Phase::Draining, Some(&a)), t0 + Duration::from_secs(3));
        p.observe(
            &obj("n1", Phase::Rebooting, Some(&a)),
            t0 + Duration::from_secs(5),
        );
        let c = p
            .observe(
                &obj("n1", Phase::UpToDate, Some(&b)),
                t0 + Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(c.phase, Phase::UpToDate);
        assert_eq!(p.nodes["n1"].disrupted_for, Duration::from_secs(7));
        assert!(p.converged(&b, 1));
        assert!(!p.converged(&b, 2));
        let line = serde_json::to_value(&c).unwrap();
        assert_eq!(line["node"], "n1");
        assert_eq!(line["phase"], "UpToDate");
        assert_eq!(line["revision"], b);
        assert!(line["time"].as_str().unwrap().parse::<jiff::Timestamp>().is_ok());
    }

    /// What a terminal shows after `bytes` (only the sequences the renderer writes).
    fn screen(bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let mut lines: Vec<String> = vec![String::new()];
        let mut row = 0usize;
        let mut rest = text.as_str();
        while let Some(c) = rest.chars().next() {
            if let Some(esc) = rest.strip_prefix("\x1b[") {
                let end = esc.find(|c: char| c.is_ascii_alphabetic()).unwrap();
                let (arg, cmd) = (&esc[..end], &esc[end..end + 1]);
                match cmd {
                    "A" => row = row.saturating_sub(arg.parse::<usize>().unwrap()),
                    "K" => lines[row].clear(),
                    "J" => {
                        lines.truncate(row + 1);
                        lines[row].clear();
                    }
                    other => panic!("unexpected sequence {other}"),
                }
                rest = &esc[end + 1..];
                continue;
            }
            if c == '\n' {
                row += 1;
                if lines.len() <= row {
                    lines.push(String::new());
                }
            } else {
                lines[row].push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        lines.into_iter().filter(|l| !l.is_empty()).collect()
    }

    #[test]
    fn a_message_between_frames_leaves_no_partial_table_behind() {
        let t0 = Instant::now();
        let a = "a".repeat(40);
        let mut p = Progress::default();
        let mut r = Renderer::new(false, true);
        let mut out = Vec::new();
        p.observe(&obj("n1", Phase::UpToDate, Some(&a)), t0);
        p.observe(&obj("n2", Phase::UpToDate, Some(&a)), t0);
        r.redraw(&mut out, &p, t0).unwrap();
        for n in ["n3", "n4", "n5"] {
            p.observe(&obj(n, Phase::UpToDate, Some(&a)), t0);
        }
        r.redraw(&mut out, &p, t0).unwrap();
        r.clear(&mut out).unwrap();
        out.extend_from_slice(b"\nnixroll demo: all nodes run aaaaaaaa; rolling out\n\n");
        p.observe(&obj("n1", Phase::Draining, Some(&a)), t0);
        r.redraw(&mut out, &p, t0).unwrap();
        r.redraw(&mut out, &p, t0).unwrap();
        let shown = screen(&out);
        let headers = shown.iter().filter(|l| l.starts_with("NODE")).count();
        assert_eq!(headers, 1, "one table on screen:\n{}", shown.join("\n"));
        assert_eq!(
            shown.len(),
            1 + 1 + 5,
            "message, header, five nodes:\n{}",
            shown.join("\n")
        );
        assert!(shown[0].starts_with("nixroll demo: all nodes run"), "{shown:?}");
    }
}
