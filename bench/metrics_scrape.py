#!/usr/bin/env python3
"""What Prometheus metrics cost: one scrape of an agent and of Volt, and one histogram
observation (what each chunk fetch from upstream now pays).

Builds a real agent in this process: an origin, Volt, one image, ``--vms`` VMs
exported on Unix sockets, and a ``--read`` of each VM's disk so every data-path series
has values. Then it times ``--scrapes`` renders of the agent's and Volt's ``/metrics``
(``Metrics.render``, what the route returns, without HTTP), and ``Histogram.observe``.
Example:

    bench/metrics_scrape.py --vms 50 --scrapes 500
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.agent.agent import Agent
from virtman.blockdev.file import FileDevice
from virtman.coordinator.app import create_app
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.httpapi import ApiClient, HttpService, bind
from virtman.metrics import FETCH_BUCKETS, Metrics
from virtman.nbd.client import NbdClient
from virtman.nbd.server import Export, NbdServer
from virtman.runtime import run_async

MiB = 1024 * 1024


def per_call(fn: object, n: int) -> float:
    """Microseconds per call of ``fn`` (no arguments), best of three rounds of ``n``."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - began)
    return best / n * 1e6


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.raw"
        image.write_bytes(random.Random(1).randbytes(args.image_mib * MiB))
        device = FileDevice(str(image), read_only=True)
        await device.open()
        origin = NbdServer([Export("image", device)])
        port = await origin.listen_tcp("127.0.0.1", 0)
        volt = Volt(VoltState(os.path.join(tmp, "volt.db")))
        volt_http = HttpService(create_app(volt), bind("127.0.0.1", 0))
        await volt_http.start()
        sockets = tempfile.mkdtemp(prefix="vm-")
        agent = Agent("host1", os.path.join(tmp, "host1"), volt_http.url, socket_dir=sockets)
        await agent.start()
        try:
            async with ApiClient(volt_http.url) as api:
                await api.post("/images", json={
                    "name": "img", "origins": [f"nbd://127.0.0.1:{port}/image"],
                    "chunk_size": 64 * 1024})
            for i in range(args.vms):
                vm = await agent.vms.create(f"vm{i}", "img")
                client = await NbdClient.connect(vm.uri)
                await client.read(0, min(args.read_mib * MiB, args.image_mib * MiB))
                await client.close()
            agent_text = agent.metrics.render()
            volt_text = volt.metrics.render()
            agent_us = per_call(agent.metrics.render, args.scrapes)
            volt_us = per_call(volt.metrics.render, args.scrapes)
            histogram = Metrics().histogram("x_seconds", "x", FETCH_BUCKETS)
            observe_us = per_call(lambda: histogram.observe(0.003), 100_000)
        finally:
            await agent.stop()
            await volt_http.close()
            await origin.stop()
            await device.close()
            shutil.rmtree(sockets, ignore_errors=True)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"agent, 1 image, {args.vms} VMs: one scrape {agent_us:,.0f} us, "
          f"{len(agent_text):,} bytes")
    print(f"volt, 1 image, 1 agent:  one scrape {volt_us:,.0f} us, {len(volt_text):,} bytes")
    print(f"Histogram.observe (per chunk fetched): {observe_us:.2f} us")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--image-mib", type=int, default=8)
    parser.add_argument("--read-mib", type=int, default=1)
    sys.exit(run_async(main(parser.parse_args())))
