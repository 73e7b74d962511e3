"""Working-set prefetch and boot recording over a ``CachedDevice``.

``Prefetcher`` brings an image's boot profile into the cache ahead of the VMs: the
profile's chunks in the order boots first read them, as runs of adjacent chunks of up
to ``batch_bytes`` per upstream request (``planner.profile.plan_runs``), with at most
``inflight_bytes`` requested at once and, if set, at most ``bytes_per_second``. Its
requests are background fetches (``FetchGate``): a VM's miss takes a slot before any of
them, and a chunk a VM wants while it is in a prefetch run is served from that run.
It reads nothing outside the profile, and nothing the cache already holds.

Down a tree every host runs its own prefetcher against its parents' prefetch exports
(``BackgroundReads``), on connections of its own. A child's request for a chunk its
parent does not hold yet makes the parent fetch it at once, as prefetch (background
priority, one request per run), so a child's prefetch follows its parent's chunk by
chunk instead of waiting for the parent to finish, never outranks a VM's miss at the
parent, and its replies never queue in a connection ahead of a VM's.

``BootRecorder`` notes the first read of each chunk by one VM, with the seconds since
the VM started, for ``record_seconds``; ``RecordingDevice`` is what the VM's overlay
reads its base through while it records (the overlay's own blocks never reach it, so
the profile holds only what the image must supply).

Lifecycle of a prefetcher: NEW -> RUNNING -> DONE (every run fetched), STOPPED
(``stop``), or FAILED (an error it could not pass: logged; the VMs still read on
demand). ``stop`` is safe in any state and more than once.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.cached import CachedDevice
from virtman.errors import ConfigError, VirtmanError
from virtman.limits import (
    PREFETCH_BATCH_BYTES,
    PREFETCH_INFLIGHT_BYTES,
    PREFETCH_MAX_BYTES_PER_SECOND,
    PREFETCH_MIN_INFLIGHT_CHUNKS,
    PREFETCH_QUEUE_SECONDS,
    PREFETCH_WINDOW_ENTRIES,
    PROFILE_RECORD_SECONDS,
)
from virtman.planner.profile import BootProfile, plan_runs, run_from_reads

log = logging.getLogger(__name__)

#: Chunks a prefetch may have requested before it has measured its upstream.
START_BUDGET_CHUNKS = 4
#: Seconds of completed prefetch requests the rate estimate looks back over.
RATE_WINDOW_SECONDS = 1.0
#: Shortest span a rate is taken over (the first completions come close together).
MIN_RATE_SPAN_SECONDS = 0.01


class _RecentRate:
    """Bytes per second over the last ``window`` seconds of completions."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._first: float | None = None

    def add(self, now: float, nbytes: int) -> None:
        if self._first is None:
            self._first = now
        self._done.append((now, nbytes))

    def rate(self, now: float) -> float | None:
        while self._done and now - self._done[0][0] > self.window:
            self._done.popleft()
        if not self._done or self._first is None:
            return None
        # Over the window, or since the first completion when that is more recent.
        span = max(now - max(self._first, now - self.window), MIN_RATE_SPAN_SECONDS)
        return sum(n for _, n in self._done) / span


@dataclass(frozen=True)
class PrefetchLimits:
    batch_bytes: int = PREFETCH_BATCH_BYTES
    inflight_bytes: int = PREFETCH_INFLIGHT_BYTES
    queue_seconds: float = PREFETCH_QUEUE_SECONDS
    min_inflight_chunks: int = PREFETCH_MIN_INFLIGHT_CHUNKS
    bytes_per_second: float | None = PREFETCH_MAX_BYTES_PER_SECOND
    window_entries: int = PREFETCH_WINDOW_ENTRIES

    def __post_init__(self) -> None:
        if self.batch_bytes < 1 or self.inflight_bytes < self.batch_bytes:
            raise ConfigError(
                f"prefetch batch {self.batch_bytes} bytes must be >= 1 and at most the "
                f"{self.inflight_bytes} bytes in flight"
            )
        if self.min_inflight_chunks < 1:
            raise ConfigError(
                f"prefetch needs at least one chunk in flight, not {self.min_inflight_chunks}"
            )
        if not self.queue_seconds > 0:
            raise ConfigError(f"prefetch queue {self.queue_seconds} s must be > 0")
        if self.bytes_per_second is not None and not self.bytes_per_second > 0:
            raise ConfigError(f"prefetch rate {self.bytes_per_second} bytes/s must be > 0")


class PrefetchState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"


class Prefetcher:
    """Fetches one image's profile into its cache (see the module docstring)."""

    def __init__(
        self,
        cache: CachedDevice,
        chunks: Sequence[int],
        limits: PrefetchLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cache = cache
        self.limits = limits or PrefetchLimits()
        batch_chunks = max(1, self.limits.batch_bytes // cache.chunk_size)
        count = cache.chunks
        #: (first chunk, count) runs, in the order they go out; chunks past the image
        #: (a profile for another size) are dropped here, never requested.
        self.runs = plan_runs(
            (c for c in chunks if 0 <= c < count), batch_chunks, self.limits.window_entries
        )
        self.state = PrefetchState.NEW
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._rate = _RecentRate(RATE_WINDOW_SECONDS)
        self.bytes_fetched = 0
        self.chunks_planned = sum(n for _, n in self.runs)
        self.seconds: float | None = None

    def start(self) -> None:
        if self.state is not PrefetchState.NEW:
            raise VirtmanError(f"prefetch of {self.cache.describe()} already {self.state.value}")
        self.state = PrefetchState.RUNNING
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"prefetch {self.cache.path}"
        )

    async def wait(self) -> None:
        """Until the prefetch ends (done, failed or stopped)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self.state is PrefetchState.NEW:
            self.state = PrefetchState.STOPPED
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.state is PrefetchState.RUNNING:
            self.state = PrefetchState.STOPPED

    def status(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "chunks_planned": self.chunks_planned,
            "bytes_fetched": self.bytes_fetched,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
        }

    async def _run(self) -> None:
        began = self._clock()
        cs = self.cache.chunk_size
        queue = collections.deque(self.runs)
        pending: set[asyncio.Task[int]] = set()
        progress = asyncio.Event()  # set whenever a request completes
        failure: BaseException | None = None
        requested = 0
        in_flight = 0

        def done(t: asyncio.Task[int], nbytes: int) -> None:
            nonlocal failure, in_flight
            pending.discard(t)
            in_flight -= nbytes
            progress.set()
            if t.cancelled():
                return
            if t.exception() is not None:
                failure = failure or t.exception()
            else:
                self.bytes_fetched += t.result()
                self._rate.add(self._clock(), nbytes)

        try:
            while queue and failure is None:
                first, count = queue.popleft()
                if not any(self.cache.needs_fetch(i) for i in range(first, first + count)):
                    continue
                budget = self._budget()
                # A run larger than the budget goes out in pieces: the rest waits its turn.
                take = max(1, min(count, budget // cs))
                if take < count:
                    queue.appendleft((first + take, count - take))
                while in_flight and in_flight + take * cs > budget:
                    progress.clear()
                    await progress.wait()
                    budget = self._budget()
                if failure is not None:
                    break
                await self._pace(began, requested)
                task = asyncio.get_running_loop().create_task(self.cache.prefetch_run(first, take))
                requested += take * cs
                in_flight += take * cs
                pending.add(task)
                task.add_done_callback(functools.partial(done, nbytes=take * cs))
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        finally:
            self.seconds = self._clock() - began
        if failure is not None:
            self.state = PrefetchState.FAILED
            log.warning("prefetch of %s stopped after %d bytes: %s (VMs read on demand)",
                        self.cache.path, self.bytes_fetched, failure)
            return
        self.state = PrefetchState.DONE
        log.info("prefetch of %s done: %d chunks planned, %d bytes fetched in %.2f s",
                 self.cache.path, self.chunks_planned, self.bytes_fetched, self.seconds)

    def _budget(self) -> int:
        """Bytes prefetch may have requested and not received: what the upstream
        delivers in ``queue_seconds`` at the rate measured lately, between one chunk
        and ``inflight_bytes``. Replies leave a parent in order on one connection, so
        every byte of prefetch queued ahead of a VM's miss delays it: on a slow link
        the budget shrinks to a chunk or two, on a fast one it grows to the cap."""
        limits, cs = self.limits, self.cache.chunk_size
        # At least a request per parent (``min_inflight_chunks``), within the cap.
        floor = max(cs, min(limits.inflight_bytes, limits.min_inflight_chunks * cs))
        rate = self._rate.rate(self._clock())
        if rate is None:
            return max(floor, min(limits.batch_bytes, limits.inflight_bytes,
                                  START_BUDGET_CHUNKS * cs))
        return max(floor, min(limits.inflight_bytes, int(rate * limits.queue_seconds)))

    async def _pace(self, began: float, requested: int) -> None:
        rate = self.limits.bytes_per_second
        if rate is None:
            return
        ahead = requested / rate - (self._clock() - began)
        if ahead > 0:
            await self._sleep(ahead)


class BootRecorder:
    """The first read of each chunk by one VM, timed from the VM's start, for
    ``record_seconds`` (a boot's reads, not the life of the VM)."""

    def __init__(
        self,
        chunk_size: int,
        *,
        record_seconds: float = PROFILE_RECORD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chunk_size = chunk_size
        self.record_seconds = record_seconds
        self._clock = clock
        self.started = clock()
        self._seen: set[int] = set()
        self._reads: list[tuple[float, int]] = []

    def note(self, offset: int, length: int) -> None:
        if not length:
            return
        seconds = self._clock() - self.started
        if seconds >= self.record_seconds:
            return
        cs = self.chunk_size
        for chunk in range(offset // cs, (offset + length - 1) // cs + 1):
            if chunk not in self._seen:
                self._seen.add(chunk)
                self._reads.append((seconds, chunk))

    def run(self) -> BootProfile | None:
        """What was recorded, as one boot's profile; None if the VM read nothing."""
        return run_from_reads(self._reads, self.chunk_size) if self._reads else None


class _View(BlockDevice):
    """A read-only view of ``base`` that owns nothing: opening and closing it leave
    ``base`` as it was (the cache is the relay's, shared by every view)."""

    def __init__(self, base: BlockDevice, what: str) -> None:
        super().__init__()
        self.base = base
        self.what = what
        self.read_only = True
        self.size = base.size

    def describe(self) -> str:
        return f"{self.what} of {self.base.describe()}"

    async def open(self) -> None:
        self.size = self.base.size

    async def close(self) -> None:
        return None

    async def read(self, offset: int, length: int) -> bytes:
        return await self.base.read(offset, length)


class RecordingDevice(_View):
    """What a recording VM's overlay reads its base through: tells ``recorder``."""

    def __init__(self, base: BlockDevice, recorder: BootRecorder) -> None:
        super().__init__(base, "recording view")
        self.recorder = recorder

    async def read(self, offset: int, length: int) -> bytes:
        self.recorder.note(offset, length)
        return await self.base.read(offset, length)

    async def flush(self) -> None:
        await self.base.flush()

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.base.block_status(offset, length)


class BackgroundReads(_View):
    """A cache whose misses are fetched as prefetch (``CachedDevice.read_background``):
    a relay's prefetch export, which its children's prefetchers read, so their prefetch
    stays background work all the way up the tree."""

    def __init__(self, cache: CachedDevice) -> None:
        super().__init__(cache, "prefetch view")
        self.cache = cache

    async def read(self, offset: int, length: int) -> bytes:
        return await self.cache.read_background(offset, length)
