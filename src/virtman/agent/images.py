"""One image on one host: remote paths → chunk cache → relay export; and the cache group.

Theory of operation
-------------------
``ImageRelay`` is the per-image stack of DESIGN.md: a ``RemoteDevice`` whose primaries
are the tree parents Volt hands out and whose fallbacks are the origin(s), under a
``CachedDevice`` (checked against the image's digest manifest), exported at once on the
agent's NBD server so children can attach before this host holds any data. Volt's
answers change the paths in place (``apply``), never disturbing requests in flight.

``CacheGroup`` holds every image relay of the host in one directory with a capacity.
When the bytes held exceed it, images that no VM uses are evicted, least recently used
first; an image in use is never evicted (its VMs must not see I/O errors).

The group is also each cache's space gate (``CachedDevice.space_gate``): a cache asks
it before storing a chunk, and tells it when its file system is full. A chunk that
would take the group past its capacity, or that met a full disk, makes the group evict
one image no VM uses (least recently used, never the image asking), and tell every
cache to try storing again; the chunk itself is served straight from upstream
(pass-through), so no VM and no child sees an error. With nothing left to evict the
caches keep passing through, retrying now and then, and ``status()`` says which do
and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.cached import CachedDevice, CacheSpace
from virtman.blockdev.file import FileDevice
from virtman.blockdev.manifest import Manifest
from virtman.blockdev.prefetch import BackgroundReads, Prefetcher
from virtman.blockdev.remote import RemoteDevice
from virtman.coordinator.models import Paths
from virtman.delivery import DeliveryMode as DeliveryMode  # its users import it from here too
from virtman.durable import write_atomic
from virtman.errors import ConfigError, NetworkError
from virtman.limits import (
    COPY_READ_BYTES,
    COPY_READS_IN_FLIGHT,
    RECONNECT_DELAY_MAX_SECONDS,
    RECONNECT_DELAY_SECONDS,
    RELAY_OPEN_WAIT_SECONDS,
)
from virtman.metrics import ImageFigures
from virtman.nbd.server import Export, NbdServer
from virtman.planner.tree import ORIGIN
from virtman.protocol.uri import parse_nbd_uri
from virtman.tlsconfig import TlsFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    """What an agent keeps of Volt's image record, so it restarts without Volt."""

    name: str
    origins: list[str]
    size: int
    chunk_size: int
    manifest_json: str

    def manifest(self) -> Manifest:
        return Manifest.from_json(self.manifest_json, source=f"image {self.name}")

    def save(self, path: str) -> None:
        write_atomic(path, json.dumps(self.__dict__).encode(), 0o644)

    @classmethod
    def load(cls, path: str) -> ImageSpec:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return cls(**doc)




#: What a relay's prefetch export is called: its image's name and this, which no image
#: name can hold ('@' is not in a name), so it never collides with another relay.
PREFETCH_EXPORT_SUFFIX = "@prefetch"


def prefetch_export(image: str) -> str:
    return image + PREFETCH_EXPORT_SUFFIX


def prefetch_uri(relay_uri: str) -> str:
    """The prefetch export beside the relay export at ``relay_uri``."""
    address = parse_nbd_uri(relay_uri)
    return dataclasses.replace(address, export=prefetch_export(address.export)).uri()


class ImageRelay:
    def __init__(
        self,
        spec: ImageSpec,
        cache_dir: str,
        server: NbdServer,
        relay_uri: str,
        mode: DeliveryMode = DeliveryMode.VIRTMAN,
        on_fetch: Callable[[float], None] | None = None,
        *,
        tls: TlsFiles | None = None,
        open_wait: float = RELAY_OPEN_WAIT_SECONDS,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.cache_dir = cache_dir
        self.server = server
        self.relay_uri = relay_uri
        self.mode = mode
        if mode is DeliveryMode.STAR or mode is DeliveryMode.COPY:
            self.remote = RemoteDevice(spec.origins, tls=tls)
        else:
            self.remote = RemoteDevice([], fallbacks=spec.origins, tls=tls)
        self.cache = CachedDevice(
            self.remote, cache_dir, chunk_size=spec.chunk_size, manifest=spec.manifest()
        )
        self.cache.on_fetch = on_fetch
        #: What the VMs of this host sit on (the cache, unless the mode says otherwise).
        self.base: BlockDevice = self.cache
        self.users: set[str] = set()
        self.last_used = time.monotonic()
        self.paths: Paths | None = None
        #: NBD URI -> host name ("origin" for the origin), for byte accounting.
        self.source_names: dict[str, str] = {u: ORIGIN for u in spec.origins}
        #: The prefetch of the image's boot profile on this host, once one ran.
        self.prefetcher: Prefetcher | None = None
        #: Runs in Volt's boot profile when last asked (None: not asked yet), and when.
        self.profile_runs: int | None = None
        self.profile_asked_at = -float("inf")
        #: Boots of this image being recorded on this host now.
        self.recording = 0
        #: Where this host's prefetch reads: its parents' prefetch exports (the origin
        #: for a root), on connections apart from the VMs' (virtman mode only; made
        #: when a prefetch starts, ``open_prefetch``).
        self.prefetch_remote: RemoteDevice | None = None
        self._tls = tls
        #: Seconds the first open may wait for an upstream to answer (``_open_base``).
        self.open_wait = open_wait

    async def open(self) -> None:
        if self.mode is DeliveryMode.STAR:
            self.base = self.remote
        elif self.mode is DeliveryMode.COPY:
            self.base = await self._download()
        else:
            self.base = self.cache
        await self._open_base()
        if self.base.size != self.spec.size:
            raise ConfigError(
                f"image {self.name!r}: origin has {self.base.size} bytes, "
                f"the registry says {self.spec.size}"
            )
        if self.mode.in_tree:
            self.server.add_export(Export(self.name, self.cache, f"virtman relay of {self.name}"))
        if self.mode is DeliveryMode.VIRTMAN:
            self.server.add_export(Export(
                prefetch_export(self.name), BackgroundReads(self.cache),
                f"virtman prefetch relay of {self.name}",
            ))

    async def _open_base(self) -> None:
        """Open the VMs' device, waiting up to ``open_wait`` seconds for an upstream to
        answer. A host's first VM of an image must reach the origin (or a parent) once to
        learn the image; an origin that is briefly slow to answer (a burst of hosts
        attaching at once on busy cores, a restart) makes the VM's create slower, not
        failed. Past the wait the error is the last upstream's."""
        deadline = time.monotonic() + self.open_wait
        delay = RECONNECT_DELAY_SECONDS
        while True:
            try:
                await self.base.open()
                return
            except NetworkError as err:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("image %r: no upstream answers yet (%s); trying again in %.1f s",
                            self.name, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)

    async def _download(self) -> BlockDevice:
        """COPY mode: the whole image from the origin into a local file, then that file."""
        path = os.path.join(self.cache_dir, "image.raw")
        if not os.path.exists(path):
            await self.remote.open()
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.remote.size)
                slots = asyncio.Semaphore(COPY_READS_IN_FLIGHT)

                async def piece(offset: int) -> None:
                    async with slots:
                        data = await self.remote.read(
                            offset, min(COPY_READ_BYTES, self.remote.size - offset)
                        )
                    os.pwrite(fd, data, offset)

                await asyncio.gather(
                    *(piece(o) for o in range(0, self.remote.size, COPY_READ_BYTES))
                )
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            log.info(
                "image %r copied whole from the origin (%d bytes)", self.name, self.remote.size
            )
        return FileDevice(path, read_only=True)

    async def close(self) -> None:
        if self.prefetcher is not None:
            await self.prefetcher.stop()
        if self.mode.in_tree:
            self.server.remove_export(self.name)
        if self.mode is DeliveryMode.VIRTMAN:
            self.server.remove_export(prefetch_export(self.name))
        if self.prefetch_remote is not None:
            self.cache.prefetch_upstream = None
            await self.prefetch_remote.close()
        await self.base.close()
        if self.base is not self.remote:
            await self.remote.close()

    def apply(self, paths: Paths) -> None:
        """Follow Volt's answer: new parents (best first), origin last."""
        if (
            self.paths is not None
            and paths.parents == self.paths.parents
            and paths.origins == self.paths.origins
        ):
            return
        for uri, name in zip(paths.parents, paths.parent_names, strict=True):
            self.source_names[uri] = name
        for uri in paths.origins:
            self.source_names[uri] = ORIGIN
        # The paper's hosts attach only to their parents: the origin is a path of level 1.
        fallbacks = paths.origins if self.mode is DeliveryMode.VIRTMAN or not paths.parents else []
        self.remote.set_paths(paths.parents, fallbacks=fallbacks)
        for uri, name in zip(paths.parents, paths.parent_names, strict=True):
            self.source_names[prefetch_uri(uri)] = name
        if self.prefetch_remote is not None:
            self.prefetch_remote.set_paths(
                [prefetch_uri(u) for u in paths.parents], fallbacks=paths.origins
            )
        log.info(
            "image %r: position %d, level %d, parents %s",
            self.name,
            paths.position,
            paths.level,
            paths.parent_names or [ORIGIN],
        )
        self.paths = paths

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def bytes_held(self) -> int:
        if self.mode is DeliveryMode.COPY:
            return self.spec.size
        return self.cache.chunks_present * self.spec.chunk_size

    @property
    def remotes(self) -> list[RemoteDevice]:
        """Every upstream this host reads the image from: the VMs' misses, and prefetch."""
        if self.prefetch_remote is not None:
            return [self.remote, self.prefetch_remote]
        return [self.remote]

    async def open_prefetch(self) -> bool:
        """Connect the prefetch upstream (its parents' prefetch exports, or the origin);
        False, logged, when none answers: the prefetch waits for the next attach."""
        if self.mode is not DeliveryMode.VIRTMAN:
            return False
        if self.prefetch_remote is not None:
            return True
        # Made with the parents known now, so opening it waits for them: the origin is
        # only the fallback while no parent answers, as for the VMs' reads.
        parents = [prefetch_uri(u) for u in self.paths.parents] if self.paths else []
        origins = self.paths.origins if self.paths else self.spec.origins
        remote = RemoteDevice(parents, fallbacks=origins, tls=self._tls)
        try:
            await remote.open()
        except NetworkError as err:
            log.info("image %r: prefetch upstream not reachable: %s", self.name, err)
            return False
        self.prefetch_remote = remote
        self.cache.prefetch_upstream = remote
        return True

    def bytes_received(self) -> dict[str, int]:
        """Bytes fetched per source host name (VMs' misses and prefetch together)."""
        out: dict[str, int] = {}
        for remote in self.remotes:
            for uri, n in remote.bytes_received_by_path().items():
                name = self.source_names.get(uri, uri)
                out[name] = out.get(name, 0) + n
        return out

    def bytes_served(self) -> int:
        """Bytes this host's relay sent its children (reads and prefetch)."""
        sent = self.server.exports_bytes_sent()
        return sent.get(self.name, 0) + sent.get(prefetch_export(self.name), 0)

    def figures(self) -> ImageFigures:
        """This image's data-path counters, for ``/metrics``."""
        return ImageFigures.read(
            self.name,
            self.cache,
            self.remotes,
            self.bytes_served(),
            lambda uri, _fallback: self.source_names.get(uri) == ORIGIN,
        )

    def status(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "relay_uri": self.relay_uri if self.mode.in_tree else None,
            "relay_bytes_sent": self.bytes_served(),
            "size": self.spec.size,
            "chunks": self.cache.chunks,
            "chunks_present": self.cache.chunks_present,
            "users": sorted(self.users),
            "parents": self.paths.parent_names if self.paths else [],
            "level": self.paths.level if self.paths else None,
            "bytes_received": self.bytes_received(),
            "paths": self.remote.path_status(),
            "cache_space": self.cache.space_status(),
            "cache_stats": dict(self.cache.stats.extra),
            "remote_stats": dict(self.remote.stats.extra),
            "prefetch": self.prefetcher.status() if self.prefetcher is not None else None,
            "profile_runs": self.profile_runs,
        }


class _RelayGate:
    """The cache group as the space gate of one relay's cache."""

    def __init__(self, group: CacheGroup, relay: ImageRelay) -> None:
        self.group = group
        self.relay = relay

    def admit(self, nbytes: int) -> bool:
        return self.group.admit(self.relay, nbytes)

    def disk_full(self) -> None:
        self.group.make_room(self.relay, "the cache disk is full")


class CacheGroup:
    """Every image relay of this host, in one directory, within one capacity."""

    def __init__(
        self,
        root: str,
        capacity: int,
        on_evicted: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.root = root
        self.capacity = capacity
        #: Told of each image evicted to make room (the agent leaves its tree at once, so
        #: children stop being sent to an export that is gone).
        self.on_evicted = on_evicted
        self.relays: dict[str, ImageRelay] = {}
        #: The eviction a cache's lack of space started (one at a time).
        self._making_room: asyncio.Task[None] | None = None
        self.evicted_for_space = 0
        #: Images evicted because the group held more than its capacity.
        self.evicted_over_capacity = 0
        os.makedirs(root, exist_ok=True)

    def add(self, relay: ImageRelay) -> None:
        """Take an opened relay into the group: its cache now grows only as the group allows."""
        self.relays[relay.name] = relay
        relay.cache.space_gate = _RelayGate(self, relay)

    def admit(self, relay: ImageRelay, nbytes: int) -> bool:
        """Whether ``relay``'s cache may store ``nbytes`` more (else it passes through)."""
        if self.bytes_held + nbytes <= self.capacity:
            return True
        self.make_room(relay, f"the cache group is at its capacity of {self.capacity} bytes")
        return False

    def make_room(self, asking: ImageRelay, why: str) -> None:
        """Start evicting one image no VM uses (not ``asking``), unless that is under way."""
        if self._making_room is not None and not self._making_room.done():
            return
        self._making_room = asyncio.get_running_loop().create_task(self._evict_one(asking, why))
        self._making_room.add_done_callback(self._room_made)

    def _room_made(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("cache group: eviction to make room failed: %s", task.exception())

    async def _evict_one(self, asking: ImageRelay, why: str) -> None:
        idle = sorted((r for r in self.relays.values() if not r.users and r is not asking),
                      key=lambda r: r.last_used)
        if not idle:
            return  # the caches pass through until a VM goes away or space comes back
        relay = idle[0]
        if self.relays.get(relay.name) is not relay:
            return  # gone meanwhile (the agent stopping)
        log.info("%s: evicting image %r (no VM uses it) to make room for %r",
                 why, relay.name, asking.name)
        await self._remove(relay)
        self.evicted_for_space += 1
        for other in self.relays.values():
            other.cache.space_returned()
        if self.on_evicted is not None:
            await self.on_evicted(relay.name)

    async def close(self) -> None:
        """Stop an eviction under way (the agent is stopping)."""
        if self._making_room is not None and not self._making_room.done():
            self._making_room.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._making_room

    async def _remove(self, relay: ImageRelay) -> None:
        del self.relays[relay.name]  # before closing: nobody may pick it up meanwhile
        await relay.close()
        shutil.rmtree(self.image_dir(relay.name), ignore_errors=True)

    def image_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def spec_path(self, name: str) -> str:
        return os.path.join(self.image_dir(name), "image.json")

    def known_specs(self) -> list[ImageSpec]:
        specs = []
        for name in sorted(os.listdir(self.root)):
            path = self.spec_path(name)
            if os.path.exists(path):
                try:
                    specs.append(ImageSpec.load(path))
                except (OSError, ValueError, TypeError) as err:
                    log.error("image record %s unreadable, skipped: %s", path, err)
        return specs

    @property
    def bytes_held(self) -> int:
        return sum(r.bytes_held for r in self.relays.values())

    async def evict(self) -> list[str]:
        """Evict unused images, least recently used first, until within capacity."""
        evicted = []
        idle = sorted((r for r in self.relays.values() if not r.users), key=lambda r: r.last_used)
        for relay in idle:
            if self.bytes_held <= self.capacity:
                break
            if relay.users or self.relays.get(relay.name) is not relay:
                continue  # taken into use (or gone) while an earlier one was closing
            log.info(
                "cache group over capacity (%d > %d bytes): evicting image %r",
                self.bytes_held,
                self.capacity,
                relay.name,
            )
            await self._remove(relay)
            self.evicted_over_capacity += 1
            evicted.append(relay.name)
        return evicted

    def status(self) -> dict[str, object]:
        passing = {name: r.cache.space.value for name, r in sorted(self.relays.items())
                   if r.cache.space is not CacheSpace.CACHING}
        try:
            fs = os.statvfs(self.root)
            free: int | None = fs.f_bavail * fs.f_frsize
        except OSError:
            free = None
        return {
            "capacity": self.capacity,
            "bytes_held": self.bytes_held,
            "over_capacity": self.bytes_held > self.capacity,
            "disk_free_bytes": free,
            "disk_full": CacheSpace.DISK_FULL.value in passing.values(),
            #: Images whose cache serves uncached reads from upstream without storing them.
            "passing_through": passing,
            "evicted_for_space": self.evicted_for_space,
            "images": sorted(self.relays),
        }
