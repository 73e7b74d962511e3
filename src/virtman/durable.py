"""Files that survive a crash or a power cut in a state someone already relied on.

A rename is durable only once its directory is synced; a file replaced in place can be
read half-written. Everything virtman acknowledges or hands to another process (a VM's
files before a migrate's source deletes its copy, a cache store's header, certificates,
the tokens file a running service reads) goes through these two.
"""

from __future__ import annotations

import os
import secrets


def fsync_dir(directory: str) -> None:
    """Make a rename or a new name in ``directory`` durable: without it a power cut can
    undo a move that was already acknowledged."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (permissions ``mode``): a reader sees the old file
    or the new one, never part of either, and after a crash one of them is there."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        # The umask may have taken bits away (or the mode is wider than it allows): set it.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
