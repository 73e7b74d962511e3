"""CachedDevice: one fetch per chunk, digests, crash safety, reuse."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from devices import crash, image_bytes

from virtman.blockdev import CachedDevice, FaultyDevice, MemoryDevice
from virtman.blockdev.manifest import compute_manifest
from virtman.errors import DeviceError

CHUNK = 64 * 1024
SIZE = 16 * CHUNK + 1000  # a short last chunk too


def origin() -> MemoryDevice:
    return MemoryDevice(data=image_bytes(SIZE), read_only=True)


async def test_concurrent_misses_share_one_fetch(tmp_path: Path) -> None:
    upstream = FaultyDevice(origin(), delay=0.05)
    cache = CachedDevice(upstream, tmp_path, chunk_size=CHUNK)
    await cache.open()
    reads = [cache.read(CHUNK + i * 100, 5000) for i in range(20)]  # all in chunk 1..2
    results = await asyncio.gather(*reads)
    data = image_bytes(SIZE)
    for i, got in enumerate(results):
        assert got == data[CHUNK + i * 100 : CHUNK + i * 100 + 5000]
    assert upstream.stats.reads == 1  # 20 readers, one chunk fetched once
    await cache.read(0, SIZE)
    assert upstream.stats.reads == 17  # each chunk exactly once, the short one included
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
    assert upstream.stats.reads == 15       # everything but the two durable chunks
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
