"""RemoteDevice: an NBD client over several upstream paths, with failover.

Theory of operation
-------------------
A RemoteDevice holds one NBD connection per path. *Primary* paths (in the relay tree:
the parents) share the load: each request goes to one of them, chosen round-robin or
by fewest requests outstanding. *Fallback* paths (the origin) are used, in order, only
while no primary is up.

A request that fails on a path is retried on the next one, so the caller sees an error
only when every path has failed it (``max_rounds`` passes over all paths). What counts
as a path failure:

- the connection broke, or the request timed out: the path goes *down*; its other
  requests fail over too, and a background task reconnects it with exponential backoff;
- the upstream answered EIO or ESHUTDOWN (a relay whose own upstream failed): the
  request moves on, the path stays up;
- EINVAL, EPERM, ENOSPC, EOVERFLOW, ENOTSUP: our request itself is wrong, every path
  would say the same, so it is raised at once as ``InvalidRequest``.

``set_paths`` replaces the path lists (Volt hands out new parents) without disturbing
requests in flight: kept paths keep their connections, removed ones finish what they
carry and then close, new ones connect in the background.

TLS: with ``tls`` files every path (``nbd://`` or ``nbds://``) is reached over TLS with
this host's certificate as the client certificate, verified against the CA: relays
read from their parents and the origin only over mutually checked TLS. Without it an
``nbds://`` path uses its ``tls-certificates=DIR``.

Background work (reconnects, connects of new paths, draining retired ones) runs in tasks
the device holds until they end; one that fails other than by the network is logged with
its traceback, and ``close()`` cancels whatever is still running.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from virtman.blockdev.base import BlockDevice, DeviceState
from virtman.errors import (
    ConfigError,
    DeviceError,
    InvalidRequest,
    NbdRequestError,
    NetworkError,
    NetworkTimeout,
    excerpt,
)
from virtman.limits import (
    CONNECT_TIMEOUT_SECONDS,
    MAX_REQUEST_ROUNDS,
    RECONNECT_DELAY_MAX_SECONDS,
    RECONNECT_DELAY_SECONDS,
    REQUEST_TIMEOUT_SECONDS,
    RETIRE_GRACE_SECONDS,
)
from virtman.nbd.client import NbdClient
from virtman.protocol.nbd.constants import Errno
from virtman.protocol.uri import NbdAddress, parse_nbd_uri
from virtman.tlsconfig import TlsFiles, client_context

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Upstream errors that say our request is wrong rather than the path.
_CALLER_ERRORS = frozenset(
    {Errno.EINVAL, Errno.EPERM, Errno.ENOSPC, Errno.EOVERFLOW, Errno.ENOTSUP}
)


#: For reads only these say the request is wrong; anything else is the path's fault.
_READ_CALLER_ERRORS = frozenset({Errno.EINVAL, Errno.EOVERFLOW})
_WRITES = frozenset({"WRITE", "WRITE_ZEROES", "TRIM", "FLUSH"})


class PathPolicy(enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_OUTSTANDING = "least-outstanding"


class PathState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    RETIRED = "retired"


@dataclass
class PathStats:
    requests: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    errors: int = 0
    connects: int = 0


class _Path:
    def __init__(self, address: NbdAddress, fallback: bool) -> None:
        self.address = address
        #: The path's URI, built once: requests look paths up by it.
        self.key = address.uri()
        self.fallback = fallback
        self.state = PathState.CONNECTING
        self.client: NbdClient | None = None
        self.stats = PathStats()
        self.last_error = ""
        self.reconnect_task: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        return self.client.in_flight if self.client is not None else 0


def _addresses(items: Sequence[str | NbdAddress]) -> list[NbdAddress]:
    return [parse_nbd_uri(a) if isinstance(a, str) else a for a in items]


class RemoteDevice(BlockDevice):
    supports_trim = True

    def __init__(
        self,
        paths: Sequence[str | NbdAddress],
        *,
        fallbacks: Sequence[str | NbdAddress] = (),
        policy: PathPolicy = PathPolicy.ROUND_ROBIN,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_rounds: int = MAX_REQUEST_ROUNDS,
        reconnect_delay: float = RECONNECT_DELAY_SECONDS,
        reconnect_delay_max: float = RECONNECT_DELAY_MAX_SECONDS,
        retire_grace: float = RETIRE_GRACE_SECONDS,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__()
        if not paths and not fallbacks:
            raise ConfigError("RemoteDevice needs at least one upstream path")
        self.tls = tls
        # Built once: every connect and reconnect of every path shares it.
        self._tls_context = client_context(tls) if tls else None
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_rounds = max_rounds
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = reconnect_delay_max
        self.retire_grace = retire_grace
        self._tasks: set[asyncio.Task[None]] = set()
        self._paths: list[_Path] = [_Path(a, False) for a in _addresses(paths)]
        self._paths += [_Path(a, True) for a in _addresses(fallbacks)]
        self._retired: list[_Path] = []
        self._rr = itertools.count()
        self._changed = asyncio.Event()  # set whenever a path comes up
        self.size = -1

    def describe(self) -> str:
        return "remote " + ", ".join(p.key for p in self._paths)

    # --- lifecycle ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        """Run background work in a task this device holds until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, what))
        return task

    def _task_done(self, task: asyncio.Task[None], what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self.describe(), what, exc_info=task.exception())

    async def open(self) -> None:
        if self.state is DeviceState.OPEN:
            return
        results = await asyncio.gather(
            *(self._connect(p) for p in self._paths), return_exceptions=True
        )
        for result in results:
            # A path that cannot be reached is expected; anything else is a bug to raise.
            if isinstance(result, BaseException) and not isinstance(result, NetworkError):
                raise result
        if not any(p.state is PathState.UP for p in self._paths):
            reasons = "; ".join(
                f"{excerpt(p.key)}: {excerpt(str(r))}"
                for p, r in zip(self._paths, results, strict=True)
            )
            for p in self._paths:
                if p.reconnect_task is not None:
                    p.reconnect_task.cancel()
            raise NetworkError(f"no upstream path could be opened: {reasons}")
        self.state = DeviceState.OPEN

    async def close(self) -> None:
        for path in self._paths + self._retired:
            path.state = PathState.RETIRED
            if path.reconnect_task is not None:
                path.reconnect_task.cancel()
            client, path.client = path.client, None
            if client is not None:
                await client.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.state = DeviceState.CLOSED

    async def open_offline(self, size: int) -> bool:
        """Open with no path up: requests wait for a path while they reconnect."""
        self.size = size
        for path in self._paths:
            if path.state is not PathState.UP:
                self._mark_down(path, path.last_error or "not connected yet")
        self.state = DeviceState.OPEN
        log.warning("%s opened with no upstream path up; reconnecting in the background",
                    self.describe())
        return True

    def abort(self) -> None:
        """Drop every connection now, waiting for nothing (the process is going away)."""
        for path in self._paths + self._retired:
            path.state = PathState.RETIRED
            if path.reconnect_task is not None:
                path.reconnect_task.cancel()
            client, path.client = path.client, None
            if client is not None:
                client.abort()
        for task in list(self._tasks):
            task.cancel()
        self.state = DeviceState.CLOSED

    async def _connect(self, path: _Path) -> None:
        try:
            client = await NbdClient.connect(
                path.address, timeout=self.connect_timeout, tls=self._tls_context
            )
        except NetworkError as err:
            self._mark_down(path, str(err))
            raise
        if self.size < 0:
            self.size = client.size
            self.read_only = client.read_only
        elif client.size != self.size:
            await client.close()
            reason = f"size {client.size} differs from the device's {self.size}"
            log.error("upstream %s refused: %s", path.key, reason)
            path.state = PathState.RETIRED
            path.last_error = reason
            raise NetworkError(reason, address=path.key)
        if path.state is PathState.RETIRED:
            await client.close()
            return
        path.client = client
        client.on_close(lambda c: self._lost(path, c))
        path.state = PathState.UP
        path.stats.connects += 1
        if path.stats.connects > 1:
            log.info("upstream %s is back up", path.key)
        self._changed.set()
        self._changed = asyncio.Event()

    def _lost(self, path: _Path, client: NbdClient) -> None:
        # The connection went away by itself: do not wait for a request to notice.
        if path.client is client:
            self._mark_down(path, "connection closed")

    def _mark_down(self, path: _Path, reason: str) -> None:
        if path.state is PathState.RETIRED:
            return
        was_up = path.state is PathState.UP
        path.state = PathState.DOWN
        path.last_error = reason
        if path.client is not None:
            path.client.abort()
            path.client = None
        if was_up:
            log.warning("upstream %s is down: %s", path.key, reason)
        if path.reconnect_task is None or path.reconnect_task.done():
            path.reconnect_task = self._spawn(self._reconnect(path), f"reconnect of {path.key}")

    async def _reconnect(self, path: _Path) -> None:
        delay = self.reconnect_delay
        while path.state is PathState.DOWN:
            await asyncio.sleep(delay)
            if path.state is not PathState.DOWN:
                return
            path.state = PathState.CONNECTING
            try:
                await self._connect(path)
                return
            except NetworkError:
                if path.state is PathState.RETIRED:
                    return
                path.state = PathState.DOWN
                delay = min(delay * 2, self.reconnect_delay_max)

    def set_paths(
        self, paths: Sequence[str | NbdAddress], fallbacks: Sequence[str | NbdAddress] = ()
    ) -> None:
        """Replace the upstream paths without disturbing requests in flight."""
        wanted = [(a, False) for a in _addresses(paths)] + [
            (a, True) for a in _addresses(fallbacks)
        ]
        if not wanted:
            raise ConfigError("set_paths needs at least one path")
        current = {p.key: p for p in self._paths}
        new: list[_Path] = []
        for address, fallback in wanted:
            path = current.pop(address.uri(), None)
            if path is None:
                path = _Path(address, fallback)
                path.state = PathState.DOWN
                path.reconnect_task = self._spawn(
                    self._connect_new(path), f"connect of new path {path.key}"
                )
            path.fallback = fallback
            new.append(path)
        for old in current.values():
            self._retire(old)
        self._paths = new

    async def _connect_new(self, path: _Path) -> None:
        path.state = PathState.CONNECTING
        try:
            await self._connect(path)
        except NetworkError:
            if path.state is not PathState.RETIRED:
                path.state = PathState.DOWN
                path.reconnect_task = self._spawn(
                    self._reconnect(path), f"reconnect of {path.key}"
                )

    def _retire(self, path: _Path) -> None:
        path.state = PathState.RETIRED
        if path.reconnect_task is not None:
            path.reconnect_task.cancel()
        if path.client is not None:
            client = path.client
            path.client = None
            self._spawn(self._drain_retired(client), f"drain of retired path {path.key}")
        self._retired.append(path)

    async def _drain_retired(self, client: NbdClient) -> None:
        """Close a retired path once the requests it carries are answered. A parent that
        died without closing its connection would hold them until their timeout (30 s);
        after ``retire_grace`` seconds the connection is dropped instead, and the requests
        still on it fail over to the current paths (``_call_path`` goes on with them)."""
        closing = asyncio.ensure_future(client.close())
        try:
            done, _ = await asyncio.wait({closing}, timeout=self.retire_grace)
            if not done:
                log.info("retired path %s: requests unanswered after %.0f s; moving them",
                         client.address, self.retire_grace)
                client.abort()
            await closing
        except asyncio.CancelledError:
            client.abort()  # the device is closing: drop the connection, wait for nothing
            closing.cancel()
            raise

    # --- status ---------------------------------------------------------------------------

    def path_status(self) -> list[dict[str, object]]:
        return [
            {
                "uri": p.key,
                "fallback": p.fallback,
                "state": p.state.value,
                "requests": p.stats.requests,
                "bytes_received": p.stats.bytes_received,
                "errors": p.stats.errors,
                "last_error": p.last_error,
            }
            for p in self._paths + self._retired
        ]

    def bytes_received_by_path(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for p in self._paths + self._retired:
            totals[p.key] = totals.get(p.key, 0) + p.stats.bytes_received
        return totals

    # --- path choice ----------------------------------------------------------------------

    def _pick(self, tried: set[int]) -> _Path | None:
        up = [p for p in self._paths if p.state is PathState.UP and id(p) not in tried]
        primaries = [p for p in up if not p.fallback]
        if primaries:
            if self.policy is PathPolicy.LEAST_OUTSTANDING:
                return min(primaries, key=lambda p: p.outstanding)
            return primaries[next(self._rr) % len(primaries)]
        return up[0] if up else None

    async def _call(
        self,
        what: str,
        offset: int,
        length: int,
        op: Callable[[NbdClient], Awaitable[T]],
        *,
        received: int = 0,
        sent: int = 0,
    ) -> T:
        result, _ = await self._call_path(what, offset, length, op, received=received, sent=sent)
        return result

    async def _call_path(
        self,
        what: str,
        offset: int,
        length: int,
        op: Callable[[NbdClient], Awaitable[T]],
        *,
        received: int = 0,
        sent: int = 0,
        avoid: frozenset[str] = frozenset(),
    ) -> tuple[T, _Path]:
        """Run ``op`` on one path after another until one succeeds; return it and the path.

        Paths whose key is in ``avoid`` are not used at all.
        """
        failures: list[str] = []
        avoided = {id(p) for p in self._paths if p.key in avoid} if avoid else set()
        for _ in range(self.max_rounds):
            tried: set[int] = set(avoided)
            while True:
                path = self._pick(tried)
                if path is None:
                    break
                tried.add(id(path))
                client = path.client
                assert client is not None
                path.stats.requests += 1
                client.request_timeout = self.request_timeout
                try:
                    result = await op(client)
                except NbdRequestError as err:
                    if err.errno in _CALLER_ERRORS and (what in _WRITES or err.errno in
                                                        _READ_CALLER_ERRORS):
                        raise InvalidRequest(
                            f"upstream {path.key} refused {what}: {err}", errno=err.errno
                        ) from err
                    path.stats.errors += 1
                    failures.append(f"{path.key}: {err}")
                    continue
                except NetworkTimeout as err:
                    # Before NetworkError, its parent: a path that does not answer goes
                    # down even while its connection looks alive.
                    path.stats.errors += 1
                    failures.append(f"{path.key}: {err}")
                    self._mark_down(path, f"{what} timed out after {err.limit:g} s")
                    continue
                except NetworkError as err:
                    path.stats.errors += 1
                    failures.append(f"{path.key}: {err}")
                    if path.client is client:
                        self._mark_down(path, str(err))
                    continue
                path.stats.bytes_received += received
                path.stats.bytes_sent += sent
                if failures:
                    self.stats.bump("failovers")
                return result, path
            # Every path that is up has failed this request in this round; wait for a
            # path to (re)connect before the next round.
            if not await self._wait_for_path():
                break
        raise DeviceError(
            f"{what} offset={offset} length={length} failed on every upstream path: "
            + ("; ".join(failures[-6:]) or "no path is up"),
            errno=Errno.EIO,
        )

    async def _wait_for_path(self) -> bool:
        if any(p.state is PathState.UP for p in self._paths):
            return True
        if not any(p.state in (PathState.DOWN, PathState.CONNECTING) for p in self._paths):
            return False
        # asyncio.wait, not wait_for or timeout(): this may run outside a task.
        waiter = asyncio.ensure_future(self._changed.wait())
        await asyncio.wait({waiter}, timeout=self.connect_timeout)
        waiter.cancel()
        return any(p.state is PathState.UP for p in self._paths)

    # --- the block device interface -------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.read_buffer(offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        self.check_range(offset, length)
        data = await self._call(
            "READ", offset, length, lambda c: c.read_view(offset, length), received=length
        )
        self.stats.reads += 1
        self.stats.bytes_read += length
        return data

    async def read_verified(
        self, offset: int, length: int, check: Callable[[bytes], bool], attempts: int
    ) -> bytes:
        """Read, and on data failing ``check`` read again from another path each time.

        A path that sent bad data is not asked again for this range: the next attempt
        goes to another primary, then to the fallbacks.
        """
        self.check_range(offset, length)
        bad: set[str] = set()
        for attempt in range(1, attempts + 1):
            try:
                data, path = await self._call_path(
                    "READ", offset, length, lambda c: c.read(offset, length),
                    received=length, avoid=frozenset(bad))
            except DeviceError:
                if not bad:
                    raise
                bad.clear()  # every path has sent bad data once: try them all again
                continue
            if check(data):
                self.stats.reads += 1
                self.stats.bytes_read += length
                return data
            path.stats.errors += 1
            self.stats.bump("bad_data")
            log.warning("upstream %s sent data failing its check at offset %d (attempt %d of %d)",
                        path.key, offset, attempt, attempts)
            bad.add(path.key)
        raise DeviceError(f"READ offset={offset} length={length}: data failed its check "
                          f"{attempts} times, from {', '.join(sorted(bad)) or 'every path'}",
                          errno=Errno.EIO)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self.check_range(offset, length)
        return await self._call("BLOCK_STATUS", offset, length,
                                lambda c: c.block_status(offset, length))

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.check_write(offset, len(data))
        await self._call(
            "WRITE", offset, len(data), lambda c: c.write(offset, data, fua=fua), sent=len(data)
        )
        self.stats.writes += 1
        self.stats.bytes_written += len(data)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_write(offset, length)
        await self._call(
            "WRITE_ZEROES", offset, length, lambda c: c.write_zeroes(offset, length, fua=fua)
        )

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.check_write(offset, length)
        await self._call("TRIM", offset, length, lambda c: c.trim(offset, length, fua=fua))

    async def flush(self) -> None:
        if self.read_only:
            return
        # Exports we write to advertise multi-conn (ours do), so one path's flush covers
        # writes sent over every path; flush all live paths anyway, for servers that don't.
        up = [p for p in self._paths if p.state is PathState.UP and p.client is not None]
        if not up:
            await self._call("FLUSH", 0, 0, lambda c: c.flush())
        else:
            await asyncio.gather(*(self._call_one(p, "FLUSH") for p in up))
        self.stats.flushes += 1

    async def _call_one(self, path: _Path, what: str) -> None:
        client = path.client
        assert client is not None
        try:
            await client.flush()
        except (NetworkError, NbdRequestError) as err:
            raise DeviceError(f"{what} on {path.key} failed: {err}") from err
