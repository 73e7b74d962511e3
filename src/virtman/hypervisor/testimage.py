"""A bootable test image, built in seconds from Debian's packages, with no network.

The root file system is a small ext4 made with ``mkfs.ext4 -d`` from a directory holding
busybox (``busybox-static``) and an init script. It boots with the kernel and initrd of
Debian's ``linux-image-amd64`` (given to QEMU directly, ``root=/dev/vda``). The init
script mounts the usual file systems, writes the VM's name (``virtman.name=`` on the
kernel command line) to ``/vmname``, prints ``MARKER NAME`` on the serial console and
powers off, so a test can check what every guest did.

``scripts/build-debian-image.sh`` builds a full Debian 12 image with debootstrap for
manual runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass

from virtman.errors import ConfigError

MARKER = "VIRTMAN-GUEST-OK"
#: What a looping test guest (``virtman.loop=1``) prints with its counter, each
#: ``TICK_SECONDS``.
TICK = "VIRTMAN-TICK"
TICK_SECONDS = 0.2
#: Size of the generated root file system.
TEST_IMAGE_SIZE = "64M"
BUSYBOX_APPLETS = (
    "sh",
    "mount",
    "umount",
    "echo",
    "cat",
    "sync",
    "poweroff",
    "sed",
    "mkdir",
    "sleep",
    "ls",
)

INIT = f"""#!/bin/sh
# virtman test guest: record who we are, say so on the console, power off.
/bin/mount -t proc proc /proc
/bin/mount -t sysfs sys /sys
/bin/mount -t devtmpfs dev /dev 2>/dev/null
name=$(/bin/sed -n 's/.*virtman\\.name=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
echo "$name" > /vmname
/bin/sync
echo "{MARKER} $name"
/bin/sync
case " $(cat /proc/cmdline) " in
*" virtman.loop=1 "*)
    # A µVM's life: count on the console for ever, bringing hot-plugged CPUs and
    # memory online as they come, so a resumed guest shows it went on from where it
    # was saved and how big it is now.
    i=0
    while true; do
        for f in /sys/devices/system/cpu/cpu*/online /sys/devices/system/memory/memory*/online; do
            [ -f "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 > "$f" 2>/dev/null
        done
        i=$((i + 1))
        echo "{TICK} $i cpus=$(cat /sys/devices/system/cpu/online) $(sed -n 1p /proc/meminfo)"
        sleep {TICK_SECONDS}
    done;;
esac
/bin/poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    image: str
    kernel: str
    initrd: str

    def append(self, name: str, *, loop: bool = False) -> str:
        """Kernel command line of a test guest named ``name``; ``loop``: it counts on its
        console for ever instead of powering off, as a µVM to save and resume.

        A looping guest's kernel zeroes the pages it frees (``init_on_free=1``): the
        unpacked initrd it dropped is then zero pages, which a saved state records as
        flags, not bytes (measured: 242 MB of state without it, 68 MB with it).
        """
        line = f"root=/dev/vda rw console=ttyS0 init=/sbin/init panic=-1 quiet virtman.name={name}"
        return line + (" virtman.loop=1 init_on_free=1" if loop else "")


def find_kernel() -> tuple[str, str]:
    """The newest kernel and initrd in /boot (Debian's linux-image-amd64)."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    for kernel in reversed(kernels):
        initrd = kernel.replace("vmlinuz-", "initrd.img-")
        if os.path.exists(initrd) and os.access(kernel, os.R_OK):
            return kernel, initrd
    raise ConfigError("no kernel with an initrd in /boot: apt-get install linux-image-amd64")


def build_test_image(out_dir: str) -> GuestImage:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise ConfigError("busybox is missing: apt-get install busybox-static")
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise ConfigError("mkfs.ext4 is missing: apt-get install e2fsprogs")
    kernel, initrd = find_kernel()
    root = os.path.join(out_dir, "rootfs")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(root, d))
    shutil.copy2(busybox, os.path.join(root, "bin", "busybox"))
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    init = os.path.join(root, "sbin", "init")
    with open(init, "w", encoding="utf-8") as f:
        f.write(INIT)
    os.chmod(init, 0o755)
    image = os.path.join(out_dir, "test-guest.raw")
    result = subprocess.run(
        [mkfs, "-q", "-F", "-L", "virtman-test", "-d", root, image, TEST_IMAGE_SIZE],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigError(f"mkfs.ext4 failed: {result.stderr.strip()}")
    shutil.rmtree(root, ignore_errors=True)
    return GuestImage(image, kernel, initrd)
