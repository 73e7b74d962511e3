"""NBD_OPT_STARTTLS in the pure codecs, driven with hand-built bytes (no I/O).

The byte tables are packed here with ``struct`` and literal numbers from the NBD
specification, not with the codecs' encoders.
"""

from __future__ import annotations

import struct

import pytest
from nbdwire import IHAVEOPT, feed, opt, opt_reply, u16, u32, u64

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.protocol.nbd import (
    BlockSizes,
    ClientConnection,
    ClientState,
    ExportInfo,
    ExportSelected,
    OptionRefused,
    ServerConnection,
    ServerState,
    TlsRequested,
    TransmissionFlag,
)
from virtman.protocol.nbd.client import HandshakeDone, TlsAccepted

EXPORT_NAME, ABORT, LIST, STARTTLS, INFO_OPT, GO, STRUCTURED_REPLY = 1, 2, 3, 5, 6, 7, 8
LIST_META, SET_META = 9, 10
ACK, INFO = 1, 3
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_TLS_REQD = 0x80000001, 0x80000002, 0x80000003, 0x80000005

DISK = ExportInfo("disk", 1 << 20, TransmissionFlag.HAS_FLAGS, "", BlockSizes(1, 4096, 65536))


def server(tls: bool = True) -> ServerConnection:
    conn = ServerConnection(lambda name: DISK if name in ("", "disk") else None,
                            lambda: ["disk"], tls=tls)
    conn.initiate()
    # Client flags: fixed newstyle + no zeroes.
    assert feed(conn, u32(3)) == ([], b"")
    return conn


def go_data(name: str) -> bytes:
    return u32(len(name)) + name.encode() + u16(0)


# --- server: FORCEDTLS ---------------------------------------------------------------------

# Every option but STARTTLS and ABORT, before TLS: answered TLS_REQD with no other effect.
BEFORE_TLS = [
    (LIST, b""),
    (INFO_OPT, go_data("disk")),
    (GO, go_data("disk")),
    (GO, go_data("nope")),
    (STRUCTURED_REPLY, b""),
    (LIST_META, b"junk"),
    (SET_META, b""),
    (4, b""),  # PEEK_EXPORT, never implemented
    (0x4242, b"xyz"),  # unknown
]


@pytest.mark.parametrize(("option", "data"), BEFORE_TLS)
def test_options_before_starttls_are_tls_reqd(option: int, data: bytes) -> None:
    conn = server()
    events, out = feed(conn, opt(option, data))
    assert out == struct.pack(">QIII", 0x0003E889045565A9, option, ERR_TLS_REQD, 15) + (
        b"TLS is required"
    )
    assert len(events) == 1 and isinstance(events[0], OptionRefused)
    assert conn.state is ServerState.OPTIONS and not conn.structured_replies


def test_oversized_option_before_starttls_is_tls_reqd() -> None:
    conn = ServerConnection(lambda name: DISK, lambda: [], tls=True, max_option_length=16)
    conn.initiate()
    feed(conn, u32(1))
    _, out = feed(conn, opt(LIST, bytes(17)))
    assert out[8:16] == struct.pack(">II", LIST, ERR_TLS_REQD)


def test_export_name_before_starttls_closes() -> None:
    conn = server()
    with pytest.raises(PeerProtocolError, match="EXPORT_NAME before STARTTLS"):
        feed(conn, opt(EXPORT_NAME, b"disk"))
    assert conn.state is ServerState.CLOSED
    assert conn.data_to_send() == b""


def test_abort_before_starttls_is_acknowledged() -> None:
    conn = server()
    _, out = feed(conn, opt(ABORT))
    assert out == opt_reply(ABORT, ACK)
    assert conn.state is ServerState.CLOSED


def test_starttls_then_options_over_tls() -> None:
    conn = server()
    events, out = feed(conn, opt(STARTTLS))
    assert events == [TlsRequested()]
    assert out == bytes.fromhex("0003e889045565a9" "00000005" "00000001" "00000000")
    assert conn.state is ServerState.TLS_HANDSHAKE
    conn.tls_started()
    assert conn.tls_active and conn.state is ServerState.OPTIONS
    # Over TLS the same options work, and no answer is ever TLS_REQD.
    events, out = feed(conn, opt(STRUCTURED_REPLY))
    assert out == opt_reply(STRUCTURED_REPLY, ACK)
    events, out = feed(conn, opt(STARTTLS))
    assert out[8:16] == struct.pack(">II", STARTTLS, ERR_INVALID)
    events, out = feed(conn, opt(GO, go_data("disk")))
    assert isinstance(events[-1], ExportSelected)
    assert out.endswith(opt_reply(GO, ACK))
    assert struct.pack(">I", ERR_TLS_REQD) not in out


def test_export_name_over_tls_works() -> None:
    conn = server()
    feed(conn, opt(STARTTLS))
    conn.tls_started()
    events, out = feed(conn, opt(EXPORT_NAME, b"disk"))
    assert isinstance(events[0], ExportSelected)
    assert out == u64(1 << 20) + u16(TransmissionFlag.HAS_FLAGS)


def test_plaintext_bytes_after_starttls_close() -> None:
    """STARTTLS injection: a GO sent behind STARTTLS in plaintext must not be served."""
    conn = server()
    with pytest.raises(PeerProtocolError, match="plaintext bytes sent after STARTTLS"):
        feed(conn, opt(STARTTLS) + opt(GO, go_data("disk")))
    assert conn.state is ServerState.CLOSED


def test_starttls_with_data_is_invalid() -> None:
    conn = server()
    _, out = feed(conn, opt(STARTTLS, b"x"))
    assert out[8:16] == struct.pack(">II", STARTTLS, ERR_INVALID)
    assert conn.state is ServerState.OPTIONS and not conn.tls_active


def test_starttls_without_tls_is_policy_and_never_tls_reqd() -> None:
    conn = server(tls=False)
    _, out = feed(conn, opt(STARTTLS))
    assert out[8:16] == struct.pack(">II", STARTTLS, ERR_POLICY)
    events, out = feed(conn, opt(GO, go_data("disk")))
    assert isinstance(events[-1], ExportSelected)


def test_tls_started_out_of_turn_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        server().tls_started()


def test_non_fixed_client_cannot_reach_a_tls_server() -> None:
    conn = ServerConnection(lambda name: DISK, lambda: [], tls=True)
    conn.initiate()
    feed(conn, u32(0))
    with pytest.raises(PeerProtocolError):
        feed(conn, opt(EXPORT_NAME, b""))


# --- client ---------------------------------------------------------------------------------

GREETING = b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3)


def test_client_sends_starttls_first_and_waits_for_tls() -> None:
    client = ClientConnection("disk", tls=True, structured_replies=False)
    events, out = feed(client, GREETING)
    assert out == u32(3) + struct.pack(">QII", IHAVEOPT, STARTTLS, 0)
    events, out = feed(client, opt_reply(STARTTLS, ACK))
    assert events == [TlsAccepted()] and out == b""
    assert client.state is ClientState.TLS_HANDSHAKE
    client.tls_started()
    assert client.data_to_send() == opt(GO, u32(4) + b"disk" + u16(1) + u16(3))
    events, _ = feed(client, opt_reply(GO, INFO, u16(0) + u64(4096) + u16(1))
                     + opt_reply(GO, ACK))
    assert isinstance(events[0], HandshakeDone) and events[0].export.size == 4096
    assert client.tls_active


def test_client_listing_over_tls_lists_after_the_handshake() -> None:
    client = ClientConnection(list_exports=True, tls=True)
    feed(client, GREETING)
    feed(client, opt_reply(STARTTLS, ACK))
    client.tls_started()
    assert client.data_to_send() == opt(LIST)


@pytest.mark.parametrize("reply", [ERR_UNSUP, ERR_POLICY, ERR_INVALID])
def test_client_refuses_to_go_on_without_tls(reply: int) -> None:
    client = ClientConnection("disk", tls=True)
    feed(client, GREETING)
    with pytest.raises(PeerProtocolError, match="server refused STARTTLS"):
        feed(client, opt_reply(STARTTLS, reply, b"no"))
    assert client.state is ClientState.CLOSED


def test_client_refuses_plaintext_after_the_ack() -> None:
    client = ClientConnection("disk", tls=True)
    feed(client, GREETING)
    with pytest.raises(PeerProtocolError, match="plaintext bytes after the STARTTLS ACK"):
        feed(client, opt_reply(STARTTLS, ACK) + opt_reply(GO, ACK))


def test_client_without_tls_is_told_tls_is_required() -> None:
    client = ClientConnection("disk")
    feed(client, GREETING)
    with pytest.raises(PeerProtocolError, match="server requires TLS"):
        feed(client, opt_reply(STRUCTURED_REPLY, ERR_TLS_REQD, b"TLS is required"))


def test_codecs_talk_tls_to_each_other() -> None:
    """The two codecs, wired back to back with the TLS step in the middle."""
    srv = ServerConnection(lambda name: DISK if name == "disk" else None, lambda: [], tls=True)
    cli = ClientConnection("disk", tls=True, block_status=True)
    to_client = srv.initiate()
    done = None
    for _ in range(20):
        events, to_server = feed(cli, to_client)
        if any(isinstance(e, TlsAccepted) for e in events):
            cli.tls_started()
            to_server += cli.data_to_send()
        done = next((e for e in events if isinstance(e, HandshakeDone)), done)
        if done:
            break
        events, to_client = feed(srv, to_server)
        if any(isinstance(e, TlsRequested) for e in events):
            srv.tls_started()
    assert done is not None and done.structured_replies and done.base_allocation
    assert srv.tls_active and cli.tls_active
