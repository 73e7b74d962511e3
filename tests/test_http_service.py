"""HttpService's lifecycle: NEW -> STARTING -> RUNNING -> STOPPING -> STOPPED, once.

Real uvicorn on loopback; the states are read where the app itself runs (its startup and
a request in flight), so each transition is seen, not assumed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from virtman.errors import ApiError, LifecycleError, NetworkError
from virtman.httpapi import ApiClient, HttpService, ServiceState, bind


def app_seeing(service_of: list[HttpService], seen: list[ServiceState]) -> FastAPI:
    """An app that records the service's state at startup, in a request and at shutdown;
    ``/slow`` answers once ``release`` is set."""
    release = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append(service_of[0].state)
        yield
        seen.append(service_of[0].state)

    app = FastAPI(lifespan=lifespan)
    app.state.release = release

    @app.get("/state")
    async def state() -> str:
        return service_of[0].state.value

    @app.get("/slow")
    async def slow() -> str:
        await release.wait()
        return service_of[0].state.value

    return app


async def test_the_states_in_order() -> None:
    holder: list[HttpService] = []
    seen: list[ServiceState] = []
    app = app_seeing(holder, seen)
    service = HttpService(app, bind("127.0.0.1", 0))
    holder.append(service)
    assert service.state is ServiceState.NEW
    await service.start()
    assert service.state is ServiceState.RUNNING
    assert seen == [ServiceState.STARTING]  # the app's startup ran before it answered
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        assert (await http.get("/state")).json() == "running"
        slow = asyncio.ensure_future(http.get("/slow"))
        await asyncio.sleep(0.1)  # let the request reach the app
        service.stop()
        assert service.state is ServiceState.STOPPING
        service.stop()  # a second signal changes nothing
        app.state.release.set()
        answer = await slow  # the request in flight is finished, in STOPPING
        assert answer.json() == "stopping"
    await service.close()
    assert service.state is ServiceState.STOPPED
    assert seen == [ServiceState.STARTING, ServiceState.STOPPING]
    with pytest.raises(httpx.ConnectError):  # the socket is closed
        async with httpx.AsyncClient(base_url=service.url, timeout=2) as http:
            await http.get("/state")


async def test_misuse_raises_with_the_facts() -> None:
    service = HttpService(FastAPI(), bind("127.0.0.1", 0))
    await service.start()
    with pytest.raises(LifecycleError) as caught:
        await service.start()
    err = caught.value
    assert (err.action, err.state) == ("start", "running")
    assert err.component == f"http service {service.url}"
    await service.close()
    with pytest.raises(LifecycleError, match="cannot start in state stopped"):
        await service.run()


async def test_stopped_before_it_ran() -> None:
    sock = bind("127.0.0.1", 0)
    service = HttpService(FastAPI(), sock)
    service.stop()
    assert service.state is ServiceState.STOPPED
    assert sock.fileno() == -1  # its socket is released at once
    await service.close()  # nothing to wait for
    with pytest.raises(LifecycleError, match="cannot start in state stopped"):
        await service.start()


async def test_a_failed_startup_is_an_error_not_an_exit() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise OSError(28, "No space left on device")
        yield

    sock = bind("127.0.0.1", 0)
    service = HttpService(FastAPI(lifespan=lifespan), sock)
    with pytest.raises(LifecycleError, match="the application's startup failed") as caught:
        await service.start()
    assert caught.value.state == "starting"
    assert service.state is ServiceState.STOPPED
    # Nothing is left listening.
    probe = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", service.port))
    probe.close()


async def test_client_errors_cross_virtman_error() -> None:
    """What the client meets (a bad URL, a non-JSON answer, nobody listening) is a
    VirtmanError, never httpx's own."""
    app = FastAPI()

    @app.get("/text", response_class=PlainTextResponse)
    async def text() -> str:
        return "not json"

    service = HttpService(app, bind("127.0.0.1", 0))
    await service.start()
    async with ApiClient(service.url, timeout=5) as api:
        with pytest.raises(NetworkError, match="GET /x"):
            await api.get("/x\x00")
        with pytest.raises(ApiError, match="answer is not JSON: not json"):
            await api.get("/text")
    await service.close()
    async with ApiClient(service.url, timeout=5) as api:
        with pytest.raises(NetworkError):
            await api.get("/text")
