"""asyncio NBD server: moves bytes between sockets and ``ServerConnection``.

Theory of operation
-------------------
Each accepted connection is an ``asyncio.Protocol``. Received bytes go into the pure
codec; each ``RequestReceived`` runs the device call and writes the reply when it
completes, so many requests run at once and replies leave in completion order.
Backpressure: when ``max_inflight`` requests are running, or the socket's write buffer
is full, the connection stops reading until that clears.

A request that completes without waiting (a page-cache hit on a file, a warm cache)
is answered before the next request is parsed, without creating a task: the device's
coroutine is stepped once by hand and only handed to a task if it suspends.

Lifecycle: ``CREATED → SERVING → STOPPING → STOPPED``. ``stop()`` closes the listeners,
lets every request in flight finish (up to a grace period), flushes every writable
export and closes the connections, so a write that was acknowledged is never lost.

Limits on clients (all named in ``limits.py``, all constructor arguments):

- ``max_connections``: connections held at once, in the handshake or past it. A client
  over the limit is closed as soon as it is accepted, before the greeting, and logged;
  clients already connected are served as before. Every connection is also taken from
  the process's ``ConnectionBudget`` (``nbd/budget.py``), shared by all the servers of a
  process and derived from its descriptor limit, so idle clients can never use up the
  descriptors the process needs to accept, open files and reach upstreams, however many
  servers it runs. The default per-server limit is the whole budget.
- ``handshake_timeout``: a client that has not chosen an export by then is closed
  (slowloris).
- ``idle_timeout``: a connection past its handshake with no request in flight for that
  long is closed, but only while the server holds at least ``idle_close_from`` of its
  connection limit. QEMU keeps one connection per drive for the VM's lifetime and does
  not survive it being closed (without ``reconnect-delay`` every later request fails with
  EIO), so a server with room never cuts a paused or quiet VM; one filling up with idle
  connections frees their slots.

Warm reads without Python copies: a READ of at least ``sendfile_min`` bytes (named limit
``SENDFILE_MIN_BYTES``) on a plaintext connection, from a device that can say where the
range lies in a file (``read_location``, see ``virtman.device.FileReads``: a cache whose
chunks are all ready), is answered with the reply header written to the socket and the
bytes sent from the file with ``os.sendfile``, so they never pass through a Python
object. A READ whose chunks are not all ready goes the same way once the device has
loaded and stored them (``read_or_locate``: a relay's cold read); chunks it could not
store come back as bytes and are sent buffered. Only when nothing else is queued on the
transport (``get_write_buffer_size() == 0``), since these writes bypass it: replies
never interleave. Whatever the socket does
not take at once is read from the file and queued on the transport as usual. A failure
once part of a reply is out closes the connection (an error reply would be read as
payload). TLS connections cannot use sendfile (the bytes are encrypted in the process)
and keep the buffered path, as do small reads and devices without files.

TLS (``tls=TlsFiles``): the codec runs in FORCEDTLS mode (every option before
STARTTLS is refused ``NBD_REP_ERR_TLS_REQD``). After the STARTTLS ACK is written the
connection stops reading, ``loop.start_tls`` wraps the transport as a server that
requires a client certificate signed by the CA (only hosts of the cluster read images),
and option haggling goes on over TLS. A client that fails the TLS handshake (no
certificate, one of another CA, a plaintext client that sent more bytes) is closed and
counted in ``stats.tls_refused``. The handshake timeout covers the TLS handshake too.

Warnings caused by a client (refused requests and options, protocol violations, failed
requests, refused connections, handshake and idle timeouts) go through one
``RateLimitedLog`` keyed by peer (TCP host, or Unix uid) and kind, so a client repeating
a mistake costs two log lines per interval, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno as os_errno
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from virtman.device import Device
from virtman.errors import (
    DeviceError,
    InvalidRequest,
    NbdRequestError,
    NotFound,
    PeerProtocolError,
    VirtmanError,
)
from virtman.limits import (
    HANDSHAKE_TIMEOUT_SECONDS,
    IDLE_CLOSE_FROM_FRACTION,
    IDLE_TIMEOUT_SECONDS,
    LOG_REPEAT_INTERVAL_SECONDS,
    MAX_CONNECTIONS_PER_SERVER,
    MAX_INFLIGHT_PER_CONNECTION,
    MAX_REQUEST_PAYLOAD,
    PREFERRED_BLOCK_SIZE,
    SENDFILE_MIN_BYTES,
    SHUTDOWN_GRACE_SECONDS,
    TLS_HANDSHAKE_TIMEOUT_SECONDS,
)
from virtman.nbd.budget import ConnectionBudget, process_budget
from virtman.nbd.sockets import set_socket_buffers
from virtman.protocol.nbd import (
    NEED_DATA,
    BlockSizes,
    ClientDisconnected,
    Command,
    Errno,
    ExportInfo,
    ExportSelected,
    OptionRefused,
    Request,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    TlsRequested,
    TransmissionFlag,
)
from virtman.protocol.nbd.constants import FUA_BIT
from virtman.ratelog import RateLimitedLog
from virtman.tlsconfig import TlsFiles, peer_name, server_context

log = logging.getLogger(__name__)

def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(name for log lines, key for rate limits) of a connection's peer.

    TCP: ``host:port`` and the host (a client reconnecting gets a new port). Unix: the
    peer's pid and uid from SO_PEERCRED, keyed by uid, since every Unix peer has the
    same address.
    """
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "SO_PEERCRED"):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "unix", "unix"
        pid, uid, _ = struct.unpack("3i", raw)
        return f"unix pid={pid} uid={uid}", f"unix uid={uid}"
    return "unix", "unix"


class ServerStatus(enum.Enum):
    CREATED = "created"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Export:
    """A device published under a name."""

    name: str
    device: Device
    description: str = ""
    #: Shown by ``NBD_OPT_LIST``. False for an export whose name is its only secret
    #: among clients the server admits (a migrating VM's disk: only its destination
    #: is told the name).
    listed: bool = True

    def info(self, max_payload: int) -> ExportInfo:
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        # Every connection to an export shares one device object in this process, so a
        # flush on any connection covers writes made on all of them: multi-conn is safe.
        flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.device.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_FUA
                | TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
            )
        sizes = BlockSizes(1, PREFERRED_BLOCK_SIZE, max_payload)
        return ExportInfo(self.name, self.device.size, flags, self.description, sizes)


@dataclass
class ServerStats:
    connections: int = 0  # admitted
    connections_refused: int = 0  # over max_connections
    handshake_timeouts: int = 0
    idle_closed: int = 0
    requests: int = 0
    refused: int = 0
    errors: int = 0
    bytes_read: int = 0  # payload sent in READ replies
    bytes_read_by_export: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    sendfile_replies: int = 0  # READ replies sent from a file with sendfile
    tls_sessions: int = 0  # TLS handshakes that succeeded
    tls_refused: int = 0  # TLS handshakes that failed (no or a foreign certificate, ...)


class NbdServer:
    """Serves a set of exports over any number of Unix and TCP listeners.

    ``default_export`` is what a client gets when it asks for the empty name (QEMU and
    ``nbd://host`` URIs without a path do); by default the only export, if there is one.
    ``budget`` is the connection count shared with the process's other servers (None:
    the process's, ``process_budget()``); ``max_connections=None`` lets this server use
    all of it. ``idle_timeout=None`` never closes idle connections.
    ``tls`` makes TLS with a client certificate signed by ``tls.ca`` mandatory on every
    listener (ConfigError at once if the files do not load).
    """

    def __init__(
        self,
        exports: Mapping[str, Device] | list[Export],
        *,
        default_export: str | None = None,
        max_payload: int = MAX_REQUEST_PAYLOAD,
        max_inflight: int = MAX_INFLIGHT_PER_CONNECTION,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
        shutdown_grace: float = SHUTDOWN_GRACE_SECONDS,
        max_connections: int | None = MAX_CONNECTIONS_PER_SERVER,
        budget: ConnectionBudget | None = None,
        idle_timeout: float | None = IDLE_TIMEOUT_SECONDS,
        idle_close_from: float = IDLE_CLOSE_FROM_FRACTION,
        log_interval: float = LOG_REPEAT_INTERVAL_SECONDS,
        tls: TlsFiles | None = None,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS,
        sendfile_min: int | None = SENDFILE_MIN_BYTES,
    ) -> None:
        self.tls = tls
        #: READ replies of at least this many bytes may go out with sendfile (None: never).
        self.sendfile_min = sendfile_min
        self.tls_context: ssl.SSLContext | None = server_context(tls) if tls else None
        self.tls_handshake_timeout = tls_handshake_timeout
        if isinstance(exports, Mapping):
            items = [Export(name, dev) for name, dev in exports.items()]
        else:
            items = list(exports)
        self.exports: dict[str, Export] = {e.name: e for e in items}
        if default_export is None and len(self.exports) == 1:
            default_export = next(iter(self.exports))
        self.default_export = default_export
        self.max_payload = max_payload
        self.max_inflight = max_inflight
        self.handshake_timeout = handshake_timeout
        self.shutdown_grace = shutdown_grace
        self.budget = process_budget() if budget is None else budget
        self.max_connections = (
            self.budget.limit if max_connections is None else max_connections
        )
        self.idle_timeout = idle_timeout
        self.idle_close_from = idle_close_from
        #: Every warning a client can cause goes through here (see the module docstring).
        self.ratelog = RateLimitedLog(log, interval=log_interval, schedule=_call_later)
        self.status = ServerStatus.CREATED
        self.stats = ServerStats()
        #: Called with every request a client sends (recording boot traces).
        self.recorder: Callable[[Request], None] | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._unix_paths: list[str] = []
        self._stopped = asyncio.Event()

    # --- exports --------------------------------------------------------------------------

    def add_export(self, export: Export) -> None:
        """Publish a device; new connections see it at once."""
        self.exports[export.name] = export

    def remove_export(self, name: str) -> Export | None:
        """Unpublish; connections already using it keep it until they close."""
        return self.exports.pop(name, None)

    def exports_bytes_sent(self) -> dict[str, int]:
        """READ payload sent per export name since the server started."""
        return dict(self.stats.bytes_read_by_export)

    def _lookup(self, name: str) -> ExportInfo | None:
        if (
            name == ""
            and self.default_export is not None
            and self.default_export not in self.exports
        ):
            return None
        export = self.exports.get(
            name if name or self.default_export is None else self.default_export
        )
        if export is None:
            return None
        return export.info(self.max_payload)

    def _names(self) -> list[str]:
        return sorted(name for name, export in self.exports.items() if export.listed)

    # --- connections ----------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def requests_in_flight(self) -> int:
        """Requests received on open connections and not answered yet (read when
        metrics are scraped; the request path keeps this count anyway)."""
        return sum(c.inflight for c in self._connections)

    def crowded(self) -> bool:
        """Whether idle connections are closed now (see ``idle_timeout``)."""
        # Crowded when this server, or all of the process's servers together, hold at
        # least the fraction of their limit: idle clients of one server must not keep a
        # new VM's QEMU from connecting to another.
        return (
            len(self._connections) >= self.idle_close_from * self.max_connections
            or self.budget.held >= self.idle_close_from * self.budget.limit
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def listen_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), path)
        self._unix_paths.append(path)
        self._started(server, f"unix:{path}")

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; return the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        bound = int(server.sockets[0].getsockname()[1])
        self._started(server, f"tcp:{host}:{bound}")
        return bound

    def _started(self, server: asyncio.AbstractServer, where: str) -> None:
        self._servers.append(server)
        self.status = ServerStatus.SERVING
        log.info(
            "nbd server listening on %s%s, exports %s (at most %d connections)",
            where,
            " with TLS and client certificates" if self.tls_context else "",
            ", ".join(self._names()),
            self.max_connections,
        )

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, finish requests in flight, flush, close. Idempotent."""
        if self.status in (ServerStatus.STOPPING, ServerStatus.STOPPED):
            await self._stopped.wait()
            return
        self.status = ServerStatus.STOPPING
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.drain()
        if conns:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(c.finished.wait()) for c in conns],
                timeout=self.shutdown_grace,
            )
            for fut in pending:
                fut.cancel()
        for conn in list(self._connections):
            conn.abort_now()
        for export in self.exports.values():
            if not export.device.read_only:
                try:
                    await export.device.flush()
                except VirtmanError as err:
                    log.error("flush of export %r at shutdown failed: %s", export.name, err)
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.ratelog.flush()
        self.status = ServerStatus.STOPPED
        self._stopped.set()
        log.info("nbd server stopped")

    def replace_device(self, export: str, device: Device) -> Device:
        """Serve ``device`` under ``export`` from the next request on; return the old one.

        Requests already running finish on the old device. Raises ``NotFound`` when
        there is no such export, and ``InvalidRequest`` when the sizes differ (clients
        have been told the size).
        """
        current = self.exports.get(export)
        if current is None:
            raise NotFound(f"no export named {export!r}")
        if device.size != current.device.size:
            raise InvalidRequest(
                f"export {export!r} is {current.device.size} bytes; "
                f"a replacement of {device.size} bytes would change it under its clients",
                errno=Errno.EINVAL,
            )
        old = current.device
        current.device = device
        return old

    async def settle(self, export: str) -> None:
        """Return once every request already running on ``export`` has finished.

        After ``replace_device`` a request that started earlier may still be working on
        the old device (a copy-on-write waiting for its base); whoever needs to know
        everything the old device took waits here. Requests that start meanwhile are
        not waited for."""
        running = [
            task
            for conn in self._connections
            if conn.export is not None and conn.export.name == export
            for task in conn.tasks
        ]
        if running:
            await asyncio.wait(running)


def _call_later(delay: float, callback: Callable[[], None]) -> None:
    # The rate-limited log is only written from callbacks of the running loop.
    asyncio.get_running_loop().call_later(delay, callback)


def _pread_exact(fd: int, length: int, pos: int) -> bytes:
    data = os.pread(fd, length, pos)
    if len(data) != length:
        raise DeviceError(f"short read of {len(data)} of {length} bytes at {pos} of the file "
                          "a reply is sent from", errno=Errno.EIO)
    return data


def _kind(request: Request) -> str:
    """A bounded name for a request's command (unknown numbers share one)."""
    try:
        return Command(request.command).name
    except ValueError:
        return "unknown command"


#: Commands whose failure, unless the request itself was invalid, is always EIO.
_NO_CALLER_FAULT = frozenset({Command.READ, Command.BLOCK_STATUS, Command.CACHE})


def _errno_of(err: BaseException) -> int:
    if isinstance(err, (InvalidRequest, DeviceError, NbdRequestError)):
        return int(err.errno) or Errno.EIO
    if isinstance(err, OSError):
        if err.errno in (os_errno.ENOSPC, os_errno.EDQUOT, os_errno.EFBIG):
            return Errno.ENOSPC
        if err.errno in (os_errno.EPERM, os_errno.EACCES, os_errno.EROFS):
            return Errno.EPERM
    return Errno.EIO


class _Step:
    """Continue, inside a task, a coroutine that was stepped once by hand and suspended.

    The first ``send(None)`` already ran it to its first await, which yielded the future
    it waits on; this yields that same future to the task, then delegates the rest.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, None, None]:
        coro = self._coro
        try:
            yield self._first
        except BaseException as exc:  # cancellation goes to the coroutine, as in a task
            try:
                nxt = coro.throw(exc)
            except StopIteration:
                return
            yield from _Step(coro, nxt).__await__()
            return
        yield from coro.__await__()


async def _finish(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Step(coro, first)


class _Connection(asyncio.Protocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.codec = ServerConnection(
            server._lookup, server._names, tls=server.tls_context is not None
        )
        self.transport: asyncio.Transport | None = None
        #: The common name of the client's verified certificate, once TLS is up.
        self.peer_name: str | None = None
        self._tls_starting = False  # STARTTLS acknowledged, TLS handshake running
        self.peer = "?"
        self.peer_key = "?"
        self.export: Export | None = None
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self._reading_paused = False
        self._writing_paused = False
        self._draining = False  # no new requests: DISC received or server stopping
        self._closed = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        #: The socket's descriptor while replies may be sent with sendfile (plaintext).
        self._sendfile_fd: int | None = None
        #: Loop time the last request was answered (for ``idle_timeout``; a request in
        #: flight is seen by ``inflight``, so its start needs no timestamp).
        self._active_at = 0.0
        #: Whether this connection holds a slot of the server's budget.
        self._holds_slot = False

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        self.peer, self.peer_key = _peer_of(transport)
        if server.status is not ServerStatus.SERVING:
            self._refuse()
            return
        if len(server._connections) >= server.max_connections:
            server.stats.connections_refused += 1
            server.ratelog.warning(
                self.peer_key,
                "connection over the limit",
                "nbd server at its limit of %d connections: refused %s",
                server.max_connections,
                self.peer,
            )
            self._refuse()
            return
        if not server.budget.take():
            server.stats.connections_refused += 1
            server.ratelog.warning(
                self.peer_key,
                "connection over the process limit",
                "nbd servers of this process at their limit of %d connections together: "
                "refused %s",
                server.budget.limit,
                self.peer,
            )
            self._refuse()
            return
        self._holds_slot = True
        server._connections.add(self)
        server.stats.connections += 1
        set_socket_buffers(transport)
        sock = transport.get_extra_info("socket")
        if server.sendfile_min is not None and server.tls_context is None and sock is not None:
            self._sendfile_fd = sock.fileno()
        self.transport.write(self.codec.initiate())
        self._handshake_timer = self._loop.call_later(
            server.handshake_timeout, self._handshake_expired
        )

    def _release(self) -> None:
        """Give this connection's slots back (once: an idle close frees them before the
        loop reports the connection lost)."""
        self.server._connections.discard(self)
        if self._holds_slot:
            self._holds_slot = False
            self.server.budget.give_back()

    def _refuse(self) -> None:
        assert self.transport is not None
        self.transport.abort()
        self._closed = True
        self.finished.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._release()
        if not self.tasks:
            self.finished.set()

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self._process()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._process()

    def eof_received(self) -> bool | None:
        self._draining = True
        self._maybe_close()
        # Keep the transport open until replies in flight are written. TLS has no half
        # close (the TLS layer closes the transport whatever we answer, and warns if
        # asked to keep it).
        return not self.codec.tls_active

    # --- request flow ---------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        if self.export is None and self.transport is not None:
            self.server.stats.handshake_timeouts += 1
            self.server.ratelog.warning(
                self.peer_key,
                "handshake timeout",
                "nbd client %s did not finish the handshake in %.0f s; closing",
                self.peer,
                self.server.handshake_timeout,
            )
            self.transport.abort()

    def _idle_check(self) -> None:
        self._idle_timer = None
        server = self.server
        timeout = server.idle_timeout
        if timeout is None or self._closed or self._draining:
            return
        wait = timeout
        if self.inflight == 0 and not self.tasks:
            idle_for = self._loop.time() - self._active_at
            if idle_for < timeout:
                wait = timeout - idle_for
            elif server.crowded():
                server.stats.idle_closed += 1
                server.ratelog.log(
                    logging.INFO,
                    self.peer_key,
                    "idle connection closed",
                    "nbd client %s sent no request for %.0f s, with %d of %d connections "
                    "taken; closing it",
                    self.peer,
                    idle_for,
                    len(server._connections),
                    server.max_connections,
                )
                self.drain()
                # Free the slot now, not when the loop reports the close: another idle
                # check due in this same turn must see that the server has room again.
                self._release()
                return
        self._idle_timer = self._loop.call_later(wait, self._idle_check)

    def _process(self) -> None:
        codec = self.codec
        transport = self.transport
        if transport is None or self._closed or self._tls_starting:
            return
        while (
            not self._draining
            and self.inflight < self.server.max_inflight
            and not self._writing_paused
        ):
            try:
                event = codec.next_event()
            except PeerProtocolError as err:
                self.server.ratelog.warning(
                    self.peer_key,
                    "protocol violation",
                    "nbd client %s broke the protocol: %s; closing",
                    self.peer,
                    err,
                )
                out = codec.data_to_send()
                if out:
                    transport.write(out)
                transport.close()
                self._closed = True
                return
            if event is NEED_DATA:
                break
            if isinstance(event, RequestReceived):
                self._dispatch(event.request)
            elif isinstance(event, RequestRefused):
                self.server.stats.refused += 1
                self.server.ratelog.warning(
                    self.peer_key,
                    f"refused {_kind(event.request)}",
                    "nbd client %s: refused %s: %s (%s)",
                    self.peer,
                    event.request.name,
                    event.reason,
                    event.errno.name,
                )
            elif isinstance(event, OptionRefused):
                self.server.ratelog.warning(
                    self.peer_key,
                    "option refused",
                    "nbd client %s: option refused: %s (%s)",
                    self.peer,
                    event.reason,
                    event.reply.name,
                )
            elif isinstance(event, ExportSelected):
                self.export = self.server.exports.get(event.export.name) or self.server.exports.get(
                    self.server.default_export or ""
                )
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                if self.server.idle_timeout is not None:
                    self._active_at = self._loop.time()
                    self._idle_timer = self._loop.call_later(
                        self.server.idle_timeout, self._idle_check
                    )
                log.debug("nbd client %s attached to %r", self.peer, event.export.name)
            elif isinstance(event, ClientDisconnected):
                self._draining = True
            elif isinstance(event, TlsRequested):
                self._begin_tls(transport)
                return
        out = codec.data_to_send()
        if out:
            transport.write(out)
        self._update_reading()
        self._maybe_close()

    def _begin_tls(self, transport: asyncio.Transport) -> None:
        """Send the STARTTLS ACK, stop reading plaintext and start the TLS handshake."""
        transport.write(self.codec.data_to_send())
        # Nothing more may be read in plaintext: start_tls takes the transport over from
        # a task, and bytes read before it would be parsed as if they came over TLS.
        if not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        self._tls_starting = True
        task = self._loop.create_task(self._start_tls(transport))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        server = self.server
        assert server.tls_context is not None
        try:
            wrapped = await self._loop.start_tls(
                transport,
                self,
                server.tls_context,
                server_side=True,
                ssl_handshake_timeout=server.tls_handshake_timeout,
            )
        except (OSError, RuntimeError) as err:  # ssl.SSLError, resets, handshake timeout
            server.stats.tls_refused += 1
            server.ratelog.warning(
                self.peer_key,
                "TLS handshake failed",
                "nbd client %s: TLS handshake failed: %s; closing",
                self.peer,
                err,
            )
            transport.abort()
            # The TLS layer owned the transport: our connection_lost will not be called.
            self.connection_lost(None)
            return
        if wrapped is None or self._closed:
            return
        self.transport = wrapped
        self._tls_starting = False
        # start_tls resumed reading on the raw transport; the TLS transport reads.
        self._reading_paused = False
        self.peer_name = peer_name(wrapped.get_extra_info("ssl_object"))
        server.stats.tls_sessions += 1
        log.debug("nbd client %s: TLS up, certificate %r", self.peer, self.peer_name)
        self.codec.tls_started()
        self._process()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._closed or self._tls_starting:
            return
        want_pause = self.inflight >= self.server.max_inflight or self._writing_paused
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _dispatch(self, request: Request) -> None:
        self.server.stats.requests += 1
        if self.server.recorder is not None:
            self.server.recorder(request)
        self.inflight += 1
        coro = self._run(request)
        try:
            first = coro.send(None)
        except StopIteration:
            return  # finished without waiting: already answered
        except BaseException:
            coro.close()
            raise
        # self._loop, not get_running_loop(): that costs a getpid() system call per call.
        task = self._loop.create_task(_finish(coro, first))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("nbd request task failed", exc_info=task.exception())
        self._process()
        if self._closed and not self.tasks:
            self.finished.set()

    async def _run(self, request: Request) -> None:
        try:
            payload, header = await self._execute(request)
        except asyncio.CancelledError:
            self.inflight -= 1
            raise
        except Exception as err:
            # Every request gets an answer: an error that is not ours to expect is still
            # answered (EIO) and logged with its traceback by _reply_error.
            self.inflight -= 1
            self._active_at = self._loop.time()
            self._reply_error(request, err)
            return
        self.inflight -= 1
        self._active_at = self._loop.time()
        transport = self.transport
        if transport is None or self._closed:
            return
        if payload is not None:
            transport.writelines((header, payload))
        elif header:  # empty: already sent (sendfile)
            transport.write(header)
        if self.inflight == self.server.max_inflight - 1 or self._reading_paused:
            self._update_reading()

    async def _execute(self, request: Request) -> tuple[bytes | None, bytes]:
        export = self.export
        assert export is not None
        device = export.device
        command = request.command
        fua = bool(request.flags & FUA_BIT)
        if command == Command.READ:
            # Small reads (most of a VM's) pay one comparison; getattr, not
            # isinstance(FileReads): a runtime protocol check costs ~15 us.
            if (
                self._sendfile_fd is not None
                and request.length >= (self.server.sendfile_min or 0)
                and (locate := getattr(device, "read_location", None)) is not None
            ):
                if self._send_from_file(request, locate):
                    self._count_read(export.name, request.length)
                    return None, b""
                load = getattr(device, "read_or_locate", None)
                if load is not None:
                    data = await self._load_and_send(request, load)
                    if data is None:
                        self._count_read(export.name, request.length)
                        return None, b""
                else:
                    data = await device.read(request.offset, request.length)
            else:
                data = await device.read(request.offset, request.length)
            stats = self.server.stats
            stats.bytes_read += len(data)
            stats.bytes_read_by_export[export.name] = stats.bytes_read_by_export.get(
                export.name, 0
            ) + len(data)
            return data, self.codec.reply(request, data)
        if command == Command.WRITE:
            await device.write(request.offset, request.data, fua=fua)
            self.server.stats.bytes_written += len(request.data)
        elif command == Command.FLUSH:
            await device.flush()
        elif command == Command.WRITE_ZEROES:
            await device.write_zeroes(request.offset, request.length, fua=fua)
        elif command == Command.TRIM:
            await device.trim(request.offset, request.length, fua=fua)
        elif command == Command.CACHE:
            pass  # a hint; answering it is enough
        elif command == Command.BLOCK_STATUS:
            if not request.length:
                raise InvalidRequest("BLOCK_STATUS of zero length", errno=Errno.EINVAL)
            extents = await device.block_status(request.offset, request.length)
            return None, self.codec.block_status_reply(request, extents)
        else:
            raise InvalidRequest(f"{request.name} is not supported", errno=Errno.EINVAL)
        return None, self.codec.reply(request)

    def _count_read(self, export: str, nbytes: int) -> None:
        stats = self.server.stats
        stats.bytes_read += nbytes
        stats.bytes_read_by_export[export] = stats.bytes_read_by_export.get(export, 0) + nbytes

    def _can_send_from_file(self) -> bool:
        transport = self.transport
        # A closing transport may have closed its socket already, and the descriptor's
        # number may belong to another file by now: never write to it then.
        return not (
            transport is None
            or self._sendfile_fd is None
            or self._closed
            or transport.is_closing()
            or transport.get_write_buffer_size()  # queued replies go first
        )

    def _send_from_file(
        self, request: Request, locate: Callable[[int, int], tuple[int, int] | None]
    ) -> bool:
        """Answer a READ from the file holding its bytes (see the module docstring);
        False, with nothing sent, when it cannot be (the caller reads as usual)."""
        if not self._can_send_from_file():
            return False
        where = locate(request.offset, request.length)
        if where is None:
            return False
        self._send_at(request, *where)
        return True

    async def _load_and_send(
        self,
        request: Request,
        load: Callable[[int, int], Coroutine[Any, Any, bytes | tuple[int, int]]],
    ) -> bytes | None:
        """A READ the device must load first (a cold read of a cache): once loaded, sent
        from the file it was stored in, like a warm one (None: sent); its bytes when the
        device kept them only in memory (passed through), or when the connection cannot
        take a sendfile now (read from the file, before yielding, and sent as usual)."""
        got = await load(request.offset, request.length)
        if not isinstance(got, tuple):
            return got
        fd, pos = got
        if self._can_send_from_file():
            self._send_at(request, fd, pos)
            return None
        return _pread_exact(fd, request.length, pos)

    def _send_at(self, request: Request, fd: int, pos: int) -> None:
        """Send a READ's reply header, then its bytes from ``fd`` at ``pos``; the caller
        checked ``_can_send_from_file``."""
        transport = self.transport
        sock_fd = self._sendfile_fd
        assert transport is not None and sock_fd is not None
        header = self.codec.read_reply_header(request)
        length = request.length
        try:
            wrote = os.write(sock_fd, header)
        except OSError:  # full (EAGAIN), or going: the transport finds out and says so
            wrote = 0
        try:
            if wrote < len(header):
                # Queue the rest of the header and the bytes, in order.
                transport.writelines((header[wrote:], _pread_exact(fd, length, pos)))
                return
            sent = 0
            try:
                while sent < length:
                    n = os.sendfile(sock_fd, fd, pos + sent, length - sent)
                    if n == 0:
                        break  # the file ends early: pread below says so
                    sent += n
            except BlockingIOError:
                pass  # the socket is full: the rest is queued below
            except OSError as err:
                if err.errno not in (os_errno.EINVAL, os_errno.ENOSYS, os_errno.EOPNOTSUPP):
                    raise
                self._sendfile_fd = None  # sendfile cannot work here: not on this connection
            if sent == length:
                self.server.stats.sendfile_replies += 1
            else:
                transport.write(_pread_exact(fd, length - sent, pos + sent))
        except Exception as err:
            # Part of the reply may be out: an error reply now would be read as payload.
            # The client sees the connection drop, and reconnects or fails the request.
            self.server.stats.errors += 1
            self.server.ratelog.warning(
                self.peer_key, "READ from file failed",
                "nbd %s READ offset=%d length=%d: sending from the file failed (%s); "
                "closing the connection", self.peer, request.offset, length, err)
            transport.abort()

    def _reply_error(self, request: Request, err: Exception) -> None:
        errno = _errno_of(err)
        if request.command in _NO_CALLER_FAULT and not isinstance(err, InvalidRequest):
            errno = Errno.EIO  # a failed read is never "no space" or "not permitted"
        self.server.stats.errors += 1
        name = self.export.name if self.export else "?"
        ratelog = self.server.ratelog
        if isinstance(err, VirtmanError):
            ratelog.warning(
                self.peer_key,
                f"{_kind(request)} failed",
                "nbd %s %s offset=%d length=%d on %r failed: %s",
                self.peer,
                request.name,
                request.offset,
                request.length,
                name,
                err,
            )
        else:
            ratelog.error(
                self.peer_key,
                "unexpected error",
                "nbd %s %s offset=%d length=%d on %r failed unexpectedly",
                self.peer,
                request.name,
                request.offset,
                request.length,
                name,
                exc_info=err,
            )
        if self.transport is not None and not self._closed:
            self.transport.write(self.codec.error_reply(request, errno, str(err)))

    # --- shutdown -------------------------------------------------------------------------

    def drain(self) -> None:
        """Take no new requests; close once those in flight are answered."""
        self._draining = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._draining and self.inflight == 0 and not self.tasks and not self._closed:
            if self.transport is not None:
                self.transport.close()
            self._closed = True
            self.finished.set()

    def abort_now(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.transport is not None and not self._closed:
            self.transport.abort()
        self._closed = True
        self.finished.set()
