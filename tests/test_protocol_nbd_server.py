"""ServerConnection driven with hand-built client bytes (no I/O, no mocks).

Every message below is packed here with ``struct`` and literal magic numbers, not with
the codec's own encoders, so a wrong constant or layout in the codec shows up.
"""

from __future__ import annotations

import struct

import pytest
from nbdwire import (
    DONE,
    IHAVEOPT,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    STRUCTURED_MAGIC,
    chunk,
    feed,
    meta_data,
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
    ClientDisconnected,
    Command,
    CommandFlag,
    Errno,
    ExportInfo,
    ExportSelected,
    Option,
    OptionRefused,
    Reply,
    Request,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    ServerState,
    TransmissionFlag,
)
from virtman.protocol.nbd.constants import ClientFlag
from virtman.protocol.nbd.messages import (
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST_HEADER,
    SIMPLE_REPLY_HEADER,
    STRUCTURED_HEADER,
    encode_info_export,
    encode_name_and_infos,
    encode_option,
    encode_option_reply,
)

# --- wire helpers (independent of the codec's encoders) ------------------------------------


ACK, SERVER, INFO, META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000001, 0x80000003, 0x80000006, 0x80000009
T_NONE, T_DATA, T_BLOCK_STATUS, T_ERROR = 0, 1, 5, 0x8001


def go_data(name: str | bytes, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return u32(len(raw)) + raw + u16(len(infos)) + b"".join(u16(i) for i in infos)


def req(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + data


def simple(error: int, cookie: int) -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie)


def info_export(size: int, flags: int) -> bytes:
    return u16(0) + u64(size) + u16(flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return u16(3) + u32(minimum) + u32(preferred) + u32(maximum)


def split_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Parse a run of option replies into (option, reply type, payload)."""
    out = []
    while data:
        magic, option, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPT_REPLY_MAGIC
        out.append((option, reply, data[20 : 20 + length]))
        assert len(data) >= 20 + length
        data = data[20 + length :]
    return out


def parse_structured_error(data: bytes) -> tuple[int, int, int, int, str]:
    """(flags, type, cookie, errno, message) of one whole structured error chunk."""
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", data)
    assert magic == STRUCTURED_MAGIC
    assert len(data) == 20 + length
    errno, mlen = struct.unpack_from(">IH", data, 20)
    assert mlen == length - 6
    return flags, kind, cookie, errno, data[26 : 26 + mlen].decode()


# --- the export catalogue ----------------------------------------------------------------

F = TransmissionFlag
DISK_FLAGS = F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES  # 0x6d
DISK = ExportInfo("disk", 1 << 20, DISK_FLAGS, "the test disk", BlockSizes(1, 4096, 65536))
RO_FLAGS = F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH  # 0x07
RO = ExportInfo("ro", 65536, RO_FLAGS, "", BlockSizes(1, 4096, 65536))
ALIGNED = ExportInfo(
    "aligned",
    65536,
    F.HAS_FLAGS | F.SEND_WRITE_ZEROES | F.SEND_FAST_ZERO,
    "",
    BlockSizes(512, 4096, 32768),
)
TINY = ExportInfo("tiny", 8192, F.HAS_FLAGS | F.SEND_FLUSH, "", BlockSizes(1, 512, 1024))
EXPORTS = {"": DISK, "disk": DISK, "ro": RO, "aligned": ALIGNED, "tiny": TINY}
NAMES = ["disk", "ro", "aligned", "tiny"]


def make_server(**kwargs: int) -> ServerConnection:
    return ServerConnection(EXPORTS.get, lambda: list(NAMES), **kwargs)




def in_options(client_flags: int = 3) -> ServerConnection:
    server = make_server()
    server.initiate()
    assert feed(server, u32(client_flags)) == ([], b"")
    assert server.state is ServerState.OPTIONS
    return server


def in_transmission(
    export: str = "disk", *, structured: bool = False, meta: bool = False
) -> ServerConnection:
    server = in_options()
    data = b""
    if structured:
        data += opt(Option.STRUCTURED_REPLY)
    if meta:
        data += opt(Option.SET_META_CONTEXT, meta_data(export, ["base:allocation"]))
    data += opt(Option.GO, go_data(export))
    events, _ = feed(server, data)
    assert events == [ExportSelected(EXPORTS[export], structured)]
    assert server.state is ServerState.TRANSMISSION
    return server


def go_replies(option: int, export: ExportInfo, flags: int) -> bytes:
    """What the server answers to INFO/GO with no information requests."""
    bs = export.block_sizes
    return (
        opt_reply(option, INFO, info_block_size(bs.minimum, bs.preferred, bs.maximum))
        + opt_reply(option, INFO, info_export(export.size, flags))
        + opt_reply(option, ACK)
    )


# --- greeting and client flags ------------------------------------------------------------


def test_greeting_bytes_exact() -> None:
    server = make_server()
    assert server.initiate() == bytes.fromhex("4e42444d4147494349484156454f50540003")
    assert server.initiate() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert server.state is ServerState.AWAIT_CLIENT_FLAGS
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b""


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags: int) -> None:
    server = make_server()
    server.initiate()
    server.receive_data(u32(flags)[:3])
    assert server.next_event() is NEED_DATA
    assert server.state is ServerState.AWAIT_CLIENT_FLAGS
    server.receive_data(u32(flags)[3:])
    assert server.next_event() is NEED_DATA
    assert server.state is ServerState.OPTIONS
    assert server.client_flags == ClientFlag(flags)
    assert server.data_to_send() == b""


@pytest.mark.parametrize("flags", [1 << 2, 3 | 1 << 5, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_close_the_connection(flags: int) -> None:
    server = make_server()
    server.initiate()
    server.receive_data(u32(flags))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED


def test_bad_option_magic_is_fatal() -> None:
    server = in_options()
    server.receive_data(struct.pack(">QII", 0x1122334455667788, Option.LIST, 0))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED


def test_client_without_fixed_newstyle_may_only_send_export_name() -> None:
    server = in_options(client_flags=0)
    server.receive_data(opt(Option.LIST))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED

    server = in_options(client_flags=0)
    events, out = feed(server, opt(Option.EXPORT_NAME, b"disk"))
    assert events == [ExportSelected(DISK, False)]
    assert out == u64(1 << 20) + u16(0x6D) + bytes(124)


# --- LIST ---------------------------------------------------------------------------------


def test_list_exact_bytes() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.LIST))
    assert events == []
    assert out == (
        opt_reply(3, SERVER, u32(4) + b"disk")
        + opt_reply(3, SERVER, u32(2) + b"ro")
        + opt_reply(3, SERVER, u32(7) + b"aligned")
        + opt_reply(3, SERVER, u32(4) + b"tiny")
        + opt_reply(3, ACK)
    )
    assert server.state is ServerState.OPTIONS


def test_list_with_data_is_invalid_and_connection_goes_on() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.LIST, b"x") + opt(Option.LIST))
    assert len(events) == 1
    assert isinstance(events[0], OptionRefused)
    assert (events[0].option, events[0].reply) == (3, Reply.ERR_INVALID)
    replies = split_option_replies(out)
    assert replies[0][:2] == (3, ERR_INVALID)
    assert replies[-1] == (3, ACK, b"")
    assert len(replies) == 1 + len(NAMES) + 1


# --- INFO and GO --------------------------------------------------------------------------


def test_info_without_requests_exact_bytes_and_stays_in_options() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.INFO, go_data("disk")))
    assert events == []
    assert out == go_replies(6, DISK, 0x6D)
    assert out == bytes.fromhex(
        "0003e889045565a9"
        "00000006"
        "00000003"
        "0000000e"
        "0003"
        "00000001"
        "00001000"
        "00010000"
        "0003e889045565a9"
        "00000006"
        "00000003"
        "0000000c"
        "0000"
        "0000000000100000"
        "006d"
        "0003e889045565a9"
        "00000006"
        "00000001"
        "00000000"
    )
    assert server.state is ServerState.OPTIONS
    assert server.export is None


def test_info_with_name_and_description_requests() -> None:
    server = in_options()
    # 1 = NAME, 2 = DESCRIPTION, 3 = BLOCK_SIZE, 99 = unknown (must be ignored)
    events, out = feed(server, opt(Option.INFO, go_data("", (1, 2, 3, 99))))
    assert events == []
    assert out == (
        opt_reply(6, INFO, u16(1) + b"disk")
        + opt_reply(6, INFO, u16(2) + b"the test disk")
        + go_replies(6, DISK, 0x6D)
    )


def test_info_description_omitted_when_export_has_none() -> None:
    server = in_options()
    _, out = feed(server, opt(Option.INFO, go_data("ro", (2,))))
    assert out == go_replies(6, RO, int(RO.flags))


def test_go_default_export_enters_transmission() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.GO, go_data("")))
    assert events == [ExportSelected(DISK, False)]
    assert out == go_replies(7, DISK, 0x6D)
    assert server.state is ServerState.TRANSMISSION
    assert server.export == DISK


def test_go_with_block_size_request_and_structured_replies() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.STRUCTURED_REPLY) + opt(Option.GO, go_data("disk", (3,))))
    assert events == [ExportSelected(DISK, True)]
    # SEND_DF (0x80) is added once structured replies are on.
    assert out == opt_reply(8, ACK) + go_replies(7, DISK, 0x6D | 0x80)
    assert server.structured_replies is True


def test_info_then_go_gives_the_same_information() -> None:
    server = in_options()
    _, info_out = feed(server, opt(Option.INFO, go_data("ro", (3,))))
    events, go_out = feed(server, opt(Option.GO, go_data("ro", (3,))))
    assert events == [ExportSelected(RO, False)]
    assert [r[1:] for r in split_option_replies(info_out)] == [
        r[1:] for r in split_option_replies(go_out)
    ]


@pytest.mark.parametrize("option", [Option.INFO, Option.GO])
def test_info_go_unknown_export(option: Option) -> None:
    server = in_options()
    events, out = feed(server, opt(option, go_data("nope", (3,))))
    assert len(events) == 1
    assert isinstance(events[0], OptionRefused)
    assert (events[0].option, events[0].reply) == (option, Reply.ERR_UNKNOWN)
    replies = split_option_replies(out)
    assert [(o, r) for o, r, _ in replies] == [(option, ERR_UNKNOWN)]  # no INFO before it
    assert server.state is ServerState.OPTIONS
    # The connection goes on: a good GO still works.
    events, _ = feed(server, opt(Option.GO, go_data("disk")))
    assert events == [ExportSelected(DISK, False)]


BAD_GO_DATA = {
    "empty": b"",
    "five bytes": b"\x00\x00\x00\x00\x00",
    "name length past the data": u32(10) + b"disk" + u16(0),
    "name length over 4096": u32(5000) + bytes(5000) + u16(0),
    "count says two, one given": u32(4) + b"disk" + u16(2) + u16(3),
    "count says zero, one given": u32(4) + b"disk" + u16(0) + u16(3),
    "odd trailing byte": go_data("disk", (3,)) + b"\x00",
    "name not utf-8": go_data(b"\xff\xfe"),
    "name with NUL": go_data(b"di\x00sk"),
}


@pytest.mark.parametrize("option", [Option.INFO, Option.GO])
@pytest.mark.parametrize("data", BAD_GO_DATA.values(), ids=BAD_GO_DATA.keys())
def test_info_go_bad_lengths_are_invalid(option: Option, data: bytes) -> None:
    server = in_options()
    events, out = feed(server, opt(option, data) + opt(Option.GO, go_data("disk")))
    assert len(events) == 2
    assert isinstance(events[0], OptionRefused)
    assert (events[0].option, events[0].reply) == (option, Reply.ERR_INVALID)
    assert events[1] == ExportSelected(DISK, False)
    replies = split_option_replies(out)
    assert replies[0][:2] == (option, ERR_INVALID)
    assert replies[1:] == split_option_replies(go_replies(7, DISK, 0x6D))


# --- EXPORT_NAME --------------------------------------------------------------------------


def test_export_name_with_no_zeroes_is_10_bytes() -> None:
    server = in_options(client_flags=3)
    events, out = feed(server, opt(Option.EXPORT_NAME, b"disk"))
    assert events == [ExportSelected(DISK, False)]
    assert out == bytes.fromhex("0000000000100000006d")
    assert server.state is ServerState.TRANSMISSION


def test_export_name_without_no_zeroes_is_134_bytes() -> None:
    server = in_options(client_flags=1)
    events, out = feed(server, opt(Option.EXPORT_NAME, b"ro"))
    assert events == [ExportSelected(RO, False)]
    assert len(out) == 134
    assert out == u64(65536) + u16(int(RO.flags)) + bytes(124)


def test_export_name_empty_means_default_and_keeps_structured() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.STRUCTURED_REPLY) + opt(Option.EXPORT_NAME))
    assert events == [ExportSelected(DISK, True)]
    assert out == opt_reply(8, ACK) + u64(1 << 20) + u16(0x6D | 0x80)


def test_export_name_unknown_export_is_fatal() -> None:
    server = in_options()
    server.receive_data(opt(Option.EXPORT_NAME, b"nope"))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED
    assert server.data_to_send() == b""  # nothing can be said: hard disconnect


# --- ABORT, STRUCTURED_REPLY, unknown and oversized options ------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_acks_and_closes(data: bytes) -> None:
    server = in_options()
    events, out = feed(server, opt(Option.ABORT, data))
    assert events == [ClientDisconnected("abort")]
    assert out == opt_reply(2, ACK)
    assert server.state is ServerState.CLOSED
    # Whatever arrives afterwards is ignored.
    assert feed(server, opt(Option.LIST)) == ([], b"")


def test_structured_reply_twice_is_invalid() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.STRUCTURED_REPLY))
    assert (events, out) == ([], opt_reply(8, ACK))
    events, out = feed(server, opt(Option.STRUCTURED_REPLY))
    assert len(events) == 1
    assert isinstance(events[0], OptionRefused)
    assert events[0].reply is Reply.ERR_INVALID
    assert split_option_replies(out)[0][:2] == (8, ERR_INVALID)
    assert server.structured_replies is True


def test_structured_reply_with_data_is_invalid() -> None:
    server = in_options()
    events, out = feed(server, opt(Option.STRUCTURED_REPLY, b"\x00"))
    assert isinstance(events[0], OptionRefused)
    assert split_option_replies(out)[0][:2] == (8, ERR_INVALID)
    assert server.structured_replies is False


@pytest.mark.parametrize(
    "option", [Option.PEEK_EXPORT, Option.EXTENDED_HEADERS, 12, 0x1234, 0xFFFFFFFF]
)
def test_unknown_option_unsupported_and_connection_goes_on(option: int) -> None:
    server = in_options()
    events, out = feed(server, opt(option, b"payload to skip") + opt(Option.GO, go_data("disk")))
    assert len(events) == 2
    assert isinstance(events[0], OptionRefused)
    assert (events[0].option, events[0].reply) == (option, Reply.ERR_UNSUP)
    assert events[1] == ExportSelected(DISK, False)
    replies = split_option_replies(out)
    assert replies[0][:2] == (option, ERR_UNSUP)
    assert replies[1:] == split_option_replies(go_replies(7, DISK, 0x6D))


def test_oversized_option_too_big_payload_discarded() -> None:
    server = make_server(max_option_length=64)
    server.initiate()
    feed(server, u32(3))
    events, out = feed(server, opt(Option.LIST, bytes(100)) + opt(Option.LIST))
    assert len(events) == 1
    assert isinstance(events[0], OptionRefused)
    assert (events[0].option, events[0].reply) == (3, Reply.ERR_TOO_BIG)
    replies = split_option_replies(out)
    assert replies[0][:2] == (3, ERR_TOO_BIG)
    assert replies[-1] == (3, ACK, b"")
    assert len(replies) == 1 + len(NAMES) + 1


def test_oversized_option_whose_header_arrives_before_payload() -> None:
    server = make_server(max_option_length=64)
    server.initiate()
    feed(server, u32(3))
    assert feed(server, opt(0x99, bytes(1000))[:16]) == ([], b"")
    events, out = feed(server, bytes(1000))
    assert [(e.option, e.reply) for e in events] == [(0x99, Reply.ERR_TOO_BIG)]
    assert split_option_replies(out)[0][:2] == (0x99, ERR_TOO_BIG)


def test_oversized_option_fed_in_pieces_is_still_too_big() -> None:
    server = make_server(max_option_length=64)
    server.initiate()
    feed(server, u32(3))
    message = opt(Option.LIST, bytes(100))
    events: list[object] = []
    out = b""
    for i in range(len(message)):
        e, o = feed(server, message[i : i + 1])
        events += e
        out += o
    assert [(e.option, e.reply) for e in events] == [(3, Reply.ERR_TOO_BIG)]
    assert split_option_replies(out)[0][:2] == (3, ERR_TOO_BIG)


def test_oversized_export_name_is_fatal() -> None:
    server = make_server(max_option_length=64)
    server.initiate()
    feed(server, u32(3))
    server.receive_data(opt(Option.EXPORT_NAME, b"d" * 65))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED


def test_too_many_options_is_fatal() -> None:
    server = make_server(max_options=3)
    server.initiate()
    feed(server, u32(3))
    events, _ = feed(server, opt(0x99) * 3)
    assert len(events) == 3
    server.receive_data(opt(0x99))
    with pytest.raises(PeerProtocolError):
        server.next_event()


# --- meta contexts ------------------------------------------------------------------------

BASE_ALLOC = b"base:allocation"


def test_set_meta_context_base_allocation() -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    events, out = feed(server, opt(Option.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    assert events == []
    assert out == opt_reply(10, META_CONTEXT, u32(1) + BASE_ALLOC) + opt_reply(10, ACK)
    assert server.base_allocation is True


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["base:nonesuch"], ["qemu:dirty-bitmap:b"], ["x-foo:bar"]]
)
def test_set_meta_context_selecting_nothing(queries: list[str]) -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    events, out = feed(server, opt(Option.SET_META_CONTEXT, meta_data("disk", queries)))
    assert (events, out) == ([], opt_reply(10, ACK))
    assert server.base_allocation is False


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["base:allocation"], ["qemu:x", "base:allocation"]]
)
def test_list_meta_context_finds_base_allocation(queries: list[str]) -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    events, out = feed(server, opt(Option.LIST_META_CONTEXT, meta_data("disk", queries)))
    assert events == []
    replies = split_option_replies(out)
    assert [(o, r) for o, r, _ in replies] == [(9, META_CONTEXT), (9, ACK)]
    # The context id in LIST replies is reserved (clients must disregard it).
    assert replies[0][2][4:] == BASE_ALLOC
    assert server.base_allocation is False  # LIST selects nothing


def test_list_meta_context_no_match() -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    _, out = feed(server, opt(Option.LIST_META_CONTEXT, meta_data("disk", ["qemu:dirty-bitmap:"])))
    assert out == opt_reply(9, ACK)


@pytest.mark.parametrize("option", [Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT])
def test_meta_context_before_structured_replies_is_invalid(option: Option) -> None:
    server = in_options()
    events, out = feed(server, opt(option, meta_data("disk", ["base:allocation"])))
    assert [(e.option, e.reply) for e in events] == [(option, Reply.ERR_INVALID)]
    assert split_option_replies(out)[0][:2] == (option, ERR_INVALID)
    assert server.base_allocation is False


@pytest.mark.parametrize("option", [Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT])
def test_meta_context_unknown_export(option: Option) -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    events, out = feed(server, opt(option, meta_data("nope", ["base:allocation"])))
    assert [(e.option, e.reply) for e in events] == [(option, Reply.ERR_UNKNOWN)]
    assert [(o, r) for o, r, _ in split_option_replies(out)] == [(option, ERR_UNKNOWN)]


BAD_META = {
    "empty": b"",
    "name only": u32(4) + b"disk",
    "name length past data": u32(40) + b"disk" + u32(0),
    "query runs past data": u32(4) + b"disk" + u32(1) + u32(50) + b"base:allocation",
    "missing query": u32(4) + b"disk" + u32(2) + u32(15) + BASE_ALLOC,
    "trailing bytes": meta_data("disk", ["base:allocation"]) + b"\x00",
    "query not utf-8": u32(4) + b"disk" + u32(1) + u32(2) + b"\xff\xfe",
}


@pytest.mark.parametrize("option", [Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT])
@pytest.mark.parametrize("data", BAD_META.values(), ids=BAD_META.keys())
def test_meta_context_malformed_is_invalid(option: Option, data: bytes) -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    events, out = feed(server, opt(option, data) + opt(Option.LIST))
    assert [(e.option, e.reply) for e in events] == [(option, Reply.ERR_INVALID)]
    replies = split_option_replies(out)
    assert replies[0][:2] == (option, ERR_INVALID)
    assert replies[-1] == (3, ACK, b"")  # and the next option was parsed


def test_failed_set_meta_context_clears_selection() -> None:
    server = in_options()
    feed(server, opt(Option.STRUCTURED_REPLY))
    feed(server, opt(Option.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    assert server.base_allocation is True
    events, _ = feed(server, opt(Option.SET_META_CONTEXT, meta_data("nope", ["base:allocation"])))
    assert [e.reply for e in events] == [Reply.ERR_UNKNOWN]
    assert server.base_allocation is False


# --- transmission: valid requests --------------------------------------------------------

VALID_REQUESTS = {
    "read": (Command.READ, 0, 4096, 512),
    "read at the very end": (Command.READ, 0, (1 << 20) - 512, 512),
    "flush": (Command.FLUSH, 0, 0, 0),
    "trim": (Command.TRIM, 0, 0, 1 << 20),
    "trim fua": (Command.TRIM, CommandFlag.FUA, 512, 512),
    "cache": (Command.CACHE, 0, 0, 65536),
    "write zeroes": (Command.WRITE_ZEROES, 0, 0, 1 << 20),
    "write zeroes no-hole fua": (Command.WRITE_ZEROES, CommandFlag.NO_HOLE | CommandFlag.FUA, 8, 8),
    "zero-length read": (Command.READ, 0, 1 << 20, 0),
    "zero-length trim": (Command.TRIM, 0, 0, 0),
}


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    "command,flags,offset,length", VALID_REQUESTS.values(), ids=VALID_REQUESTS.keys()
)
def test_valid_request_received(
    structured: bool, command: int, flags: int, offset: int, length: int
) -> None:
    server = in_transmission(structured=structured)
    cookie = 0xDEADBEEF00000001
    events, out = feed(server, req(command, cookie, offset, length, flags))
    assert events == [RequestReceived(Request(command, flags, cookie, offset, length))]
    assert out == b""


@pytest.mark.parametrize("flags", [0, CommandFlag.FUA])
def test_write_received_with_payload(flags: int) -> None:
    server = in_transmission()
    data = bytes(range(256)) * 4
    events, out = feed(server, req(Command.WRITE, 7, 65536, 1024, flags, data))
    assert events == [RequestReceived(Request(Command.WRITE, flags, 7, 65536, 1024, data))]
    assert out == b""


def test_write_payload_split_across_reads() -> None:
    server = in_transmission()
    data = b"0123456789abcdef" * 4
    message = req(Command.WRITE, 1, 0, len(data), 0, data) + req(Command.FLUSH, 2)
    assert feed(server, message[:28]) == ([], b"")
    assert feed(server, message[28:50]) == ([], b"")
    events, _ = feed(server, message[50:])
    assert events == [
        RequestReceived(Request(Command.WRITE, 0, 1, 0, len(data), data)),
        RequestReceived(Request(Command.FLUSH, 0, 2, 0, 0)),
    ]


def test_read_df_with_structured_replies() -> None:
    server = in_transmission(structured=True)
    events, _ = feed(server, req(Command.READ, 1, 0, 512, CommandFlag.DF))
    assert events == [RequestReceived(Request(Command.READ, CommandFlag.DF, 1, 0, 512))]


@pytest.mark.parametrize("flags", [0, CommandFlag.REQ_ONE])
def test_block_status_with_base_allocation(flags: int) -> None:
    server = in_transmission(structured=True, meta=True)
    events, out = feed(server, req(Command.BLOCK_STATUS, 9, 0, 1 << 20, flags))
    assert events == [RequestReceived(Request(Command.BLOCK_STATUS, flags, 9, 0, 1 << 20))]
    assert out == b""


def test_fast_zero_allowed_when_advertised() -> None:
    server = in_transmission("aligned")
    flags = CommandFlag.FAST_ZERO | CommandFlag.NO_HOLE
    events, _ = feed(server, req(Command.WRITE_ZEROES, 3, 512, 1024, flags))
    assert events == [RequestReceived(Request(Command.WRITE_ZEROES, flags, 3, 512, 1024))]


def test_disc_disconnects() -> None:
    server = in_transmission()
    events, out = feed(server, req(Command.DISC, 5))
    assert (events, out) == ([ClientDisconnected("disc")], b"")
    assert server.state is ServerState.CLOSED
    assert feed(server, req(Command.READ, 6, 0, 512)) == ([], b"")


def test_requests_after_export_name() -> None:
    server = in_options(client_flags=1)
    events, _ = feed(server, opt(Option.EXPORT_NAME, b"disk") + req(Command.READ, 1, 0, 512))
    assert events == [
        ExportSelected(DISK, False),
        RequestReceived(Request(Command.READ, 0, 1, 0, 512)),
    ]


# --- transmission: refused requests ------------------------------------------------------

REFUSED = {
    # name: (export, command, flags, offset, length, errno)
    "read past the end": ("disk", Command.READ, 0, (1 << 20) - 512, 1024, Errno.EINVAL),
    "read offset past the end": ("disk", Command.READ, 0, 1 << 21, 0, Errno.EINVAL),
    "write zeroes past the end": ("disk", Command.WRITE_ZEROES, 0, 1 << 20, 1, Errno.ENOSPC),
    "trim past the end": ("disk", Command.TRIM, 0, 1 << 20, 512, Errno.EINVAL),
    "cache past the end": ("disk", Command.CACHE, 0, 1 << 20, 512, Errno.EINVAL),
    "trim read-only": ("ro", Command.TRIM, 0, 0, 512, Errno.EPERM),
    "write zeroes read-only": ("ro", Command.WRITE_ZEROES, 0, 0, 512, Errno.EPERM),
    "oversized read": ("disk", Command.READ, 0, 0, 65537, Errno.EINVAL),
    "misaligned read offset": ("aligned", Command.READ, 0, 100, 512, Errno.EINVAL),
    "misaligned trim length": ("aligned", Command.TRIM, 0, 0, 100, Errno.EINVAL),
    "unknown command": ("disk", 9, 0, 0, 0, Errno.EINVAL),
    "unknown command 0xffff": ("disk", 0xFFFF, 0, 0, 512, Errno.EINVAL),
    "resize": ("disk", Command.RESIZE, 0, 0, 0, Errno.EINVAL),
    "read with req-one": ("disk", Command.READ, CommandFlag.REQ_ONE, 0, 512, Errno.EINVAL),
    "read with df, simple replies": ("disk", Command.READ, CommandFlag.DF, 0, 512, Errno.EINVAL),
    "flush with no-hole": ("disk", Command.FLUSH, CommandFlag.NO_HOLE, 0, 0, Errno.EINVAL),
    "trim with payload-len": ("disk", Command.TRIM, CommandFlag.PAYLOAD_LEN, 0, 1, Errno.EINVAL),
    "fast zero not advertised": (
        "disk",
        Command.WRITE_ZEROES,
        CommandFlag.FAST_ZERO,
        0,
        512,
        Errno.EINVAL,
    ),
    "block status without meta context": ("disk", Command.BLOCK_STATUS, 0, 0, 512, Errno.EINVAL),
}


@pytest.mark.parametrize(
    "export,command,flags,offset,length,errno", REFUSED.values(), ids=REFUSED.keys()
)
def test_refused_request_simple(
    export: str, command: int, flags: int, offset: int, length: int, errno: Errno
) -> None:
    server = in_transmission(export)
    events, out = feed(
        server, req(command, 0x0102030405060708, offset, length, flags) + req(Command.FLUSH, 2)
    )
    assert len(events) == 2
    refused = events[0]
    assert isinstance(refused, RequestRefused)
    assert refused.request == Request(command, flags, 0x0102030405060708, offset, length)
    assert refused.errno is errno
    assert events[1] == RequestReceived(Request(Command.FLUSH, 0, 2, 0, 0))
    assert out == simple(errno, 0x0102030405060708)
    assert out == bytes.fromhex("67446698") + u32(errno) + bytes.fromhex("0102030405060708")


# DF is valid once structured replies are on.
REFUSED_STRUCTURED = {k: v for k, v in REFUSED.items() if k != "read with df, simple replies"}


@pytest.mark.parametrize(
    "export,command,flags,offset,length,errno",
    REFUSED_STRUCTURED.values(),
    ids=REFUSED_STRUCTURED.keys(),
)
def test_refused_request_structured(
    export: str, command: int, flags: int, offset: int, length: int, errno: Errno
) -> None:
    server = in_transmission(export, structured=True)
    events, out = feed(server, req(command, 77, offset, length, flags))
    assert [(type(e), e.errno) for e in events] == [(RequestRefused, errno)]
    flags_out, kind, cookie, got_errno, message = parse_structured_error(out)
    assert (flags_out, kind, cookie, got_errno) == (DONE, T_ERROR, 77, errno)
    assert message == events[0].reason


WRITE_REFUSED = {
    "write past the end": ("disk", (1 << 20) - 512, 1024, 0, Errno.ENOSPC),
    "write read-only": ("ro", 0, 512, 0, Errno.EPERM),
    "oversized write": ("tiny", 0, 1025, 0, Errno.EINVAL),
    "write with df": ("disk", 0, 512, CommandFlag.DF, Errno.EINVAL),
    "misaligned write": ("aligned", 512, 100, 0, Errno.EINVAL),
}


@pytest.mark.parametrize("mode", ["whole", "byte by byte", "header then payload"])
@pytest.mark.parametrize(
    "export,offset,length,flags,errno", WRITE_REFUSED.values(), ids=WRITE_REFUSED.keys()
)
def test_refused_write_discards_payload(
    mode: str, export: str, offset: int, length: int, flags: int, errno: Errno
) -> None:
    server = in_transmission(export)
    # A payload full of request magic: it must be skipped, never parsed as requests.
    payload = bytes([0x25, 0x60, 0x95, 0x13]) * (length // 4) + bytes(length % 4)
    stream = req(Command.WRITE, 11, offset, length, flags, payload) + req(Command.READ, 12, 0, 512)
    if mode == "whole":
        pieces = [stream]
    elif mode == "byte by byte":
        pieces = [stream[i : i + 1] for i in range(len(stream))]
    else:
        pieces = [stream[:28], stream[28 : 28 + length // 2], stream[28 + length // 2 :]]
    events: list[object] = []
    out = b""
    for piece in pieces:
        e, o = feed(server, piece)
        events += e
        out += o
    assert events == [
        RequestRefused(Request(Command.WRITE, flags, 11, offset, length), errno, events[0].reason),
        RequestReceived(Request(Command.READ, 0, 12, 0, 512)),
    ]
    assert out == simple(errno, 11)


def test_refused_zero_length_write_reports_event() -> None:
    server = in_transmission("ro")
    events, out = feed(server, req(Command.WRITE, 11, 0, 0) + req(Command.FLUSH, 12))
    assert [type(e) for e in events] == [RequestRefused, RequestReceived]
    assert out == simple(Errno.EPERM, 11)


@pytest.mark.parametrize("flags", [1 << 6, 1 << 15])
def test_unknown_command_flag_bits_refused(flags: int) -> None:
    server = in_transmission()
    events, out = feed(server, req(Command.READ, 1, 0, 512, flags))
    assert [type(e) for e in events] == [RequestRefused]
    assert out == simple(Errno.EINVAL, 1)


@pytest.mark.parametrize(
    "command", [Command.READ, Command.FLUSH, Command.CACHE, Command.BLOCK_STATUS]
)
def test_fua_accepted_on_every_command_when_advertised(command: Command) -> None:
    server = in_transmission("disk", structured=True, meta=True)  # disk has SEND_FUA
    length = 0 if command == Command.FLUSH else 512
    events, out = feed(server, req(command, 1, 0, length, CommandFlag.FUA))
    assert events == [RequestReceived(Request(command, CommandFlag.FUA, 1, 0, length))]
    assert out == b""


def test_request_name() -> None:
    assert Request(Command.WRITE_ZEROES, 0, 1, 0, 0).name == "WRITE_ZEROES"
    assert Request(42, 0, 1, 0, 0).name == "command-42"


def test_bad_request_magic_is_fatal() -> None:
    server = in_transmission()
    server.receive_data(struct.pack(">IHHQQI", 0x25609514, 0, 0, 1, 0, 512))
    with pytest.raises(PeerProtocolError):
        server.next_event()
    assert server.state is ServerState.CLOSED


def test_option_after_go_is_fatal() -> None:
    server = in_transmission()
    server.receive_data(opt(Option.LIST) + bytes(12))
    with pytest.raises(PeerProtocolError):
        server.next_event()


def test_partial_request_header_needs_data() -> None:
    server = in_transmission()
    message = req(Command.READ, 1, 0, 512)
    for i in range(len(message) - 1):
        assert feed(server, message[i : i + 1]) == ([], b"")
    events, _ = feed(server, message[-1:])
    assert events == [RequestReceived(Request(Command.READ, 0, 1, 0, 512))]


# --- replies ------------------------------------------------------------------------------


def test_simple_replies_exact() -> None:
    server = in_transmission()
    read = Request(Command.READ, 0, 0x1122334455667788, 0, 4)
    assert server.reply(read, b"abcd") == bytes.fromhex("67446698000000001122334455667788")
    write = Request(Command.WRITE, 0, 3, 0, 4, b"abcd")
    assert server.reply(write) == simple(0, 3)
    assert server.reply(Request(Command.FLUSH, 0, 4, 0, 0)) == simple(0, 4)
    assert server.error_reply(read, Errno.EIO, "ignored in simple mode") == bytes.fromhex(
        "67446698000000051122334455667788"
    )


def test_simple_read_reply_needs_exact_data() -> None:
    server = in_transmission()
    read = Request(Command.READ, 0, 1, 0, 4)
    with pytest.raises(LocalProtocolError):
        server.reply(read)
    with pytest.raises(LocalProtocolError):
        server.reply(read, b"abc")


def test_structured_replies_exact() -> None:
    server = in_transmission(structured=True)
    read = Request(Command.READ, 0, 0x1122334455667788, 0x1000, 4)
    assert server.reply(read, b"abcd") == bytes.fromhex(
        "668e33ef0001000111223344556677880000000c0000000000001000"
    )
    assert server.reply(Request(Command.WRITE, 0, 2, 0, 1, b"x")) == bytes.fromhex(
        "668e33ef00010000000000000000000200000000"
    )
    assert server.reply(Request(Command.FLUSH, 0, 3, 0, 0)) == chunk(DONE, T_NONE, 3)
    with pytest.raises(LocalProtocolError):
        server.reply(read, b"abcde")


def test_structured_error_reply_exact() -> None:
    server = in_transmission(structured=True)
    request = Request(Command.WRITE, 0, 5, 0, 512)
    assert (
        server.error_reply(request, Errno.ENOSPC, "full")
        == bytes.fromhex("668e33ef0001800100000000000000050000000a0000001c0004") + b"full"
    )
    assert server.error_reply(request, Errno.EIO) == chunk(DONE, T_ERROR, 5, u32(5) + u16(0))
    long = server.error_reply(request, Errno.EIO, "m" * 5000)
    assert parse_structured_error(long)[4] == "m" * 4096
    with pytest.raises(LocalProtocolError):
        server.error_reply(request, 0)


@pytest.mark.parametrize("structured", [False, True])
def test_error_reply_errno_zero_refused(structured: bool) -> None:
    server = in_transmission(structured=structured)
    with pytest.raises(LocalProtocolError):
        server.error_reply(Request(Command.READ, 0, 1, 0, 1), 0)


def test_block_status_reply_exact() -> None:
    server = in_transmission(structured=True, meta=True)
    request = Request(Command.BLOCK_STATUS, 0, 9, 0, 1 << 20)
    extents = [(4096, 0), (8192, 3), (1 << 19, 2)]
    assert server.block_status_reply(request, extents) == bytes.fromhex(
        "668e33ef"
        "0001"
        "0005"
        "0000000000000009"
        "0000001c"
        "00000001"
        "00001000"
        "00000000"
        "00002000"
        "00000003"
        "00080000"
        "00000002"
    )
    one = Request(Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 10, 0, 4096)
    assert server.block_status_reply(one, extents) == chunk(
        DONE, T_BLOCK_STATUS, 10, u32(1) + u32(4096) + u32(0)
    )
    with pytest.raises(LocalProtocolError):
        server.block_status_reply(request, [])


def test_structured_zero_length_read_reply_is_none_chunk() -> None:
    server = in_transmission(structured=True)
    read = Request(Command.READ, 0, 4, 512, 0)
    assert server.reply(read, b"") == chunk(DONE, T_NONE, 4)


# --- messages and their exact bytes --------------------------------------------------------

MESSAGES = {
    "option request header": (
        OPTION_HEADER.pack(IHAVEOPT, Option.GO, 10),
        "49484156454f5054000000070000000a",
    ),
    "option request with data": (
        encode_option(Option.EXPORT_NAME, b"disk"),
        "49484156454f505400000001000000046469736b",
    ),
    "option reply header": (
        OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, Option.LIST, Reply.SERVER, 8),
        "0003e889045565a9000000030000000200000008",
    ),
    "option reply error": (
        encode_option_reply(Option.GO, Reply.ERR_UNKNOWN, b"no"),
        "0003e889045565a90000000780000006000000026e6f",
    ),
    "request header": (
        REQUEST_HEADER.pack(
            REQUEST_MAGIC, CommandFlag.FUA, Command.WRITE, 0x0102030405060708, 0x1000, 0x200
        ),
        "25609513000100010102030405060708000000000000100000000200",
    ),
    "simple reply": (
        SIMPLE_REPLY_HEADER.pack(SIMPLE_MAGIC, Errno.EPERM, 42),
        "6744669800000001000000000000002a",
    ),
    "structured chunk header": (
        STRUCTURED_HEADER.pack(STRUCTURED_MAGIC, 1, 2, 42, 12),
        "668e33ef00010002000000000000002a0000000c",
    ),
    "block sizes": (BlockSizes(512, 4096, 1 << 25).encode(), "0003000002000000100002000000"),
    "block sizes default": (BlockSizes().encode(), "0003000000010000100002000000"),
    "block sizes no limit": (
        BlockSizes(1, 512, 0xFFFFFFFF).encode(),
        "00030000000100000200ffffffff",
    ),
    "info export": (encode_info_export(1 << 30, 0x6D), "00000000000040000000006d"),
    "name and infos": (encode_name_and_infos("ab", (3, 1)), "000000026162000200030001"),
    "name and no infos": (encode_name_and_infos("", ()), "000000000000"),
}


@pytest.mark.parametrize("encoded,hex_bytes", MESSAGES.values(), ids=MESSAGES.keys())
def test_message_bytes(encoded: bytes, hex_bytes: str) -> None:
    assert encoded == bytes.fromhex(hex_bytes)


@pytest.mark.parametrize(
    "sizes",
    [
        (3, 4096, 65536),
        (1, 3000, 65536),
        (0, 4096, 65536),
        (1 << 17, 1 << 17, 1 << 20),
        (4096, 512, 65536),
        (512, 4096, 256),
    ],
)
def test_block_sizes_rejects_invalid(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(LocalProtocolError):
        BlockSizes(*sizes)


def test_protocol_numbers() -> None:
    assert [int(o) for o in Option] == list(range(1, 12))
    assert (Reply.ACK, Reply.SERVER, Reply.INFO, Reply.META_CONTEXT) == (1, 2, 3, 4)
    assert [r.value - 0x80000000 for r in Reply if r.is_error] == list(range(1, 11))
    assert not Reply.ACK.is_error and Reply.ERR_TOO_BIG.is_error
    assert [int(c) for c in Command] == list(range(9))
    assert [int(f) for f in CommandFlag] == [1, 2, 4, 8, 16, 32]
    assert [int(f) for f in TransmissionFlag] == [1 << i for i in range(13)]
    assert {e.name: int(e) for e in Errno} == {
        "OK": 0,
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }
