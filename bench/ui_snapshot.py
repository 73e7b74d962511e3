#!/usr/bin/env python3
"""What Volt's live view costs per event: the snapshot's size and the time to build it.

Registers one image on a Volt in this process (its origin an in-memory NBD server on a
Unix socket), gives it N hosts by heartbeat, each with the stats an agent sends, and
builds and encodes the snapshot the page draws, as ``UiHub`` does for every event.
Every viewer gets that many bytes per event, at most one event per
``UI_MIN_EVENT_SECONDS``. Example:

    bench/ui_snapshot.py 8 100 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman.blockdev import MemoryDevice
from virtman.coordinator.models import Heartbeat, ImageCreate
from virtman.coordinator.state import VoltState
from virtman.coordinator.ui import build_snapshot
from virtman.coordinator.volt import Volt
from virtman.nbd.server import NbdServer

STATS = {
    "vms": 4,
    "vm_phases": {"booting": 2, "booted": 2},
    "images": {"img": {"from_origin": 1 << 20, "from_parents": 1 << 30}},
}


async def measure(hosts: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = NbdServer({"img": MemoryDevice(data=bytes(65536))})
        await server.listen_unix(f"{d}/origin.sock")
        volt = Volt(VoltState(f"{d}/volt.db"))
        try:
            origin = f"nbd+unix:///img?socket={d}/origin.sock"
            await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
            for i in range(hosts):
                relay = f"nbd://10.{i // 65536}.{i // 256 % 256}.{i % 256}:10809/img"
                volt.heartbeat(
                    f"host{i}", Heartbeat(url=f"http://h{i}", relays={"img": relay}, stats=STATS)
                )
            started = time.perf_counter()
            for _ in range(rounds):
                body = json.dumps(build_snapshot(volt, []), sort_keys=True)
            seconds = (time.perf_counter() - started) / rounds
        finally:
            await volt.stop()
            await server.stop()
    print(f"{hosts:>6} hosts: snapshot {len(body):>9,} bytes, built and encoded in "
          f"{seconds * 1000:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", type=int, nargs="+", help="hosts in the image's tree")
    parser.add_argument("--rounds", type=int, default=20, help="snapshots built per size")
    args = parser.parse_args()
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    for n in args.hosts:
        asyncio.run(measure(n, args.rounds))


if __name__ == "__main__":
    main()
