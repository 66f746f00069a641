{
  description = "nixroll: roll NixOS flake revisions across the nodes of a k3s cluster, safely";

  # nixroll needs Rust >= 1.95 (Cargo.toml rust-version): a nixpkgs whose rustc is that new.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;

      # A managed k3s server as the module is meant to be used; the checks evaluate it.
      exampleNode =
        system:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            {
              nixpkgs.hostPlatform = system;
              networking.hostName = "server-1";
              services.nixroll = {
                enable = true;
                role = "server";
              };
              system.stateVersion = "25.05";
            }
          ];
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixroll = pkgs.callPackage ./nix/package.nix {
          inherit version;
          src = self;
        };
        default = nixroll;
        # The OCI image (docker-archive): `nix build .#image && skopeo copy docker-archive:result ...`
        image = pkgs.callPackage ./nix/image.nix { inherit nixroll; };
      });

      # For managed NixOS machines: imports = [ nixroll.nixosModules.default ];
      nixosModules.default = ./nix/module.nix;

      checks = forAllSystems (
        pkgs:
        let
          node = exampleNode pkgs.stdenv.hostPlatform.system;
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          image = self.packages.${pkgs.stdenv.hostPlatform.system}.image;
          # The module evaluates and builds into a whole system.
          module = node.config.system.build.toplevel;
          # The raw-efi image variant and the system rebuilt on the node agree on file systems
          # and bootloader (the nixos-generators #193 trap: the first rebuild after `dd` fails).
          image-agreement = pkgs.callPackage ./nix/image-agreement.nix { inherit node; };
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            kubectl
            kustomize
            nix
            git
            e2fsprogs
            dosfstools
            util-linux
            skopeo
            umoci
          ];
        };
      });
    };
}
