"""Bakes for ``virtman bench store --bakes``: real QEMU states of one image to import.

For each memory size, one boot of the test guest (``virtman.hypervisor.testimage``, its
counting loop) with room for the most CPUs asked; once it counts, for each CPU count in
ascending order: CPUs hot-plugged up to it, one more tick, the guest paused and its
state saved with QMP ``migrate`` to ``exec:cat > FILE`` (as ``agent/bakes.py`` saves a
bake), then continued for the next. So the bakes of one memory size come from one boot,
as the store's figures say they must to share anything; the memory sizes are separate
boots (a memory size is the guest's RAM block's size: no hot-plug makes one from the
other's state).

Two formats (``--format``):

- ``stream``: QEMU's migration stream, RAM inside it (what the agent stores today).
- ``ramfile``: RAM in a file (``memory-backend-file,share=on``) with the migration
  capability ``x-ignore-shared``: the stream holds only the device state; the RAM file is
  copied, page-aligned, beside it as a second file of the bake.

``--check-resume`` (ramfile) also resumes the last bake of each boot in a new QEMU whose
RAM is a *private* mapping (``share=off``) of a copy of the RAM file, feeds it the device
state, and checks that the guest's counter goes on.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass

from virtman.errors import ConfigError, VirtmanError
from virtman.hypervisor.qemu import QEMU, Accel, GuestConfig, qemu_argv
from virtman.hypervisor.qmp import Monitor
from virtman.hypervisor.testimage import TICK, GuestImage, build_test_image

#: Seconds a TCG boot of the test guest gets to print its first ticks.
BOOT_SECONDS = 180.0
#: Seconds a bake's next tick (after a hot-plug) or a resumed guest's first tick may take.
TICK_SECONDS = 60.0
TICK_LINE = re.compile(rf"{TICK} (\d+) ")


@dataclass(frozen=True)
class BakeFile:
    path: str
    memory_mib: int
    cpus: int
    what: str  # "stream", "device" or "ram"
    #: The guest's last tick on its console when it was paused for this bake.
    tick: int
    #: The bake's QEMU's ``maxcpus``.
    max_cpus: int


@dataclass(frozen=True)
class ResumeCheck:
    memory_mib: int
    cpus: int
    last_baked_tick: int
    first_resumed_tick: int | None
    ok: bool
    #: Why it failed, QEMU's last words included.
    error: str = ""


def make_bakes(work: str, memories: list[int], cpus: list[int], fmt: str,
               check_resume: bool) -> tuple[list[BakeFile], list[ResumeCheck]]:
    if fmt not in ("stream", "ramfile"):
        raise ConfigError(f"--format {fmt!r}: stream or ramfile")
    if not memories or not cpus or min(cpus) < 1 or min(memories) < 64:
        raise ConfigError("--bake-cpus and --bake-memory need positive values (memory >= 64)")
    image = build_test_image(os.path.join(work, "image"))
    return asyncio.run(_make_all(work, image, sorted(memories), sorted(set(cpus)), fmt,
                                 check_resume))


async def _make_all(work: str, image: GuestImage, memories: list[int], cpus: list[int],
                    fmt: str, check_resume: bool
                    ) -> tuple[list[BakeFile], list[ResumeCheck]]:
    files: list[BakeFile] = []
    checks: list[ResumeCheck] = []
    # QMP sockets in a short directory of their own: a unix socket's path has at most
    # 107 bytes, and ``work`` may be deep.
    socks = tempfile.mkdtemp(prefix="virtman-qmp-")
    try:
        for memory in memories:
            made = await _bake_one_boot(work, socks, image, memory, cpus, fmt)
            files += made
            if check_resume and fmt == "ramfile":
                checks.append(await _resume(work, socks, image, memory, made[0], made[1]))
    finally:
        shutil.rmtree(socks, ignore_errors=True)
    return files, checks


def _ram_args(path: str, memory: int, *, share: bool) -> list[str]:
    return ["-object", f"memory-backend-file,id=ram0,size={memory}M,mem-path={path},"
            f"share={'on' if share else 'off'}", "-machine", "memory-backend=ram0"]


async def _launch(argv: list[str], name: str, sock: str) -> tuple[asyncio.subprocess.Process,
                                                                 Monitor]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    monitor = Monitor(name, sock)
    try:
        await monitor.connect()
    except BaseException:
        proc.kill()
        _out, err = await proc.communicate()
        raise ConfigError(f"QEMU {shlex.join(argv)} failed: {err.decode()[-500:]}") from None
    return proc, monitor


async def _end(proc: asyncio.subprocess.Process, monitor: Monitor) -> str:
    """Stop QEMU; what it said on its standard error."""
    await monitor.close()
    if proc.returncode is None:
        proc.kill()
    _out, err = await proc.communicate()
    return err.decode(errors="replace").strip()[-800:]


def _ticks(log: str) -> list[int]:
    try:
        with open(log, errors="replace") as f:
            return [int(n) for n in TICK_LINE.findall(f.read())]
    except FileNotFoundError:
        return []


async def _until_tick(log: str, after: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while True:
        seen = _ticks(log)
        if seen and seen[-1] > after:
            return seen[-1]
        if time.monotonic() > deadline:
            raise ConfigError(f"{log}: no tick past {after} in {limit:g} s")
        await asyncio.sleep(0.2)


async def _bake_one_boot(work: str, socks: str, image: GuestImage, memory: int, cpus: list[int],
                         fmt: str) -> list[BakeFile]:
    tag = f"m{memory}"
    disk = os.path.join(work, f"{tag}.disk")
    shutil.copyfile(image.image, disk)
    cfg = GuestConfig(memory_mib=memory, kernel=image.kernel, initrd=image.initrd,
                      append=image.append(tag, loop=True), max_cpus=max(cpus))
    log, sock = os.path.join(work, f"{tag}.log"), os.path.join(socks, f"{tag}.qmp")
    ram = os.path.join(work, f"{tag}.ram")
    argv = qemu_argv(tag, disk, cfg, log, Accel.TCG, QEMU, qmp_socket=sock)
    if fmt == "ramfile":
        argv += _ram_args(ram, memory, share=True)
    proc, monitor = await _launch(argv, tag, sock)
    files: list[BakeFile] = []
    try:
        if fmt == "ramfile":
            await monitor.set_capabilities(x_ignore_shared=True)
        tick = await _until_tick(log, 2, BOOT_SECONDS)
        for n in cpus:
            await monitor.hotplug_cpus(n)
            tick = await _until_tick(log, tick, TICK_SECONDS)
            await monitor.pause()
            tick = max(_ticks(log))
            state = os.path.join(work, f"{tag}-c{n}.{'device' if fmt == 'ramfile' else 'stream'}")
            await monitor.migrate(f"exec:cat > {shlex.quote(state)}")
            files.append(BakeFile(state, memory, n, "device" if fmt == "ramfile" else "stream",
                                  tick, max(cpus)))
            if fmt == "ramfile":  # paused: the RAM file holds the guest's memory now
                copy = os.path.join(work, f"{tag}-c{n}.ram")
                shutil.copyfile(ram, copy)
                files.append(BakeFile(copy, memory, n, "ram", tick, max(cpus)))
            await monitor.resume()
    finally:
        await _end(proc, monitor)
        for path in (disk + ".run", ram):
            if os.path.exists(path):
                os.unlink(path)
    return files


async def _resume(work: str, socks: str, image: GuestImage, memory: int, device: BakeFile,
                  ram_file: BakeFile) -> ResumeCheck:
    """The boot's first bake (its CPUs as booted: no hot-plugged CPU to recreate)
    resumed with its RAM a private mapping of a copy of its RAM file."""
    tag = f"m{memory}-resume"
    disk = os.path.join(work, f"m{memory}.disk")
    ram = os.path.join(work, f"{tag}.ram")
    shutil.copyfile(ram_file.path, ram)
    # The configuration the bake's QEMU was started with.
    cfg = GuestConfig(memory_mib=memory, kernel=image.kernel, initrd=image.initrd,
                      append=image.append(f"m{memory}", loop=True), max_cpus=device.max_cpus)
    log, sock = os.path.join(work, f"{tag}.log"), os.path.join(socks, f"{tag}.qmp")
    argv = qemu_argv(tag, disk, cfg, log, Accel.TCG, QEMU, qmp_socket=sock, incoming=True)
    argv += _ram_args(ram, memory, share=False)
    proc, monitor = await _launch(argv, tag, sock)
    first: int | None = None
    error = ""
    try:
        await monitor.set_capabilities(x_ignore_shared=True)
        await monitor.incoming(f"exec:cat {shlex.quote(device.path)}")
        await monitor.wait_incoming()
        await monitor.resume()
        await _until_tick(log, -1, TICK_SECONDS)
        first = _ticks(log)[0]
    except VirtmanError as err:
        error = str(err)
    finally:
        said = await _end(proc, monitor)
        os.unlink(ram)
    if error:
        error += f"; QEMU said: {said}"
    return ResumeCheck(memory, device.cpus, device.tick, first,
                       first is not None and first == device.tick + 1, error)
