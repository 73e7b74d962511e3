"""Block devices: one async interface (``BlockDevice``), several layers.

- ``FileDevice``: a raw image file.
- ``RemoteDevice``: an NBD client over one or more upstream paths, with failover.
- ``CachedDevice``: a persistent chunk cache over an upstream device.
- ``CowDevice``: a persistent copy-on-write overlay over a read-only base.
- ``MemoryDevice``: bytes in memory (the model in tests, and a scratch device).
- ``FaultyDevice``: wraps another to inject delays, errors and corruption.
"""

from __future__ import annotations

from virtman.blockdev.base import BlockDevice, DeviceState, DeviceStats
from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.cow import CowDevice
from virtman.blockdev.faults import FaultyDevice
from virtman.blockdev.file import FileDevice
from virtman.blockdev.manifest import Manifest
from virtman.blockdev.memory import MemoryDevice
from virtman.blockdev.remote import PathPolicy, RemoteDevice

__all__ = [
    "BlockDevice",
    "CachedDevice",
    "CowDevice",
    "DeviceState",
    "DeviceStats",
    "FaultyDevice",
    "FileDevice",
    "Manifest",
    "MemoryDevice",
    "PathPolicy",
    "RemoteDevice",
]
