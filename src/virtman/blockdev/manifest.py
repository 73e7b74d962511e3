"""Digest manifests: one SHA-256 per chunk of an image.

A relay checks every chunk it fetches against the manifest, so a corrupt or malicious
parent can delay a read but never make a VM see wrong bytes. File format (JSON)::

    {"algorithm": "sha256", "size": BYTES, "chunk_size": BYTES, "digests": ["hex", ...]}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from virtman.blockdev.base import BlockDevice
from virtman.errors import ConfigError

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


async def compute_manifest(device: BlockDevice, chunk_size: int) -> Manifest:
    """Read the whole device once and hash each chunk."""
    digests = []
    for offset in range(0, device.size, chunk_size):
        data = await device.read(offset, min(chunk_size, device.size - offset))
        digests.append(hashlib.sha256(data).digest())
    return Manifest(device.size, chunk_size, tuple(digests))
