"""What a long step reports while it runs, for whoever shows it.

A command that takes seconds or minutes (``virtman up``, ``virtman image add``) names its
steps and, for each, the quantities that grow while it runs (``Meter``: VMs booted out
of the total, bytes sent by the origin). A ``Display`` shows them: the CLI's terminal
display (``virtman.cli.console``) draws live progress bars; ``PlainDisplay`` prints
nothing while a step runs and one line per note, which is what scripts and tests read
when standard output is not a terminal.

A meter is read, not pushed: the display calls ``read()`` when it redraws, so the code
doing the work keeps counting as it always did and a display that is not drawing costs
nothing.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


class Unit(enum.Enum):
    """How a meter's value reads: a count of things or a number of bytes."""

    COUNT = "count"
    BYTES = "bytes"


def _unknown() -> int | None:
    return None


@dataclass(frozen=True)
class Meter:
    """A quantity that grows while a step runs, read each time a display redraws.

    ``total`` is read too: some totals are learnt only once the step has begun (the
    number of chunks of an image, once its holes are known); None draws no bar.
    """

    label: str
    read: Callable[[], int]
    total: Callable[[], int | None] = _unknown
    unit: Unit = Unit.COUNT


class Display(Protocol):
    def note(self, text: str) -> None:
        """One line of news (a file generated, a host killed, a step's result)."""

    def step(self, title: str, meters: Sequence[Meter] = ()) -> AbstractAsyncContextManager[None]:
        """Show ``meters`` while the body of the ``async with`` runs."""


class PlainDisplay:
    """Plain lines on standard output: notes only, nothing while a step runs."""

    def note(self, text: str) -> None:
        print(text, flush=True)

    @contextlib.asynccontextmanager
    async def step(self, title: str, meters: Sequence[Meter] = ()) -> AsyncIterator[None]:
        yield
