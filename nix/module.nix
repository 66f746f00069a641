# NixOS module for machines managed by nixroll (k3s nodes whose system the nixroll agent
# stages, switches and reboots). Import it in every node's configuration:
#
#   imports = [ nixroll.nixosModules.default ];
#   services.nixroll = { enable = true; role = "agent"; serverAddr = "https://server-1:6443"; };
#
# What it sets, and why:
# * k3s, with the node label nixroll.io/managed=true: the agent DaemonSet runs only on
#   nodes with that label (deploy/agent.yaml). k3s applies --node-label when the node
#   registers; on an already registered node also run `kubectl label node NAME
#   nixroll.io/managed=true`.
# * The k3s token is read at runtime from `tokenFile`, a string path: a Nix path literal would
#   copy the secret into the world-readable store. `nixroll image inject` writes it there.
# * What the agent runs on the host, through nsenter into PID 1's namespaces: `nix` (build
#   and pin the target system), `nix-env` (set the system profile), the target's
#   switch-to-configuration, `systemd-run` and `systemctl reboot`; it reads
#   /run/booted-system, /run/current-system and the boot id. Nix needs `git` on PATH to fetch
#   git+https / git+ssh flakes; flakes are enabled for admins too (the agent passes the
#   flag itself).
# * Getting back without a human (boot once, bless later, docs/agent.md): the agent boots a
#   new generation once and makes it the default only after it was verified. A new kernel
#   that panics must reset the machine (`panic=N`), a stage 1 that cannot find its root must
#   panic instead of waiting at a shell (`boot.panic_on_fail`), and a system that hangs must be
#   reset by the hardware watchdog (systemd.watchdog.runtimeTime): the next boot then starts
#   the old default by itself. `panicTimeout` and `watchdog` set these (null: not set).
#   `boot.panic_on_fail` works with both initrds (read in nixpkgs, docs/bootloader.md): the
#   scripted stage 1 (nixos/modules/system/boot/stage-1-init.sh, `fail()`: "if [ -n
#   "$panicOnFail" ]; then exit 1; fi", PID 1 exits, the kernel panics) and the systemd stage 1
#   (nixos/modules/system/boot/systemd/initrd.nix, `panic-on-fail.service`: wanted by
#   emergency.target, conditioned on boot.panic_on_fail or stage1panic, writes `c` to
#   /proc/sysrq-trigger); with `panic=N` either resets the machine instead of waiting at an
#   emergency shell (whether or not `boot.initrd.systemd.emergencyAccess` opens that shell:
#   the unit runs beside it). An assertion refuses a systemd initrd without that unit (older
#   nixpkgs, or disabled).
# * No competing updater: system.autoUpgrade (it would make a new generation the boot default
#   before any drain) is forced off.
# * The file systems and bootloader of NixOS's raw-efi image (ext4 root labelled `nixos`,
#   vfat ESP labelled `ESP` at /boot, systemd-boot): a machine installed by `dd` of that image
#   rebuilds into a system with the same layout, so the first rollout after `dd` works
#   (nixos-generators #193). A hardware configuration that says otherwise is a conflicting
#   definition, an evaluation error in CI, not a failed boot on the node. Set
#   `imageLayout = "none"` for machines installed another way.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixroll;
  managedLabel = "nixroll.io/managed=true";
in
{
  options.services.nixroll = {
    enable = lib.mkEnableOption "management of this k3s node by nixroll";

    role = lib.mkOption {
      type = lib.types.enum [
        "server"
        "agent"
      ];
      default = "agent";
      description = "k3s role of this node. nixroll never disrupts two servers at once.";
    };

    serverAddr = lib.mkOption {
      type = lib.types.str;
      default = "";
      example = "https://server-1:6443";
      description = "k3s server to join; empty on the first server.";
    };

    clusterInit = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Initialise an embedded etcd cluster (the first of several servers).";
    };

    tokenFile = lib.mkOption {
      # A string, never a path: a path would be copied into the Nix store.
      type = lib.types.str;
      default = "/var/lib/nixroll/secrets/k3s-token";
      description = ''
        File holding the k3s join token, read by k3s at runtime. Written outside the store
        (by `nixroll image inject`, or by hand); must not be a store path.
      '';
    };

    nodeLabels = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = {
        "topology.kubernetes.io/zone" = "rack-1";
      };
      description = "More node labels passed to k3s (--node-label); nixroll.io/managed=true is always set.";
    };

    panicTimeout = lib.mkOption {
      type = lib.types.nullOr lib.types.ints.positive;
      default = 10;
      description = ''
        Seconds after a kernel panic before the machine resets itself (kernel parameter
        `panic=N`), and `boot.panic_on_fail` (stage 1 panics instead of opening a shell when
        it cannot mount the root; with the scripted initrd and with the systemd initrd, whose
        `panic-on-fail.service` must then exist and be enabled). With nixroll's boot-once the next boot is the old default,
        so a new kernel that panics costs one reset, not a visit with a keyboard. null: leave
        both unset.
      '';
    };

    watchdog = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "30s";
      example = "1min";
      description = ''
        `systemd.watchdog.runtimeTime`: systemd arms the hardware watchdog with this timeout
        and pings it while it runs; a system that hangs (not a panic) is reset, and the next
        boot is the old default. Machines without a watchdog device (`/dev/watchdog0`; many
        SBCs and VMs, unless the kernel module of their watchdog is loaded) are not reset: a
        hung boot then waits for the reboot timeout, the node is Degraded (RebootTimeout) and
        needs a power cycle, after which it boots the old default (the new one was booted
        once only). null: leave it unset.
      '';
    };

    imageLayout = lib.mkOption {
      type = lib.types.enum [
        "raw-efi"
        "none"
      ];
      default = "raw-efi";
      description = ''
        "raw-efi": declare the root and boot file systems and the bootloader exactly as NixOS's
        raw-efi image has them (by-label nixos ext4, by-label ESP vfat at /boot,
        systemd-boot). "none": leave them to your own configuration.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = lib.hasPrefix "/" cfg.tokenFile && !(lib.hasPrefix builtins.storeDir cfg.tokenFile);
            message = "services.nixroll.tokenFile must be an absolute path outside the Nix store, got ${cfg.tokenFile}";
          }
          {
            # A failed systemd stage 1 reaches emergency.target; only nixpkgs' panic-on-fail
            # unit turns that into a panic (and `panic=N` into a reset) instead of a shell
            # waiting for a keyboard.
            assertion =
              cfg.panicTimeout == null
              || !config.boot.initrd.systemd.enable
              || (
                config.boot.initrd.systemd.services ? "panic-on-fail"
                && config.boot.initrd.systemd.services."panic-on-fail".enable
              );
            message = "services.nixroll.panicTimeout needs boot.initrd.systemd.services.panic-on-fail (nixpkgs' systemd initrd turns a failed stage 1 into a kernel panic with it); this nixpkgs has none or it is disabled. Enable it, use the scripted initrd, or set services.nixroll.panicTimeout = null.";
          }
          {
            assertion = lib.versionAtLeast config.services.k3s.package.version "1.32";
            message = "nixroll's agent admission policy needs Kubernetes 1.32+ (node-bound service-account tokens); services.k3s.package is ${config.services.k3s.package.version}";
          }
        ];

        services.k3s = {
          enable = true;
          role = cfg.role;
          tokenFile = cfg.tokenFile;
          serverAddr = cfg.serverAddr;
          clusterInit = cfg.clusterInit;
          extraFlags = [
            "--node-label=${managedLabel}"
          ]
          ++ lib.mapAttrsToList (k: v: "--node-label=${k}=${v}") cfg.nodeLabels;
        };

        # What the agent runs on the host.
        nix.settings.experimental-features = [
          "nix-command"
          "flakes"
        ];
        # grub-reboot (boot once on GRUB); systemd-boot's bootctl is in every system.
        environment.systemPackages = [
          pkgs.git
        ]
        ++ lib.optional config.boot.loader.grub.enable pkgs.grub2;

        # Back to the old default without a human when a new generation fails to boot.
        boot.kernelParams = lib.optionals (cfg.panicTimeout != null) [
          "panic=${toString cfg.panicTimeout}"
          "boot.panic_on_fail"
        ];
        systemd.watchdog.runtimeTime = lib.mkIf (cfg.watchdog != null) cfg.watchdog;

        # Competing updaters off.
        system.autoUpgrade.enable = lib.mkForce false;

        # The agent's state (boot id before a reboot, GC roots of staged systems).
        systemd.tmpfiles.rules = [
          "d /var/lib/nixroll 0700 root root -"
          "d /var/lib/nixroll/secrets 0700 root root -"
        ];
      }

      (lib.mkIf (cfg.imageLayout == "raw-efi") {
        fileSystems."/" = {
          device = "/dev/disk/by-label/nixos";
          fsType = "ext4";
          autoResize = true;
        };
        fileSystems."/boot" = {
          device = "/dev/disk/by-label/ESP";
          fsType = "vfat";
        };
        boot.growPartition = true;
        boot.loader.systemd-boot.enable = true;
        boot.loader.grub.enable = false;
        # A disk written with `dd` has no NVRAM entry of its own: boot through the removable
        # fallback path that bootctl installs, without touching EFI variables.
        boot.loader.efi.canTouchEfiVariables = false;
      })
    ]
  );
}
