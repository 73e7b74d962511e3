"""Sparse-file operations the standard library lacks: punching holes.

Linux ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` frees a range of a file
so it reads as zeros and takes no space. Where it is not available (another OS, a
file system without holes) ``punch_hole`` writes zeros instead, which reads the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_STEP = 1 << 20

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except (OSError, AttributeError):
    _libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros, freeing their space if possible."""
    if length <= 0:
        return
    if _libc is not None:
        rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (95, 22):  # EOPNOTSUPP, EINVAL: fall back to writing zeros
            raise OSError(err, os.strerror(err))
    for pos in range(offset, offset + length, _ZERO_STEP):
        n = min(_ZERO_STEP, offset + length - pos)
        os.pwrite(fd, bytes(n), pos)
