"""Boot profiles: which chunks of an image boots read, in the order they first read them.

A boot reads the same few percent of an image every time. A profile is that set, as
chunk indices ordered by when a boot first read each (seconds from the VM's start), so
an agent can fetch it ahead of the VMs (``blockdev.prefetch``) in the order they will
want it. Profiles come from recorded boots (``run_from_reads``: one VM's first reads),
from a boot trace (``profile_from_trace``), or from a file an operator imports; Volt
merges the runs agents send (``BootProfile.merge``) and keeps one profile per image.

Merging: the union of the chunks, each at the earliest time any run first read it.
The earliest, not a mean: a chunk one boot needs at 1 s must be there by 1 s, whatever
the others did. A chunk only some boots read is kept (``runs_read`` says how many): it
costs one chunk of prefetch where a miss would cost a round trip during a boot.

Pure code: no I/O. Every profile that comes in from outside (an agent, a file) goes
through ``BootProfile.from_doc``, which checks it against the image it is for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from virtman.errors import ConfigError, excerpt

#: Seconds from a VM's start past which a first read is not part of its boot profile
#: entry (a profile doc saying more is refused: a clock gone wrong, not a boot).
MAX_PROFILE_SECONDS = 86_400.0
#: The version of the profile document (``to_doc``).
PROFILE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    chunk: int
    #: Seconds from the VM's start to the first read of the chunk (earliest over runs).
    seconds: float
    #: How many of the merged runs read it.
    runs_read: int = 1


@dataclass(frozen=True)
class BootProfile:
    """One image's boot profile: entries in first-read order, and the runs merged."""

    chunk_size: int
    entries: tuple[ProfileEntry, ...]
    runs: int = 1

    @property
    def chunks(self) -> list[int]:
        return [e.chunk for e in self.entries]

    def bytes(self, image_size: int) -> int:
        """Bytes the profile covers in an image of ``image_size`` (its last chunk may be
        short)."""
        cs = self.chunk_size
        return sum(min(cs, image_size - e.chunk * cs) for e in self.entries)

    def merge(self, other: BootProfile) -> BootProfile:
        """This profile and ``other`` as one: see the module docstring."""
        if other.chunk_size != self.chunk_size:
            raise ConfigError(
                f"a profile in chunks of {other.chunk_size} bytes cannot merge into one of "
                f"{self.chunk_size}"
            )
        merged: dict[int, ProfileEntry] = {e.chunk: e for e in self.entries}
        for e in other.entries:
            seen = merged.get(e.chunk)
            if seen is None:
                merged[e.chunk] = e
            else:
                merged[e.chunk] = ProfileEntry(
                    e.chunk, min(seen.seconds, e.seconds), seen.runs_read + e.runs_read
                )
        return BootProfile(self.chunk_size, _ordered(merged.values()), self.runs + other.runs)

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "chunk_size": self.chunk_size,
            "runs": self.runs,
            # [chunk, seconds, runs that read it]: compact, for images of 10^5 chunks.
            "entries": [[e.chunk, round(e.seconds, 3), e.runs_read] for e in self.entries],
        }

    @classmethod
    def from_doc(cls, doc: object, *, chunk_size: int, image_size: int) -> BootProfile:
        """A profile document checked against the image it is for; ``ConfigError``
        naming the first thing wrong."""
        if not isinstance(doc, dict):
            raise ConfigError("a boot profile is a JSON object")
        fmt = doc.get("format", PROFILE_FORMAT)
        if fmt != PROFILE_FORMAT:
            raise ConfigError(f"boot profile format {_shown(fmt)} is not {PROFILE_FORMAT}")
        if doc.get("chunk_size") != chunk_size:
            raise ConfigError(
                f"boot profile is in chunks of {_shown(doc.get('chunk_size'))} bytes; the "
                f"image's chunks are {chunk_size} bytes"
            )
        runs = doc.get("runs", 1)
        if not _whole(runs) or runs < 1:
            raise ConfigError(f"boot profile runs {_shown(runs)} is not a whole number >= 1")
        raw = doc.get("entries")
        if not isinstance(raw, list):
            raise ConfigError("boot profile entries must be a list of [chunk, seconds]")
        count = chunk_count(image_size, chunk_size)
        if len(raw) > count:
            raise ConfigError(
                f"boot profile lists {len(raw)} entries; the image has {count} chunks"
            )
        seen: set[int] = set()
        entries = []
        for i, item in enumerate(raw):
            entries.append(_entry(item, i, count, runs))
            if entries[-1].chunk in seen:
                raise ConfigError(f"boot profile entry {i}: chunk {entries[-1].chunk} twice")
            seen.add(entries[-1].chunk)
        return cls(chunk_size, _ordered(entries), runs)


def chunk_count(image_size: int, chunk_size: int) -> int:
    return -(-image_size // chunk_size)


def run_from_reads(
    reads: Iterable[tuple[float, int]], chunk_size: int
) -> BootProfile:
    """One boot's profile from its first reads: (seconds from start, chunk) pairs, each
    chunk once (the first occurrence counts)."""
    first: dict[int, ProfileEntry] = {}
    for seconds, chunk in reads:
        if chunk not in first:
            first[chunk] = ProfileEntry(chunk, max(0.0, seconds))
    return BootProfile(chunk_size, _ordered(first.values()), 1)


def profile_from_trace(
    requests: Iterable[tuple[float, str, int, int]], chunk_size: int, image_size: int
) -> BootProfile:
    """A profile seeded from a boot trace's rows (t, op, offset, length): its reads,
    by chunk, timed from the trace's first request. Reads past the image are refused."""
    reads: list[tuple[float, int]] = []
    start: float | None = None
    for t, op, offset, length in requests:
        start = t if start is None else start
        if op != "read" or not length:
            continue
        if offset + length > image_size:
            raise ConfigError(
                f"trace reads {offset}+{length}, past the image's {image_size} bytes"
            )
        first, last = offset // chunk_size, (offset + length - 1) // chunk_size
        reads.extend((t - start, c) for c in range(first, last + 1))
    return run_from_reads(reads, chunk_size)


def _ordered(entries: Iterable[ProfileEntry]) -> tuple[ProfileEntry, ...]:
    return tuple(sorted(entries, key=lambda e: (e.seconds, e.chunk)))


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(item: object, i: int, count: int, runs: int) -> ProfileEntry:
    if not isinstance(item, list) or len(item) not in (2, 3):
        raise ConfigError(f"boot profile entry {i} is not [chunk, seconds(, runs)]")
    chunk, seconds = item[0], item[1]
    runs_read = item[2] if len(item) == 3 else 1
    if not _whole(chunk) or not 0 <= chunk < count:
        raise ConfigError(f"boot profile entry {i}: chunk {_shown(chunk)} is not in 0..{count - 1}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not math.isfinite(seconds) or not 0 <= seconds <= MAX_PROFILE_SECONDS:
        raise ConfigError(
            f"boot profile entry {i}: seconds {_shown(seconds)} is not in "
            f"0..{MAX_PROFILE_SECONDS:g}"
        )
    if not _whole(runs_read) or not 1 <= runs_read <= runs:
        raise ConfigError(f"boot profile entry {i}: runs {_shown(runs_read)} is not in 1..{runs}")
    return ProfileEntry(chunk, float(seconds), runs_read)


def plan_runs(chunks: Iterable[int], batch_chunks: int, window: int) -> list[tuple[int, int]]:
    """The order to prefetch a profile's ``chunks`` in: (first chunk, count) runs of
    adjacent chunks, at most ``batch_chunks`` long, for one upstream request each.

    The profile is taken ``window`` entries at a time; within a window the chunks are
    joined into runs of adjacent indices, and the runs go out in the order of their
    earliest entry. A boot reads in small scattered requests: joining only neighbours in
    profile order would leave most requests one chunk long, while sorting the whole
    profile would fetch the end of a boot before its start.
    """
    if batch_chunks < 1 or window < 1:
        raise ConfigError(f"batch of {batch_chunks} chunks, window of {window}: both must be >= 1")
    order = list(dict.fromkeys(chunks))  # each chunk once, first place kept
    runs: list[tuple[int, int]] = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        rank = {c: i for i, c in enumerate(part)}
        pieces: list[tuple[int, int, int]] = []  # (earliest rank, first, count)
        for c in sorted(part):
            if pieces and pieces[-1][1] + pieces[-1][2] == c and pieces[-1][2] < batch_chunks:
                first_rank, first, count = pieces[-1]
                pieces[-1] = (min(first_rank, rank[c]), first, count + 1)
            else:
                pieces.append((rank[c], c, 1))
        runs.extend((first, count) for _, first, count in sorted(pieces))
    return runs


def _shown(value: object) -> str:
    """A value from outside, for an error message: its repr, bounded."""
    return excerpt(repr(value), 60)
