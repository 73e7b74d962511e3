"""Real QEMU guests booting through the relay tree from virtman snapshots."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from guestworld import guest_cluster, make_guest_image

from virtman.cluster.local import ClusterSettings, LocalCluster
from virtman.hypervisor.testimage import MARKER, GuestImage
from virtman.replay.trace import parse_trace

#: Seconds the cluster gets to start (processes, image registration).
SETUP_SECONDS = 60
#: Seconds the test body gets, every wait in it included: the accelerator probe (10 s
#: where KVM hangs), three TCG guests booting, writing and powering off at once on two
#: busy cores (about 40 s when idle), and the checks after.
BODY_SECONDS = 280
#: The pytest timeout: above both, so a slow machine fails with a message, not a kill.
TEST_SECONDS = SETUP_SECONDS + BODY_SECONDS + 20


class Budget:
    """One deadline that every wait of a test draws from."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        assert left > 0, f"test ran out of its {self.seconds} s"
        return left


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return make_guest_image(tmp_path_factory)


@pytest.fixture
async def cluster(tmp_path: Path, test_image: GuestImage) -> AsyncIterator[LocalCluster]:
    # --accel auto (the default): the agents probe the real QEMU with the guests' kernel,
    # keeping the verdict in this test's own directory.
    async with guest_cluster(tmp_path / "cluster", test_image, ClusterSettings(
        hosts=2, heartbeat_interval=0.5, heartbeat_timeout=2.0, chunk_size=64 * 1024,
        accel_cache=str(tmp_path / "accel.json"))) as c:
        yield c


async def wait_guests_done(cluster: LocalCluster, vms: dict[str, str], budget: Budget) -> None:
    pending = dict(vms)
    while pending and budget.end - time.monotonic() > 1:
        for name, host in list(pending.items()):
            async with cluster.api(cluster.agents[host].url, timeout=budget.left()) as api:
                doc = await api.get(f"/vms/{name}")
            if not doc["guest_running"]:
                del pending[name]
        await asyncio.sleep(0.5)
    assert not pending, f"guests still running after {budget.seconds} s: {sorted(pending)}"


async def run(argv: list[str], budget: Budget) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   check=False, timeout=budget.left())


def file_in_image(image: Path, path: str) -> str | None:
    out = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         text=True, check=False, timeout=30)
    return out.stdout.strip() or None


@pytest.mark.timeout(TEST_SECONDS)
async def test_three_guests_boot_through_the_tree(cluster: LocalCluster, test_image: GuestImage,
                                                  tmp_path: Path) -> None:
    budget = Budget(BODY_SECONDS)
    base_digest = hashlib.sha256(Path(test_image.image).read_bytes()).hexdigest()
    placement = {"vm1": "host1", "vm2": "host1", "vm3": "host2"}
    for name, host in placement.items():
        async with cluster.api(cluster.agents[host].url, timeout=budget.left()) as api:
            await api.post("/vms", json={
                "name": name, "image": "guest", "start": True, "record": name == "vm3",
                "guest": {"kernel": test_image.kernel, "initrd": test_image.initrd,
                          "append": test_image.append(name), "memory_mib": 256}})
    await wait_guests_done(cluster, placement, budget)

    # Each agent said once which accelerator its guests get, and why; host1 probed
    # (KVM or TCG, whichever runs a Linux kernel here), host2 read host1's verdict.
    chosen = {}
    for host in ("host1", "host2"):
        lines = [line for line in Path(cluster.agents[host].child.log_path).read_text().splitlines()
                 if "accelerator " in line and " for guests of kernel " in line]
        assert len(lines) == 1, lines
        chosen[host] = lines[0].split("accelerator ")[1].split()[0]
    assert chosen["host1"] == chosen["host2"] and chosen["host1"] in ("kvm", "tcg")
    assert "[cached in" in lines[0]

    for name, host in placement.items():
        async with cluster.api(cluster.agents[host].url, timeout=budget.left()) as api:
            console = await api.get_text(f"/vms/{name}/console")
            uri = (await api.get(f"/vms/{name}"))["uri"]
        assert f"{MARKER} {name}" in console, f"{name} console:\n{console[-2000:]}"
        disk = tmp_path / f"{name}.raw"
        copy = await run(["nbdcopy", uri, str(disk)], budget)
        assert copy.returncode == 0, copy.stderr
        # Its own file, in its own overlay; no other guest's.
        assert file_in_image(disk, "/vmname") == name
    assert file_in_image(Path(test_image.image), "/vmname") is None
    assert hashlib.sha256(Path(test_image.image).read_bytes()).hexdigest() == base_digest

    # The relay tree carried the image: one host read it from the other or both from
    # the origin, and the recorded boot trace is a trace.
    async with cluster.api(cluster.agents["host2"].url, timeout=budget.left()) as api:
        trace_text = await api.get_text("/vms/vm3/trace")
        xml = await api.get_text("/vms/vm3/xml")
    trace = parse_trace(trace_text, "recorded")
    assert trace_text.startswith("#") and "t,op,offset,length" in trace_text
    assert trace.reads and sum(r.length for r in trace.reads) > 0
    assert any(r.op == "write" for r in trace.requests)
    # The domain runs the guest as it ran here (a TCG restart included).
    fell_back = "again under TCG" in Path(cluster.agents["host2"].child.log_path).read_text()
    ran_kvm = chosen["host2"] == "kvm" and not fell_back
    assert f"<domain type='{'kvm' if ran_kvm else 'qemu'}'>" in xml
    xml_file = tmp_path / "vm3.xml"
    xml_file.write_text(xml)
    if shutil.which("virt-xml-validate"):
        check = subprocess.run(["virt-xml-validate", str(xml_file), "domain"],
                               capture_output=True, text=True, check=False, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        pytest.fail("virt-xml-validate is missing: apt-get install libvirt-clients")

    # The same through the command line, as a user would.
    agent = cluster.agents["host2"].url
    # The operator's credential of the cluster, as a user passes it.
    creds = ["--token-file", cluster.token_file("operator"), "--tls-ca", cluster.ca_file]
    for verb, expect in (("console", f"{MARKER} vm3"), ("xml", "<domain type="),
                         ("trace", "t,op,offset,length"), ("list", '"guest_running": false')):
        cli = await run([sys.executable, "-m", "virtman", "vm", verb,
                         *([] if verb == "list" else ["vm3"]), "--agent", agent, *creds],
                        budget)
        assert cli.returncode == 0 and expect in cli.stdout, (verb, cli.stdout, cli.stderr)
    stop = await run([sys.executable, "-m", "virtman", "vm", "stop", "vm3", "--agent", agent,
                      *creds],
                     budget)
    assert stop.returncode == 1 and "no running guest" in stop.stderr


@pytest.mark.timeout(TEST_SECONDS)
def test_bench_guests_boots_a_given_image_until_its_console_says_ready(
    tmp_path: Path, test_image: GuestImage
) -> None:
    out = tmp_path / "guests.json"
    append = test_image.append("{name}")  # the template: each guest gets its own name
    run = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "guests", "--guests", "1",
         "--accel", "tcg", "--image", test_image.image, "--kernel", test_image.kernel,
         "--initrd", test_image.initrd, "--append", append, "--ready", f"{MARKER} [gvrp]1-1",
         "--prefetch", "--json", str(out)],
        capture_output=True, text=True, timeout=BODY_SECONDS, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["image"] == test_image.image and doc["ready"] == f"{MARKER} [gvrp]1-1"
    # --prefetch: one guest recorded the boot, then guests booted with it prefetched.
    assert doc["profile"]["runs"] == 1 and doc["profile"]["chunks"] > 0
    [one] = doc["runs"]
    assert one["guests"] == 1 and one["local_accelerators"] == ["tcg"]
    assert 0 < one["local_seconds"][0] < BODY_SECONDS
    assert 0 < one["virtman_seconds"][0] < BODY_SECONDS
    assert 0 < one["virtman_prefetch_seconds"][0] < BODY_SECONDS
    assert "1 guest(s) at once" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "guests", "--ready", "x"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert bad.returncode == 2 and "--ready go with --image FILE" in bad.stderr
