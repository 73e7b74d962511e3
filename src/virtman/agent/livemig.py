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
   destination learns what to pull, starts its guest (waiting paused until now), from
   now on keeps what it reads from the source and pulls the rest in the background.
   The source measures its own pause: from the last poll that saw its guest running
   to the destination's answer.
4. ``POST /vms/incoming/NAME/confirm`` returns once every written block is at the
   destination and its VM is one of its VMs (flushed, renamed out of its imports). Only
   then does the source remove its VM: the source keeps serving until the destination
   confirms.

Any failure before the confirmation: the source cancels the migration, resumes its
guest if it is paused, withdraws its export and asks the destination to remove the
half-made VM (``DELETE /vms/incoming/NAME``; a dead destination has nothing to remove,
and its next start removes its unfinished imports). After the switchover the guest runs at
the destination (its QEMU waited paused, ``-S``, until then), so a source whose
confirmation fails from then on keeps its copy paused and its export up, and never runs
it again: no failure makes two copies run (docs/guests.md, "Live migration").

Memory goes over TLS when the cluster has TLS: QEMU's ``tls-creds-x509`` reads a
directory of PEM files named for their role (``ca-cert.pem``, ``server-cert.pem``,
``client-key.pem`` …); ``qemu_tls_dir`` lays the agent's own certificate (made for both
server and client use by ``virtman.pki``) out that way. Each side checks the other's
certificate against the cluster's CA, and the source checks the destination's for the
address it migrates to; QEMU reads the files when the credentials object is added.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from virtman.agent.vms import Vm
from virtman.blockdev.pull import PullDevice
from virtman.hypervisor.qmp import Monitor
from virtman.tlsconfig import TlsFiles


def free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now, for QEMU's incoming migration
    (QEMU binds it right after; another bind in between fails the migration cleanly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def qemu_tls_dir(tls: TlsFiles, directory: str) -> str:
    """A directory laid out for QEMU's ``tls-creds-x509``: the agent's certificate and key
    under both role names, and the cluster's CA (symbolic links: nothing is copied)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    links = {"ca-cert.pem": tls.ca}
    for role in ("server", "client"):
        links[f"{role}-cert.pem"] = tls.cert
        links[f"{role}-key.pem"] = tls.key
    for name, target in links.items():
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(os.path.abspath(target), path)
    return directory


async def use_tls(monitor: Monitor, directory: str, *, server: bool,
                  hostname: str | None = None) -> str:
    """Make QEMU migrate over TLS with the credentials in ``directory``, checking the
    peer's certificate (and, as a client, that it is valid for ``hostname``). The id of
    the credentials object, for ``drop_tls``."""
    ident = f"virtman-tls-{uuid.uuid4().hex[:8]}"
    await monitor.execute("object-add", {
        "qom-type": "tls-creds-x509", "id": ident, "dir": directory,
        "endpoint": "server" if server else "client", "verify-peer": True,
    })
    params: dict[str, object] = {"tls-creds": ident}
    if hostname is not None:
        params["tls-hostname"] = hostname
    await monitor.execute("migrate-set-parameters", params)
    return ident


async def drop_tls(monitor: Monitor, ident: str) -> None:
    """Undo ``use_tls`` on a QEMU that runs on (a source whose migration failed)."""
    await monitor.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    await monitor.execute("object-del", {"id": ident})


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
    #: The memory went over TLS (the cluster's certificates).
    tls: bool = False
    #: A clone: the source's snapshot the clone's disk was pulled from.
    snapshot: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.vm,
            "destination": self.destination,
            "live": True,
            "kept": self.snapshot is not None,
            "snapshot": self.snapshot,
            "memory_tls": self.tls,
            "downtime_ms": self.downtime_ms,
            "measured_pause_seconds": round(self.measured_pause_seconds, 3),
            "ram_bytes": self.ram_bytes,
            "disk_bytes": self.disk_bytes,
            "live_read_bytes": self.live_read_bytes,
            "bytes_moved": self.ram_bytes + self.disk_bytes + self.live_read_bytes,
            "seconds": round(self.seconds, 3),
        }
