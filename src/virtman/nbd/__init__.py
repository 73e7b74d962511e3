"""asyncio NBD server and client on the pure codec of ``virtman.protocol.nbd``."""

from __future__ import annotations

from virtman.nbd.client import NbdClient, list_exports
from virtman.nbd.server import Export, NbdServer, ServerStatus

__all__ = ["Export", "NbdClient", "NbdServer", "ServerStatus", "list_exports"]
