#!/usr/bin/env python3
"""What a migrate costs a VM that keeps writing: copy time and the write latency it sees.

Runs an origin, Volt and two agents in one process on loopback (tmp dir), writes
``--written`` bytes into a VM, then migrates it twice: once idle, once while a writer
sends 4 KiB writes one after another. Prints the copy rate and the writer's latency
before and during the migrate (the longest one is the write hold of the last pass).

    PYTHONPATH=src python bench/vm_copy.py --image 256M --written 64M
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.agent.agent import Agent
from virtman.agent.app import create_app as agent_app
from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.blockdev.file import FileDevice
from virtman.coordinator.app import create_app as volt_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.errors import NbdRequestError, NetworkError
from virtman.httpapi import Credentials, HttpService, bind, wait_for
from virtman.nbd.client import NbdClient
from virtman.nbd.server import Export, NbdServer
from virtman.sizes import format_size, parse_size

KiB = 1024
# Plain HTTP with tokens, as ``--insecure``: the figures are the copy's, not TLS's.
TOKENS = TokenTable()
AUTH = Authenticator(TOKENS, certificates=False)


def token(role: Role, name: str) -> Credentials:
    secret = new_token()
    TOKENS.add(Principal(role, name), secret)
    return Credentials(token=secret)


OPERATOR = token(Role.OPERATOR, "bench")


async def serve(app: Any, tasks: list[tuple[HttpService, asyncio.Task[None]]]) -> str:
    service = HttpService(app, bind("127.0.0.1", 0))
    tasks.append((service, asyncio.get_running_loop().create_task(service.run())))
    await wait_for(service.url, credentials=OPERATOR)
    return service.url


async def writer(client: NbdClient, size: int, stop: asyncio.Event, lat: list[float]) -> None:
    rng = random.Random(1)
    block = b"\xab" * (4 * KiB)
    while not stop.is_set():
        offset = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
        t = time.perf_counter()
        try:
            await client.write(offset, block)
        except (NbdRequestError, NetworkError):  # the source refuses writes once moved
            return
        lat.append(time.perf_counter() - t)


def summary(lat: list[float]) -> str:
    if not lat:
        return "no writes"
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return (f"{len(lat)} writes, median {statistics.median(lat) * 1e3:.2f} ms, "
            f"p99 {q[98] * 1e3:.2f} ms, max {max(lat) * 1e3:.1f} ms")


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vmcopy-"))
    tasks: list[tuple[HttpService, asyncio.Task[None]]] = []
    origin: NbdServer | None = None
    try:
        image = tmp / "image.raw"
        with open(image, "wb") as f:
            f.truncate(args.image)
        device = FileDevice(str(image), read_only=True)
        await device.open()
        origin = NbdServer([Export("image", device)])
        port = await origin.listen_tcp("127.0.0.1", 0)
        volt = Volt(VoltState(str(tmp / "volt.db")))
        volt_url = await serve(volt_app(volt, authenticator=AUTH), tasks)
        async with OPERATOR.api(volt_url, timeout=600) as api:
            await api.post("/images", json={"name": "img",
                                            "origins": [f"nbd://127.0.0.1:{port}/image"]})
        agents = []
        for name in ("a1", "a2"):
            agent = Agent(name, str(tmp / name), volt_url, socket_dir=str(tmp / f"s{name}"),
                          credentials=token(Role.AGENT, name))
            service = HttpService(agent_app(agent, authenticator=AUTH), bind("127.0.0.1", 0))
            agent.url = service.url
            tasks.append((service, asyncio.get_running_loop().create_task(service.run())))
            await wait_for(service.url, credentials=OPERATOR)
            agents.append(agent)
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}")
        print(f"image {format_size(args.image)}, VM written {format_size(args.written)}")
        for run, with_writer in ((1, False), (2, True)):
            src, dst = agents[0], agents[1]
            if run == 2:
                src, dst = dst, src  # it comes back
            else:
                vm = await src.vms.create("vm", "img")
                client = await NbdClient.connect(vm.uri)
                chunk = os.urandom(1024 * KiB)
                for off in range(0, args.written, len(chunk)):
                    await client.write(off, chunk[: min(len(chunk), args.written - off)])
                await client.flush()
                await client.close()
            vm = src.vms.get("vm")
            before: list[float] = []
            during: list[float] = []
            stop = asyncio.Event()
            task = None
            if with_writer:
                client = await NbdClient.connect(vm.uri)
                warm = asyncio.get_running_loop().create_task(
                    writer(client, args.image, stop, before))
                await asyncio.sleep(1.0)
                stop.set()
                await warm
                stop = asyncio.Event()
                task = asyncio.get_running_loop().create_task(
                    writer(client, args.image, stop, during))
            started = time.perf_counter()
            await src.copy_vm("vm", dst.name, move=True)
            took = time.perf_counter() - started
            stop.set()
            if task is not None:
                await task
                await client.close()
            written = sum(n for _, n in dst.vms.get("vm").written_runs())
            print(f"migrate {run} ({'writer running' if with_writer else 'idle'}): "
                  f"{format_size(written)} in {took:.2f} s "
                  f"({written / took / 2**20:.0f} MiB/s)")
            if with_writer:
                print(f"  writer before: {summary(before)}")
                print(f"  writer during: {summary(during)}")
    finally:
        for service, task in reversed(tasks):
            service.stop()
            await task
        if origin is not None:
            await origin.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=parse_size, default=parse_size("256M"))
    p.add_argument("--written", type=parse_size, default=parse_size("64M"))
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(p.parse_args()))
