"""Replay a boot trace through an NBD URI: a stand-in VM that reports its boot time.

The replayer issues each batch of the trace (see ``trace.Trace.batches``), waits for
it, sleeps the recorded think time divided by ``speed``, and goes on. The boot time is
the wall time from the first request to the last reply. An NBD error on a request is
counted and the replay goes on (a guest would see an I/O error there); a broken
connection ends the replay with every remaining request counted as an error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from virtman.errors import NbdRequestError, NetworkError, VirtmanError
from virtman.nbd.client import NbdClient
from virtman.replay.trace import Trace, TraceRequest


@dataclass
class ReplayResult:
    uri: str
    boot_seconds: float = 0.0
    errors: int = 0
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < 5:
            self.messages.append(message)


async def replay(
    uri: str, trace: Trace, *, speed: float = 1.0, connect_timeout: float = 30.0
) -> ReplayResult:
    result = ReplayResult(uri)
    try:
        client = await NbdClient.connect(uri, timeout=connect_timeout)
    except VirtmanError as err:
        result.error(f"connect: {err}")
        result.errors += len(trace.requests) - 1
        return result
    size = client.size
    payload = bytes(range(256)) * 4096  # 1 MiB pattern for writes
    started = time.monotonic()
    try:
        for gap, batch in trace.batches():
            if gap and speed > 0:
                await asyncio.sleep(gap / speed)
            outcomes = await asyncio.gather(
                *(_one(client, r, size, payload, result) for r in batch), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, NetworkError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    raise outcome
    except NetworkError as err:
        done = result.requests
        result.error(f"connection lost after {done} requests: {err}")
        result.errors += max(0, len(trace.requests) - done - 1)
    finally:
        result.boot_seconds = time.monotonic() - started
        await client.close()
    return result


async def _one(
    client: NbdClient, r: TraceRequest, size: int, payload: bytes, result: ReplayResult
) -> None:
    length = min(r.length, max(0, size - r.offset))
    try:
        if r.op == "read":
            if length:
                await client.read(r.offset, length)
            result.bytes_read += length
        elif r.op == "write":
            if length:
                data = (payload * (length // len(payload) + 1))[:length]
                await client.write(r.offset, data)
            result.bytes_written += length
        else:
            await client.flush()
    except NbdRequestError as err:
        result.error(f"{r.op} offset={r.offset} length={r.length}: {err}")
    result.requests += 1
