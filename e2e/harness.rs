//! The e2e test bed: a real systemd host in a `systemd-nspawn` container, and the agent run
//! in it as its DaemonSet pod would run (see e2e/README.md). Used by tests/real_host.rs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The repository's e2e/ directory.
pub fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The cgroup hierarchies a process must be moved in: hybrid (v2 at `unified` plus v1
/// `name=systemd`, as on these machines) or a plain v2 mount.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("unified/cgroup.procs").exists() {
        vec![base.join("unified"), base.join("systemd")]
    } else if base.join("cgroup.controllers").exists() {
        vec![base.to_path_buf()]
    } else {
        vec![]
    }
}

fn missing_prerequisite() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some("not running as root".into());
    }
    for tool in ["systemd-nspawn", "debootstrap", "nsenter", "unshare", "chroot"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install systemd-container debootstrap)"
            ));
        }
    }
    if cgroup_roots().is_empty() {
        return Some("no writable cgroup hierarchy at /sys/fs/cgroup".into());
    }
    None
}

/// The cached base root filesystem (built by e2e/rootfs.sh on first use), or `None` when
/// this machine cannot run the test bed: then the test is skipped with a reason, except in
/// CI (`CI=true`), where it fails.
pub fn rootfs() -> Option<PathBuf> {
    static ROOTFS: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let r = ROOTFS.get_or_init(|| {
        if let Some(why) = missing_prerequisite() {
            return Err(why);
        }
        clean_stale();
        let out = Command::new("sh")
            .arg(e2e_dir().join("rootfs.sh"))
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("e2e/rootfs.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!("e2e/rootfs.sh failed ({})", out.status));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(why) if in_ci() => panic!("the e2e test bed cannot run here (CI=true): {why}"),
        Err(why) => {
            eprintln!("SKIPPED: the e2e test bed cannot run here: {why}");
            None
        }
    }
}

/// Remove what killed test runs left behind: hosts of test processes that no longer exist
/// (their cgroups, with every process in them, and their overlays).
fn clean_stale() {
    for root in cgroup_roots() {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("nixroll-e2e-") else {
                continue;
            };
            let pid = rest.trim_end_matches("-pod").rsplit('-').next().unwrap_or("");
            if pid.is_empty() || Path::new("/proc").join(pid).exists() {
                continue;
            }
            kill_cgroup(&e.path());
            std::thread::sleep(Duration::from_millis(200));
            let _ = Command::new("find")
                .arg(e.path())
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .stderr(Stdio::null())
                .status();
            let dir = PathBuf::from("/var/tmp").join(name.trim_end_matches("-pod"));
            let _ = Command::new("umount")
                .arg("-l")
                .arg(dir.join("merged"))
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where the agent's "image" is mounted inside the host (read-only, by nspawn).
pub const IMAGE_IN_HOST: &str = "/var/lib/nixroll-e2e/image";

/// One boot of the container: its number (1, 2, …) and the host-side pid of its PID 1 (0
/// while it is down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boot {
    pub n: u32,
    pub pid1: u32,
}

/// A NixOS-like host: an overlay over the cached rootfs, booted by `systemd-nspawn` in a loop
/// (exit 133 = `systemctl reboot`: boot again).
pub struct TestHost {
    pub name: String,
    pub dir: PathBuf,
    /// The host's `/` as seen from outside (the overlay's merged directory).
    pub root: PathBuf,
    cgroups: Vec<PathBuf>,
    pod_cgroups: Vec<PathBuf>,
    boots: tokio::sync::watch::Receiver<Boot>,
    stop: Arc<AtomicBool>,
    nspawn_pid: Arc<AtomicU32>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl TestHost {
    /// Lay out and boot a host called `name` (unique among running tests).
    pub fn boot(rootfs: &Path, name: &str) -> TestHost {
        let name = format!("nixroll-e2e-{name}-{}", std::process::id());
        let dir = PathBuf::from("/var/tmp").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["upper", "work", "merged", "image"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let root = dir.join("merged");
        check(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    rootfs.display(),
                    dir.join("upper").display(),
                    dir.join("work").display()
                ))
                .arg(&root),
        );
        // The NixOS-like pieces (e2e/host/).
        let host = e2e_dir().join("host");
        let put = |src: &str, dst: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let d = root.join(dst.trim_start_matches('/'));
            std::fs::create_dir_all(d.parent().unwrap()).unwrap();
            std::fs::copy(host.join(src), &d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        put("nix.conf", "/etc/nix/nix.conf", 0o644);
        put("nixos-stage2", "/usr/local/lib/nixroll-e2e/nixos-stage2", 0o755);
        put(
            "nixos-stage2.service",
            "/etc/systemd/system/nixos-stage2.service",
            0o644,
        );
        put("set-environment", "/etc/set-environment", 0o644);
        let units = root.join("etc/systemd/system");
        std::fs::create_dir_all(units.join("sysinit.target.wants")).unwrap();
        let _ = std::os::unix::fs::symlink(
            "../nixos-stage2.service",
            units.join("sysinit.target.wants/nixos-stage2.service"),
        );
        for masked in ["console-getty.service", "systemd-networkd-wait-online.service"] {
            let _ = std::os::unix::fs::symlink("/dev/null", units.join(masked));
        }
        for d in [
            "nix/var/nix/profiles",
            "nix/var/nix/gcroots",
            "var/lib/nixroll",
            "boot",
            "var/lib/nixroll-e2e/image",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // The agent's image: the binary cargo built, the pod script.
        let image = dir.join("image");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_nixroll"));
        if std::fs::hard_link(&bin, image.join("nixroll")).is_err() {
            std::fs::copy(&bin, image.join("nixroll")).unwrap();
        }
        std::fs::copy(e2e_dir().join("pod.sh"), image.join("pod.sh")).unwrap();
        // The image's CA bundle (the agent's TLS client loads one at start).
        let _ = std::fs::copy("/etc/ssl/certs/ca-certificates.crt", image.join("ca.pem"));

        let mk = |suffix: &str| -> Vec<PathBuf> {
            cgroup_roots()
                .into_iter()
                .map(|r| {
                    let p = r.join(format!("{name}{suffix}"));
                    std::fs::create_dir_all(&p).unwrap();
                    p
                })
                .collect()
        };
        let cgroups = mk("");
        let pod_cgroups = mk("-pod");

        let (tx, rx) = tokio::sync::watch::channel(Boot { n: 0, pid1: 0 });
        let stop = Arc::new(AtomicBool::new(false));
        let nspawn_pid = Arc::new(AtomicU32::new(0));
        let supervisor = {
            let (stop, nspawn_pid, cgroups, root, dir, name) = (
                stop.clone(),
                nspawn_pid.clone(),
                cgroups.clone(),
                root.clone(),
                dir.clone(),
                name.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0;
                loop {
                    n += 1;
                    let moves: String = cgroups
                        .iter()
                        .map(|c| format!("echo $$ >{}/cgroup.procs && ", c.display()))
                        .collect();
                    let log = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("console.log"))
                        .unwrap();
                    let mut child = Command::new("sh")
                        .arg("-c")
                        .arg(format!(
                            "{moves}exec setpriv --pdeathsig KILL -- systemd-nspawn -q -D {} -b --register=no --keep-unit --console=pipe --private-network -M {} --bind-ro={}:{IMAGE_IN_HOST}",
                            root.display(),
                            &name[..name.len().min(60)],
                            dir.join("image").display()
                        ))
                        .stdin(Stdio::null())
                        .stdout(log.try_clone().unwrap())
                        .stderr(log)
                        .spawn()
                        .unwrap();
                    nspawn_pid.store(child.id(), Ordering::SeqCst);
                    // PID 1 of the container is nspawn's child.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let mut pid1 = 0;
                    while pid1 == 0 && Instant::now() < deadline {
                        pid1 = children_of(child.id())
                            .into_iter()
                            .find(|p| is_container_init(*p))
                            .unwrap_or(0);
                        if pid1 == 0 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let _ = tx.send(Boot { n, pid1 });
                    let status = child.wait().unwrap();
                    nspawn_pid.store(0, Ordering::SeqCst);
                    let _ = tx.send(Boot { n, pid1: 0 });
                    if status.code() != Some(133) || stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
            })
        };
        let host = TestHost {
            name,
            dir,
            root,
            cgroups,
            pod_cgroups,
            boots: rx,
            stop,
            nspawn_pid,
            supervisor: Some(supervisor),
        };
        host.wait_running(Duration::from_secs(60));
        host
    }

    /// The current boot.
    pub fn boot_info(&self) -> Boot {
        *self.boots.borrow()
    }

    /// Follow the boots.
    pub fn boots(&self) -> tokio::sync::watch::Receiver<Boot> {
        self.boots.clone()
    }

    /// Wait until the current boot's systemd is `running` (or `degraded`); returns its pid.
    pub fn wait_running(&self, limit: Duration) -> u32 {
        let deadline = Instant::now() + limit;
        loop {
            let b = self.boot_info();
            if b.pid1 != 0 {
                let out = run(Command::new("nsenter")
                    .args(["-t", &b.pid1.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
                    .args(["systemctl", "is-system-running"]));
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    return b.pid1;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: systemd did not reach running in {limit:?}; console:\n{}",
                self.name,
                std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `script` with `sh -c` inside the host (all its namespaces), as an admin would.
    pub fn sh(&self, script: &str) -> std::process::Output {
        let pid1 = self.boot_info().pid1;
        assert_ne!(pid1, 0, "{} is down", self.name);
        run(Command::new("nsenter")
            .args(["-t", &pid1.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .args(["sh", "-c", script])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root"))
    }

    /// Like [`TestHost::sh`], asserting success; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed in {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn boot_id(&self) -> String {
        self.sh_ok("cat /proc/sys/kernel/random/boot_id")
            .trim()
            .to_string()
    }

    /// `readlink -f` inside the host.
    pub fn readlink(&self, path: &str) -> Option<String> {
        let out = self.sh(&format!("readlink -e {path}"));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Build `installable` inside the host and install it as the booted system (the state a
    /// freshly installed NixOS machine is in): profile, bootloader entry, stage 2.
    pub fn install(&self, installable: &str) -> String {
        let out = self.sh_ok(&format!(
            "nix --extra-experimental-features 'nix-command flakes' build --no-link --json '{installable}'"
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let path = v[0]["outputs"]["out"].as_str().unwrap().to_string();
        self.sh_ok(&format!(
            "nix-env -p /nix/var/nix/profiles/system --set {path} && {path}/bin/switch-to-configuration boot && /usr/local/lib/nixroll-e2e/nixos-stage2"
        ));
        path
    }

    /// Host-side pids of the processes inside the host whose command line contains `needle`.
    pub fn pids_matching(&self, needle: &str) -> Vec<String> {
        // `[x]yz` matches "xyz" but not this script's own command line.
        let mut chars = needle.chars();
        let first = chars.next().unwrap_or(' ');
        let pattern = format!("[{first}]{}", chars.as_str());
        let out = self.sh(&format!(
            "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline 2>/dev/null | grep -q -- '{pattern}' && echo ${{p#/proc/}}; done; true"
        ));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|p| !p.is_empty())
            .collect()
    }

    /// The cgroup (v2 path, or the `name=systemd` one) of host process `pid`, seen from outside.
    pub fn cgroup_of(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
    }

    /// Start the agent as its pod would run (see e2e/pod.sh): PID namespace of the host,
    /// filesystem of its own with the host's `/` at `/host`, the network of the test process
    /// (to reach the embedded API server), its own cgroup ("the pod"). `env` is the pod's
    /// environment (none of it may reach host commands).
    pub fn start_agent(&self, kubeconfig: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        std::fs::write(self.dir.join("image/kubeconfig"), kubeconfig).unwrap();
        let pid1 = self.wait_running(Duration::from_secs(60));
        let moves: String = self
            .pod_cgroups
            .iter()
            .map(|c| format!("echo $$ >{}/cgroup.procs && ", c.display()))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "{moves}exec nsenter -t {pid1} -m -p -- unshare -m -- /bin/sh {IMAGE_IN_HOST}/pod.sh \"$@\""
            ))
            .arg("pod")
            .arg("nixroll")
            .arg("agent")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KUBECONFIG", "/image/kubeconfig")
            .env("RUST_LOG", "info,nixroll=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Agent {
            child,
            cgroups: self.pod_cgroups.clone(),
        }
    }

    /// The cgroup directories of the agent's pod (v2 first).
    pub fn pod_cgroup_names(&self) -> Vec<String> {
        self.pod_cgroups
            .iter()
            .map(|p| format!("/{}", p.file_name().unwrap().to_string_lossy()))
            .collect()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Power off (nspawn exits 0) and clean up: overlay, cgroups, directory.
    pub fn shutdown(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.boot_info().pid1 != 0 {
            let _ = self.sh("systemctl poweroff --no-block");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn_pid.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = self.nspawn_pid.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        for c in self.pod_cgroups.iter().chain(self.cgroups.iter()) {
            kill_cgroup(c);
            let _ = Command::new("find")
                .arg(c)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.root).status();
        if std::env::var_os("NIXROLL_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if self.supervisor.is_some() {
            self.teardown();
        }
    }
}

/// Kill every process of a cgroup (and its children).
fn kill_cgroup(c: &Path) {
    if c.join("cgroup.kill").exists() {
        let _ = std::fs::write(c.join("cgroup.kill"), "1");
        return;
    }
    for _ in 0..3 {
        let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
        for p in procs.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", p]).status();
        }
    }
}

/// A process in another PID namespace than ours that runs systemd (nspawn forks helpers too).
fn is_container_init(pid: u32) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ns(&pid.to_string()) != ns("self") && comm.trim() == "systemd"
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The agent's "pod".
pub struct Agent {
    child: std::process::Child,
    cgroups: Vec<PathBuf>,
}

impl Agent {
    /// SIGKILL the whole pod (as the kubelet or a crash would), and reap it.
    pub fn kill(mut self) {
        for c in &self.cgroups {
            kill_cgroup(c);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Host-side pids of the pod's processes.
    pub fn pids(&self) -> Vec<u32> {
        self.cgroups
            .first()
            .map(|c| {
                std::fs::read_to_string(c.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the pod still runs.
    pub fn running(&self) -> bool {
        !self.pids().is_empty()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for c in &self.cgroups {
            kill_cgroup(c);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
