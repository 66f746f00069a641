#!/bin/sh
# Runs inside the test host's mount and PID namespaces (entered with `nsenter -m -p` from
# outside, then `unshare -m`): builds the agent pod's filesystem as a DaemonSet pod would see
# it — its own root (the image: the host's /usr stands in for the image's userland, the agent
# binary from /var/lib/nixroll-e2e/image), the host's / at /host (hostPath, recursive),
# a /proc of the host's PID namespace (hostPID) — and starts the agent there.
# Usage: pod.sh PROGRAM ARGS…   (PROGRAM relative to the image directory)
set -eu
img=/var/lib/nixroll-e2e/image
new=/mnt
mount --make-rprivate /
mount -t tmpfs -o mode=0755 pod "$new"
mkdir -p "$new/host" "$new/proc" "$new/dev" "$new/tmp" "$new/usr" "$new/image" "$new/etc"
mount --rbind / "$new/host"
mount --bind -o ro /usr "$new/usr"
mount --bind -o ro "$img" "$new/image"
mount -t proc proc "$new/proc"
mount --rbind /dev "$new/dev"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$new/$d"; done
cp /etc/passwd /etc/group /etc/nsswitch.conf "$new/etc/" 2>/dev/null || true
cd /
prog="$1"
shift
# Detach: the agent's parent becomes the host's init (as a pod's process has containerd-shim,
# not the kubelet, for a parent). A parent outside the host's PID namespace (nsenter) would
# have to reap the agent when the host shuts down, and could block its shutdown.
setsid chroot "$new" "/image/$prog" "$@" </dev/null &
