//! Every `.nix` file of the repository parses (`nix-instantiate --parse`, Debian's Nix 2.8),
//! and the flake reads the crate version from Cargo.toml the way Nix's TOML parser sees it.
//! Nixpkgs is not available here: nothing is evaluated against it (see docs/operating.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                nix_files(&p, out);
            }
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

/// `nix-instantiate` with its state kept in a temporary directory (off the machine's /nix/var).
fn nix_instantiate(tmp: &Path) -> Option<Command> {
    if Command::new("nix-instantiate").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-instantiate is required in CI (Debian package nix-bin)"
        );
        eprintln!("nix-instantiate is not installed: skipping");
        return None;
    }
    let mut cmd = Command::new("nix-instantiate");
    cmd.env("HOME", tmp)
        .env("NIX_STATE_DIR", tmp.join("state"))
        .env("NIX_LOG_DIR", tmp.join("log"));
    Some(cmd)
}

#[test]
fn every_nix_file_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    nix_files(Path::new(ROOT), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(ROOT).unwrap().display().to_string())
        .collect();
    for want in ["flake.nix", "nix/module.nix", "nix/package.nix", "nix/image.nix"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for f in &files {
        let Some(mut cmd) = nix_instantiate(tmp.path()) else {
            return;
        };
        let out = cmd.arg("--parse").arg(f).output().unwrap();
        assert!(
            out.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check bites.
    let bad = tmp.path().join("bad.nix");
    std::fs::write(&bad, "{ x = 1; ").unwrap();
    if let Some(mut cmd) = nix_instantiate(tmp.path()) {
        assert!(!cmd.arg("--parse").arg(&bad).output().unwrap().status.success());
    }
}

#[test]
fn the_flake_reads_the_crate_version() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut cmd) = nix_instantiate(tmp.path()) else {
        return;
    };
    let expr = format!("(builtins.fromTOML (builtins.readFile {ROOT}/Cargo.toml)).package.version");
    let out = cmd.args(["--eval", "--expr", &expr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("\"{}\"", env!("CARGO_PKG_VERSION"))
    );
    let flake = std::fs::read_to_string(format!("{ROOT}/flake.nix")).unwrap();
    assert!(flake.contains("builtins.fromTOML (builtins.readFile ./Cargo.toml)"));
}
