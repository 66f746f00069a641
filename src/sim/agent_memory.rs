//! The agent's own memory, as `nixroll bench` reports it: the real `nixroll agent` binary
//! (the same executable as the bench, so measure a `--release` build), started for a node that
//! already runs its target and left idle, the way it sits on a node between rollouts.

use std::path::Path;
use std::time::Duration;

/// What `/proc/PID/status` says of an idle agent, in KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct AgentMemory {
    /// `VmRSS` after the settle time.
    pub rss_kib: u64,
    /// `RssAnon`: heap and stacks.
    pub anon_kib: u64,
    /// `RssFile`: the pages of the binary (and libraries) it touched.
    pub file_kib: u64,
    /// `VmHWM`: the peak since it started.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
}

fn status_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Read [`AgentMemory`] of process `pid`.
pub fn memory_of(pid: u32) -> Option<AgentMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(AgentMemory {
        rss_kib: status_field(&text, "VmRSS:")?,
        anon_kib: status_field(&text, "RssAnon:").unwrap_or(0),
        file_kib: status_field(&text, "RssFile:").unwrap_or(0),
        hwm_kib: status_field(&text, "VmHWM:").unwrap_or(0),
        threads: status_field(&text, "Threads:").unwrap_or(0),
    })
}

/// Start `exe agent --node NODE --host-root ROOT` against `kubeconfig`, let it settle for
/// `settle` (its first report written, its watches open), and read its memory; then stop it.
/// The node should be one with nothing to do, so that this is the agent at rest.
pub async fn idle_agent_memory(
    exe: &Path,
    kubeconfig: &Path,
    node: &str,
    host_root: &Path,
    settle: Duration,
) -> std::io::Result<AgentMemory> {
    let mut child = tokio::process::Command::new(exe)
        .arg("agent")
        .arg("--node")
        .arg(node)
        .arg("--host-root")
        .arg(host_root)
        .arg("--reboot-command")
        .arg("true")
        .arg("--offline")
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    tokio::time::sleep(settle).await;
    let measured = match child.try_wait()? {
        Some(status) => Err(std::io::Error::other(format!("the agent exited early: {status}"))),
        None => memory_of(pid).ok_or_else(|| std::io::Error::other("no /proc status for the agent")),
    };
    let _ = child.kill().await;
    measured
}
