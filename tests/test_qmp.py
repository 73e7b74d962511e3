"""QEMU's monitor through qemu.qmp: save a running guest's state, resume it, size it.

Real QEMU under TCG with the test guest in its counting mode (``append(loop=True)``):
the counter it prints must go on after a resume, hot-plugged CPUs and memory must be
seen by the guest, and every resumed copy must get its own VM generation ID.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from virtman.errors import GuestControlError
from virtman.hypervisor.qemu import Accel, Guest, GuestConfig, Hypervisor, HypervisorSettings
from virtman.hypervisor.qmp import Monitor
from virtman.hypervisor.testimage import TICK, GuestImage, build_test_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

#: Debian's initrd does not unpack in 256 MiB; 384 leaves the guest room.
MEMORY_MIB = 384
BOOT_SECONDS = 120.0
TICK_LINE = re.compile(rf"{TICK} (\d+) cpus=(\S+) MemTotal:\s+(\d+) kB")


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return build_test_image(str(tmp_path_factory.mktemp("guest-image")))


def ticks(log: Path) -> list[tuple[int, str, int]]:  # see Tick
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(int(n), cpus, int(mem)) for n, cpus, mem in TICK_LINE.findall(text)]


Tick = tuple[int, str, int]  # counter, online CPUs, MemTotal kB


async def until_ticks(log: Path, count: int, limit: float = BOOT_SECONDS) -> list[Tick]:
    deadline = time.monotonic() + limit
    while len(seen := ticks(log)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{log} shows {len(seen)} ticks after {limit} s:\n"
                                 f"{log.read_text(errors='replace')[-2000:]}")
        await asyncio.sleep(0.1)
    return seen


async def test_a_saved_guest_resumes_twice_goes_on_counting_and_grows(
    tmp_path: Path, test_image: GuestImage
) -> None:
    hv = Hypervisor(HypervisorSettings(accel=Accel.TCG))
    disk = tmp_path / "disk.raw"
    shutil.copy(test_image.image, disk)
    cfg = GuestConfig(memory_mib=MEMORY_MIB, kernel=test_image.kernel, initrd=test_image.initrd,
                      append=test_image.append("uvm", loop=True), max_cpus=3,
                      max_memory_mib=MEMORY_MIB + 256)
    baked = Guest("uvm", str(disk), cfg, str(tmp_path / "bake.log"), hv,
                  qmp_socket=str(tmp_path / "bake.qmp"))
    await baked.start()
    try:
        assert baked.monitor is not None
        assert await baked.monitor.status() == "running"
        before = await until_ticks(tmp_path / "bake.log", 1)
        await baked.monitor.pause()
        state = tmp_path / "state"
        saved = await baked.monitor.migrate(f"exec:cat > {state}")
        assert saved["status"] == "completed"
        assert state.stat().st_size > 0
        last = ticks(tmp_path / "bake.log")[-1][0]
        assert last >= before[-1][0]
    finally:
        await baked.stop()

    ids: list[str] = []
    for clone in ("a", "b"):
        clone_disk = tmp_path / f"{clone}.raw"
        shutil.copy(disk, clone_disk)  # each QEMU locks its own disk file
        log = tmp_path / f"{clone}.log"
        guest = Guest(f"uvm-{clone}", str(clone_disk), cfg, str(log), hv,
                      qmp_socket=str(tmp_path / f"{clone}.qmp"), incoming=True)
        await guest.start()
        try:
            mon = guest.monitor
            assert mon is not None
            assert await mon.status() == "inmigrate"
            await mon.incoming(f"exec:cat {state}")
            await mon.wait_incoming()
            await mon.resume()
            assert await mon.status() == "running"
            # The guest goes on from where it was saved: its first tick after the resume
            # is the one after the last it printed before.
            first = (await until_ticks(log, 1, 30.0))[0]
            assert first[0] == last + 1, (first, last)
            assert first[1] == "0"
            assert await mon.hotplug_cpus(3) == 2
            assert await mon.hotplug_memory(MEMORY_MIB + 256) == 256
            assert await mon.cpu_count() == 3
            assert await mon.memory_mib() == MEMORY_MIB + 256
            # ...and the guest sees them (its loop brings them online).
            deadline = time.monotonic() + 30.0
            while not (seen := ticks(log)) or seen[-1][1] != "0-2":
                assert time.monotonic() < deadline, seen[-3:]
                await asyncio.sleep(0.2)
            assert seen[-1][2] > first[2] + 200 * 1024  # kB: the new 256 MiB are online
            with pytest.raises(GuestControlError, match="at most 3"):
                await mon.hotplug_cpus(4)
            ids.append(await mon.generation_id())
        finally:
            await guest.stop()
    assert len(set(ids)) == 2, ids  # clones of one state reseed their RNGs


async def test_a_monitor_that_never_comes_says_where_it_looked(tmp_path: Path) -> None:
    mon = Monitor("ghost", str(tmp_path / "none.qmp"))
    with pytest.raises(GuestControlError, match=r"no monitor at .*none\.qmp after 0\.2 s"):
        await mon.connect(limit=0.2)
    assert not mon.connected
    assert not os.path.exists(tmp_path / "none.qmp")


def test_bench_uvm_times_a_resume_against_a_cold_boot(tmp_path: Path) -> None:
    """``virtman bench uvm`` as a user runs it: it prints its table and writes figures that
    are measured, not made up (the state file's size is the one QEMU wrote)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "uvm.json"
    done = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "uvm", "--no-cluster", "--host-level",
         "--resumes", "1", "--at-once", "2", "--accel", "tcg", "--memory", str(MEMORY_MIB),
         "--json", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "host level: resume from a file, to running" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["accel"] == "tcg" and doc["memory_mib"] == MEMORY_MIB and "cluster" not in doc
    doc = doc["host"]
    assert doc["state_bytes"] > 16 * 1024 * 1024  # a booted guest's memory, not a stub
    assert 0 < doc["resume_running"]["median"] <= doc["resume_ticking"]["median"]
    assert doc["at_once"] == 2 and doc["at_once_running"]["max"] > 0
    assert list(tmp_path.glob("virtman-uvm-*")) == []  # its work directory is gone
