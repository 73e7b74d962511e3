"""A small certificate authority for a virtman cluster: ``virtman ca init`` / ``issue``.

``init_ca`` makes a self-signed CA (``ca.crt``, ``ca.key``) and ``issue`` makes a host
certificate signed by it (``NAME.crt``, ``NAME.key``) that serves both as a server and
as a client certificate, since every host of a cluster is both (a relay serves its
children and reads from its parents). Keys are ECDSA P-256: small, fast to handshake,
and accepted by OpenSSL and GnuTLS (QEMU, libnbd) alike.

Private keys are written with mode 0600 through a temporary file renamed into place,
so a key is never readable by others, not even for an instant, and a crash leaves
either the old pair or the new one. An existing CA is never overwritten: every
certificate it signed would stop verifying.

A cluster that has its own CA does not need this module: give each host a certificate
with serverAuth and clientAuth usages and the CA certificate (see docs).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtman.durable import write_atomic
from virtman.errors import ConfigError, Conflict, quote
from virtman.limits import CA_VALIDITY_DAYS, CERT_VALIDITY_DAYS
from virtman.tlsconfig import TlsFiles

#: What ``init_ca`` and ``issue`` return: the same three paths every TLS endpoint takes.
CertFiles = TlsFiles

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")

# A certificate name becomes a file name: no separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Clocks of a cluster's hosts disagree a little: certificates start an hour early.
_BACKDATE = datetime.timedelta(hours=1)


def init_ca(directory: str, *, days: int = CA_VALIDITY_DAYS) -> CertFiles:
    """Make a new CA in ``directory`` (created 0700 if missing): ``ca.crt`` and
    ``ca.key`` (0600). The returned ``cert`` and ``ca`` are both ``ca.crt``.

    Raises Conflict if the directory already holds a CA key or certificate.
    """
    cert_path = os.path.join(directory, CA_CERT)
    key_path = os.path.join(directory, CA_KEY)
    for path in (cert_path, key_path):
        if os.path.exists(path):
            raise Conflict(f"{path!r} already exists; a CA is never overwritten")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtman"),
            # Two CAs never share a name, so a chain can never be built to the wrong one.
            x509.NameAttribute(NameOID.COMMON_NAME, f"virtman CA {secrets.token_hex(4)}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertFiles(cert=cert_path, key=key_path, ca=cert_path)


def issue(
    name: str,
    directory: str,
    ca_dir: str,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = CERT_VALIDITY_DAYS,
) -> CertFiles:
    """Issue ``NAME.crt`` and ``NAME.key`` (0600) in ``directory`` (created 0700 if
    missing), signed by the CA in ``ca_dir``: CN=NAME, one subject alternative name per
    host (an IP address or a DNS name), usable as server and as client certificate.
    An existing pair of that name is replaced.

    Raises ConfigError for a bad name or host, or a CA that cannot be read.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"certificate name {quote(name)} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not hosts:
        raise ConfigError("a certificate needs at least one host (IP address or DNS name)")
    alt_names = [_alt_name(host) for host in hosts]
    ca_cert, ca_key = _load_ca(ca_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtman"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertFiles(cert=cert_path, key=key_path, ca=os.path.join(ca_dir, CA_CERT))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
        re.fullmatch(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)", label)
        for label in labels
    ):
        raise ConfigError(f"host {quote(host)} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _load_ca(ca_dir: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = os.path.join(ca_dir, CA_CERT)
    key_path = os.path.join(ca_dir, CA_KEY)
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as err:
        raise ConfigError(f"no CA in {ca_dir!r}: {err.strerror} ({err.filename})") from err
    except ValueError as err:
        raise ConfigError(f"the CA in {ca_dir!r} does not load: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        # Only our own CAs are loaded here; an existing CA signs with its own tools.
        raise ConfigError(f"the CA key {key_path!r} is not an ECDSA key made by virtman ca init")
    return cert, key


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, data, 0o600)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
