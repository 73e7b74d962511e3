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


class ReceiveBuffer:
    """Bytes received and not yet parsed.

    Consumed bytes are dropped lazily (one slice per many messages) so that parsing a
    stream of small requests costs no quadratic copying.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...] | None:
        """Parse one fixed header, or return None (consuming nothing) if incomplete."""
        if len(self._buf) - self._pos < fmt.size:
            return None
        values = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return values

    def take(self, n: int) -> bytes | None:
        """Remove and return exactly n bytes, or None if fewer are buffered."""
        if len(self._buf) - self._pos < n:
            return None
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._compact()
        return data

    def discard(self, n: int) -> int:
        """Drop up to n bytes; return how many were dropped."""
        k = min(n, len(self._buf) - self._pos)
        self._pos += k
        self._compact()
        return k

    def _compact(self) -> None:
        if self._pos >= 65536 and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0


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
