"""Pure planning code (no I/O): the relay tree of each image."""

from __future__ import annotations

from virtman.errors import PlannerError
from virtman.planner.tree import ORIGIN, Change, RelayTree, TreeSettings

__all__ = ["ORIGIN", "Change", "PlannerError", "RelayTree", "TreeSettings"]
