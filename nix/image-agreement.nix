# Fails evaluation when the raw-efi image of a node and the system that node rebuilds into
# disagree on the root and boot file systems or on the bootloader. That disagreement is what
# made the first `nixos-rebuild` after `dd` fail with nixos-generators (#193).
{
  lib,
  runCommand,
  node,
}:
let
  base = node.config;
  image = (node.extendModules { modules = [ base.image.modules.raw-efi ]; }).config;
  layout = c: {
    root = {
      inherit (c.fileSystems."/") device fsType;
    };
    boot = {
      inherit (c.fileSystems."/boot") device fsType;
    };
    systemd-boot = c.boot.loader.systemd-boot.enable;
    grub = c.boot.loader.grub.enable;
  };
  same = layout base == layout image;
  json = builtins.toJSON (layout base);
in
assert lib.assertMsg same ''
  The raw-efi image and the rebuilt system disagree:
    system: ${builtins.toJSON (layout base)}
    image:  ${builtins.toJSON (layout image)}
'';
runCommand "nixroll-image-agreement" { } ''
  echo '${json}' > $out
''
