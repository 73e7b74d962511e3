"""CowDevice: a persistent copy-on-write overlay over a read-only base.

Theory of operation
-------------------
The overlay is a store file (``store.py``) cut into blocks (4 KiB by default). A block
is either *allocated* (its bytes live in the overlay) or not (its bytes are the base's).
Reads split the range into runs of allocated and unallocated blocks and take each run
from the overlay or the base. The base is only ever read.

A write covering whole blocks writes them to the overlay. A write covering part of an
unallocated block must first fill the rest of that block from the base
(read-modify-write). The base read is the only wait in a write; after it, the
allocation of the edge blocks is looked at again and everything up to marking the
blocks allocated runs without waiting, so two writes into one block can never undo
each other: the later one merges onto what the earlier one wrote.

Durability follows NBD: a write is acknowledged once it is in the overlay file;
``flush()`` (and FUA) make the data and then the allocation map durable, in that order
(see the store's theory of crash consistency). A crash therefore loses at most writes
made since the last flush, each whole-block-or-nothing, and never shows a block as
allocated whose data did not reach the disk. WRITE_ZEROES of whole blocks punches holes
in the overlay and marks the blocks allocated (they read as zeros, not the base).
"""

from __future__ import annotations

import asyncio
import logging
import os

from virtman.blockdev.base import BlockDevice, DeviceState
from virtman.blockdev.sparse import punch_hole
from virtman.blockdev.store import StoreFile, StoreHeader
from virtman.errors import ConfigError, DeviceError
from virtman.limits import CACHE_SYNC_INTERVAL_SECONDS, DEFAULT_COW_BLOCK_SIZE

log = logging.getLogger(__name__)


class CowDevice(BlockDevice):
    supports_trim = False

    def __init__(
        self,
        base: BlockDevice,
        path: str | os.PathLike[str],
        *,
        block_size: int = DEFAULT_COW_BLOCK_SIZE,
        read_only: bool = False,
        sync_interval: float = CACHE_SYNC_INTERVAL_SECONDS,
        meta: dict[str, str] | None = None,
        owns_base: bool = True,
    ) -> None:
        super().__init__()
        if block_size < 512 or block_size & (block_size - 1):
            raise ConfigError(f"overlay block size {block_size} must be a power of two >= 512")
        self.base = base
        self.path = os.fspath(path)
        self.block_size = block_size
        self.read_only = read_only
        self.sync_interval = sync_interval
        self.meta = dict(meta or {})
        #: Whether close() closes the base too (not when VMs share one image cache).
        self.owns_base = owns_base
        self._store: StoreFile | None = None

    def describe(self) -> str:
        return f"overlay {self.path} over {self.base.describe()}"

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.state is DeviceState.OPEN:
            return
        await self.base.open()
        self.size = self.base.size
        if os.path.exists(self.path):
            store = StoreFile.open(self.path)
            header = store.header
            if header.kind != "overlay" or header.size != self.size:
                os.close(store.fd)
                raise ConfigError(
                    f"{self.path} is a {header.kind} of a {header.size}-byte device; the base "
                    f"has {self.size} bytes (refusing to reuse it)"
                )
            self.block_size = header.unit
            self.meta = dict(header.meta)
        else:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            store = StoreFile.create(
                self.path, StoreHeader("overlay", self.size, self.block_size, self.meta)
            )
        self._store = store
        if not self.read_only:
            self._store.start_syncing(self.sync_interval)
        self.state = DeviceState.OPEN

    async def close(self) -> None:
        if self._store is not None:
            await self._store.aclose()
            self._store = None
        if self.owns_base:
            await self.base.close()
        self.state = DeviceState.CLOSED


    def _open_store(self) -> StoreFile:
        if self._store is None:
            raise DeviceError(f"{self.describe()} is not open")
        return self._store

    @property
    def allocated_blocks(self) -> int:
        return sum(self._store.present) if self._store else 0

    def allocated_runs(self) -> list[tuple[int, int]]:
        """(offset, length) of every allocated range, for copying a VM's own data."""
        store = self._open_store()
        runs: list[tuple[int, int]] = []
        present, bs, n = store.present, self.block_size, len(store.present)
        i = present.find(1)
        while i >= 0:
            j = present.find(0, i)
            j = n if j < 0 else j
            runs.append((i * bs, min(j * bs, self.size) - i * bs))
            i = present.find(1, j) if j < n else -1
        return runs

    # --- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        store = self._open_store()
        self.stats.reads += 1
        self.stats.bytes_read += length
        if not length:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        present = store.present
        if present.find(1, first, last + 1) < 0:
            return await self.base.read(offset, length)
        if present.find(0, first, last + 1) < 0:
            return store.pread(offset, length)
        # Mixed: read allocated runs now, base runs concurrently, then stitch.
        pieces: list[bytes | asyncio.Future[bytes]] = []
        end = offset + length
        block = first
        while block <= last:
            allocated = present[block]
            nxt = present.find(0 if allocated else 1, block, last + 1)
            nxt = last + 1 if nxt < 0 else nxt
            lo, hi = max(offset, block * bs), min(end, nxt * bs)
            if allocated:
                pieces.append(store.pread(lo, hi - lo))
            else:
                pieces.append(asyncio.ensure_future(self.base.read(lo, hi - lo)))
            block = nxt
        futures = [p for p in pieces if isinstance(p, asyncio.Future)]
        try:
            await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return b"".join(p if isinstance(p, bytes) else p.result() for p in pieces)

    # --- writes ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.check_write(offset, len(data))
        store = self._open_store()
        length = len(data)
        if length:
            bs = self.block_size
            end = offset + length
            first, last = offset // bs, (end - 1) // bs
            present = store.present
            need_head = offset % bs != 0 and not present[first]
            need_tail = end % bs != 0 and end != self.size and not present[last]
            if first == last and (need_head or need_tail):
                need_head = need_tail = True
            edges = sorted(({first} if need_head else set()) | ({last} if need_tail else set()))
            base_blocks: dict[int, bytes] = {}
            if edges:
                reads = [self.base.read(b * bs, min(bs, self.size - b * bs)) for b in edges]
                base_blocks = dict(zip(edges, await asyncio.gather(*reads), strict=True))
                self.stats.bump("copy_on_write_blocks", len(edges))
            # From here on nothing waits: allocation cannot change under us. An edge
            # block allocated meanwhile by another write is merged from the overlay.
            lo = first * bs if need_head else offset
            hi = min((last + 1) * bs, self.size) if need_tail else end
            if lo == offset and hi == end:
                buf: bytes | bytearray = data
            else:
                buf = bytearray(hi - lo)
                for block in edges:
                    current = self._block_now(store, block, base_blocks)
                    start = block * bs - lo
                    buf[start : start + len(current)] = current
                buf[offset - lo : offset - lo + length] = data
            store.pwrite(lo, buf)
            store.mark_present(first, last)
        self.stats.writes += 1
        self.stats.bytes_written += length
        if fua:
            await self.flush()

    def _block_now(self, store: StoreFile, block: int, base_blocks: dict[int, bytes]) -> bytes:
        """A block's current bytes: the overlay's if allocated by now, else the base's."""
        bs = self.block_size
        n = min(bs, self.size - block * bs)
        if store.present[block]:
            return store.pread(block * bs, n)
        return base_blocks[block]

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_write(offset, length)
        store = self._open_store()
        bs = self.block_size
        # Whole blocks become allocated holes; the partial edges are ordinary writes.
        inner_lo = -(-offset // bs) * bs
        inner_hi = min((offset + length) // bs * bs, self.size)
        if (offset + length) == self.size:
            inner_hi = self.size
        if inner_lo >= inner_hi:
            await self.write(offset, bytes(length))
        else:
            if offset < inner_lo:
                await self.write(offset, bytes(inner_lo - offset))
            if inner_hi < offset + length:
                await self.write(inner_hi, bytes(offset + length - inner_hi))
            try:
                punch_hole(store.fd, store.data_offset + inner_lo, inner_hi - inner_lo)
            except OSError as err:
                raise DeviceError(f"write zeroes in {self.path}: {err.strerror}") from err
            store.mark_present(inner_lo // bs, (inner_hi - 1) // bs)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.read_only:
            return
        store = self._open_store()
        if isinstance(self.base, CowDevice) and not self.base.read_only:
            await self.base.flush()  # a layer frozen a moment ago may hold late writes
        await store.sync_async()
        self.stats.flushes += 1
