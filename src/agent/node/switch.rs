//! Running `switch-to-configuration` as a detached job on the host: waiting for other
//! activators, launching it once per grant through a wrapper, following its unit and its
//! result file, and reading its log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::activation::switch_verb;
use super::{NodeAgent, read_bounded, sanitize};
use crate::agent::host::{DetachedJob, JobState};
use crate::agent::state::{ACTIVATION_DIR, ActivationRecord, HostState};

/// NixOS's activation lock (`switch-to-configuration` holds it while it runs).
pub const SWITCH_LOCK: &str = "/run/nixos/switch-to-configuration.lock";

/// How often a running activation's unit is asked about.
const UNIT_CHECK: Duration = Duration::from_secs(5);

/// How often other activators are looked for while waiting for them to end.
const ACTIVATOR_POLL: Duration = Duration::from_secs(1);

impl NodeAgent {
    /// Launch `switch-to-configuration` detached (at most once per grant, guarded by a lock
    /// directory the wrapper creates) and wait for its result file.
    pub(super) async fn switch(&self, rec: &ActivationRecord) -> Result<i32, String> {
        let system = rec.activated.clone().unwrap_or_else(|| rec.system.clone());
        self.run_job(rec, &job_name(rec), &system, switch_verb(rec.action))
            .await
    }

    /// `switch-to-configuration boot` of the old default after the new system's, so the old
    /// one stays the boot default (its own detached job, `<id>-keep`).
    pub(super) async fn keep_default(&self, rec: &ActivationRecord, old: &str) -> Result<i32, String> {
        self.run_job(rec, &format!("{}-keep", sanitize(&rec.id)), old, "boot")
            .await
    }

    /// Run `<system>/bin/switch-to-configuration <verb>` as the detached job `name` (at most
    /// once: a lock directory guards it) and wait for its result file.
    async fn run_job(
        &self,
        rec: &ActivationRecord,
        name: &str,
        system: &str,
        verb: &str,
    ) -> Result<i32, String> {
        let name = name.to_string();
        let dir = Path::new(ACTIVATION_DIR);
        let result = self.job_file(&name, "result");
        if let Some(code) = read_result(&result) {
            return Ok(code);
        }
        let started = self.job_file(&name, "started");
        if !started.exists() {
            self.wait_for_other_activators_quietly().await?;
            let _ = std::fs::create_dir_all(self.host.fs_path(dir));
            let script = Path::new(&system).join("bin/switch-to-configuration");
            let argv: Vec<OsString> = vec![
                "/bin/sh".into(),
                "-c".into(),
                ACTIVATION_WRAPPER.into(),
                "nixroll-activate".into(),
                self.host.cmd_path(dir).into(),
                name.clone().into(),
                self.host.cmd_path(&script).into(),
                verb.into(),
            ];
            tracing::info!(id = %rec.id, %system, verb, "launching switch-to-configuration");
            self.host
                .spawn_detached(DetachedJob {
                    name: name.clone(),
                    argv,
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        // Follow the job: its result file, and the host's service manager for whether it still
        // runs. A switch that runs is never abandoned (switch-to-configuration waits for start
        // jobs, e.g. a k3s server waiting for etcd quorum); no new grant is taken meanwhile.
        let start = tokio::time::Instant::now();
        let deadline = start + self.options.activation_timeout;
        let mut next_check = start + UNIT_CHECK;
        let mut ended: Option<String> = None;
        let mut warned = false;
        // The result file's arrival (the wrapper renames it into place) wakes this loop through
        // inotify, registered before the first look so that no rename is missed. Without
        // inotify (e.g. past the per-user instance limit) the file is looked at every 10 ms,
        // doubling up to `result_poll`.
        let mut arrivals = ResultArrivals::new(&self.host.fs_path(dir), &name);
        let mut pause = Duration::from_millis(10).min(self.options.result_poll);
        loop {
            if let Some(code) = read_result(&result) {
                return Ok(code);
            }
            let now = tokio::time::Instant::now();
            if now >= next_check || now >= deadline {
                next_check = now + UNIT_CHECK;
                match self.host.job_state(&name).await {
                    Ok(JobState::Running { state }) => {
                        ended = None;
                        if now >= deadline && !warned {
                            warned = true;
                            tracing::warn!(id = %rec.id, %state, waited = ?now.duration_since(start), "switch-to-configuration still runs; following it, not abandoning it");
                        }
                    }
                    Ok(JobState::Ended { detail }) => {
                        // Twice in a row (a start job that is only queued looks alike once).
                        if let Some(first) = ended.take() {
                            if let Some(code) = read_result(&result) {
                                return Ok(code);
                            }
                            return Err(format!(
                                "switch-to-configuration ended without a result ({first}){}",
                                self.switch_log_tail(rec)
                            ));
                        }
                        ended = Some(detail);
                    }
                    Ok(JobState::Unknown) | Err(_) if now >= deadline => {
                        return Err(format!(
                            "switch-to-configuration gave no result within {:?}",
                            self.options.activation_timeout
                        ));
                    }
                    Ok(JobState::Unknown) => {}
                    Err(e) => {
                        tracing::warn!(id = %rec.id, error = %e, "cannot ask systemd about the activation")
                    }
                }
            }
            match arrivals.as_mut() {
                Some(a) => {
                    // The next unit check (or the deadline) bounds the wait for the file.
                    let until = if now < deadline {
                        next_check.min(deadline)
                    } else {
                        next_check
                    };
                    if let Ok(false) = tokio::time::timeout_at(until, a.next()).await {
                        arrivals = None;
                    }
                }
                None => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.options.result_poll);
                }
            }
        }
    }

    /// Wait (bounded by the activation timeout) until no other activator runs: NixOS's
    /// activation lock is free and no `nixos-upgrade`/`nixos-rebuild` unit is active. While
    /// waiting, the activation reports `Running` with a message saying what it waits for.
    pub(super) async fn wait_for_other_activators(&self, st: &mut HostState) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.options.activation_timeout;
        let mut said = None;
        loop {
            let busy = self.other_activators().await;
            if busy.is_empty() {
                if said.is_some() {
                    let _ = self.update(st, |r| r.message = None);
                }
                return Ok(());
            }
            let message = format!("waiting for another activator to finish: {}", busy.join(", "));
            if said.as_ref() != Some(&message) {
                tracing::warn!("{message}");
                let _ = self.update(st, |r| r.message = Some(message.clone()));
                self.publish(st);
                said = Some(message.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{message} (still running after {:?})",
                    self.options.activation_timeout
                ));
            }
            tokio::time::sleep(ACTIVATOR_POLL.min(self.options.activation_timeout)).await;
        }
    }

    /// [`Self::wait_for_other_activators`] without a record to annotate (right before launch).
    async fn wait_for_other_activators_quietly(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.options.activation_timeout;
        loop {
            let busy = self.other_activators().await;
            if busy.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "another activator kept running for {:?}: {}",
                    self.options.activation_timeout,
                    busy.join(", ")
                ));
            }
            tokio::time::sleep(ACTIVATOR_POLL.min(self.options.activation_timeout)).await;
        }
    }

    /// Who else activates now: a holder of NixOS's activation lock (from `/proc/locks`, which
    /// does not disturb it) and the host's activator units.
    async fn other_activators(&self) -> Vec<String> {
        let mut busy = Vec::new();
        if lock_held(&self.host.fs_path(Path::new(SWITCH_LOCK))) {
            busy.push(format!("a process holds {SWITCH_LOCK}"));
        }
        match self.host.other_activators().await {
            Ok(units) => busy.extend(units),
            Err(e) => tracing::warn!(error = %e, "cannot ask systemd about other activators"),
        }
        busy
    }

    /// Whether the switch failed because another activator held NixOS's activation lock.
    pub(super) fn lost_lock_race(&self, rec: &ActivationRecord) -> bool {
        self.switch_log(rec).is_some_and(|t| {
            t.lines()
                .any(|l| l.contains("switch-to-configuration.lock") || l.contains("Could not acquire lock"))
        })
    }

    /// `: <the line naming the failed units>` from the switch's output, if any.
    pub(super) fn failed_units(&self, rec: &ActivationRecord) -> String {
        self.switch_log(rec)
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| l.contains("units failed") || l.contains("failed units"))
                    .map(|l| {
                        format!(
                            ": {}",
                            crate::nix::trim_nix_error(l.trim_start_matches("warning: "))
                        )
                    })
            })
            .unwrap_or_default()
    }

    /// Where the agent finds the job file `<name>.<suffix>` (`started`, `log`, `result`).
    fn job_file(&self, name: &str, suffix: &str) -> PathBuf {
        self.host
            .fs_path(&Path::new(ACTIVATION_DIR).join(format!("{name}.{suffix}")))
    }

    /// The output of the switch of `rec` (its first 64 KiB), if any.
    fn switch_log(&self, rec: &ActivationRecord) -> Option<String> {
        read_bounded(&self.job_file(&job_name(rec), "log"), 64 * 1024)
    }

    pub(super) fn switch_log_tail(&self, rec: &ActivationRecord) -> String {
        let text = self.switch_log(rec).unwrap_or_default();
        let t = crate::nix::trim_nix_error(&text);
        if t.is_empty() {
            String::new()
        } else {
            format!(": {t}")
        }
    }
}

/// Runs as `sh -c WRAPPER nixroll-activate DIR NAME SCRIPT VERB`: takes the lock directory
/// `DIR/NAME.started` (a second launch exits at once), runs `SCRIPT VERB` with its output in
/// `DIR/NAME.log`, then publishes the exit status atomically as `DIR/NAME.result`.
pub const ACTIVATION_WRAPPER: &str = r#"d="$1"; n="$2"; shift 2
mkdir "$d/$n.started" 2>/dev/null || exit 0
"$@" >"$d/$n.log" 2>&1
echo "$?" >"$d/$n.result.tmp"
sync "$d/$n.result.tmp" 2>/dev/null
mv "$d/$n.result.tmp" "$d/$n.result"
"#;

/// The detached job's name (unit `nixroll-activate-<name>`, files `<name>.*`): the grant id,
/// plus `-r<N>` for the N-th launch after losing the activation lock.
fn job_name(rec: &ActivationRecord) -> String {
    if rec.attempt == 0 {
        sanitize(&rec.id)
    } else {
        format!("{}-r{}", sanitize(&rec.id), rec.attempt)
    }
}

/// Whether some process holds a lock on `path` (per `/proc/locks`, which lists the locks of
/// the processes in our PID namespace: with `hostPID`, the host's).
pub(super) fn lock_held(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let Some(locks) = read_bounded(Path::new("/proc/locks"), 1 << 20) else {
        return false;
    };
    let dev = meta.dev();
    let (major, minor) = (
        ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff),
        ((dev >> 12) & 0xffff_ff00) | (dev & 0xff),
    );
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    locks.lines().any(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (blocked waiters start with "->")
        !l.contains("->") && l.split_whitespace().any(|f| f == want)
    })
}

/// The renames of one job's result file into the activation directory, through inotify.
struct ResultArrivals {
    events: inotify::EventStream<[u8; 1024]>,
    file: std::ffi::OsString,
}

impl ResultArrivals {
    /// `None` when inotify is unavailable or `dir` cannot be watched.
    fn new(dir: &Path, job: &str) -> Option<ResultArrivals> {
        let inotify = inotify::Inotify::init()
            .map_err(|e| tracing::debug!(error = %e, "inotify unavailable: the activation result is polled"))
            .ok()?;
        inotify
            .watches()
            .add(dir, inotify::WatchMask::MOVED_TO | inotify::WatchMask::CREATE)
            .map_err(|e| tracing::debug!(path = %dir.display(), error = %e, "cannot watch; the activation result is polled"))
            .ok()?;
        let events = inotify.into_event_stream([0u8; 1024]).ok()?;
        Some(ResultArrivals {
            events,
            file: format!("{job}.result").into(),
        })
    }

    /// Until the result file arrived (`true`), or the event stream ended (`false`: the
    /// caller falls back to looking at the file).
    async fn next(&mut self) -> bool {
        use futures::StreamExt;
        while let Some(ev) = self.events.next().await {
            if let Ok(ev) = ev
                && ev.name.as_deref() == Some(self.file.as_os_str())
            {
                return true;
            }
        }
        false
    }
}

fn read_result(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
