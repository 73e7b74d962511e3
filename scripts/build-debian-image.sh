#!/usr/bin/env bash
# Build a full Debian 12 raw image (ext4, systemd, a kernel inside) for manual runs:
#   sudo bash scripts/build-debian-image.sh debian12.raw [SIZE]
# Boot it through virtman with the kernel given to QEMU, as the bundled trace was made:
#   virtman vm create vm1 --image debian12 --start --kernel /boot/vmlinuz-* \
#       --initrd /boot/initrd.img-* --append "root=/dev/vda rw console=ttyS0"
set -euo pipefail
OUT=${1:?usage: build-debian-image.sh OUT.raw [SIZE]}
SIZE=${2:-4G}
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=systemd-sysv,udev,kmod,iproute2 bookworm "$ROOT"
echo "virtman-debian" > "$ROOT/etc/hostname"
echo "/dev/vda / ext4 defaults 0 1" > "$ROOT/etc/fstab"
chroot "$ROOT" passwd -d root
truncate -s "$SIZE" "$OUT"
mkfs.ext4 -q -F -L virtman-debian -d "$ROOT" "$OUT"
echo "built $OUT ($SIZE)"
