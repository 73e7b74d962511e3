"""TLS settings shared by every virtman service and client: which files, which contexts.

Every TLS endpoint in a cluster holds three PEM files: its certificate, its private key
and the CA certificate that signed every certificate of the cluster (``virtman ca``
makes them, or an existing CA does). Servers verify clients against that CA (only hosts
of the cluster read images), and clients verify servers against it with host names
checked, so a certificate of one host cannot stand in for another's address.

The contexts are built here, once, so that NBD and HTTPS agree on the protocol floor
(TLS 1.2) and on what a verified peer is.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from typing import Any

from virtman.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a PEM certificate, its private key and the CA certificate to trust."""

    cert: str
    key: str
    ca: str

    def check(self) -> None:
        """Raise ConfigError naming the first of the three files that cannot be read."""
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not os.path.isfile(path):
                raise ConfigError(f"TLS {what} file {path!r} does not exist")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"TLS {what} file {path!r} is not readable")


def _load(context: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    files.check()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(
            f"TLS certificate {files.cert!r} and key {files.key!r} do not load: {err}"
        ) from err
    try:
        context.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"TLS CA file {files.ca!r} does not load: {err}") from err
    return context


def server_context(files: TlsFiles, *, require_client_cert: bool = True) -> ssl.SSLContext:
    """A server context presenting ``files.cert``; with ``require_client_cert`` (the
    default) a client without a certificate signed by ``files.ca`` fails the handshake.

    Raises ConfigError when a file is missing or does not load.
    """
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client context that verifies the server against ``files.ca`` (host name
    included) and presents ``files.cert`` as its client certificate.

    Raises ConfigError when a file is missing or does not load.
    """
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of the peer's verified certificate, or None (no TLS, no
    certificate, or a certificate without a common name)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--tls-cert FILE --tls-key FILE --tls-ca FILE`` (read back by ``tls_files``)."""
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="PEM certificate of this host (turns TLS on)"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="PEM CA certificate that peers must be signed by"
    )


def tls_files(args: Any) -> TlsFiles | None:
    """The TLS files of parsed ``add_tls_options`` options: all three, or None when none
    is given. Raises ConfigError naming the options missing when only some are."""
    given = {
        "--tls-cert": getattr(args, "tls_cert", None),
        "--tls-key": getattr(args, "tls_key", None),
        "--tls-ca": getattr(args, "tls_ca", None),
    }
    missing = [name for name, value in given.items() if not value]
    if len(missing) == len(given):
        return None
    if missing:
        raise ConfigError(
            f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}"
        )
    files = TlsFiles(cert=str(args.tls_cert), key=str(args.tls_key), ca=str(args.tls_ca))
    files.check()
    return files


def libnbd_files(directory: str) -> TlsFiles:
    """The TLS files of a directory laid out as libnbd and QEMU expect it
    (``tls-certificates=DIR``, ``tls-creds-x509,dir=DIR``): ``ca-cert.pem``,
    ``client-cert.pem`` and ``client-key.pem``."""
    return TlsFiles(
        cert=os.path.join(directory, "client-cert.pem"),
        key=os.path.join(directory, "client-key.pem"),
        ca=os.path.join(directory, "ca-cert.pem"),
    )
