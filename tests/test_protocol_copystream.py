"""The clone/migrate copy stream codec, against literal bytes (not its own encoders)."""

from __future__ import annotations

import pytest

from virtman.errors import LocalProtocolError, PeerProtocolError
from virtman.protocol.copystream import (
    CopyStreamDecoder,
    CopyStreamError,
    DataRecord,
    StreamEnded,
    StreamStarted,
    encode_data,
    encode_end,
    encode_header,
)

SIZE = 1 << 20  # a 1 MiB image

# Hand-written wire bytes.
HEADER = b"VMCOPY1\n" + b"\x00\x00\x00\x00\x00\x10\x00\x00"  # image size 0x100000
REC1 = b"\x01" + b"\x00\x00\x00\x00\x00\x00\x10\x00" + b"\x00\x00\x00\x03" + b"abc"  # 4096
REC2 = b"\x01" + b"\x00\x00\x00\x00\x00\x0f\xff\xfe" + b"\x00\x00\x00\x02" + b"yz"  # last 2
REC_EMPTY = b"\x01" + bytes(8) + bytes(4)
END = b"\xff" + b"\x00" * 7 + b"\x03" + b"\x00" * 7 + b"\x05"  # 3 records, 5 bytes
STREAM = HEADER + REC1 + REC2 + REC_EMPTY + END
EVENTS = [
    StreamStarted(SIZE),
    DataRecord(4096, b"abc"),
    DataRecord(SIZE - 2, b"yz"),
    DataRecord(0, b""),
    StreamEnded(3, 5),
]


def drain(dec: CopyStreamDecoder) -> list[object]:
    out = []
    while (event := dec.next_event()) is not None:
        out.append(event)
    return out


def test_encoders_give_the_literal_bytes() -> None:
    assert encode_header(SIZE) == HEADER
    assert encode_data(4096, b"abc") == REC1
    assert encode_data(SIZE - 2, b"yz") == REC2
    assert encode_data(0, b"") == REC_EMPTY
    assert encode_end(3, 5) == END


def test_whole_stream_in_one_piece() -> None:
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(STREAM)
    assert drain(dec) == EVENTS
    assert dec.complete and (dec.records, dec.bytes) == (3, 5)
    dec.end_of_input()  # complete: no error


def test_byte_by_byte_gives_nothing_until_each_record_is_whole() -> None:
    dec = CopyStreamDecoder(SIZE)
    events: list[object] = []
    ends = {len(HEADER), len(HEADER + REC1), len(HEADER + REC1 + REC2),
            len(HEADER + REC1 + REC2 + REC_EMPTY), len(STREAM)}
    for i in range(len(STREAM)):
        dec.receive_data(STREAM[i : i + 1])
        got = drain(dec)
        assert len(got) == (1 if i + 1 in ends else 0), f"after byte {i + 1}: {got}"
        events += got
    assert events == EVENTS
    dec.end_of_input()


def test_trailing_bytes_of_the_next_record_wait_for_the_rest() -> None:
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(HEADER + REC1 + REC2[:5])
    assert drain(dec) == EVENTS[:2]
    dec.receive_data(REC2[5:] + REC_EMPTY + END)
    assert drain(dec) == EVENTS[2:]


def test_bytes_after_the_end_record_are_refused() -> None:
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(STREAM + b"\x01")
    with pytest.raises(CopyStreamError, match="1 bytes after the end record"):
        drain(dec)
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(STREAM)
    drain(dec)
    with pytest.raises(CopyStreamError, match="after the end record"):
        dec.receive_data(REC1)


@pytest.mark.parametrize("cut", range(len(STREAM)))
def test_every_truncation_is_a_cut_copy(cut: int) -> None:
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(STREAM[:cut])
    drain(dec)
    assert not dec.complete
    with pytest.raises(CopyStreamError, match="copy stream ended"):
        dec.end_of_input()


def test_truncation_messages_say_where() -> None:
    cases = [
        (HEADER[:3], "inside its header"),
        (HEADER + REC1[:7], "inside a record (7 bytes left)"),
        (HEADER + REC1, "without its end record after 1 records"),
    ]
    for data, words in cases:
        dec = CopyStreamDecoder(SIZE)
        dec.receive_data(data)
        drain(dec)
        with pytest.raises(CopyStreamError, match=words.replace("(", r"\(").replace(")", r"\)")):
            dec.end_of_input()


def test_oversize_record_is_refused_from_its_header_naming_the_limit() -> None:
    dec = CopyStreamDecoder(SIZE, max_record=4096)
    # Only the 13-byte record header: refused before any payload is buffered.
    dec.receive_data(HEADER + b"\x01" + bytes(8) + (4097).to_bytes(4, "big"))
    with pytest.raises(CopyStreamError, match="COPY_RECORD_BYTES=4096") as info:
        drain(dec)
    assert info.value.limit == "COPY_RECORD_BYTES"
    assert isinstance(info.value, PeerProtocolError)
    # At the limit is fine.
    dec = CopyStreamDecoder(SIZE, max_record=4096)
    dec.receive_data(HEADER + b"\x01" + bytes(8) + (4096).to_bytes(4, "big") + bytes(4096))
    assert drain(dec) == [StreamStarted(SIZE), DataRecord(0, bytes(4096))]


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(LocalProtocolError, match="COPY_RECORD_BYTES=4"):
        encode_data(0, b"12345", max_record=4)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"X", "not a copy stream"),
        (b"VMCOPY2\n", "not a copy stream"),
        (b"VMCOPY1\n" + (SIZE * 2).to_bytes(8, "big"), "2097152-byte image"),
        (HEADER + b"\x01" + (SIZE - 2).to_bytes(8, "big") + b"\x00\x00\x00\x03",
         "offset=1048574 length=3 is invalid"),
        (HEADER + b"\x02", "unknown kind 0x02"),
        (HEADER + REC1 + b"\xff" + (2).to_bytes(8, "big") + (3).to_bytes(8, "big"),
         "end record says 2 records of 3 bytes; 1 records of 3 bytes arrived"),
        (HEADER + REC1 + b"\xff" + (1).to_bytes(8, "big") + (4).to_bytes(8, "big"),
         "says 1 records of 4 bytes"),
    ],
)
def test_malformed_streams_are_refused_with_what_is_wrong(data: bytes, words: str) -> None:
    dec = CopyStreamDecoder(SIZE)
    dec.receive_data(data)
    with pytest.raises(CopyStreamError) as info:
        drain(dec)
    assert words in str(info.value)
