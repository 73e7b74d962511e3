"""Digest manifests: holes are skipped, never mis-hashed; the JSON round-trips."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from virtman.blockdev import FileDevice, MemoryDevice, RemoteDevice
from virtman.blockdev.manifest import Manifest, compute_manifest
from virtman.errors import ConfigError
from virtman.nbd.server import NbdServer

CHUNK = 64 * 1024


def sparse_image(path: Path) -> bytes:
    size = 40 * CHUNK + 5000  # a short last chunk, in a hole
    data = bytearray(size)
    rng = random.Random(5)
    for c in (0, 3, 17, 39):
        data[c * CHUNK + 10 : c * CHUNK + 2000] = rng.randbytes(1990)
    with open(path, "wb") as f:
        f.truncate(size)
        for c in (0, 3, 17, 39):
            f.seek(c * CHUNK + 10)
            f.write(data[c * CHUNK + 10 : c * CHUNK + 2000])
    return bytes(data)


async def test_holes_hash_like_zeros_read(tmp_path: Path) -> None:
    data = sparse_image(tmp_path / "img.raw")
    expected = await compute_manifest(MemoryDevice(data=data), CHUNK)  # reads every chunk
    local = FileDevice(tmp_path / "img.raw", read_only=True)
    await local.open()
    assert await compute_manifest(local, CHUNK) == expected
    # Through NBD: the client negotiates base:allocation and skips the holes.
    server = NbdServer({"img": local})
    await server.listen_unix(str(tmp_path / "s.sock"))
    remote = RemoteDevice([f"nbd+unix:///img?socket={tmp_path}/s.sock"])
    await remote.open()
    extents = await remote.block_status(0, remote.size)
    assert any(flags for _, flags in extents) and sum(n for n, _ in extents) == remote.size
    reads_before = local.stats.reads
    assert await compute_manifest(remote, CHUNK) == expected
    assert local.stats.reads - reads_before == 4  # only the chunks holding data
    await remote.close()
    await server.stop()
    await local.close()


def test_manifest_json_round_trip_and_errors() -> None:
    m = Manifest(100, 64, (b"\1" * 32, b"\2" * 32))
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ConfigError, match="has 1 digests"):
        Manifest(100, 64, (b"\1" * 32,))
    with pytest.raises(ConfigError, match="algorithm None is not sha256"):
        Manifest.from_json("{}")
    with pytest.raises(ConfigError, match="not a manifest"):
        Manifest.from_json('{"algorithm": "sha256", "size": 1}')
