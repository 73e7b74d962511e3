"""The device interface the NBD server is typed against, below both ``nbd/`` and ``blockdev/``.

``nbd/server.py`` serves any object with this shape; ``blockdev/`` implements it (every
``BlockDevice`` matches it structurally). Keeping it here, in a module that imports
nothing of virtman, means the server never imports ``blockdev`` and ``blockdev`` (whose
``RemoteDevice`` uses the NBD client) never sees an arrow pointing back at it.

The semantics are NBD's and are stated once, on ``virtman.blockdev.base.BlockDevice``:
requests that cannot be served as asked raise ``InvalidRequest`` (with its NBD errno),
failing storage raises ``DeviceError``.
"""

from __future__ import annotations

from typing import Protocol


class Device(Protocol):
    """What a server needs of a device: its size, whether it takes writes, the requests."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]: ...

    def describe(self) -> str: ...


class FileReads(Protocol):
    """Optional, beside ``Device``: a device whose reads can be served from a file.

    ``read_location(offset, length)`` returns ``(fd, file_offset)`` when the whole range
    is held, checked, at ``file_offset`` of the open descriptor ``fd``, and counts the
    read as served (its statistics); it returns None (and counts nothing) otherwise, and
    the caller reads as usual. The caller must send the bytes before it next yields to
    the event loop: the descriptor is only guaranteed open, and the range held, until
    then. A server uses this for ``sendfile`` (``virtman.nbd.server``); it looks the
    method up with ``getattr``, as a runtime protocol check would cost more than the
    read."""

    def read_location(self, offset: int, length: int) -> tuple[int, int] | None: ...

    async def read_or_locate(self, offset: int, length: int) -> bytes | tuple[int, int]:
        """A read that may first have to load the range (a cold cache read), then
        returns where it lies, as ``read_location`` does, when it is now held in the
        file (send before yielding), else its bytes; counted as a read either way."""
        ...
