"""StoreFile: one sparse file holding a header, a unit map, data and checksums; crash-safe.

Both the chunk cache and the copy-on-write overlay are "some units of this device are
held locally": they share this file format and its crash-consistency rule.

Layout::

    0        header: b"VIRTMAN\\0" + JSON (version, kind, size, unit, checksum, meta),
             NUL-padded to 4 KiB
    4096     map: one byte per unit, 1 = the unit's data is held and durable
    data_off data: the device's bytes at their own offsets (sparse: holes are free)
    sums_off checksums (only when the header names an algorithm): 8 bytes per unit,
             the XXH3-64 of the unit's bytes as they were written

One *byte* per unit, not one bit: a unit's entry is then changed by a one-byte write,
which no crash can tear, and no read-modify-write of neighbours is ever needed. The
map and the checksum table are written whole (zeros) when the file is made, so neither
ever needs new space later; only a unit's data can meet a full disk.

Theory of crash consistency
---------------------------
A unit becomes *present* (in memory) as soon as its data (and, with checksums, its
checksum) is written to the file; it becomes *durable* (its map byte written) only by
``sync()``, which first makes data and checksums durable (fdatasync), then writes the
map bytes of the units that were present before that fdatasync, then makes the map
durable. So, whatever instant a crash or power cut happens at, a map byte on disk is 1
only if its unit's data and checksum reached the disk before it: after a restart no
torn or missing unit is ever served. Units written since the last sync are simply not
in the map after a crash: a cache fetches them again, an overlay reads the base for
them, which is exactly "an unflushed write was lost", as a disk allows. FLUSH on the
overlay calls ``sync()``, so acknowledged-and-flushed writes are never lost. The file
itself is created under a temporary name and renamed into place, so a half-made store
is never opened.

Ordering protects against crashes, not against the disk: bytes can rot at rest, and a
disk or file system can lie about a flush. So a cache re-checks every unit once per
session before serving it (against the digest manifest, or this checksum; see
``cached.py``), and a unit that fails is *dropped*: its map byte is cleared and made
durable (``drop()``) before anything is written into it again, so a crash during the
refetch can never leave a 1 in front of half-new bytes. The checksum is the one of the
bytes the unit held when it was filled, written with them and made durable by the same
fdatasync, so a map byte of 1 always has its own checksum behind it.

A store of version 1 (before checksums) is still opened; it has no checksum table, and
its user decides whether it can check the units another way (a cache with a manifest
can) or must start afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import xxhash

from virtman.blockdev.sparse import punch_hole
from virtman.durable import fsync_dir
from virtman.errors import ConfigError, DeviceError
from virtman.protocol.nbd.constants import Errno

log = logging.getLogger(__name__)

MAGIC = b"VIRTMAN\0"
VERSION = 2
#: Versions this code opens (1: no checksum table).
READABLE_VERSIONS = (1, 2)
HEADER_SIZE = 4096
_PAGE = 4096

#: The per-unit checksum: not cryptographic (the manifest is), but fast enough (tens of
#: GB/s) that it costs nothing next to the disk, and 64 bits make a rotted unit that
#: still matches a 1-in-2**64 event.
CHECKSUM = "xxh3_64"
CHECKSUM_BYTES = 8


def unit_checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The checksum a store keeps of one unit's bytes."""
    return xxhash.xxh3_64_digest(data)


@dataclass(frozen=True)
class StoreHeader:
    kind: str  # "cache" or "overlay"
    size: int  # bytes of the device it holds units of
    unit: int  # bytes per unit (chunk or block)
    meta: dict[str, Any]
    #: Checksum algorithm of the per-unit table, or None for a store without one.
    checksum: str | None = None

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

    @property
    def sums_offset(self) -> int:
        return self.data_offset + (self.size + _PAGE - 1) // _PAGE * _PAGE

    @property
    def file_size(self) -> int:
        if self.checksum is None:
            return self.data_offset + self.size
        return self.sums_offset + self.units * CHECKSUM_BYTES

    def encode(self) -> bytes:
        body = json.dumps(
            {
                "version": VERSION,
                "kind": self.kind,
                "size": self.size,
                "unit": self.unit,
                "checksum": self.checksum,
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
            if doc["version"] not in READABLE_VERSIONS:
                raise ConfigError(f"{path}: store version {doc['version']} is not one of "
                                  f"{READABLE_VERSIONS}")
            checksum = doc.get("checksum")
            if checksum not in (None, CHECKSUM):
                raise ConfigError(f"{path}: unknown checksum algorithm {checksum!r}")
            return cls(str(doc["kind"]), int(doc["size"]), int(doc["unit"]), dict(doc["meta"]),
                       checksum)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: unreadable store header: {err}") from err


class StoreFile:
    """An open store. Not thread-safe: used from one event loop."""

    def __init__(self, path: str, header: StoreHeader, fd: int, durable: bytearray,
                 sums: bytearray | None = None) -> None:
        self.path = path
        self.header = header
        self.fd = fd
        self.data_offset = header.data_offset
        #: 1 where the unit's data is in the file (durable or not yet synced).
        self.present = bytearray(durable)
        #: Units present (kept as a count: summing the map costs a pass over it).
        self.units_present = self.present.count(1)
        #: The checksum table as in the file (None: this store keeps none).
        self.sums = sums
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
                os.ftruncate(fd, header.file_size)
                # Map and checksums are allocated now, so a full disk later never stops a
                # map or checksum write: only data can meet it, and a cache passes through.
                os.pwrite(fd, bytes(header.units), header.map_offset)
                if header.checksum is not None:
                    os.pwrite(fd, bytes(header.units * CHECKSUM_BYTES), header.sums_offset)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as err:
            raise DeviceError(f"cannot create store {path}: {err.strerror}") from err
        sums = bytearray(header.units * CHECKSUM_BYTES) if header.checksum else None
        return cls(path, header, fd, bytearray(header.units), sums)

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
            if os.fstat(fd).st_size < header.file_size:
                raise ConfigError(f"{path}: file shorter than its header says")
            if durable.translate(None, b"\0\1"):
                raise ConfigError(f"{path}: map holds values other than 0 and 1")
            sums = None
            if header.checksum is not None:
                sums = bytearray(os.pread(fd, header.units * CHECKSUM_BYTES, header.sums_offset))
                if len(sums) != header.units * CHECKSUM_BYTES:
                    raise ConfigError(f"{path}: checksum table truncated")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, header, fd, durable, sums)

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
                self.units_present += 1
                self.pending.add(i)

    def fill(self, index: int, data: bytes | bytearray | memoryview, count: int = 1) -> None:
        """Write whole units' data (``count`` adjacent units from ``index``; only the
        device's last unit may be short) and their checksums, and mark them present.
        Several units are one write of data and one of checksums (a relay's run of
        misses), not two per unit.

        Raises ``DeviceError`` with errno ENOSPC when the file system is full (the
        space the partial write took is given back), EIO for any other failure; the
        units are then not present.
        """
        unit = self.header.unit
        start = index * unit
        try:
            if os.pwrite(self.fd, data, self.data_offset + start) != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write)")
            if self.sums is not None:
                if count == 1:
                    digests = unit_checksum(data)
                else:
                    view = memoryview(data)
                    digests = b"".join(unit_checksum(view[k * unit : (k + 1) * unit])
                                       for k in range(count))
                at = index * CHECKSUM_BYTES
                os.pwrite(self.fd, digests, self.header.sums_offset + at)
                self.sums[at : at + len(digests)] = digests
        except OSError as err:
            with contextlib.suppress(OSError):
                punch_hole(self.fd, self.data_offset + start, len(data))
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DeviceError(f"store {self.path} cannot hold unit {index}"
                              f"{f'..{index + count - 1}' if count > 1 else ''}: "
                              f"{err.strerror}",
                              errno=Errno.ENOSPC if full else Errno.EIO) from err
        self.mark_present(index, index + count - 1)

    def checksum_matches(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` is what unit ``index`` held when it was filled."""
        if self.sums is None:
            raise ConfigError(f"store {self.path} keeps no checksums")
        at = index * CHECKSUM_BYTES
        return unit_checksum(data) == self.sums[at : at + CHECKSUM_BYTES]

    def drop(self, index: int) -> None:
        """Forget a unit durably: its map byte is 0 on disk before this returns.

        Used for a unit found rotten, so nothing written into it afterwards can ever
        stand behind an old 1 (see the theory above). Its space is given back.
        """
        start = index * self.header.unit
        try:
            self.mark_absent(index, index)
            os.fdatasync(self.fd)
        except OSError as err:
            raise DeviceError(f"cannot drop unit {index} of store {self.path}: "
                              f"{err.strerror}") from err
        with contextlib.suppress(OSError):  # only space: the map already says "absent"
            punch_hole(self.fd, self.data_offset + start,
                       min(self.header.unit, self.header.size - start))

    def mark_absent(self, first: int, last: int) -> None:
        """Forget units (their map bytes are cleared at once, before any reuse)."""
        for i in range(first, last + 1):
            if self.present[i]:
                self.units_present -= 1
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
