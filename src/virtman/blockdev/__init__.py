"""Block devices: one async interface (``BlockDevice``), several layers.

- ``FileDevice``: a raw image file.
- ``RemoteDevice``: an NBD client over one or more upstream paths, with failover.
- ``CachedDevice``: a persistent chunk cache over an upstream device.
- ``CowDevice``: a persistent copy-on-write overlay over a read-only base.
- ``MemoryDevice``: bytes in memory (the model in tests, and a scratch device).
"""

from __future__ import annotations

from virtman.blockdev.base import BlockDevice, DeviceState, DeviceStats
from virtman.blockdev.file import FileDevice

__all__ = ["BlockDevice", "DeviceState", "DeviceStats", "FileDevice"]
