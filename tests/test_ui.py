"""Volt's live view (``/ui``): its event stream over real HTTP, and the page in a real browser.

The stream tests run Volt in this process behind a real HTTP server and read
``/ui/events`` as a browser does, with a viewer's token (the view is for viewers and
operators only; ``virtman.auth``); agents' heartbeats carry each agent's own token. The
browser test starts a whole cluster (``LocalCluster``: Volt and agents as processes,
over HTTPS), opens the page's address with the viewer token (which sets the browser's
cookie) in headless Chromium and reads the rendered DOM through the Chrome DevTools
Protocol while VMs boot and a host is killed. It saves the screenshot the docs show
(``docs/figures/ui.png`` is a copy of it, made by hand: the test writes only to its tmp
dir and to ``VIRTMAN_UI_SCREENSHOT`` when that is set).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_image
from test_cluster import synthetic_trace

from virtman.auth import Authenticator, Principal, Role, TokenTable, new_token
from virtman.blockdev import MemoryDevice
from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.coordinator.app import create_app
from virtman.coordinator.models import ImageCreate
from virtman.coordinator.state import VoltState
from virtman.coordinator.ui import UiHub, UiLimits, ui_url
from virtman.coordinator.volt import Volt
from virtman.httpapi import HttpService, bind
from virtman.nbd.server import NbdServer
from virtman.replay.replayer import replay

FAST = UiLimits(min_event_seconds=0.02, keepalive_seconds=0.5)

#: Volt takes requests with a credential only: a viewer's, and one token per agent name
#: (an agent may post heartbeats and leave only as itself).
AUTH = Authenticator(TokenTable())
VIEWER_TOKEN = new_token()
AUTH.tokens.add(Principal(Role.VIEWER, "test"), VIEWER_TOKEN)
VIEWER = {"authorization": f"Bearer {VIEWER_TOKEN}"}
AGENTS: dict[str, dict[str, str]] = {}
for _name in ("a1", "a2", "a3"):
    _token = new_token()
    AUTH.tokens.add(Principal(Role.AGENT, _name), _token)
    AGENTS[_name] = {"authorization": f"Bearer {_token}"}


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[str]:
    server = NbdServer({"img": MemoryDevice(data=bytes(range(256)) * 256)})
    sock = tmp_path / "origin.sock"
    await server.listen_unix(str(sock))
    yield f"nbd+unix:///img?socket={sock}"
    await server.stop()


async def serve_volt(tmp_path: Path, origin: str, limits: UiLimits = FAST) -> HttpService:
    volt = Volt(VoltState(str(tmp_path / "volt.db")), interval=0.5, timeout=2.0)
    await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    app = create_app(volt, ui_limits=limits, authenticator=AUTH)
    service = HttpService(app, bind("127.0.0.1", 0))
    await service.start()
    return service


def heartbeat(agent: str, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": f"http://{agent}.invalid",
        "relays": {"img": f"nbd://127.0.0.1:{10000 + int(agent[1:])}/img"},
        "stats": stats,
    }


class EventReader:
    """Server-sent events from an open response, one whole event at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        name, data = "message", ""
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data += line.removeprefix("data: ")
                elif line == "" and data:
                    return name, json.loads(data)
        raise AssertionError("the event stream ended")


def host(snapshot: dict[str, Any], name: str) -> dict[str, Any] | None:
    for h in snapshot["images"][0]["hosts"]:
        if h["name"] == name:
            return dict(h)
    return None


async def test_a_viewer_gets_a_snapshot_then_each_change(tmp_path: Path, origin: str) -> None:
    service = await serve_volt(tmp_path, origin)
    try:
        async with (
            httpx.AsyncClient(base_url=service.url, timeout=10, headers=VIEWER) as http,
            http.stream("GET", "/ui/events") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = EventReader(response)
            name, snap = await events.next()
            assert name == "snapshot"
            assert [i["name"] for i in snap["images"]] == ["img"]
            assert snap["images"][0]["hosts"] == []

            stats = {"vms": 3, "vm_phases": {"booting": 2, "booted": 1},
                     "images": {"img": {"from_origin": 4096, "from_parents": 0}}}
            r = await http.post(
                "/agents/a1/heartbeat", json=heartbeat("a1", stats), headers=AGENTS["a1"]
            )
            assert r.status_code == 200
            name, snap = await events.next()
            assert name == "change"
            a1 = host(snap, "a1")
            assert a1 is not None
            assert (a1["level"], a1["parents"], a1["health"]) == (1, ["origin"], "ok")
            assert a1["vms"] == {"new": 0, "booting": 2, "booted": 1, "detached": 0}
            assert (a1["from_origin"], a1["from_parents"]) == (4096, 0)
            assert snap["changes"][0]["text"] == "a1 joined img at level 1"

            # Two more hosts: a3 lands below a1 and a2, and its bytes come from them.
            r = await http.post(
                "/agents/a2/heartbeat", json=heartbeat("a2", {}), headers=AGENTS["a2"]
            )
            assert r.status_code == 200
            stats3 = {"images": {"img": {"from_origin": 0, "from_parents": 8192}}}
            r = await http.post(
                "/agents/a3/heartbeat", json=heartbeat("a3", stats3), headers=AGENTS["a3"]
            )
            assert r.status_code == 200
            while (a3 := host(snap, "a3")) is None or a3["from_parents"] == 0:
                _, snap = await events.next()
            assert a3["level"] == 2 and sorted(a3["parents"]) == ["a1", "a2"]
            assert snap["images"][0]["from_parents"] == 8192
            assert snap["images"][0]["from_origin"] == 4096

            r = await http.delete("/images/img/members/a1", headers=AGENTS["a1"])
            assert r.status_code == 204
            while host(snap, "a1") is not None:
                _, snap = await events.next()
            assert "a1 left img" in snap["changes"][0]["text"]
            assert all("a1" not in h["parents"] for h in snap["images"][0]["hosts"])
    finally:
        await service.close()


async def test_what_agents_report_is_checked_and_bounded(tmp_path: Path, origin: str) -> None:
    service = await serve_volt(tmp_path, origin)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=VIEWER) as http:
            junk = {
                "vm_phases": {"booting": -5, "booted": "many", "new": True,
                              **{f"phase{i}": 1 for i in range(1000)}},
                "images": {"img": {"from_origin": 1.5, "from_parents": [1]},
                           **{f"other{i}": {"from_origin": 1} for i in range(1000)}},
            }
            r = await http.post(
                "/agents/a1/heartbeat", json=heartbeat("a1", junk), headers=AGENTS["a1"]
            )
            assert r.status_code == 200
            snap = (await http.get("/ui/snapshot")).json()
            a1 = host(snap, "a1")
            assert a1 is not None
            assert a1["vms"] == {"new": 0, "booting": 0, "booted": 0, "detached": 0}
            assert (a1["from_origin"], a1["from_parents"]) == (0, 0)
            assert [i["name"] for i in snap["images"]] == ["img"]
            assert len(json.dumps(snap)) < 4000
            r = await http.post(
                "/agents/a1/heartbeat", json=heartbeat("a1", {"images": 7}), headers=AGENTS["a1"]
            )
            assert r.status_code == 200  # a malformed stats section is no error: it shows 0
            assert (await http.get("/ui/snapshot")).status_code == 200
    finally:
        await service.close()


async def test_viewers_past_the_limit_get_503_and_a_freed_place_is_reused(
    tmp_path: Path, origin: str
) -> None:
    limits = UiLimits(max_clients=1, min_event_seconds=0.02, keepalive_seconds=0.5)
    service = await serve_volt(tmp_path, origin, limits)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=VIEWER) as http:
            async with http.stream("GET", "/ui/events") as first:
                # Held until the viewer leaves: a reader dropped here would be collected,
                # and closing its line iterator closes the connection (httpcore) early.
                watching = EventReader(first)
                await watching.next()
                second = await http.get("/ui/events")
                assert second.status_code == 503
                assert "1 viewers already watch" in second.json()["detail"]
            # The first viewer left: its place is free again (once the server saw it go).
            deadline = time.monotonic() + 5
            while True:
                async with http.stream("GET", "/ui/events") as third:
                    if third.status_code == 200:
                        name, _ = await EventReader(third).next()
                        assert name == "snapshot"
                        break
                assert time.monotonic() < deadline, "the departed viewer's place stayed taken"
                await asyncio.sleep(0.05)
    finally:
        await service.close()


async def test_a_slow_viewer_keeps_only_the_newest_snapshots(tmp_path: Path, origin: str) -> None:
    volt = Volt(VoltState(str(tmp_path / "volt.db")), interval=0.5, timeout=2.0)
    await volt.add_image(ImageCreate(name="img", origins=[origin], chunk_size=4096))
    hub = UiHub(volt, UiLimits(queue_events=2, min_event_seconds=0.01))
    queue = hub.subscribe()
    assert queue is not None
    from virtman.coordinator.models import Heartbeat

    for i in range(1, 6):  # five changes, each flushed, none read
        volt.heartbeat(f"a{i}", Heartbeat.model_validate(heartbeat(f"a{i}", {})))
        await asyncio.sleep(0.05)
    assert queue.qsize() == 2
    assert hub.dropped == 4  # the first snapshot and three changes made room
    newest = [json.loads(queue.get_nowait()) for _ in range(2)][-1]
    assert host(newest, "a5") is not None
    assert newest["version"] == hub.version == 5
    hub.close()
    await volt.stop()


async def test_the_page_and_its_assets_come_from_volt(tmp_path: Path, origin: str) -> None:
    service = await serve_volt(tmp_path, origin)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=VIEWER) as http:
            page = await http.get("/ui")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
                asset = await http.get(ref)  # every reference is Volt's own
                assert ref.startswith("/ui/") and asset.status_code == 200, ref
            for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
                r = await http.get(f"/ui/{name}")
                assert r.headers["content-type"].startswith(kind)
                # No CDN: the only absolute URL is the SVG namespace, which is not fetched.
                urls = set(re.findall(r"https?://[^\s\"')]+", r.text))
                assert urls <= {"http://www.w3.org/2000/svg"}, urls
    finally:
        await service.close()


async def test_the_view_is_for_viewers_only(tmp_path: Path, origin: str) -> None:
    service = await serve_volt(tmp_path, origin)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
            for path in ("/ui", "/ui/events"):
                r = await http.get(path)  # no credential: refused before any route runs
                assert r.status_code == 401, (path, r.text)
                assert "no credential" in r.json()["detail"]
                r = await http.get(path, headers=AGENTS["a1"])  # known, but not a viewer
                assert r.status_code == 403, (path, r.text)
                assert "agent 'a1' may not GET" in r.json()["detail"]
            # A viewer may: the stream opens (and is closed at once).
            async with http.stream("GET", "/ui/events", headers=VIEWER) as r:
                assert r.status_code == 200
    finally:
        await service.close()


def test_the_printed_address_is_the_page() -> None:
    assert ui_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/ui"
    assert ui_url("http://127.0.0.1:8080", "T") == "http://127.0.0.1:8080/ui?token=T"


# --- the page in a real browser --------------------------------------------------------------


class Browser:
    """Headless Chromium, driven over the Chrome DevTools Protocol (one page)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.process: subprocess.Popen[bytes] | None = None
        self.ws: Any = None
        self._id = 0

    async def start(self) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.fail("chromium is missing: scripts/install.sh installs it")
        self.process = subprocess.Popen(
            # The test cluster's CA is its own (made in its tmp dir), not one Chromium
            # trusts: skip the certificate check, keeping TLS on the wire.
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--ignore-certificate-errors",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            assert self.process.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not say its DevTools port"
            await asyncio.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        async with httpx.AsyncClient(timeout=10) as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        from websockets.asyncio.client import connect

        self.ws = await connect(page["webSocketDebuggerUrl"], max_size=None)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        async with asyncio.timeout(30):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == self._id:
                    if "error" in message:
                        raise AssertionError(f"{method}: {message['error']}")
                    return dict(message["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.process is not None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)


#: The hosts the page shows: name -> (level, parents), read from the rendered DOM.
DOM_HOSTS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('[data-host]')]
  .map(e => [e.dataset.host, [Number(e.dataset.level), e.dataset.parents.split(',')]])))"""


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def test_the_page_in_a_browser_follows_the_tree_through_a_failure(tmp_path: Path) -> None:
    settings = ClusterSettings(
        hosts=7, heartbeat_interval=0.3, heartbeat_timeout=1.2, chunk_size=64 * 1024
    )
    cluster = LocalCluster(str(tmp_path / "cluster"), settings)
    browser = Browser(tmp_path / "chromium")
    image = tmp_path / "image.raw"
    make_image(image, 16 * 1024 * 1024)
    booting: list[asyncio.Task[Any]] = []
    try:
        await cluster.start_origin(str(image))
        await cluster.start_volt()
        await cluster.start_agents()
        await cluster.register_image("img")
        await browser.start()
        assert cluster.volt_url.startswith("https://")
        # The token in the address sets the page's cookie, which its event stream carries.
        url = ui_url(cluster.volt_url, token=cluster.token("viewer"))
        await browser.call("Page.navigate", url=url)

        async def dom() -> dict[str, tuple[int, list[str]]]:
            text = await browser.evaluate(DOM_HOSTS)
            return {k: (v[0], v[1]) for k, v in json.loads(text).items()}

        async def volt_tree() -> dict[str, tuple[int, list[str]]]:
            tree = await cluster.tree("img")
            return {n["agent"]: (n["level"], n["parents"]) for n in tree["nodes"]}

        async def page_shows_volt() -> bool:
            expected = await volt_tree()
            return bool(expected) and await dom() == expected

        # Hosts join one by one: the page shows each at the level Volt gave it.
        uris = {}
        for h in cluster.host_names():
            uris[h] = [await cluster.create_vm(h, f"{h}-vm{j}", "img") for j in (1, 2)]
        await until(lambda: page_shows_volt(), "the page shows Volt's tree")
        before = await dom()
        levels = sorted(level for level, _ in before.values())
        assert levels == [1, 1, 2, 2, 2, 2, 3], before
        assert all(parents == ["origin"] for level, parents in before.values() if level == 1)

        # One VM per host boots to the end, the other keeps booting (its client stays).
        trace = synthetic_trace(seconds=0.5, requests=120)
        await asyncio.gather(*(replay(u[0], trace, speed=4.0) for u in uris.values()))
        slow = synthetic_trace(seconds=600, requests=200)
        booting = [asyncio.ensure_future(replay(u[1], slow)) for u in uris.values()]

        async def vm_chips() -> bool:
            text = await browser.evaluate(
                "[...document.querySelectorAll('[data-host] .vm')]"
                ".map(e => e.textContent).join('|')"
            )
            chips = str(text)
            return chips.count("1 booted") == 7 and chips.count("1 booting") == 7

        await until(vm_chips, "each host shows one VM booted and one booting")
        deepest = next(h for h, (level, _) in before.items() if level == 3)
        from_parents = await browser.evaluate(
            f"document.querySelector('[data-host={deepest}] .nums .p').textContent")
        assert from_parents != "0 B", f"{deepest} fetched nothing from its parents"

        # A level-1 host dies: it leaves the page and the hosts below it move.
        victim = min(h for h, (level, _) in before.items() if level == 1)
        fed = [h for h, (_, parents) in before.items() if victim in parents]
        assert fed, f"{victim} must feed someone for the test to mean anything"
        cluster.kill_agent(victim)
        await until(lambda: _gone(dom, victim), f"{victim} leaves the page")
        await until(lambda: page_shows_volt(), "the page shows the repaired tree")
        after = await dom()
        assert all(victim not in parents for _, parents in after.values())
        assert any(after[h] != before[h] for h in fed), f"no child of {victim} moved"
        changes = await browser.evaluate("document.getElementById('changes').textContent")
        assert f"{victim} failed out of img" in changes
        repairs = await browser.evaluate("document.getElementById('repairs').textContent")
        assert repairs == "1 repairs"

        shot = await browser.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG")
        (tmp_path / "ui.png").write_bytes(png)
        if os.environ.get("VIRTMAN_UI_SCREENSHOT"):
            Path(os.environ["VIRTMAN_UI_SCREENSHOT"]).write_bytes(png)
    finally:
        for task in booting:
            task.cancel()
        await asyncio.gather(*booting, return_exceptions=True)
        await browser.stop()  # first: an open event stream holds Volt's shutdown
        await cluster.stop()


def test_virtman_up_ui_prints_the_page_and_keeps_it_until_ctrl_c(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "t,op,offset,length\n" + "".join(f"{i * 0.01:.2f},read,{i * 65536},65536\n"
                                          for i in range(50))
    )
    out = tmp_path / "up.json"
    viewer: httpx.Client | None = None
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtman", "up", "--hosts", "2", "--vms-per-host", "1",
         "--trace", str(trace), "--speed", "4", "--json", str(out),
         "--workdir", str(tmp_path / "work"), "--heartbeat-interval", "0.3",
         "--heartbeat-timeout", "1.2", "--ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen: list[str] = []

    def read_until(prefix: str) -> str:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} in:\n{''.join(seen)}")

    try:
        url = read_until("live view: ").split()[-1]
        # HTTPS, with the viewer token that sets a browser's cookie.
        match = re.fullmatch(r"(https://127\.0\.0\.1:\d+/ui)\?token=([A-Za-z0-9_-]+)", url)
        assert match, url
        page, token = match.groups()
        # The run's own CA (in --workdir) is what vouches for Volt's certificate.
        ca = ssl.create_default_context(cafile=str(tmp_path / "work" / "credentials" / "ca.crt"))
        viewer = httpx.Client(verify=ca, timeout=10)  # keeps the cookie, as a browser does
        opened = viewer.get(url)
        assert opened.status_code == 200
        assert viewer.cookies.get("virtman_token") == token
        assert httpx.get(page, verify=ca, timeout=10).status_code == 401  # no token: no page
        read_until("live view stays at ")
        # The run is over and the cluster still up: the page shows both hosts.
        deadline = time.monotonic() + 20
        while True:  # the agents tell of the ended boots in their next heartbeat
            hosts = viewer.get(page + "/snapshot").json()["images"][0]["hosts"]
            assert sorted(h["name"] for h in hosts) == ["host1", "host2"]
            if all(h["vms"]["booted"] == 1 for h in hosts):
                break
            assert time.monotonic() < deadline, f"the boots never show as ended: {hosts}"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(seen) + (proc.stdout.read() if proc.stdout else "")
        assert json.loads(out.read_text())["errors_on_surviving_hosts"] == 0
        with pytest.raises(httpx.TransportError):  # Ctrl-C stopped the cluster
            httpx.get(url, verify=ca, timeout=2)
    finally:
        if viewer is not None:
            viewer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _gone(dom: Callable[[], Awaitable[dict[str, Any]]], name: str) -> bool:
    return name not in await dom()
