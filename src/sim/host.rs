//! A simulated NixOS host: a directory laid out like `/` (boot id, `/run/booted-system`,
//! `/run/current-system`, the system profile, `/boot/default-system` as the bootloader's
//! default entry, a private Nix store under `nix/`) and a bootloader model for [`SimHost::reboot`].
//! The agent drives it through [`HostRoot`] (see [`SimHost::host_root`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::agent::host::{HostRoot, RebootHook};

/// What goes wrong at the next reboots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootFault {
    /// The bootloader falls back to the previous profile generation (new system did not boot).
    FallbackToPrevious,
}

#[derive(Debug)]
pub struct SimHost {
    root: PathBuf,
    reboots: AtomicUsize,
    fault: Mutex<Option<BootFault>>,
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
        std::fs::write(
            &conf,
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .map_err(io(&conf))?;
        let host = SimHost {
            root,
            reboots: AtomicUsize::new(0),
            fault: Mutex::new(None),
        };
        host.new_boot_id()?;
        Ok(Arc::new(host))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A [`HostRoot`] on this host with its private Nix store; reboot = [`SimHost::reboot`].
    pub fn host_root(self: &Arc<Self>) -> HostRoot {
        let me = Arc::clone(self);
        HostRoot::new(
            &self.root,
            RebootHook::Callback(Arc::new(move || {
                if let Err(e) = me.reboot() {
                    tracing::warn!(error = %e, "simulated reboot failed");
                }
            })),
        )
        .with_private_nix_store()
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
        let fault = *self
            .fault
            .lock()
            .map_err(|_| SimHostError::Boot("lock".into()))?;
        let booted = match fault {
            None => std::fs::read_link(self.root.join("boot/default-system"))
                .map_err(io(&self.root.join("boot/default-system")))?,
            Some(BootFault::FallbackToPrevious) => self.previous_generation()?,
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
        link(&self.root.join("run/booted-system"))
    }

    pub fn current_system(&self) -> Option<String> {
        link(&self.root.join("run/current-system"))
    }

    /// The bootloader's default entry.
    pub fn boot_default(&self) -> Option<String> {
        link(&self.root.join("boot/default-system"))
    }

    /// The store path the system profile points at.
    pub fn profile_system(&self) -> Option<String> {
        std::fs::canonicalize(self.root.join("nix/var/nix/profiles/system"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
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
