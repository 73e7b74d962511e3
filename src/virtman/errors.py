"""One root exception with families, each carrying the facts an operator needs.

- ``ProtocolError``: a protocol rule was broken, by us (``LocalProtocolError``) or by
  the peer (``PeerProtocolError``).
- ``NbdRequestError``: the peer answered an NBD request with an error number.
- ``NetworkError``: a connection could not be made or was lost; ``NetworkTimeout``: a
  connect, handshake or request took longer than its limit.
- ``InvalidRequest``: a caller asked for something impossible (out of range, read-only).
- ``ConfigError``: bad settings or command-line input; ``PlannerError``: a relay tree
  asked for something impossible (a fan-out below 1, a host placed twice).
- ``DeviceError``: a storage device failed (I/O error, digest mismatch, corruption).
- ``ApiError``: a virtman service answered an HTTP request with an error.
- ``NotFound``, ``Conflict``: a named thing is unknown, or its name is taken.
- ``ProcessFailed``: a child process we started exited or never became ready (with the
  tail of its log); ``BenchError``: a benchmark step failed.
- ``PayloadTooLarge``: a request body over its named limit.
- ``LifecycleError``: a service asked to do what its lifecycle state does not allow.

Messages that embed what a caller sent quote it through ``quote``/``excerpt``: a bounded
prefix and its size, so a 10 MB bad input never comes back whole in an error.
"""

from __future__ import annotations

from virtman.limits import MAX_ERROR_INPUT_CHARS


class VirtmanError(Exception):
    """Root of every error virtman raises on purpose."""


class ProtocolError(VirtmanError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (a bug on our side)."""


class PeerProtocolError(ProtocolError):
    """The peer sent something the protocol forbids.

    ``errno`` is the NBD error number the specification names for it, when the
    violation can be answered rather than only closed on.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NbdRequestError(VirtmanError):
    """An NBD request was answered with an error."""

    def __init__(self, message: str, *, errno: int, command: str, offset: int, length: int) -> None:
        super().__init__(f"{message} ({command} offset={offset} length={length} errno={errno})")
        self.errno = errno
        self.command = command
        self.offset = offset
        self.length = length


class NetworkError(VirtmanError):
    """A connection could not be made, or broke."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(f"{message} [{address}]" if address else message)
        self.address = address


class NetworkTimeout(NetworkError):
    """A network operation did not finish within its limit.

    ``what`` names the operation (``"connect"``, ``"handshake"``, ``"READ offset=0
    length=4096"``), ``limit`` is the timeout in seconds it exceeded.
    """

    def __init__(self, what: str, *, limit: float, address: str | None = None) -> None:
        super().__init__(f"{what} timed out after {limit:g} s", address=address)
        self.what = what
        self.limit = limit


class InvalidRequest(VirtmanError):
    """A request that cannot be served as asked: wrong range, read-only target, bad size.

    ``errno`` is the NBD error number a server answers with.
    """

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class ConfigError(VirtmanError):
    """Settings or command-line input that cannot work."""


class DeviceError(VirtmanError):
    """A device failed to do what it should: I/O error, corruption, digest mismatch."""

    def __init__(self, message: str, *, errno: int = 5) -> None:
        super().__init__(message)
        self.errno = errno


class ApiError(VirtmanError):
    """A virtman service answered an HTTP request with an error."""

    def __init__(self, message: str, *, status: int, url: str) -> None:
        super().__init__(f"{message} (HTTP {status} from {url})")
        self.status = status
        self.detail = message
        self.url = url


class Unauthorized(VirtmanError):
    """A request to a virtman service without a valid credential (HTTP 401). The message
    says what was missing or wrong, never the credential itself."""


class Forbidden(VirtmanError):
    """A request whose credential is valid but does not allow it (HTTP 403): a role
    without the right, or an agent acting as another."""


class NotFound(VirtmanError):
    """A named thing (image, agent, VM, snapshot) that does not exist."""


class Conflict(VirtmanError):
    """A name already in use, or an operation the current state does not allow."""


class PayloadTooLarge(VirtmanError):
    """A request body over its limit. ``size`` is the declared Content-Length, or None
    when the body came in chunks and was cut as soon as it passed ``limit`` bytes."""

    def __init__(self, what: str, *, limit: int, size: int | None) -> None:
        amount = f"of {size} bytes" if size is not None else "sent in chunks"
        super().__init__(f"{what}: request body {amount} is over the limit of {limit} bytes")
        self.what = what
        self.limit = limit
        self.size = size


class LifecycleError(VirtmanError):
    """A service (Volt, an HTTP service) asked to do what its state does not allow:
    start twice, serve after it stopped. ``component``, ``action`` and ``state`` say who,
    what and when."""

    def __init__(self, component: str, action: str, state: str, *, reason: str = "") -> None:
        why = f": {reason}" if reason else ""
        super().__init__(f"{component} cannot {action} in state {state}{why}")
        self.component = component
        self.action = action
        self.state = state


class ProcessFailed(VirtmanError):
    """A child process we started exited, or did not become ready in time.

    ``returncode`` is its exit status (None while it still ran); ``log_tail`` the last
    lines of its output, which usually say why.
    """

    def __init__(self, message: str, *, name: str, returncode: int | None,
                 log_tail: str) -> None:
        super().__init__(f"{name} {message}" + (f":\n{log_tail}" if log_tail else ""))
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail


class GuestControlError(VirtmanError):
    """QEMU refused or failed a QMP command, or its monitor could not be reached.

    ``guest`` names the VM, ``command`` the QMP command (or "connect"), ``detail`` what
    QEMU (or the socket) said.
    """

    def __init__(self, guest: str, command: str, detail: str) -> None:
        super().__init__(f"guest {guest!r}: QMP {command} failed: {detail}")
        self.guest = guest
        self.command = command
        self.detail = detail


class BenchError(VirtmanError):
    """A benchmark step failed: a server did not come up, a client command failed."""


class PlannerError(ConfigError):
    """A relay tree was asked for something impossible: a bad fan-out, a host twice."""


def excerpt(text: str, limit: int = MAX_ERROR_INPUT_CHARS) -> str:
    """``text`` if it is at most ``limit`` characters, else its first ``limit`` characters,
    an ellipsis and the whole text's size in UTF-8 bytes."""
    if len(text) <= limit:
        return text
    size = len(text.encode("utf-8", "surrogatepass"))
    return f"{text[:limit]}\u2026 ({size} bytes)"


def quote(text: str, limit: int = MAX_ERROR_INPUT_CHARS) -> str:
    """``repr(text)`` for a message, bounded like ``excerpt``: what a caller sent, quoted."""
    if len(text) <= limit:
        return repr(text)
    size = len(text.encode("utf-8", "surrogatepass"))
    return f"{text[:limit]!r}\u2026 ({size} bytes)"
