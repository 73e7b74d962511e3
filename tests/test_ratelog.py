"""RateLimitedLog with explicit clock values: what is written, what is counted, when."""

from __future__ import annotations

import logging

import pytest

from virtman.errors import ConfigError
from virtman.ratelog import OTHER_PEERS, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture
def setup() -> tuple[RateLimitedLog, Clock, Lines]:
    logger = logging.getLogger("test.ratelog")
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    lines = Lines()
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    clock = Clock()
    return RateLimitedLog(logger, interval=10.0, max_keys=3, clock=clock), clock, lines


def test_first_is_logged_repeats_are_counted_then_summarised(setup) -> None:
    rl, clock, lines = setup
    assert rl.warning("p1", "refused WRITE", "refused %s #%d", "WRITE", 1)
    for i in range(2, 101):
        clock.now += 0.05
        assert not rl.warning("p1", "refused WRITE", "refused %s #%d", "WRITE", i)
    assert lines.lines == [(logging.WARNING, "refused WRITE #1")]
    assert rl.suppressed == 99
    clock.now = 1010.0  # the window has expired: the next event summarises it, then logs
    assert rl.warning("p1", "refused WRITE", "refused %s #%d", "WRITE", 101)
    assert lines.lines[1:] == [
        (logging.WARNING, "99 more like this (refused WRITE from p1) in the last 10.0 s"),
        (logging.WARNING, "refused WRITE #101"),
    ]


def test_peers_and_kinds_have_their_own_windows(setup) -> None:
    rl, _clock, lines = setup
    assert rl.warning("p1", "a", "p1 a")
    assert rl.warning("p2", "a", "p2 a")
    assert rl.warning("p1", "b", "p1 b")
    assert not rl.warning("p1", "a", "p1 a again")
    assert [m for _, m in lines.lines] == ["p1 a", "p2 a", "p1 b"]


def test_no_summary_when_nothing_was_held_back(setup) -> None:
    rl, clock, lines = setup
    rl.warning("p1", "a", "one")
    clock.now += 30
    rl.sweep()
    rl.flush()
    assert [m for _, m in lines.lines] == ["one"]
    assert rl.open_windows == 0


def test_sweep_summarises_only_expired_windows(setup) -> None:
    rl, clock, lines = setup
    rl.warning("p1", "a", "p1 a")
    rl.warning("p1", "a", "p1 a")
    clock.now += 6
    rl.warning("p2", "a", "p2 a")
    rl.warning("p2", "a", "p2 a")
    clock.now += 5  # p1's window is 11 s old, p2's 5 s
    rl.sweep()
    assert [m for _, m in lines.lines][-1] == "1 more like this (a from p1) in the last 11.0 s"
    assert rl.open_windows == 1
    rl.flush()
    assert [m for _, m in lines.lines][-1] == "1 more like this (a from p2) in the last 5.0 s"
    assert rl.open_windows == 0


def test_summary_keeps_the_level_of_its_kind(setup) -> None:
    rl, _clock, lines = setup
    rl.error("p1", "bug", "boom")
    rl.error("p1", "bug", "boom")
    rl.flush()
    assert [lvl for lvl, _ in lines.lines] == [logging.ERROR, logging.ERROR]


def test_many_peers_share_one_window_per_kind(setup) -> None:
    rl, _clock, lines = setup
    for i in range(1000):
        rl.warning(f"10.0.{i // 256}.{i % 256}", "bad", "bad from %d", i)
    # max_keys=3: three peers logged, the fourth opened the shared window, the rest counted
    assert [m for _, m in lines.lines] == [f"bad from {i}" for i in range(4)]
    assert rl.open_windows == 4
    rl.flush()
    assert lines.lines[-1][1] == f"996 more like this (bad from {OTHER_PEERS}) in the last 0.0 s"


def test_schedule_is_asked_once_per_window_that_holds_lines_back(setup) -> None:
    _, clock, _lines = setup
    asked: list[float] = []
    rl = RateLimitedLog(
        logging.getLogger("test.ratelog"),
        interval=10.0,
        clock=clock,
        schedule=lambda delay, cb: asked.append(delay),
    )
    rl.warning("p", "k", "x")
    clock.now += 4
    for _ in range(50):
        rl.warning("p", "k", "x")
    assert asked == [6.0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        RateLimitedLog(logging.getLogger("x"), interval=0)
