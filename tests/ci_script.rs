//! `.ci/run` is also what a newcomer runs on their own machine (README, "Two commands"): what it
//! installs must not change how that machine boots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The Debian packages `.ci/run` may install (its `need+=(…)` lines).
fn installed_packages(script: &str) -> Vec<String> {
    let re = regex::Regex::new(r"need\+=\(([^)]*)\)").unwrap();
    re.captures_iter(script)
        .flat_map(|c| c[1].split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Packages whose maintainer scripts install or replace the boot loader of the machine they are
/// installed on (systemd-boot's postinst runs `bootctl install` when it finds an ESP; GRUB's
/// platform packages run grub-install). The tests need only their files: `systemd-boot-efi`,
/// `grub-efi-amd64-bin`, and `bootctl` unpacked by `tests/bootloader/make-disk.sh`.
const CHANGE_THE_BOOT_LOADER: &[&str] = &[
    "systemd-boot",
    "grub-efi-amd64",
    "grub-efi-amd64-signed",
    "grub-efi",
    "grub-pc",
    "grub2",
    "shim-signed",
];

#[test]
fn ci_run_installs_nothing_that_changes_the_machines_boot_loader() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    let packages = installed_packages(&script);
    assert!(
        packages.iter().any(|p| p == "nix-bin") && packages.len() > 20,
        "the parse sees the script's packages: {packages:?}"
    );
    let bad: Vec<&String> = packages
        .iter()
        .filter(|p| CHANGE_THE_BOOT_LOADER.contains(&p.as_str()))
        .collect();
    assert!(
        bad.is_empty(),
        "`.ci/run` would install {bad:?}, which change the boot loader of the machine running it"
    );
}
