"""StoreFile: one sparse file holding a header, a unit map and data; crash-safe.

Both the chunk cache and the copy-on-write overlay are "some units of this device are
held locally": they share this file format and its crash-consistency rule.

Layout::

    0        header: b"VIRTMAN\\0" + JSON (kind, size, unit, meta), NUL-padded to 4 KiB
    4096     map: one byte per unit, 1 = the unit's data is held and durable
    data_off data: the device's bytes at their own offsets (sparse: holes are free)

One *byte* per unit, not one bit: a unit's entry is then changed by a one-byte write,
which no crash can tear, and no read-modify-write of neighbours is ever needed.

Theory of crash consistency
---------------------------
A unit becomes *present* (in memory) as soon as its data is written to the file; it
becomes *durable* (its map byte written) only by ``sync()``, which first makes the data
durable (fdatasync), then writes the map bytes of the units that were present before
that fdatasync, then makes the map durable. So, whatever instant a crash or power cut
happens at, a map byte on disk is 1 only if its unit's data reached the disk before it:
after a restart no torn or missing unit is ever served. Units written since the last
sync are simply not in the map after a crash: a cache fetches them again, an overlay
reads the base for them, which is exactly "an unflushed write was lost", as a disk
allows. FLUSH on the overlay calls ``sync()``, so acknowledged-and-flushed writes are
never lost. The file itself is created under a temporary name and renamed into place,
so a half-made store is never opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from virtman.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

MAGIC = b"VIRTMAN\0"
VERSION = 1
HEADER_SIZE = 4096
_PAGE = 4096


@dataclass(frozen=True)
class StoreHeader:
    kind: str  # "cache" or "overlay"
    size: int  # bytes of the device it holds units of
    unit: int  # bytes per unit (chunk or block)
    meta: dict[str, Any]

    @property
    def units(self) -> int:
        return (self.size + self.unit - 1) // self.unit

    @property
    def map_offset(self) -> int:
        return HEADER_SIZE

    @property
    def data_offset(self) -> int:
        map_end = HEADER_SIZE + (self.units + _PAGE - 1) // _PAGE * _PAGE
        align = max(self.unit, _PAGE)
        return (map_end + align - 1) // align * align

    def encode(self) -> bytes:
        body = json.dumps(
            {
                "version": VERSION,
                "kind": self.kind,
                "size": self.size,
                "unit": self.unit,
                "meta": self.meta,
            },
            sort_keys=True,
        ).encode()
        raw = MAGIC + body
        if len(raw) > HEADER_SIZE:
            raise ConfigError(f"store header of {len(raw)} bytes exceeds {HEADER_SIZE}")
        return raw + bytes(HEADER_SIZE - len(raw))

    @classmethod
    def decode(cls, raw: bytes, path: str) -> StoreHeader:
        if not raw.startswith(MAGIC):
            raise ConfigError(f"{path} is not a virtman store (bad magic)")
        try:
            doc = json.loads(raw[len(MAGIC) :].rstrip(b"\0"))
            if doc["version"] != VERSION:
                raise ConfigError(f"{path}: store version {doc['version']} is not {VERSION}")
            return cls(str(doc["kind"]), int(doc["size"]), int(doc["unit"]), dict(doc["meta"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: unreadable store header: {err}") from err


class StoreFile:
    """An open store. Not thread-safe: used from one event loop."""

    def __init__(self, path: str, header: StoreHeader, fd: int, durable: bytearray) -> None:
        self.path = path
        self.header = header
        self.fd = fd
        self.data_offset = header.data_offset
        #: 1 where the unit's data is in the file (durable or not yet synced).
        self.present = bytearray(durable)
        #: Units present but whose map byte is not yet durable.
        self.pending: set[int] = set()
        self._sync_task: asyncio.Task[None] | None = None

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, header: StoreHeader) -> StoreFile:
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, header.encode(), 0)
                os.ftruncate(fd, header.data_offset + header.size)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.rename(tmp, path)
            _fsync_dir(path)
        except OSError as err:
            raise DeviceError(f"cannot create store {path}: {err.strerror}") from err
        return cls(path, header, fd, bytearray(header.units))

    @classmethod
    def open(cls, path: str) -> StoreFile:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open store {path}: {err.strerror}") from err
        try:
            header = StoreHeader.decode(os.pread(fd, HEADER_SIZE, 0), path)
            durable = bytearray(os.pread(fd, header.units, header.map_offset))
            if len(durable) != header.units:
                raise ConfigError(f"{path}: map truncated ({len(durable)} of {header.units})")
            if os.fstat(fd).st_size < header.data_offset + header.size:
                raise ConfigError(f"{path}: file shorter than its header says")
            if durable.translate(None, b"\0\1"):
                raise ConfigError(f"{path}: map holds values other than 0 and 1")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, header, fd, durable)

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1

    # --- in an event loop -----------------------------------------------------------------

    def start_syncing(self, interval: float) -> None:
        """Sync in the background every ``interval`` seconds while units are pending.

        This bounds what a crash with no FLUSH loses (overlay) or must refetch (cache).
        """
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop(interval))

    async def _sync_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.pending and self.fd >= 0:
                try:
                    await asyncio.to_thread(self.sync)
                except DeviceError as err:
                    log.error("%s", err)

    async def sync_async(self) -> int:
        """``sync()`` on a worker thread, so the event loop keeps serving meanwhile."""
        return await asyncio.to_thread(self.sync)

    async def aclose(self) -> None:
        """Stop background syncing, sync and close."""
        await self._stop_syncing()
        await asyncio.to_thread(self.close)

    async def _stop_syncing(self) -> None:
        task, self._sync_task = self._sync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def abandon(self) -> None:
        """Close without syncing, as a killed process would (for crash drills and tests)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            self._sync_task = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- units ----------------------------------------------------------------------------

    def mark_present(self, first: int, last: int) -> None:
        """Units first..last (inclusive) now hold their data in the file."""
        present = self.present
        for i in range(first, last + 1):
            if not present[i]:
                present[i] = 1
                self.pending.add(i)

    def mark_absent(self, first: int, last: int) -> None:
        """Forget units (their map bytes are cleared at once, before any reuse)."""
        for i in range(first, last + 1):
            self.present[i] = 0
            self.pending.discard(i)
        os.pwrite(self.fd, bytes(last - first + 1), self.header.map_offset + first)

    def sync(self) -> int:
        """Make data durable, then the map entries of the units it covers; return count."""
        if self.fd < 0:
            return 0
        batch = sorted(self.pending)
        try:
            os.fdatasync(self.fd)
            if not batch:
                return 0
            for run_start, run_end in _runs(batch):
                os.pwrite(
                    self.fd, b"\1" * (run_end - run_start + 1), self.header.map_offset + run_start
                )
            os.fdatasync(self.fd)
        except OSError as err:
            raise DeviceError(f"sync of store {self.path} failed: {err.strerror}") from err
        self.pending.difference_update(batch)
        return len(batch)

    # --- data -----------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, self.data_offset + offset)
        if len(data) != length:
            raise DeviceError(f"short read of store {self.path} at {offset}")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if os.pwrite(self.fd, data, self.data_offset + offset) != len(data):
            raise DeviceError(f"short write to store {self.path} at {offset}")


def copy_sparse(src: str, dst: str) -> None:
    """Copy a store file, skipping its holes (a store is mostly holes), then fsync it."""
    tmp = f"{dst}.tmp{os.getpid()}"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                chunk = os.pread(fin.fileno(), min(hole - data, 1 << 20), data)
                os.pwrite(fout.fileno(), chunk, data)
                data += len(chunk)
            pos = hole
        os.fsync(fout.fileno())
    os.rename(tmp, dst)


def _runs(sorted_indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in sorted_indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
