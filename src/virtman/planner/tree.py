"""The relay tree of one image: pure code, no I/O (runs in Volt, the tests and the simulator).

Theory of operation
-------------------
Hosts occupy the positions 0, 1, 2, ... of a complete d-ary tree whose root is the
origin, filled level by level (breadth first). Position ``i``'s tree parent is position
``i // d - 1`` (``-1`` is the origin), so level 1 holds positions ``0..d-1``, level 2 the
next ``d**2``, and so on. Because positions are always ``0..n-1`` with no gap, every
level above the last is full and the depth is the least possible, ``ceil(log_d)`` of
the host count (exactly: the smallest L with d + d**2 + ... + d**L >= n).

Each host gets up to ``k`` parents, all on the level just above it: its tree parent
first, then the next hosts of that level in order (wrapping around). Every parent is
one level up, so the parent graph can never have a cycle. Level-1 hosts have only the
origin, which is every host's last path anyway and is not listed among the parents.

- join: the host takes position ``n`` (the next free one). Nobody else moves.
- leave or failure of the host at position ``p``: the host at the last position
  ``n-1`` (a leaf: its child positions would be >= n) moves into ``p``. At most one
  host moves, the tree stays complete, and only the hosts near ``p`` and the moved
  host get new parents (reported in ``Change.affected``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from virtman.errors import PlannerError

ORIGIN = "origin"


@dataclass(frozen=True)
class TreeSettings:
    fanout: int = 2
    parents_per_node: int = 2

    def __post_init__(self) -> None:
        if self.fanout < 1:
            raise PlannerError(f"fan-out must be at least 1, not {self.fanout}")
        if self.parents_per_node < 1:
            raise PlannerError(f"parents per node must be at least 1, not {self.parents_per_node}")


@dataclass
class Change:
    """What one join or leave did."""

    host: str
    joined: bool
    #: (host, old position, new position) of every host that moved.
    moved: list[tuple[str, int, int]] = field(default_factory=list)
    #: Hosts whose parent list changed (they learn it in their next heartbeat).
    affected: set[str] = field(default_factory=set)


def level_of(position: int, fanout: int) -> int:
    """Level of a position (1 for the origin's children)."""
    level, first, width = 1, 0, fanout
    while position >= first + width:
        first += width
        width *= fanout
        level += 1
    return level


def level_bounds(level: int, fanout: int) -> tuple[int, int]:
    """First position of ``level`` and its width."""
    first, width = 0, fanout
    for _ in range(level - 1):
        first += width
        width *= fanout
    return first, width


def min_depth(hosts: int, fanout: int) -> int:
    """The least depth a tree of ``hosts`` hosts can have with this fan-out."""
    if hosts <= 0:
        return 0
    return level_of(hosts - 1, fanout)


class RelayTree:
    def __init__(
        self, settings: TreeSettings | None = None, positions: Mapping[str, int] | None = None
    ) -> None:
        self.settings = settings or TreeSettings()
        self._slots: list[str] = []
        if positions:
            order = sorted(positions.items(), key=lambda kv: kv[1])
            if [p for _, p in order] != list(range(len(order))):
                raise PlannerError(f"positions must be 0..{len(order) - 1} without gaps")
            self._slots = [name for name, _ in order]
        self._index = {name: i for i, name in enumerate(self._slots)}

    # --- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, host: object) -> bool:
        return host in self._index

    @property
    def hosts(self) -> list[str]:
        """Hosts in position order."""
        return list(self._slots)

    def positions(self) -> dict[str, int]:
        return dict(self._index)

    def position(self, host: str) -> int:
        try:
            return self._index[host]
        except KeyError:
            raise PlannerError(f"host {host!r} is not in the tree") from None

    def level(self, host: str) -> int:
        return level_of(self.position(host), self.settings.fanout)

    @property
    def depth(self) -> int:
        return min_depth(len(self._slots), self.settings.fanout)

    def tree_parent(self, host: str) -> str:
        p = self.position(host) // self.settings.fanout - 1
        return ORIGIN if p < 0 else self._slots[p]

    def parents(self, host: str) -> list[str]:
        """The host's parents, best first; empty for level 1 (the origin only)."""
        return self._parents_at(self.position(host))

    def _parents_at(self, position: int) -> list[str]:
        d, k = self.settings.fanout, self.settings.parents_per_node
        primary = position // d - 1
        if primary < 0:
            return []
        first, width = level_bounds(level_of(primary, d), d)
        count = min(k, width)
        return [self._slots[first + (primary - first + j) % width] for j in range(count)]

    def children(self, host: str) -> list[str]:
        """Hosts that have ``host`` among their parents."""
        return [h for i, h in enumerate(self._slots) if host in self._parents_at(i)]

    def parent_map(self) -> dict[str, list[str]]:
        return {h: self._parents_at(i) for i, h in enumerate(self._slots)}

    # --- changes -------------------------------------------------------------------------

    def join(self, host: str) -> Change:
        if host in self._index or host == ORIGIN:
            raise PlannerError(f"host {host!r} is already in the tree")
        self._index[host] = len(self._slots)
        self._slots.append(host)
        return Change(host, True, affected={host})

    def leave(self, host: str) -> Change:
        """Remove a host that left or failed; refill its position from the last one."""
        before = self.parent_map()
        p = self.position(host)
        last = len(self._slots) - 1
        change = Change(host, False)
        del self._index[host]
        if p != last:
            mover = self._slots[last]
            self._slots[p] = mover
            self._index[mover] = p
            change.moved.append((mover, last, p))
        self._slots.pop()
        after = self.parent_map()
        change.affected = {h for h, parents in after.items() if before.get(h) != parents}
        return change

    def apply(self, joins: Iterable[str] = (), leaves: Iterable[str] = ()) -> list[Change]:
        return [self.leave(h) for h in leaves] + [self.join(h) for h in joins]

    # --- checks --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``AssertionError`` if an invariant does not hold (used by the tests)."""
        d, k = self.settings.fanout, self.settings.parents_per_node
        assert sorted(self._index.values()) == list(range(len(self._slots)))
        assert all(self._slots[i] == h for h, i in self._index.items())
        for i, host in enumerate(self._slots):
            parents = self._parents_at(i)
            level = level_of(i, d)
            assert len(set(parents)) == len(parents), f"{host} has a parent twice"
            assert host not in parents, f"{host} is its own parent"
            if level == 1:
                assert parents == []
            else:
                width = level_bounds(level - 1, d)[1]
                assert len(parents) == min(k, width)
                assert all(self.level(p) == level - 1 for p in parents)
        assert self.depth == min_depth(len(self._slots), d)
