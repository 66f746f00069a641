#!/usr/bin/env bash
# Build the nixroll OCI image on this machine, without a container daemon and without pulling
# anything, then check it:
#
#   image/build.sh [OUT]          OUT defaults to target/image
#
# Environment: TARGETARCH (amd64 | arm64, default amd64), NIXROLL_BIN (use this binary instead
# of building one; it must be static), BUSYBOX (a static busybox instead of Debian's
# busybox-static of TARGETARCH), CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt),
# CHECK_KUBECONFIG (also run `nixroll status` from the image, on the host network, against the
# API server this kubeconfig names, e.g. the one `nixroll demo --hold` prints).
#
# Steps: (1) nixroll as a static glibc binary (release, `-C target-feature=+crt-static`);
# (2) busybox-static as nsenter; (3) `buildah build` of image/Containerfile, pushed to an OCI
# layout OUT/oci (tag = crate version) and an archive OUT/nixroll-<version>-<arch>.oci.tar;
# (4) checks: skopeo inspect (architecture, user, entrypoint, labels), umoci unpack, then
# `nixroll --version` and `nsenter -F nixroll --version` run from the image by runc as user 65532 (by chroot
# if runc is missing or cannot run here, and the script says so).
# Debian packages: buildah skopeo umoci runc busybox-static (or BUSYBOX), a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-target/image}")
arch=${TARGETARCH:-amd64}
case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu; deb_arch=amd64 ;;
  arm64) triple=aarch64-unknown-linux-gnu; deb_arch=arm64 ;;
  *) echo "unsupported TARGETARCH $arch (amd64, arm64)" >&2; exit 2 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
image=ghcr.io/nixroll/nixroll:$version
for tool in buildah skopeo umoci; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install buildah skopeo umoci runc)" >&2; exit 1; }
done

ctx=$out/context
rm -rf "$ctx" "$out/oci" "$out/bundle"
mkdir -p "$ctx/dist/linux/$arch"
cp image/Containerfile "$ctx/Containerfile"

# (1) nixroll, static.
if [ -n "${NIXROLL_BIN:-}" ]; then
  bin=$NIXROLL_BIN
else
  echo "== cargo build --release --target $triple (static)"
  start=$(date +%s)
  RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$root/target/static" \
    cargo build --release --locked --target "$triple" --bin nixroll
  echo "   built in $(( $(date +%s) - start )) s"
  bin=$root/target/static/$triple/release/nixroll
fi
if file -L "$bin" | grep -q 'dynamically linked'; then
  echo "$bin is dynamically linked; the image has no libc" >&2; exit 1
fi
cp "$bin" "$ctx/dist/linux/$arch/nixroll"
# Symbols are not needed at run time (28 MB -> about half).
if command -v strip >/dev/null; then strip "$ctx/dist/linux/$arch/nixroll"; fi

# (2) nsenter = busybox-static.
if [ -n "${BUSYBOX:-}" ]; then
  cp "$BUSYBOX" "$ctx/dist/linux/$arch/nsenter"
else
  deb=$(mktemp -d)
  (cd "$deb" && apt-get download "busybox-static:$deb_arch" >/dev/null)
  dpkg-deb -x "$deb"/busybox-static_*.deb "$deb/x"
  cp "$deb/x/bin/busybox" "$ctx/dist/linux/$arch/nsenter"
  rm -rf "$deb"
fi

# CA bundle (arch-independent).
cp "${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/dist/ca-certificates.crt"

# (3) The image, from the Containerfile. Storage stays under OUT (vfs: no overlay mounts).
store=(--root "$out/storage" --runroot "$out/run" --storage-driver vfs)
echo "== buildah build $image ($arch)"
buildah "${store[@]}" build --quiet --platform "linux/$arch" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  -f "$ctx/Containerfile" -t "$image" "$ctx"
buildah "${store[@]}" push --quiet "$image" "oci:$out/oci:$version"
rm -f "$out/nixroll-$version-$arch.oci.tar"
buildah "${store[@]}" push --quiet "$image" "oci-archive:$out/nixroll-$version-$arch.oci.tar:$version"

# (4) Checks.
echo "== skopeo inspect"
skopeo inspect --config "oci:$out/oci:$version" > "$out/config.json"
skopeo inspect "oci:$out/oci:$version" > "$out/inspect.json"
python3 - "$out" "$arch" "$version" <<'PY'
import json, sys
out, arch, version = sys.argv[1:]
cfg = json.load(open(f"{out}/config.json"))
ins = json.load(open(f"{out}/inspect.json"))
c = cfg["config"]
checks = {
    "architecture": cfg["architecture"] == arch,
    "os": cfg["os"] == "linux",
    "user 65532": c.get("User") == "65532:65532",
    "entrypoint": c.get("Entrypoint") == ["/bin/nixroll"],
    "version label": c["Labels"].get("org.opencontainers.image.version") == version,
    "source label": c["Labels"].get("org.opencontainers.image.source", "").startswith("https://"),
    "one layer": len(ins["Layers"]) == 1,
}
for k, ok in checks.items():
    print(f"   {'ok  ' if ok else 'FAIL'} {k}")
if not all(checks.values()):
    sys.exit(1)
PY
echo "== umoci unpack"
umoci unpack --image "$out/oci:$version" "$out/bundle" >/dev/null
files=$(cd "$out/bundle/rootfs" && find . -type f | sort | tr '\n' ' ')
echo "   files: $files"
[ "$files" = "./bin/nixroll ./bin/nsenter ./etc/ssl/certs/ca-certificates.crt " ] || { echo "unexpected files in the image" >&2; exit 1; }

echo "== run from the image"
run_in_image() { # args...: run the image's process with these args; prints its stdout
  local name=nixroll-build-$$-$RANDOM
  python3 - "$out/bundle/config.json" "$@" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
c = json.load(open(path))
c["process"]["args"] = args
c["process"]["terminal"] = False
json.dump(c, open(path, "w"))
PY
  if command -v runc >/dev/null && (cd "$out/bundle" && runc run "$name" 2>"$out/runc.err"); then
    echo "   (runc, user $(python3 -c "import json;p=json.load(open('$out/bundle/config.json'))['process']['user'];print(p['uid'])"))" >&2
  else
    echo "   runc could not run the bundle here ($(tail -n1 "$out/runc.err" 2>/dev/null)); using chroot" >&2
    chroot --userspec=65532:65532 "$out/bundle/rootfs" "$@"
  fi
}
got=$(run_in_image /bin/nixroll --version)
echo "   /bin/nixroll --version: $got"
[ "$got" = "nixroll $version" ] || { echo "expected 'nixroll $version'" >&2; exit 1; }
# nsenter runs and execs its program (entering namespaces needs the agent's privileges).
got=$(run_in_image /bin/nsenter -F /bin/nixroll --version)
echo "   /bin/nsenter -F /bin/nixroll --version: $got"
[ "$got" = "nixroll $version" ] || { echo "nsenter does not run" >&2; exit 1; }
if [ -n "${CHECK_KUBECONFIG:-}" ]; then
  python3 - "$out/bundle/config.json" "$(realpath "$CHECK_KUBECONFIG")" <<'PY'
import json, sys
path, kubeconfig = sys.argv[1:]
c = json.load(open(path))
c["process"]["env"] = ["PATH=/bin", "KUBECONFIG=/kubeconfig"]
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["mounts"].append({"destination": "/kubeconfig", "type": "bind", "source": kubeconfig, "options": ["rbind", "ro"]})
json.dump(c, open(path, "w"))
PY
  echo "   /bin/nixroll status against $CHECK_KUBECONFIG:"
  run_in_image /bin/nixroll status | sed 's/^/     /'
fi
echo "== $image: $out/oci (OCI layout), $out/nixroll-$version-$arch.oci.tar"
