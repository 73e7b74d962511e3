"""Live migration of a running guest between two agents: real QEMU under TCG, the test
image's counting guest, a LocalCluster with TLS (as in test_guests.py)."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from guestworld import guest_cluster, make_guest_image

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.errors import ApiError, VirtmanError
from virtman.httpapi import Credentials
from virtman.hypervisor.qmp import Monitor
from virtman.hypervisor.testimage import TICK, GuestImage

SETUP_SECONDS = 60
#: Two TCG guests booting and counting on two busy cores, one migration each.
BODY_SECONDS = 200
TEST_SECONDS = SETUP_SECONDS + BODY_SECONDS + 20
#: Debian's initrd does not unpack in 256 MiB.
MEMORY_MIB = 384
TICK_RE = re.compile(rf"{TICK} (\d+)")


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return make_guest_image(tmp_path_factory)


@pytest.fixture
async def cluster(tmp_path: Path, test_image: GuestImage) -> AsyncIterator[LocalCluster]:
    async with guest_cluster(tmp_path / "cluster", test_image, ClusterSettings(
        hosts=2, heartbeat_interval=0.5, heartbeat_timeout=2.0, chunk_size=64 * 1024,
        accel="tcg")) as c:
        yield c


def ticks(text: str) -> list[int]:
    return [int(n) for n in TICK_RE.findall(text)]


async def start_counting(cluster: LocalCluster, host: str, name: str,
                         image: GuestImage) -> None:
    async with cluster.api(cluster.agents[host].url, timeout=60) as api:
        await api.post("/vms", json={
            "name": name, "image": "guest", "start": True,
            "guest": {"kernel": image.kernel, "initrd": image.initrd,
                      "append": image.append(name, loop=True), "memory_mib": MEMORY_MIB}})
    await wait_tick(cluster, host, name, 3)


async def wait_tick(cluster: LocalCluster, host: str, name: str, at_least: int,
                    limit: float = 120) -> list[int]:
    """Until the guest's console shows a tick numbered ``at_least`` or more."""
    deadline = time.monotonic() + limit
    async with cluster.api(cluster.agents[host].url, timeout=70) as api:
        while True:
            await api.get(f"/vms/{name}/console/wait", params={
                "pattern": rf"{TICK} {at_least}\b", "timeout": 10})
            seen = ticks(await api.get_text(f"/vms/{name}/console"))
            if seen and seen[-1] >= at_least:
                return seen
            assert time.monotonic() < deadline, f"{name} on {host} stuck at ticks {seen[-3:]}"


def file_in_image(image: Path, path: str) -> str | None:
    out = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         text=True, check=False, timeout=30)
    return out.stdout.strip() or None


def qemu_pids(socket: str) -> list[int]:
    """The QEMU processes whose command line names ``socket`` (its QMP socket)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(path).read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(socket.encode() in a for a in argv):
            pids.append(int(path.split("/")[2]))
    return pids


@pytest.mark.timeout(TEST_SECONDS)
async def test_running_guest_moves_and_counts_on(cluster: LocalCluster,
                                                 test_image: GuestImage,
                                                 tmp_path: Path) -> None:
    await start_counting(cluster, "host1", "mover", test_image)
    source_dir = Path(cluster.workdir) / "host1" / "vms" / "mover"
    # Held open: the source's console is removed with the VM, and its last tick is wanted.
    with open(source_dir / "console.log", "rb") as source_console:
        async with cluster.api(cluster.agents["host1"].url, timeout=BODY_SECONDS) as api:
            doc = await api.post("/vms/mover/migrate", json={"destination": "host2"})
        source_ticks = ticks(source_console.read().decode(errors="replace"))

    assert doc["live"] is True and doc["memory_tls"] is True  # the cluster has TLS
    assert 0 < doc["downtime_ms"] < 5000, doc
    assert 0 < doc["measured_pause_seconds"] < 10, doc
    assert doc["ram_bytes"] > 1_000_000, doc  # a booted kernel's memory, not zeros only
    assert doc["bytes_moved"] == doc["ram_bytes"] + doc["disk_bytes"] + doc["live_read_bytes"]
    # The guest wrote its name and synced at boot: those blocks came from the source.
    assert doc["disk_bytes"] > 0, doc

    # The source's VM and its files are gone; the destination's guest counts on from
    # exactly where the source's stopped: no tick lost, none repeated.
    assert not source_dir.exists()
    async with cluster.api(cluster.agents["host1"].url) as api:
        with pytest.raises(VirtmanError, match="no VM named"):
            await api.get("/vms/mover")
    last = source_ticks[-1]
    seen = await wait_tick(cluster, "host2", "mover", last + 5)
    assert seen[0] == last + 1, (source_ticks[-3:], seen[:3])
    assert seen == list(range(last + 1, seen[-1] + 1))
    async with cluster.api(cluster.agents["host2"].url) as api:
        info = await api.get("/vms/mover")
    assert info["guest_running"] and info["layers"] == 2
    assert info["snapshots"][0].startswith("migrated-from-host1-")
    assert not list((Path(cluster.workdir) / "host2" / "imports").iterdir())

    # The disk came too: the file the guest wrote at boot on host1 is in the VM's disk
    # on host2 (pulled from the source; the image itself has no such file).
    async with cluster.api(cluster.agents["host2"].url) as api:
        await api.post("/vms/mover/stop")
    disk = tmp_path / "moved.raw"
    sock = os.path.join(cluster.socket_root, "host2", "mover.sock")
    copy = await asyncio.to_thread(subprocess.run, ["nbdcopy", f"nbd+unix:///mover?socket={sock}",
                                                    str(disk)], capture_output=True, text=True,
                                   check=False, timeout=60)
    assert copy.returncode == 0, copy.stderr
    assert file_in_image(disk, "/vmname") == "mover"
    assert file_in_image(Path(test_image.image), "/vmname") is None


@pytest.mark.timeout(TEST_SECONDS)
async def test_destination_dying_midway_leaves_the_guest_at_the_source(
        cluster: LocalCluster, test_image: GuestImage) -> None:
    await start_counting(cluster, "host1", "stayer", test_image)
    # Slow the memory down so that the destination dies while it arrives: ~65 MB of a
    # booted guest's memory at 2 MB/s. The agent has not used the monitor yet, so the
    # test may (QEMU takes one monitor client at a time).
    monitor = Monitor("stayer", os.path.join(cluster.socket_root, "host1", "stayer.qmp"))
    await monitor.connect()
    await monitor.execute("migrate-set-parameters", {"max-bandwidth": 2_000_000})
    await monitor.close()

    async def migrate() -> object:
        async with cluster.api(cluster.agents["host1"].url, timeout=BODY_SECONDS) as api:
            return await api.post("/vms/stayer/migrate", json={"destination": "host2"})

    task = asyncio.create_task(migrate())
    dest_qmp = os.path.join(cluster.socket_root, "host2", "stayer.qmp")
    deadline = time.monotonic() + 60
    while not qemu_pids(dest_qmp) and not task.done():
        assert time.monotonic() < deadline, "the destination's QEMU never started"
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # memory is streaming now
    assert not task.done(), "the migration ended before the destination could die"
    cluster.kill_agent("host2")  # the whole destination host goes: agent and QEMU
    for pid in qemu_pids(dest_qmp):
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(VirtmanError) as failed:
        await asyncio.wait_for(task, 60)
    assert getattr(failed.value, "status", 502) == 502, failed.value

    async with cluster.api(cluster.agents["host1"].url) as api:
        info = await api.get("/vms/stayer")
        now = ticks(await api.get_text("/vms/stayer/console"))[-1]
    assert info["guest_running"], info
    await wait_tick(cluster, "host1", "stayer", now + 5, limit=60)
    assert (Path(cluster.workdir) / "host1" / "vms" / "stayer" / "layer-0001.overlay").exists()
    # The VM is idle again: it can be destroyed.
    async with cluster.api(cluster.agents["host1"].url) as api:
        await api.delete("/vms/stayer")

    # An agent may start a migration here only in its own name (the arriving VM's
    # frozen layer is named after its source), and an operator not at all.
    body = {"name": "intruder", "image": "guest", "source_uri": "nbd://127.0.0.1:9/x",
            "source_agent": "host3", "guest": {}, "accel": "tcg"}
    agent = Credentials(token=cluster.token("host2"), ca=cluster.ca_file)
    async with agent.api(cluster.agents["host1"].url) as api:
        with pytest.raises(ApiError) as refused:
            await api.post("/vms/incoming", json=body)
    assert refused.value.status == 403 and "may not act as agent" in str(refused.value)
    async with cluster.api(cluster.agents["host1"].url) as api:
        with pytest.raises(ApiError) as refused:
            await api.post("/vms/incoming", json=body)
        assert refused.value.status == 403
        assert (await api.get("/vms")) == []


@pytest.mark.timeout(TEST_SECONDS)
async def test_running_guest_cloned_counts_on_in_both_places(
        cluster: LocalCluster, test_image: GuestImage) -> None:
    await start_counting(cluster, "host1", "twin", test_image)
    # Through the command line, as a user would: the JSON answer, and one line for a
    # person on stderr.
    agent = cluster.agents["host1"].url
    creds = ["--token-file", cluster.token_file("operator"), "--tls-ca", cluster.ca_file]
    cli = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "virtman", "vm", "clone", "twin", "host2",
                         "--agent", agent, *creds],
        capture_output=True, text=True, check=False, timeout=BODY_SECONDS)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    assert re.search(r"twin cloned live to host2: guest paused \d+ ms \(QEMU\), \d+ ms "
                     r"measured; moved .* of memory over TLS \+ .* of disk in", cli.stderr), \
        cli.stderr
    async with cluster.api(agent) as api:
        source_info = await api.get("/vms/twin")
        at_clone = ticks(await api.get_text("/vms/twin/console"))[-1]
    assert doc["live"] is True and doc["kept"] is True, doc
    assert doc["snapshot"] in source_info["snapshots"], (doc, source_info)
    assert source_info["guest_running"], source_info

    # Both go on from the cloned state: the clone's counter starts where the source's
    # was (not at 1, as a guest that booted would), and the source's keeps counting.
    clone = await wait_tick(cluster, "host2", "twin", 1)
    assert 3 < clone[0] <= at_clone + 1, (clone[:3], at_clone)
    await wait_tick(cluster, "host2", "twin", clone[0] + 5)
    await wait_tick(cluster, "host1", "twin", at_clone + 5)
    assert (Path(cluster.workdir) / "host1" / "vms" / "twin").exists()
    async with cluster.api(cluster.agents["host2"].url) as api:
        info = await api.get("/vms/twin")
    assert info["guest_running"] and info["written_bytes"] > 0, info
