"""CachedDevice: one fetch per chunk, digests, crash safety, reuse."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_tmpfs
from devices import crash, image_bytes

from virtman.blockdev import CachedDevice, FaultyDevice, MemoryDevice
from virtman.blockdev.base import BlockDevice, DeviceState
from virtman.blockdev.cached import CacheSpace
from virtman.blockdev.manifest import compute_manifest
from virtman.blockdev.store import CHECKSUM, HEADER_SIZE, MAGIC, StoreFile, StoreHeader
from virtman.errors import DeviceError

CHUNK = 64 * 1024
SIZE = 16 * CHUNK + 1000  # a short last chunk too


def origin() -> MemoryDevice:
    return MemoryDevice(data=image_bytes(SIZE), read_only=True)


async def test_concurrent_misses_share_one_fetch(tmp_path: Path) -> None:
    source = origin()
    upstream = FaultyDevice(source, delay=0.05)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    reads = [cache.read(CHUNK + i * 100, 5000) for i in range(20)]  # all in chunk 1
    results = await asyncio.gather(*reads)
    data = image_bytes(SIZE)
    for i, got in enumerate(results):
        assert got == data[CHUNK + i * 100 : CHUNK + i * 100 + 5000]
    assert upstream.stats.reads == 1  # 20 readers, one chunk fetched once
    await cache.read(0, SIZE)
    assert source.stats.bytes_read == SIZE  # each chunk exactly once, the short one included
    assert upstream.stats.reads == 3  # chunk 1, then the runs of misses 0 and 2..16
    assert cache.chunks_present == 17
    await cache.close()


async def test_corrupt_chunk_is_refetched_never_served(tmp_path: Path) -> None:
    manifest = await compute_manifest(origin(), CHUNK)
    upstream = FaultyDevice(origin(), corrupt_reads=2)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    assert await cache.read(0, 100) == image_bytes(SIZE)[:100]
    assert cache.stats.extra["digest_mismatches"] == 2
    assert upstream.stats.reads == 3
    await cache.close()


async def test_chunk_failing_every_digest_is_an_error_and_not_cached(tmp_path: Path) -> None:
    manifest = await compute_manifest(origin(), CHUNK)
    upstream = FaultyDevice(origin(), corrupt_reads=100)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, manifest=manifest,
                         max_digest_retries=3)
    await cache.open()
    with pytest.raises(DeviceError) as info:
        await cache.read(0, 100)
    assert info.value.errno == 5 and "digest" in str(info.value)
    assert not cache.is_present(0)
    upstream.corrupt_reads = 0
    assert await cache.read(0, 100) == image_bytes(SIZE)[:100]
    await cache.close()


async def test_clean_restart_reuses_every_chunk(tmp_path: Path) -> None:
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    await cache.read(0, SIZE)
    await cache.close()
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    assert cache.chunks_present == 17
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert upstream.stats.reads == 0
    await cache.close()


async def test_crash_never_serves_a_torn_chunk(tmp_path: Path) -> None:
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, sync_interval=3600)
    await cache.open()
    await cache.read(0, 2 * CHUNK)          # chunks 0, 1 fetched
    assert cache._store is not None
    cache._store.sync()                     # ...and durable
    await cache.read(5 * CHUNK, 10)         # chunk 5 fetched, not yet durable
    path, data_offset = cache.path, cache._store.data_offset
    crash(cache)
    # The crash tore chunk 5 on disk (half written) and left junk in chunk 6.
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"\xee" * (CHUNK // 2), data_offset + 5 * CHUNK)
    os.pwrite(fd, b"\xee" * CHUNK, data_offset + 6 * CHUNK)
    os.close(fd)
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    assert cache.is_present(0) and cache.is_present(1)
    assert not cache.is_present(5) and not cache.is_present(6)
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert upstream.stats.bytes_read == SIZE - 2 * CHUNK  # all but the two durable chunks
    await cache.close()


async def test_store_of_another_image_is_discarded(tmp_path: Path) -> None:
    cache = CachedDevice(origin(), tmp_path, chunk_size=CHUNK)
    await cache.open()
    await cache.read(0, SIZE)
    await cache.close()
    other = MemoryDevice(data=image_bytes(SIZE, seed=99), read_only=True)
    manifest = await compute_manifest(other, CHUNK)
    cache = CachedDevice(other, tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    assert cache.chunks_present == 0
    assert await cache.read(0, SIZE) == image_bytes(SIZE, seed=99)
    await cache.close()


async def test_upstream_failure_is_reported_and_retried_later(tmp_path: Path) -> None:
    upstream = FaultyDevice(origin(), fail_reads=1)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    with pytest.raises(DeviceError):
        await cache.read(0, 10)
    assert await cache.read(0, 10) == image_bytes(SIZE)[:10]
    await cache.close()


class FailingChunk(BlockDevice):
    """Reads of ``inner`` that fail whenever they touch chunk ``bad``."""

    def __init__(self, inner: BlockDevice, bad: int) -> None:
        super().__init__()
        self.inner, self.bad = inner, bad
        self.requests: list[tuple[int, int]] = []

    def describe(self) -> str:
        return f"chunk {self.bad} failing over {self.inner.describe()}"

    async def open(self) -> None:
        await self.inner.open()
        self.size, self.read_only = self.inner.size, True
        self.state = DeviceState.OPEN

    async def read(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        await asyncio.sleep(0.01)
        if offset < (self.bad + 1) * CHUNK and offset + length > self.bad * CHUNK:
            raise DeviceError(f"injected failure of chunk {self.bad}")
        return await self.inner.read(offset, length)


async def test_adjacent_misses_of_one_turn_go_upstream_as_one_read_per_run(
        tmp_path: Path) -> None:
    source = origin()
    upstream = FaultyDevice(source, delay=0.01)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, miss_run_bytes=4 * CHUNK)
    await cache.open()
    wanted = [*range(10), 12]  # 0..9 adjacent (runs of at most 4), 12 alone
    got = await asyncio.gather(*(cache.read(i * CHUNK, CHUNK) for i in wanted))
    data = image_bytes(SIZE)
    assert got == [data[i * CHUNK : (i + 1) * CHUNK] for i in wanted]
    assert upstream.stats.reads == 4  # 0-3, 4-7, 8-9, 12
    assert source.stats.bytes_read == len(wanted) * CHUNK
    assert cache.chunks_present == len(wanted)
    await cache.close()


async def test_a_chunk_failing_in_a_joined_read_fails_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtman")
    upstream = FailingChunk(origin(), bad=5)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    got = await asyncio.gather(*(cache.read(i * CHUNK, CHUNK) for i in range(3, 8)),
                               return_exceptions=True)
    data = image_bytes(SIZE)
    for i, result in zip(range(3, 8), got, strict=True):
        if i == 5:
            assert isinstance(result, DeviceError) and "chunk 5" in str(result)
        else:
            assert result == data[i * CHUNK : (i + 1) * CHUNK]
    assert [cache.is_present(i) for i in range(3, 8)] == [True, True, False, True, True]
    # One joined read, then each chunk alone.
    assert upstream.requests[0] == (3 * CHUNK, 5 * CHUNK) and len(upstream.requests) == 6
    assert "fetching each alone" in caplog.text
    await cache.close()


async def test_a_joined_read_failing_its_digest_is_read_again_and_never_served(
        tmp_path: Path) -> None:
    manifest = await compute_manifest(origin(), CHUNK)
    upstream = FaultyDevice(origin(), corrupt_reads=1)  # corrupts chunk 0 of the first read
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    assert await cache.read(0, 4 * CHUNK) == image_bytes(SIZE)[: 4 * CHUNK]
    assert cache.stats.extra["digest_mismatches"] == 1
    assert upstream.stats.reads == 2  # the run, then the run again
    await cache.close()


async def test_a_reader_giving_up_does_not_stop_the_fetch_for_the_others(
        tmp_path: Path) -> None:
    upstream = FaultyDevice(origin(), delay=0.05)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    quitter = asyncio.create_task(cache.read(0, 100))
    stayer = asyncio.create_task(cache.read(0, 2 * CHUNK))
    await asyncio.sleep(0.01)
    quitter.cancel()
    assert await stayer == image_bytes(SIZE)[: 2 * CHUNK]
    assert quitter.cancelled() and upstream.stats.reads == 1
    assert cache.is_present(0) and cache.is_present(1)
    # Closing stops a fetch under way: its readers get an error, not a hang.
    slow = asyncio.create_task(cache.read(5 * CHUNK, 10))
    await asyncio.sleep(0.01)
    await cache.close()
    with pytest.raises(DeviceError, match="closed while chunk 5"):
        await slow


def test_a_run_of_units_is_stored_with_each_units_own_checksum(tmp_path: Path) -> None:
    data = image_bytes(SIZE)
    store = StoreFile.create(str(tmp_path / "s.vmstore"),
                             StoreHeader("cache", SIZE, CHUNK, {}, CHECKSUM))
    try:
        store.fill(14, data[14 * CHUNK :], 3)  # the last of them short
        assert [store.present[i] for i in range(13, 17)] == [0, 1, 1, 1]
        for i in range(14, 17):
            piece = data[i * CHUNK : (i + 1) * CHUNK]
            assert store.checksum_matches(i, piece)
            assert not store.checksum_matches(i, bytes([piece[0] ^ 1]) + piece[1:])
        assert store.pread(14 * CHUNK, SIZE - 14 * CHUNK) == data[14 * CHUNK :]
        assert store.sync() == 3
    finally:
        store.close()
    reopened = StoreFile.open(str(tmp_path / "s.vmstore"))
    try:
        assert reopened.units_present == 3
        assert all(reopened.checksum_matches(i, data[i * CHUNK : (i + 1) * CHUNK])
                   for i in range(14, 17))
    finally:
        reopened.close()


# --- checked at rest ----------------------------------------------------------------------


def flip_chunk(cache: CachedDevice, index: int) -> None:
    """Invert one byte of a held chunk in the (closed) store file."""
    store = StoreFile.open(cache.path)
    try:
        at = store.data_offset + index * CHUNK + 100
        os.pwrite(store.fd, bytes([os.pread(store.fd, 1, at)[0] ^ 0xFF]), at)
    finally:
        os.close(store.fd)


def as_version_1(path: str) -> None:
    """Rewrite a store as this project's first format made it: no checksum table."""
    store = StoreFile.open(path)
    try:
        h = store.header
        doc = {"version": 1, "kind": h.kind, "size": h.size, "unit": h.unit, "meta": h.meta}
        raw = MAGIC + json.dumps(doc, sort_keys=True).encode()
        os.pwrite(store.fd, raw + bytes(HEADER_SIZE - len(raw)), 0)
        os.ftruncate(store.fd, h.data_offset + h.size)
    finally:
        os.close(store.fd)


@pytest.mark.parametrize("with_manifest", [False, True], ids=["checksum", "manifest"])
async def test_rotten_chunk_is_dropped_durably_counted_and_refetched(
        tmp_path: Path, with_manifest: bool, caplog: pytest.LogCaptureFixture) -> None:
    manifest = await compute_manifest(origin(), CHUNK) if with_manifest else None
    cache = CachedDevice(origin(), tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    await cache.read(0, SIZE)
    await cache.close()
    flip_chunk(cache, 2)
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, manifest=manifest,
                         sync_interval=3600)
    await cache.open()
    assert await cache.read(2 * CHUNK, 200) == image_bytes(SIZE)[2 * CHUNK : 2 * CHUNK + 200]
    assert cache.stats.extra["rotten_chunks"] == 1
    assert upstream.stats.reads == 1  # only the rotten chunk came from upstream
    assert "chunk 2 failed" in caplog.text
    # Dropped durably before it was filled again: a crash now leaves it absent on disk,
    # never "held" in front of whatever the refetch had written.
    crash(cache)
    assert StoreFile.open(cache.path).present[2] == 0
    # Every other chunk is checked once and served; none counted rotten.
    cache = CachedDevice(origin(), tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert cache.stats.extra["chunks_checked"] == 16
    assert "rotten_chunks" not in cache.stats.extra
    await cache.read(0, SIZE)
    assert cache.stats.extra["chunks_checked"] == 16  # once per session, not per read
    await cache.close()


async def test_store_without_checksums_is_kept_only_with_a_manifest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtman")
    manifest = await compute_manifest(origin(), CHUNK)
    cache = CachedDevice(origin(), tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    await cache.read(0, SIZE)
    await cache.close()
    as_version_1(cache.path)
    flip_chunk(cache, 5)
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK, manifest=manifest)
    await cache.open()
    assert cache.chunks_present == 17 and "predates per-chunk checksums" in caplog.text
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert cache.stats.extra["rotten_chunks"] == 1 and upstream.stats.reads == 1
    await cache.close()
    # Without a manifest nothing vouches for its chunks: a new store, all fetched.
    as_version_1(cache.path)
    upstream = origin()
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    assert cache.chunks_present == 0
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert upstream.stats.bytes_read == SIZE
    await cache.close()


# --- a full cache disk --------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test."""
    with small_tmpfs(tmp_path, "2m") as mount:
        yield mount


def fill_up(path: Path) -> None:
    """Take every free byte of a file system with one file."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


async def test_full_disk_passes_through_then_caches_again(
        tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtman")
    upstream = origin()
    cache = CachedDevice(upstream, tiny_fs, chunk_size=CHUNK, full_retry=0.05,
                         sync_interval=3600)
    await cache.open()
    fill_up(tiny_fs / "filler")
    for _ in range(3):
        assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert cache.space is CacheSpace.DISK_FULL
    assert cache.chunks_present == 0
    assert cache.stats.extra["passthrough_chunks"] == 3 * 17
    assert upstream.stats.bytes_read == 3 * SIZE  # nothing kept: every read went upstream
    assert caplog.text.count("cannot store chunks") == 1  # once per interval, not per chunk
    assert cache.space_status()["space"] == "disk_full"
    (tiny_fs / "filler").unlink()
    await asyncio.sleep(0.06)
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert cache.space is CacheSpace.CACHING and cache.chunks_present == 17
    assert "stores chunks again" in caplog.text
    reads = upstream.stats.reads
    assert await cache.read(0, SIZE) == image_bytes(SIZE)
    assert upstream.stats.reads == reads
    await cache.close()
