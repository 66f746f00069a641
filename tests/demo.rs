//! `nixroll demo` and `nixroll demo --follow`, the README's first command, run as a user runs
//! them: the release binary's own code path (here the test build of the binary), its `--json`
//! phase changes on standard output and its summary on standard error. The rollout's
//! invariants are checked from what the demo printed, not from inside it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

mod common;

/// Each demo gives up by itself after `--timeout`; this bounds the process around it.
const WALL: Duration = Duration::from_secs(300);

struct Run {
    /// The `--json` lines: one phase change each, in the order the demo saw them.
    changes: Vec<Value>,
    stderr: String,
}

async fn demo(args: &[&str]) -> Run {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nixroll"))
        .arg("demo")
        .args(args)
        .args(["--json", "--timeout", "4m"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WALL, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("nixroll demo {args:?} still running after {WALL:?}"))
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "nixroll demo {args:?} failed ({}):\n{stderr}",
        out.status
    );
    let changes = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"))
        })
        .collect();
    // What it tells the user to run works on a real kubectl: one resource type per `-w`.
    let watches = stderr
        .lines()
        .filter(|l| common::watched_types(l).is_some())
        .count();
    assert!(
        watches > 0,
        "nixroll demo {args:?} prints a kubectl watch:\n{stderr}"
    );
    let bad = common::multi_type_watches(&stderr);
    assert!(bad.is_empty(), "kubectl refuses -w with several types: {bad:?}");
    Run { changes, stderr }
}

fn field<'v>(change: &'v Value, name: &str) -> Option<&'v str> {
    change.get(name).and_then(Value::as_str)
}

/// The last phase change of each node.
fn last_by_node(run: &Run) -> BTreeMap<String, Value> {
    let mut last = BTreeMap::new();
    for c in &run.changes {
        last.insert(field(c, "node").unwrap().to_string(), c.clone());
    }
    last
}

/// The most nodes seen in a disruptive phase (Draining → Verifying) at once, replaying the
/// changes in order.
fn most_disrupted_at_once(run: &Run) -> usize {
    let mut phase: BTreeMap<&str, &str> = BTreeMap::new();
    let mut most = 0;
    for c in &run.changes {
        phase.insert(field(c, "node").unwrap(), field(c, "phase").unwrap());
        let now = phase
            .values()
            .filter(|p| matches!(**p, "Draining" | "Activating" | "Rebooting" | "Verifying"))
            .count();
        most = most.max(now);
    }
    most
}

fn assert_all_up_to_date_on(run: &Run, nodes: usize) -> String {
    let last = last_by_node(run);
    assert_eq!(last.len(), nodes, "every node appears: {last:?}");
    let wanted: BTreeSet<&str> = last.values().map(|c| field(c, "wanted").unwrap()).collect();
    assert_eq!(wanted.len(), 1, "one revision everywhere at the end: {last:?}");
    for (node, c) in &last {
        assert_eq!(field(c, "phase"), Some("UpToDate"), "{node} ends UpToDate: {c}");
        assert_eq!(
            field(c, "revision"),
            field(c, "wanted"),
            "{node} runs what it wants: {c}"
        );
    }
    wanted.into_iter().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_rolls_a_new_kernel_over_five_nodes_one_at_a_time() {
    let run = demo(&[]).await;
    let first = field(&run.changes[0], "wanted").unwrap().to_string();
    let end = assert_all_up_to_date_on(&run, 5);
    assert_ne!(end, first, "the demo rolled a new revision out");
    // A new kernel: every node is drained, rebooted and verified, one at a time (the default
    // budget of 1).
    for node in last_by_node(&run).keys() {
        let phases: BTreeSet<&str> = run
            .changes
            .iter()
            .filter(|c| field(c, "node") == Some(node.as_str()))
            .filter_map(|c| field(c, "phase"))
            .collect();
        for p in ["Draining", "Rebooting", "Verifying", "UpToDate"] {
            assert!(phases.contains(p), "{node} went through {p}: {phases:?}");
        }
        assert!(!phases.contains("Degraded"), "{node} never failed: {phases:?}");
    }
    assert_eq!(most_disrupted_at_once(&run), 1, "one node disrupted at a time");
    for expected in [
        "5 nodes rolled out in",
        "secret /etc/wireguard/wg0.key rewritten from Secret node-1-vpn/key",
        "mean overhead per node",
        "reboot_requested_to_ready",
    ] {
        assert!(
            run.stderr.contains(expected),
            "stderr says {expected:?}:\n{}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_follow_applies_two_pushes_by_itself() {
    let run = demo(&["--follow"]).await;
    let end = assert_all_up_to_date_on(&run, 5);
    // The first revision, then the two commits the demo pushed to the branch.
    let wanted: BTreeSet<&str> = run.changes.iter().filter_map(|c| field(c, "wanted")).collect();
    assert_eq!(wanted.len(), 3, "three revisions wanted over the run: {wanted:?}");
    assert!(wanted.contains(end.as_str()));
    assert_eq!(most_disrupted_at_once(&run), 1, "one node disrupted at a time");
    for commit in ["commit 1 (", "commit 2 ("] {
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(commit))
            .unwrap_or_else(|| panic!("stderr reports {commit:?}:\n{}", run.stderr));
        assert!(line.contains("reached all 5 nodes"), "{line}");
    }
    assert!(
        run.stderr.contains(&format!("commit 2 ({})", &end[..8])),
        "the last commit is what every node runs:\n{}",
        run.stderr
    );
}

/// `nixroll demo --pools --nodes 6`: the canary (node-2) runs the new revision before any
/// other node is drained, and the others start only after its 5 s soak; pool zone-b (node-4,
/// node-6), behind a health gate that blocks for 8 s, starts after that too; every node ends
/// on the new revision, and within each pool never two nodes disrupted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pools_rolls_the_canary_first_then_the_pools_behind_their_gate() {
    let run = demo(&["--pools", "--nodes", "6"]).await;
    assert!(
        run.stderr.contains("pool canary") && run.stderr.contains("health gate"),
        "{}",
        run.stderr
    );
    let time = |c: &Value| field(c, "time").unwrap().parse::<jiff::Timestamp>().unwrap();
    let wanted = |c: &Value| field(c, "wanted").map(str::to_owned);
    // The rollout: the changes after the first Draining.
    let first_drain = run
        .changes
        .iter()
        .position(|c| field(c, "phase") == Some("Draining"))
        .unwrap();
    let rollout = &run.changes[first_drain..];
    assert_eq!(
        field(&rollout[0], "node"),
        Some("node-2"),
        "the canary is drained first"
    );
    let canary_done = rollout
        .iter()
        .find(|c| field(c, "node") == Some("node-2") && field(c, "phase") == Some("UpToDate"))
        .map(time)
        .unwrap();
    let drained = |n: &str| {
        rollout
            .iter()
            .find(|c| field(c, "node") == Some(n) && field(c, "phase") == Some("Draining"))
            .map(time)
            .unwrap()
    };
    for n in ["node-1", "node-3", "node-4", "node-5", "node-6"] {
        let after = drained(n).duration_since(canary_done);
        assert!(
            after >= jiff::SignedDuration::from_secs(5),
            "{n} drained {after:?} after the canary finished"
        );
    }
    let rollout_start = time(&rollout[0]);
    for n in ["node-4", "node-6"] {
        let after = drained(n).duration_since(rollout_start);
        assert!(
            after >= jiff::SignedDuration::from_secs(8),
            "{n} drained {after:?} into the rollout, gate held 8 s"
        );
    }
    let last = last_by_node(&run);
    let target = wanted(&rollout[0]);
    for (n, c) in &last {
        assert_eq!(field(c, "phase"), Some("UpToDate"), "{n}");
        assert_eq!(wanted(c), target, "{n}");
    }
    // Per pool, at most one node disrupted at once.
    for pool in [
        &["node-2"][..],
        &["node-1", "node-3", "node-5"],
        &["node-4", "node-6"],
    ] {
        let mut busy = BTreeSet::new();
        for c in rollout {
            let n = field(c, "node").unwrap();
            if !pool.contains(&n) {
                continue;
            }
            match field(c, "phase") {
                Some("Draining" | "Activating" | "Rebooting" | "Verifying") => {
                    busy.insert(n.to_owned());
                }
                _ => {
                    busy.remove(n);
                }
            }
            assert!(
                busy.len() <= 1,
                "two nodes of pool {pool:?} disrupted at once: {busy:?}"
            );
        }
    }
}

/// `nixroll demo --builder` (real Nix): node-1 builds the new systems of all six nodes once
/// and serves them signed; node-2…node-6 fetch theirs and evaluate nothing; then the rollout
/// runs as usual and every node boots the system it fetched (one node disrupted at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_builder_builds_once_and_five_nodes_fetch_and_boot_it() {
    if !common::require_nix() {
        return;
    }
    let run = demo(&["--builder", "--nix", "real"]).await;
    assert_all_up_to_date_on(&run, 6);
    assert_eq!(most_disrupted_at_once(&run), 1, "one node disrupted at a time");
    let who: Vec<&str> = run
        .stderr
        .lines()
        .skip_while(|l| !l.contains("who built and who fetched"))
        .collect();
    assert!(
        who.iter()
            .any(|l| l.contains("node-1") && l.contains("builder: built 6 systems")),
        "{}",
        run.stderr
    );
    for n in 2..=6 {
        let line = who
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("node-{n} ")))
            .unwrap_or_else(|| panic!("no line for node-{n}:\n{}", run.stderr));
        assert!(
            line.contains("fetched it from node-1") && line.ends_with("systems it evaluated: 0"),
            "{line}"
        );
    }
}
