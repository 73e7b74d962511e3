"""FaultyDevice: a wrapper that injects faults, for tests and failure drills.

It passes everything to the inner device, except that it can delay each read, fail
the next N reads with an I/O error, or corrupt the next N reads (flip one byte), so
retry, failover and digest checks can be exercised against real devices, not mocks.
"""

from __future__ import annotations

import asyncio

from virtman.blockdev.base import BlockDevice
from virtman.errors import DeviceError


class FaultyDevice(BlockDevice):
    def __init__(self, inner: BlockDevice, *, delay: float = 0.0, fail_reads: int = 0,
                 corrupt_reads: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        self.fail_reads = fail_reads
        self.corrupt_reads = corrupt_reads

    def describe(self) -> str:
        return f"faulty {self.inner.describe()}"

    async def open(self) -> None:
        await self.inner.open()
        self.size = self.inner.size
        self.read_only = self.inner.read_only
        await super().open()

    async def close(self) -> None:
        await self.inner.close()
        await super().close()

    async def read(self, offset: int, length: int) -> bytes:
        self.stats.reads += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_reads > 0:
            self.fail_reads -= 1
            raise DeviceError(f"injected read failure at {offset}")
        data = await self.inner.read(offset, length)
        if self.corrupt_reads > 0 and data:
            self.corrupt_reads -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.inner.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.inner.write_zeroes(offset, length, fua=fua)

    async def flush(self) -> None:
        await self.inner.flush()
