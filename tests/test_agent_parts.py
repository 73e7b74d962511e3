"""The agent's parts one by one: the Volt link, the relay manager, the VM record, and
the NBD server's device replacement they rely on. Real Volt, origin and sockets in the
test's event loop (``agentworld``)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from agentworld import KiB, World
from conftest import QEMU_SERIAL_FROM_ARGV

from virtman.agent.images import DeliveryMode
from virtman.agent.relays import RelayManager
from virtman.agent.vms import ConsoleFollower, Layer, VmRecord, VmState
from virtman.agent.voltlink import LinkState, VoltLink
from virtman.blockdev.memory import MemoryDevice
from virtman.coordinator.models import HeartbeatReply
from virtman.errors import ApiError, ConfigError, InvalidRequest, NotFound
from virtman.hypervisor.qemu import Accel, HypervisorSettings
from virtman.nbd.client import NbdClient
from virtman.nbd.server import NbdServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- NbdServer.replace_device ---------------------------------------------------------


async def test_replace_device_switches_the_next_request_and_checks_its_argument(
    tmp_path: Path,
) -> None:
    a = MemoryDevice(data=b"A" * 8192)
    b = MemoryDevice(data=b"B" * 8192)
    server = NbdServer({"disk": a})
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    client = await NbdClient.connect(f"nbd+unix:///disk?socket={path}")
    try:
        assert await client.read(0, 4) == b"AAAA"
        assert server.replace_device("disk", b) is a
        assert await client.read(0, 4) == b"BBBB"  # same connection, the new device
        await client.write(0, b"xy")
        assert b.buffer[:2] == b"xy" and a.buffer[:2] == b"AA"
        with pytest.raises(NotFound, match="nope"):
            server.replace_device("nope", a)
        with pytest.raises(InvalidRequest, match="8192 bytes"):
            server.replace_device("disk", MemoryDevice(4096))
        assert server.exports["disk"].device is b
    finally:
        await client.close()
        await server.stop()


# --- VmRecord -----------------------------------------------------------------------


def test_vm_record_state_is_the_enum_and_the_file_keeps_its_string(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.json")
    record = VmRecord("vm", "img", [Layer("layer-0001.overlay", "s1"), Layer("layer-0002.overlay")])
    record.state = VmState.DETACHED
    record.save(path)
    with open(path) as f:
        assert json.load(f)["state"] == "detached"
    again = VmRecord.load(path)
    assert again.state is VmState.DETACHED and again == record


def test_vm_record_of_an_older_agent_loads(tmp_path: Path) -> None:
    # Written by the agent before the enum: the same strings.
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({
        "name": "old", "image": "img", "state": "running", "created": 1.5, "guest": None,
        "layers": [{"file": "layer-0001.overlay", "snapshot": None}],
    }))
    record = VmRecord.load(str(path))
    assert record.state is VmState.RUNNING and record.layers == [Layer("layer-0001.overlay")]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"name": "x", "image": "i", "layers": [], "state": "paused"}', "paused"),
        ('{"name": "x"}', "layers"),
        ("{", "unreadable"),
    ],
)
def test_a_bad_vm_record_names_its_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "vm.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as info:
        VmRecord.load(str(path))
    assert str(path) in str(info.value)


# --- VoltLink -----------------------------------------------------------------------


async def test_volt_link_heartbeats_and_hands_each_answer_on(world: World) -> None:
    replies: list[HeartbeatReply] = []

    async def on_reply(reply: HeartbeatReply) -> None:
        replies.append(reply)

    link = VoltLink(
        "h1", world.volt_url, credentials=world.as_agent("h1"), interval=0.05,
        report=lambda: {"url": "http://127.0.0.1:1", "relays": {}}, on_reply=on_reply,
    )
    link.url = "http://127.0.0.1:1"
    link.start()
    try:
        await until(lambda: len(replies) >= 2)
        assert link.reachable and link.state is LinkState.RUNNING
        assert link.interval == 0.3  # Volt's interval replaces ours
        async with world.api(world.volt_url) as api:
            assert [a["name"] for a in await api.get("/agents")] == ["h1"]
        spec = await link.image_spec("img")
        assert (spec.name, spec.size, spec.chunk_size) == ("img", world.image_size, 64 * KiB)
        with pytest.raises(NotFound, match="nope"):
            await link.image_spec("nope")
        with pytest.raises(NotFound, match="ghost"):
            await link.agent_url("ghost")
        assert await link.agent_url("h1") == "http://127.0.0.1:1"
    finally:
        await link.stop()
    assert link.state is LinkState.STOPPED
    count = len(replies)
    await asyncio.sleep(0.15)
    assert len(replies) == count, "heartbeats went on after stop()"


async def test_volt_link_logs_an_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    async def on_reply(reply: HeartbeatReply) -> None:
        raise AssertionError("no answer can come from a closed port")

    link = VoltLink(
        "h1", f"http://127.0.0.1:{free_port()}", interval=0.02, report=lambda: {"url": "x"},
        on_reply=on_reply,
    )
    caplog.set_level(logging.INFO, logger="virtman.agent.voltlink")
    for _ in range(5):
        await link.heartbeat()
    await link.stop()
    assert not link.reachable
    outages = [r for r in caplog.records if "volt unreachable" in r.message]
    assert len(outages) == 1, [r.message for r in caplog.records]


async def test_an_unexpected_heartbeat_error_ends_the_task_and_is_reported(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_reply(reply: HeartbeatReply) -> None:
        raise RuntimeError("a bug in the reply handler")

    link = VoltLink(
        "h1", world.volt_url, credentials=world.as_agent("h1"),
        interval=0.02, report=lambda: {"url": "x"}, on_reply=on_reply,
    )
    caplog.set_level(logging.ERROR, logger="virtman.agent.voltlink")
    link.start()
    try:
        await until(lambda: link.failure is not None)
    finally:
        await link.stop()
    assert isinstance(link.failure, RuntimeError)
    assert "a bug in the reply handler" in link.status()["failure"]
    logged = [r for r in caplog.records if "heartbeats to volt stopped" in r.message]
    assert len(logged) == 1 and logged[0].exc_info is not None


async def test_volt_link_keeps_beating_through_expected_errors(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def on_reply(reply: HeartbeatReply) -> None:
        nonlocal calls
        calls += 1
        raise ConfigError("paths refused")  # an expected kind of trouble

    link = VoltLink(
        "h1", world.volt_url, credentials=world.as_agent("h1"),
        interval=0.02, report=lambda: {"url": "x"}, on_reply=on_reply,
    )
    caplog.set_level(logging.ERROR, logger="virtman.agent.voltlink")
    link.start()
    try:
        await until(lambda: calls >= 3)
        assert link.failure is None
    finally:
        await link.stop()
    # Volt's answer (interval 0.3) slows the link down; still, one line for one reason.
    assert len([r for r in caplog.records if "paths refused" in r.message]) == 1


# --- RelayManager -------------------------------------------------------------------


async def test_relay_manager_opens_an_image_once_and_leaves_its_tree_when_evicted(
    world: World, tmp_path: Path
) -> None:
    async def on_reply(reply: HeartbeatReply) -> None:
        return None

    link = VoltLink(
        "h1", world.volt_url, credentials=world.as_agent("h1"),
        report=lambda: {"url": "x"}, on_reply=on_reply)
    tls = world.tls_files("h1")
    relays = RelayManager(str(tmp_path / "cache"), link, capacity=1 << 30, parent_wait=0.1,
                          tls=tls)
    await relays.start()
    try:
        first, second = await asyncio.gather(relays.image("img"), relays.image("img"))
        assert first is second and relays.get("img") is first
        assert relays.in_tree() == {"img": relays.relay_uri("img")}
        with pytest.raises(NotFound, match="nope"):
            await relays.image("nope")
        async with world.api(world.volt_url) as api:
            tree = await api.get("/images/img/tree")
            assert [n["agent"] for n in tree["nodes"]] == ["h1"]
            # Its relay export serves the image (and fills the cache).
            client = await NbdClient.connect(relays.relay_uri("img"), tls=tls)
            assert await client.read(0, 64 * KiB) == world.image[: 64 * KiB]
            await client.close()
            # The group is now over a capacity shrunk below what it holds.
            relays.cache.capacity = 0
            first.users.add("vm")
            assert await relays.evict() == []  # in use: never evicted
            assert relays.cache.evicted_over_capacity == 0
            first.users.clear()
            assert await relays.evict() == ["img"]
            assert relays.cache.evicted_over_capacity == 1  # virtman_cache_evictions_total
            assert relays.get("img") is None
            tree = await api.get("/images/img/tree")
            assert tree["nodes"] == [], "the evicted image is still in Volt's tree"
        status = relays.status()
        assert status["mode"] == DeliveryMode.VIRTMAN.value and status["images"] == {}
    finally:
        await relays.stop()
        await link.stop()


async def test_relay_manager_reopens_its_images_without_volt(world: World, tmp_path: Path) -> None:
    async def on_reply(reply: HeartbeatReply) -> None:
        return None

    link = VoltLink(
        "h1", world.volt_url, credentials=world.as_agent("h1"),
        report=lambda: {"url": "x"}, on_reply=on_reply)
    tls = world.tls_files("h1")
    relays = RelayManager(str(tmp_path / "cache"), link, parent_wait=0.1, tls=tls)
    await relays.start()
    await relays.image("img")
    await relays.stop()
    await link.stop()
    # Volt is out of reach now: the image comes back from the spec kept in the cache.
    gone = VoltLink("h1", f"http://127.0.0.1:{free_port()}", report=dict, on_reply=on_reply)
    again = RelayManager(str(tmp_path / "cache"), gone, parent_wait=0.1, tls=tls)
    await again.start()
    try:
        relay = again.get("img")
        assert relay is not None and relay.spec.size == world.image_size
        assert await relay.base.read(0, 4096) == world.image[:4096]
    finally:
        await again.stop()
        await gone.stop()


# --- VmManager ----------------------------------------------------------------------


async def test_vm_manager_restart_reopens_vms_keeps_detached_and_skips_a_bad_record(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await world.agent("h1")
    a = await agent.vms.create("a", "img")
    client = await NbdClient.connect(a.uri)
    await client.write(4096, b"kept" * 1024)
    await client.flush()
    await client.close()
    await agent.vms.create("b", "img")
    await agent.vms.destroy("b", instance_only=True)
    await agent.vms.create("c", "img")
    await world.stop_agent("h1")
    data = world.tmp / "h1"
    (data / "vms" / "c" / "vm.json").write_text('{"name": "c", "state": "paused"}')
    (data / "imports" / "import-x-1234").mkdir()  # a copy that was under way

    caplog.set_level(logging.WARNING, logger="virtman.agent")
    agent = await world.agent("h1")
    assert sorted(v.name for v in agent.vms.list()) == ["a", "b"]
    assert agent.vms.get("b").record.state is VmState.DETACHED
    assert agent.vms.get("b").info()["uri"] is None
    client = await NbdClient.connect(agent.vms.get("a").uri)
    assert await client.read(4096, 4096) == b"kept" * 1024
    await client.close()
    assert list((data / "imports").iterdir()) == []
    messages = [r.message for r in caplog.records]
    assert any("'c' could not be reopened" in m and "vm.json" in m for m in messages), messages
    assert any("removing unfinished import import-x-1234" in m for m in messages), messages


# --- Guest consoles ---------------------------------------------------------------------

#: A QEMU stand-in: it prints on the serial file QEMU would, then idles until stopped
#: (``$FAKE_EXIT`` set: exits at once instead).
FAKE_QEMU = QEMU_SERIAL_FROM_ARGV + """printf 'booting\\n' > "$serial"
sleep 0.3
printf 'h\\303\\251llo login: \\n' >> "$serial"
exec sleep 60
"""


def test_console_follower_reads_only_what_was_added(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    follower = ConsoleFollower(str(log))
    assert not follower.look() and follower.text == ""  # QEMU has not made it yet
    log.write_bytes(b"one\n\xc3")  # a character cut in two by a write
    assert follower.look() and follower.text == "one\n" and follower.size == 5
    assert not follower.look()
    with log.open("ab") as f:
        f.write(b"\xa9 two\n")
    assert follower.look() and follower.text == "one\n\u00e9 two\n"
    log.write_bytes(b"new\n")  # the log truncated and written again
    assert follower.look() and follower.text == "new\n" and follower.size == 4
    log.unlink()  # or a new one that grew past the old one before the next look
    log.write_bytes(b"another log\n")
    assert follower.look() and follower.text == "another log\n"
    follower.close()


async def test_console_wait_answers_once_the_pattern_shows_or_the_guest_ends(
    world: World, tmp_path: Path
) -> None:
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    agent = await world.agent("h1", hypervisor=HypervisorSettings(qemu=str(qemu),
                                                                   accel=Accel.TCG))
    await agent.vms.create("g", "img")
    await agent.vms.start_guest("g", None, False, None)
    async with world.api(agent.url) as api:
        # One request, held until the line shows (after the stand-in's 0.3 s).
        done = await api.get("/vms/g/console/wait", params={"pattern": "llo login:",
                                                            "timeout": 10})
        assert done["matched"] and done["running"], done
        assert 0.2 < done["seconds"] < 10 and done["console_bytes"] == len("booting\n") + 15
        # Not there: the answer comes at the timeout, still running.
        done = await api.get("/vms/g/console/wait", params={"pattern": "never", "timeout": 0.3})
        assert not done["matched"] and done["running"] and done["seconds"] >= 0.3, done
        # A guest that is not running answers at once, with or without a pattern.
        await api.post("/vms/g/stop")
        for params in ({"pattern": "never", "timeout": 30}, {"timeout": 30}):
            done = await api.get("/vms/g/console/wait", params=params)
            assert not done["matched"] and not done["running"] and done["seconds"] < 5, done
        # Bad questions are refused and named.
        for params, words in (({"pattern": "("}, "not a regular expression"),
                              ({"pattern": "x" * 1001}, "pattern"),
                              ({"timeout": 61}, "timeout")):
            with pytest.raises(ApiError) as err:
                await api.get("/vms/g/console/wait", params=params)
            assert err.value.status == 422 and words in str(err.value), err.value
        with pytest.raises(ApiError) as err:
            await api.get("/vms/nope/console/wait")
        assert err.value.status == 404
