"""The CLI on a terminal draws progress and tables; piped, it prints what scripts parse.

Each command runs as a real ``virtman`` process: once with its standard output on a
pseudo-terminal (``pty``), where rich draws bars and boxes with escape sequences, and
once piped, where the output must be plain lines or the JSON document, with no escape
sequence at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtman.blockdev import MemoryDevice
from virtman.blockdev.faults import FaultyDevice
from virtman.cluster.local import OPERATOR, VIEWER, ClusterSettings, LocalCluster
from virtman.errors import ApiError
from virtman.httpapi import ApiClient
from virtman.nbd.server import Export, NbdServer

ESCAPE = "\x1b["
BOX = re.compile("[┏┃┡│└━]")  # rich's table corners and rules, and its progress bar
CHUNK = 64 * 1024
CHUNKS = 64
#: Each origin read waits this long: 64 chunks, 8 in flight, take about 1.6 s to hash,
#: long enough for ``image add`` to poll Volt's progress more than once.
ORIGIN_READ_DELAY = 0.2


def _env() -> dict[str, str]:
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "50"}


def run_in_pty(argv: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` with its standard output (and input) on a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=_env(), close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        assert proc.stderr is not None
        proc.stderr.close()
    return code, out.decode("utf-8", "replace")


def run_piped(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(),
                          check=False)


def virtman(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtman", *args]


def plain(text: str) -> str:
    """What a terminal shows, roughly: the escape sequences taken out."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def operator(cluster: LocalCluster) -> list[str]:
    """The CLI's options for the cluster's operator credentials (HTTPS, its own CA)."""
    return ["--token-file", cluster.token_file(OPERATOR), "--tls-ca", cluster.ca_file]


def assert_plain(out: str) -> None:
    assert ESCAPE not in out and not BOX.search(out), out


@pytest.fixture
async def volt_and_agent(tmp_path: Path) -> AsyncIterator[tuple[LocalCluster, str]]:
    """Volt and one agent as processes, and a slow origin in this process."""
    cluster = LocalCluster(str(tmp_path / "c"), ClusterSettings(hosts=1, log_level="warning"))
    rng = random.Random(3)
    data = rng.randbytes(CHUNK * CHUNKS)  # no chunk reads as zeros: every one is read
    device = FaultyDevice(MemoryDevice(data=data, read_only=True), delay=ORIGIN_READ_DELAY)
    await device.open()
    server = NbdServer([Export("img", device)])
    sock = tmp_path / "origin.sock"
    await server.listen_unix(str(sock))
    try:
        await cluster.start_volt()
        await cluster.start_agent("host1")
        yield cluster, f"nbd+unix:///img?socket={sock}"
    finally:
        await cluster.stop()
        await server.stop()
        await device.close()


async def test_image_add_draws_the_manifest_progress_on_a_terminal_and_json_when_piped(
    volt_and_agent: tuple[LocalCluster, str],
) -> None:
    cluster, origin = volt_and_agent
    volt = cluster.volt_url
    code, out = await asyncio.to_thread(
        run_in_pty, virtman("image", "add", "tty", "--origin", origin, "--chunk-size", "64K",
                            "--volt", volt, *operator(cluster))
    )
    assert code == 0, out
    assert ESCAPE in out and BOX.search(out)
    shown = plain(out)
    assert "manifest of tty" in shown
    # The bar was drawn from Volt's answers while the POST ran, then the image's table.
    assert re.search(rf"\b([1-9]\d*)/{CHUNKS}\b", shown), shown
    assert f"{CHUNKS}/{CHUNKS}" in shown
    assert "tty" in shown and "64.0 KiB" in shown

    piped = await asyncio.to_thread(
        run_piped, virtman("image", "add", "piped", "--origin", origin, "--chunk-size", "64K",
                           "--volt", volt, *operator(cluster))
    )
    assert piped.returncode == 0, piped.stderr
    assert_plain(piped.stdout)
    doc = json.loads(piped.stdout)
    assert doc["name"] == "piped" and doc["size"] == CHUNK * CHUNKS
    assert doc["chunk_size"] == CHUNK

    # --json on a terminal: the document, as piped.
    code, out = await asyncio.to_thread(
        run_in_pty, virtman("image", "list", "--json", "--volt", volt, *operator(cluster))
    )
    assert code == 0, out
    assert {i["name"] for i in json.loads(out)} == {"tty", "piped"}


async def test_volt_reports_a_registration_while_it_runs_and_refuses_a_second(
    volt_and_agent: tuple[LocalCluster, str],
) -> None:
    cluster, origin = volt_and_agent
    body = {"name": "img", "origins": [origin], "chunk_size": CHUNK}
    async with cluster.api(cluster.volt_url, timeout=60) as api:
        adding = asyncio.ensure_future(api.post("/images", json=body))
        seen: list[dict[str, int]] = []
        while not adding.done():
            await asyncio.sleep(0.1)
            try:
                seen.append(await api.get("/registrations/img"))
            except ApiError:  # 404 before it begins and after it ends
                continue
        await adding
        done = [s["chunks_done"] for s in seen]
        assert seen and all(s["chunks"] == CHUNKS and s["size"] == CHUNK * CHUNKS for s in seen)
        assert done == sorted(done) and 0 < done[-1] <= CHUNKS and done[0] < CHUNKS
        assert all(s["bytes_read"] == s["chunks_done"] * CHUNK for s in seen)
        # Finished: no registration any more, and the image is there.
        with pytest.raises(ApiError, match="HTTP 404"):
            await api.get("/registrations/img")
        assert (await api.get("/images/img"))["size"] == CHUNK * CHUNKS

        # A second registration of a name under way is refused: the origin is read once.
        first = asyncio.ensure_future(api.post("/images", json={**body, "name": "again"}))
        while True:
            await asyncio.sleep(0.05)
            try:
                await api.get("/registrations/again")
                break
            except ApiError:  # not begun yet
                assert not first.done()
        with pytest.raises(ApiError, match=r"being registered.*HTTP 409"):
            await api.post("/images", json={**body, "name": "again"})
        # Its progress is an operator's, like the POST: a viewer is refused, even now.
        viewer = ApiClient(cluster.volt_url, token=cluster.token(VIEWER), ca=cluster.ca_file)
        async with viewer:
            with pytest.raises(ApiError, match="HTTP 403"):
                await viewer.get("/registrations/again")
        assert (await first)["name"] == "again"


async def test_vm_list_is_a_table_on_a_terminal_and_json_when_piped(
    volt_and_agent: tuple[LocalCluster, str],
) -> None:
    cluster, origin = volt_and_agent
    await cluster.register_image("img", [origin])
    await cluster.create_vm("host1", "vm1", "img")
    agent = cluster.agents["host1"].url
    listing = virtman("vm", "list", "--agent", agent, *operator(cluster))
    code, out = await asyncio.to_thread(run_in_pty, listing)
    assert code == 0, out
    assert BOX.search(out)
    shown = plain(out)
    assert "vm1" in shown and "img" in shown and "NBD URI" in shown

    piped = await asyncio.to_thread(run_piped, listing)
    assert piped.returncode == 0, piped.stderr
    assert_plain(piped.stdout)
    assert [v["name"] for v in json.loads(piped.stdout)] == ["vm1"]

    code, out = await asyncio.to_thread(
        run_in_pty, virtman("vm", "list", "--json", "--agent", agent, *operator(cluster))
    )
    assert code == 0 and [v["name"] for v in json.loads(out)] == ["vm1"]


def _trace(path: Path) -> Path:
    rng = random.Random(9)
    rows = ["t,op,offset,length"]
    for i in range(200):
        rows.append(f"{i * 0.01:.3f},read,{rng.randrange(0, 2048) * 4096},65536")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_up_draws_progress_and_tables_on_a_terminal(tmp_path: Path) -> None:
    out_json = tmp_path / "up.json"
    code, out = run_in_pty(
        virtman("up", "--hosts", "2", "--vms-per-host", "2", "--trace",
                str(_trace(tmp_path / "t.csv")), "--speed", "4", "--workdir",
                str(tmp_path / "work"), "--json", str(out_json)),
        timeout=180,
    )
    assert code == 0, out
    assert ESCAPE in out
    shown = plain(out)
    for step in ("one VM alone: bytes read", "image manifest: bytes read", "VMs booted",
                 "bytes from the origin"):
        assert step in shown, shown
    assert "4/4" in shown  # every VM counted as it finished
    for title in ("relay tree", "from origin", "boot times", "origin sent"):
        assert title in shown
    assert "┏" in shown and "━" in shown
    # The result document is the same whatever the terminal.
    doc = json.loads(out_json.read_text())
    assert len(doc["vms"]) == 4 and doc["errors_on_surviving_hosts"] == 0
    assert f"wrote {out_json}" in shown
