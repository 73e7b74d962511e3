#!/usr/bin/env python3
"""What credentials and HTTPS cost a call to Volt, measured on loopback.

Serves Volt's real app (credentials always checked) three ways in this process: plain
HTTP with a token (``--insecure``), HTTPS with a token (the CLI), HTTPS with a client
certificate (an agent). Prints ``GET /health`` calls per second over one kept-alive
connection (an agent's heartbeats, a dashboard) and with a new connection per call
(one CLI command: the TLS handshake included). Example:

    PYTHONPATH=src python bench/http_auth.py --requests 1000
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

from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.coordinator.app import create_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.httpapi import Credentials, HttpService, bind
from virtman.pki import init_ca, issue
from virtman.runtime import run_async


async def rate(credentials: Credentials, url: str, requests: int, *, reuse: bool) -> float:
    started = time.perf_counter()
    if reuse:
        async with credentials.api(url) as api:
            for _ in range(requests):
                await api.get("/health")
    else:
        for _ in range(requests):
            async with credentials.api(url) as api:
                await api.get("/health")
    return requests / (time.perf_counter() - started)


async def main(requests: int) -> int:
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, uvloop")
    with tempfile.TemporaryDirectory() as tmp:
        ca = init_ca(f"{tmp}/pki").cert
        server = issue("volt", f"{tmp}/pki", f"{tmp}/pki")
        agent = issue("host1", f"{tmp}/pki", f"{tmp}/pki")
        tokens = TokenTable()
        token = new_token()
        tokens.add(Principal(Role.OPERATOR, "bench"), token)
        for i in range(99):  # a cluster's worth of tokens: every lookup compares them all
            tokens.add(Principal(Role.AGENT, f"h{i}"), new_token())
        cases = []
        for label, tls, credentials in (
            ("HTTP, token (--insecure)", None, Credentials(token=token)),
            ("HTTPS, token (CLI)", server, Credentials(token=token, ca=ca)),
            ("HTTPS, client certificate (agent)", server, Credentials(tls=agent)),
        ):
            app = create_app(
                Volt(VoltState(f"{tmp}/{len(cases)}.db")),
                authenticator=Authenticator(tokens, certificates=tls is not None),
            )
            service = HttpService(app, bind("127.0.0.1", 0), tls=tls)
            await service.start()
            cases.append((label, service, credentials))
        print(f"{len(tokens)} tokens known; GET /health, calls per second:")
        for label, service, credentials in cases:
            kept = await rate(credentials, service.url, requests, reuse=True)
            fresh = await rate(credentials, service.url, max(requests // 5, 1), reuse=False)
            print(f"  {label:36} one connection {kept:7.0f}/s   new connection each {fresh:6.0f}/s")
        for _, service, _ in cases:
            await service.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    raise SystemExit(run_async(main(parser.parse_args().requests)))
