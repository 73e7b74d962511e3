"""The receive buffer read into in place (BufferedProtocol style), and the client codec
fed that way: the bytes taken out are the bytes put in, however the reads are cut."""

from __future__ import annotations

import random
import struct

from nbdwire import DONE, chunk, u64
from test_protocol_nbd_client import in_transmission

from virtman.protocol.nbd import NEED_DATA, ClientConnection, Command
from virtman.protocol.nbd.client import ReplyReceived
from virtman.protocol.nbd.messages import RECEIVE_ROOM, ReceiveBuffer


def read_into(buf: ReceiveBuffer | ClientConnection, data: bytes, rng: random.Random,
              keep: list[memoryview]) -> None:
    """Deliver ``data`` the way a transport does: into ``get_buffer``'s view, cut into
    reads of random sizes. Views are kept alive (asyncio's selector transport still holds
    one while ``buffer_updated`` parses), so the buffer must never resize under them."""
    pos = 0
    while pos < len(data):
        view = buf.get_buffer(-1)
        assert len(view) >= RECEIVE_ROOM
        n = min(len(data) - pos, len(view), rng.choice((1, 7, 4096, 65536, 300_000)))
        view[:n] = data[pos : pos + n]
        buf.buffer_updated(n)
        keep.append(view)
        pos += n


def test_receive_buffer_returns_what_was_read_into_it() -> None:
    rng = random.Random(11)
    header = struct.Struct(">IQ")
    buf = ReceiveBuffer()
    keep: list[memoryview] = []
    sent: list[tuple[int, bytes]] = []
    got: list[tuple[int, bytes]] = []
    for i in range(200):
        payload = rng.randbytes(rng.choice((0, 1, 13, 4096, 262_144, 700_000)))
        sent.append((i, payload))
        read_into(buf, header.pack(i, len(payload)) + payload, rng, keep)
        if rng.random() < 0.5:
            del keep[:]  # sometimes the views are gone, sometimes not
        while True:
            fields = buf.unpack(header)
            if fields is None:
                break
            taken = buf.take(fields[1])
            assert taken is not None
            assert isinstance(taken, bytes)
            got.append((fields[0], taken))
    assert got == sent
    assert len(buf) == 0


def test_receive_buffer_feed_and_read_into_mixed() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"abc")
    view = buf.get_buffer(10)
    view[:4] = b"defg"
    buf.buffer_updated(4)
    buf.feed(b"hi")
    assert buf.take(3) == b"abc"
    assert buf.take(7) is None  # only 6 buffered: nothing consumed
    assert buf.take(6) == b"defghi"
    assert buf.take(1) is None


def test_buffer_updated_beyond_the_room_is_refused() -> None:
    import pytest

    from virtman.errors import LocalProtocolError

    buf = ReceiveBuffer()
    view = buf.get_buffer(-1)
    with pytest.raises(LocalProtocolError):
        buf.buffer_updated(len(view) + 1)


def test_client_codec_reads_large_structured_replies_read_into_in_place() -> None:
    rng = random.Random(5)
    client = in_transmission()
    keep: list[memoryview] = []
    expected: dict[int, bytes] = {}
    stream = b""
    for i in range(24):
        length = rng.choice((4096, 262_144, 300_000))
        cookie, _ = client.request(Command.READ, i * 4096, length)
        data = rng.randbytes(length)
        expected[cookie] = data
        stream += chunk(DONE, 1, cookie, u64(i * 4096) + data)  # OFFSET_DATA, done
    read_into(client, stream, rng, keep)
    replies = []
    while (event := client.next_event()) is not NEED_DATA:
        assert isinstance(event, ReplyReceived)
        replies.append(event)
    assert {r.cookie: r.data for r in replies} == expected
    assert all(r.error == 0 for r in replies)


def test_receive_buffer_grows_while_streaming_and_gives_room_back_when_idle() -> None:
    rng = random.Random(2)
    buf = ReceiveBuffer()
    keep: list[memoryview] = []
    header = struct.Struct(">I")
    pending: list[int] = []

    def parse() -> None:
        while True:
            if not pending:
                fields = buf.unpack(header)
                if fields is None:
                    return
                pending.append(fields[0])
            if buf.take(pending[0]) is None:
                return
            pending.pop()

    # Replies streaming in, reads ending mid-message: the unparsed tail is often large,
    # so the buffer grows rather than moving it to the front on every read.
    for _ in range(12):
        read_into(buf, header.pack(300_000) + rng.randbytes(300_000), rng, keep)
        parse()
    read_into(buf, header.pack(5000) + rng.randbytes(4000), rng, keep)  # one incomplete
    parse()
    buf.release()  # bytes still buffered: nothing given back
    assert len(buf) == 4004 - 4 and pending == [5000]
    read_into(buf, rng.randbytes(1000), rng, keep)
    parse()
    assert len(buf) == 0 and not pending
    grown = len(buf.get_buffer(-1))  # all parsed: the whole array is room
    assert grown > 2 * RECEIVE_ROOM
    buf.release()
    assert len(buf.get_buffer(-1)) == RECEIVE_ROOM  # back to one read's room


def _deliver_and_parse(client: ClientConnection, data: bytes, rng: random.Random,
                       direct: list[int]) -> list[ReplyReceived]:
    """Deliver ``data`` as a transport does, parsing after every read (as
    ``buffer_updated`` does); ``direct`` gets the size of every view ``get_buffer`` handed
    out that was smaller than a read's room (a payload's own remaining room)."""
    replies: list[ReplyReceived] = []
    pos = 0
    while pos < len(data):
        view = client.get_buffer(-1)
        if len(view) < RECEIVE_ROOM:
            direct.append(len(view))
        n = min(len(data) - pos, len(view), rng.choice((1, 7, 4096, 65536, 300_000)))
        view[:n] = data[pos : pos + n]
        client.buffer_updated(n)
        pos += n
        while (event := client.next_event()) is not NEED_DATA:
            assert isinstance(event, ReplyReceived)
            replies.append(event)
        if rng.random() < 0.3:  # sometimes a transport feeds bytes instead
            k = min(len(data) - pos, rng.choice((1, 5000, 70_000)))
            client.receive_data(data[pos : pos + k])
            pos += k
            while (event := client.next_event()) is not NEED_DATA:
                assert isinstance(event, ReplyReceived)
                replies.append(event)
    return replies


def test_large_read_payloads_are_received_into_their_own_array_and_handed_out_read_only(
) -> None:
    """A large READ payload not yet all in is read straight into an array of its own
    (get_buffer hands out its remaining room, never more: the next reply's bytes do not
    land in it) and comes out as a read-only view; small ones still come out as bytes.
    Simple and structured replies, reads cut anywhere, the offset of a data chunk too."""
    for structured in (True, False):
        rng = random.Random(8 if structured else 9)
        client = in_transmission(structured)
        expected: dict[int, bytes] = {}
        stream = b""
        for i in range(40):
            length = rng.choice((4096, 65_536, 262_144, 1 << 20))
            cookie, _ = client.request(Command.READ, i * 4096, length)
            data = rng.randbytes(length)
            expected[cookie] = data
            if structured:
                stream += chunk(DONE, 1, cookie, u64(i * 4096) + data)  # OFFSET_DATA
            else:
                stream += struct.pack(">IIQ", 0x67446698, 0, cookie) + data
        direct: list[int] = []
        replies = _deliver_and_parse(client, stream, rng, direct)
        assert {r.cookie: bytes(r.data) for r in replies} == expected
        assert direct  # some payloads were received in place
        for r in replies:
            if isinstance(r.data, memoryview):
                assert r.data.readonly
                assert len(r.data) >= 65_536
            elif len(r.data) < 65_536:
                assert isinstance(r.data, bytes)
        assert any(isinstance(r.data, memoryview) for r in replies)
        assert client.in_flight == 0
