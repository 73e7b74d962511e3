#!/usr/bin/env python3
"""What resuming a prebaked µVM costs, against booting the same guest (TCG).

A local cluster (Volt, an origin, two agents on loopback, TLS) registers the test
image, then agent host1 bakes a counting guest of it (``--memory`` MiB, ready at its
third tick). Then, each printed with the agent's ``resume_seconds`` (request to guest
running) and ``sized_seconds`` (hot-plug done):

- ``first, baking host``: host1 resumes it; its cache of the state is empty, filled
  from its own export;
- ``cached``: host1 resumes it ``--repeat`` more times (one at a time, each destroyed
  before the next): the state comes from the host's cache;
- ``first, new host``: host2, which never saw the bake, resumes it: the state comes
  through the tree from host1;
- ``cold boot``: host2 boots the same guest from the image to its first tick.

Example:

    PYTHONPATH=src python bench/uvm_resume.py --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.hypervisor.testimage import TICK, build_test_image
from virtman.limits import BAKE_CREATE_TIMEOUT_SECONDS


async def resume(c: LocalCluster, host: str, name: str, cpus: int) -> dict[str, Any]:
    async with c.api(c.agents[host].url, timeout=300) as api:
        doc: dict[str, Any] = await api.post(
            "/vms", json={"name": name, "from_bake": "uvm", "start": True, "cpus": cpus})
        await api.delete(f"/vms/{name}")
    return doc


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="uvm-bench-") as tmp:
        image = build_test_image(os.path.join(tmp, "image"))
        c = LocalCluster(os.path.join(tmp, "cluster"), ClusterSettings(
            hosts=2, chunk_size=args.chunk_size, accel="tcg", log_level="warning"))
        try:
            await c.start_origin(image.image)
            await c.start_volt()
            for host in c.host_names():
                await c.start_agent(host)
            await c.register_image("guest")
            h1, h2 = c.host_names()
            guest = {"kernel": image.kernel, "initrd": image.initrd,
                     "append": image.append("uvm", loop=True), "memory_mib": args.memory,
                     "max_cpus": 2, "max_memory_mib": args.memory + 128}
            began = time.monotonic()
            async with c.api(c.agents[h1].url, timeout=BAKE_CREATE_TIMEOUT_SECONDS) as api:
                baked = await api.post("/bakes", json={
                    "name": "uvm", "image": "guest", "accel": "tcg",
                    "ready_marker": rf"{TICK} 3 ", "guest": guest})
            print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.python_version()}")
            print(f"bake: {time.monotonic() - began:.1f} s (agent: {baked['bake_seconds']} s, "
                  f"{baked['ready']}), state {baked['state_bytes'] / 2**20:.0f} MiB, "
                  f"guest {args.memory} MiB under TCG")
            rows: list[tuple[str, dict[str, Any]]] = []
            rows.append(("first, baking host", await resume(c, h1, "r0", 2)))
            cached = [await resume(c, h1, f"r{i + 1}", 2) for i in range(args.repeat)]
            rows += [("cached", doc) for doc in cached]
            rows.append(("first, new host", await resume(c, h2, "n0", 2)))
            for what, doc in rows:
                r = doc["resumed"]
                print(f"{what:20} resume {r['resume_seconds']:6.3f} s   "
                      f"sized to {r['cpus']} CPUs {r['sized_seconds']:6.3f} s")
            median = statistics.median(d["resumed"]["resume_seconds"] for d in cached)
            print(f"cached: median {median:.3f} s of {len(cached)}")
            async with c.api(c.agents[h2].url, timeout=300) as api:
                began = time.monotonic()
                await api.post("/vms", json={
                    "name": "boot", "image": "guest", "start": True, "accel": "tcg",
                    "guest": {**guest, "append": image.append("boot", loop=True)}})
                done = await api.get("/vms/boot/console/wait",
                                     params={"pattern": rf"{TICK} 1 ", "timeout": 60})
                print(f"cold boot to first tick: {time.monotonic() - began:.1f} s "
                      f"(matched {done['matched']})")
        finally:
            await c.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=int, default=384, help="guest MiB (default 384)")
    p.add_argument("--repeat", type=int, default=5, help="cached resumes (default 5)")
    p.add_argument("--chunk-size", type=int, default=256 * 1024)
    asyncio.run(main(p.parse_args()))
