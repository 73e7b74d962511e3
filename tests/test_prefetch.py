"""Working-set prefetch over real NBD: demand first, nothing outside the profile, a
child's prefetch behind its parent's, and boot runs recorded as the VM read them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agentworld import KiB, World
from directory import StaticDirectory

from virtman.agent.agent import Agent
from virtman.agent.images import ImageRelay, ImageSpec
from virtman.agent.relays import ProfileSettings, RelayManager
from virtman.auth import Role
from virtman.blockdev.cached import CachedDevice, FetchGate
from virtman.blockdev.faults import FaultyDevice
from virtman.blockdev.manifest import compute_manifest
from virtman.blockdev.memory import MemoryDevice
from virtman.blockdev.prefetch import (
    BootRecorder,
    Prefetcher,
    PrefetchLimits,
    PrefetchState,
    RecordingDevice,
)
from virtman.blockdev.remote import RemoteDevice
from virtman.errors import ApiError, ConfigError, NetworkError
from virtman.nbd.server import Export, NbdServer
from virtman.planner.profile import profile_from_trace, run_from_reads
from virtman.protocol.nbd.constants import Command
from virtman.protocol.nbd.server import Request
from virtman.replay.replayer import replay
from virtman.replay.trace import Trace, TraceRequest

CS = 64 * 1024
CHUNKS = 64
IMAGE = os.urandom(CS * CHUNKS)


@dataclass
class Origin:
    """A real NBD server over the image, slowed down, that notes every READ it gets."""

    server: NbdServer
    uri: str
    reads: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), arrived

    def chunks_read(self) -> list[int]:
        return [c for off, n in self.reads for c in range(off // CS, (off + n - 1) // CS + 1)]


async def start_origin(tmp_path: Path, name: str, delay: float) -> Origin:
    device = FaultyDevice(MemoryDevice(data=IMAGE, read_only=True), delay=delay)
    await device.open()
    server = NbdServer([Export("img", device)])
    sock = str(tmp_path / f"{name}.sock")
    await server.listen_unix(sock)
    origin = Origin(server, f"nbd+unix:///img?socket={sock}")

    def note(request: Request) -> None:
        if request.command == Command.READ:
            origin.reads.append((request.offset, request.length))

    server.recorder = note
    return origin


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    o = await start_origin(tmp_path, "origin", delay=0.05)
    yield o
    await o.server.stop()


async def open_cache(tmp_path: Path, name: str, upstream: str, **kw: object) -> CachedDevice:
    cache = CachedDevice(RemoteDevice([upstream]), tmp_path / name, chunk_size=CS, **kw)  # type: ignore[arg-type]
    await cache.open()
    return cache


async def until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_demand_read_goes_out_before_queued_prefetch(
    tmp_path: Path, origin: Origin
) -> None:
    # Two fetch slots, one kept for demand: prefetch has one request out at a time.
    cache = await open_cache(tmp_path, "c", origin.uri, max_concurrent_fetches=2)
    profile = list(range(40))
    # A long queue allowance: prefetch wants many requests out, the gate lets one go.
    limits = PrefetchLimits(batch_bytes=CS, inflight_bytes=8 * CS, queue_seconds=10.0)
    prefetcher = Prefetcher(cache, profile, limits)
    try:
        prefetcher.start()
        # The second request is at the origin: the prefetch has measured its upstream
        # and queued more requests at the gate than it may have out.
        await until(lambda: len(origin.reads) >= 2)
        assert await cache.read(39 * CS, 100) == IMAGE[39 * CS : 39 * CS + 100]
        await prefetcher.wait()
    finally:
        await prefetcher.stop()
        await cache.close()
    order = origin.chunks_read()
    assert order.index(39) <= 3, order  # behind at most the prefetch requests already out
    assert sorted(order) == profile  # and chunk 39 was not fetched twice
    assert prefetcher.state is PrefetchState.DONE


async def test_a_miss_on_a_chunk_of_a_run_still_waiting_for_its_slot_goes_as_demand(
    tmp_path: Path, origin: Origin
) -> None:
    """A prefetch run queued at the gate has not claimed its chunks: a VM's miss on one
    of them is not a priority inversion (waiting for prefetch's slot), it goes out at
    once, and the run, once it has its slot, reads only what is still missing."""
    cache = await open_cache(tmp_path, "c", origin.uri, max_concurrent_fetches=2)
    try:  # two slots, one kept for demand: one prefetch run out at a time
        first = asyncio.ensure_future(cache.prefetch_run(0, 4))
        await until(lambda: len(origin.reads) == 1)
        queued = asyncio.ensure_future(cache.prefetch_run(36, 4))
        await asyncio.sleep(0.01)  # it waits at the gate: the first run holds the slot
        assert len(origin.reads) == 1
        assert await cache.read(38 * CS + 10, 100) == IMAGE[38 * CS + 10 : 38 * CS + 110]
        await asyncio.gather(first, queued)
        assert await cache.read(36 * CS, 4 * CS) == IMAGE[36 * CS : 40 * CS]
    finally:
        await cache.close()
    assert origin.reads[:2] == [(0, 4 * CS), (38 * CS, CS)], origin.reads  # demand 2nd
    assert sorted(origin.chunks_read()) == [0, 1, 2, 3, 36, 37, 38, 39]  # each once


async def test_the_gate_wakes_demand_before_background_and_keeps_a_slot_for_it() -> None:
    gate = FetchGate(2, reserve=0)
    order: list[str] = []

    async def take(kind: str) -> None:
        async with gate.demand() if kind == "demand" else gate.background():
            order.append(kind)

    async with gate.demand():
        async with gate.demand():  # every slot taken
            waiting = [asyncio.create_task(take("background")), asyncio.create_task(take("demand"))]
            await asyncio.sleep(0.01)
            assert order == []
        await asyncio.gather(*waiting)  # the background one asked first, demand went first
    assert order == ["demand", "background"]

    reserving = FetchGate(2, reserve=1)
    async with reserving.demand():
        with pytest.raises(TimeoutError):  # the last free slot is demand's
            async with asyncio.timeout(0.05), reserving.background():
                pass
        async with asyncio.timeout(1), reserving.demand():
            pass
    async with asyncio.timeout(1), reserving.background():  # free again: background may go
        pass
    with pytest.raises(ConfigError, match="cannot reserve"):
        FetchGate(1, reserve=1)


async def test_a_cancelled_demand_waiter_leaves_the_gate_to_background() -> None:
    gate = FetchGate(2, reserve=0)
    async with gate.demand():
        async with gate.demand():  # every slot taken
            demand = asyncio.create_task(gate.take_demand())
            await asyncio.sleep(0)
            assert gate.demand_waiting == 1
            demand.cancel()
            background = asyncio.create_task(take_background(gate))
            await asyncio.sleep(0.01)
            assert gate.demand_waiting == 0 and not background.done()
        # A slot is free and no demand waits any more: the background fetch goes.
        async with asyncio.timeout(1):
            await background
    async with asyncio.timeout(1):  # both slots back: a demand fetch takes one at once
        await gate.take_demand()
    gate.release()


async def take_background(gate: FetchGate) -> None:
    async with gate.background():
        pass


async def test_prefetch_reads_only_the_profile_and_only_what_is_missing(
    tmp_path: Path, origin: Origin
) -> None:
    cache = await open_cache(tmp_path, "c", origin.uri)
    try:
        assert await cache.read(5 * CS, CS) == IMAGE[5 * CS : 6 * CS]  # already held
        origin.reads.clear()
        profile = [9, 5, 10, 11, 30, 2, 3]
        prefetcher = Prefetcher(cache, profile, PrefetchLimits(batch_bytes=4 * CS))
        prefetcher.start()
        await prefetcher.wait()
        assert sorted(origin.chunks_read()) == [2, 3, 9, 10, 11, 30]
        assert len(origin.reads) == 3  # 9-11, 30 and 2-3: one request per run
        assert prefetcher.bytes_fetched == 6 * CS
        for c in profile:  # every chunk checked and held: reads are hits now
            assert cache.is_present(c)
        hits = cache.stats.extra.get("hits", 0)
        assert await cache.read(9 * CS, 3 * CS) == IMAGE[9 * CS : 12 * CS]
        assert cache.stats.extra["hits"] == hits + 1
        assert len(origin.reads) == 3
    finally:
        await cache.close()


async def test_a_childs_prefetch_fills_from_its_parent_while_the_parent_fills(
    tmp_path: Path, origin: Origin
) -> None:
    parent = await open_cache(tmp_path, "parent", origin.uri)
    relay = NbdServer([Export("img", parent)])
    sock = str(tmp_path / "parent.sock")
    await relay.listen_unix(sock)
    child = await open_cache(tmp_path, "child", f"nbd+unix:///img?socket={sock}")
    profile = list(range(0, CHUNKS, 2))  # 32 chunks, one per request: the parent is slow
    limits = PrefetchLimits(batch_bytes=CS, inflight_bytes=2 * CS)
    up, down = Prefetcher(parent, profile, limits), Prefetcher(child, profile, limits)
    try:
        up.start()
        down.start()
        await until(lambda: child.chunks_present > 0)
        assert up.state is PrefetchState.RUNNING
        assert parent.chunks_present < len(profile)  # the parent was still filling
        await asyncio.gather(up.wait(), down.wait())
        assert sorted(origin.chunks_read()) == profile  # the child's came from the parent
        assert [child.is_present(c) for c in profile] == [True] * len(profile)
        assert await child.read(0, CS) == IMAGE[:CS]
    finally:
        await up.stop()
        await down.stop()
        await child.close()
        await relay.stop()
        await parent.close()


async def test_prefetch_stops_cleanly_mid_run(tmp_path: Path, origin: Origin) -> None:
    cache = await open_cache(tmp_path, "c", origin.uri)
    prefetcher = Prefetcher(cache, list(range(CHUNKS)), PrefetchLimits(batch_bytes=CS,
                                                                       inflight_bytes=CS))
    prefetcher.start()
    await until(lambda: cache.chunks_present >= 2)
    await prefetcher.stop()
    assert prefetcher.state is PrefetchState.STOPPED
    held = cache.chunks_present
    await asyncio.sleep(0.2)
    assert cache.chunks_present == held  # nothing more arrives once stopped
    assert await cache.read(CS * (CHUNKS - 1), CS) == IMAGE[-CS:]  # demand still works
    await cache.close()
    await prefetcher.stop()  # twice is harmless


async def test_a_recorder_notes_each_chunks_first_read_in_its_window(
    tmp_path: Path, origin: Origin
) -> None:
    cache = await open_cache(tmp_path, "c", origin.uri)
    now = [100.0]
    recorder = BootRecorder(CS, record_seconds=10.0, clock=lambda: now[0])
    view = RecordingDevice(cache, recorder)
    try:
        await view.open()
        assert view.size == cache.size
        reads = [(0.0, 3 * CS + 10, 100), (1.5, 0, 2 * CS), (2.0, 3 * CS, 10), (9.0, 7 * CS, 1)]
        for t, offset, length in reads:
            now[0] = 100.0 + t
            assert await view.read(offset, length) == IMAGE[offset : offset + length]
        now[0] = 111.0
        await view.read(20 * CS, CS)  # past the window: not part of the boot
        await view.close()
        assert cache.state.value == "open"  # the view owns nothing
        run = recorder.run()
        assert run is not None
        assert [(e.chunk, e.seconds) for e in run.entries] == [(3, 0.0), (0, 1.5), (1, 1.5),
                                                                (7, 9.0)]
    finally:
        await cache.close()


# --- with Volt: recorded, merged, prefetched, and the second boot free ------------------------


def spaced_trace(chunks: list[int], *, chunk: int = 64 * KiB) -> Trace:
    """Reads of ``chunks`` (one 4 KiB read each), 5 ms apart: each its own batch, so the
    VM reads them in this order."""
    return Trace("spaced", tuple(
        TraceRequest(i * 0.005, "read", c * chunk + 512, 4096) for i, c in enumerate(chunks)
    ))


async def create_vm(w: World, agent: Agent, name: str) -> str:
    async with w.api(agent.url) as api:
        doc = await api.post("/vms", json={"name": name, "image": "img"})
    return str(doc["uri"])


async def test_a_recorded_profile_is_the_chunks_a_boot_read_in_order(world: World) -> None:
    agent = await world.agent("h1", profiles=ProfileSettings(record_seconds=1.0))
    order = [40, 3, 17, 4, 5, 60, 0, 33]
    uri = await create_vm(world, agent, "vm1")
    result = await replay(uri, spaced_trace(order))
    assert result.errors == 0
    async with world.api(world.volt_url) as api:
        async with asyncio.timeout(10):
            while True:  # sent once the VM's recording window (1 s) is over
                try:
                    doc = await api.get("/images/img/profile")
                    break
                except ApiError as err:
                    assert err.status == 404
                    await asyncio.sleep(0.1)
    assert [e[0] for e in doc["entries"]] == order
    assert doc["runs"] == 1 and doc["chunks"] == len(order)
    assert doc["bytes"] == len(order) * 64 * KiB


async def test_an_agent_prefetches_volts_profile_and_a_second_boot_sends_nothing(
    world: World, tmp_path: Path
) -> None:
    order = [9, 10, 11, 2, 50, 51]
    trace = spaced_trace(order)
    async with world.api(world.volt_url) as api:
        rows = ((r.t, r.op, r.offset, r.length) for r in trace.requests)
        profile = profile_from_trace(rows, 64 * KiB, world.image_size)
        await api.put("/images/img/profile", json=profile.to_doc())
    agent = await world.agent("h1", profiles=ProfileSettings(record=False))
    await create_vm(world, agent, "vm1")
    relay = agent.relays.get("img")
    assert relay is not None and relay.prefetcher is not None
    await relay.prefetcher.wait()
    assert relay.prefetcher.state is PrefetchState.DONE
    assert [c for c in range(relay.cache.chunks) if relay.cache.is_present(c)] == sorted(order)
    received = sum(relay.bytes_received().values())
    assert received == len(order) * 64 * KiB  # the profile, nothing else
    # Boots on this host now read only what the cache holds: no byte crosses the network.
    for vm in ("vm2", "vm3"):
        result = await replay(await create_vm(world, agent, vm), trace)
        assert result.errors == 0
        assert sum(relay.bytes_received().values()) == received
    async with world.api(agent.url) as api:
        status = await api.get("/status")
        metrics = await api.get_text("/metrics")
    assert status["images"]["img"]["prefetch"]["state"] == "done"
    assert f'virtman_prefetched_bytes_total{{image="img"}} {float(received)}' in metrics


async def test_the_profile_cli_shows_exports_imports_seeds_and_clears(
    world: World, tmp_path: Path
) -> None:
    token = world.token(Role.OPERATOR, "alice")
    viewer = world.token(Role.VIEWER, "carol")

    async def cli(*args: str, who: str = token) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "virtman", "image", "profile", "img", *args,
            "--volt", world.volt_url, "--token", who, "--tls-ca", str(world.ca),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await cli()
    assert code == 1 and "has no boot profile yet" in out
    trace = tmp_path / "boot.csv"
    trace.write_text("t,op,offset,length\n0.0,read,655360,4096\n0.5,write,0,4096\n"
                     "1.25,read,0,131072\n")
    code, out = await cli("--from-trace", str(trace))
    assert code == 0, out
    doc = json.loads(out)  # piped: JSON
    assert [e[:2] for e in doc["entries"]] == [[10, 0.0], [0, 1.25], [1, 1.25]]
    code, out = await cli("--export", str(tmp_path / "p.json"))
    assert code == 0 and "3 chunks written" in out
    exported = json.loads((tmp_path / "p.json").read_text())
    assert exported["entries"] == doc["entries"] and exported["chunk_size"] == 64 * KiB
    code, out = await cli("--clear")
    assert code == 0
    code, out = await cli("--import", str(tmp_path / "p.json"), who=viewer)
    assert code == 1 and "may not PUT" in out  # changing a profile is an operator's
    code, out = await cli("--import", str(tmp_path / "p.json"))
    assert code == 0 and json.loads(out)["entries"] == doc["entries"]
    (tmp_path / "bad.json").write_text(json.dumps({**exported, "entries": [[10**6, 0.0]]}))
    code, out = await cli("--import", str(tmp_path / "bad.json"))
    assert code == 1 and "chunk 1000000 is not in 0..63" in out
    code, out = await cli(who=viewer)  # reading it is anyone's
    assert code == 0 and json.loads(out)["chunks"] == 3


async def test_the_in_flight_budget_follows_the_measured_rate(
    tmp_path: Path, origin: Origin
) -> None:
    cache = await open_cache(tmp_path, "c", origin.uri)
    now = [0.0]
    limits = PrefetchLimits(batch_bytes=16 * CS, inflight_bytes=32 * CS, queue_seconds=0.05)
    try:
        prefetcher = Prefetcher(cache, [0], limits, clock=lambda: now[0])
        assert prefetcher._budget() == 4 * CS  # nothing measured yet: a few chunks
        for t in range(10):  # 1 MB/s: 50 ms of it is less than a chunk
            now[0] = t * 0.1
            prefetcher._rate.add(now[0], 100_000)
        assert prefetcher._budget() == 2 * CS  # the floor: a request per parent
        for t in range(10):  # ~2 GB/s: capped at inflight_bytes
            now[0] = 1.0 + t * 0.01
            prefetcher._rate.add(now[0], 20_000_000)
        assert prefetcher._budget() == 32 * CS
        now[0] = 5.0  # nothing for longer than the window: measure again from the start
        assert prefetcher._budget() == 4 * CS
    finally:
        await cache.close()


async def test_a_prefetch_whose_upstream_fails_stops_after_one_run(tmp_path: Path) -> None:
    broken = await start_origin(tmp_path, "broken", delay=0.0)
    failing = broken.server.exports["img"].device
    assert isinstance(failing, FaultyDevice)
    failing.fail_reads = 10_000
    cache = await open_cache(tmp_path, "c", broken.uri)
    prefetcher = Prefetcher(cache, list(range(CHUNKS)), PrefetchLimits(batch_bytes=4 * CS))
    try:
        prefetcher.start()
        await asyncio.wait_for(prefetcher.wait(), 30)
        assert prefetcher.state is PrefetchState.FAILED
        assert prefetcher.bytes_fetched == 0 and cache.chunks_present == 0
        # One run's worth of attempts (the run, then its chunks alone, each retried),
        # not the whole profile's.
        assert set(broken.chunks_read()) <= set(range(4 * 4)), broken.chunks_read()
    finally:
        await prefetcher.stop()
        await cache.close()
        await broken.server.stop()


async def test_a_childs_prefetch_is_background_work_at_its_parent(
    tmp_path: Path, origin: Origin
) -> None:
    manifest = await compute_manifest(MemoryDevice(data=IMAGE, read_only=True), CS)
    spec = ImageSpec("img", [origin.uri], len(IMAGE), CS, manifest.to_json())
    profile = run_from_reads([(i * 0.01, c) for i, c in enumerate(range(0, CHUNKS, 3))], CS)
    root = RelayManager(str(tmp_path / "h1"), StaticDirectory(spec, [], profile),
                        profiles=ProfileSettings(record=False))
    await root.start()
    child: RelayManager | None = None
    try:
        first = await root.image("img")
        assert first.prefetcher is not None
        await first.prefetcher.wait()
        child = RelayManager(str(tmp_path / "h2"),
                             StaticDirectory(spec, [root.relay_uri("img")], profile),
                             profiles=ProfileSettings(record=False))
        await child.start()
        second = await child.image("img")
        assert second.prefetcher is not None
        await second.prefetcher.wait()
        assert second.prefetcher.state is PrefetchState.DONE
        assert [second.cache.is_present(c) for c in profile.chunks] == [True] * len(profile.chunks)
        # The child read its parent's prefetch export only, on connections of its own:
        sent = root.server.exports_bytes_sent()
        assert sent.get("img@prefetch", 0) == len(profile.chunks) * CS
        assert sent.get("img", 0) == 0
        received = {k: v for k, v in second.bytes_received().items() if v}
        assert received == {"p" + root.relay_uri("img"): len(profile.chunks) * CS}
        assert root.status()["images"]["img"]["relay_bytes_sent"] == len(profile.chunks) * CS
        # ... and no chunk was fetched twice from the origin.
        assert sorted(origin.chunks_read()) == sorted(profile.chunks)
    finally:
        if child is not None:
            await child.stop()
        await root.stop()


async def test_a_relays_first_open_waits_for_a_late_origin_within_its_bound(
    tmp_path: Path
) -> None:
    sock = tmp_path / "late.sock"
    spec = ImageSpec("img", [f"nbd+unix:///img?socket={sock}"], len(IMAGE), CS,
                     (await compute_manifest(MemoryDevice(data=IMAGE, read_only=True), CS))
                     .to_json())
    exports = NbdServer([])
    # Nobody answers within the bound: the open fails with the upstream's error.
    hopeless = ImageRelay(spec, str(tmp_path / "a"), exports, "nbd://127.0.0.1:9/img",
                          open_wait=0.5)
    with pytest.raises(NetworkError, match="no upstream path"):
        await hopeless.open()
    # The origin comes up after a second: the open waits for it instead of failing.
    device = MemoryDevice(data=IMAGE, read_only=True)
    origin = NbdServer([Export("img", device)])

    async def late() -> None:
        await asyncio.sleep(1.0)
        await origin.listen_unix(str(sock))

    starter = asyncio.create_task(late())
    relay = ImageRelay(spec, str(tmp_path / "b"), exports, "nbd://127.0.0.1:9/img",
                       open_wait=20.0)
    try:
        await relay.open()
        assert await relay.cache.read(0, CS) == IMAGE[:CS]
    finally:
        await starter
        await relay.close()
        await origin.stop()
