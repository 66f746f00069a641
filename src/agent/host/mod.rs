//! How the agent reaches its host. Everything the agent does to a machine goes through
//! [`Host`]: reading and writing files (mapped through [`Host::fs_path`]), running commands,
//! launching the detached activation job and rebooting. Two backends share all other logic:
//!
//! * [`HostRoot`]: a directory stands in for `/`; commands run as ordinary child processes;
//!   the reboot is a command or an in-process callback (tests, the demo).
//! * [`RealHost`]: the real machine seen from a privileged DaemonSet pod; files through the
//!   host's `/` mounted at `/host`, every command as a transient systemd unit of the host
//!   (outside the pod's cgroup, with a clean environment), activation as a transient unit
//!   followed through systemd, reboot via `systemctl reboot`.

mod real;
mod root;

use std::ffi::OsString;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;

pub use real::RealHost;
pub use root::{HostRoot, RebootHook, SYSTEMCTL_LOG};

/// A command to run on the host. `program` and path arguments are given as the host sees
/// them (use [`Host::cmd_path`]).
#[derive(Clone, Debug)]
pub struct HostCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The command is killed and [`HostError::TimedOut`] returned after this long.
    pub timeout: Duration,
}

impl HostCommand {
    pub fn new(program: impl Into<OsString>, timeout: Duration) -> Self {
        HostCommand {
            program: program.into(),
            args: Vec::new(),
            timeout,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The command line for messages and logs, credentials in URLs masked.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        crate::nix::mask_credentials(&s)
    }
}

/// What a finished command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A detached job that must survive the agent: `switch-to-configuration`. The backend starts
/// `argv` so that it keeps running when the agent dies (own process group, or a transient
/// systemd unit); the wrapper around it (see `crate::agent`) writes the exit status to a file.
#[derive(Clone, Debug)]
pub struct DetachedJob {
    /// Unique, already sanitised name (`[A-Za-z0-9_-]`), used for the systemd unit.
    pub name: String,
    pub argv: Vec<OsString>,
}

/// What the host's service manager says about a detached job ([`Host::job_state`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// The backend cannot tell (no service manager): the caller falls back to its timeout.
    Unknown,
    /// The job's unit is still running (`ActiveState` and `SubState` as systemd reports them).
    Running { state: String },
    /// The job's unit is gone or ended; `detail` says how (systemd's `Result`, exit status).
    Ended { detail: String },
}

/// Failures of the host layer.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?}")]
    TimedOut { command: String, timeout: Duration },
    #[error("cannot wait for `{command}`: {source}")]
    Wait {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reboot failed: {message}")]
    Reboot { message: String },
}

/// The machine the agent manages. See the module docs for the two backends.
pub trait Host: Send + Sync + fmt::Debug {
    /// Where the agent process finds the host path `host_path` (absolute, as on the host).
    /// Paths that already lie inside the mapped root are returned unchanged.
    fn fs_path(&self, host_path: &Path) -> PathBuf;
    /// How a command run by [`Host::run`] names the host path `host_path`.
    fn cmd_path(&self, host_path: &Path) -> PathBuf;
    /// The host path of `local` when it is a path of the agent's filesystem inside the mapped
    /// root (e.g. `DIR/nix/store/x` of a private store → `/nix/store/x`), else `None`.
    fn host_path(&self, local: &Path) -> Option<PathBuf>;
    /// How a resolved host path is reported, in the same form Nix prints store paths on this
    /// backend (a real host: `/nix/store/…`; a host root with a private store: `DIR/nix/store/…`).
    fn display_path(&self, host_path: &Path) -> PathBuf;
    /// Run a command to completion (bounded by its timeout).
    fn run(&self, cmd: HostCommand) -> BoxFuture<'_, Result<CommandOutput, HostError>>;
    /// Run a command as a direct child of the agent (never in a transient unit, which would
    /// not inherit it) with `stdin` as its standard input, bounded by its timeout: how a
    /// secret reaches a program as an in-memory file (`/proc/self/fd/0`) rather than a path
    /// on disk or an argument. Backends that cannot refuse.
    fn run_with_stdin(
        &self,
        cmd: HostCommand,
        stdin: std::fs::File,
    ) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        let _ = stdin;
        Box::pin(async move {
            Err(HostError::Spawn {
                command: cmd.display(),
                source: std::io::Error::other("this host backend cannot pass a file to a command"),
            })
        })
    }
    /// Start a job that outlives the agent; returns once it is launched.
    fn spawn_detached(&self, job: DetachedJob) -> BoxFuture<'_, Result<(), HostError>>;
    /// Reboot the machine (on a real host this does not return in practice).
    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>>;
    /// Whether the detached job `name` (see [`DetachedJob::name`]) still runs.
    fn job_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<JobState, HostError>> {
        let _ = name;
        Box::pin(async { Ok(JobState::Unknown) })
    }
    /// Other activators running now (an admin's `nixos-rebuild`, `system.autoUpgrade`): the
    /// names of their units. Backends without a service manager know none.
    fn other_activators(&self) -> BoxFuture<'_, Result<Vec<String>, HostError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// `systemctl try-restart -- UNITS…` (restart the units that are running). The unit names
    /// are the only arguments; no file content ever reaches a command line.
    fn restart_units(&self, units: Vec<String>) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        let cmd = HostCommand::new("systemctl", Duration::from_secs(120))
            .arg("try-restart")
            .arg("--")
            .args(units);
        self.run(cmd)
    }
}

/// `readlink -f` on the host: follows symlinks (absolute targets are host paths) through
/// [`Host::fs_path`]. Returns the resolved host path, or `None` when it does not exist.
pub fn resolve(host: &dyn Host, host_path: &Path) -> Option<PathBuf> {
    let start = host
        .host_path(host_path)
        .unwrap_or_else(|| host_path.to_path_buf());
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, &start);
    let mut resolved = PathBuf::from("/");
    let mut hops = 0u32;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate = resolved.join(&part);
        let local = host.fs_path(&candidate);
        let meta = std::fs::symlink_metadata(&local).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&local).ok()?;
            let target = host.host_path(&target).unwrap_or(target);
            if target.is_absolute() {
                resolved = PathBuf::from("/");
            }
            push_components(&mut pending, &target);
        } else {
            resolved = candidate;
        }
    }
    Some(host.display_path(&resolved))
}

fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// How long a reboot command may take to return.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Run a reboot command (bounded by [`REBOOT_TIMEOUT`]); when it fails, [`HostError::Reboot`]
/// carries the message `failure` makes of its output.
pub(crate) async fn run_reboot(
    command: tokio::process::Command,
    display: String,
    failure: impl FnOnce(&CommandOutput) -> String,
) -> Result<(), HostError> {
    let out = run_child(command, display, REBOOT_TIMEOUT).await?;
    if out.success() {
        Ok(())
    } else {
        Err(HostError::Reboot {
            message: failure(&out),
        })
    }
}

/// Run a prepared `tokio` command with a timeout, capturing its output.
pub(crate) async fn run_child(
    command: tokio::process::Command,
    display: String,
    timeout: Duration,
) -> Result<CommandOutput, HostError> {
    run_child_with_stdin(command, display, timeout, std::process::Stdio::null()).await
}

/// [`run_child`] with `stdin` as the child's standard input.
pub(crate) async fn run_child_with_stdin(
    mut command: tokio::process::Command,
    display: String,
    timeout: Duration,
    stdin: std::process::Stdio,
) -> Result<CommandOutput, HostError> {
    command
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| HostError::Spawn {
        command: display.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(HostError::TimedOut {
            command: display,
            timeout,
        }),
        Ok(Err(source)) => Err(HostError::Wait {
            command: display,
            source,
        }),
        Ok(Ok(out)) => Ok(CommandOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolve_follows_absolute_links_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostRoot::new(dir.path(), RebootHook::None);
        let store = dir.path().join("store/abc-system");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        // /profiles/system -> system-2-link (relative) -> /store/abc-system (absolute, host view)
        std::os::unix::fs::symlink("/store/abc-system", dir.path().join("profiles/system-2-link")).unwrap();
        std::os::unix::fs::symlink("system-2-link", dir.path().join("profiles/system")).unwrap();
        std::os::unix::fs::symlink("../profiles/system", dir.path().join("run/current-system")).unwrap();
        assert_eq!(
            resolve(&host, Path::new("/run/current-system")),
            Some(store.clone())
        );
        // absolute links into the root (a private store) resolve the same way
        std::os::unix::fs::symlink(&store, dir.path().join("run/booted-system")).unwrap();
        assert_eq!(
            resolve(&host, Path::new("/run/booted-system")),
            Some(store.clone())
        );
        assert_eq!(resolve(&host, &store), Some(store.clone()));
        assert_eq!(resolve(&host, Path::new("/run/missing")), None);
    }
}
