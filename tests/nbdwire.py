"""Hand-built NBD wire bytes for the protocol tests (struct and literal numbers, not
the codec's own encoders, so a wrong encoder cannot agree with itself)."""

from __future__ import annotations

import struct
from typing import Any

from virtman.protocol.nbd import NEED_DATA

IHAVEOPT = 0x49484156454F5054

OPT_REPLY_MAGIC = 0x0003E889045565A9

REQUEST_MAGIC = 0x25609513

SIMPLE_MAGIC = 0x67446698

STRUCTURED_MAGIC = 0x668E33EF

DONE = 1


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def opt_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)) + data


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = u32(len(raw)) + raw + u32(len(queries))
    for q in queries:
        out += u32(len(q.encode())) + q.encode()
    return out


def chunk(flags: int, kind: int, cookie: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, cookie, len(payload)) + payload


def drain(conn: Any) -> list[object]:
    """Every event a Server- or ClientConnection has ready."""
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)


def feed(conn: Any, data: bytes) -> tuple[list[object], bytes]:
    """Feed bytes; return the events that came out and the bytes to send."""
    conn.receive_data(data)
    events = drain(conn)
    return events, conn.data_to_send()
