//! Invoking Nix on the host and parsing what it prints.
//!
//! The agent needs four Nix operations, behind the [`Nix`] trait so that the demo can plug in
//! a simulated store: realise an installable and pin it with a GC root, measure a closure,
//! set the system profile, roll the profile back. [`NixCli`] is the real implementation; it
//! runs the host's own `nix`/`nix-env` through a [`Host`] (inside PID 1's namespaces on a
//! real machine). It targets Nix ≥ 2.8: `nix build --json` (no `--print-out-paths`).

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::agent::host::{CommandOutput, Host, HostCommand, HostError};

mod substitute;
pub use substitute::{Substitution, is_store_path, key_name, substitution_failure};

/// Failures of Nix operations. `message` is Nix's own error text, trimmed by
/// [`trim_nix_error`] (the last meaningful lines, bounded, credentials in URLs masked).
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("{operation} failed: {message}")]
    CommandFailed {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: cannot run nix: {source}")]
    Host {
        operation: &'static str,
        #[source]
        source: HostError,
    },
    #[error("{operation}: unexpected output from nix: {detail}")]
    Parse { operation: &'static str, detail: String },
    /// Nix was killed halfway (a signal, its unit stopped): nothing was built, and the same
    /// call may be made again.
    #[error("{operation}: interrupted (killed by a signal)")]
    Interrupted { operation: &'static str },
    /// A substitution refused before or by Nix: no trusted key, a path or cache that is not
    /// what it should be, an unsigned, wrongly signed or tampered closure.
    #[error("refused to fetch {path}: {reason}")]
    Refused { path: String, reason: String },
}

impl NixError {
    /// The text to report in `status.agent.lastError.message`.
    pub fn report(&self) -> String {
        match self {
            NixError::CommandFailed { message, .. } => message.clone(),
            NixError::Refused { .. } => bounded_tail(&mask_credentials(&self.to_string()), ERROR_MAX_CHARS),
            other => trim_nix_error(&other.to_string()),
        }
    }
}

/// The Nix operations the agent uses. Store paths are strings as Nix prints them (host view).
pub trait Nix: Send + Sync + std::fmt::Debug {
    /// Realise `installable` (build or substitute) and pin the result with an indirect GC root
    /// at the host path `gc_root` (a symlink Nix registers in its `gcroots/auto`). Returns the
    /// output store path. Never touches any profile.
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>>;
    /// Realise several installables in one evaluation where the backend can (one `nix build`
    /// with several installables: one evaluator process, the flake and nixpkgs imported
    /// once), each pinned at its own root (`gc_roots[i]`). `Err` when any of them failed (the
    /// caller then realises them one at a time to tell which). By default one at a time.
    fn realise_many<'a>(
        &'a self,
        installables: &'a [String],
        gc_roots: &'a [std::path::PathBuf],
    ) -> BoxFuture<'a, Result<Vec<String>, NixError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(installables.len());
            for (i, root) in installables.iter().zip(gc_roots) {
                out.push(self.realise(i, root).await?);
            }
            Ok(out)
        })
    }
    /// Realise exactly the store path `path` from the binary caches of `from` (never
    /// evaluate, never build), accepting only closures signed by one of its trusted keys
    /// (`require-sigs`), and pin it with an indirect GC root at `gc_root`. Returns `path`.
    /// Backends that cannot substitute refuse.
    fn substitute<'a>(
        &'a self,
        path: &'a str,
        from: &'a Substitution,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        let _ = (from, gc_root);
        Box::pin(async move {
            Err(NixError::Refused {
                path: path.to_string(),
                reason: "this agent's Nix cannot fetch from binary caches".into(),
            })
        })
    }
    /// Every path of the closure of `path` with its NAR hash, size and references
    /// (`nix path-info --json -r`): what a binary cache signs and serves.
    fn closure_info<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::builder::NarInfo>, NixError>> {
        Box::pin(async move {
            Err(NixError::CommandFailed {
                operation: "nix path-info",
                message: format!("this agent's Nix cannot describe {path} for a binary cache"),
            })
        })
    }
    /// Total size of the closure of `path` in bytes (`nix path-info -S`).
    fn closure_bytes<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, NixError>>;
    /// Make `system` the newest generation of `profile` (`nix-env -p PROFILE --set PATH`;
    /// no new generation when the profile already points at it).
    fn set_profile<'a>(&'a self, profile: &'a Path, system: &'a str) -> BoxFuture<'a, Result<(), NixError>>;
    /// Switch `profile` to its previous generation (`nix-env -p PROFILE --rollback`).
    fn rollback_profile<'a>(&'a self, profile: &'a Path) -> BoxFuture<'a, Result<(), NixError>>;
    /// Point `profile` at its existing generation `generation`
    /// (`nix-env -p PROFILE --switch-generation N`; no new generation).
    fn switch_generation<'a>(
        &'a self,
        profile: &'a Path,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        let _ = (profile, generation);
        Box::pin(async {
            Err(NixError::CommandFailed {
                operation: "nix-env --switch-generation",
                message: "not supported by this Nix".into(),
            })
        })
    }
}

/// The real Nix command line, run through a [`Host`].
#[derive(Clone, Debug)]
pub struct NixCli {
    host: Arc<dyn Host>,
    extra_args: Vec<String>,
    build_timeout: Duration,
    quick_timeout: Duration,
}

impl NixCli {
    /// `extra_args` go to every `nix` call after the experimental-features flag (tests pass
    /// `--option substituters ''` to stay offline).
    pub fn new(host: Arc<dyn Host>) -> Self {
        NixCli {
            host,
            extra_args: Vec::new(),
            build_timeout: Duration::from_secs(3600),
            quick_timeout: Duration::from_secs(120),
        }
    }

    pub fn with_extra_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Offline: no substituters (tests and air-gapped hosts).
    pub fn offline(self) -> Self {
        self.with_extra_args(["--option", "substituters", ""])
    }

    pub fn with_build_timeout(mut self, timeout: Duration) -> Self {
        self.build_timeout = timeout;
        self
    }

    fn nix(&self, timeout: Duration) -> HostCommand {
        HostCommand::new("nix", timeout)
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(self.extra_args.iter().map(OsString::from))
    }

    async fn checked(&self, operation: &'static str, cmd: HostCommand) -> Result<CommandOutput, NixError> {
        let out = self
            .host
            .run(cmd)
            .await
            .map_err(|source| NixError::Host { operation, source })?;
        if out.success() {
            Ok(out)
        } else if interrupted(&out) {
            Err(NixError::Interrupted { operation })
        } else {
            let mut message = trim_nix_error(&out.stderr);
            if message.is_empty() {
                message = format!("exited with {:?} and printed nothing", out.code);
            }
            if let Some(hint) = hint(&out.stderr) {
                message.push_str(hint);
            }
            Err(NixError::CommandFailed { operation, message })
        }
    }
}

impl Nix for NixCli {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        Box::pin(async move {
            const OP: &str = "nix build";
            if let Some(parent) = self.host.fs_path(gc_root).parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            let cmd = self
                .nix(self.build_timeout)
                .args(["build", "--json", "--no-update-lock-file", "--out-link"])
                .arg(self.host.cmd_path(gc_root))
                .arg(installable);
            let out = self.checked(OP, cmd).await?;
            parse_build_json(&out.stdout).ok_or_else(|| NixError::Parse {
                operation: OP,
                detail: bounded(&out.stdout, 300),
            })
        })
    }

    fn realise_many<'a>(
        &'a self,
        installables: &'a [String],
        gc_roots: &'a [std::path::PathBuf],
    ) -> BoxFuture<'a, Result<Vec<String>, NixError>> {
        Box::pin(async move {
            const OP: &str = "nix build";
            let (Some(first), true) = (gc_roots.first(), installables.len() == gc_roots.len()) else {
                return Ok(Vec::new());
            };
            if installables.len() == 1 {
                return Ok(vec![self.realise(&installables[0], first).await?]);
            }
            if let Some(parent) = self.host.fs_path(first).parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            // One evaluation: `nix build --out-link R i0 i1 …` links R, R-1, R-2 … in the
            // order of the installables (and prints their outputs in that order).
            let cmd = self
                .nix(self.build_timeout)
                .args(["build", "--json", "--no-update-lock-file", "--out-link"])
                .arg(self.host.cmd_path(first))
                .args(installables.iter().map(OsString::from));
            let out = self.checked(OP, cmd).await?;
            let paths = parse_build_json_all(&out.stdout)
                .filter(|p| p.len() == installables.len())
                .ok_or_else(|| NixError::Parse {
                    operation: OP,
                    detail: bounded(&out.stdout, 300),
                })?;
            // Each result under its own root (a store path: no evaluation, nothing to build),
            // then the numbered links of the batch go.
            for (i, (path, root)) in paths.iter().zip(gc_roots).enumerate().skip(1) {
                let cmd = self
                    .nix(self.quick_timeout)
                    .args(["build", "--json", "--out-link"])
                    .arg(self.host.cmd_path(root))
                    .arg(path);
                self.checked(OP, cmd).await?;
                let mut numbered = self.host.fs_path(first).into_os_string();
                numbered.push(format!("-{i}"));
                let _ = tokio::fs::remove_file(numbered).await;
            }
            Ok(paths)
        })
    }

    fn substitute<'a>(
        &'a self,
        path: &'a str,
        from: &'a Substitution,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        Box::pin(async move {
            const OP: &str = "nix build (substitute)";
            from.check(path)?;
            if let Some(parent) = self.host.fs_path(gc_root).parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            // After the configured arguments, so these settings win over `--offline`'s empty
            // substituters: the cluster's caches are what this path must come from.
            let cmd = self
                .nix(self.build_timeout)
                .args(from.options())
                .args(["build", "--json", "--out-link"])
                .arg(self.host.cmd_path(gc_root))
                .arg(path);
            let out = self.host.run(cmd).await.map_err(|source| NixError::Host {
                operation: OP,
                source,
            })?;
            if !out.success() {
                return Err(substitution_failure(path, from, &out.stderr));
            }
            let got = parse_build_json(&out.stdout).ok_or_else(|| NixError::Parse {
                operation: OP,
                detail: bounded(&out.stdout, 300),
            })?;
            if got != path {
                return Err(NixError::Refused {
                    path: path.to_string(),
                    reason: format!("nix realised {got} instead"),
                });
            }
            Ok(got)
        })
    }

    fn closure_info<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::builder::NarInfo>, NixError>> {
        Box::pin(async move {
            const OP: &str = "nix path-info -r";
            let cmd = self
                .nix(self.quick_timeout)
                .args(["path-info", "--json", "-r", path]);
            let out = self.checked(OP, cmd).await?;
            parse_closure_info(&out.stdout).ok_or_else(|| NixError::Parse {
                operation: OP,
                detail: bounded(&out.stdout, 300),
            })
        })
    }

    fn closure_bytes<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, NixError>> {
        Box::pin(async move {
            const OP: &str = "nix path-info";
            let cmd = self
                .nix(self.quick_timeout)
                .args(["path-info", "-S", "--json", path]);
            let out = self.checked(OP, cmd).await?;
            parse_closure_size(&out.stdout).ok_or_else(|| NixError::Parse {
                operation: OP,
                detail: bounded(&out.stdout, 300),
            })
        })
    }

    fn set_profile<'a>(&'a self, profile: &'a Path, system: &'a str) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let cmd = HostCommand::new("nix-env", self.quick_timeout)
                .arg("-p")
                .arg(self.host.cmd_path(profile))
                .args(["--set", system]);
            self.checked("nix-env --set", cmd).await.map(|_| ())
        })
    }

    fn rollback_profile<'a>(&'a self, profile: &'a Path) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let cmd = HostCommand::new("nix-env", self.quick_timeout)
                .arg("-p")
                .arg(self.host.cmd_path(profile))
                .arg("--rollback");
            self.checked("nix-env --rollback", cmd).await.map(|_| ())
        })
    }

    fn switch_generation<'a>(
        &'a self,
        profile: &'a Path,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let cmd = HostCommand::new("nix-env", self.quick_timeout)
                .arg("-p")
                .arg(self.host.cmd_path(profile))
                .arg("--switch-generation")
                .arg(generation.to_string());
            self.checked("nix-env --switch-generation", cmd).await.map(|_| ())
        })
    }
}

/// `nix build --json` → the `out` path of the first result (or its `path`, which Nix prints
/// for a store path given as the installable).
pub fn parse_build_json(stdout: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).ok()?;
    let first = v.get(0)?;
    first
        .get("outputs")
        .and_then(|o| o.get("out"))
        .or_else(|| first.get("path"))?
        .as_str()
        .map(str::to_string)
}

/// Whether a command was killed rather than failed: no exit code (a signal, run directly), or
/// systemd saying its unit's main process was killed (`systemd-run --wait`).
fn interrupted(out: &CommandOutput) -> bool {
    out.code.is_none()
        || out.stderr.contains("code=killed")
        || out.stderr.contains("Finished with result: signal")
}

/// Every `out` (or `path`) of `nix build --json`, in order.
pub fn parse_build_json_all(stdout: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).ok()?;
    v.as_array()?
        .iter()
        .map(|e| {
            e.get("outputs")
                .and_then(|o| o.get("out"))
                .or_else(|| e.get("path"))?
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// `nix path-info --json -r PATH` → one entry per path (Nix 2.8 prints a list of objects with
/// `path`; newer releases an object keyed by path: both are accepted).
pub fn parse_closure_info(stdout: &str) -> Option<Vec<crate::builder::NarInfo>> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).ok()?;
    match v {
        serde_json::Value::Array(a) => a.into_iter().map(|e| serde_json::from_value(e).ok()).collect(),
        serde_json::Value::Object(o) => o
            .into_iter()
            .map(|(path, mut e)| {
                e.as_object_mut()?
                    .insert("path".into(), serde_json::Value::String(path));
                serde_json::from_value(e).ok()
            })
            .collect(),
        _ => None,
    }
}

/// `nix path-info -S --json PATH` → `closureSize` (Nix 2.8 prints a list of objects; newer
/// releases an object keyed by path: both are accepted).
pub fn parse_closure_size(stdout: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).ok()?;
    let first = match &v {
        serde_json::Value::Array(a) => a.first()?,
        serde_json::Value::Object(o) => o.values().next()?,
        _ => return None,
    };
    first.get("closureSize")?.as_u64()
}

/// What to do about a failure whose cause is on the host, not in the flake.
pub fn hint(stderr: &str) -> Option<&'static str> {
    let git_missing = stderr.lines().any(|l| {
        (l.contains("'git'") || l.contains("\"git\"") || l.contains("git:"))
            && (l.contains("No such file or directory") || l.contains("not found"))
    });
    git_missing.then_some(
        "\n(the host has no git on PATH, which Nix needs for git+… flakes: add pkgs.git to environment.systemPackages)",
    )
}

/// Maximum length of a reported Nix error.
pub const ERROR_MAX_CHARS: usize = 1000;

/// The meaningful tail of Nix's stderr: drops progress and hint lines (`building …`,
/// `warning: …`, `(use '--show-trace' …)`, `For full logs …`), keeps the last 8 lines, at
/// most [`ERROR_MAX_CHARS`] characters (the end is kept), and masks `user:password@` in URLs.
pub fn trim_nix_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| {
            let t = l.trim_start();
            !t.is_empty()
                && !t.starts_with("warning:")
                && !t.starts_with("building '")
                && !t.starts_with("(use '--show-trace'")
                && !t.starts_with("For full logs, run")
                && !t.starts_with("copying path")
                && !t.starts_with("these ")
        })
        .collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    let text = tail.iter().map(|l| l.trim()).collect::<Vec<_>>().join("\n");
    bounded_tail(&mask_credentials(&text), ERROR_MAX_CHARS)
}

fn bounded(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn bounded_tail(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().skip(n - max + 1).collect();
        t.insert(0, '…');
        t
    }
}

/// `scheme://user:secret@host` → `scheme://***@host` (for anything logged or reported that
/// may carry a flake URL).
/// Whether the absolute path `path` lies in `/nix` (the store, its database, profiles, GC
/// roots), however many leading slashes it has. No secret file may go there: the store is
/// world-readable and the rest is Nix's own. The CRD's rule `^/+nix(/|$)` says the same.
pub fn under_nix(path: &str) -> bool {
    let p = path.trim_start_matches('/');
    path.starts_with('/') && (p == "nix" || p.starts_with("nix/"))
}

pub fn mask_credentials(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        if let Some(at) = authority.rfind('@') {
            out.push_str("***");
            out.push_str(&authority[at..]);
        } else {
            out.push_str(authority);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_build_json_of_nix_2_8() {
        let s = r#"[{"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/b-nixos-system"}}]"#;
        assert_eq!(parse_build_json(s).as_deref(), Some("/nix/store/b-nixos-system"));
        assert_eq!(parse_build_json("[]"), None);
        assert_eq!(parse_build_json("garbage"), None);
    }

    #[test]
    fn parses_closure_size_old_and_new_format() {
        let old = r#"[{"path":"/nix/store/x","narSize":2208,"closureSize":4208}]"#;
        let new = r#"{"/nix/store/x":{"narSize":2208,"closureSize":4208}}"#;
        assert_eq!(parse_closure_size(old), Some(4208));
        assert_eq!(parse_closure_size(new), Some(4208));
    }

    #[test]
    fn trims_hints_and_keeps_the_error() {
        let stderr = "warning: Git tree '/x' is dirty\nbuilding '/nix/store/a.drv'...\nerror: Cannot find Git revision 'abc' in ref 'master' of repository '/r'!\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(
            trim_nix_error(stderr),
            "error: Cannot find Git revision 'abc' in ref 'master' of repository '/r'!"
        );
        let long = "error: ".to_string() + &"x".repeat(5000);
        let t = trim_nix_error(&long);
        assert_eq!(t.chars().count(), ERROR_MAX_CHARS);
        assert!(t.starts_with('…'));
    }

    #[test]
    fn a_missing_git_gets_a_hint() {
        assert!(hint("error: executing 'git': No such file or directory").is_some());
        assert!(hint("error: Cannot find Git revision 'abc'").is_none());
    }

    #[test]
    fn masks_credentials_in_urls() {
        assert_eq!(
            trim_nix_error("error: cannot fetch git+https://bot:s3cr3t@git.example.org/infra.git"),
            "error: cannot fetch git+https://***@git.example.org/infra.git"
        );
        assert_eq!(
            mask_credentials("see https://example.org/a"),
            "see https://example.org/a"
        );
    }
}
