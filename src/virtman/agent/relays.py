"""The agent's image relays: one NBD server for all relay exports, the cache group, and
joining each image's tree when an image is first used.

Theory of operation
-------------------
An image is set up on first use (``image(name)``): its record comes from the image
directory (Volt), is saved beside its cache so the agent restarts without Volt, its
relay is opened and exported at once, and only then does the agent join the image's
tree, so its parents are known before any data is read. A join that fails leaves the
relay reading from the origin until the next heartbeat brings paths. Concurrent first
uses of one image wait on one lock and share one relay.

Volt's heartbeat answers move each relay to new parents (``apply``). Images that no VM
uses are evicted when the cache group is over capacity (``evict``); an evicted image
leaves its tree at once instead of waiting for the next heartbeat to say so.

TLS (``tls``): the relay server requires STARTTLS and a client certificate signed by the
cluster CA, its URI is ``nbds://``, and every relay reads from its parents and the
origin over TLS with this host's certificate: the whole tree is mutually checked TLS.

Lifecycle: ``start()`` listens and reopens every image found in the cache directory;
``stop()`` stops the relay server (requests in flight finish), then closes the relays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from virtman.agent.images import CacheGroup, DeliveryMode, ImageRelay, ImageSpec
from virtman.blockdev.prefetch import BootRecorder, Prefetcher, PrefetchLimits
from virtman.coordinator.models import Paths
from virtman.errors import ApiError, NetworkError, PeerProtocolError, VirtmanError
from virtman.limits import (
    DEFAULT_CACHE_CAPACITY,
    PARENT_CONNECT_WAIT_SECONDS,
    PROFILE_RECORD_SECONDS,
    PROFILE_WANTED_RUNS,
)
from virtman.nbd.server import NbdServer
from virtman.planner.profile import BootProfile
from virtman.protocol.uri import NbdAddress
from virtman.tlsconfig import TlsFiles

log = logging.getLogger(__name__)


class ImageDirectory(Protocol):
    """Where image records come from, trees are joined and boot profiles are kept
    (Volt: ``VoltLink``)."""

    async def image_spec(self, name: str) -> ImageSpec: ...

    async def profile(self, image: str) -> BootProfile | None: ...

    async def send_profile_run(self, image: str, run: BootProfile) -> int: ...

    async def join(self, image: str, relay_uri: str) -> Paths: ...

    async def leave(self, image: str) -> None: ...


@dataclass(frozen=True)
class ProfileSettings:
    """What an agent does with boot profiles: prefetch them (``prefetch``; None: never),
    and record boots (``record``) until Volt's profile of an image has ``wanted_runs``
    runs, each run being a VM's first reads during ``record_seconds``."""

    prefetch: PrefetchLimits | None = field(default_factory=PrefetchLimits)
    record: bool = True
    wanted_runs: int = PROFILE_WANTED_RUNS
    record_seconds: float = PROFILE_RECORD_SECONDS


class RelayManager:
    def __init__(
        self,
        cache_dir: str,
        directory: ImageDirectory,
        *,
        capacity: int = DEFAULT_CACHE_CAPACITY,
        nbd_host: str = "127.0.0.1",
        nbd_port: int = 0,
        mode: DeliveryMode = DeliveryMode.VIRTMAN,
        attach_delay: float = 0.0,
        parent_wait: float = PARENT_CONNECT_WAIT_SECONDS,
        tls: TlsFiles | None = None,
        on_fetch: Callable[[float], None] | None = None,
        profiles: ProfileSettings | None = None,
    ) -> None:
        self.directory = directory
        self.profiles = profiles or ProfileSettings()
        self._recordings: set[asyncio.Task[None]] = set()
        #: Called with each chunk fetch's seconds (the agent's fetch-latency histogram).
        self.on_fetch = on_fetch
        self.cache = CacheGroup(cache_dir, capacity, on_evicted=self._leave_evicted)
        self.tls = tls
        self.server = NbdServer([], tls=tls)
        self.nbd_host = nbd_host
        self.nbd_port = nbd_port
        #: How images reach this host (benchmarks compare the alternatives).
        self.mode = mode
        #: PAPER mode: seconds one tree level takes to attach (the paper: 10 s of iSCSI).
        self.attach_delay = attach_delay
        self.parent_wait = parent_wait
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def relays(self) -> dict[str, ImageRelay]:
        return self.cache.relays

    def get(self, name: str) -> ImageRelay | None:
        return self.cache.relays.get(name)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.nbd_port = await self.server.listen_tcp(self.nbd_host, self.nbd_port)
        for spec in self.cache.known_specs():
            try:
                await self._open(spec)
            except (VirtmanError, OSError) as err:  # one bad image must not keep the others down
                log.error("image %r could not be reopened: %s", spec.name, err)

    async def stop(self) -> None:
        for task in list(self._recordings):
            task.cancel()
        await asyncio.gather(*self._recordings, return_exceptions=True)
        await self.cache.close()
        await self.server.stop()
        for relay in list(self.cache.relays.values()):
            await relay.close()

    # --- images -------------------------------------------------------------------------

    def relay_uri(self, image: str) -> str:
        address = NbdAddress(
            export=image, host=self.nbd_host, port=self.nbd_port, tls=self.tls is not None
        )
        return address.uri()

    async def _open(self, spec: ImageSpec) -> ImageRelay:
        relay = ImageRelay(
            spec,
            self.cache.image_dir(spec.name),
            self.server,
            self.relay_uri(spec.name),
            self.mode,
            self.on_fetch,
            tls=self.tls,
        )
        await relay.open()
        self.cache.add(relay)
        return relay

    async def image(self, name: str) -> ImageRelay:
        """The relay of an image, set up (and joined to its tree) on first use.

        Raises ``NotFound`` for an image the directory does not know."""
        relay = self.cache.relays.get(name)
        if relay is not None:
            return relay
        async with self._locks.setdefault(name, asyncio.Lock()):
            relay = self.cache.relays.get(name)
            if relay is not None:
                return relay
            spec = await self.directory.image_spec(name)
            os.makedirs(self.cache.image_dir(name), exist_ok=True)
            spec.save(self.cache.spec_path(name))
            relay = await self._open(spec)
            if relay.mode.in_tree:
                await self._join(relay)
            await self.refresh_profile(relay)
            return relay

    # --- boot profiles ------------------------------------------------------------------

    def _profiles_apply(self, relay: ImageRelay) -> bool:
        # Profiles are the cache's: the paper's system and the baselines do without.
        return relay.mode is DeliveryMode.VIRTMAN

    async def refresh_profile(self, relay: ImageRelay, *, min_age: float = 0.0) -> None:
        """Ask Volt for the image's boot profile (not again within ``min_age`` seconds)
        and, once there is one, prefetch it. Volt away or answering badly only means no
        prefetch for now: VMs read on demand as always."""
        if not self._profiles_apply(relay) or relay.prefetcher is not None:
            return
        now = time.monotonic()
        if now - relay.profile_asked_at < min_age:
            return
        relay.profile_asked_at = now
        try:
            profile = await self.directory.profile(relay.name)
        except (NetworkError, ApiError, PeerProtocolError) as err:
            log.info("image %r: boot profile not read (%s); reading on demand", relay.name, err)
            return
        relay.profile_runs = profile.runs if profile is not None else 0
        limits = self.profiles.prefetch
        if profile is None or limits is None or relay.prefetcher is not None:
            return
        if profile.chunk_size != relay.cache.chunk_size:
            log.warning("image %r: boot profile in %d-byte chunks, cache in %d; not used",
                        relay.name, profile.chunk_size, relay.cache.chunk_size)
            return
        if not await relay.open_prefetch():
            return
        relay.prefetcher = Prefetcher(relay.cache, profile.chunks, limits)
        relay.prefetcher.start()
        log.info("image %r: prefetching its boot profile (%d chunks, %d runs)", relay.name,
                 len(profile.entries), profile.runs)

    def boot_recorder(self, relay: ImageRelay) -> BootRecorder | None:
        """A recorder for a VM about to boot on ``relay``'s image, while Volt's profile
        wants more runs (None: no recording); its run goes to Volt after the window."""
        if not (self.profiles.record and self._profiles_apply(relay)):
            return None
        known = relay.profile_runs or 0
        if known + relay.recording >= self.profiles.wanted_runs:
            return None
        recorder = BootRecorder(
            relay.cache.chunk_size, record_seconds=self.profiles.record_seconds
        )
        relay.recording += 1
        task = asyncio.get_running_loop().create_task(
            self._send_when_recorded(relay, recorder), name=f"boot run of {relay.name}"
        )
        self._recordings.add(task)
        task.add_done_callback(self._recordings.discard)
        return recorder

    async def _send_when_recorded(self, relay: ImageRelay, recorder: BootRecorder) -> None:
        try:
            await asyncio.sleep(recorder.record_seconds)
            run = recorder.run()
            if run is None:
                return
            try:
                relay.profile_runs = await self.directory.send_profile_run(relay.name, run)
            except (NetworkError, ApiError, PeerProtocolError) as err:
                log.warning("image %r: a recorded boot run was not taken by volt: %s",
                            relay.name, err)
                return
            log.info("image %r: boot run of %d chunks sent; the profile has %d runs",
                     relay.name, len(run.entries), relay.profile_runs)
        finally:
            relay.recording -= 1

    async def _join(self, relay: ImageRelay) -> None:
        # The relay export is up: join now, so parents come before any data.
        try:
            paths = await self.directory.join(relay.name, relay.relay_uri)
        except (NetworkError, ApiError, PeerProtocolError) as err:
            log.warning(
                "image %r: could not join its tree yet (%s); reading from the "
                "origin until the next heartbeat",
                relay.name,
                err,
            )
            return
        relay.apply(paths)
        if self.mode is DeliveryMode.PAPER and self.attach_delay:
            # A host attaches only after its parent finished attaching.
            await asyncio.sleep(paths.level * self.attach_delay)
        await self._wait_parents(relay)

    async def _wait_parents(self, relay: ImageRelay) -> None:
        deadline = time.monotonic() + self.parent_wait
        while time.monotonic() < deadline:
            states = [p["state"] for p in relay.remote.path_status() if not p["fallback"]]
            if all(s in ("up", "retired") for s in states):
                return
            await asyncio.sleep(0.01)

    def apply(self, paths: dict[str, Paths]) -> None:
        """Volt's paths per image; one relay refusing its paths does not stop the others."""
        for image, p in paths.items():
            relay = self.cache.relays.get(image)
            if relay is None:
                continue
            try:
                relay.apply(p)
            except VirtmanError as err:
                log.error("image %r: volt's paths %s refused: %s", image, p.parents, err)

    def in_tree(self) -> dict[str, str]:
        """Image name -> relay URI of every relay children may attach to."""
        return {n: r.relay_uri for n, r in self.cache.relays.items() if r.mode.in_tree}

    async def evict(self) -> list[str]:
        """Evict unused images while over capacity; each one leaves its tree."""
        evicted = await self.cache.evict()
        for name in evicted:
            await self._leave_evicted(name)
        return evicted

    async def _leave_evicted(self, name: str) -> None:
        if not self.mode.in_tree:
            return
        try:
            await self.directory.leave(name)
        except (NetworkError, ApiError) as err:
            # The next heartbeat no longer lists it: Volt drops it then.
            log.warning("image %r evicted; leaving its tree failed: %s", name, err)

    def status(self) -> dict[str, object]:
        return {
            "relay_nbd": f"{self.nbd_host}:{self.nbd_port}",
            "mode": self.mode.value,
            "relay_bytes_sent": self.server.stats.bytes_read,
            "cache": self.cache.status(),
            "images": {n: r.status() for n, r in self.cache.relays.items()},
        }
