"""The clone/migrate record stream as a pure codec: no sockets, files or asyncio.

Theory of operation
-------------------
A VM travels between agents as a stream of what it wrote. All integers are big-endian::

    stream = HEADER record* END
    HEADER = b"VMCOPY1\\n" (8 bytes)  image size (u64)
    DATA   = 0x01  offset (u64)  length (u32)  `length` bytes     -- write these bytes there
    END    = 0xFF  records (u64)  bytes (u64)                      -- totals of the DATA above

The same range may come more than once (a range the VM wrote again while it was being
copied is sent again); later records win, so a receiver writes them in order. A copy
is complete only when END has arrived and its totals match what came before it: a
stream that stops anywhere else, even on a record boundary, is a cut copy. Nothing may
follow END.

``CopyStreamDecoder`` is fed bytes in any pieces with ``receive_data`` and hands out
``StreamStarted``, ``DataRecord`` and ``StreamEnded`` from ``next_event``, which returns
None until the next one is whole; ``end_of_input()`` tells it the peer stopped sending.
A DATA record's length is checked against ``max_record`` from its header, before its
payload is buffered, so the buffer never holds more than one record beyond what the
caller fed in one piece. The encoders return bytes and refuse what the decoder would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.limits import COPY_RECORD_BYTES

MAGIC = b"VMCOPY1\n"
HEADER = struct.Struct(">8sQ")  # magic, image size
KIND = struct.Struct(">B")
DATA_HEADER = struct.Struct(">BQI")  # kind, offset, length
END_RECORD = struct.Struct(">BQQ")  # kind, records, bytes
KIND_DATA = 0x01
KIND_END = 0xFF


class CopyStreamError(PeerProtocolError):
    """The peer's copy stream broke a rule; ``limit`` names the limit it exceeded, if any."""

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class StreamStarted:
    image_size: int


@dataclass(frozen=True, slots=True)
class DataRecord:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    records: int
    bytes: int


CopyEvent = StreamStarted | DataRecord | StreamEnded


def encode_header(image_size: int) -> bytes:
    return HEADER.pack(MAGIC, image_size)


def encode_data(offset: int, data: bytes, *, max_record: int = COPY_RECORD_BYTES) -> bytes:
    if len(data) > max_record:
        raise LocalProtocolError(
            f"copy record of {len(data)} bytes exceeds the limit COPY_RECORD_BYTES={max_record}"
        )
    return DATA_HEADER.pack(KIND_DATA, offset, len(data)) + data


def encode_end(records: int, nbytes: int) -> bytes:
    return END_RECORD.pack(KIND_END, records, nbytes)


class CopyStreamDecoder:
    """Parses one copy stream for an image of ``image_size`` bytes."""

    def __init__(self, image_size: int, *, max_record: int = COPY_RECORD_BYTES) -> None:
        self.image_size = image_size
        self.max_record = max_record
        self.records = 0
        self.bytes = 0
        self._buf = bytearray()
        self._started = False
        self._ended = False
        self._eof = False

    @property
    def complete(self) -> bool:
        """Whether the END record arrived (and matched)."""
        return self._ended

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("receive_data after end_of_input")
        if self._ended and data:
            raise CopyStreamError(f"{len(data)} bytes after the end record of the copy stream")
        self._buf += data

    def end_of_input(self) -> None:
        """The peer stopped sending: an error unless the stream is complete."""
        self._eof = True
        if self._ended:
            return
        if not self._started:
            raise CopyStreamError(
                f"copy stream ended inside its header ({len(self._buf)} of {HEADER.size} bytes)"
            )
        if self._buf:
            raise CopyStreamError(
                f"copy stream ended inside a record ({len(self._buf)} bytes left) "
                f"after {self.records} records"
            )
        raise CopyStreamError(
            f"copy stream ended without its end record after {self.records} records "
            f"({self.bytes} bytes)"
        )

    def next_event(self) -> CopyEvent | None:
        if self._ended:
            if self._buf:
                raise CopyStreamError(
                    f"{len(self._buf)} bytes after the end record of the copy stream"
                )
            return None
        if not self._started:
            return self._header()
        if not self._buf:
            return None
        kind = self._buf[0]
        if kind == KIND_DATA:
            return self._data()
        if kind == KIND_END:
            return self._end()
        raise CopyStreamError(
            f"copy record of unknown kind {kind:#04x} after {self.records} records"
        )

    def _header(self) -> StreamStarted | None:
        # A wrong magic is reported as soon as its first bytes disagree.
        if not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
            raise CopyStreamError(
                f"not a copy stream: starts with {bytes(self._buf[: len(MAGIC)])!r}, "
                f"expected {MAGIC!r}"
            )
        if len(self._buf) < HEADER.size:
            return None
        _, size = HEADER.unpack_from(self._buf)
        if size != self.image_size:
            raise CopyStreamError(
                f"copy stream is of a {size}-byte image; this image has {self.image_size} bytes"
            )
        del self._buf[: HEADER.size]
        self._started = True
        return StreamStarted(size)

    def _data(self) -> DataRecord | None:
        if len(self._buf) < DATA_HEADER.size:
            return None
        _, offset, length = DATA_HEADER.unpack_from(self._buf)
        if length > self.max_record:
            raise CopyStreamError(
                f"copy record offset={offset} length={length} exceeds the limit "
                f"COPY_RECORD_BYTES={self.max_record}",
                limit="COPY_RECORD_BYTES",
            )
        if offset + length > self.image_size:
            raise CopyStreamError(
                f"copy record offset={offset} length={length} is invalid "
                f"for a {self.image_size}-byte image"
            )
        end = DATA_HEADER.size + length
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[DATA_HEADER.size : end])
        del self._buf[:end]
        self.records += 1
        self.bytes += length
        return DataRecord(offset, data)

    def _end(self) -> StreamEnded | None:
        if len(self._buf) < END_RECORD.size:
            return None
        _, records, nbytes = END_RECORD.unpack_from(self._buf)
        if (records, nbytes) != (self.records, self.bytes):
            raise CopyStreamError(
                f"copy stream end record says {records} records of {nbytes} bytes; "
                f"{self.records} records of {self.bytes} bytes arrived"
            )
        del self._buf[: END_RECORD.size]
        self._ended = True
        if self._buf:
            raise CopyStreamError(
                f"{len(self._buf)} bytes after the end record of the copy stream"
            )
        return StreamEnded(records, nbytes)
