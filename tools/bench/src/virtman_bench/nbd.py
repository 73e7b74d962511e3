"""Benchmark NBD servers against each other on the same raw file.

Servers (select with ``--servers``):

* ``qemu-nbd``      -- qemu-nbd, read-only, persistent, up to 8 clients, cache=writeback.
* ``nbdkit``        -- ``nbdkit file``, read-only.
* ``virtman``       -- ``python -m virtman serve FILE --read-only``.
* ``virtman-relay`` -- a virtman caching relay (``serve --upstream ... --cache-dir ...``) in
  front of a qemu-nbd origin (as above, on its own socket).  Its cold fill (one full sequential
  read through the empty cache) is timed ``--repeat`` times, each by a fresh relay over an
  empty cache; the last fill leaves the cache warm for the warm measurements.
* ``nbdkit-relay``  -- the C peer doing the same job: ``nbdkit --filter=cache nbd`` with
  ``cache-on-read=true`` in front of the same kind of qemu-nbd origin, its cache in the temp
  dir; cold fill timed the same way.  The run prints how virtman-relay compares with it
  ("virtman-relay vs nbdkit-relay: cold, warm, 4k, CPU/GiB") and stores that in the JSON
  (``relay_vs_nbdkit``).
* ``virtman+tls``, ``virtman-relay+tls`` -- the same two with TLS (``--tls-cert/--tls-key/
  --tls-ca``, client certificates required; the relay reads its origin over TLS too). ``--tls``
  adds each right after its plaintext twin, so the two are measured in the same run, and
  prints what TLS costs. Certificates come from ``virtman.pki`` in the temp dir; the clients
  are libnbd: nbdinfo and nbdcopy with ``nbds+unix://...&tls-certificates=DIR``, fio (whose
  engine does not allow that parameter) with ``HOME`` set so that libnbd finds the same
  DIR at its default place, ``$HOME/.pki/libnbd``. libnbd looks only in /etc/pki/libnbd for
  root, so as root fio runs in a user namespace (``unshare --user --map-user=65534``), where
  it is not root but still owns the sockets and files.

Every server listens on a Unix socket in a private temp dir; no network traffic is generated.

Measurements, per server:

1. Sequential read throughput: ``nbdcopy URI null:`` over the whole export, nbdcopy defaults
   (multi-conn if the server advertises it, up to 4 connections capped at the core count, 64
   requests in flight per connection).  One (verbose) warm-up run -- which also tells us how many
   connections nbdcopy opened -- then ``--repeat`` timed runs; ``--stat`` picks median or best.
   The same is repeated with ``--connections=1`` to show whether multi-conn matters.
2. 4 KiB random-read IOPS: fio with the libnbd engine (``ioengine=nbd``), ``rw=randread bs=4k
   iodepth=64``, time based, for each ``--numjobs`` value (each fio job is one NBD connection).
   If fio lacks the nbd engine, falls back to ``nbdcopy --request-size=4096 URI null:`` over the
   whole export and reports that as "4k sequential-request IOPS".

3. CPU: the front server process's user+system CPU (``/proc/PID/stat`` utime+stime, before and
   after) over the cold fill and over the timed warm sequential reads, as CPU seconds per GiB
   read (``cpu_s_per_gib_cold``, ``cpu_s_per_gib_warm``, and ``cpu_s_per_gib`` over both).  The
   origin of a relay is not counted: it is the same qemu-nbd for both relays.

MB/s means 10**6 bytes per second.  Ratios are relative to qemu-nbd measured in the same run.

Run as ``python -m virtman_bench.nbd`` or ``bench/nbd_throughput.py``.  Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from virtman import sizes
from virtman.childprocess import ChildProcess
from virtman.errors import BenchError, ConfigError, ProcessFailed
from virtman.limits import CHILD_LOG_TAIL_CHARS, MiB
from virtman.protocol.uri import NbdAddress, parse_nbd_uri
from virtman_bench.limits import (
    BENCH_SERVER_READY_TIMEOUT_SECONDS,
    BENCH_SERVER_STOP_GRACE_SECONDS,
)

ALL_SERVERS: tuple[str, ...] = (
    "qemu-nbd", "nbdkit", "virtman", "virtman-relay", "nbdkit-relay")
#: TLS twins of the virtman servers (``--tls`` adds them; ``--servers`` may name them).
TLS_SUFFIX = "+tls"
TLS_SERVERS: tuple[str, ...] = ("virtman+tls", "virtman-relay+tls")
BASELINE = "qemu-nbd"
#: The relay comparison: ours against the C peer doing the same job.
RELAY, PEER_RELAY = "virtman-relay", "nbdkit-relay"
EXPORT_NAME = "bench"

# ---------------------------------------------------------------------------------------------
# small helpers


class CommandLog:
    """Every distinct command line the harness ran, in order of first use."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self.commands: list[str] = []

    def add(self, argv: Sequence[str]) -> str:
        line = shlex.join(argv)
        if line not in self._seen:
            self._seen.add(line)
            self.commands.append(line)
        return line


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``4096``: at least 1 MiB and a multiple of 4096."""
    try:
        value = sizes.parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    if value < MiB or value % 4096:
        raise argparse.ArgumentTypeError(f"size must be >= 1 MiB and a multiple of 4096: {text!r}")
    return value


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def parse_servers(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ALL_SERVERS + TLS_SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(ALL_SERVERS + TLS_SERVERS)}"
        )
    return list(dict.fromkeys(names))


def with_tls_twins(servers: Sequence[str]) -> list[str]:
    """``servers`` with each virtman server followed by its TLS twin (``--tls``)."""
    out: list[str] = []
    for name in servers:
        out.append(name)
        if name + TLS_SUFFIX in TLS_SERVERS:
            out.append(name + TLS_SUFFIX)
    return list(dict.fromkeys(out))


def nbd_uri(socket_path: Path, export: str = EXPORT_NAME, tls_dir: Path | None = None) -> str:
    """The libnbd URI of a benchmarked server; with ``tls_dir`` an ``nbds+unix`` URI whose
    ``tls-certificates`` names libnbd's certificate directory."""
    return NbdAddress(
        export=export,
        socket=str(socket_path),
        tls=tls_dir is not None,
        tls_certificates=str(tls_dir) if tls_dir is not None else None,
    ).uri()


def _tail(text: str, limit: int = CHILD_LOG_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _run_capture(argv: Sequence[str], timeout: float = 10.0) -> str | None:
    """Run a short informational command; return stdout+stderr, or None if it can't run."""
    try:
        cp = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (cp.stdout or "") + (cp.stderr or "")


def run_checked(
    argv: Sequence[str],
    log: CommandLog,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
) -> float:
    """Run a client command, return wall-clock seconds; raise BenchError on failure.
    ``env`` replaces the environment; its HOME is written into the command log."""
    log.add(["env", f"HOME={env['HOME']}", *argv] if env and "HOME" in env else argv)
    t0 = time.perf_counter()
    try:
        cp = subprocess.run(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: timed out after {timeout:.0f}s: {shlex.join(argv)}") from exc
    elapsed = time.perf_counter() - t0
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace")
        raise BenchError(f"{what}: exit status {cp.returncode}: {shlex.join(argv)}\n{_tail(err)}")
    return elapsed


# ---------------------------------------------------------------------------------------------
# machine description


def _first_line(text: str | None) -> str | None:
    if text is None:
        return None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tool_version(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    return _first_line(_run_capture(argv))


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "mem_total_bytes": mem_total_bytes(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "versions": {
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "nbdcopy": tool_version(["nbdcopy", "--version"]),
            "nbdinfo": tool_version(["nbdinfo", "--version"]),
            "fio": tool_version(["fio", "--version"]),
        },
    }


def fio_has_nbd_engine() -> bool:
    """True if this fio build lists the libnbd ``nbd`` ioengine in ``fio --enghelp``."""
    if shutil.which("fio") is None:
        return False
    out = _run_capture(["fio", "--enghelp"])
    if out is None:
        return False
    engines = {line.strip() for line in out.splitlines()[1:]}
    return "nbd" in engines


# ---------------------------------------------------------------------------------------------
# test data


def create_test_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of incompressible, non-zero, fully allocated data, quickly.

    One 1 MiB ``os.urandom`` block is reused, rotated by a different odd amount (i * 4099) for
    every MiB, so no two 4 KiB-aligned blocks repeat within 4 GiB (defeats dedup/zero detection
    in any cache under test).  fsync'd so writeback doesn't disturb the measurements.
    """
    base = os.urandom(MiB)
    doubled = memoryview(base + base)
    written = 0
    i = 0
    with open(path, "wb") as f:
        while written < size:
            k = (i * 4099) % MiB
            n = min(MiB, size - written)
            f.write(doubled[k : k + n])
            written += n
            i += 1
        f.flush()
        os.fsync(f.fileno())


def read_whole_file(path: Path) -> None:
    """Pull the file into the page cache so every server starts from the same cache state."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/PID/stat``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def cpu_per_gib(cpu_seconds: float, nbytes: int) -> float | None:
    return cpu_seconds / (nbytes / (1 << 30)) if nbytes > 0 else None


# ---------------------------------------------------------------------------------------------
# server process management


@dataclass
class Server:
    label: str
    socket: Path
    child: ChildProcess
    tls_dir: Path | None = None  # libnbd's certificate directory, for a TLS server

    @property
    def argv(self) -> list[str]:
        return self.child.argv

    @property
    def uri(self) -> str:
        return nbd_uri(self.socket, tls_dir=self.tls_dir)

    def describe_death(self) -> str | None:
        rc = self.child.returncode
        if rc is None:
            return None
        return f"server {self.label} exited with status {rc}; its stderr:\n" + (
            self.child.tail() or "(empty)")


def start_server(
    label: str,
    argv: list[str],
    socket_path: Path,
    workdir: Path,
    log: CommandLog,
    env: dict[str, str] | None = None,
    tls_dir: Path | None = None,
) -> Server:
    tmpdir = (env or {}).get("TMPDIR")
    log.add(["env", f"TMPDIR={tmpdir}", *argv] if env and tmpdir != os.environ.get("TMPDIR")
            else argv)  # nbdkit-relay's cache place is in its environment
    log_path = workdir / (re.sub(r"[^A-Za-z0-9._-]", "_", label) + ".stderr")
    try:
        # die_with_parent: the kernel SIGTERMs the server if the harness dies without
        # running its finally blocks (e.g. SIGKILL).
        child = ChildProcess.start(f"server {label}", argv, log_path, env=env, cwd=workdir,
                                   die_with_parent=True)
    except ProcessFailed as exc:
        raise BenchError(str(exc)) from exc
    return Server(label, socket_path, child, tls_dir)


def stop_server(server: Server, grace: float = BENCH_SERVER_STOP_GRACE_SECONDS) -> None:
    """SIGTERM the server's process group, SIGKILL after ``grace`` seconds, reap it."""
    server.child.stop(grace=grace)
    with contextlib.suppress(OSError):
        server.socket.unlink()


def wait_ready(
    server: Server,
    expected_size: int,
    log: CommandLog,
    timeout: float = BENCH_SERVER_READY_TIMEOUT_SECONDS,
) -> None:
    """Poll ``nbdinfo --size URI`` until the server answers with the expected size."""
    argv = ["nbdinfo", "--size", server.uri]
    log.add(argv)
    deadline = time.monotonic() + timeout
    last = ""

    def answers() -> bool:
        nonlocal last
        if not server.socket.exists():
            last = f"socket {server.socket} not created yet"
            return False
        try:
            cp = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(1.0, min(5.0, deadline - time.monotonic())),
                check=False,
            )
        except subprocess.TimeoutExpired:
            last = "nbdinfo timed out"
            return False
        if cp.returncode != 0:
            last = cp.stderr.strip()
            return False
        try:
            size = int(cp.stdout.strip())
        except ValueError:
            last = f"nbdinfo printed {cp.stdout.strip()!r}"
            return False
        if size != expected_size:
            raise BenchError(
                f"server {server.label}: export size {size} != file size {expected_size}"
            )
        return True

    try:
        server.child.wait_ready(answers, timeout)
    except ProcessFailed as exc:
        raise BenchError(f"{exc}\n(last: {last or 'nothing yet'}; "
                         f"command: {shlex.join(server.argv)})") from exc


# ---------------------------------------------------------------------------------------------
# server configurations


@dataclass
class BenchContext:
    file: Path
    file_size: int
    workdir: Path
    python: str
    log: CommandLog
    timeout: float
    virtman_env: dict[str, str] = field(default_factory=dict)
    tls: BenchTls | None = None
    cold_repeat: int = 1  # cold fills per relay (fresh relay, empty cache each)
    stat: str = "median"


@dataclass
class BenchTls:
    """Certificates of a TLS run: the servers' options and libnbd's client directory."""

    server_args: list[str]
    client_dir: Path  # HOME/.pki/libnbd
    home: Path

    def fio_target(self, uri: str) -> tuple[str, list[str], dict[str, str]]:
        """The URI, command prefix and environment fio's nbd engine connects with: no
        ``tls-certificates`` (the engine refuses it), HOME pointing at the directory, and
        not root (see the module docstring)."""
        address = parse_nbd_uri(uri)
        plain = NbdAddress(address.export, address.host, address.port, address.socket, tls=True)
        prefix = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
        return (plain.uri(), prefix if os.geteuid() == 0 else [],
                {**os.environ, "HOME": str(self.home)})


def make_bench_tls(workdir: Path) -> BenchTls:
    """A CA, a server certificate (valid for ``localhost``: libnbd checks that name over a
    Unix socket) and a client directory in libnbd's layout, all under ``workdir``."""
    from virtman.pki import init_ca, issue

    ca_dir = workdir / "tls-ca"
    init_ca(str(ca_dir))
    server = issue("bench-server", str(workdir / "tls-server"), str(ca_dir))
    client = issue("bench-client", str(workdir / "tls-client"), str(ca_dir))
    home = workdir / "tls-home"
    client_dir = home / ".pki" / "libnbd"
    client_dir.mkdir(mode=0o700, parents=True)
    shutil.copy(client.ca, client_dir / "ca-cert.pem")
    shutil.copy(client.cert, client_dir / "client-cert.pem")
    shutil.copy(client.key, client_dir / "client-key.pem")
    args = ["--tls-cert", server.cert, "--tls-key", server.key, "--tls-ca", server.ca]
    return BenchTls(args, client_dir, home)


def qemu_nbd_argv(file: Path, socket_path: Path) -> list[str]:
    return [
        "qemu-nbd",
        "--read-only",
        "--persistent",
        "--shared=8",
        "--format=raw",
        "--cache=writeback",
        "-k",
        str(socket_path),
        "-x",
        EXPORT_NAME,
        str(file),
    ]


def _nbdkit(socket_path: Path, *plugin: str) -> list[str]:
    """nbdkit serving ``plugin`` (and its filters) read-only on ``socket_path``."""
    return ["nbdkit", "--readonly", "--foreground", "-U", str(socket_path),
            "--exportname", EXPORT_NAME, *plugin]


def nbdkit_argv(file: Path, socket_path: Path) -> list[str]:
    return _nbdkit(socket_path, "file", f"file={file}")


def nbdkit_relay_argv(origin_socket: Path, socket_path: Path) -> list[str]:
    """nbdkit's nbd plugin reading ``origin_socket`` behind its cache filter, which keeps
    what is read (``cache-on-read``) in a file under ``$TMPDIR`` (nbdkit 1.32 has no
    ``cachedir`` parameter; see ``nbdkit_relay_env``)."""
    return _nbdkit(socket_path, "--filter=cache", "nbd", f"socket={origin_socket}",
                   f"export={EXPORT_NAME}", "cache-on-read=true")


def nbdkit_relay_env(cache_dir: Path) -> dict[str, str]:
    """nbdkit's environment: its cache filter makes its (unlinked) cache file in TMPDIR."""
    return {**os.environ, "TMPDIR": str(cache_dir)}


def virtman_origin_argv(
    python: str, file: Path, socket_path: Path, extra: Sequence[str] = ()
) -> list[str]:
    return [
        python,
        "-m",
        "virtman",
        "serve",
        str(file),
        "--socket",
        str(socket_path),
        "--export",
        EXPORT_NAME,
        "--read-only",
        *extra,
    ]


def virtman_relay_argv(
    python: str, upstream: str, cache_dir: Path, socket_path: Path, extra: Sequence[str] = ()
) -> list[str]:
    return [
        python,
        "-m",
        "virtman",
        "serve",
        "--upstream",
        upstream,
        "--cache-dir",
        str(cache_dir),
        "--socket",
        str(socket_path),
        "--export",
        EXPORT_NAME,
        *extra,
    ]


@dataclass
class Running:
    name: str
    uri: str
    servers: list[Server]
    front: Server  # the server the clients read (a relay, not its origin)
    cold: dict[str, float] | None = None  # a relay's cold fill: MB/s, CPU seconds

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.front.child.pid)

    def deaths(self) -> list[str]:
        return [d for s in self.servers if (d := s.describe_death()) is not None]


@contextlib.contextmanager
def running(name: str, ctx: BenchContext) -> Iterator[Running]:
    """Start the server configuration ``name``, wait until ready, always tear it down."""
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []

        tls = ctx.tls if name.endswith(TLS_SUFFIX) else None
        if name.endswith(TLS_SUFFIX) and tls is None:
            raise BenchError(f"{name} needs certificates: run with --tls")
        extra = tls.server_args if tls else []
        tls_dir = tls.client_dir if tls else None
        base = name.removesuffix(TLS_SUFFIX)

        def launch(label: str, argv: list[str], sock: Path, env: dict[str, str] | None) -> Server:
            srv = start_server(label, argv, sock, ctx.workdir, ctx.log, env, tls_dir)
            stack.callback(stop_server, srv)  # registered before waiting: always cleaned up
            servers.append(srv)
            wait_ready(srv, ctx.file_size, ctx.log)
            return srv

        sock = ctx.workdir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.sock"
        if name == "qemu-nbd":
            srv = launch(name, qemu_nbd_argv(ctx.file, sock), sock, None)
        elif name == "nbdkit":
            srv = launch(name, nbdkit_argv(ctx.file, sock), sock, None)
        elif base == "virtman":
            srv = launch(
                name, virtman_origin_argv(ctx.python, ctx.file, sock, extra), sock, ctx.virtman_env
            )
        elif base in (RELAY, PEER_RELAY):
            origin_sock = ctx.workdir / f"{base}-origin.sock"
            if tls is None:  # both relays read the same kind of origin: qemu-nbd
                origin = launch(f"{name}/origin", qemu_nbd_argv(ctx.file, origin_sock),
                                origin_sock, None)
            else:  # a TLS relay reads its origin over TLS: a virtman one with the same certs
                origin = launch(
                    f"{name}/origin",
                    virtman_origin_argv(ctx.python, ctx.file, origin_sock, extra),
                    origin_sock,
                    ctx.virtman_env,
                )
            cache_dir = ctx.workdir / f"{base}-cache"
            stack.callback(shutil.rmtree, cache_dir, True)
            # The cold fill: a full sequential read through an empty cache, ``--repeat``
            # times, each by a fresh relay over an emptied cache dir (the origin stays up).
            # The last one's cache stays warm for the measurements that follow.
            fills: list[tuple[float, float]] = []  # (seconds, CPU seconds)
            srv = origin
            for attempt in range(ctx.cold_repeat):
                if attempt:
                    stop_server(srv)
                    servers.remove(srv)
                    shutil.rmtree(cache_dir, ignore_errors=True)
                cache_dir.mkdir()
                if base == RELAY:
                    argv = virtman_relay_argv(ctx.python, origin.uri, cache_dir, sock, extra)
                    srv = launch(f"{name}/relay", argv, sock, ctx.virtman_env)
                else:
                    argv = nbdkit_relay_argv(origin_sock, sock)
                    srv = launch(f"{name}/relay", argv, sock, nbdkit_relay_env(cache_dir))
                cpu0 = process_cpu_seconds(srv.child.pid)
                t = run_checked(
                    ["nbdcopy", srv.uri, "null:"], ctx.log, ctx.timeout, f"{name} cold fill"
                )
                fills.append((t, process_cpu_seconds(srv.child.pid) - cpu0))
            rates = [ctx.file_size / t / 1e6 for t, _ in fills]
            cold = {
                "mb_s": pick(rates, ctx.stat),
                "cpu_seconds": statistics.median(c for _, c in fills),
            }
            print(
                f"  relay cold read (cache fill): {cold['mb_s']:,.0f} MB/s (runs: "
                f"{', '.join(f'{r:,.0f}' for r in rates)}), "
                f"{_fmt(cpu_per_gib(cold['cpu_seconds'], ctx.file_size), '.2f')} CPU s/GiB",
                flush=True,
            )
            yield Running(name, srv.uri, servers, srv, cold)
            return
        else:  # pragma: no cover - guarded by argument parsing
            raise BenchError(f"unknown server {name!r}")
        yield Running(name, srv.uri, servers, srv)


# ---------------------------------------------------------------------------------------------
# measurements

_CONN_RE = re.compile(r"connections=(\d+)\s+requests=(\d+)\s+threads=(\d+)")


def nbdcopy_warmup(uri: str, log: CommandLog, timeout: float) -> dict[str, int] | None:
    """One full verbose ``nbdcopy URI null:`` run (the warm-up); return what nbdcopy reports
    about its parallelism (connections, requests in flight, threads)."""
    argv = ["nbdcopy", "--verbose", uri, "null:"]
    log.add(argv)
    found: dict[str, int] | None = None
    tail: list[str] = []
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stderr is not None
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stderr:  # drained line by line: -v output is large
                if found is None and (m := _CONN_RE.search(line)):
                    found = {
                        "connections": int(m.group(1)),
                        "requests": int(m.group(2)),
                        "threads": int(m.group(3)),
                    }
                if not line.startswith("libnbd: debug"):
                    tail = [*tail[-20:], line]
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            timed_out = not watchdog.is_alive() and proc.returncode == -signal.SIGKILL
            watchdog.cancel()
    if timed_out:
        raise BenchError(f"nbdcopy warm-up timed out after {timeout:.0f}s: {shlex.join(argv)}")
    if rc != 0:
        raise BenchError(f"nbdcopy warm-up failed ({rc}): {shlex.join(argv)}\n{''.join(tail)}")
    return found


def measure_seq(
    uri: str,
    size: int,
    repeat: int,
    log: CommandLog,
    timeout: float,
    connections: int | None = None,
) -> list[float]:
    """``repeat`` timed full reads with ``nbdcopy [--connections=N] URI null:``; MB/s samples."""
    argv = ["nbdcopy"]
    if connections is not None:
        argv.append(f"--connections={connections}")
    argv += [uri, "null:"]
    return [size / run_checked(argv, log, timeout, "nbdcopy") / 1e6 for _ in range(repeat)]


def fio_argv(uri: str, numjobs: int, seconds: int, ramp: int, output: Path) -> list[str]:
    return [
        "fio",
        "--name=randread-4k",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=64",
        f"--numjobs={numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={seconds}",
        f"--ramp_time={ramp}",
        "--output-format=json",
        f"--output={output}",
    ]


def parse_fio_read_iops(report: dict[str, Any]) -> float:
    jobs = report.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise BenchError("fio JSON has no jobs")
    total = 0.0
    for job in jobs:
        if job.get("error"):
            raise BenchError(f"fio job {job.get('jobname')} reported error {job['error']}")
        total += float(job["read"]["iops"])
    return total


def measure_fio_iops(
    uri: str,
    numjobs: int,
    seconds: int,
    ramp: int,
    workdir: Path,
    log: CommandLog,
    tls: BenchTls | None = None,
) -> float:
    out = workdir / f"fio-{os.getpid()}-{numjobs}.json"
    env = None
    prefix: list[str] = []
    if tls is not None:
        uri, prefix, env = tls.fio_target(uri)
    argv = [*prefix, *fio_argv(uri, numjobs, seconds, ramp, out)]
    try:
        run_checked(argv, log, seconds + ramp + 60.0, "fio", env)
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read fio JSON output {out}: {exc}") from exc
        return parse_fio_read_iops(report)
    finally:
        with contextlib.suppress(OSError):
            out.unlink()


def measure_nbdcopy_4k(uri: str, size: int, log: CommandLog, timeout: float) -> float:
    """Fallback when fio has no nbd engine: whole-export read in 4 KiB requests.  nbdcopy has
    no offset/length option, so the "region" is the whole export."""
    argv = ["nbdcopy", "--request-size=4096", uri, "null:"]
    elapsed = run_checked(argv, log, timeout, "nbdcopy 4k")
    return math.ceil(size / 4096) / elapsed


# ---------------------------------------------------------------------------------------------
# reporting


def pick(samples: Sequence[float], stat: str) -> float:
    return max(samples) if stat == "best" else statistics.median(samples)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_machine(info: dict[str, Any]) -> None:
    print("machine:")
    mem = info.get("mem_total_bytes")
    print(
        f"  cpu:      {info['cpu_model']} ({info['cpu_count']} cpus, {info['cpu_usable']} usable)"
    )
    if mem:
        print(f"  memory:   {sizes.format_size(mem)}")
    print(f"  kernel:   {info['kernel']}")
    print(f"  python:   {info['python']}")
    for tool, ver in info["versions"].items():
        print(f"  {tool + ':':9} {ver or 'not found'}")


def print_table(
    results: dict[str, dict[str, Any]], numjobs: Sequence[int], iops_label: str, stat: str
) -> None:
    headers = ["server", f"seq MB/s ({stat})", "ratio", "seq 1-conn MB/s", "conns"]
    if iops_label == "fio":
        headers += [f"4k IOPS j={n}" for n in numjobs]
    headers += ["4k IOPS", "ratio", "cold MB/s", "CPU s/GiB"]
    rows: list[list[str]] = []
    for name, r in results.items():
        if r.get("error"):
            rows.append([name, "FAILED", "", "", "", *([""] * (len(headers) - 5))])
            continue
        par = r.get("nbdcopy") or {}
        row = [
            name,
            _fmt(r["seq_mb_s"], ",.0f"),
            _fmt(r["seq_ratio"], ".2f"),
            _fmt(r.get("seq_mb_s_1conn"), ",.0f"),
            str(par.get("connections", "?")),
        ]
        if iops_label == "fio":
            by = r.get("iops_4k_by_numjobs") or {}
            row += [_fmt(by.get(str(n)), ",.0f") for n in numjobs]
        row += [_fmt(r["iops_4k"], ",.0f"), _fmt(r["iops_ratio"], ".2f"),
                _fmt(r.get("cold_mb_s"), ",.0f"), _fmt(r.get("cpu_s_per_gib"), ".2f")]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for name, r in results.items():
        if r.get("error"):
            print(f"\n{name} FAILED:\n{r['error']}")


def tls_costs(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each TLS server against its plaintext twin of the same run: the ratios of its
    figures (1.0: TLS costs nothing; 0.5: half the throughput)."""
    costs: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        plain = results.get(name.removesuffix(TLS_SUFFIX))
        if not name.endswith(TLS_SUFFIX) or plain is None or r.get("error"):
            continue
        costs[name] = {
            "seq": ratio(r.get("seq_mb_s"), plain.get("seq_mb_s")),
            "seq_1conn": ratio(r.get("seq_mb_s_1conn"), plain.get("seq_mb_s_1conn")),
            "iops_4k": ratio(r.get("iops_4k"), plain.get("iops_4k")),
        }
    return costs


def relay_comparison(results: dict[str, dict[str, Any]]) -> dict[str, float | None] | None:
    """virtman-relay's figures over nbdkit-relay's, of the same run (cold and warm MB/s, 4k
    IOPS: above 1.0 is faster; CPU per GiB: below 1.0 is cheaper); None unless both ran."""
    ours, peer = results.get(RELAY), results.get(PEER_RELAY)
    if ours is None or peer is None or ours.get("error") or peer.get("error"):
        return None
    return {
        "cold": ratio(ours.get("cold_mb_s"), peer.get("cold_mb_s")),
        "warm": ratio(ours.get("seq_mb_s"), peer.get("seq_mb_s")),
        "iops_4k": ratio(ours.get("iops_4k"), peer.get("iops_4k")),
        "cpu_per_gib": ratio(ours.get("cpu_s_per_gib"), peer.get("cpu_s_per_gib")),
        "cpu_per_gib_cold": ratio(ours.get("cpu_s_per_gib_cold"), peer.get("cpu_s_per_gib_cold")),
        "cpu_per_gib_warm": ratio(ours.get("cpu_s_per_gib_warm"), peer.get("cpu_s_per_gib_warm")),
    }


def format_relay_comparison(c: dict[str, float | None]) -> str:
    return (
        f"{RELAY} vs {PEER_RELAY}: cold {_fmt(c['cold'], '.2f')}x, warm {_fmt(c['warm'], '.2f')}x,"
        f" 4k {_fmt(c['iops_4k'], '.2f')}x, CPU/GiB {_fmt(c['cpu_per_gib'], '.2f')}x"
        f" (cold {_fmt(c['cpu_per_gib_cold'], '.2f')}x, warm {_fmt(c['cpu_per_gib_warm'], '.2f')}x)"
    )


def print_tls_costs(costs: dict[str, dict[str, float | None]]) -> None:
    if not costs:
        return
    print("\nTLS against plaintext (same run; TLS figure / plaintext figure):")
    for name, c in costs.items():
        print(
            f"  {name:20} seq {_fmt(c['seq'], '.2f')}  seq 1-conn {_fmt(c['seq_1conn'], '.2f')}"
            f"  4k IOPS {_fmt(c['iops_4k'], '.2f')}"
        )


# ---------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtman bench nbd",
        description="Compare NBD servers (qemu-nbd, nbdkit, virtman, virtman relay) serving the "
        "same raw file: sequential read MB/s (nbdcopy) and 4 KiB random-read IOPS (fio).",
    )
    p.add_argument(
        "--servers",
        type=parse_servers,
        default=list(ALL_SERVERS),
        help=f"comma-separated subset of {','.join(ALL_SERVERS + TLS_SERVERS)} "
        f"(default: {','.join(ALL_SERVERS)})",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also measure each virtman server with TLS and client certificates, right "
        "after its plaintext twin, and print what TLS costs",
    )
    p.add_argument(
        "--size", type=parse_size, default=1 << 30, help="test file size, binary units (default 1G)"
    )
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help="use this existing raw file instead of generating one (not deleted)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed nbdcopy runs per server (3)")
    p.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="how to combine the --repeat runs (median)",
    )
    p.add_argument("--seconds", type=int, default=5, help="fio time-based runtime (5)")
    p.add_argument("--ramp-seconds", type=int, default=1, help="fio ramp_time, not counted (1)")
    p.add_argument(
        "--numjobs",
        type=parse_int_list,
        default=[1, 4],
        help="fio numjobs values to try, one NBD connection per job (1,4); "
        "4k IOPS is the best of them",
    )
    p.add_argument(
        "--iops-tool",
        choices=("auto", "fio", "nbdcopy"),
        default="auto",
        help="auto: fio if it has the nbd engine, else nbdcopy 4k requests",
    )
    p.add_argument(
        "--no-single-conn",
        dest="single_conn",
        action="store_false",
        help="skip the nbdcopy --connections=1 comparison",
    )
    p.add_argument(
        "--json", type=Path, default=None, help="write results here (default ./bench-nbd.json)"
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where to create the temp dir (test file, sockets, relay cache)",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter used for `python -m virtman serve` (this one)",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per client command timeout in seconds (600)"
    )
    return p


def _required_tools(servers: Sequence[str], iops_tool: str) -> list[str]:
    tools = ["nbdinfo", "nbdcopy"]
    if {"qemu-nbd", RELAY, PEER_RELAY} & set(servers):
        tools.append("qemu-nbd")  # the plaintext relays' origin too
    if {"nbdkit", PEER_RELAY} & set(servers):
        tools.append("nbdkit")
    if iops_tool == "fio":
        tools.append("fio")
    return tools


def _virtman_env() -> dict[str, str]:
    """Environment for ``python -m virtman``: make this source tree importable."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # .../src
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def bench_server(
    name: str, ctx: BenchContext, args: argparse.Namespace, iops_method: str
) -> dict[str, Any]:
    r: dict[str, Any] = {"seq_mb_s": None, "iops_4k": None, "seq_ratio": None, "iops_ratio": None}
    print(f"\n== {name}", flush=True)
    with running(name, ctx) as run:
        try:
            r["uri"] = run.uri
            if run.cold is not None:
                r["cold_mb_s"] = run.cold["mb_s"]
                r["cold_cpu_seconds"] = run.cold["cpu_seconds"]
                r["cpu_s_per_gib_cold"] = cpu_per_gib(run.cold["cpu_seconds"], ctx.file_size)
            r["nbdcopy"] = nbdcopy_warmup(run.uri, ctx.log, ctx.timeout)
            cpu0 = run.cpu_seconds()
            samples = measure_seq(run.uri, ctx.file_size, args.repeat, ctx.log, ctx.timeout)
            warm_cpu = run.cpu_seconds() - cpu0
            r["seq_mb_s_samples"] = samples
            r["seq_mb_s"] = pick(samples, args.stat)
            r["warm_cpu_seconds"] = warm_cpu
            r["cpu_s_per_gib_warm"] = cpu_per_gib(warm_cpu, ctx.file_size * args.repeat)
            read = ctx.file_size * (args.repeat + (1 if run.cold is not None else 0))
            r["cpu_s_per_gib"] = cpu_per_gib(warm_cpu + r.get("cold_cpu_seconds", 0.0), read)
            print(
                f"  seq read: {r['seq_mb_s']:,.0f} MB/s  (runs: "
                f"{', '.join(f'{s:,.0f}' for s in samples)}; nbdcopy {r['nbdcopy']}), "
                f"{_fmt(r['cpu_s_per_gib_warm'], '.2f')} CPU s/GiB",
                flush=True,
            )
            if args.single_conn:
                one = measure_seq(run.uri, ctx.file_size, args.repeat, ctx.log, ctx.timeout, 1)
                r["seq_mb_s_1conn_samples"] = one
                r["seq_mb_s_1conn"] = pick(one, args.stat)
                print(f"  seq read, 1 connection: {r['seq_mb_s_1conn']:,.0f} MB/s", flush=True)
            if iops_method == "fio":
                by: dict[str, float] = {}
                for n in args.numjobs:
                    by[str(n)] = measure_fio_iops(
                        run.uri,
                        n,
                        args.seconds,
                        args.ramp_seconds,
                        ctx.workdir,
                        ctx.log,
                        ctx.tls if name.endswith(TLS_SUFFIX) else None,
                    )
                    print(
                        f"  4k randread, iodepth 64, numjobs {n}: {by[str(n)]:,.0f} IOPS",
                        flush=True,
                    )
                r["iops_4k_by_numjobs"] = by
                r["iops_4k"] = max(by.values())
            else:
                r["iops_4k"] = measure_nbdcopy_4k(run.uri, ctx.file_size, ctx.log, ctx.timeout)
                print(f"  4k sequential-request IOPS (nbdcopy): {r['iops_4k']:,.0f}", flush=True)
        except BenchError as exc:
            deaths = run.deaths()
            raise BenchError("\n".join([str(exc), *deaths])) from exc
        deaths = run.deaths()
        if deaths:
            raise BenchError("server died during the measurements:\n" + "\n".join(deaths))
    return r


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.seconds < 1 or args.ramp_seconds < 0:
        print("error: --repeat and --seconds must be >= 1, --ramp-seconds >= 0", file=sys.stderr)
        return 2
    servers: list[str] = with_tls_twins(args.servers) if args.tls else args.servers
    json_path: Path = args.json if args.json is not None else Path.cwd() / "bench-nbd.json"

    has_fio_nbd = fio_has_nbd_engine()
    if args.iops_tool == "fio" and not has_fio_nbd:
        print("error: fio is missing or lacks the nbd (libnbd) ioengine", file=sys.stderr)
        return 2
    iops_method = (
        "fio"
        if args.iops_tool == "fio" or (args.iops_tool == "auto" and has_fio_nbd)
        else "nbdcopy"
    )
    missing = [t for t in _required_tools(servers, iops_method) if shutil.which(t) is None]
    if missing:
        print(f"error: required tool(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2

    info = machine_info()
    info["fio_nbd_engine"] = has_fio_nbd
    print_machine(info)
    iops_desc = (
        f"fio ioengine=nbd rw=randread bs=4k iodepth=64, {args.seconds}s (+{args.ramp_seconds}s "
        f"ramp), numjobs {','.join(map(str, args.numjobs))}; 4k IOPS = best numjobs"
        if iops_method == "fio"
        else "4k sequential-request IOPS: nbdcopy --request-size=4096 over the whole export "
        "(fio has no nbd engine, so this is NOT random-read IOPS)"
    )
    print(f"  fio nbd engine: {'yes' if has_fio_nbd else 'no'}")
    print(f"iops method: {iops_desc}")

    log = CommandLog()
    results: dict[str, dict[str, Any]] = {}
    prev_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="vmbench-", dir=args.tmpdir))
    file_size = 0
    try:
        if args.file is not None:
            test_file = args.file.resolve()
            file_size = test_file.stat().st_size
            print(f"test file: {test_file} ({sizes.format_size(file_size)}, existing)")
        else:
            test_file = workdir / "disk.raw"
            t0 = time.perf_counter()
            create_test_file(test_file, args.size)
            file_size = args.size
            print(
                f"test file: {test_file} ({sizes.format_size(file_size)}, generated in "
                f"{time.perf_counter() - t0:.1f}s)"
            )
        read_whole_file(test_file)
        ctx = BenchContext(
            test_file, file_size, workdir, args.python, log, args.timeout, _virtman_env(),
            cold_repeat=args.repeat, stat=args.stat,
        )
        if any(name.endswith(TLS_SUFFIX) for name in servers):
            ctx.tls = make_bench_tls(workdir)
        for name in servers:
            try:
                results[name] = bench_server(name, ctx, args, iops_method)
            except BenchError as exc:
                print(f"  FAILED: {exc}", flush=True)
                results[name] = {
                    "seq_mb_s": None,
                    "iops_4k": None,
                    "seq_ratio": None,
                    "iops_ratio": None,
                    "error": str(exc),
                }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, prev_handler)

    base = results.get(BASELINE, {})
    for r in results.values():
        r["seq_ratio"] = ratio(r["seq_mb_s"], base.get("seq_mb_s"))
        r["iops_ratio"] = ratio(r["iops_4k"], base.get("iops_4k"))
        if "seq_mb_s_1conn" in r:
            r["seq_1conn_ratio"] = ratio(r["seq_mb_s_1conn"], base.get("seq_mb_s_1conn"))

    print(
        f"\nresults ({sizes.format_size(file_size)} file; MB = 10^6 bytes; ratios vs {BASELINE}"
        f"{'' if BASELINE in results else ' (not measured: n/a)'}):"
    )
    print_table(results, args.numjobs, iops_method, args.stat)
    costs = tls_costs(results)
    print_tls_costs(costs)
    versus = relay_comparison(results)
    if versus is not None:
        print("\n" + format_relay_comparison(versus))

    doc: dict[str, Any] = {
        "machine": info,
        "file_size": file_size,
        "results": results,
        "tls_vs_plaintext": costs,
        "relay_vs_nbdkit": versus,
        "commands": log.commands,
        "settings": {
            "servers": servers,
            "tls": args.tls,
            "repeat": args.repeat,
            "stat": args.stat,
            "seconds": args.seconds,
            "ramp_seconds": args.ramp_seconds,
            "numjobs": args.numjobs,
            "iops_method": iops_method,
            "iops_description": iops_desc,
            "baseline": BASELINE,
        },
    }
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
