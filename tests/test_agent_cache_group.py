"""CacheGroup: a cache that cannot grow evicts images no VM uses first, then passes through.

Real parts: the origin is an NBD server on a Unix socket serving two image files, each
image gets an ``ImageRelay`` (remote -> cache -> relay export) as an agent makes it, and
the group's directory is a small tmpfs where the disk must fill.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_image, small_tmpfs

from virtman.agent.images import CacheGroup, ImageRelay, ImageSpec
from virtman.blockdev.file import FileDevice
from virtman.blockdev.manifest import compute_manifest
from virtman.nbd.server import NbdServer

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
SIZES = {"idle": 2 * MiB, "busy": 4 * MiB}  # busy does not fit the small disk alone


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: room for the idle image's cache and part of the busy one's."""
    with small_tmpfs(tmp_path, "3m") as mount:
        yield mount


@dataclass
class Origin:
    specs: dict[str, ImageSpec]
    data: dict[str, bytes]
    relay_server: NbdServer


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    devices, data, specs = {}, {}, {}
    for seed, name in enumerate(["idle", "busy"], start=1):
        path = tmp_path / f"{name}.raw"
        data[name] = make_image(path, SIZES[name], seed=seed)
        devices[name] = FileDevice(path, read_only=True)
        await devices[name].open()
    server = NbdServer(dict(devices))
    sock = str(tmp_path / "origin.sock")
    await server.listen_unix(sock)
    for name, device in devices.items():
        manifest = await compute_manifest(device, CHUNK)
        specs[name] = ImageSpec(name, [f"nbd+unix:///{name}?socket={sock}"], SIZES[name], CHUNK,
                                manifest.to_json())
    relay_server = NbdServer({})
    try:
        yield Origin(specs, data, relay_server)
    finally:
        await relay_server.stop()
        await server.stop()
        for device in devices.values():
            await device.close()


async def relay(group: CacheGroup, origin: Origin, name: str) -> ImageRelay:
    r = ImageRelay(origin.specs[name], group.image_dir(name), origin.relay_server,
                   f"nbd+unix:///{name}?socket=unused")
    await r.open()
    group.add(r)
    return r


async def read_all(r: ImageRelay) -> bytes:
    size = r.spec.size
    return b"".join([await r.cache.read(o, 256 * KiB) for o in range(0, size, 256 * KiB)])


async def test_full_disk_evicts_unused_image_then_passes_through(
        small_fs: Path, origin: Origin) -> None:
    group = CacheGroup(str(small_fs), capacity=1 << 40)
    idle = await relay(group, origin, "idle")
    assert await read_all(idle) == origin.data["idle"]
    assert idle.cache.chunks_present * CHUNK == 2 * MiB  # of the 3 MiB disk
    busy = await relay(group, origin, "busy")
    busy.users.add("vm1")
    for _ in range(3):  # every read answered while the disk fills, is freed, fills again
        assert await read_all(busy) == origin.data["busy"]
    assert "idle" not in group.relays and not os.path.exists(group.image_dir("idle"))
    status = group.status()
    assert status["evicted_for_space"] == 1
    assert status["disk_full"] is True and status["passing_through"] == {"busy": "disk_full"}
    # What the agent's /status carries (it must be JSON as it is).
    image_status = json.loads(json.dumps(busy.status()))["cache_space"]
    assert image_status["space"] == "disk_full" and image_status["passthrough_chunks"] > 0
    assert json.loads(json.dumps(status))["passing_through"] == {"busy": "disk_full"}
    # After the eviction the busy image cached what the freed space holds: more than
    # the one free MiB before it.
    assert busy.cache.chunks_present * CHUNK > 1 * MiB
    await busy.close()


async def test_capacity_evicts_unused_image_then_passes_through(
        tmp_path: Path, origin: Origin) -> None:
    capacity = 3 * MiB // 2
    told: list[str] = []

    async def evicted(name: str) -> None:  # the agent leaves the image's tree here
        told.append(name)

    group = CacheGroup(str(tmp_path / "group"), capacity=capacity, on_evicted=evicted)
    idle = await relay(group, origin, "idle")
    assert await read_all(idle) == origin.data["idle"]
    assert group.bytes_held == capacity  # stopped storing at the capacity, served it all
    busy = await relay(group, origin, "busy")
    busy.users.add("vm1")
    for _ in range(3):
        assert await read_all(busy) == origin.data["busy"]
    assert "idle" not in group.relays and told == ["idle"]
    assert group.bytes_held == capacity
    assert busy.cache.chunks_present * CHUNK == capacity
    assert group.status()["passing_through"] == {"busy": "at_capacity"}
    await busy.close()


async def test_image_in_use_is_never_evicted_for_space(tmp_path: Path, origin: Origin) -> None:
    group = CacheGroup(str(tmp_path / "group"), capacity=MiB)
    first = await relay(group, origin, "idle")
    first.users.add("vm1")
    assert await read_all(first) == origin.data["idle"]
    second = await relay(group, origin, "busy")
    second.users.add("vm2")
    assert await read_all(second) == origin.data["busy"]
    assert sorted(group.relays) == ["busy", "idle"]
    assert group.status()["evicted_for_space"] == 0
    assert group.bytes_held == MiB
    await first.close()
    await second.close()
