"""NBD URIs (NetworkBlockDevice/nbd doc/uri.md) and --listen addresses."""

from __future__ import annotations

import pytest

from virtman.errors import ConfigError
from virtman.protocol.uri import NbdAddress, parse_listen, parse_nbd_uri

PARSED = {
    # uri: (address, canonical uri() of that address)
    "nbd://example.com": (NbdAddress("", host="example.com"), "nbd://example.com/"),
    "nbd://example.com/": (NbdAddress("", host="example.com"), "nbd://example.com/"),
    "nbd://example.com/disk": (NbdAddress("disk", host="example.com"), "nbd://example.com/disk"),
    "nbd://example.com:10809/disk": (
        NbdAddress("disk", host="example.com"), "nbd://example.com/disk"),
    "nbd://example.com:1234/disk": (
        NbdAddress("disk", host="example.com", port=1234), "nbd://example.com:1234/disk"),
    "nbd://192.0.2.7:10810/": (
        NbdAddress("", host="192.0.2.7", port=10810), "nbd://192.0.2.7:10810/"),
    "nbd://[::1]/disk": (NbdAddress("disk", host="::1"), "nbd://[::1]/disk"),
    "nbd://[2001:db8::5]:10810/disk": (
        NbdAddress("disk", host="2001:db8::5", port=10810), "nbd://[2001:db8::5]:10810/disk"),
    "nbd://h:/disk": (NbdAddress("disk", host="h"), "nbd://h/disk"),
    "NBD://Example.COM/Disk": (NbdAddress("Disk", host="example.com"), "nbd://example.com/Disk"),
    "nbd://h/hello%20world": (NbdAddress("hello world", host="h"), "nbd://h/hello%20world"),
    "nbd://h//disk": (NbdAddress("/disk", host="h"), "nbd://h/%2Fdisk"),
    "nbd://h/a/b": (NbdAddress("a/b", host="h"), "nbd://h/a%2Fb"),
    "nbd://h/a%2Fb": (NbdAddress("a/b", host="h"), "nbd://h/a%2Fb"),
    "nbd://h/%C3%A9t%C3%A9": (NbdAddress("\u00e9t\u00e9", host="h"), "nbd://h/%C3%A9t%C3%A9"),
    "nbd://h/50%25": (NbdAddress("50%", host="h"), "nbd://h/50%25"),
    "nbd+unix:///disk?socket=/tmp/s.sock": (
        NbdAddress("disk", socket="/tmp/s.sock"), "nbd+unix:///disk?socket=/tmp/s.sock"),
    "nbd+unix:///?socket=/run/nbd.sock": (
        NbdAddress("", socket="/run/nbd.sock"), "nbd+unix:///?socket=/run/nbd.sock"),
    "nbd+unix://?socket=sock": (NbdAddress("", socket="sock"), "nbd+unix:///?socket=sock"),
    "nbd+unix:///my%20disk?socket=/run/a%20b.sock": (
        NbdAddress("my disk", socket="/run/a b.sock"),
        "nbd+unix:///my%20disk?socket=/run/a%20b.sock",
    ),
    "nbd+unix:///d?socket=/s%3Fx%26y": (
        NbdAddress("d", socket="/s?x&y"), "nbd+unix:///d?socket=/s%3Fx%26y"),
    "nbd+unix:///d?socket=%00abstract": (
        NbdAddress("d", socket="\x00abstract"), "nbd+unix:///d?socket=%00abstract"),
    # TLS, as QEMU and libnbd write it.
    "nbds://example.com/disk": (
        NbdAddress("disk", host="example.com", tls=True), "nbds://example.com/disk"),
    "NBDS://h:10810/": (NbdAddress("", host="h", port=10810, tls=True), "nbds://h:10810/"),
    "nbds://[::1]/d?tls-certificates=/etc/pki/libnbd": (
        NbdAddress("d", host="::1", tls=True, tls_certificates="/etc/pki/libnbd"),
        "nbds://[::1]/d?tls-certificates=/etc/pki/libnbd"),
    "nbds://h/d?tls-verify-peer=false&tls-hostname=x": (
        NbdAddress("d", host="h", tls=True), "nbds://h/d"),
    "nbds+unix:///disk?socket=/run/s.sock": (
        NbdAddress("disk", socket="/run/s.sock", tls=True),
        "nbds+unix:///disk?socket=/run/s.sock"),
    "nbds+unix:///disk?socket=/s&tls-certificates=/p%20q": (
        NbdAddress("disk", socket="/s", tls=True, tls_certificates="/p q"),
        "nbds+unix:///disk?socket=/s&tls-certificates=/p%20q"),
}


@pytest.mark.parametrize("uri,address,canonical", [(u, *v) for u, v in PARSED.items()],
                         ids=list(PARSED))
def test_parse_and_print(uri: str, address: NbdAddress, canonical: str) -> None:
    parsed = parse_nbd_uri(uri)
    assert parsed == address
    assert parsed.uri() == canonical
    assert str(parsed) == canonical
    assert parse_nbd_uri(canonical) == address  # the canonical form round-trips
    assert parsed.is_unix is (address.socket is not None)


ADDRESSES = [
    NbdAddress("", host="localhost"),
    NbdAddress("disk", host="::1", port=1),
    NbdAddress("a b/c?d#e%f+g", host="example.com", port=65535),
    NbdAddress("\u00e9\u4e2d", host="fe80::1"),
    NbdAddress("disk", socket="/run/virtman/nbd.sock"),
    NbdAddress("x", socket="/tmp/we ird&=?#+%.sock"),
    NbdAddress("//lead", socket="relative.sock"),
]


@pytest.mark.parametrize("address", ADDRESSES, ids=[a.uri() for a in ADDRESSES])
def test_address_round_trip(address: NbdAddress) -> None:
    assert parse_nbd_uri(address.uri()) == address


def test_plus_in_socket_path_is_literal() -> None:
    assert parse_nbd_uri("nbd+unix:///disk?socket=/tmp/a+b.sock").socket == "/tmp/a+b.sock"


BAD_URIS = [
    "nbd+unix:///disk",  # missing socket
    "nbd+unix:///disk?socket=",
    "nbd+unix:///disk?sock=/s",
    "nbd+unix://host/disk?socket=/s",  # authority on unix
    "nbd+vsock://1:2/disk",
    "nbds+vsock://1:2/disk",
    "nbds+unix:///disk",  # missing socket, TLS or not
    "nbds+unix://host/disk?socket=/s",
    "nbds://h/disk?socket=/s",
    "nbds:///disk",
    "nbds://h/disk?tls-certificates=",  # an empty directory
    "nbd://h/disk?tls-certificates=/etc/pki",  # certificates without TLS
    "http://h/disk",  # unknown scheme
    "nbd+tcp://h/disk",
    "h/disk",
    "",
    "nbd:///disk",  # no host
    "nbd://:10809/disk",
    "nbd://h/disk?socket=/s",  # socket on TCP
    "nbd://h:99999/disk",  # bad port
    "nbd://h:port/disk",
    "nbd://[::1/disk",
]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigError):
        parse_nbd_uri(uri)


def test_vsock_scheme_error_says_why() -> None:
    with pytest.raises(ConfigError, match="no vsock"):
        parse_nbd_uri("nbd+vsock://1:2/disk")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"host": "h", "socket": "/s"}, {"export": "disk"}],
    ids=["neither", "both", "export only"],
)
def test_address_needs_exactly_one_of_host_or_socket(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        NbdAddress(**kwargs)


LISTEN = {
    "0.0.0.0:10809": ("0.0.0.0", 10809),
    "localhost:0": ("localhost", 0),
    "example.com:65535": ("example.com", 65535),
    "[::1]:10809": ("::1", 10809),
    "[::]:1": ("::", 1),
}


@pytest.mark.parametrize("text,expected", LISTEN.items(), ids=list(LISTEN))
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["10809", ":10809", "host", "host:", "host:port", "host:65536", "host:-1", ""]
)
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text)
