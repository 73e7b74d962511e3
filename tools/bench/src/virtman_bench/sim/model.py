"""A discrete-event model of many hosts booting VMs from one image, or resuming them from
one bake (pure: no I/O).

Theory of operation
-------------------
The model answers one question: when has every VM booted, for N hosts with M VMs each,
when the image reaches the hosts in one of four ways (``mode``), or, in a fifth mode
(``uvm``, below), when is every VM running that was resumed from one bake:

- ``virtman``: hosts sit in the relay tree of the real planner
  (``RelayTree(TreeSettings(d, k))``, hosts joined in order ``host0..hostN-1``). A host
  fetches a chunk it lacks from its k parents in turn (round-robin over its requests);
  level-1 hosts fetch from the origin. Every host starts at time 0.
- ``paper``: the same tree with one parent per host (k = 1, ``parents`` is ignored), and
  the paper's iSCSI attach: a host at level L is attached, and its VMs start, at L x D
  (D = ``attach_delay``; its attach completes after its parent's). No origin fallback
  below level 1.
- ``star``: no host cache and no tree: every VM fetches every chunk it reads from the
  origin itself, so nothing is shared, not even between the VMs of one host.
- ``copy``: every host first copies the whole image from the origin, then its VMs boot
  from the local copy (T each, no network).

The boot of one VM is a *pattern*: a list of batches (think gap before the batch, the
chunks it reads). A VM sleeps the gap, asks for the batch's chunks at once, waits until
it holds all of them, sleeps the next gap, and so on. From a local disk this takes the
sum of the gaps, ``T`` (``boot_seconds``). Patterns come from a recorded boot trace
(``pattern_from_trace``) or are synthetic (``synthetic_pattern``: the W/C chunks in
order, one every T/(W/C) seconds).

Network. Every node (the origin and each host) has one uplink and one downlink of rate
B (full duplex), each a FIFO server. A chunk transfer from X to Y that becomes ready at
time r (the request reached X, and X holds the chunk) starts at
``max(r, X.up_free, Y.down_free)``, lasts C/B, and sets both ``X.up_free`` and
``Y.down_free`` to its end; Y holds the chunk one ``rtt`` after the end (the request
and the reply latency of that request, added once per request, after the transfer).
Transfers are reserved in the order they become ready, which is what makes the links
FIFO. That is the ``network="coupled"`` model: no TCP dynamics, no congestion
windows, no switch.

A caveat of the coupled model: a transfer that must wait for its receiver's downlink
keeps the sender's uplink reserved, idle, until it starts (and the other way round),
and every transfer queued behind it on either link waits too. With one parent per host
(k = 1) a downlink is fed by a single uplink and this never happens; with k >= 2 a
host's downlink is fed by k parents' queues and the idle reservations cascade through
the tree, which makes k = 2 look much slower than k = 1 (an artefact: real links are
not idle while data waits). ``network="switch"``, the default, models the hosts joined
by an output-queued switch instead (as the testbed's bridge is): the transfer occupies
X's uplink from ``su = max(r, X.up_free)`` for C/B, the switch buffers it, and Y's downlink from
``max(su, Y.down_free)`` for C/B; Y holds it one ``rtt`` after that. Each link then
works as long as it has something queued; a downlink still serves transfers in the
order they became ready at their senders. With k = 1 both models give the same times.

Caching and relaying. A host keeps every chunk it fetched (the cache never evicts). A
request for a chunk the host is already fetching waits for that fetch (coalescing). A
parent asked for a chunk it neither holds nor is fetching fetches it from its own
parents first, and forwards it when it arrives: data moves down the tree chunk by
chunk, store-and-forward, so each level costs one more chunk transfer plus one round
trip. Requests are not bounded in number (any number in flight per host).

VMs. The M VMs of a host run the same pattern in lockstep, so only one "lead" VM per
host is simulated: its reads drive the host's fetches, the other M-1 VMs read the same
chunks at the same moments, wait on the same (coalesced) fetches and finish at the same
time. Per-VM statistics weigh each host's finish time M times. In ``star`` mode the
VMs of a host do not share, so each chunk the lead VM reads is one transfer of M x C
bytes from the origin (the M VMs' fetches, back to back, finishing together). Each VM
keeps what it read itself (its page cache), so a star VM fetches each chunk once.

Copy. The origin uplink serves the N copies interleaved chunk by chunk (fair sharing,
as N parallel copies would get): with K = ceil(S/C) chunks and a last chunk of c_last
bytes, host j's copy ends at ``((K-1)*N*C + (j+1)*c_last) / B + rtt`` (requests are
pipelined, so one round trip per copy). That is closed form: copy runs no events.

Outputs. Times are from the moment every VM is asked to boot (t = 0), so ``paper``
boot times include the attach wait. ``floor_seconds`` is a physical bound to compare
with, from DESIGN.md ("a host cannot finish before T and before W/B") plus the store
and forward latency of the tree:

- tree modes (``paper``, ``virtman``): ``max(T, W/B) + depth*(C/B + rtt)``. The deepest
  host's first chunk crosses ``depth`` links, one chunk and one round trip each, while
  its VM thinks T in all; so with T >= W/B no host can finish earlier. With
  ``relay="cut-through"`` only the first link costs a chunk:
  ``max(T, W/B) + C/B + depth*rtt``. With W/B > T the
  true bound is C/B lower (the last chunk's own transfer is part of W/B); the origin
  also has to send min(N, d) x W, which at d >= 2 binds before W/B does
  (``egress_floor_seconds``). ``paper`` mode's attach wait (depth x D) is protocol, not
  physics, and is reported apart (``attach_seconds``).
- ``star``: ``max(T + M*C/B + rtt, N*M*W/B + rtt)``: the origin sends N x M x W.
- ``copy``: ``N*S/B + rtt + T``: the origin sends N copies of the image S.

``demand_floor_seconds`` (tree modes) is the boot of the VMs of one lone host reading
from the origin: T plus, for every batch that reads j chunks not read before, j x C/B
+ rtt. A VM that fetches each chunk when it first reads it cannot do better (only a
parent whose children asked for a chunk first can); the distance from
``floor_seconds`` to it is what prefetching could win.

Relaying. ``relay="store-and-forward"`` (the default, as the agent relays today) is the
above: a parent relays a chunk once it holds it whole. ``relay="cut-through"`` is the
counterfactual of relaying a chunk as its bytes arrive: a parent may start relaying a
chunk C/B before it holds it (when its own transfer started, plus the round trip), and
its child still holds it no earlier than one round trip after the parent does. Each
level below the first then costs its round trip only; the difference between the two is
the store-and-forward step, one C/B per level (2.1 ms at 1 GbE, 0.21 ms at 10 GbE for
256 KiB chunks).

Boot profiles and prefetch (``virtman`` mode, ``prefetch=True``). The profile is the
union of the chunks boots read, ordered by first read (``profile_of``; by default the
pattern's own, i.e. a profile recorded from the same boot). From t = 0 every host asks
for the profile's chunks it neither holds nor fetches, in profile order: a request is a
run of up to ``prefetch_batch_bytes`` of chunks adjacent in the image and in the
profile, with at most ``prefetch_inflight_bytes`` asked for and not yet received (a
request counts until its last chunk arrived) and, if ``prefetch_rate`` is set, requests
spaced so their bytes do not exceed it. Requests go to the origin (level 1) or to the
parents (in turn, or the first only: ``prefetch_from``). A parent that neither holds
nor fetches a chunk asked for fetches it as a demand read or, with
``prefetch_miss="prefetch"`` (the agent's prefetch export), as a prefetch request of
its own; a chunk the parent is fetching is relayed when it holds it.

Demand first. A prefetch chunk is queued at its sender (FIFO, in the order the sender
came to hold it for the request) and sent one chunk at a time, only while the sender's
uplink and the receiver's downlink are idle, so a demand transfer reserved later waits
at most for the one prefetch chunk on the wire (C/B), never for the queue. A demand for
a chunk still queued as prefetch takes it out of the queue and sends it as demand at
once (``prefetch_promoted``); one still waiting for a parent that lacks it expedites the
parent's own queued prefetch of it, and is relayed as demand when the parent holds it.
With ``prefetch_demand="join"`` such a demand read waits for the prefetch instead (as a
cache that serves a miss from the prefetch run in flight).
Bytes a host sends count in ``host_bytes_sent`` whichever the class; ``prefetch_bytes``
is what moved as prefetch, ``prefetched_chunks`` which chunks did. The run ends when
every host holds its profile (``prefetch_done_seconds``), after the boots.

µVMs (``uvm`` mode, issue 12). VMs start from one bake instead of booting: its saved
state (the migration stream, S = ``state_bytes``) and its disk layer (L =
``layer_bytes``) are chunks like the image's (numbered after them), in the tree of
virtman mode (k parents, origin fallback). Every host prefetches the whole bake from
t = 0, state first (the profile is the bake: every host needs all of it), with the
prefetch settings above, so it is pipelined down the tree chunk by chunk. The lead VM
is QEMU with ``-incoming``: it reads the state in order, one chunk after the other, as a
demand read (which finds its chunk held, or on its way by prefetch, or fetches it); the
VM can run only once the state is whole. Then it resumes: CPU-bound, R =
``resume_seconds`` on a core of its own; the host's M VMs resume at once and share its
``cores``, so each takes R x max(1, M/cores) (processor sharing: they end together).
Then it reads its layer (already prefetched, so usually held) and
``base_read_bytes`` of the base image (the boot profile's first chunks, fetched as
virtman mode fetches them, prefetched after the bake with ``prefetch``); it is running
when it holds them. Its "boot time" is that moment; ``single_vm_seconds`` is R. The
floor is the later of the state's arrival plus the resume and the bake's arrival, where
X bytes arrive no earlier than max(roots x X/B + rtt, X/B + depth x rtt + (depth-1) x
C/B) (the origin sends X to every root; store and forward adds a chunk per level).
``uvm_budget`` searches for the largest R and the largest bake that meet a goal.
What uvm mode ignores: resume work overlapping the state's arrival (QEMU loads pages as
they come; the whole R is added after the last byte, so it errs long); any compression
or deduplication of the bake on the wire (S and L are the bytes that move); disk reads
of the state from the host's cache (in R, as measured from a cached state); the VMs'
work after they run (reads beyond ``base_read_bytes``, writes); memory hot-plug and the
generation ID (in R); and cores in the boot modes (their T is measured with the VMs
booting together, and each boot is think time, not CPU).

Simplifications, in one list: links are FIFO servers at a fixed rate (no TCP, no
limit in the switch fabric, no disk: a cached chunk is read in no time); one round trip per request
and no request-size limits; VMs of a host in lockstep; caches never evict; no failures
and no tree repair; the attach delay of ``paper`` mode is a fixed D per level; the
copy mode is closed form; writes stay local (they go to each VM's overlay) and cost
nothing; prefetch is ideally prioritised at chunk granularity on every link (a real
stream may hold more prefetch bytes ahead of a demand reply in socket buffers), and its
requests cost no CPU.
"""

from __future__ import annotations

import array
import bisect
import collections
import heapq
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from virtman.delivery import MODE_NAMES, DeliveryMode
from virtman.errors import ConfigError
from virtman.limits import DEFAULT_CHUNK_SIZE, GiB, MiB
from virtman.planner.tree import RelayTree, TreeSettings
from virtman_bench.results import Run

if TYPE_CHECKING:
    from virtman.replay.trace import Trace

#: The simulator's own mode: VMs resumed from one bake (a µVM) instead of booted. It
#: is not a ``DeliveryMode`` (the agent delivers a bake as it delivers an image); it
#: names a way of starting VMs that the model compares with the boot modes.
UVM_MODE = "uvm"
MODES = (*MODE_NAMES, UVM_MODE)
TREE_MODES = (*(m.value for m in DeliveryMode if m.in_tree), UVM_MODE)
#: Link models: "coupled" reserves both ends of a transfer together (the default);
#: "switch" queues each end on its own (see the module docstring).
NETWORKS = ("coupled", "switch")

#: 1 Gbit/s in bytes per second.
DEFAULT_LINK_RATE = 125_000_000.0
#: One request's round trip: 2 x 0.2 ms.
DEFAULT_RTT = 0.0004
#: The paper's iSCSI attach time per tree level.
DEFAULT_ATTACH_DELAY = 10.0

#: µVM mode defaults (docs/scaling.md, "µVMs in the simulator", says why; the lead
#: replaces them with measured figures). The saved state of a minimal 256 MiB guest:
#: QEMU sends a zero page as a flag, so the stream holds the pages the guest touched,
#: about its kernel and the page cache of what its boot read (the bundled Debian trace
#: reads a 48 MiB working set), not its memory size.
DEFAULT_UVM_STATE_BYTES = 64 * MiB
#: The bake's disk layer: the blocks the guest wrote until it was baked (the Debian
#: trace writes 4.4 MiB during boot), rounded up.
DEFAULT_UVM_LAYER_BYTES = 8 * MiB
#: One VM's resume from a locally held state, CPU-bound (the paper: under 1 s on a
#: standard file system; issue 12's TCG target: under 1.0 s).
DEFAULT_UVM_RESUME_SECONDS = 0.5
#: Cores per host that the resuming VMs of a host share.
DEFAULT_CORES = 8.0
#: The µVM goal of issue 12: every VM running in under 4 s (DADI's 10,000 containers
#: on 1,000 hosts).
DEFAULT_UVM_GOAL_SECONDS = 4.0

#: Relay models: "store-and-forward" relays a chunk once it is held whole (as the agent
#: does); "cut-through" as its bytes arrive (the counterfactual of issue 11, section 3).
RELAYS = ("store-and-forward", "cut-through")
#: Where a host sends its prefetch requests: to its parents in turn, as its demand
#: reads ("round-robin"), or to its first (tree) parent only ("primary").
PREFETCH_FROM = ("round-robin", "primary")
#: How a parent fetches a chunk that a child's prefetch asks for and the parent neither
#: holds nor fetches: as a demand read, or as prefetch of its own (as the agent's
#: prefetch export does: its misses are background fetches all the way up).
PREFETCH_MISS = ("demand", "prefetch")
#: What the agent does (a parent's prefetch export fetches what it lacks as prefetch), so
#: a run without the option models the software; "demand" was the design's first rule.
DEFAULT_PREFETCH_MISS = "prefetch"
#: A demand read for a chunk that prefetch has asked for and not yet received: takes it
#: out of the prefetch queue and sends it as demand ("promote", demand strictly first),
#: or waits for the prefetch request it is part of ("join", as a cache that serves it
#: from the prefetch run in flight).
PREFETCH_DEMAND = ("promote", "join")
#: Prefetch request size and bytes in flight per host: the defaults of the agent's
#: PREFETCH_BATCH_BYTES and PREFETCH_INFLIGHT_BYTES, so model and testbed compare.
DEFAULT_PREFETCH_BATCH_BYTES = 4 * MiB
DEFAULT_PREFETCH_INFLIGHT_BYTES = 16 * MiB
#: Queued prefetch transfers a sender looks past to find a receiver whose downlink is
#: free (a bound on the work of one event; the queue is FIFO otherwise).
_PREFETCH_SCAN = 32

#: ``have`` value of a chunk a host neither holds nor fetches.
_ABSENT = math.inf
#: ``have`` value of a chunk whose fetch waits for a parent that is still fetching it
#: itself (the arrival time is not known yet). Any simulated time is far below it.
_PENDING = 1e300


Batch = tuple[float, tuple[int, ...]]


@dataclass(frozen=True)
class BootPattern:
    """What one VM's boot reads: (think gap before the batch, chunk indices) in order."""

    batches: tuple[Batch, ...]
    source: str = "synthetic"

    def __post_init__(self) -> None:
        if not self.batches:
            raise ConfigError("a boot pattern needs at least one batch")
        for gap, chunks in self.batches:
            if not gap >= 0 or math.isinf(gap):
                raise ConfigError(f"think gap {gap} is not a finite time >= 0")
            if any(c < 0 for c in chunks):
                raise ConfigError("chunk indices must be >= 0")

    @property
    def think_seconds(self) -> float:
        """The boot time from a local disk: the sum of the gaps."""
        return math.fsum(gap for gap, _ in self.batches)

    @property
    def distinct_chunks(self) -> int:
        return len({c for _, chunks in self.batches for c in chunks})

    @property
    def reads(self) -> int:
        return sum(len(chunks) for _, chunks in self.batches)


def profile_of(*patterns: BootPattern) -> tuple[int, ...]:
    """The boot profile of one or more boots: the union of the chunks they read, each
    at its earliest first read (time from the boot's start), in that order.

    This is what the agents record (the cache sees every miss, in order) and Volt merges.
    Ties keep the order of the patterns given, then of the reads.
    """
    first: dict[int, float] = {}
    for pattern in patterns:
        now = 0.0
        for gap, chunks in pattern.batches:
            now += gap
            for c in chunks:
                if now < first.get(c, math.inf):
                    first[c] = now
    return tuple(sorted(first, key=first.__getitem__))


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def synthetic_pattern(chunk_size: int, working_set: int, boot_seconds: float) -> BootPattern:
    """The W/C chunks read in order, one per batch, evenly spaced over T.

    Batch i (i = 1..n) reads chunk i-1 after a gap of T/n, so the last read is issued
    at T and a local boot takes exactly T.
    """
    n = chunk_count(working_set, chunk_size)
    if n < 1:
        raise ConfigError("the working set must hold at least one chunk")
    gap = boot_seconds / n
    return BootPattern(tuple((gap, (i,)) for i in range(n)), "synthetic")


def pattern_from_trace(
    trace: Trace, chunk_size: int, image_size: int, working_set: int, boot_seconds: float
) -> BootPattern:
    """A trace's reads and think times, rescaled to W/C distinct chunks and T seconds.

    Sizes: the distinct bytes the trace reads (the union U of its read extents) are laid
    end to end, without the holes between them, as "ranks" 0..U-1; that rank line is cut
    into n = ceil(W/C) equal parts, part j being chunk j. A read covers a rank interval
    and so the chunks it overlaps, and because the reads' union is the whole rank line
    every one of the n chunks is read: exactly n distinct chunks, in the trace's order of
    offsets, each read about as often as its part of the trace was. Reads are thereby
    stretched by about W/U (short reads may share a chunk). The n chunks are then placed
    in the image in offset order: chunk j goes to the image chunk its first byte's trace
    offset scales to (offset x image_size / trace extent), moved up just enough to keep
    the chunks distinct and inside the image. Placement only names the chunks; the model
    has no seek cost.

    Times: batches are ``trace.batches()`` (requests within 1 ms go together). Writes and
    flushes go to the VM's local overlay, so they are dropped; the think gap of a batch
    left without reads is carried into the next batch. Every gap is then multiplied by
    T / (recorded total), so the gaps sum to T; think time after the last read stays as
    a final batch without reads.
    """
    n = chunk_count(working_set, chunk_size)
    image_chunks = chunk_count(image_size, chunk_size)
    if n < 1:
        raise ConfigError("the working set must hold at least one chunk")
    if n > image_chunks:
        raise ConfigError(
            f"working set of {n} chunks does not fit an image of {image_chunks} chunks"
        )
    reads = [r for r in trace.reads if r.length > 0]
    if not reads:
        raise ConfigError(f"trace {trace.name} reads nothing")

    # Union of the read extents, and each extent's first rank.
    starts: list[int] = []
    ends: list[int] = []
    for a, b in sorted((r.offset, r.offset + r.length) for r in reads):
        if ends and a <= ends[-1]:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    ranks = [0]
    for a, b in zip(starts, ends, strict=True):
        ranks.append(ranks[-1] + b - a)
    union = ranks.pop()

    extent = max(trace.end_offset, 1)
    place: list[int] = []
    for j in range(n):
        x = min(-(-j * union // n), union - 1)
        i = bisect.bisect_right(ranks, x) - 1
        offset = starts[i] + x - ranks[i]
        idx = min(offset * image_chunks // extent, image_chunks - n + j)
        place.append(max(place[-1] + 1 if place else 0, idx))

    def chunks_of(offset: int, length: int) -> range:
        i = bisect.bisect_right(starts, offset) - 1
        r0 = ranks[i] + offset - starts[i]
        return range(r0 * n // union, -(-(r0 + length) * n // union))

    raw: list[tuple[float, tuple[int, ...]]] = []
    carried = 0.0
    for gap, requests in trace.batches():
        carried += gap
        read = dict.fromkeys(
            place[j]
            for r in requests
            if r.op == "read" and r.length > 0
            for j in chunks_of(r.offset, r.length)
        )
        if read:
            raw.append((carried, tuple(read)))
            carried = 0.0
    recorded = math.fsum(g for g, _ in raw) + carried
    if recorded > 0:
        scale = boot_seconds / recorded
        batches = [(g * scale, chunks) for g, chunks in raw]
        tail = carried * scale
    else:
        batches = list(raw)
        tail = boot_seconds
    # Put the rounding left over into the last gap, so the gaps sum to T.
    rest = boot_seconds - math.fsum(g for g, _ in batches) - tail
    if tail > 0:
        batches.append((max(0.0, tail + rest), ()))
    else:
        last_gap, last_chunks = batches[-1]
        batches[-1] = (max(0.0, last_gap + rest), last_chunks)
    return BootPattern(tuple(batches), f"trace {trace.name}")


@dataclass(frozen=True)
class SimConfig:
    mode: str
    hosts: int
    vms_per_host: int = 1
    image_size: int = 15 * GiB
    working_set: int = 300 * MiB
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: B, in bytes per second, of every uplink and downlink.
    link_rate: float = DEFAULT_LINK_RATE
    rtt: float = DEFAULT_RTT
    #: T: one VM's boot from a local disk (used by the synthetic pattern).
    boot_seconds: float = 10.0
    #: D: attach time per tree level (``paper`` mode only).
    attach_delay: float = DEFAULT_ATTACH_DELAY
    fanout: int = 2
    #: k (``virtman`` mode; ``paper`` mode always uses 1).
    parents: int = 2
    #: The boot of one VM; None for ``synthetic_pattern(C, W, T)``.
    pattern: BootPattern | None = None
    #: One of ``NETWORKS``.
    network: str = "switch"
    #: ``virtman`` mode only: every host prefetches the boot profile from t = 0.
    prefetch: bool = False
    #: The boot profile (chunk indices, in the order of their first read); None for
    #: ``profile_of(pattern)``. Only read with ``prefetch``.
    profile: tuple[int, ...] | None = None
    #: Most bytes one prefetch request asks for (a run of adjacent profile chunks).
    prefetch_batch_bytes: int = DEFAULT_PREFETCH_BATCH_BYTES
    #: Most prefetch bytes a host has asked for and not yet received.
    prefetch_inflight_bytes: int = DEFAULT_PREFETCH_INFLIGHT_BYTES
    #: Cap on one host's prefetch requests, in bytes per second; 0 for none.
    prefetch_rate: float = 0.0
    #: One of ``PREFETCH_FROM``: which parents a host's prefetch requests go to.
    prefetch_from: str = "round-robin"
    #: One of ``PREFETCH_MISS``: how a parent fetches a chunk a child's prefetch asks
    #: for and it lacks.
    prefetch_miss: str = DEFAULT_PREFETCH_MISS
    #: One of ``PREFETCH_DEMAND``: what a demand read for a chunk prefetch has asked for
    #: and not received does.
    prefetch_demand: str = "promote"
    #: One of ``RELAYS``: when a parent may start relaying a chunk it is still receiving.
    relay: str = "store-and-forward"
    #: ``uvm`` mode: the bake's saved device and memory state (the migration stream).
    state_bytes: int = DEFAULT_UVM_STATE_BYTES
    #: ``uvm`` mode: the bake's disk layer (what the guest wrote until it was baked).
    layer_bytes: int = DEFAULT_UVM_LAYER_BYTES
    #: ``uvm`` mode: one VM's resume from a locally held state, on a core of its own.
    resume_seconds: float = DEFAULT_UVM_RESUME_SECONDS
    #: ``uvm`` mode: cores per host; the host's resuming VMs share them.
    cores: float = DEFAULT_CORES
    #: ``uvm`` mode: base-image bytes each VM reads right after it resumed, the first
    #: chunks of the boot profile, fetched as virtman mode fetches them (0: none).
    base_read_bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.network not in NETWORKS:
            raise ConfigError(
                f"network model {self.network!r} is not one of {', '.join(NETWORKS)}"
            )
        for name in ("hosts", "vms_per_host", "image_size", "working_set", "chunk_size",
                     "fanout", "parents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.link_rate > 0 or math.isinf(self.link_rate):
            raise ConfigError(f"link rate must be a positive number, not {self.link_rate}")
        for name in ("rtt", "boot_seconds", "attach_delay"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a finite number >= 0, not {value}")
        if self.working_set > self.image_size:
            raise ConfigError("the working set cannot be larger than the image")
        if self.prefetch_from not in PREFETCH_FROM:
            raise ConfigError(
                f"prefetch from {self.prefetch_from!r} is not one of {', '.join(PREFETCH_FROM)}"
            )
        if self.prefetch_miss not in PREFETCH_MISS:
            raise ConfigError(
                f"prefetch miss {self.prefetch_miss!r} is not one of {', '.join(PREFETCH_MISS)}"
            )
        if self.prefetch_demand not in PREFETCH_DEMAND:
            raise ConfigError(
                f"prefetch demand {self.prefetch_demand!r} is not one of"
                f" {', '.join(PREFETCH_DEMAND)}"
            )
        if self.relay not in RELAYS:
            raise ConfigError(f"relay {self.relay!r} is not one of {', '.join(RELAYS)}")
        if self.prefetch and self.mode not in ("virtman", UVM_MODE):
            raise ConfigError(f"prefetch is a virtman mode feature, not one of {self.mode} mode")
        if self.state_bytes < 1:
            raise ConfigError(f"state_bytes must be at least 1, not {self.state_bytes}")
        for name in ("layer_bytes", "base_read_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.resume_seconds >= 0 or math.isinf(self.resume_seconds):
            raise ConfigError(
                f"resume_seconds must be a finite number >= 0, not {self.resume_seconds}"
            )
        if not self.cores > 0 or math.isinf(self.cores):
            raise ConfigError(f"cores must be a positive number, not {self.cores}")
        if self.base_read_bytes > self.working_set:
            raise ConfigError(
                f"base_read_bytes ({self.base_read_bytes}) cannot exceed the working set"
                f" ({self.working_set}): the reads after resume are the boot's"
            )
        for name in ("prefetch_batch_bytes", "prefetch_inflight_bytes"):
            if getattr(self, name) < self.chunk_size:
                raise ConfigError(
                    f"{name} must be at least one chunk ({self.chunk_size}),"
                    f" not {getattr(self, name)}"
                )
        if not self.prefetch_rate >= 0 or math.isinf(self.prefetch_rate):
            raise ConfigError(
                f"prefetch rate must be a finite number >= 0, not {self.prefetch_rate}"
            )
        if self.profile is not None and any(c < 0 for c in self.profile):
            raise ConfigError("profile chunk indices must be >= 0")

    @property
    def parents_per_node(self) -> int:
        return 1 if self.mode == "paper" else self.parents

    def boot_pattern(self) -> BootPattern:
        if self.pattern is not None:
            return self.pattern
        return synthetic_pattern(self.chunk_size, self.working_set, self.boot_seconds)

    def boot_profile(self) -> tuple[int, ...]:
        if self.profile is not None:
            return tuple(dict.fromkeys(self.profile))
        return profile_of(self.boot_pattern())

    # --- uvm mode ------------------------------------------------------------------

    @property
    def resume_wall_seconds(self) -> float:
        """One host's resume: its M VMs resume at once and share its cores, so each
        takes R x max(1, M / cores) (processor sharing of equal jobs)."""
        return self.resume_seconds * max(1.0, self.vms_per_host / self.cores)

    def bake_chunks(self) -> tuple[range, range]:
        """The chunk indices of the bake's state and of its layer: numbered after the
        image's, so they never coincide with a base chunk."""
        first = chunk_count(self.image_size, self.chunk_size)
        state = chunk_count(self.state_bytes, self.chunk_size)
        layer = chunk_count(self.layer_bytes, self.chunk_size)
        return range(first, first + state), range(first + state, first + state + layer)

    def base_reads(self) -> tuple[int, ...]:
        """The base chunks a resumed VM reads: the boot profile's first ones."""
        if not self.base_read_bytes:
            return ()
        return self.boot_profile()[:chunk_count(self.base_read_bytes, self.chunk_size)]

    def uvm_pattern(self) -> BootPattern:
        """A µVM's start as a read pattern: QEMU reads the state in order, one chunk
        after the other (it cannot run before the last byte), the VM resumes (the
        host's share of R), then it reads its disk layer and the base reads."""
        state, layer = self.bake_chunks()
        batches: list[Batch] = [(0.0, (c,)) for c in state]
        batches.append((self.resume_wall_seconds, (*layer, *self.base_reads())))
        return BootPattern(tuple(batches), "uvm")

    def vm_pattern(self) -> BootPattern:
        """What one VM of this mode does: resume from the bake or boot the image."""
        return self.uvm_pattern() if self.mode == UVM_MODE else self.boot_pattern()

    def prefetch_profile(self) -> tuple[int, ...]:
        """What every host prefetches. In uvm mode the whole bake, state first (every
        host needs all of it), and with ``prefetch`` also the base reads."""
        if self.mode != UVM_MODE:
            return self.boot_profile()
        state, layer = self.bake_chunks()
        return (*state, *layer, *(self.base_reads() if self.prefetch else ()))


@dataclass
class SimResult:
    config: SimConfig
    #: Per host, in join order: the time all of its VMs have booted.
    finish: list[float]
    #: Per host: bytes its uplink sent (to children).
    host_bytes_sent: list[int]
    origin_bytes_sent: int
    #: Tree levels below the origin (1 for star and copy).
    depth: int
    #: Per host: its tree level.
    levels: list[int]
    single_vm_seconds: float
    #: Distinct chunks one VM reads, times C.
    working_set_bytes: int
    events: int
    #: Requests a parent could answer only after fetching the chunk itself first.
    parent_misses: int
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: Chunks (image indices) that some host received by a prefetch transfer.
    prefetched_chunks: frozenset[int] = frozenset()

    @property
    def all_booted_seconds(self) -> float:
        return max(self.finish)

    @property
    def mean_boot_seconds(self) -> float:
        return math.fsum(self.finish) / len(self.finish)

    def percentile(self, q: int) -> float:
        """Nearest-rank percentile over all VMs (each host's time counted M times)."""
        m = self.config.vms_per_host
        count = len(self.finish) * m
        rank = max(1, min(count, -(-count * q // 100)))
        return sorted(self.finish)[(rank - 1) // m]

    @property
    def floor_seconds(self) -> float:
        cfg = self.config
        b, t, w = cfg.link_rate, self.single_vm_seconds, self.working_set_bytes
        if cfg.mode == UVM_MODE:
            return self._uvm_floor_seconds
        if cfg.mode in TREE_MODES:
            # Store and forward: every level waits for the whole chunk; cut-through:
            # only the first hop does, each further level costs its round trip.
            if cfg.relay == "store-and-forward":
                return max(t, w / b) + self.depth * (cfg.chunk_size / b + cfg.rtt)
            return max(t, w / b) + cfg.chunk_size / b + self.depth * cfg.rtt
        if cfg.mode == "star":
            m, n = cfg.vms_per_host, cfg.hosts
            return max(t + m * cfg.chunk_size / b + cfg.rtt, n * m * w / b + cfg.rtt)
        return cfg.hosts * cfg.image_size / b + cfg.rtt + t

    @property
    def _uvm_floor_seconds(self) -> float:
        """No host resumes before it holds the whole state, and none is running before
        it holds the bake (and its base reads). A host holds X bytes no earlier than
        X/B plus a round trip and a store-and-forward chunk per level below the first,
        nor before the origin sent the roots theirs (roots x X / B, plus one round
        trip: the last root's copy ends then)."""
        cfg = self.config
        b, rtt, depth = cfg.link_rate, cfg.rtt, self.depth
        roots = min(cfg.hosts, cfg.fanout)
        hop = cfg.chunk_size / b if cfg.relay == "store-and-forward" else 0.0

        def held(nbytes: int) -> float:
            return max(roots * nbytes / b + rtt, nbytes / b + depth * rtt + (depth - 1) * hop)

        state = len(cfg.bake_chunks()[0]) * cfg.chunk_size
        return max(held(state) + cfg.resume_wall_seconds, held(self.working_set_bytes))

    @property
    def demand_floor_seconds(self) -> float:
        """T plus, per batch reading new chunks, their transfer and one round trip."""
        cfg = self.config
        pattern = cfg.vm_pattern()
        per_chunk = cfg.chunk_size / cfg.link_rate
        seen: set[int] = set()
        wait = 0.0
        for _, chunks in pattern.batches:
            new = set(chunks) - seen
            if new:
                seen |= new
                wait += len(new) * per_chunk + cfg.rtt
        return pattern.think_seconds + wait

    @property
    def egress_floor_seconds(self) -> float:
        """The least the origin must send in this mode, over B."""
        cfg = self.config
        if cfg.mode in TREE_MODES:
            sent = min(cfg.hosts, cfg.fanout) * self.working_set_bytes
        elif cfg.mode == "star":
            sent = cfg.hosts * cfg.vms_per_host * self.working_set_bytes
        else:
            sent = cfg.hosts * cfg.image_size
        return sent / cfg.link_rate

    def to_run(self) -> Run:
        cfg = self.config
        extra: dict[str, Any] = {
            "depth": self.depth,
            "floor_seconds": self.floor_seconds,
            "egress_floor_seconds": self.egress_floor_seconds,
            "working_set_bytes": self.working_set_bytes,
            "chunk_size": cfg.chunk_size,
            "link_bytes_per_second": cfg.link_rate,
            "rtt_seconds": cfg.rtt,
            "network": cfg.network,
            "events": self.events,
            "parent_misses": self.parent_misses,
            "sim_wall_seconds": self.wall_seconds,
        }
        if cfg.mode in TREE_MODES:
            extra["demand_floor_seconds"] = self.demand_floor_seconds
            extra["fanout"] = cfg.fanout
            extra["parents_per_node"] = cfg.parents_per_node
        if cfg.prefetch or cfg.mode == UVM_MODE:
            # uvm mode always prefetches its bake; ``prefetch`` says whether its base
            # reads are prefetched too.
            extra["prefetch"] = cfg.prefetch
            extra["prefetch_batch_bytes"] = cfg.prefetch_batch_bytes
            extra["prefetch_inflight_bytes"] = cfg.prefetch_inflight_bytes
            extra["prefetch_rate"] = cfg.prefetch_rate
            extra["prefetch_from"] = cfg.prefetch_from
            extra["prefetch_miss"] = cfg.prefetch_miss
            extra["prefetch_demand"] = cfg.prefetch_demand
        if cfg.relay != "store-and-forward":
            extra["relay"] = cfg.relay
        if cfg.mode == "paper":
            extra["attach_delay_seconds"] = cfg.attach_delay
            extra["attach_seconds"] = self.depth * cfg.attach_delay
        if cfg.mode == UVM_MODE:
            state, layer = cfg.bake_chunks()
            extra.update({
                "state_bytes": cfg.state_bytes,
                "layer_bytes": cfg.layer_bytes,
                "bake_bytes": (len(state) + len(layer)) * cfg.chunk_size,
                "base_read_bytes": len(cfg.base_reads()) * cfg.chunk_size,
                "resume_seconds": cfg.resume_seconds,
                "resume_wall_seconds": cfg.resume_wall_seconds,
                "cores": cfg.cores,
                "all_running_seconds": self.all_booted_seconds,
            })
        extra.update(self.extra)
        return Run(
            mode=cfg.mode,
            hosts=cfg.hosts,
            vms_per_host=cfg.vms_per_host,
            all_booted_seconds=self.all_booted_seconds,
            mean_boot_seconds=self.mean_boot_seconds,
            p99_boot_seconds=self.percentile(99),
            single_vm_seconds=self.single_vm_seconds,
            origin_bytes_sent=self.origin_bytes_sent,
            max_host_bytes_sent=max(self.host_bytes_sent),
            extra=extra,
        )


def simulate(cfg: SimConfig) -> SimResult:
    """Run one configuration to the end (every VM booted)."""
    started = time.perf_counter()
    pattern = cfg.vm_pattern()
    if cfg.mode == "copy":
        result = _simulate_copy(cfg, pattern)
    else:
        result = _simulate_fetches(cfg, pattern)
    result.wall_seconds = time.perf_counter() - started
    return result


def _simulate_copy(cfg: SimConfig, pattern: BootPattern) -> SimResult:
    n, c, s, b = cfg.hosts, cfg.chunk_size, cfg.image_size, cfg.link_rate
    k = chunk_count(s, c)
    last = s - (k - 1) * c
    t = pattern.think_seconds
    finish = [((k - 1) * n * c + (j + 1) * last) / b + cfg.rtt + t for j in range(n)]
    return SimResult(
        config=cfg,
        finish=finish,
        host_bytes_sent=[0] * n,
        origin_bytes_sent=n * s,
        depth=1,
        levels=[1] * n,
        single_vm_seconds=t,
        working_set_bytes=pattern.distinct_chunks * c,
        events=0,
        parent_misses=0,
        wall_seconds=0.0,
    )


def _topology(cfg: SimConfig) -> tuple[list[list[int]], list[int], int]:
    """Per host: parent indices (empty: the origin) and level; and the depth."""
    n = cfg.hosts
    if cfg.mode == "star":
        return [[] for _ in range(n)], [1] * n, 1
    tree = RelayTree(TreeSettings(cfg.fanout, cfg.parents_per_node))
    names = [f"host{i}" for i in range(n)]
    for name in names:
        tree.join(name)
    index = {name: i for i, name in enumerate(names)}
    parents = [[index[p] for p in tree.parents(name)] for name in names]
    levels = [tree.level(name) for name in names]
    return parents, levels, tree.depth


def _by_level(values: list[float], levels: list[int]) -> list[float]:
    """The largest value among the hosts of each level, level 1 first."""
    out: list[float] = []
    for value, level in zip(values, levels, strict=True):
        while len(out) < level:
            out.append(0.0)
        out[level - 1] = max(out[level - 1], value)
    return out


def _simulate_fetches(cfg: SimConfig, pattern: BootPattern) -> SimResult:
    """The event loop of the star, paper and virtman modes.

    Kinds of events, in a heap of (time, tag): tag h < N issues host h's next batch;
    tag N + key, key = h*n + c, is "host h now holds chunk c (for relaying)" for hosts
    that wait on it (only pushed when someone waits). A transfer whose sender already
    holds the chunk is reserved at once; the receiver's arrival time is then known and
    needs no event, unless someone waits on it. With prefetch, three more: a sender's
    uplink picks its next queued prefetch transfer, a host issues prefetch requests
    (after a rate cap's wait), and a prefetch request's last chunk arrived.
    """
    parents, levels, depth = _topology(cfg)
    hosts = cfg.hosts
    origin = hosts
    uvm = cfg.mode == UVM_MODE
    # A µVM's bake is always prefetched: every host needs all of it.
    prefetch = cfg.prefetch or uvm
    profile_chunks = cfg.prefetch_profile() if prefetch else ()
    # Chunks renumbered densely 0..n-1 (only equality matters to the model); profile
    # chunks no boot reads are numbered after the pattern's.
    pattern_chunks = sorted({c for _, cs in pattern.batches for c in cs})
    dense = {c: i for i, c in enumerate(pattern_chunks)}
    for c in profile_chunks:
        dense.setdefault(c, len(dense))
    original = list(dense)
    n = max(1, len(dense))
    gaps = [g for g, _ in pattern.batches]
    reads = [tuple(dense[c] for c in dict.fromkeys(cs)) for _, cs in pattern.batches]
    last_batch = len(gaps) - 1

    size = cfg.chunk_size * (cfg.vms_per_host if cfg.mode == "star" else 1)
    duration = size / cfg.link_rate
    rtt = cfg.rtt
    coupled = cfg.network == "coupled"
    # How long before a parent holds a chunk whole it may start relaying it.
    lead = duration if cfg.relay == "cut-through" else 0.0
    base = hosts  # tag offset of "holds" events
    serve_base = base + hosts * n  # a sender's uplink serves its prefetch queue
    pump_base = serve_base + hosts + 1  # a host issues prefetch requests
    release_base = pump_base + hosts  # a prefetch request completed

    # Per (host, chunk): when the host holds it, or _ABSENT / _PENDING.
    have = array.array("d", [_ABSENT]) * (hosts * n)
    waiters: dict[int, list[int]] = {}
    lead_waiting: set[int] = set()
    up_free = [0.0] * (hosts + 1)
    down_free = [0.0] * (hosts + 1)
    sent = [0] * (hosts + 1)
    turn = [0] * hosts
    batch_index = [0] * hosts
    batch_end = [0.0] * hosts
    outstanding = [0] * hosts
    finish = [0.0] * hosts
    heap: list[tuple[float, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    misses = 0

    # Prefetch state (empty when prefetch is off).
    profile = [dense[c] for c in profile_chunks]
    adjacent = [i > 0 and profile_chunks[i] == profile_chunks[i - 1] + 1
                for i in range(len(profile_chunks))]
    batch_chunks = max(1, cfg.prefetch_batch_bytes // cfg.chunk_size)
    inflight_limit = cfg.prefetch_inflight_bytes
    rate = cfg.prefetch_rate
    primary_only = cfg.prefetch_from == "primary"
    miss_as_demand = cfg.prefetch_miss == "demand"
    join = cfg.prefetch_demand == "join"
    pf_pos = [0] * hosts  # next profile index to ask for
    pf_inflight = [0] * hosts  # bytes asked for and not yet received
    pf_rate_next = [0.0] * hosts  # earliest time of the next request under the rate cap
    pump_at = [-1.0] * hosts  # time of the pump event the rate cap has pushed
    pf_from: dict[int, int] = {}  # key -> sender, for prefetch chunks not yet sent
    pf_request_of: dict[int, int] = {}  # key -> prefetch request id
    pf_requests: dict[int, list[Any]] = {}  # id -> [host, bytes, chunks left, last arrival]
    pf_waiters: dict[int, list[int]] = {}  # parent key -> children whose prefetch waits
    pf_queued: set[int] = set()  # keys queued at their sender's uplink
    pf_out: list[collections.deque[tuple[int, int]]] = [
        collections.deque() for _ in range(hosts + 1)] if prefetch else []
    serve_at = [math.inf] * (hosts + 1)
    pf_received = [0] * hosts  # bytes each host received by prefetch transfers
    prefetched: set[int] = set()  # dense chunks moved by prefetch transfers
    promoted = 0
    next_request = 0

    def next_batch(h: int, end: float) -> None:
        i = batch_index[h] + 1
        if i > last_batch:
            finish[h] = end
        else:
            batch_index[h] = i
            push(heap, (end + gaps[i], h))

    def arrived(y: int, c: int, arrival: float) -> None:
        """Host y will hold chunk c at ``arrival``: wake whoever waits on it."""
        key = y * n + c
        have[key] = arrival
        # Children waited while y's own fetch was pending.
        if key in waiters or key in pf_waiters:
            push(heap, (arrival - lead, base + key))
        if key in lead_waiting:
            lead_waiting.discard(key)
            if arrival > batch_end[y]:
                batch_end[y] = arrival
            outstanding[y] -= 1
            if outstanding[y] == 0:
                next_batch(y, batch_end[y])

    def send(x: int, y: int, c: int, now: float) -> None:
        """Reserve the (demand) transfer of chunk c from x to y, ready now."""
        start = now
        u = up_free[x]
        if u > start:
            start = u
        if coupled:
            v = down_free[y]
            if v > start:
                start = v
            end = start + duration
            up_free[x] = end
        else:
            up_free[x] = start + duration
            v = down_free[y]
            if v > start:
                start = v
            end = start + duration
        down_free[y] = end
        sent[x] += size
        arrived(y, c, end + rtt)

    def expedite(h: int, c: int, now: float) -> None:
        """Demand wants chunk c at h, which prefetch has asked for: it goes first.

        Queued at the sender: taken out of the queue and sent as a demand transfer.
        Waiting for a parent that has not got it: the parent's own prefetch of it (if
        queued) is expedited, and the relay to h is sent as demand when it arrives
        (the "holds" event checks for demand).
        """
        nonlocal promoted
        key = h * n + c
        p = pf_from.get(key)
        if p is None or join:
            return
        if key in pf_queued:
            promoted += 1
            pf_queued.discard(key)
            send(p, h, c, now)
            request_done(key)
        elif p != origin:
            expedite(p, c, now)

    def fetch(h: int, c: int, now: float) -> None:
        """Host h starts fetching chunk c, which it neither holds nor fetches."""
        nonlocal misses
        ps = parents[h]
        if not ps:
            send(origin, h, c, now)
            return
        i = turn[h]
        turn[h] = i + 1
        p = ps[i % len(ps)]
        pkey = p * n + c
        ready = have[pkey]
        if ready == _ABSENT:
            misses += 1
            fetch(p, c, now)
            ready = have[pkey]
        elif ready == _PENDING and prefetch:
            expedite(p, c, now)
            ready = have[pkey]
        if ready - lead <= now:
            send(p, h, c, now)
            return
        have[h * n + c] = _PENDING
        ws = waiters.get(pkey)
        if ws is None:
            waiters[pkey] = [h]
            if ready < _PENDING:
                push(heap, (ready - lead, base + pkey))
        else:
            ws.append(h)

    # --- prefetch ----------------------------------------------------------------------

    def request_done(key: int) -> None:
        """A prefetch chunk was sent (by either class); its request may be complete."""
        del pf_from[key]
        rid = pf_request_of.pop(key)
        request = pf_requests[rid]
        request[2] -= 1
        arrival = have[key]
        if arrival > request[3]:
            request[3] = arrival
        if request[2] == 0:
            push(heap, (request[3], release_base + rid))

    def schedule_serve(p: int, when: float) -> None:
        if when < serve_at[p]:
            serve_at[p] = when
            push(heap, (when, serve_base + p))

    def enqueue(p: int, h: int, c: int, now: float) -> None:
        """p holds chunk c (for relaying): queue its prefetch transfer to h."""
        pf_queued.add(h * n + c)
        pf_out[p].append((h, c))
        schedule_serve(p, max(now, up_free[p]))

    def serve(p: int, now: float) -> None:
        """p's uplink is idle at ``now``: send one queued prefetch chunk, if any may go.

        One chunk at a time, and only on idle links (the sender's uplink and the
        receiver's downlink), so a demand transfer reserved later waits at most for
        the one prefetch chunk on the wire, never for the queue.
        """
        serve_at[p] = math.inf
        queue = pf_out[p]
        if up_free[p] > now:
            if queue:
                schedule_serve(p, up_free[p])
            return
        while queue and queue[0][0] * n + queue[0][1] not in pf_queued:
            queue.popleft()  # expedited as demand meanwhile
        pick = -1
        retry = math.inf
        for i in range(min(len(queue), _PREFETCH_SCAN)):
            y, c = queue[i]
            if y * n + c not in pf_queued:
                continue
            if down_free[y] <= now:
                pick = i
                break
            retry = min(retry, down_free[y])
        if pick < 0:
            if retry < math.inf:
                schedule_serve(p, retry)
            return
        y, c = queue[pick]
        del queue[pick]
        key = y * n + c
        pf_queued.discard(key)
        end = now + duration
        up_free[p] = end
        down_free[y] = end
        sent[p] += size
        pf_received[y] += size
        prefetched.add(c)
        arrived(y, c, end + rtt)
        request_done(key)
        if queue:
            schedule_serve(p, end)

    def new_request(h: int, nbytes: int, chunks: int) -> int:
        nonlocal next_request
        rid = next_request
        next_request += 1
        pf_requests[rid] = [h, nbytes, chunks, 0.0]
        return rid

    def sender_of(h: int) -> int:
        """Where h's next prefetch request goes."""
        ps = parents[h]
        if not ps:
            return origin
        if primary_only:
            return ps[0]
        i = turn[h]
        turn[h] = i + 1
        return ps[i % len(ps)]

    def prefetch_request(h: int, p: int, c: int, now: float, rid: int) -> None:
        """h asks p for chunk c as prefetch. A parent that lacks it fetches it as demand
        (its own parents serve it ahead of prefetch) or, with ``prefetch_miss`` =
        "prefetch", as prefetch; h's copy comes as prefetch either way."""
        nonlocal misses
        key = h * n + c
        have[key] = _PENDING
        pf_from[key] = p
        pf_request_of[key] = rid
        if p == origin:
            enqueue(p, h, c, now)
            return
        pkey = p * n + c
        ready = have[pkey]
        if ready == _ABSENT:
            misses += 1
            if miss_as_demand:
                fetch(p, c, now)
            else:
                # The parent asks its own sender for it as prefetch: a request of its
                # own, outside its window (it is not counted in its bytes in flight).
                rid2 = new_request(p, 0, 1)
                prefetch_request(p, sender_of(p), c, now, rid2)
            ready = have[pkey]
        if ready - lead <= now:
            enqueue(p, h, c, now)
            return
        ws = pf_waiters.get(pkey)
        if ws is None:
            pf_waiters[pkey] = [h]
            if ready < _PENDING:
                push(heap, (ready - lead, base + pkey))
        else:
            ws.append(h)

    def pump(h: int, now: float) -> None:
        """Ask for the next profile chunks h lacks, a request of adjacent chunks at a
        time, while the bytes in flight and the rate cap allow."""
        row = h * n
        i = pf_pos[h]
        end = len(profile)
        while i < end:
            if have[row + profile[i]] != _ABSENT:
                i += 1
                continue
            if rate and pf_rate_next[h] > now:
                if pump_at[h] != pf_rate_next[h]:
                    pump_at[h] = pf_rate_next[h]
                    push(heap, (pf_rate_next[h], pump_base + h))
                break
            j = i + 1
            while (j < end and j - i < batch_chunks and adjacent[j]
                   and have[row + profile[j]] == _ABSENT):
                j += 1
            nbytes = (j - i) * cfg.chunk_size
            if pf_inflight[h] and pf_inflight[h] + nbytes > inflight_limit:
                break
            pf_inflight[h] += nbytes
            if rate:
                pf_rate_next[h] = max(now, pf_rate_next[h]) + nbytes / rate
            rid = new_request(h, nbytes, j - i)
            p = sender_of(h)
            for k in range(i, j):
                prefetch_request(h, p, profile[k], now, rid)
            i = j
        pf_pos[h] = i

    for h in range(hosts):
        start = levels[h] * cfg.attach_delay if cfg.mode == "paper" else 0.0
        push(heap, (start + gaps[0], h))
        if prefetch:
            push(heap, (0.0, pump_base + h))

    events = 0
    while heap:
        now, tag = pop(heap)
        events += 1
        if tag < base:
            h = tag
            end = now
            waiting = 0
            row = h * n
            for c in reads[batch_index[h]]:
                key = row + c
                t = have[key]
                if t == _ABSENT:
                    fetch(h, c, now)
                    t = have[key]
                elif t == _PENDING and prefetch:
                    expedite(h, c, now)
                    t = have[key]
                if t < _PENDING:
                    if t > end:
                        end = t
                else:
                    lead_waiting.add(key)
                    waiting += 1
            if waiting:
                outstanding[h] = waiting
                batch_end[h] = end
            else:
                next_batch(h, end)
        elif tag < serve_base:
            key = tag - base
            p, c = divmod(key, n)
            for child in waiters.pop(key, ()):
                send(p, child, c, now)
            for child in pf_waiters.pop(key, ()):
                ckey = child * n + c
                if not join and (ckey in lead_waiting or ckey in waiters):
                    # Demand arrived for it while it waited: it goes as demand.
                    promoted += 1
                    send(p, child, c, now)
                    request_done(ckey)
                else:
                    enqueue(p, child, c, now)
        elif tag < pump_base:
            p = tag - serve_base
            if serve_at[p] == now:
                serve(p, now)
        elif tag < release_base:
            pump(tag - pump_base, now)
        else:
            h, nbytes = pf_requests.pop(tag - release_base)[:2]
            pf_inflight[h] -= nbytes
            pump(h, now)

    extra: dict[str, Any] = {}
    if prefetch:
        # When each host held its whole profile (the last chunk's arrival).
        done = [max((have[h * n + c] for c in profile), default=0.0) for h in range(hosts)]
        extra = {
            "prefetch_done_seconds": max(done),
            "prefetch_done_by_level": _by_level(done, levels),
            "prefetch_bytes": sum(pf_received),
            "prefetch_promoted": promoted,
            "profile_chunks": len(profile),
        }
    if uvm:
        # When each host held the whole state (its VMs then resume) and the whole bake.
        state, layer = cfg.bake_chunks()
        state_done = [max(have[h * n + dense[c]] for c in state) for h in range(hosts)]
        bake_done = [max(have[h * n + dense[c]] for c in (*state, *layer))
                     for h in range(hosts)]
        extra.update({
            "state_done_seconds": max(state_done),
            "state_done_by_level": _by_level(state_done, levels),
            "bake_done_seconds": max(bake_done),
        })
    return SimResult(
        config=cfg,
        finish=finish,
        host_bytes_sent=sent[:hosts],
        origin_bytes_sent=sent[origin],
        depth=depth,
        levels=levels,
        # One µVM alone resumes in R (its state local, a core to itself).
        single_vm_seconds=cfg.resume_seconds if uvm else pattern.think_seconds,
        working_set_bytes=len(pattern_chunks) * cfg.chunk_size,
        events=events,
        parent_misses=misses,
        wall_seconds=0.0,
        extra=extra,
        prefetched_chunks=frozenset(original[c] for c in prefetched),
    )


@dataclass(frozen=True)
class UvmBudget:
    """What a uvm configuration may spend and still have every VM running before
    ``goal_seconds``: found by simulating it (``uvm_budget``)."""

    goal_seconds: float
    #: The configuration as given.
    all_running_seconds: float
    #: Largest R (one VM's resume, on a core of its own) that meets the goal at the
    #: given bake, and the simulated time at it. 0 if the bake alone misses the goal.
    max_resume_seconds: float
    resume_check_seconds: float
    #: Largest bake (state plus layer, in the given proportion, whole chunks) that
    #: meets the goal at the given R, and the simulated time at it. 0 if none does.
    max_bake_bytes: int
    bake_check_seconds: float
    #: Simulations run to find them.
    runs: int


#: The bake search stops when it has bracketed the largest bake to this fraction.
_BUDGET_TOLERANCE = 0.01
#: ... or after this many simulations.
_BUDGET_RUNS = 10


def uvm_budget(
    cfg: SimConfig, goal_seconds: float = DEFAULT_UVM_GOAL_SECONDS,
    result: SimResult | None = None,
) -> UvmBudget:
    """The largest resume time and the largest bake with which every VM of ``cfg`` (a
    uvm configuration) still runs before ``goal_seconds``; ``result`` is ``cfg``'s
    own simulation, if already run.

    Resume: the network does not wait for the VMs (the bake is prefetched), so a host
    runs at (state held) + R x max(1, M/cores), or later if its layer or base reads
    arrive later still; R's budget is the goal less the last state arrival, checked by
    one more simulation (and cut by 1 % until it meets the goal, if a later layer
    makes it miss). Bake: the all-running time grows with the bake about linearly (the
    tree streams it at the origin's rate over the roots), so the search steps by
    secant inside a bracket [meets, misses] until the bracket is within 1 %.
    """
    if cfg.mode != UVM_MODE:
        raise ConfigError(f"a uvm budget is for uvm mode, not {cfg.mode} mode")
    if not goal_seconds > 0:
        raise ConfigError(f"the goal must be a positive time, not {goal_seconds}")
    runs = 0

    def run(c: SimConfig) -> SimResult:
        nonlocal runs
        runs += 1
        return simulate(c)

    base = result if result is not None else run(cfg)
    share = max(1.0, cfg.vms_per_host / cfg.cores)

    # --- resume ---
    max_resume, resume_check = 0.0, math.inf
    headroom = goal_seconds - base.extra["state_done_seconds"]
    candidate = headroom / share * (1 - 1e-9)
    for _ in range(5):
        if candidate <= 0:
            break
        check = run(replace(cfg, resume_seconds=candidate)).all_booted_seconds
        if check < goal_seconds:
            max_resume, resume_check = candidate, check
            break
        candidate *= 0.99

    # --- bake ---
    def at(scale: float) -> SimConfig:
        return replace(cfg, state_bytes=max(1, int(cfg.state_bytes * scale)),
                       layer_bytes=int(cfg.layer_bytes * scale))

    def bake_of(scale: float) -> int:
        state, layer = at(scale).bake_chunks()
        return (len(state) + len(layer)) * cfg.chunk_size

    lo, lo_t = 0.0, math.inf  # the largest scale known to meet the goal (0: none)
    hi = math.inf  # the smallest known to miss it
    # Without a bake a run would take about the resume (and a round trip per level).
    prev, prev_t = 0.0, cfg.resume_wall_seconds + base.depth * cfg.rtt
    scale, t = 1.0, base.all_booted_seconds
    while True:
        if t < goal_seconds:
            lo, lo_t = scale, t
        else:
            hi = scale
        if runs >= _BUDGET_RUNS or (
            hi < math.inf and bake_of(hi) - bake_of(lo) <= max(
                cfg.chunk_size, _BUDGET_TOLERANCE * bake_of(hi))
        ):
            break
        slope = (t - prev_t) / (scale - prev)
        guess = scale + (goal_seconds - t) / slope if slope > 0 else 2 * scale
        if hi < math.inf:
            # A secant step, kept off the bracket's ends so that it shrinks each time.
            width = hi - lo
            guess = min(max(guess, lo + 0.05 * width), hi - 0.05 * width)
        if guess <= 0:
            break
        prev, prev_t = scale, t
        scale = guess
        t = run(at(scale)).all_booted_seconds
    return UvmBudget(
        goal_seconds=goal_seconds,
        all_running_seconds=base.all_booted_seconds,
        max_resume_seconds=max_resume,
        resume_check_seconds=resume_check,
        max_bake_bytes=bake_of(lo) if lo > 0 else 0,
        bake_check_seconds=lo_t,
        runs=runs,
    )
