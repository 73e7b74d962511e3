"""Boot traces: what a guest asked of its disk, and when (pure: no I/O but parsing).

Format (see ``../shared/traces/README.md``): CSV with ``#`` comment lines and a header
``t,op,offset,length``; ``t`` in seconds since the first request, ``op`` one of
``read``, ``write``, ``flush``, ``offset`` and ``length`` in bytes.

For replay, requests recorded within ``BATCH_WINDOW`` seconds of the batch's first are
issued together (a guest's readahead bursts), and the gap between batch starts is the
think time slept before the next batch, divided by the speed-up.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

from virtman.errors import ConfigError

#: Requests this close (seconds) to the first of a batch go out together.
BATCH_WINDOW = 0.001
OPS = ("read", "write", "flush")
BUNDLED = "debian12-boot.csv"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    t: float
    op: str
    offset: int
    length: int


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[TraceRequest, ...]

    @property
    def duration(self) -> float:
        return self.requests[-1].t - self.requests[0].t if self.requests else 0.0

    @property
    def reads(self) -> list[TraceRequest]:
        return [r for r in self.requests if r.op == "read"]

    @property
    def end_offset(self) -> int:
        """Smallest image size the trace fits in."""
        return max((r.offset + r.length for r in self.requests), default=0)

    def working_set(self, chunk_size: int) -> int:
        """Distinct data the trace reads, counted in whole chunks of ``chunk_size``."""
        chunks: set[int] = set()
        for r in self.reads:
            if r.length:
                chunks.update(
                    range(r.offset // chunk_size, (r.offset + r.length - 1) // chunk_size + 1)
                )
        return len(chunks) * chunk_size

    def batches(self) -> list[tuple[float, list[TraceRequest]]]:
        """(think time before the batch, its requests), think time in recorded seconds."""
        out: list[tuple[float, list[TraceRequest]]] = []
        start = None
        for r in self.requests:
            if start is not None and r.t - start < BATCH_WINDOW:
                out[-1][1].append(r)
                continue
            gap = 0.0 if start is None else r.t - start
            out.append((gap, [r]))
            start = r.t
        return out

    def scaled(
        self, *, time_factor: float = 1.0, size_factor: float = 1.0, block: int = 4096
    ) -> Trace:
        """Stretch think times and spread reads over a larger image (for simulations)."""
        reqs = []
        for r in self.requests:
            offset = int(r.offset * size_factor) // block * block
            length = max(block, int(r.length * size_factor) // block * block) if r.length else 0
            reqs.append(TraceRequest(r.t * time_factor, r.op, offset, length))
        return Trace(f"{self.name} (x{time_factor:g} time, x{size_factor:g} size)", tuple(reqs))


def parse_trace(text: str, name: str = "trace") -> Trace:
    rows = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    reader = csv.DictReader(io.StringIO("\n".join(rows)))
    if reader.fieldnames is None or not {"t", "op", "offset", "length"} <= set(reader.fieldnames):
        raise ConfigError(f"{name}: header must name t, op, offset, length")
    requests: list[TraceRequest] = []
    for lineno, row in enumerate(reader, start=2):
        try:
            req = TraceRequest(
                float(row["t"]), row["op"].strip(), int(row["offset"]), int(row["length"])
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}: row {lineno}: {err}") from err
        if req.op not in OPS:
            raise ConfigError(f"{name}: row {lineno}: op {req.op!r} is not one of {OPS}")
        if req.offset < 0 or req.length < 0:
            raise ConfigError(f"{name}: row {lineno}: negative offset or length")
        if requests and req.t < requests[-1].t:
            raise ConfigError(f"{name}: row {lineno}: time goes backwards")
        requests.append(req)
    if not requests:
        raise ConfigError(f"{name}: no requests")
    return Trace(name, tuple(requests))


def load_trace(path: str | None = None) -> Trace:
    """A trace file, or the bundled Debian 12 boot trace when ``path`` is None."""
    if path is None:
        text = resources.files("virtman.replay").joinpath("data", BUNDLED).read_text()
        return parse_trace(text, BUNDLED)
    try:
        with open(path, encoding="utf-8") as f:
            return parse_trace(f.read(), path)
    except OSError as err:
        raise ConfigError(f"cannot read trace {path}: {err.strerror}") from err


def format_trace(requests: list[TraceRequest], header: str = "") -> str:
    """The CSV text of a trace (used to record one)."""
    lines = [f"# {line}" for line in header.splitlines()] + ["t,op,offset,length"]
    lines += [f"{r.t:.6f},{r.op},{r.offset},{r.length}" for r in requests]
    return "\n".join(lines) + "\n"
