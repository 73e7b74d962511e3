"""HTTP plumbing shared by Volt, the agents and the CLI: serving and calling.

Services run uvicorn inside virtman's own event loop (so NBD servers and HTTP share
it) on a socket bound beforehand, which makes port 0 usable and the port known.
Calls go through ``ApiClient``, which turns every transport or HTTP error into a
``NetworkError`` or ``ApiError`` carrying the service's own ``detail`` message.

What a caller sends is bounded at this boundary, for every app that
``install_error_handlers`` is given (``HttpLimits``):

- A request body over ``max_body_bytes`` is answered 413 before it is parsed: at once
  when its Content-Length says so, or as soon as a chunked body passes the limit (the
  body is read into memory only up to the limit, then handed to the app whole). Routes
  that stream their body (an agent's VM import) are named by path and get their own,
  much larger limit, counted as the app reads.
- An error never echoes a caller's input whole: pydantic's validation errors (whose
  ``input`` is what was sent) and virtman's own messages quote a bounded prefix and its
  size, and an answer lists a bounded number of errors.

HTTPS: an ``HttpService`` given ``TlsFiles`` serves TLS with the cluster's certificate
and asks every client for a certificate without requiring one (browsers and the CLI
have none and use tokens). A certificate the CA verified is named (its common name) in
each request's scope, under ``PEER_CERT_NAME`` in ``scope["state"]``, for
``virtman.auth`` to identify agents by. ``ApiClient`` verifies the service against the
CA (host names checked), presents its own certificate when it has one and sends its
token as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import signal
import socket
import ssl
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from virtman.errors import (
    ApiError,
    ConfigError,
    Conflict,
    DeviceError,
    Forbidden,
    InvalidRequest,
    LifecycleError,
    NetworkError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    VirtmanError,
    excerpt,
)
from virtman.limits import (
    HTTP_TIMEOUT_SECONDS,
    MAX_ERROR_DETAIL_CHARS,
    MAX_ERROR_INPUT_CHARS,
    MAX_ERROR_ITEMS,
    MAX_HTTP_BODY_BYTES,
    MAX_STREAM_BODY_BYTES,
)
from virtman.tlsconfig import TlsFiles, client_context, peer_name, server_context

log = logging.getLogger(__name__)


class Problem(BaseModel):
    detail: str


#: The error answers every route may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
    409: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem},
    500: {"model": Problem}, 502: {"model": Problem}}

_STATUS = ((Unauthorized, 401), (Forbidden, 403), (NotFound, 404), (Conflict, 409),
           (PayloadTooLarge, 413), (ConfigError, 422), (InvalidRequest, 422),
           (DeviceError, 500), (LifecycleError, 503))


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP service accepts from a caller and echoes back (``limits.py``)."""

    max_body_bytes: int = MAX_HTTP_BODY_BYTES
    max_stream_body_bytes: int = MAX_STREAM_BODY_BYTES
    max_error_input_chars: int = MAX_ERROR_INPUT_CHARS
    max_error_detail_chars: int = MAX_ERROR_DETAIL_CHARS
    max_error_items: int = MAX_ERROR_ITEMS


def install_error_handlers(
    app: FastAPI, limits: HttpLimits | None = None, *, streamed: Collection[str] = ()
) -> None:
    """Bound what ``app`` accepts and echoes, and translate virtman's errors into HTTP
    answers whose ``detail`` says what is wrong.

    ``streamed``: paths whose handlers read the body as a stream (no JSON model); their
    body is not held in memory and is capped at ``limits.max_stream_body_bytes``.
    """
    lim = limits if limits is not None else HttpLimits()

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 502)
        detail = excerpt(str(exc), lim.max_error_detail_chars)
        return JSONResponse(status_code=status, content={"detail": detail})

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(status_code=422, content={"detail": bounded_errors(exc.errors(), lim)})

    app.add_exception_handler(VirtmanError, handle)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_middleware(
        BodyLimit,
        max_bytes=lim.max_body_bytes,
        streamed={path: lim.max_stream_body_bytes for path in streamed},
        quote_chars=lim.max_error_input_chars,
    )


def bounded_errors(errors: Any, limits: HttpLimits) -> list[dict[str, Any]]:
    """pydantic's validation errors with every string a caller sent quoted as a bounded
    prefix: ``input``, ``msg`` (a validator may quote its input), ``loc`` (a dict key
    is input too) and ``ctx``; at most ``limits.max_error_items`` of them, then a count."""
    n = limits.max_error_input_chars
    out: list[dict[str, Any]] = []
    for item in list(errors)[: limits.max_error_items]:
        entry: dict[str, Any] = {
            "type": str(item.get("type", "")),
            "loc": [x if isinstance(x, int) else excerpt(str(x), n) for x in item.get("loc", ())],
            "msg": excerpt(str(item.get("msg", "")), limits.max_error_detail_chars),
        }
        if "input" in item:
            entry["input"] = _bounded_value(item["input"], n)
        if item.get("ctx"):
            entry["ctx"] = {str(k): _bounded_value(v, n) for k, v in item["ctx"].items()}
        out.append(entry)
    more = len(errors) - len(out)
    if more > 0:
        out.append({"type": "too_many_errors", "loc": [], "msg": f"{more} more errors not shown"})
    return out


def _bounded_value(value: Any, limit: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return excerpt(value, limit)
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return excerpt(text, limit)


class BodyLimit:
    """ASGI middleware: a request body over its limit is answered 413 before the app
    parses it, and the service goes on serving.

    A body within the limit is read whole and handed to the app as one message, so the
    count covers a chunked body as well as a declared one. Paths in ``streamed`` are
    counted as the app reads them instead, against their own limit.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, streamed: Mapping[str, int], quote_chars: int
    ) -> None:
        self.app = app
        self.quote_chars = quote_chars
        self.max_bytes = max_bytes
        self.streamed = dict(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        what = f"{scope['method']} {excerpt(scope['path'], self.quote_chars)}"
        stream_limit = self.streamed.get(scope["path"])
        limit = self.max_bytes if stream_limit is None else stream_limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, PayloadTooLarge(what, limit=limit, size=declared))
            return
        if stream_limit is not None:
            await self._stream(scope, receive, send, what, limit)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was whole: nothing to serve
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await _refuse(send, PayloadTooLarge(what, limit=limit, size=None))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return whole
            return await receive()  # only a disconnect is left to come

        await self.app(scope, replay, send)

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, what: str, limit: int
    ) -> None:
        total = 0
        started = False

        async def counted() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise PayloadTooLarge(what, limit=limit, size=None)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except PayloadTooLarge as err:  # the app let it through instead of answering it
            if started:
                raise
            await _refuse(send, err)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we see it
    return None


async def _refuse(send: Send, err: PayloadTooLarge) -> None:
    log.debug("refused: %s", err)
    await json_refusal(send, 413, str(err))


async def json_refusal(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer an ASGI request with ``{"detail": ...}`` from a middleware, before the app."""
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise NetworkError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock.setblocking(False)
    return sock


#: Key in an HTTP request's ``scope["state"]``: the common name of the client
#: certificate the service's CA verified on this connection (absent without one).
PEER_CERT_NAME = "virtman.peer_cert_name"


class _PeerNamingH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, telling each request of a TLS connection whose
    verified certificate the client presented. uvicorn hands a copy of ``app_state`` to
    every request as ``scope["state"]``; a connection gets its own copy with the name
    (the handshake is over when ``connection_made`` runs)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        name = peer_name(transport.get_extra_info("ssl_object"))
        if name is not None:
            self.app_state = {**self.app_state, PEER_CERT_NAME: name}


def https_context(files: TlsFiles) -> ssl.SSLContext:
    """The server side of HTTPS: the host's certificate; a client certificate is asked
    for and verified when sent, not required (browsers and the CLI use tokens)."""
    context = server_context(files, require_client_cert=False)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def ca_context(ca: str) -> ssl.SSLContext:
    """A client context that verifies servers against ``ca`` and presents no certificate
    (the CLI, which identifies itself by a token). ``ConfigError`` if it does not load."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"TLS CA file {ca!r} does not load: {err}") from err
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (virtman's commands stop it themselves),
    and with an event for "listening", which uvicorn only offers as a flag."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


class ServiceState(enum.Enum):
    """An ``HttpService``'s lifecycle: each state is entered once, in this order
    (NEW may go straight to STOPPED when it is stopped before it ran)."""

    NEW = "new"
    STARTING = "starting"  # the app's startup runs; the socket does not answer yet
    RUNNING = "running"  # answering requests
    STOPPING = "stopping"  # finishing requests in flight, accepting none
    STOPPED = "stopped"


class HttpService:
    """A FastAPI app served by uvicorn on a bound socket.

    ``run()`` serves until ``stop()`` (the commands' main loop); ``start()`` returns once
    the service answers and ``close()`` stops it and waits (tests, embedding). A service
    runs once: ``start``/``run`` in any state but NEW raise ``LifecycleError``, and so
    does a startup that fails (the app's own error is logged by uvicorn).
    """

    def __init__(self, app: FastAPI, sock: socket.socket, *, tls: TlsFiles | None = None) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.host = str(sock.getsockname()[0])
        self.tls = tls
        context = https_context(tls) if tls is not None else None  # ConfigError: now, not later
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=5,
            http=_PeerNamingH11Protocol,
            ssl_context_factory=(lambda _config, _default: context) if context else None,
        )
        self.server = _Server(config)
        self.state = ServiceState.NEW
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    def _fail(self, action: str, reason: str = "") -> LifecycleError:
        return LifecycleError(
            f"http service {self.url}", action, self.state.value, reason=reason
        )

    async def start(self) -> None:
        """Serve in a task of this loop; return once requests are answered.

        Raises ``LifecycleError`` if the service ran before or its startup failed.
        """
        if self.state is not ServiceState.NEW:
            raise self._fail("start")
        self.state = ServiceState.STARTING
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"http service {self.url}"
        )
        listening = asyncio.ensure_future(self.server.listening.wait())
        try:
            await asyncio.wait((self._task, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
        if self._task.done():
            await self._task  # raises the startup failure
        elif self.state is ServiceState.STARTING:
            self.state = ServiceState.RUNNING

    async def run(self) -> None:
        """Serve until ``stop()``; raises ``LifecycleError`` as ``start`` does."""
        await self.start()
        assert self._task is not None
        await self._task

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        except SystemExit as err:  # uvicorn's way to say the app's startup failed
            failure = self._fail("start", f"the application's startup failed (exit {err.code})")
            raise failure from None
        finally:
            self.sock.close()  # uvicorn closes it only after a startup that succeeded
            self.state = ServiceState.STOPPED

    async def run_until_signalled(self, banner: str) -> int:
        """Serve until SIGTERM or SIGINT, then stop cleanly (the commands' main loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        print(f"{banner} serving on {self.url}", flush=True)
        assert self._task is not None
        await self._task
        return 0

    def stop(self) -> None:
        """Ask the service to stop (safe from a signal handler, and more than once)."""
        if self.state is ServiceState.NEW:
            self.state = ServiceState.STOPPED
            self.sock.close()
        elif self.state in (ServiceState.STARTING, ServiceState.RUNNING):
            self.state = ServiceState.STOPPING
            self.server.should_exit = True

    async def close(self) -> None:
        """Stop and wait until the service has stopped (its shutdown included)."""
        self.stop()
        if self._task is not None:
            await self._task


@dataclass(frozen=True)
class Credentials:
    """What a caller presents to virtman services: a token (``Authorization: Bearer``),
    and for HTTPS either its own certificate, key and CA (``tls``: agents) or only the
    CA to verify services against (``ca``: the CLI). Neither: the system's CAs."""

    token: str | None = None
    tls: TlsFiles | None = None
    ca: str | None = None

    def __repr__(self) -> str:  # a token never reaches a log line through a repr
        return f"Credentials(token={'***' if self.token else None}, tls={self.tls}, ca={self.ca})"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify``: a context for the cluster's CA, or True (system CAs)."""
        if self.tls is not None:
            return client_context(self.tls)
        if self.ca is not None:
            return ca_context(self.ca)
        return True

    def api(self, base_url: str, **kwargs: Any) -> ApiClient:
        return ApiClient(base_url, token=self.token, tls=self.tls, ca=self.ca, **kwargs)


class ApiClient:
    """Calls one virtman service. Use as ``async with ApiClient(url) as api``.

    ``token`` is sent with every request; ``tls`` (certificate, key, CA) or ``ca`` alone
    is what an ``https://`` service is verified against (see ``Credentials``)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        tls: TlsFiles | None = None,
        ca: str | None = None,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        max_detail_chars: int = MAX_ERROR_DETAIL_CHARS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_detail_chars = max_detail_chars
        credentials = Credentials(token, tls, ca)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers=credentials.headers(),
            verify=credentials.verify(),
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as err:
            raise ApiError(
                f"answer is not JSON: {excerpt(response.text, self.max_detail_chars)}",
                status=response.status_code,
                url=f"{self.base_url}{path}",
            ) from err

    async def get_text(self, path: str, **kwargs: Any) -> str:
        """GET a plain-text (or XML) document."""
        return (await self._send("GET", path, **kwargs)).text

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            what = f"{method} {path} failed: {str(err) or type(err).__name__}"
            raise NetworkError(excerpt(what, self.max_detail_chars), address=self.base_url) from err
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(
                _detail_text(detail, self.max_detail_chars),
                status=response.status_code,
                url=f"{self.base_url}{path}",
            )
        return response

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Any:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Any:
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Any:
        return await self.request("DELETE", path, **kwargs)


def _detail_text(detail: Any, limit: int = MAX_ERROR_DETAIL_CHARS) -> str:
    """pydantic's list of validation errors, or a plain message, as one line of at most
    about ``limit`` characters (a service of another version may not bound its own)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                msg = str(item.get("msg", item))
                parts.append(f"{where}: {msg}" if where else msg)
            else:
                parts.append(str(item))
        return excerpt("; ".join(parts), limit)
    return excerpt(str(detail), limit)


async def wait_for(
    url: str,
    path: str = "/health",
    timeout: float = 20.0,
    *,
    credentials: Credentials | None = None,
) -> None:
    """Poll a service until it answers (used when starting processes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with (credentials or Credentials()).api(url, timeout=2) as api:
        while True:
            try:
                await api.get(path)
                return
            except (NetworkError, ApiError) as err:
                if isinstance(err, ApiError) and err.status in (401, 403):
                    raise  # waiting longer will not make the credential good
                if asyncio.get_running_loop().time() > deadline:
                    raise NetworkError(
                        f"service did not answer in {timeout} s", address=url
                    ) from None
                await asyncio.sleep(0.05)
