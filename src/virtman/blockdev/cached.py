"""CachedDevice: a persistent chunk cache over an upstream device (read-only).

Theory of operation
-------------------
The device is cut into chunks (256 KiB by default). A read whose chunks are all *ready*
(held and checked in this session) is one ``pread`` of the local store, answered
without waiting. Every other chunk of a read is *loaded* once: concurrent readers of
one chunk wait on the same load (a future, shielded, so one reader giving up does not
cancel it for the others). Loading a chunk is:

1. If the store holds it from an earlier session, read it and check it: against the
   digest manifest when there is one, otherwise against the checksum the store wrote
   with it (``store.py``). A chunk that passes is ready; one that fails has rotted at
   rest (or the disk lied about a flush): it is dropped (its map byte cleared durably),
   counted (``rotten_chunks``), logged, and fetched again.
2. Otherwise fetch it whole from upstream. A fetched chunk is checked against the
   manifest when there is one; a chunk that does not match is fetched again (the next
   attempt goes to the next upstream path) and is never served; after
   ``max_digest_retries`` failures the read fails with EIO. Misses of one turn of the
   event loop that are adjacent go upstream as one read (a *run*, see ``_miss``); a run
   that fails is retried chunk by chunk.
3. Store it (data and checksum) and mark it present: no reader ever sees a chunk
   before all of its bytes are in place. A chunk that cannot be stored is served anyway
   from memory (see "Full cache" below).

Why check lazily, on first read, rather than all at start: a relay must export at once
(children attach before it holds anything), and a cache holds what earlier sessions
read, of which a new session reads a part. Checking at start would delay every restart
by a read and hash of the whole cache (docs/data-plane.md has the figures) to protect
chunks that may never be read; checking on first read costs one hash of a chunk that
is being read anyway, once per chunk per session, and still no chunk is served before
it is checked. A chunk nobody reads can rot unnoticed, and harms nobody until read.

Crash consistency is the store's (see ``store.py``): a background task syncs every
``sync_interval`` seconds, making fetched chunks durable in the map; after a crash the
cache is reused and chunks fetched since the last sync are fetched again, never served
torn. A store made for another image (other size, chunk size or manifest) is
discarded, and so is a store made before checksums (version 1) unless a manifest can
check its chunks.

Full cache
----------
When a chunk cannot be stored (the file system says ENOSPC, the cache group says its
capacity is reached, the cache disk fails) the cache *passes through*: the chunk
fetched for the read is served from memory and not kept. A child or a VM never sees an
error because the cache is full. The space gate (the cache group) is told, so it can
evict images no VM uses; until it reports space back (``space_returned``) or
``full_retry`` seconds pass, the cache does not try to store. The condition is logged
when it starts, at most once per ``log_interval`` while it lasts, and when it ends; its
state and counters are in ``space_status()`` and ``stats``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from virtman.blockdev.base import BlockDevice, DeviceState
from virtman.blockdev.manifest import Manifest
from virtman.blockdev.store import CHECKSUM, StoreFile, StoreHeader
from virtman.errors import ConfigError, DeviceError, InvalidRequest, NetworkError
from virtman.limits import (
    CACHE_FULL_RETRY_SECONDS,
    CACHE_LOG_INTERVAL_SECONDS,
    CACHE_SYNC_INTERVAL_SECONDS,
    DEFAULT_CHUNK_SIZE,
    MAX_CONCURRENT_FETCHES,
    MAX_DIGEST_RETRIES,
    MISS_RUN_BYTES,
)
from virtman.protocol.nbd.constants import Errno

log = logging.getLogger(__name__)

CACHE_FILE = "cache.vmstore"

#: A loaded chunk's bytes as its readers get them: ``bytes``, or a read-only view of the
#: bytes of the upstream read that brought it (a run of misses, a prefetch run).
Chunk = bytes | memoryview


class CacheSpace(enum.Enum):
    """Whether a cache stores what it fetches."""

    CACHING = "caching"
    DISK_FULL = "disk_full"  # the file system said ENOSPC: passing through
    AT_CAPACITY = "at_capacity"  # the space gate (cache group) said no: passing through
    STORE_FAILED = "store_failed"  # the cache disk failed a write: passing through


class SpaceGate(Protocol):
    """Who decides whether a cache may grow (an agent's cache group)."""

    def admit(self, nbytes: int) -> bool:
        """Whether the cache may store ``nbytes`` more; False means pass through."""

    def disk_full(self) -> None:
        """The cache's file system is full (make room if you can)."""


class _GateQueue:
    """One class of fetches waiting at a ``FetchGate``, with a count of those still
    waiting (neither granted nor cancelled), kept as they come and go."""

    def __init__(self, keep: int) -> None:
        self.keep = keep  # slots that must stay free after this class takes one
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waiting = 0


class FetchGate:
    """Slots for upstream fetches, demand first. A demand fetch (a reader's miss) takes
    any free slot and is woken before any background fetch (prefetch); a background
    fetch takes a slot only while no demand fetch waits and more than ``reserve`` slots
    are free, so a VM's miss never queues behind prefetch, even when prefetch is busy.

    Waiters are counted as they queue and leave (not by walking the queues), and a free
    slot is taken without a context manager (``take_demand``, ``release``): a relay's
    cold fill passes here once per upstream request."""

    def __init__(self, slots: int, reserve: int = 1) -> None:
        if slots < 1 or not 0 <= reserve < slots:
            raise ConfigError(f"fetch gate of {slots} slots cannot reserve {reserve}")
        self.slots = slots
        self.reserve = reserve
        self._free = slots
        self._demand = _GateQueue(0)
        self._background = _GateQueue(reserve)

    @property
    def demand_waiting(self) -> int:
        return self._demand.waiting

    @contextlib.asynccontextmanager
    async def demand(self) -> AsyncIterator[None]:
        await self.take_demand()
        try:
            yield
        finally:
            self.release()

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        await self._acquire(self._background)
        try:
            yield
        finally:
            self.release()

    async def take_demand(self) -> None:
        """Take a slot for a demand fetch, waiting if none is free; give it back with
        ``release``."""
        if self._free > 0 and not self._demand.waiting:
            self._free -= 1
            return
        await self._acquire(self._demand)

    async def _acquire(self, queue: _GateQueue) -> None:
        if self._free > queue.keep and not self._demand.waiting and (
            queue is self._demand or not self._background.waiting
        ):
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiters.append(waiter)
        queue.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted as it was cancelled: hand the slot on
            else:
                queue.waiting -= 1
                with contextlib.suppress(ValueError):
                    queue.waiters.remove(waiter)
                self._wake()  # a background fetch may have queued behind this one
            raise

    def release(self) -> None:
        """Give back a slot (taken by ``take_demand`` or a context manager)."""
        self._free += 1
        self._wake()

    def _wake(self) -> None:
        for queue in (self._demand, self._background):
            waiters = queue.waiters
            while waiters and self._free > queue.keep:
                waiter = waiters.popleft()
                if waiter.done():
                    continue  # cancelled: its task uncounts it
                if queue is self._background and self._demand.waiting:
                    waiters.appendleft(waiter)
                    return
                self._free -= 1
                queue.waiting -= 1
                waiter.set_result(None)


class _Throttle:
    """One log line per interval for a lasting condition; the rest are counted."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    def due(self, now: float) -> int | None:
        """Lines suppressed since the last one if a line is due now, else None."""
        if now - self.last < self.interval:
            self.suppressed += 1
            return None
        self.last, count, self.suppressed = now, self.suppressed, 0
        return count


class CachedDevice(BlockDevice):
    """Caches ``upstream`` in ``<cache_dir>/cache.vmstore`` (or ``path`` if given)."""

    def __init__(
        self,
        upstream: BlockDevice,
        cache_dir: str | os.PathLike[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        manifest: Manifest | None = None,
        path: str | None = None,
        max_digest_retries: int = MAX_DIGEST_RETRIES,
        max_concurrent_fetches: int = MAX_CONCURRENT_FETCHES,
        miss_run_bytes: int = MISS_RUN_BYTES,
        sync_interval: float = CACHE_SYNC_INTERVAL_SECONDS,
        full_retry: float = CACHE_FULL_RETRY_SECONDS,
        log_interval: float = CACHE_LOG_INTERVAL_SECONDS,
        space_gate: SpaceGate | None = None,
    ) -> None:
        super().__init__()
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            raise ConfigError(f"chunk size {chunk_size} must be a power of two of at least 4096")
        if manifest is not None and manifest.chunk_size != chunk_size:
            raise ConfigError(
                f"manifest chunk size {manifest.chunk_size} differs from the cache's {chunk_size}"
            )
        self.upstream = upstream
        self.cache_dir = os.fspath(cache_dir)
        self.path = path or os.path.join(self.cache_dir, CACHE_FILE)
        self.chunk_size = chunk_size
        self.manifest = manifest
        self.max_digest_retries = max_digest_retries
        self.sync_interval = sync_interval
        self.full_retry = full_retry
        #: Set by the owner (a cache group) to bound what this cache may hold.
        self.space_gate = space_gate
        #: Where prefetch runs are read from (None: ``upstream``). An agent gives its
        #: parents' prefetch exports here, on connections of their own, so its prefetch
        #: is background work at the parents too and never queues ahead of a VM's miss
        #: in a connection.
        self.prefetch_upstream: BlockDevice | None = None
        #: Set by the owner (metrics): called with the seconds each successful chunk
        #: fetch from upstream took (misses only: the hit path never calls it).
        self.on_fetch: Callable[[float], None] | None = None
        self.read_only = True
        self._store: StoreFile | None = None
        #: 1 where a chunk is held *and* was checked (or fetched) in this session.
        self._ready = bytearray()
        #: Chunks being loaded; every reader of one waits on its future (resolved by a
        #: run of misses or a prefetch run, once the chunk is checked and stored).
        self._fetches: dict[int, asyncio.Future[Chunk]] = {}
        #: Upstream reads in flight (miss runs, prefetch runs), to stop on close.
        self._batches: set[asyncio.Task[Any]] = set()
        #: Chunks missed in this turn of the event loop, fetched when the turn ends.
        self._misses: list[int] = []
        #: Adjacent misses of one turn joined into one upstream read, at most.
        self.miss_run_chunks = max(1, miss_run_bytes // chunk_size)
        self.gate = FetchGate(max_concurrent_fetches)
        self.space = CacheSpace.CACHING
        self._space_since = 0.0
        self._store_again_at = 0.0
        self._passed_this_episode = 0
        self._full_log = _Throttle(log_interval)
        self._episode_logged = False
        self._rot_log = _Throttle(log_interval)

    def describe(self) -> str:
        return f"cache {self.path} over {self.upstream.describe()}"

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.state is DeviceState.OPEN:
            return
        try:
            await self.upstream.open()
        except NetworkError:
            # A cache made earlier for this image serves what it holds while the
            # upstream is away, and fetches the rest once it is back.
            size = self._size_of_existing_store()
            if size is None or not await self.upstream.open_offline(size):
                raise
            log.warning("upstream of %s unreachable; serving from the cache", self.path)
        self.size = self.upstream.size
        if self.manifest is not None and self.manifest.size != self.size:
            raise ConfigError(
                f"manifest is for {self.manifest.size} bytes; upstream has {self.size}"
            )
        os.makedirs(self.cache_dir, exist_ok=True)
        self._store = self._open_store()
        self._ready = bytearray(self._store.header.units)
        held = self._store.units_present
        if held:
            log.info(
                "cache %s reused: %d of %d chunks held, each checked against the %s on its "
                "first read", self.path, held, self._store.header.units,
                "manifest" if self.manifest is not None else "store's checksums",
            )
        self._store.start_syncing(self.sync_interval)
        self.state = DeviceState.OPEN

    def _size_of_existing_store(self) -> int | None:
        """The device size an existing store of this image records, if there is one."""
        if not os.path.exists(self.path):
            return None
        try:
            store = StoreFile.open(self.path)
        except (ConfigError, DeviceError):
            return None
        os.close(store.fd)
        header = store.header
        if header.kind != "cache" or header.unit != self.chunk_size or \
                header.meta != self._identity() or not self._can_check(header):
            return None
        return header.size

    def _identity(self) -> dict[str, str]:
        return {"image": self.manifest.fingerprint() if self.manifest is not None else ""}

    def _wanted_header(self) -> StoreHeader:
        return StoreHeader("cache", self.size, self.chunk_size, self._identity(), CHECKSUM)

    def _can_check(self, header: StoreHeader) -> bool:
        """Whether this cache can check the chunks of a store with ``header``."""
        return header.checksum == CHECKSUM or self.manifest is not None

    def _open_store(self) -> StoreFile:
        wanted = self._wanted_header()
        if os.path.exists(self.path):
            try:
                store = StoreFile.open(self.path)
            except ConfigError as err:
                log.warning("cache %s unusable (%s); starting a new one", self.path, err)
            else:
                header = store.header
                if header == wanted:
                    return store
                if header.checksum is None and header == StoreHeader(
                        "cache", self.size, self.chunk_size, self._identity()):
                    # A store from before checksums: its chunks can still be checked
                    # against the manifest; without one nothing vouches for them.
                    if self._can_check(header):
                        log.info("cache %s predates per-chunk checksums; its chunks are "
                                 "checked against the manifest", self.path)
                        return store
                    log.warning("cache %s predates per-chunk checksums and there is no "
                                "manifest to check it against; starting a new one", self.path)
                else:
                    log.warning("cache %s holds another image (%s); starting a new one",
                                self.path, header)
                os.close(store.fd)
        return StoreFile.create(self.path, wanted)

    async def close(self) -> None:
        rotten = self.stats.extra.get("rotten_chunks", 0)
        if rotten:  # the throttled lines may not have named them all
            log.warning("cache %s: %d chunks failed their check this session and were "
                        "fetched again", self.path, rotten)
        pending: list[asyncio.Future[Any]] = [*self._fetches.values(), *self._batches]
        self._misses.clear()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._store is not None:
            await self._store.aclose()
            self._store = None
        await self.upstream.close()
        self.state = DeviceState.CLOSED

    # --- status ---------------------------------------------------------------------------

    @property
    def chunks(self) -> int:
        return self._store.header.units if self._store else 0

    @property
    def chunks_present(self) -> int:
        return self._store.units_present if self._store else 0

    def is_present(self, index: int) -> bool:
        return bool(self._store and self._store.present[index])

    def space_status(self) -> dict[str, object]:
        """Whether this cache stores what it fetches, and since when (for /status)."""
        passing = self.space is not CacheSpace.CACHING
        return {
            "space": self.space.value,
            "passing_through_seconds":
                round(time.monotonic() - self._space_since, 1) if passing else None,
            "passthrough_chunks": self.stats.extra.get("passthrough_chunks", 0),
            "rotten_chunks": self.stats.extra.get("rotten_chunks", 0),
        }

    # --- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        store = self._counted_read(offset, length)
        if not length:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        if self._ready.find(0, first, last + 1) < 0:
            self.stats.bump("hits")
            return store.pread(offset, length)
        loaded = await self._load(store, first, last)
        return self._assemble(store, offset, length, loaded)

    async def read_or_locate(self, offset: int, length: int) -> bytes | tuple[int, int]:
        """A read that, once its chunks are loaded, says where they lie in the store
        file (as ``read_location``) instead of returning their bytes, when every one of
        them was stored: the server then sends a cold read with ``sendfile`` as it does
        a warm one, and the run's bytes never become a reader's ``bytes``. Returns the
        bytes when a chunk was passed through (not stored) or the cache closed
        meanwhile. The caller must send from the location before it next yields."""
        store = self._counted_read(offset, length)
        if not length:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        ready = self._ready
        if ready.find(0, first, last + 1) >= 0:
            loaded = await self._load(store, first, last)
            if self._store is not store or ready.find(0, first, last + 1) >= 0:
                return self._assemble(store, offset, length, loaded)
        else:
            self.stats.bump("hits")
        return store.fd, store.data_offset + offset

    def _counted_read(self, offset: int, length: int) -> StoreFile:
        self.check_range(offset, length)
        store = self._store
        if store is None:
            raise DeviceError(f"{self.describe()} is not open", errno=Errno.EIO)
        self.stats.reads += 1
        self.stats.bytes_read += length
        return store

    async def _load(
        self, store: StoreFile, first: int, last: int
    ) -> dict[int, Chunk]:
        """Load chunks ``first`` .. ``last`` that are not ready: check those held from an
        earlier session, fetch the rest. Returns the bytes of those loaded now (they
        may not be stored: pass-through)."""
        ready = self._ready
        loaded: dict[int, Chunk] = {}
        todo = []
        for i in range(first, last + 1):
            if ready[i]:
                continue
            if store.present[i] and i not in self._fetches:
                # Held from an earlier session: checked here, without a task, as this is
                # CPU work only; a chunk that fails is dropped and fetched below.
                data = self._held(store, i)
                if data is not None:
                    ready[i] = 1
                    loaded[i] = data
                    continue
            todo.append(i)
        if todo:
            self.stats.bump("misses", len(todo))
            # Every missing chunk is asked for before the first wait, so adjacent ones
            # go upstream as one read (see _miss).
            loading = [(i, self._fetches.get(i) or self._miss(i)) for i in todo]
            for i, future in loading:
                loaded[i] = await self._wait(i, future)
        return loaded

    def _assemble(
        self, store: StoreFile, offset: int, length: int, loaded: dict[int, Chunk]
    ) -> bytes:
        """A read's bytes: chunks loaded now come from memory (they may not be stored:
        pass-through); runs of ready chunks between them are one pread each."""
        cs = self.chunk_size
        last = (offset + length - 1) // cs
        pieces: list[Chunk] = []
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // cs
            data = loaded.get(index)
            if data is not None:
                upto = min(end, (index + 1) * cs)
                pieces.append(data[pos - index * cs : upto - index * cs])
            else:
                run_end = index + 1
                while run_end <= last and run_end not in loaded:
                    run_end += 1
                upto = min(end, run_end * cs)
                pieces.append(store.pread(pos, upto - pos))
            pos = upto
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def read_location(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where in the store file a read lies when all of its chunks are ready, so the
        server can send it from there (sendfile, ``virtman.device.FileReads``); counted
        as a read hit. None when a chunk is not ready: then ``read`` fetches or checks it.
        """
        store = self._store
        if store is None or length <= 0 or offset < 0 or offset + length > self.size:
            return None
        cs = self.chunk_size
        if self._ready.find(0, offset // cs, (offset + length - 1) // cs + 1) >= 0:
            return None
        self.stats.reads += 1
        self.stats.bytes_read += length
        self.stats.bump("hits")
        return store.fd, store.data_offset + offset

    async def prefetch(self, offset: int, length: int) -> None:
        """Bring a range into the cache (NBD_CMD_CACHE, warming)."""
        self.check_range(offset, length)
        if not length or self._store is None or self._passing_through():
            return  # a cache that cannot keep chunks would only fetch and drop them
        cs = self.chunk_size
        ready = self._ready
        await asyncio.gather(
            *(
                self._ensure(i)
                for i in range(offset // cs, (offset + length - 1) // cs + 1)
                if not ready[i]
            )
        )

    def needs_fetch(self, index: int) -> bool:
        """Whether chunk ``index`` is neither ready nor being loaded (prefetch planning)."""
        return not self._ready[index] and index not in self._fetches

    async def prefetch_run(self, first: int, count: int) -> int:
        """Bring chunks ``first`` .. ``first + count - 1`` into the cache with one
        upstream read, at background priority (``FetchGate``): those already ready or
        being loaded are left alone, chunks held from an earlier session are checked
        instead of fetched. Each fetched chunk is checked (manifest) and stored like a
        miss's; one that fails its check is fetched again alone. Returns the bytes of
        the chunks it brought; raises the first error of a chunk it could not bring.
        Readers of a chunk in the run wait for the run once it has a background slot;
        until then their misses go out as demand (``_prefetch_piece``)."""
        self.check_range(first * self.chunk_size, 0)
        store = self._store
        if store is None or self._passing_through() or count < 1:
            return 0
        last = min(first + count, store.header.units) - 1
        wanted: list[int] = []
        for i in range(first, last + 1):
            if not self.needs_fetch(i):
                continue
            if store.present[i] and self._held(store, i) is not None:
                self._ready[i] = 1
                continue
            wanted.append(i)
        fetched = 0
        tasks: list[asyncio.Task[Chunk]] = []
        try:
            await asyncio.gather(
                *(self._prefetch_piece(lo, n, tasks) for lo, n in _adjacent_runs(wanted))
            )
        except asyncio.CancelledError:
            for task in tasks:  # a stopped prefetch brings nothing more in
                task.cancel()
            raise
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failed: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                failed = failed or result
            else:
                fetched += len(result)
        if failed is not None:
            # Readers of those chunks got the error too; the prefetch stops on it rather
            # than walk the rest of the profile into the same failure.
            raise failed
        return fetched

    async def read_background(self, offset: int, length: int) -> bytes:
        """A read that fetches what it misses as prefetch (background priority, one
        upstream request per run of missing chunks): what a child host's prefetch reads
        through this relay's prefetch export."""
        self.check_range(offset, length)
        if length:
            cs = self.chunk_size
            missing = [i for i in range(offset // cs, (offset + length - 1) // cs + 1)
                       if self.needs_fetch(i)]
            for first, count in _adjacent_runs(missing):
                await self.prefetch_run(first, count)
        return await self.read(offset, length)

    async def _prefetch_piece(self, lo: int, n: int, tasks: list[asyncio.Task[Chunk]]) -> None:
        """Chunks ``lo``.. of a prefetch run, read upstream once the run has a background
        slot; the tasks that load each chunk from the reads are added to ``tasks``.

        The chunks are claimed (put in ``_fetches``) only once the slot is held: a
        reader's miss on one of them while the run still waits for a slot fetches it as
        demand at once, instead of waiting behind prefetch for that slot. Chunks a
        reader took meanwhile are left out of the reads."""
        loop = asyncio.get_running_loop()
        async with self.gate.background():
            batches = []
            for first, count in _adjacent_runs(
                [i for i in range(lo, lo + n) if self.needs_fetch(i)]
            ):
                batch = loop.create_task(self._fetch_range(first, count))
                self._batches.add(batch)
                batch.add_done_callback(self._batches.discard)
                batches.append(batch)
                for i in range(first, first + count):
                    task = loop.create_task(self._load_from_run(i, first, batch))
                    self._fetches[i] = task
                    task.add_done_callback(functools.partial(self._fetch_done, i))
                    tasks.append(task)
            if batches:  # the slot is held while the reads are out (not while stored)
                await asyncio.wait(batches)

    async def _fetch_range(self, first: int, count: int) -> Chunk:
        """One upstream read of a prefetch run; the caller holds a background slot."""
        start = first * self.chunk_size
        # Not timed into on_fetch: that histogram is of single chunks a reader waited for.
        upstream = self.prefetch_upstream or self.upstream
        data = await upstream.read_buffer(start, min(count * self.chunk_size, self.size - start))
        self.stats.bump("prefetched_chunks", count)
        self.stats.bump("prefetched_bytes", len(data))
        return data

    async def _load_from_run(self, index: int, first: int, batch: asyncio.Task[Chunk]) -> Chunk:
        """Chunk ``index`` of a prefetch run: its slice of the run's bytes once checked,
        else fetched alone (demand priority: a reader may be waiting for it)."""
        store = self._store
        assert store is not None
        cs = self.chunk_size
        piece: Chunk | None
        try:
            data = await asyncio.shield(batch)
        except (DeviceError, NetworkError) as err:
            log.info("prefetch of chunks %d.. of %s failed (%s); fetching chunk %d alone",
                     first, self.path, err, index)
            piece = None
        else:
            piece = memoryview(data)[(index - first) * cs : (index - first + 1) * cs]
            if self.manifest is not None and not self.manifest.matches(index, piece):
                self.stats.bump("digest_mismatches")
                log.warning("chunk %d of %s failed its digest in a prefetch run; refetching",
                            index, self.path)
                piece = None
        if piece is None:
            piece = await self._fetch(index)
        if self._store is store:
            self._keep(store, index, piece)
        return piece

    async def _ensure(self, index: int) -> Chunk:
        """Chunk ``index``'s bytes, checked; ready (or passed through) on return."""
        future = self._fetches.get(index)
        if future is None:
            store = self._store
            if store is None:
                raise DeviceError(f"{self.describe()} is not open", errno=Errno.EIO)
            if store.present[index]:
                data = self._held(store, index)
                if data is not None:
                    self._ready[index] = 1
                    return data
            future = self._miss(index)
        return await self._wait(index, future)

    async def _wait(self, index: int, future: asyncio.Future[Chunk]) -> Chunk:
        """The bytes of a chunk being loaded. Shielded: a reader giving up (its request
        cancelled) does not stop the load for the others."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():  # the load was stopped (cache closing), not this reader
                raise DeviceError(f"cache {self.path} closed while chunk {index} was fetched",
                                  errno=Errno.EIO) from None
            raise

    def _miss(self, index: int) -> asyncio.Future[Chunk]:
        """Start loading chunk ``index`` from upstream; its future, which every reader of
        it waits on.

        Misses are gathered until the current turn of the event loop ends, then adjacent
        ones go upstream as one read (``miss_run_chunks`` at most): a client reading
        sequentially with many requests in flight (nbdcopy, a guest's readahead) sends
        several adjacent reads in one packet, and one upstream request per run, not per
        chunk, is what a relay's cold fill spends its Python time on."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Chunk] = loop.create_future()
        self._fetches[index] = future
        future.add_done_callback(functools.partial(self._fetch_done, index))
        if not self._misses:
            loop.call_soon(self._start_misses)
        self._misses.append(index)
        return future

    def _fetch_done(self, index: int, future: asyncio.Future[Chunk]) -> None:
        if self._fetches.get(index) is future:
            del self._fetches[index]
        if not future.cancelled():
            future.exception()  # retrieved here; every waiter re-raises it through shield

    def _start_misses(self) -> None:
        """Fetch this turn's misses, one upstream read per run of adjacent chunks."""
        misses, self._misses = sorted(set(self._misses)), []
        store = self._store
        if store is None:
            return  # closed: close() stopped their futures
        live: list[int] = []
        futures: dict[int, asyncio.Future[Chunk]] = {}
        for i in misses:
            future = self._fetches.get(i)
            if future is not None and not future.done():
                live.append(i)
                futures[i] = future
        loop = asyncio.get_running_loop()
        for first, count in _adjacent_runs(live, self.miss_run_chunks):
            run = [futures[i] for i in range(first, first + count)]
            task = loop.create_task(self._fetch_run(store, first, run))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _fetch_run(
        self, store: StoreFile, first: int, futures: list[asyncio.Future[Chunk]]
    ) -> None:
        """Fetch chunks ``first`` .. ``first + len(futures) - 1``, check and store them,
        then resolve their futures: no reader gets a chunk before it is checked and
        stored (or passed through)."""
        try:
            if len(futures) == 1:
                await self._fetch_alone(store, first, futures[0])
                return
            joined = await self._fetch_joined(first, len(futures))
            if joined is None:  # each chunk alone: each fails, if it does, on its own
                await asyncio.gather(*(self._fetch_alone(store, first + k, f)
                                       for k, f in enumerate(futures)))
                return
            data, pieces = joined
            if self._store is store:  # else closed while fetching
                self._keep(store, first, data, len(futures))  # one write for the run
            for future, piece in zip(futures, pieces, strict=True):
                if not future.done():
                    future.set_result(piece)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise

    async def _fetch_joined(self, first: int, count: int) -> tuple[Chunk, list[Chunk]] | None:
        """Chunks ``first``.. as one upstream read: its bytes and each chunk's. With a
        manifest, every chunk of it is checked, and a read holding a chunk that fails
        is taken again from the next path (``read_verified``), up to
        ``max_digest_retries`` times. None when the joined read fails: its chunks are
        then fetched alone, so each fails, if it does, with its own error, and the
        others are still served."""
        cs = self.chunk_size
        start = first * cs
        manifest = self.manifest
        pieces: list[Chunk] = []
        mismatches = 0

        def split(data: Chunk) -> bool:
            nonlocal mismatches
            # Views, not copies (``data`` is immutable: bytes, or a read-only view of the
            # array the upstream reply was received into, ``read_buffer``): a reader sent
            # from the store (``read_or_locate``) never touches them, and the store
            # writes the run from ``data`` itself.
            view = memoryview(data)
            pieces[:] = [view[k * cs : (k + 1) * cs] for k in range(count)]
            if manifest is None:
                return True
            bad = [first + k for k, piece in enumerate(pieces)
                   if not manifest.matches(first + k, piece)]
            for index in bad:
                log.warning("chunk %d of %s failed its digest; refetching", index, self.path)
            mismatches += len(bad)
            return not bad

        gate = self.gate
        await gate.take_demand()
        try:
            began = time.monotonic()
            length = min(count * cs, self.size - start)
            if manifest is None:
                data = await self.upstream.read_buffer(start, length)
                split(data)
            else:
                data = await self.upstream.read_verified(
                    start, length, split, self.max_digest_retries)
        except (DeviceError, NetworkError, InvalidRequest) as err:
            log.info("read of chunks %d..%d of %s failed (%s); fetching each alone",
                     first, first + count - 1, self.path, err)
            return None
        finally:
            gate.release()
            if mismatches:
                self.stats.bump("digest_mismatches", mismatches)
        if self.on_fetch is not None:
            took = time.monotonic() - began
            for _ in range(count):
                self.on_fetch(took)
        return data, pieces

    async def _fetch_alone(
        self, store: StoreFile, index: int, future: asyncio.Future[Chunk]
    ) -> None:
        try:
            data = await self._fetch(index)
        except Exception as err:
            _fail(future, err)
            return
        self._settle(store, index, future, data)

    def _settle(
        self, store: StoreFile, index: int, future: asyncio.Future[Chunk], data: Chunk
    ) -> None:
        """Store a fetched, checked chunk (or pass it through), then hand it to its
        readers."""
        if self._store is store:  # else closed while fetching
            self._keep(store, index, data)
        if not future.done():
            future.set_result(data)

    def _held(self, store: StoreFile, index: int) -> bytes | None:
        """The stored bytes of a chunk from an earlier session if they pass their check;
        None (and the chunk dropped) if they do not."""
        start = index * self.chunk_size
        data = store.pread(start, min(self.chunk_size, self.size - start))
        if self.manifest is not None:
            intact, against = self.manifest.matches(index, data), "the manifest"
        else:
            intact, against = store.checksum_matches(index, data), "its checksum"
        if intact:
            self.stats.bump("chunks_checked")
            return data
        self.stats.bump("rotten_chunks")
        suppressed = self._rot_log.due(time.monotonic())
        if suppressed is not None:
            log.warning("cache %s: chunk %d failed %s (changed at rest); dropped and fetched "
                        "again%s", self.path, index, against,
                        f" ({suppressed} more such chunks since the last line)"
                        if suppressed else "")
        try:
            store.drop(index)
        except DeviceError as err:
            # The map may still say "held" on disk; the chunk is checked again in the
            # next session whatever it holds then, so refetching stays safe.
            log.error("%s", err)
        return None

    async def _fetch(self, index: int) -> Chunk:
        gate = self.gate
        await gate.take_demand()
        try:
            began = time.monotonic()
            data = await self._fetch_checked(index)
        finally:
            gate.release()
        if self.on_fetch is not None:
            self.on_fetch(time.monotonic() - began)
        return data

    async def _fetch_checked(self, index: int) -> Chunk:
        start = index * self.chunk_size
        length = min(self.chunk_size, self.size - start)
        if self.manifest is None:
            return await self.upstream.read_buffer(start, length)
        manifest = self.manifest
        mismatches = 0

        def check(data: bytes) -> bool:
            nonlocal mismatches
            if manifest.matches(index, data):
                return True
            mismatches += 1
            log.warning("chunk %d of %s failed its digest; refetching", index, self.path)
            return False

        try:
            return await self.upstream.read_verified(
                start, length, check, self.max_digest_retries)
        except DeviceError as err:
            if not mismatches:
                raise
            raise DeviceError(f"chunk {index} failed its digest {mismatches} times; "
                              f"not served ({err})", errno=Errno.EIO) from err
        finally:
            if mismatches:
                self.stats.bump("digest_mismatches", mismatches)

    # --- space ----------------------------------------------------------------------------

    def _passing_through(self) -> bool:
        return self.space is not CacheSpace.CACHING and time.monotonic() < self._store_again_at

    def _keep(self, store: StoreFile, index: int, data: Chunk, count: int = 1) -> None:
        """Store fetched chunks (``count`` of them from ``index``, all of ``data``), or
        pass them through when there is no room for them."""
        if self._passing_through():
            self._passed(self.space, count, len(data), None)
            return
        gate = self.space_gate
        if gate is not None and not gate.admit(len(data)):
            self._passed(CacheSpace.AT_CAPACITY, count, len(data),
                         "the cache group is at capacity")
            return
        try:
            store.fill(index, data, count)
        except DeviceError as err:
            full = err.errno == Errno.ENOSPC
            self._passed(CacheSpace.DISK_FULL if full else CacheSpace.STORE_FAILED, count,
                         len(data), str(err))
            if full and gate is not None:
                gate.disk_full()
            return
        if count == 1:
            self._ready[index] = 1
        else:
            self._ready[index : index + count] = b"\1" * count
        self.stats.bump("fetched_bytes", len(data))
        if self.space is not CacheSpace.CACHING:
            if self._episode_logged:  # a cache flapping at the edge logs once per interval
                log.info("cache %s stores chunks again after %.1f s; %d chunks were passed "
                         "through meanwhile", self.path, time.monotonic() - self._space_since,
                         self._passed_this_episode)
            self.space = CacheSpace.CACHING
            self._passed_this_episode = 0

    def _passed(self, state: CacheSpace, chunks: int, nbytes: int, reason: str | None) -> None:
        """Count chunks served without storing them; log the condition, throttled."""
        now = time.monotonic()
        if self.space is CacheSpace.CACHING:
            self._space_since = now
            self._passed_this_episode = 0
            self._episode_logged = False
        if reason is not None:  # a fresh attempt failed: wait before the next one
            self.space = state
            self._store_again_at = now + self.full_retry
        self.stats.bump("passthrough_chunks", chunks)
        self.stats.bump("passthrough_bytes", nbytes)
        self._passed_this_episode += chunks
        if self._full_log.due(now) is not None:
            self._episode_logged = True
            log.warning("cache %s cannot store chunks (%s: %s); serving uncached reads "
                        "straight from upstream, %d chunks so far; trying again every "
                        "%g s", self.path, self.space.value, reason or "as before",
                        self._passed_this_episode, self.full_retry)

    def space_returned(self) -> None:
        """Space was made (e.g. an image was evicted): try storing on the next fetch."""
        self._store_again_at = 0.0

    async def flush(self) -> None:
        self.stats.flushes += 1


def _fail(future: asyncio.Future[Chunk], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


def _adjacent_runs(indices: list[int], longest: int = 0) -> list[tuple[int, int]]:
    """Sorted ``indices`` as (first, count) runs of consecutive numbers, each at most
    ``longest`` long when that is given."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] != longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
