"""RemoteDevice over real NBD servers on Unix sockets: path choice and failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from devices import image_bytes

from virtman.blockdev import FaultyDevice, MemoryDevice, PathPolicy, RemoteDevice
from virtman.errors import DeviceError, InvalidRequest
from virtman.limits import REQUEST_TIMEOUT_SECONDS, RETIRE_GRACE_SECONDS
from virtman.nbd.server import NbdServer

SIZE = 256 * 1024


class Origins:
    """Several in-process servers exporting identical bytes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: dict[str, NbdServer] = {}
        self.devices: dict[str, FaultyDevice] = {}

    async def start(self, name: str, data: bytes | None = None) -> str:
        device = FaultyDevice(MemoryDevice(data=data or image_bytes(SIZE), read_only=True))
        await device.open()
        server = NbdServer({"img": device})
        await server.listen_unix(str(self.tmp / f"{name}.sock"))
        self.servers[name] = server
        self.devices[name] = device
        return self.uri(name)

    def uri(self, name: str) -> str:
        return f"nbd+unix:///img?socket={self.tmp / f'{name}.sock'}"

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop()

    async def kill(self, name: str) -> None:
        """Stop without letting requests in flight finish, as a dead host would."""
        server = self.servers.pop(name)
        server.shutdown_grace = 0
        await server.stop()

    async def stop_all(self) -> None:
        for name in list(self.servers):
            await self.stop(name)


@pytest.fixture
async def origins(tmp_path: Path) -> AsyncIterator[Origins]:
    o = Origins(tmp_path)
    yield o
    await o.stop_all()


async def test_round_robin_spreads_requests(origins: Origins) -> None:
    a, b = await origins.start("a"), await origins.start("b")
    dev = RemoteDevice([a, b])
    await dev.open()
    for i in range(10):
        assert await dev.read(i * 1000, 1000) == image_bytes(SIZE)[i * 1000 : i * 1000 + 1000]
    counts = dev.bytes_received_by_path()
    assert counts[a] == counts[b] == 5000
    await dev.close()


async def test_least_outstanding_avoids_the_busy_path(origins: Origins) -> None:
    a, b = await origins.start("a"), await origins.start("b")
    origins.devices["a"].delay = 0.2
    dev = RemoteDevice([a, b], policy=PathPolicy.LEAST_OUTSTANDING)
    await dev.open()
    slow = asyncio.ensure_future(dev.read(0, 10))  # goes to a (both idle), stays busy
    await asyncio.sleep(0.05)
    for _ in range(5):
        await dev.read(0, 10)
    await slow
    counts = dev.bytes_received_by_path()
    assert counts[a] == 10 and counts[b] == 50
    await dev.close()


async def test_fallback_only_when_primaries_are_down(origins: Origins) -> None:
    a, origin = await origins.start("a"), await origins.start("origin")
    dev = RemoteDevice([a], fallbacks=[origin], reconnect_delay=30)
    await dev.open()
    await dev.read(0, 100)
    assert dev.bytes_received_by_path()[origin] == 0
    await origins.stop("a")
    assert await dev.read(100, 100) == image_bytes(SIZE)[100:200]
    assert dev.bytes_received_by_path()[origin] == 100
    await dev.close()


async def test_path_killed_mid_reads_is_invisible_to_the_caller(origins: Origins) -> None:
    a, b = await origins.start("a"), await origins.start("b")
    origins.devices["a"].delay = 0.1
    dev = RemoteDevice([a, b], reconnect_delay=0.05)
    await dev.open()
    reads = [asyncio.ensure_future(dev.read(i * 4096, 4096)) for i in range(40)]
    await asyncio.sleep(0.03)
    await origins.kill("a")  # requests in flight on a are lost with its connection
    results = await asyncio.gather(*reads)
    data = image_bytes(SIZE)
    assert results == [data[i * 4096 : (i + 1) * 4096] for i in range(40)]
    status = {s["uri"]: s["state"] for s in dev.path_status()}
    assert status[a] in ("down", "connecting")
    assert dev.stats.extra.get("failovers", 0) >= 1
    await dev.close()


async def test_error_reply_moves_to_next_path_and_path_stays_up(origins: Origins) -> None:
    a, b = await origins.start("a"), await origins.start("b")
    origins.devices["a"].fail_reads = 100
    dev = RemoteDevice([a, b])
    await dev.open()
    for i in range(4):
        assert await dev.read(i, 10) == image_bytes(SIZE)[i : i + 10]
    status = {s["uri"]: s for s in dev.path_status()}
    assert status[a]["state"] == "up" and status[a]["errors"] >= 2
    await dev.close()


async def test_every_path_failing_raises_naming_them(origins: Origins) -> None:
    a = await origins.start("a")
    dev = RemoteDevice([a], reconnect_delay=0.05, connect_timeout=0.3, max_rounds=2)
    await dev.open()
    await origins.stop("a")
    with pytest.raises(DeviceError) as info:
        await dev.read(0, 10)
    assert "failed on every upstream path" in str(info.value) and info.value.errno == 5
    await dev.close()


async def test_a_path_that_comes_back_is_used_again(origins: Origins) -> None:
    a = await origins.start("a")
    dev = RemoteDevice([a], reconnect_delay=0.05, connect_timeout=2)
    await dev.open()
    await origins.stop("a")
    restart = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(
        origins.start("a")))
    assert await dev.read(0, 10) == image_bytes(SIZE)[:10]  # waits for the reconnect
    restart.cancel()
    await dev.close()


async def test_open_fails_when_no_path_answers(tmp_path: Path) -> None:
    dev = RemoteDevice([f"nbd+unix:///img?socket={tmp_path}/none.sock"], connect_timeout=0.5)
    with pytest.raises(Exception, match="no upstream path could be opened"):
        await dev.open()


async def test_path_of_another_size_is_refused(origins: Origins) -> None:
    a = await origins.start("a")
    b = await origins.start("b", data=bytes(1000))
    dev = RemoteDevice([a, b])
    await dev.open()
    assert dev.size == SIZE
    status = {s["uri"]: s for s in dev.path_status()}
    assert status[b]["state"] == "retired" and "differs" in str(status[b]["last_error"])
    await dev.close()


async def test_set_paths_switches_without_disturbing_reads(origins: Origins) -> None:
    a, b = await origins.start("a"), await origins.start("b")
    origins.devices["a"].delay = 0.2
    dev = RemoteDevice([a])
    await dev.open()
    inflight = asyncio.ensure_future(dev.read(0, 4096))
    await asyncio.sleep(0.05)
    dev.set_paths([b])
    assert await inflight == image_bytes(SIZE)[:4096]  # finished on the retired path
    for _ in range(20):
        if any(s["uri"] == b and s["state"] == "up" for s in dev.path_status()):
            break
        await asyncio.sleep(0.05)
    await dev.read(0, 100)
    assert dev.bytes_received_by_path()[b] == 100
    await dev.close()


async def test_caller_errors_are_not_retried(origins: Origins) -> None:
    a = await origins.start("a")
    dev = RemoteDevice([a])
    await dev.open()
    with pytest.raises(InvalidRequest) as info:
        await dev.read(SIZE - 1, 2)
    assert info.value.errno == 22
    await dev.close()


async def test_bad_data_is_refetched_from_another_path(origins: Origins) -> None:
    good = image_bytes(SIZE)
    bad_uri = await origins.start("bad", data=bytes(SIZE))  # same size, wrong bytes
    origin = await origins.start("origin")
    dev = RemoteDevice([bad_uri], fallbacks=[origin])
    await dev.open()
    data = await dev.read_verified(0, 4096, lambda d: d == good[:4096], attempts=3)
    assert data == good[:4096]
    assert dev.stats.extra["bad_data"] == 1
    assert dev.bytes_received_by_path()[origin] == 4096
    with pytest.raises(DeviceError):
        await dev.read_verified(0, 4096, lambda d: False, attempts=3)
    await dev.close()


async def test_reads_stuck_on_a_silent_retired_path_move_to_the_new_one(
    origins: Origins,
) -> None:
    """A parent that stops answering without closing its connection (a host that froze
    or lost power) would hold its reads until their 30 s timeout; once Volt's new paths
    drop it, they move to the new path after the retire grace."""
    a, b = await origins.start("a"), await origins.start("b")
    dev = RemoteDevice([a])
    await dev.open()
    origins.devices["a"].delay = 60.0  # answers nothing for a minute
    started = time.monotonic()
    inflight = asyncio.ensure_future(dev.read(4096, 4096))
    await asyncio.sleep(0.1)
    dev.set_paths([b])
    assert await inflight == image_bytes(SIZE)[4096:8192]
    # Not the request timeout: the grace and a reconnect.
    assert time.monotonic() - started < RETIRE_GRACE_SECONDS + 3 < REQUEST_TIMEOUT_SECONDS
    assert dev.bytes_received_by_path()[b] == 4096
    await dev.close()
    await origins.kill("a")  # its read is still asleep
