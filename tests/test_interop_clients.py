"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against `virtman serve` processes.

Every server listens on a Unix socket in the test's temporary directory (one test adds a
TCP listener on 127.0.0.1); the `serve` fixture stops every server it started.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image, require

from virtman.errors import ProcessFailed

MiB = 1024 * 1024
CLIENT_TIMEOUT = 30


def run(*cmd: str, timeout: float = CLIENT_TIMEOUT) -> str:
    """Run a client; fail the test with its output unless it exits 0. Returns stdout."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{cmd[0]} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    )
    return done.stdout


def compare(uri: str, path: Path) -> None:
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), uri)
    assert "Images are identical" in out


def nbdcopy(uri: str, dest: Path, *extra: str) -> bytes:
    run("nbdcopy", *extra, uri, str(dest))
    return dest.read_bytes()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    assert "failed" not in out.lower(), out
    return out


# --- plain file exports --------------------------------------------------------------------


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_qemu_img_compare_file_export(serve, tmp_path: Path, read_only: bool) -> None:
    require("qemu-img", "nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, 4 * MiB + 512)  # not a multiple of the preferred block size
    digest = sha256(img)
    srv = serve("serve", str(img), *(["--read-only"] if read_only else []), export="disk")
    compare(srv.uri, img)
    info = json.loads(run("nbdinfo", "--json", srv.uri))
    assert info["exports"][0]["is_read_only"] is read_only
    assert sha256(img) == digest


def test_nbdinfo_list_and_json(serve, tmp_path: Path) -> None:
    require("nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, 3 * MiB)
    srv = serve("serve", str(img), "--read-only", export="my-export")
    listing = run("nbdinfo", "--list", f"nbd+unix://?socket={srv.socket}")
    assert 'export="my-export"' in listing
    info = json.loads(run("nbdinfo", "--json", srv.uri))
    (export,) = info["exports"]
    assert export["export-name"] == "my-export"
    assert export["export-size"] == 3 * MiB
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True
    assert info["protocol"] == "newstyle-fixed"


def test_tcp_listener_on_loopback(serve, tmp_path: Path) -> None:
    require("qemu-img", "nbdinfo")
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB)
    port = free_port()
    serve("serve", str(img), "--read-only", "--listen", f"127.0.0.1:{port}", "--insecure",
          export="disk")
    uri = f"nbd://127.0.0.1:{port}/disk"
    compare(uri, img)
    info = json.loads(run("nbdinfo", "--json", uri))
    assert info["exports"][0]["export-size"] == 2 * MiB


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_whole_export(serve, tmp_path: Path, connections: int) -> None:
    require("nbdcopy")
    img = tmp_path / "disk.img"
    data = make_image(img, 8 * MiB + 4096 + 7, seed=connections)
    srv = serve("serve", str(img), "--read-only", export="disk")
    out = nbdcopy(srv.uri, tmp_path / "copy.img", f"--connections={connections}")
    assert out == data


# --- copy-on-write overlays ----------------------------------------------------------------


def _apply(base: bytes, writes: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(base)
    for pattern, offset, length in writes:
        out[offset : offset + length] = bytes([pattern]) * length
    return bytes(out)


def _write_cmds(writes: list[tuple[int, int, int]]) -> list[str]:
    return [f"write -P {p:#x} {o} {n}" for p, o, n in writes]


def _read_cmds(writes: list[tuple[int, int, int]]) -> list[str]:
    return [f"read -P {p:#x} {o} {n}" for p, o, n in writes]


def test_qemu_io_through_overlay_survives_restart(serve, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy")
    img = tmp_path / "base.img"
    base_data = make_image(img, 4 * MiB)
    digest = sha256(img)
    base = serve("serve", str(img), "--read-only", export="base")
    overlay_file = tmp_path / "vm.overlay"
    ov = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")

    flushed = [
        (0xAB, 1000, 5000),  # unaligned both ends, spans two blocks
        (0x11, 8192, 4096),  # exactly one block
        (0x5C, 4 * MiB - 777, 777),  # the tail of the device
        (0x00, 2 * MiB + 3, 1),  # one byte
    ]
    qemu_io(ov.uri, *_write_cmds(flushed), *_read_cmds(flushed), "flush")
    # An overlapping rewrite of part of the first range, not followed by a FLUSH: SIGTERM
    # must make it durable before the server exits.
    unflushed = [(0xCD, 3000, 500)]
    qemu_io(ov.uri, *_write_cmds(unflushed), *_read_cmds(unflushed))
    expected = _apply(base_data, flushed + unflushed)
    assert nbdcopy(ov.uri, tmp_path / "before.img") == expected

    assert ov.stop(signal.SIGTERM) == 0
    assert sha256(img) == digest
    ov2 = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")
    after = [(0xAB, 1000, 2000), (0xCD, 3000, 500), (0xAB, 3500, 2500), *flushed[1:]]
    qemu_io(ov2.uri, *_read_cmds(after))
    assert nbdcopy(ov2.uri, tmp_path / "after.img") == expected
    assert sha256(img) == digest


def test_qemu_io_zeroes_and_fua_through_overlay(serve, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy")
    img = tmp_path / "base.img"
    size = MiB + 1000  # not a whole number of overlay blocks
    base_data = make_image(img, size, seed=7)
    digest = sha256(img)
    base = serve("serve", str(img), "--read-only", export="base")
    overlay_file = tmp_path / "vm.overlay"
    ov = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")
    ops = [
        ("write -z 100 50", (0x00, 100, 50)),  # inside one block
        ("write -z 5000 20000", (0x00, 5000, 20000)),  # partial edges, whole blocks inside
        ("write -f -P 0x77 30000 3000", (0x77, 30000, 3000)),  # FUA
        (f"write -P 0x42 {size - 1500} 1500", (0x42, size - 1500, 1500)),  # last block
        (f"write -z {size - 4000} 4000", (0x00, size - 4000, 4000)),  # zeroes to the end
    ]
    qemu_io(ov.uri, *[cmd for cmd, _ in ops])
    writes = [w for _, w in ops]
    expected = _apply(base_data, writes)
    assert nbdcopy(ov.uri, tmp_path / "before.img") == expected
    assert ov.stop(signal.SIGTERM) == 0
    ov = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")
    qemu_io(ov.uri, "read -P 0 5000 20000", "read -P 0x77 30000 3000")
    assert nbdcopy(ov.uri, tmp_path / "after.img") == expected
    assert sha256(img) == digest


def test_two_overlays_over_one_base_are_independent(serve, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy")
    img = tmp_path / "base.img"
    base_data = make_image(img, 2 * MiB)
    digest = sha256(img)
    base = serve("serve", str(img), "--read-only", export="base")
    a = serve("serve", "--base", base.uri, "--overlay", str(tmp_path / "a.overlay"), export="a")
    b = serve("serve", "--base", base.uri, "--overlay", str(tmp_path / "b.overlay"), export="b")
    writes_a = [(0xAA, 100, 300), (0xA1, MiB + 5, 9000)]
    writes_b = [(0xBB, 200, 300), (0xB1, MiB, 4096)]
    qemu_io(a.uri, *_write_cmds(writes_a), "flush")
    qemu_io(b.uri, *_write_cmds(writes_b), "flush")
    assert nbdcopy(a.uri, tmp_path / "a.img") == _apply(base_data, writes_a)
    assert nbdcopy(b.uri, tmp_path / "b.img") == _apply(base_data, writes_b)
    assert sha256(img) == digest


# --- caching relays ------------------------------------------------------------------------


def _relay(serve, upstreams: list[str], cache_dir: Path, *extra: str, name: str | None = None):
    args = ["serve"]
    for uri in upstreams:
        args += ["--upstream", uri]
    return serve(*args, "--cache-dir", str(cache_dir), *extra, export="disk", name=name)


def test_relay_chain_serves_after_origin_stops(serve, tmp_path: Path) -> None:
    require("qemu-img")
    img = tmp_path / "disk.img"
    make_image(img, 4 * MiB + 4096)
    origin = serve("serve", str(img), "--read-only", export="disk")
    r1 = _relay(serve, [origin.uri], tmp_path / "cache1")
    r2 = _relay(serve, [r1.uri], tmp_path / "cache2")
    compare(r2.uri, img)
    assert origin.stop(signal.SIGTERM) == 0
    compare(r2.uri, img)
    assert r1.proc.poll() is None and r2.proc.poll() is None


def test_relay_restart_reuses_cache(serve, tmp_path: Path) -> None:
    require("nbdcopy")
    img = tmp_path / "disk.img"
    data = make_image(img, 4 * MiB)
    origin = serve("serve", str(img), "--read-only", export="disk")
    cache = tmp_path / "cache"
    relay = _relay(serve, [origin.uri], cache)
    assert nbdcopy(relay.uri, tmp_path / "first.img") == data
    assert relay.stop(signal.SIGTERM) == 0
    # Restart on the same cache while the origin is still up (so the relay can open),
    # then take the origin away: every byte must come from the cache.
    relay = _relay(serve, [origin.uri], cache)
    assert "reused: 16 of 16 chunks held" in relay.log.read_text()
    assert origin.stop(signal.SIGTERM) == 0
    assert nbdcopy(relay.uri, tmp_path / "second.img") == data


def test_relay_restart_with_origin_down_serves_warm_cache(serve, tmp_path: Path) -> None:
    require("nbdcopy", "qemu-img")
    img = tmp_path / "disk.img"
    data = make_image(img, 4 * MiB)
    origin = serve("serve", str(img), "--read-only", export="disk")
    cache = tmp_path / "cache"
    relay = _relay(serve, [origin.uri], cache)
    assert nbdcopy(relay.uri, tmp_path / "first.img") == data
    assert relay.stop(signal.SIGTERM) == 0
    assert origin.stop(signal.SIGTERM) == 0
    try:
        relay = _relay(serve, [origin.uri], cache)
    except ProcessFailed as err:  # the fixture's "... exited with status 1: ..."
        pytest.fail(f"relay did not start on its warm cache: {err}")
    compare(relay.uri, img)
    assert nbdcopy(relay.uri, tmp_path / "second.img") == data


def test_fallback_is_used_only_while_no_upstream_is_up(serve, tmp_path: Path) -> None:
    require("nbdcopy")
    # Two origins of the same size but different bytes show which one served each chunk.
    primary_img, fallback_img = tmp_path / "primary.img", tmp_path / "fallback.img"
    primary_data = make_image(primary_img, 2 * MiB, seed=1)
    make_image(fallback_img, 2 * MiB, seed=2)
    primary = serve("serve", str(primary_img), "--read-only", export="disk")
    fallback = serve("serve", str(fallback_img), "--read-only", export="disk")
    relay = _relay(serve, [primary.uri], tmp_path / "cache", "--fallback", fallback.uri)
    assert nbdcopy(relay.uri, tmp_path / "copy.img") == primary_data


def test_relay_fails_over_when_an_upstream_is_killed_mid_read(serve, tmp_path: Path) -> None:
    require("nbdcopy")
    img = tmp_path / "disk.img"
    size = 16 * MiB
    data = make_image(img, size)
    o1 = serve("serve", str(img), "--read-only", export="disk")
    o2 = serve("serve", str(img), "--read-only", export="disk")
    cache = tmp_path / "cache"
    # Small chunks: many upstream round trips, so the copy is still running at the kill.
    relay = _relay(serve, [o1.uri, o2.uri], cache, "--chunk-size", "4K")
    store = cache / "cache.vmstore"
    out = tmp_path / "copy.img"
    copy = subprocess.Popen(
        ["nbdcopy", "--connections=1", "--requests=4", "--request-size=65536", relay.uri,
         str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        # Wait until about an eighth of the image has been fetched into the cache.
        while os.stat(store).st_blocks * 512 < size // 8 and copy.poll() is None:
            assert time.monotonic() < deadline, "relay fetched nothing"
            time.sleep(0.005)
        assert copy.poll() is None, "the copy finished before the upstream could be killed"
        o1.stop(signal.SIGKILL)
        output, _ = copy.communicate(timeout=CLIENT_TIMEOUT)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert copy.returncode == 0, output
    assert out.read_bytes() == data
    assert "is down" in relay.log.read_text()
    assert relay.proc.poll() is None and o2.proc.poll() is None


def test_manifest_rejects_a_parent_serving_wrong_bytes(serve, tmp_path: Path) -> None:
    require("nbdcopy")
    good_img, bad_img = tmp_path / "good.img", tmp_path / "bad.img"
    good = make_image(good_img, 2 * MiB, seed=1)
    make_image(bad_img, 2 * MiB, seed=2)
    manifest = tmp_path / "disk.manifest"
    digest = subprocess.run(
        [sys.executable, "-m", "virtman", "digest", str(good_img), "--chunk-size", "64K",
         "-o", str(manifest)], capture_output=True, text=True, check=False)
    assert digest.returncode == 0, digest.stderr
    bad = serve("serve", str(bad_img), "--read-only", export="disk")
    origin = serve("serve", str(good_img), "--read-only", export="disk")
    relay = _relay(serve, [bad.uri], tmp_path / "cache", "--fallback", origin.uri,
                   "--chunk-size", "64K", "--manifest", str(manifest))
    assert nbdcopy(relay.uri, tmp_path / "copy.img") == good
    assert relay.log.read_text().count("failed its digest") == 32  # every chunk, once


def test_flushed_writes_survive_sigkill_of_the_overlay_server(serve, tmp_path: Path) -> None:
    require("qemu-io", "nbdcopy")
    img = tmp_path / "base.img"
    base_data = make_image(img, 2 * MiB)
    base = serve("serve", str(img), "--read-only", export="base")
    overlay_file = tmp_path / "vm.overlay"
    ov = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")
    flushed = [(0x3C, 4095, 9000), (0x71, MiB, 65536)]
    qemu_io(ov.uri, *_write_cmds(flushed), "flush")
    ov.stop(signal.SIGKILL)  # no clean shutdown: only what FLUSH made durable counts
    ov2 = serve("serve", "--base", base.uri, "--overlay", str(overlay_file), export="vm")
    assert nbdcopy(ov2.uri, tmp_path / "after.img") == _apply(base_data, flushed)


async def test_an_unlisted_export_is_served_but_not_listed(tmp_path: Path) -> None:
    """A migrating VM's disk is exported under a name only its destination is told:
    ``NBD_OPT_LIST`` must not give that name away, and the name must still open it."""
    import asyncio

    from virtman.blockdev import MemoryDevice
    from virtman.nbd.server import Export, NbdServer

    public, secret = MemoryDevice(data=b"p" * 65536), MemoryDevice(data=b"s" * 65536)
    for device in (public, secret):
        await device.open()
    server = NbdServer([Export("public", public), Export("migrate-vm-1f2e", secret,
                                                         listed=False)])
    sock = tmp_path / "x.sock"
    await server.listen_unix(str(sock))
    try:
        listing = await asyncio.to_thread(run, "nbdinfo", "--list", f"nbd+unix://?socket={sock}")
        assert 'export="public"' in listing
        assert "migrate-vm-1f2e" not in listing
        info = json.loads(await asyncio.to_thread(
            run, "nbdinfo", "--json", f"nbd+unix:///migrate-vm-1f2e?socket={sock}"))
        assert info["exports"][0]["export-size"] == 65536
    finally:
        await server.stop()
        for device in (public, secret):
            await device.close()
