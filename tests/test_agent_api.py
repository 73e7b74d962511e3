"""The agent's VM API (and Volt's image API) end to end, against a LocalCluster.

Volt and the agents are real processes on loopback; the origin is an NBD server in the
test's own event loop, so every external client (qemu-io, nbdcopy) runs in a thread,
never blocking the loop. Bytes are checked with those real clients against a model of
what the disk must hold: the image, then every write in order.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image, require

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.errors import ApiError, NetworkError
from virtman.httpapi import Credentials

MiB = 1024 * 1024
KiB = 1024
IMAGE_SIZE = 8 * MiB
#: The copy stream's header for an image of IMAGE_SIZE (virtman.protocol.copystream).
COPY_HEADER = b"VMCOPY1\n" + IMAGE_SIZE.to_bytes(8, "big")
CLIENT_TIMEOUT = 60


# --- external clients (always in a thread: the origin lives in this event loop) ---------------


async def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=CLIENT_TIMEOUT
    )
    if check:
        assert done.returncode == 0, (
            f"{argv[0]} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done


@dataclass(frozen=True)
class Write:
    pattern: int
    offset: int
    length: int

    def command(self) -> str:
        return f"write -P {self.pattern:#04x} {self.offset} {self.length}"


async def write(uri: str, *writes: Write, flush: bool = False) -> None:
    """Write with qemu-io (one process for all the writes), optionally then flush."""
    args = ["qemu-io", "-f", "raw"]
    for w in writes:
        args += ["-c", w.command()]
    if flush:
        args += ["-c", "flush"]
    out = (await run(*args, uri)).stdout
    assert "failed" not in out.lower(), out


def apply(model: bytearray, *writes: Write) -> None:
    for w in writes:
        model[w.offset : w.offset + w.length] = bytes([w.pattern]) * w.length


async def read_all(uri: str, dest: Path) -> bytes:
    """The whole disk behind `uri`, copied with nbdcopy."""
    dest.unlink(missing_ok=True)
    await run("nbdcopy", uri, str(dest))
    return dest.read_bytes()


def assert_bytes(got: bytes, want: bytes | bytearray, what: str) -> None:
    """Compare two disks without printing megabytes: say where they first differ."""
    if got == want:
        return
    if len(got) != len(want):
        pytest.fail(f"{what}: {len(got)} bytes, expected {len(want)}")
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    pytest.fail(
        f"{what}: differs from the expected bytes at offset {first} "
        f"(got {got[first]:#04x}, expected {want[first]:#04x})"
    )


async def unreachable(uri: str) -> bool:
    """Whether an NBD client fails to open `uri` (no export there)."""
    done = await run("qemu-io", "-f", "raw", "-c", "read 0 512", uri, check=False)
    return done.returncode != 0


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Env:
    cluster: LocalCluster
    image: bytes
    tmp: Path

    def url(self, host: str) -> str:
        return self.cluster.agents[host].url

    def data_dir(self, host: str) -> Path:
        return Path(self.cluster.workdir) / host

    def imports(self, host: str) -> list[str]:
        return sorted(os.listdir(self.data_dir(host) / "imports"))

    def model(self) -> bytearray:
        return bytearray(self.image)

    async def call(self, host: str, method: str, path: str, **kwargs: Any) -> Any:
        base = self.cluster.volt_url if host == "volt" else self.url(host)
        async with self.cluster.api(base, timeout=120) as api:
            return await api.request(method, path, **kwargs)

    async def call_as(self, who: str, host: str, method: str, path: str, **kwargs: Any) -> Any:
        """``call`` with the token of ``who`` (an agent of the cluster) instead."""
        base = self.cluster.volt_url if host == "volt" else self.url(host)
        agent = Credentials(token=self.cluster.token(who), ca=self.cluster.ca_file)
        async with agent.api(base, timeout=120) as api:
            return await api.request(method, path, **kwargs)

    async def pose_as_agent(self, name: str, url: str) -> None:
        """Register ``url`` with Volt as agent ``name`` (a stand-in of the test: the
        cluster was started with ``stand_ins=[name]``, so Volt knows its token)."""
        stand_in = Credentials(token=self.cluster.token(name), ca=self.cluster.ca_file)
        async with stand_in.api(self.cluster.volt_url) as api:
            await api.post(f"/agents/{name}/heartbeat", json={"url": url, "relays": {}})

    async def create(self, host: str, name: str, **body: Any) -> dict[str, Any]:
        doc: dict[str, Any] = await self.call(host, "POST", "/vms", json={"name": name, **body})
        return doc

    async def vm(self, host: str, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self.call(host, "GET", f"/vms/{name}")
        return doc

    async def read(self, uri: str, label: str = "disk") -> bytes:
        return await read_all(uri, self.tmp / f"{label}.raw")

    async def state(self) -> dict[str, Any]:
        """Everything a rejected request must leave as it was."""
        out: dict[str, Any] = {
            "images": await self.call("volt", "GET", "/images"),
            "agents": sorted(a["name"] for a in await self.call("volt", "GET", "/agents")),
        }
        for host, agent in self.cluster.agents.items():
            if not agent.alive:
                continue
            out[host] = {
                "vms": await self.call(host, "GET", "/vms"),
                "vm_dirs": sorted(os.listdir(self.data_dir(host) / "vms")),
                "imports": self.imports(host),
            }
        return out


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    """Factory: ``await start_cluster(hosts)`` gives a running cluster with image "img"
    registered; every process it started is stopped at teardown."""
    require("qemu-io", "nbdcopy")
    started: list[LocalCluster] = []

    async def start(
        hosts: int,
        image_size: int = IMAGE_SIZE,
        *,
        insecure: bool = False,
        stand_ins: tuple[str, ...] = (),
    ) -> Env:
        settings = ClusterSettings(
            hosts=hosts,
            heartbeat_interval=0.3,
            heartbeat_timeout=1.2,
            chunk_size=64 * KiB,
            log_level="info",
            insecure=insecure,
        )
        cluster = LocalCluster(str(tmp_path / "cluster"), settings)
        for name in stand_ins:
            cluster.issue_agent_token(name)
        started.append(cluster)
        image_path = tmp_path / "image.raw"
        image = make_image(image_path, image_size)
        await cluster.start_origin(str(image_path))
        await cluster.start_volt()
        await cluster.start_agents()
        await cluster.register_image("img")
        return Env(cluster, image, tmp_path)

    try:
        yield start
    finally:
        for cluster in started:
            await cluster.stop()


async def expect_error(call: Awaitable[Any], status: int, *words: str) -> ApiError:
    """The call fails with HTTP `status`, and its detail names each of `words`."""
    with pytest.raises(ApiError) as info:
        await call
    err = info.value
    assert err.status == status, f"expected HTTP {status}, got {err.status}: {err.detail}"
    for word in words:
        assert word in err.detail, f"{word!r} not in the detail {err.detail!r}"
    return err


# --- 1. bad input -----------------------------------------------------------------------------


async def test_agent_api_rejects_bad_input_and_changes_nothing(start_cluster) -> None:
    env = await start_cluster(2)
    vm1 = await env.create("host1", "vm1", image="img")
    await write(vm1["uri"], Write(0x5A, 0, 64 * KiB))
    await env.call("host1", "POST", "/vms/vm1/snapshots", json={"name": "s1"})
    before = await env.state()
    json_headers = {"content-type": "application/json"}

    async def bad(host: str, method: str, path: str, status: int, *words: str, **kw: Any):
        await expect_error(env.call(host, method, path, **kw), status, *words)
        assert await env.state() == before, f"{method} {path} {kw} changed something"

    async def bad_import(status: int, *words: str, **kw: Any) -> None:
        # Imports come from agents: host1 sends, host2 receives.
        call = env.call_as("host1", "host2", "POST", "/vms/import", **kw)
        await expect_error(call, status, *words)
        assert await env.state() == before, f"import {kw} changed something"

    # Malformed requests: 422, naming the field.
    await bad("host1", "POST", "/vms", 422, "JSON", content=b"{", headers=json_headers)
    await bad("host1", "POST", "/vms", 422, "name", json={"image": "img"})
    for name in ("a b", "../x", "", "x" * 65, "-x", "x/y"):
        await bad("host1", "POST", "/vms", 422, "name", json={"name": name, "image": "img"})
    await bad("host1", "POST", "/vms", 422, "image", json={"name": "x", "image": "../img"})
    await bad("host1", "POST", "/vms", 422, "image or from_snapshot", json={"name": "x"})
    for source in ("vm1", "vm1/", "../s1", "vm1/a b"):
        await bad("host1", "POST", "/vms", 422, "from_snapshot",
                  json={"name": "x", "from_snapshot": source})
    await bad("host1", "GET", "/vms/a b", 422, "name")
    await bad("host1", "DELETE", "/vms/a b", 422, "name")
    await bad("host1", "POST", "/vms/vm1/snapshots", 422, "name", json={})
    await bad("host1", "POST", "/vms/vm1/snapshots", 422, "name", json={"name": "a b"})
    await bad("host1", "POST", "/vms/vm1/snapshots", 422, "JSON", content=b"[",
              headers=json_headers)
    for op in ("clone", "migrate"):
        await bad("host1", "POST", f"/vms/vm1/{op}", 422, "destination", json={})
        await bad("host1", "POST", f"/vms/vm1/{op}", 422, "destination",
                  json={"destination": ""})
    await bad_import(422, "name",
              params={"name": "a b", "image": "img"}, content=b"")
    await bad_import(422, "image",
              params={"name": "x", "image": "../img"}, content=b"")
    await bad_import(422, "copy record",
              params={"name": "x", "image": "img"},
              content=COPY_HEADER + b"\x01" + (IMAGE_SIZE).to_bytes(8, "big")
              + (4096).to_bytes(4, "big") + bytes(4096))
    await bad_import(422, "COPY_RECORD_BYTES",
              params={"name": "x", "image": "img"},
              content=COPY_HEADER + b"\x01" + bytes(8) + (2 * MiB).to_bytes(4, "big"))
    await bad_import(422, "not a copy stream",
              params={"name": "x", "image": "img"}, content=b"GET / HTTP/1.0\r\n")

    # Unknown things: 404.
    await bad("host1", "POST", "/vms", 404, "nope", json={"name": "x", "image": "nope"})
    await bad("host1", "POST", "/vms", 404, "ghost",
              json={"name": "x", "from_snapshot": "ghost/s1"})
    await bad("host1", "POST", "/vms", 404, "nosnap",
              json={"name": "x", "from_snapshot": "vm1/nosnap"})
    await bad("host2", "POST", "/vms", 404, "vm1", json={"name": "x", "from_snapshot": "vm1/s1"})
    await bad("host1", "GET", "/vms/ghost", 404, "ghost")
    await bad("host1", "DELETE", "/vms/ghost", 404, "ghost")
    await bad("host1", "DELETE", "/vms/ghost", 404, "ghost", params={"instance_only": "true"})
    await bad("host1", "POST", "/vms/ghost/snapshots", 404, "ghost", json={"name": "s2"})
    for op in ("clone", "migrate"):
        await bad("host1", "POST", f"/vms/ghost/{op}", 404, "ghost", json={"destination": "host2"})
        await bad("host1", "POST", f"/vms/vm1/{op}", 404, "nohost",
                  json={"destination": "nohost"})
    await bad_import(404, "nope",
              params={"name": "x", "image": "nope"}, content=b"")

    # Names in use: 409.
    await bad("host1", "POST", "/vms", 409, "vm1", json={"name": "vm1", "image": "img"})
    await bad("host1", "POST", "/vms", 409, "vm1", json={"name": "vm1", "from_snapshot": "vm1/s1"})
    await bad("host1", "POST", "/vms/vm1/snapshots", 409, "s1", json={"name": "s1"})
    for op in ("clone", "migrate"):
        await bad("host1", "POST", f"/vms/vm1/{op}", 409, "host1", json={"destination": "host1"})
    await expect_error(env.call_as("host2", "host1", "POST", "/vms/import",
                                   params={"name": "vm1", "image": "img"}, content=b""),
                       409, "vm1")
    assert await env.state() == before

    # A copy stream cut inside a record is refused and leaves nothing behind.
    with pytest.raises(ApiError) as info:
        await env.call_as("host1", "host2", "POST", "/vms/import",
                          params={"name": "x", "image": "img"},
                       content=COPY_HEADER + b"\x01" + (0).to_bytes(8, "big")
                       + (4096).to_bytes(4, "big") + b"abc")
    assert info.value.status in (422, 502) and "inside a record" in info.value.detail
    assert await env.state() == before

    # The VM that every bad request named still serves its bytes.
    want = env.model()
    apply(want, Write(0x5A, 0, 64 * KiB))
    assert_bytes(await env.read(vm1["uri"]), want, "vm1 after the bad requests")


async def test_volt_api_rejects_bad_input_and_changes_nothing(start_cluster) -> None:
    env = await start_cluster(1)
    before = await env.state()
    origin = env.cluster.origin_uri
    json_headers = {"content-type": "application/json"}

    async def bad(method: str, path: str, status: int, *words: str, **kw: Any) -> None:
        await expect_error(env.call("volt", method, path, **kw), status, *words)
        assert await env.state() == before, f"{method} {path} {kw} changed something"

    await bad("POST", "/images", 422, "JSON", content=b'{"name": ', headers=json_headers)
    await bad("POST", "/images", 422, "origins", json={"name": "x"})
    await bad("POST", "/images", 422, "name", json={"origins": [origin]})
    for name in ("a b", "../x", "", "x" * 65):
        await bad("POST", "/images", 422, "name", json={"name": name, "origins": [origin]})
    await bad("POST", "/images", 422, "origins", json={"name": "x", "origins": []})
    for chunk in (5000, 1024, 128 * MiB):
        await bad("POST", "/images", 422, "chunk_size",
                  json={"name": "x", "origins": [origin], "chunk_size": chunk})
    started = time.monotonic()
    await bad("POST", "/images", 422, "cannot be reached",
              json={"name": "x", "origins": ["nbd://127.0.0.1:1/x"]})
    assert time.monotonic() - started < 10
    await bad("POST", "/images", 409, "img", json={"name": "img", "origins": [origin]})
    await bad("POST", "/images", 409, "img", json={"name": "img", "origins": ["nbd://127.0.0.1:1/x"]})
    for path in ("/images/nope", "/images/nope/manifest", "/images/nope/tree", "/agents/nope"):
        await bad("GET", path, 404, "nope")
    await bad("DELETE", "/images/nope", 404, "nope")
    await bad("GET", "/images/a b", 422, "name")

    async def bad_as_agent(method: str, path: str, status: int, *words: str, **kw: Any) -> None:
        await expect_error(env.call_as("host1", "volt", method, path, **kw), status, *words)
        assert await env.state() == before, f"{method} {path} {kw} changed something"

    await bad_as_agent("POST", "/images/nope/members", 404, "nope",
                       json={"agent": "host1", "relay_uri": "nbd://127.0.0.1:1/nope"})
    await bad_as_agent("POST", "/images/img/members", 422, "relay_uri",
                       json={"agent": "host1", "relay_uri": "http://x"})
    # A malformed name is not host1's own: refused before it is looked at.
    await bad_as_agent("POST", "/agents/a b/heartbeat", 403, "host1",
                       json={"url": "http://127.0.0.1:1"})
    # The image that was registered still works.
    vm = await env.create("host1", "vm", image="img")
    assert_bytes(await env.read(vm["uri"]), env.image, "a VM of the registered image")


async def test_clone_to_malformed_destination_answers_422(start_cluster) -> None:
    env = await start_cluster(1)
    await env.create("host1", "vm", image="img")
    before = await env.state()
    for op in ("clone", "migrate"):
        await expect_error(
            env.call("host1", "POST", f"/vms/vm/{op}", json={"destination": "a b"}),
            422, "destination")
        assert await env.state() == before


# --- 2. create, private writes, destroy -------------------------------------------------------


async def test_vms_serve_the_image_and_keep_writes_private(start_cluster) -> None:
    env = await start_cluster(2)
    uris = {
        ("host1", "a"): (await env.create("host1", "a", image="img"))["uri"],
        ("host1", "b"): (await env.create("host1", "b", image="img"))["uri"],
        ("host2", "c"): (await env.create("host2", "c", image="img"))["uri"],
    }
    for (host, name), uri in uris.items():
        assert_bytes(await env.read(uri), env.image, f"{host}/{name} before any write")
    # Overlapping writes, unaligned, one per VM.
    writes = {
        ("host1", "a"): Write(0xA1, 1 * MiB + 100, 300 * KiB),
        ("host1", "b"): Write(0xB2, 1 * MiB + 50 * KiB + 7, 300 * KiB),
        ("host2", "c"): Write(0xC3, 1 * MiB - 4097, 200 * KiB),
    }
    for key, w in writes.items():
        await write(uris[key], w)
    for (host, name), uri in uris.items():
        want = env.model()
        apply(want, writes[(host, name)])
        assert_bytes(await env.read(uri, f"{host}-{name}"), want, f"{host}/{name}")
        doc = await env.vm(host, name)
        assert doc["state"] == "running" and doc["uri"] == uri and doc["written_bytes"] > 0
    # The image cache under the VMs is untouched: a new VM sees the pristine image.
    fresh = await env.create("host1", "fresh", image="img")
    assert fresh["written_bytes"] == 0 and fresh["snapshots"] == []
    assert_bytes(await env.read(fresh["uri"]), env.image, "a new VM after the writes")
    listed = {vm["name"] for vm in await env.call("host1", "GET", "/vms")}
    assert listed == {"a", "b", "fresh"}
    assert {vm["name"] for vm in await env.call("host2", "GET", "/vms")} == {"c"}


async def test_destroy_instance_only_keeps_the_disk_and_plain_destroy_removes_it(
    start_cluster,
) -> None:
    env = await start_cluster(1)
    uri = (await env.create("host1", "vm", image="img"))["uri"]
    data = [Write(0x77, 3 * MiB + 5, 1 * MiB), Write(0x78, 0, 4 * KiB)]
    await write(uri, *data)
    want = env.model()
    apply(want, *data)

    assert await env.call("host1", "DELETE", "/vms/vm", params={"instance_only": "true"}) is None
    doc = await env.vm("host1", "vm")
    assert doc["state"] == "detached" and doc["uri"] is None and doc["written_bytes"] > 0
    assert await unreachable(uri), "a detached VM is still exported"
    assert (env.data_dir("host1") / "vms" / "vm" / "vm.json").exists()
    # Detached is not gone: the name stays taken for anything but reattaching.
    await expect_error(env.create("host1", "vm", image="nope"), 409, "vm")

    again = await env.create("host1", "vm", image="img")
    assert again["state"] == "running" and again["uri"] == uri
    assert_bytes(await env.read(uri), want, "the VM reattached after destroy --instance-only")
    await expect_error(env.create("host1", "vm", image="img"), 409, "vm")

    assert await env.call("host1", "DELETE", "/vms/vm") is None
    await expect_error(env.vm("host1", "vm"), 404, "vm")
    assert await env.call("host1", "GET", "/vms") == []
    assert not (env.data_dir("host1") / "vms" / "vm").exists()
    assert await unreachable(uri)
    # The name is free again, for a brand-new disk.
    new = await env.create("host1", "vm", image="img")
    assert new["written_bytes"] == 0
    assert_bytes(await env.read(new["uri"]), env.image, "a new VM under the destroyed name")


# --- 3. snapshots -----------------------------------------------------------------------------


async def test_create_from_snapshot_sees_the_snapshot_not_later_writes(start_cluster) -> None:
    env = await start_cluster(1)
    uri1 = (await env.create("host1", "vm1", image="img"))["uri"]
    a = Write(0xAA, 1 * MiB + 3, 2 * MiB)
    b = [Write(0xBB, 2 * MiB + 1000, 512 * KiB), Write(0xBC, 6 * MiB, 4 * KiB)]
    await write(uri1, a)
    snap = await env.call("host1", "POST", "/vms/vm1/snapshots", json={"name": "s1"})
    assert snap["snapshots"] == ["s1"] and snap["layers"] == 2
    await write(uri1, *b)

    vm2 = await env.create("host1", "vm2", from_snapshot="vm1/s1")
    assert vm2["image"] == "img"
    want_a = env.model()
    apply(want_a, a)
    want_ab = bytearray(want_a)
    apply(want_ab, *b)
    assert_bytes(await env.read(vm2["uri"], "vm2"), want_a, "vm2 from vm1/s1")
    assert_bytes(await env.read(uri1, "vm1"), want_ab, "vm1 after the snapshot")

    # The two disks are independent from here on.
    c = Write(0xCC, 1 * MiB, 8 * KiB)
    await write(vm2["uri"], c)
    apply(want_a, c)
    assert_bytes(await env.read(uri1, "vm1"), want_ab, "vm1 after vm2 wrote")
    assert_bytes(await env.read(vm2["uri"], "vm2"), want_a, "vm2 after its own write")

    # A second snapshot holds both A and B.
    await env.call("host1", "POST", "/vms/vm1/snapshots", json={"name": "s2"})
    assert (await env.vm("host1", "vm1"))["snapshots"] == ["s1", "s2"]
    await write(uri1, Write(0xDD, 0, 64 * KiB))
    vm3 = await env.create("host1", "vm3", from_snapshot="vm1/s2")
    assert_bytes(await env.read(vm3["uri"], "vm3"), want_ab, "vm3 from vm1/s2")


# --- 4. agent restarts ------------------------------------------------------------------------


async def test_agent_sigterm_restart_keeps_vms_snapshots_and_cache(start_cluster) -> None:
    env = await start_cluster(1)
    cluster = env.cluster
    uri = (await env.create("host1", "vm", image="img"))["uri"]
    a = Write(0x31, 512 * KiB + 17, 1 * MiB)
    b = Write(0x32, 1 * MiB, 100 * KiB + 3)
    await write(uri, a)
    await env.call("host1", "POST", "/vms/vm/snapshots", json={"name": "s1"})
    await write(uri, b)
    want = env.model()
    apply(want, a, b)
    assert_bytes(await env.read(uri), want, "the VM before the restart")  # warms the cache
    sent = cluster.origin_bytes_sent
    assert sent > 0

    assert await cluster.stop_agent("host1") == 0
    await cluster.start_agent("host1")

    vms = await env.call("host1", "GET", "/vms")
    assert [(v["name"], v["state"], v["snapshots"], v["uri"]) for v in vms] == [
        ("vm", "running", ["s1"], uri)
    ]
    assert_bytes(await env.read(uri), want, "the VM after a SIGTERM restart")
    assert cluster.origin_bytes_sent == sent, "the restarted agent fetched cached data again"
    # The snapshot still works after the restart.
    vm2 = await env.create("host1", "vm2", from_snapshot="vm/s1")
    want_a = env.model()
    apply(want_a, a)
    assert_bytes(await env.read(vm2["uri"]), want_a, "a VM from the snapshot after the restart")
    assert cluster.origin_bytes_sent == sent


async def test_agent_sigkill_restart_keeps_flushed_data(start_cluster) -> None:
    env = await start_cluster(1)
    cluster = env.cluster
    uri = (await env.create("host1", "vm", image="img"))["uri"]
    a = Write(0x41, 2 * MiB + 1, 700 * KiB)
    b = Write(0x42, 2 * MiB + 300 * KiB, 1 * MiB)
    await write(uri, a, flush=True)
    await env.call("host1", "POST", "/vms/vm/snapshots", json={"name": "s1"})
    await write(uri, b, flush=True)
    want = env.model()
    apply(want, a, b)
    assert_bytes(await env.read(uri), want, "the VM before SIGKILL")

    cluster.kill_agent("host1")
    assert await unreachable(uri)
    await cluster.start_agent("host1")

    vms = await env.call("host1", "GET", "/vms")
    assert [(v["name"], v["state"], v["snapshots"]) for v in vms] == [("vm", "running", ["s1"])]
    assert_bytes(await env.read(uri), want, "the VM after SIGKILL and restart")
    vm2 = await env.create("host1", "vm2", from_snapshot="vm/s1")
    want_a = env.model()
    apply(want_a, a)
    assert_bytes(await env.read(vm2["uri"]), want_a, "a VM from the snapshot after SIGKILL")
    assert env.imports("host1") == []


# --- 5. clone and migrate ---------------------------------------------------------------------


def scattered_writes(seed: int, count: int, total: int, first_pattern: int) -> list[Write]:
    """`count` writes of about total/count bytes each at unaligned, overlapping offsets."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        length = rng.randrange(total // count // 2, total // count * 3 // 2)
        offset = rng.randrange(0, IMAGE_SIZE - length)
        out.append(Write((first_pattern + i) % 256, offset, length))
    return out


async def test_clone_then_migrate_copy_every_written_byte(start_cluster) -> None:
    env = await start_cluster(3)
    uri = (await env.create("host1", "vm", image="img"))["uri"]
    before_snap = scattered_writes(1, 12, int(1.5 * MiB), 0x10)
    after_snap = scattered_writes(2, 12, int(1.5 * MiB), 0x40)
    await write(uri, *before_snap)
    await env.call("host1", "POST", "/vms/vm/snapshots", json={"name": "s1"})
    await write(uri, *after_snap)  # the copy sends the union of both layers
    want = env.model()
    apply(want, *before_snap, *after_snap)
    source = await env.vm("host1", "vm")
    assert 2 * MiB < source["written_bytes"] < IMAGE_SIZE

    doc = await env.call("host1", "POST", "/vms/vm/clone", json={"destination": "host2"})
    assert doc["name"] == "vm" and doc["state"] == "running"
    clone = await env.vm("host2", "vm")
    assert clone["written_bytes"] == source["written_bytes"]
    assert_bytes(await env.read(clone["uri"], "clone"), want, "the clone on host2")
    assert await env.vm("host1", "vm") == source
    assert_bytes(await env.read(uri, "source"), want, "the source after the clone")
    assert env.imports("host2") == []

    # The clone is a separate disk.
    mark = Write(0xEE, 4 * MiB, 64 * KiB)
    await write(clone["uri"], mark)
    want_clone = bytearray(want)
    apply(want_clone, mark)
    assert_bytes(await env.read(uri, "source"), want, "the source after the clone wrote")

    # Copying onto a name the destination already has fails and changes nothing on either
    # side (the status code is checked in test_copy_onto_a_taken_name_answers_409).
    for op in ("clone", "migrate"):
        with pytest.raises(ApiError) as info:
            await env.call("host1", "POST", f"/vms/vm/{op}", json={"destination": "host2"})
        assert "already exists" in info.value.detail
        assert await env.vm("host1", "vm") == source, f"{op} onto a taken name changed the source"
        assert_bytes(await env.read(uri, "source"), want, f"the source after a refused {op}")
        assert_bytes(
            await env.read(clone["uri"], "clone"), want_clone, f"host2 after a refused {op}"
        )
        assert env.imports("host2") == []

    doc = await env.call("host1", "POST", "/vms/vm/migrate", json={"destination": "host3"})
    assert doc["name"] == "vm"
    moved = await env.vm("host3", "vm")
    assert moved["state"] == "running" and moved["written_bytes"] == source["written_bytes"]
    assert_bytes(await env.read(moved["uri"], "moved"), want, "the VM migrated to host3")
    await expect_error(env.vm("host1", "vm"), 404, "vm")
    assert await env.call("host1", "GET", "/vms") == []
    assert not (env.data_dir("host1") / "vms" / "vm").exists()
    assert await unreachable(uri)
    # The migrated VM is writable where it went; host2's clone is still its own.
    await write(moved["uri"], Write(0x99, 0, 4 * KiB))
    assert_bytes(await env.read(clone["uri"], "clone"), want_clone, "host2's clone at the end")


async def test_copy_onto_a_taken_name_answers_409(start_cluster) -> None:
    env = await start_cluster(2)
    await env.create("host1", "vm", image="img")
    await env.create("host2", "vm", image="img")
    before = await env.state()
    for op in ("clone", "migrate"):
        await expect_error(
            env.call("host1", "POST", f"/vms/vm/{op}", json={"destination": "host2"}),
            409, "already exists")
        assert await env.state() == before


# --- 6. copies cut off midway -----------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP service that, once it has forwarded
    `cut_after` bytes from client to server, runs `on_cut` and resets both sides."""

    def __init__(
        self,
        target_url: str,
        cut_after: int,
        on_cut: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        host, port = target_url.split("://", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.on_cut = on_cut
        self.forwarded = 0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._abort_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _abort_all(self) -> None:
        for w in self._writers:
            w.transport.abort()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.append(client_w)
        if self.cut:
            client_w.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.append(up_w)
        back = asyncio.ensure_future(self._pump(up_r, client_w, upload=False))
        try:
            await self._pump(client_r, up_w, upload=True)
        finally:
            if self.cut:
                back.cancel()
            await asyncio.gather(back, return_exceptions=True)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upload: bool
    ) -> None:
        try:
            while not self.cut:
                data = await src.read(64 * KiB)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                if upload:
                    room = self.cut_after - self.forwarded
                    data = data[:room]
                    self.forwarded += len(data)
                dst.write(data)
                await dst.drain()
                if upload and self.forwarded >= self.cut_after:
                    self.cut = True
                    if self.on_cut is not None:
                        await self.on_cut()
                    self._abort_all()
                    return
        except (ConnectionError, OSError):
            self._abort_all()


@pytest.mark.parametrize(
    ("kill", "op"),
    [(True, "clone"), (False, "clone"), (True, "migrate")],
    ids=["destination-killed", "connection-cut", "migrate-destination-killed"],
)
async def test_clone_or_migrate_cut_off_midway_leaves_nothing_behind(
    start_cluster, kill: bool, op: str
) -> None:
    # Plain HTTP: the proxy stands in for host2 under its own name, which host2's
    # certificate would not match (tests/test_auth.py checks that refusal).
    env = await start_cluster(2, insecure=True, stand_ins=("cutter",))
    cluster = env.cluster
    uri = (await env.create("host1", "vm", image="img"))["uri"]
    # About 7.5 MiB in 8 runs, so the copy is several records of up to 1 MiB each.
    data = [Write(0x60 + i, i * MiB + 32 * KiB, MiB - 64 * KiB) for i in range(8)]
    await write(uri, *data)
    want = env.model()
    apply(want, *data)
    source = await env.vm("host1", "vm")
    assert source["written_bytes"] >= 7 * MiB
    # host2 knows the image already, so the copy is under way before the cut.
    await env.create("host2", "other", image="img")

    async def kill_destination() -> None:
        await asyncio.to_thread(cluster.kill_agent, "host2")

    proxy = CuttingProxy(env.url("host2"), 2 * MiB, kill_destination if kill else None)
    proxy_url = await proxy.start()
    try:
        await env.pose_as_agent("cutter", proxy_url)
        with pytest.raises((ApiError, NetworkError)) as info:
            await env.call("host1", "POST", f"/vms/vm/{op}", json={"destination": "cutter"})
    finally:
        await proxy.close()
    assert proxy.cut and proxy.forwarded == 2 * MiB, "the copy was not cut where intended"
    if isinstance(info.value, ApiError):
        assert info.value.status == 502, info.value

    # The source is untouched.
    assert await env.vm("host1", "vm") == source
    assert_bytes(await env.read(uri, "source"), want, f"the source after a failed {op}")

    if kill:
        assert not cluster.agents["host2"].alive
        await cluster.start_agent("host2")
    else:
        # The destination notices the cut on its own; give it a moment.
        deadline = time.monotonic() + 10
        while env.imports("host2") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert env.imports("host2") == [], "an unfinished import was left behind"
    await expect_error(env.vm("host2", "vm"), 404, "vm")
    assert [v["name"] for v in await env.call("host2", "GET", "/vms")] == ["other"]
    assert sorted(os.listdir(env.data_dir("host2") / "vms")) == ["other"]

    # Nothing stands in the way of a clean copy afterwards.
    await env.call("host1", "POST", f"/vms/vm/{op}", json={"destination": "host2"})
    clone = await env.vm("host2", "vm")
    assert_bytes(await env.read(clone["uri"], "clone"), want, "the clone after a failed one")
    assert env.imports("host2") == []

