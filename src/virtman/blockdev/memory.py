"""MemoryDevice: bytes in memory. The model the other devices are checked against,
and a scratch device for tests and fault injection (see ``faults``)."""

from __future__ import annotations

from virtman.blockdev.base import BlockDevice
from virtman.errors import ConfigError


class MemoryDevice(BlockDevice):
    supports_trim = True

    def __init__(
        self, size: int | None = None, *, data: bytes | None = None, read_only: bool = False
    ) -> None:
        super().__init__()
        if data is None:
            if size is None:
                raise ConfigError("MemoryDevice needs a size or data")
            data = bytes(size)
        self.buffer = bytearray(data)
        self.size = len(self.buffer)
        self.read_only = read_only

    def describe(self) -> str:
        return f"memory ({self.size} bytes)"

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        return bytes(self.buffer[offset : offset + length])

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.check_write(offset, len(data))
        self.buffer[offset : offset + len(data)] = data
        self.stats.writes += 1
        self.stats.bytes_written += len(data)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_write(offset, length)
        self.buffer[offset : offset + length] = bytes(length)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, fua=fua)
