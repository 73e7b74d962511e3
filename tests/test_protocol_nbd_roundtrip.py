"""ServerConnection and ClientConnection wired to each other in memory, feeding modes
(whole, byte by byte, with trailing bytes), and Hypothesis robustness tests."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbdwire import (
    IHAVEOPT,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    chunk,
    drain,
    meta_data,
    opt,
    opt_reply,
    u16,
    u32,
    u64,
)

from virtman.errors import PeerProtocolError
from virtman.protocol.nbd import (
    NEED_DATA,
    BlockSizes,
    ClientConnection,
    ClientDisconnected,
    ClientState,
    Command,
    CommandFlag,
    Errno,
    ExportInfo,
    ExportSelected,
    Option,
    OptionRefused,
    Reply,
    RequestReceived,
    RequestRefused,
    ServerConnection,
    ServerState,
    TransmissionFlag,
)
from virtman.protocol.nbd.client import ExportsListed, HandshakeDone, ReplyReceived

# --- wire helpers --------------------------------------------------------------------------


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return u32(len(raw)) + raw + u16(len(infos)) + b"".join(u16(i) for i in infos)


def req(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + data


def simple(error: int, cookie: int, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie) + data


# --- exports and a tiny in-memory backend ------------------------------------------------

F = TransmissionFlag
SIZE = 1 << 20
DISK = ExportInfo(
    "disk",
    SIZE,
    F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES,
    "the test disk",
    BlockSizes(1, 4096, 65536),
)
RO = ExportInfo(
    "ro", 65536, F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH, "", BlockSizes(1, 512, 65536)
)
EXPORTS = {"": DISK, "disk": DISK, "ro": RO}


INITIAL = (bytes(range(251)) * (SIZE // 251 + 1))[:SIZE]


def pattern(offset: int, length: int) -> bytes:
    """The initial content of every export: byte i is i % 251."""
    assert offset + length <= SIZE
    return INITIAL[offset : offset + length]


def make_server() -> ServerConnection:
    return ServerConnection(EXPORTS.get, lambda: ["disk", "ro"])


class Backend:
    """Runs RequestReceived events against bytearrays and builds the replies."""

    def __init__(self) -> None:
        self.disks = {e.name: bytearray(pattern(0, e.size)) for e in (DISK, RO)}

    def answer(self, server: ServerConnection, event: RequestReceived) -> bytes:
        assert server.export is not None
        disk = self.disks[server.export.name]
        r = event.request
        if r.command == Command.READ:
            data = bytes(disk[r.offset : r.offset + r.length])
            return server.reply(r, data) + data
        if r.command == Command.WRITE:
            disk[r.offset : r.offset + r.length] = r.data
        elif r.command in (Command.WRITE_ZEROES, Command.TRIM):
            disk[r.offset : r.offset + r.length] = bytes(r.length)
        elif r.command == Command.BLOCK_STATUS:
            return server.block_status_reply(r, [(r.length, 0)])
        return server.reply(r)


def pump(
    server: ServerConnection, client: ClientConnection, backend: Backend, first: bytes = b""
) -> tuple[list[object], list[object]]:
    """Move bytes both ways until both sides are quiet; return (server, client) events."""
    server_events: list[object] = []
    client_events: list[object] = []
    up = first
    for _ in range(100):
        client_events += drain(client)
        up += client.data_to_send()
        server.receive_data(up)
        new = drain(server)
        server_events += new
        down = server.data_to_send()
        for event in new:
            if isinstance(event, RequestReceived):
                down += backend.answer(server, event)
        client.receive_data(down)
        if not up and not down:
            return server_events, client_events
        up = b""
    raise AssertionError("the connection never went quiet")


def connect(
    client: ClientConnection,
) -> tuple[ServerConnection, Backend, list[object], list[object]]:
    server = make_server()
    client.receive_data(server.initiate())
    backend = Backend()
    server_events, client_events = pump(server, client, backend)
    return server, backend, server_events, client_events


# --- handshake scenarios -------------------------------------------------------------------

HANDSHAKES = {
    "default export, structured": ({"export_name": ""}, "", True),
    "named export, structured": ({"export_name": "disk"}, "disk", True),
    "named export, simple replies": (
        {"export_name": "disk", "structured_replies": False},
        "disk",
        False,
    ),
    "read-only export": ({"export_name": "ro"}, "ro", True),
}


@pytest.mark.parametrize("kwargs,name,structured", HANDSHAKES.values(), ids=HANDSHAKES.keys())
def test_handshake_roundtrip(kwargs: dict[str, object], name: str, structured: bool) -> None:
    client = ClientConnection(**kwargs)  # type: ignore[arg-type]
    server, _, server_events, client_events = connect(client)
    export = EXPORTS[name]
    assert server_events == [ExportSelected(export, structured)]
    expected_flags = export.flags | (F.SEND_DF if structured else 0)
    assert client_events == [
        HandshakeDone(
            ExportInfo(name, export.size, expected_flags, block_sizes=export.block_sizes),
            structured,
        )
    ]
    assert server.state is ServerState.TRANSMISSION
    assert client.state is ClientState.TRANSMISSION
    assert server.structured_replies is client.structured_replies is structured


def test_list_roundtrip() -> None:
    client = ClientConnection(list_exports=True)
    server, _, server_events, client_events = connect(client)
    assert client_events == [ExportsListed(["disk", "ro"])]
    assert server_events == [ClientDisconnected("abort")]
    assert server.state is ServerState.CLOSED
    assert client.state is ClientState.CLOSED


def test_unknown_export_roundtrip() -> None:
    client = ClientConnection("nope")
    server = make_server()
    client.receive_data(server.initiate())
    with pytest.raises(PeerProtocolError, match="ERR_UNKNOWN"):
        pump(server, client, Backend())
    assert client.state is ClientState.CLOSED
    assert server.state is ServerState.OPTIONS


# --- transmission scenarios ----------------------------------------------------------------

Step = tuple[int, int, int, int, bytes | None]  # command, offset, length, flags, data
Expect = tuple[int, bytes]  # error, data

W, R = Command.WRITE, Command.READ
SCENARIOS: dict[str, tuple[str, list[Step], list[Expect]]] = {
    "read": ("disk", [(R, 1000, 100, 0, None)], [(0, pattern(1000, 100))]),
    "write then read back": (
        "disk",
        [(W, 4096, 5, 0, b"hello"), (R, 4094, 9, 0, None)],
        [(0, b""), (0, pattern(4094, 2) + b"hello" + pattern(4101, 2))],
    ),
    "fua write at the end": (
        "disk",
        [(W, SIZE - 3, 3, CommandFlag.FUA, b"end"), (R, SIZE - 4, 4, 0, None)],
        [(0, b""), (0, pattern(SIZE - 4, 1) + b"end")],
    ),
    "write zeroes then read": (
        "disk",
        [(Command.WRITE_ZEROES, 0, 16, CommandFlag.NO_HOLE, None), (R, 0, 20, 0, None)],
        [(0, b""), (0, bytes(16) + pattern(16, 4))],
    ),
    "trim, flush, cache": (
        "disk",
        [
            (Command.TRIM, 0, 512, 0, None),
            (Command.FLUSH, 0, 0, 0, None),
            (Command.CACHE, 0, 65536, 0, None),
        ],
        [(0, b""), (0, b""), (0, b"")],
    ),
    "zero-length write": ("disk", [(W, 0, 0, 0, b"")], [(0, b"")]),
    "read past the end": ("disk", [(R, SIZE - 10, 20, 0, None)], [(Errno.EINVAL, b"")]),
    "write past the end leaves data alone": (
        "disk",
        [(W, SIZE - 2, 4, 0, b"abcd"), (R, SIZE - 2, 2, 0, None)],
        [(Errno.ENOSPC, b""), (0, pattern(SIZE - 2, 2))],
    ),
    "write zeroes past the end": (
        "disk",
        [(Command.WRITE_ZEROES, SIZE, 1, 0, None)],
        [(Errno.ENOSPC, b"")],
    ),
    "read-only export": (
        "ro",
        [
            (W, 0, 1, 0, b"x"),
            (Command.TRIM, 0, 512, 0, None),
            (Command.WRITE_ZEROES, 0, 512, 0, None),
            (R, 0, 4, 0, None),
        ],
        [(Errno.EPERM, b""), (Errno.EPERM, b""), (Errno.EPERM, b""), (0, pattern(0, 4))],
    ),
    "oversized write then read": (
        "disk",
        [(W, 0, 65537, 0, b"\xff" * 65537), (R, 0, 4, 0, None)],
        [(Errno.EINVAL, b""), (0, pattern(0, 4))],
    ),
    "oversized read": ("disk", [(R, 0, 65537, 0, None)], [(Errno.EINVAL, b"")]),
    "unknown command": ("disk", [(9, 0, 0, 0, None)], [(Errno.EINVAL, b"")]),
    "bad flags": ("disk", [(R, 0, 512, CommandFlag.REQ_ONE, None)], [(Errno.EINVAL, b"")]),
    "block status without meta context": (
        "disk",
        [(Command.BLOCK_STATUS, 0, 4096, 0, None)],
        [(Errno.EINVAL, b"")],
    ),
}


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("export,steps,expected", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_transmission_roundtrip(
    structured: bool, export: str, steps: list[Step], expected: list[Expect]
) -> None:
    client = ClientConnection(export, structured_replies=structured)
    server, backend, _, _ = connect(client)
    got = []
    for command, offset, length, flags, data in steps:
        cookie, header = client.request(command, offset, length, flags, data)
        server_events, client_events = pump(server, client, backend, header + (data or b""))
        assert len(server_events) == 1
        assert isinstance(server_events[0], RequestReceived | RequestRefused)
        assert server_events[0].request.cookie == cookie
        assert [type(e) for e in client_events] == [ReplyReceived]
        reply = client_events[0]
        assert reply.cookie == cookie
        got.append((reply.error, reply.data))
    assert got == expected
    assert client.in_flight == 0


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_pipelined_requests_roundtrip(structured: bool) -> None:
    client = ClientConnection("disk", structured_replies=structured)
    server, backend, _, _ = connect(client)
    stream = b""
    cookies = []
    for i in range(20):
        cookie, header = client.request(Command.READ, i * 4096, 4096)
        cookies.append(cookie)
        stream += header
    bad, header = client.request(Command.READ, SIZE, 1)
    stream += header
    server_events, client_events = pump(server, client, backend, stream)
    assert len(server_events) == 21
    replies = {e.cookie: e for e in client_events}
    assert sorted(replies) == sorted([*cookies, bad])
    for i, cookie in enumerate(cookies):
        assert replies[cookie] == ReplyReceived(cookie, 0, pattern(i * 4096, 4096))
    assert replies[bad].error == Errno.EINVAL


def test_disc_roundtrip() -> None:
    client = ClientConnection("disk")
    server, backend, _, _ = connect(client)
    _, header = client.request(Command.DISC)
    server_events, client_events = pump(server, client, backend, header)
    assert server_events == [ClientDisconnected("disc")]
    assert client_events == []
    assert server.state is ServerState.CLOSED
    assert client.state is ClientState.CLOSED


# --- feeding modes: whole, byte by byte, with trailing bytes -------------------------------

NEXT_PREFIX = {
    "one byte of the next": lambda n: 1,
    "half of the next": lambda n: n // 2,
    "all but one byte of the next": lambda n: n - 1,
}


def feeding_modes(
    messages: list[bytes], run: Callable[[list[bytes]], list[tuple[list[object], bytes]]]
) -> None:
    """Check that ``run`` gives the same events whichever way the stream is cut."""
    whole = run(messages)
    assert len(whole) == len(messages)
    flat_events = [e for events, _ in whole for e in events]
    flat_out = b"".join(out for _, out in whole)

    stream = b"".join(messages)
    by_byte = run([stream[i : i + 1] for i in range(len(stream))])
    assert [e for events, _ in by_byte for e in events] == flat_events
    assert b"".join(out for _, out in by_byte) == flat_out

    for prefix in NEXT_PREFIX.values():
        pieces = []
        carried = 0
        for i, message in enumerate(messages):
            nxt = messages[i + 1] if i + 1 < len(messages) else b""
            k = prefix(len(nxt)) if nxt else 0
            pieces.append(message[carried:] + nxt[:k])
            carried = k
        trailing = run(pieces)
        # Each piece holds exactly one whole message: it yields that message's events.
        assert [events for events, _ in trailing] == [events for events, _ in whole]
        assert b"".join(out for _, out in trailing) == flat_out


SERVER_SCRIPT = [
    u32(3),
    opt(Option.STRUCTURED_REPLY),
    opt(Option.LIST),
    opt(Option.INFO, go_data("disk", (1, 2, 3))),
    opt(0x77, b"an option nobody knows"),
    opt(Option.LIST_META_CONTEXT, meta_data("disk", [])),
    opt(Option.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
    opt(Option.GO, go_data("disk", (3,))),
    req(Command.READ, 1, 0, 4096),
    req(Command.WRITE, 2, 512, 16, 0, b"W" * 16),
    req(Command.FLUSH, 3),
    req(Command.TRIM, 4, 0, 4096, CommandFlag.FUA),
    req(Command.WRITE_ZEROES, 5, 0, 4096, CommandFlag.NO_HOLE),
    req(Command.BLOCK_STATUS, 6, 0, 65536, CommandFlag.REQ_ONE),
    req(Command.CACHE, 7, 0, 4096),
    req(Command.READ, 8, SIZE, 512),  # refused: past the end
    req(Command.WRITE, 9, 0, 65537, 0, bytes(65537)),  # refused: too big, payload skipped
    req(Command.WRITE, 10, SIZE - 8, 16, 0, b"w" * 16),  # refused: past the end
    req(9, 11),  # refused: unknown command
    req(Command.WRITE, 12, 0, 3, 0, b"end"),
    req(Command.DISC, 13),
]


def run_server(pieces: list[bytes]) -> list[tuple[list[object], bytes]]:
    server = make_server()
    server.initiate()
    results = []
    for piece in pieces:
        server.receive_data(piece)
        results.append((drain(server), server.data_to_send()))
    return results


def test_server_feeding_modes() -> None:
    whole = run_server(SERVER_SCRIPT)
    kinds = [[type(e).__name__ for e in events] for events, _ in whole]
    assert kinds == (
        [[]] * 4
        + [["OptionRefused"], [], [], ["ExportSelected"]]
        + [["RequestReceived"]] * 7
        + [["RequestRefused"]] * 4
        + [["RequestReceived"], ["ClientDisconnected"]]
    )
    assert [e.errno for events, _ in whole[15:19] for e in events] == [
        Errno.EINVAL,
        Errno.EINVAL,
        Errno.ENOSPC,
        Errno.EINVAL,
    ]
    assert whole[9][0][0].request.data == b"W" * 16
    assert whole[19][0][0].request.data == b"end"
    feeding_modes(SERVER_SCRIPT, run_server)


def client_script() -> list[bytes]:
    """Server bytes for a client that sends, on HandshakeDone, the requests of ``_requests``."""
    return [
        b"NBDMAGICIHAVEOPT" + u16(3),
        opt_reply(Option.STRUCTURED_REPLY, Reply.ACK),
        opt_reply(Option.GO, Reply.INFO, u16(3) + u32(1) + u32(4096) + u32(65536)),
        opt_reply(Option.GO, Reply.INFO, u16(0) + u64(SIZE) + u16(0x6D | 0x80)),
        opt_reply(Option.GO, Reply.ACK),
        chunk(0, 1, 1, u64(512) + b"B" * 512) + chunk(1, 2, 1, u64(0) + u32(512)),
        chunk(1, 0, 2),
        chunk(1, 0x8001, 3, u32(5) + u16(4) + b"oops"),
        chunk(1, 5, 4, u32(1) + u32(4096) + u32(3)),
        simple(0, 5),
        simple(28, 6),
    ]


def _requests(client: ClientConnection) -> None:
    client.request(Command.READ, 0, 1024)
    client.request(Command.WRITE, 0, 4, data=b"abcd")
    client.request(Command.TRIM, 0, 4096)
    client.request(Command.BLOCK_STATUS, 0, 4096)
    client.request(Command.FLUSH)
    client.request(Command.WRITE_ZEROES, 0, 4096)


def run_client(pieces: list[bytes]) -> list[tuple[list[object], bytes]]:
    client = ClientConnection("disk")
    results = []
    for piece in pieces:
        client.receive_data(piece)
        events = []
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, HandshakeDone):
                _requests(client)  # before any reply bytes are parsed
        results.append((events, client.data_to_send()))
    return results


def test_client_feeding_modes() -> None:
    messages = client_script()
    # A chunk message holding two chunks (DATA + HOLE) counts as one reply.
    whole = run_client(messages)
    assert [events for events, _ in whole[5:]] == [
        [ReplyReceived(1, 0, bytes(512) + b"B" * 512)],
        [ReplyReceived(2, 0)],
        [ReplyReceived(3, 5, b"", "oops")],
        [ReplyReceived(4, 0, extents=[(4096, 3)])],
        [ReplyReceived(5, 0)],
        [ReplyReceived(6, 28)],
    ]
    assert b"".join(out for _, out in whole) == (
        u32(3) + opt(Option.STRUCTURED_REPLY) + opt(Option.GO, go_data("disk", (3,)))
    )
    feeding_modes(messages, run_client)


# --- Hypothesis: arbitrary bytes give events or PeerProtocolError, nothing else -----------
#
# Pure noise rarely gets past the first magic number, so besides raw bytes the strategies
# build well-framed messages with arbitrary contents, followed by a tail of raw noise.

SERVER_EVENTS = (ExportSelected, RequestReceived, RequestRefused, OptionRefused, ClientDisconnected)
CLIENT_EVENTS = (HandshakeDone, ExportsListed, ReplyReceived)

noise = st.binary(max_size=32)
splits = st.lists(st.integers(0, 48), max_size=6)
names = st.sampled_from(["", "disk", "ro", "nope", "\u00e9", "a\x00b"])
client_flags = st.sampled_from([u32(3), u32(3), u32(1), u32(0), u32(2), u32(7), b"\xff" * 4])
option_messages = st.one_of(
    st.builds(
        opt, st.sampled_from([*range(13), 0x99, 0xFFFFFFFF]), st.just(b"") | st.binary(max_size=12)
    ),
    st.builds(
        lambda o, n, i, extra: opt(o, go_data(n, tuple(i)) + extra),
        st.sampled_from([Option.INFO, Option.GO]),
        names,
        st.lists(st.integers(0, 4) | st.integers(0, 0xFFFF), max_size=4),
        st.just(b"") | st.binary(max_size=3),
    ),
    st.builds(
        lambda o, n, q: opt(o, meta_data(n, q)),
        st.sampled_from([Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT]),
        names,
        st.lists(st.sampled_from(["base:", "base:allocation", "x-a:b", "", "base"]), max_size=3),
    ),
    st.builds(lambda d: opt(Option.EXPORT_NAME, d), st.binary(max_size=8) | names.map(str.encode)),
    st.builds(lambda n: opt(Option.LIST, bytes(n)), st.sampled_from([0, 1, 65536, 65537, 70000])),
)
request_messages = st.builds(
    lambda c, f, k, o, n, p: req(c, k, o, n, f, p[:n]),
    st.sampled_from([0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF]),
    st.sampled_from([0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 0x8000]) | st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 0, 1, 512, SIZE - 512, SIZE, 2**63, 2**64 - 1]),
    st.sampled_from([0, 1, 7, 7, 16, 512, 4096, 65536, 65537, SIZE, 0xFFFFFFFF]),
    st.binary(min_size=0, max_size=20),
)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    return pieces


def feed_all(
    conn: ServerConnection | ClientConnection, pieces: list[bytes], allowed: tuple[type, ...]
) -> None:
    try:
        for piece in pieces:
            conn.receive_data(piece)
            for event in drain(conn):
                assert isinstance(event, allowed)
            conn.data_to_send()
    except PeerProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), splits)
def test_fresh_server_arbitrary_bytes(data: bytes, sizes: list[int]) -> None:
    server = make_server()
    server.initiate()
    feed_all(server, cut(data, sizes), SERVER_EVENTS)


@settings(max_examples=300, deadline=None)
@given(client_flags, st.booleans(), st.lists(option_messages, max_size=8), noise, splits)
def test_fresh_server_arbitrary_options(
    flags: bytes, structured: bool, messages: list[bytes], tail: bytes, sizes: list[int]
) -> None:
    server = make_server()
    server.initiate()
    # Most meta-context paths open only once structured replies are on.
    start = flags + (opt(Option.STRUCTURED_REPLY) if structured else b"")
    feed_all(server, cut(start + b"".join(messages) + tail, sizes), SERVER_EVENTS)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["disk", "ro"]),
    st.booleans(),
    st.booleans(),
    st.lists(request_messages, max_size=8),
    noise,
    splits,
)
def test_server_in_transmission_arbitrary_bytes(
    export: str,
    structured: bool,
    meta: bool,
    messages: list[bytes],
    tail: bytes,
    sizes: list[int],
) -> None:
    server = make_server()
    server.initiate()
    handshake = u32(3)
    if structured:
        handshake += opt(Option.STRUCTURED_REPLY)
        if meta:
            handshake += opt(Option.SET_META_CONTEXT, meta_data(export, ["base:allocation"]))
    server.receive_data(handshake + opt(Option.GO, go_data(export)))
    assert [type(e) for e in drain(server)] == [ExportSelected]
    server.data_to_send()
    feed_all(server, cut(b"".join(messages) + tail, sizes), SERVER_EVENTS)


GREETINGS = [b"NBDMAGICIHAVEOPT" + u16(f) for f in (3, 3, 3, 1, 1, 0xFFFF, 0)]
reply_payloads = st.one_of(
    st.binary(max_size=16),
    st.builds(
        lambda s, f: u16(0) + u64(s) + u16(f), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF)
    ),
    st.builds(
        lambda a, b, c: u16(3) + u32(a) + u32(b) + u32(c),
        st.sampled_from([0, 1, 3, 512, 1 << 17]),
        st.sampled_from([0, 512, 4096, 3000]),
        st.sampled_from([0, 1, 4096, 0xFFFFFFFF]),
    ),
    st.builds(
        lambda n, d: u32(len(n)) + n + d,
        names.map(str.encode) | st.binary(max_size=8),
        st.binary(max_size=8),
    ),
    st.builds(u32, st.integers(0, 2**32 - 1)),
)
# (True, reply, payload): an option reply to the option the client asked last;
# (False, option, reply, payload): one to some other option; or raw bytes.
server_handshake_messages = st.one_of(
    st.tuples(
        st.just(True),
        st.sampled_from(
            [1] * 4
            + [2] * 4
            + [3] * 6
            + [0x80000001] * 4
            + [4, *range(0x80000002, 0x8000000B), 0x80001234, 77]
        ),
        reply_payloads,
    ),
    st.tuples(
        st.just(False), st.sampled_from([1, 2, 9, 0xFFFFFFFF]), st.integers(1, 3), reply_payloads
    ),
    st.sampled_from(
        [
            u64(1 << 20) + u16(3),  # an EXPORT_NAME reply
            bytes(124),  # its padding
            struct.pack(">QIII", OPT_REPLY_MAGIC, 8, 1, 65537),  # a reply too long
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.binary(max_size=60), splits)
def test_fresh_client_arbitrary_bytes(structured: bool, data: bytes, sizes: list[int]) -> None:
    client = ClientConnection("disk", structured_replies=structured)
    feed_all(client, cut(data, sizes), CLIENT_EVENTS)


def last_option(sent: bytes, previous: int) -> int:
    at = sent.rfind(u64(IHAVEOPT))
    return previous if at < 0 else struct.unpack_from(">I", sent, at + 8)[0]


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.booleans(),
    st.sampled_from(GREETINGS),
    st.lists(server_handshake_messages, max_size=8),
    noise,
)
def test_fresh_client_arbitrary_option_replies(
    structured: bool, listing: bool, greeting: bytes, messages: list[object], tail: bytes
) -> None:
    client = ClientConnection("disk", structured_replies=structured, list_exports=listing)
    asked = 0
    try:
        for message in [greeting, *messages, tail]:
            if isinstance(message, tuple):
                if message[0]:
                    _, reply, payload = message
                    message = opt_reply(asked, reply, payload)
                else:
                    _, option, reply, payload = message
                    message = opt_reply(option, reply, payload)
            assert isinstance(message, bytes)
            client.receive_data(message)
            for event in drain(client):
                assert isinstance(event, CLIENT_EVENTS)
            asked = last_option(client.data_to_send(), asked)
    except PeerProtocolError:
        pass


cookies = st.sampled_from([1, 2, 3, 4, 99])
reply_messages = st.one_of(
    st.builds(simple, st.sampled_from([0, 5, 22]), cookies, st.binary(max_size=70)),
    st.builds(
        chunk,
        st.integers(0, 3),
        st.sampled_from([0, 1, 2, 3, 5, 0x8001, 0x8002, 0xFFFF]),
        cookies,
        st.binary(max_size=80),
    ),
    st.builds(
        lambda f, k, o, d: chunk(f, 1, k, u64(o) + d),
        st.integers(0, 1),
        cookies,
        st.integers(0, 80),
        st.binary(max_size=70),
    ),
    st.builds(
        lambda f, k, o, n: chunk(f, 2, k, u64(o) + u32(n)),
        st.integers(0, 1),
        cookies,
        st.integers(0, 80),
        st.integers(0, 80),
    ),
    st.builds(
        lambda f, t, k, e, m, x: chunk(f, t, k, u32(e) + u16(m) + x),
        st.integers(0, 1),
        st.sampled_from([0x8001, 0x8002, 0x8009]),
        cookies,
        st.integers(0, 30),
        st.integers(0, 0xFFFF),
        st.binary(max_size=20),
    ),
    st.builds(
        lambda k, n, x: chunk(1, 5, k, u32(1) + bytes(8 * n) + x),
        cookies,
        st.integers(0, 3),
        st.binary(max_size=5),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(reply_messages, max_size=8), noise, splits)
def test_client_in_transmission_arbitrary_bytes(
    structured: bool, messages: list[bytes], tail: bytes, sizes: list[int]
) -> None:
    client = ClientConnection("disk", structured_replies=structured)
    handshake = b"NBDMAGICIHAVEOPT" + u16(3)
    if structured:
        handshake += opt_reply(Option.STRUCTURED_REPLY, Reply.ACK)
    handshake += opt_reply(Option.GO, Reply.INFO, u16(0) + u64(SIZE) + u16(0x6D))
    client.receive_data(handshake + opt_reply(Option.GO, Reply.ACK))
    assert [type(e) for e in drain(client)] == [HandshakeDone]
    client.request(Command.READ, 0, 64)
    client.request(Command.WRITE, 0, 4, data=b"abcd")
    client.request(Command.BLOCK_STATUS, 0, 4096)
    client.request(Command.READ, 32, 16)
    feed_all(client, cut(b"".join(messages) + tail, sizes), CLIENT_EVENTS)
