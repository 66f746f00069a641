//! Booting a new generation once. On the reboot path the agent installs the new generation as
//! a boot entry while the old one stays the default, then asks the bootloader to start the new
//! entry on the next boot only. A new system that panics, hangs or cannot find its root is
//! reset (the kernel's `panic=N`, the hardware watchdog) and the machine comes back on the old
//! default by itself; one that boots and is verified is made the default later (the `Bless`
//! grant). See docs/agent.md ("Boot once, bless later").
//!
//! * **systemd-boot**: the entry is looked up in `bootctl list --json=short` by its kernel
//!   command line (`init=<system>/init`, what NixOS's systemd-boot builder writes into every
//!   entry), never guessed from file names; then `bootctl set-oneshot ID` (the EFI variable
//!   `LoaderEntryOneShot`, consumed by systemd-boot at the next boot).
//! * **GRUB**: the entry is looked up in `/boot/grub/grub.cfg` the same way (the `linux` line
//!   with `init=<system>/init`); then `grub-reboot 'SUBMENU>ENTRY'` (`next_entry` in
//!   `grubenv`). Only when the `grub.cfg` consumes `next_entry` (else GRUB would ignore it).
//! * **Simulated** (`--host-root` hosts, the demo, e2e/): `/boot/oneshot-system`, a symlink the
//!   simulated bootloader boots once and removes (`crate::sim::host`, `e2e/host/nixos-stage2`).
//!
//! Which one a host has is detected from the host itself ([`detect`]): systemd-boot sets the
//! EFI variable `LoaderInfo` when it boots the machine; GRUB has its `grub.cfg`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host::{Host, HostCommand};

/// `LoaderInfo` of the Boot Loader Interface (set by systemd-boot at every boot).
pub const LOADER_INFO_EFIVAR: &str =
    "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// NixOS's GRUB configuration.
pub const GRUB_CFG: &str = "/boot/grub/grub.cfg";
/// The simulated bootloader's default entry (a symlink to a system).
pub const SIM_DEFAULT: &str = "/boot/default-system";
/// The simulated bootloader's one-shot entry (a symlink to a system; removed when booted).
pub const SIM_ONESHOT: &str = "/boot/oneshot-system";

/// How long a bootloader command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A bootloader that can boot an entry once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootloader {
    SystemdBoot,
    Grub,
    Simulated,
}

impl Bootloader {
    pub fn name(self) -> &'static str {
        match self {
            Bootloader::SystemdBoot => "systemd-boot",
            Bootloader::Grub => "GRUB",
            Bootloader::Simulated => "simulated bootloader",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootloaderError {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("cannot parse `bootctl list --json=short`: {0}")]
    Parse(String),
    #[error("no {bootloader} entry boots {system} (no entry with init={system}/init in {looked_in})")]
    NoEntry {
        bootloader: &'static str,
        system: String,
        looked_in: String,
    },
    #[error("{GRUB_CFG} does not consume `next_entry`, so GRUB would ignore grub-reboot")]
    GrubWithoutNextEntry,
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bootloader of `host` that can boot once, if any (see the module docs).
pub fn detect(host: &dyn Host) -> Option<Bootloader> {
    if let Ok(bytes) = std::fs::read(host.fs_path(Path::new(LOADER_INFO_EFIVAR))) {
        // 4 bytes of attributes, then UTF-16LE: "systemd-boot 255.4".
        let text: String = bytes
            .get(4..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))).unwrap_or('?'))
            .collect();
        if text.contains("systemd-boot") {
            return Some(Bootloader::SystemdBoot);
        }
    }
    if let Ok(cfg) = std::fs::read_to_string(host.fs_path(Path::new(GRUB_CFG))) {
        return grub_consumes_next_entry(&cfg).then_some(Bootloader::Grub);
    }
    std::fs::symlink_metadata(host.fs_path(Path::new(SIM_DEFAULT)))
        .is_ok_and(|m| m.file_type().is_symlink())
        .then_some(Bootloader::Simulated)
}

/// Set the entry of `system` (a host path, `/nix/store/…`) to boot once; returns the entry as
/// reported (`systemd-boot nixos-generation-5.conf`).
pub async fn set_oneshot(
    host: &dyn Host,
    bootloader: Bootloader,
    system: &str,
) -> Result<String, BootloaderError> {
    match bootloader {
        Bootloader::SystemdBoot => {
            let out = run(
                host,
                HostCommand::new("bootctl", COMMAND_TIMEOUT).args(["list", "--json=short"]),
            )
            .await?;
            let id = systemd_boot_entry(&out, system)?;
            run(
                host,
                HostCommand::new("bootctl", COMMAND_TIMEOUT)
                    .arg("set-oneshot")
                    .arg(&id),
            )
            .await?;
            Ok(format!("systemd-boot {id}"))
        }
        Bootloader::Grub => {
            let path = host.fs_path(Path::new(GRUB_CFG));
            let cfg = std::fs::read_to_string(&path).map_err(|source| BootloaderError::Io {
                what: "read",
                path: GRUB_CFG.into(),
                source,
            })?;
            if !grub_consumes_next_entry(&cfg) {
                return Err(BootloaderError::GrubWithoutNextEntry);
            }
            let entry = grub_entry(&cfg, system)?;
            run(host, HostCommand::new("grub-reboot", COMMAND_TIMEOUT).arg(&entry)).await?;
            Ok(format!("GRUB {entry}"))
        }
        Bootloader::Simulated => {
            let link = host.fs_path(Path::new(SIM_ONESHOT));
            let tmp = link.with_extension("nixroll-tmp");
            let _ = std::fs::remove_file(&tmp);
            let io = |what| {
                move |source| BootloaderError::Io {
                    what,
                    path: SIM_ONESHOT.into(),
                    source,
                }
            };
            std::os::unix::fs::symlink(system, &tmp).map_err(io("link"))?;
            std::fs::rename(&tmp, &link).map_err(io("rename"))?;
            Ok(format!("simulated {SIM_ONESHOT}"))
        }
    }
}

async fn run(host: &dyn Host, cmd: HostCommand) -> Result<String, BootloaderError> {
    let command = cmd.display();
    let out = host.run(cmd).await.map_err(|e| BootloaderError::Command {
        command: command.clone(),
        message: e.to_string(),
    })?;
    if !out.success() {
        return Err(BootloaderError::Command {
            command,
            message: format!("exit {:?}: {}", out.code, out.stderr.trim()),
        });
    }
    Ok(out.stdout)
}

/// Whether a kernel command line starts `system` (`init=<system>/init`).
fn boots(cmdline: &str, system: &str) -> bool {
    let want = format!("init={}/init", system.trim_end_matches('/'));
    cmdline.split_whitespace().any(|w| w == want)
}

/// The id of the systemd-boot entry that boots `system`, from `bootctl list --json=short`:
/// one JSON array of entries (systemd 254 and later), or one JSON object per entry, one per
/// line (systemd 252, Debian 12: what the QEMU test's guest printed); `options` is a string,
/// or a list of strings in some versions. An entry that is the default is taken only if no
/// other entry boots `system`.
pub fn systemd_boot_entry(json: &str, system: &str) -> Result<String, BootloaderError> {
    let mut entries: Vec<serde_json::Value> = Vec::new();
    for value in serde_json::Deserializer::from_str(json).into_iter::<serde_json::Value>() {
        match value.map_err(|e| BootloaderError::Parse(e.to_string()))? {
            serde_json::Value::Array(a) => entries.extend(a),
            v @ serde_json::Value::Object(_) => entries.push(v),
            _ => {
                return Err(BootloaderError::Parse(
                    "neither a JSON array nor JSON objects".into(),
                ));
            }
        }
    }
    let options = |e: &serde_json::Value| -> String {
        match e.get("options") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(a)) => {
                a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")
            }
            _ => String::new(),
        }
    };
    let mut matching: Vec<(&str, bool)> = entries
        .iter()
        .filter(|e| boots(&options(e), system))
        .filter_map(|e| {
            let id = e.get("id")?.as_str()?;
            Some((id, e.get("isDefault").and_then(|d| d.as_bool()).unwrap_or(false)))
        })
        .collect();
    matching.sort_by_key(|(_, default)| *default);
    matching
        .first()
        .map(|(id, _)| id.to_string())
        .ok_or_else(|| BootloaderError::NoEntry {
            bootloader: "systemd-boot",
            system: system.into(),
            looked_in: "`bootctl list --json=short`".into(),
        })
}

/// Whether a `grub.cfg` takes a one-time entry from `next_entry` (what `grub-reboot` sets).
pub fn grub_consumes_next_entry(cfg: &str) -> bool {
    cfg.contains("next_entry")
}

/// The `grub-reboot` argument (`SUBMENU>ENTRY` titles) of the GRUB entry whose `linux` line
/// boots `system`. An entry inside a submenu ("NixOS - All configurations") is preferred to a
/// top-level one (the default).
pub fn grub_entry(cfg: &str, system: &str) -> Result<String, BootloaderError> {
    // (kind, title) of each open block; "{" of other blocks (if, function) count too.
    let mut stack: Vec<Option<String>> = Vec::new();
    let mut found: Vec<Vec<String>> = Vec::new();
    for raw in cfg.lines() {
        let line = raw.trim();
        let opens = line.ends_with('{');
        let title = if line.starts_with("menuentry ") || line.starts_with("submenu ") {
            first_quoted(line)
        } else {
            None
        };
        if opens {
            stack.push(title);
            continue;
        }
        if line == "}" {
            stack.pop();
            continue;
        }
        if line.starts_with("linux ") && boots(line, system) {
            let path: Vec<String> = stack.iter().flatten().cloned().collect();
            if !path.is_empty() {
                found.push(path);
            }
        }
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.len()));
    found
        .first()
        .map(|p| p.join(">"))
        .ok_or_else(|| BootloaderError::NoEntry {
            bootloader: "GRUB",
            system: system.into(),
            looked_in: GRUB_CFG.into(),
        })
}

/// The first `"…"` or `'…'` string of a line, unescaped (`\"`, `\\`).
fn first_quoted(line: &str) -> Option<String> {
    let start = line.find(['"', '\''])?;
    let quote = line[start..].chars().next()?;
    let mut out = String::new();
    let mut chars = line[start + 1..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quote == '"' => out.push(chars.next()?),
            c if c == quote => return Some(out),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const OLD: &str = "/nix/store/aaaa-nixos-system-n1-24.05";
    const NEW: &str = "/nix/store/bbbb-nixos-system-n1-24.05";

    #[test]
    fn systemd_boot_entry_is_found_by_its_init_not_its_file_name() {
        // As `bootctl list --json=short` prints it (systemd 255); the file names say nothing
        // about which system an entry boots.
        let json = format!(
            r#"[{{"type":"type1","source":"esp","id":"nixos-generation-7.conf","path":"/boot/loader/entries/nixos-generation-7.conf","title":"NixOS","options":"init={OLD}/init loglevel=4","isDefault":true,"isSelected":true}},
               {{"type":"type1","source":"esp","id":"nixos-generation-8.conf","path":"/boot/loader/entries/nixos-generation-8.conf","title":"NixOS","options":"init={NEW}/init loglevel=4","isDefault":false,"isSelected":false}},
               {{"type":"loader","id":"auto-reboot-to-firmware-setup","title":"Reboot Into Firmware Interface"}}]"#
        );
        assert_eq!(systemd_boot_entry(&json, NEW).unwrap(), "nixos-generation-8.conf");
        assert_eq!(systemd_boot_entry(&json, OLD).unwrap(), "nixos-generation-7.conf");
        // `options` as a list (older bootctl), and a prefix is no match.
        let json = format!(r#"[{{"id":"x.conf","options":["init={NEW}/init","quiet"]}}]"#);
        assert_eq!(systemd_boot_entry(&json, NEW).unwrap(), "x.conf");
        assert!(matches!(
            systemd_boot_entry(&json, "/nix/store/bbbb-nixos-system-n1-24"),
            Err(BootloaderError::NoEntry { .. })
        ));
        assert!(matches!(
            systemd_boot_entry("not json", NEW),
            Err(BootloaderError::Parse(_))
        ));
        assert!(matches!(
            systemd_boot_entry("5", NEW),
            Err(BootloaderError::Parse(_))
        ));
    }

    #[test]
    fn systemd_boot_entry_reads_systemd_252s_one_object_per_line() {
        // `bootctl list --json=short` of systemd 252 (Debian 12), verbatim from the QEMU
        // test's guest (tests/bootloader_qemu.rs): no array, one object per line, no
        // isDefault. The agent's first version refused it ("trailing characters").
        let json = format!(
            r#"{{"id":"nixos-generation-1.conf","path":"/boot/loader/entries/nixos-generation-1.conf","root":"/boot","title":"NixOS","showTitle":"NixOS","version":"Generation 1","options":"init={OLD}/init console=ttyS0 panic=1 loglevel=4","linux":"/EFI/nixos/vmlinuz","initrd":["/EFI/nixos/initrd"]}}
{{"id":"nixos-generation-2.conf","path":"/boot/loader/entries/nixos-generation-2.conf","root":"/boot","title":"NixOS","showTitle":"NixOS","version":"Generation 2","options":"init={NEW}/init console=ttyS0 panic=1 loglevel=4","linux":"/EFI/nixos/vmlinuz","initrd":["/EFI/nixos/initrd"]}}
{{"id":"auto-reboot-to-firmware-setup","path":"/sys/firmware/efi/efivars/LoaderEntries-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f","title":"Reboot Into Firmware Interface","showTitle":"Reboot Into Firmware Interface"}}
"#
        );
        assert_eq!(systemd_boot_entry(&json, NEW).unwrap(), "nixos-generation-2.conf");
        assert_eq!(systemd_boot_entry(&json, OLD).unwrap(), "nixos-generation-1.conf");
    }

    #[test]
    fn grub_entry_is_the_submenu_path_of_the_linux_line_booting_the_system() {
        let cfg = format!(
            r#"if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${{next_entry}}" ]; then
  set default="${{next_entry}}"
  set next_entry=
  save_env next_entry
else
  set default=0
fi
menuentry "NixOS" --class nixos --unrestricted {{
  search --set=drive1 --fs-uuid 1234
  linux ($drive1)/nix/store/k1-linux/bzImage init={OLD}/init loglevel=4
  initrd ($drive1)/nix/store/i1-initrd/initrd
}}
submenu "NixOS - All configurations" --class submenu {{
menuentry "NixOS - Configuration 8 (2026-12-07 - 24.05)" --class nixos {{
  linux ($drive1)/nix/store/k2-linux/bzImage init={NEW}/init loglevel=4
}}
menuentry "NixOS - Configuration 7 (2026-11-01 - 24.05)" --class nixos {{
  linux ($drive1)/nix/store/k1-linux/bzImage init={OLD}/init loglevel=4
}}
}}
"#
        );
        assert!(grub_consumes_next_entry(&cfg));
        assert_eq!(
            grub_entry(&cfg, NEW).unwrap(),
            "NixOS - All configurations>NixOS - Configuration 8 (2026-12-07 - 24.05)"
        );
        // The default's own entry is in the submenu too; that one is preferred.
        assert_eq!(
            grub_entry(&cfg, OLD).unwrap(),
            "NixOS - All configurations>NixOS - Configuration 7 (2026-11-01 - 24.05)"
        );
        assert!(grub_entry(&cfg, "/nix/store/cccc").is_err());
        assert_eq!(
            first_quoted(r#"menuentry "a \"b\"" {"#).as_deref(),
            Some(r#"a "b""#)
        );
    }
}
