"""Who may call Volt and the agents: credentials, roles, and the check on every request.

Theory of operation
-------------------
Every request to Volt or to an agent goes through two checks, in this order:

1. ``Authenticate`` (ASGI middleware, outermost) finds the caller's credential before
   anything reads the request: a bearer token (``Authorization: Bearer TOKEN``), or,
   with no token, the common name of a client certificate the service's CA verified
   (an agent's certificate; HTTPS only). A browser's GET may carry the token in the
   ``virtman_token`` cookie instead, which ``GET /ui?token=T`` sets. No credential, or
   one the service does not know: **401** with a one-line reason, before the body is
   read or any route runs, so nothing changes.
2. Each route declares who may call it with ``Depends(require(ROLE, ...))``: a caller
   of another role, or an agent naming another agent (``acting_as``: the path
   parameter, or ``check_acting_as`` for a name in the body), gets **403** and the
   route's code does not run. ``protect`` refuses to build an app with a route that
   declares nobody: a new route cannot be open by mistake.

Roles: an **agent** acts only as itself (heartbeat, join, leave with its own name, and
sending a VM to another agent's ``/vms/import``); an **operator** runs the CLI: the VM
API, images; a **viewer** reads status, trees, metrics and the UI.

Tokens are random (``secrets.token_urlsafe``), shown once when made and kept only as
SHA-256 hashes in a tokens file (``ROLE NAME sha256:HEX`` a line). A service reads the
file again when it changes (``TokenFile``), so ``virtman token issue`` and ``virtman
token revoke`` count within ``TOKENS_CHECK_SECONDS``, without a restart; a file that no
longer loads leaves the last good tokens in force and is logged. A presented token is
hashed and compared with every stored hash by ``hmac.compare_digest`` (no early exit),
so how long the check takes says nothing about how close a guess was. Tokens are never
logged: refusals are logged (rate-limited per client) with the reason and the route.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Protocol
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virtman.durable import write_atomic
from virtman.errors import ConfigError, Forbidden, Unauthorized, VirtmanError, excerpt, quote
from virtman.httpapi import PEER_CERT_NAME, json_refusal
from virtman.limits import MAX_TOKEN_CHARS, TOKEN_BYTES, TOKENS_CHECK_SECONDS
from virtman.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: Where ``Authenticate`` leaves the caller's ``Principal`` in the ASGI scope.
PRINCIPAL = "virtman.principal"
#: The cookie a browser carries its token in (set by ``GET BROWSER_ENTRY?token=T``).
TOKEN_COOKIE = "virtman_token"
#: The one route that takes a token in its query string: a browser's first visit.
BROWSER_ENTRY = "/ui"

# Agent and user names: the same rule as every other name in virtman (and file names).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# What secrets.token_urlsafe makes; anything else is refused unread.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_HASH_PREFIX = "sha256:"
# Methods that change nothing: the only ones a cookie's token is good for, so another
# web page cannot make a browser change anything with it (no cross-site request forgery).
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class Role(enum.Enum):
    AGENT = "agent"  # a compute host: acts only as itself
    OPERATOR = "operator"  # the CLI: VMs, images
    VIEWER = "viewer"  # read-only: status, trees, metrics, the UI


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a role and a name (the agent's name for agents)."""

    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role.value} {self.name!r}"


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{what} {quote(name)}: use letters, digits, '.', '_' and '-'")
    return name


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ConfigError(
            f"role {quote(text)}: one of {', '.join(r.value for r in Role)}"
        ) from None


def hash_token(token: str) -> str:
    """The form a token is stored in: ``sha256:HEX``."""
    return _HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token(nbytes: int = TOKEN_BYTES) -> str:
    """A random token that never starts with '-': one in 64 did, and a command line
    then read ``--token -Xyz…`` as a missing value followed by an option."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if not token.startswith("-"):
            return token


# --- the tokens file ----------------------------------------------------------------------


class TokenTable:
    """The tokens a service accepts, as hashes, and whose each is."""

    def __init__(self, entries: Iterable[tuple[Principal, str]] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        for principal, digest in entries:
            self.add_hash(principal, digest)

    def __len__(self) -> int:
        return len(self._entries)

    def add_hash(self, principal: Principal, digest: str) -> None:
        if not digest.startswith(_HASH_PREFIX) or not re.fullmatch(
            r"[0-9a-f]{64}", digest.removeprefix(_HASH_PREFIX)
        ):
            raise ConfigError(f"token hash of {principal} is not sha256:<64 hex digits>")
        self._entries.append((bytes.fromhex(digest.removeprefix(_HASH_PREFIX)), principal))

    def add(self, principal: Principal, token: str) -> None:
        self.add_hash(principal, hash_token(token))

    def lookup(self, token: str) -> Principal | None:
        """Whose ``token`` is, or None. Every stored hash is compared, in constant time
        each, whatever matched first."""
        presented = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found

    @classmethod
    def load(cls, path: str) -> TokenTable:
        """Read a tokens file (``ROLE NAME sha256:HEX`` a line; ``#`` comments).
        Raises ``ConfigError`` naming the file and line of anything else."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as err:
            raise ConfigError(f"tokens file {path!r}: {err.strerror}") from err
        table = cls()
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) != 3:
                raise ConfigError(
                    f"tokens file {path!r} line {number}: expected ROLE NAME sha256:HEX"
                )
            try:
                principal = Principal(parse_role(fields[0]), check_name(fields[1]))
                table.add_hash(principal, fields[2])
            except ConfigError as err:
                raise ConfigError(f"tokens file {path!r} line {number}: {err}") from None
        return table


class TokenFile:
    """A tokens file as a service sees it while it runs: read at start (``ConfigError``
    if it does not load, as ``TokenTable.load``), then looked at again, at most every
    ``check_seconds``, when a token is checked; a change (inode, size or mtime) is read
    in. A change that does not load keeps the last good table in force: a half-edited
    file never opens the service, nor locks everyone out; the error is logged once per
    change."""

    def __init__(
        self,
        path: str,
        *,
        check_seconds: float = TOKENS_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.check_seconds = check_seconds
        self._clock = clock
        self._stamp = self._stat()
        self._table = TokenTable.load(path)
        self._checked = clock()
        #: Times the file was read in again after a change (for tests and logs).
        self.reloads = 0

    def __len__(self) -> int:
        return len(self._table)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def lookup(self, token: str) -> Principal | None:
        self.refresh()
        return self._table.lookup(token)

    def refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self.check_seconds:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp  # an error is reported once per change, not per request
        try:
            table = TokenTable.load(self.path)
        except ConfigError as err:
            log.error("keeping the %d tokens in force: %s", len(self._table), err)
            return
        self._table = table
        self.reloads += 1
        log.info("tokens file %s read again: %d tokens", self.path, len(table))


def issue_token(path: str, role: Role, name: str) -> str:
    """Make a token for ``role`` ``name``, add its hash to the tokens file at ``path``
    (created 0600) and return the token: the only time it is seen whole."""
    check_name(name)
    token = new_token()
    line = f"{role.value} {name} {hash_token(token)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, b"# virtman tokens: ROLE NAME sha256:HEX (virtman token issue)\n")
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def revoke_tokens(path: str, role: Role, name: str) -> int:
    """Remove every token of ``role`` ``name`` from the tokens file at ``path`` and
    return how many there were. The file is replaced whole (written beside it, synced,
    renamed), so a service reading it sees the old file or the new one, never half."""
    check_name(name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except OSError as err:
        raise ConfigError(f"tokens file {path!r}: {err.strerror}") from err
    kept = [line for line in lines if line.split()[:2] != [role.value, name]]
    removed = len(lines) - len(kept)
    if removed:
        write_atomic(path, "".join(kept).encode(), 0o600)
    return removed


def write_secret(path: str, text: str) -> None:
    """Write a token for a program to read (``--token-file``): mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)


def read_token_file(path: str) -> str:
    """The token in ``path`` (its first line); ``ConfigError`` when unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as err:
        raise ConfigError(f"token file {path!r}: {err.strerror}") from err
    if not token:
        raise ConfigError(f"token file {path!r} is empty")
    return token


# --- who is calling -----------------------------------------------------------------------


class Tokens(Protocol):
    """What an ``Authenticator`` asks of its tokens: ``TokenTable`` or ``TokenFile``."""

    def lookup(self, token: str) -> Principal | None: ...


@dataclass(frozen=True)
class Authenticator:
    """Turns a request's credential into a ``Principal``.

    ``tokens``: the tokens this service accepts. ``certificates``: whether a verified
    client certificate with no token identifies an agent by its common name (every
    certificate the cluster's CA signs is a host's).
    """

    tokens: Tokens
    certificates: bool = True

    def identify(self, scope: Scope) -> tuple[Principal, str | None]:
        """The caller of an HTTP request, and the token to set as a cookie (when it came
        in ``BROWSER_ENTRY``'s query string). Raises ``Unauthorized`` with the reason."""
        headers = _headers(scope)
        method = scope.get("method", "GET")
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("the Authorization header is not 'Bearer TOKEN'")
            return self._token(token.strip(), "bearer token"), None
        if method in _SAFE_METHODS and scope.get("path") == BROWSER_ENTRY:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "token" in query:
                token = query["token"][0]
                return self._token(token, "token in the URL"), token
        if method in _SAFE_METHODS and "cookie" in headers:
            carried = _cookie(headers["cookie"], TOKEN_COOKIE)
            if carried is not None:
                return self._token(carried, f"{TOKEN_COOKIE} cookie"), None
        peer = scope.get("state", {}).get(PEER_CERT_NAME)
        if peer is not None and self.certificates:
            if not _NAME.match(peer):
                raise Unauthorized(
                    f"client certificate name {quote(peer)} is not an agent name"
                )
            return Principal(Role.AGENT, peer), None
        raise Unauthorized(
            "no credential: send 'Authorization: Bearer TOKEN'"
            + (" or a client certificate" if self.certificates else "")
        )

    def _token(self, token: str, where: str) -> Principal:
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN.match(token):
            raise Unauthorized(f"the {where} is malformed")
        principal = self.tokens.lookup(token)
        if principal is None:
            raise Unauthorized(f"the {where} is not one this service knows")
        return principal


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key in ("authorization", "cookie") and key not in out:
            out[key] = value.decode("latin-1")
    return out


def _cookie(header: str, name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


class Authenticate:
    """ASGI middleware: every HTTP request is identified before the app sees it; a
    request without a valid credential is answered 401 here. Refusals (401 here, 403
    from the routes) are logged, at most one line per client and kind per interval."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator
        self.refusals = RateLimitedLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        client = scope.get("client") or ("?", 0)
        what = f"{scope.get('method', 'WEBSOCKET')} {excerpt(scope.get('path', ''), 100)}"
        try:
            principal, cookie = self.authenticator.identify(scope)
        except Unauthorized as err:
            self.refusals.warning(
                str(client[0]), "401", "refused %s from %s: %s", what, client[0], err
            )
            if scope["type"] == "http":
                await json_refusal(send, 401, str(err), [(b"www-authenticate", b"Bearer")])
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        scope[PRINCIPAL] = principal
        secure = scope.get("scheme") in ("https", "wss")

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 403:
                    self.refusals.warning(
                        str(client[0]), "403", "refused %s from %s: %s may not", what,
                        client[0], principal,
                    )
                if cookie is not None:
                    message = dict(message)
                    message["headers"] = [
                        *message.get("headers", []), (b"set-cookie", _set_cookie(cookie, secure))
                    ]
            await send(message)

        await self.app(scope, receive, watched)


def _set_cookie(token: str, secure: bool) -> bytes:
    # HttpOnly: page scripts never see it; SameSite=Strict: other sites' pages never send it.
    attributes = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    return f"{TOKEN_COOKIE}={token}{attributes}".encode("latin-1")


# --- what each route allows -----------------------------------------------------------------


class Require:
    """A route's guard (``Depends(require(...))``): the roles that may call it and, for
    agents, the path parameter naming the agent they must be."""

    def __init__(self, roles: frozenset[Role], acting_as: str | None) -> None:
        self.roles = roles
        self.acting_as = acting_as

    def __repr__(self) -> str:
        roles = ", ".join(sorted(r.value for r in self.roles))
        return f"require({roles}{', acting_as=' + self.acting_as if self.acting_as else ''})"

    def __call__(self, request: Request) -> Principal:
        principal = request.scope.get(PRINCIPAL)
        if not isinstance(principal, Principal):
            # The app was built without ``protect``: refuse rather than serve openly.
            raise Unauthorized("this service checks no credentials; refusing")
        if principal.role not in self.roles:
            allowed = " or ".join(sorted(r.value for r in self.roles))
            raise Forbidden(
                f"{principal} may not {request.method} {excerpt(request.url.path, 100)} "
                f"(needs {allowed})"
            )
        if self.acting_as is not None:
            check_acting_as(principal, str(request.path_params.get(self.acting_as, "")))
        return principal


def require(*roles: Role, acting_as: str | None = None) -> Require:
    """The guard of a route callable by ``roles``; with ``acting_as``, an agent may only
    name itself in that path parameter."""
    if not roles:
        raise ConfigError("require() needs at least one role")
    return Require(frozenset(roles), acting_as)


#: Everyone with a credential: reads that tell no secrets.
ANYONE = (Role.VIEWER, Role.OPERATOR, Role.AGENT)


def check_acting_as(principal: Principal, name: str) -> None:
    """An agent may act only as itself: ``Forbidden`` when it names another agent."""
    if principal.role is Role.AGENT and principal.name != name:
        raise Forbidden(f"{principal} may not act as agent {quote(name, 100)}")


def route_guards(app: FastAPI) -> Iterator[tuple[APIRoute, Require | None]]:
    """Every API route of ``app`` with its guard (None: it has none)."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            guards = [d.call for d in route.dependant.dependencies if isinstance(d.call, Require)]
            yield route, guards[0] if len(guards) == 1 else None


def protect(app: FastAPI, authenticator: Authenticator) -> None:
    """Check credentials on every request to ``app``. Call it last, once every route is
    declared: it raises ``ConfigError`` for a route without exactly one guard."""
    open_routes = [
        f"{','.join(sorted(route.methods or ()))} {route.path}"
        for route, guard in route_guards(app)
        if guard is None
    ]
    if open_routes:
        raise ConfigError(
            f"routes without one require(...) guard: {'; '.join(open_routes)}"
        )
    if VirtmanError not in app.exception_handlers:
        # Without them a guard's Forbidden would reach the client as a bare 500.
        raise ConfigError("protect() needs httpapi.install_error_handlers(app) first")
    app.add_middleware(Authenticate, authenticator=authenticator)
