"""Clone and migrate: a VM's written data, sent to another agent while the VM serves on.

Theory of operation
-------------------
The source streams what the VM wrote (the union of its layers' blocks, read through the
top of its chain) to the destination's ``POST /vms/import`` in the record format of
``virtman.protocol.copystream``. The VM keeps serving reads and writes here meanwhile:
its export is switched (``NbdServer.replace_device``) to a ``WriteTracker`` around its
top layer that notes every range written. Each further pass sends the ranges written
during the one before, up to ``COPY_LIVE_PASSES``; the last pass holds writes (they wait,
they do not fail; reads go on) so that the copy is one point in time, then END is sent
and the source waits for the destination's answer, which comes only once the VM
exists there, flushed and exported.

- Acknowledged: a clone releases the held writes, which land here only; a migrate
  refuses them (they were never acknowledged, so nothing acknowledged is lost) and
  removes the VM here.
- Anything else (refused, cut, the connect, idle or total timeout): the export goes
  back to the VM's own top layer, held writes go on, one log line says why. The
  destination, whose stream stopped short of a whole END, removes its partial import.

The destination is an agent Volt knows (``Agent.copy_vm`` resolves its name through
Volt, never a caller's URL), and the source calls it with its own agent credential.
Over HTTPS the destination is verified against the cluster's CA and must present the
certificate of the agent it was asked for (its common name) before one byte of the VM
is sent: a ``GET /health`` on the same client checks it first.

The write hold lasts one pass over what changed during the previous pass plus the
destination's answer, so it is bounded by ``COPY_IDLE_TIMEOUT_SECONDS`` of silence
from the destination. One failure mode is left: the destination made the VM but its
answer was lost; then both sides have it, and the source says so in its log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from virtman.agent.vms import Vm, merge_runs
from virtman.blockdev.base import BlockDevice
from virtman.errors import ApiError, DeviceError, Forbidden, NetworkError
from virtman.httpapi import Credentials
from virtman.limits import (
    COPY_CONNECT_TIMEOUT_SECONDS,
    COPY_IDLE_TIMEOUT_SECONDS,
    COPY_LIVE_PASSES,
    COPY_RECORD_BYTES,
    COPY_TOTAL_TIMEOUT_SECONDS,
    MIGRATION_DOWNTIME_LIMIT_MS,
)
from virtman.protocol.copystream import (
    CopyStreamDecoder,
    DataRecord,
    encode_data,
    encode_end,
    encode_header,
)
from virtman.protocol.nbd import Errno
from virtman.tlsconfig import peer_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyLimits:
    """The named limits of one copy (``virtman.limits``), passed in so tests can shrink them."""

    connect_timeout: float = COPY_CONNECT_TIMEOUT_SECONDS
    idle_timeout: float = COPY_IDLE_TIMEOUT_SECONDS
    total_timeout: float = COPY_TOTAL_TIMEOUT_SECONDS
    live_passes: int = COPY_LIVE_PASSES
    record_bytes: int = COPY_RECORD_BYTES
    #: A live migration's target pause (QEMU's ``downtime-limit``).
    downtime_limit_ms: int = MIGRATION_DOWNTIME_LIMIT_MS


class WriteTracker(BlockDevice):
    """Serves a VM's top layer during a copy: notes the ranges written; can hold writes.

    Reads, flushes and block status pass straight through. It neither opens nor closes
    the layer it wraps (the VM owns it).
    """

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__()
        self.inner = inner
        self.size = inner.size
        self.read_only = inner.read_only
        self.supports_trim = inner.supports_trim
        self._dirty: list[tuple[int, int]] = []
        self._open = asyncio.Event()
        self._open.set()
        self._refusal: str | None = None
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def describe(self) -> str:
        return f"copy tracker of {self.inner.describe()}"

    def take_dirty(self) -> list[tuple[int, int]]:
        """The ranges written since the last call."""
        runs, self._dirty = merge_runs(self._dirty), []
        return runs

    async def hold(self) -> None:
        """Make new writes wait; return once the writes already running have finished."""
        self._open.clear()
        await self._drained.wait()

    def release(self, refusal: str | None = None) -> None:
        """Let held and future writes go on, or, with ``refusal``, fail them with it."""
        self._refusal = refusal
        self._open.set()

    async def _gate(self, offset: int, length: int) -> None:
        await self._open.wait()
        if self._refusal is not None:
            raise DeviceError(self._refusal, errno=Errno.EIO)
        self._in_flight += 1
        self._drained.clear()

    def _done(self, offset: int, length: int) -> None:
        # Noted once the write is over, not when it starts: a pass that took the dirty
        # ranges while the write still waited (a copy-on-write reading its base) read
        # the old bytes, and only this note makes a later pass send the new ones.
        self._dirty.append((offset, length))
        self._in_flight -= 1
        if self._in_flight == 0:
            self._drained.set()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._gate(offset, len(data))
        try:
            await self.inner.write(offset, data, fua=fua)
        finally:
            self._done(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._gate(offset, length)
        try:
            await self.inner.write_zeroes(offset, length, fua=fua)
        finally:
            self._done(offset, length)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._gate(offset, length)
        try:
            await self.inner.trim(offset, length, fua=fua)
        finally:
            self._done(offset, length)

    async def flush(self) -> None:
        await self.inner.flush()

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.block_status(offset, length)


@dataclass
class CopyProgress:
    records: int = 0
    bytes: int = 0
    passes: int = 0
    held_at: float | None = None


async def _records(
    device: BlockDevice, runs: list[tuple[int, int]], record_bytes: int, progress: CopyProgress
) -> AsyncIterator[bytes]:
    for offset, length in runs:
        pos = offset
        while pos < offset + length:
            n = min(record_bytes, offset + length - pos)
            data = await device.read(pos, n)
            progress.records += 1
            progress.bytes += n
            yield encode_data(pos, data, max_record=record_bytes)
            pos += n


async def copy_stream(
    vm: Vm, tracker: WriteTracker, limits: CopyLimits, progress: CopyProgress
) -> AsyncIterator[bytes]:
    """The whole record stream of ``vm``: live passes, then one with writes held."""
    yield encode_header(tracker.size)
    # A write that started on the layer before the tracker took over is seen neither
    # by the tracker nor, while it still waits (a copy-on-write reading its base), by
    # the layer's map: let it land before the map is read, or it is never sent.
    await vm.settle()
    runs = vm.written_runs()
    for _ in range(limits.live_passes):
        progress.passes += 1
        async for piece in _records(tracker, runs, limits.record_bytes, progress):
            yield piece
        runs = tracker.take_dirty()
        if not runs:
            break
    await tracker.hold()
    progress.held_at = time.monotonic()
    progress.passes += 1
    runs = merge_runs(runs + tracker.take_dirty())
    async for piece in _records(tracker, runs, limits.record_bytes, progress):
        yield piece
    yield encode_end(progress.records, progress.bytes)


async def send(
    url: str,
    params: dict[str, str],
    body: AsyncIterator[bytes],
    limits: CopyLimits,
    *,
    credentials: Credentials,
    peer: str | None = None,
) -> dict[str, Any]:
    """POST the stream to the destination agent and return its answer.

    ``peer``: the agent name the destination's TLS certificate must carry (checked
    before the stream starts; ``Forbidden`` when it carries another). The one boundary
    of this transport: every other failure comes out as ``NetworkError`` (naming the
    limit that expired, if one did) or ``ApiError`` (the destination's own answer)."""
    timeout = httpx.Timeout(
        connect=limits.connect_timeout,
        read=limits.idle_timeout,
        write=limits.idle_timeout,
        pool=limits.connect_timeout,
    )
    try:
        async with asyncio.timeout(limits.total_timeout):
            async with httpx.AsyncClient(
                base_url=url,
                timeout=timeout,
                headers=credentials.headers(),
                verify=credentials.verify(),
            ) as client:
                if peer is not None:
                    await _check_peer(client, url, peer)
                response = await client.post(
                    "/vms/import",
                    params=params,
                    content=body,
                    headers={"content-type": "application/octet-stream"},
                )
    except TimeoutError as err:
        raise NetworkError(
            f"copy not finished within COPY_TOTAL_TIMEOUT_SECONDS={limits.total_timeout:g}",
            address=url,
        ) from err
    except httpx.ConnectTimeout as err:
        raise NetworkError(
            f"no connection within COPY_CONNECT_TIMEOUT_SECONDS={limits.connect_timeout:g}",
            address=url,
        ) from err
    except (httpx.ReadTimeout, httpx.WriteTimeout) as err:
        what = "answer" if isinstance(err, httpx.ReadTimeout) else "byte taken"
        raise NetworkError(
            f"destination silent: no {what} for "
            f"COPY_IDLE_TIMEOUT_SECONDS={limits.idle_timeout:g}",
            address=url,
        ) from err
    except httpx.HTTPError as err:
        # Mostly a connection reset or closed midway: the destination went away.
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise NetworkError(f"connection to the destination failed ({why})", address=url) from err
    if response.status_code >= 400:
        raise ApiError(_detail(response), status=response.status_code, url=f"{url}/vms/import")
    try:
        doc: dict[str, Any] = response.json()
    except ValueError as err:
        raise NetworkError("destination's answer is not JSON", address=url) from err
    return doc


async def check_destination(
    url: str, credentials: Credentials, limits: CopyLimits, peer: str
) -> None:
    """``_check_peer`` on a client of its own: before a live migration tells the
    destination where its source's disk is. ``Forbidden``, ``NetworkError``."""
    try:
        async with httpx.AsyncClient(
            base_url=url,
            timeout=limits.connect_timeout,
            headers=credentials.headers(),
            verify=credentials.verify(),
        ) as client:
            await _check_peer(client, url, peer)
    except httpx.HTTPError as err:
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise NetworkError(f"destination not reached ({why})", address=url) from err


async def _check_peer(client: httpx.AsyncClient, url: str, peer: str) -> None:
    """Raise ``Forbidden`` unless the service at ``url`` proves, by a certificate the CA
    verified, that it is agent ``peer`` (a host name in a certificate only says where)."""
    response = await client.get("/health")
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    name = peer_name(ssl_object)
    if name != peer:
        raise Forbidden(
            f"destination {url} presented the certificate of {name!r}, not of agent {peer!r}"
        )
    if response.status_code >= 400:
        raise ApiError(_detail(response), status=response.status_code, url=f"{url}/health")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text


async def receive(
    chunks: AsyncIterator[bytes], image_size: int, limits: CopyLimits
) -> AsyncIterator[DataRecord]:
    """The records of one incoming stream, as they arrive; returns only after a whole
    END. Raises ``CopyStreamError`` for a bad or cut stream and ``NetworkError`` when
    the source is silent for the idle timeout or the copy exceeds the total one."""
    decoder = CopyStreamDecoder(image_size, max_record=limits.record_bytes)
    deadline = time.monotonic() + limits.total_timeout
    it = aiter(chunks)
    while True:
        wait = min(limits.idle_timeout, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await anext(it)
        except StopAsyncIteration:
            decoder.end_of_input()
            return
        except TimeoutError as err:
            limit = (
                f"COPY_IDLE_TIMEOUT_SECONDS={limits.idle_timeout:g}"
                if wait == limits.idle_timeout
                else f"COPY_TOTAL_TIMEOUT_SECONDS={limits.total_timeout:g}"
            )
            raise NetworkError(
                f"copy stream stalled after {decoder.records} records ({limit})"
            ) from err
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not None:
            if isinstance(event, DataRecord):
                yield event
