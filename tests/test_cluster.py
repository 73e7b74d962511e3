"""A whole cluster on loopback: relay tree, failures of hosts and of Volt, virtman up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image, require

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.replay.replayer import replay
from virtman.replay.trace import Trace, TraceRequest

MiB = 1024 * 1024
SIZE = 16 * MiB
INTERVAL, TIMEOUT = 0.3, 1.2


def synthetic_trace(seconds: float = 2.5, requests: int = 500, seed: int = 3) -> Trace:
    """Reads spread over the image and over time, with a few writes and flushes."""
    rng = random.Random(seed)
    reqs = []
    for i in range(requests):
        t = seconds * i / requests
        op = "read" if i % 25 else ("write" if i % 50 else "flush")
        offset = rng.randrange(0, SIZE - 65536) // 4096 * 4096
        length = 0 if op == "flush" else rng.choice([4096, 16384, 65536])
        reqs.append(TraceRequest(t, op, offset, length))
    return Trace("synthetic", tuple(reqs))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    settings = ClusterSettings(
        hosts=4, heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT, chunk_size=64 * 1024
    )
    c = LocalCluster(str(tmp_path / "cluster"), settings)
    image = tmp_path / "image.raw"
    make_image(image, SIZE)
    try:
        await c.start_origin(str(image))
        await c.start_volt()
        await c.start_agents()
        await c.register_image("img")
        yield c
    finally:
        await c.stop()


async def create_in_order(cluster: LocalCluster, per_host: int = 1) -> dict[str, list[str]]:
    """VMs host by host, so tree positions follow host numbers (host1 at position 0...)."""
    uris: dict[str, list[str]] = {}
    for host in cluster.host_names():
        uris[host] = [
            await cluster.create_vm(host, f"{host}-vm{j}", "img") for j in range(per_host)
        ]
    return uris


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                timeout: float = 20.0) -> None:
    """Wait for an event of the cluster (a log line, a byte count), not for a time."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        await asyncio.sleep(0.05)


def logged(cluster: LocalCluster, host: str, line: bytes) -> bool:
    """Whether ``host``'s agent wrote ``line`` to its log in this run."""
    return line in cluster.agents[host].child.output()


async def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, timeout=60)


async def test_vms_on_every_host_read_the_image_and_keep_writes_private(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    require("qemu-img", "qemu-io", "nbdcopy")
    image = tmp_path / "image.raw"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    uris = await create_in_order(cluster, per_host=2)
    tree = await cluster.tree("img")
    assert [n["agent"] for n in tree["nodes"]] == ["host1", "host2", "host3", "host4"]
    assert tree["nodes"][2]["parents"] == ["host1", "host2"] and tree["depth"] == 2
    # Secure by default: the origin and every relay speak NBD only over mutual TLS, and a
    # plaintext client (libnbd's) is refused.
    assert cluster.origin_uri.startswith("nbds://")
    assert all(n["relay_uri"].startswith("nbds://") for n in tree["nodes"]), tree
    for plain in (cluster.origin_uri, tree["nodes"][0]["relay_uri"]):
        r = await run("nbdinfo", plain.replace("nbds://", "nbd://", 1))
        assert r.returncode != 0, f"a plaintext client read {plain}"
    for host_uris in uris.values():
        for uri in host_uris:
            r = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
            assert r.returncode == 0, r.stdout + r.stderr
    writer = uris["host3"][0]
    r = await run("qemu-io", "-f", "raw", "-c", "write -P 0xe7 1000 100000", writer)
    assert r.returncode == 0, r.stderr
    r = await run("qemu-io", "-f", "raw", "-c", "read -P 0xe7 1000 100000", writer)
    assert b"Pattern verification failed" not in r.stdout
    for uri in (uris["host3"][1], uris["host1"][0], uris["host4"][0]):
        r = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
        assert r.returncode == 0, f"{uri} saw another VM's write: {r.stdout!r}"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    # Level-2 hosts got their data from their parents, not from the origin.
    status = await cluster.agent_status("host3")
    received = status["images"]["img"]["bytes_received"]
    assert (
        received.get("origin", 0) == 0 and received.get("host1", 0) + received.get("host2", 0) > 0
    )


async def test_sigkill_of_a_parent_mid_boot_is_invisible_to_its_children(
    cluster: LocalCluster,
) -> None:
    uris = await create_in_order(cluster)
    trace = synthetic_trace()
    children = ["host3", "host4"]  # both have host1 and host2 as parents
    boots = [asyncio.ensure_future(replay(uris[h][0], trace)) for h in ["host2", *children]]

    async def reading_through_host1() -> bool:
        statuses = [await cluster.agent_status(h) for h in children]
        return all(s["images"]["img"]["bytes_received"].get("host1", 0) > 0 for s in statuses)

    await until(reading_through_host1, "both children read through host1")
    assert not any(b.done() for b in boots), "the boots ended before host1 was killed"
    cluster.kill_agent("host1")
    killed_at = time.monotonic()
    # Volt notices within the heartbeat timeout and hands out new parents. Watched while
    # the boots go on: they may run longer than the repair takes.
    deadline = killed_at + TIMEOUT + 3 * INTERVAL + 2.0

    async def watch_repair() -> tuple[float, Any, dict[str, Any]]:
        while True:
            # When this look began: the queries themselves take a while on busy cores.
            looked_at = time.monotonic()
            tree = await cluster.tree("img")
            agents = [n["agent"] for n in tree["nodes"]]
            statuses = {h: await cluster.agent_status(h) for h in ("host2", *children)}
            parents_now = {h: s["images"]["img"]["parents"] for h, s in statuses.items()}
            if "host1" not in agents and all("host1" not in p for p in parents_now.values()):
                return looked_at - killed_at, tree, statuses
            assert time.monotonic() < deadline, (
                f"tree not repaired in time: {tree}, agents see {parents_now}"
            )
            await asyncio.sleep(0.1)

    watcher = asyncio.ensure_future(watch_repair())
    results = await asyncio.gather(*boots)
    for r in results:
        assert r.errors == 0, r.messages
        assert r.requests == len(trace.requests)
    repaired_in, tree, statuses = await watcher
    assert repaired_in < TIMEOUT + 3 * INTERVAL + 2.0
    agents = [n["agent"] for n in tree["nodes"]]
    parents_now = {h: s["images"]["img"]["parents"] for h, s in statuses.items()}
    assert tree["depth"] == 2 and sorted(agents) == ["host2", "host3", "host4"]
    for h in children:  # what they had from host1 stays counted
        assert statuses[h]["images"]["img"]["bytes_received"].get("host1", 0) > 0
    expected = {n["agent"]: [p for p in n["parents"] if p != "origin"] for n in tree["nodes"]}
    assert parents_now == expected


async def test_volt_killed_and_restarted_mid_run(cluster: LocalCluster) -> None:
    uris = await create_in_order(cluster)
    before = await cluster.tree("img")
    trace = synthetic_trace(seconds=3.0)
    boots = [asyncio.ensure_future(replay(u[0], trace)) for u in uris.values()]
    hosts = cluster.host_names()

    async def all_reading() -> bool:
        statuses = [await cluster.agent_status(h) for h in hosts]
        return all(sum(s["images"]["img"]["bytes_received"].values()) > 0 for s in statuses)

    await until(all_reading, "every host reads the image")
    cluster.kill_volt()

    async def all_noticed() -> bool:
        return all(logged(cluster, h, b"volt unreachable") for h in hosts)

    # Every agent has found Volt gone while its VMs boot: they keep serving.
    await until(all_noticed, "every agent finds Volt unreachable")
    assert not all(b.done() for b in boots), "the boots ended before Volt was away"
    await cluster.start_volt()
    results = await asyncio.gather(*boots)
    assert all(r.errors == 0 for r in results), [r.messages for r in results]
    after = await cluster.tree("img")
    assert after["nodes"] == before["nodes"]

    async def all_back() -> bool:
        return all(logged(cluster, h, b"volt reachable again") for h in hosts)

    # Every agent heartbeats the new Volt, which keeps the tree as it was.
    await until(all_back, "every agent reaches the restarted Volt")
    assert (await cluster.tree("img"))["nodes"] == before["nodes"]


def test_virtman_up_small_run_is_complete_and_consistent(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rows = ["t,op,offset,length"]
    rng = random.Random(9)
    for i in range(300):
        rows.append(
            f"{i * 0.01:.3f},read,{rng.randrange(0, 4096) * 4096},{rng.choice([4096, 65536])}"
        )
    rows.append("3.0,write,0,4096")
    rows.append("3.01,flush,0,0")
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "up.json"
    run_ = subprocess.run(
        [
            sys.executable,
            "-m",
            "virtman",
            "up",
            "--hosts",
            "3",
            "--vms-per-host",
            "2",
            "--trace",
            str(trace),
            "--speed",
            "4",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--heartbeat-interval",
            "0.3",
            "--heartbeat-timeout",
            "1.2",
            "--kill",
            "host1@0.3",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run_.returncode == 0, run_.stdout + run_.stderr
    doc = json.loads(out.read_text())
    assert {"vms", "all_booted_seconds", "origin_bytes_sent", "working_set_bytes", "hosts"} <= set(
        doc
    )
    assert len(doc["vms"]) == 6
    assert {v["host"] for v in doc["vms"]} == {"host1", "host2", "host3"}
    survivors = [v for v in doc["vms"] if v["host"] != "host1"]
    assert all(v["errors"] == 0 for v in survivors)
    assert doc["all_booted_seconds"] == max(v["boot_seconds"] for v in survivors)
    killed = {h["name"]: h["killed"] for h in doc["hosts"]}
    assert killed == {"host1": True, "host2": False, "host3": False}
    for h in doc["hosts"]:
        if not h["killed"]:
            assert h["parents"] and all(p in ("origin", "host2", "host3") for p in h["parents"])
    # Every byte a surviving host received came from the origin or from a host.
    assert doc["origin_bytes_sent"] >= doc["working_set_bytes"] // 2
    assert "relay tree" in run_.stdout and "origin sent" in run_.stdout
    # Secure by default, and the result says under which conditions it was measured.
    assert doc["settings"]["tls"] is True and "mutual TLS" in run_.stdout
    # Piped, not a terminal: plain lines, no progress bars, boxes or escape sequences.
    assert "\x1b[" not in run_.stdout and not {"┏", "━", "│"} & set(run_.stdout)
    assert not list((tmp_path / "work").glob("*.sock"))


async def test_fleet_processes_boot_vms_and_count_what_fails(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A fleet process per host creates its VMs through the agent and replays the trace
    from one shared t0; a VM that cannot be created (its name taken, or no agent) counts
    every request of the trace as an error, and the others still boot."""
    from virtman.replay.fleet import FleetProcess, FleetSpec
    from virtman.replay.trace import format_trace

    trace = synthetic_trace(seconds=0.5, requests=100)
    trace_path = tmp_path / "trace.csv"
    trace_path.write_text(format_trace(list(trace.requests)))
    await cluster.create_vm("host1", "taken", "img")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    operator = (cluster.token_file("operator"), cluster.ca_file)
    specs = {
        "host1": FleetSpec(
            cluster.agents["host1"].url, "img", ["a1", "taken"], str(trace_path), 1, *operator
        ),
        "host2": FleetSpec(
            cluster.agents["host2"].url, "img", ["b1", "b2"], str(trace_path), 1, *operator
        ),
        "gone": FleetSpec(dead, "img", ["c1"], str(trace_path), 1, *operator),
    }
    fleets = [FleetProcess([], spec, str(tmp_path / f"{h}.json")) for h, spec in specs.items()]
    try:
        await asyncio.gather(*(f.start() for f in fleets))
        t0 = time.monotonic()
        for f in fleets:
            f.go(t0)
        reports = await asyncio.gather(*(f.report() for f in fleets))
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))
    vms = {vm["name"]: vm for r in reports for vm in r["vms"]}
    assert set(vms) == {"a1", "taken", "b1", "b2", "c1"}
    for name in ("a1", "b1", "b2"):
        assert vms[name]["errors"] == 0 and vms[name]["requests"] == len(trace.requests)
        assert trace.duration <= vms[name]["seconds"] < 60  # think times slept from t0 on
    for name in ("taken", "c1"):
        assert vms[name]["errors"] == len(trace.requests), vms[name]
        assert vms[name]["messages"][0].startswith("create:")
    assert "409" in vms["taken"]["messages"][0] or "exists" in vms["taken"]["messages"][0]
    assert all(r["cpu_seconds"] > 0 for r in reports[:2])


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_a_sigkilled_virtman_up_leaves_no_service_behind(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"  # short: the baseline boot runs before the cluster
    trace.write_text("t,op,offset,length\n0.00,read,0,65536\n0.01,read,65536,65536\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtman", "up", "--hosts", "2", "--vms-per-host", "1",
         "--trace", str(trace), "--workdir", str(tmp_path / "work"), "--ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # Volt is up once its live view is printed
            if line.startswith("live view: "):
                break
        else:
            raise AssertionError("virtman up ended before Volt was up")
        children = _children(proc.pid)
        assert children, "Volt runs as a child of virtman up"
        proc.kill()  # no chance to stop anything itself
        proc.wait()
        deadline = time.monotonic() + 20
        while alive := {pid for pid in children if Path(f"/proc/{pid}").exists()}:
            assert time.monotonic() < deadline, f"still running after up died: {alive}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_virtman_up_prefetch_fetches_the_profile_once_per_root(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rng = random.Random(3)
    rows = ["t,op,offset,length"] + [
        f"{i * 0.01:.3f},read,{rng.randrange(0, 2048) * 4096},65536" for i in range(200)
    ]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "up.json"
    run_ = subprocess.run(
        [sys.executable, "-m", "virtman", "up", "--hosts", "4", "--vms-per-host", "1",
         "--trace", str(trace), "--speed", "4", "--prefetch", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert run_.returncode == 0, run_.stdout + run_.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["prefetch"] is True and "prefetched by every host" in run_.stdout
    assert doc["errors_on_surviving_hosts"] == 0
    # Prefetch reads nothing outside the profile: the origin still sends one working set
    # per tree root, and every host's prefetch took part in what it received.
    assert doc["origin_bytes_sent"] == doc["tree"]["roots"] * doc["working_set_bytes"]
    for h in doc["hosts"]:
        assert 0 < h["prefetched_bytes"] <= sum(h["bytes_received"].values())
