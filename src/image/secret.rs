//! The secret files to write: `--secret DEST=SRC[,mode=0400][,owner=UID:GID]` and
//! `--secrets-dir DIR`, their destinations checked, their sources read into memory once (so
//! `<(pass show …)` works and what is verified is exactly what was written).

use std::path::{Path, PathBuf};

/// Default mode of a written file.
pub const DEFAULT_MODE: u32 = 0o400;
/// Mode of a directory nixroll creates.
pub const DIR_MODE: u32 = 0o700;

/// Where a secret goes and how it is owned. Carries no content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSpec {
    /// Absolute path inside the root filesystem.
    pub dest: String,
    /// Where the content is read from (on this machine).
    pub source: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A secret with its content. `Debug` never shows the content.
pub struct Secret {
    pub spec: SecretSpec,
    pub content: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("spec", &self.spec)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .finish()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: the allocator may have moved or copied it before.
        self.content.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.content);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("--secret {0:?}: expected DEST=SRC[,mode=0400][,owner=UID:GID]")]
    Syntax(String),
    #[error("--secret {arg:?}: {detail}")]
    Option { arg: String, detail: String },
    #[error("destination {dest:?}: {detail}")]
    Dest { dest: String, detail: String },
    #[error("secret source {path} for {dest}")]
    Source {
        path: PathBuf,
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--secrets-dir {path}: {detail}")]
    Dir { path: PathBuf, detail: String },
    #[error("{dest} is given twice ({first} and {second})")]
    Duplicate {
        dest: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// Parse one `--secret` argument.
pub fn parse_spec(arg: &str) -> Result<SecretSpec, SecretError> {
    let (dest, rest) = arg
        .split_once('=')
        .ok_or_else(|| SecretError::Syntax(arg.to_string()))?;
    // Options are trailing `,mode=…` / `,owner=…`; anything else belongs to the source path.
    let mut source = rest;
    let mut mode = None;
    let mut owner = None;
    while let Some((head, last)) = source.rsplit_once(',') {
        if let Some(m) = last.strip_prefix("mode=") {
            if mode.is_some() {
                return Err(opt_err(arg, "mode= given twice"));
            }
            mode = Some(parse_mode(m).map_err(|d| opt_err(arg, &d))?);
        } else if let Some(o) = last.strip_prefix("owner=") {
            if owner.is_some() {
                return Err(opt_err(arg, "owner= given twice"));
            }
            owner = Some(parse_owner(o).map_err(|d| opt_err(arg, &d))?);
        } else {
            break;
        }
        source = head;
    }
    if dest.is_empty() || source.is_empty() {
        return Err(SecretError::Syntax(arg.to_string()));
    }
    check_dest(dest)?;
    let (uid, gid) = owner.unwrap_or((0, 0));
    Ok(SecretSpec {
        dest: dest.to_string(),
        source: PathBuf::from(source),
        mode: mode.unwrap_or(DEFAULT_MODE),
        uid,
        gid,
    })
}

fn opt_err(arg: &str, detail: &str) -> SecretError {
    SecretError::Option {
        arg: arg.to_string(),
        detail: detail.to_string(),
    }
}

fn parse_mode(m: &str) -> Result<u32, String> {
    let v = u32::from_str_radix(m, 8).map_err(|_| format!("mode {m:?} is not octal (e.g. 0400)"))?;
    if v > 0o7777 {
        return Err(format!("mode {m:?} has more than permission bits"));
    }
    Ok(v)
}

fn parse_owner(o: &str) -> Result<(u32, u32), String> {
    let (u, g) = o
        .split_once(':')
        .ok_or_else(|| format!("owner {o:?}: expected numeric UID:GID (e.g. 0:0)"))?;
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("owner {o:?}: expected numeric UID:GID (names are not resolved)"))
    };
    Ok((num(u)?, num(g)?))
}

/// A destination must be absolute, normal (no `.`, `..` or empty component), made of
/// characters that need no quoting in a debugfs request, and outside the Nix store.
pub fn check_dest(dest: &str) -> Result<(), SecretError> {
    let bad = |detail: &str| SecretError::Dest {
        dest: dest.to_string(),
        detail: detail.to_string(),
    };
    if !dest.starts_with('/') {
        return Err(bad(
            "must be an absolute path inside the image (e.g. /etc/k3s/token)",
        ));
    }
    if dest.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    let parts: Vec<&str> = dest[1..].split('/').collect();
    if parts.contains(&"..") {
        return Err(bad("must not contain `..`"));
    }
    if parts.iter().any(|p| p.is_empty() || *p == ".") {
        return Err(bad(
            "must be a normal path to a file (no `//`, `.` or trailing `/`)",
        ));
    }
    if parts.iter().any(|p| p.len() > 255) {
        return Err(bad("a component is longer than 255 bytes"));
    }
    if let Some(c) = dest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-+@:,%~".contains(*c)))
    {
        return Err(bad(&format!(
            "character {c:?} is not supported (letters, digits and / . _ - + @ : , % ~)"
        )));
    }
    if crate::nix::under_nix(dest) {
        return Err(bad(
            "must be outside /nix (the Nix store is world-readable, the rest of /nix is Nix's own)",
        ));
    }
    Ok(())
}

/// `DIR/etc/k3s/token` → `/etc/k3s/token` for every regular file under `dir` (symlinks to
/// files are followed; directory symlinks and special files are refused). Mode 0400, root.
pub fn specs_from_dir(dir: &Path) -> Result<Vec<SecretSpec>, SecretError> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.dest.cmp(&b.dest));
    if out.is_empty() {
        return Err(SecretError::Dir {
            path: dir.to_path_buf(),
            detail: "holds no files".into(),
        });
    }
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<SecretSpec>) -> Result<(), SecretError> {
    let err = |detail: String| SecretError::Dir {
        path: root.to_path_buf(),
        detail,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
            continue;
        }
        let target = std::fs::metadata(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if !target.is_file() {
            return Err(err(format!("{} is not a regular file", path.display())));
        }
        let rel = path
            .strip_prefix(root)
            .map_err(|_| err(format!("{} is outside the directory", path.display())))?;
        let rel = rel
            .to_str()
            .ok_or_else(|| err(format!("{} is not valid UTF-8", path.display())))?;
        let dest = format!("/{rel}");
        check_dest(&dest)?;
        out.push(SecretSpec {
            dest,
            source: path,
            mode: DEFAULT_MODE,
            uid: 0,
            gid: 0,
        });
    }
    Ok(())
}

/// Check for duplicates, then read every source (all before anything is built or copied).
pub fn load(specs: Vec<SecretSpec>) -> Result<Vec<Secret>, SecretError> {
    let mut seen: Vec<&SecretSpec> = Vec::new();
    for s in &specs {
        if let Some(first) = seen.iter().find(|f| f.dest == s.dest) {
            return Err(SecretError::Duplicate {
                dest: s.dest.clone(),
                first: first.source.clone(),
                second: s.source.clone(),
            });
        }
        // A secret below another secret's path cannot work (a file is not a directory).
        if let Some(parent) = seen.iter().find(|f| {
            s.dest.starts_with(&format!("{}/", f.dest)) || f.dest.starts_with(&format!("{}/", s.dest))
        }) {
            return Err(SecretError::Dest {
                dest: s.dest.clone(),
                detail: format!(
                    "conflicts with {} (one would be a directory of the other)",
                    parent.dest
                ),
            });
        }
        seen.push(s);
    }
    specs
        .into_iter()
        .map(|spec| {
            let content = std::fs::read(&spec.source).map_err(|source| SecretError::Source {
                path: spec.source.clone(),
                dest: spec.dest.clone(),
                source,
            })?;
            Ok(Secret { spec, content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_options_in_any_order() {
        let s = parse_spec("/etc/k3s/token=/run/k3s.tok,owner=0:1000,mode=0440").unwrap();
        assert_eq!(s.dest, "/etc/k3s/token");
        assert_eq!(s.source, PathBuf::from("/run/k3s.tok"));
        assert_eq!((s.mode, s.uid, s.gid), (0o440, 0, 1000));
        let d = parse_spec("/etc/nix/netrc=./a,b").unwrap();
        assert_eq!(d.source, PathBuf::from("./a,b"));
        assert_eq!((d.mode, d.uid, d.gid), (0o400, 0, 0));
        assert!(parse_spec("/etc/x").is_err());
        assert!(parse_spec("/etc/x=src,mode=999").is_err());
        assert!(parse_spec("/etc/x=src,owner=root:root").is_err());
    }

    #[test]
    fn destinations_must_stay_inside_the_root() {
        for bad in [
            "etc/k3s/token",
            "/etc/../root/x",
            "/etc/k3s/",
            "/etc//x",
            "/etc/./x",
            "/etc/k3s token",
            "/etc/x\"y",
            "/etc/x\nmkdir /y",
            "/nix/store/abc-secret",
            "/nix",
            "/nix/store",
            "/nix/var/nix/x",
            "/nix/x",
        ] {
            assert!(check_dest(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "/etc/k3s/token",
            "/root/.netrc",
            "/var/lib/x/a-b_c.d",
            "/nixos/x",
            "/etc/nix/x",
        ] {
            check_dest(good).unwrap();
        }
    }

    #[test]
    fn duplicate_or_nested_destinations_are_refused_before_any_read() {
        let spec = |d: &str| parse_spec(&format!("{d}=/nonexistent")).unwrap();
        let dup = load(vec![spec("/etc/k3s/token"), spec("/etc/k3s/token")]).unwrap_err();
        assert!(dup.to_string().contains("given twice"), "{dup}");
        let nested = load(vec![spec("/etc/k3s"), spec("/etc/k3s/token")]).unwrap_err();
        assert!(nested.to_string().contains("conflicts with /etc/k3s"), "{nested}");
        let missing = load(vec![spec("/etc/k3s/token")]).unwrap_err();
        assert!(
            missing.to_string().contains("secret source /nonexistent"),
            "{missing}"
        );
    }
}
