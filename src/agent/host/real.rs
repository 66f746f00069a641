//! The real NixOS host, seen from the privileged agent pod of the DaemonSet.
//!
//! * Files: the host's `/` is mounted read-write at `fs_root` (default `/host`), so host path
//!   `/run/booted-system` is read at `/host/run/booted-system`; symlinks are resolved by
//!   [`super::resolve`] against that mount, never against the container's own `/`.
//! * Commands: `nsenter -t 1 -m -u -i -n -p -- PROGRAM ARGS…` (the pod runs with `hostPID`),
//!   i.e. in PID 1's mount, UTS, IPC, network and PID namespaces, with the host's own `nix`,
//!   `nix-env` and `systemd-run` — nothing from the container image touches the host.
//! * Activation: `systemd-run --unit=nixroll-activate-<id> --collect --service-type=exec`
//!   inside those namespaces, so `switch-to-configuration` is a child of the host's systemd
//!   and survives the agent pod, the container runtime or k3s being restarted by the switch.
//! * Reboot: `systemctl reboot` inside those namespaces.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{CommandOutput, DetachedJob, Host, HostCommand, HostError, run_child};

const NSENTER: &[&str] = &["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--"];

/// `PATH` for commands inside the host's namespaces: NixOS's system path first (`nix`,
/// `nix-env`, `systemd-run` live there), then the FHS directories where the container's own
/// `nsenter` is found and where non-NixOS hosts keep their tools.
const HOST_PATH: &str = "/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Debug)]
pub struct RealHost {
    fs_root: PathBuf,
    nsenter: PathBuf,
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
            nsenter: PathBuf::from(NSENTER[0]),
        }
    }

    /// Use this `nsenter` binary (tests).
    pub fn with_nsenter(mut self, nsenter: impl Into<PathBuf>) -> Self {
        self.nsenter = nsenter.into();
        self
    }

    fn nsenter(&self, program: &OsString, args: &[OsString]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.nsenter);
        c.env("PATH", HOST_PATH);
        c.args(&NSENTER[1..]);
        c.arg(program);
        c.args(args);
        c
    }
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
            run_child(self.nsenter(&cmd.program, &cmd.args), display, cmd.timeout).await
        })
    }

    fn spawn_detached(&self, job: DetachedJob) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            let mut args: Vec<OsString> = vec![
                format!("--unit=nixroll-activate-{}", job.name).into(),
                "--collect".into(),
                "--service-type=exec".into(),
                "--no-block".into(),
                "--quiet".into(),
                format!("--setenv=PATH={HOST_PATH}").into(),
            ];
            args.extend(job.argv.iter().cloned());
            let display = format!("systemd-run --unit=nixroll-activate-{} …", job.name);
            let out = run_child(
                self.nsenter(&OsString::from("systemd-run"), &args),
                display.clone(),
                Duration::from_secs(60),
            )
            .await?;
            // "Unit … already exists": a previous agent launched it; the result file decides.
            if out.success() || out.stderr.contains("already exists") {
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
            let out = run_child(
                self.nsenter(&OsString::from("systemctl"), &["reboot".into()]),
                "systemctl reboot".into(),
                Duration::from_secs(60),
            )
            .await?;
            if out.success() {
                Ok(())
            } else {
                Err(HostError::Reboot {
                    message: out.stderr.trim().to_string(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A stand-in `nsenter` that logs its arguments, then runs the command after `--`
    /// (or pretends `systemd-run`/`systemctl` succeeded).
    const FAKE_NSENTER: &str = r#"#!/bin/sh
echo "$@" >>"$(dirname "$0")/calls"
while [ "$1" != "--" ]; do shift; done
shift
case "$1" in systemd-run|systemctl) exit 0 ;; esac
exec "$@"
"#;

    #[tokio::test]
    async fn commands_enter_pid1_namespaces_with_the_host_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nsenter");
        std::fs::write(&fake, FAKE_NSENTER).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host = RealHost::new(dir.path()).with_nsenter(&fake);

        let out = host
            .run(HostCommand::new("sh", Duration::from_secs(10)).args(["-c", "echo $PATH"]))
            .await
            .unwrap();
        assert_eq!(out.stdout.trim(), HOST_PATH);
        host.spawn_detached(DetachedJob {
            name: "g-1".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        })
        .await
        .unwrap();
        host.reboot().await.unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        let calls: Vec<&str> = calls.lines().collect();
        assert_eq!(calls[0], "-t 1 -m -u -i -n -p -- sh -c echo $PATH");
        assert_eq!(
            calls[1],
            format!(
                "-t 1 -m -u -i -n -p -- systemd-run --unit=nixroll-activate-g-1 --collect --service-type=exec --no-block --quiet --setenv=PATH={HOST_PATH} /bin/sh -c true"
            )
        );
        assert_eq!(calls[2], "-t 1 -m -u -i -n -p -- systemctl reboot");
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
