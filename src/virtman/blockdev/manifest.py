"""Digest manifests: one SHA-256 per chunk of an image.

A relay checks every chunk it fetches against the manifest, so a corrupt or malicious
parent can delay a read but never make a VM see wrong bytes. File format (JSON)::

    {"algorithm": "sha256", "size": BYTES, "chunk_size": BYTES, "digests": ["hex", ...]}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass

from virtman.blockdev.base import BlockDevice
from virtman.errors import ConfigError
from virtman.protocol.nbd.constants import STATE_ZERO

#: Chunk reads in flight while a manifest is computed.
MANIFEST_READS_IN_FLIGHT = 8

ALGORITHM = "sha256"


@dataclass(frozen=True)
class Manifest:
    size: int
    chunk_size: int
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        expected = (self.size + self.chunk_size - 1) // self.chunk_size
        if len(self.digests) != expected:
            raise ConfigError(
                f"manifest has {len(self.digests)} digests; a {self.size}-byte "
                f"image in {self.chunk_size}-byte chunks has {expected}"
            )

    def matches(self, index: int, data: bytes) -> bool:
        return hashlib.sha256(data).digest() == self.digests[index]

    def fingerprint(self) -> str:
        """One hash naming the whole image content (a cache is reused only for it)."""
        h = hashlib.sha256(f"{self.size}:{self.chunk_size}:".encode())
        for d in self.digests:
            h.update(d)
        return h.hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "algorithm": ALGORITHM,
                "size": self.size,
                "chunk_size": self.chunk_size,
                "digests": [d.hex() for d in self.digests],
            }
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> Manifest:
        try:
            doc = json.loads(text)
            if doc.get("algorithm") != ALGORITHM:
                raise ConfigError(
                    f"{source}: algorithm {doc.get('algorithm')!r} is not {ALGORITHM}"
                )
            digests = tuple(bytes.fromhex(d) for d in doc["digests"])
            if any(len(d) != 32 for d in digests):
                raise ConfigError(f"{source}: a digest is not 32 bytes")
            return cls(int(doc["size"]), int(doc["chunk_size"]), digests)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{source}: not a manifest: {err}") from err


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    try:
        with open(path, encoding="utf-8") as f:
            return Manifest.from_json(f.read(), source=os.fspath(path))
    except OSError as err:
        raise ConfigError(f"cannot read manifest {os.fspath(path)}: {err.strerror}") from err


async def compute_manifest(
    device: BlockDevice, chunk_size: int, concurrency: int = MANIFEST_READS_IN_FLIGHT
) -> Manifest:
    """Hash each chunk of the device: one read of what it holds.

    Chunks the device reports as holes (``block_status``) are not read: their digest is
    that of zeros. Reads run ``concurrency`` at a time and hashing happens on worker
    threads, so a large image is limited by the link, not by round trips.
    """
    count = (device.size + chunk_size - 1) // chunk_size
    zero = _zero_chunks(device, chunk_size)
    holes = await _hole_chunks(device, chunk_size)
    digests: list[bytes] = [b""] * count
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        offset = index * chunk_size
        length = min(chunk_size, device.size - offset)
        if index in holes:
            digests[index] = zero[length]
            return
        async with slots:
            data = await device.read(offset, length)
        digests[index] = await asyncio.to_thread(_sha256, data)

    await asyncio.gather(*(one(i) for i in range(count)))
    return Manifest(device.size, chunk_size, tuple(digests))


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _zero_chunks(device: BlockDevice, chunk_size: int) -> dict[int, bytes]:
    last = device.size - (device.size - 1) // chunk_size * chunk_size if device.size else 0
    return {n: hashlib.sha256(bytes(n)).digest() for n in {chunk_size, last} if n}


async def _hole_chunks(device: BlockDevice, chunk_size: int) -> set[int]:
    """Indices of chunks that lie entirely in ranges the device says read as zeros."""
    holes: set[int] = set()
    pos = 0
    while pos < device.size:
        extents = await device.block_status(pos, min(device.size - pos, 1 << 30))
        for length, flags in extents:
            if length <= 0:
                return holes
            if flags & STATE_ZERO:
                first = -(-pos // chunk_size)
                end = pos + length
                last = (end // chunk_size) - 1 if end < device.size else (end - 1) // chunk_size
                holes.update(range(first, last + 1))
            pos += length
    return holes
