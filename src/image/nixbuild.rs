//! Building `nixosConfigurations.HOST.config.system.build.images.VARIANT` with the local Nix
//! and finding the image file in what it produced.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run::{self, RunError, Stderr};

#[derive(Debug, thiserror::Error)]
pub enum NixBuildError {
    #[error("--flake {0:?}: expected REF#HOST (e.g. .#node1 or github:me/infra#node1)")]
    FlakeSyntax(String),
    #[error("{what} {value:?} has characters nixroll does not pass to Nix (letters, digits, - _ .)")]
    Name { what: &'static str, value: String },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("nix build {installable} failed ({status}); Nix's messages are above")]
    Failed { installable: String, status: String },
    #[error("nix build printed no output path: {0}")]
    Parse(String),
    #[error("{path}: {detail}")]
    NoImage { path: PathBuf, detail: String },
}

/// `REF#HOST` → (`REF`, `HOST`).
pub fn split_flake(arg: &str) -> Result<(String, String), NixBuildError> {
    let (flake, host) = arg
        .rsplit_once('#')
        .ok_or_else(|| NixBuildError::FlakeSyntax(arg.to_string()))?;
    if flake.is_empty() || host.is_empty() {
        return Err(NixBuildError::FlakeSyntax(arg.to_string()));
    }
    check_name("host", host)?;
    Ok((flake.to_string(), host.to_string()))
}

pub fn check_name(what: &'static str, value: &str) -> Result<(), NixBuildError> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(NixBuildError::Name {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// `REF#nixosConfigurations.HOST.config.system.build.images.VARIANT` (the host quoted when
/// it has a dot, as in [`crate::api::installable`]).
pub fn installable(flake: &str, host: &str, variant: &str) -> String {
    let host = if host.contains('.') {
        format!("\"{host}\"")
    } else {
        host.to_string()
    };
    format!("{flake}#nixosConfigurations.{host}.config.system.build.images.{variant}")
}

/// Run `nix build --no-link --json INSTALLABLE` (Nix ≥ 2.8: no `--print-out-paths`). Nix's
/// log and progress go straight to our stderr. Returns the output path.
pub fn build(installable: &str, offline: bool, timeout: Duration) -> Result<PathBuf, NixBuildError> {
    let mut c = Command::new("nix");
    c.args(["--extra-experimental-features", "nix-command flakes"]);
    if offline {
        c.args(["--option", "substituters", ""]);
    }
    c.args(["build", "--no-link", "--json", "--no-write-lock-file"])
        .arg(installable);
    let out = run::run(c, None, Stderr::Inherit, timeout)?;
    if !out.success() {
        return Err(NixBuildError::Failed {
            installable: crate::nix::mask_credentials(installable),
            status: out.status.to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    crate::nix::parse_build_json(&stdout)
        .map(PathBuf::from)
        .ok_or_else(|| NixBuildError::Parse(stdout.chars().take(300).collect()))
}

/// The image file of a build output: the output itself when it is a file, else the one
/// `*.img`, `*.raw` or `*.qcow2` at its top level (NixOS names it `nixos.img` or
/// `nixos-image-raw-efi-….raw`).
pub fn find_image(path: &Path) -> Result<PathBuf, NixBuildError> {
    let no_image = |detail: String| NixBuildError::NoImage {
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| no_image(e.to_string()))?;
    if meta.is_file() {
        return Ok(path.to_path_buf());
    }
    let mut found = Vec::new();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| no_image(e.to_string()))? {
        let entry = entry.map_err(|e| no_image(e.to_string()))?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        seen.push(name.clone());
        let is_image = matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("img" | "raw" | "qcow2")
        );
        if is_image && std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            seen.sort();
            Err(no_image(format!(
                "holds no *.img, *.raw or *.qcow2 file (it has: {})",
                if seen.is_empty() {
                    "nothing".into()
                } else {
                    seen.join(", ")
                }
            )))
        }
        _ => Err(no_image(format!(
            "holds several images ({}); pass the one to use with --image",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installables_name_the_image_variant() {
        assert_eq!(
            installable(".", "node1", "raw-efi"),
            ".#nixosConfigurations.node1.config.system.build.images.raw-efi"
        );
        assert_eq!(
            installable("github:me/infra", "a.b", "qcow2"),
            "github:me/infra#nixosConfigurations.\"a.b\".config.system.build.images.qcow2"
        );
        assert_eq!(
            split_flake("git+file:///x?ref=main#node1").unwrap(),
            ("git+file:///x?ref=main".to_string(), "node1".to_string())
        );
        assert!(split_flake("nohost").is_err());
        assert!(split_flake(".#a\"b").is_err());
    }
}
