"""Clone and migrate that cannot take a VM offline: silent, dying and stalling peers.

An origin, Volt and the agents run in this test's event loop (``agentworld``); the VM
is read and written over its real NBD export with the project's ``NbdClient`` while
the copy runs, and destinations that misbehave are plain TCP listeners of the test,
registered with Volt under agent names of their own (a destination is always a name
Volt knows). The world runs on plain HTTP with tokens: a listener that stands in for an
agent has no certificate of that agent (test_auth.py covers TLS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agentworld import KiB, MiB, World

from virtman.agent.copy import CopyLimits
from virtman.auth import Role
from virtman.errors import ApiError, Conflict, NbdRequestError, NetworkError, NotFound
from virtman.nbd.client import NbdClient

SMALL = CopyLimits(connect_timeout=1.0, idle_timeout=1.0, total_timeout=20.0, record_bytes=64 * KiB)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path, tls=False)
    try:
        await w.start()
        yield w
    finally:
        await w.stop()


class Silent:
    """A TCP listener that accepts every connection and never reads or answers."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self) -> str:
        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self._writers.append(w)
            w.transport.pause_reading()  # reads nothing: the sender's buffers fill up

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class Reader:
    """Reads the VM's export over and over until stopped; keeps the longest gap."""

    def __init__(self, client: NbdClient, want: bytes) -> None:
        self.client = client
        self.want = want
        self.reads = 0
        self.longest_gap = 0.0
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = time.monotonic()
        offset = 0
        while not self._stop.is_set():
            try:
                data = await asyncio.wait_for(self.client.read(offset, 64 * KiB), 5)
                assert data == self.want[offset : offset + 64 * KiB], f"wrong bytes at {offset}"
            except (AssertionError, NbdRequestError, NetworkError, TimeoutError) as err:
                self.errors.append(err)
                return
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.reads += 1
            offset = (offset + 64 * KiB) % len(self.want)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def make_vm(world: World, agent_name: str, limits: CopyLimits = SMALL):
    agent = await world.agent(agent_name, limits)
    vm = await agent.vms.create("vm", "img")
    client = await NbdClient.connect(vm.uri)
    want = bytearray(world.image)
    for i in range(4):  # 4 runs of 96 KiB: several records of 64 KiB
        data = bytes([0x50 + i]) * (96 * KiB)
        await client.write(i * MiB + 512, data)
        want[i * MiB + 512 : i * MiB + 512 + len(data)] = data
    await client.flush()
    return agent, vm, client, want


async def test_migrate_to_a_silent_listener_fails_in_time_and_the_vm_serves_throughout(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    limits = CopyLimits(connect_timeout=1.0, idle_timeout=2.0, total_timeout=20.0,
                        record_bytes=64 * KiB)
    agent, vm, client, want = await make_vm(world, "host1", limits)
    silent = Silent()
    url = await silent.start()
    reader = Reader(client, bytes(want))
    reader.start()
    caplog.set_level(logging.INFO, logger="virtman.agent")
    try:
        started = time.monotonic()
        await world.pose_as_agent("silent", url)
        migrate = asyncio.ensure_future(agent.copy_vm("vm", "silent", move=True))
        await asyncio.sleep(0.4)
        # Meanwhile: nothing else may change the VM, and a write waits (the last pass
        # holds writes) rather than failing.
        with pytest.raises(Conflict, match="busy: migrate"):
            await agent.vms.snapshot("vm", "s1")
        with pytest.raises(Conflict, match="busy: migrate"):
            await agent.vms.destroy("vm")
        late = asyncio.ensure_future(client.write(3 * MiB, b"\x77" * 4096))
        with pytest.raises(NetworkError, match="COPY_IDLE_TIMEOUT_SECONDS=2") as info:
            await migrate
        elapsed = time.monotonic() - started
        await asyncio.wait_for(late, 5)  # the held write went on here once the copy failed
        want[3 * MiB : 3 * MiB + 4096] = b"\x77" * 4096
        reader.want = bytes(want)
    finally:
        await reader.stop()
        await silent.close()
    assert silent.accepted == 1
    assert "silent" in str(info.value) and url in str(info.value)
    assert limits.idle_timeout <= elapsed < limits.connect_timeout + limits.idle_timeout + 3
    assert reader.errors == [], reader.errors
    assert reader.reads >= 20, f"only {reader.reads} reads in {elapsed:.1f} s"
    # Never blocked for the wait: reads came well within each idle period.
    assert reader.longest_gap < limits.idle_timeout / 2, (
        f"the VM went unread for {reader.longest_gap:.2f} s")
    # Still here, still the same VM, exported, writable, not busy.
    assert agent.vms.get("vm") is vm and vm.operation is None
    assert vm.info()["state"] == "running"
    assert await client.read(0, world.image_size) == bytes(want)
    await asyncio.wait_for(client.write(0, b"\x01" * 512), 5)
    assert any(
        "migrate to" in r.message and "failed" in r.message and "stays here" in r.message
        for r in caplog.records
    ), [r.message for r in caplog.records]
    await client.close()


async def test_copy_to_a_listener_that_never_accepts_fails_on_the_connect_timeout(
    world: World,
) -> None:
    agent, vm, client, want = await make_vm(world, "host1")
    # A backlog of one, filled: further connections are never completed.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    await asyncio.sleep(0.1)
    await world.pose_as_agent("filled", f"http://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        with pytest.raises(NetworkError, match="COPY_CONNECT_TIMEOUT_SECONDS=1"):
            await agent.copy_vm("vm", "filled", move=False)
        assert time.monotonic() - started < SMALL.connect_timeout + 2
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert agent.vms.get("vm") is vm and vm.operation is None
    assert await client.read(0, world.image_size) == bytes(want)
    await client.close()


class Cutter:
    """A TCP proxy in front of an agent that forwards `cut_after` bytes of the upload,
    then resets both sides: a destination dying midway, as its source sees it."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.forwarded = 0
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        _, uw = await asyncio.open_connection(*self.target)  # its answers never matter here
        self._writers += [cw, uw]
        while self.forwarded < self.cut_after:
            data = await cr.read(min(64 * KiB, self.cut_after - self.forwarded))
            if not data:
                break
            uw.write(data)
            await uw.drain()
            self.forwarded += len(data)
        self.cut.set()
        uw.transport.abort()
        cw.transport.abort()


@pytest.mark.parametrize("move", [True, False], ids=["migrate", "clone"])
async def test_destination_lost_midway_leaves_the_source_serving_and_no_half_vm(
    world: World, move: bool
) -> None:
    agent, vm, client, want = await make_vm(world, "host1")
    dest = await world.agent("host2", SMALL)
    await dest.vms.create("other", "img")  # host2 holds the image: the copy gets under way
    cutter = Cutter(dest.url, 200 * KiB)  # inside the stream (about 400 KiB of records)
    await world.pose_as_agent("cutter", await cutter.start())
    reader = Reader(client, bytes(want))
    reader.start()
    try:
        with pytest.raises((NetworkError, ApiError)):
            await agent.copy_vm("vm", "cutter", move=move)
    finally:
        await reader.stop()
        await cutter.close()
    assert cutter.cut.is_set() and cutter.forwarded == 200 * KiB
    assert reader.errors == [] and reader.reads > 0
    assert agent.vms.get("vm") is vm and vm.operation is None
    assert await client.read(0, world.image_size) == bytes(want)
    # The destination noticed the cut on its own and kept nothing of it.
    imports = Path(world.tmp) / "host2" / "imports"
    deadline = time.monotonic() + 10
    while os.listdir(imports) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert os.listdir(imports) == []
    assert [v.name for v in dest.vms.list()] == ["other"]
    assert sorted(os.listdir(Path(world.tmp) / "host2" / "vms")) == ["other"]
    assert "vm" not in dest.relays.get("img").users  # type: ignore[union-attr]
    # And a clean copy goes through afterwards.
    await agent.copy_vm("vm", "host2", move=move)
    moved = dest.vms.get("vm")
    check = await NbdClient.connect(moved.uri)
    assert await check.read(0, world.image_size) == bytes(want)
    await check.close()
    await client.close()


async def test_a_stalled_source_is_given_up_by_the_destination_which_keeps_nothing(
    world: World,
) -> None:
    dest = await world.agent("host2", SMALL)
    host, port = dest.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    header = b"VMCOPY1\n" + world.image_size.to_bytes(8, "big")
    first = b"\x01" + bytes(8) + (4).to_bytes(4, "big") + b"abcd"
    body = header + first  # then nothing: no more records, no end
    token = world.token(Role.AGENT, "host1").encode()  # the source: an agent
    writer.write(
        b"POST /vms/import?name=vm&image=img HTTP/1.1\r\nhost: x\r\n"
        b"authorization: Bearer " + token + b"\r\n"
        b"content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n"
    )
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(4096), 10)
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 502"), answer
    assert b"stalled after 1 records" in answer and b"COPY_IDLE_TIMEOUT_SECONDS=1" in answer
    assert SMALL.idle_timeout * 0.9 <= elapsed < SMALL.idle_timeout + 3
    assert os.listdir(Path(world.tmp) / "host2" / "imports") == []
    assert dest.vms.list() == []


async def test_migrate_keeps_every_write_acknowledged_during_the_copy(world: World) -> None:
    # Small records and a steady writer: the copy takes several passes while it writes.
    limits = CopyLimits(idle_timeout=5.0, total_timeout=30.0, record_bytes=16 * KiB)
    agent, _, client, want = await make_vm(world, "host1", limits)
    dest = await world.agent("host2", limits)
    acknowledged: list[tuple[int, bytes]] = []
    refused: list[BaseException] = []
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            offset = (i * 12 * KiB + 100) % (world.image_size - 8 * KiB)
            data = bytes([i % 251 + 1]) * (8 * KiB)
            try:
                await client.write(offset, data)
            except (NbdRequestError, NetworkError) as err:
                refused.append(err)  # after the move: never acknowledged
                return
            acknowledged.append((offset, data))
            i += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(writer())
    await asyncio.sleep(0.05)
    await agent.copy_vm("vm", "host2", move=True)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert len(acknowledged) > 10, "the writer did not get going"
    for offset, data in acknowledged:
        want[offset : offset + len(data)] = data
    moved = dest.vms.get("vm")
    check = await NbdClient.connect(moved.uri)
    got = await check.read(0, world.image_size)
    await check.close()
    assert got == bytes(want), "a write acknowledged by the source is missing at the destination"
    with pytest.raises(NotFound):
        agent.vms.get("vm")  # moved: gone from the source
    await client.close()


class GatedReads:
    """The origin's device with reads held until ``gate`` is set: a slow upstream."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.size = inner.size
        self.read_only = True
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    def describe(self) -> str:
        return "gated " + self.inner.describe()

    async def read(self, offset: int, length: int) -> bytes:
        self.waiting.set()
        await self.gate.wait()
        return await self.inner.read(offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.block_status(offset, length)


async def test_migrate_keeps_a_write_that_was_waiting_for_its_base_when_the_copy_began(
    world: World,
) -> None:
    # A partial-block write to a chunk the relay does not hold waits for the base (the
    # origin, held here) before it lands in the overlay. It started before the copy's
    # tracker took over, so only waiting for it keeps it from being lost by the move.
    limits = CopyLimits(idle_timeout=5.0, total_timeout=20.0, record_bytes=64 * KiB)
    agent, _, client, want = await make_vm(world, "host1", limits)
    dest = await world.agent("host2", limits)
    await dest.vms.create("other", "img")
    assert world.origin is not None
    gated = GatedReads(world.origin.exports["image"].device)
    world.origin.replace_device("image", gated)
    offset, data = 3 * MiB + 200 * KiB + 100, b"\xee" * 1000
    write = asyncio.ensure_future(client.write(offset, data))
    await asyncio.wait_for(gated.waiting.wait(), 10)
    copy = asyncio.ensure_future(agent.copy_vm("vm", dest.url, move=True))
    # Unfixed, the copy is done within this wait; fixed, it waits for the write (the
    # bound only ends the wait, nothing is judged by it).
    deadline = time.monotonic() + 1
    while "vm" not in dest.vms.vms and not copy.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    gated.gate.set()
    await asyncio.wait_for(write, 10)  # acknowledged by the source
    await asyncio.wait_for(copy, 20)
    want[offset : offset + len(data)] = data
    check = await NbdClient.connect(dest.vms.get("vm").uri)
    got = await check.read(0, world.image_size)
    await check.close()
    await client.close()
    assert got == bytes(want), "a write acknowledged by the source is missing at the destination"


async def test_no_guest_starts_on_a_vm_while_it_is_migrated(world: World) -> None:
    # A guest started mid-migrate would write through the copy's tracker, have its
    # held writes refused (EIO) when the move completes, and be killed with the VM.
    import shutil

    from virtman.hypervisor.qemu import Accel, HypervisorSettings

    stand_in = HypervisorSettings(qemu=shutil.which("true") or "/bin/true", accel=Accel.TCG)
    limits = CopyLimits(connect_timeout=1.0, idle_timeout=1.0, total_timeout=20.0)
    agent = await world.agent("host1", limits, hypervisor=stand_in)
    await agent.vms.create("vm", "img")
    silent = Silent()
    url = await silent.start()
    try:
        migrate = asyncio.ensure_future(agent.copy_vm("vm", url, move=True))
        while agent.vms.get("vm").operation is None and not migrate.done():
            await asyncio.sleep(0.01)
        with pytest.raises(Conflict, match="busy: migrate"):
            await agent.vms.start_guest("vm")
        with pytest.raises(NetworkError):
            await migrate
    finally:
        await silent.close()
    assert agent.vms.get("vm").operation is None


async def test_a_write_still_running_when_a_pass_takes_the_dirty_ranges_is_sent_again() -> None:
    # A copy-on-write waits for its base before its bytes land: a pass that takes the
    # dirty ranges meanwhile reads the old bytes, so the range must come back once the
    # write is done, or no later pass (nor the held one) sends the new bytes.
    from virtman.agent.copy import WriteTracker
    from virtman.blockdev.memory import MemoryDevice

    class SlowWrites(MemoryDevice):
        def __init__(self) -> None:
            super().__init__(64 * KiB)
            self.gate = asyncio.Event()

        async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
            await self.gate.wait()
            await super().write(offset, data, fua=fua)

    inner = SlowWrites()
    tracker = WriteTracker(inner)
    write = asyncio.ensure_future(tracker.write(4096, b"x" * 512))
    await asyncio.sleep(0)  # the write is under way, its bytes not yet in place
    tracker.take_dirty()  # a pass ends here and the next one reads the range now
    inner.gate.set()
    await write
    await tracker.hold()
    assert tracker.take_dirty() == [(4096, 512)]
