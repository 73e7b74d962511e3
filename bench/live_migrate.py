#!/usr/bin/env python3
"""What a live migration costs a running guest: its pause, and the bytes moved.

Starts a LocalCluster of two agents (with TLS unless ``--insecure``), boots the test
image's counting guest (``virtman.loop=1``: a tick on its console every 0.2 s) under TCG,
then migrates it back and forth ``--runs`` times. Per run it prints QEMU's downtime, the
pause the source measured (last poll that saw the guest run to the destination's
answer that it runs there), the memory and the disk bytes moved, and whether a tick was
lost (the destination's first tick must follow the source's last).

    PYTHONPATH=src python bench/live_migrate.py --runs 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.hypervisor.testimage import TICK, build_test_image
from virtman.sizes import format_size

TICK_RE = re.compile(rf"{TICK} (\d+)")


def ticks(text: str) -> list[int]:
    return [int(n) for n in TICK_RE.findall(text)]


async def wait_ticks(cluster: LocalCluster, host: str, name: str, n: int) -> list[int]:
    async with cluster.api(cluster.agents[host].url, timeout=70) as api:
        for _ in range(30):
            await api.get(f"/vms/{name}/console/wait",
                          params={"pattern": rf"{TICK} \d+", "timeout": 10})
            seen = ticks(await api.get_text(f"/vms/{name}/console"))
            if len(seen) >= n:
                return seen
            await asyncio.sleep(0.5)
    raise SystemExit(f"{name} on {host}: fewer than {n} ticks")


async def main(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix="bench-livemig-")
    try:
        image = build_test_image(os.path.join(work, "image"))
        cluster = LocalCluster(os.path.join(work, "cluster"), ClusterSettings(
            hosts=2, heartbeat_interval=0.5, heartbeat_timeout=2.0, chunk_size=64 * 1024,
            accel="tcg", insecure=args.insecure))
        try:
            await cluster.start_origin(image.image)
            await cluster.start_volt()
            for host in cluster.host_names():
                await cluster.start_agent(host)
            await cluster.register_image("guest")
            async with cluster.api(cluster.agents["host1"].url, timeout=60) as api:
                await api.post("/vms", json={
                    "name": "mover", "image": "guest", "start": True,
                    "guest": {"kernel": image.kernel, "initrd": image.initrd,
                              "append": image.append("mover", loop=True),
                              "memory_mib": args.memory_mib}})
            await wait_ticks(cluster, "host1", "mover", 5)
            print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                  f"Python {platform.python_version()}, "
                  f"{subprocess.run(['qemu-system-x86_64', '--version'], capture_output=True, text=True, check=False).stdout.splitlines()[0]}")  # noqa: E501
            print(f"guest: {args.memory_mib} MiB, TCG; memory over "
                  f"{'plain TCP' if args.insecure else 'TLS'}")
            rows: list[dict[str, Any]] = []
            where, other = "host1", "host2"
            for run in range(args.runs):
                console = Path(cluster.workdir) / where / "vms" / "mover" / "console.log"
                with open(console, "rb") as f:
                    async with cluster.api(cluster.agents[where].url, timeout=600) as api:
                        doc = await api.post("/vms/mover/migrate", json={"destination": other})
                    last = ticks(f.read().decode(errors="replace"))[-1]
                first = (await wait_ticks(cluster, other, "mover", 1))[0]
                doc["tick_gap"] = first - last - 1
                rows.append(doc)
                print(f"run {run + 1} {where}->{other}: downtime {doc['downtime_ms']} ms "
                      f"(QEMU), pause {doc['measured_pause_seconds'] * 1000:.0f} ms (measured), "
                      f"memory {format_size(doc['ram_bytes'])}, disk "
                      f"{format_size(doc['disk_bytes'])} pulled + "
                      f"{format_size(doc['live_read_bytes'])} read live, "
                      f"{doc['seconds']:.1f} s in all, ticks lost {doc['tick_gap']}")
                where, other = other, where
                await wait_ticks(cluster, where, "mover", 3)
            for key, unit, scale in (("downtime_ms", "ms", 1), ("measured_pause_seconds", "ms",
                                     1000), ("bytes_moved", "MB", 1e-6), ("seconds", "s", 1)):
                values = [r[key] * scale for r in rows]
                print(f"median {key}: {statistics.median(values):.1f} {unit} "
                      f"(min {min(values):.1f}, max {max(values):.1f})")
        finally:
            await cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--memory-mib", type=int, default=384,
                   help="guest memory (Debian's initrd does not unpack in 256)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, NBD and memory")
    asyncio.run(main(p.parse_args()))
