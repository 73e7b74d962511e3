"""The one interface every block device answers.

A block device is a fixed-size array of bytes with asynchronous read, write,
write-zeroes, trim and flush. Semantics follow NBD's: a write may be acknowledged
before it is durable; ``flush()`` makes every write acknowledged before it durable;
``fua=True`` makes that one write durable before it returns. Devices raise
``InvalidRequest`` (with the NBD errno) for requests that cannot be served as asked and
``DeviceError`` when storage fails, so a server can answer either with the right errno.

The NBD server does not import this module: it is typed against ``virtman.device.Device``,
the same requests as a structural protocol below both layers, which every ``BlockDevice``
matches (mypy checks it wherever a device is handed to a server).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from virtman.errors import DeviceError, InvalidRequest
from virtman.protocol.nbd.constants import Errno


class DeviceState(enum.Enum):
    CREATED = "created"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class DeviceStats:
    """Counters an operator (and the benchmarks) read; every device keeps its own."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    flushes: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def bump(self, key: str, n: int = 1) -> None:
        self.extra[key] = self.extra.get(key, 0) + n


class BlockDevice(abc.ABC):
    """Abstract block device. Subclasses set ``size`` and ``read_only`` when opened."""

    size: int = 0
    read_only: bool = True
    #: Whether TRIM does anything (it may always be accepted as a no-op).
    supports_trim: bool = False

    def __init__(self) -> None:
        self.state = DeviceState.CREATED
        self.stats = DeviceStats()

    async def open(self) -> None:
        """Make the device usable. Idempotent."""
        self.state = DeviceState.OPEN

    async def open_offline(self, size: int) -> bool:
        """Open without reaching the device's source, trusting a size known from before.

        Only devices whose source may come back later (a remote) can; they return True
        and keep trying to reach it. The default cannot and returns False.
        """
        return False

    async def close(self) -> None:
        """Flush what is pending and release resources. Idempotent."""
        self.state = DeviceState.CLOSED

    async def __aenter__(self) -> BlockDevice:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``."""

    async def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        """``read``, as any immutable buffer: a device that receives its data into
        buffers of its own (``RemoteDevice``) hands them on without copying them into
        ``bytes``. A relay's cache stores and checks such a buffer as it is."""
        return await self.read(offset, length)

    async def read_verified(
        self, offset: int, length: int, check: Callable[[bytes], bool], attempts: int
    ) -> bytes:
        """Read until the data passes ``check``, at most ``attempts`` times.

        Devices with several sources (``RemoteDevice``) take each attempt from another
        one; raise ``DeviceError`` (EIO) when no attempt passes.
        """
        for _ in range(attempts):
            data = await self.read(offset, length)
            if check(data):
                return data
            self.stats.bump("bad_data")
        raise DeviceError(f"{self.describe()}: READ offset={offset} length={length} failed "
                          f"its check {attempts} times", errno=Errno.EIO)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; durable on return when ``fua``."""
        raise InvalidRequest(f"{self.describe()} is read-only", errno=Errno.EPERM)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read as zeros. The default writes zero blocks."""
        self.check_write(offset, length)
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            await self.write(pos, bytes(min(step, offset + length - pos)), fua=False)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Hint that the range is unused. The default does nothing, as NBD allows."""
        self.check_write(offset, length)

    async def flush(self) -> None:
        """Make every acknowledged write durable. Devices without a write cache: nothing."""
        return None

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation of a range as (length, NBD ``base:allocation`` flags) extents.

        The default says "all data", which is always correct, only not informative.
        """
        self.check_range(offset, length)
        return [(length, 0)]

    def describe(self) -> str:
        return type(self).__name__

    # --- checks shared by every device ----------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequest(
                f"{self.describe()}: range offset={offset} length={length} outside 0..{self.size}",
                errno=Errno.EINVAL,
            )

    def check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise InvalidRequest(f"{self.describe()} is read-only", errno=Errno.EPERM)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidRequest(
                f"{self.describe()}: write offset={offset} length={length} past the end "
                f"({self.size} bytes)",
                errno=Errno.ENOSPC,
            )
