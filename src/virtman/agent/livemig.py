"""Live migration of a running guest: the pieces both agents use.

Theory of operation
-------------------
``virtman vm migrate VM DEST`` of a VM whose guest runs (``VmManager.migrate_live``,
the source, and ``VmManager.incoming_*``, the destination):

1. The source exports its VM's disk read-only on its relay server (the tree's NBD
   server, so over the cluster's mutual TLS when the cluster has one) under a name
   nobody can guess, and asks the destination (``POST /vms/incoming``) to make the VM:
   its disk is a new overlay over a ``PullDevice`` that reads the source's export and
   the destination's own image cache (``virtman.blockdev.pull``). The destination
   starts QEMU with ``-incoming defer``, has it listen on a TCP port of its NBD address
   and answers with that port.
2. The source's QEMU migrates its memory there (``migrate``); the guest runs on while
   memory is copied and pauses only for the last pass and the device state (QEMU's
   ``downtime``). QEMU flushes the guest's disk before it completes, so from then on
   the source's disk is final.
3. The source sends its written ranges (``POST /vms/incoming/NAME/switch``): the
   destination, whose guest already runs, from now on keeps what it reads from the
   source and pulls the rest in the background. The source measures its own pause:
   from the last poll that saw its guest running to the destination's answer.
4. ``POST /vms/incoming/NAME/confirm`` returns once every written block is at the
   destination and its VM is one of its VMs (flushed, renamed out of its imports). Only
   then does the source remove its VM: the source keeps serving until the destination
   confirms.

Any failure before the confirmation: the source cancels the migration, resumes its
guest if it is paused, withdraws its export and asks the destination to remove the
half-made VM (``DELETE /vms/incoming/NAME``; a dead destination has nothing to remove,
and its next start removes its unfinished imports). One case is left: the destination
confirmed but the answer was lost; the source then keeps its paused guest and says so.

Memory goes over plain TCP: QEMU's ``tls-creds-x509`` wants a directory of PEM files
named for its role (``ca-cert.pem``, ``server-cert.pem`` …) that the cluster's PKI does
not lay out yet (docs/guests.md, "Live migration").
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from virtman.agent.vms import Vm
from virtman.blockdev.pull import PullDevice


def free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now, for QEMU's incoming migration
    (QEMU binds it right after; another bind in between fails the migration cleanly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_uri(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


@dataclass
class Incoming:
    """A VM arriving here by live migration, until it is confirmed or given up."""

    vm: Vm
    pull: PullDevice
    #: Where it is built (``<data>/imports/…``) until it is confirmed.
    directory: str
    source_agent: str
    switched: bool = False
    #: The background pull (``PullDevice.pull_all``), once switched.
    task: asyncio.Task[int] | None = None


@dataclass
class MigrationReport:
    """What a live migration cost, as the API and the CLI report it."""

    vm: str
    destination: str
    #: QEMU's own figure: the source guest's pause for the last memory pass and devices.
    downtime_ms: int = 0
    #: Our measure of the pause, on the source's clock: from the last poll that saw the
    #: guest running to the destination's answer that its guest runs.
    measured_pause_seconds: float = 0.0
    #: Memory QEMU sent (``ram.transferred``).
    ram_bytes: int = 0
    #: Written blocks the destination pulled and kept.
    disk_bytes: int = 0
    #: Blocks the destination read from the source before the switchover (not kept).
    live_read_bytes: int = 0
    seconds: float = 0.0
    qemu: dict[str, Any] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.vm,
            "destination": self.destination,
            "live": True,
            "downtime_ms": self.downtime_ms,
            "measured_pause_seconds": round(self.measured_pause_seconds, 3),
            "ram_bytes": self.ram_bytes,
            "disk_bytes": self.disk_bytes,
            "live_read_bytes": self.live_read_bytes,
            "bytes_moved": self.ram_bytes + self.disk_bytes + self.live_read_bytes,
            "seconds": round(self.seconds, 3),
        }
