"""How a host gets an image: the delivery modes the agent runs and the tools compare.

It lives below the agent, the cluster launcher, the simulator and the benchmarks, so
each of them names a mode the same way without importing another.
"""

from __future__ import annotations

import enum


class DeliveryMode(enum.Enum):
    """How a host gets an image. Only ``virtman`` is for use; the others are the
    alternatives the scale benchmark compares it with (listed from the simplest)."""

    STAR = "star"  # every read goes to the origin, no cache (a multi-attached volume)
    COPY = "copy"  # copy the whole image from the origin first, then boot locally
    PAPER = "paper"  # VirtMan as published: tree, one parent, no origin path below level 1
    VIRTMAN = "virtman"  # relay tree, k parents, origin fallback, cache, no attach delay

    @property
    def in_tree(self) -> bool:
        return self in (DeliveryMode.VIRTMAN, DeliveryMode.PAPER)


#: Every mode's name, in the order reports list them.
MODE_NAMES: tuple[str, ...] = tuple(m.value for m in DeliveryMode)
