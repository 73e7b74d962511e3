"""NBD URIs as QEMU and libnbd write them (NetworkBlockDevice/nbd ``doc/uri.md``).

- ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default)
- ``nbd+unix:///EXPORT?socket=PATH``
- ``nbds://...`` and ``nbds+unix://...``: the same over TLS (``NbdAddress.tls``).

The export name is the path without its leading slash, percent-decoded. libnbd's
``tls-certificates=DIR`` query parameter (DIR holding ``ca-cert.pem``,
``client-cert.pem`` and ``client-key.pem``) is kept in ``tls_certificates``: our
client uses it when it is given no TLS files of its own. libnbd's other TLS parameters
(``tls-verify-peer``, ``tls-username``, ``tls-psk-file``, ``tls-hostname``) are
ignored: peers are always verified against the CA, with certificates, never PSK.
vsock schemes are refused.
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
    tls: bool = False
    #: libnbd's ``tls-certificates=DIR`` (see the module docstring).
    tls_certificates: str | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.socket is None):
            raise ConfigError("an NBD address needs exactly one of a host or a socket path")

    @property
    def is_unix(self) -> bool:
        return self.socket is not None

    def uri(self) -> str:
        export = quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        query = []
        if self.socket is not None:
            query.append(f"socket={quote(self.socket, safe='/')}")
        if self.tls_certificates is not None:
            query.append(f"tls-certificates={quote(self.tls_certificates, safe='/')}")
        tail = f"?{'&'.join(query)}" if query else ""
        if self.socket is not None:
            return f"{scheme}+unix:///{export}{tail}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{scheme}://{host}{port}/{export}{tail}"

    @property
    def tls_hostname(self) -> str:
        """The name the server's certificate must carry: the host, or ``localhost`` for
        a Unix socket (whose path names no host)."""
        return self.host if self.host is not None else "localhost"

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
    if scheme in ("nbds+vsock", "nbd+vsock"):
        raise ConfigError(f"NBD URI {shown}: scheme {scheme!r} is not supported (no vsock)")
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise ConfigError(
            f"NBD URI {shown}: scheme must be nbd://, nbd+unix://, nbds:// or nbds+unix://"
        )
    tls = scheme.startswith("nbds")
    path = parts.path
    export = unquote(path[1:] if path.startswith("/") else path)
    # parse_qs decodes '+' as a space (form encoding); in a URI it is a literal '+'.
    query = parse_qs(parts.query.replace("+", "%2B"), keep_blank_values=True)
    certificates = query.get("tls-certificates")
    if certificates is not None and not certificates[0]:
        raise ConfigError(f"NBD URI {shown}: tls-certificates= needs a directory")
    tls_dir = certificates[0] if certificates else None
    if tls_dir is not None and not tls:
        raise ConfigError(f"NBD URI {shown}: tls-certificates= only goes with nbds schemes")
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ConfigError(
                f"NBD URI {shown}: {scheme}:// takes no host (use ?socket=PATH)"
            )
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ConfigError(f"NBD URI {shown}: {scheme}:// needs ?socket=PATH")
        return NbdAddress(export=export, socket=sockets[0], tls=tls, tls_certificates=tls_dir)
    if not parts.hostname:
        raise ConfigError(f"NBD URI {shown}: {scheme}:// needs a host")
    if "socket" in query:
        raise ConfigError(f"NBD URI {shown}: ?socket= only goes with {scheme}+unix://")
    return NbdAddress(export=export, host=parts.hostname, port=port or DEFAULT_PORT, tls=tls,
                      tls_certificates=tls_dir)


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
