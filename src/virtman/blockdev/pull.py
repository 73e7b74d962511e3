"""PullDevice: a migrating VM's disk at its destination, pulling the source's written
blocks lazily while base blocks come from the destination's own cache.

Theory of operation
-------------------
During a live migration the destination's VM disk is a chain

    image cache (relay) <- store (an overlay: the source's blocks, as they arrive)
                        <- PullDevice (this) <- the VM's own new overlay (its writes)

The source exports its VM's disk read-only (``ReadOnlyView``) like a parent. Until the
switchover the source guest still writes, so in ``LIVE`` every read goes to the source
and nothing read is kept: a kept block could be stale a moment later. The destination's
QEMU hardly reads then (it waits for its memory), so this costs little.

At the switchover the source guest is paused for good (QEMU flushed its disk before its
migration completed), so its disk is final. ``switch(runs)`` takes the source's written
ranges at that moment and enters ``PULLING``: a read of a range the source wrote and
that is not here yet is fetched from the source in whole blocks and kept in the store;
every other read comes from the store, whose unallocated blocks are the image cache's.
``pull_all`` copies what is still missing in the background, and ``COMPLETE`` then
means the store holds everything: the source can go. ``pull_all`` lets go of the
source then, once the reads of it that raced the last pulls have ended (the source
withdraws its export, and a remote device would otherwise try to reconnect to it).

Only the pulls write to the store, always whole blocks of a disk that no longer
changes, so two pulls of one block (the guest's read and the background copy) write
the same bytes. The guest's writes never reach here: they land in the overlay above.
A crash before ``COMPLETE`` leaves a store that is not whole; the agent keeps it among
its unfinished imports, which it removes at start (the source still has the VM).
"""

from __future__ import annotations

import asyncio
import enum
import logging

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.cow import CowDevice
from virtman.errors import LocalProtocolError

log = logging.getLogger(__name__)


class ReadOnlyView(BlockDevice):
    """A device's reads only: what a source exports to its migration's destination.
    It neither opens nor closes the device it shows (the VM owns it)."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__()
        self.inner = inner
        self.size = inner.size
        self.read_only = True

    def describe(self) -> str:
        return f"read-only view of {self.inner.describe()}"

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.block_status(offset, length)


class PullState(enum.Enum):
    #: The source guest may still write: every read from the source, nothing kept.
    LIVE = "live"
    #: The source is final: its written blocks are pulled on first read and kept.
    PULLING = "pulling"
    #: Every written block of the source is here; the source is no longer read.
    COMPLETE = "complete"


class PullDevice(BlockDevice):
    """Reads the source's written blocks from ``source`` and the rest from ``store``
    (see the module's theory). It owns both: ``close`` closes them."""

    def __init__(self, store: CowDevice, source: BlockDevice) -> None:
        super().__init__()
        self.store = store
        self.source = source
        self.read_only = True
        self.pull_state = PullState.LIVE
        #: One byte per store block: 1 while the source wrote it and it is not here yet.
        self._wanted = bytearray()
        #: Bytes fetched from the source and kept (reads in LIVE are not counted here).
        self.pulled_bytes = 0
        #: Bytes read from the source in LIVE (served, not kept).
        self.live_bytes = 0
        #: Reads of the source under way, and set when there are none.
        self._pulls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def describe(self) -> str:
        return f"pull of {self.source.describe()} into {self.store.describe()}"

    async def open(self) -> None:
        await self.store.open()
        await self.source.open()
        if self.source.size != self.store.size:
            raise LocalProtocolError(
                f"{self.source.describe()} has {self.source.size} bytes, the image "
                f"{self.store.size}: not a disk of this image"
            )
        self.size = self.store.size
        self._wanted = bytearray(-(-self.size // self.store.block_size))
        await super().open()

    async def close(self) -> None:
        await self.source.close()
        await self.store.close()
        await super().close()

    # --- the switchover -------------------------------------------------------------------

    def switch(self, runs: list[tuple[int, int]]) -> int:
        """The source is final and wrote ``runs``: pull those from now on. Returns the
        bytes still to pull."""
        if self.pull_state is not PullState.LIVE:
            raise LocalProtocolError(f"{self.describe()}: switched twice")
        bs = self.store.block_size
        for offset, length in runs:
            if offset < 0 or length <= 0 or offset + length > self.size:
                raise LocalProtocolError(
                    f"written range offset={offset} length={length} outside 0..{self.size}"
                )
            first, last = offset // bs, (offset + length - 1) // bs
            self._wanted[first : last + 1] = b"\1" * (last - first + 1)
        self.pull_state = PullState.PULLING
        return self._wanted.count(1) * bs

    async def pull_all(self, piece_bytes: int) -> int:
        """Pull every wanted block not pulled yet, ``piece_bytes`` at most per read;
        then the device is ``COMPLETE`` and the store flushed. Bytes pulled here."""
        if self.pull_state is PullState.LIVE:
            raise LocalProtocolError(f"{self.describe()}: pull before the switchover")
        bs = self.store.block_size
        per_piece = max(1, piece_bytes // bs)
        before = self.pulled_bytes
        block = self._wanted.find(1)
        while block >= 0:
            end = self._wanted.find(0, block)
            end = len(self._wanted) if end < 0 else min(end, block + per_piece)
            await self._pull(block, end)
            block = self._wanted.find(1, end)
        await self.store.flush()
        self.pull_state = PullState.COMPLETE
        # The source is no longer read: let go of it once the pulls of guest reads that
        # raced this one have ended (it would else reconnect to an export that is gone).
        await self._idle.wait()
        await self.source.close()
        return self.pulled_bytes - before

    async def _pull(self, first: int, end: int) -> None:
        """Fetch blocks ``first`` up to ``end`` from the source and keep them."""
        bs = self.store.block_size
        offset = first * bs
        length = min(end * bs, self.size) - offset
        self._enter()
        try:
            data = await self.source.read(offset, length)
            await self.store.write(offset, data)
        finally:
            self._leave()
        self._wanted[first:end] = bytes(end - first)
        self.pulled_bytes += length

    def _enter(self) -> None:
        self._pulls += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._pulls -= 1
        if self._pulls == 0:
            self._idle.set()

    # --- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if self.pull_state is PullState.LIVE:
            self.live_bytes += length
            self._enter()
            try:
                return await self.source.read(offset, length)
            finally:
                self._leave()
        if self.pull_state is PullState.COMPLETE or length == 0:
            return await self.store.read(offset, length)
        bs = self.store.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        block = self._wanted.find(1, first, last + 1)
        while block >= 0:
            end = self._wanted.find(0, block, last + 1)
            end = last + 1 if end < 0 else end
            await self._pull(block, end)
            block = self._wanted.find(1, end, last + 1)
        # Everything in the range is here now (pulls only ever clear ``_wanted``).
        return await self.store.read(offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self.check_range(offset, length)
        return [(length, 0)]
