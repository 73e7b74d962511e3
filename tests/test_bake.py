"""Prebaked µVMs with real QEMU (TCG): bake a counting guest on one agent, resume clones
of it on two agents through the relay tree, size them by hot-plug."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from guestworld import guest_cluster, make_guest_image

from virtman.agent.bakes import BakeManager, BakeRecord
from virtman.agent.relays import RelayManager
from virtman.agent.vm_manager import VmManager
from virtman.agent.voltlink import VoltLink
from virtman.blockdev import MemoryDevice
from virtman.blockdev.chunkstore import ChunkStore
from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.coordinator.models import BakeCreate
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Volt
from virtman.errors import ApiError, ConfigError, Conflict, NotFound
from virtman.hypervisor.testimage import MARKER, TICK, GuestImage
from virtman.nbd.server import NbdServer

#: Seconds the cluster gets to start (processes, image registration).
SETUP_SECONDS = 60
#: Seconds the test body gets: one TCG boot to the third tick (~20 s on two busy
#: cores), saving ~250 MB of state, Volt digesting it, and two resumes.
BODY_SECONDS = 300
TEST_SECONDS = SETUP_SECONDS + BODY_SECONDS + 20
#: The guest's memory: Debian's initrd does not unpack in 256 MiB.
MEMORY_MIB = 384
#: Its room to grow: one more CPU, one hot-plugged memory block.
MAX_CPUS = 2
MAX_MEMORY_MIB = MEMORY_MIB + 128

TICK_LINE = re.compile(rf"{TICK} (\d+) cpus=(\S+) MemTotal:\s+(\d+) kB")


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return make_guest_image(tmp_path_factory)


@pytest.fixture
async def cluster(tmp_path: Path, test_image: GuestImage) -> AsyncIterator[LocalCluster]:
    async with guest_cluster(tmp_path / "cluster", test_image, ClusterSettings(
        hosts=2, heartbeat_interval=0.5, heartbeat_timeout=2.0, chunk_size=256 * 1024,
        accel="tcg")) as c:
        yield c


def disk_bytes(root: Path) -> tuple[int, int]:
    """Files under ``root`` and the bytes they take on disk (allocated blocks)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_blocks * 512 for p in files)


async def console_ticks(c: LocalCluster, host: str, vm: str, pattern: str) -> list[re.Match[str]]:
    """The guest's ticks once ``pattern`` is on its console (the wait fails otherwise)."""
    async with c.api(c.agents[host].url, timeout=90) as api:
        done = await api.get(f"/vms/{vm}/console/wait",
                             params={"pattern": pattern, "timeout": 60})
        text = await api.get_text(f"/vms/{vm}/console")
    assert done["matched"], f"{vm} on {host}: {pattern!r} not seen; console ends {text[-300:]!r}"
    return list(TICK_LINE.finditer(text))


async def virtman(c: LocalCluster, *args: str) -> str:
    """Run the CLI as an operator; its standard output (it must succeed)."""
    creds = ["--token-file", c.token_file("operator"), "--tls-ca", c.ca_file]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtman", *args, *creds,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"virtman {' '.join(args)}: {err.decode()[-500:]}"
    return out.decode()


async def resume(c: LocalCluster, host: str, name: str, **size: int) -> dict[str, Any]:
    async with c.api(c.agents[host].url, timeout=120) as api:
        doc: dict[str, Any] = await api.post(
            "/vms", json={"name": name, "from_bake": "uvm", "start": True, **size})
    return doc


@pytest.mark.timeout(TEST_SECONDS)
async def test_bake_then_resume_on_two_agents(cluster: LocalCluster,
                                              test_image: GuestImage) -> None:
    c = cluster
    h0, h1 = c.host_names()
    async with asyncio.timeout(BODY_SECONDS):
        # Through the CLI, as the README shows it.
        baked = json.loads(await virtman(
            c, "bake", "create", "uvm", "--image", "guest", "--accel", "tcg",
            "--ready-marker", rf"{TICK} 3 ", "--kernel", test_image.kernel,
            "--initrd", test_image.initrd, "--append", test_image.append("uvm", loop=True),
            "--memory", str(MEMORY_MIB), "--max-cpus", str(MAX_CPUS),
            "--max-memory", str(MAX_MEMORY_MIB), "--agent", c.agents[h0].url))
        assert baked["state_bytes"] > 0 and baked["accel"] == "tcg"
        async with c.api(c.volt_url) as api:
            record = await api.get("/bakes/uvm")
            images = {i["name"]: i for i in await api.get("/images")}
        assert record["agent"] == h0 and record["state_image"] in images
        assert images[record["state_image"]]["size"] >= record["state_bytes"]
        assert images[record["disk_image"]]["size"] == images["guest"]["size"]

        # The state's bytes on disk are the host store's, compressed: no raw file is
        # kept in the bake's directory, and the store's blobs take less than the state.
        data0 = Path(c.workdir) / h0
        assert sorted(p.name for p in (data0 / "bakes" / "uvm").iterdir()) == ["bake.json"]
        blobs, stored = disk_bytes(data0 / "store" / "blobs")
        assert blobs > 0 and 0 < stored < baked["state_bytes"] * 0.9, (blobs, stored)

        # A baking agent killed and restarted serves its bake again (bake.json was
        # durable before Volt was told): both resumes below read through its exports.
        c.kill_agent(h0)
        await c.start_agent(h0)
        async with c.api(c.agents[h0].url) as api:
            assert [b["name"] for b in await api.get("/bakes")] == ["uvm"]

            # The bake's own VM is held as it was baked while the bake is served.
            with pytest.raises(ApiError) as held:
                await api.delete("/vms/uvm.bake")
            assert held.value.status == 409 and "serving bake" in held.value.detail

        # The baking host resumes from its own cache; the other has never seen the bake.
        local = await resume(c, h0, "a")
        # The other through the CLI, which prints the resume time.
        out = await virtman(c, "vm", "create", "b", "--from-bake", "uvm", "--start",
                            "--cpus", str(MAX_CPUS), "--memory", str(MAX_MEMORY_MIB),
                            "--agent", c.agents[h1].url)
        assert re.search(r"^resume_seconds \d+\.\d+$", out, re.M), out
        async with c.api(c.agents[h1].url) as api:
            grown = await api.get("/vms/b")
        for doc in (local, grown):
            assert doc["guest_running"] and 0 < doc["resume_seconds"] < 60
            assert doc["resumed"]["bake"] == "uvm"
        assert grown["resumed"]["cpus"] == MAX_CPUS
        assert grown["resumed"]["memory_mib"] == MAX_MEMORY_MIB
        # Clones of one bake get fresh generation IDs (vmgenid), so they reseed.
        assert local["resumed"]["generation_id"] != grown["resumed"]["generation_id"]

        # Each goes on counting from where the bake stopped it: no boot, first tick past 3.
        ticks_a = await console_ticks(c, h0, "a", rf"{TICK} \d+ ")
        ticks_b = await console_ticks(c, h1, "b", rf"{TICK} \d+ cpus=0-1 ")
        for ticks in (ticks_a, ticks_b):
            assert ticks and int(ticks[0].group(1)) > 3
            numbers = [int(t.group(1)) for t in ticks]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        async with c.api(c.agents[h1].url) as api:
            assert MARKER not in await api.get_text("/vms/b/console")
        # The hot-plugged CPU came online in the guest; the small clone kept one.
        assert ticks_a[-1].group(2) == "0"
        assert ticks_b[-1].group(2) == "0-1"
        # Beyond the bake's room to grow: refused, and no VM is left behind.
        async with c.api(c.agents[h0].url, timeout=60) as api:
            with pytest.raises(ApiError) as too_big:
                await api.post("/vms", json={"name": "c", "from_bake": "uvm", "start": True,
                                             "cpus": MAX_CPUS + 1})
            assert too_big.value.status == 422 and "CPUs" in too_big.value.detail
            assert "c" not in {vm["name"] for vm in await api.get("/vms")}
        # The hot-plugged memory too, once the guest's loop onlined it (a tick later).
        baked_kb = int(ticks_a[0].group(3))
        for _ in range(60):
            mem_b = await console_ticks(c, h1, "b", rf"{TICK} \d+ ")
            if int(mem_b[-1].group(3)) > baked_kb:
                break
            await asyncio.sleep(0.5)
        assert int(mem_b[-1].group(3)) >= baked_kb + 100 * 1024, mem_b[-1].group(0)

        # Removed once its clones are gone: from Volt (with its images) and its agent.
        for host, vm in ((h0, "a"), (h1, "b")):
            async with c.api(c.agents[host].url) as api:
                await api.delete(f"/vms/{vm}")
        listed = json.loads(await virtman(c, "bake", "list", "--json", "--volt", c.volt_url))
        assert [b["name"] for b in listed] == ["uvm"]
        await virtman(c, "bake", "remove", "uvm", "--volt", c.volt_url)
        async with c.api(c.volt_url) as api:
            assert await api.get("/bakes") == []
            assert {i["name"] for i in await api.get("/images")} == {"guest"}
        async with c.api(c.agents[h0].url) as api:
            assert await api.get("/bakes") == []
            assert await api.get("/vms") == []  # the bake's own VM went with it
        # And its state's bytes left the disk with it.
        assert disk_bytes(data0 / "store" / "blobs") == (0, 0)


@pytest.mark.timeout(TEST_SECONDS)
async def test_resume_refuses_bad_input(cluster: LocalCluster) -> None:
    c = cluster
    h0 = c.host_names()[0]
    async with c.api(c.agents[h0].url, timeout=60) as api:
        with pytest.raises(ApiError) as unknown:
            await api.post("/vms", json={"name": "x", "from_bake": "nope", "start": True})
        assert unknown.value.status == 404 and "nope" in unknown.value.detail
        with pytest.raises(ApiError) as no_start:
            await api.post("/vms", json={"name": "x", "from_bake": "nope"})
        assert no_start.value.status == 422 and "start" in no_start.value.detail
        with pytest.raises(ApiError) as two:
            await api.post("/bakes", json={"name": "b", "image": "guest", "ready_after": 1,
                                           "ready_marker": "x"})
        assert two.value.status == 422 and "ready_marker" in two.value.detail
        with pytest.raises(ApiError) as too_long:
            await api.post("/bakes", json={"name": "b" * 60, "image": "guest",
                                           "ready_after": 1})
        assert too_long.value.status == 422 and "too long" in too_long.value.detail
        with pytest.raises(ApiError) as no_image:
            await api.post("/bakes", json={"name": "b", "image": "none", "ready_after": 1})
        assert no_image.value.status == 404
        assert await api.get("/vms") == [] and await api.get("/bakes") == []


# --- Volt's bake records (no QEMU) -----------------------------------------------------------


@pytest.fixture
async def exports(tmp_path: Path) -> AsyncIterator[str]:
    """An NBD server standing in for a baking agent: a state and a disk export."""
    server = NbdServer({"uvm@bake-state": MemoryDevice(data=b"S" * 8192),
                        "uvm@bake-disk": MemoryDevice(data=bytes(range(256)) * 64)})
    sock = tmp_path / "agent.sock"
    await server.listen_unix(str(sock))
    yield str(sock)
    await server.stop()


def bake_request(sock: str, *, state_bytes: int = 8000, disk: str = "uvm@bake-disk",
                 ) -> BakeCreate:
    return BakeCreate(
        name="uvm", agent="host1", image="guest", state_bytes=state_bytes, chunk_size=4096,
        state_origin=f"nbd+unix:///uvm@bake-state?socket={sock}",
        disk_origin=f"nbd+unix:///{disk}?socket={sock}",
        guest={"memory_mib": 384, "cpus": 1}, accel="tcg")


async def test_volt_keeps_a_bake_with_its_two_images(tmp_path: Path, exports: str) -> None:
    db = str(tmp_path / "volt.db")
    volt = Volt(VoltState(db))
    bake = await volt.add_bake(bake_request(exports))
    assert (bake.state_image, bake.disk_image) == ("uvm.state", "uvm.disk")
    assert bake.disk_bytes == 256 * 64 and bake.state_bytes == 8000
    assert {i.name: i.size for i in volt.images()} == {"uvm.state": 8192, "uvm.disk": 16384}
    with pytest.raises(Conflict):
        await volt.add_bake(bake_request(exports))
    with pytest.raises(Conflict, match="belongs to bake 'uvm'"):
        volt.remove_image("uvm.disk")
    await volt.stop()

    volt = Volt(VoltState(db))  # a restarted Volt has it, from SQLite
    assert volt.bake("uvm") == bake
    volt.remove_bake("uvm")
    assert volt.bakes() == [] and volt.images() == []
    with pytest.raises(NotFound):
        volt.bake("uvm")
    await volt.stop()


async def test_volt_keeps_nothing_of_a_bake_it_refuses(tmp_path: Path, exports: str) -> None:
    volt = Volt(VoltState(str(tmp_path / "volt.db")))
    # The state export is shorter than the state it claims to hold.
    with pytest.raises(ConfigError, match="less than the 9000"):
        await volt.add_bake(bake_request(exports, state_bytes=9000))
    # The disk export does not exist: the state image registered first is removed again.
    with pytest.raises(ConfigError, match=r"uvm\.disk"):
        await volt.add_bake(bake_request(exports, disk="nothing"))
    assert volt.bakes() == [] and volt.images() == []
    await volt.stop()


# --- The agent's host store of bake states (no QEMU) -----------------------------------------


async def test_bake_store_settles_what_a_crash_or_an_older_agent_left(tmp_path: Path) -> None:
    """At start: a recipe whose bake never reached its directory (a crash between the
    import and the rename) is removed with its bytes; a bake's recipe is kept; a state
    file an older agent kept is imported and deleted; other recipes are not touched."""
    data = tmp_path / "agent"
    rng = random.Random(7)
    states = {n: rng.randbytes(256 * 1024) * 2 + bytes(256 * 1024) for n in ("ghost", "kept")}
    with ChunkStore.open(str(data / "store")) as store:
        for name, state in states.items():
            with store.writer(f"bake/{name}/state") as w:
                w.write(state)
                w.commit()
        with store.writer("image/other") as w:
            w.write(rng.randbytes(256 * 1024))
            w.commit()
    for name in ("kept", "old"):
        (data / "bakes" / name).mkdir(parents=True)
        BakeRecord(name, "guest", f"{name}.bake", {}, "tcg", 1000, "after 1 s", 1.0).save(
            str(data / "bakes" / name / "bake.json"))
    old_state = rng.randbytes(256 * 1024)
    (data / "bakes" / "old" / "state").write_bytes(old_state)
    (data / "bakes" / ".unfinished-1234").mkdir()
    blobs_before = disk_bytes(data / "store" / "blobs")

    async def no_reply(_reply: Any) -> None:
        return None

    # Never started: nothing is registered, no heartbeat is sent.
    link = VoltLink("a", "http://127.0.0.1:9", report=dict, on_reply=no_reply)
    relays = RelayManager(str(data / "cache"), link)
    manager = BakeManager(str(data), VmManager("a", str(data), str(tmp_path / "s"), relays),
                          relays, link, agent="a")
    await manager.start()
    try:
        # Their VMs are gone, so neither is served; both are kept for the operator.
        assert manager.bakes == {}
        assert sorted(os.listdir(data / "bakes")) == ["kept", "old"]
        assert not (data / "bakes" / "old" / "state").exists()
        store = manager.store
        assert store.recipes() == ["bake/kept/state", "bake/old/state", "image/other"]
        assert store.read("bake/old/state") == old_state
        assert store.read("bake/kept/state") == states["kept"]
        # The ghost's one distinct chunk (its data chunk twice, a zero chunk) went; the
        # old bake's one came.
        assert blobs_before[0] == 3
        files, _ = disk_bytes(data / "store" / "blobs")
        assert files == 3 - 1 + 1
        assert store.missing("bake/kept/state") == {}
    finally:
        await manager.stop()
