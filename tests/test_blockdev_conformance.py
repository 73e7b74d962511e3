"""One conformance suite, run against every block device (STYLE.md principle 2)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from devices import KINDS, PERSISTENT, Rig, build

from virtman.errors import InvalidRequest
from virtman.protocol.nbd.constants import Errno

SIZE = 1 << 20


@pytest.fixture(params=KINDS)
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await build(request.param, tmp_path, SIZE)
    yield r
    await r.close()


async def test_size_and_whole_content(rig: Rig) -> None:
    assert rig.device.size == SIZE
    assert await rig.device.read(0, SIZE) == rig.initial


@pytest.mark.parametrize(("offset", "length"), [(0, 1), (1, 4095), (4095, 2), (65535, 65538),
                                                (SIZE - 1, 1), (SIZE - 5000, 5000), (12345, 0)])
async def test_reads_at_any_alignment(rig: Rig, offset: int, length: int) -> None:
    assert await rig.device.read(offset, length) == rig.initial[offset : offset + length]


@pytest.mark.parametrize(("offset", "length"), [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, SIZE + 1)])
async def test_read_out_of_range_is_einval(rig: Rig, offset: int, length: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        await rig.device.read(offset, length)
    assert info.value.errno == Errno.EINVAL


async def test_write_read_back(rig: Rig) -> None:
    if not rig.writable:
        with pytest.raises(InvalidRequest) as info:
            await rig.device.write(0, b"x")
        assert info.value.errno == Errno.EPERM
        return
    model = bytearray(rig.initial)
    for offset, length in [(0, 4096), (1000, 5000), (4095, 2), (70000, 131072), (SIZE - 3, 3)]:
        payload = random.Random(offset).randbytes(length)
        await rig.device.write(offset, payload)
        model[offset : offset + length] = payload
        assert await rig.device.read(offset - 1 if offset else 0, length) == bytes(
            model[offset - 1 if offset else 0 : (offset - 1 if offset else 0) + length])
    assert await rig.device.read(0, SIZE) == bytes(model)


async def test_write_past_end_is_enospc(rig: Rig) -> None:
    with pytest.raises(InvalidRequest) as info:
        await rig.device.write(SIZE - 1, b"ab")
    assert info.value.errno == (Errno.ENOSPC if rig.writable else Errno.EPERM)
    assert await rig.device.read(SIZE - 1, 1) == rig.initial[-1:]


async def test_write_zeroes_reads_zeros(rig: Rig) -> None:
    if not rig.writable:
        with pytest.raises(InvalidRequest):
            await rig.device.write_zeroes(0, 4096)
        return
    for offset, length in [(100, 50), (8192, 65536), (5000, 20000)]:
        await rig.device.write_zeroes(offset, length)
        assert await rig.device.read(offset, length) == bytes(length)
    assert await rig.device.read(0, 100) == rig.initial[:100]
    assert await rig.device.read(80000, 100) == rig.initial[80000:80100]


async def test_flush_and_fua(rig: Rig) -> None:
    await rig.device.flush()
    if rig.writable:
        await rig.device.write(4096, b"z" * 4096, fua=True)
        assert await rig.device.read(4096, 4096) == b"z" * 4096


async def test_concurrent_reads_and_writes(rig: Rig) -> None:
    rng = random.Random(3)
    model = bytearray(rig.initial)
    if rig.writable:
        # Non-overlapping writes in flight together, several in one overlay block.
        writes = [(i * 1500 + 7, rng.randbytes(1000)) for i in range(40)]
        await asyncio.gather(*(rig.device.write(o, d) for o, d in writes))
        for o, d in writes:
            model[o : o + len(d)] = d
    spans = [(rng.randrange(SIZE - 70000), rng.randrange(1, 70000)) for _ in range(50)]
    got = await asyncio.gather(*(rig.device.read(o, n) for o, n in spans))
    for (o, n), data in zip(spans, got, strict=True):
        assert data == bytes(model[o : o + n])


async def test_restart_keeps_content(rig: Rig) -> None:
    model = bytearray(rig.initial)
    if rig.writable:
        await rig.device.write(3000, b"persist" * 1000)
        model[3000 : 3000 + 7000] = b"persist" * 1000
    await rig.device.read(0, SIZE)
    await rig.restart()
    if rig.kind in PERSISTENT or rig.kind == "memory":
        assert await rig.device.read(0, SIZE) == bytes(model)
