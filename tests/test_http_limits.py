"""What an HTTP service accepts and echoes: body caps (413) and bounded error details.

Every request goes over real HTTP on loopback to an app served by ``HttpService``: Volt's
own app, or a small app given the same ``install_error_handlers`` (the piece Volt and the
agents share), for what Volt has no route for (a streamed body, an old service's answer).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.coordinator.app import create_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.errors import ApiError
from virtman.httpapi import ApiClient, HttpLimits, HttpService, bind, install_error_handlers
from virtman.limits import (
    MAX_ERROR_DETAIL_CHARS,
    MAX_ERROR_INPUT_CHARS,
    MAX_ERROR_ITEMS,
    MAX_HTTP_BODY_BYTES,
)

MB = 1000 * 1000
KiB = 1024
#: An answer that quotes at most a bounded prefix of the input is a few KiB at most.
SMALL_ANSWER = 4 * KiB
#: Volt checks credentials first (virtman.auth): these tests call as an operator.
TOKEN = new_token()
AUTH = Authenticator(TokenTable())
AUTH.tokens.add(Principal(Role.OPERATOR, "test"), TOKEN)
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
A1_TOKEN = new_token()
AUTH.tokens.add(Principal(Role.AGENT, "a1"), A1_TOKEN)
AGENT_A1 = {"authorization": f"Bearer {A1_TOKEN}"}

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """serve(app) or serve(volt=True, limits=...): start it on loopback, return its URL;
    every service is closed at teardown."""
    services: list[HttpService] = []

    async def start(app: FastAPI | None = None, *, limits: HttpLimits | None = None) -> str:
        if app is None:
            volt = Volt(VoltState(str(tmp_path / f"volt{len(services)}.db")))
            app = create_app(volt, limits, authenticator=AUTH)
        service = HttpService(app, bind("127.0.0.1", 0))
        await service.start()
        services.append(service)
        return service.url

    yield start
    for service in services:
        await service.close()


async def chunks(total: int, size: int = 64 * KiB) -> AsyncIterator[bytes]:
    """``total`` bytes in chunks: httpx sends these with Transfer-Encoding: chunked."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b" " * n  # JSON whitespace: the body would parse if it were let through
        sent += n


async def test_a_10_mb_bad_origin_uri_is_422_naming_the_field_in_a_small_answer(
    serve: Serve,
) -> None:
    # A body cap above the input, so that the error path itself is what is bounded.
    url = await serve(limits=HttpLimits(max_body_bytes=16 * MB))
    bad = "x" * (10 * MB)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        r = await http.post("/images", json={"name": "img", "origins": [bad]})
        assert r.status_code == 422
        assert len(r.content) < SMALL_ANSWER, len(r.content)
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "origins", 0]
        assert error["input"].startswith("x" * MAX_ERROR_INPUT_CHARS)
        assert error["input"].endswith(f"\u2026 ({10 * MB} bytes)")
        assert "scheme must be nbd://" in error["msg"]
        assert (await http.get("/health")).json()["images"] == 0  # nothing registered
    # The CLI's rendering: one short line naming the field.
    async with ApiClient(url, token=TOKEN) as api:
        with pytest.raises(ApiError) as caught:
            await api.post("/images", json={"name": "img", "origins": [bad]})
    assert caught.value.status == 422
    assert caught.value.detail.startswith("origins.0: ")
    assert len(caught.value.detail) < 2 * MAX_ERROR_INPUT_CHARS + 200


async def test_volt_own_error_messages_are_bounded(serve: Serve) -> None:
    # A well-formed URI nothing listens on: Volt's own ConfigError names it, cut short.
    url = await serve(limits=HttpLimits(max_body_bytes=16 * MB))
    origin = "nbd+unix:///img?socket=/" + "s" * (5 * MB)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        r = await http.post("/images", json={"name": "img", "origins": [origin]})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("origin of image 'img' cannot be reached")
    assert len(detail) <= MAX_ERROR_DETAIL_CHARS + 50
    assert detail.endswith(" bytes)")


async def test_errors_listed_and_keys_quoted_are_bounded(serve: Serve) -> None:
    url = await serve()
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        # 20,000 bad origins: ten errors are listed, the rest counted.
        r = await http.post("/images", json={"name": "img", "origins": ["bad"] * 20_000})
        assert r.status_code == 422 and len(r.content) < SMALL_ANSWER
        detail = r.json()["detail"]
        assert len(detail) == MAX_ERROR_ITEMS + 1
        assert detail[-1]["msg"] == f"{20_000 - MAX_ERROR_ITEMS} more errors not shown"
        # A dict key is input too: a 500 kB image name in a heartbeat's relays.
        key = "k" * 500_000
        r = await http.post(
            "/agents/a1/heartbeat", json={"url": "http://h", "relays": {key: "nbd://h/img"}},
            headers=AGENT_A1,  # heartbeats are agents' own
        )
        assert r.status_code == 422 and len(r.content) < SMALL_ANSWER
        assert any(str(x).startswith("k" * 10) for x in r.json()["detail"][0]["loc"])
        # A host name no resolver takes is refused where it enters, naming the field.
        r = await http.post(
            "/images", json={"name": "img", "origins": ["nbd://" + "h" * 100_000 + "/x"]}
        )
        assert r.status_code == 422 and len(r.content) < SMALL_ANSWER
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "origins", 0] and "not a valid host name" in error["msg"]


async def test_an_oversize_body_is_413_and_the_service_keeps_serving(serve: Serve) -> None:
    url = await serve()
    body = json.dumps({"name": "img", "origins": ["nbd://h/" + "e" * (2 * MAX_HTTP_BODY_BYTES)]})
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        r = await http.post("/images", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["detail"] == (
            f"POST /images: request body of {len(body)} bytes is over the limit of "
            f"{MAX_HTTP_BODY_BYTES} bytes"
        )
        assert (await http.get("/health")).status_code == 200
        # A body just within the limit is parsed as usual.
        ok = json.dumps({"name": "bad name", "origins": ["nbd://h/x"]}).ljust(MAX_HTTP_BODY_BYTES)
        r = await http.post("/images", content=ok, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]


async def test_an_oversize_chunked_body_is_413_and_the_service_keeps_serving(
    serve: Serve,
) -> None:
    url = await serve()
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        r = await http.post(
            "/images",
            content=chunks(4 * MAX_HTTP_BODY_BYTES),
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in r.request.headers  # it was sent in chunks
        assert r.status_code == 413
        assert r.json()["detail"] == (
            f"POST /images: request body sent in chunks is over the limit of "
            f"{MAX_HTTP_BODY_BYTES} bytes"
        )
        assert (await http.get("/health")).status_code == 200

        # A chunked body within the limit reaches the app whole.
        async def document() -> AsyncIterator[bytes]:
            text = json.dumps({"name": "bad name", "origins": ["nbd://h/x"]}).encode()
            for i in range(0, len(text), 7):
                yield text[i : i + 7]

        r = await http.post(
            "/images", content=document(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]


def sink_app(limits: HttpLimits) -> FastAPI:
    """An app with one streamed route and one JSON route, as an agent has."""
    app = FastAPI()
    install_error_handlers(app, limits, streamed=["/sink"])

    @app.post("/sink")
    async def sink(request: Request) -> dict[str, int]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
        return {"received": total}

    @app.post("/doc")
    async def doc(body: dict[str, Any]) -> dict[str, int]:
        return {"keys": len(body)}

    return app


async def test_a_streamed_route_has_its_own_larger_cap(serve: Serve) -> None:
    limits = HttpLimits(max_body_bytes=4 * KiB, max_stream_body_bytes=256 * KiB)
    url = await serve(sink_app(limits))
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=OPERATOR) as http:
        # Far over the JSON cap, within the stream's: streamed through whole.
        r = await http.post("/sink", content=chunks(200 * KiB, 16 * KiB))
        assert r.status_code == 200 and r.json() == {"received": 200 * KiB}
        r = await http.post("/sink", content=b"z" * (200 * KiB))
        assert r.status_code == 200 and r.json() == {"received": 200 * KiB}
        # Over the stream's cap: declared, then chunked.
        r = await http.post("/sink", content=b"z" * (300 * KiB))
        assert r.status_code == 413 and "of 307200 bytes" in r.json()["detail"]
        r = await http.post("/sink", content=chunks(300 * KiB, 16 * KiB))
        assert r.status_code == 413 and "sent in chunks" in r.json()["detail"]
        # The JSON route keeps the small cap.
        r = await http.post("/doc", json={"k": "v" * (8 * KiB)})
        assert r.status_code == 413 and f"limit of {4 * KiB} bytes" in r.json()["detail"]
        r = await http.post("/doc", json={"k": "v"})
        assert r.status_code == 200 and r.json() == {"keys": 1}


async def test_the_cli_rendering_of_a_huge_detail_is_bounded(serve: Serve) -> None:
    """A service that does not bound its errors (another version): the client does."""
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> JSONResponse:
        return JSONResponse({"detail": "p" * (3 * MB)}, status_code=422)

    @app.get("/listed")
    async def listed() -> JSONResponse:
        items = [{"loc": ["body", "f"], "msg": "m" * 1000}] * 5000
        return JSONResponse({"detail": items}, status_code=422)

    url = await serve(app)
    async with ApiClient(url, token=TOKEN) as api:
        for path in ("/plain", "/listed"):
            with pytest.raises(ApiError) as caught:
                await api.get(path)
            text = caught.value.detail
            assert len(text) <= MAX_ERROR_DETAIL_CHARS + 30, (path, len(text))
            assert text.endswith(" bytes)")
