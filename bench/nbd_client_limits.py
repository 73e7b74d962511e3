#!/usr/bin/env python3
"""What the NBD server's client limits cost, against a real `virtman serve` process.

1. Refused connections: one client holds the only slot (``--max-connections 1``), then
   ``--connects`` clients connect and are closed before the greeting. Prints refusals per
   second, the server's CPU time per refusal and the log lines they cost.
2. Refused writes: ``--writes`` WRITE requests (no payload) to a read-only export, all
   pipelined on one connection. Prints the log growth against the bytes received.

    bench/nbd_client_limits.py [--connects 5000] [--writes 10000]

Unix sockets in a private temp dir; standard library only.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from virtman.protocol.nbd.constants import (  # noqa: E402
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlag,
    Command,
    Option,
    Reply,
)


class Server:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(1 << 20))
        self.sock = tmp / "s.sock"
        self.log = tmp / "serve.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "virtman", "serve", str(self.image), "--read-only",
                 "--socket", str(self.sock), "--export", "disk", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while not (self.sock.exists() and b"serving" in self.log.read_bytes()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"server did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SystemExit("server closed the connection")
        buf += chunk
    return buf


def _go(sock: socket.socket, export: bytes) -> None:
    _recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    body = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, Option.GO, len(body)) + body)
    while True:
        _, _, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
        _recv_exact(sock, length)
        if reply == Reply.ACK:
            return


def refused_connections(tmp: Path, count: int) -> None:
    server = Server(tmp, "--max-connections", "1")
    try:
        hold = socket.socket(socket.AF_UNIX)
        hold.connect(str(server.sock))
        _recv_exact(hold, 18)
        before = server.log.stat().st_size
        cpu, start = server.cpu_seconds(), time.monotonic()
        for _ in range(count):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(server.sock))
                try:
                    if sock.recv(64):
                        raise SystemExit("a connection over the limit got a greeting")
                except ConnectionResetError:
                    pass
        wall, used = time.monotonic() - start, server.cpu_seconds() - cpu
        hold.close()
    finally:
        server.stop()
    lines = server.log.read_bytes()[before:].decode().splitlines()
    about = [line for line in lines if "refused" in line or "more like this" in line]
    print(f"refused connections: {count} in {wall:.2f} s ({count / wall:,.0f}/s), server CPU "
          f"{used * 1e6 / count:.0f} us each, {len(about)} log lines")


def refused_writes(tmp: Path, count: int) -> None:
    server = Server(tmp)
    requests = b"".join(
        struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.WRITE, cookie, 0, 0)
        for cookie in range(1, count + 1)
    )
    try:
        before = server.log.stat().st_size
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(server.sock))
            _go(sock, b"disk")
            sender = threading.Thread(target=sock.sendall, args=(requests,))
            sender.start()
            _recv_exact(sock, 16 * count)
            sender.join()
    finally:
        server.stop()  # the count of held-back lines is written at stop
    grown = server.log.stat().st_size - before
    lines = server.log.read_bytes()[before:].count(b"refused WRITE")
    print(f"refused writes: {count} ({len(requests)} bytes received), log grew {grown} bytes "
          f"in {lines} lines: {grown / len(requests):.4f}x the bytes received")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=5000)
    parser.add_argument("--writes", type=int, default=10000)
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        refused_connections(Path(tmp), args.connects)
    with tempfile.TemporaryDirectory() as tmp:
        refused_writes(Path(tmp), args.writes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
