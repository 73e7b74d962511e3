"""Warm reads sent from the cache file with sendfile: the exact bytes, whatever mix of
ready and unready chunks a read spans, however full the socket is, and never over TLS.

Run on asyncio's own loop and on uvloop (the one ``virtman`` runs on): the fast path
writes to the socket beside the transport, so it must agree with both transports."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from conftest import require
from devices import image_bytes

from virtman.blockdev import CachedDevice, MemoryDevice
from virtman.nbd.client import NbdClient
from virtman.nbd.server import NbdServer
from virtman.pki import init_ca, issue
from virtman.protocol.uri import NbdAddress
from virtman.tlsconfig import TlsFiles

CHUNK = 64 * 1024
SIZE = 64 * CHUNK + 1000  # a short last chunk too
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run on a fresh loop of that kind; a lost reply fails the test instead of hanging."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


async def cached_server(tmp: Path, tls: TlsFiles | None = None
                        ) -> tuple[bytes, CachedDevice, NbdServer, str]:
    data = image_bytes(SIZE)
    cache = CachedDevice(MemoryDevice(data=data, read_only=True), tmp / "cache",
                         chunk_size=CHUNK)
    await cache.open()
    server = NbdServer({"img": cache}, tls=tls, sendfile_min=4096)
    sock = str(tmp / "s.sock")
    await server.listen_unix(sock)
    return data, cache, server, sock


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_warm_reads_go_out_with_sendfile_and_are_exact(
        tmp_path: Path, loop: str, structured: bool) -> None:
    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path)
        client = await NbdClient.connect(NbdAddress("img", socket=sock),
                                         structured_replies=structured)
        try:
            await cache.read(0, 8 * CHUNK)  # chunks 0-7 ready
            assert await client.read(CHUNK + 5, 4 * CHUNK) == data[CHUNK + 5 : 5 * CHUNK + 5]
            assert server.stats.sendfile_replies == 1
            hits = cache.stats.extra["hits"]
            # Ready chunk 7, unready 8 and 9: fetched and stored, then sent from the
            # file too (read_or_locate), the exact bytes all the same; not a hit.
            assert await client.read(7 * CHUNK + 100, 2 * CHUNK + 50) == \
                data[7 * CHUNK + 100 : 9 * CHUNK + 150]
            assert server.stats.sendfile_replies == 2
            assert cache.stats.extra["hits"] == hits
            # Now ready: from the file, a hit.
            assert await client.read(8 * CHUNK, 2 * CHUNK) == data[8 * CHUNK : 10 * CHUNK]
            assert server.stats.sendfile_replies == 3
            assert cache.stats.extra["hits"] == hits + 1
            # The short last chunk, once ready, to the last byte.
            await cache.read(SIZE - 5000, 10)  # chunks 63 and 64 (1000 bytes) ready
            await cache.read(SIZE - 10, 10)
            assert await client.read(SIZE - 5000, 5000) == data[-5000:]
            assert server.stats.sendfile_replies == 4
            # Below sendfile_min: the buffered path.
            assert await client.read(100, 4000) == data[100:4100]
            assert server.stats.sendfile_replies == 4
            assert server.stats.bytes_read == 4 * CHUNK + 2 * CHUNK + 50 + 2 * CHUNK + 9000
        finally:
            await client.close()
            await server.stop()
            await cache.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_many_large_warm_reads_at_once_overflow_the_socket_and_stay_exact(
        tmp_path: Path, loop: str) -> None:
    """More in flight than the socket holds: sendfile sends part, the rest is queued, and
    later replies find the transport busy and queue behind it. Every byte in order."""
    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path)
        client = await NbdClient.connect(NbdAddress("img", socket=sock))
        try:
            await cache.read(0, SIZE)
            rng = random.Random(3)
            ranges = [(rng.randrange(0, SIZE - 2 * CHUNK), rng.randrange(CHUNK, SIZE // 2))
                      for _ in range(48)]
            ranges = [(o, min(n, SIZE - o)) for o, n in ranges]
            got = await asyncio.gather(*(client.read(o, n) for o, n in ranges))
            for (o, n), g in zip(ranges, got, strict=True):
                assert g == data[o : o + n], (o, n)
            assert server.stats.sendfile_replies >= 1
            assert server.stats.bytes_read == sum(n for _, n in ranges)
        finally:
            await client.close()
            await server.stop()
            await cache.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_tls_connections_never_use_sendfile(tmp_path: Path, loop: str) -> None:
    init_ca(str(tmp_path / "ca"))
    server_files = issue("relay", str(tmp_path / "hosts"), str(tmp_path / "ca"))
    client_files = issue("client", str(tmp_path / "hosts"), str(tmp_path / "ca"))

    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path, tls=server_files)
        client = await NbdClient.connect(NbdAddress("img", socket=sock, tls=True),
                                         tls=client_files)
        try:
            await cache.read(0, 8 * CHUNK)
            assert await client.read(CHUNK, 6 * CHUNK) == data[CHUNK : 7 * CHUNK]
            assert await client.read(6 * CHUNK, 4 * CHUNK) == data[6 * CHUNK : 10 * CHUNK]
            assert server.stats.sendfile_replies == 0
            assert server.stats.tls_sessions == 1
        finally:
            await client.close()
            await server.stop()
            await cache.close()

    run_on(loop, scenario)


def test_nbdcopy_reads_a_warm_cache_exactly(tmp_path: Path) -> None:
    """libnbd's nbdcopy (multi-conn, many requests in flight) copies the whole export from
    a half-warm cache; the copy is the image, and most of it went out with sendfile."""
    require("nbdcopy")
    out = tmp_path / "copy.raw"

    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path)
        try:
            await cache.read(0, SIZE // 2)
            for _ in range(2):  # half-warm, then warm
                proc = await asyncio.create_subprocess_exec(
                    "nbdcopy", f"nbd+unix:///img?socket={sock}", str(out),
                    stderr=asyncio.subprocess.PIPE)
                _, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 0, err.decode()
                assert out.read_bytes() == data
                out.unlink()
            assert server.stats.sendfile_replies >= 1
        finally:
            await server.stop()
            await cache.close()

    run_on("uvloop", scenario)
    assert shutil.which("nbdcopy")


async def test_read_location_only_for_ranges_whose_chunks_are_all_ready(tmp_path: Path) -> None:
    data = image_bytes(SIZE)
    cache = CachedDevice(MemoryDevice(data=data, read_only=True), tmp_path / "cache",
                         chunk_size=CHUNK)
    await cache.open()
    try:
        assert cache.read_location(0, CHUNK) is None
        await cache.read(0, 2 * CHUNK)
        hits = cache.stats.extra.get("hits", 0)
        where = cache.read_location(100, 2 * CHUNK - 100)
        assert where is not None
        fd, pos = where
        assert os.pread(fd, 2 * CHUNK - 100, pos) == data[100 : 2 * CHUNK]
        assert cache.stats.extra["hits"] == hits + 1  # counted as the read it stands for
        assert cache.read_location(CHUNK, 2 * CHUNK) is None  # chunk 2 is not ready
        assert cache.read_location(0, 0) is None
        assert cache.read_location(SIZE - 10, 20) is None  # past the end
        assert cache.stats.extra["hits"] == hits + 1
    finally:
        await cache.close()


class _NoRoom:
    """A space gate that admits nothing: the cache passes every fetched chunk through."""

    def admit(self, nbytes: int) -> bool:
        return False

    def disk_full(self) -> None:
        pass


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cold_reads_go_out_with_sendfile_once_stored(tmp_path: Path, loop: str) -> None:
    """A cold READ (its chunks fetched for it, several in flight at once so they go
    upstream as runs) is answered from the store file once its chunks are stored, not
    from Python bytes; exact, and each chunk fetched once."""
    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path)
        client = await NbdClient.connect(NbdAddress("img", socket=sock))
        try:
            ranges = [(o, 2 * CHUNK) for o in range(0, 32 * CHUNK, 2 * CHUNK)]
            ranges.append((SIZE - 3 * CHUNK + 7, 3 * CHUNK - 7))  # to the short last chunk
            got = await asyncio.gather(*(client.read(o, n) for o, n in ranges))
            for (o, n), g in zip(ranges, got, strict=True):
                assert g == data[o : o + n], (o, n)
            assert server.stats.sendfile_replies == len(ranges)
            assert cache.stats.extra.get("hits", 0) == 0
            assert cache.stats.extra["fetched_bytes"] == 35 * CHUNK + 1000  # chunks 0-31, 61-64
            assert server.stats.bytes_read == sum(n for _, n in ranges)
        finally:
            await client.close()
            await server.stop()
            await cache.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cold_reads_a_full_cache_passes_through_are_sent_from_memory(
        tmp_path: Path, loop: str) -> None:
    """Chunks the cache could not store are not in the file: the READ is answered with
    the fetched bytes, exact, and nothing is sent from the file."""
    async def scenario() -> None:
        data, cache, server, sock = await cached_server(tmp_path)
        cache.space_gate = _NoRoom()
        client = await NbdClient.connect(NbdAddress("img", socket=sock))
        try:
            got = await asyncio.gather(*(client.read(o, 2 * CHUNK)
                                         for o in range(0, 16 * CHUNK, 2 * CHUNK)))
            for k, g in enumerate(got):
                assert g == data[2 * k * CHUNK : 2 * (k + 1) * CHUNK]
            assert server.stats.sendfile_replies == 0
            assert cache.stats.extra["passthrough_chunks"] == 16
            assert cache.chunks_present == 0
        finally:
            await client.close()
            await server.stop()
            await cache.close()

    run_on(loop, scenario)


async def test_read_or_locate_locates_only_what_it_stored(tmp_path: Path) -> None:
    data = image_bytes(SIZE)
    cache = CachedDevice(MemoryDevice(data=data, read_only=True), tmp_path / "cache",
                         chunk_size=CHUNK)
    await cache.open()
    try:
        where = await cache.read_or_locate(CHUNK - 10, 2 * CHUNK)  # cold: fetched, stored
        assert isinstance(where, tuple)
        fd, pos = where
        assert os.pread(fd, 2 * CHUNK, pos) == data[CHUNK - 10 : 3 * CHUNK - 10]
        assert cache.stats.extra["misses"] == 3
        cache.space_gate = _NoRoom()
        got = await cache.read_or_locate(4 * CHUNK + 1, CHUNK)  # passed through: bytes
        assert got == data[4 * CHUNK + 1 : 5 * CHUNK + 1]
        assert await cache.read_or_locate(0, 0) == b""
        assert cache.stats.reads == 3
    finally:
        await cache.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_relay_over_nbd_fills_cold_from_payloads_received_in_place(
        tmp_path: Path, loop: str) -> None:
    """The whole relay path over real sockets: origin server, RemoteDevice, cache, relay
    server, client. The upstream hands runs on as read-only views of the arrays they
    were received into; the relay stores them and sends each cold READ from the store;
    every byte is exact, in the client's reply and in the store."""
    from virtman.blockdev import RemoteDevice

    async def scenario() -> None:
        data = image_bytes(SIZE)
        origin = NbdServer({"origin": MemoryDevice(data=data, read_only=True)})
        origin_sock = str(tmp_path / "origin.sock")
        await origin.listen_unix(origin_sock)
        remote = RemoteDevice([f"nbd+unix:///origin?socket={origin_sock}"])
        cache = CachedDevice(remote, tmp_path / "cache", chunk_size=CHUNK)
        await cache.open()
        relay = NbdServer({"img": cache}, sendfile_min=4096)
        sock = str(tmp_path / "relay.sock")
        await relay.listen_unix(sock)
        client = await NbdClient.connect(NbdAddress("img", socket=sock))
        try:
            # 1 MiB: more than one read's room of a fresh connection, so most of it is
            # received in place (a payload all in one read is copied out, as bytes).
            view = await remote.read_buffer(0, 16 * CHUNK)
            assert isinstance(view, memoryview) and view.readonly
            assert view == data[: 16 * CHUNK]
            ranges = [(o, CHUNK) for o in range(0, SIZE - CHUNK, CHUNK)]
            got = await asyncio.gather(*(client.read(o, n) for o, n in ranges))
            for (o, n), g in zip(ranges, got, strict=True):
                assert g == data[o : o + n], (o, n)
            assert relay.stats.sendfile_replies == len(ranges)
            assert cache.chunks_present == len(ranges)
            where = cache.read_location(0, len(ranges) * CHUNK)
            assert where is not None
            assert os.pread(where[0], len(ranges) * CHUNK, where[1]) == \
                data[: len(ranges) * CHUNK]
        finally:
            await client.close()
            await relay.stop()
            await cache.close()
            await origin.stop()

    run_on(loop, scenario)
