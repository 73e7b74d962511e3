"""Terminal output of the CLI: live progress and tables when standard output is a terminal.

Scripts, tests and CI pipe the CLI's standard output and parse it, so what a command
prints there stays as it was: plain lines, no escape sequences (``PlainDisplay``, the
JSON documents). Only when standard output is a terminal (``is_terminal``) do commands
use ``RichDisplay`` and ``print_table``, built on ``rich``.

A step's progress is redrawn every ``PROGRESS_REFRESH_SECONDS`` by a task of the
command's own event loop (rich's refresh thread is off): each redraw reads the step's
meters, counters the command already keeps, so drawing adds no request to the cluster
being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from virtman.progress import Meter, Unit
from virtman.sizes import format_size


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (standard output by default) is a terminal someone watches."""
    stream = stream if stream is not None else sys.stdout
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


def make_console() -> Console:
    # No guessing at numbers and paths to colour: the tables say what they hold.
    return Console(highlight=False)


class _ValueColumn(ProgressColumn):
    """A meter's value and total: ``3/32`` for counts, ``1.5 MiB / 40 MiB`` for bytes."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if unit is None:  # a step without a meter: its spinner and time say enough
            return Text("")
        done = int(task.completed)
        total = None if task.total is None else int(task.total)
        if unit is Unit.BYTES:
            text = format_size(done) if total is None else (
                f"{format_size(done)} / {format_size(total)}"
            )
        else:
            text = str(done) if total is None else f"{done}/{total}"
        return Text(text)


class _SpinnerColumn(SpinnerColumn):
    """A spinner while the step runs, nothing once it has ended (even short of a total:
    a meter need not reach its total, e.g. a manifest reads less than the file holds)."""

    def render(self, task: Task) -> Text:
        if task.fields.get("ended"):
            return Text(" ")
        rendered = super().render(task)
        return rendered if isinstance(rendered, Text) else Text(" ")


class RichDisplay:
    """Live progress bars and notes on a terminal (``virtman.progress.Display``)."""

    def __init__(self, console: Console, refresh: float) -> None:
        self.console = console
        self.refresh = refresh

    def note(self, text: str) -> None:
        # soft_wrap: the terminal wraps a long line; rich would cut it with newlines,
        # and an address in a note (the live view's) must copy whole.
        self.console.print(text, markup=False, soft_wrap=True)

    @contextlib.asynccontextmanager
    async def step(self, title: str, meters: Sequence[Meter] = ()) -> AsyncIterator[None]:
        progress = Progress(
            _SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _ValueColumn(),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
        )
        tasks: list[tuple[TaskID, Meter | None]] = []
        if not meters:  # a step with nothing to count still shows that it runs
            tasks.append((progress.add_task(title, total=None, unit=None), None))
        for m in meters:
            label = f"{title}: {m.label}" if title else m.label
            tasks.append((progress.add_task(label, total=m.total(), unit=m.unit), m))

        def redraw() -> None:
            for task, meter in tasks:
                if meter is not None:
                    progress.update(task, completed=meter.read(), total=meter.total())
            progress.refresh()

        async def redraw_every() -> None:
            while True:
                redraw()
                await asyncio.sleep(self.refresh)

        with progress:
            drawing = asyncio.get_running_loop().create_task(redraw_every(), name=title)
            try:
                yield
            finally:
                drawing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawing
                for task, meter in tasks:
                    progress.update(task, ended=True)
                    if meter is None:  # done: a full bar, not a pulsing one
                        progress.update(task, total=1, completed=1)
                redraw()


def print_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[str] = (),
) -> None:
    """A boxed table; the columns named in ``right`` (numbers) are right-aligned."""
    # As wide as its title at least: a narrow table would wrap its title over two lines.
    table = Table(title=title, title_justify="left", min_width=len(title))
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # cells are data, not rich markup
    console.print(table)
