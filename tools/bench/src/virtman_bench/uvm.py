"""``virtman bench uvm``: resuming a prebaked µVM against booting the same guest.

On this host, with QEMU and the bootable test image in its counting mode
(``virtman.loop=1``):

1. *cold boot*: the guest boots from a private copy of its disk; the time is from
   starting QEMU to its first counter line on the console (init has run);
2. *bake*: once it counts, it is paused and its state saved to a file (QMP ``migrate``
   to ``exec:cat > FILE``): the bytes and seconds are printed;
3. *resume* (``--resumes``, 10 by default, one after another): a new QEMU on a copy of
   the disk, started with ``-incoming defer``, loads the state from the file (in the page
   cache: a locally cached state) and continues; the time is from starting QEMU to QMP
   saying "running", and to the guest's next counter line;
4. *at once* (``--at-once``, 10 by default): that many resumes started together on this
   host, each timed the same way.

Prints the table (median and spread of each) and writes ``--json``. The cluster figures
of issue 12 (a state arriving cold through a two-level tree, µVMs on two agents, live
migration) need the bake API and are printed by the cluster part of the benchmark when
it is given ``--cluster`` (see docs/guests.md, "Prebaked µVMs").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtman.errors import BenchError
from virtman.hypervisor.options import add_hypervisor_options, hypervisor_settings
from virtman.hypervisor.qemu import Guest, GuestConfig, Hypervisor
from virtman.hypervisor.testimage import TICK, GuestImage, build_test_image
from virtman_bench.results import machine

#: The test guest's RAM: Debian's initrd (31 MB, unpacked in RAM) does not fit in 256.
DEFAULT_MEMORY_MIB = 384
#: Seconds a guest may take to show its first counter line before the run gives up.
BOOT_LIMIT_SECONDS = 300.0
#: Seconds between looks at a console for the next counter line.
POLL_SECONDS = 0.01
_TICK = re.compile(rf"{TICK} (\d+)")


@dataclass
class Resumed:
    running: float  # QEMU started -> QMP says "running"
    ticking: float  # QEMU started -> the guest's next counter line


def _last_tick(log: Path) -> int | None:
    try:
        found = _TICK.findall(log.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    return int(found[-1]) if found else None


async def _until_tick(log: Path, after: int, limit: float) -> float:
    deadline = time.monotonic() + limit
    while (n := _last_tick(log)) is None or n <= after:
        if time.monotonic() > deadline:
            raise BenchError(f"no counter line past {after} in {log} after {limit:g} s")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic()


async def _resume(hv: Hypervisor, cfg: GuestConfig, work: Path, name: str, disk: Path,
                  state: Path, last: int) -> Resumed:
    own = work / f"{name}.raw"
    shutil.copy(disk, own)  # each QEMU locks its own disk file
    log = work / f"{name}.log"
    guest = Guest(name, str(own), cfg, str(log), hv, qmp_socket=str(work / f"{name}.qmp"),
                  incoming=True)
    t0 = time.monotonic()
    await guest.start()
    try:
        assert guest.monitor is not None
        await guest.monitor.incoming(f"exec:cat {state}")
        await guest.monitor.wait_incoming()
        await guest.monitor.resume()
        running = time.monotonic() - t0
        ticking = await _until_tick(log, last, BOOT_LIMIT_SECONDS) - t0
    finally:
        await guest.stop()
        own.unlink(missing_ok=True)
    return Resumed(running, ticking)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hv = Hypervisor(hypervisor_settings(args))
    image: GuestImage = build_test_image(str(work))
    disk = work / "disk.raw"
    shutil.copy(image.image, disk)
    cfg = GuestConfig(memory_mib=args.memory, kernel=image.kernel, initrd=image.initrd,
                      append=image.append("uvm", loop=True))
    log = work / "bake.log"
    baked = Guest("uvm-bake", str(disk), cfg, str(log), hv, qmp_socket=str(work / "bake.qmp"))
    t0 = time.monotonic()
    await baked.start()
    try:
        boot = await _until_tick(log, 0, BOOT_LIMIT_SECONDS) - t0
        assert baked.monitor is not None
        await baked.monitor.pause()
        state = work / "state"
        t1 = time.monotonic()
        await baked.monitor.migrate(f"exec:cat > {state}")
        save = time.monotonic() - t1
    finally:
        await baked.stop()
    last = _last_tick(log) or 0
    accel = baked.accel.value if baked.accel else "?"
    print(f"cold boot to the first counter line: {boot:.2f} s ({accel}, {args.memory} MiB)")
    print(f"state saved: {os.path.getsize(state) / 1e6:,.1f} MB in {save:.2f} s")
    one = [await _resume(hv, cfg, work, f"uvm-{i}", disk, state, last)
           for i in range(args.resumes)]
    together = await asyncio.gather(*(
        _resume(hv, cfg, work, f"uvm-together-{i}", disk, state, last)
        for i in range(args.at_once)
    )) if args.at_once else []
    doc: dict[str, Any] = {
        "memory_mib": args.memory,
        "accel": accel,
        "cold_boot_seconds": boot,
        "state_bytes": os.path.getsize(state),
        "save_seconds": save,
        "resume_running": _spread([r.running for r in one]),
        "resume_ticking": _spread([r.ticking for r in one]),
        "resumes": args.resumes,
    }
    if together:
        doc["at_once"] = args.at_once
        doc["at_once_running"] = _spread([r.running for r in together])
        doc["at_once_ticking"] = _spread([r.ticking for r in together])
    return doc


def format_table(doc: dict[str, Any]) -> str:
    rows = [("cold boot (to the first counter line)", f"{doc['cold_boot_seconds']:.2f} s", "")]

    def add(label: str, key: str) -> None:
        s = doc[key]
        rows.append((label, f"{s['median']:.2f} s", f"{s['min']:.2f} to {s['max']:.2f} s"))

    add(f"resume, local state, to running (median of {doc['resumes']})", "resume_running")
    add("resume, local state, to its next counter line", "resume_ticking")
    if "at_once" in doc:
        add(f"{doc['at_once']} resumed at once, to running", "at_once_running")
        add(f"{doc['at_once']} resumed at once, to their next counter line", "at_once_ticking")
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'median':>8}  range"]
    lines += [f"{label:<{width}}  {value:>8}  {spread}" for label, value, spread in rows]
    target = doc["resume_running"]["median"]
    lines.append(f"target: resume from a locally cached state < 1.0 s: "
                 f"{'met' if target < 1.0 else 'NOT met'} ({target:.2f} s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB,
                   help=f"guest RAM in MiB (default {DEFAULT_MEMORY_MIB})")
    p.add_argument("--resumes", type=int, default=10,
                   help="resumes one after another, for the median (default 10)")
    p.add_argument("--at-once", type=int, default=10,
                   help="resumes started together on this host (default 10; 0: none)")
    p.add_argument("--json", default="bench-uvm.json", help="write results here")
    p.add_argument("--tmpdir", default=None, help="where to make the work directory")
    add_hypervisor_options(p)


def run(args: argparse.Namespace) -> int:
    if args.resumes < 1:
        raise BenchError("--resumes must be at least 1")
    if shutil.which("qemu-system-x86_64") is None:
        raise BenchError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    with tempfile.TemporaryDirectory(prefix="virtman-uvm-", dir=args.tmpdir) as tmp:
        doc = asyncio.run(measure(args, Path(tmp)))
    doc["machine"] = machine()
    print(format_table(doc))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.json}")
    return 0
