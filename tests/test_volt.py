"""Volt's failure detector on explicit clock values, and Volt's lifecycle.

Volt reads time only through the clock it is given, so these tests decide "now" and
never sleep: an agent silent for exactly ``timeout`` (or just under) stays, just over is
removed, and the agents it fed are given new parents in their next heartbeat answer.
The image is registered for real, from an NBD server on a Unix socket in the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.blockdev import MemoryDevice
from virtman.coordinator.app import create_app
from virtman.coordinator.models import Heartbeat, ImageCreate
from virtman.coordinator.state import VoltState
from virtman.coordinator.volt import Lifecycle, Volt
from virtman.errors import LifecycleError
from virtman.httpapi import HttpService, ServiceState, bind
from virtman.nbd.server import NbdServer

INTERVAL = 2.0
TIMEOUT = 6.0
EPS = 1e-6
T0 = 1000.0
AGENTS = [f"a{i}" for i in range(7)]
#: Volt's HTTP API takes requests with a credential only (virtman.auth).
TOKEN = new_token()
AUTH = Authenticator(TokenTable())
AUTH.tokens.add(Principal(Role.VIEWER, "test"), TOKEN)
VIEWER = {"authorization": f"Bearer {TOKEN}"}


class Clock:
    """A clock that says what the test sets: Volt's ``clock`` argument."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def relay(agent: str) -> str:
    return f"nbd://10.0.0.{AGENTS.index(agent) + 1}:10809/img"


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[str]:
    server = NbdServer({"img": MemoryDevice(data=bytes(range(256)) * 256)})
    sock = tmp_path / "origin.sock"
    await server.listen_unix(str(sock))
    yield f"nbd+unix:///img?socket={sock}"
    await server.stop()


async def make_volt(db: Path, origin: str, clock: Clock) -> Volt:
    volt = Volt(VoltState(str(db)), interval=INTERVAL, timeout=TIMEOUT, clock=clock)
    if not volt.images():
        await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    return volt


def beat(volt: Volt, agent: str) -> list[str]:
    """A heartbeat relaying the image; the parents' URIs Volt answers."""
    reply = volt.heartbeat(agent, Heartbeat(url=f"http://{agent}", relays={"img": relay(agent)}))
    return reply.paths["img"].parents


async def test_an_agent_silent_up_to_the_timeout_stays_and_past_it_is_replaced(
    tmp_path: Path, origin: str
) -> None:
    clock = Clock(T0)
    volt = await make_volt(tmp_path / "volt.db", origin, clock)
    for agent in AGENTS:
        beat(volt, agent)
    tree = volt.tree("img")
    victim = tree.hosts[1]  # an inner node: it has children, and a parent of its own
    fed = [h for h in tree.hosts if victim in tree.parents(h)]
    assert fed, "the victim must feed someone for the test to mean anything"

    # Everyone but the victim keeps beating, at T0 + 3.
    clock.now = T0 + 3.0
    for agent in AGENTS:
        if agent != victim:
            beat(volt, agent)
    for now in (T0 + TIMEOUT - EPS, T0 + TIMEOUT):  # silent for timeout-ε, then exactly
        clock.now = now
        assert volt.expire() == []
        assert victim in volt.tree("img")
        assert {a.name for a in volt.agents()} == set(AGENTS)
    clock.now = T0 + TIMEOUT + EPS
    assert volt.expire() == [victim]
    tree = volt.tree("img")
    assert victim not in tree and len(tree) == len(AGENTS) - 1
    assert volt.repairs == 1
    assert victim not in {a.name for a in volt.agents()}
    # Those it fed learn new parents in their next answer: never the victim's relay.
    for agent in fed:
        parents = beat(volt, agent)
        assert relay(victim) not in parents
        if tree.position(agent) > 0:
            assert parents == [relay(p) for p in tree.parents(agent)] and parents
    tree.check()
    # The others, still fresh, are not touched by a later round.
    assert volt.expire() == []
    await volt.stop()


async def test_most_agents_late_at_once_are_held_in_their_trees_for_a_bounded_time(
    tmp_path: Path, origin: str
) -> None:
    """A boot storm that delays every heartbeat is not five failures: the tree stays as
    it is while most agents are late, those heard again keep their places, and one
    really gone is removed once the crowd is back (or the hold ends)."""
    clock = Clock(T0)
    volt = await make_volt(tmp_path / "volt.db", origin, clock)
    for agent in AGENTS:
        beat(volt, agent)
    places = {a: volt.tree("img").position(a) for a in AGENTS}
    gone, back = AGENTS[3], [a for a in AGENTS if a != AGENTS[3]]
    # Five of seven stay silent past the timeout, two keep beating: 5/7 > one half.
    for now in (T0 + 2, T0 + 4, T0 + 6, T0 + TIMEOUT + 1, T0 + TIMEOUT + 3):
        clock.now = now
        for agent in AGENTS[:2]:
            beat(volt, agent)
        assert volt.expire() == []
    assert volt.mass_silence_since == T0 + TIMEOUT + 1
    assert {a: volt.tree("img").position(a) for a in AGENTS} == places
    # The storm is over: all but one are heard again, in their old places.
    clock.now = T0 + TIMEOUT + 4
    for agent in back:
        beat(volt, agent)
    assert volt.expire() == [gone]
    assert volt.mass_silence_since is None and volt.repairs == 1
    assert all(volt.tree("img").position(a) == places[a] for a in back
               if places[a] < places[gone])  # those before the hole did not move

    # A hold is bounded: if the crowd never comes back, its agents leave after it.
    t1 = T0 + 1000
    clock.now = t1
    for agent in back:
        beat(volt, agent)
    clock.now = t1 + TIMEOUT + 1
    beat(volt, back[0])
    assert volt.expire() == []  # 5 of 6 late: held
    clock.now = t1 + TIMEOUT + 1 + volt.mass_silence_hold
    beat(volt, back[0])
    assert sorted(volt.expire()) == sorted(back[1:])
    assert volt.tree("img").hosts == [back[0]]
    await volt.stop()


async def test_a_few_agents_are_no_crowd(tmp_path: Path, origin: str) -> None:
    """Two of three silent are removed at once: below ``mass_silence_min_agents`` a
    majority of a few can fail together."""
    clock = Clock(T0)
    volt = await make_volt(tmp_path / "volt.db", origin, clock)
    for agent in AGENTS[:3]:
        beat(volt, agent)
    clock.now = T0 + TIMEOUT + 1
    beat(volt, AGENTS[0])
    assert sorted(volt.expire()) == AGENTS[1:3]
    await volt.stop()


async def test_a_restarted_volt_gives_known_agents_a_full_timeout(
    tmp_path: Path, origin: str
) -> None:
    clock = Clock(T0)
    volt = await make_volt(tmp_path / "volt.db", origin, clock)
    for agent in AGENTS[:3]:
        beat(volt, agent)
    await volt.stop()
    # Volt was down for far longer than the timeout; it comes back at T1.
    t1 = T0 + 100 * TIMEOUT
    clock.now = t1
    volt = await make_volt(tmp_path / "volt.db", origin, clock)
    assert len(volt.tree("img")) == 3  # the tree came back from SQLite
    clock.now = t1 + TIMEOUT
    assert volt.expire() == []
    beat(volt, AGENTS[0])  # only one of them is still alive
    clock.now = t1 + TIMEOUT + EPS
    assert sorted(volt.expire()) == AGENTS[1:3]
    assert volt.tree("img").hosts == [AGENTS[0]]
    await volt.stop()


async def test_the_failure_detector_runs_on_the_injected_clock(
    tmp_path: Path, origin: str
) -> None:
    # Far from any real monotonic reading: on the real clock a0 would never expire.
    start = 1e9
    clock = Clock(start)
    volt = Volt(
        VoltState(str(tmp_path / "volt.db")), interval=0.02, timeout=0.05, clock=clock
    )
    await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    beat(volt, "a0")
    volt.start()
    await asyncio.sleep(0.1)  # several detector rounds: the clock has not moved
    assert "a0" in volt.tree("img") and volt.repairs == 0
    clock.now = start + 1.0
    for _ in range(200):  # the detector's next round, with a bound
        if volt.repairs:
            break
        await asyncio.sleep(0.01)
    assert volt.repairs == 1 and "a0" not in volt.tree("img")
    assert volt.detector_error is None
    await volt.stop()


class FailingClock(Clock):
    """A clock that breaks on demand: a fault the failure detector does not expect."""

    broken = False

    def __call__(self) -> float:
        if self.broken:
            raise RuntimeError("clock source gone")
        return self.now


async def test_a_crash_of_the_failure_detector_reaches_the_log_and_health(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FailingClock(T0)
    volt = Volt(VoltState(str(tmp_path / "volt.db")), interval=0.02, timeout=0.05, clock=clock)
    service = HttpService(create_app(volt, authenticator=AUTH), bind("127.0.0.1", 0))
    await service.start()
    async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=VIEWER) as http:
        assert (await http.get("/health")).json()["status"] == "ok"
        clock.broken = True
        for _ in range(200):  # the detector's next round, with a bound
            if volt.detector_error is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(volt.detector_error, RuntimeError) and not volt.detecting
        health = (await http.get("/health")).json()
    assert health["status"] == "failure detector stopped: RuntimeError('clock source gone')"
    assert any(
        "failure detector stopped" in r.getMessage() and r.levelname == "ERROR"
        for r in caplog.records
    )
    await service.close()  # stopping after the crash is clean
    assert volt.lifecycle is Lifecycle.STOPPED


async def test_the_failure_detector_outlives_a_database_failure(
    tmp_path: Path, origin: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1e9)
    volt = Volt(VoltState(str(tmp_path / "volt.db")), interval=0.02, timeout=0.05, clock=clock)
    await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    for agent in AGENTS[:3]:
        beat(volt, agent)
    volt.start()
    volt.state.close()  # the database goes away under it: every write now fails
    clock.now += 1.0
    for _ in range(200):
        if any("cannot save the tree" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the detector never met the database failure")
    await asyncio.sleep(0.1)  # more rounds: it goes on running
    assert volt.detector_error is None
    assert volt.detecting
    await volt.stop()


async def test_volt_lifecycle(tmp_path: Path, origin: str) -> None:
    volt = Volt(VoltState(str(tmp_path / "volt.db")), interval=INTERVAL, timeout=TIMEOUT)
    assert volt.lifecycle is Lifecycle.NEW
    await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    assert not volt.detecting
    volt.start()
    assert volt.lifecycle is Lifecycle.RUNNING and volt.detecting
    with pytest.raises(LifecycleError) as caught:
        volt.start()
    assert (caught.value.component, caught.value.action, caught.value.state) == (
        "volt", "start", "running"
    )
    await volt.stop()
    assert volt.lifecycle is Lifecycle.STOPPED and not volt.detecting
    await volt.stop()  # a second stop does nothing
    with pytest.raises(LifecycleError, match="volt cannot take a heartbeat in state stopped"):
        beat(volt, "a0")
    with pytest.raises(LifecycleError, match="cannot start in state stopped"):
        volt.start()
    with pytest.raises(LifecycleError):
        await volt.add_image(ImageCreate(name="img2", origins=[origin]))

    # A Volt never started can be stopped, and is then closed for good.
    idle = Volt(VoltState(str(tmp_path / "idle.db")))
    await idle.stop()
    assert idle.lifecycle is Lifecycle.STOPPED
    with pytest.raises(LifecycleError):
        idle.expire()


async def test_volt_follows_its_http_service(tmp_path: Path) -> None:
    volt = Volt(VoltState(str(tmp_path / "volt.db")))
    service = HttpService(create_app(volt, authenticator=AUTH), bind("127.0.0.1", 0))
    assert (service.state, volt.lifecycle) == (ServiceState.NEW, Lifecycle.NEW)
    await service.start()
    assert (service.state, volt.lifecycle) == (ServiceState.RUNNING, Lifecycle.RUNNING)
    async with httpx.AsyncClient(base_url=service.url, headers=VIEWER) as http:
        health = (await http.get("/health")).json()
    assert health["status"] == "ok" and health["state"] == "running"
    await service.close()
    assert (service.state, volt.lifecycle) == (ServiceState.STOPPED, Lifecycle.STOPPED)
