"""Builders for every kind of block device, for the shared conformance and model tests.

Each builder returns a ``Rig``: the device under test (opened), what its bytes must be
at the start, whether it is writable, and how to restart or crash it (reopen from the
same files), so the same tests run against all of them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.chunkstore import ChunkStore, RecipeDevice
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.file import FileDevice
from virtman.blockdev.manifest import compute_manifest
from virtman.blockdev.memory import MemoryDevice
from virtman.blockdev.remote import RemoteDevice
from virtman.blockdev.store import StoreFile
from virtman.nbd.server import NbdServer

KINDS = ["memory", "file", "remote", "cached", "cow", "cow-over-cached-remote", "recipe"]
WRITABLE = {"memory", "file", "remote", "cow", "cow-over-cached-remote"}
#: Kinds whose state lives in files and survives a restart.
PERSISTENT = {"file", "remote", "cached", "cow", "cow-over-cached-remote", "recipe"}


@dataclass
class Rig:
    kind: str
    device: BlockDevice
    initial: bytes
    writable: bool
    reopen: Callable[[], Awaitable[BlockDevice]]
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def restart(self) -> None:
        """Close cleanly and open again from the same files."""
        await self.device.close()
        self.device = await self.reopen()

    async def close(self) -> None:
        await self.device.close()
        for cleanup in reversed(self.cleanups):
            await cleanup()


def image_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


async def _serve(tmp: Path, name: str, device: BlockDevice) -> tuple[NbdServer, str]:
    await device.open()
    server = NbdServer({name: device})
    sock = str(tmp / f"{name}.sock")
    await server.listen_unix(sock)
    return server, f"nbd+unix:///{name}?socket={sock}"


async def build(kind: str, tmp: Path, size: int = 1 << 20, *, chunk_size: int = 64 << 10,
                block_size: int = 4096) -> Rig:
    """A fresh device of ``kind`` whose initial content is ``image_bytes(size)``."""
    data = image_bytes(size)
    base_file = tmp / "base.raw"
    base_file.write_bytes(data)
    cleanups: list[Callable[[], Awaitable[None]]] = []

    if kind == "memory":
        device: BlockDevice = MemoryDevice(data=data)
        await device.open()
        # A memory device has no files: "reopen" hands back the same object.
        async def reopen_memory() -> BlockDevice:
            return device
        return Rig(kind, device, data, True, reopen_memory)

    if kind == "file":
        async def reopen_file() -> BlockDevice:
            dev = FileDevice(base_file)
            await dev.open()
            return dev
        return Rig(kind, await reopen_file(), data, True, reopen_file)

    if kind == "remote":
        server, uri = await _serve(tmp, "origin", FileDevice(base_file))
        cleanups.append(server.stop)
        cleanups.append(server.exports["origin"].device.close)

        async def reopen_remote() -> BlockDevice:
            dev = RemoteDevice([uri])
            await dev.open()
            return dev
        return Rig(kind, await reopen_remote(), data, True, reopen_remote, cleanups)

    if kind == "cached":
        origin = MemoryDevice(data=data, read_only=True)

        async def reopen_cached() -> BlockDevice:
            dev = CachedDevice(origin, tmp / "cache", chunk_size=chunk_size, sync_interval=3600)
            await dev.open()
            return dev
        return Rig(kind, await reopen_cached(), data, False, reopen_cached)

    if kind == "cached-manifest":
        origin = MemoryDevice(data=data, read_only=True)
        manifest = await compute_manifest(origin, chunk_size)

        async def reopen_checked() -> BlockDevice:
            dev = CachedDevice(origin, tmp / "cache", chunk_size=chunk_size, manifest=manifest,
                               sync_interval=3600)
            await dev.open()
            return dev
        return Rig(kind, await reopen_checked(), data, False, reopen_checked)

    if kind == "cow":
        async def reopen_cow() -> BlockDevice:
            base = FileDevice(base_file, read_only=True)
            dev = CowDevice(base, tmp / "vm.overlay", block_size=block_size, sync_interval=3600)
            await dev.open()
            return dev
        return Rig(kind, await reopen_cow(), data, True, reopen_cow)

    if kind == "cow-over-cached-remote":
        # The full stack of a compute host: origin -> NBD -> cache -> overlay.
        server, uri = await _serve(tmp, "origin", FileDevice(base_file, read_only=True))
        cleanups.append(server.stop)
        cleanups.append(server.exports["origin"].device.close)

        async def reopen_stack() -> BlockDevice:
            cache = CachedDevice(RemoteDevice([uri]), tmp / "cache", chunk_size=chunk_size,
                                 sync_interval=3600)
            dev = CowDevice(cache, tmp / "vm.overlay", block_size=block_size,
                            sync_interval=3600)
            await dev.open()
            return dev
        return Rig(kind, await reopen_stack(), data, True, reopen_stack, cleanups)

    if kind == "recipe":
        # The file imported into a host store; a restart reopens the store as well.
        with ChunkStore.open(str(tmp / "store")) as imported:
            imported.import_file("base", str(base_file), chunk_size)
        held: list[ChunkStore] = []

        async def close_store() -> None:
            if held:
                held.pop().close()

        async def reopen_recipe() -> BlockDevice:
            await close_store()
            held.append(ChunkStore.open(str(tmp / "store")))
            dev = RecipeDevice(held[-1], "base")
            await dev.open()
            return dev
        cleanups.append(close_store)
        return Rig(kind, await reopen_recipe(), data, False, reopen_recipe, cleanups)

    raise ValueError(kind)


def cache_of(device: object) -> CachedDevice | None:
    """The chunk cache in a device stack, if there is one."""
    for dev in _stack(device):
        if isinstance(dev, CachedDevice):
            return dev
    return None


def crash(device: object) -> None:
    """Abandon a device as a SIGKILL would: drop connections, close fds, sync nothing."""
    for dev in _stack(device):
        if isinstance(dev, RemoteDevice):
            dev.abort()
        store = getattr(dev, "_store", None)
        if isinstance(store, StoreFile):
            store.abandon()


def _stack(device: object) -> list[object]:
    out = [device]
    for attr in ("base", "upstream"):
        inner = getattr(device, attr, None)
        if inner is not None:
            out += _stack(inner)
    return out
