"""Choosing KVM or TCG: the probe, its cache, the TCG fallback, and --accel as given.

No broken (or working) KVM is needed: QEMU is replaced, through the same setting a user
has (``HypervisorSettings.qemu``, ``--qemu``), by small shell scripts made here that
record their command line and then either run the real QEMU or play a fault:

- ``hanging``: under ``accel=kvm`` sleeps silently for ever (this project's machines);
- ``probe_only``: under ``accel=kvm`` runs the real QEMU under TCG instead (a KVM that
  works) when there is no disk, i.e. for the probe, and hangs for a guest with a disk;
- ``fake``: never runs a guest: fails at once under ``accel=kvm``, otherwise writes one
  line to its serial file and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import QEMU_SERIAL_FROM_ARGV, make_image, require

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.errors import ConfigError, Conflict
from virtman.hypervisor.qemu import (
    Accel,
    GuestConfig,
    GuestState,
    Hypervisor,
    HypervisorSettings,
    VerdictCache,
)
from virtman.hypervisor.testimage import MARKER, GuestImage, build_test_image, find_kernel

QEMU = "qemu-system-x86_64"
#: Seconds a real TCG guest gets here to boot and power off (three times what it takes
#: on a busy 2-core machine), below the test's own pytest timeout.
BOOT_SECONDS = 150
FAKE_LINE = "FAKE-GUEST-OK"

HANGING = """#!/bin/sh
echo "$*" >> {calls}
case "$*" in *accel=kvm*) exec sleep 600;; esac
exec {qemu} "$@"
"""

PROBE_ONLY = """#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  *accel=kvm*-drive*) exec sleep 600;;
  *accel=kvm*)
    # A KVM that works, played by TCG: same command line, another accelerator.
    for a in "$@"; do
      shift
      case "$a" in
        pc,accel=kvm) set -- "$@" pc,accel=tcg;;
        host) set -- "$@" qemu64;;
        *) set -- "$@" "$a";;
      esac
    done;;
esac
exec {qemu} "$@"
"""

# (the preamble's braces doubled: the template is filled with str.format)
FAKE = QEMU_SERIAL_FROM_ARGV.replace("{", "{{").replace("}", "}}") + """echo "$*" >> {calls}
case "$*" in *accel=kvm*) echo "fake: Could not access KVM kernel module" >&2; {on_kvm};; esac
[ -n "$serial" ] && echo "{line}" > "$serial"
exit 0
"""


def script(tmp_path: Path, name: str, template: str, on_kvm: str = "exit 1") -> tuple[str, Path]:
    """An executable QEMU stand-in and the file it records its command lines in."""
    calls = tmp_path / f"{name}.calls"
    calls.touch()
    path = tmp_path / name
    real = shutil.which(QEMU) or QEMU
    path.write_text(template.format(calls=calls, qemu=real, line=FAKE_LINE, on_kvm=on_kvm))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path), calls


def calls_of(calls: Path) -> list[str]:
    return calls.read_text().splitlines()


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    require(QEMU, "mkfs.ext4")
    return build_test_image(str(tmp_path_factory.mktemp("guest-image")))


# --- the probe and its cache ------------------------------------------------------------------


async def test_probe_says_tcg_when_kvm_hangs_and_the_verdict_is_cached(tmp_path: Path) -> None:
    require(QEMU)
    qemu, calls = script(tmp_path, "hanging", HANGING)
    kernel = tmp_path / "vmlinuz"  # never booted: the stand-in hangs before QEMU runs
    kernel.write_bytes(b"not a kernel")
    cache = tmp_path / "cache" / "accel.json"
    settings = HypervisorSettings(qemu=qemu, verdict_cache=str(cache), probe_seconds=0.5)

    started = time.monotonic()
    verdict = await Hypervisor(settings).choose(str(kernel))
    assert verdict.accel is Accel.TCG
    assert "printed nothing" in verdict.reason
    assert time.monotonic() - started < 5  # bounded by the probe's limit
    assert len(calls_of(calls)) == 1 and "accel=kvm" in calls_of(calls)[0]
    entries = json.loads(cache.read_text())["verdicts"]
    assert [e["accel"] for e in entries.values()] == ["tcg"]

    # A new process (a new Hypervisor) on this host reads the verdict: no second probe.
    again = Hypervisor(settings)
    assert await again.resolve(None, str(kernel)) is Accel.TCG
    assert await again.resolve(Accel.AUTO, str(kernel)) is Accel.TCG
    assert len(calls_of(calls)) == 1

    # Another kernel (here: the same file changed) is probed again.
    kernel.write_bytes(b"another kernel")
    assert await Hypervisor(settings).resolve(None, str(kernel)) is Accel.TCG
    assert len(calls_of(calls)) == 2


async def test_probe_says_kvm_when_a_kernel_boots_under_it(tmp_path: Path) -> None:
    require(QEMU)
    kernel, _ = find_kernel()
    qemu, calls = script(tmp_path, "probe_only", PROBE_ONLY)
    cache = tmp_path / "accel.json"
    hv = Hypervisor(HypervisorSettings(qemu=qemu, verdict_cache=str(cache), probe_seconds=60))
    verdict = await hv.choose(kernel)
    assert verdict.accel is Accel.KVM, verdict.reason
    assert "first console line" in verdict.reason
    assert await hv.resolve(None, kernel) is Accel.KVM
    assert len(calls_of(calls)) == 1


async def test_unreadable_cache_is_probed_again_and_rewritten(tmp_path: Path) -> None:
    require(QEMU)
    qemu, calls = script(tmp_path, "hanging", HANGING)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cache = tmp_path / "accel.json"
    cache.write_text('{"version": 1, "verdicts": {')  # torn by hand
    settings = HypervisorSettings(qemu=qemu, verdict_cache=str(cache), probe_seconds=0.3)
    assert await Hypervisor(settings).resolve(None, str(kernel)) is Accel.TCG
    assert len(calls_of(calls)) == 1
    key = VerdictCache.key(qemu, str(kernel))
    assert json.loads(cache.read_text())["verdicts"][key]["accel"] == "tcg"


async def test_unusable_cache_costs_a_probe_not_an_error(tmp_path: Path) -> None:
    require(QEMU)
    qemu, calls = script(tmp_path, "hanging", HANGING)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    (tmp_path / "not-a-dir").write_text("")
    cache = tmp_path / "not-a-dir" / "accel.json"  # cannot be made
    hv = Hypervisor(HypervisorSettings(qemu=qemu, verdict_cache=str(cache), probe_seconds=0.3))
    assert await hv.resolve(None, str(kernel)) is Accel.TCG
    assert await hv.resolve(None, str(kernel)) is Accel.TCG  # remembered in the process
    assert len(calls_of(calls)) == 1


async def test_given_accelerator_is_not_probed(tmp_path: Path) -> None:
    qemu, calls = script(tmp_path, "fake", FAKE)
    for accel in (Accel.KVM, Accel.TCG):
        hv = Hypervisor(HypervisorSettings(qemu=qemu, accel=accel))
        assert await hv.resolve(None, None) is accel
    assert calls_of(calls) == []


# --- the guest and its fallback ---------------------------------------------------------------


@pytest.mark.timeout(BOOT_SECONDS + 90)  # the probe (60 s at most), the trial, the boot
async def test_silent_kvm_guest_is_restarted_under_tcg_and_boots(
    tmp_path: Path, test_image: GuestImage, caplog: pytest.LogCaptureFixture
) -> None:
    qemu, calls = script(tmp_path, "probe_only", PROBE_ONLY)
    cache = tmp_path / "accel.json"
    hv = Hypervisor(HypervisorSettings(
        qemu=qemu, verdict_cache=str(cache), probe_seconds=60, kvm_silence_seconds=2))
    disk = tmp_path / "disk.raw"
    shutil.copyfile(test_image.image, disk)
    cfg = GuestConfig(memory_mib=256, kernel=test_image.kernel, initrd=test_image.initrd,
                      append=test_image.append("g1"))
    console = tmp_path / "console.log"
    guest = hv.guest("g1", str(disk), cfg, str(console))
    caplog.set_level(logging.INFO, logger="virtman.hypervisor.qemu")
    try:
        await guest.start()  # the probe passes: the guest starts under KVM
        assert guest.accel is Accel.KVM and guest.state is GuestState.STARTING
        assert "accel=kvm" in guest.argv[guest.argv.index("-machine") + 1]
        rc = await asyncio.wait_for(guest.wait(), BOOT_SECONDS)
    finally:
        await guest.stop()
    assert rc == 0, guest.stderr
    assert guest.fell_back and guest.accel is Accel.TCG and guest.state is GuestState.EXITED
    assert f"{MARKER} g1" in console.read_text(errors="replace")
    lines = calls_of(calls)
    assert len(lines) == 3  # the probe, the silent KVM guest, the TCG guest
    assert "-drive" not in lines[0] and "accel=kvm" in lines[1] and "accel=tcg" in lines[2]
    fallbacks = [r for r in caplog.records if "starting it again under TCG" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    # What the guest showed overrides the probe: AUTO means TCG for this kernel now.
    fresh = Hypervisor(HypervisorSettings(qemu=qemu, verdict_cache=str(cache)))
    assert await fresh.resolve(None, test_image.kernel) is Accel.TCG
    assert len(calls_of(calls)) == 3


async def test_kvm_guest_that_fails_is_restarted_under_tcg(tmp_path: Path) -> None:
    qemu, calls = script(tmp_path, "fake", FAKE)
    hv = Hypervisor(HypervisorSettings(qemu=qemu, accel=Accel.KVM))
    console = tmp_path / "console.log"
    guest = hv.guest("g1", str(tmp_path / "disk.raw"), GuestConfig(), str(console))
    await guest.start()
    assert await asyncio.wait_for(guest.wait(), 30) == 0
    assert guest.fell_back and guest.accel is Accel.TCG
    assert guest.state is GuestState.EXITED and not guest.running
    assert FAKE_LINE in console.read_text()
    assert ["accel=kvm" in c for c in calls_of(calls)] == [True, False]
    with pytest.raises(Conflict):
        await guest.start()  # a guest object starts once


async def test_tcg_guest_is_never_restarted(tmp_path: Path) -> None:
    qemu, calls = script(tmp_path, "fake", FAKE)
    hv = Hypervisor(HypervisorSettings(qemu=qemu, accel=Accel.TCG))
    guest = hv.guest("g1", str(tmp_path / "disk.raw"), GuestConfig(), str(tmp_path / "c.log"))
    await guest.start()
    assert await asyncio.wait_for(guest.wait(), 30) == 0
    assert not guest.fell_back and len(calls_of(calls)) == 1


async def test_stop_during_the_kvm_trial_does_not_restart(tmp_path: Path) -> None:
    require(QEMU)
    qemu, calls = script(tmp_path, "hanging", HANGING)
    hv = Hypervisor(HypervisorSettings(qemu=qemu, accel=Accel.KVM, kvm_silence_seconds=30))
    guest = hv.guest("g1", str(tmp_path / "disk.raw"), GuestConfig(), str(tmp_path / "c.log"))
    await guest.start()
    assert guest.running and guest.state is GuestState.STARTING
    pid = guest.proc.pid if guest.proc else -1
    while not calls_of(calls):  # the stand-in runs (bounded by the test's timeout)
        await asyncio.sleep(0.05)
    await asyncio.wait_for(guest.stop(grace=2), 10)
    assert guest.state is GuestState.STOPPED and not guest.fell_back
    assert len(calls_of(calls)) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the silent process is gone, not orphaned


async def test_stop_while_the_probe_runs_ends_the_probe_and_starts_nothing(
    tmp_path: Path,
) -> None:
    require(QEMU)
    qemu, calls = script(tmp_path, "hanging", HANGING)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    # A probe that would run for a minute: stop() must not wait for it.
    hv = Hypervisor(HypervisorSettings(qemu=qemu, probe_seconds=60))
    cfg = GuestConfig(kernel=str(kernel))
    guest = hv.guest("g1", str(tmp_path / "disk.raw"), cfg, str(tmp_path / "c.log"))
    starting = asyncio.ensure_future(guest.start())
    while not calls_of(calls):  # the probe runs
        await asyncio.sleep(0.05)
    assert guest.running and guest.state is GuestState.STARTING
    probe = _pids_running(["sleep", "600"])
    assert probe, "the probe's stand-in is not running"
    await asyncio.wait_for(guest.stop(), 10)  # returns once start() has given up
    assert starting.done()
    with pytest.raises(Conflict, match="stopped before QEMU started"):
        await starting
    assert guest.state is GuestState.STOPPED and not guest.running and guest.proc is None
    assert [("accel=kvm" in c) for c in calls_of(calls)] == [True]  # no guest ran
    assert not (set(probe) & set(_pids_running(["sleep", "600"])))  # the probe is killed
    # No verdict came of it: the next guest probes again.
    hv2_calls = len(calls_of(calls))
    quick = Hypervisor(HypervisorSettings(qemu=qemu, probe_seconds=0.3))
    assert (await quick.choose(str(kernel))).accel is Accel.TCG
    assert len(calls_of(calls)) == hv2_calls + 1


def _pids_running(argv: list[str]) -> list[int]:
    """Processes whose command line is exactly ``argv``."""
    want = "\0".join(argv).encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() == want:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


PROBER = """
import asyncio, sys
from virtman.hypervisor.qemu import Hypervisor, HypervisorSettings
settings = HypervisorSettings(qemu=sys.argv[1], probe_seconds=300)
asyncio.run(Hypervisor(settings).choose(sys.argv[2]))
"""


async def test_a_probe_dies_with_the_process_that_probes(tmp_path: Path) -> None:
    """A SIGKILLed agent must not leave its probe spinning under a broken KVM."""
    require(QEMU)
    qemu, _ = script(tmp_path, "hanging", HANGING.replace("sleep 600", "sleep 601"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBER, qemu, str(kernel)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not _pids_running(["sleep", "601"]):
            assert time.monotonic() < deadline and prober.poll() is None
            await asyncio.sleep(0.05)
        probe = _pids_running(["sleep", "601"])
        prober.kill()
        prober.wait(10)
        deadline = time.monotonic() + 10
        while set(probe) & set(_pids_running(["sleep", "601"])):
            assert time.monotonic() < deadline, "the probe outlived its prober"
            await asyncio.sleep(0.05)
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
        for pid in _pids_running(["sleep", "601"]):
            os.kill(pid, 9)


async def test_watcher_error_reaches_the_waiter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Under KVM the stand-in fails and removes itself: the TCG restart cannot run.
    qemu, _ = script(tmp_path, "fake", FAKE, on_kvm='rm -f "$0"; exit 1')
    hv = Hypervisor(HypervisorSettings(qemu=qemu, accel=Accel.KVM))
    guest = hv.guest("g1", str(tmp_path / "disk.raw"), GuestConfig(), str(tmp_path / "c.log"))
    await guest.start()
    with pytest.raises(ConfigError, match="not installed"):
        await asyncio.wait_for(guest.wait(), 30)
    assert guest.state is GuestState.EXITED and not guest.running
    assert any("watcher failed" in r.getMessage() for r in caplog.records)


# --- --accel through the command line, as a user gives it ------------------------------------


@pytest.fixture
async def fake_cluster(tmp_path: Path) -> AsyncIterator[tuple[LocalCluster, Path]]:
    qemu, calls = script(tmp_path, "fake", FAKE)
    make_image(tmp_path / "image.raw", 1024 * 1024)
    c = LocalCluster(str(tmp_path / "cluster"), ClusterSettings(
        hosts=1, heartbeat_interval=0.5, heartbeat_timeout=2.0, chunk_size=64 * 1024,
        accel="tcg", qemu=qemu, accel_cache=str(tmp_path / "accel.json")))
    try:
        await c.start_origin(str(tmp_path / "image.raw"))
        await c.start_volt()
        await c.start_agent("host1")
        await c.register_image("img")
        yield c, calls
    finally:
        await c.stop()


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "virtman", *args], capture_output=True,
        text=True, check=False, timeout=60)


async def guest_exited(cluster: LocalCluster, url: str, name: str) -> None:
    async with cluster.api(url) as api:
        deadline = time.monotonic() + 30
        while (await api.get(f"/vms/{name}"))["guest_running"]:
            assert time.monotonic() < deadline, "fake guest still running"
            await asyncio.sleep(0.1)


async def test_accel_options_are_honoured(fake_cluster: tuple[LocalCluster, Path]) -> None:
    cluster, calls = fake_cluster
    url = cluster.agents["host1"].url
    operator = ["--token-file", cluster.token_file("operator"), "--tls-ca", cluster.ca_file]
    # The agent runs with --accel tcg: a guest started without --accel gets TCG.
    done = await cli("vm", "create", "vm1", "--image", "img", "--start", "--agent", url, *operator)
    assert done.returncode == 0, done.stderr
    await guest_exited(cluster, url, "vm1")
    # --accel kvm on the command line wins over the agent's setting.
    done = await cli("vm", "start", "vm1", "--accel", "kvm", "--agent", url, *operator)
    assert done.returncode == 0, done.stderr
    await guest_exited(cluster, url, "vm1")
    machines = [c.split("-machine ")[1].split()[0] for c in calls_of(calls)]
    # tcg; then kvm, which the fake fails, so the guest was restarted under tcg.
    assert machines == ["pc,accel=tcg", "pc,accel=kvm", "pc,accel=tcg"]
    assert all("-serial stdio" not in c for c in calls_of(calls))  # nothing probed
    bad = await cli("vm", "start", "vm1", "--accel", "fast", "--agent", url, *operator)
    assert bad.returncode == 2 and "--accel" in bad.stderr
