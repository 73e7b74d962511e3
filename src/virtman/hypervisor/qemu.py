"""Hypervisor glue: an unmodified QEMU on a VM's snapshot export, and the same as libvirt XML.

QEMU opens the VM's NBD export itself (``-drive file=nbd+unix:///VM?socket=…``), so no
block device ever appears on the host. The serial console goes to a log file that
``virtman vm console`` shows.

Choosing the accelerator (theory of operation). ``/dev/kvm`` can pass every ioctl check
and even run the firmware, yet a Linux kernel under KVM prints nothing and spins for
ever (this project's machines; cloud VMs with nested virtualisation half enabled). So:

- ``Accel.AUTO`` picks KVM only after a *probe*: the kernel the guest will boot (or the
  host's test kernel when the guest boots from its disk) is booted under KVM with no
  disk, and KVM wins only if it prints its first console line within
  ``KVM_PROBE_SECONDS``. The verdict is cached in a JSON file keyed by the host's boot,
  the QEMU binary and the kernel (path, size, mtime), so a host probes each kernel once
  per boot; a lock file makes concurrent agents on one host probe it once.
- Every guest started under KVM, however chosen, is watched: if it exits with an error
  or prints nothing on its console within ``KVM_SILENCE_SECONDS``, it is stopped and
  started again under TCG, once, with one log line. A user never waits for ever.
- ``Accel.KVM`` and ``Accel.TCG`` are taken as given (no probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from virtman.childprocess import die_with_parent_hook
from virtman.errors import ConfigError, Conflict
from virtman.hypervisor.qmp import Monitor
from virtman.hypervisor.testimage import find_kernel
from virtman.limits import (
    GUEST_CONSOLE_POLL_SECONDS,
    GUEST_STOP_GRACE_SECONDS,
    KVM_PROBE_SECONDS,
    KVM_SILENCE_SECONDS,
    MEMORY_HOTPLUG_BLOCK_MIB,
)

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
#: Bytes of QEMU's stderr quoted in a log line or a reason.
_STDERR_TAIL = 300


class Accel(enum.Enum):
    """How QEMU runs a guest: ``AUTO`` is resolved to KVM or TCG before it starts."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class HypervisorSettings:
    """How this host starts guests. The CLI fills it; tests pass their own."""

    #: The QEMU binary (a path or a name on $PATH).
    qemu: str = QEMU
    accel: Accel = Accel.AUTO
    #: JSON file keeping the probe's verdicts; None keeps them in memory only.
    verdict_cache: str | None = None
    probe_seconds: float = KVM_PROBE_SECONDS
    kvm_silence_seconds: float = KVM_SILENCE_SECONDS
    console_poll_seconds: float = GUEST_CONSOLE_POLL_SECONDS
    stop_grace_seconds: float = GUEST_STOP_GRACE_SECONDS

    def __post_init__(self) -> None:
        for what, value in (
            ("probe_seconds", self.probe_seconds),
            ("kvm_silence_seconds", self.kvm_silence_seconds),
            ("console_poll_seconds", self.console_poll_seconds),
            ("stop_grace_seconds", self.stop_grace_seconds),
        ):
            if value <= 0:
                raise ConfigError(f"hypervisor {what} must be positive, not {value}")


def default_verdict_cache(env: dict[str, str]) -> str:
    """Where the probe's verdicts live: ``$XDG_CACHE_HOME/virtman/accel.json``."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "virtman", "accel.json")


def _one_line_tail(stderr: bytes) -> str:
    """The end of QEMU's stderr as one log-friendly line."""
    lines = (line.strip() for line in stderr.decode(errors="replace").splitlines())
    return " / ".join(line for line in lines if line)[-_STDERR_TAIL:]


def _kill_group(pid: int, sig: int) -> None:
    """Signal a guest's whole process session (QEMU, or a wrapper and what it runs)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- the probe and its verdicts -------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What ``Accel.AUTO`` resolves to on this host for one kernel, and why."""

    accel: Accel
    reason: str
    #: Seconds the probe took (0 when none ran).
    probe_seconds: float = 0.0


def probe_argv(qemu: str, kernel: str) -> list[str]:
    """QEMU booting ``kernel`` under KVM with no disk, its console on stdout."""
    return [
        qemu, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "128", "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", kernel, "-append", "console=ttyS0 panic=-1",
    ]  # fmt: skip


async def probe_kvm(qemu: str, kernel: str, limit: float) -> Verdict:
    """Boot ``kernel`` under KVM until its first console line, for at most ``limit`` s.

    The kernel has no root disk, so a working KVM would panic a little later; it is
    killed as soon as the line is out, at the limit, or when the caller is cancelled (a
    guest stopped while its host probes). It dies with this process too (a SIGKILLed
    agent must not leave a QEMU spinning under a broken KVM). Raises ``ConfigError`` if
    QEMU cannot be run at all.
    """
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *probe_argv(qemu, kernel),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),
        )
    except OSError as error:
        raise ConfigError(f"cannot run {qemu}: {error}") from error
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    exited = False
    err = b""
    try:
        while b"\n" not in out:
            left = started + limit - time.monotonic()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(proc.stdout.read(4096), left)
            except TimeoutError:
                break
            if not data:
                exited = True
                break
            out += data
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
        # Reaped even when cancelled: the kill is certain, so this wait is short.
        err = await asyncio.shield(_reap(proc))
    elapsed = time.monotonic() - started
    if b"\n" in out:
        line = out.split(b"\n", 1)[0].decode(errors="replace").strip()
        return Verdict(
            Accel.KVM,
            f"a Linux kernel under KVM printed its first console line in {elapsed:.1f} s "
            f"({line[:60]!r})",
            elapsed,
        )
    if exited:
        tail = _one_line_tail(err)
        return Verdict(
            Accel.TCG,
            f"QEMU under KVM exited with status {proc.returncode} before the kernel printed "
            f"a line: {tail or 'no message'}",
            elapsed,
        )
    return Verdict(
        Accel.TCG,
        f"a Linux kernel under KVM printed nothing on its console in {limit:g} s "
        "(/dev/kvm is present but does not run it)",
        elapsed,
    )


async def _reap(proc: asyncio.subprocess.Process) -> bytes:
    """Wait for a killed probe and return its stderr."""
    assert proc.stderr is not None
    err = await proc.stderr.read()
    await proc.wait()
    return err


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class VerdictCache:
    """The probe's verdicts in one JSON file, per host boot, QEMU binary and kernel.

    A key names the host, its boot (a reboot may change the KVM module or its nesting
    settings), and the QEMU binary and kernel by path, size and mtime, so replacing
    either probes again. The file is replaced atomically (a crash leaves the old one or
    the new one); an unreadable file counts as empty and is rewritten. Entries of
    earlier boots are dropped whenever one is added. Blocking, but for
    ``locked_async``: use the rest in a thread.
    """

    VERSION = 1

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def key(qemu: str, kernel: str) -> str:
        return (
            f"{socket.gethostname()} boot={_boot_id()} qemu={_file_identity(qemu)} "
            f"kernel={_file_identity(kernel)}"
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's lock file: one prober per host and kernel at a time."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.asynccontextmanager
    async def locked_async(self, poll: float = 0.05) -> AsyncIterator[None]:
        """``locked()`` for the event loop: polls the lock without blocking, so a caller
        cancelled while another process probes leaves no thread behind holding it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(poll)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("KVM verdict cache %s is unreadable (%s): probing again", self.path, err)
            return {}
        if not isinstance(doc, dict) or doc.get("version") != self.VERSION:
            return {}
        verdicts = doc.get("verdicts")
        return verdicts if isinstance(verdicts, dict) else {}

    def get(self, key: str) -> Verdict | None:
        entry = self._load().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Verdict(Accel(entry["accel"]), str(entry["reason"]), 0.0)
        except (TypeError, KeyError, ValueError):
            return None

    def put(self, key: str, verdict: Verdict) -> None:
        boot = f"boot={_boot_id()} "
        verdicts = {k: v for k, v in self._load().items() if boot in k}
        verdicts[key] = {
            "accel": verdict.accel.value,
            "reason": verdict.reason,
            "probe_seconds": round(verdict.probe_seconds, 3),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        fd, tmp = tempfile.mkstemp(prefix=".accel-", dir=os.path.dirname(self.path) or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": self.VERSION, "verdicts": verdicts}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class Hypervisor:
    """Starts guests on this host with an accelerator that runs them.

    Owns the verdicts of ``Accel.AUTO`` (in memory, and in the settings' cache file),
    so each is logged once per process with its reason.
    """

    def __init__(self, settings: HypervisorSettings | None = None) -> None:
        self.settings = settings or HypervisorSettings()
        self._verdicts: dict[str, Verdict] = {}
        self._lock = asyncio.Lock()

    def guest(
        self, name: str, disk_uri: str, cfg: GuestConfig, serial_log: str,
        accel: Accel | None = None, *, qmp_socket: str | None = None, incoming: bool = False,
    ) -> Guest:  # fmt: skip
        """A guest (not started yet); ``accel`` None means this host's setting."""
        return Guest(name, disk_uri, cfg, serial_log, self, accel,
                     qmp_socket=qmp_socket, incoming=incoming)

    async def resolve(self, accel: Accel | None = None, kernel: str | None = None) -> Accel:
        """KVM or TCG for ``accel`` (None: this host's setting) and a guest of ``kernel``."""
        accel = accel or self.settings.accel
        if accel is not Accel.AUTO:
            return accel
        return (await self.choose(kernel)).accel

    async def choose(self, kernel: str | None = None) -> Verdict:
        """What ``Accel.AUTO`` means for guests of ``kernel`` (None: the host's test kernel).

        Probes at most once per kernel (see the module's docstring); raises
        ``ConfigError`` if QEMU is missing.
        """
        async with self._lock:
            return await self._choose(kernel)

    async def distrust_kvm(self, kernel: str | None, reason: str) -> None:
        """A guest of ``kernel`` did not run under KVM after all: AUTO means TCG from now."""
        async with self._lock:
            await asyncio.to_thread(self._distrust, kernel, reason)

    def _qemu_path(self) -> str:
        path = shutil.which(self.settings.qemu)
        if path is None:
            raise ConfigError(
                f"{self.settings.qemu} is not installed (apt-get install qemu-system-x86)"
            )
        return path

    def _remember(self, key: str, kernel: str | None, verdict: Verdict, source: str) -> Verdict:
        self._verdicts[key] = verdict
        log.info(
            "accelerator %s for guests of kernel %s: %s%s",
            verdict.accel.value,
            kernel or "(none)",
            verdict.reason,
            f" [{source}]" if source else "",
        )
        return verdict

    async def _choose(self, kernel: str | None) -> Verdict:
        # No ioctl check of /dev/kvm first: it can pass them all and still not run Linux,
        # and where KVM is missing QEMU says so at once, which the probe reports.
        qemu = self._qemu_path()
        if kernel is None:
            try:
                kernel, _ = find_kernel()
            except ConfigError:
                key = "no-kernel"
                if key not in self._verdicts:
                    none = Verdict(
                        Accel.TCG,
                        "no Linux kernel to probe KVM with (the guest has none, /boot neither)",
                    )
                    self._remember(key, None, none, "")
                return self._verdicts[key]
        key = VerdictCache.key(qemu, kernel)
        if key in self._verdicts:
            return self._verdicts[key]
        limit = self.settings.probe_seconds
        path = self.settings.verdict_cache
        if path is None:
            fresh = await probe_kvm(qemu, kernel, limit)
            source = f"probed in {fresh.probe_seconds:.1f} s, not cached"
            return self._remember(key, kernel, fresh, source)
        cache = VerdictCache(path)
        verdict: Verdict | None = None
        try:
            async with cache.locked_async():
                cached = await asyncio.to_thread(cache.get, key)
                if cached is not None:
                    return self._remember(key, kernel, cached, f"cached in {path}")
                verdict = await probe_kvm(qemu, kernel, limit)
                await asyncio.to_thread(cache.put, key, verdict)
        except OSError as err:  # an unwritable cache costs a probe per process, no more
            if verdict is None:
                verdict = await probe_kvm(qemu, kernel, limit)
            source = f"probed in {verdict.probe_seconds:.1f} s, not cached: {err}"
            return self._remember(key, kernel, verdict, source)
        return self._remember(
            key, kernel, verdict, f"probed in {verdict.probe_seconds:.1f} s, cached in {path}"
        )

    def _distrust(self, kernel: str | None, reason: str) -> None:
        if kernel is None:
            with contextlib.suppress(ConfigError):
                kernel, _ = find_kernel()
        if kernel is None or not os.path.exists(kernel):
            return
        key = VerdictCache.key(self._qemu_path(), kernel)
        verdict = Verdict(Accel.TCG, f"a guest of this kernel {reason} under KVM")
        self._verdicts[key] = verdict
        if self.settings.verdict_cache is not None:
            cache = VerdictCache(self.settings.verdict_cache)
            try:
                with cache.locked():
                    cache.put(key, verdict)
            except OSError as err:  # the restart under TCG matters more than the cache
                log.warning("KVM verdict cache %s not updated: %s", cache.path, err)


# --- guests -----------------------------------------------------------------------------------


@dataclass
class GuestConfig:
    """How to start a guest. Images with a bootloader inside need no kernel."""

    memory_mib: int = 512
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    #: Room to grow by hot-plug (a µVM is baked small and sized at resume): the most
    #: CPUs (``-smp …,maxcpus=``) and MiB (``-m …,slots=,maxmem=``) it may reach. None:
    #: no room beyond ``cpus`` and ``memory_mib``.
    max_cpus: int | None = None
    max_memory_mib: int | None = None

    def __post_init__(self) -> None:
        if self.memory_mib < 16:
            raise ConfigError(f"guest memory {self.memory_mib} MiB is too small")
        if self.cpus < 1:
            raise ConfigError(f"guest cpus {self.cpus} must be at least 1")
        if self.max_cpus is not None and self.max_cpus < self.cpus:
            raise ConfigError(f"guest max_cpus {self.max_cpus} is below its {self.cpus} cpus")
        if self.max_memory_mib is not None:
            grow = self.max_memory_mib - self.memory_mib
            if grow < 0 or grow % MEMORY_HOTPLUG_BLOCK_MIB:
                raise ConfigError(
                    f"guest max_memory_mib {self.max_memory_mib} must be its memory "
                    f"({self.memory_mib} MiB) plus a multiple of {MEMORY_HOTPLUG_BLOCK_MIB} MiB"
                )
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

    @property
    def memory_slots(self) -> int:
        """DIMM slots for growing to ``max_memory_mib`` one hot-plug block at a time."""
        if self.max_memory_mib is None:
            return 0
        return (self.max_memory_mib - self.memory_mib) // MEMORY_HOTPLUG_BLOCK_MIB


def qemu_argv(
    name: str, disk_uri: str, cfg: GuestConfig, serial_log: str, accel: Accel, qemu: str = QEMU,
    *, qmp_socket: str | None = None, incoming: bool = False,
) -> list[str]:  # fmt: skip
    """The QEMU command line of a guest booting from its NBD export (or a raw file).

    ``qmp_socket``: where QEMU listens for its monitor. ``incoming``: the guest does not
    boot but waits for its state (``-incoming defer``; the monitor then says from where,
    see ``Monitor.incoming``), and stays paused once it is loaded until ``cont``. Every
    guest has a ``vmgenid`` device: a guest resumed from a saved state gets a fresh
    generation ID, so clones of one state reseed their random number generators (the ID
    is not part of the migrated state).
    """
    if accel is Accel.AUTO:
        raise ConfigError("resolve Accel.AUTO to KVM or TCG before building a command line")
    memory = str(cfg.memory_mib)
    if cfg.max_memory_mib is not None and cfg.memory_slots:
        memory += f",slots={cfg.memory_slots},maxmem={cfg.max_memory_mib}M"
    cpus = str(cfg.cpus)
    if cfg.max_cpus is not None:
        cpus += f",maxcpus={cfg.max_cpus}"
    argv = [
        qemu,
        "-name",
        name,
        "-machine",
        f"pc,accel={accel.value}",
        "-m",
        memory,
        "-smp",
        cpus,
        "-nodefaults",
        "-device",
        "vmgenid,guid=auto",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{serial_log}",
        "-drive",
        f"file={disk_uri},format=raw,if=virtio,cache=none,aio=threads",
    ]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    if incoming:
        # -S: stay paused once the state is loaded. Whoever loads it decides when the
        # guest runs: a live migration's destination only after the source has handed
        # over (its switchover), or two copies of one guest could run.
        argv += ["-incoming", "defer", "-S"]
    if accel is Accel.KVM:
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
    accel: Accel | None = None,
) -> str:
    """A libvirt domain for ``virsh define``: the same guest, its disk the NBD export.

    Its type is ``kvm`` only when ``accel`` says the guest runs under KVM (the one its
    guest last ran with); anything else gives ``qemu`` (TCG), which runs everywhere.
    """
    domain_type = "kvm" if accel is Accel.KVM else "qemu"
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


class GuestState(enum.Enum):
    CREATED = "created"
    #: QEMU runs; its console is still empty (under KVM: on trial).
    STARTING = "starting"
    #: Its console has printed.
    RUNNING = "running"
    #: ``stop()`` was called; QEMU has not exited yet.
    STOPPING = "stopping"
    #: QEMU exited by itself (the guest powered off, or QEMU failed).
    EXITED = "exited"
    #: QEMU exited because ``stop()`` asked.
    STOPPED = "stopped"


class _Outcome(enum.Enum):
    CONSOLE = "console"
    EXITED = "exited"
    SILENT = "silent"


class Guest:
    """One guest: a QEMU process, restarted once under TCG if KVM shows no sign of life.

    ``CREATED → STARTING → RUNNING → EXITED``, or ``→ STOPPING → STOPPED`` from
    STARTING or RUNNING. ``start()`` returns once QEMU runs; a task owned by the guest
    watches it (the KVM trial, the exit); ``wait()`` returns the exit status and raises
    what that task raised, which is also logged if nobody waits.
    """

    def __init__(
        self,
        name: str,
        disk_uri: str,
        cfg: GuestConfig,
        serial_log: str,
        hypervisor: Hypervisor,
        accel: Accel | None = None,
        *,
        qmp_socket: str | None = None,
        incoming: bool = False,
    ) -> None:
        self.name = name
        self.qmp_socket = qmp_socket
        #: QEMU's monitor, when the guest has a QMP socket (connected on first use).
        self.monitor: Monitor | None = Monitor(name, qmp_socket) if qmp_socket else None
        #: Started with ``-incoming defer``: it waits for a saved or migrated state
        #: (``monitor.incoming``) instead of booting, so it is never restarted under
        #: TCG after a KVM trial: the restarted QEMU would have no state to load.
        self.incoming = incoming
        self.disk_uri = disk_uri
        self.cfg = cfg
        self.serial_log = serial_log
        self.hypervisor = hypervisor
        self.settings = hypervisor.settings
        #: What was asked for (None: the host's setting).
        self.requested = accel or hypervisor.settings.accel
        #: What QEMU runs under now: KVM or TCG, once started.
        self.accel: Accel | None = None
        #: True once it was restarted under TCG.
        self.fell_back = False
        self.state = GuestState.CREATED
        self.argv: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.stderr = ""
        self._exit: asyncio.Future[tuple[bytes, bytes]] | None = None
        self._task: asyncio.Task[int] | None = None
        self._stopping = False
        #: Set by the owner (metrics): called once with the seconds from ``start()`` to
        #: the first console output (a KVM trial and a TCG restart included).
        self.on_console: Callable[[float], None] | None = None
        self._started_at = 0.0
        #: The accelerator's resolution while ``start()`` waits for it (it may probe).
        self._resolving: asyncio.Future[Accel] | None = None
        #: Set when ``start()`` has returned or raised.
        self._start_done = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.state in (GuestState.STARTING, GuestState.RUNNING, GuestState.STOPPING)

    async def start(self) -> None:
        """Resolve the accelerator (may probe, see ``Hypervisor.choose``) and start QEMU.

        Raises ``Conflict`` if started before, or if ``stop()`` came while the host
        probed KVM (the guest is then STOPPED and QEMU never ran), ``ConfigError`` if
        QEMU is missing.
        """
        if self.state is not GuestState.CREATED:
            raise Conflict(f"guest {self.name!r} was started before ({self.state.value})")
        self.state = GuestState.STARTING  # counts as running while a probe runs
        self._started_at = time.monotonic()
        try:
            self._resolving = asyncio.ensure_future(
                self.hypervisor.resolve(self.requested, self.cfg.kernel)
            )
            try:
                accel = await self._resolving
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping and (current is None or current.cancelling() == 0):
                    # stop() cancelled the probe, not our caller: nothing was started.
                    raise Conflict(
                        f"guest {self.name!r} was stopped before QEMU started "
                        "(while the host probed KVM)"
                    ) from None
                raise
            await self._launch(accel)
        except BaseException:
            self.state = GuestState.STOPPED if self._stopping else GuestState.EXITED
            self._start_done.set()
            raise
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"guest {self.name}"
        )
        self._task.add_done_callback(self._task_done)
        self._start_done.set()
        if self._stopping:  # stop() came while QEMU was being spawned
            self._signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Until QEMU has exited for good; its exit status. Raises what the watcher raised."""
        if self._task is None:
            raise Conflict(f"guest {self.name!r} was never started")
        return await asyncio.shield(self._task)

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s (default: the setting); until it exited."""
        if self._task is None and self.state is GuestState.STARTING:
            # Still probing (or spawning): the probe is cancelled and its QEMU killed, so
            # start() gives up without running the guest; until then a caller that
            # stops and then closes the VM's disk must not see start() go on.
            self._stopping = True
            self.state = GuestState.STOPPING
            if self._resolving is not None:
                self._resolving.cancel()
            await self._start_done.wait()
        if self._task is None or self._task.done():
            return
        grace = self.settings.stop_grace_seconds if grace is None else grace
        self._stopping = True
        self.state = GuestState.STOPPING
        if self.monitor is not None:
            await self.monitor.close()  # before QEMU goes, not as a broken connection
        self._signal(signal.SIGTERM)
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        while not done:  # a TCG restart may have begun meanwhile: kill whatever runs now
            self._signal(signal.SIGKILL)
            done, _ = await asyncio.wait({self._task}, timeout=grace)

    # --- inside --------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            _kill_group(self.proc.pid, sig)

    async def _launch(self, accel: Accel) -> None:
        qemu = self.settings.qemu
        if shutil.which(qemu) is None:
            raise ConfigError(f"{qemu} is not installed (apt-get install qemu-system-x86)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.serial_log)  # its size is how the guest shows life
        if self.monitor is not None:
            await self.monitor.close()  # it spoke to the QEMU this one replaces
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.monitor.path)  # so connect() waits for the new QEMU's
        self.accel = accel
        self.argv = qemu_argv(self.name, self.disk_uri, self.cfg, self.serial_log, accel, qemu,
                              qmp_socket=self.qmp_socket, incoming=self.incoming)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._exit = asyncio.ensure_future(self.proc.communicate())
        log.info(
            "guest %r started under %s (pid %d): %s",
            self.name,
            accel.value,
            self.proc.pid,
            " ".join(self.argv),
        )

    def _console_bytes(self) -> int:
        try:
            return os.path.getsize(self.serial_log)
        except OSError:
            return 0

    async def _first_sign(self, limit: float | None) -> _Outcome:
        """Until the console prints, QEMU exits, or ``limit`` s pass in silence."""
        assert self._exit is not None
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            if self._console_bytes() > 0:
                if self.state is GuestState.STARTING:
                    self.state = GuestState.RUNNING
                    if self.on_console is not None:
                        self.on_console(time.monotonic() - self._started_at)
                return _Outcome.CONSOLE
            if self._exit.done():
                return _Outcome.EXITED
            poll = self.settings.console_poll_seconds
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return _Outcome.SILENT
                poll = min(poll, left)
            await asyncio.wait({self._exit}, timeout=poll)

    async def _kvm_trial(self) -> None:
        """A KVM guest that fails or stays silent is started again under TCG, once."""
        assert self._exit is not None and self.proc is not None
        limit = self.settings.kvm_silence_seconds
        outcome = await self._first_sign(limit)
        if outcome is _Outcome.CONSOLE or self._stopping:
            return
        if outcome is _Outcome.SILENT:
            reason = f"printed nothing on its console in {limit:g} s"
            self._signal(signal.SIGKILL)
            await self._exit
        else:
            _, err = self._exit.result()
            if self.proc.returncode == 0:
                return  # it powered off quietly: nothing failed
            tail = _one_line_tail(err)
            reason = (
                f"exited with status {self.proc.returncode} before printing anything"
                f"{': ' + tail if tail else ''}"
            )
        if self._stopping:
            return
        log.warning("guest %r %s under KVM: starting it again under TCG", self.name, reason)
        self.fell_back = True
        if self.requested is Accel.AUTO:
            await self.hypervisor.distrust_kvm(self.cfg.kernel, reason)
            if self._stopping:
                return
        await self._launch(Accel.TCG)
        if self._stopping:  # stop() came while the restart was under way
            self._signal(signal.SIGTERM)

    async def _supervise(self) -> int:
        try:
            if self.accel is Accel.KVM and not self.incoming:
                await self._kvm_trial()
            await self._first_sign(None)
            assert self._exit is not None and self.proc is not None
            _, err = await self._exit
        except BaseException:
            self._signal(signal.SIGKILL)  # QEMU must not outlive its watcher
            self.state = GuestState.EXITED
            raise
        finally:
            if self.monitor is not None and (self._exit is None or self._exit.done()):
                await self.monitor.close()
        rc = self.proc.returncode if self.proc.returncode is not None else -1
        self.returncode = rc
        self.stderr = err.decode(errors="replace").strip()
        self.state = GuestState.STOPPED if self._stopping else GuestState.EXITED
        log.info(
            "guest %r exited with status %s under %s%s",
            self.name,
            rc,
            self.accel.value if self.accel else "?",
            f": {_one_line_tail(err)}" if rc else "",
        )
        return rc

    def _task_done(self, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("guest %r: its watcher failed: %s", self.name, err, exc_info=err)
