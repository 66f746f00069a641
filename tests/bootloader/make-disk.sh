#!/usr/bin/env bash
# Build the real-bootloader test's disk (docs/bootloader.md): a GPT disk with
#   1. an ESP (vfat, label ESP): systemd-boot as the removable-media loader
#      (\EFI\BOOT\BOOTX64.EFI, Debian's systemd-boot-efi), a Debian kernel and a busybox
#      initrd, loader.conf and one Boot Loader Specification entry (generation 1, the old
#      system, the default);
#   2. a root (ext4, label nixos): busybox, the nixroll binary, bootctl and their shared
#      libraries, and three "systems" in /nix/store (old, one whose stage 2 panics, good), the
#      system profile at generation 1 = old.
# No loop mounts: mkfs.fat + mtools for the ESP, mkfs.ext4 -d for the root, sfdisk + dd.
#
# usage: make-disk.sh OUT_DIR NIXROLL_BINARY CACHE_DIR [systemd-boot|grub]
# With `grub`: GRUB (grub-mkstandalone, Debian's grub-efi-amd64-bin) instead of systemd-boot,
# its grub.cfg and grubenv in \grub on the ESP (/boot/grub in the guest), and grub-reboot,
# grub-editenv and grub-probe in the root.
# The kernel (Debian's linux-image-amd64 and the package it depends on) is fetched once into
# CACHE_DIR with `apt-get download` and unpacked with dpkg-deb (not installed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
nixroll=$2
cache=$3
loader=${4:-systemd-boot}
mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)
cache=$(cd "$cache" && pwd)

# The kernel (one fetch at a time: tests may build two disks at once).
exec 9>"$cache/.lock"
flock 9
if [ ! -d "$cache/kernel/boot" ]; then
  rm -rf "$cache/kernel" "$cache/debs"
  mkdir -p "$cache/debs"
  (cd "$cache/debs" && apt-get download -q linux-image-amd64 2>&1 | grep -v unsandboxed || true)
  meta=$(ls "$cache"/debs/linux-image-amd64_*.deb)
  pkg=$(dpkg-deb -f "$meta" Depends | sed 's/[ ,(].*//')
  (cd "$cache/debs" && apt-get download -q "$pkg" 2>&1 | grep -v unsandboxed || true)
  dpkg-deb -x "$(ls "$cache"/debs/"$pkg"_*.deb)" "$cache/kernel.tmp"
  busybox depmod -b "$cache/kernel.tmp" "$(ls "$cache/kernel.tmp/lib/modules")"
  mv "$cache/kernel.tmp" "$cache/kernel"
fi
# bootctl for the guest, from Debian's systemd-boot package unpacked here, never installed: its
# postinst would make systemd-boot the boot loader of the machine running the tests. The same
# version as the installed systemd (bootctl links its private libsystemd-shared), else the
# archive's.
if [ ! -x "$cache/systemd-boot/usr/bin/bootctl" ]; then
  rm -rf "$cache/systemd-boot" "$cache/sdboot-debs"
  mkdir -p "$cache/sdboot-debs"
  want=$(dpkg-query -W -f='${Version}' systemd)
  (cd "$cache/sdboot-debs" && { apt-get download -q "systemd-boot=$want" 2>/dev/null || apt-get download -q systemd-boot; } 2>&1 | grep -v unsandboxed || true)
  dpkg-deb -x "$(ls "$cache"/sdboot-debs/systemd-boot_*.deb)" "$cache/systemd-boot.tmp"
  mv "$cache/systemd-boot.tmp" "$cache/systemd-boot"
fi
flock -u 9
bootctl="$cache/systemd-boot/usr/bin/bootctl"
kver=$(ls "$cache/kernel/lib/modules")
moddir="$cache/kernel/lib/modules/$kver"
vmlinuz="$cache/kernel/boot/vmlinuz-$kver"

work="$out/work"
rm -rf "$work"
mkdir -p "$work"

# Stage 1: the initrd. Modules in load order (dependencies first, from modules.dep).
initrd="$work/initrd"
mkdir -p "$initrd"/{bin,proc,sys,dev,sysroot,lib/modules}
cp /bin/busybox "$initrd/bin/busybox"
for a in $(busybox --list | grep -vx busybox); do ln -sf busybox "$initrd/bin/$a"; done
cp "$here/stage1-init" "$initrd/init"
declare -A loaded=()
load() {
  local m=$1 d
  [ -z "${loaded[$m]:-}" ] || return 0
  loaded[$m]=1
  for d in $(grep "^$m:" "$moddir/modules.dep" | cut -d: -f2); do load "$d"; done
  mkdir -p "$initrd/lib/modules/$(dirname "$m")"
  cp "$moddir/$m" "$initrd/lib/modules/$m"
  echo "$m" >> "$initrd/lib/modules/order"
}
for name in virtio_pci virtio_blk crc32c_generic ext4 nls_cp437 nls_ascii vfat efivarfs; do
  m=$(grep -E "(^|/)${name//_/[_-]}\.ko:" "$moddir/modules.dep" | cut -d: -f1)
  [ -n "$m" ] || { echo "no module $name in $moddir" >&2; exit 1; }
  load "$m"
done
(cd "$initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initrd.img"

# The root file system.
root="$work/root"
mkdir -p "$root"/{bin,usr/bin,proc,sys,dev,run,boot,tmp,etc,var/lib/nixroll,nix/store,nix/var/nix/profiles,nixroll-guest}
cp /bin/busybox "$root/bin/busybox"
for a in $(busybox --list | grep -vx busybox); do ln -sf busybox "$root/bin/$a"; done
strip -o "$root/usr/bin/nixroll" "$nixroll"
exes=("$nixroll" "$bootctl")
cp "$bootctl" "$root/usr/bin/bootctl"
if [ "$loader" = grub ]; then
  mkdir -p "$root/usr/sbin" "$root/usr/share/grub"
  cp /usr/sbin/grub-reboot /usr/sbin/grub-probe "$root/usr/sbin/"
  cp /usr/bin/grub-editenv "$root/usr/bin/"
  cp /usr/share/grub/grub-mkconfig_lib "$root/usr/share/grub/"
  exes+=(/usr/sbin/grub-probe /usr/bin/grub-editenv)
fi
for exe in "${exes[@]}"; do
  for lib in $(ldd "$exe" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
echo 0123456789abcdef0123456789abcdef > "$root/etc/machine-id"
cp "$here/controller.sh" "$root/nixroll-guest/controller.sh"
params="console=ttyS0 panic=1 loglevel=4"
make_system() { # NAME STAGE2 -> prints the store path
  local name=$1 stage2=$2 hash path
  hash=$(echo "$name" | sha256sum | cut -c1-32)
  path="/nix/store/$hash-nixos-system-guest-$name"
  mkdir -p "$root$path/bin"
  echo "26.05.20261207.guest ($name)" > "$root$path/nixos-version"
  echo "$params" > "$root$path/kernel-params"
  sed "s|@SYSTEM@|$path|g" "$here/$stage2" > "$root$path/init"
  stc=switch-to-configuration
  [ "$loader" != grub ] || stc=switch-to-configuration-grub
  sed "s|@SYSTEM@|$path|g" "$here/$stc" > "$root$path/bin/switch-to-configuration"
  chmod 755 "$root$path/init" "$root$path/bin/switch-to-configuration"
  echo "$path"
}
old=$(make_system old stage2-init)
bad=$(make_system panics stage2-panics)
good=$(make_system good stage2-init)
echo "$old" > "$root/nixroll-guest/old"
echo "$bad" > "$root/nixroll-guest/bad"
echo "$good" > "$root/nixroll-guest/good"
ln -s "$old" "$root/nix/var/nix/profiles/system-1-link"
ln -s system-1-link "$root/nix/var/nix/profiles/system"
chmod 700 "$root/var/lib/nixroll"
truncate -s 384M "$work/root.img"
mkfs.ext4 -q -F -L nixos -d "$root" "$work/root.img"

# The ESP.
truncate -s 64M "$work/esp.img"
mkfs.fat -F 32 -n ESP "$work/esp.img" >/dev/null
export MTOOLS_SKIP_CHECK=1
esp=(-i "$work/esp.img")
mmd "${esp[@]}" ::/EFI ::/EFI/BOOT ::/EFI/nixos
mcopy "${esp[@]}" "$vmlinuz" ::/EFI/nixos/vmlinuz
mcopy "${esp[@]}" "$work/initrd.img" ::/EFI/nixos/initrd
if [ "$loader" = grub ]; then
  # GRUB as the removable-media loader; its configuration and environment block on the ESP
  # (\grub, /boot/grub in the guest), so that save_env can write grubenv.
  cat > "$work/embedded.cfg" <<'CFG'
search --no-floppy --set=root --label ESP
set prefix=($root)/grub
configfile ($root)/grub/grub.cfg
CFG
  grub-mkstandalone -O x86_64-efi -o "$work/bootx64.efi" \
    --modules="part_gpt fat ext2 search search_label linux normal configfile loadenv test echo gzio" \
    --install-modules="part_gpt fat ext2 search search_label search_fs_uuid search_fs_file linux normal configfile loadenv test echo gzio" \
    "boot/grub/grub.cfg=$work/embedded.cfg"
  mcopy "${esp[@]}" "$work/bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
  mkdir -p "$work/espdir/grub"
  grub-editenv "$work/espdir/grub/grubenv" create
  NIXROLL_GUEST_ROOT=$root NIXROLL_GUEST_ESP=$work/espdir "$root$old/bin/switch-to-configuration" boot >/dev/null
  mcopy "${esp[@]}" -s "$work/espdir/grub" ::/grub
else
  mmd "${esp[@]}" ::/loader ::/loader/entries
  mcopy "${esp[@]}" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
  printf 'timeout 0\ndefault nixos-generation-1.conf\n' > "$work/loader.conf"
  printf 'title NixOS\nversion Generation 1\nlinux /EFI/nixos/vmlinuz\ninitrd /EFI/nixos/initrd\noptions init=%s/init %s\n' \
    "$old" "$params" > "$work/nixos-generation-1.conf"
  mcopy "${esp[@]}" "$work/loader.conf" ::/loader/loader.conf
  mcopy "${esp[@]}" "$work/nixos-generation-1.conf" ::/loader/entries/nixos-generation-1.conf
fi

# The disk: GPT, ESP at 1 MiB, root after it.
disk="$out/disk.img"
rm -f "$disk"
truncate -s 456M "$disk"
sfdisk -q "$disk" <<PART
label: gpt
start=1MiB, size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP
start=65MiB, size=384MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=nixos
PART
dd if="$work/esp.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=1M seek=65 conv=notrunc,sparse status=none
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$out/vars.fd"
rm -rf "$work"
printf 'old=%s\nbad=%s\ngood=%s\n' "$old" "$bad" "$good" > "$out/systems"
echo "disk: $disk"
