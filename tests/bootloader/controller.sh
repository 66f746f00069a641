#!/bin/sh
# The real-bootloader test's stand-in for the controller (docs/bootloader.md), run by
# stage 2 of every bootable system of the guest. One step per boot, kept in
# /var/lib/nixroll-test/step; each step runs the unchanged agent host logic
# (`nixroll host-step`: reconcile, with the grant the controller would give) and prints its
# report and what systemd-boot says. The steps:
# The agent reboots through `controller.sh reboot`, which first prints what the bootloader
# will start (the one-shot entry set, the default unchanged).
#   0  on the old system: grant Boot of the system that panics (boot once, reboot)
#      -> that system panics, `panic=1` resets the machine, systemd-boot starts the default
#   1  back on the old system: report (RolledBack); grant Boot of the good system
#   2  on the good system (booted once): report; grant Bless (it becomes the default); reboot
#   3  on the good system (now the default): report; power off
export PATH=/bin:/usr/bin:/usr/sbin
export SYSTEMD_RELAX_ESP_CHECKS=1
export RUST_LOG=info
state=/var/lib/nixroll-test
mkdir -p "$state"
step=$(cat "$state/step" 2>/dev/null || echo 0)
old=$(cat /nixroll-guest/old)
bad=$(cat /nixroll-guest/bad)
good=$(cat /nixroll-guest/good)
say() { echo "nixroll-guest: $*"; }
# The Boot Loader Interface's EFI variables (systemd-boot sets LoaderEntrySelected to the
# entry it started; `bootctl set-oneshot` sets LoaderEntryOneShot, which systemd-boot removes
# when it boots it) and loader.conf's default: UTF-16 after 4 bytes of attributes.
efivar() {
  f=/sys/firmware/efi/efivars/$1-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
  if [ -e "$f" ]; then tail -c +5 "$f" | tr -d '\000'; else echo "-"; fi
}
# GRUB: grubenv's next_entry (what grub-reboot sets, cleared by grub.cfg when it boots it)
# and the system of entry 0, the default.
loader() {
  if [ -e /boot/grub/grub.cfg ]; then
    next=$(grub-editenv /boot/grub/grubenv list | sed -n 's/^next_entry=//p')
    say "loader next_entry=${next:--} default=$(sed -n 's|.* init=\([^ ]*\)/init .*|\1|p' /boot/grub/grub.cfg | head -n 1)"
  else
    say "loader selected=$(efivar LoaderEntrySelected) oneshot=$(efivar LoaderEntryOneShot) default=$(sed -n 's/^default //p' /boot/loader/loader.conf)"
  fi
}
bootctl_list() {
  [ -e /boot/grub/grub.cfg ] || say "bootctl-list $(bootctl list --json=short --no-pager 2>&1 | tr '\n' ' ')"
}
# The agent's reboot command: what the bootloader will do, then reboot.
if [ "${1:-}" = reboot ]; then
  exec >/dev/console 2>&1
  say "reboot"
  loader
  sync
  exec reboot -f
fi
step_to() { echo "$1" > "$state/step.tmp" && mv "$state/step.tmp" "$state/step" && sync; }
host_step() {
  say "report $(nixroll host-step --reboot-command "/bin/sh /nixroll-guest/controller.sh reboot" "$@" 2>/dev/console)"
}
say "step $step"
loader
bootctl_list
host_step
case "$step" in
  0)
    step_to 1
    host_step --grant "boot-bad:Boot:$bad"
    ;;
  1)
    step_to 2
    host_step --grant "boot-good:Boot:$good"
    ;;
  2)
    step_to 3
    host_step --grant "bless-good:Bless:$good"
    loader
    sync
    reboot -f
    ;;
  3)
    step_to done
    say "done"
    ;;
esac
loader
say "no reboot: power off"
sync
poweroff -f
