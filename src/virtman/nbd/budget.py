"""The connections every NBD server of one process may hold together.

A per-server limit alone does not protect the process: an agent runs a relay server and
one server per VM, so N servers each allowed half of the descriptors could hold N halves
of them. Every ``NbdServer`` of a process therefore takes each connection from one shared
``ConnectionBudget`` as well as from its own limit, and a client is refused when either is
full. The budget is ``(soft RLIMIT_NOFILE - DESCRIPTOR_HEADROOM) // 2`` (480 under
``ulimit -n 1024``): however the connections are spread over servers, the process keeps
half of its descriptors for listeners, cache and overlay files, upstream connections,
QEMU and its HTTP API.
"""

from __future__ import annotations

import resource

from virtman.errors import ConfigError
from virtman.limits import DESCRIPTOR_HEADROOM

#: Stands for an unlimited RLIMIT_NOFILE when deriving the budget.
_UNLIMITED_DESCRIPTORS = 1 << 20


def default_max_connections(
    nofile: int | None = None, headroom: int = DESCRIPTOR_HEADROOM
) -> int:
    """Connections a process's NBD servers may hold together when nothing says otherwise.

    ``(soft RLIMIT_NOFILE - headroom) // 2``, at least 1. Under ``ulimit -n 1024`` that
    is 480.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        nofile = _UNLIMITED_DESCRIPTORS
    return max(1, (nofile - headroom) // 2)


class ConnectionBudget:
    """A count of connections held against a limit, shared by the servers given it.

    Not thread-safe: every server of a process runs on its event loop.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(f"a connection budget of {limit} admits no client")
        self.limit = default_max_connections() if limit is None else limit
        self.held = 0

    def take(self) -> bool:
        """One more connection, if the budget has room."""
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def give_back(self) -> None:
        # A slot given back twice would let the process hold more than its limit; each
        # connection gives its slot back once (``_Connection._release``).
        assert self.held > 0, "a connection slot was given back that was not taken"
        self.held -= 1


_process_budget: ConnectionBudget | None = None


def process_budget() -> ConnectionBudget:
    """The budget servers share when they are given none: one per process, made on first
    use (so a test or a CLI can lower RLIMIT_NOFILE before any server starts)."""
    global _process_budget
    if _process_budget is None:
        _process_budget = ConnectionBudget()
    return _process_budget
