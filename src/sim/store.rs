//! A simulated Nix for `nixroll demo` on machines without Nix ("needs nothing but the
//! binary"). It implements the agent's [`Nix`] trait over a [`Host`]'s private store
//! directory: realising `<flake>?rev=R#nixosConfigurations.H…` writes the files of the
//! [`SystemSpec`] registered for revision `R` (the same files and `switch-to-configuration` a
//! real build of the test flake produces) to a content-addressed directory in the store;
//! profiles get `system-N-link` generations like `nix-env --set`/`--rollback`.
//!
//! Tests use real Nix; this exists so the demo shows the real agent and controller anywhere.
//! The demo says which one it uses.

use std::collections::{BTreeMap, hash_map::DefaultHasher};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use crate::agent::host::Host;
use crate::nix::{Nix, NixError};
use crate::sim::flake::{SystemSpec, system_files, write_file};

/// Revision → (configurations it defines, system), shared by all simulated hosts of a demo.
#[derive(Clone, Debug, Default)]
pub struct Revisions(Arc<Mutex<BTreeMap<String, (Vec<String>, SystemSpec)>>>);

impl Revisions {
    /// Register `revision`: its `nixosConfigurations` are `hosts`, each building `spec`.
    pub fn insert(&self, revision: &str, hosts: &[String], spec: SystemSpec) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(revision.to_string(), (hosts.to_vec(), spec));
        }
    }

    fn get(&self, revision: &str) -> Option<(Vec<String>, SystemSpec)> {
        self.0.lock().ok().and_then(|m| m.get(revision).cloned())
    }
}

/// Simulated Nix on one host.
#[derive(Debug)]
pub struct SimNix {
    host: Arc<dyn Host>,
    /// The store directory, as a host path (e.g. `/nix/store`) or an absolute path of the
    /// agent's filesystem.
    store: PathBuf,
    revisions: Revisions,
}

impl SimNix {
    pub fn new(host: Arc<dyn Host>, store: impl Into<PathBuf>, revisions: Revisions) -> Self {
        SimNix {
            host,
            store: store.into(),
            revisions,
        }
    }

    fn fail(operation: &'static str, message: String) -> NixError {
        NixError::CommandFailed { operation, message }
    }

    fn build(&self, installable: &str) -> Result<String, NixError> {
        const OP: &str = "nix build";
        let (rev, host) = parse_installable(installable).ok_or_else(|| {
            Self::fail(
                OP,
                format!("error: cannot parse installable '{installable}'"),
            )
        })?;
        let (hosts, spec) = self.revisions.get(&rev).ok_or_else(|| {
            Self::fail(
                OP,
                format!("error: Cannot find Git revision '{rev}' in the flake"),
            )
        })?;
        if !hosts.contains(&host) {
            return Err(Self::fail(
                OP,
                format!(
                    "error: flake does not provide attribute 'nixosConfigurations.{host}.config.system.build.toplevel'"
                ),
            ));
        }
        if let Some(m) = &spec.eval_error {
            return Err(Self::fail(OP, format!("error: {m}")));
        }
        if spec.broken_build {
            return Err(Self::fail(
                OP,
                "error: builder for 'nixos-system.drv' failed: collision on 'kernel'".into(),
            ));
        }
        let files = system_files(&spec);
        let mut h = DefaultHasher::new();
        host.hash(&mut h);
        files.hash(&mut h);
        let name = format!("{:016x}-nixos-system-{host}", h.finish());
        let store_fs = self.host.fs_path(&self.store);
        let out_fs = store_fs.join(&name);
        if !out_fs.exists() {
            let tmp = store_fs.join(format!(".tmp-{name}"));
            let _ = std::fs::remove_dir_all(&tmp);
            for (rel, content) in &files {
                write_file(&tmp.join(rel), content)
                    .map_err(|e| Self::fail(OP, format!("error: writing the store: {e}")))?;
            }
            let script = tmp.join("bin/switch-to-configuration");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o555))
                .and_then(|()| std::fs::rename(&tmp, &out_fs))
                .map_err(|e| Self::fail(OP, format!("error: writing the store: {e}")))?;
        }
        Ok(self.store.join(name).to_string_lossy().into_owned())
    }

    fn generations(profile_fs: &Path) -> Vec<(u64, PathBuf)> {
        let (Some(dir), Some(base)) = (profile_fs.parent(), profile_fs.file_name()) else {
            return Vec::new();
        };
        let prefix = format!("{}-", base.to_string_lossy());
        let mut gens: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name
                    .strip_prefix(&prefix)?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        gens.sort();
        gens
    }

    fn point_profile(profile_fs: &Path, generation: u64) -> std::io::Result<()> {
        let base = profile_fs
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = profile_fs.with_extension("tmp-link");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("{base}-{generation}-link"), &tmp)?;
        std::fs::rename(&tmp, profile_fs)
    }
}

/// `(revision, host)` of `…?rev=R#nixosConfigurations.H.config…` or `github:o/r/R#…`.
fn parse_installable(installable: &str) -> Option<(String, String)> {
    let (flake, attr) = installable.split_once('#')?;
    let rev = match flake.split_once("?rev=") {
        Some((_, r)) => r.split('&').next()?.to_string(),
        None => flake.rsplit('/').next()?.to_string(),
    };
    let host = attr
        .strip_prefix("nixosConfigurations.")?
        .strip_suffix(".config.system.build.toplevel")?
        .trim_matches('"')
        .to_string();
    Some((rev, host))
}

impl Nix for SimNix {
    fn realise<'a>(
        &'a self,
        installable: &'a str,
        gc_root: &'a Path,
    ) -> BoxFuture<'a, Result<String, NixError>> {
        Box::pin(async move {
            let path = self.build(installable)?;
            let root_fs = self.host.fs_path(gc_root);
            if let Some(parent) = root_fs.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::remove_file(&root_fs);
            std::os::unix::fs::symlink(&path, &root_fs).map_err(|e| {
                Self::fail("nix build", format!("error: creating the GC root: {e}"))
            })?;
            Ok(path)
        })
    }

    fn closure_bytes<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64, NixError>> {
        Box::pin(async move {
            fn size(p: &Path) -> u64 {
                match std::fs::symlink_metadata(p) {
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
            Ok(size(&self.host.fs_path(Path::new(path))))
        })
    }

    fn set_profile<'a>(
        &'a self,
        profile: &'a Path,
        system: &'a str,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            const OP: &str = "nix-env --set";
            let profile_fs = self.host.fs_path(profile);
            let current = std::fs::canonicalize(&profile_fs).ok();
            let wanted = std::fs::canonicalize(self.host.fs_path(Path::new(system)))
                .map_err(|e| Self::fail(OP, format!("error: path '{system}' is not valid: {e}")))?;
            if current.as_ref() == Some(&wanted) {
                return Ok(());
            }
            let next = Self::generations(&profile_fs)
                .last()
                .map_or(1, |(n, _)| n + 1);
            let base = profile_fs
                .file_name()
                .map(|b| b.to_string_lossy().into_owned())
                .unwrap_or_default();
            let link = profile_fs.with_file_name(format!("{base}-{next}-link"));
            std::os::unix::fs::symlink(system, &link)
                .and_then(|()| Self::point_profile(&profile_fs, next))
                .map_err(|e| Self::fail(OP, format!("error: {e}")))
        })
    }

    fn rollback_profile<'a>(&'a self, profile: &'a Path) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            const OP: &str = "nix-env --rollback";
            let profile_fs = self.host.fs_path(profile);
            let target = std::fs::read_link(&profile_fs).ok();
            let gens = Self::generations(&profile_fs);
            let current = gens.iter().position(|(_, p)| {
                p.file_name().map(PathBuf::from)
                    == target
                        .as_ref()
                        .and_then(|t| t.file_name())
                        .map(PathBuf::from)
            });
            match current {
                Some(i) if i > 0 => Self::point_profile(&profile_fs, gens[i - 1].0)
                    .map_err(|e| Self::fail(OP, format!("error: {e}"))),
                _ => Err(Self::fail(
                    OP,
                    "error: no generation older than the current one".into(),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::host::SimHost;

    #[test]
    fn parses_both_installable_syntaxes() {
        let r = "a".repeat(40);
        let i = crate::api::installable("git+file:///f", &r, "node-1");
        assert_eq!(parse_installable(&i), Some((r.clone(), "node-1".into())));
        let i = crate::api::installable("github:o/r", &r, "n");
        assert_eq!(parse_installable(&i), Some((r, "n".into())));
    }

    #[tokio::test]
    async fn realise_set_profile_and_rollback_like_nix_env() {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimHost::create(dir.path().join("host")).unwrap();
        let host: Arc<dyn Host> = Arc::new(sim.host_root());
        let revs = Revisions::default();
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let hosts = vec!["n1".to_string()];
        revs.insert(&a, &hosts, SystemSpec::default());
        revs.insert(
            &b,
            &hosts,
            SystemSpec {
                kernel: "linux-7".into(),
                ..SystemSpec::default()
            },
        );
        let store = dir.path().join("host/nix/store");
        let nix = SimNix::new(host.clone(), &store, revs);
        let root = Path::new("/var/lib/nixroll/gcroots/target");
        let pa = nix
            .realise(&crate::api::installable("path:/f", &a, "n1"), root)
            .await
            .unwrap();
        let pa2 = nix
            .realise(&crate::api::installable("path:/f", &a, "n1"), root)
            .await
            .unwrap();
        assert_eq!(
            pa, pa2,
            "content addressed: the same inputs give the same path"
        );
        let pb = nix
            .realise(&crate::api::installable("path:/f", &b, "n1"), root)
            .await
            .unwrap();
        assert_ne!(pa, pb);
        assert_eq!(
            std::fs::read_to_string(Path::new(&pb).join("kernel")).unwrap(),
            "linux-7\n"
        );
        assert_eq!(
            std::fs::read_link(host.fs_path(root)).unwrap(),
            Path::new(&pb)
        );
        let err = nix
            .realise(
                &crate::api::installable("path:/f", &"c".repeat(40), "n1"),
                root,
            )
            .await
            .unwrap_err();
        assert!(err.report().contains("Cannot find Git revision"), "{err}");
        let err = nix
            .realise(&crate::api::installable("path:/f", &a, "n2"), root)
            .await
            .unwrap_err();
        assert!(err.report().contains("does not provide attribute"), "{err}");
        let err = nix
            .realise(&crate::api::installable("path:/f", &a, "n2"), root)
            .await
            .unwrap_err();
        assert!(err.report().contains("does not provide attribute"), "{err}");
        assert!(nix.closure_bytes(&pb).await.unwrap() > 0);

        let profile = Path::new("/nix/var/nix/profiles/system");
        nix.set_profile(profile, &pa).await.unwrap();
        nix.set_profile(profile, &pa).await.unwrap();
        nix.set_profile(profile, &pb).await.unwrap();
        let pfs = host.fs_path(profile);
        assert_eq!(
            std::fs::read_link(&pfs).unwrap(),
            Path::new("system-2-link")
        );
        assert_eq!(
            std::fs::canonicalize(&pfs).unwrap(),
            std::fs::canonicalize(&pb).unwrap()
        );
        nix.rollback_profile(profile).await.unwrap();
        assert_eq!(
            std::fs::read_link(&pfs).unwrap(),
            Path::new("system-1-link")
        );
        assert!(nix.rollback_profile(profile).await.is_err());
    }
}
