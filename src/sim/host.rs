//! A simulated NixOS host: a directory laid out like `/` (boot id, `/run/booted-system`,
//! `/run/current-system`, the system profile, `/boot/default-system` as the bootloader's
//! default entry, `/boot/oneshot-system` as its one-time entry (booted once, then removed), a private Nix store under `nix/`) and a bootloader model for [`SimHost::reboot`].
//! The agent drives it through [`HostRoot`] (see [`SimHost::host_root`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use crate::agent::host::{HostRoot, RebootHook};
use crate::nix::{Nix, NixError};
use crate::sim::flake::{SystemSpec, is_executable, system_files};

/// The file whose existence holds `switch-to-configuration` (host-root relative).
pub const HOLD_SWITCH: &str = "var/lib/sim/hold-switch";
/// Present while a `switch-to-configuration` waits on [`HOLD_SWITCH`].
pub const SWITCH_HELD: &str = "var/lib/sim/switch-held";

/// What goes wrong at the next reboots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootFault {
    /// The new system does not boot: with a one-shot entry, the machine comes back on the
    /// default entry; without one, the bootloader falls back to the previous profile generation.
    FallbackToPrevious,
}

/// A point of a simulated host's update where a test can hold it (see [`SimHost::hold`]), so
/// that a fault the test injects (a killed controller or agent) lands while the node is
/// certainly in the phase the test names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HoldPoint {
    /// `switch-to-configuration switch|boot` waits before doing anything (the node stays
    /// `Activating`). The script waits while `var/lib/sim/hold-switch` exists and shows that it
    /// waits with `var/lib/sim/switch-held`, so the hold works with real Nix too.
    Switch,
    /// The machine waits before going down, after the agent asked for the reboot and died
    /// with it (the node stays `Rebooting`: the Node still reports the old boot id).
    Reboot,
    /// The agent is not started again (after a reboot, a crash or a kill): a node that came
    /// back from its reboot stays `Verifying`, waiting for the agent to report.
    AgentStart,
}

#[derive(Clone, Debug, Default)]
struct Holds {
    held: std::collections::BTreeSet<HoldPoint>,
    waiting: std::collections::BTreeSet<HoldPoint>,
    passed: BTreeMap<HoldPoint, usize>,
}

#[derive(Debug)]
pub struct SimHost {
    root: PathBuf,
    /// Its Nix store is a chroot store (see [`SimHost::host_root_chroot`]): links into the
    /// store are host paths (`/nix/store/…`), resolved under `root`.
    chroot_store: std::sync::atomic::AtomicBool,
    reboots: AtomicUsize,
    fault: Mutex<Option<BootFault>>,
    holds: tokio::sync::watch::Sender<Holds>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimHostError {
    #[error("sim host {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sim host: {0}")]
    Boot(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimHostError + '_ {
    move |source| SimHostError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl SimHost {
    /// Lay out a host under `root` (created if missing) with a fresh boot id and no system.
    pub fn create(root: impl Into<PathBuf>) -> Result<Arc<SimHost>, SimHostError> {
        let root = root.into();
        for d in [
            "proc/sys/kernel/random",
            "run",
            "boot",
            "nix/store",
            "nix/var/nix/profiles",
            "nix/var/log/nix",
            "var/lib/nixroll",
            "var/lib/sim",
            "etc/nix",
            "root",
        ] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        // The private store's configuration: no build users (parallel stores would kill each
        // other's builders: they share the nixbld uids), no sandbox (nothing to isolate in a test
        // system; works in containers without user namespaces), no binary cache.
        let conf = root.join("etc/nix/nix.conf");
        std::fs::write(&conf, "sandbox = false\nbuild-users-group =\nsubstituters =\n").map_err(io(&conf))?;
        let host = SimHost {
            root,
            chroot_store: std::sync::atomic::AtomicBool::new(false),
            reboots: AtomicUsize::new(0),
            fault: Mutex::new(None),
            holds: tokio::sync::watch::Sender::new(Holds::default()),
        };
        host.new_boot_id()?;
        Ok(Arc::new(host))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A [`HostRoot`] on this host with its private Nix store; reboot = [`SimHost::reboot`].
    pub fn host_root(self: &Arc<Self>) -> HostRoot {
        self.bare_host_root().with_private_nix_store()
    }

    /// A [`HostRoot`] on this host whose Nix store is a chroot store: store paths are
    /// `/nix/store/…` as on a real machine, so separate hosts share them (a builder's binary
    /// cache serves them all); reboot = [`SimHost::reboot`].
    pub fn host_root_chroot(self: &Arc<Self>) -> HostRoot {
        self.chroot_store.store(true, Ordering::SeqCst);
        self.bare_host_root().with_chroot_nix_store()
    }

    fn bare_host_root(self: &Arc<Self>) -> HostRoot {
        let me = Arc::clone(self);
        HostRoot::new(
            &self.root,
            RebootHook::Callback(Arc::new(move || {
                if let Err(e) = me.reboot() {
                    tracing::warn!(error = %e, "simulated reboot failed");
                }
            })),
        )
    }

    /// "Install" `system` (a store path): profile generation 1, boot default, booted and
    /// current system — as after a fresh install and first boot.
    pub fn install(&self, system: &str) -> Result<(), SimHostError> {
        let profiles = self.root.join("nix/var/nix/profiles");
        symlink_force(Path::new(system), &profiles.join("system-1-link"))?;
        symlink_force(Path::new("system-1-link"), &profiles.join("system"))?;
        symlink_force(Path::new(system), &self.root.join("boot/default-system"))?;
        symlink_force(Path::new(system), &self.root.join("run/booted-system"))?;
        symlink_force(Path::new(system), &self.root.join("run/current-system"))
    }

    /// Reboot: new boot id; the bootloader boots `boot/default-system` (or, with
    /// [`BootFault::FallbackToPrevious`], the profile generation before the newest);
    /// booted and current system become what was booted.
    pub fn reboot(&self) -> Result<(), SimHostError> {
        self.reboots.fetch_add(1, Ordering::SeqCst);
        let fault = *self.fault.lock().map_err(|_| SimHostError::Boot("lock".into()))?;
        let default = || {
            std::fs::read_link(self.root.join("boot/default-system"))
                .map_err(io(&self.root.join("boot/default-system")))
        };
        // The one-shot entry is consumed by this boot, whatever becomes of it.
        let oneshot = self.root.join("boot/oneshot-system");
        let once = std::fs::read_link(&oneshot).ok();
        if once.is_some() {
            std::fs::remove_file(&oneshot).map_err(io(&oneshot))?;
        }
        let booted = match (once, fault) {
            (Some(system), None) => system,
            // The new system panics (or hangs until the watchdog resets the machine): the
            // next boot starts the default again.
            (Some(_), Some(_)) => default()?,
            (None, None) => default()?,
            (None, Some(BootFault::FallbackToPrevious)) => self.previous_generation()?,
        };
        self.new_boot_id()?;
        symlink_force(&booted, &self.root.join("run/booted-system"))?;
        symlink_force(&booted, &self.root.join("run/current-system"))
    }

    pub fn set_fault(&self, fault: Option<BootFault>) {
        if let Ok(mut f) = self.fault.lock() {
            *f = fault;
        }
    }

    /// Hold this host at `point` until [`SimHost::release`]: whatever reaches it waits there.
    pub fn hold(&self, point: HoldPoint) -> Result<(), SimHostError> {
        if point == HoldPoint::Switch {
            let p = self.root.join(HOLD_SWITCH);
            std::fs::write(&p, "").map_err(io(&p))?;
        }
        self.holds.send_modify(|h| {
            h.held.insert(point);
        });
        Ok(())
    }

    /// Let whatever waits at `point` go on (and what comes later pass).
    pub fn release(&self, point: HoldPoint) -> Result<(), SimHostError> {
        if point == HoldPoint::Switch {
            let p = self.root.join(HOLD_SWITCH);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        self.holds.send_modify(|h| {
            h.held.remove(&point);
        });
        Ok(())
    }

    /// Whether something waits at `point` right now.
    pub fn is_waiting(&self, point: HoldPoint) -> bool {
        match point {
            HoldPoint::Switch => self.root.join(SWITCH_HELD).exists(),
            p => self.holds.borrow().waiting.contains(&p),
        }
    }

    /// Wait (at most `limit`) until something waits at `point`; `false` if nothing came.
    pub async fn wait_until_waiting(&self, point: HoldPoint, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if point == HoldPoint::Switch {
            // The script runs outside this process: look at its marker file.
            while tokio::time::Instant::now() < deadline {
                if self.is_waiting(point) {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            return self.is_waiting(point);
        }
        let mut rx = self.holds.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|h| h.waiting.contains(&point)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Pass `point`: at once unless it is held, else when it is released. Called by the
    /// simulated cluster (`crate::sim::world`) on the host's way through a reboot.
    pub async fn pass(&self, point: HoldPoint) {
        let mut rx = self.holds.subscribe();
        if rx.borrow().held.contains(&point) {
            self.holds.send_modify(|h| {
                h.waiting.insert(point);
            });
            // Only the test that set the hold releases it; it bounds its own wait.
            let _ = rx.wait_for(|h| !h.held.contains(&point)).await;
        }
        self.holds.send_modify(|h| {
            h.waiting.remove(&point);
            *h.passed.entry(point).or_default() += 1;
        });
    }

    /// How often `point` was passed (for [`HoldPoint::AgentStart`]: how often an agent started).
    pub fn passed(&self, point: HoldPoint) -> usize {
        self.holds.borrow().passed.get(&point).copied().unwrap_or(0)
    }

    /// How often [`SimHost::reboot`] ran.
    pub fn reboot_count(&self) -> usize {
        self.reboots.load(Ordering::SeqCst)
    }

    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(self.root.join("proc/sys/kernel/random/boot_id"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    pub fn booted_system(&self) -> Option<String> {
        self.link("run/booted-system")
    }

    pub fn current_system(&self) -> Option<String> {
        self.link("run/current-system")
    }

    /// The bootloader's default entry.
    pub fn boot_default(&self) -> Option<String> {
        self.link("boot/default-system")
    }

    /// The entry set to boot once at the next boot, if any.
    pub fn boot_oneshot(&self) -> Option<String> {
        link(&self.root.join("boot/oneshot-system"))
    }

    /// The store path the system profile points at.
    pub fn profile_system(&self) -> Option<String> {
        self.link("nix/var/nix/profiles/system")
    }

    /// Where the link `rel` (relative to the root) leads, as Nix names store paths here.
    fn link(&self, rel: &str) -> Option<String> {
        if self.chroot_store.load(Ordering::SeqCst) {
            let host = HostRoot::new(&self.root, RebootHook::None).with_chroot_nix_store();
            return crate::agent::host::resolve(&host, &Path::new("/").join(rel))
                .map(|p| p.to_string_lossy().into_owned());
        }
        link(&self.root.join(rel))
    }

    /// Every `switch-to-configuration` call: `"<action> <system>"`.
    pub fn switch_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("var/lib/sim/switch-log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn new_boot_id(&self) -> Result<(), SimHostError> {
        let hex = |n: usize| -> String {
            (0..n)
                .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
                .collect()
        };
        let id = format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12));
        let p = self.root.join("proc/sys/kernel/random/boot_id");
        std::fs::write(&p, format!("{id}\n")).map_err(io(&p))
    }

    fn previous_generation(&self) -> Result<PathBuf, SimHostError> {
        let profiles = self.root.join("nix/var/nix/profiles");
        let mut gens: Vec<(i64, PathBuf)> = std::fs::read_dir(&profiles)
            .map_err(io(&profiles))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let n = name
                    .strip_prefix("system-")?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()?;
                Some((n, std::fs::read_link(e.path()).ok()?))
            })
            .collect();
        gens.sort();
        let n = gens.len();
        if n < 2 {
            return Err(SimHostError::Boot(
                "no previous generation to fall back to".into(),
            ));
        }
        Ok(gens[n - 2].1.clone())
    }
}

fn link(p: &Path) -> Option<String> {
    std::fs::canonicalize(p)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn symlink_force(target: &Path, link: &Path) -> Result<(), SimHostError> {
    let tmp = link.with_extension("nixroll-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, link).map_err(io(link))
}

/// A simulated Nix for agents on a [`SimHost`] without Nix installed (the demo): a catalogue
/// maps installables to [`SystemSpec`]s (or to an error text); `realise` writes the system
/// into `ROOT/nix/store` with the same layout a [`crate::sim::flake::TestFlake`] build has
/// (one content-addressed path per component, so unchanged components keep their path),
/// profiles get `system-N-link` generations like `nix-env` makes them.
#[derive(Debug)]
pub struct SimNix {
    root: PathBuf,
    catalogue: Mutex<std::collections::HashMap<String, Result<SystemSpec, String>>>,
}

impl SimNix {
    pub fn new(host: &SimHost) -> SimNix {
        SimNix {
            root: host.root.clone(),
            catalogue: Mutex::new(Default::default()),
        }
    }

    /// A simulated Nix whose host `/` is `root`, with an empty catalogue: only its profile
    /// operations are of use (`nixroll host-step` in the real-bootloader test's guest).
    pub fn at_root(root: PathBuf) -> SimNix {
        SimNix {
            root,
            catalogue: Mutex::new(Default::default()),
        }
    }

    /// `installable` realises to a system built from `spec`.
    pub fn publish(&self, installable: &str, spec: SystemSpec) {
        if let Ok(mut c) = self.catalogue.lock() {
            c.insert(installable.to_string(), Ok(spec));
        }
    }

    /// `installable` fails with this error text.
    pub fn publish_error(&self, installable: &str, message: &str) {
        if let Ok(mut c) = self.catalogue.lock() {
            c.insert(installable.to_string(), Err(message.to_string()));
        }
    }

    fn local(&self, host_path: &Path) -> PathBuf {
        if host_path.starts_with(&self.root) {
            host_path.to_path_buf()
        } else {
            self.root.join(host_path.strip_prefix("/").unwrap_or(host_path))
        }
    }

    fn build(&self, installable: &str) -> Result<String, String> {
        let spec = match self
            .catalogue
            .lock()
            .map_err(|_| "catalogue lock".to_string())?
            .get(installable)
        {
            Some(Ok(spec)) => spec.clone(),
            Some(Err(message)) => return Err(message.clone()),
            None => {
                return Err(format!("error: cannot find flake output for '{installable}'"));
            }
        };
        if let Some(m) = &spec.eval_error {
            return Err(format!("error: {m}"));
        }
        if spec.broken_build {
            return Err("error: builder for 'nixos-system.drv' failed with exit code 1".into());
        }
        let host = installable
            .split("nixosConfigurations.")
            .nth(1)
            .and_then(|s| s.split(".config.").next())
            .unwrap_or("host")
            .trim_matches('"');
        let store = self.root.join("nix/store");
        let files = system_files(&spec);
        // One part per top-level entry, named by the hash of its content.
        let mut parts: std::collections::BTreeMap<&str, Vec<(&str, String)>> = Default::default();
        for (rel, content) in &files {
            let top = rel.split('/').next().unwrap_or(rel);
            parts.entry(top).or_default().push((rel, format!("{content}\n")));
        }
        let mut top_hash = std::collections::hash_map::DefaultHasher::new();
        let mut links = Vec::new();
        for (top, entries) in &parts {
            let h = store_hash(&(top, entries));
            std::hash::Hash::hash(&h, &mut top_hash);
            let part = store.join(format!("{h}-nixos-part-{top}"));
            for (rel, content) in entries {
                let p = part.join(rel);
                if !p.exists() {
                    write_file(&p, content, is_executable(rel)).map_err(|e| e.to_string())?;
                }
            }
            links.push((top.to_string(), part.join(top)));
        }
        let h = store_hash(&(std::hash::Hasher::finish(&top_hash), host));
        let system = store.join(format!("{h}-nixos-system-{host}"));
        if !system.exists() {
            std::fs::create_dir_all(&system).map_err(|e| e.to_string())?;
            for (name, target) in links {
                std::os::unix::fs::symlink(&target, system.join(name)).map_err(|e| e.to_string())?;
            }
        }
        Ok(system.to_string_lossy().into_owned())
    }

    fn generations(&self, profile: &Path) -> Vec<(i64, PathBuf)> {
        let (Some(dir), Some(name)) = (profile.parent(), profile.file_name().and_then(|n| n.to_str())) else {
            return Vec::new();
        };
        let prefix = format!("{name}-");
        let mut gens: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().to_str()?.to_string();
                let n = f.strip_prefix(&prefix)?.strip_suffix("-link")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        gens.sort();
        gens
    }
}

fn store_hash(value: &impl std::hash::Hash) -> String {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (a.finish(), "nixroll-sim").hash(&mut b);
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

fn write_file(path: &Path, content: &str, executable: bool) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, content)?;
    if executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn nix_failed(operation: &'static str, message: String) -> NixError {
    NixError::CommandFailed { operation, message }
}

impl Nix for SimNix {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        Box::pin(async move {
            let system = self.build(installable).map_err(|m| nix_failed("nix build", m))?;
            let root = self.local(gc_root);
            if let Some(parent) = root.parent() {
                std::fs::create_dir_all(parent).map_err(|e| nix_failed("nix build", e.to_string()))?;
            }
            symlink_force(Path::new(&system), &root).map_err(|e| nix_failed("nix build", e.to_string()))?;
            Ok(system)
        })
    }

    fn closure_bytes<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, NixError>> {
        Box::pin(async move {
            fn size(p: &Path) -> u64 {
                match std::fs::metadata(p) {
                    Ok(m) if m.is_dir() => std::fs::read_dir(p)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| size(&e.path()))
                        .sum(),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                }
            }
            Ok(size(Path::new(path)))
        })
    }

    fn set_profile<'a>(&'a self, profile: &'a Path, system: &'a str) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let profile = self.local(profile);
            if std::fs::canonicalize(&profile).ok() == std::fs::canonicalize(system).ok() && profile.exists()
            {
                return Ok(());
            }
            let next = self.generations(&profile).last().map_or(1, |g| g.0 + 1);
            let name = profile.file_name().and_then(|n| n.to_str()).unwrap_or("system");
            let link_name = format!("{name}-{next}-link");
            let dir = profile.parent().unwrap_or(Path::new("/"));
            let err = |e: SimHostError| nix_failed("nix-env --set", e.to_string());
            symlink_force(Path::new(system), &dir.join(&link_name)).map_err(err)?;
            symlink_force(Path::new(&link_name), &profile).map_err(err)
        })
    }

    fn switch_generation<'a>(
        &'a self,
        profile: &'a Path,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let profile = self.local(profile);
            let Some((_, link)) = self.generations(&profile).into_iter().find(|g| g.0 == generation) else {
                return Err(nix_failed(
                    "nix-env --switch-generation",
                    format!("error: generation {generation} does not exist"),
                ));
            };
            let name = link.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            symlink_force(Path::new(&name), &profile)
                .map_err(|e| nix_failed("nix-env --switch-generation", e.to_string()))
        })
    }

    fn rollback_profile<'a>(&'a self, profile: &'a Path) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            let profile = self.local(profile);
            let current = std::fs::read_link(&profile)
                .ok()
                .and_then(|l| {
                    let f = l.file_name()?.to_str()?.to_string();
                    f.rsplit_once('-')?.0.rsplit_once('-')?.1.parse::<i64>().ok()
                })
                .unwrap_or(0);
            let Some((_, prev)) = self.generations(&profile).into_iter().rfind(|g| g.0 < current) else {
                return Err(nix_failed(
                    "nix-env --rollback",
                    format!("error: no profile version older than the current ({current}) exists"),
                ));
            };
            let name = prev.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            symlink_force(Path::new(&name), &profile)
                .map_err(|e| nix_failed("nix-env --rollback", e.to_string()))
        })
    }
}
