#!/usr/bin/env python3
"""What checking a cache at rest costs: at start, on a chunk's first read, and at fill.

A warm cache of ``--size`` bytes (every chunk held) is made in a temporary directory,
closed, and opened again, once verified by per-chunk checksums and once by a digest
manifest. Printed per mode:

- ``open``: opening the warm cache (header, map and checksum table; chunks are checked
  lazily, so this is all a restart costs);
- ``first read``: reading every chunk once after the restart (pread + check), per chunk;
- ``next read``: reading every chunk again (pread only), per chunk; the difference to
  the first read is the check;
- ``eager``: what checking every held chunk at start would cost instead (read + check
  of all of them), the alternative this project did not take;
- ``fill``: fetching every chunk into an empty cache from an in-memory upstream,
  per chunk, with the checksum written (the cost of keeping checksums at fill time is
  the ``xxh3`` figure below, per chunk).

The cache file stays in the page cache (it was just written), so the figures isolate
the CPU cost of checking; a cold disk adds its own read time to first reads and to an
eager check alike. Example:

    PYTHONPATH=src python bench/cache_check.py --size 256M
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.manifest import Manifest, compute_manifest
from virtman.blockdev.memory import MemoryDevice
from virtman.blockdev.store import unit_checksum
from virtman.limits import DEFAULT_CHUNK_SIZE
from virtman.sizes import parse_size


async def one_mode(data: bytes, chunk: int, manifest: Manifest | None, tmp: str) -> None:
    label = "manifest (SHA-256)" if manifest is not None else "checksum (XXH3-64)"
    count = (len(data) + chunk - 1) // chunk
    origin = MemoryDevice(data=data, read_only=True)
    cache = CachedDevice(origin, tmp, chunk_size=chunk, manifest=manifest)
    await cache.open()
    t = time.perf_counter()
    for offset in range(0, len(data), chunk):
        await cache.read(offset, min(chunk, len(data) - offset))
    fill = time.perf_counter() - t
    await cache.close()

    cache = CachedDevice(origin, tmp, chunk_size=chunk, manifest=manifest)
    t = time.perf_counter()
    await cache.open()
    opened = time.perf_counter() - t
    passes = []
    for _ in range(2):
        t = time.perf_counter()
        for offset in range(0, len(data), chunk):
            await cache.read(offset, min(chunk, len(data) - offset))
        passes.append(time.perf_counter() - t)
    assert cache.stats.extra.get("chunks_checked") == count, cache.stats.extra
    assert origin.stats.reads == count  # only the fill fetched
    store = cache._store
    assert store is not None
    t = time.perf_counter()
    for index in range(count):
        got = store.pread(index * chunk, min(chunk, len(data) - index * chunk))
        ok = manifest.matches(index, got) if manifest else store.checksum_matches(index, got)
        assert ok
    eager = time.perf_counter() - t
    await cache.close()
    os.unlink(cache.path)
    us = 1e6 / count
    print(f"{label}: {count} chunks of {chunk // 1024} KiB")
    print(f"  open (warm cache, lazy check)  {opened * 1e3:8.1f} ms")
    print(f"  first read after restart       {passes[0] * us:8.1f} us/chunk")
    print(f"  next read                      {passes[1] * us:8.1f} us/chunk")
    print(f"  check on first read            {(passes[0] - passes[1]) * us:8.1f} us/chunk")
    print(f"  eager check of all at start    {eager * 1e3:8.1f} ms "
          f"({len(data) / eager / 1e9:.2f} GB/s)")
    print(f"  fill from memory upstream      {fill * us:8.1f} us/chunk")


def hash_rates(chunk: int) -> None:
    block = random.Random(2).randbytes(chunk)
    for name, fn in (("xxh3", unit_checksum), ("sha256", lambda b: hashlib.sha256(b).digest())):
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            fn(block)
        dt = time.perf_counter() - t
        print(f"  {name:7s} of one chunk          {dt / n * 1e6:8.1f} us "
              f"({chunk * n / dt / 1e9:.2f} GB/s)")


async def main_async(args: argparse.Namespace) -> None:
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.platform()}, python {platform.python_version()}")
    data = os.urandom(args.size)
    hash_rates(args.chunk_size)
    manifest = await compute_manifest(MemoryDevice(data=data, read_only=True), args.chunk_size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        await one_mode(data, args.chunk_size, None, tmp)
        await one_mode(data, args.chunk_size, manifest, tmp)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--dir", help="where the cache file goes (default: the system's tmp)")
    asyncio.run(main_async(p.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
