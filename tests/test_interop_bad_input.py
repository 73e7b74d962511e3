"""Hostile and broken input against a running `virtman serve` process, and bad CLI arguments.

The NBD tests speak the protocol by hand over a raw Unix socket in the test's temporary
directory: each sends one thing a client must not (or may, but the server must refuse),
checks the answer, checks that the connection (or, after a fatal violation, the server)
still works, and that the server logged exactly one warning about it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image, require

from virtman.protocol.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)

MiB = 1024 * 1024
SIZE = 1 * MiB
MAX_PAYLOAD = 32 * MiB


# --- a raw NBD client ------------------------------------------------------------------------


class RawNbd:
    """Just enough fixed-newstyle NBD, by hand, to send what a real client never would.

    No structured replies are negotiated, so every reply is a simple reply.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout: float = 10) -> bool:
        """True once the server closes the connection (after any bytes it still sends);
        False if it is still open after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    # handshake

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        assert flags & HandshakeFlag.FIXED_NEWSTYLE
        return int(flags)

    def start(self) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))

    def send_option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC
        return option, reply, self.recv_exact(length)

    def go(self, name: str) -> tuple[int, int]:
        """GO with `name`; return the export's (size, transmission flags)."""
        raw = name.encode()
        self.send_option(Option.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        while True:
            option, reply, data = self.option_reply()
            assert option == Option.GO
            if reply == Reply.ACK:
                break
            assert reply == Reply.INFO, f"GO answered {reply:#x}: {data!r}"
            if struct.unpack_from(">H", data)[0] == Info.EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
        assert size is not None and flags is not None
        return size, flags

    # transmission

    def request(
        self, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
    ) -> int:
        self._cookie += 1
        header = struct.pack(
            ">IHHQQI", REQUEST_MAGIC, flags, command, self._cookie, offset, length
        )
        self.sock.sendall(header + data)
        return self._cookie

    def reply(self, cookie: int, read_length: int = 0) -> tuple[int, bytes]:
        """(errno, data) of a simple reply; a successful READ carries `read_length` bytes."""
        magic, errno, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        assert got == cookie
        data = self.recv_exact(read_length) if errno == 0 and read_length else b""
        return errno, data

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self.reply(self.request(Command.READ, offset, length), length)

    def write(self, offset: int, data: bytes, length: int | None = None) -> int:
        n = len(data) if length is None else length
        return self.reply(self.request(Command.WRITE, offset, n, data))[0]


def connect(served) -> RawNbd:
    """A raw connection to `served`, through GO, in transmission."""
    nbd = RawNbd(served.socket)
    nbd.start()
    size, _ = nbd.go(served.export)
    assert size == SIZE
    return nbd


# --- checks on the server ---------------------------------------------------------------------


def warnings_in(served, *, settle: float = 0.2) -> list[str]:
    """The log's WARNING lines (waiting briefly for a late one to arrive)."""
    time.sleep(settle)
    return [line for line in served.log.read_text().splitlines() if " WARNING " in line]


def assert_one_warning(served, *fragments: str) -> None:
    lines = warnings_in(served)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_still_serving(served) -> None:
    assert served.proc.poll() is None, served.log.read_text()
    done = subprocess.run(
        ["nbdinfo", "--json", served.uri], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exports"][0]["export-size"] == SIZE


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, SIZE)


@pytest.fixture
def ro_server(serve, image):
    return serve("serve", str(image[0]), "--read-only", export="disk")


@pytest.fixture
def rw_server(serve, image):
    return serve("serve", str(image[0]), export="disk")


# --- handshake ----------------------------------------------------------------------------------


def test_garbage_client_flags_close_only_that_connection(ro_server) -> None:
    require("nbdinfo")
    with RawNbd(ro_server.socket) as bystander, RawNbd(ro_server.socket) as bad:
        bystander.start()
        bad.greeting()
        bad.sock.sendall(b"\xde\xad\xbe\xef" + b"more garbage" * 10)
        assert bad.closed_by_server()
        # A connection in the middle of its handshake is not disturbed.
        size, flags = bystander.go("disk")
        assert size == SIZE and flags & TransmissionFlag.READ_ONLY
        errno, data = bystander.read(0, 4096)
        assert errno == 0 and len(data) == 4096
    assert_still_serving(ro_server)
    assert_one_warning(ro_server, "broke the protocol")


def test_unknown_client_flag_bits_close_the_connection(ro_server) -> None:
    require("nbdinfo")
    with RawNbd(ro_server.socket) as bad:
        bad.greeting()
        flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES | (1 << 31)
        bad.sock.sendall(struct.pack(">I", flags))
        assert bad.closed_by_server(timeout=2), "server went on with unknown client flags"
    assert_still_serving(ro_server)
    assert_one_warning(ro_server, "broke the protocol", "client flags")


def test_bad_option_magic_closes_the_connection(ro_server) -> None:
    require("nbdinfo")
    with RawNbd(ro_server.socket) as bad:
        bad.start()
        bad.send_option(Option.GO, b"\0" * 6, magic=0x0123456789ABCDEF)
        assert bad.closed_by_server()
    assert_still_serving(ro_server)
    assert_one_warning(ro_server, "broke the protocol", "IHAVEOPT")


def test_unknown_option_is_unsupported_then_go_works(ro_server, image) -> None:
    with RawNbd(ro_server.socket) as nbd:
        nbd.start()
        nbd.send_option(0x4242, b"some option data")
        option, reply, message = nbd.option_reply()
        assert (option, reply) == (0x4242, Reply.ERR_UNSUP)
        assert message  # the server explains itself
        size, flags = nbd.go("disk")
        assert size == SIZE and flags & TransmissionFlag.READ_ONLY
        errno, data = nbd.read(1000, 5000)
        assert errno == 0 and data == image[1][1000:6000]
    assert ro_server.proc.poll() is None
    assert_one_warning(ro_server, "option refused", "ERR_UNSUP")


# --- transmission -------------------------------------------------------------------------------


def test_read_past_the_end_is_einval(ro_server, image) -> None:
    with connect(ro_server) as nbd:
        assert nbd.read(SIZE - 100, 200) == (Errno.EINVAL, b"")
        assert nbd.read(SIZE, 1) == (Errno.EINVAL, b"")
        assert nbd.read(SIZE - 100, 100) == (0, image[1][-100:])
    assert ro_server.proc.poll() is None
    # The second refusal of the same kind from the same peer is counted, not logged
    # (virtman.ratelog); the count is logged when the window closes or the server stops.
    assert_one_warning(ro_server, "past the end", "refused READ")
    ro_server.stop()
    assert "1 more like this (refused READ from unix uid=" in ro_server.log.read_text()


def test_write_to_read_only_export_is_eperm_and_payload_consumed(ro_server, image) -> None:
    path, data = image
    with connect(ro_server) as nbd:
        # The payload looks like a request header: if the server did not consume it, it
        # would run it as a READ of the whole export.
        fake = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.READ, 99, 0, SIZE)
        payload = fake + b"\xab" * (8192 - len(fake))
        assert nbd.write(0, payload) == Errno.EPERM
        assert nbd.read(0, 4096) == (0, data[:4096])
    assert path.read_bytes() == data
    assert ro_server.proc.poll() is None
    assert_one_warning(ro_server, "refused WRITE", "read-only", "EPERM")


def test_write_past_the_end_is_enospc(rw_server, image) -> None:
    path, data = image
    with connect(rw_server) as nbd:
        assert nbd.write(SIZE - 10, b"\xcd" * 20) == Errno.ENOSPC
        assert nbd.read(SIZE - 4096, 4096) == (0, data[-4096:])
    assert path.read_bytes() == data
    assert rw_server.proc.poll() is None
    assert_one_warning(rw_server, "refused WRITE", "past the end", "ENOSPC")


def test_oversized_read_is_einval_and_connection_survives(ro_server, image) -> None:
    with connect(ro_server) as nbd:
        assert nbd.read(0, MAX_PAYLOAD + 1) == (Errno.EINVAL, b"")
        assert nbd.read(0, 512) == (0, image[1][:512])
    assert ro_server.proc.poll() is None
    assert_one_warning(ro_server, "refused READ", "exceeds the maximum", "EINVAL")


def test_oversized_write_payload_is_discarded(rw_server, image) -> None:
    path, data = image
    with connect(rw_server) as nbd:
        assert nbd.write(0, b"\xee" * (MAX_PAYLOAD + 1)) == Errno.EINVAL
        assert nbd.read(0, 512) == (0, data[:512])
    assert path.read_bytes() == data
    assert rw_server.proc.poll() is None
    assert_one_warning(rw_server, "refused WRITE", "exceeds the maximum", "EINVAL")


def test_unknown_command_flag_is_einval(ro_server, image) -> None:
    with connect(ro_server) as nbd:
        cookie = nbd.request(Command.READ, 0, 512, flags=1 << 15)
        errno, _ = nbd.reply(cookie, 512)
        assert errno == Errno.EINVAL
        assert nbd.read(0, 512) == (0, image[1][:512])
    assert ro_server.proc.poll() is None
    assert_one_warning(ro_server, "refused READ", "EINVAL")


def test_bad_request_magic_closes_only_that_connection(ro_server) -> None:
    require("nbdinfo")
    with connect(ro_server) as nbd:
        nbd.sock.sendall(b"\x00" * 28)
        assert nbd.closed_by_server()
    assert_still_serving(ro_server)
    assert_one_warning(ro_server, "broke the protocol", "request magic")


# --- command line -------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtman", "serve", *args],
        capture_output=True, text=True, timeout=30, cwd=tmp_path)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("no-source", "exactly one of"),
        ("file-and-upstream", "exactly one of"),
        ("bad-uri", "http://x"),
        ("bad-listen", "nohost"),
        ("plaintext-tcp", "--insecure"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, case: str, fragment: str) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 4096)
    sock = str(tmp_path / "x.sock")
    args = {
        "no-source": ["--socket", sock],
        "file-and-upstream": [
            str(img), "--upstream", f"nbd+unix:///disk?socket={sock}",
            "--cache-dir", str(tmp_path / "c"), "--socket", sock,
        ],
        "bad-uri": ["--upstream", "http://x", "--cache-dir", str(tmp_path / "c"),
                    "--socket", sock],
        "bad-listen": [str(img), "--listen", "nohost"],
        "plaintext-tcp": [str(img), "--listen", "127.0.0.1:0"],
    }[case]
    done = _cli(tmp_path, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert fragment in lines[0] and "error" in lines[0]
    assert done.stdout == ""
    assert not Path(sock).exists()
