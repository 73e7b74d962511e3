"""Emulated hosts on one machine: network namespaces on a bridge, links shaped with tc.

Topology (every name starts with the run's prefix, so nothing else is touched)::

    PREFIX-sw      a namespace holding only the bridge (the switch)
    PREFIX-origin  origin and the benchmark's controller     10.77.0.1
    PREFIX-volt    Volt                                       10.77.0.2
    PREFIX-h1..hN  one agent each                             10.77.1.1 …

Each host namespace has one veth to the switch. Its *upload* is shaped on the host
end, its *download* on the switch end, so every host, the origin included, has
``rate`` up and ``rate`` down. With the kernel's ``netem`` qdisc, the upload also gets
``delay`` (a round trip of 2 x ``delay`` between hosts). Kernels without ``netem``
(this project's machines among them) shape the rate with ``tbf`` and cannot add the
delay: ``delay_applied`` is then False and the results say so. Every address lives
inside a namespace this run made; the root namespace gets no address and no route.

``destroy()`` kills every process left in the namespaces, then deletes them (which
deletes their veths); it is safe to call twice and runs from ``finally`` blocks and
signal handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field

from virtman.cluster.local import Placement
from virtman.errors import ConfigError

log = logging.getLogger(__name__)

SUBNET = "10.77"
PREFIX_LENGTH = 16
#: tbf settings when netem is missing: a 1 MiB bucket, 50 ms of queue.
TBF_BURST = "1mb"
TBF_LATENCY = "50ms"


@dataclass
class LinkShape:
    rate: str = "1gbit"  # tc rate syntax
    delay: str = "0.2ms"  # one-way delay added on each host's upload


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def _in_ns(ns: str) -> list[str]:
    """The prefix that runs a command inside network namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def check_namespaces_work() -> None:
    """Raise ``ConfigError`` saying why this machine cannot run the testbed."""
    if os.geteuid() != 0:
        raise ConfigError("virtman bench scale makes network namespaces: run it as root")
    probe = f"vmprobe{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        raise ConfigError(f"network namespaces cannot be made here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    tc = subprocess.run(["tc", "-V"], capture_output=True, text=True, check=False)
    if tc.returncode != 0:
        raise ConfigError("tc (iproute2) is missing: apt-get install iproute2")


@dataclass
class Netbed(Placement):
    hosts: int
    shape: LinkShape = field(default_factory=LinkShape)
    prefix: str = field(default_factory=lambda: f"vmb{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    #: Whether tc could add the link delay (needs sch_netem).
    delay_applied: bool = False

    # --- placement ---------------------------------------------------------------------------

    def ns(self, service: str) -> str:
        if service.startswith("host"):
            return f"{self.prefix}-h{service[4:]}"
        return f"{self.prefix}-{service}"

    def address(self, service: str) -> str:
        if service == "origin":
            return f"{SUBNET}.0.1"
        if service == "volt":
            return f"{SUBNET}.0.2"
        if service.startswith("host"):
            n = int(service[4:])
            return f"{SUBNET}.{1 + (n - 1) // 250}.{1 + (n - 1) % 250}"
        raise ConfigError(f"no address for service {service!r}")

    def command_prefix(self, service: str) -> list[str]:
        return _in_ns(self.ns(service))

    # --- lifecycle -----------------------------------------------------------------------------

    def create(self) -> None:
        check_namespaces_work()
        switch = self.ns("sw")
        try:
            self._add_ns(switch)
            self.delay_applied = self._netem_available(switch)
            if not self.delay_applied:
                log.warning(
                    "no netem qdisc in this kernel: links are rate-shaped (tbf), the "
                    "%s delay is not applied",
                    self.shape.delay,
                )
            _run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", switch, "link", "set", "br0", "up"])
            services = ["origin", "volt"] + [f"host{i + 1}" for i in range(self.hosts)]
            for index, service in enumerate(services):
                self._attach(service, index)
        except BaseException:
            self.destroy()
            raise
        log.info(
            "testbed: %d namespaces, links %s with %s delay",
            len(self.namespaces),
            self.shape.rate,
            self.shape.delay,
        )

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _attach(self, service: str, index: int) -> None:
        ns, switch = self.ns(service), self.ns("sw")
        self._add_ns(ns)
        outer = f"v{index}"
        # Create the pair inside the host namespace, then move one end to the switch.
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", outer])
        _run(["ip", "-n", ns, "link", "set", outer, "netns", switch])
        _run(["ip", "-n", switch, "link", "set", outer, "master", "br0"])
        _run(["ip", "-n", switch, "link", "set", outer, "up"])
        _run(
            [
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                f"{self.address(service)}/{PREFIX_LENGTH}",
                "dev",
                "eth0",
            ]
        )
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # Upload: host end. Download: switch end.
        _run(
            [
                *_in_ns(ns),
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                *self._qdisc(with_delay=True),
            ]
        )
        _run(
            [
                *_in_ns(switch),
                "tc",
                "qdisc",
                "add",
                "dev",
                outer,
                "root",
                *self._qdisc(with_delay=False),
            ]
        )

    def _qdisc(self, *, with_delay: bool) -> list[str]:
        rate = self.shape.rate
        if self.delay_applied:
            # A generous queue avoids tail drops a real NIC's flow control would not cause.
            delay = ["delay", self.shape.delay] if with_delay else []
            return ["netem", *delay, "rate", rate, "limit", "10000"]
        # The burst must hold at least one timer tick of data at this rate.
        return ["tbf", "rate", rate, "burst", TBF_BURST, "latency", TBF_LATENCY]

    @staticmethod
    def _netem_available(ns: str) -> bool:
        probe = subprocess.run(
            [
                *_in_ns(ns),
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "0ms",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            subprocess.run(
                [*_in_ns(ns), "tc", "qdisc", "del", "dev", "lo", "root"],
                capture_output=True,
                check=False,
            )
        return probe.returncode == 0

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()

    def tcp_retransmits(self, services: list[str]) -> int | None:
        """TCP segments retransmitted so far in these services' namespaces (losses at the
        shaped queues show up here); None if a namespace's counters cannot be read, so
        an unread counter is never reported as no loss."""
        total = 0
        for service in services:
            snmp = subprocess.run(
                [*self.command_prefix(service), "cat", "/proc/net/snmp"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            count = retransmitted_segments(snmp)
            if count is None:
                log.warning("cannot read the TCP counters of %s", service)
                return None
            total += count
        return total

    def leftovers(self) -> list[str]:
        """Namespaces of this run that still exist (should be none after destroy)."""
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        return [
            line.split()[0]
            for line in listed.splitlines()
            if line.split() and line.split()[0].startswith(f"{self.prefix}-")
        ]


def retransmitted_segments(snmp: str) -> int | None:
    """``RetransSegs`` of the ``Tcp:`` table in the text of ``/proc/net/snmp`` (a header
    line of names and a line of values), or None if the text has no such table."""
    tcp = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
    if len(tcp) != 2 or "RetransSegs" not in tcp[0] or len(tcp[1]) != len(tcp[0]):
        return None
    try:
        return int(tcp[1][tcp[0].index("RetransSegs")])
    except ValueError:
        return None
