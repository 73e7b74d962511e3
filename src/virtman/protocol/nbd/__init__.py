"""The NBD protocol as a codec with no I/O (in the manner of h11).

``ServerConnection`` and ``ClientConnection`` are fed bytes with ``receive_data`` and
hand out whole messages from ``next_event`` (``NEED_DATA`` until one is complete);
what they want sent is returned as bytes. Every state transition of the protocol lives
in these two classes; the asyncio layer in ``virtman.nbd`` only moves bytes.
"""

from __future__ import annotations

from virtman.protocol.nbd.client import ClientConnection, ClientState
from virtman.protocol.nbd.constants import (
    Command,
    CommandFlag,
    Errno,
    Option,
    Reply,
    TransmissionFlag,
)
from virtman.protocol.nbd.messages import (
    NEED_DATA,
    BlockSizes,
    ExportInfo,
    NeedData,
)
from virtman.protocol.nbd.server import (
    ClientDisconnected,
    ExportSelected,
    OptionRefused,
    Request,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    ServerState,
    TlsRequested,
)

__all__ = [
    "NEED_DATA",
    "BlockSizes",
    "ClientConnection",
    "ClientDisconnected",
    "ClientState",
    "Command",
    "CommandFlag",
    "Errno",
    "ExportInfo",
    "ExportSelected",
    "NeedData",
    "Option",
    "OptionRefused",
    "Reply",
    "Request",
    "RequestReceived",
    "RequestRefused",
    "ServerConnection",
    "ServerState",
    "TlsRequested",
    "TransmissionFlag",
]
