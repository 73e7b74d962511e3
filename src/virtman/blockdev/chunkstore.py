"""ChunkStore: a host's compressed, content-addressed, deduplicated store of chunks.

A chunk is stored once per host, whatever holds it: image versions, a bake's saved
state, a bake's disk layer. Each is a *recipe*: a name and a ``Manifest`` (size, chunk
size, the SHA-256 of every chunk that is not all zeros; zero chunks are implied and
never stored). Chunks are keyed by that digest, stored zstd-compressed, and counted by
the recipes that name them (a recipe counts each distinct digest once).

Layout and why
--------------
::

    ROOT/lock               flock()ed while a process has the store open
    ROOT/index.sqlite3      recipes, and per chunk: references, present, sizes, last use
    ROOT/blobs/ab/<hex>     one zstd frame per chunk, named by its digest
    ROOT/tmp/               blobs being written; emptied at every open

One file per chunk rather than append-only pack files: evicting a chunk is an
``unlink`` that gives its space back at once, where a pack would need compaction (a
second copy of live data and its own crash theory) before any space came back. The
cost is a file system block's rounding per chunk (about 2 % at 256 KiB chunks that
compress to half) and an inode each. The index is SQLite in WAL mode with
``synchronous=FULL``: a recipe, its chunks' reference counts and the chunks' presence
change in one transaction, durable when ``commit`` returns, without a log format of our
own.

Theory of crash consistency
---------------------------
The invariant is: *a chunk's row says present only if its blob is durable under its
final name.* Adding orders blob before row, removing orders row before blob:

- A new chunk is compressed, written to ``tmp/``, fsynced, renamed to its final name
  and its directory fsynced; only then does a transaction mark it present. ``put`` and
  a writer's ``commit`` return after that transaction, so what they acknowledge
  survives a crash or a power cut.
- An evicted chunk's row is deleted (committed) before its file is unlinked.
- A recipe is committed in one transaction with its chunks' references; it is there
  whole after a crash, or not at all.

A crash between those steps leaves only files the index does not count: partial blobs
in ``tmp/`` (always removed at open) and blobs whose row never said present or no
longer does. The index remembers that it was not closed cleanly, and the next open
then lists the blob directories and removes every blob without a present row, so
space accounting stays exact. A crash never leaves a row without its blob. A failure
that leaves such files without a crash (an index commit failing with EIO after the
blobs were placed, an unlink failing) keeps the close "unclean", so the next open
settles them the same way; a full disk while writing blobs or committing the index
(SQLITE_FULL: surely not committed) removes the placed blobs at once and fails with
ENOSPC.

Ordering protects against crashes, not against the disk: a blob can rot at rest or be
lost by a file system that lied about a flush. So every read checks the frame's
declared size and the SHA-256 of the decompressed bytes against the digest; a blob that
fails (or is missing, or cannot be read: EIO) is *dropped* (its row says absent,
committed, then the file is unlinked), counted in ``stats.rotten``, logged, and
reported as absent (``get`` answers None, a recipe read raises ``ChunkAbsent``). A
torn or rotten chunk is never served. A later ``put`` of the same bytes makes it
present again.

Eviction and capacity
---------------------
Removing a recipe drops its references. Unreferenced chunks stay as a cache (a bake
made again, or an image version re-imported, finds them) and are evicted, least
recently used first, when a new chunk needs room within ``capacity`` or when
``collect()`` is called. Chunks a recipe references are never evicted: they are
acknowledged data. When unreferenced chunks cannot make room, the write fails with
``StoreFull`` (ENOSPC) and the store is unchanged. Chunks a writer has put but not yet
committed are pinned, so its own later chunks do not evict them. Capacity counts the
blobs as allocated (each rounded up to the file system's block); the index (tens of
bytes per chunk) is not counted.

The store is synchronous; its public methods take a lock, so worker threads may call it
at once (an event loop calls it through ``asyncio.to_thread``; ``RecipeDevice`` does).
One process opens it at a time (the lock file).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import secrets
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

import zstandard

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.manifest import DIGEST_BYTES, Manifest, zero_digest
from virtman.durable import fsync_dir
from virtman.errors import Conflict, DeviceError, LifecycleError, NotFound
from virtman.limits import (
    DEFAULT_CACHE_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    STORE_BATCH_BYTES,
    STORE_COMPRESSION_LEVEL,
)
from virtman.protocol.nbd.constants import STATE_HOLE, STATE_ZERO, Errno

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite3"
#: SQLite's result code for a full disk (the sqlite3 module names it from Python 3.11.4).
SQLITE_FULL = 13
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY,
    refs INTEGER NOT NULL,          -- recipes naming it
    present INTEGER NOT NULL,       -- 1: its blob is durable under its final name
    raw_bytes INTEGER NOT NULL,     -- uncompressed length (0 while absent)
    stored_bytes INTEGER NOT NULL,  -- blob length (0 while absent)
    last_used INTEGER NOT NULL      -- a tick: larger is more recent
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_evictable ON chunks (last_used) WHERE refs = 0 AND present = 1;
CREATE TABLE IF NOT EXISTS recipes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    digests BLOB NOT NULL           -- encode_digests(): (index, digest) of data chunks
);
"""


# --- errors ---------------------------------------------------------------------------------


class ChunkStoreError(DeviceError):
    """The host store failed. ``path`` is the file or directory concerned, ``digest`` the
    chunk (hex) when one is, ``os_errno`` the operating system's error number when one
    caused it; ``errno`` (of ``DeviceError``) is the NBD error a server would answer."""

    def __init__(self, message: str, *, path: str, digest: str | None = None,
                 os_errno: int | None = None, errno: int = Errno.EIO) -> None:
        facts = [f"path={path}"]
        if digest is not None:
            facts.append(f"digest={digest}")
        if os_errno is not None:
            facts.append(f"errno={os_errno} ({os.strerror(os_errno)})")
        super().__init__(f"{message} [{', '.join(facts)}]", errno=errno)
        self.path = path
        self.digest = digest
        self.os_errno = os_errno


class StoreFull(ChunkStoreError):
    """New chunks do not fit within the capacity, even with every unreferenced chunk
    evicted. Nothing was written."""

    def __init__(self, *, path: str, capacity: int, used: int, needed: int,
                 evictable: int) -> None:
        super().__init__(
            f"host store full: {needed} bytes needed, {used} of {capacity} used, "
            f"{evictable} evictable", path=path, os_errno=errno.ENOSPC, errno=Errno.ENOSPC)
        self.capacity = capacity
        self.used = used
        self.needed = needed
        self.evictable = evictable


class ChunkAbsent(ChunkStoreError):
    """A recipe's chunk is not in the store (never put, or dropped as rotten)."""

    def __init__(self, *, path: str, recipe: str, index: int, digest: str) -> None:
        super().__init__(f"chunk {index} of recipe {recipe!r} is not in the store",
                         path=path, digest=digest)
        self.recipe = recipe
        self.index = index


# --- the recipe codec (pure) ------------------------------------------------------------------

_ENTRY = struct.Struct(">Q32s")


def encode_digests(digests: Mapping[int, bytes]) -> bytes:
    """A recipe's data chunks as bytes: (index, digest) entries in index order."""
    return b"".join(_ENTRY.pack(i, digests[i]) for i in sorted(digests))


def decode_digests(raw: bytes) -> dict[int, bytes]:
    if len(raw) % _ENTRY.size:
        raise ValueError(f"recipe digests of {len(raw)} bytes: not whole entries")
    return {i: d for i, d in _ENTRY.iter_unpack(raw)}


_FANOUT = [f"{i:02x}" for i in range(256)]


def blob_name(digest: bytes) -> str:
    """A chunk's blob path relative to the store's root."""
    text = digest.hex()
    return os.path.join("blobs", text[:2], text)


# --- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreUsage:
    recipes: int
    #: Chunks held (present), each counted once.
    chunks: int
    #: Sum of the recipes' sizes: what they read as.
    logical_bytes: int
    #: Uncompressed bytes of the chunks held (zero chunks are never held).
    unique_bytes: int
    #: Compressed bytes of the chunks held.
    stored_bytes: int
    #: Blobs as allocated (each rounded up to the file system block) plus the index
    #: files: what the store takes on disk.
    disk_bytes: int
    #: Part of ``disk_bytes`` counted against the capacity (the blobs).
    blob_disk_bytes: int
    capacity: int


@dataclass
class StoreStats:
    #: New blobs written, and puts of a chunk already held (deduplicated).
    written: int = 0
    deduplicated: int = 0
    #: Blobs found rotten (bad digest, bad frame, missing, unreadable) and dropped.
    rotten: int = 0
    #: Unreferenced chunks evicted.
    evicted: int = 0
    #: Blobs without a present row removed by recovery after an unclean close.
    orphans_removed: int = 0


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[ChunkStore, _P], _R]
            ) -> Callable[Concatenate[ChunkStore, _P], _R]:
    """Run a public method under the store's lock: devices over its recipes read it from
    worker threads (``asyncio.to_thread``), and SQLite and the accounting want one at a
    time."""
    @functools.wraps(method)
    def wrapper(self: ChunkStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class ChunkStore:
    """A content-addressed host store (see the module's theory). Open with ``open``."""

    def __init__(self, root: str, db: sqlite3.Connection, lock_fd: int, capacity: int,
                 level: int, batch_bytes: int, block: int) -> None:
        self.root = root
        self.capacity = capacity
        self.level = level
        self.batch_bytes = batch_bytes
        self.stats = StoreStats()
        self._db = db
        self._lock_fd = lock_fd
        self._block = block
        self._pins: collections.Counter[bytes] = collections.Counter()
        self._touched: dict[bytes, int] = {}
        self._tick = 0
        self._used = 0
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()
        self._closed = False
        self._lock = threading.RLock()
        #: A blob may be on disk that the index does not count (a commit failed after
        #: blobs were placed, an unlink failed): the close then stays "unclean", so the
        #: next open lists the blobs and removes those.
        self._needs_scan = False

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str, *, capacity: int = DEFAULT_CACHE_CAPACITY,
             level: int = STORE_COMPRESSION_LEVEL,
             batch_bytes: int = STORE_BATCH_BYTES) -> ChunkStore:
        """Open (creating if needed) the store in directory ``root``.

        Raises ``ChunkStoreError`` when the directory cannot be used, another process
        holds it (EWOULDBLOCK), or its index cannot be read.
        """
        root = os.path.abspath(root)
        try:
            for sub in ("", "blobs", "tmp"):
                os.makedirs(os.path.join(root, sub), exist_ok=True)
            # Every fan-out directory exists from the start, so placing a blob never
            # creates a directory whose own entry would need syncing too.
            blobs = os.path.join(root, "blobs")
            if len(os.listdir(blobs)) < len(_FANOUT):
                for sub in _FANOUT:
                    os.makedirs(os.path.join(blobs, sub), exist_ok=True)
                fsync_dir(blobs)
                fsync_dir(root)
            lock_path = os.path.join(root, "lock")
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise ChunkStoreError("cannot make the host store's directories", path=root,
                                  os_errno=err.errno) from err
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(lock_fd)
            raise ChunkStoreError("host store is open in another process", path=lock_path,
                                  os_errno=err.errno) from err
        index = os.path.join(root, INDEX_NAME)
        try:
            db = sqlite3.connect(index, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
                fsync_dir(root)  # the index (and its WAL) exist under their names
                block = os.statvfs(root).f_frsize or 4096
                store = cls(root, db, lock_fd, capacity, level, batch_bytes, block)
                store._start()
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as err:
            os.close(lock_fd)
            raise ChunkStoreError(f"cannot open the host store's index: {err}",
                                  path=index) from err
        except OSError as err:
            os.close(lock_fd)
            raise ChunkStoreError("cannot open the host store", path=root,
                                  os_errno=err.errno) from err
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    def _start(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ChunkStoreError(f"index schema {version} is not {SCHEMA_VERSION}",
                                  path=os.path.join(self.root, INDEX_NAME))
        self._clear_tmp()
        if meta.get("clean", 1) == 0:
            log.warning("host store %s was not closed cleanly: removing blobs it never "
                        "acknowledged", self.root)
            self._remove_orphans()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 0)")
        self._tick = (self._db.execute("SELECT MAX(last_used) FROM chunks").fetchone()[0]
                      or 0) + 1
        self._used = sum(self._alloc(n) for (n,) in self._db.execute(
            "SELECT stored_bytes FROM chunks WHERE present = 1"))

    @_locked
    def close(self) -> None:
        """Write back when chunks were last used, mark the store cleanly closed, unlock."""
        if self._closed:
            return
        try:
            with self._tx() as db:
                self._flush_touched(db)
                if not self._needs_scan:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 1)")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._closed = True
            self._db.close()
            os.close(self._lock_fd)

    @_locked
    def abandon(self) -> None:
        """Close without any write, as a killed process would (for crash drills)."""
        if not self._closed:
            self._closed = True
            self._db.close()
            os.close(self._lock_fd)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- chunks ----------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store one chunk durably; return its digest. Zero chunks are not stored.

        Raises ``StoreFull`` or ``ChunkStoreError`` (the chunk is then not stored).
        """
        return self.put_many([data])[0]

    @_locked
    def put_many(self, chunks: Sequence[bytes | bytearray | memoryview], *,
                 pin: bool = False) -> list[bytes]:
        """Store several chunks with one directory sync and one index commit. ``pin``:
        also pin them (see ``pin``) before the lock is let go, so no eviction in
        between can take one that was found already held."""
        self._check_open("put")
        digests = [hashlib.sha256(c).digest() for c in chunks]
        new: dict[bytes, bytes] = {}
        for digest, data in zip(digests, chunks, strict=True):
            if digest == zero_digest(len(data)) or digest in new:
                continue
            if self._present(digest):
                self.stats.deduplicated += 1
                self._touch(digest)
            else:
                new[digest] = self._compressor.compress(data)
        if new:
            # The batch's chunks already held are pinned while room is made for its new
            # ones: the batch must never evict a chunk it has just been told is held.
            self.pin(digests)
            try:
                self._add_blobs(new, {d: len(c) for d, c in zip(digests, chunks, strict=True)})
            finally:
                self.unpin(digests)
        if pin:
            self.pin(digests)
        return digests

    @_locked
    def get(self, digest: bytes) -> bytes | None:
        """A chunk's bytes, checked against its digest; None when the store does not
        hold it (a blob that fails the check is dropped first)."""
        self._check_open("get")
        row = self._db.execute("SELECT raw_bytes, stored_bytes FROM chunks "
                               "WHERE digest = ? AND present = 1", (digest,)).fetchone()
        if row is None:
            return None
        raw_bytes, stored_bytes = row
        path = os.path.join(self.root, blob_name(digest))
        try:
            with open(path, "rb") as f:
                frame = f.read(stored_bytes + 1)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EIO):
                raise ChunkStoreError("cannot read chunk", path=path, digest=digest.hex(),
                                      os_errno=err.errno) from err
            self._drop(digest, path, f"unreadable ({err.strerror})")
            return None
        data = self._decode(frame, raw_bytes, stored_bytes)
        if data is None or hashlib.sha256(data).digest() != digest:
            self._drop(digest, path, "does not match its digest")
            return None
        self._touch(digest)
        return data

    def _decode(self, frame: bytes, raw_bytes: int, stored_bytes: int) -> bytes | None:
        """The frame's bytes, or None if it is not the frame the index describes. The
        declared size is checked before decompressing, so a rotten header can never
        make us allocate more than the chunk."""
        if len(frame) != stored_bytes:
            return None
        try:
            if zstandard.frame_content_size(frame) != raw_bytes:
                return None
            return self._decompressor.decompress(frame, max_output_size=raw_bytes)
        except zstandard.ZstdError:
            return None

    @_locked
    def pin(self, digests: Iterable[bytes]) -> None:
        """Keep these chunks from eviction until ``unpin`` (counted: pins nest)."""
        self._pins.update(digests)

    @_locked
    def unpin(self, digests: Iterable[bytes]) -> None:
        for digest in digests:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    @_locked
    def collect(self) -> int:
        """Evict every unreferenced chunk now; return how many."""
        self._check_open("collect")
        return self._evict(need=None)

    # --- recipes ---------------------------------------------------------------------------

    @_locked
    def commit(self, name: str, manifest: Manifest, *, replace: bool = False) -> None:
        """Record a recipe: ``name`` reads as the chunks ``manifest`` names. Its chunks
        need not all be held (a cache fills them later); ``missing`` lists those that are
        not. Durable when this returns.

        Raises ``Conflict`` when the name is taken and ``replace`` is false.
        """
        self._check_open("commit")
        with self._tx() as db:
            old = db.execute("SELECT digests FROM recipes WHERE name = ?", (name,)).fetchone()
            if old is not None:
                if not replace:
                    raise Conflict(f"host store {self.root} already holds recipe {name!r}")
                self._unref(db, set(decode_digests(old[0]).values()))
                db.execute("DELETE FROM recipes WHERE name = ?", (name,))
            tick = self._next_tick()
            db.executemany(
                "INSERT INTO chunks VALUES (?, 1, 0, 0, 0, ?) "
                "ON CONFLICT (digest) DO UPDATE SET refs = refs + 1",
                [(d, tick) for d in set(manifest.data_digests.values())])
            db.execute("INSERT INTO recipes VALUES (?, ?, ?, ?)",
                       (name, manifest.size, manifest.chunk_size,
                        encode_digests(manifest.data_digests)))
        log.info("host store %s: recipe %s committed (%d bytes, %d data chunks)",
                 self.root, name, manifest.size, len(manifest.data_digests))

    @_locked
    def remove(self, name: str) -> None:
        """Forget a recipe; its chunks no other recipe names become evictable."""
        self._check_open("remove")
        with self._tx() as db:
            row = db.execute("SELECT digests FROM recipes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"host store {self.root} holds no recipe {name!r}")
            self._unref(db, set(decode_digests(row[0]).values()))
            db.execute("DELETE FROM recipes WHERE name = ?", (name,))
        log.info("host store %s: recipe %s removed", self.root, name)

    @_locked
    def recipe(self, name: str) -> Manifest:
        self._check_open("read")
        row = self._db.execute("SELECT size, chunk_size, digests FROM recipes WHERE name = ?",
                               (name,)).fetchone()
        if row is None:
            raise NotFound(f"host store {self.root} holds no recipe {name!r}")
        return Manifest(row[0], row[1], decode_digests(row[2]))

    @_locked
    def recipes(self) -> list[str]:
        self._check_open("list")
        return [n for (n,) in self._db.execute("SELECT name FROM recipes ORDER BY name")]

    @_locked
    def missing(self, name: str) -> dict[int, bytes]:
        """The chunks of a recipe the store does not hold (index → digest)."""
        manifest = self.recipe(name)
        absent = {d for d in set(manifest.data_digests.values()) if not self._present(d)}
        return {i: d for i, d in manifest.data_digests.items() if d in absent}

    @_locked
    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``offset`` .. ``offset + length`` of a recipe (to its end when ``length``
        is None). Raises ``ChunkAbsent`` for a chunk the store does not hold (or dropped
        as rotten on this read), ``ValueError`` for a range outside the recipe."""
        manifest = self.recipe(name)
        if length is None:
            length = manifest.size - offset
        if offset < 0 or length < 0 or offset + length > manifest.size:
            raise ValueError(f"range {offset}+{length} outside recipe {name!r} of "
                             f"{manifest.size} bytes")
        out = bytearray()
        for index, start, end in _chunk_spans(manifest.chunk_size, offset, length):
            out += self._chunk_of(name, manifest, index)[start:end]
        return bytes(out)

    @_locked
    def export(self, name: str, path: str) -> None:
        """Write a recipe to a file (zero chunks as holes), fsynced, under a temporary
        name renamed into place: a reader never sees a partial file."""
        manifest = self.recipe(name)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.truncate(manifest.size)
                for index in sorted(manifest.data_digests):
                    os.pwrite(f.fileno(), self._chunk_of(name, manifest, index),
                              index * manifest.chunk_size)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ChunkStoreError(f"cannot export recipe {name!r}", path=path,
                                  os_errno=err.errno) from err
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _chunk_of(self, name: str, manifest: Manifest, index: int) -> bytes:
        digest = manifest.data_digests.get(index)
        length = min(manifest.chunk_size, manifest.size - index * manifest.chunk_size)
        if digest is None:
            return bytes(length)
        data = self.get(digest)
        if data is None:
            raise ChunkAbsent(path=self.root, recipe=name, index=index, digest=digest.hex())
        return data

    def writer(self, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
               replace: bool = False) -> RecipeWriter:
        """A writer that cuts a stream into chunks and commits it as recipe ``name``."""
        self._check_open("write")
        return RecipeWriter(self, name, chunk_size, replace)

    def import_file(self, name: str, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                    replace: bool = False) -> Manifest:
        """Store a file's content as recipe ``name``, chunked at ``chunk_size``."""
        try:
            f = open(path, "rb")
        except OSError as err:
            raise ChunkStoreError("cannot read file to import", path=path,
                                  os_errno=err.errno) from err
        with f, self.writer(name, chunk_size, replace=replace) as w:
            while True:
                try:
                    data = f.read(chunk_size * 16)
                except OSError as err:
                    raise ChunkStoreError("cannot read file to import", path=path,
                                          os_errno=err.errno) from err
                if not data:
                    break
                w.write(data)
            return w.commit()

    # --- accounting ------------------------------------------------------------------------

    @_locked
    def usage(self) -> StoreUsage:
        self._check_open("usage")
        db = self._db
        recipes, logical = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM recipes").fetchone()
        chunks, unique, stored = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(raw_bytes), 0), COALESCE(SUM(stored_bytes), 0) "
            "FROM chunks WHERE present = 1").fetchone()
        index = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                index += os.stat(os.path.join(self.root, INDEX_NAME + suffix)).st_size
        return StoreUsage(recipes, chunks, logical, unique, stored, self._used + index,
                          self._used, self.capacity)

    # --- internals -------------------------------------------------------------------------

    def _alloc(self, stored_bytes: int) -> int:
        return -(-stored_bytes // self._block) * self._block

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise LifecycleError("host store", action, "closed")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One index transaction; sqlite's errors are translated here, at the boundary."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk) can leave the transaction open: end it,
                # so the next one can begin.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise ChunkStoreError(f"host store index failed: {err}",
                                  path=os.path.join(self.root, INDEX_NAME)) from err

    def _present(self, digest: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM chunks WHERE digest = ? AND present = 1",
                                (digest,)).fetchone() is not None

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _touch(self, digest: bytes) -> None:
        # Kept in memory and written with the next transaction: a read must not cost a
        # commit. A crash loses only recency, which steers eviction, never data.
        self._touched[digest] = self._next_tick()

    def _flush_touched(self, db: sqlite3.Connection) -> None:
        if self._touched:
            db.executemany("UPDATE chunks SET last_used = ? WHERE digest = ?",
                           [(t, d) for d, t in self._touched.items()])
            self._touched.clear()

    def _unref(self, db: sqlite3.Connection, digests: set[bytes]) -> None:
        db.executemany("UPDATE chunks SET refs = refs - 1 WHERE digest = ?",
                       [(d,) for d in digests])
        db.execute("DELETE FROM chunks WHERE refs = 0 AND present = 0")

    def _add_blobs(self, frames: dict[bytes, bytes], raw: dict[bytes, int]) -> None:
        """Make new blobs durable, then present in one transaction (see the theory)."""
        needed = sum(self._alloc(len(f)) for f in frames.values())
        if self._used + needed > self.capacity:
            self._evict(need=self._used + needed - self.capacity)
        written: list[str] = []
        dirs: set[str] = set()
        try:
            for digest, frame in frames.items():
                final = os.path.join(self.root, blob_name(digest))
                tmp = os.path.join(self.root, "tmp", f"{digest.hex()}.{secrets.token_hex(4)}")
                self._write_file(tmp, frame, digest)
                try:
                    os.rename(tmp, final)
                except OSError as err:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise ChunkStoreError("cannot place chunk", path=final,
                                          digest=digest.hex(), os_errno=err.errno) from err
                written.append(final)
                dirs.add(os.path.dirname(final))
            for d in sorted(dirs):
                try:
                    fsync_dir(d)
                except OSError as err:
                    raise ChunkStoreError("cannot make placed chunks durable", path=d,
                                          os_errno=err.errno) from err
        except BaseException:
            for path in written:
                self._unlink(path)
            raise
        tick = self._next_tick()
        # From here a failure leaves placed blobs whose rows may or may not have been
        # committed; either is consistent, and the next open settles which.
        previous, self._needs_scan = self._needs_scan, True
        try:
            with self._tx() as db:
                self._flush_touched(db)
                db.executemany(
                    "INSERT INTO chunks VALUES (?1, 0, 1, ?2, ?3, ?4) ON CONFLICT (digest) DO "
                    "UPDATE SET present = 1, raw_bytes = ?2, stored_bytes = ?3, last_used = ?4",
                    [(d, raw[d], len(f), tick) for d, f in frames.items()])
        except ChunkStoreError as err:
            # SQLITE_FULL: the commit surely did not happen, so the space goes back now.
            # Any other failure (EIO in the commit's fsync) may have committed: the scan.
            cause = err.__cause__
            if isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode == SQLITE_FULL:
                self._needs_scan = previous
                for path in written:
                    self._unlink(path)
                raise ChunkStoreError("host store index full: chunks not stored",
                                      path=os.path.join(self.root, INDEX_NAME),
                                      os_errno=errno.ENOSPC, errno=Errno.ENOSPC) from err
            raise
        self._needs_scan = previous
        self._used += needed
        self.stats.written += len(frames)

    def _write_file(self, tmp: str, frame: bytes, digest: bytes) -> None:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise ChunkStoreError("cannot write chunk", path=tmp, digest=digest.hex(),
                                  os_errno=err.errno) from err
        try:
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ChunkStoreError("cannot write chunk", path=tmp, digest=digest.hex(),
                                  os_errno=err.errno,
                                  errno=Errno.ENOSPC if full else Errno.EIO) from err
        finally:
            os.close(fd)

    def _evict(self, need: int | None) -> int:
        """Evict unreferenced, unpinned chunks, least recently used first, until ``need``
        bytes are free (all of them when None). Raises ``StoreFull`` before evicting
        anything when that cannot free enough."""
        with self._tx() as db:
            self._flush_touched(db)
            rows = db.execute("SELECT digest, stored_bytes FROM chunks WHERE refs = 0 AND "
                              "present = 1 ORDER BY last_used").fetchall()
            victims: list[bytes] = []
            freed = 0
            for digest, stored in rows:
                if need is not None and freed >= need:
                    break
                if self._pins[digest]:
                    continue
                victims.append(digest)
                freed += self._alloc(stored)
            if need is not None and freed < need:
                raise StoreFull(path=self.root, capacity=self.capacity, used=self._used,
                                needed=need - self.capacity + self._used, evictable=freed)
            db.executemany("DELETE FROM chunks WHERE digest = ?", [(d,) for d in victims])
        # Rows first, files second: a crash in between leaves orphans, never a row
        # without its blob.
        for digest in victims:
            self._unlink(os.path.join(self.root, blob_name(digest)))
        self._used -= freed
        self.stats.evicted += len(victims)
        if victims:
            log.info("host store %s: evicted %d unreferenced chunks (%d bytes)",
                     self.root, len(victims), freed)
        return len(victims)

    def _drop(self, digest: bytes, path: str, why: str) -> None:
        row = self._db.execute("SELECT stored_bytes FROM chunks WHERE digest = ?",
                               (digest,)).fetchone()
        with self._tx() as db:
            db.execute("UPDATE chunks SET present = 0, raw_bytes = 0, stored_bytes = 0 "
                       "WHERE digest = ?", (digest,))
            db.execute("DELETE FROM chunks WHERE digest = ? AND refs = 0", (digest,))
        self._unlink(path)
        if row is not None:
            self._used -= self._alloc(row[0])
        self._touched.pop(digest, None)
        self.stats.rotten += 1
        log.warning("host store: chunk %s at %s %s: dropped", digest.hex(), path, why)

    def _unlink(self, path: str) -> None:
        """Remove a blob whose row is already gone or absent; one that cannot be removed
        is left for the next open's scan."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._needs_scan = True
            log.warning("host store: cannot remove %s: %s (removed at the next open)",
                        path, err.strerror)

    def _clear_tmp(self) -> None:
        tmp = os.path.join(self.root, "tmp")
        for entry in os.listdir(tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp, entry))

    def _remove_orphans(self) -> None:
        present = {d for (d,) in self._db.execute("SELECT digest FROM chunks WHERE present = 1")}
        blobs = os.path.join(self.root, "blobs")
        for sub in os.listdir(blobs):
            for entry in os.listdir(os.path.join(blobs, sub)):
                try:
                    digest = bytes.fromhex(entry)
                except ValueError:
                    digest = b""
                if len(digest) == DIGEST_BYTES and digest in present:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(blobs, sub, entry))
                self.stats.orphans_removed += 1
        if self.stats.orphans_removed:
            log.warning("host store %s: removed %d blobs never acknowledged",
                        self.root, self.stats.orphans_removed)


class RecipeWriter:
    """Cuts a byte stream into chunks, puts them in batches, and commits the recipe.

    Its chunks are pinned until it ends, so the room it makes for later chunks never
    evicts earlier ones. Leaving its ``with`` block without ``commit`` aborts it: the
    recipe is not recorded and its chunks are unreferenced (evictable).
    """

    def __init__(self, store: ChunkStore, name: str, chunk_size: int, replace: bool) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk size {chunk_size} must be positive")
        self.store = store
        self.name = name
        self.chunk_size = chunk_size
        self.replace = replace
        self.size = 0
        self._digests: list[bytes] = []
        self._buffer = bytearray()
        self._batch: list[bytes] = []
        self._pinned: list[bytes] = []
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise LifecycleError("recipe writer", "write", "ended", reason=self.name)
        self._buffer += data
        self.size += len(data)
        cs = self.chunk_size
        whole = len(self._buffer) // cs * cs
        for at in range(0, whole, cs):
            self._batch.append(bytes(self._buffer[at : at + cs]))
        del self._buffer[:whole]
        if len(self._batch) * cs >= self.store.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            digests = self.store.put_many(self._batch, pin=True)
            self._batch.clear()
            self._digests += digests
            self._pinned += digests

    def commit(self) -> Manifest:
        """Make the last chunks durable and record the recipe; return its manifest."""
        if self._done:
            raise LifecycleError("recipe writer", "commit", "ended", reason=self.name)
        if self._buffer:
            self._batch.append(bytes(self._buffer))
            self._buffer.clear()
        try:
            self._flush()
            manifest = Manifest.from_digests(self.size, self.chunk_size, self._digests)
            self.store.commit(self.name, manifest, replace=self.replace)
        finally:
            self._end()
        return manifest

    def abort(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self.store.unpin(self._pinned)
            self._pinned.clear()

    def __enter__(self) -> RecipeWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._end()


def _chunk_spans(chunk_size: int, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, end within the chunk) covering offset .. offset + length."""
    pos, end = offset, offset + length
    while pos < end:
        index = pos // chunk_size
        start = pos - index * chunk_size
        stop = min(chunk_size, end - index * chunk_size)
        yield index, start, stop
        pos = index * chunk_size + stop


class RecipeDevice(BlockDevice):
    """A recipe of the store as a read-only block device (one interface per layer): a
    bake's state or layer kept in the store is exported, cached and read like a file.

    Reads run on worker threads. A chunk the store does not hold (or found rotten on
    this read) fails the read with ``ChunkAbsent`` (a ``DeviceError``, EIO); the device
    never serves other bytes. Zero chunks are reported as holes by ``block_status``, so a
    manifest computed over the device never reads them.
    """

    def __init__(self, store: ChunkStore, name: str) -> None:
        super().__init__()
        self.store = store
        self.name = name
        self.read_only = True
        self._manifest: Manifest | None = None

    async def open(self) -> None:
        if self._manifest is None:
            self._manifest = await asyncio.to_thread(self.store.recipe, self.name)
            self.size = self._manifest.size
        await super().open()

    def describe(self) -> str:
        return f"RecipeDevice({self.name})"

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        data = await asyncio.to_thread(self.store.read, self.name, offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        return data

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self.check_range(offset, length)
        manifest = self._manifest
        assert manifest is not None, "block_status before open"
        extents: list[tuple[int, int]] = []
        for index, start, end in _chunk_spans(manifest.chunk_size, offset, length):
            flags = 0 if index in manifest.data_digests else STATE_HOLE | STATE_ZERO
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + end - start, flags)
            else:
                extents.append((end - start, flags))
        return extents
