//! The real NixOS host, seen from the privileged agent pod of the DaemonSet.
//!
//! * Files: the host's `/` is mounted read-write at `fs_root` (default `/host`), so host path
//!   `/run/booted-system` is read at `/host/run/booted-system`; symlinks are resolved by
//!   [`super::resolve`] against that mount, never against the container's own `/`.
//! * Commands (`nix build`, `nix-env`, `nixos-version`, …): each runs as a transient unit of the
//!   host's systemd, `systemd-run --wait --pipe --collect`, started through
//!   `nsenter -t 1 -m -u -i -n` (the pod runs with `hostPID`). So host Nix work (evaluation,
//!   builds, substitution) runs in the host's `system.slice`, not in the pod's cgroup and its
//!   memory limit; a command that times out is killed with its whole unit
//!   (`systemctl kill`, and `RuntimeMaxSec` in case the agent itself dies); and the command
//!   gets a clean, explicit environment ([`RealHost::environment`]): nothing of the
//!   container's environment reaches the host.
//! * Activation: `systemd-run --unit=nixroll-activate-<id> --collect --service-type=exec
//!   --no-block`, followed through `systemctl show` ([`Host::job_state`]), so
//!   `switch-to-configuration` is a child of the host's systemd and survives the agent pod,
//!   the container runtime or k3s being restarted by the switch.
//! * Reboot: `systemctl reboot` inside those namespaces.
//!
//! `nsenter` runs without `-p`: with `hostPID` the PID namespace is already the host's, and
//! with `-p` nsenter forks, so killing it (a timeout) would leave its child running.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{CommandOutput, DetachedJob, Host, HostCommand, HostError, JobState, run_child, run_reboot};

/// `PATH` of host commands: NixOS's system path first (`nix`, `nix-env`, `systemd-run`, and
/// `git` when the configuration installs it), the default Nix profile, then the FHS
/// directories where non-NixOS hosts keep their tools.
pub const HOST_PATH: &str = "/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where NixOS writes the variables of `environment.variables` and
/// `environment.sessionVariables` (`networking.proxy.*`, `security.pki`) for login shells.
pub const HOST_ENVIRONMENT_FILE: &str = "/etc/set-environment";

/// The variables host commands take from [`HOST_ENVIRONMENT_FILE`]: proxies, CA bundles,
/// locale and time zone data. Everything else is fixed by the agent.
pub const HOST_ENV_ALLOWED: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "LOCALE_ARCHIVE",
    "TZDIR",
];

/// Units of other activators: `system.autoUpgrade` and the unit `nixos-rebuild` (≥ 24.11)
/// runs `switch-to-configuration` in.
pub const OTHER_ACTIVATOR_UNITS: &[&str] = &[
    "nixos-upgrade.service",
    "nixos-rebuild-switch-to-configuration.service",
];

/// Extra time a command's unit may run past the command's own timeout before systemd kills it
/// (`RuntimeMaxSec`): the agent kills it first; this covers an agent that died meanwhile.
const UNIT_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct RealHost {
    fs_root: PathBuf,
    nsenter: PathBuf,
    /// Whose namespaces commands enter: 1 (the host's init, with `hostPID`).
    target_pid: u32,
    seq: Arc<AtomicU64>,
    instance: String,
}

impl Default for RealHost {
    fn default() -> Self {
        RealHost::new("/host")
    }
}

impl RealHost {
    /// `fs_root`: where the host's `/` is mounted in the agent's container (`/` when the agent
    /// runs directly on the host).
    pub fn new(fs_root: impl Into<PathBuf>) -> Self {
        RealHost {
            fs_root: fs_root.into(),
            nsenter: PathBuf::from("nsenter"),
            target_pid: 1,
            seq: Arc::new(AtomicU64::new(0)),
            instance: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
        }
    }

    /// Use this `nsenter` binary (tests).
    pub fn with_nsenter(mut self, nsenter: impl Into<PathBuf>) -> Self {
        self.nsenter = nsenter.into();
        self
    }

    /// Enter the namespaces of this process instead of PID 1 (tests that drive a container's
    /// systemd from outside it).
    pub fn with_target_pid(mut self, pid: u32) -> Self {
        self.target_pid = pid;
        self
    }

    /// The complete environment of every host command: `HOME=/root`, `PATH=`[`HOST_PATH`],
    /// and the allowed variables ([`HOST_ENV_ALLOWED`]) of the host's
    /// [`HOST_ENVIRONMENT_FILE`]. Read on every call (a cheap file read), so a proxy changed on
    /// the host applies to the next command.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("HOME".to_string(), "/root".to_string()),
            ("PATH".to_string(), HOST_PATH.to_string()),
        ];
        let file = self.fs_path(Path::new(HOST_ENVIRONMENT_FILE));
        if let Ok(text) = std::fs::read_to_string(file) {
            env.extend(parse_set_environment(&text));
        }
        env
    }

    /// `nsenter -t PID -m -u -i -n -- PROGRAM ARGS…` with exactly `env` as environment.
    fn direct(&self, program: &str, args: &[OsString], env: &[(String, String)]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.nsenter);
        c.env_clear();
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c.args(["-t", &self.target_pid.to_string(), "-m", "-u", "-i", "-n", "--"]);
        c.arg(program);
        c.args(args);
        c
    }

    /// `--setenv=NAME` for each variable: systemd-run copies the value from its own
    /// environment, so values (a proxy URL with a password) never appear on a command line.
    fn setenv_args(env: &[(String, String)]) -> Vec<OsString> {
        env.iter().map(|(k, _)| format!("--setenv={k}").into()).collect()
    }

    fn next_unit(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("nixroll-cmd-{}-{n}.service", self.instance)
    }

    /// `systemctl show UNIT… -p PROPS` → one map per unit.
    async fn show(&self, units: &[&str], props: &str) -> Result<Vec<Vec<(String, String)>>, HostError> {
        let mut args: Vec<OsString> = vec!["show".into(), format!("--property={props}").into()];
        args.extend(units.iter().map(OsString::from));
        let display = format!("systemctl show {}", units.join(" "));
        let out = run_child(
            self.direct("systemctl", &args, &self.environment()),
            display.clone(),
            Duration::from_secs(30),
        )
        .await?;
        if !out.success() {
            return Err(HostError::Spawn {
                command: display,
                source: std::io::Error::other(out.stderr.trim().to_string()),
            });
        }
        Ok(parse_show(&out.stdout))
    }
}

/// `export NAME="VALUE"` lines of NixOS's `/etc/set-environment`, restricted to
/// [`HOST_ENV_ALLOWED`]; values with shell expansions are skipped (they cannot be reproduced
/// without a shell).
pub fn parse_set_environment(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("export ") else {
            continue;
        };
        let Some((name, value)) = rest.trim().split_once('=') else {
            continue;
        };
        if !HOST_ENV_ALLOWED.contains(&name) {
            continue;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        if value.contains('$') || value.contains('`') || value.contains('\\') {
            continue;
        }
        out.retain(|(k, _)| k != name);
        out.push((name.to_string(), value.to_string()));
    }
    out
}

/// `systemctl show` output: `KEY=VALUE` lines, units separated by blank lines.
pub fn parse_show(stdout: &str) -> Vec<Vec<(String, String)>> {
    let mut units = Vec::new();
    let mut cur = Vec::new();
    for line in stdout.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                units.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            cur.push((k.to_string(), v.to_string()));
        }
    }
    if !cur.is_empty() {
        units.push(cur);
    }
    units
}

fn prop<'a>(unit: &'a [(String, String)], key: &str) -> &'a str {
    unit.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// Whether systemd's `ActiveState` means the unit's processes may still run.
fn is_running(active_state: &str) -> bool {
    matches!(
        active_state,
        "active" | "activating" | "deactivating" | "reloading" | "refreshing"
    )
}

/// The state of a detached job's unit from `systemctl show`'s properties.
pub fn job_state_from(unit: &[(String, String)]) -> JobState {
    let load = prop(unit, "LoadState");
    let active = prop(unit, "ActiveState");
    let sub = prop(unit, "SubState");
    let job = prop(unit, "Job");
    if is_running(active) || (load == "loaded" && !job.is_empty() && job != "0") {
        return JobState::Running {
            state: format!("{active} ({sub})"),
        };
    }
    if load == "not-found" {
        return JobState::Ended {
            detail: "its unit is gone".into(),
        };
    }
    JobState::Ended {
        detail: format!(
            "its unit is {active} (result {}, exit status {})",
            prop(unit, "Result"),
            prop(unit, "ExecMainStatus")
        ),
    }
}

/// "The unit already exists": systemd < 250 says "Unit X already exists.", newer ones "Unit
/// X was already loaded or has a fragment file."
pub fn unit_exists_message(stderr: &str) -> bool {
    stderr.contains("already exists") || stderr.contains("already loaded or has a fragment file")
}

impl Host for RealHost {
    fn fs_path(&self, host_path: &Path) -> PathBuf {
        if self.fs_root == Path::new("/") || host_path.starts_with(&self.fs_root) {
            return host_path.to_path_buf();
        }
        let rel = host_path.strip_prefix("/").unwrap_or(host_path);
        self.fs_root.join(rel)
    }

    fn cmd_path(&self, host_path: &Path) -> PathBuf {
        host_path.to_path_buf()
    }

    fn host_path(&self, local: &Path) -> Option<PathBuf> {
        if self.fs_root == Path::new("/") {
            return None;
        }
        local
            .strip_prefix(&self.fs_root)
            .ok()
            .map(|rest| Path::new("/").join(rest))
    }

    fn display_path(&self, host_path: &Path) -> PathBuf {
        host_path.to_path_buf()
    }

    fn run(&self, cmd: HostCommand) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        Box::pin(async move {
            let display = cmd.display();
            let unit = self.next_unit();
            let env = self.environment();
            let max = cmd.timeout.saturating_add(UNIT_GRACE).as_secs().max(1);
            let mut args: Vec<OsString> = vec![
                format!("--unit={unit}").into(),
                "--quiet".into(),
                "--collect".into(),
                "--wait".into(),
                "--pipe".into(),
                "--service-type=exec".into(),
                format!("--property=RuntimeMaxSec={max}").into(),
            ];
            args.extend(Self::setenv_args(&env));
            args.push("--".into());
            args.push(cmd.program.clone());
            args.extend(cmd.args.iter().cloned());
            let res = run_child(self.direct("systemd-run", &args, &env), display, cmd.timeout).await;
            if let Err(HostError::TimedOut { .. }) = &res {
                // The unit may outlive its systemd-run client: kill all of its processes.
                let kill: Vec<OsString> = vec!["kill".into(), "--signal=SIGKILL".into(), unit.clone().into()];
                match run_child(
                    self.direct("systemctl", &kill, &env),
                    format!("systemctl kill {unit}"),
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok(out) if out.success() => {}
                    Ok(out) => {
                        tracing::debug!(%unit, stderr = %out.stderr.trim(), "systemctl kill after a timeout")
                    }
                    Err(e) => tracing::warn!(%unit, error = %e, "cannot kill a timed-out host command"),
                }
            }
            res
        })
    }

    /// Not in a transient unit: systemd starts a unit's process itself, so it would not
    /// inherit `stdin` (the in-memory key file of a push). `nsenter` into the host's mount,
    /// UTS, IPC and network namespaces, a direct child of the agent, in the pod's cgroup,
    /// killed on the timeout.
    fn run_with_stdin(
        &self,
        cmd: HostCommand,
        stdin: std::fs::File,
    ) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        Box::pin(async move {
            let display = cmd.display();
            let env = self.environment();
            let program = cmd.program.to_string_lossy().into_owned();
            let command = self.direct(&program, &cmd.args, &env);
            super::run_child_with_stdin(command, display, cmd.timeout, stdin.into()).await
        })
    }

    fn spawn_detached(&self, job: DetachedJob) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            let env = self.environment();
            let mut args: Vec<OsString> = vec![
                format!("--unit=nixroll-activate-{}", job.name).into(),
                "--collect".into(),
                "--service-type=exec".into(),
                "--no-block".into(),
                "--quiet".into(),
            ];
            args.extend(Self::setenv_args(&env));
            args.push("--".into());
            args.extend(job.argv.iter().cloned());
            let display = format!("systemd-run --unit=nixroll-activate-{} …", job.name);
            let out = run_child(
                self.direct("systemd-run", &args, &env),
                display.clone(),
                Duration::from_secs(60),
            )
            .await?;
            // The unit exists: a previous agent launched it; its state and result file decide.
            if out.success() || unit_exists_message(&out.stderr) {
                Ok(())
            } else {
                Err(HostError::Spawn {
                    command: display,
                    source: std::io::Error::other(out.stderr.trim().to_string()),
                })
            }
        })
    }

    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            run_reboot(
                self.direct("systemctl", &["reboot".into()], &self.environment()),
                "systemctl reboot".into(),
                |out| out.stderr.trim().to_string(),
            )
            .await
        })
    }

    fn job_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<JobState, HostError>> {
        Box::pin(async move {
            let unit = format!("nixroll-activate-{name}.service");
            let units = self
                .show(
                    &[&unit],
                    "LoadState,ActiveState,SubState,Result,ExecMainStatus,Job",
                )
                .await?;
            Ok(units
                .first()
                .map(|u| job_state_from(u))
                .unwrap_or(JobState::Unknown))
        })
    }

    fn other_activators(&self) -> BoxFuture<'_, Result<Vec<String>, HostError>> {
        Box::pin(async move {
            let units = self.show(OTHER_ACTIVATOR_UNITS, "Id,ActiveState").await?;
            Ok(units
                .iter()
                .filter(|u| is_running(prop(u, "ActiveState")))
                .map(|u| prop(u, "Id").to_string())
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A stand-in `nsenter` that logs its arguments and environment, then plays the host's
    /// `systemd-run` (runs the command after `--`, or fails like systemd when `$FAKE_EXISTS`
    /// is set) and `systemctl`.
    const FAKE_NSENTER: &str = r#"#!/bin/sh
d="$(dirname "$0")"
echo "$@" >>"$d/calls"
env | sort >"$d/env-$(echo "$@" | cut -c1-40 | tr -c 'a-z0-9\n' _)"
while [ "$1" != "--" ]; do shift; done
shift
case "$1" in
systemctl) exit 0 ;;
systemd-run)
  if [ -e "$d/exists" ]; then
    echo "Failed to start transient service unit: Unit nixroll-activate-g-1.service was already loaded or has a fragment file." >&2
    exit 1
  fi
  while [ "$1" != "--" ]; do shift; done
  shift
  exec /usr/bin/env "$@" ;;
esac
exec "$@"
"#;

    fn fake(dir: &Path) -> RealHost {
        use std::os::unix::fs::PermissionsExt;
        let fake = dir.join("nsenter");
        std::fs::write(&fake, FAKE_NSENTER).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/set-environment"),
            "export https_proxy=\"http://bot:s3cret@proxy.lan:3128\"\nexport NIX_SSL_CERT_FILE=\"/etc/ssl/certs/ca-certificates.crt\"\nexport PAGER=\"less\"\nexport PATH=\"$HOME/bin:$PATH\"\n",
        )
        .unwrap();
        RealHost::new(dir).with_nsenter(&fake)
    }

    #[tokio::test]
    async fn commands_run_as_transient_units_with_a_clean_environment_and_no_pid_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake(dir.path());
        let out = host
            .run(HostCommand::new("sh", Duration::from_secs(10)).args(["-c", "env | sort"]))
            .await
            .unwrap();
        // The command's environment: HOME, PATH and the host's proxy and CA, nothing of ours
        // (the fake's `env` adds PWD only).
        let env: Vec<&str> = out.stdout.lines().filter(|l| !l.starts_with("PWD=")).collect();
        assert_eq!(
            env,
            vec![
                "HOME=/root",
                "NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                &format!("PATH={HOST_PATH}"),
                "https_proxy=http://bot:s3cret@proxy.lan:3128",
            ]
        );
        host.spawn_detached(DetachedJob {
            name: "g-1".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        })
        .await
        .unwrap();
        host.reboot().await.unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        let unit = calls[0]
            .split_whitespace()
            .find_map(|a| a.strip_prefix("--unit="))
            .unwrap();
        assert!(unit.starts_with("nixroll-cmd-"), "{unit}");
        let max = Duration::from_secs(10).saturating_add(UNIT_GRACE).as_secs();
        assert_eq!(
            calls[0],
            format!(
                "-t 1 -m -u -i -n -- systemd-run --unit={unit} --quiet --collect --wait --pipe --service-type=exec --property=RuntimeMaxSec={max} --setenv=HOME --setenv=PATH --setenv=https_proxy --setenv=NIX_SSL_CERT_FILE -- sh -c env | sort"
            )
        );
        assert_eq!(
            calls[1],
            "-t 1 -m -u -i -n -- systemd-run --unit=nixroll-activate-g-1 --collect --service-type=exec --no-block --quiet --setenv=HOME --setenv=PATH --setenv=https_proxy --setenv=NIX_SSL_CERT_FILE -- /bin/sh -c true"
        );
        assert_eq!(calls[2], "-t 1 -m -u -i -n -- systemctl reboot");
        // No secret on any command line.
        assert!(calls.iter().all(|c| !c.contains("s3cret")));
        // nsenter itself got the clean environment too.
        let env_files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("env-"))
            .collect();
        assert!(!env_files.is_empty());
        for e in env_files {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let keys: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_")
                .collect();
            assert_eq!(keys, vec!["HOME", "NIX_SSL_CERT_FILE", "PATH", "https_proxy"]);
        }
    }

    /// A command given a file (the push's in-memory key) runs as a direct child through
    /// `nsenter`, not in a transient unit (which would not inherit it), and reads the file as
    /// `/proc/self/fd/0`; the file's content is on no command line.
    #[tokio::test]
    async fn a_command_with_a_file_runs_directly_and_reads_it_as_fd_0() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake(dir.path());
        let secret = crate::builder::SigningKey::generate_secret("k-1").unwrap();
        let key = crate::builder::SigningKey::parse(&secret).unwrap();
        let file = crate::builder::key_memfd(&key).unwrap();
        let out = host
            .run_with_stdin(
                HostCommand::new("cat", Duration::from_secs(10)).arg("/proc/self/fd/0"),
                file,
            )
            .await
            .unwrap();
        assert!(out.success(), "{out:?}");
        assert_eq!(out.stdout, secret);
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(calls.trim(), "-t 1 -m -u -i -n -- cat /proc/self/fd/0");
        assert!(!calls.contains(secret.split_once(':').unwrap().1));
    }

    #[tokio::test]
    async fn an_existing_activation_unit_counts_as_launched() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake(dir.path());
        std::fs::write(dir.path().join("exists"), "").unwrap();
        host.spawn_detached(DetachedJob {
            name: "g-1".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        })
        .await
        .unwrap();
    }

    #[test]
    fn parses_systemctl_show_and_job_states() {
        let out = "Id=nixos-upgrade.service\nActiveState=activating\n\nId=nixos-rebuild-switch-to-configuration.service\nActiveState=inactive\n";
        let units = parse_show(out);
        assert_eq!(units.len(), 2);
        assert_eq!(prop(&units[0], "ActiveState"), "activating");
        let st = |s: &str| job_state_from(&parse_show(s)[0]);
        assert!(matches!(
            st("LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\nExecMainStatus=0\n"),
            JobState::Running { .. }
        ));
        // queued, not started yet: still ours to wait for
        assert!(matches!(
            st(
                "LoadState=loaded\nActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\nJob=42\n"
            ),
            JobState::Running { .. }
        ));
        assert!(matches!(
            st(
                "LoadState=not-found\nActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n"
            ),
            JobState::Ended { .. }
        ));
        assert_eq!(
            st("LoadState=loaded\nActiveState=failed\nSubState=failed\nResult=signal\nExecMainStatus=9\n"),
            JobState::Ended {
                detail: "its unit is failed (result signal, exit status 9)".into()
            }
        );
    }

    #[test]
    fn recognises_both_unit_exists_messages() {
        assert!(unit_exists_message(
            "Failed to start transient service unit: Unit nixroll-activate-x.service already exists."
        ));
        assert!(unit_exists_message(
            "Failed to start transient service unit: Unit nixroll-activate-x.service was already loaded or has a fragment file."
        ));
        assert!(!unit_exists_message(
            "Failed to connect to bus: No such file or directory"
        ));
    }

    #[test]
    fn set_environment_gives_only_allowed_literal_values() {
        let text = "export http_proxy=\"http://p:3128\"\nexport no_proxy='localhost'\nexport EDITOR=\"nano\"\nexport SSL_CERT_FILE=\"$X/ca.crt\"\n# export https_proxy=\"x\"\nexport http_proxy=\"http://q:3128\"\n";
        assert_eq!(
            parse_set_environment(text),
            vec![
                ("no_proxy".to_string(), "localhost".to_string()),
                ("http_proxy".to_string(), "http://q:3128".to_string()),
            ]
        );
    }

    #[test]
    fn files_through_the_mount_commands_with_host_paths() {
        let h = RealHost::default();
        let p = Path::new("/run/booted-system");
        assert_eq!(h.fs_path(p), PathBuf::from("/host/run/booted-system"));
        assert_eq!(h.cmd_path(p), PathBuf::from("/run/booted-system"));
        assert_eq!(h.fs_path(Path::new("/host/x")), PathBuf::from("/host/x"));
        let on_host = RealHost::new("/");
        assert_eq!(on_host.fs_path(p), p.to_path_buf());
    }
}
