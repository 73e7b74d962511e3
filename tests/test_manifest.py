"""Digest manifests: holes are skipped, never mis-hashed; the JSON round-trips."""

from __future__ import annotations

import hashlib
import json
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
    m = Manifest(100, 64, {0: b"\1" * 32, 1: b"\2" * 32})
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ConfigError, match="has 1 digests"):
        Manifest.from_digests(100, 64, (b"\1" * 32,))
    with pytest.raises(ConfigError, match="names chunk 2; a 100-byte image"):
        Manifest(100, 64, {2: b"\1" * 32})
    with pytest.raises(ConfigError, match="digest of chunk 0 is not 32 bytes"):
        Manifest.from_json('{"algorithm": "sha256", "size": 1, "chunk_size": 64, '
                           '"digests": {"0": "abcd"}}')
    with pytest.raises(ConfigError, match="algorithm None is not sha256"):
        Manifest.from_json("{}")
    with pytest.raises(ConfigError, match="not a manifest"):
        Manifest.from_json('{"algorithm": "sha256", "size": 1}')


def test_zero_chunks_are_implied_not_listed(tmp_path: Path) -> None:
    """Only chunks with data are written out, so a sparse image's manifest stays small;
    a zero chunk still has a digest to check against, and the first (full list) format
    reads as the same manifest."""
    data = sparse_image(tmp_path / "img.raw")
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    full = [hashlib.sha256(c).digest() for c in chunks]
    m = Manifest.from_digests(len(data), CHUNK, full)
    assert sorted(m.data_digests) == [0, 3, 17, 39]
    assert all(m.matches(i, c) for i, c in enumerate(chunks))
    assert not m.matches(1, b"\1" + bytes(CHUNK - 1))
    assert m.matches(40, bytes(5000)) and not m.matches(40, bytes(CHUNK))  # short last chunk
    legacy = json.dumps(
        {"algorithm": "sha256", "size": len(data), "chunk_size": CHUNK,
         "digests": [d.hex() for d in full]}
    )
    assert Manifest.from_json(legacy) == m
    assert Manifest.from_json(legacy).fingerprint() == m.fingerprint()
    assert len(m.to_json()) < len(legacy) / 5
