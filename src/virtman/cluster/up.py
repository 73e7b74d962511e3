"""``virtman up``: boot many replaying VMs through the relay tree on one machine.

Starts an origin (a generated test image, or ``--image``), Volt and ``--hosts`` agents;
registers the image; measures one VM booting alone from a local copy; then creates
``--vms-per-host`` VMs on every host and replays the boot trace through all of them at
once, SIGKILLing agents as ``--kill HOST@SECONDS`` says. Returns the result document
(``--json``), shown first by ``show_summary`` (``print_summary`` prints it as the tree
and a summary; the CLI draws tables on a terminal). Everything it started is stopped
at the end, on error and on Ctrl-C.

Each step is shown on a ``virtman.progress.Display`` while it runs: the baseline VM's
bytes read out of what the trace reads, the origin's bytes while the manifest is
computed, then VMs booted out of the total and bytes sent by the origin. All of them
are counters this process keeps anyway (the origin and the baseline's NBD server run
in it, and a replay that ends is counted where it ends), so showing them asks nothing
of the agents being measured.
With ``ui``, Volt's live view is open all along: its address is a note once Volt is
up, and the cluster is kept after the summary until Ctrl-C (or for ``ui_hold`` seconds)
so the page can still be looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtman.blockdev.file import FileDevice
from virtman.blockdev.store import copy_sparse
from virtman.cluster.local import VIEWER, ClusterSettings, LocalCluster
from virtman.coordinator.ui import ui_url
from virtman.errors import ConfigError
from virtman.limits import MIN_TEST_IMAGE_SIZE
from virtman.nbd.server import Export, NbdServer
from virtman.planner.profile import profile_from_trace
from virtman.planner.tree import ORIGIN
from virtman.progress import Display, Meter, PlainDisplay, Unit
from virtman.replay.replayer import ReplayResult, replay
from virtman.replay.trace import Trace
from virtman.sizes import format_size

log = logging.getLogger(__name__)

IMAGE_NAME = "test-image"


@dataclass
class UpOptions:
    trace: Trace
    vms_per_host: int = 4
    speed: float = 1.0
    image: str | None = None
    kills: list[tuple[str, float]] = field(default_factory=list)
    workdir: str | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: Print Volt's live view address and keep the cluster after the run.
    ui: bool = False
    #: Seconds to keep it after the run (None: until Ctrl-C).
    ui_hold: float | None = None
    #: Start with a boot profile of the trace (as if recorded before), prefetched.
    prefetch: bool = False


def parse_kill(text: str) -> tuple[str, float]:
    host, sep, when = text.partition("@")
    try:
        seconds = float(when)
    except ValueError:
        seconds = -1.0
    if not sep or not host or seconds < 0:
        raise ConfigError(f"--kill {text!r}: expected HOST@SECONDS, e.g. host3@5")
    return host, seconds


def generate_image(path: str, trace: Trace, chunk_size: int, seed: int = 42,
                   min_size: int = MIN_TEST_IMAGE_SIZE) -> int:
    """A sparse test image big enough for the trace, with random bytes where it reads."""
    size = max(trace.end_offset, min_size)
    size = -(-size // chunk_size) * chunk_size
    rng = random.Random(seed)
    chunks = sorted(
        {
            c
            for r in trace.reads
            if r.length
            for c in range(r.offset // chunk_size, (r.offset + r.length - 1) // chunk_size + 1)
        }
    )
    with open(path, "wb") as f:
        f.truncate(size)
        for c in chunks:
            f.seek(c * chunk_size)
            f.write(rng.randbytes(chunk_size))
    return size


def trace_read_bytes(trace: Trace, size: int) -> int:
    """Bytes a replay of ``trace`` reads from an image of ``size`` bytes."""
    return sum(min(r.length, max(0, size - r.offset)) for r in trace.reads)


def live_view_url(cluster: LocalCluster) -> str:
    """The address of the cluster's live view, as printed (the one place it is made),
    with the cluster's viewer token: opening it sets the browser's cookie."""
    return ui_url(cluster.volt_url, token=cluster.token(VIEWER))


async def hold_live_view(url: str, seconds: float | None) -> None:
    """Keep the cluster (and its page) up for ``seconds``, or until Ctrl-C when None;
    Ctrl-C ends the wait early either way, and the run then ends as usual."""
    print(
        f"live view stays at {url} "
        + ("until Ctrl-C" if seconds is None else f"for {seconds:g} s (Ctrl-C ends it sooner)"),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupted.wait(), seconds)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def single_vm_seconds(
    image: str, trace: Trace, speed: float, workdir: str, display: Display | None = None
) -> float:
    """One VM booting alone from a local copy of the image (the baseline)."""
    display = display or PlainDisplay()
    # A local copy: the VM's writes must not touch the image itself.
    scratch = os.path.join(workdir, "alone.raw")
    await asyncio.to_thread(copy_sparse, image, scratch)
    device = FileDevice(scratch)
    await device.open()
    server = NbdServer([Export("alone", device)])
    sock = os.path.join(tempfile.mkdtemp(prefix="vm-"), "alone.sock")
    await server.listen_unix(sock)
    total = trace_read_bytes(trace, device.size)
    meter = Meter("bytes read", lambda: server.stats.bytes_read, lambda: total, Unit.BYTES)
    try:
        async with display.step("one VM alone", [meter]):
            result = await replay(f"nbd+unix:///alone?socket={sock}", trace, speed=speed)
    finally:
        await server.stop()
        await device.close()
        os.unlink(scratch)
        os.rmdir(os.path.dirname(sock))
    return result.boot_seconds


async def run_up(
    options: UpOptions,
    display: Display | None = None,
    show_summary: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run it all and return the result document. ``show_summary`` (default
    ``print_summary``: plain lines) shows it while the cluster still runs, so that with
    ``ui`` the summary is on screen while the live view is held."""
    display = display or PlainDisplay()
    show_summary = show_summary or print_summary
    settings = options.cluster
    workdir = options.workdir or tempfile.mkdtemp(prefix="virtman-up-")
    os.makedirs(workdir, exist_ok=True)
    trace = options.trace
    hosts = [f"host{i + 1}" for i in range(settings.hosts)]
    for host, _ in options.kills:
        if host not in hosts:
            raise ConfigError(
                f"--kill {host}: no such host (hosts are host1..host{settings.hosts})"
            )
    image = options.image
    if image is None:
        image = os.path.join(workdir, "test-image.raw")
        size = generate_image(image, trace, settings.chunk_size)
        display.note(
            f"generated test image {image}: {format_size(size)}, data where the trace reads"
        )
    elif not os.path.isfile(image):
        raise ConfigError(f"--image {image!r} is not a file")
    alone = await single_vm_seconds(image, trace, options.speed, workdir, display)
    display.note(f"one VM alone from a local copy: {alone:.2f} s")

    cluster = LocalCluster(workdir, settings)
    try:
        async with display.step(f"starting origin, volt, {len(hosts)} agents"):
            await cluster.start_origin(image)
            await cluster.start_volt()
            if options.ui:
                display.note(f"live view: {live_view_url(cluster)}")
            await cluster.start_agents()
        started = time.monotonic()
        # Registration reads what the image holds once, from the origin in this process.
        held = _allocated_bytes(image)
        manifest = Meter(
            "bytes read", lambda: cluster.origin_bytes_sent, lambda: held, Unit.BYTES
        )
        async with display.step("image manifest", [manifest]):
            await cluster.register_image(IMAGE_NAME)
        # From here on the origin serves the hosts only (registration read it once);
        # prefetch may begin as soon as a VM is created, so count from before that.
        origin_before = cluster.origin_bytes_sent
        if options.prefetch:
            rows = ((r.t, r.op, r.offset, r.length) for r in trace.requests)
            profile = profile_from_trace(rows, cluster.settings.chunk_size, os.path.getsize(image))
            await cluster.set_profile(IMAGE_NAME, profile.to_doc())
            display.note(f"boot profile of the trace: {len(profile.entries)} chunks, "
                         "prefetched by every host")
        security = (
            "plain HTTP and NBD, tokens (--insecure)" if cluster.settings.insecure
            else "HTTPS and NBD over mutual TLS, tokens"
        )
        display.note(
            f"cluster up: origin, volt, {len(hosts)} agents ({security}); image registered "
            f"in {time.monotonic() - started:.1f} s"
        )
        names = [(h, f"{h}-vm{j + 1}") for h in hosts for j in range(options.vms_per_host)]
        creating = time.monotonic()
        uris = await asyncio.gather(*(cluster.create_vm(h, n, IMAGE_NAME) for h, n in names))
        # Boot times run from the replays' start: the creates before (attach, join, and
        # with --prefetch the head start of the prefetch) are reported apart.
        create_seconds = time.monotonic() - creating
        killers = [
            asyncio.ensure_future(_kill_later(cluster, h, t, display)) for h, t in options.kills
        ]

        booted = 0

        async def boot(uri: str) -> ReplayResult:
            nonlocal booted
            result = await replay(uri, trace, speed=options.speed)
            booted += 1
            return result

        meters = [
            Meter("VMs booted", lambda: booted, lambda: len(uris)),
            Meter(
                "bytes from the origin",
                lambda: cluster.origin_bytes_sent - origin_before,
                unit=Unit.BYTES,
            ),
        ]
        async with display.step("", meters):
            results: list[ReplayResult] = await asyncio.gather(*(boot(uri) for uri in uris))
        for k in killers:
            k.cancel()
        doc = await _report(
            cluster,
            names,
            results,
            trace,
            alone,
            options,
            cluster.origin_bytes_sent - origin_before,
        )
        doc["vm_create_seconds"] = round(create_seconds, 3)
        show_summary(doc)
        if options.ui:
            await hold_live_view(live_view_url(cluster), options.ui_hold)
    finally:
        await cluster.stop()
    return doc


def _allocated_bytes(path: str) -> int:
    """Bytes of ``path`` that hold data (what a manifest reads: holes are skipped)."""
    st = os.stat(path)
    return min(st.st_size, st.st_blocks * 512)


async def _kill_later(
    cluster: LocalCluster, host: str, seconds: float, display: Display
) -> None:
    await asyncio.sleep(seconds)
    cluster.kill_agent(host)
    display.note(f"killed {host} at {seconds:.1f} s")


async def _report(
    cluster: LocalCluster,
    names: list[tuple[str, str]],
    results: list[ReplayResult],
    trace: Trace,
    alone: float,
    options: UpOptions,
    origin_bytes: int,
) -> dict[str, Any]:
    # Let one more heartbeat round pass so the tree reflects any repair.
    if options.kills:
        await asyncio.sleep(
            cluster.settings.heartbeat_timeout + cluster.settings.heartbeat_interval
        )
    tree = await cluster.tree(IMAGE_NAME)
    parents = {n["agent"]: n["parents"] for n in tree["nodes"]}
    levels = {n["agent"]: n["level"] for n in tree["nodes"]}
    positions = {n["agent"]: n["position"] for n in tree["nodes"]}
    vms: list[dict[str, Any]] = []
    for (host, name), r in zip(names, results, strict=True):
        vms.append(
            {
                "name": name,
                "host": host,
                "boot_seconds": round(r.boot_seconds, 3),
                "errors": r.errors,
                "killed_host": cluster.agents[host].killed,
                "messages": r.messages,
            }
        )
    survivors = [v for v in vms if not v["killed_host"]]
    boots = sorted(
        r.boot_seconds
        for (host, _), r in zip(names, results, strict=True)
        if not cluster.agents[host].killed
    )
    hosts = []
    order = sorted(cluster.agents, key=lambda h: (positions.get(h, 1 << 30), h))
    for host in order:
        agent = cluster.agents[host]
        status = await cluster.agent_status(host)
        received: dict[str, int] = {}
        prefetched = 0
        if status is not None:
            image = status["images"].get(IMAGE_NAME, {})
            received = image.get("bytes_received", {})
            prefetched = int(image.get("cache_stats", {}).get("prefetched_bytes", 0))
        hosts.append(
            {
                "name": host,
                "parents": parents.get(host, []),
                # Of what the host received, what its prefetch asked for (the rest: misses).
                "prefetched_bytes": prefetched,
                "level": levels.get(host),
                "position": positions.get(host),
                "bytes_received": received,
                "killed": agent.killed,
            }
        )
    return {
        "vms": vms,
        "all_booted_seconds": round(max(boots), 3) if boots else None,
        "mean_boot_seconds": round(statistics.fmean(boots), 3) if boots else None,
        "p99_boot_seconds": round(boots[min(len(boots) - 1, int(0.99 * len(boots)))], 3)
        if boots
        else None,
        "single_vm_seconds": round(alone, 3),
        "origin_bytes_sent": origin_bytes,
        "working_set_bytes": trace.working_set(cluster.settings.chunk_size),
        "errors_on_surviving_hosts": sum(v["errors"] for v in survivors),
        "tree": {
            "depth": tree["depth"],
            "fanout": tree["fanout"],
            "parents_per_node": tree["parents_per_node"],
            "roots": cluster.settings.fanout,
        },
        "hosts": hosts,
        "settings": {
            "hosts": cluster.settings.hosts,
            "vms_per_host": options.vms_per_host,
            "speed": options.speed,
            "trace": trace.name,
            "chunk_size": cluster.settings.chunk_size,
            "kills": [f"{h}@{t:g}" for h, t in options.kills],
            # The figures' conditions: TLS between every pair of services, or not.
            "tls": not cluster.settings.insecure,
            "prefetch": options.prefetch,
        },
    }


def print_summary(doc: dict[str, Any]) -> None:
    """The tree and the summary of a result document, as plain lines."""
    hosts = doc["hosts"]
    print(
        f"\nrelay tree (depth {doc['tree']['depth']}, fan-out {doc['tree']['fanout']}, "
        f"{doc['tree']['parents_per_node']} parents per node):"
    )
    by_level: dict[int, list[dict[str, Any]]] = {}
    for h in hosts:
        by_level.setdefault(h["level"] or 0, []).append(h)
    for level in sorted(by_level):
        label = f"level {level}" if level else "not in tree"
        row = ", ".join(
            f"{h['name']}<-{'+'.join(h['parents'])}" + (" (killed)" if h["killed"] else "")
            for h in by_level[level]
        )
        print(f"  {label}: {row}")
    print(f"\n{'host':<8} {'level':>5} {'from parents':>13} {'from origin':>12}  killed")
    for h in hosts:
        from_origin = h["bytes_received"].get(ORIGIN, 0)
        from_parents = sum(v for k, v in h["bytes_received"].items() if k != ORIGIN)
        print(
            f"{h['name']:<8} {h['level'] or '-':>5} {format_size(from_parents):>13} "
            f"{format_size(from_origin):>12}  {'yes' if h['killed'] else ''}"
        )
    survivors = [v for v in doc["vms"] if not v["killed_host"]]
    print(
        f"\n{len(survivors)} VMs on surviving hosts: all booted in {doc['all_booted_seconds']} s "
        f"(mean {doc['mean_boot_seconds']} s, p99 {doc['p99_boot_seconds']} s); "
        f"one VM alone from a local copy: {doc['single_vm_seconds']} s"
    )
    print(f"I/O errors seen by VMs on surviving hosts: {doc['errors_on_surviving_hosts']}")
    ws = doc["working_set_bytes"]
    print(
        f"origin sent {format_size(doc['origin_bytes_sent'])}; working set {format_size(ws)} "
        f"({doc['origin_bytes_sent'] / ws:.2f}x; {doc['tree']['roots']} tree roots)"
    )
