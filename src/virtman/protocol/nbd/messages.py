"""Shared pieces of both ends: the receive buffer, export descriptions, encoders."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.protocol.nbd.constants import (
    DEFAULT_MAX_PAYLOAD,
    IHAVEOPT,
    MAX_STRING,
    OPTION_REPLY_MAGIC,
    Info,
    TransmissionFlag,
)


class NeedData:
    """Returned by ``next_event`` until a whole message has arrived."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class BlockSizes:
    """Block size constraints (``NBD_INFO_BLOCK_SIZE``).

    Invalid constraints raise ``LocalProtocolError`` (we must not send them); a client
    that decodes them from a server turns that into ``PeerProtocolError``.
    """

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_PAYLOAD

    def __post_init__(self) -> None:
        for name, value in (("minimum", self.minimum), ("preferred", self.preferred)):
            if value < 1 or value & (value - 1):
                raise LocalProtocolError(f"block size {name}={value} is not a power of two")
        if self.minimum > 65536:
            raise LocalProtocolError(f"block size minimum={self.minimum} exceeds 64 KiB")
        if not (self.minimum <= self.preferred and self.maximum >= self.minimum):
            raise LocalProtocolError(f"block sizes out of order: {self}")

    def encode(self) -> bytes:
        return struct.pack(">HIII", Info.BLOCK_SIZE, self.minimum, self.preferred, self.maximum)


@dataclass(frozen=True)
class ExportInfo:
    """What a server tells a client about one export."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    block_sizes: BlockSizes = field(default_factory=BlockSizes)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)


#: Room a receive buffer offers for one read (``get_buffer``): a 256 KiB chunk and its
#: reply header arrive in one or two reads rather than four (the loop's default is 64 KiB).
RECEIVE_ROOM = 256 * 1024 + 64
#: What a buffer read into may grow to while replies stream in: several reads' room, so
#: that moving the unparsed tail of a message (up to a chunk) to the front happens once
#: per several chunks, not per read. A client with one request at a time never needs it
#: (its buffer empties after each reply), and an idle one gives it back (``release``).
RECEIVE_CAPACITY = 8 * RECEIVE_ROOM
#: An unparsed tail up to this size is moved to the front rather than the buffer grown.
_CHEAP_MOVE = 64 * 1024


class ReceiveBuffer:
    """Bytes received and not yet parsed.

    The bytes live in ``_buf[_pos:_end]``; the rest of ``_buf`` is room. A transport can
    read straight into that room (``get_buffer``/``buffer_updated``: asyncio's
    ``BufferedProtocol``), so a received payload is copied once, by ``take``, instead of
    into a ``bytes`` per read, then here, then out again. ``_buf`` is never resized in
    place, since a view ``get_buffer`` handed out may still be alive: consumed bytes are
    dropped by moving the unparsed tail to the front (cheap: once everything buffered is
    parsed, which is the common case, nothing moves), and growing makes a new array.
    """

    __slots__ = ("_buf", "_end", "_filled", "_pos", "_target")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        #: A large payload being received straight into its own array (``take_large``),
        #: and how much of it is in.
        self._target: bytearray | None = None
        self._filled = 0

    def __len__(self) -> int:
        return self._end - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        target = self._target
        if target is not None:
            k = min(len(data), len(target) - self._filled)
            target[self._filled : self._filled + k] = memoryview(data)[:k]
            self._filled += k
            data = memoryview(data)[k:]
        n = len(data)
        self._reserve(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable room after the buffered bytes (at least ``sizehint`` bytes and at
        least ``RECEIVE_ROOM``) to read into; then call ``buffer_updated``. While a
        large payload is received (``take_large``), the rest of that payload's own array:
        the bytes land where they are handed out from."""
        target = self._target
        if target is not None and self._filled < len(target):
            return memoryview(target)[self._filled :]
        self._reserve(max(sizehint, RECEIVE_ROOM), grow_to=RECEIVE_CAPACITY)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the view ``get_buffer`` returned."""
        target = self._target
        if target is not None and self._filled < len(target):
            if nbytes < 0 or self._filled + nbytes > len(target):
                raise LocalProtocolError(f"{nbytes} bytes read into a payload with "
                                         f"{len(target) - self._filled} bytes of room")
            self._filled += nbytes
            return
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError(f"{nbytes} bytes read into a receive buffer with "
                                     f"{len(self._buf) - self._end} bytes of room")
        self._end += nbytes

    def release(self) -> None:
        """Give back a buffer grown past one read's room, if nothing is buffered (an idle
        connection should not hold megabytes)."""
        if self._pos == self._end and self._target is None and \
                len(self._buf) > 2 * RECEIVE_ROOM:
            self._buf = bytearray()
            self._pos = self._end = 0

    def _reserve(self, n: int, grow_to: int = 0) -> None:
        """Make room for ``n`` more bytes. With ``grow_to``, a large unparsed tail makes
        the array grow (doubling, up to ``grow_to``) rather than move to the front."""
        cap = len(self._buf)
        if cap - self._end >= n:
            return
        live = self._end - self._pos
        if self._pos and cap - live >= n and (live <= _CHEAP_MOVE or cap >= grow_to):
            # Slice assignment of equal size: a memmove, never a resize.
            view = memoryview(self._buf)
            view[:live] = view[self._pos : self._end]
        else:
            grown = bytearray(max(live + n, min(2 * cap, grow_to) if grow_to else 2 * cap))
            grown[:live] = memoryview(self._buf)[self._pos : self._end]
            self._buf = grown
        self._pos, self._end = 0, live

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...] | None:
        """Parse one fixed header, or return None (consuming nothing) if incomplete."""
        if self._end - self._pos < fmt.size:
            return None
        values = fmt.unpack_from(self._buf, self._pos)
        self._advance(fmt.size)
        return values

    def take(self, n: int) -> bytes | None:
        """Remove and return exactly n bytes, or None if fewer are buffered."""
        if self._end - self._pos < n:
            return None
        data = bytes(memoryview(self._buf)[self._pos : self._pos + n])  # one copy
        self._advance(n)
        return data

    def take_large(self, n: int) -> bytes | memoryview | None:
        """Remove and return exactly n bytes of a large payload, or None until they are
        all in. What is buffered already is copied once; if that is not all of it, the
        payload gets an array of its own, the rest is read straight into it
        (``get_buffer``), and it is handed out as a read-only view of that array, which
        nothing else holds: no copy out of the receive buffer, and a partly received
        payload is never moved to the buffer's front."""
        target = self._target
        if target is not None:
            if self._filled < n:
                return None
            self._target = None
            self._filled = 0
            return memoryview(target).toreadonly()
        if self._end - self._pos >= n:
            return self.take(n)
        live = self._end - self._pos
        target = bytearray(n)
        target[:live] = memoryview(self._buf)[self._pos : self._end]
        self._advance(live)
        self._target, self._filled = target, live
        return None

    def discard(self, n: int) -> int:
        """Drop up to n bytes; return how many were dropped."""
        k = min(n, self._end - self._pos)
        self._advance(k)
        return k

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos == self._end:  # all parsed: the whole array is room again
            self._pos = self._end = 0


def encode_string(text: str) -> bytes:
    """UTF-8 bytes of a protocol string; ``LocalProtocolError`` if it is over the limit."""
    data = text.encode()
    if len(data) > MAX_STRING:
        raise LocalProtocolError(f"string of {len(data)} bytes exceeds the protocol's {MAX_STRING}")
    return data


def decode_string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise PeerProtocolError(f"{what} of {len(data)} bytes exceeds {MAX_STRING}")
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise PeerProtocolError(f"{what} is not UTF-8: {data[:40]!r}") from err
    if "\0" in text:
        raise PeerProtocolError(f"{what} contains NUL: {text[:40]!r}")
    return text


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def encode_name_and_infos(name: str, infos: tuple[int, ...]) -> bytes:
    """Payload of INFO/GO: the export name, then the information types wanted."""
    raw = encode_string(name)
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)
