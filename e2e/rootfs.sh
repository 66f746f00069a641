#!/bin/sh
# Build (once) the base root filesystem of the e2e test host: Debian bookworm (minbase) with a
# real systemd, dbus, Debian's nix-bin and git. Prints its path. Cached under
# $NIXROLL_E2E_CACHE (default /var/cache/nixroll-e2e), keyed by suite and package list, so a
# repeated run costs nothing. The NixOS-like pieces (e2e/host/) are laid over it per test in
# an overlay, so changing them needs no new debootstrap.
set -eu
cache=${NIXROLL_E2E_CACHE:-/var/cache/nixroll-e2e}
suite=bookworm
# libdbi-perl: provides perl-dbdabi-94, a virtual dependency of nix-bin that debootstrap
# cannot resolve by itself.
packages=systemd,dbus,nix-bin,libdbi-perl,git,procps
key=$(printf '%s %s v1' "$suite" "$packages" | sha256sum | cut -c1-16)
root="$cache/rootfs-$key"
[ -e "$root/.complete" ] && { echo "$root"; exit 0; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 900 9
[ -e "$root/.complete" ] && { echo "$root"; exit 0; }
tmp="$cache/.build-$key"
rm -rf "$tmp"
mkdir -p "$tmp"
mkdir -p "$cache/debs"
if ! debootstrap --cache-dir="$cache/debs" --variant=minbase --include="$packages" "$suite" "$tmp" \
  "${NIXROLL_E2E_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1; then
  tail -20 "$cache/debootstrap.log" >&2
  exit 1
fi
# debootstrap can finish with packages left unconfigured: check what the tests rely on.
for p in systemd dbus nix-bin git; do
  st=$(chroot "$tmp" dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$st" = "install ok installed" ] || { echo "rootfs: $p is not installed ($st)" >&2; exit 1; }
done
rm -rf "$tmp/var/cache/apt/archives/"*.deb
touch "$tmp/.complete"
mv "$tmp" "$root"
echo "$root"
