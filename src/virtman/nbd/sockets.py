"""Socket settings shared by the NBD server and client."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from virtman.limits import SOCKET_BUFFER_BYTES


def set_socket_buffers(transport: asyncio.BaseTransport, size: int = SOCKET_BUFFER_BYTES) -> None:
    """Ask for large kernel buffers (best effort: the kernel may cap or refuse them)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
