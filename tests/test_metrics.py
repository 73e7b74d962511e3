"""Prometheus metrics: ``/metrics`` of Volt and agents, ``serve --metrics-listen``.

Everything is real: an origin, Volt and two agents in the test's loop (``agentworld``),
VMs read through their NBD exports, a guest started by the agent (QEMU replaced by a
shell script, as in test_accel.py, through the setting a user has), and ``virtman
serve`` as a child process. Every exposition is parsed with prometheus_client's own
parser and checked against the naming rules.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from agentworld import KiB, World
from conftest import QEMU_SERIAL_FROM_ARGV
from prometheus_client.parser import text_string_to_metric_families

from virtman.agent.agent import Agent
from virtman.auth import Role, issue_token
from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.faults import FaultyDevice
from virtman.blockdev.file import FileDevice
from virtman.blockdev.manifest import compute_manifest
from virtman.blockdev.remote import RemoteDevice
from virtman.blockdev.store import StoreFile
from virtman.httpapi import Credentials, ca_context
from virtman.hypervisor.qemu import Accel, HypervisorSettings
from virtman.metrics import LABELS, ImageFigures, Metric, Metrics, counter, data_path_families
from virtman.nbd.client import NbdClient
from virtman.nbd.server import Export, NbdServer
from virtman.pki import init_ca, issue
from virtman.tlsconfig import TlsFiles

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: QEMU played by a script: prints a console line, then runs until it is stopped.
FAKE_QEMU = QEMU_SERIAL_FROM_ARGV + """[ -n "$serial" ] && echo "fake guest up" > "$serial"
exec sleep 60
"""


# --- the naming rules -------------------------------------------------------------------------


def naming_faults(text: str) -> list[str]:
    """Every way ``text`` (an exposition) breaks the project's metric naming rules."""
    faults = []
    # The parser adds _total to a counter that lacks it: check the text as written too.
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        if kind == "counter" and not name.endswith("_total"):
            faults.append(f"{name}: a counter not ending in _total")
    for family in text_string_to_metric_families(text):
        name = family.name
        if not name.startswith("virtman_"):
            faults.append(f"{name}: no virtman_ prefix")
        if family.type == "counter" and not all(
                s.name.endswith("_total") for s in family.samples):
            faults.append(f"{name}: a counter whose samples do not end in _total")
        if family.type != "counter" and any(s.name.endswith("_total") for s in family.samples):
            faults.append(f"{name}: a {family.type} ending in _total")
        if family.type == "histogram" and not name.endswith(("_seconds", "_bytes")):
            faults.append(f"{name}: a histogram not in a base unit")
        if re.search(r"_(milliseconds|ms|kib|mib|kb|mb|gb)(_|$)", name):
            faults.append(f"{name}: not a base unit")
        for sample in family.samples:
            extra = set(sample.labels) - LABELS - ({"le"} if family.type == "histogram" else set())
            if extra:
                faults.append(f"{name}: labels {sorted(extra)} outside the allowed set")
    return faults


def test_the_naming_check_finds_each_fault() -> None:
    bad = (
        "# TYPE other_requests_total counter\nother_requests_total 1\n"
        "# TYPE virtman_hits counter\nvirtman_hits 1\n"
        "# TYPE virtman_open_total gauge\nvirtman_open_total 1\n"
        "# TYPE virtman_fetch_ms histogram\nvirtman_fetch_ms_bucket{le=\"+Inf\"} 1\n"
        "virtman_fetch_ms_count 1\nvirtman_fetch_ms_sum 1\n"
        "# TYPE virtman_reads_total counter\nvirtman_reads_total{vm=\"vm1\"} 1\n"
    )
    faults = naming_faults(bad)
    for expected in ("other_requests: no virtman_", "virtman_hits: a counter not ending",
                     "virtman_open_total: a gauge ending", "virtman_fetch_ms: a histogram",
                     "virtman_fetch_ms: not a base unit", "labels ['vm']"):
        assert any(expected in f for f in faults), (expected, faults)


def test_a_label_outside_the_allowed_set_is_refused() -> None:
    with pytest.raises(ValueError, match="vm"):
        Metrics().counter("vm_reads", "reads per VM", ["vm"])
    with pytest.raises(ValueError, match="peer"):
        counter("peer_bytes", "bytes per peer", ["image", "peer"])


def test_each_service_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.counter("things", "things").inc()  # the same name in b is no collision
    b.counter("things", "things")
    assert samples(a.render().decode())[("virtman_things_total", ())] == 1
    assert samples(b.render().decode())[("virtman_things_total", ())] == 0


# --- scraping --------------------------------------------------------------------------------


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


#: The viewer's credential for Volt's and the agents' /metrics (set by the world fixture).
VIEWER: dict[str, Credentials] = {}


async def scrape(url: str, credentials: Credentials | None = None) -> tuple[str, Samples]:
    viewer = credentials or VIEWER.get("world", Credentials())
    async with httpx.AsyncClient(headers=viewer.headers(), verify=viewer.verify()) as http:
        r = await http.get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert naming_faults(r.text) == []
    return r.text, samples(r.text)


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def until_scraped(url: str, check: object, timeout: float = 10.0) -> Samples:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        _, found = await scrape(url)
        if check(found):  # type: ignore[operator]
            return found
        assert asyncio.get_running_loop().time() < deadline, "metrics did not move in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path, fanout=1)  # a chain: the second host is the first one's child
    VIEWER["world"] = Credentials(token=w.token(Role.VIEWER, "prometheus"), ca=w.ca)
    try:
        await w.start()
        yield w
    finally:
        VIEWER.clear()
        await w.stop()


def fake_qemu(tmp_path: Path) -> str:
    path = tmp_path / "qemu"
    path.write_text(FAKE_QEMU)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def read_all(uri: str, size: int) -> bytes:
    client = await NbdClient.connect(uri)
    try:
        return await client.read(0, size)
    finally:
        await client.close()


# --- a boot, from Volt's and the agents' /metrics ---------------------------------------------


async def test_counters_move_during_a_boot(world: World, tmp_path: Path) -> None:
    hv = HypervisorSettings(qemu=fake_qemu(tmp_path), accel=Accel.TCG,
                            console_poll_seconds=0.02, stop_grace_seconds=2)
    a1: Agent = await world.agent("a1", hypervisor=hv)
    _, before = await scrape(a1.url)
    assert value(before, "virtman_vms", state="no_guest") == 0
    _, volt_before = await scrape(world.volt_url)
    assert value(volt_before, "virtman_tree_joins_total", image="img") == 0

    # A VM on a1 reads its whole disk: everything comes from the origin, chunk by chunk.
    async with world.api(a1.url) as api:
        vm1 = await api.post("/vms", json={"name": "vm1", "image": "img"})
    assert await read_all(vm1["uri"], world.image_size) == world.image
    text, found = await scrape(a1.url)
    assert value(found, "virtman_upstream_bytes_total", image="img",
                 source="origin") >= world.image_size
    assert value(found, "virtman_upstream_bytes_total", image="img", source="parent") == 0
    chunks = world.image_size // (64 * KiB)
    assert value(found, "virtman_cache_misses_total", image="img") == chunks
    assert value(found, "virtman_chunk_fetch_seconds_count") == chunks
    assert value(found, "virtman_cache_bytes") == world.image_size
    assert value(found, "virtman_vm_create_seconds_count") == 1
    assert value(found, "virtman_vms", state="no_guest") == 1
    assert value(found, "virtman_tree_level", image="img") == 1
    assert "vm1" not in text and "127.0.0.1" not in text  # no VM names, no addresses

    # Read again: hits now, nothing more from upstream.
    assert await read_all(vm1["uri"], world.image_size) == world.image
    _, again = await scrape(a1.url)
    assert value(again, "virtman_cache_hits_total", image="img") > 0
    assert value(again, "virtman_cache_misses_total", image="img") == chunks

    # A guest boots on vm1: booting, then running once its console prints.
    async with world.api(a1.url) as api:
        await api.post("/vms/vm1/start", json={})
        booted = await until_scraped(
            a1.url, lambda f: value(f, "virtman_vms", state="running") == 1)
        assert value(booted, "virtman_vm_boot_seconds_count") == 1
        assert value(booted, "virtman_vms", state="no_guest") == 0
        await api.post("/vms/vm1/stop")

    # A second host joins below a1 and reads through a1: bytes from a parent, bytes
    # served to a child.
    a2 = await world.agent("a2")
    async with world.api(a2.url) as api:
        vm2 = await api.post("/vms", json={"name": "vm2", "image": "img"})
    assert await read_all(vm2["uri"], world.image_size) == world.image
    _, found2 = await scrape(a2.url)
    assert value(found2, "virtman_tree_level", image="img") == 2
    assert value(found2, "virtman_upstream_bytes_total", image="img",
                 source="parent") >= world.image_size
    assert value(found2, "virtman_upstream_bytes_total", image="img", source="origin") == 0
    _, served = await scrape(a1.url)
    assert value(served, "virtman_served_bytes_total", image="img") >= world.image_size
    assert value(served, "virtman_heartbeats_answered_total") > 0

    _, volt = await scrape(world.volt_url)
    assert value(volt, "virtman_tree_joins_total", image="img") == 2
    assert value(volt, "virtman_tree_hosts", image="img") == 2
    assert value(volt, "virtman_agents") == 2
    assert value(volt, "virtman_heartbeats_received_total") > 0
    assert value(volt, "virtman_tree_repairs_total", image="img") == 0

    # a1 goes silent: Volt fails it out of the tree and repairs it.
    await world.stop_agent("a1")
    repaired = await until_scraped(
        world.volt_url, lambda f: value(f, "virtman_tree_repairs_total", image="img") == 1)
    assert value(repaired, "virtman_agents_failed_total") == 1
    assert value(repaired, "virtman_tree_leaves_total", image="img", reason="failed") == 1
    assert value(repaired, "virtman_tree_hosts", image="img") == 1


async def test_agent_metrics_count_missed_heartbeats(tmp_path: Path) -> None:
    # Volt is nowhere: every heartbeat is missed, and the agent says so.
    agent = Agent("lonely", str(tmp_path / "a"), "http://127.0.0.1:9", heartbeat_interval=0.05)
    await agent.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while agent.link.heartbeats_missed < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        found = samples(agent.metrics.render().decode())
        assert value(found, "virtman_heartbeats_missed_total") >= 2
        assert value(found, "virtman_heartbeats_answered_total") == 0
        assert value(found, "virtman_volt_reachable") == 0
    finally:
        await agent.stop()


# --- faults on the data path -------------------------------------------------------------------


async def test_failovers_digest_mismatches_and_rotten_chunks_are_counted(tmp_path: Path) -> None:
    chunk = 64 * KiB
    (tmp_path / "image.raw").write_bytes(bytes(range(256)) * (4 * chunk // 256))
    good = FileDevice(str(tmp_path / "image.raw"), read_only=True)
    await good.open()
    manifest = await compute_manifest(good, chunk)
    # The parent fails its first read (EIO) and corrupts its second; the origin is sound.
    parent_dev = FaultyDevice(FileDevice(str(tmp_path / "image.raw"), read_only=True),
                              fail_reads=1, corrupt_reads=1)
    await parent_dev.open()
    parent, origin = NbdServer([Export("p", parent_dev)]), NbdServer([Export("o", good)])
    parent_uri = f"nbd://127.0.0.1:{await parent.listen_tcp('127.0.0.1', 0)}/p"
    origin_uri = f"nbd://127.0.0.1:{await origin.listen_tcp('127.0.0.1', 0)}/o"

    async def figures_after(reads: int) -> Samples:
        remote = RemoteDevice([parent_uri], fallbacks=[origin_uri])
        cache = CachedDevice(remote, tmp_path / "cache", chunk_size=chunk, manifest=manifest)
        await cache.open()
        try:
            for i in range(reads):  # one chunk at a time: the faults land in order
                await cache.read(i * chunk, chunk)
            figures = ImageFigures.read("img", cache, remote, 0, lambda _u, fallback: fallback)
        finally:
            await cache.close()
        text = generate_latest_of(data_path_families([figures]))
        assert naming_faults(text) == []
        return samples(text)

    try:
        found = await figures_after(3)
        assert value(found, "virtman_failovers_total", image="img") == 1
        assert value(found, "virtman_digest_mismatches_total", image="img") == 1
        assert value(found, "virtman_upstream_bytes_total", image="img",
                     source="origin") == 2 * chunk  # the failed-over and the refetched chunk
        assert value(found, "virtman_upstream_bytes_total", image="img",
                     source="parent") == 2 * chunk  # the corrupt one and a sound one
        assert value(found, "virtman_refetches_total", image="img") == 1
        # Rot at rest: chunk 0 changes in the cache file while nothing runs.
        store = StoreFile.open(str(tmp_path / "cache" / "cache.vmstore"))
        try:
            at = store.data_offset + chunk // 2
            os.pwrite(store.fd, bytes(b ^ 0xFF for b in os.pread(store.fd, 16, at)), at)
        finally:
            os.close(store.fd)
        again = await figures_after(1)
        assert value(again, "virtman_rotten_chunks_total", image="img") == 1
        assert value(again, "virtman_refetches_total", image="img") == 1
        assert value(again, "virtman_cache_misses_total", image="img") == 1
    finally:
        await parent.stop()
        await origin.stop()
        await good.close()


def generate_latest_of(families: list[Metric]) -> str:
    metrics = Metrics()
    metrics.collect_with(lambda: families)
    return metrics.render().decode()


# --- virtman serve --metrics-listen ----------------------------------------------------------


async def test_serve_exports_its_metrics_to_viewers_over_https(tmp_path: Path) -> None:
    image = bytes(range(256)) * (4 * 1024)  # 1 MiB
    (tmp_path / "image.raw").write_bytes(image)
    device = FileDevice(str(tmp_path / "image.raw"), read_only=True)
    await device.open()
    pki = str(tmp_path / "pki")
    ca = init_ca(pki).cert
    cert = issue("relay", pki, pki)
    served = issue("origin", pki, pki)  # the relay reaches it with its own certificate
    origin = NbdServer([Export("image", device)], tls=TlsFiles(served.cert, served.key, ca))
    port = await origin.listen_tcp("127.0.0.1", 0)
    tokens = str(tmp_path / "tokens")
    viewer = issue_token(tokens, Role.VIEWER, "prometheus")
    agent = issue_token(tokens, Role.AGENT, "host1")
    sock = str(tmp_path / "relay.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtman", "serve",
        "--upstream", f"nbd://127.0.0.1:{port}/image", "--cache-dir", str(tmp_path / "cache"),
        "--chunk-size", "64K", "--socket", sock, "--metrics-listen", "127.0.0.1:0",
        "--tokens", tokens, "--tls-cert", cert.cert, "--tls-key", cert.key, "--tls-ca", ca,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.match(r"metrics at (https://\S+)/metrics", line)
        assert match, line
        url = match.group(1)
        await asyncio.wait_for(proc.stdout.readline(), 30)  # "serving ...": socket is up
        async with httpx.AsyncClient(verify=ca_context(ca)) as http:
            assert (await http.get(f"{url}/metrics")).status_code == 401
            bearer = {"authorization": f"Bearer {agent}"}
            assert (await http.get(f"{url}/metrics", headers=bearer)).status_code == 403
        client = await NbdClient.connect(
            f"nbds+unix:///image?socket={sock}", tls=TlsFiles(cert.cert, cert.key, ca)
        )
        try:
            assert await client.read(0, len(image)) == image
            _, found = await scrape(url, Credentials(token=viewer, ca=ca))
            assert value(found, "virtman_nbd_connections", server="serve") == 1
        finally:
            await client.close()
        assert value(found, "virtman_upstream_bytes_total", image="image",
                     source="parent") >= len(image)
        assert value(found, "virtman_cache_misses_total", image="image") == 16
        assert value(found, "virtman_chunk_fetch_seconds_count") == 16
        assert value(found, "virtman_served_bytes_total", image="image") == len(image)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        await origin.stop()
        await device.close()
    assert proc.returncode == 0, (await proc.stderr.read()).decode() if proc.stderr else ""


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([], "--metrics-listen needs --tokens FILE"),
        (["--tokens", "TOKENS"], "--metrics-listen without --tls-cert/--tls-key/--tls-ca"),
    ],
)
async def test_serve_refuses_metrics_without_credentials(
    tmp_path: Path, extra: list[str], reason: str
) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    tokens = str(tmp_path / "tokens")
    issue_token(tokens, Role.VIEWER, "prometheus")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtman", "serve", str(tmp_path / "disk.raw"),
        "--socket", str(tmp_path / "s.sock"), "--metrics-listen", "127.0.0.1:0",
        *[tokens if a == "TOKENS" else a for a in extra],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert reason in err.decode()
    assert not (tmp_path / "s.sock").exists()  # refused before serving anything


async def test_serve_names_a_bad_metrics_address(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtman", "serve", str(tmp_path / "disk.raw"),
        "--socket", str(tmp_path / "s.sock"), "--metrics-listen", "nowhere",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "--metrics-listen 'nowhere': expected HOST:PORT" in err.decode()
