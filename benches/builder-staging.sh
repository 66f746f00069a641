#!/usr/bin/env bash
# Node-side cost of staging one revision, with and without a builder (docs/builder.md,
# "Benchmark"): real Nix, one fresh node store per run.
#
#   without: the node evaluates the flake and builds its system itself
#            (`nix build <flake>?rev=…#nixosConfigurations.node.config.system.build.toplevel`);
#   with:    the node realises the builder's store path from the builder's signed binary cache,
#            with the options the agent uses (src/nix/substitute.rs: require-sigs, the builder's
#            key only, no remote builders, max-jobs 0).
#
# Reports the peak RSS (`/usr/bin/time` %M) and wall time of the node's `nix` process per run,
# then min / median / max. Needs nix (2.8+), git, python3 (serves the cache), /usr/bin/time.
#
#   benches/builder-staging.sh [RUNS] [PARTS] [PART_KIB] [EVAL_N]
#
# The stand-in system is a flake without inputs (no nixpkgs here: offline), PARTS store paths
# of PART_KIB random bytes each joined by builtin:buildenv. Its evaluation is tiny unless
# EVAL_N > 0: then evaluating it also builds and sums a list of EVAL_N strings (a stand-in for
# the NixOS module system's evaluation, which takes 1-2 GiB; the node with a builder never
# evaluates, so its figures do not depend on EVAL_N).
set -euo pipefail
RUNS=${1:-5}
PARTS=${2:-20}
PART_KIB=${3:-1024}
EVAL_N=${4:-0}
nixf=(--extra-experimental-features 'nix-command flakes' --option substituters '')
tmp=$(mktemp -d)
cleanup() { [ -n "${server:-}" ] && kill "$server" 2>/dev/null; chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
store() { echo "local?root=$tmp/$1"; }

# The flake: PARTS parts + a buildenv toplevel, in a git repository.
mkdir -p "$tmp/flake/system"
for i in $(seq 1 "$PARTS"); do
  mkdir -p "$tmp/flake/system/part-$i"
  head -c "$((PART_KIB * 1024))" /dev/urandom >"$tmp/flake/system/part-$i/data-$i"
done
system=$(nix "${nixf[@]}" eval --impure --raw --expr builtins.currentSystem)
cat >"$tmp/flake/flake.nix" <<NIX
{
  outputs = { self }:
    let
      sys = ./system;
      names = builtins.attrNames (builtins.readDir sys);
      part = n: builtins.path { path = sys + "/\${n}"; name = n; };
      load = builtins.foldl' (a: s: a + builtins.stringLength s) 0
        (builtins.genList (i: "option-\${toString i}") $EVAL_N);
    in {
      nixosConfigurations.node.config.system.build.toplevel = derivation {
        name = "nixos-system-node";
        system = "$system";
        builder = "builtin:buildenv";
        derivations = builtins.concatMap (n: [ "true" "5" "1" (part n) ]) names;
        manifest = builtins.toFile "manifest.nix" "[ ]";
        evaluated = toString load;
      };
    };
}
NIX
git -C "$tmp/flake" init -q
git -C "$tmp/flake" add -A
git -C "$tmp/flake" -c user.name=bench -c user.email=bench@example.org commit -qm bench
rev=$(git -C "$tmp/flake" rev-parse HEAD)
inst="git+file://$tmp/flake?rev=$rev#nixosConfigurations.node.config.system.build.toplevel"

# The builder: build once, sign, publish as a binary cache over HTTP.
nix-store --generate-binary-cache-key bench-builder-1 "$tmp/sk" "$tmp/pk"
path=$(NIX_REMOTE=$(store builder) nix "${nixf[@]}" build --no-link --json "$inst" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["outputs"]["out"])')
NIX_REMOTE=$(store builder) nix "${nixf[@]}" store sign --key-file "$tmp/sk" -r "$path"
NIX_REMOTE=$(store builder) nix "${nixf[@]}" copy --to "file://$tmp/cache" "$path"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$tmp/cache" >/dev/null 2>&1 &
server=$!
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port/nix-cache-info" >/dev/null 2>&1 && break; sleep 0.1; done
closure=$(NIX_REMOTE=$(store builder) nix "${nixf[@]}" path-info -S "$path" | awk '{print $2}')
echo "system $path, closure $((closure / 1024)) KiB, evaluation load $EVAL_N; $RUNS runs; nix $(nix --version | awk '{print $3}')"

measure() { # label, store, nix args… → "KiB seconds"
  local label=$1 st=$2; shift 2
  /usr/bin/time -f '%M %e' -o "$tmp/time" env NIX_REMOTE="$st" nix "$@" >/dev/null 2>"$tmp/err" ||
    { echo "$label failed:" >&2; cat "$tmp/err" >&2; exit 1; }
  cat "$tmp/time"
}
stats() { sort -n | awk '{a[NR]=$1} END {printf "min %s  median %s  max %s", a[1], a[int((NR+1)/2)], a[NR]}'; }
: >"$tmp/without"; : >"$tmp/with"
for i in $(seq 1 "$RUNS"); do
  w=$(measure without "$(store "own-$i")" "${nixf[@]}" build --no-link --json "$inst")
  f=$(measure with "$(store "fetch-$i")" --extra-experimental-features 'nix-command flakes' \
      --option substituters "http://127.0.0.1:$port" --option trusted-public-keys "$(cat "$tmp/pk")" \
      --option require-sigs true --option narinfo-cache-negative-ttl 0 --option narinfo-cache-positive-ttl 0 \
      --option builders '' --option max-jobs 0 build --no-link --json "$path")
  echo "run $i  without builder: ${w% *} KiB ${w#* } s   with builder: ${f% *} KiB ${f#* } s"
  echo "$w" >>"$tmp/without"; echo "$f" >>"$tmp/with"
done
echo "peak RSS of the node's nix (KiB)   without: $(cut -d' ' -f1 "$tmp/without" | stats)"
echo "                                   with:    $(cut -d' ' -f1 "$tmp/with" | stats)"
echo "wall time (s)                      without: $(cut -d' ' -f2 "$tmp/without" | stats)"
echo "                                   with:    $(cut -d' ' -f2 "$tmp/with" | stats)"
