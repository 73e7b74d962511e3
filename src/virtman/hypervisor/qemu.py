"""Hypervisor glue: an unmodified QEMU on a VM's snapshot export, and the same as libvirt XML.

QEMU opens the VM's NBD export itself (``-drive file=nbd+unix:///VM?socket=…``), so no
block device ever appears on the host. KVM is used when ``/dev/kvm`` actually creates a
VM (the device can exist and still be unusable, as on this project's machines);
otherwise TCG. The serial console goes to a log file that ``virtman vm console`` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from virtman.errors import ConfigError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_CREATE_VCPU = 0xAE41
#: Seconds a guest gets to exit after SIGTERM before it is killed.
GUEST_STOP_GRACE_SECONDS = 5.0


@dataclass
class GuestConfig:
    """How to start a guest. Images with a bootloader inside need no kernel."""

    memory_mib: int = 512
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None

    def __post_init__(self) -> None:
        if self.memory_mib < 16:
            raise ConfigError(f"guest memory {self.memory_mib} MiB is too small")
        if self.cpus < 1:
            raise ConfigError(f"guest cpus {self.cpus} must be at least 1")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"guest {what} {path!r} is not a file")
        if (self.initrd or self.append) and not self.kernel:
            raise ConfigError("--initrd and --append need --kernel")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GuestConfig:
        return cls(**doc)


def kvm_usable() -> bool:
    """True only if /dev/kvm opens and creates a VM (a present device may not)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0) != 12:
            return False
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        try:
            os.close(fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0))
        finally:
            os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


#: Seconds the KVM probe gives a guest's firmware to say it runs.
KVM_PROBE_SECONDS = 3.0


@functools.lru_cache(maxsize=1)
def accelerator() -> str:
    """``kvm`` if a KVM guest really executes here, else ``tcg``.

    ``/dev/kvm`` can pass every ioctl check and still be unusable (on this project's
    machines QEMU aborts setting an MSR with ``-cpu host``, and hangs without it). So the
    probe runs QEMU itself with no disk for a few seconds and looks for the first words
    of its firmware on the debug port; only then is KVM chosen.
    """
    if not kvm_usable() or shutil.which(QEMU) is None:
        return "tcg"
    with tempfile.TemporaryDirectory(prefix="virtman-kvm-") as tmp:
        log_path = os.path.join(tmp, "firmware.log")
        argv = [QEMU, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "64", "-nodefaults",
                "-display", "none", "-no-reboot", "-chardev", f"file,id=fw,path={log_path}",
                "-device", "isa-debugcon,iobase=0x402,chardev=fw"]
        try:
            subprocess.run(argv, capture_output=True, timeout=KVM_PROBE_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            pass  # a working guest runs until killed: what it printed decides
        try:
            with open(log_path, "rb") as f:
                started = b"SeaBIOS" in f.read(4096)
        except OSError:
            started = False
    if not started:
        log.info("/dev/kvm is present but a KVM guest does not run here: using TCG")
    return "kvm" if started else "tcg"


def qemu_argv(
    name: str, disk_uri: str, cfg: GuestConfig, serial_log: str, accel: str | None = None
) -> list[str]:
    """The QEMU command line of a guest booting from its NBD export."""
    accel = accel or accelerator()
    argv = [
        QEMU,
        "-name",
        name,
        "-machine",
        f"pc,accel={accel}",
        "-m",
        str(cfg.memory_mib),
        "-smp",
        str(cfg.cpus),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{serial_log}",
        "-drive",
        f"file={disk_uri},format=raw,if=virtio,cache=none,aio=threads",
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if cfg.kernel:
        argv += ["-kernel", cfg.kernel]
        if cfg.initrd:
            argv += ["-initrd", cfg.initrd]
        if cfg.append:
            argv += ["-append", cfg.append]
    return argv


def domain_xml(
    name: str,
    export: str,
    socket_path: str,
    cfg: GuestConfig,
    serial_log: str,
    accel: str | None = None,
) -> str:
    """A libvirt domain for ``virsh define``: the same guest, its disk the NBD export."""
    accel = accel or accelerator()
    domain_type = "kvm" if accel == "kvm" else "qemu"
    boot = ""
    if cfg.kernel:
        boot = f"\n    <kernel>{escape(cfg.kernel)}</kernel>"
        if cfg.initrd:
            boot += f"\n    <initrd>{escape(cfg.initrd)}</initrd>"
        if cfg.append:
            boot += f"\n    <cmdline>{escape(cfg.append)}</cmdline>"
    else:
        boot = "\n    <boot dev='hd'/>"
    return f"""<domain type='{domain_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{cfg.memory_mib}</memory>
  <vcpu>{cfg.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>{boot}
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{escape(shutil.which(QEMU) or "/usr/bin/" + QEMU)}</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name={quoteattr(export)}>
        <host transport='unix' socket={quoteattr(socket_path)}/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(serial_log)}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(serial_log)}/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"""


class Guest:
    """One running QEMU. ``start()`` returns at once; ``wait()`` until the guest exits."""

    def __init__(self, name: str, argv: list[str], serial_log: str) -> None:
        self.name = name
        self.argv = argv
        self.serial_log = serial_log
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.stderr = ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    async def start(self) -> None:
        if shutil.which(self.argv[0]) is None:
            raise ConfigError(f"{self.argv[0]} is not installed (apt-get install qemu-system-x86)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.serial_log)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        log.info("guest %r started (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    async def wait(self) -> int:
        assert self.proc is not None
        _, err = await self.proc.communicate()
        rc = self.proc.returncode if self.proc.returncode is not None else -1
        self.returncode = rc
        self.stderr = err.decode(errors="replace").strip()
        log.info(
            "guest %r exited with status %s%s",
            self.name,
            self.returncode,
            f": {self.stderr[-300:]}" if rc else "",
        )
        return rc

    async def stop(self, grace: float = GUEST_STOP_GRACE_SECONDS) -> None:
        if not self.running or self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.returncode = self.proc.returncode
