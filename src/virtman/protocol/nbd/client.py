"""Client side of the NBD protocol, fixed newstyle, as a pure state machine.

Theory of operation
-------------------
``ClientConnection(export_name)`` drives the handshake by itself: fed the server's
bytes, it answers with the next option (STRUCTURED_REPLY when wanted, then GO asking
for block sizes; EXPORT_NAME if the server does not know GO) and finally returns
``HandshakeDone`` with the export's description. With ``list_exports=True`` it asks
for the export list instead and returns ``ExportsListed``.

With ``tls=True`` the first option is STARTTLS; its ACK comes back as ``TlsAccepted``
(nothing queued to send): the I/O layer wraps the transport in TLS as a client, calls
``tls_started()``, and the handshake goes on over TLS with the options above. A server
that refuses STARTTLS fails the handshake (a client that wants TLS never falls back),
and so does a server answering ``NBD_REP_ERR_TLS_REQD`` to a client without TLS, with
a message saying TLS is needed. Bytes the server sent after its ACK in plaintext close
the connection: they would be taken as if they came over TLS.

In transmission, ``request()`` returns the cookie and the bytes to send; replies come
back from ``next_event`` as ``ReplyReceived`` in whatever order the server sends them.
The client remembers what each cookie asked for, so it can frame simple READ replies
(whose length the wire does not carry) and assemble structured chunks into one reply.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.limits import DIRECT_RECEIVE_MIN_BYTES, MAX_ERROR_MESSAGE, MAX_OPTION_REPLY
from virtman.protocol.nbd.constants import (
    BASE_ALLOCATION,
    DONE_BIT,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Command,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    ReplyFlag,
    TransmissionFlag,
)
from virtman.protocol.nbd.messages import (
    NEED_DATA,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    U16,
    U32,
    U64,
    BlockSizes,
    ExportInfo,
    NeedData,
    ReceiveBuffer,
    decode_string,
    encode_name_and_infos,
    encode_option,
    encode_string,
)

# Prebuilt: building a Struct costs more than the rest of decoding a reply header.
_SIMPLE_REST = struct.Struct(">IQ")  # error, cookie (after the magic)
_CHUNK_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged; waiting for tls_started()
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    export: ExportInfo
    structured_replies: bool
    base_allocation: bool = False


@dataclass(frozen=True, slots=True)
class ExportsListed:
    names: list[str]


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A whole reply. ``error`` is 0 on success; ``data`` holds READ bytes (a large
    payload: a read-only view of an array nothing else holds, see ``_payload``)."""

    cookie: int
    error: int
    data: bytes | memoryview = b""
    message: str = ""
    extents: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TlsAccepted:
    """The server acknowledged STARTTLS: start TLS now, then call ``tls_started()``."""


ClientEvent = HandshakeDone | ExportsListed | ReplyReceived | TlsAccepted


@dataclass(slots=True)
class _Outstanding:
    command: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None
    error: int = 0
    message: str = ""
    extents: list[tuple[int, int]] = field(default_factory=list)


class ClientConnection:
    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        list_exports: bool = False,
        block_status: bool = False,
        max_option_reply: int = MAX_OPTION_REPLY,
        direct_receive_min: int = DIRECT_RECEIVE_MIN_BYTES,
        tls: bool = False,
    ) -> None:
        encode_string(export_name)  # validates the length
        self.tls = tls
        #: Whether the bytes fed in now come out of a TLS session.
        self.tls_active = False
        self.max_option_reply = max_option_reply
        #: READ payloads of at least this many bytes are received into arrays of their
        #: own and handed out as read-only views (no copy out of the receive buffer).
        self.direct_receive_min = direct_receive_min
        self.export_name = export_name
        self._want_structured = structured_replies
        self._want_block_status = block_status and structured_replies
        #: The server's id for ``base:allocation`` once negotiated (BLOCK_STATUS works).
        self.base_allocation_id: int | None = None
        self._list = list_exports
        self._buf = ReceiveBuffer()
        self._out: list[bytes] = []
        self.state = ClientState.AWAIT_GREETING
        self.structured_replies = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self._option: int | None = None  # the option awaiting its reply
        self._infos: dict[int, bytes] = {}
        self._names: list[str] = []
        self._pending_option_reply: tuple[int, int, int] | None = None
        self._awaiting_export_name_reply = False
        self._next_cookie = 1
        self._outstanding: dict[int, _Outstanding] = {}
        self._pending_reply: tuple[str, tuple[int, ...]] | None = None
        #: The offset of an OFFSET_DATA chunk whose data is still coming in.
        self._data_offset: int | None = None

    # --- bytes in and out -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf.feed(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Room to read received bytes into (instead of ``receive_data``); then call
        ``buffer_updated`` with how many were read. See ``ReceiveBuffer``."""
        return self._buf.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._buf.buffer_updated(nbytes)

    def release_buffer(self) -> None:
        """Give back receive room grown while replies streamed in, once nothing is
        outstanding or buffered (an idle connection keeps no megabytes)."""
        if not self._outstanding:
            self._buf.release()

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def next_event(self) -> ClientEvent | NeedData:
        while True:
            if self.state is ClientState.TRANSMISSION:
                return self._next_reply()
            if self.state is ClientState.OPTIONS:
                event = self._next_option_reply()
                if event is None:
                    continue
                return event
            if self.state is ClientState.AWAIT_GREETING:
                if not self._greeting():
                    return NEED_DATA
                continue
            return NEED_DATA

    # --- handshake ------------------------------------------------------------------------

    def _fail(self, message: str) -> PeerProtocolError:
        self.state = ClientState.CLOSED
        return PeerProtocolError(message)

    def _greeting(self) -> bool:
        values = self._buf.unpack(struct.Struct(">QQH"))
        if values is None:
            return False
        magic, opt_magic, flags = values
        if magic != NBDMAGIC:
            raise self._fail(f"server greeting magic {magic:#x} is not NBDMAGIC")
        if opt_magic != IHAVEOPT:
            raise self._fail(f"server is not newstyle (magic {opt_magic:#x})")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise self._fail("server does not speak fixed newstyle")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self.no_zeroes = True
        self._out.append(U32.pack(client))
        self.state = ClientState.OPTIONS
        if self.tls:
            # First, so that no option (not even the export's name) goes in plaintext.
            self._send_option(Option.STARTTLS)
        else:
            self._first_option()
        return True

    def tls_started(self) -> None:
        """The TLS handshake after ``TlsAccepted`` succeeded: haggling goes on over TLS."""
        if self.state is not ClientState.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started() in state {self.state.value}")
        self.tls_active = True
        self.state = ClientState.OPTIONS
        self._first_option()

    def _first_option(self) -> None:
        if self._list:
            self._send_option(Option.LIST)
        elif self._want_structured:
            self._send_option(Option.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._out.append(encode_option(option, data))

    def _send_go(self) -> None:
        self._infos.clear()
        self._send_option(Option.GO, encode_name_and_infos(self.export_name, (Info.BLOCK_SIZE,)))

    def _next_option_reply(self) -> ClientEvent | NeedData | None:
        if self._awaiting_export_name_reply:
            return self._export_name_reply()
        if self._pending_option_reply is None:
            header = self._buf.unpack(OPTION_REPLY_HEADER)
            if header is None:
                return NEED_DATA
            magic, option, reply, length = header
            if magic != OPTION_REPLY_MAGIC:
                raise self._fail(f"option reply magic {magic:#x} is wrong")
            if option != self._option:
                raise self._fail(f"reply to option {option} while {self._option} was asked")
            if length > self.max_option_reply:
                raise self._fail(
                    f"option reply of {length} bytes exceeds {self.max_option_reply}")
            self._pending_option_reply = (option, reply, length)
        option, reply, length = self._pending_option_reply
        data = self._buf.take(length)
        if data is None:
            return NEED_DATA
        self._pending_option_reply = None
        return self._handle_option_reply(option, reply, data)

    def _handle_option_reply(self, option: int, reply: int, data: bytes) -> ClientEvent | None:
        if option == Option.STARTTLS:
            return self._starttls_reply(reply, data)
        if reply & (1 << 31):
            message = data.decode(errors="replace")
            try:
                label = Reply(reply).name
            except ValueError:
                label = f"error {reply:#x}"
            if reply == Reply.ERR_TLS_REQD:
                raise self._fail(
                    f"server requires TLS (answered {Option(option).name} with "
                    f"NBD_REP_ERR_TLS_REQD); connect with TLS certificates"
                )
            if option in (Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT):
                self._send_go()  # go on without what the server does not offer
                return None
            if option == Option.GO and reply == Reply.ERR_UNSUP:
                self._awaiting_export_name_reply = True
                self._option = Option.EXPORT_NAME
                self._out.append(encode_option(Option.EXPORT_NAME, self.export_name.encode()))
                return None
            raise self._fail(f"server refused {Option(option).name}: {label} {message}".strip())
        if option == Option.LIST:
            if reply == Reply.SERVER:
                if len(data) < 4:
                    raise self._fail("LIST reply too short")
                (n,) = U32.unpack_from(data, 0)
                if 4 + n > len(data):
                    raise self._fail("LIST reply name runs past its data")
                self._names.append(decode_string(data[4 : 4 + n], "export name"))
                return None
            if reply == Reply.ACK:
                self._send_option(Option.ABORT)
                self.state = ClientState.CLOSED
                return ExportsListed(list(self._names))
            raise self._fail(f"unexpected reply {reply} to LIST")
        if option == Option.STRUCTURED_REPLY:
            if reply != Reply.ACK:
                raise self._fail(f"unexpected reply {reply} to STRUCTURED_REPLY")
            self.structured_replies = True
            if self._want_block_status:
                raw = encode_string(self.export_name)
                query = BASE_ALLOCATION.encode()
                self._send_option(Option.SET_META_CONTEXT, U32.pack(len(raw)) + raw + U32.pack(1)
                                  + U32.pack(len(query)) + query)
            else:
                self._send_go()
            return None
        if option == Option.SET_META_CONTEXT:
            if reply == Reply.META_CONTEXT:
                if len(data) < 4:
                    raise self._fail("META_CONTEXT reply too short")
                if data[4:].decode(errors="replace") == BASE_ALLOCATION:
                    (self.base_allocation_id,) = U32.unpack_from(data, 0)
                return None
            if reply == Reply.ACK:
                self._send_go()
                return None
            raise self._fail(f"unexpected reply {reply} to SET_META_CONTEXT")
        if option == Option.GO:
            if reply == Reply.INFO:
                if len(data) < 2:
                    raise self._fail("INFO reply too short")
                (kind,) = U16.unpack_from(data, 0)
                self._infos[kind] = data[2:]
                return None
            if reply == Reply.ACK:
                return self._go_done()
            raise self._fail(f"unexpected reply {reply} to GO")
        raise self._fail(f"reply {reply} to option {option} that was not asked")

    def _starttls_reply(self, reply: int, data: bytes) -> TlsAccepted:
        if reply != Reply.ACK:
            try:
                label = Reply(reply).name
            except ValueError:
                label = f"reply {reply:#x}"
            message = data.decode(errors="replace")[:MAX_ERROR_MESSAGE]
            raise self._fail(f"server refused STARTTLS: {label} {message}".strip())
        if data:
            raise self._fail(f"STARTTLS ACK with {len(data)} bytes of data")
        if len(self._buf):
            raise self._fail(f"{len(self._buf)} plaintext bytes after the STARTTLS ACK")
        self._option = None
        self.state = ClientState.TLS_HANDSHAKE
        return TlsAccepted()

    def _go_done(self) -> HandshakeDone:
        raw = self._infos.get(Info.EXPORT)
        if raw is None or len(raw) != 10:
            raise self._fail("GO finished without a valid NBD_INFO_EXPORT")
        size, flags = struct.unpack(">QH", raw)
        sizes = BlockSizes()
        bs = self._infos.get(Info.BLOCK_SIZE)
        if bs is not None:
            if len(bs) != 12:
                raise self._fail("NBD_INFO_BLOCK_SIZE of wrong length")
            try:
                sizes = BlockSizes(*struct.unpack(">III", bs))
            except LocalProtocolError as err:
                raise self._fail(f"server sent invalid block sizes: {err}") from err
        return self._ready(size, flags, sizes)

    def _export_name_reply(self) -> ClientEvent | NeedData:
        need = 10 if self.no_zeroes else 10 + EXPORT_NAME_PADDING
        data = self._buf.take(need)
        if data is None:
            return NEED_DATA
        size, flags = struct.unpack_from(">QH", data)
        self._awaiting_export_name_reply = False
        return self._ready(size, flags, BlockSizes())

    def _ready(self, size: int, flags: int, sizes: BlockSizes) -> HandshakeDone:
        self.export = ExportInfo(self.export_name, size, TransmissionFlag(flags), block_sizes=sizes)
        self.state = ClientState.TRANSMISSION
        self._option = None
        return HandshakeDone(self.export, self.structured_replies,
                             self.base_allocation_id is not None)

    # --- transmission ---------------------------------------------------------------------

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | bytearray | memoryview | None = None,
    ) -> tuple[int, bytes]:
        """Register a request; return its cookie and header (the caller sends ``data``)."""
        if self.state is not ClientState.TRANSMISSION:
            raise LocalProtocolError(f"request in state {self.state.value}")
        if command == Command.WRITE:
            if data is None or len(data) != length:
                raise LocalProtocolError("WRITE needs exactly `length` bytes of data")
        elif data is not None:
            raise LocalProtocolError(f"{Command(command).name} carries no data")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if command != Command.DISC:
            self._outstanding[cookie] = _Outstanding(command, offset, length)
        else:
            self.state = ClientState.CLOSED
        return cookie, REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    def _next_reply(self) -> ClientEvent | NeedData:
        while True:
            if self._pending_reply is None:
                if len(self._buf) < 4:
                    return NEED_DATA
                magic = self._buf.unpack(U32)
                assert magic is not None
                if magic[0] == SIMPLE_REPLY_MAGIC:
                    header = self._buf.unpack(_SIMPLE_REST)
                    if header is None:
                        self._rewind_magic(magic[0])
                        return NEED_DATA
                    self._pending_reply = ("simple", header)
                elif magic[0] == STRUCTURED_REPLY_MAGIC:
                    header = self._buf.unpack(_CHUNK_REST)
                    if header is None:
                        self._rewind_magic(magic[0])
                        return NEED_DATA
                    self._pending_reply = ("chunk", header)
                else:
                    raise self._fail(f"reply magic {magic[0]:#x} is not a reply")
            kind, header = self._pending_reply
            if kind == "simple":
                event = self._simple(*header)
            else:
                event = self._chunk(*header)
            if event is NEED_DATA:
                return NEED_DATA
            self._pending_reply = None
            if event is not None:
                return event

    def _rewind_magic(self, magic: int) -> None:
        # Put a consumed magic back in front; rare (header split across reads).
        rest = self._buf.take(len(self._buf)) or b""
        self._buf = ReceiveBuffer()
        self._buf.feed(U32.pack(magic) + rest)

    def _lookup(self, cookie: int) -> _Outstanding:
        out = self._outstanding.get(cookie)
        if out is None:
            raise self._fail(f"reply for unknown cookie {cookie}")
        return out

    def _simple(self, error: int, cookie: int) -> ClientEvent | NeedData | None:
        out = self._lookup(cookie)
        data: bytes | memoryview = b""
        if out.command == Command.READ and error == 0:
            got = self._payload(out.length)
            if got is None:
                return NEED_DATA
            data = got
        del self._outstanding[cookie]
        return ReplyReceived(cookie, error, data)

    def _chunk(
        self, flags: int, kind: int, cookie: int, length: int
    ) -> ClientEvent | NeedData | None:
        out = self._lookup(cookie)
        limit = out.length + 8 if kind == ChunkType.OFFSET_DATA else MAX_ERROR_MESSAGE + 16
        if kind == ChunkType.BLOCK_STATUS:
            limit = 4 + 8 * 65536
        if length > limit:
            raise self._fail(f"reply chunk of {length} bytes for a request of {out.length}")
        if kind == ChunkType.OFFSET_DATA:
            # The offset and the data are taken apart: the data is copied once at most
            # (``_payload``), not taken with its offset and sliced again.
            if length < 8:
                raise self._fail("OFFSET_DATA chunk too short")
            if self._data_offset is None:
                got = self._buf.unpack(U64)
                if got is None:
                    return NEED_DATA
                self._data_offset = got[0]
                self._check_range(out, got[0], length - 8, cookie)
            data = self._payload(length - 8)
            if data is None:
                return NEED_DATA
            offset, self._data_offset = self._data_offset, None
            self._place(out, offset, data, cookie)
            return self._chunk_done(flags, out, cookie)
        payload = self._buf.take(length)
        if payload is None:
            return NEED_DATA
        if kind == ChunkType.OFFSET_HOLE:
            if length != 12:
                raise self._fail("OFFSET_HOLE chunk of wrong length")
            (offset, size) = struct.unpack(">QI", payload)
            self._check_range(out, offset, size, cookie)
            # Holes read as zeros, which a fresh buffer already holds.
            if out.data is None:
                out.data = bytearray(out.length)
        elif kind == ChunkType.NONE:
            if length != 0 or not flags & ReplyFlag.DONE:
                raise self._fail("NONE chunk must be empty and final")
        elif kind == ChunkType.BLOCK_STATUS:
            if length < 12 or (length - 4) % 8:
                raise self._fail("BLOCK_STATUS chunk of wrong length")
            out.extents.extend(
                struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((length - 4) // 8)
            )
        elif kind in (ChunkType.ERROR, ChunkType.ERROR_OFFSET) or kind & (1 << 15):
            if length < 6:
                raise self._fail("error chunk too short")
            error, mlen = struct.unpack_from(">IH", payload)
            if error == 0:
                raise self._fail("error chunk with error 0")
            out.error = out.error or error
            out.message = payload[6 : 6 + mlen].decode(errors="replace")
        else:
            raise self._fail(f"unknown reply chunk type {kind}")
        return self._chunk_done(flags, out, cookie)

    def _payload(self, n: int) -> bytes | memoryview | None:
        """A READ payload of n bytes, or None until it is all in: a large one is read
        straight into its own array (``ReceiveBuffer.take_large``)."""
        if n >= self.direct_receive_min:
            return self._buf.take_large(n)
        return self._buf.take(n)

    def _chunk_done(self, flags: int, out: _Outstanding, cookie: int) -> ReplyReceived | None:
        """The reply once its last chunk (DONE) is in, else None."""
        if not flags & DONE_BIT:
            return None
        del self._outstanding[cookie]
        data: bytes | memoryview = b""
        if out.command == Command.READ and not out.error:
            if out.data is None:
                data = bytes(out.length)
            elif isinstance(out.data, bytearray):  # assembled from pieces or holes
                data = bytes(out.data)
            else:
                data = out.data
        return ReplyReceived(cookie, out.error, data, out.message, out.extents)

    def _check_range(self, out: _Outstanding, offset: int, size: int, cookie: int) -> None:
        if out.command != Command.READ:
            raise self._fail(f"data chunk in reply to {Command(out.command).name}")
        if offset < out.offset or offset + size > out.offset + out.length:
            raise self._fail(f"chunk {offset}+{size} outside request {out.offset}+{out.length}")

    def _place(
        self, out: _Outstanding, offset: int, data: bytes | memoryview, cookie: int
    ) -> None:
        self._check_range(out, offset, len(data), cookie)
        if out.data is None and offset == out.offset and len(data) == out.length:
            out.data = data  # the common case, one chunk holds everything: no copy
            return
        if not isinstance(out.data, bytearray):
            out.data = bytearray(out.data or out.length)
        start = offset - out.offset
        out.data[start : start + len(data)] = data


def errno_name(errno: int) -> str:
    try:
        return Errno(errno).name
    except ValueError:
        return str(errno)
