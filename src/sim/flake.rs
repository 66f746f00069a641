//! Test flakes: git repositories whose `nixosConfigurations.<host>.config.system.build.toplevel`
//! is a tiny stand-in for a NixOS system, built by Nix in ~0.1 s with no host binary and no
//! inputs (see docs/agent.md and test-substrate.md).
//!
//! The toplevel is a `builtin:buildenv` over one `builtins.path` per top-level entry of the
//! repo's `system/` directory (`bin/switch-to-configuration`, `kernel`, `initrd`,
//! `kernel-modules/`, `kernel-params`, `systemd/`, `init-interface-version`, `nixos-version`,
//! `etc/`). Like in NixOS, an unchanged component keeps its store path, so "only a service
//! changed" leaves `kernel` pointing at the very same path.
//!
//! The generated `switch-to-configuration` models NixOS's against the host root in
//! `$NIXROLL_HOST_ROOT` (set by `HostRoot`): `boot` and `switch` point `boot/default-system`
//! at the new system (the bootloader entry); `switch` then exits 100 when the
//! `init-interface-version` differs from the running system's, else points
//! `run/current-system` at it. Every call is appended to `var/lib/sim/switch-log`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the next commit's system looks like. Each field is a file of the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemSpec {
    pub kernel: String,
    pub initrd: String,
    /// Content of `kernel-modules/modules.dep`.
    pub kernel_modules: String,
    pub kernel_params: String,
    /// Content of `systemd/version`.
    pub systemd: String,
    pub init_interface_version: String,
    pub nixos_version: String,
    /// Content of `etc/service.conf`: changing it needs no reboot.
    pub service: String,
    /// Written as `configuration-revision` when set.
    pub configuration_revision: Option<String>,
    /// When set, `sw/bin/nixos-version --json` prints it as `configurationRevision` (how NixOS
    /// exposes `system.configurationRevision`).
    pub nixos_version_revision: Option<String>,
    /// `switch-to-configuration switch` exits with this code (before doing anything).
    pub switch_exit: Option<i32>,
    /// `switch-to-configuration boot` exits with this code (before doing anything).
    pub boot_exit: Option<i32>,
    /// `switch-to-configuration` sleeps this long first (e.g. `"1"` or `"0.5"` seconds), to
    /// kill the agent while it runs.
    pub switch_delay: Option<String>,
    /// The derivation fails to build (a buildenv file collision on `kernel`).
    pub broken_build: bool,
    /// Evaluation throws this message.
    pub eval_error: Option<String>,
    /// Content of `switch-inhibitors` (NixOS ≥ 25.11: JSON, name → store path). `switch`,
    /// `test` and `check` refuse (exit 1) when the running system has the file and it differs.
    pub switch_inhibitors: Option<String>,
    /// `switch`/`test` activate, then report these units as failed and exit 4 (as NixOS does).
    pub failed_units: Option<String>,
    /// `check` (and the pre-switch checks of `switch`/`test`) exit with this code.
    pub check_exit: Option<i32>,
    /// Adds `build-probe/` to the system, built by `/bin/sh` (needs a host with `/bin/mkdir`,
    /// `/bin/cat`, no sandbox): `build-cgroup` (the builder's `/proc/self/cgroup`) and this
    /// nonce (so every commit builds it anew). Shows where host Nix work runs.
    pub probe: Option<String>,
    /// `sw/bin/nixos-version` sleeps this long first (a hanging optional fact).
    pub nixos_version_delay: Option<String>,
    /// Adds `slow/` to the system, built by `/bin/sh -c SCRIPT` (needs `/bin/sh` and no
    /// sandbox): a build that takes a while and can say when it starts and ends (to kill a
    /// build halfway and count how often it ran).
    pub slow_build: Option<String>,
}

impl Default for SystemSpec {
    fn default() -> Self {
        SystemSpec {
            kernel: "linux-6.6.1".into(),
            initrd: "initrd-1".into(),
            kernel_modules: "modules-6.6.1".into(),
            kernel_params: "loglevel=4".into(),
            systemd: "systemd-255".into(),
            init_interface_version: "systemd".into(),
            nixos_version: "24.05.1".into(),
            service: "service-1".into(),
            configuration_revision: None,
            nixos_version_revision: None,
            switch_exit: None,
            boot_exit: None,
            switch_delay: None,
            broken_build: false,
            eval_error: None,
            switch_inhibitors: None,
            failed_units: None,
            check_exit: None,
            probe: None,
            nixos_version_delay: None,
            slow_build: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlakeError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("git {args} failed: {message}")]
    Git { args: String, message: String },
    #[error("signing a commit: {0}")]
    Sign(String),
}

/// An SSH key that signs the test flake's commits the way `git -c gpg.format=ssh commit -S`
/// does (an SSHSIG with namespace `git` over the commit, in its `gpgsig` header), made
/// in-process so that the demo needs no `ssh-keygen`.
#[derive(Clone)]
pub struct CommitSigner {
    key: std::sync::Arc<ssh_key::PrivateKey>,
}

impl std::fmt::Debug for CommitSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommitSigner({})", self.allowed_signer())
    }
}

impl CommitSigner {
    /// A new random ed25519 key (its seed from the system's RNG, through ring).
    pub fn generate() -> Result<CommitSigner, FlakeError> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| FlakeError::Sign("no system randomness".into()))?;
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let mut key = ssh_key::PrivateKey::from(pair);
        key.set_comment("nixroll-demo");
        Ok(CommitSigner {
            key: std::sync::Arc::new(key),
        })
    }

    /// The key's line for an allowed-signers file: `demo@nixroll.invalid namespaces="git" ssh-ed25519 AAAA…`.
    pub fn allowed_signer(&self) -> String {
        let public = self.key.public_key().to_openssh().unwrap_or_default();
        let key: Vec<&str> = public.split_whitespace().take(2).collect();
        format!("demo@nixroll.invalid namespaces=\"git\" {}", key.join(" "))
    }

    /// `SHA256:…` of the public key.
    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string()
    }

    /// `raw` (an unsigned commit object) with a `gpgsig` header holding its signature.
    pub fn sign_commit(&self, raw: &str) -> Result<String, FlakeError> {
        let sig = self
            .key
            .sign("git", ssh_key::HashAlg::Sha512, raw.as_bytes())
            .map_err(|e| FlakeError::Sign(e.to_string()))?;
        let pem = sig
            .to_pem(ssh_key::LineEnding::LF)
            .map_err(|e| FlakeError::Sign(e.to_string()))?;
        let header = format!("gpgsig {}\n", pem.trim_end().replace('\n', "\n "));
        // The header goes after the last header line (before the blank line of the message).
        let end = raw.find("\n\n").map(|i| i + 1).unwrap_or(raw.len());
        Ok(format!("{}{header}{}", &raw[..end], &raw[end..]))
    }
}

/// A test flake in a git repository.
#[derive(Debug)]
pub struct TestFlake {
    dir: PathBuf,
    hosts: Vec<String>,
    spec: SystemSpec,
    head: String,
    real_host: bool,
    signer: Option<CommitSigner>,
}

impl TestFlake {
    /// Create the repository in `dir` (created if missing) with `hosts` as
    /// `nixosConfigurations` and a first commit of [`SystemSpec::default`].
    pub fn create(dir: impl Into<PathBuf>, hosts: &[&str]) -> Result<TestFlake, FlakeError> {
        Self::create_with(dir.into(), hosts, false)
    }

    /// Like [`TestFlake::create`], but the systems' `switch-to-configuration` acts on the real
    /// `/` of the machine it runs on (`/run/current-system`, `/boot/default-system`, the lock
    /// in `/run/nixos`) instead of `$NIXROLL_HOST_ROOT`: for a real (container) host, e2e/.
    pub fn create_for_real_host(dir: impl Into<PathBuf>, hosts: &[&str]) -> Result<TestFlake, FlakeError> {
        Self::create_with(dir.into(), hosts, true)
    }

    fn create_with(dir: PathBuf, hosts: &[&str], real_host: bool) -> Result<TestFlake, FlakeError> {
        std::fs::create_dir_all(&dir).map_err(|source| FlakeError::Write {
            path: dir.clone(),
            source,
        })?;
        git(&dir, &["init", "-q"])?;
        let mut flake = TestFlake {
            dir,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            spec: SystemSpec::default(),
            head: String::new(),
            real_host,
            signer: None,
        };
        flake.commit("initial system", |_| {})?;
        Ok(flake)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `git+file:///…` (no revision).
    pub fn url(&self) -> String {
        format!("git+file://{}", self.dir.display())
    }

    /// The installable of `host` at `rev` (as the controller builds it).
    pub fn installable(&self, rev: &str, host: &str) -> String {
        crate::api::installable(&self.url(), rev, host)
    }

    /// The last commit.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// The checked-out branch (what `git init` named it).
    pub fn branch(&self) -> Result<String, FlakeError> {
        Ok(git(&self.dir, &["symbolic-ref", "--short", "HEAD"])?
            .trim()
            .to_string())
    }

    pub fn spec(&self) -> &SystemSpec {
        &self.spec
    }

    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Change the system (for every host), commit, return the commit hash.
    pub fn commit(
        &mut self,
        message: &str,
        change: impl FnOnce(&mut SystemSpec),
    ) -> Result<String, FlakeError> {
        let mut spec = self.spec.clone();
        change(&mut spec);
        self.write(&spec)?;
        git(&self.dir, &["add", "-A"])?;
        git(
            &self.dir,
            &[
                "-c",
                "user.name=nixroll-test",
                "-c",
                "user.email=test@nixroll.invalid",
                "-c",
                "commit.gpgsign=false",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                message,
            ],
        )?;
        if let Some(signer) = &self.signer {
            let raw = git(&self.dir, &["cat-file", "commit", "HEAD"])?;
            let signed = signer.sign_commit(&raw)?;
            let path = self.dir.join(".git").join("nixroll-signed-commit");
            write_file(&path, signed.trim_end_matches('\n'))?;
            let id = git(
                &self.dir,
                &["hash-object", "-t", "commit", "-w", &path.display().to_string()],
            )?;
            git(&self.dir, &["update-ref", "HEAD", id.trim()])?;
        }
        self.spec = spec;
        self.head = git(&self.dir, &["rev-parse", "HEAD"])?.trim().to_string();
        Ok(self.head.clone())
    }

    /// Sign every later commit with `signer` (None: unsigned, the default).
    pub fn sign_commits(&mut self, signer: Option<CommitSigner>) {
        self.signer = signer;
    }

    /// A new kernel (reboot needed: `kernel`, `kernel-modules`).
    pub fn commit_kernel_change(&mut self) -> Result<String, FlakeError> {
        self.commit("new kernel", |s| {
            s.kernel.push('+');
            s.kernel_modules.push('+');
        })
    }

    /// Only a service's configuration changes (no reboot needed).
    pub fn commit_service_change(&mut self) -> Result<String, FlakeError> {
        self.commit("service change", |s| s.service.push('+'))
    }

    /// The system fails to build.
    pub fn commit_broken_build(&mut self) -> Result<String, FlakeError> {
        self.commit("broken build", |s| s.broken_build = true)
    }

    /// Evaluation fails with `message`.
    pub fn commit_eval_error(&mut self, message: &str) -> Result<String, FlakeError> {
        self.commit("eval error", |s| s.eval_error = Some(message.to_string()))
    }

    /// `host` no longer has a configuration.
    pub fn commit_without_host(&mut self, host: &str) -> Result<String, FlakeError> {
        self.hosts.retain(|h| h != host);
        self.commit("drop host", |_| {})
    }

    /// Set the hosts that have a configuration.
    pub fn commit_hosts(&mut self, hosts: &[&str]) -> Result<String, FlakeError> {
        self.hosts = hosts.iter().map(|h| h.to_string()).collect();
        self.commit("set hosts", |_| {})
    }

    fn write(&self, spec: &SystemSpec) -> Result<(), FlakeError> {
        let sys = self.dir.join("system");
        let _ = std::fs::remove_dir_all(&sys);
        let _ = std::fs::remove_dir_all(self.dir.join("conflict"));
        let _ = std::fs::remove_file(self.dir.join("eval-error"));
        let _ = std::fs::remove_file(self.dir.join("probe"));
        let _ = std::fs::remove_file(self.dir.join("slow"));
        let mut files: Vec<(PathBuf, String)> = vec![
            (self.dir.join("flake.nix"), flake_nix()),
            (
                self.dir.join("hosts.json"),
                serde_json::to_string(&self.hosts).unwrap_or_else(|_| "[]".into()),
            ),
        ];
        files.extend(
            system_files_for(spec, self.real_host)
                .into_iter()
                .map(|(rel, content)| (sys.join(rel), content)),
        );
        if let Some(nonce) = &spec.probe {
            files.push((self.dir.join("probe"), nonce.clone()));
        }
        if let Some(script) = &spec.slow_build {
            files.push((self.dir.join("slow"), script.clone()));
        }
        if spec.broken_build {
            files.push((self.dir.join("conflict/kernel"), "conflicting kernel".into()));
        }
        if let Some(m) = &spec.eval_error {
            files.push((self.dir.join("eval-error"), m.clone()));
        }
        for (path, content) in files {
            write_file(&path, &content)?;
        }
        use std::os::unix::fs::PermissionsExt;
        for (rel, _) in system_files(spec) {
            if is_executable(rel) {
                let path = sys.join(rel);
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|source| FlakeError::Write { path, source })?;
            }
        }
        Ok(())
    }
}

/// Whether the system file `rel` (from [`system_files`]) is a program.
pub fn is_executable(rel: &str) -> bool {
    rel.starts_with("bin/") || rel.starts_with("sw/bin/")
}

/// The files of a system built from `spec`, relative to the system's root (the same layout
/// the flake's toplevel has; see [`is_executable`]).
pub fn system_files(spec: &SystemSpec) -> Vec<(&'static str, String)> {
    system_files_for(spec, false)
}

/// [`system_files`] for a host root (`real_host = false`: effects under `$NIXROLL_HOST_ROOT`)
/// or for a real host (effects on `/`).
pub fn system_files_for(spec: &SystemSpec, real_host: bool) -> Vec<(&'static str, String)> {
    let mut files = vec![
        ("bin/switch-to-configuration", switch_script(spec, real_host)),
        ("kernel", spec.kernel.clone()),
        ("initrd", spec.initrd.clone()),
        ("kernel-modules/modules.dep", spec.kernel_modules.clone()),
        ("kernel-params", spec.kernel_params.clone()),
        ("systemd/version", spec.systemd.clone()),
        ("init-interface-version", spec.init_interface_version.clone()),
        ("nixos-version", spec.nixos_version.clone()),
        ("etc/service.conf", spec.service.clone()),
    ];
    if let Some(r) = &spec.configuration_revision {
        files.push(("configuration-revision", r.clone()));
    }
    if let Some(i) = &spec.switch_inhibitors {
        files.push(("switch-inhibitors", i.clone()));
    }
    if let Some(r) = &spec.nixos_version_revision {
        let json = serde_json::json!({
            "configurationRevision": r,
            "nixosVersion": spec.nixos_version,
        });
        let delay = spec
            .nixos_version_delay
            .as_ref()
            .map(|d| format!("sleep {d}\n"))
            .unwrap_or_default();
        // Leaves its environment where tests can see it (what a host command gets).
        let root = if real_host {
            ""
        } else {
            "${NIXROLL_HOST_ROOT:-/nonexistent}"
        };
        files.push((
            "sw/bin/nixos-version",
            format!(
                "#!/bin/sh\nenv >\"{root}/var/lib/sim/nixos-version-env\" 2>/dev/null\n{delay}echo '{json}'"
            ),
        ));
    }
    files
}

fn write_file(path: &Path, content: &str) -> Result<(), FlakeError> {
    let err = |source| FlakeError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::write(path, format!("{content}\n")).map_err(err)
}

fn git(dir: &Path, args: &[&str]) -> Result<String, FlakeError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| FlakeError::Git {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FlakeError::Git {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Nix system string of this machine (`x86_64-linux`, `aarch64-linux`).
pub fn nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

fn flake_nix() -> String {
    FLAKE_TEMPLATE.replace("@SYSTEM@", &nix_system())
}

const FLAKE_TEMPLATE: &str = r#"# A stand-in for a NixOS flake, generated by nixroll's test suite (crate::sim::flake).
{
  outputs = { self }:
    let
      sys = ./system;
      base = toString sys;
      names = builtins.attrNames (builtins.readDir sys);
      # One store path per top-level entry: unchanged components keep their path.
      part = n: builtins.path {
        path = sys;
        name = "nixos-part-${n}";
        filter = p: t:
          let q = base + "/" + n;
          in p == q || builtins.substring 0 (builtins.stringLength q + 1) p == q + "/";
      };
      conflict =
        if builtins.pathExists ./conflict
        then [ "true" "5" "1" (builtins.path { path = ./conflict; name = "conflict"; }) ]
        else [ ];
      probe =
        if builtins.pathExists ./probe
        then [ "true" "5" "1" (derivation {
          name = "build-probe";
          system = "@SYSTEM@";
          builder = "/bin/sh";
          args = [ "-c" "/bin/mkdir -p $out/build-probe && /bin/cat /proc/self/cgroup >$out/build-probe/build-cgroup && echo $nonce >$out/build-probe/nonce" ];
          nonce = builtins.readFile ./probe;
        }) ]
        else [ ];
      slow =
        if builtins.pathExists ./slow
        then [ "true" "5" "1" (derivation {
          name = "slow-part";
          system = "@SYSTEM@";
          builder = "/bin/sh";
          args = [ "-c" (builtins.readFile ./slow) ];
        }) ]
        else [ ];
      toplevel = host:
        if builtins.pathExists ./eval-error
        then throw (builtins.readFile ./eval-error)
        else derivation {
          name = "nixos-system-${host}";
          system = "@SYSTEM@";
          builder = "builtin:buildenv";
          derivations = builtins.concatMap (n: [ "true" "5" "1" (part n) ]) names ++ conflict ++ probe ++ slow;
          manifest = builtins.toFile "manifest.nix" "[ ]";
        };
      hosts = builtins.fromJSON (builtins.readFile ./hosts.json);
    in {
      nixosConfigurations = builtins.listToAttrs (map (h: {
        name = h;
        value = { config.system.build.toplevel = toplevel h; };
      }) hosts);
    };
}
"#;

fn switch_script(spec: &SystemSpec, real_host: bool) -> String {
    let mut forced = String::new();
    if let Some(d) = &spec.switch_delay {
        forced.push_str(&format!("sleep {d}\n"));
    }
    if let Some(code) = spec.switch_exit {
        forced.push_str(&format!(
            "if [ \"$action\" = switch ]; then echo \"sim: switch-to-configuration switch fails with {code}\" >&2; exit {code}; fi\n"
        ));
    }
    if let Some(code) = spec.boot_exit {
        forced.push_str(&format!(
            "if [ \"$action\" = boot ]; then echo \"sim: switch-to-configuration boot fails with {code}\" >&2; exit {code}; fi\n"
        ));
    }
    let check = match spec.check_exit {
        Some(code) => format!("echo \"sim: a pre-switch check failed\" >&2; exit {code}\n"),
        None => String::new(),
    };
    let failed = match &spec.failed_units {
        Some(units) => format!(
            "if [ \"$action\" = switch ] || [ \"$action\" = test ]; then echo \"warning: the following units failed: {units}\" >&2; exit 4; fi\n"
        ),
        None => String::new(),
    };
    let root = if real_host {
        "\"\""
    } else {
        "\"${NIXROLL_HOST_ROOT:?NIXROLL_HOST_ROOT is not set}\""
    };
    SWITCH_TEMPLATE
        .replace("@ROOT@", root)
        .replace("@FORCED@\n", &forced)
        .replace("@CHECK@\n", &check)
        .replace("@FAILED@\n", &failed)
}

const SWITCH_TEMPLATE: &str = r#"#!/bin/sh
# switch-to-configuration of a nixroll test system; models NixOS's (crate::sim::flake):
# one activation at a time (the lock), pre-switch checks (switch-inhibitors), the bootloader
# entry, exit 100 for an incompatible init, exit 4 for failed units.
action="$1"
top=$(dirname "$(dirname "$0")")
root=@ROOT@
case "$action" in
switch|boot|test|check|dry-activate) ;;
*) echo "usage: switch-to-configuration switch|boot|test|check|dry-activate" >&2; exit 1 ;;
esac
mkdir -p "$root/var/lib/sim" "$root/boot" "$root/run/nixos"
echo "$action $top" >>"$root/var/lib/sim/switch-log"
exec 9>"$root/run/nixos/switch-to-configuration.lock"
if ! flock -n 9; then
  echo "Could not acquire lock on /run/nixos/switch-to-configuration.lock: another switch-to-configuration is running" >&2
  exit 1
fi
if { [ "$action" = switch ] || [ "$action" = boot ]; } && [ -e "$root/var/lib/sim/hold-switch" ]; then
  : >"$root/var/lib/sim/switch-held"
  while [ -e "$root/var/lib/sim/hold-switch" ]; do sleep 0.02; done
  rm -f "$root/var/lib/sim/switch-held"
fi
@FORCED@
if [ "$action" != boot ] && [ "$action" != dry-activate ] && [ -z "${NIXOS_NO_CHECK:-}" ]; then
@CHECK@
  if [ -e "$root/run/current-system/switch-inhibitors" ] && [ -e "$top/switch-inhibitors" ] &&
    ! cmp -s "$root/run/current-system/switch-inhibitors" "$top/switch-inhibitors"; then
    echo "There are changes to critical components of the system (switch-inhibitors). You probably want to run 'nixos-rebuild boot' and reboot." >&2
    exit 1
  fi
fi
[ "$action" = check ] && exit 0
if [ "$action" = switch ] || [ "$action" = boot ]; then
  ln -sfn "$top" "$root/boot/default-system"
fi
[ "$action" = boot ] && exit 0
if [ "$action" = switch ] && [ -e "$root/run/current-system/init-interface-version" ] &&
  [ "$(cat "$top/init-interface-version")" != "$(cat "$root/run/current-system/init-interface-version")" ]; then
  echo "Warning: the new NixOS configuration has an 'init' that is incompatible with the current configuration. The new configuration won't take effect until you reboot the system." >&2
  exit 100
fi
if [ "$action" = switch ] || [ "$action" = test ]; then
  ln -sfn "$top" "$root/run/current-system"
fi
@FAILED@
exit 0
"#;
