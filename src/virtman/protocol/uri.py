"""NBD URIs as QEMU and libnbd write them (NetworkBlockDevice/nbd ``doc/uri.md``).

- ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default)
- ``nbd+unix:///EXPORT?socket=PATH``

The export name is the path without its leading slash, percent-decoded. TLS schemes
(``nbds``, ``nbds+unix``) are recognised and refused: virtman does not speak TLS yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from virtman.errors import ConfigError
from virtman.errors import quote as bounded
from virtman.protocol.nbd.constants import DEFAULT_PORT


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD export is: a TCP host and port, or a Unix socket path."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.socket is None):
            raise ConfigError("an NBD address needs exactly one of a host or a socket path")

    @property
    def is_unix(self) -> bool:
        return self.socket is not None

    def uri(self) -> str:
        export = quote(self.export, safe="")
        if self.socket is not None:
            return f"nbd+unix:///{export}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd://{host}{port}/{export}"

    def __str__(self) -> str:
        return self.uri()


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI; raise ``ConfigError`` saying what is wrong with it."""
    shown = bounded(uri)  # a caller's input: quoted as a bounded prefix
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"invalid NBD URI {shown}: {err}") from err
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock", "nbd+vsock"):
        raise ConfigError(f"NBD URI {shown}: scheme {scheme!r} is not supported (no TLS/vsock)")
    if scheme not in ("nbd", "nbd+unix"):
        raise ConfigError(f"NBD URI {shown}: scheme must be nbd:// or nbd+unix://")
    path = parts.path
    export = unquote(path[1:] if path.startswith("/") else path)
    # parse_qs decodes '+' as a space (form encoding); in a URI it is a literal '+'.
    query = parse_qs(parts.query.replace("+", "%2B"), keep_blank_values=True)
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ConfigError(f"NBD URI {shown}: nbd+unix:// takes no host (use ?socket=PATH)")
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ConfigError(f"NBD URI {shown}: nbd+unix:// needs ?socket=PATH")
        return NbdAddress(export=export, socket=sockets[0])
    if not parts.hostname:
        raise ConfigError(f"NBD URI {shown}: nbd:// needs a host")
    if "socket" in query:
        raise ConfigError(f"NBD URI {shown}: ?socket= only goes with nbd+unix://")
    return NbdAddress(export=export, host=parts.hostname, port=port or DEFAULT_PORT)


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) given to ``option``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{option} {text!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError as err:
        raise ConfigError(f"{option} {text!r}: port {port!r} is not a number") from err
    if not 0 <= number <= 65535:
        raise ConfigError(f"{option} {text!r}: port {number} out of range")
    return host, number
