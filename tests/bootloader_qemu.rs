//! Boot once, bless later, on a real bootloader: QEMU (TCG) with OVMF booting systemd-boot
//! from a GPT disk (docs/bootloader.md). The guest runs the unchanged agent host logic
//! (`nixroll host-step`) against OVMF's EFI variables; a stand-in for the controller in the
//! guest (`tests/bootloader/controller.sh`) gives one grant per boot:
//!
//! 1. on the old system: Boot of a new system whose stage 2 panics → the agent keeps the old
//!    default and sets the new entry as one-shot (`bootctl list --json=short`, `bootctl
//!    set-oneshot`) and reboots; the new system panics, `panic=1` resets the machine, and
//!    systemd-boot starts the old default with no human;
//! 2. back on the old system (the report: rebooted, booted ≠ the new system, `bootOnce` set:
//!    what the controller calls `RolledBack`): Boot of a good system, once;
//! 3. on the good system: the default is still the old entry; the Bless grant makes it the
//!    default; reboot;
//! 4. the good system boots as the default.
//!
//! The same with GRUB (`grub-mkstandalone`, a `grub.cfg` with the header of NixOS's
//! install-grub.pl that boots grubenv's `next_entry` once, `grub-reboot`).
//!
//! Needs qemu-system-x86, ovmf, systemd-boot, grub-efi-amd64-bin, grub2-common,
//! busybox-static, mtools, dosfstools, fdisk, e2fsprogs and `apt-get download` of Debian's
//! kernel (cached in /var/cache/nixroll-bootloader); skips without them, fails under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nixroll::api::{ActivationState, AgentStatus};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The whole scenario (5 boots under TCG) must end within this.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);

fn tools_present() -> bool {
    let static_busybox = Command::new("ldd")
        .arg("/bin/busybox")
        .output()
        .is_ok_and(|o| !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic"));
    common::require(
        "qemu-system-x86_64 (apt-get install qemu-system-x86)",
        common::runs("qemu-system-x86_64", &["--version"]),
    ) && common::require("OVMF (apt-get install ovmf)", Path::new(OVMF_CODE).exists())
        && common::require(
            "systemd-boot (apt-get install systemd-boot)",
            Path::new(SYSTEMD_BOOT).exists() && common::runs("bootctl", &["--version"]),
        )
        && common::require(
            "a static busybox (apt-get install busybox-static)",
            Path::new("/bin/busybox").exists() && static_busybox,
        )
        && common::require(
            "GRUB (apt-get install grub-efi-amd64-bin grub2-common)",
            common::runs("grub-mkstandalone", &["--version"])
                && Path::new("/usr/sbin/grub-reboot").exists()
                && Path::new("/usr/lib/grub/x86_64-efi").is_dir(),
        )
        && common::require(
            "mtools, dosfstools, fdisk, e2fsprogs",
            common::runs("mcopy", &["--version"])
                && common::runs("mkfs.fat", &["--help"])
                && common::runs("sfdisk", &["--version"])
                && common::runs("mkfs.ext4", &["-V"]),
        )
}

/// Where the Debian kernel is kept between runs.
fn cache_dir() -> PathBuf {
    let shared = Path::new("/var/cache/nixroll-bootloader");
    if std::fs::create_dir_all(shared).is_ok() {
        shared.to_path_buf()
    } else {
        std::env::temp_dir().join("nixroll-bootloader-cache")
    }
}

/// What the guest printed: its `nixroll-guest:` lines (escape sequences and `\r` removed) and
/// the kernel's panic lines, in order.
fn guest_lines(serial: &str) -> Vec<String> {
    let strip = |l: &str| {
        let mut out = String::new();
        let mut chars = l.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ … final byte in @..~
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) && d != '[' {
                        break;
                    }
                }
            } else if c != '\r' {
                out.push(c);
            }
        }
        out
    };
    serial
        .lines()
        .map(strip)
        .filter(|l| {
            l.starts_with("nixroll-guest:")
                || l.contains("Kernel panic")
                || l.contains("the new system boots once")
        })
        .collect()
}

/// The `nixroll-guest: KEY …` lines' rest, in order.
fn said<'a>(lines: &'a [String], key: &str) -> Vec<&'a str> {
    let prefix = format!("nixroll-guest: {key} ");
    lines.iter().filter_map(|l| l.strip_prefix(&prefix)).collect()
}

/// What one run of the scenario left: the guest's lines, the agent's reports, the old and
/// the good system.
struct Run {
    lines: Vec<String>,
    reports: Vec<AgentStatus>,
    old: String,
    good: String,
}

/// Build the disk for `loader` (`systemd-boot` or `grub`), boot it until the guest powers
/// off, and check what holds for both bootloaders.
fn run_scenario(loader: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bootloader/make-disk.sh");
    let built = Command::new(&script)
        .arg(out)
        .arg(env!("CARGO_BIN_EXE_nixroll"))
        .arg(cache_dir())
        .arg(loader)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "make-disk.sh failed: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let systems = std::fs::read_to_string(out.join("systems")).unwrap();
    let system = |name: &str| {
        systems
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_string()
    };
    let (old, bad, good) = (system("old"), system("bad"), system("good"));

    let serial = out.join("serial.log");
    let started = Instant::now();
    let qemu = Command::new("timeout")
        .arg(SCENARIO_TIMEOUT.as_secs().to_string())
        .arg("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-m", "1024", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,file={}",
            out.join("vars.fd").display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio",
            out.join("disk.img").display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .output()
        .unwrap();
    let took = started.elapsed();
    let log = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    let lines = guest_lines(&log);
    eprintln!("{loader}: the guest, through its serial console ({took:.0?} under TCG):");
    for l in &lines {
        eprintln!("  {}", l.chars().take(300).collect::<String>());
    }
    assert!(
        qemu.status.success(),
        "QEMU did not end with the guest's power-off within {SCENARIO_TIMEOUT:?}: {:?} {}",
        qemu.status,
        String::from_utf8_lossy(&qemu.stderr)
    );

    // Five boots: old → the new one (once) panics → old by itself → good (once) → good
    // (the default, after the bless).
    let booted: Vec<&str> = said(&lines, "booted")
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .map(|s| s.trim_end_matches(':'))
        .collect();
    assert_eq!(
        booted,
        [&old, &bad, &old, &good, &good],
        "the systems booted, in order"
    );
    let panic_at = lines.iter().position(|l| l.contains("Kernel panic")).unwrap();
    let bad_at = lines
        .iter()
        .position(|l| l.contains(&format!("booted {bad}")))
        .unwrap();
    assert!(panic_at > bad_at, "the new system's boot panicked");
    assert_eq!(said(&lines, "step"), ["0", "1", "2", "3"]);
    assert!(
        lines.iter().any(|l| l == "nixroll-guest: done"),
        "the scenario ran to its end"
    );

    // The agent's reports: one per step before its grant (a Boot grant ends in the reboot,
    // so it prints none), and the bless's: step 0 | step 1 (after the panic) | step 2 (the
    // good system, once), the bless | step 3.
    let reports: Vec<AgentStatus> = said(&lines, "report")
        .iter()
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("report {j}: {e}")))
        .collect();
    assert_eq!(reports.len(), 5, "{reports:?}");
    let after_panic = &reports[1];
    let act = after_panic.activation.as_ref().unwrap();
    assert_eq!(
        (act.id.as_str(), act.state),
        ("boot-bad", ActivationState::Rebooted)
    );
    assert!(act.boot_once.is_some(), "the new system was booted once");
    assert_eq!(
        after_panic.booted_system.as_deref(),
        Some(old.as_str()),
        "back on the old system: what the controller calls RolledBack"
    );
    assert_eq!(after_panic.default_system.as_deref(), Some(old.as_str()));
    assert_ne!(after_panic.boot_id, reports[0].boot_id);

    let once = &reports[2];
    let act = once.activation.as_ref().unwrap();
    assert_eq!(
        (act.id.as_str(), act.state),
        ("boot-good", ActivationState::Rebooted)
    );
    assert!(act.boot_once.is_some());
    assert_eq!(once.booted_system.as_deref(), Some(good.as_str()));
    assert_eq!(
        once.default_system.as_deref(),
        Some(old.as_str()),
        "not the default before the bless"
    );

    let blessed = &reports[3];
    let act = blessed.activation.as_ref().unwrap();
    assert_eq!(
        (act.id.as_str(), act.state),
        ("bless-good", ActivationState::Blessed)
    );
    assert_eq!(blessed.default_system.as_deref(), Some(good.as_str()));

    let last = &reports[4];
    assert_eq!(last.booted_system.as_deref(), Some(good.as_str()));
    assert_eq!(last.default_system.as_deref(), Some(good.as_str()));
    Run {
        lines,
        reports,
        old,
        good,
    }
}

#[test]
fn systemd_boot_boots_a_new_entry_once_and_the_bless_step_makes_it_the_default() {
    if !tools_present() {
        return;
    }
    let run = run_scenario("systemd-boot");
    // What systemd-boot said at each step: the entry it started (LoaderEntrySelected), the
    // one-shot variable, loader.conf's default.
    assert_eq!(
        said(&run.lines, "loader"),
        [
            // step 0: the old system, the default
            "selected=nixos-generation-1.conf oneshot=- default=nixos-generation-1.conf",
            // step 1: after the panic, the old default again; the one-shot was consumed
            "selected=nixos-generation-1.conf oneshot=- default=nixos-generation-1.conf",
            // step 2: the good system booted once; the default is still the old one
            "selected=nixos-generation-3.conf oneshot=- default=nixos-generation-1.conf",
            // … until the bless step
            "selected=nixos-generation-3.conf oneshot=- default=nixos-generation-3.conf",
            // step 3: the good system booted as the default
            "selected=nixos-generation-3.conf oneshot=- default=nixos-generation-3.conf",
            "selected=nixos-generation-3.conf oneshot=- default=nixos-generation-3.conf",
        ]
    );
    // The agent set the one-shot entries it looked up in `bootctl list --json=short`.
    let oneshot: Vec<&String> = run
        .lines
        .iter()
        .filter(|l| l.contains("the new system boots once"))
        .collect();
    assert_eq!(oneshot.len(), 2, "{oneshot:?}");
    assert!(
        oneshot[0].contains("entry=systemd-boot nixos-generation-2.conf"),
        "{}",
        oneshot[0]
    );
    assert!(
        oneshot[1].contains("entry=systemd-boot nixos-generation-3.conf"),
        "{}",
        oneshot[1]
    );
    let boot_once = |i: usize| run.reports[i].activation.as_ref().unwrap().boot_once.clone();
    assert_eq!(
        boot_once(1).as_deref(),
        Some("systemd-boot nixos-generation-2.conf")
    );
    assert_eq!(
        boot_once(2).as_deref(),
        Some("systemd-boot nixos-generation-3.conf")
    );
}

#[test]
fn grub_boots_a_new_entry_once_and_the_bless_step_makes_it_the_default() {
    if !tools_present() {
        return;
    }
    let run = run_scenario("grub");
    // grubenv's next_entry (set by grub-reboot, cleared by grub.cfg when GRUB boots it) and
    // the system of entry 0, the default.
    let (old, good) = (&run.old, &run.good);
    assert_eq!(
        said(&run.lines, "loader"),
        [
            format!("next_entry=- default={old}"),
            // after the panic: the old default again; next_entry was consumed by that boot
            format!("next_entry=- default={old}"),
            // the good system booted once; the default is still the old one …
            format!("next_entry=- default={old}"),
            // … until the bless step
            format!("next_entry=- default={good}"),
            format!("next_entry=- default={good}"),
            format!("next_entry=- default={good}"),
        ]
    );
    // grub-reboot got the entry whose `linux` line boots the system, as SUBMENU>ENTRY.
    let boot_once = |i: usize| {
        run.reports[i]
            .activation
            .as_ref()
            .unwrap()
            .boot_once
            .clone()
            .unwrap()
    };
    for (i, generation) in [(1, 2), (2, 3)] {
        let want = format!("GRUB NixOS - All configurations>NixOS - Configuration {generation} (");
        assert!(boot_once(i).starts_with(&want), "{}", boot_once(i));
    }
}
