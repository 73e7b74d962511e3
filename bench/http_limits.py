#!/usr/bin/env python3
"""What the HTTP body cap and the bounded error details cost, measured on loopback.

Serves Volt's real app (``install_error_handlers`` with its defaults) and, for the
baseline, a bare FastAPI app with the same route and model but FastAPI's own error
handling and no body cap; both on ``HttpService`` in this process. Prints requests per
second for small requests (where the cap's buffering could cost), and the time and
answer size for a 10 MB body. Example:

    bench/http_limits.py --requests 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import httpx
from fastapi import FastAPI

from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.coordinator.app import create_app
from virtman.coordinator.models import ImageCreate
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.httpapi import HttpLimits, HttpService, bind
from virtman.runtime import run_async

MB = 1000 * 1000
# Volt takes requests with a credential only: every request here carries an operator's
# token (the bare app ignores it), so the figures include checking it.
TOKEN = new_token()
AUTH = Authenticator(TokenTable())
AUTH.tokens.add(Principal(Role.OPERATOR, "bench"), TOKEN)


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post("/images", status_code=201)
    async def add_image(body: ImageCreate) -> dict[str, str]:
        return {"name": body.name}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def rate(url: str, requests: int, method: str, path: str, **kw: object) -> float:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        started = time.perf_counter()
        for _ in range(requests):
            await http.request(method, path, **kw)  # type: ignore[arg-type]
        return requests / (time.perf_counter() - started)


async def once(url: str, **kw: object) -> tuple[int, int, float]:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        started = time.perf_counter()
        r = await http.post("/images", **kw)  # type: ignore[arg-type]
        return r.status_code, len(r.content), time.perf_counter() - started


async def main(requests: int) -> int:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}, Python {platform.python_version()}, uvloop")
    with tempfile.TemporaryDirectory() as tmp:
        services = {
            "bare FastAPI": HttpService(bare_app(), bind("127.0.0.1", 0)),
            "virtman (capped, bounded)": HttpService(
                create_app(Volt(VoltState(f"{tmp}/a.db")), authenticator=AUTH),
                bind("127.0.0.1", 0),
            ),
            "virtman, cap 16 MB": HttpService(
                create_app(
                    Volt(VoltState(f"{tmp}/b.db")),
                    HttpLimits(max_body_bytes=16 * MB),
                    authenticator=AUTH,
                ),
                bind("127.0.0.1", 0),
            ),
        }
        for service in services.values():
            await service.start()
        bad = {"name": "img", "origins": ["bad uri " + "x" * 1000]}
        huge = {"name": "img", "origins": ["x" * (10 * MB)]}
        for label, service in services.items():
            health = await rate(service.url, requests, "GET", "/health")
            invalid = await rate(service.url, requests, "POST", "/images", json=bad)
            status, size, seconds = await once(service.url, json=huge)
            print(
                f"{label:28} GET /health {health:7.0f}/s   POST 1 kB bad origin (422) "
                f"{invalid:7.0f}/s   10 MB bad origin: {status}, answer {size} bytes "
                f"in {seconds * 1000:.0f} ms"
            )
        for service in services.values():
            await service.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    raise SystemExit(run_async(main(parser.parse_args().requests)))  # uvloop, as the services
