"""Server side of the NBD protocol, fixed newstyle, as a pure state machine.

Theory of operation
-------------------
The I/O layer calls ``initiate()`` once and sends the greeting, then feeds every
received chunk to ``receive_data`` and drains ``next_event()`` until ``NEED_DATA``.
After each drain it sends ``data_to_send()``: the handshake is answered entirely by
this class, because every answer follows from the export catalogue it was given.

Events:
- ``ExportSelected``: the handshake ended (GO or EXPORT_NAME); transmission begins.
- ``RequestReceived``: a valid command for the I/O layer to run and answer with
  ``reply()``.
- ``RequestRefused``: an invalid command; its error reply is already queued in
  ``data_to_send()``, the event exists so the server can log it.
- ``OptionRefused``: an option answered with an error; same idea.
- ``ClientDisconnected``: ABORT or DISC; once replies in flight are sent, close.
- ``TlsRequested``: STARTTLS was acknowledged (the ACK is in ``data_to_send()``). The
  I/O layer sends it, wraps the transport in TLS (as server, verifying the client),
  then calls ``tls_started()``; option haggling goes on over TLS.

TLS (``tls=True``, the spec's FORCEDTLS mode): before STARTTLS every option but
STARTTLS and ABORT is answered ``NBD_REP_ERR_TLS_REQD``, and EXPORT_NAME (which cannot
be answered with an error) closes the connection. Bytes that arrive after STARTTLS in
the same plaintext read were sent before the client saw our ACK and would otherwise be
taken as if they came over TLS (the STARTTLS injection attack): they close the
connection. A second STARTTLS over TLS is ``NBD_REP_ERR_INVALID``. Without TLS,
STARTTLS is ``NBD_REP_ERR_POLICY`` and TLS_REQD is never sent.

A protocol violation that leaves the stream unusable (bad magic, a reply that cannot
be framed) raises ``PeerProtocolError``; the connection must then be closed. Anything
the specification lets a server answer (unknown option, request past the end, write
to a read-only export, oversized request) is answered and the connection goes on.
An oversized WRITE payload is discarded as it streams in, never buffered.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.limits import MAX_OPTION_LENGTH, MAX_OPTIONS_PER_CONNECTION
from virtman.protocol.nbd.constants import (
    BASE_ALLOCATION,
    DF_BIT,
    EXPORT_NAME_PADDING,
    FAST_ZERO_BIT,
    FUA_BIT,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
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
    OPTION_HEADER,
    REQUEST_HEADER,
    SIMPLE_REPLY_HEADER,
    STRUCTURED_HEADER,
    U16,
    U32,
    U64,
    ExportInfo,
    NeedData,
    ReceiveBuffer,
    decode_string,
    encode_info_export,
    encode_option_reply,
    encode_string,
)

#: Looks an export up by name; returns None when there is no such export.
ExportLookup = Callable[[str], ExportInfo | None]


class ServerState(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged; waiting for tls_started()
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request. ``data`` is the payload of a WRITE."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes = b""

    @property
    def name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"command-{self.command}"


@dataclass(frozen=True, slots=True)
class ExportSelected:
    export: ExportInfo
    structured_replies: bool


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request: Request


@dataclass(frozen=True, slots=True)
class RequestRefused:
    request: Request
    errno: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class OptionRefused:
    option: int
    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    how: str  # "abort" or "disc"


@dataclass(frozen=True, slots=True)
class TlsRequested:
    """STARTTLS was acknowledged: send ``data_to_send()``, start TLS, ``tls_started()``."""


ServerEvent = (
    ExportSelected
    | RequestReceived
    | RequestRefused
    | OptionRefused
    | ClientDisconnected
    | TlsRequested
)

# Flags each command may carry; anything else is EINVAL. Plain ints (see FUA_BIT).
_ALLOWED_FLAGS: dict[int, int] = {
    int(Command.READ): DF_BIT,
    int(Command.WRITE): FUA_BIT,
    int(Command.FLUSH): 0,
    int(Command.TRIM): FUA_BIT,
    int(Command.WRITE_ZEROES): FUA_BIT | int(CommandFlag.NO_HOLE) | FAST_ZERO_BIT,
    int(Command.CACHE): 0,
    int(Command.DISC): 0,
    int(Command.BLOCK_STATUS): int(CommandFlag.REQ_ONE),
}
_COMMAND_NAMES = {int(c): c.name for c in Command}
_NEEDS_WRITE = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_RANGED = frozenset(
    {
        Command.READ,
        Command.WRITE,
        Command.TRIM,
        Command.WRITE_ZEROES,
        Command.CACHE,
        Command.BLOCK_STATUS,
    }
)
# Writes past the end are ENOSPC; every other ranged command past the end is EINVAL.
_GROWS = frozenset({Command.WRITE, Command.WRITE_ZEROES})
_PAYLOAD_LIMITED = frozenset({Command.READ, Command.WRITE})
_BASE_ALLOCATION_ID = 1


class ServerConnection:
    """One client connection, handshake to disconnect.

    ``lookup`` resolves export names (the empty name means the default export);
    ``export_names`` lists what ``NBD_OPT_LIST`` shows. ``tls`` makes TLS mandatory
    (see the module docstring).
    """

    def __init__(
        self,
        lookup: ExportLookup,
        export_names: Callable[[], list[str]],
        *,
        max_option_length: int = MAX_OPTION_LENGTH,
        max_options: int = MAX_OPTIONS_PER_CONNECTION,
        tls: bool = False,
    ) -> None:
        self._lookup = lookup
        self.tls_required = tls
        #: Whether the bytes fed in now come out of a TLS session.
        self.tls_active = False
        self._export_names = export_names
        self._max_option_length = max_option_length
        self._max_options = max_options
        self._buf = ReceiveBuffer()
        self._out: list[bytes] = []
        self.state = ServerState.AWAIT_CLIENT_FLAGS
        self.client_flags = ClientFlag(0)
        self.structured_replies = False
        self.base_allocation = False
        #: _ALLOWED_FLAGS as the selected export's transmission flags amend it.
        self._allowed_flags: dict[int, int] = {}
        self.export: ExportInfo | None = None
        self._options_seen = 0
        # A parsed option or request header whose payload has not fully arrived.
        self._pending_option: tuple[int, int] | None = None
        self._option_discarded = 0  # payload bytes of an oversized option dropped so far
        self._pending_request: tuple[int, int, int, int, int] | None = None
        self._discarding = 0  # payload bytes of a refused WRITE still to drop
        self._discard_event: RequestRefused | None = None

    # --- bytes in and out -----------------------------------------------------------------

    def initiate(self) -> bytes:
        """The greeting, to be sent once the connection is accepted."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return U64.pack(NBDMAGIC) + U64.pack(IHAVEOPT) + U16.pack(flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is ServerState.CLOSED:
            return
        self._buf.feed(data)

    def data_to_send(self) -> bytes:
        """Handshake answers and automatic error replies queued since the last call."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ServerEvent | NeedData:
        """Parse the next whole message; raise ``PeerProtocolError`` on a fatal one."""
        while True:
            if self.state is ServerState.TRANSMISSION:
                return self._next_request()
            if self.state is ServerState.OPTIONS:
                event = self._next_option()
                if event is None:
                    continue  # answered an option; look for the next one
                return event
            if self.state is ServerState.AWAIT_CLIENT_FLAGS:
                values = self._buf.unpack(U32)
                if values is None:
                    return NEED_DATA
                self._accept_client_flags(values[0])
                continue
            return NEED_DATA

    # --- handshake ------------------------------------------------------------------------

    def _accept_client_flags(self, flags: int) -> None:
        known = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
        if flags & ~int(known):
            self.state = ServerState.CLOSED
            raise PeerProtocolError(f"client flags {flags:#x} include unknown bits")
        self.client_flags = ClientFlag(flags)
        self.state = ServerState.OPTIONS

    def tls_started(self) -> None:
        """The TLS handshake after ``TlsRequested`` succeeded: options go on over TLS."""
        if self.state is not ServerState.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started() in state {self.state.value}")
        self.tls_active = True
        self.state = ServerState.OPTIONS

    @property
    def _tls_pending(self) -> bool:
        """TLS is required and not yet running: options must be refused TLS_REQD."""
        return self.tls_required and not self.tls_active

    def _next_option(self) -> ServerEvent | NeedData | None:
        if self._pending_option is None:
            header = self._buf.unpack(OPTION_HEADER)
            if header is None:
                return NEED_DATA
            magic, option, length = header
            if magic != IHAVEOPT:
                self.state = ServerState.CLOSED
                raise PeerProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
            self._options_seen += 1
            if self._options_seen > self._max_options:
                self.state = ServerState.CLOSED
                raise PeerProtocolError(f"client sent more than {self._max_options} options")
            self._pending_option = (option, length)
        option, length = self._pending_option
        if length > self._max_option_length:
            # Drop the payload as it streams in, then refuse the option.
            self._option_discarded += self._buf.discard(length - self._option_discarded)
            if self._option_discarded < length:
                return NEED_DATA
            self._pending_option = None
            self._option_discarded = 0
            if option == Option.EXPORT_NAME:
                self.state = ServerState.CLOSED
                raise PeerProtocolError(f"EXPORT_NAME of {length} bytes is too long")
            if self._tls_pending and option != Option.ABORT:
                return self._refuse(option, Reply.ERR_TLS_REQD, "option before STARTTLS")
            return self._refuse(
                option,
                Reply.ERR_TOO_BIG,
                f"option data of {length} bytes exceeds {self._max_option_length}",
            )
        data = self._buf.take(length)
        if data is None:
            return NEED_DATA
        self._pending_option = None
        return self._handle_option(option, data)

    def _refuse(self, option: int, reply: Reply, reason: str, message: str = "") -> OptionRefused:
        self._out.append(
            encode_option_reply(option, reply, (message or reason).encode()[:MAX_STRING])
        )
        return OptionRefused(option, reply, reason)

    def _handle_option(self, option: int, data: bytes) -> ServerEvent | None:
        fixed = bool(self.client_flags & ClientFlag.FIXED_NEWSTYLE)
        if option == Option.EXPORT_NAME:
            if self._tls_pending:
                # EXPORT_NAME cannot be answered with an error: the spec says close.
                self.state = ServerState.CLOSED
                raise PeerProtocolError("EXPORT_NAME before STARTTLS on a server that requires TLS")
            return self._export_name(data)
        if not fixed:
            # A non-fixed newstyle client may only send EXPORT_NAME.
            self.state = ServerState.CLOSED
            raise PeerProtocolError(f"option {option} from a client without fixed newstyle")
        if option == Option.ABORT:
            self._out.append(encode_option_reply(option, Reply.ACK))
            self.state = ServerState.CLOSED
            return ClientDisconnected("abort")
        if option == Option.STARTTLS:
            return self._starttls(data)
        if self._tls_pending:
            try:
                label = Option(option).name
            except ValueError:
                label = f"option {option}"
            return self._refuse(
                option, Reply.ERR_TLS_REQD, f"{label} before STARTTLS", "TLS is required"
            )
        if option == Option.LIST:
            if data:
                return self._refuse(option, Reply.ERR_INVALID, "LIST with data")
            for name in self._export_names():
                raw = encode_string(name)
                self._out.append(
                    encode_option_reply(option, Reply.SERVER, U32.pack(len(raw)) + raw)
                )
            self._out.append(encode_option_reply(option, Reply.ACK))
            return None
        if option == Option.STRUCTURED_REPLY:
            if data:
                return self._refuse(option, Reply.ERR_INVALID, "STRUCTURED_REPLY with data")
            if self.structured_replies:
                return self._refuse(option, Reply.ERR_INVALID, "STRUCTURED_REPLY sent twice")
            self.structured_replies = True
            self._out.append(encode_option_reply(option, Reply.ACK))
            return None
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._meta_context(option, data)
        try:
            label = Option(option).name
        except ValueError:
            label = str(option)
        return self._refuse(option, Reply.ERR_UNSUP, f"option {label} is not supported")

    def _starttls(self, data: bytes) -> ServerEvent:
        if not self.tls_required:
            return self._refuse(Option.STARTTLS, Reply.ERR_POLICY, "TLS is not configured")
        if self.tls_active:
            return self._refuse(Option.STARTTLS, Reply.ERR_INVALID, "STARTTLS over TLS")
        if data:
            return self._refuse(Option.STARTTLS, Reply.ERR_INVALID, "STARTTLS with data")
        if len(self._buf):
            self.state = ServerState.CLOSED
            raise PeerProtocolError(
                f"{len(self._buf)} plaintext bytes sent after STARTTLS before its reply"
            )
        self._out.append(encode_option_reply(Option.STARTTLS, Reply.ACK))
        self.state = ServerState.TLS_HANDSHAKE
        return TlsRequested()

    def _export_name(self, data: bytes) -> ServerEvent:
        name = decode_string(data, "export name")
        export = self._lookup(name)
        if export is None:
            # The specification leaves no way to answer: the server closes.
            self.state = ServerState.CLOSED
            raise PeerProtocolError(f"EXPORT_NAME names unknown export {name!r}")
        flags = self._transmission_flags(export)
        reply = U64.pack(export.size) + U16.pack(flags)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            reply += bytes(EXPORT_NAME_PADDING)
        self._out.append(reply)
        return self._enter_transmission(export)

    def _info_or_go(self, option: int, data: bytes) -> ServerEvent | None:
        if len(data) < 6:
            return self._refuse(option, Reply.ERR_INVALID, f"{Option(option).name} data too short")
        (name_len,) = U32.unpack_from(data, 0)
        if name_len > MAX_STRING or 4 + name_len + 2 > len(data):
            return self._refuse(option, Reply.ERR_INVALID, "export name length does not fit")
        try:
            name = decode_string(data[4 : 4 + name_len], "export name")
        except PeerProtocolError as err:
            return self._refuse(option, Reply.ERR_INVALID, str(err))
        (count,) = U16.unpack_from(data, 4 + name_len)
        infos_raw = data[4 + name_len + 2 :]
        if len(infos_raw) != 2 * count:
            return self._refuse(
                option,
                Reply.ERR_INVALID,
                f"{count} information requests but {len(infos_raw)} bytes",
            )
        wanted = {U16.unpack_from(infos_raw, 2 * i)[0] for i in range(count)}
        export = self._lookup(name)
        if export is None:
            return self._refuse(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
        flags = self._transmission_flags(export)
        if Info.NAME in wanted:
            self._out.append(
                encode_option_reply(
                    option, Reply.INFO, U16.pack(Info.NAME) + encode_string(export.name)
                )
            )
        if Info.DESCRIPTION in wanted and export.description:
            self._out.append(
                encode_option_reply(
                    option,
                    Reply.INFO,
                    U16.pack(Info.DESCRIPTION) + encode_string(export.description),
                )
            )
        # Block sizes are always sent: a client that did not ask may ignore them.
        self._out.append(encode_option_reply(option, Reply.INFO, export.block_sizes.encode()))
        self._out.append(
            encode_option_reply(option, Reply.INFO, encode_info_export(export.size, flags))
        )
        self._out.append(encode_option_reply(option, Reply.ACK))
        if option == Option.GO:
            return self._enter_transmission(export)
        return None

    def _meta_context(self, option: int, data: bytes) -> ServerEvent | None:
        # Layout: export name (u32 len + bytes), u32 query count, queries (u32 len + bytes).
        label = Option(option).name
        if option == Option.SET_META_CONTEXT:
            self.base_allocation = False  # replaced even when this option fails
        if not self.structured_replies:
            return self._refuse(
                option, Reply.ERR_INVALID, f"{label} before STRUCTURED_REPLY was negotiated"
            )
        try:
            pos = 0
            (name_len,) = U32.unpack_from(data, pos)
            pos += 4
            name = decode_string(data[pos : pos + name_len], "export name")
            pos += name_len
            (count,) = U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = U32.unpack_from(data, pos)
                pos += 4
                if pos + qlen > len(data):
                    raise PeerProtocolError("meta context query runs past the option data")
                queries.append(decode_string(data[pos : pos + qlen], "meta context query"))
                pos += qlen
            if pos != len(data):
                raise PeerProtocolError("trailing bytes after meta context queries")
        except (PeerProtocolError, ValueError) as err:
            return self._refuse(option, Reply.ERR_INVALID, f"{label}: {err}")
        except Exception as err:  # struct.error: data too short
            return self._refuse(option, Reply.ERR_INVALID, f"{label} data too short: {err}")
        if self._lookup(name) is None:
            return self._refuse(option, Reply.ERR_UNKNOWN, f"no export named {name!r}")
        matched = False
        if option == Option.LIST_META_CONTEXT:
            matched = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            matched = BASE_ALLOCATION in queries
            self.base_allocation = matched
        if matched:
            payload = U32.pack(_BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
            self._out.append(encode_option_reply(option, Reply.META_CONTEXT, payload))
        self._out.append(encode_option_reply(option, Reply.ACK))
        return None

    def _transmission_flags(self, export: ExportInfo) -> TransmissionFlag:
        flags = TransmissionFlag(export.flags) | TransmissionFlag.HAS_FLAGS
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF
        return flags

    def _enter_transmission(self, export: ExportInfo) -> ExportSelected:
        self.export = export
        self.state = ServerState.TRANSMISSION
        self._allowed_flags = dict(_ALLOWED_FLAGS)
        if export.flags & TransmissionFlag.SEND_FUA:
            # The spec: accept FUA on every command.
            self._allowed_flags = {c: f | FUA_BIT for c, f in _ALLOWED_FLAGS.items()}
        if not export.flags & TransmissionFlag.SEND_FAST_ZERO:
            self._allowed_flags[Command.WRITE_ZEROES] &= ~FAST_ZERO_BIT
        return ExportSelected(export, self.structured_replies)

    # --- transmission ---------------------------------------------------------------------

    def _next_request(self) -> ServerEvent | NeedData:
        if self._discard_event is not None:
            self._discarding -= self._buf.discard(self._discarding)
            if self._discarding:
                return NEED_DATA
            event, self._discard_event = self._discard_event, None
            assert event is not None
            return event
        if self._pending_request is None:
            header = self._buf.unpack(REQUEST_HEADER)
            if header is None:
                return NEED_DATA
            magic, flags, command, cookie, offset, length = header
            if magic != REQUEST_MAGIC:
                self.state = ServerState.CLOSED
                raise PeerProtocolError(f"request magic {magic:#x} is not {REQUEST_MAGIC:#x}")
            refusal = self._check(command, flags, offset, length)
            if command == Command.WRITE:
                if refusal is not None:
                    # The payload still follows; drop it as it streams in, then answer.
                    request = Request(command, flags, cookie, offset, length)
                    self._out.append(self.error_reply(request, refusal[0], refusal[1]))
                    self._discard_event = RequestRefused(request, refusal[0], refusal[1])
                    self._discarding = length
                    return self._next_request()
                self._pending_request = (command, flags, cookie, offset, length)
            else:
                request = Request(command, flags, cookie, offset, length)
                if refusal is not None:
                    self._out.append(self.error_reply(request, refusal[0], refusal[1]))
                    return RequestRefused(request, refusal[0], refusal[1])
                if command == Command.DISC:
                    self.state = ServerState.CLOSED
                    return ClientDisconnected("disc")
                return RequestReceived(request)
        command, flags, cookie, offset, length = self._pending_request
        data = self._buf.take(length)
        if data is None:
            return NEED_DATA
        self._pending_request = None
        return RequestReceived(Request(command, flags, cookie, offset, length, data))

    def _check(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """The spec's answer to an invalid request, or None when it is valid."""
        export = self.export
        assert export is not None
        label = _COMMAND_NAMES.get(command)
        if label is None:
            return Errno.EINVAL, f"unknown command {command}"
        allowed = self._allowed_flags.get(command)
        if allowed is None:
            return Errno.EINVAL, f"{label} is not supported"
        if flags & ~allowed:
            return Errno.EINVAL, f"{label} with flags {flags:#x} not valid for it"
        if command == Command.READ and flags & DF_BIT and not self.structured_replies:
            return Errno.EINVAL, "READ with DF flag without structured replies"
        if command == Command.BLOCK_STATUS and not self.base_allocation:
            return Errno.EINVAL, "BLOCK_STATUS without a negotiated meta context"
        if command in _NEEDS_WRITE and export.read_only:
            return Errno.EPERM, f"{label} on read-only export {export.name!r}"
        if command in _PAYLOAD_LIMITED and length > export.block_sizes.maximum:
            return Errno.EINVAL, (
                f"{label} of {length} bytes exceeds the maximum {export.block_sizes.maximum}"
            )
        if command in _RANGED and offset + length > export.size:
            errno = Errno.ENOSPC if command in _GROWS else Errno.EINVAL
            return errno, (
                f"{label} offset={offset} length={length} past the end of "
                f"{export.name!r} ({export.size} bytes)"
            )
        minimum = export.block_sizes.minimum
        if command in _RANGED and (offset % minimum or length % minimum):
            return Errno.EINVAL, (
                f"{label} offset={offset} length={length} not aligned to "
                f"the minimum block size {minimum}"
            )
        # Zero-length requests are left unspecified by the protocol; they succeed as no-ops.
        return None

    # --- replies --------------------------------------------------------------------------

    def reply(self, request: Request, data: bytes | bytearray | memoryview | None = None) -> bytes:
        """The header of a successful reply; the caller sends ``data`` (READ) after it."""
        if self.structured_replies:
            if request.command == Command.READ:
                assert data is not None
                if len(data) != request.length:
                    raise LocalProtocolError(
                        f"READ reply of {len(data)} bytes for {request.length} requested"
                    )
            if request.command == Command.READ and request.length:
                return STRUCTURED_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC,
                    ReplyFlag.DONE,
                    ChunkType.OFFSET_DATA,
                    request.cookie,
                    8 + request.length,
                ) + U64.pack(request.offset)
            return STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, request.cookie, 0
            )
        if request.command == Command.READ and (data is None or len(data) != request.length):
            raise LocalProtocolError(f"READ reply without {request.length} bytes of data")
        return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)

    def read_reply_header(self, request: Request) -> bytes:
        """The header of a successful READ reply whose ``request.length`` bytes the
        caller sends after it from elsewhere (a file, with sendfile)."""
        if request.command != Command.READ:
            raise LocalProtocolError(f"read reply header for {request.name}")
        if not request.length:
            return self.reply(request, b"")
        if self.structured_replies:
            return STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.OFFSET_DATA, request.cookie,
                8 + request.length,
            ) + U64.pack(request.offset)
        return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)

    def block_status_reply(self, request: Request, extents: list[tuple[int, int]]) -> bytes:
        """A BLOCK_STATUS reply for ``base:allocation``: (length, state flags) pairs."""
        if not extents:
            raise LocalProtocolError("BLOCK_STATUS reply with no extents")
        if request.flags & CommandFlag.REQ_ONE:
            extents = extents[:1]
        payload = U32.pack(_BASE_ALLOCATION_ID) + b"".join(
            U32.pack(length) + U32.pack(state) for length, state in extents
        )
        return (
            STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC,
                ReplyFlag.DONE,
                ChunkType.BLOCK_STATUS,
                request.cookie,
                len(payload),
            )
            + payload
        )

    def error_reply(self, request: Request, errno: int, message: str = "") -> bytes:
        """A complete error reply (with the message, when structured replies are on)."""
        if errno == 0:
            raise LocalProtocolError("error reply with errno 0")
        if self.structured_replies:
            text = message.encode()[:MAX_STRING]
            payload = U32.pack(errno) + U16.pack(len(text)) + text
            return (
                STRUCTURED_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC,
                    ReplyFlag.DONE,
                    ChunkType.ERROR,
                    request.cookie,
                    len(payload),
                )
                + payload
            )
        return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, errno, request.cookie)
