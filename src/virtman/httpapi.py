"""HTTP plumbing shared by Volt, the agents and the CLI: serving and calling.

Services run uvicorn inside virtman's own event loop (so NBD servers and HTTP share
it) on a socket bound beforehand, which makes port 0 usable and the port known.
Calls go through ``ApiClient``, which turns every transport or HTTP error into a
``NetworkError`` or ``ApiError`` carrying the service's own ``detail`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from virtman.errors import (
    ApiError,
    ConfigError,
    Conflict,
    DeviceError,
    InvalidRequest,
    NetworkError,
    NotFound,
    VirtmanError,
)
from virtman.limits import HTTP_TIMEOUT_SECONDS

log = logging.getLogger(__name__)


class Problem(BaseModel):
    detail: str


#: The error answers every route may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem}, 409: {"model": Problem}, 422: {"model": Problem},
    500: {"model": Problem}, 502: {"model": Problem}}

_STATUS = ((NotFound, 404), (Conflict, 409), (ConfigError, 422), (InvalidRequest, 422),
           (DeviceError, 500))


def install_error_handlers(app: FastAPI) -> None:
    """Translate virtman's errors into HTTP answers whose ``detail`` says what is wrong."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 502)
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    app.add_exception_handler(VirtmanError, handle)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise NetworkError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: virtman's commands stop it themselves."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class HttpService:
    """A FastAPI app served by uvicorn on a bound socket; ``stop()`` ends it cleanly."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.host = str(sock.getsockname()[0])
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=5
        )
        self.server = _Server(config)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def run(self) -> None:
        await self.server.serve(sockets=[self.sock])

    async def run_until_signalled(self, banner: str) -> int:
        """Serve until SIGTERM or SIGINT, then stop cleanly (the commands' main loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        print(f"{banner} serving on {self.url}", flush=True)
        await self.run()
        return 0

    def stop(self) -> None:
        self.server.should_exit = True


class ApiClient:
    """Calls one virtman service. Use as ``async with ApiClient(url) as api``."""

    def __init__(self, base_url: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

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
        return response.json()

    async def get_text(self, path: str, **kwargs: Any) -> str:
        """GET a plain-text (or XML) document."""
        return (await self._send("GET", path, **kwargs)).text

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise NetworkError(
                f"{method} {path} failed: {str(err) or type(err).__name__}", address=self.base_url
            ) from err
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(
                _detail_text(detail), status=response.status_code, url=f"{self.base_url}{path}"
            )
        return response

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Any:
        return await self.request("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Any:
        return await self.request("DELETE", path, **kwargs)


def _detail_text(detail: Any) -> str:
    """pydantic's list of validation errors, or a plain message, as one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                parts.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


async def wait_for(url: str, path: str = "/health", timeout: float = 20.0) -> None:
    """Poll a service until it answers (used when starting processes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with ApiClient(url, timeout=2) as api:
        while True:
            try:
                await api.get(path)
                return
            except (NetworkError, ApiError):
                if asyncio.get_running_loop().time() > deadline:
                    raise NetworkError(
                        f"service did not answer in {timeout} s", address=url
                    ) from None
                await asyncio.sleep(0.05)
