"""``virtman bench guests``: real guests booting from a local raw file and from virtman.

Builds the bootable test image, then measures the wall time from "start" to the guest
powering off (it boots, writes its name, prints its marker and powers off):

- ``local``: QEMU on a private copy of the raw file, as a host holding the image would;
- ``virtman``: QEMU on a VM snapshot of a cluster on loopback (origin, Volt, agents),
  the image fetched through the relay tree on demand;

for one guest alone and for ``--guests`` at once (three by default, spread over two
agents). Prints the table and writes ``--json``.

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
import shutil
import tempfile
import time
from typing import Any

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.errors import BenchError
from virtman.hypervisor.options import add_hypervisor_options, hypervisor_settings
from virtman.hypervisor.qemu import Accel, GuestConfig, Hypervisor, HypervisorSettings
from virtman.hypervisor.testimage import MARKER, GuestImage, build_test_image, find_kernel
from virtman.results import machine

#: Seconds a test guest may take before the benchmark gives up on it.
GUEST_TIMEOUT_SECONDS = 600.0


async def _boot_local(
    hypervisor: Hypervisor, image: GuestImage, names: list[str], workdir: str
) -> tuple[list[float], list[str]]:
    async def one(name: str) -> tuple[float, str]:
        disk = os.path.join(workdir, f"{name}.raw")
        await asyncio.to_thread(shutil.copyfile, image.image, disk)
        log = os.path.join(workdir, f"{name}.console")
        cfg = GuestConfig(
            memory_mib=256, kernel=image.kernel, initrd=image.initrd, append=image.append(name)
        )
        guest = hypervisor.guest(name, disk, cfg, log)
        started = time.monotonic()
        await guest.start()
        try:
            await asyncio.wait_for(guest.wait(), GUEST_TIMEOUT_SECONDS)
        finally:
            await guest.stop()
        elapsed = time.monotonic() - started
        with open(log, errors="replace") as f:
            if f"{MARKER} {name}" not in f.read():
                raise BenchError(f"local guest {name} did not print its marker")
        return elapsed, guest.accel.value if guest.accel else "?"

    done = await asyncio.gather(*(one(n) for n in names))
    return [t for t, _ in done], [a for _, a in done]


async def _boot_virtman(
    settings: HypervisorSettings, image: GuestImage, names: list[str], workdir: str
) -> list[float]:
    cluster = LocalCluster(
        os.path.join(workdir, f"cluster-{len(names)}"),  # a fresh cluster per run
        ClusterSettings(
            hosts=2,
            chunk_size=64 * 1024,
            log_level="warning",
            accel=settings.accel.value,
            qemu=settings.qemu,
            accel_cache=settings.verdict_cache,
        ),
    )
    try:
        await cluster.start_origin(image.image)
        await cluster.start_volt()
        await cluster.start_agents()
        await cluster.register_image("guest")

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
                        "guest": {
                            "kernel": image.kernel,
                            "initrd": image.initrd,
                            "append": image.append(name),
                            "memory_mib": 256,
                        },
                    },
                )
                deadline = started + GUEST_TIMEOUT_SECONDS
                while (await api.get(f"/vms/{name}"))["guest_running"]:
                    if time.monotonic() > deadline:
                        raise BenchError(f"guest {name} still running")
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - started
                console = await api.get_text(f"/vms/{name}/console")
            if f"{MARKER} {name}" not in console:
                raise BenchError(f"virtman guest {name} did not print its marker")
            return elapsed

        return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))
    finally:
        await cluster.stop()


async def measure(guests: int, settings: HypervisorSettings) -> dict[str, Any]:
    hypervisor = Hypervisor(settings)
    workdir = tempfile.mkdtemp(prefix="virtman-guests-")
    try:
        image = await asyncio.to_thread(build_test_image, workdir)
        results: dict[str, Any] = {
            "machine": machine(),
            "accel": settings.accel.value,
            "accelerator": (await hypervisor.resolve(None, image.kernel)).value,
            "accelerator_reason": (
                (await hypervisor.choose(image.kernel)).reason
                if settings.accel is Accel.AUTO
                else "given with --accel"
            ),
            "kernel": image.kernel,
            "runs": [],
        }
        for count in sorted({1, guests}):  # --guests 1: one run, not the same twice
            names = [f"g{count}-{i + 1}" for i in range(count)]
            local, accels = await _boot_local(hypervisor, image, names, workdir)
            names = [f"v{count}-{i + 1}" for i in range(count)]
            through = await _boot_virtman(settings, image, names, workdir)
            results["runs"].append(
                {
                    "guests": count,
                    "local_seconds": local,
                    "local_accelerators": accels,
                    "virtman_seconds": through,
                }
            )
            print(
                f"{count} guest(s) at once: local raw file {max(local):.2f} s, "
                f"virtman snapshot {max(through):.2f} s "
                f"({max(through) / max(local):.2f}x)",
                flush=True,
            )
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
    p.add_argument("--json", default="bench-guests.json", metavar="FILE")
    add_hypervisor_options(p)


def run(args: argparse.Namespace) -> int:
    from virtman.runtime import configure_logging, run_async

    settings = hypervisor_settings(args)
    configure_logging("warning")

    async def main() -> int:
        if args.probe_only:
            doc = await measure_probe(settings)
        else:
            doc = await measure(args.guests, settings)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"accelerator {doc['accelerator']}; wrote {args.json}")
        return 0

    return run_async(main())
