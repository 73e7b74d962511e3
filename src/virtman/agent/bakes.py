"""Prebaked µVMs on one agent: bake a booted guest's state and disk, resume clones of it.

Theory of operation
-------------------
**Bake.** A bake is an ordinary VM of this agent (named ``NAME.bake``, over the image's
relay like any VM) whose guest is booted small with room to grow (``max_cpus``,
``max_memory_mib``), waited on until it is ready (a marker on its console, or a number
of seconds), then paused. While it is paused, nothing it does reaches its disk: the VM's
snapshot (``VmManager.snapshot``) freezes the disk layer at that instant, and QEMU's
migration writes the device and memory state to a file (``exec:cat > PATH``, the path
the agent's own and quoted: QEMU 7.2 has no ``file:`` URI, and handing QEMU an fd needs
the socket beneath qemu.qmp, which uvloop does not expose). The state is written into
a dot-directory, imported into the host store (below), given ``bake.json`` and renamed
to ``<data>/bakes/NAME/``: a crash at any point leaves either no bake or a whole one
(``start`` removes the rest).
Then the guest is stopped.

**In the host store.** The saved state does not stay a file: before the bake's
directory is renamed into place, the state is imported into the agent's host store
(``ChunkStore`` in ``<data>/store``, one per agent, capacity the agent's cache
capacity) as recipe ``bake/NAME/state``, chunked at ``store_chunk_bytes``, compressed and
deduplicated against every other bake's state there, and the raw file is deleted. The
recipe is committed (durable) before the rename, so a bake directory on disk always has
its recipe; a crash before the rename leaves a recipe without a directory, which
``start`` removes (with every recipe under ``bake/`` that no bake directory names).
Removing a bake removes its recipe and collects the store's unreferenced chunks, so its
bytes leave the disk with it. A bake made before the store (a ``state`` file in its
directory) is imported at the next start. The disk is not stored: it is the frozen
copy-on-write layer of the bake's VM over the image's relay (only what the guest wrote,
sparse), already held once; storing it would mean reading the whole disk through that
layer into the store, for bytes the image's cache holds already.

**Through the tree.** The agent exports two read-only devices on its relay NBD server
(the cluster's TLS when it has one): ``NAME@bake-state`` (the state file) and
``NAME@bake-disk`` (the frozen layer over the image: the whole disk as the guest left
it). It registers the bake with Volt, which registers both as images (``NAME.state``,
``NAME.disk``) with those exports as origin, digests them once and keeps the record.
From then on both travel like any image: relay trees, chunk caches, digests checked,
boot profiles. The disk is registered whole rather than as a sparse layer to stack
over the base at resume: one image per bake is correct with no new device kind, at the
cost of Volt reading the whole disk once at bake time and caches holding the bake's
chunks beside the base's (deduplication is the host store's work, issue 12 §4).

**Resume.** A new VM gets a copy-on-write layer over the bake's disk image (as any VM
over any image). Its QEMU starts with the bake's configuration and ``-incoming defer``;
the agent makes a FIFO in the VM's directory, has QEMU read it (``exec:cat FIFO``) and
feeds it from the state image's relay, reads running ahead of the writes, so the state
comes through this host's cache (and, on a host that never saw the bake, through its
tree). The FIFO is closed at the state's end: QEMU 7.2 finishes loading only at the end
of its input. Once QEMU has loaded it, the guest is continued and CPUs and memory are
hot-plugged up to the request. ``resume_seconds`` is measured from the request to the
guest running (``cont`` answered); the hot-plug after it is ``sized_seconds``. Each
resumed QEMU has a fresh ``vmgenid`` GUID, so clones of one bake reseed their random
number generators.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import re
import shlex
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from virtman.agent.relays import RelayManager
from virtman.agent.vm_manager import VmManager
from virtman.agent.vms import Vm, remove_tree
from virtman.blockdev.base import BlockDevice
from virtman.blockdev.chunkstore import ChunkStore, RecipeDevice
from virtman.coordinator.models import bake_images
from virtman.durable import fsync_dir, write_atomic
from virtman.errors import ConfigError, Conflict, GuestControlError, NotFound, VirtmanError
from virtman.hypervisor.qemu import Accel, GuestConfig
from virtman.hypervisor.qmp import Monitor
from virtman.limits import (
    BAKE_CREATE_TIMEOUT_SECONDS,
    BAKE_READY_MAX_SECONDS,
    BAKE_STATE_CHUNK_BYTES,
    BAKE_STATE_READ_BYTES,
    BAKE_STATE_READS_IN_FLIGHT,
    DEFAULT_CACHE_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    MAX_NAME_LENGTH,
    QMP_CONNECT_SECONDS,
)
from virtman.nbd.server import Export
from virtman.protocol.uri import NbdAddress

log = logging.getLogger(__name__)

#: The snapshot name of a bake VM's frozen layer.
BAKED_SNAPSHOT = "baked"
#: Seconds between tries to open a resuming QEMU's state FIFO before its reader has.
_FIFO_POLL_SECONDS = 0.005
#: The state file is padded to a multiple of this, so its export has whole sectors;
#: the record keeps the stream's true length, and only that much is ever fed back.
_STATE_ALIGN = 4096
#: The host store's recipes of bakes are named under this prefix.
_RECIPE_PREFIX = "bake/"


class BakeDirectory(Protocol):
    """Volt, as bakes need it (``VoltLink``)."""

    async def bake(self, name: str) -> dict[str, Any]: ...

    async def add_bake(self, doc: dict[str, Any], timeout: float) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BakeRequest:
    """What to bake: a guest of ``image`` sized ``guest``, ready when ``ready_marker``
    (a regular expression) is on its console, or after ``ready_after`` seconds."""

    name: str
    image: str
    guest: GuestConfig
    ready_marker: str | None = None
    ready_after: float | None = None
    accel: Accel | None = None

    def __post_init__(self) -> None:
        if (self.ready_marker is None) == (self.ready_after is None):
            raise ConfigError("a bake needs one of ready_marker and ready_after")
        if self.ready_marker is not None:
            try:
                re.compile(self.ready_marker)
            except re.error as err:
                raise ConfigError(
                    f"ready_marker {self.ready_marker!r} is not a regular expression: {err}"
                ) from None


@dataclass
class BakeRecord:
    """``<data>/bakes/NAME/bake.json``: what this agent keeps of a bake it made."""

    name: str
    image: str
    vm: str
    guest: dict[str, Any]
    accel: str
    state_bytes: int
    ready: str
    bake_seconds: float
    created: float = field(default_factory=time.time)

    def save(self, path: str) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1).encode(), 0o644)

    @classmethod
    def load(cls, path: str) -> BakeRecord:
        try:
            with open(path, encoding="utf-8") as f:
                return cls(**json.load(f))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"bake record {path} is unreadable: {err}") from err


@dataclass(frozen=True)
class ResumeRequest:
    name: str
    bake: str
    cpus: int | None = None
    memory_mib: int | None = None


class BakeManager:
    """The bakes this agent made (and serves), and resumes from any bake."""

    def __init__(
        self,
        data_dir: str,
        vms: VmManager,
        relays: RelayManager,
        directory: BakeDirectory,
        *,
        agent: str,
        ready_max_seconds: float = BAKE_READY_MAX_SECONDS,
        state_read_bytes: int = BAKE_STATE_READ_BYTES,
        reads_in_flight: int = BAKE_STATE_READS_IN_FLIGHT,
        state_chunk_bytes: int = BAKE_STATE_CHUNK_BYTES,
        register_timeout: float = BAKE_CREATE_TIMEOUT_SECONDS,
        reader_wait: float = QMP_CONNECT_SECONDS,
        store_capacity: int = DEFAULT_CACHE_CAPACITY,
        store_chunk_bytes: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.agent = agent
        self.dir = os.path.join(data_dir, "bakes")
        #: The host store holding the bakes' states (opened by ``start``).
        self.store_dir = os.path.join(data_dir, "store")
        self.store_capacity = store_capacity
        self.store_chunk_bytes = store_chunk_bytes
        self._store: ChunkStore | None = None
        self.vms = vms
        self.relays = relays
        self.directory = directory
        self.ready_max_seconds = ready_max_seconds
        self.state_read_bytes = state_read_bytes
        self.reads_in_flight = reads_in_flight
        self.state_chunk_bytes = state_chunk_bytes
        self.register_timeout = register_timeout
        #: Seconds a resuming QEMU gets to open the FIFO its state comes through.
        self.reader_wait = reader_wait
        self.bakes: dict[str, BakeRecord] = {}
        #: The open state devices (recipes of the store) of the bakes served.
        self._states: dict[str, RecipeDevice] = {}
        #: Bakes under way (not yet in ``bakes``): their names are taken.
        self._baking: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Serve every bake made before (after ``VmManager.start`` reopened their VMs)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)  # bakes hold guests' memory
        self._store = await asyncio.to_thread(ChunkStore.open, self.store_dir,
                                              capacity=self.store_capacity)
        kept: set[str] = set()
        for entry in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, entry)
            record_path = os.path.join(path, "bake.json")
            if entry.startswith(".") or not os.path.exists(record_path):
                log.warning("removing unfinished bake %s", entry)
                remove_tree(path)
                continue
            kept.add(entry)
            try:
                record = BakeRecord.load(record_path)
                if os.path.exists(self._state_path(entry)):  # made before the store
                    await self._store_state(entry, self._state_path(entry))
                    fsync_dir(path)
                await self._export(record)
            except (VirtmanError, OSError) as err:
                log.error("bake %r could not be served again: %s", entry, err)
                continue
            self.bakes[record.name] = record
        # A crash between a state's import and its directory's rename left a recipe
        # that no bake names: nothing acknowledged it, so it goes.
        orphans = [r for r in await asyncio.to_thread(self._store.recipes)
                   if r.startswith(_RECIPE_PREFIX) and self._bake_of(r) not in kept]
        for recipe in orphans:
            log.warning("removing host store recipe %s of no bake", recipe)
            await asyncio.to_thread(self._store.remove, recipe)
        if orphans:
            await asyncio.to_thread(self._store.collect)

    async def stop(self) -> None:
        """Stop serving the bakes (before the VMs under them close), close the store."""
        for name in list(self.bakes):
            await self._unexport(name)
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None

    @property
    def store(self) -> ChunkStore:
        if self._store is None:
            raise ConfigError(f"agent {self.agent!r}: bakes used before start")
        return self._store

    # --- names and exports --------------------------------------------------------------

    def _bake_dir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _state_path(self, name: str) -> str:
        """A state file as older agents kept it (imported into the store at start)."""
        return os.path.join(self._bake_dir(name), "state")

    @staticmethod
    def _recipe(name: str) -> str:
        return f"{_RECIPE_PREFIX}{name}/state"

    @staticmethod
    def _bake_of(recipe: str) -> str:
        return recipe[len(_RECIPE_PREFIX):].split("/", 1)[0]

    async def _store_state(self, name: str, path: str) -> None:
        """Import a saved state file as the bake's recipe (durable when this returns),
        then delete the file. A recipe left by a crashed bake of the same name is
        replaced: nothing acknowledged it."""
        manifest = await asyncio.to_thread(self.store.import_file, self._recipe(name), path,
                                           self.store_chunk_bytes, replace=True)
        os.unlink(path)
        log.info("bake %r: state of %d bytes stored as %d chunks in the host store", name,
                 manifest.size, len(manifest.data_digests))

    @staticmethod
    def _vm_name(name: str) -> str:
        return f"{name}.bake"

    @staticmethod
    def _exports(name: str) -> tuple[str, str]:
        # '@' is in no image name, so these never collide with a relay export.
        return f"{name}@bake-state", f"{name}@bake-disk"

    def _uri(self, export: str) -> str:
        address = NbdAddress(
            export=export, host=self.relays.nbd_host, port=self.relays.nbd_port,
            tls=self.relays.tls is not None,
        )
        return address.uri()

    def _frozen_layer(self, record: BakeRecord) -> BlockDevice:
        vm = self.vms.get(record.vm)
        for layer, device in zip(vm.record.layers, vm.devices, strict=True):
            if layer.snapshot == BAKED_SNAPSHOT:
                return device
        raise ConfigError(f"bake {record.name!r}: VM {record.vm!r} has no frozen layer")

    async def _export(self, record: BakeRecord) -> None:
        state_export, disk_export = self._exports(record.name)
        disk = self._frozen_layer(record)
        # Its VM stays as it is while the bake is served: a destroy, a snapshot, a guest
        # or a copy of it are refused (``Vm.check_idle``) until the bake is removed.
        self.vms.get(record.vm).operation = f"serving bake {record.name!r}"
        state = RecipeDevice(self.store, self._recipe(record.name))
        await state.open()
        self._states[record.name] = state
        self.relays.server.add_export(Export(state_export, state,
                                             f"virtman bake {record.name}: state"))
        self.relays.server.add_export(Export(disk_export, disk,
                                             f"virtman bake {record.name}: disk"))

    async def _unexport(self, name: str) -> None:
        for export in self._exports(name):
            self.relays.server.remove_export(export)
        state = self._states.pop(name, None)
        if state is not None:
            await state.close()

    # --- bake ---------------------------------------------------------------------------

    def get(self, name: str) -> BakeRecord:
        try:
            return self.bakes[name]
        except KeyError:
            raise NotFound(f"no bake named {name!r} on agent {self.agent!r}") from None

    def info(self, record: BakeRecord) -> dict[str, Any]:
        state_export, disk_export = self._exports(record.name)
        state_image, disk_image = bake_images(record.name)
        return {
            **asdict(record),
            "state_uri": self._uri(state_export),
            "disk_uri": self._uri(disk_export),
            "state_image": state_image,
            "disk_image": disk_image,
        }

    async def bake(self, request: BakeRequest) -> dict[str, Any]:
        """Make a bake and register it with Volt; its record (``info``).

        Raises ``Conflict`` for a name in use, ``NotFound`` for an unknown image,
        ``ConfigError`` when the guest is not ready in time or exits first,
        ``GuestControlError`` when QEMU fails to pause or save. Nothing is kept on error.
        """
        name = request.name
        longest = max((*bake_images(name), self._vm_name(name)), key=len)
        if len(longest) > MAX_NAME_LENGTH:
            raise ConfigError(f"bake name {name!r} is too long: {longest!r} must fit in "
                              f"{MAX_NAME_LENGTH} characters")
        if request.ready_after is not None and request.ready_after > self.ready_max_seconds:
            raise ConfigError(f"ready_after {request.ready_after:g} s is over the agent's "
                              f"limit of {self.ready_max_seconds:g} s")
        if name in self.bakes or name in self._baking:
            raise Conflict(f"a bake named {name!r} already exists on agent {self.agent!r}")
        if request.guest.max_cpus is None and request.guest.max_memory_mib is None:
            log.info("bake %r has no room to grow: resumes keep its size", name)
        self._baking.add(name)
        try:
            return await self._bake(request)
        finally:
            self._baking.discard(name)

    async def _bake(self, request: BakeRequest) -> dict[str, Any]:
        name = request.name
        began = time.monotonic()
        vm_name = self._vm_name(name)
        tmp = os.path.join(self.dir, f".{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp, mode=0o700)  # it will hold a guest's memory
        vm: Vm | None = None
        record: BakeRecord | None = None
        stored = False
        try:
            vm = await self.vms.create(vm_name, request.image)
            vm = await self.vms.start_guest(vm_name, request.guest, accel=request.accel)
            ready = await self._wait_ready(vm, request)
            guest = vm.guest
            assert guest is not None and guest.monitor is not None
            monitor = guest.monitor
            await monitor.pause()
            # Paused: QEMU drained its disk requests, so the layer frozen now is the
            # disk the saved memory expects.
            await self.vms.snapshot(vm_name, BAKED_SNAPSHOT)
            state_bytes = await self._save_state(monitor, os.path.join(tmp, "state"))
            stored = True
            await self._store_state(name, os.path.join(tmp, "state"))
            accel = guest.accel.value if guest.accel is not None else "tcg"
            await self.vms.stop_guest(vm_name)
            record = BakeRecord(name, request.image, vm_name, request.guest.to_dict(), accel,
                                state_bytes, ready, round(time.monotonic() - began, 3))
            record.save(os.path.join(tmp, "bake.json"))
            os.rename(tmp, self._bake_dir(name))
            fsync_dir(self.dir)
            await self._export(record)
            self.bakes[name] = record
            doc = self.info(record)
            try:
                await self.directory.add_bake(
                    {
                        "name": name, "agent": self.agent, "image": request.image,
                        "state_origin": doc["state_uri"], "disk_origin": doc["disk_uri"],
                        "state_bytes": state_bytes,
                        "chunk_size": self.relays.relays[request.image].spec.chunk_size,
                        "state_chunk_size": self.state_chunk_bytes,
                        "guest": record.guest, "accel": accel, "ready": ready,
                        "bake_seconds": record.bake_seconds,
                    },
                    self.register_timeout,
                )
            except BaseException:
                await self._unexport(name)
                del self.bakes[name]
                vm.operation = None  # destroyed below
                raise
        except BaseException as err:
            if vm is not None:
                with contextlib.suppress(VirtmanError):
                    await self.vms.destroy(vm_name)
            remove_tree(tmp)
            if record is not None:
                remove_tree(self._bake_dir(name))
            if stored:
                await self._forget_state(name)
            log.warning("bake %r failed after %.1f s, nothing kept: %s", name,
                        time.monotonic() - began,
                        err if isinstance(err, VirtmanError) else repr(err))
            raise
        log.info("bake %r of image %r made in %.1f s (%s): state %d bytes", name,
                 request.image, record.bake_seconds, ready, state_bytes)
        return doc

    async def _wait_ready(self, vm: Vm, request: BakeRequest) -> str:
        limit = self.ready_max_seconds
        if request.ready_after is not None:
            await asyncio.sleep(request.ready_after)
            if vm.guest is None or not vm.guest.running:
                raise ConfigError(f"bake guest of image {request.image!r} exited before "
                                  f"{request.ready_after:g} s: {self._tail(vm)}")
            return f"after {request.ready_after:g} s"
        assert request.ready_marker is not None
        done = await self.vms.wait_console(vm.name, re.compile(request.ready_marker), limit)
        if not done.matched:
            why = "exited" if not done.running else f"printed no match in {limit:g} s"
            raise ConfigError(f"bake guest of image {request.image!r} {why} "
                              f"(ready marker {request.ready_marker!r}): {self._tail(vm)}")
        return f"marker {request.ready_marker!r} after {done.seconds:.1f} s"

    def _tail(self, vm: Vm) -> str:
        try:
            with open(vm.console_log, "rb") as f:
                f.seek(max(0, os.path.getsize(vm.console_log) - 200))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no console)"
        return "console ends " + repr(text.strip()[-200:])

    async def _save_state(self, monitor: Monitor, path: str) -> int:
        """QEMU's state into ``path`` (padded to whole sectors); its length. Not fsynced:
        the file only lives until it is imported into the store, which makes it durable."""
        # exec: and a path of the agent's own data directory, quoted: QEMU 7.2 has no
        # file: URI, and passing an fd over QMP needs the socket beneath qemu.qmp.
        # The file holds the guest's memory: it is made 0600 before QEMU writes it
        # (``cat >`` truncates it and keeps its mode, whatever the umask).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        done = await monitor.migrate(f"exec:cat > {shlex.quote(path)}")
        fd = os.open(path, os.O_WRONLY)
        try:
            length = os.fstat(fd).st_size
            if length == 0:
                raise GuestControlError(monitor.guest, "migrate", f"no state written: {done}")
            os.ftruncate(fd, -(-length // _STATE_ALIGN) * _STATE_ALIGN)
        finally:
            os.close(fd)
        return length

    # --- remove -------------------------------------------------------------------------

    async def remove(self, name: str) -> None:
        """Stop serving the bake and delete it here (Volt's record is the operator's)."""
        record = self.get(name)
        await self._unexport(name)
        del self.bakes[name]
        with contextlib.suppress(NotFound):
            self.vms.get(record.vm).operation = None
            await self.vms.destroy(record.vm)
        remove_tree(self._bake_dir(name))
        fsync_dir(self.dir)
        await self._forget_state(name)
        log.info("bake %r removed", name)

    async def _forget_state(self, name: str) -> None:
        """Remove a bake's recipe and give its chunks' space back at once: the store
        holds bakes only, and an operator removing a bake expects its bytes to go."""
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self.store.remove, self._recipe(name))
        await asyncio.to_thread(self.store.collect)

    # --- resume -------------------------------------------------------------------------

    async def resume(self, request: ResumeRequest, *, began: float | None = None) -> Vm:
        """A new VM resumed from Volt's bake ``request.bake``, sized to the request.

        ``began``: when the request came (``time.monotonic()``), for ``resume_seconds``.
        Raises ``NotFound`` for an unknown bake, ``ConfigError`` for a size the bake
        cannot reach, ``Conflict`` for a VM name in use; nothing is kept on error."""
        began = time.monotonic() if began is None else began
        bake = await self.directory.bake(request.bake)
        try:
            guest = GuestConfig.from_dict(dict(bake["guest"]))
            accel = Accel(bake["accel"])
            state_image, disk_image = str(bake["state_image"]), str(bake["disk_image"])
            state_bytes = int(bake["state_bytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"bake {request.bake!r}: Volt's record is unusable: {err}") from err
        cpus, memory = self._check_size(request, guest)
        if request.name in self.vms.vms:
            raise Conflict(f"a VM named {request.name!r} already exists on agent {self.agent!r}")
        vm = await self.vms.create(request.name, disk_image)
        try:
            state = await self.relays.image(state_image)
            state.users.add(request.name)  # not evicted while QEMU reads it
            try:
                vm = await self.vms.start_guest(request.name, guest, accel=accel, incoming=True)
                assert vm.guest is not None and vm.guest.monitor is not None
                monitor = vm.guest.monitor
                await self._load_state(vm, monitor, state.base, state_bytes)
            finally:
                state.users.discard(request.name)
                state.touch()
            await monitor.resume()
            running = time.monotonic() - began
            added_cpus = await monitor.hotplug_cpus(cpus)
            added_mib = await monitor.hotplug_memory(memory) if memory > guest.memory_mib else 0
            sized = time.monotonic() - began
            generation = await monitor.generation_id()
        except BaseException as err:
            with contextlib.suppress(VirtmanError):
                await self.vms.destroy(request.name)
            log.warning("resume of VM %r from bake %r failed, nothing kept: %s", request.name,
                        request.bake, err if isinstance(err, VirtmanError) else repr(err))
            raise
        vm.resumed = {
            "bake": request.bake,
            "resume_seconds": round(running, 3),
            "sized_seconds": round(sized, 3),
            "cpus": cpus,
            "memory_mib": guest.memory_mib + added_mib,
            "cpus_added": added_cpus,
            "memory_mib_added": added_mib,
            "generation_id": generation,
        }
        log.info("VM %r resumed from bake %r in %.3f s (running), %.3f s (sized to %d CPUs, "
                 "%d MiB)", request.name, request.bake, running, sized, cpus,
                 guest.memory_mib + added_mib)
        return vm

    @staticmethod
    def _check_size(request: ResumeRequest, guest: GuestConfig) -> tuple[int, int]:
        cpus = request.cpus if request.cpus is not None else guest.cpus
        memory = request.memory_mib if request.memory_mib is not None else guest.memory_mib
        most_cpus = guest.max_cpus if guest.max_cpus is not None else guest.cpus
        most_mib = guest.max_memory_mib if guest.max_memory_mib is not None else guest.memory_mib
        if not guest.cpus <= cpus <= most_cpus:
            raise ConfigError(f"bake {request.bake!r} resumes with {guest.cpus} to {most_cpus} "
                              f"CPUs, not {cpus}")
        if not guest.memory_mib <= memory <= most_mib:
            raise ConfigError(f"bake {request.bake!r} resumes with {guest.memory_mib} to "
                              f"{most_mib} MiB of memory, not {memory}")
        return cpus, memory

    async def _load_state(self, vm: Vm, monitor: Monitor, source: BlockDevice,
                          length: int) -> None:
        """Feed ``length`` bytes of ``source`` to QEMU until it loaded them, through a
        FIFO in the VM's directory that QEMU reads (``exec:cat FIFO``)."""
        fifo = os.path.join(vm.directory, "state.fifo")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
        os.mkfifo(fifo, 0o600)
        try:
            await monitor.incoming(f"exec:cat {shlex.quote(fifo)}")
            fd = await self._open_writer(fifo, vm)
        finally:
            os.unlink(fifo)
        feeding = asyncio.ensure_future(self._feed(source, length, fd))
        loading = asyncio.ensure_future(monitor.wait_incoming())
        try:
            done, _ = await asyncio.wait({feeding, loading}, return_when=asyncio.FIRST_EXCEPTION)
            failed = feeding.exception() if feeding in done else None
            if failed is not None:  # QEMU cannot finish: the rest of its state is not coming
                raise failed
            await feeding
            await loading
        finally:
            for task in (feeding, loading):
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _open_writer(self, fifo: str, vm: Vm) -> int:
        """The FIFO's write end, once QEMU's reader has opened it (a non-blocking open
        fails with ENXIO until then, so a QEMU that died is noticed, never waited on)."""
        deadline = time.monotonic() + self.reader_wait
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                if vm.guest is None or not vm.guest.running or time.monotonic() > deadline:
                    raise GuestControlError(vm.name, "migrate-incoming",
                                            "QEMU never opened its state's FIFO") from None
                await asyncio.sleep(_FIFO_POLL_SECONDS)
                continue
            os.set_blocking(fd, True)
            return fd

    async def _feed(self, source: BlockDevice, length: int, fd: int) -> None:
        """Write the state into ``fd`` and close it: QEMU 7.2 loads the stream in its
        main loop and finishes only at the end of its input, not at the stream's own
        end marker (its monitor does not answer meanwhile). Up to ``reads_in_flight``
        reads run ahead of the writes, in order."""
        step = self.state_read_bytes
        offsets = iter(range(0, length, step))
        ahead: collections.deque[asyncio.Future[bytes]] = collections.deque()
        offset = 0

        def read_next() -> None:
            at = next(offsets, None)
            if at is not None:
                ahead.append(asyncio.ensure_future(source.read(at, min(step, length - at))))

        try:
            for _ in range(self.reads_in_flight):
                read_next()
            while ahead:
                piece = await ahead.popleft()
                read_next()
                view = memoryview(piece)
                while view:
                    written = await asyncio.to_thread(os.write, fd, view)
                    view = view[written:]
                offset += len(piece)
        except BrokenPipeError as err:
            raise GuestControlError("resume", "migrate-incoming",
                                    f"QEMU stopped reading its state at byte {offset}") from err
        finally:
            for read in ahead:
                read.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
            os.close(fd)
