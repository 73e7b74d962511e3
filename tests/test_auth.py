"""Credentials on Volt's and the agents' HTTP APIs, and who may use a VM's socket.

The route matrix enumerates every route of the apps the world serves (so a route
added later is probed without editing this file) and tries each one without a
credential, with a credential that is not known, with every role its guard does not
name, and, where an agent acts under a name, as another agent: with the agent's
certificate and with its token. Each is refused (401, 403) and nothing changes: the
VMs are still there, the tree and the image registry are as they were.

Everything is real: Volt and two agents serving HTTPS in this event loop with a CA of
the test's own, an NBD origin on loopback, files in the test's tmp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agentworld import World
from fastapi.routing import APIRoute
from starlette.routing import Route

from virtman.auth import (
    TOKEN_COOKIE,
    Authenticator,
    Principal,
    Require,
    Role,
    TokenFile,
    TokenTable,
    check_acting_as,
    hash_token,
    issue_token,
    new_token,
    protect,
    require,
    revoke_tokens,
    route_guards,
)
from virtman.cli.main import main as cli
from virtman.errors import ApiError, ConfigError, Forbidden, NetworkError, Unauthorized
from virtman.httpapi import PEER_CERT_NAME, ApiClient, Credentials
from virtman.pki import init_ca, issue
from virtman.tlsconfig import TlsFiles

# --- the world --------------------------------------------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    try:
        await w.start()
        host1 = await w.agent("host1")
        host2 = await w.agent("host2")
        await host1.vms.create("vm1", "img")
        await host2.vms.create("other", "img")  # host2 relays the image too: two members
        await _tree_has(w, {"host1", "host2"})
        yield w
    finally:
        await w.stop()


async def _tree_has(world: World, members: set[str]) -> None:
    async with world.api(world.volt_url) as api:
        for _ in range(200):
            tree = await api.get("/images/img/tree")
            if {n["agent"] for n in tree["nodes"]} == members:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"the tree never held {members}: {tree}")


async def state(world: World, api: ApiClient | None = None) -> dict[str, Any]:
    """What no refused request may change (read with the operator's credential)."""
    out: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        if api is None:
            api = await stack.enter_async_context(world.api(world.volt_url))
        out["images"] = await api.get("/images")
        tree = await api.get("/images/img/tree")
        out["tree"] = sorted((n["agent"], n["level"], n["relay_uri"]) for n in tree["nodes"])
        out["agents"] = sorted((a["name"], a["url"]) for a in await api.get("/agents"))
    for name, agent in world.agents.items():
        out[name] = {
            "vms": sorted(
                (vm.name, vm.info()["state"], tuple(vm.record.snapshots))
                for vm in agent.vms.list()
            ),
            "dirs": sorted(os.listdir(world.tmp / name / "vms")),
            "imports": sorted(os.listdir(world.tmp / name / "imports")),
        }
    return out


# --- every route, every wrong credential ------------------------------------------------------

#: The intended policy of the routes this change guarded: a change to one must be
#: deliberate. Routes added later are probed by the roles their own guard declares.
VIEW = {Role.VIEWER, Role.OPERATOR}
ANY = {Role.VIEWER, Role.OPERATOR, Role.AGENT}
OP = {Role.OPERATOR}
AGENT = {Role.AGENT}
POLICY: dict[str, dict[tuple[str, str], set[Role]]] = {
    "volt": {
        ("GET", "/health"): ANY,
        ("POST", "/images"): OP,
        ("GET", "/registrations/{name}"): OP,
        ("GET", "/images"): ANY,
        ("GET", "/images/{name}"): ANY,
        ("GET", "/images/{name}/manifest"): ANY,
        ("DELETE", "/images/{name}"): OP,
        ("GET", "/images/{name}/tree"): ANY,
        ("POST", "/images/{name}/members"): AGENT,
        ("DELETE", "/images/{name}/members/{agent}"): AGENT,
        ("POST", "/agents/{name}/heartbeat"): AGENT,
        ("GET", "/agents"): ANY,
        ("GET", "/agents/{name}"): ANY,
    },
    "agent": {
        ("GET", "/health"): ANY,
        ("GET", "/status"): VIEW,
        ("POST", "/vms"): OP,
        ("POST", "/vms/{name}/start"): OP,
        ("POST", "/vms/{name}/stop"): OP,
        ("GET", "/vms/{name}/console"): OP,
        ("GET", "/vms/{name}/console/wait"): OP,
        ("GET", "/vms/{name}/xml"): OP,
        ("GET", "/vms/{name}/trace"): OP,
        ("GET", "/vms"): VIEW,
        ("GET", "/vms/{name}"): VIEW,
        ("DELETE", "/vms/{name}"): OP,
        ("POST", "/vms/{name}/snapshots"): OP,
        ("POST", "/vms/{name}/clone"): OP,
        ("POST", "/vms/{name}/migrate"): OP,
        ("POST", "/vms/import"): AGENT,
    },
}


#: Routes where an agent acts under a name (in the path, or the body for a join): the
#: matrix tries them with host1's credentials naming host2.
NAMED = {
    ("POST", "/images/{name}/members"),
    ("DELETE", "/images/{name}/members/{agent}"),
    ("POST", "/agents/{name}/heartbeat"),
}


def concrete(service: str, template: str) -> str:
    """The route's path naming things that exist (so a request let through would act).
    Agent routes are tried on host2 (its VM "other"), so host1's credential is another
    agent's there; Volt's name host2 wherever an agent is named."""
    if service == "volt":
        names = {"name": "img" if template.startswith("/images") else "host2", "agent": "host2"}
    else:
        names = {"name": "other"}
    path = template
    for key, value in names.items():
        path = path.replace("{" + key + "}", value)
    return path


def request_of(world: World, method: str, template: str) -> dict[str, Any]:
    """A well-formed request that would change something if it were let through."""
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/images"): {"json": {"name": "img2", "origins": [world.origin_uri]}},
        # A made-up relay at level 1, and a heartbeat under a real member's name.
        ("POST", "/images/{name}/members"): {
            "json": {"agent": "host2", "relay_uri": "nbd://127.0.0.1:9/img"}},
        ("POST", "/agents/{name}/heartbeat"): {
            "json": {"url": "https://127.0.0.1:9", "relays": {"img": "nbd://127.0.0.1:9/img"}}},
        ("POST", "/vms"): {"json": {"name": "vm2", "image": "img"}},
        ("POST", "/vms/{name}/snapshots"): {"json": {"name": "s9"}},
        ("POST", "/vms/{name}/clone"): {"json": {"destination": "host1"}},
        ("POST", "/vms/{name}/migrate"): {"json": {"destination": "host1"}},
        ("POST", "/vms/{name}/start"): {"json": {}},
        ("POST", "/vms/import"): {
            "params": {"name": "vm3", "image": "img"}, "content": b"VMCOPY1\n"},
    }
    default: dict[str, Any] = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return bodies.get((method, template), default)


def routes(world: World, service: str) -> list[tuple[str, str, Require | None]]:
    """Every (method, path template, guard) of one service's app, from the app itself."""
    app = world.apps[service if service == "volt" else "host1"]
    guards = {id(route): guard for route, guard in route_guards(app)}
    out = []
    for route in app.routes:
        if not isinstance(route, (APIRoute, Route)):
            continue
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, route.path, guards.get(id(route))))
    return out


def test_every_api_route_has_the_intended_guard(tmp_path: Path) -> None:
    """Synchronous check of the table above against the apps, without a network."""
    w = World(tmp_path, tls=False)
    from virtman.agent.agent import Agent
    from virtman.agent.app import create_app as agent_app
    from virtman.coordinator.app import create_app as volt_app
    from virtman.coordinator.state import VoltState
    from virtman.coordinator.volt import Volt

    apps = {
        "volt": volt_app(Volt(VoltState(str(tmp_path / "v.db"))), authenticator=w.authenticator),
        "agent": agent_app(
            Agent("a", str(tmp_path / "a"), "http://127.0.0.1:9"), authenticator=w.authenticator
        ),
    }
    for service, app in apps.items():
        seen = {}
        for route, guard in route_guards(app):
            assert guard is not None, f"{service} {route.path} has no guard"
            for method in route.methods:
                seen[(method, route.path)] = set(guard.roles)
                if (method, route.path) in NAMED and "{" in route.path.rsplit("/", 1)[-1]:
                    assert guard.acting_as, f"{route.path}: an agent may name another"
        for key, roles in POLICY[service].items():
            assert seen.get(key) == roles, f"{service} {key}: {seen.get(key)} != {roles}"


async def test_every_route_refuses_a_missing_unknown_or_wrong_credential_and_changes_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="virtman")  # every line virtman writes
    before = await state(world)
    ca = world.ca
    assert ca is not None
    pki = world.pki
    host1_cert = TlsFiles(f"{pki}/host1.crt", f"{pki}/host1.key", ca)
    tokens = {
        Role.OPERATOR: world.operator.token,
        Role.VIEWER: world.token(Role.VIEWER, "dashboard"),
        Role.AGENT: world.token(Role.AGENT, "host1"),
    }
    callers: dict[str, tuple[Role | None, Credentials]] = {
        "no credential": (None, Credentials(ca=ca)),
        "unknown token": (None, Credentials(token="x" * 43, ca=ca)),
        "not a bearer token": (None, Credentials(ca=ca)),
        "operator": (Role.OPERATOR, Credentials(token=tokens[Role.OPERATOR], ca=ca)),
        "viewer": (Role.VIEWER, Credentials(token=tokens[Role.VIEWER], ca=ca)),
        "agent host1 (token)": (Role.AGENT, Credentials(token=tokens[Role.AGENT], ca=ca)),
        "agent host1 (certificate)": (Role.AGENT, Credentials(tls=host1_cert)),
    }
    urls = {"volt": world.volt_url, "agent": world.agents["host2"].url}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            (who, service): await stack.enter_async_context(creds.api(url, timeout=30))
            for who, (_, creds) in callers.items()
            for service, url in urls.items()
        }
        reader = await stack.enter_async_context(world.api(world.volt_url))
        probes = await _probe_all(world, callers, clients, reader, before)
    assert probes > 60
    # Every refusal was logged without the token it carried.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in text
    for token in tokens.values():
        assert token is not None and token not in text
    # The VM that every request named still serves.
    vm = world.agents["host2"].vms.get("other")
    assert await vm.top.read(0, 4096) == world.image[:4096]


async def _probe_all(
    world: World,
    callers: dict[str, tuple[Role | None, Credentials]],
    clients: dict[tuple[str, str], ApiClient],
    reader: ApiClient,
    before: dict[str, Any],
) -> int:
    """Every refusal the matrix expects; after each route's (sent at once), a look at
    the state. Returns how many requests were refused."""
    probes = 0
    for service in ("volt", "agent"):
        found = routes(world, service)
        assert len(found) >= len(POLICY[service])
        for method, template, guard in found:
            path = concrete(service, template)
            kwargs = request_of(world, method, template)
            # The intended policy where this test states it, else what the route declares.
            allowed = POLICY[service].get((method, template), guard.roles if guard else None)
            named = (method, template) in NAMED or (guard is not None and guard.acting_as)
            expected: dict[str, int] = {}
            for who, (role, _) in callers.items():
                if role is None:
                    expected[who] = 401
                elif allowed is None:
                    continue  # FastAPI's own pages: any credential reads them
                elif role not in allowed:
                    expected[who] = 403
                elif role is Role.AGENT and named:
                    expected[who] = 403  # host1 acting as host2: the path or body names host2
            basic = {"authorization": "Basic dXNlcjpwYXNz"}
            answers = await asyncio.gather(
                *(
                    clients[who, service].request(
                        method, path, headers=basic if who == "not a bearer token" else {},
                        **kwargs,
                    )
                    for who in expected
                ),
                return_exceptions=True,
            )
            for (who, status), err in zip(expected.items(), answers, strict=True):
                assert isinstance(err, ApiError), f"{who}: {method} {path} answered {err!r}"
                assert err.status == status, f"{who}: {method} {path}: {err}"
                assert "\n" not in err.detail and err.detail, err.detail
            probes += len(expected)
            if method != "GET":  # a GET acts on nothing; all of them are checked below
                after = await state(world, reader)
                assert after == before, f"{method} {path} changed something"
    assert await state(world, reader) == before
    return probes



async def test_an_agent_acts_as_itself_by_certificate_or_token(world: World) -> None:
    """The allowed side of the matrix: the same calls under the agent's own name pass."""
    ca = world.ca
    pki = world.pki
    as_cert = Credentials(tls=TlsFiles(f"{pki}/host2.crt", f"{pki}/host2.key", str(ca)))
    as_token = Credentials(token=world.token(Role.AGENT, "host2"), ca=ca)
    for creds in (as_cert, as_token):
        async with creds.api(world.volt_url) as api:
            beat = {"url": world.agents["host2"].url, "relays": {"img": world.agents[
                "host2"].relays.relay_uri("img")}}
            reply = await api.post("/agents/host2/heartbeat", json=beat)
            assert "img" in reply["paths"]


# --- clone and migrate go only to agents Volt knows, over verified TLS ------------------------


class Listener:
    """Counts the connections made to it (and closes them)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_clone_to_an_unregistered_url_or_name_is_refused_and_sends_nothing(
    world: World,
) -> None:
    listener = Listener()
    port = await listener.start()
    before = await state(world)
    try:
        async with world.api(world.agents["host1"].url) as api:
            for op in ("clone", "migrate"):
                for url in (f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port}"):
                    with pytest.raises(ApiError) as info:
                        await api.post(f"/vms/vm1/{op}", json={"destination": url})
                    assert info.value.status == 422 and "destination" in info.value.detail
                with pytest.raises(ApiError) as info:
                    await api.post(f"/vms/vm1/{op}", json={"destination": "stranger"})
                assert info.value.status == 404 and "stranger" in info.value.detail
    finally:
        await listener.close()
    assert listener.connections == 0
    assert await state(world) == before


async def test_a_destination_without_the_named_agents_certificate_gets_nothing(
    world: World,
) -> None:
    """Volt says agent "liar" is at host2's address (a host may claim any URL in its
    heartbeat): the source sees host2's certificate there, not liar's, and sends nothing."""
    await world.pose_as_agent("liar", world.agents["host2"].url)
    before = await state(world)
    async with world.api(world.agents["host1"].url) as api:
        with pytest.raises(ApiError) as info:
            await api.post("/vms/vm1/clone", json={"destination": "liar"})
    assert info.value.status == 403, info.value
    assert "host2" in info.value.detail and "liar" in info.value.detail
    assert await state(world) == before
    # A real agent by its name: verified, and the copy arrives.
    async with world.api(world.agents["host1"].url) as api:
        await api.post("/vms/vm1/clone", json={"destination": "host2"})
    assert world.agents["host2"].vms.get("vm1") is not None


async def test_only_clients_the_ca_would_vouch_for_are_named(world: World, tmp_path: Path) -> None:
    """A certificate of another CA fails the handshake; plain HTTP to HTTPS gets nothing."""
    other = tmp_path / "other-ca"
    init_ca(str(other))
    stranger = issue("host1", str(other), str(other))  # host1's name, another CA
    ca = str(world.ca)
    # TLS 1.3: the server's refusal arrives after the client's handshake, as a cut.
    with pytest.raises(NetworkError):
        async with Credentials(tls=TlsFiles(stranger.cert, stranger.key, ca)).api(
            world.volt_url
        ) as api:
            await api.get("/agents")
    plain = world.volt_url.replace("https://", "http://")
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"{plain}/agents")


# --- browsers: the cookie -----------------------------------------------------------------------


async def test_a_cookie_token_reads_but_changes_nothing(world: World) -> None:
    viewer = world.token(Role.VIEWER, "browser")
    operator = world.operator.token
    url = world.agents["host1"].url
    ctx = ssl.create_default_context(cafile=str(world.ca))
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=10) as http:
        got = await http.get("/ui", params={"token": viewer})  # no such page on an agent
        assert got.status_code == 404
        cookie = got.headers["set-cookie"]
        http.cookies.clear()  # each request below says what it carries
        assert cookie.startswith(f"{TOKEN_COOKIE}={viewer}") and "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie and "Secure" in cookie
        http.cookies.set(TOKEN_COOKIE, viewer)
        assert (await http.get("/vms")).status_code == 200
        # The token in a URL is taken at /ui only; a cookie never on a request that acts.
        http.cookies.clear()
        assert (await http.get("/vms", params={"token": viewer})).status_code == 401
        http.cookies.set(TOKEN_COOKIE, operator)
        made = await http.post("/vms", json={"name": "x", "image": "img"})
        assert made.status_code == 401
        http.cookies.set(TOKEN_COOKIE, "nope")
        assert (await http.get("/vms")).status_code == 401
    assert [vm.name for vm in world.agents["host1"].vms.list()] == ["vm1"]


# --- tokens ---------------------------------------------------------------------------------------


def test_tokens_are_kept_hashed_and_found_by_hash(tmp_path: Path) -> None:
    path = str(tmp_path / "tokens")
    op = issue_token(path, Role.OPERATOR, "alice")
    agent = issue_token(path, Role.AGENT, "host1")
    text = Path(path).read_text()
    assert op not in text and agent not in text and hash_token(op) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    table = TokenTable.load(path)
    assert table.lookup(op) == Principal(Role.OPERATOR, "alice")
    assert table.lookup(agent) == Principal(Role.AGENT, "host1")
    assert table.lookup(op[:-1]) is None and table.lookup("") is None
    assert len(op) >= 43  # 32 random bytes


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("operator alice", "ROLE NAME"),
        ("admin alice sha256:" + "0" * 64, "role"),
        ("operator a/b sha256:" + "0" * 64, "name"),
        ("operator alice md5:abc", "sha256"),
        ("operator alice sha256:" + "0" * 63, "sha256"),
    ],
)
def test_a_malformed_tokens_file_names_its_line(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\nviewer v sha256:{'a' * 64}\n{line}\n")
    with pytest.raises(ConfigError, match=f"line 4.*{words}"):
        TokenTable.load(str(path))


def test_a_token_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_last(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "tokens")
    alice = issue_token(path, Role.OPERATOR, "alice")
    now = [0.0]
    tokens = TokenFile(path, check_seconds=1.0, clock=lambda: now[0])
    bob = issue_token(path, Role.VIEWER, "bob")
    assert tokens.lookup(bob) is None  # not looked at again before a second has passed
    now[0] = 1.0
    assert tokens.lookup(bob) == Principal(Role.VIEWER, "bob") and tokens.reloads == 1
    with open(path, "a") as f:  # an operator's typo: the last good tokens stay in force
        f.write("operator carol not-a-hash\n")
    now[0] = 2.0
    with caplog.at_level(logging.ERROR, logger="virtman.auth"):
        assert tokens.lookup(alice) == Principal(Role.OPERATOR, "alice")
        assert tokens.lookup(bob) is not None
    assert "keeping the 2 tokens in force" in caplog.text and "line 4" in caplog.text
    assert revoke_tokens(path, Role.OPERATOR, "carol") == 1  # the broken line goes
    assert revoke_tokens(path, Role.OPERATOR, "alice") == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    now[0] = 3.0
    assert tokens.lookup(alice) is None and tokens.lookup(bob) is not None
    assert revoke_tokens(path, Role.OPERATOR, "alice") == 0  # nothing left to remove


def test_a_running_volt_honours_tokens_issued_and_revoked_without_a_restart(
    tmp_path: Path,
) -> None:
    tokens = str(tmp_path / "tokens")
    issue_token(tokens, Role.OPERATOR, "alice")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtman", "volt", "--db", str(tmp_path / "volt.db"),
         "--listen", "127.0.0.1:0", "--tokens", tokens, "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # log lines, then "volt serving on URL"
            seen.append(line)
            if " serving on " in line:
                break
        url = seen[-1].split()[-1]
        assert url.startswith("http://127.0.0.1:"), "".join(seen)

        def status(token: str) -> int:
            headers = {"authorization": f"Bearer {token}"}
            return httpx.get(f"{url}/images", headers=headers, timeout=10).status_code

        def within(seconds: float, expected: int, token: str) -> None:
            deadline = time.monotonic() + seconds
            while (got := status(token)) != expected:
                assert time.monotonic() < deadline, f"still {got}, not {expected}"
                time.sleep(0.1)

        assert cli(["token", "issue", "viewer", "grafana", "--tokens", tokens,
                    "--out", str(tmp_path / "viewer.token")]) == 0
        viewer = (tmp_path / "viewer.token").read_text().strip()
        within(5, 200, viewer)
        assert cli(["token", "revoke", "viewer", "grafana", "--tokens", tokens]) == 0
        within(5, 401, viewer)
        assert cli(["token", "revoke", "viewer", "grafana", "--tokens", tokens]) == 1
    finally:
        proc.terminate()
        proc.wait(30)


def scope(method: str = "GET", path: str = "/vms", headers: dict[str, str] | None = None,
          query: bytes = b"", peer: str | None = None) -> dict[str, Any]:
    return {
        "type": "http", "method": method, "path": path, "query_string": query,
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "state": {PEER_CERT_NAME: peer} if peer else {},
    }


def test_the_authenticator_reads_one_credential_and_says_why_it_refuses() -> None:
    table = TokenTable()
    table.add(Principal(Role.OPERATOR, "alice"), "tok-en_1")
    auth = Authenticator(table)
    bearer = {"authorization": "Bearer tok-en_1"}
    assert auth.identify(scope(headers=bearer))[0] == Principal(Role.OPERATOR, "alice")
    assert auth.identify(scope(peer="host3"))[0] == Principal(Role.AGENT, "host3")
    # A token decides over a certificate; a bad token is not rescued by one.
    assert auth.identify(scope(headers=bearer, peer="host3"))[0].role is Role.OPERATOR
    cases = [
        (scope(), "no credential"),
        (scope(headers={"authorization": "Bearer nope"}, peer="host3"), "not one"),
        (scope(headers={"authorization": "Bearer " + "a" * 300}), "malformed"),
        (scope(headers={"authorization": "Bearer a b"}), "malformed"),
        (scope(headers={"authorization": "Token tok-en_1"}), "Bearer TOKEN"),
        (scope(peer="a b"), "not an agent name"),
        (scope("POST", headers={"cookie": f"{TOKEN_COOKIE}=tok-en_1"}), "no credential"),
    ]
    for request, reason in cases:
        with pytest.raises(Unauthorized, match=reason):
            auth.identify(request)
    # Without TLS a certificate name (which cannot arrive) is never taken.
    with pytest.raises(Unauthorized):
        Authenticator(table, certificates=False).identify(scope(peer="host3"))


def test_an_agent_may_act_only_as_itself() -> None:
    check_acting_as(Principal(Role.AGENT, "host1"), "host1")
    check_acting_as(Principal(Role.OPERATOR, "alice"), "host2")  # not an agent: no name
    with pytest.raises(Forbidden, match="host2"):
        check_acting_as(Principal(Role.AGENT, "host1"), "host2")


def test_an_app_with_an_unguarded_route_is_refused() -> None:
    from fastapi import Depends, FastAPI

    app = FastAPI()

    @app.get("/guarded", dependencies=[Depends(require(Role.VIEWER))])
    async def guarded() -> None: ...

    @app.get("/open")
    async def open_route() -> None: ...

    with pytest.raises(ConfigError, match="GET /open"):
        protect(app, Authenticator(TokenTable()))


def test_an_app_whose_refusals_would_be_500s_is_refused() -> None:
    from fastapi import Depends, FastAPI

    from virtman.httpapi import install_error_handlers

    app = FastAPI()

    @app.get("/guarded", dependencies=[Depends(require(Role.VIEWER))])
    async def guarded() -> None: ...

    with pytest.raises(ConfigError, match="install_error_handlers"):
        protect(app, Authenticator(TokenTable()))
    install_error_handlers(app)
    protect(app, Authenticator(TokenTable()))  # now a Forbidden is answered 403


# --- the CLI ------------------------------------------------------------------------------


def test_tokens_never_start_with_a_dash_so_a_command_line_takes_them() -> None:
    # One in 64 random url-safe tokens would: 2,000 draws miss that with odds of 1e-14.
    tokens = [new_token() for _ in range(2000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens)
    parser = argparse.ArgumentParser()
    parser.add_argument("--token")
    for token in tokens[:50]:
        assert parser.parse_args(["--token", token]).token == token


def test_cli_token_issue_and_credential_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VIRTMAN_TOKEN", raising=False)
    tokens = str(tmp_path / "tokens")
    assert cli(["token", "issue", "operator", "alice", "--tokens", tokens]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenTable.load(tokens).lookup(token) == Principal(Role.OPERATOR, "alice")
    out = str(tmp_path / "agent.token")
    assert cli(["token", "issue", "agent", "host1", "--tokens", tokens, "--out", out]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert TokenTable.load(tokens).lookup(Path(out).read_text().strip()) is not None
    capsys.readouterr()
    # No token: refused before anything is sent.
    assert cli(["vm", "list", "--agent", "https://127.0.0.1:9"]) == 2
    assert "no credential" in capsys.readouterr().err
    # A token over plain HTTP only with --insecure.
    assert cli(["vm", "list", "--agent", "http://127.0.0.1:9", "--token", token]) == 2
    assert "--insecure" in capsys.readouterr().err
    # A service with neither TLS nor --insecure does not start.
    assert cli(["volt", "--db", str(tmp_path / "v.db"), "--tokens", tokens]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert cli(["agent", "--name", "h", "--data-dir", str(tmp_path / "d"), "--tokens", tokens,
                "--insecure"]) == 2
    assert "--token-file" in capsys.readouterr().err


# --- VM export sockets ----------------------------------------------------------------------------


async def test_vm_sockets_are_the_hypervisor_users_alone(world: World) -> None:
    vm = world.agents["host1"].vms.get("vm1")
    st = os.stat(vm.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    directory = os.stat(os.path.dirname(vm.socket_path))
    assert stat.S_IMODE(directory.st_mode) == 0o700
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("another user's view needs root to become that user, and a python")
    # Another local user cannot connect even where the directories let it through:
    # the socket's own mode stops it.
    opened = [world.socket_root, os.path.dirname(vm.socket_path)]
    for d in opened:
        os.chmod(d, 0o711)
    try:
        assert await connect_as("nobody", vm.socket_path) == "PermissionError"
    finally:
        for d in opened:
            os.chmod(d, 0o700)


#: An interpreter any user may run (the test's own may live in a private directory).
SYSTEM_PYTHON = "/usr/bin/python3"


async def connect_as(user: str, path: str) -> str:
    """What connecting to the Unix socket ``path`` as ``user`` gives: the first bytes the
    server sends, or the name of the error."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print(s.recv(8))\n"
        "except OSError as e: print(type(e).__name__)\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [SYSTEM_PYTHON, "-c", probe, path],
        capture_output=True, text=True, user=user, timeout=30,
    )
    assert done.returncode == 0, done
    return done.stdout.strip()


async def test_hypervisor_user_owns_the_sockets(world: World) -> None:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("giving a socket to another user needs root (and a python for it)")
    import pwd

    nobody = pwd.getpwnam("nobody")
    from virtman.agent.vms import SocketOwner

    agent = await world.agent("host3", socket_owner=SocketOwner.named("nobody"))
    vm = await agent.vms.create("vm", "img")
    for path, mode in ((vm.socket_path, 0o600), (os.path.dirname(vm.socket_path), 0o700)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            nobody.pw_uid, nobody.pw_gid, mode), path
    # That user reaches it (the NBD greeting comes back) once it may pass the world's
    # own private directory, which the agent's socket directory sits in.
    os.chmod(world.socket_root, 0o711)
    try:
        assert "NBDMAGIC" in await connect_as("nobody", vm.socket_path)
    finally:
        os.chmod(world.socket_root, 0o700)


def test_a_shared_socket_directory_is_refused_not_closed(tmp_path: Path) -> None:
    from virtman.agent.vms import SocketOwner

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ConfigError, match="shared with other users"):
        SocketOwner.me().secure_dir(str(shared))
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    SocketOwner.me().secure_dir(str(mine))
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o700


def test_an_unknown_hypervisor_user_is_a_config_error() -> None:
    from virtman.agent.vms import SocketOwner

    with pytest.raises(ConfigError, match="no such user"):
        SocketOwner.named("no-such-user-here")

