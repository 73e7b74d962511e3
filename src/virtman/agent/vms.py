"""VMs on one host: a chain of copy-on-write layers over the image cache, exported on a
Unix socket for the local hypervisor.

Theory of operation
-------------------
A VM's disk is a chain: image cache ← layer 1 ← … ← layer n (active). Only the active
layer is written; ``snapshot`` flushes it, freezes it under a name and puts a new
active layer on top, switching the VM's export to it between two requests. A new VM
``--from-snapshot VM/SNAP`` gets its own sparse copies of the frozen layers up to SNAP.

Every VM lives in ``<data>/vms/<name>/``: ``vm.json`` (image, layers, state) written
atomically, and its layer files. A restarted agent reopens them all. ``detached`` VMs
(``destroy --instance-only``) keep their disk and have no export.

``VmRecord.state`` is a ``VmState``; ``vm.json`` keeps its value (``"running"``), as it always
has, so files written before the enum load unchanged. Clone and migrate live in
``virtman.agent.copy``; a VM being copied says so in ``operation`` so that nothing else
(snapshot, destroy, another copy) changes it meanwhile.

Export sockets are the hypervisor's and nobody else's: the socket directory is 0700
and each socket 0600, both owned by ``SocketOwner`` (the agent's own user unless
``--hypervisor-user`` names another, which takes an agent running as root). The
directory is closed before any socket is made in it, so no socket is ever reachable
by another user, not even between its bind and its chmod.
"""

from __future__ import annotations

import codecs
import enum
import json
import logging
import os
import pwd
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, ClassVar

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.store import copy_sparse
from virtman.durable import write_atomic
from virtman.errors import ConfigError, Conflict
from virtman.hypervisor.qemu import Guest
from virtman.nbd.server import Export, NbdServer
from virtman.protocol.nbd import Command, Request
from virtman.replay.trace import TraceRequest, format_trace

log = logging.getLogger(__name__)

#: Unix socket paths are limited to 107 bytes by the kernel.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class SocketOwner:
    """The user (and its primary group) that VM export sockets belong to: the one the
    hypervisor runs as."""

    uid: int
    gid: int
    name: str

    @classmethod
    def me(cls) -> SocketOwner:
        """The agent's own user (QEMU guests it starts run as it)."""
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(uid, os.getegid(), name)

    @classmethod
    def named(cls, user: str) -> SocketOwner:
        """A user by name or number; ``ConfigError`` when this system has none."""
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise ConfigError(f"--hypervisor-user {user!r}: no such user") from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    def _give(self, path: str, mode: int) -> None:
        os.chmod(path, mode)
        if (self.uid, self.gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(path, self.uid, self.gid)
            except PermissionError as err:
                raise ConfigError(
                    f"cannot give {path!r} to user {self.name!r} ({err.strerror}): an agent "
                    f"hands its VM sockets to another user only when it runs as root"
                ) from err

    def secure_dir(self, path: str) -> None:
        """Make ``path`` (the socket directory) 0700 and this user's. A directory other
        users may write to (``/tmp``) is refused rather than closed: it is not ours."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            os.makedirs(path, mode=0o700)
        else:
            if mode & (stat.S_IWOTH | stat.S_ISVTX):
                raise ConfigError(
                    f"socket directory {path!r} is shared with other users (mode "
                    f"{stat.S_IMODE(mode):o}): give the agent a --socket-dir of its own"
                )
        self._give(path, 0o700)

    def secure_socket(self, path: str) -> None:
        """Make a socket 0600 and this user's."""
        self._give(path, 0o600)


class VmState(enum.Enum):
    RUNNING = "running"
    DETACHED = "detached"


@dataclass
class Layer:
    file: str
    snapshot: str | None = None  # the name it was frozen under; None: the active layer


@dataclass
class VmRecord:
    name: str
    image: str
    layers: list[Layer]
    state: VmState = VmState.RUNNING
    created: float = field(default_factory=time.time)
    #: How its guest is started (``GuestConfig.to_dict()``), once it has been.
    guest: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str) -> VmRecord:
        """Read ``vm.json``; raises ``ConfigError`` naming the file when it is unusable."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            doc["layers"] = [Layer(**layer) for layer in doc["layers"]]
            doc["state"] = VmState(doc.get("state", VmState.RUNNING.value))
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"VM record {path} is unreadable: {err}") from err

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = self.state.value
        return doc

    def save(self, path: str) -> None:
        write_atomic(path, json.dumps(self.to_doc(), indent=1).encode(), 0o644)

    @property
    def snapshots(self) -> list[str]:
        return [layer.snapshot for layer in self.layers if layer.snapshot]


class Vm:
    """An open VM: its layer devices and its export."""

    def __init__(self, record: VmRecord, directory: str, socket_path: str) -> None:
        self.record = record
        self.directory = directory
        self.socket_path = socket_path
        self.devices: list[CowDevice] = []
        self.server: NbdServer | None = None
        self.guest: Guest | None = None
        self.recorder: TraceRecorder | None = None
        #: The copy (clone/migrate) under way, which nothing else may disturb; None: idle.
        self.operation: str | None = None
        #: How its guest was resumed from a bake (``agent.bakes.Resumed``); None: it
        #: was not.
        self.resumed: dict[str, object] | None = None

    @property
    def console_log(self) -> str:
        return os.path.join(self.directory, "console.log")

    @property
    def trace_path(self) -> str:
        return os.path.join(self.directory, "boot-trace.csv")

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def top(self) -> CowDevice:
        return self.devices[-1]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.socket_path}"

    def save(self) -> None:
        self.record.save(os.path.join(self.directory, "vm.json"))

    async def open_layers(self, base: BlockDevice) -> None:
        below: BlockDevice = base
        for i, layer in enumerate(self.record.layers):
            frozen = layer.snapshot is not None
            dev = CowDevice(
                below,
                os.path.join(self.directory, layer.file),
                read_only=frozen,
                owns_base=i > 0,
                meta={"vm": self.name, "image": self.record.image},
            )
            await dev.open()
            self.devices.append(dev)
            below = dev

    async def export(self, owner: SocketOwner) -> None:
        """Serve the VM on its Unix socket, 0600 and ``owner``'s (its directory, which
        ``owner.secure_dir`` closed, keeps others out until then)."""
        self.server = NbdServer([Export(self.name, self.top, f"virtman VM {self.name}")])
        self.server.recorder = self.recorder.record if self.recorder else None
        await self.server.listen_unix(self.socket_path)
        try:
            owner.secure_socket(self.socket_path)
        except BaseException:
            await self.unexport()
            raise

    def check_idle(self) -> None:
        """Raises ``Conflict`` while a clone or migrate of this VM is under way."""
        if self.operation is not None:
            raise Conflict(f"VM {self.name!r} is busy: {self.operation} under way")

    def serve_device(self, device: BlockDevice) -> None:
        """Point the VM's export at ``device`` from its next request (nothing to switch
        when the VM has no export: detached)."""
        if self.server is not None:
            self.server.replace_device(self.name, device)

    async def settle(self) -> None:
        """Wait for the requests its export had running (see ``NbdServer.settle``)."""
        if self.server is not None:
            await self.server.settle(self.name)

    async def unexport(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def close(self) -> None:
        if self.guest is not None:
            await self.guest.stop()
        await self.unexport()
        if self.devices:
            await self.top.close()  # each layer closes the one below, down to the cache
            self.devices = []

    def written_runs(self) -> list[tuple[int, int]]:
        """The union of every layer's allocated ranges: all the VM ever wrote."""
        marks: list[tuple[int, int]] = []
        for dev in self.devices:
            marks += dev.allocated_runs()
        return merge_runs(marks)

    def phase(self) -> str:
        """How far its boot is, for Volt's live view: ``new`` (never read), ``booting``
        (a client reads it now: a replayed boot or a guest), ``booted`` (its client came
        and left: a replayed boot ended), or ``detached`` (no export)."""
        if self.record.state is VmState.DETACHED or self.server is None:
            return "detached"
        if self.server.open_connections:
            return "booting"
        return "booted" if self.server.stats.connections else "new"

    def info(self) -> dict[str, object]:
        return {
            "name": self.name,
            "image": self.record.image,
            "state": self.record.state.value,
            "uri": self.uri if self.record.state is VmState.RUNNING else None,
            "snapshots": self.record.snapshots,
            "layers": len(self.record.layers),
            "written_bytes": sum(n for _, n in self.written_runs()) if self.devices else 0,
            "guest_running": self.guest is not None and self.guest.running,
            "recording": self.recorder is not None,
            "phase": self.phase(),
            "resumed": self.resumed,
            "resume_seconds": self.resumed["resume_seconds"] if self.resumed else None,
        }


class ConsoleFollower:
    """A guest's console log read as it grows: each look reads only the bytes added
    since the previous one, so waiting on a console costs a small read per look rather
    than the whole log (a booted Debian prints ~40 KB). It keeps the log open, so a log
    that QEMU replaced (a restart, e.g. KVM to TCG, unlinks it) is told apart by its
    inode, which cannot be reused while held. ``close()`` when done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.text = ""
        self._file: BinaryIO | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def size(self) -> int:
        """Bytes of the log read so far."""
        return self._file.tell() if self._file is not None else 0

    def look(self) -> bool:
        """Read what was added since the last look; True when the text grew."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:  # QEMU has not made it yet (or is making a new one)
            return False
        if self._file is None or os.fstat(self._file.fileno()).st_ino != current:
            self.close()
            try:
                self._file = open(self.path, "rb")  # held across looks
            except FileNotFoundError:
                return False
            self.text = ""
            self._decoder.reset()
        elif os.fstat(self._file.fileno()).st_size < self._file.tell():  # truncated
            self._file.seek(0)
            self.text = ""
            self._decoder.reset()
        data = self._file.read()
        if not data:
            return False
        self.text += self._decoder.decode(data)
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TraceRecorder:
    """Keeps every request a VM's guest sends, in the trace format of ``../shared/traces``."""

    _OPS: ClassVar[dict[int, str]] = {
        Command.READ: "read",
        Command.WRITE: "write",
        Command.FLUSH: "flush",
    }

    def __init__(self) -> None:
        self.requests: list[TraceRequest] = []
        self._start: float | None = None

    def record(self, request: Request) -> None:
        op = self._OPS.get(request.command)
        if op is None:
            return
        now = time.monotonic()
        if self._start is None:
            self._start = now
        length = request.length if op != "flush" else 0
        offset = request.offset if op != "flush" else 0
        self.requests.append(TraceRequest(round(now - self._start, 6), op, offset, length))

    def save(self, path: str, header: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(format_trace(self.requests, header))
        os.replace(tmp, path)


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent (offset, length) runs covering ``runs``."""
    merged: list[tuple[int, int]] = []
    for off, length in sorted(r for r in runs if r[1] > 0):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            merged.append((off, length))
    return merged


def check_socket_path(path: str) -> None:
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes; "
            f"give the agent a shorter --socket-dir"
        )


def layer_file(index: int) -> str:
    return f"layer-{index:04d}.overlay"


def copy_layers(src: Vm, upto_snapshot: str, dest_dir: str) -> list[Layer]:
    """Sparse copies of ``src``'s frozen layers up to and including ``upto_snapshot``."""
    names = [layer.snapshot for layer in src.record.layers]
    if upto_snapshot not in names:
        raise KeyError(upto_snapshot)
    layers = []
    for i, layer in enumerate(src.record.layers[: names.index(upto_snapshot) + 1]):
        target = layer_file(i + 1)
        copy_sparse(os.path.join(src.directory, layer.file), os.path.join(dest_dir, target))
        layers.append(Layer(target, layer.snapshot))
    return layers


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
