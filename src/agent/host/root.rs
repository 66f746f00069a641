//! `--host-root DIR`: a directory stands in for the host's `/`.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{CommandOutput, DetachedJob, Host, HostCommand, HostError, run_child, run_reboot};

/// Environment variable every command of a [`HostRoot`] gets: the root directory. The test
/// systems' `switch-to-configuration` (crate::sim::flake) writes its effects under it.
pub const HOST_ROOT_ENV: &str = "NIXROLL_HOST_ROOT";

/// Host path where a [`HostRoot`] records `systemctl try-restart` calls.
pub const SYSTEMCTL_LOG: &str = "/var/lib/sim/systemctl-log";

/// What "reboot" means for a [`HostRoot`].
#[derive(Clone, Default)]
pub enum RebootHook {
    /// Rebooting fails (the agent reports the error).
    #[default]
    None,
    /// Run this argv (from `--reboot-command`, split on whitespace, no shell).
    Command(Vec<String>),
    /// Call this in-process (the demo's simulated bootloader).
    Callback(Arc<dyn Fn() + Send + Sync>),
}

impl fmt::Debug for RebootHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebootHook::None => f.write_str("None"),
            RebootHook::Command(argv) => f.debug_tuple("Command").field(argv).finish(),
            RebootHook::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

impl RebootHook {
    /// Parse `--reboot-command`: split on whitespace (no shell, no quoting).
    pub fn command_line(line: &str) -> RebootHook {
        let argv: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        if argv.is_empty() {
            RebootHook::None
        } else {
            RebootHook::Command(argv)
        }
    }
}

/// Host backend rooted at a directory: host path `/x` is `DIR/x`; commands run directly as
/// children of the agent with `NIXROLL_HOST_ROOT=DIR` plus the configured environment.
#[derive(Clone, Debug)]
pub struct HostRoot {
    dir: PathBuf,
    reboot: RebootHook,
    env: Vec<(OsString, OsString)>,
    /// Nix prints store paths as the host sees them (`/nix/store/…`): a chroot store.
    host_view_store: bool,
}

impl HostRoot {
    pub fn new(dir: impl Into<PathBuf>, reboot: RebootHook) -> Self {
        HostRoot {
            dir: dir.into(),
            reboot,
            env: Vec::new(),
            host_view_store: false,
        }
    }

    /// Point every Nix command at a chroot store rooted at DIR: store paths are
    /// `/nix/store/…` as on a real host (stored in `DIR/nix/store`), so that hosts with
    /// separate stores share store paths and can substitute from one another's binary
    /// caches. Builds in it need Nix's sandbox (root, or user namespaces).
    pub fn with_chroot_nix_store(mut self) -> Self {
        let d = self.dir.clone();
        let mut store = OsString::from("local?root=");
        store.push(&d);
        self.host_view_store = true;
        self.with_env("NIX_REMOTE", store)
            .with_env("NIX_CONF_DIR", d.join("etc/nix"))
            .with_env("HOME", d.join("root"))
    }

    /// Add an environment variable for every command (e.g. `NIX_STORE_DIR` of a private
    /// store). Per backend, not process-global, so tests can run in parallel.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Point every Nix command at a private store inside the root: `DIR/nix/store`, state in
    /// `DIR/nix/var/nix` (so the system profile `/nix/var/nix/profiles/system` is a real
    /// profile of that store), logs and `HOME` inside DIR too.
    pub fn with_private_nix_store(self) -> Self {
        let d = self.dir.clone();
        self.with_env("NIX_STORE_DIR", d.join("nix/store"))
            .with_env("NIX_STATE_DIR", d.join("nix/var/nix"))
            .with_env("NIX_LOG_DIR", d.join("nix/var/log/nix"))
            .with_env("NIX_CONF_DIR", d.join("etc/nix"))
            .with_env("HOME", d.join("root"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, program: &OsString, args: &[OsString]) -> tokio::process::Command {
        let nix = Path::new(program)
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("nix"));
        let mut c = if self.host_view_store && !nix {
            // A chroot store's files are under DIR/nix/store, but its links (a system's `bin`,
            // `kernel` …) point at /nix/store as on a real machine: run everything but Nix
            // itself (which reaches the store through NIX_REMOTE) in a mount namespace of its
            // own where DIR/nix/store is bind-mounted on /nix/store, so those links resolve.
            // Private to the command: the machine's /nix/store is untouched.
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                .arg("mount --bind \"$0\" /nix/store && exec \"$@\"")
                .arg(self.dir.join("nix/store"))
                .arg(program);
            c
        } else {
            tokio::process::Command::new(program)
        };
        c.args(args);
        c.env(HOST_ROOT_ENV, &self.dir);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
}

impl Host for HostRoot {
    fn fs_path(&self, host_path: &Path) -> PathBuf {
        if host_path.starts_with(&self.dir) {
            return host_path.to_path_buf();
        }
        let rel = host_path.strip_prefix("/").unwrap_or(host_path);
        self.dir.join(rel)
    }

    fn cmd_path(&self, host_path: &Path) -> PathBuf {
        self.fs_path(host_path)
    }

    fn host_path(&self, local: &Path) -> Option<PathBuf> {
        local
            .strip_prefix(&self.dir)
            .ok()
            .map(|rest| Path::new("/").join(rest))
    }

    fn display_path(&self, host_path: &Path) -> PathBuf {
        if self.host_view_store {
            return self
                .host_path(host_path)
                .unwrap_or_else(|| host_path.to_path_buf());
        }
        self.fs_path(host_path)
    }

    fn run(&self, cmd: HostCommand) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        Box::pin(async move {
            let display = cmd.display();
            let command = self.command(&cmd.program, &cmd.args);
            run_child(command, display, cmd.timeout).await
        })
    }

    fn run_with_stdin(
        &self,
        cmd: HostCommand,
        stdin: std::fs::File,
    ) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        Box::pin(async move {
            let display = cmd.display();
            let command = self.command(&cmd.program, &cmd.args);
            super::run_child_with_stdin(command, display, cmd.timeout, stdin.into()).await
        })
    }

    fn spawn_detached(&self, job: DetachedJob) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            let Some((program, args)) = job.argv.split_first() else {
                return Err(HostError::Spawn {
                    command: job.name,
                    source: std::io::Error::other("empty argv"),
                });
            };
            let mut c = self.command(program, args);
            // Own process group: killing the agent (or its group) does not kill the job.
            c.process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(false);
            let mut child = c.spawn().map_err(|source| HostError::Spawn {
                command: job.name.clone(),
                source,
            })?;
            // Reap it in the background; the outcome travels through the result file.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            Ok(())
        })
    }

    /// There are no units under a directory: the call is recorded, one line per call
    /// (`try-restart UNIT…`), in `DIR/var/lib/sim/systemctl-log` ([`SYSTEMCTL_LOG`]).
    fn restart_units(&self, units: Vec<String>) -> BoxFuture<'_, Result<CommandOutput, HostError>> {
        Box::pin(async move {
            let log = self.fs_path(Path::new(SYSTEMCTL_LOG));
            let line = format!("try-restart {}\n", units.join(" "));
            let res = (|| {
                if let Some(dir) = log.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
                std::io::Write::write_all(&mut f, line.as_bytes())
            })();
            res.map_err(|source| HostError::Spawn {
                command: format!("systemctl try-restart {}", units.join(" ")),
                source,
            })?;
            Ok(CommandOutput {
                code: Some(0),
                ..Default::default()
            })
        })
    }

    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            match &self.reboot {
                RebootHook::None => Err(HostError::Reboot {
                    message: "no reboot command configured (--reboot-command)".into(),
                }),
                RebootHook::Callback(f) => {
                    f();
                    Ok(())
                }
                RebootHook::Command(argv) => {
                    let Some((program, args)) = argv.split_first() else {
                        return Err(HostError::Reboot {
                            message: "empty reboot command".into(),
                        });
                    };
                    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
                    let line = argv.join(" ");
                    run_reboot(
                        self.command(&OsString::from(program), &args),
                        line.clone(),
                        |out| format!("`{line}` exited with {:?}: {}", out.code, out.stderr.trim()),
                    )
                    .await
                }
            }
        })
    }
}
