"""CachedDevice: a persistent chunk cache over an upstream device (read-only).

Theory of operation
-------------------
The device is cut into chunks (256 KiB by default). A read whose chunks are all present
is one ``pread`` of the local store, answered without waiting. A read that misses
fetches each missing chunk whole from upstream, once: concurrent readers of one chunk
wait on the same fetch (a task, so one reader giving up does not cancel it for the
others). A fetched chunk is checked against the digest manifest when there is one; a
chunk that does not match is fetched again (the next attempt goes to the next upstream
path) and is never served; after ``max_digest_retries`` failures the read fails with EIO.
Only then is the chunk written to the store and marked present: no reader ever sees a
chunk before all of its bytes are in place.

Crash consistency is the store's (see ``store.py``): a background task syncs every
``sync_interval`` seconds, making fetched chunks durable in the map; after a crash the
cache is reused and chunks fetched since the last sync are fetched again, never served
torn. A store made for another image (other size, chunk size or manifest) is discarded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

from virtman.blockdev.base import BlockDevice, DeviceState
from virtman.blockdev.manifest import Manifest
from virtman.blockdev.store import StoreFile, StoreHeader
from virtman.errors import ConfigError, DeviceError, NetworkError
from virtman.limits import (
    CACHE_SYNC_INTERVAL_SECONDS,
    DEFAULT_CHUNK_SIZE,
    MAX_CONCURRENT_FETCHES,
    MAX_DIGEST_RETRIES,
)
from virtman.protocol.nbd.constants import Errno

log = logging.getLogger(__name__)

CACHE_FILE = "cache.vmstore"


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
        sync_interval: float = CACHE_SYNC_INTERVAL_SECONDS,
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
        self.read_only = True
        self._store: StoreFile | None = None
        self._fetches: dict[int, asyncio.Task[None]] = {}
        self._fetch_slots = asyncio.Semaphore(max_concurrent_fetches)

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
        held = sum(self._store.present)
        if held:
            log.info(
                "cache %s reused: %d of %d chunks held", self.path, held, self._store.header.units
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
                header.meta != self._identity():
            return None
        return header.size

    def _identity(self) -> dict[str, str]:
        return {"image": self.manifest.fingerprint() if self.manifest is not None else ""}

    def _wanted_header(self) -> StoreHeader:
        return StoreHeader("cache", self.size, self.chunk_size, self._identity())

    def _open_store(self) -> StoreFile:
        wanted = self._wanted_header()
        if os.path.exists(self.path):
            try:
                store = StoreFile.open(self.path)
            except ConfigError as err:
                log.warning("cache %s unusable (%s); starting a new one", self.path, err)
            else:
                if store.header == wanted:
                    return store
                log.warning(
                    "cache %s holds another image (%s); starting a new one", self.path, store.header
                )
                os.close(store.fd)
        return StoreFile.create(self.path, wanted)

    async def close(self) -> None:
        for task in list(self._fetches.values()):
            task.cancel()
        if self._fetches:
            await asyncio.gather(*self._fetches.values(), return_exceptions=True)
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
        return sum(self._store.present) if self._store else 0

    def is_present(self, index: int) -> bool:
        return bool(self._store and self._store.present[index])

    # --- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        store = self._store
        if store is None:
            raise DeviceError(f"{self.describe()} is not open", errno=Errno.EIO)
        if length:
            cs = self.chunk_size
            first, last = offset // cs, (offset + length - 1) // cs
            present = store.present
            if present.find(0, first, last + 1) >= 0:
                missing = [i for i in range(first, last + 1) if not present[i]]
                await asyncio.gather(*(self._ensure(i) for i in missing))
                self.stats.bump("misses", len(missing))
            else:
                self.stats.bump("hits")
        self.stats.reads += 1
        self.stats.bytes_read += length
        return store.pread(offset, length)

    async def prefetch(self, offset: int, length: int) -> None:
        """Bring a range into the cache (NBD_CMD_CACHE, warming)."""
        self.check_range(offset, length)
        if not length or self._store is None:
            return
        cs = self.chunk_size
        present = self._store.present
        await asyncio.gather(
            *(
                self._ensure(i)
                for i in range(offset // cs, (offset + length - 1) // cs + 1)
                if not present[i]
            )
        )

    async def _ensure(self, index: int) -> None:
        task = self._fetches.get(index)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(index))
            self._fetches[index] = task
            task.add_done_callback(functools.partial(self._fetch_done, index))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # the fetch was stopped (cache closing), not this reader
                raise DeviceError(f"cache {self.path} closed while chunk {index} was fetched",
                                  errno=Errno.EIO) from None
            raise

    def _fetch_done(self, index: int, task: asyncio.Task[None]) -> None:
        if self._fetches.get(index) is task:
            del self._fetches[index]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter re-raises it through shield

    async def _fetch(self, index: int) -> None:
        store = self._store
        assert store is not None
        start = index * self.chunk_size
        length = min(self.chunk_size, self.size - start)
        async with self._fetch_slots:
            if self.manifest is None:
                data = await self.upstream.read(start, length)
            else:
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
                    data = await self.upstream.read_verified(
                        start, length, check, self.max_digest_retries)
                except DeviceError as err:
                    if not mismatches:
                        raise
                    raise DeviceError(f"chunk {index} failed its digest {mismatches} times; "
                                      f"not served ({err})", errno=Errno.EIO) from err
                finally:
                    if mismatches:
                        self.stats.bump("digest_mismatches", mismatches)
        if self._store is not store:
            return  # closed while fetching
        try:
            store.pwrite(start, data)
        except (OSError, DeviceError) as err:
            # A full or failed cache disk is this host's fault: EIO, so children fail
            # over to another path instead of taking it for an error of theirs.
            raise DeviceError(f"cache {self.path} cannot store chunk {index}: {err}",
                              errno=Errno.EIO) from err
        store.mark_present(index, index)
        self.stats.bump("fetched_bytes", length)

    async def flush(self) -> None:
        self.stats.flushes += 1
