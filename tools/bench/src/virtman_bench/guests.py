"""``virtman bench guests``: real guests booting from a local raw file and from virtman.

Boots a guest image and measures the wall time from "start" until the guest is up:

- by default the bootable test image, built here, which boots, writes its name, prints
  its marker and powers off: "up" is its power-off;
- ``--image FILE`` any raw image (a Debian 12 from ``scripts/build-debian-image.sh``,
  say), booted by its own bootloader or with ``--kernel``/``--initrd``/``--append``
  (``{name}`` in ``--append`` becomes the guest's name); "up" is the first console line
  matching ``--ready REGEX`` (e.g. ``login:``), after which the guest is stopped, or
  without ``--ready`` the guest powering off;

each guest started

- ``local``: QEMU on a private copy of the raw file, as a host holding the image would;
- ``virtman``: QEMU on a VM snapshot of a cluster on loopback (origin, Volt, agents),
  the image fetched through the relay tree on demand;

for one guest alone and for ``--guests`` at once (three by default, spread over two
agents). Prints the table and writes ``--json``. ``--memory`` is each guest's RAM.

``--accel`` (default ``auto``), ``--qemu`` and ``--accel-cache`` are those of
``virtman agent`` and apply to both sides; the document records the accelerator every
guest ended up under (a KVM guest that stayed silent is restarted under TCG and timed
from its first start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from virtman.blockdev.store import copy_sparse
from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.errors import ApiError, BenchError, ConfigError
from virtman.httpapi import ApiClient
from virtman.hypervisor.options import add_hypervisor_options, hypervisor_settings
from virtman.hypervisor.qemu import Accel, GuestConfig, Hypervisor, HypervisorSettings
from virtman.hypervisor.testimage import MARKER, GuestImage, build_test_image, find_kernel
from virtman.sizes import format_size, parse_size
from virtman_bench.results import machine

#: Seconds a test guest may take before the benchmark gives up on it.
GUEST_TIMEOUT_SECONDS = 600.0
#: The test image is small: chunks of 64 KiB (the cluster default is 256 KiB).
TEST_IMAGE_CHUNK_SIZE = 64 * 1024
#: Seconds past its recording window that a recorded boot may take to reach Volt.
PROFILE_WAIT_SECONDS = 15.0
#: Seconds between two looks at a guest's console for ``--ready``.
CONSOLE_POLL_SECONDS = 0.1
#: Seconds one console wait asks the agent to hold its answer (the API's cap is 60 s).
CONSOLE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class BootSpec:
    """What the benchmark boots, and when a guest counts as up."""

    image: str
    kernel: str | None = None
    initrd: str | None = None
    #: Kernel command line; ``{name}`` is replaced by the guest's name.
    append_template: str | None = None
    #: A console line that says the guest is up; None: it powers off by itself.
    ready: re.Pattern[str] | None = None
    #: The test image's marker must be on the console (the built-in image only).
    marker: bool = False
    memory_mib: int = 256

    def append(self, name: str) -> str | None:
        return self.append_template.replace("{name}", name) if self.append_template else None

    def config(self, name: str) -> GuestConfig:
        return GuestConfig(memory_mib=self.memory_mib, kernel=self.kernel, initrd=self.initrd,
                           append=self.append(name))

    def check(self, name: str, console: str, where: str) -> None:
        if self.marker and f"{MARKER} {name}" not in console:
            raise BenchError(f"{where} guest {name} did not print its marker")


def test_image_spec(image: GuestImage) -> BootSpec:
    """The built-in test image: it powers off once it printed its marker."""
    return BootSpec(image.image, image.kernel, image.initrd, image.append("{name}"),
                    marker=True)


async def until_up(
    spec: BootSpec,
    console: Callable[[], Awaitable[str]],
    running: Callable[[], Awaitable[bool]],
    what: str,
    deadline: float,
) -> None:
    """Until the guest is up: ``spec.ready`` on its console, or (without it) its exit.
    ``BenchError`` if it exits before it is ready or the deadline passes."""
    while True:
        if spec.ready is not None and spec.ready.search(await console()):
            return
        if not await running():
            if spec.ready is None:
                return
            raise BenchError(f"{what} ended before its console showed {spec.ready.pattern!r}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not up within {GUEST_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(CONSOLE_POLL_SECONDS)


async def _wait_up(api: ApiClient, name: str, spec: BootSpec, deadline: float) -> None:
    """``until_up`` for a virtman guest, by the agent's console wait: one held request at
    a time, not a poll of the console and the VM every 0.1 s, whose HTTPS cost the
    guests CPU (docs/guests.md)."""
    what = f"virtman guest {name}"
    params: dict[str, str | float] = {"timeout": CONSOLE_WAIT_SECONDS}
    if spec.ready is not None:
        params["pattern"] = spec.ready.pattern
    while True:
        done = await api.get(f"/vms/{name}/console/wait", params=params)
        if spec.ready is None:
            if not done["running"]:
                return
        elif done["matched"]:
            return
        elif not done["running"]:
            raise BenchError(f"{what} ended before its console showed {spec.ready.pattern!r}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not up within {GUEST_TIMEOUT_SECONDS:.0f} s")


async def _boot_local(
    hypervisor: Hypervisor, spec: BootSpec, names: list[str], workdir: str
) -> tuple[list[float], list[str]]:
    async def one(name: str) -> tuple[float, str]:
        disk = os.path.join(workdir, f"{name}.raw")
        await asyncio.to_thread(copy_sparse, spec.image, disk)  # a host's own copy
        log = os.path.join(workdir, f"{name}.console")
        guest = hypervisor.guest(name, disk, spec.config(name), log)

        async def console() -> str:
            try:
                with open(log, errors="replace") as f:
                    return f.read()
            except FileNotFoundError:  # QEMU has not opened it yet
                return ""

        async def running() -> bool:
            return guest.proc is not None and guest.proc.returncode is None

        started = time.monotonic()
        await guest.start()
        try:
            await until_up(spec, console, running, f"local guest {name}",
                           started + GUEST_TIMEOUT_SECONDS)
            elapsed = time.monotonic() - started
        finally:
            await guest.stop()
        spec.check(name, await console(), "local")
        return elapsed, guest.accel.value if guest.accel else "?"

    done = await asyncio.gather(*(one(n) for n in names))
    return [t for t, _ in done], [a for _, a in done]


async def _boot_virtman(
    settings: HypervisorSettings,
    spec: BootSpec,
    names: list[str],
    workdir: str,
    chunk_size: int,
    *,
    profile: dict[str, Any] | None = None,
    record_seconds: float | None = None,
) -> tuple[list[float], dict[str, Any] | None]:
    """Boot ``names`` at once on a fresh 2-agent cluster: their times, and with
    ``record_seconds`` the boot profile the agents recorded (Volt's, once sent).
    ``profile``: Volt has it before the VMs start, so the hosts prefetch it."""
    label = "record" if record_seconds is not None else "prefetch" if profile else "plain"
    cluster = LocalCluster(
        os.path.join(workdir, f"cluster-{label}-{len(names)}"),  # a fresh cluster per run
        ClusterSettings(
            hosts=2,
            chunk_size=chunk_size,
            log_level="warning",
            accel=settings.accel.value,
            qemu=settings.qemu,
            accel_cache=settings.verdict_cache,
            record_seconds=record_seconds,
        ),
    )
    try:
        await cluster.start_origin(spec.image)
        await cluster.start_volt()
        await cluster.start_agents()
        await cluster.register_image("guest")
        if profile is not None:
            await cluster.set_profile("guest", profile)

        async def one(i: int, name: str) -> float:
            host = cluster.host_names()[i % 2]
            started = time.monotonic()
            async with cluster.api(cluster.agents[host].url, timeout=120) as api:
                await api.post(
                    "/vms",
                    json={
                        "name": name,
                        "image": "guest",
                        "start": True,
                        "guest": {k: v for k, v in spec.config(name).to_dict().items()
                                  if v is not None},
                    },
                )

                async def console() -> str:
                    try:
                        return str(await api.get_text(f"/vms/{name}/console"))
                    except ApiError as err:
                        if err.status == 404:  # no console log yet: QEMU is starting
                            return ""
                        raise

                await _wait_up(api, name, spec, started + GUEST_TIMEOUT_SECONDS)
                elapsed = time.monotonic() - started
                text = await console()
                try:
                    await api.post(f"/vms/{name}/stop")
                except ApiError as err:
                    if err.status != 409:  # 409: it powered off by itself meanwhile
                        raise
            spec.check(name, text, "virtman")
            return elapsed

        times = list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))
        recorded = None
        if record_seconds is not None:
            recorded = await _recorded_profile(cluster, record_seconds + PROFILE_WAIT_SECONDS)
        return times, recorded
    finally:
        await cluster.stop()


async def _recorded_profile(cluster: LocalCluster, timeout: float) -> dict[str, Any]:
    """Volt's profile of the image once an agent has sent a recorded boot."""
    deadline = time.monotonic() + timeout
    async with cluster.api(cluster.volt_url) as api:
        while True:
            try:
                doc: dict[str, Any] = await api.get("/images/guest/profile")
                return doc
            except ApiError as err:
                if err.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise BenchError(f"no boot profile was recorded within {timeout:.0f} s")
            await asyncio.sleep(CONSOLE_POLL_SECONDS)


async def measure(
    guests: int,
    settings: HypervisorSettings,
    spec: BootSpec | None = None,
    chunk_size: int = TEST_IMAGE_CHUNK_SIZE,
    prefetch: bool = False,
) -> dict[str, Any]:
    """Boot ``spec`` (default: the test image, built here) locally and through virtman;
    with ``prefetch``, through virtman a second time with a boot profile recorded by one
    guest beforehand (on a cluster of its own), which the hosts prefetch."""
    hypervisor = Hypervisor(settings)
    workdir = tempfile.mkdtemp(prefix="virtman-guests-")
    try:
        if spec is None:
            spec = test_image_spec(await asyncio.to_thread(build_test_image, workdir))
        probe_kernel = spec.kernel or find_kernel()[0]
        results: dict[str, Any] = {
            "machine": machine(),
            "accel": settings.accel.value,
            "accelerator": (await hypervisor.resolve(None, probe_kernel)).value,
            "accelerator_reason": (
                (await hypervisor.choose(probe_kernel)).reason
                if settings.accel is Accel.AUTO
                else "given with --accel"
            ),
            "image": spec.image,
            "kernel": spec.kernel,
            "ready": spec.ready.pattern if spec.ready is not None else "power-off",
            "chunk_size": chunk_size,
            "runs": [],
        }
        profile: dict[str, Any] | None = None
        for count in sorted({1, guests}):  # --guests 1: one run, not the same twice
            names = [f"g{count}-{i + 1}" for i in range(count)]
            local, accels = await _boot_local(hypervisor, spec, names, workdir)
            if prefetch and profile is None:
                # One guest records the boot: its window spans a boot with room to spare.
                window = max(local) * 1.5 + 5
                _, profile = await _boot_virtman(settings, spec, ["r1-1"], workdir, chunk_size,
                                                 record_seconds=window)
                assert profile is not None
                results["profile"] = {k: profile[k] for k in ("runs", "chunks", "bytes")}
                print(f"boot profile recorded by one guest: {profile['chunks']} chunks, "
                      f"{format_size(int(profile['bytes']))}", flush=True)
            names = [f"v{count}-{i + 1}" for i in range(count)]
            through, _ = await _boot_virtman(settings, spec, names, workdir, chunk_size)
            run: dict[str, Any] = {
                "guests": count,
                "local_seconds": local,
                "local_accelerators": accels,
                "virtman_seconds": through,
            }
            line = (f"{count} guest(s) at once: local raw file {max(local):.2f} s, "
                    f"virtman snapshot {max(through):.2f} s ({max(through) / max(local):.2f}x)")
            if profile is not None:
                names = [f"p{count}-{i + 1}" for i in range(count)]
                fetched, _ = await _boot_virtman(settings, spec, names, workdir, chunk_size,
                                                 profile=profile)
                run["virtman_prefetch_seconds"] = fetched
                line += f", with prefetch {max(fetched):.2f} s ({max(fetched) / max(local):.2f}x)"
            results["runs"].append(run)
            print(line, flush=True)
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def measure_probe(settings: HypervisorSettings) -> dict[str, Any]:
    """What ``--accel auto`` costs: the probe of the host's test kernel, then a cache hit.

    Run it with a fresh ``--accel-cache`` file to see a cold probe.
    """
    kernel, _ = find_kernel()
    started = time.monotonic()
    first = await Hypervisor(settings).choose(kernel)
    cold = time.monotonic() - started
    started = time.monotonic()
    await Hypervisor(settings).choose(kernel)  # a new process on this host
    warm = time.monotonic() - started
    print(f"accelerator {first.accel.value} for {kernel}: {first.reason}")
    print(
        f"first choice {cold:.3f} s (probe {first.probe_seconds:.3f} s), "
        f"next process {warm:.3f} s (cache {settings.verdict_cache or 'off'})",
        flush=True,
    )
    return {
        "machine": machine(),
        "kernel": kernel,
        "accelerator": first.accel.value,
        "reason": first.reason,
        "probe_seconds": first.probe_seconds,
        "first_choice_seconds": cold,
        "cached_choice_seconds": warm,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guests", type=int, default=3, help="guests booted at once (default 3)")
    p.add_argument(
        "--probe-only",
        action="store_true",
        help="only time the KVM probe of --accel auto and a cached choice",
    )
    p.add_argument("--image", metavar="FILE",
                   help="raw image to boot (default: the test image, built here)")
    p.add_argument("--kernel", metavar="FILE", help="with --image: boot this kernel")
    p.add_argument("--initrd", metavar="FILE", help="with --kernel: its initrd")
    p.add_argument("--append", metavar="TEXT",
                   help="with --kernel: its command line ({name}: the guest's name)")
    p.add_argument("--ready", metavar="REGEX",
                   help="with --image: a console line that says the guest is up (default: "
                   "the guest powers off)")
    p.add_argument("--memory", type=int, default=256, metavar="MIB",
                   help="RAM per guest (default 256)")
    p.add_argument("--chunk-size", type=parse_size, default=TEST_IMAGE_CHUNK_SIZE,
                   metavar="SIZE", help="the virtman cluster's chunk size (default 64K)")
    p.add_argument("--prefetch", action="store_true",
                   help="also boot through virtman with a boot profile one guest recorded "
                   "first, which the hosts prefetch")
    p.add_argument("--json", default="bench-guests.json", metavar="FILE")
    add_hypervisor_options(p)


def boot_spec(args: argparse.Namespace) -> BootSpec | None:
    """The image ``--image`` and its options describe (None: the built-in test image)."""
    if args.image is None:
        given = [o for o, v in (("--kernel", args.kernel), ("--initrd", args.initrd),
                                ("--append", args.append), ("--ready", args.ready)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} go with --image FILE")
        return None
    if not os.path.isfile(args.image):
        raise ConfigError(f"--image {args.image!r} is not a file")
    try:
        ready = re.compile(args.ready) if args.ready else None
    except re.error as err:
        raise ConfigError(f"--ready {args.ready!r} is not a regular expression: {err}") from None
    return BootSpec(args.image, args.kernel, args.initrd, args.append, ready,
                    memory_mib=args.memory)


def run(args: argparse.Namespace) -> int:
    from virtman.runtime import configure_logging, run_async

    settings = hypervisor_settings(args)
    configure_logging("warning")

    async def main() -> int:
        if args.probe_only:
            doc = await measure_probe(settings)
        else:
            doc = await measure(args.guests, settings, boot_spec(args), args.chunk_size,
                                args.prefetch)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"accelerator {doc['accelerator']}; wrote {args.json}")
        return 0

    return run_async(main())
