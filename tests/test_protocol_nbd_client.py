"""ClientConnection driven with hand-built server bytes (no I/O, no mocks)."""

from __future__ import annotations

import struct

import pytest
from nbdwire import (
    DONE,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    chunk,
    drain,
    feed,
    opt,
    opt_reply,
    u16,
    u32,
    u64,
)

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.protocol.nbd import (
    NEED_DATA,
    BlockSizes,
    ClientConnection,
    ClientState,
    Command,
    CommandFlag,
    ExportInfo,
    TransmissionFlag,
)
from virtman.protocol.nbd.client import ExportsListed, HandshakeDone, ReplyReceived, errno_name

# --- wire helpers (independent of the codec's encoders) ------------------------------------


EXPORT_NAME, ABORT, LIST, GO, STRUCTURED_REPLY = 1, 2, 3, 7, 8
ACK, SERVER, INFO = 1, 2, 3
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = 0x80000001, 0x80000002, 0x80000003, 0x80000006
T_NONE, T_DATA, T_HOLE, T_BLOCK_STATUS = 0, 1, 2, 5
T_ERROR, T_ERROR_OFFSET = 0x8001, 0x8002
EIO, EINVAL, ENOSPC = 5, 22, 28


def greeting(flags: int = 3) -> bytes:
    return b"NBDMAGIC" + b"IHAVEOPT" + u16(flags)


def go_data(name: str, infos: tuple[int, ...]) -> bytes:
    raw = name.encode()
    return u32(len(raw)) + raw + u16(len(infos)) + b"".join(u16(i) for i in infos)


def info_export(size: int, flags: int) -> bytes:
    return opt_reply(GO, INFO, u16(0) + u64(size) + u16(flags))


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return opt_reply(GO, INFO, u16(3) + u32(minimum) + u32(preferred) + u32(maximum))


def req(command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)


def simple(error: int, cookie: int, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie) + data


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return chunk(flags, T_DATA, cookie, u64(offset) + data)


def hole_chunk(cookie: int, offset: int, size: int, flags: int = 0) -> bytes:
    return chunk(flags, T_HOLE, cookie, u64(offset) + u32(size))


def error_chunk(cookie: int, errno: int, message: str = "", flags: int = DONE) -> bytes:
    text = message.encode()
    return chunk(flags, T_ERROR, cookie, u32(errno) + u16(len(text)) + text)




SIZE = 1 << 20
FLAGS = 0x6D  # HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES


def in_transmission(structured: bool = True) -> ClientConnection:
    client = ClientConnection("disk", structured_replies=structured)
    stream = greeting()
    if structured:
        stream += opt_reply(STRUCTURED_REPLY, ACK)
    stream += info_export(SIZE, FLAGS) + opt_reply(GO, ACK)
    events, _ = feed(client, stream)
    assert [type(e) for e in events] == [HandshakeDone]
    assert client.state is ClientState.TRANSMISSION
    return client


# --- greeting -----------------------------------------------------------------------------


def test_greeting_answered_with_flags_and_structured_reply() -> None:
    client = ClientConnection("disk")
    assert client.state is ClientState.AWAIT_GREETING
    assert client.next_event() is NEED_DATA
    events, out = feed(client, greeting(3))
    assert events == []
    assert out == bytes.fromhex("0000000349484156454f50540000000800000000")
    assert client.state is ClientState.OPTIONS
    assert client.no_zeroes is True


def test_greeting_without_no_zeroes() -> None:
    client = ClientConnection("disk")
    _, out = feed(client, greeting(1))
    assert out == u32(1) + opt(STRUCTURED_REPLY)
    assert client.no_zeroes is False


def test_greeting_unknown_handshake_flags_ignored() -> None:
    client = ClientConnection("disk")
    _, out = feed(client, greeting(0xFFFF))
    assert out == u32(3) + opt(STRUCTURED_REPLY)


def test_greeting_byte_by_byte() -> None:
    client = ClientConnection("disk")
    data = greeting()
    for i in range(len(data) - 1):
        assert feed(client, data[i : i + 1]) == ([], b"")
    assert feed(client, data[-1:]) == ([], u32(3) + opt(STRUCTURED_REPLY))


@pytest.mark.parametrize(
    "data",
    [
        b"NBDMAGIX" + b"IHAVEOPT" + u16(3),
        b"NBDMAGIC" + u64(0x00420281861253) + u16(3),  # oldstyle
        greeting(0),  # not fixed newstyle
        greeting(2),
    ],
)
def test_bad_greeting(data: bytes) -> None:
    client = ClientConnection("disk")
    client.receive_data(data)
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


# --- handshake ----------------------------------------------------------------------------


def test_full_handshake_structured_go() -> None:
    client = ClientConnection("disk")
    feed(client, greeting())
    events, out = feed(client, opt_reply(STRUCTURED_REPLY, ACK))
    assert events == []
    # GO naming the export and asking for block sizes (info type 3).
    assert out == opt(GO, go_data("disk", (3,)))
    assert out == bytes.fromhex("49484156454f5054000000070000000c000000046469736b00010003")
    replies = (
        opt_reply(GO, INFO, u16(1) + b"disk")  # NAME: not asked for, ignored
        + info_block_size(512, 4096, 1 << 20)
        + info_export(SIZE, FLAGS)
        + opt_reply(GO, INFO, u16(99) + b"future info type")
    )
    assert feed(client, replies) == ([], b"")
    events, out = feed(client, opt_reply(GO, ACK))
    expected = ExportInfo(
        "disk", SIZE, TransmissionFlag(FLAGS), block_sizes=BlockSizes(512, 4096, 1 << 20)
    )
    assert events == [HandshakeDone(expected, True)]
    assert out == b""
    assert client.state is ClientState.TRANSMISSION
    assert client.structured_replies is True
    assert client.export == expected
    assert client.export.read_only is False


def test_handshake_whole_in_one_read() -> None:
    client = ClientConnection("")
    stream = (
        greeting()
        + opt_reply(STRUCTURED_REPLY, ACK)
        + info_export(65536, 0x03)
        + opt_reply(GO, ACK)
    )
    events, out = feed(client, stream)
    assert events == [HandshakeDone(ExportInfo("", 65536, TransmissionFlag(3)), True)]
    assert out == u32(3) + opt(STRUCTURED_REPLY) + opt(GO, go_data("", (3,)))
    assert client.export is not None and client.export.read_only is True
    assert client.export.block_sizes == BlockSizes()  # no BLOCK_SIZE info: defaults


def test_handshake_without_asking_for_structured_replies() -> None:
    client = ClientConnection("disk", structured_replies=False)
    events, out = feed(client, greeting())
    assert out == u32(3) + opt(GO, go_data("disk", (3,)))
    events, _ = feed(client, info_export(SIZE, FLAGS) + opt_reply(GO, ACK))
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), False)]


@pytest.mark.parametrize("error", [ERR_UNSUP, ERR_POLICY, ERR_INVALID])
def test_server_refusing_structured_replies_falls_back(error: int) -> None:
    client = ClientConnection("disk")
    feed(client, greeting())
    events, out = feed(client, opt_reply(STRUCTURED_REPLY, error, b"no thanks"))
    assert events == []
    assert out == opt(GO, go_data("disk", (3,)))
    events, _ = feed(client, info_export(SIZE, FLAGS) + opt_reply(GO, ACK))
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), False)]
    assert client.structured_replies is False


def test_go_unsupported_falls_back_to_export_name_with_no_zeroes() -> None:
    client = ClientConnection("disk", structured_replies=False)
    feed(client, greeting(3))
    events, out = feed(client, opt_reply(GO, ERR_UNSUP))
    assert events == []
    assert out == opt(EXPORT_NAME, b"disk")
    assert out == bytes.fromhex("49484156454f505400000001000000046469736b")
    assert feed(client, u64(SIZE)) == ([], b"")
    events, out = feed(client, u16(FLAGS))
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), False)]
    assert out == b""
    assert client.state is ClientState.TRANSMISSION


def test_go_unsupported_falls_back_to_export_name_without_no_zeroes() -> None:
    client = ClientConnection("disk", structured_replies=False)
    feed(client, greeting(1))
    _, out = feed(client, opt_reply(GO, ERR_UNSUP))
    assert out == opt(EXPORT_NAME, b"disk")
    # 10 bytes are not enough: 124 zero bytes of padding follow.
    assert feed(client, u64(SIZE) + u16(FLAGS)) == ([], b"")
    assert feed(client, bytes(123)) == ([], b"")
    # The last padding byte plus the start of the first reply.
    events, _ = feed(client, bytes(1) + simple(0, 1)[:3])
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), False)]
    cookie, _ = client.request(Command.FLUSH)
    events, _ = feed(client, simple(0, 1)[3:])
    assert events == [ReplyReceived(cookie, 0)]


def test_go_unsupported_after_structured_refused() -> None:
    client = ClientConnection("disk")
    feed(client, greeting(3))
    feed(client, opt_reply(STRUCTURED_REPLY, ERR_UNSUP))
    _, out = feed(client, opt_reply(GO, ERR_UNSUP))
    assert out == opt(EXPORT_NAME, b"disk")
    events, _ = feed(client, u64(SIZE) + u16(FLAGS))
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), False)]


def test_structured_replies_kept_after_export_name_fallback() -> None:
    client = ClientConnection("disk")
    feed(client, greeting(3))
    feed(client, opt_reply(STRUCTURED_REPLY, ACK))
    feed(client, opt_reply(GO, ERR_UNSUP))
    events, _ = feed(client, u64(SIZE) + u16(FLAGS))
    assert events == [HandshakeDone(ExportInfo("disk", SIZE, TransmissionFlag(FLAGS)), True)]
    assert client.structured_replies is True


@pytest.mark.parametrize("error", [ERR_UNKNOWN, ERR_POLICY, ERR_INVALID, 0x80001234])
def test_go_refused_is_fatal(error: int) -> None:
    client = ClientConnection("nope")
    feed(client, greeting())
    feed(client, opt_reply(STRUCTURED_REPLY, ACK))
    client.receive_data(opt_reply(GO, error, b"no such export"))
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


BAD_GO = {
    "ack without export info": opt_reply(GO, ACK),
    "export info too short": opt_reply(GO, INFO, u16(0) + u64(SIZE)) + opt_reply(GO, ACK),
    "info too short": opt_reply(GO, INFO, b"\x00"),
    "block size wrong length": (
        info_export(SIZE, FLAGS) + opt_reply(GO, INFO, u16(3) + u32(1)) + opt_reply(GO, ACK)
    ),
    "block size not power of two": (
        info_export(SIZE, FLAGS) + info_block_size(3, 4096, 65536) + opt_reply(GO, ACK)
    ),
    "unexpected reply type": opt_reply(GO, SERVER, u32(0)),
    "reply to another option": opt_reply(LIST, ACK),
    "bad reply magic": struct.pack(">QIII", 0x0003E889045565AA, GO, ACK, 0),
    "reply too long": struct.pack(">QIII", OPT_REPLY_MAGIC, GO, INFO, 64 * 1024 + 1),
}


@pytest.mark.parametrize("data", BAD_GO.values(), ids=BAD_GO.keys())
def test_bad_go_replies(data: bytes) -> None:
    client = ClientConnection("disk", structured_replies=False)
    feed(client, greeting())
    client.receive_data(data)
    with pytest.raises(PeerProtocolError):
        drain(client)
    assert client.state is ClientState.CLOSED


def test_export_name_over_the_protocol_limit_is_ours_to_refuse() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the protocol's 4096"):
        ClientConnection("x" * 4097)


def test_unexpected_reply_to_structured_reply() -> None:
    client = ClientConnection("disk")
    feed(client, greeting())
    client.receive_data(opt_reply(STRUCTURED_REPLY, SERVER, u32(0)))
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


def test_errno_name() -> None:
    assert [errno_name(e) for e in (0, 1, 5, 22, 28, 108, 999)] == [
        "OK",
        "EPERM",
        "EIO",
        "EINVAL",
        "ENOSPC",
        "ESHUTDOWN",
        "999",
    ]


def test_request_before_handshake_is_local_error() -> None:
    client = ClientConnection("disk")
    with pytest.raises(LocalProtocolError):
        client.request(Command.READ, 0, 512)


# --- LIST ---------------------------------------------------------------------------------


def test_list_exports() -> None:
    client = ClientConnection(list_exports=True)
    events, out = feed(client, greeting())
    assert (events, out) == ([], u32(3) + opt(LIST))
    replies = (
        opt_reply(LIST, SERVER, u32(4) + b"disk")
        + opt_reply(LIST, SERVER, u32(2) + b"ro" + b"a description")
        + opt_reply(LIST, SERVER, u32(0))
    )
    assert feed(client, replies) == ([], b"")
    events, out = feed(client, opt_reply(LIST, ACK))
    assert events == [ExportsListed(["disk", "ro", ""])]
    assert out == opt(ABORT)
    assert out == bytes.fromhex("49484156454f50540000000200000000")
    assert client.state is ClientState.CLOSED


def test_list_empty() -> None:
    client = ClientConnection(list_exports=True)
    events, _ = feed(client, greeting() + opt_reply(LIST, ACK))
    assert events == [ExportsListed([])]


@pytest.mark.parametrize(
    "data",
    [
        opt_reply(LIST, SERVER, b"\x00\x00"),
        opt_reply(LIST, SERVER, u32(5) + b"disk"),
        opt_reply(LIST, INFO, u16(0)),
        opt_reply(LIST, ERR_POLICY),
    ],
    ids=["short", "name past data", "wrong reply type", "refused"],
)
def test_bad_list_replies(data: bytes) -> None:
    client = ClientConnection(list_exports=True)
    feed(client, greeting())
    client.receive_data(data)
    with pytest.raises(PeerProtocolError):
        client.next_event()


# --- transmission: requests ---------------------------------------------------------------


def test_request_headers_exact() -> None:
    client = in_transmission()
    cookie, header = client.request(Command.READ, 0x1000, 512)
    assert cookie == 1
    assert header == bytes.fromhex("25609513000000000000000000000001000000000000100000000200")
    cookie, header = client.request(Command.WRITE, 0, 4, CommandFlag.FUA, data=b"abcd")
    assert cookie == 2
    assert header == req(Command.WRITE, 2, 0, 4, CommandFlag.FUA)  # the data is sent by the caller
    cookie, header = client.request(Command.FLUSH)
    assert (cookie, header) == (3, req(Command.FLUSH, 3))
    assert client.in_flight == 3
    assert client.data_to_send() == b""


def test_request_data_checks() -> None:
    client = in_transmission()
    with pytest.raises(LocalProtocolError):
        client.request(Command.WRITE, 0, 4, data=b"abc")
    with pytest.raises(LocalProtocolError):
        client.request(Command.WRITE, 0, 4)
    with pytest.raises(LocalProtocolError):
        client.request(Command.READ, 0, 4, data=b"abcd")
    assert client.in_flight == 0


def test_disc_closes_and_is_not_outstanding() -> None:
    client = in_transmission()
    cookie, header = client.request(Command.DISC)
    assert header == req(Command.DISC, cookie)
    assert client.in_flight == 0
    assert client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        client.request(Command.READ, 0, 512)


# --- transmission: simple replies ---------------------------------------------------------


def test_out_of_order_simple_replies() -> None:
    client = in_transmission(structured=False)
    c1, _ = client.request(Command.READ, 0, 4)
    c2, _ = client.request(Command.WRITE, 0, 2, data=b"xy")
    c3, _ = client.request(Command.READ, 100, 2)
    c4, _ = client.request(Command.READ, 200, 8)
    events, out = feed(
        client, simple(0, c3, b"zz") + simple(0, c2) + simple(EIO, c4) + simple(0, c1, b"abcd")
    )
    assert events == [
        ReplyReceived(c3, 0, b"zz"),
        ReplyReceived(c2, 0),
        ReplyReceived(c4, EIO),  # an error READ reply carries no data
        ReplyReceived(c1, 0, b"abcd"),
    ]
    assert out == b""
    assert client.in_flight == 0


def test_simple_replies_byte_by_byte() -> None:
    client = in_transmission(structured=False)
    c1, _ = client.request(Command.READ, 0, 6)
    c2, _ = client.request(Command.TRIM, 0, 512)
    stream = simple(0, c1, b"abcdef") + simple(ENOSPC, c2)
    events: list[object] = []
    for i in range(len(stream)):
        events += feed(client, stream[i : i + 1])[0]
    assert events == [ReplyReceived(c1, 0, b"abcdef"), ReplyReceived(c2, ENOSPC)]


def test_simple_reply_for_unknown_cookie() -> None:
    client = in_transmission(structured=False)
    cookie, _ = client.request(Command.FLUSH)
    client.receive_data(simple(0, cookie + 1))
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


def test_reply_for_answered_cookie() -> None:
    client = in_transmission(structured=False)
    cookie, _ = client.request(Command.FLUSH)
    assert feed(client, simple(0, cookie))[0] == [ReplyReceived(cookie, 0)]
    client.receive_data(simple(0, cookie))
    with pytest.raises(PeerProtocolError):
        client.next_event()


@pytest.mark.parametrize("structured", [False, True])
def test_bad_reply_magic(structured: bool) -> None:
    client = in_transmission(structured)
    client.request(Command.FLUSH)
    client.receive_data(struct.pack(">IIQ", 0x67446699, 0, 1))
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


# --- transmission: structured replies -----------------------------------------------------


def test_structured_read_single_chunk() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.READ, 4096, 8)
    events, _ = feed(client, data_chunk(cookie, 4096, b"01234567", DONE))
    assert events == [ReplyReceived(cookie, 0, b"01234567")]


@pytest.mark.parametrize("final", ["none chunk", "done on last content chunk"])
def test_structured_read_assembled_from_data_and_hole_chunks(final: str) -> None:
    client = in_transmission()
    base = 1024
    cookie, _ = client.request(Command.READ, base, 4096)
    a, b = b"A" * 1024, b"B" * 512
    chunks = [
        data_chunk(cookie, base + 2048, b),
        hole_chunk(cookie, base, 1024),
        data_chunk(cookie, base + 1024, a),
        hole_chunk(cookie, base + 3072, 1024),
        data_chunk(cookie, base + 2560, b"C" * 512),
    ]
    if final == "none chunk":
        chunks.append(chunk(DONE, T_NONE, cookie))
    else:
        chunks[-1] = data_chunk(cookie, base + 2560, b"C" * 512, DONE)
    for c in chunks[:-1]:
        assert feed(client, c) == ([], b"")
    events, _ = feed(client, chunks[-1])
    assert events == [ReplyReceived(cookie, 0, bytes(1024) + a + b + b"C" * 512 + bytes(1024))]
    assert client.in_flight == 0


def test_structured_read_only_holes_reads_zeros() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.READ, 0, 1024)
    events, _ = feed(client, hole_chunk(cookie, 512, 512) + hole_chunk(cookie, 0, 512, DONE))
    assert events == [ReplyReceived(cookie, 0, bytes(1024))]


def test_out_of_order_interleaved_structured_replies() -> None:
    client = in_transmission()
    c1, _ = client.request(Command.READ, 0, 8)
    c2, _ = client.request(Command.READ, 8, 8)
    c3, _ = client.request(Command.WRITE, 0, 1, data=b"x")
    c4, _ = client.request(Command.FLUSH)
    stream = (
        data_chunk(c1, 0, b"aaaa")
        + data_chunk(c2, 12, b"dddd")
        + chunk(DONE, T_NONE, c3)
        + data_chunk(c2, 8, b"cccc", DONE)
        + simple(0, c4)  # a simple reply without payload is allowed for non-READ commands
        + data_chunk(c1, 4, b"bbbb")
        + chunk(DONE, T_NONE, c1)
    )
    events, _ = feed(client, stream)
    assert events == [
        ReplyReceived(c3, 0),
        ReplyReceived(c2, 0, b"ccccdddd"),
        ReplyReceived(c4, 0),
        ReplyReceived(c1, 0, b"aaaabbbb"),
    ]
    assert client.in_flight == 0


def test_structured_chunks_byte_by_byte() -> None:
    client = in_transmission()
    c1, _ = client.request(Command.READ, 0, 16)
    c2, _ = client.request(Command.TRIM, 0, 16)
    stream = (
        data_chunk(c1, 8, b"89abcdef")
        + error_chunk(c2, EIO, "trim failed")
        + hole_chunk(c1, 0, 8, DONE)
    )
    events: list[object] = []
    for i in range(len(stream)):
        events += feed(client, stream[i : i + 1])[0]
    assert events == [
        ReplyReceived(c2, EIO, b"", "trim failed"),
        ReplyReceived(c1, 0, bytes(8) + b"89abcdef"),
    ]


def test_error_chunk_for_read() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.READ, 0, 1024)
    events, _ = feed(
        client, data_chunk(cookie, 0, bytes(512)) + error_chunk(cookie, EIO, "disk on fire")
    )
    assert events == [ReplyReceived(cookie, EIO, b"", "disk on fire")]


def test_error_offset_chunk_then_none() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.READ, 0, 1024)
    payload = u32(EIO) + u16(3) + b"bad" + u64(512)
    events, _ = feed(
        client,
        data_chunk(cookie, 0, bytes(512))
        + chunk(0, T_ERROR_OFFSET, cookie, payload)
        + chunk(DONE, T_NONE, cookie),
    )
    assert events == [ReplyReceived(cookie, EIO, b"", "bad")]


def test_unknown_error_chunk_type_is_an_error() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.WRITE, 0, 1, data=b"x")
    events, _ = feed(client, chunk(DONE, 0x8123, cookie, u32(ENOSPC) + u16(0)))
    assert events == [ReplyReceived(cookie, ENOSPC)]


def test_first_error_wins() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.WRITE_ZEROES, 0, 512)
    events, _ = feed(
        client, error_chunk(cookie, ENOSPC, "first", 0) + error_chunk(cookie, EIO, "second")
    )
    assert [(e.cookie, e.error) for e in events] == [(cookie, ENOSPC)]


def test_block_status_chunk() -> None:
    client = in_transmission()
    cookie, _ = client.request(Command.BLOCK_STATUS, 0, 1 << 20)
    payload = u32(1) + u32(4096) + u32(0) + u32(8192) + u32(3)
    events, _ = feed(client, chunk(DONE, T_BLOCK_STATUS, cookie, payload))
    assert events == [ReplyReceived(cookie, 0, extents=[(4096, 0), (8192, 3)])]


def test_structured_reply_for_unknown_cookie() -> None:
    client = in_transmission()
    client.request(Command.READ, 0, 8)
    client.receive_data(data_chunk(99, 0, b"01234567", DONE))
    with pytest.raises(PeerProtocolError):
        client.next_event()
    assert client.state is ClientState.CLOSED


BAD_CHUNKS = {
    # name: (command, offset, length, chunk bytes with cookie 1)
    "data before the request": (Command.READ, 512, 512, data_chunk(1, 0, bytes(512), DONE)),
    "data past the request": (Command.READ, 0, 512, data_chunk(1, 256, bytes(512), DONE)),
    "data longer than the request": (Command.READ, 0, 4, data_chunk(1, 0, bytes(8), DONE)),
    "data chunk too short": (Command.READ, 0, 4, chunk(DONE, T_DATA, 1, bytes(4))),
    "hole past the request": (Command.READ, 0, 512, hole_chunk(1, 0, 1024, DONE)),
    "hole of wrong length": (Command.READ, 0, 512, chunk(DONE, T_HOLE, 1, u64(0) + u16(1))),
    "data chunk for a write": (Command.WRITE, 0, 1, data_chunk(1, 0, b"x", DONE)),
    "hole chunk for a trim": (Command.TRIM, 0, 512, hole_chunk(1, 0, 512, DONE)),
    "none chunk not final": (Command.FLUSH, 0, 0, chunk(0, T_NONE, 1)),
    "none chunk with payload": (Command.FLUSH, 0, 0, chunk(DONE, T_NONE, 1, b"x")),
    "unknown chunk type": (Command.FLUSH, 0, 0, chunk(DONE, 3, 1)),
    "error chunk too short": (Command.FLUSH, 0, 0, chunk(DONE, T_ERROR, 1, u32(EIO))),
    "error chunk with errno 0": (Command.FLUSH, 0, 0, chunk(DONE, T_ERROR, 1, u32(0) + u16(0))),
    "block status too short": (
        Command.BLOCK_STATUS,
        0,
        512,
        chunk(DONE, T_BLOCK_STATUS, 1, u32(1) + u32(512)),
    ),
    "block status ragged": (
        Command.BLOCK_STATUS,
        0,
        512,
        chunk(DONE, T_BLOCK_STATUS, 1, u32(1) + bytes(12)),
    ),
    "error chunk over the size limit": (
        Command.FLUSH,
        0,
        0,
        chunk(DONE, T_ERROR, 1, u32(EIO) + u16(0) + bytes(5000)),
    ),
}


@pytest.mark.parametrize("command,offset,length,data", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_bad_chunks_are_fatal(command: int, offset: int, length: int, data: bytes) -> None:
    client = in_transmission()
    payload = bytes(length) if command == Command.WRITE else None
    cookie, _ = client.request(command, offset, length, data=payload)
    assert cookie == 1
    client.receive_data(data)
    with pytest.raises(PeerProtocolError):
        drain(client)
    assert client.state is ClientState.CLOSED
