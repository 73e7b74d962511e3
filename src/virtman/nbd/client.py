"""asyncio NBD client: one connection to one export, many requests in flight.

``await NbdClient.connect(uri)`` opens the socket and runs the handshake; each request
method sends one request (split at the server's maximum payload) and waits for its
reply, so callers get concurrency by running several at once. When the connection
breaks, every request waiting on it fails with ``NetworkError`` and the client is
``CLOSED``: the caller (``RemoteDevice``) decides whether to reconnect.

Lifecycle (``ClientStatus``): ``CONNECTING → READY → CLOSING → CLOSED``; a connection
that breaks goes from any state to ``CLOSED`` with ``error`` set. Everything raised to a
caller is a ``VirtmanError``: timeouts of the connect, the handshake or one request are
``NetworkTimeout`` (a ``NetworkError``) naming the address, the operation and the limit.

TLS: given TLS files (or an ``nbds://`` URI, whose ``tls-certificates=DIR`` names them
when no files are given), the client sends STARTTLS first, verifies the server's
certificate against the CA and its name against the URI's host (``localhost`` for a
Unix socket), and presents its own certificate. A server that refuses STARTTLS, or whose
certificate does not verify, fails the connect with ``NetworkError``: a client that
asked for TLS never goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
from collections.abc import Callable
from typing import cast

from virtman.errors import (
    ConfigError,
    NbdRequestError,
    NetworkError,
    NetworkTimeout,
    PeerProtocolError,
    VirtmanError,
    excerpt,
)
from virtman.limits import (
    CONNECT_TIMEOUT_SECONDS,
    DISCONNECT_WAIT_SECONDS,
    TLS_HANDSHAKE_TIMEOUT_SECONDS,
)
from virtman.nbd.sockets import set_socket_buffers
from virtman.protocol.nbd import NEED_DATA, ClientConnection, Command, CommandFlag, ExportInfo
from virtman.protocol.nbd.client import (
    ExportsListed,
    HandshakeDone,
    ReplyReceived,
    TlsAccepted,
    errno_name,
)
from virtman.protocol.nbd.constants import TransmissionFlag
from virtman.protocol.uri import NbdAddress, parse_nbd_uri
from virtman.tlsconfig import TlsFiles, client_context, libnbd_files

#: What a client is given for TLS: files to load, or a context built from them once.
TlsSetting = TlsFiles | ssl.SSLContext | None


def tls_context_for(address: NbdAddress, tls: TlsSetting) -> ssl.SSLContext | None:
    """The TLS context a connection to ``address`` uses: from ``tls`` when given (TLS
    then applies to ``nbd://`` URIs too, so hosts need not rewrite the URIs Volt hands
    out), else from an ``nbds://`` URI's ``tls-certificates=DIR``, else None
    (plaintext). A Unix socket is reached over TLS only when its URI says
    ``nbds+unix://``: a local socket is guarded by its file permissions (VM exports,
    an origin on the same host). Raises ConfigError for an ``nbds://`` URI with no
    files, or files that do not load."""
    local_plain = address.socket is not None and not address.tls
    if isinstance(tls, ssl.SSLContext):
        return None if local_plain else tls
    if tls is not None:
        return None if local_plain else client_context(tls)
    if address.tls:
        if address.tls_certificates is None:
            raise ConfigError(
                f"{address} asks for TLS: give TLS files (--tls-cert, --tls-key, --tls-ca) "
                "or ?tls-certificates=DIR"
            )
        return client_context(libnbd_files(address.tls_certificates))
    return None

log = logging.getLogger(__name__)


class ClientStatus(enum.Enum):
    CONNECTING = "connecting"  # socket or handshake in progress
    READY = "ready"  # requests may be sent
    CLOSING = "closing"  # close() waits for the requests in flight, then sends DISC
    CLOSED = "closed"  # closed by us, by the server, or broken (``error`` says why)


class _ClientProtocol(asyncio.BufferedProtocol):
    """A buffered protocol: the loop reads replies straight into the codec's receive
    buffer (``get_buffer``), so a chunk's bytes are copied once in Python, where the
    codec takes them out, not once per read into a new ``bytes`` and once more into the
    codec (see ``ReceiveBuffer``)."""

    def __init__(
        self,
        codec: ClientConnection,
        address: NbdAddress,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS,
    ) -> None:
        self.codec = codec
        self.address = address
        self.tls = tls
        self.tls_handshake_timeout = tls_handshake_timeout
        self._tls_task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[HandshakeDone | ExportsListed] = loop.create_future()
        self.waiters: dict[int, asyncio.Future[ReplyReceived]] = {}
        self.closed = loop.create_future()
        self.error: VirtmanError | None = None
        #: Called, synchronously, when the connection is gone or broken.
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        set_socket_buffers(self.transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.codec.buffer_updated(nbytes)
        self._process()
        self.codec.release_buffer()

    def data_received(self, data: bytes) -> None:
        # Transports that do not know buffered protocols call this instead.
        self.codec.receive_data(data)
        self._process()

    def _process(self) -> None:
        codec = self.codec
        try:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, ReplyReceived):
                    waiter = self.waiters.pop(event.cookie, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)
                elif isinstance(event, TlsAccepted):
                    self._begin_tls()
                    return
                elif not self.handshake.done():
                    self.handshake.set_result(event)  # type: ignore[arg-type]
        except PeerProtocolError as err:
            self._fail(NetworkError(f"server broke the protocol: {err}", address=str(self.address)))
            if self.transport is not None:
                self.transport.abort()
            return
        out = codec.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _begin_tls(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.tls is None:  # the codec only sends STARTTLS when told to use TLS
            raise AssertionError("STARTTLS accepted on a client without a TLS context")
        # No plaintext may be read past the ACK: start_tls takes over from a task.
        transport.pause_reading()
        self._tls_task = asyncio.get_running_loop().create_task(self._start_tls(transport))

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        assert self.tls is not None
        try:
            wrapped = await asyncio.get_running_loop().start_tls(
                transport,
                self,
                self.tls,
                server_hostname=self.address.tls_hostname,
                ssl_handshake_timeout=self.tls_handshake_timeout,
            )
        except (OSError, RuntimeError) as err:  # ssl.SSLError, resets, handshake timeout
            self._fail(NetworkError(f"TLS handshake failed: {err}", address=str(self.address)))
            transport.abort()
            if not self.closed.done():
                self.closed.set_result(None)
            return
        if wrapped is None:
            return
        self.transport = wrapped
        self.codec.tls_started()
        out = self.codec.data_to_send()
        if out:
            wrapped.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by server"
        self._fail(NetworkError(reason, address=str(self.address)))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, err: VirtmanError) -> None:
        if self.error is None:
            self.error = err
        if self.on_lost is not None:
            self.on_lost()
        if not self.handshake.done():
            self.handshake.set_exception(err)
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(err)
        self.waiters.clear()


async def _open(
    address: NbdAddress,
    codec: ClientConnection,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> tuple[asyncio.Transport, _ClientProtocol]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if address.socket is not None:
                transport, protocol = await loop.create_unix_connection(
                    lambda: _ClientProtocol(codec, address, tls), address.socket
                )
            else:
                assert address.host is not None
                transport, protocol = await loop.create_connection(
                    lambda: _ClientProtocol(codec, address, tls), address.host, address.port
                )
    except TimeoutError as err:
        raise NetworkTimeout("connect", limit=timeout, address=str(address)) from err
    except OSError as err:
        raise NetworkError(f"cannot connect: {err.strerror or err}", address=str(address)) from err
    except UnicodeError as err:  # the resolver's IDNA codec refuses the host name
        raise NetworkError(f"cannot connect: host name refused: {err}",
                           address=excerpt(str(address))) from err
    return transport, protocol


async def _handshake(
    address: NbdAddress, transport: asyncio.Transport, protocol: _ClientProtocol, timeout: float
) -> HandshakeDone | ExportsListed:
    try:
        async with asyncio.timeout(timeout):
            return await protocol.handshake
    except TimeoutError as err:
        transport.abort()
        raise NetworkTimeout("handshake", limit=timeout, address=str(address)) from err
    except BaseException:
        transport.abort()
        raise


class NbdClient:
    """A connected client. Use ``NbdClient.connect``; close with ``close()``.

    Requests raise ``NbdRequestError`` when the server answers with an error,
    ``NetworkTimeout`` when no reply came within ``request_timeout`` (the connection stays
    up; a late reply is dropped), and ``NetworkError`` when the connection is gone.
    """

    def __init__(
        self,
        address: NbdAddress,
        transport: asyncio.Transport,
        protocol: _ClientProtocol,
        export: ExportInfo,
    ) -> None:
        self.address = address
        self.export = export
        self._transport = transport
        self._protocol = protocol
        self._codec = protocol.codec
        #: Seconds a request may wait for its reply (None: forever).
        self.request_timeout: float | None = None
        #: Seconds ``close()`` waits for the server to close its side after DISC.
        self.disconnect_wait = DISCONNECT_WAIT_SECONDS
        self.status = ClientStatus.READY
        #: The loop the connection lives on; requests use it rather than calling
        #: get_running_loop(), which costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        protocol.on_lost = self._lost
        if protocol.error is not None or transport.is_closing():
            self.status = ClientStatus.CLOSED  # lost between the handshake and here

    @classmethod
    async def connect(
        cls,
        target: str | NbdAddress,
        *,
        timeout: float = CONNECT_TIMEOUT_SECONDS,
        structured_replies: bool = True,
        block_status: bool = True,
        tls: TlsSetting = None,
    ) -> NbdClient:
        """Connect and run the handshake (with TLS when ``tls`` is given or the URI is
        ``nbds``: see the module docstring). ``timeout`` covers each of the connect and
        the whole handshake, TLS included."""
        address = parse_nbd_uri(target) if isinstance(target, str) else target
        context = tls_context_for(address, tls)
        codec = ClientConnection(
            address.export,
            structured_replies=structured_replies,
            block_status=block_status,
            tls=context is not None,
        )
        # Status CONNECTING lasts until here: the object exists once the export is known.
        transport, protocol = await _open(address, codec, timeout, context)
        done = await _handshake(address, transport, protocol, timeout)
        assert isinstance(done, HandshakeDone)
        # Over TLS the protocol's transport is the TLS one, not the socket's.
        assert protocol.transport is not None
        return cls(address, protocol.transport, protocol, done.export)

    # --- state ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def read_only(self) -> bool:
        return bool(self.export.flags & TransmissionFlag.READ_ONLY)

    @property
    def closed(self) -> bool:
        return self.status is ClientStatus.CLOSED

    @property
    def error(self) -> VirtmanError | None:
        """Why the connection broke, if it did."""
        return self._protocol.error

    def _lost(self) -> None:
        self.status = ClientStatus.CLOSED

    @property
    def in_flight(self) -> int:
        return len(self._protocol.waiters)

    # --- requests -------------------------------------------------------------------------

    async def _request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | None = None,
    ) -> ReplyReceived:
        # The timeout is a timer on the reply future, not asyncio.timeout(): callers may
        # run outside a task (the server steps device coroutines by hand).
        protocol = self._protocol
        if self.status is not ClientStatus.READY:
            raise protocol.error or NetworkError(
                f"{command.name} on a client that is {self.status.value}",
                address=str(self.address),
            )
        cookie, header = self._codec.request(command, offset, length, flags, data)
        waiter: asyncio.Future[ReplyReceived] = self._loop.create_future()
        protocol.waiters[cookie] = waiter
        if data is None:
            self._transport.write(header)
        else:
            self._transport.writelines((header, data))
        timer = None
        if self.request_timeout is not None:
            timer = self._loop.call_later(
                self.request_timeout, self._expire, cookie, waiter, command, offset, length
            )
        try:
            reply = await waiter
        finally:
            if timer is not None:
                timer.cancel()
        if reply.error:
            raise NbdRequestError(
                reply.message or f"server answered {errno_name(reply.error)}",
                errno=reply.error,
                command=command.name,
                offset=offset,
                length=length,
            )
        return reply

    def _expire(
        self,
        cookie: int,
        waiter: asyncio.Future[ReplyReceived],
        command: Command,
        offset: int,
        length: int,
    ) -> None:
        if not waiter.done():
            self._protocol.waiters.pop(cookie, None)
            waiter.set_exception(
                NetworkTimeout(
                    f"{command.name} offset={offset} length={length}",
                    limit=self.request_timeout or 0.0,
                    address=str(self.address),
                )
            )

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.export.block_sizes.maximum
        return [
            (pos, min(step, offset + length - pos)) for pos in range(offset, offset + length, step)
        ]

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.read_view(offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, offset: int, length: int) -> bytes | memoryview:
        """The bytes of a range without copying a large payload: it was received
        straight into an array of its own (``DIRECT_RECEIVE_MIN_BYTES``) and comes as a
        read-only view of it, which nothing else refers to."""
        if length <= self.export.block_sizes.maximum:
            return (await self._request(Command.READ, offset, length)).data
        parts = await asyncio.gather(
            *(self._request(Command.READ, o, n) for o, n in self._pieces(offset, length))
        )
        return b"".join(p.data for p in parts)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else 0
        view = memoryview(data)
        await asyncio.gather(
            *(
                self._request(Command.WRITE, o, n, flags, bytes(view[o - offset : o - offset + n]))
                for o, n in self._pieces(offset, len(data))
            )
        )

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(Command.WRITE_ZEROES, offset, length, CommandFlag.FUA if fua else 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(Command.TRIM, offset, length, CommandFlag.FUA if fua else 0)

    async def flush(self) -> None:
        await self._request(Command.FLUSH)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, flags) from ``offset``; they may cover less
        than ``length``. Without the context negotiated: one extent saying "data"."""
        if self._codec.base_allocation_id is None or not length:
            return [(length, 0)]
        reply = await self._request(Command.BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        return reply.extents or [(length, 0)]

    async def close(self) -> None:
        """Wait for requests in flight, send DISC and close. Idempotent."""
        protocol = self._protocol
        if self.status is ClientStatus.READY:
            self.status = ClientStatus.CLOSING
        if protocol.waiters and protocol.error is None:
            await asyncio.gather(*protocol.waiters.values(), return_exceptions=True)
        if protocol.error is None and not self._transport.is_closing():
            with contextlib.suppress(VirtmanError):  # DISC refused by the codec: just close
                _, header = self._codec.request(Command.DISC)
                self._transport.write(header)
            self._transport.close()
        else:
            self._transport.abort()
        try:
            async with asyncio.timeout(self.disconnect_wait):
                await protocol.closed
        except TimeoutError:
            self._transport.abort()  # the server did not close its side: drop ours
        self.status = ClientStatus.CLOSED

    def abort(self) -> None:
        """Drop the connection now; requests in flight fail with ``NetworkError``."""
        self._transport.abort()
        self.status = ClientStatus.CLOSED

    def on_close(self, callback: Callable[[NbdClient], object]) -> None:
        """Call ``callback(self)`` once the connection is gone, for whatever reason."""
        self._protocol.closed.add_done_callback(lambda _: callback(self))


async def list_exports(
    target: str | NbdAddress, *, timeout: float = CONNECT_TIMEOUT_SECONDS, tls: TlsSetting = None
) -> list[str]:
    """The export names a server lists (``NBD_OPT_LIST``)."""
    address = parse_nbd_uri(target) if isinstance(target, str) else target
    context = tls_context_for(address, tls)
    codec = ClientConnection(list_exports=True, tls=context is not None)
    transport, protocol = await _open(address, codec, timeout, context)
    done = await _handshake(address, transport, protocol, timeout)
    (protocol.transport or transport).close()
    assert isinstance(done, ExportsListed)
    return done.names
