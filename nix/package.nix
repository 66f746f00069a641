# The nixroll binary, built from this repository with the committed Cargo.lock.
{
  lib,
  rustPlatform,
  version,
  src,
}:
rustPlatform.buildRustPackage {
  pname = "nixroll";
  inherit version;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../benches
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;
  # The test suite needs kubectl, Nix and disk tools and is run by CI (`cargo test`), not here.
  doCheck = false;
  meta = {
    description = "Kubernetes operator that rolls NixOS flake revisions across k3s nodes";
    homepage = "https://github.com/nixroll/nixroll";
    license = lib.licenses.asl20;
    mainProgram = "nixroll";
    platforms = lib.platforms.linux;
  };
}
