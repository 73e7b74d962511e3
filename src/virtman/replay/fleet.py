"""The stand-in VMs of one host, in a process of their own.

Why a process per host: a testbed of 32 hosts x 10 VMs replays some 350,000 requests in
ten seconds. One Python process replaying every VM saturates one core, and its delay
then shows up in every boot time as if the system under test were slow. A process per
host puts each host's VMs beside its agent, as on a real cluster.

Protocol, between a controller and this process (``python -m virtman.replay.fleet SPEC``):

1. ``SPEC`` is a JSON file: ``{"agent": URL, "image": NAME, "vms": [NAME, ...],
   "trace": CSV PATH, "speed": X}``.
2. Once its imports are done the process prints ``ready``.
3. The controller writes ``go T0``: ``T0`` a ``time.monotonic()`` reading, one clock
   for every process of the machine. Every VM is then created through the agent's API
   and replays the trace; its boot time runs from ``T0`` to its last reply.
4. The process prints one JSON line, ``{"vms": [{"name", "seconds", "errors",
   "requests", "messages"}, ...], "cpu_seconds": X}``, and exits 0; a VM that could not
   be created counts every request of the trace as an error. ``cpu_seconds`` is what
   this process used from ``go`` on: the testbed's stand-in VMs take CPU a real
   hypervisor's NBD client would spend too, and a benchmark reports it apart.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from virtman.auth import read_token_file
from virtman.errors import VirtmanError
from virtman.httpapi import ApiClient, Credentials
from virtman.limits import FLEET_READY_TIMEOUT_SECONDS, VM_CREATE_TIMEOUT_SECONDS
from virtman.replay.replayer import ReplayResult, replay
from virtman.replay.trace import Trace, load_trace


@dataclass(frozen=True)
class FleetSpec:
    agent: str
    image: str
    vms: list[str]
    trace: str
    speed: float
    #: The operator's credentials: a file holding the token, and the CA (HTTPS).
    token_file: str | None = None
    ca: str | None = None

    @classmethod
    def load(cls, path: str) -> FleetSpec:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return cls(
            doc["agent"], doc["image"], list(doc["vms"]), doc["trace"], float(doc["speed"]),
            doc.get("token_file"), doc.get("ca"),
        )

    def credentials(self) -> Credentials:
        token = read_token_file(self.token_file) if self.token_file else None
        return Credentials(token=token, ca=self.ca)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


async def boot_vm(
    agent: ApiClient, name: str, image: str, trace: Trace, speed: float, t0: float
) -> dict[str, Any]:
    try:
        doc = await agent.post("/vms", json={"name": name, "image": image})
    except VirtmanError as err:
        failed = ReplayResult(name, errors=len(trace.requests), messages=[f"create: {err}"])
        return _report(name, failed, time.monotonic() - t0)
    result = await replay(str(doc["uri"]), trace, speed=speed)
    return _report(name, result, time.monotonic() - t0)


def _report(name: str, r: ReplayResult, seconds: float) -> dict[str, Any]:
    return {
        "name": name,
        "seconds": seconds,
        "errors": r.errors,
        "requests": r.requests,
        "messages": r.messages,
    }


async def run_fleet(spec: FleetSpec, t0: float) -> list[dict[str, Any]]:
    trace = load_trace(spec.trace)
    async with spec.credentials().api(spec.agent, timeout=VM_CREATE_TIMEOUT_SECONDS) as agent:
        return list(
            await asyncio.gather(
                *(boot_vm(agent, n, spec.image, trace, spec.speed, t0) for n in spec.vms)
            )
        )


class FleetProcess:
    """The controller's side: one host's fleet process, from start to its report."""

    def __init__(self, prefix: list[str], spec: FleetSpec, spec_path: str) -> None:
        self.argv = [*prefix, sys.executable, "-m", "virtman.replay.fleet", spec_path]
        self.spec = spec
        self.spec_path = spec_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = FLEET_READY_TIMEOUT_SECONDS) -> None:
        with open(self.spec_path, "w", encoding="utf-8") as f:
            f.write(self.spec.to_json())
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = await _read_line(self.proc.stdout, timeout)
        if line != b"ready\n":
            raise VirtmanError(f"fleet {self.spec_path} did not start: {line!r}")

    def go(self, t0: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"go {t0!r}\n".encode())

    async def report(self) -> dict[str, Any]:
        """``{"vms": [...], "cpu_seconds": X}`` (see the module's protocol)."""
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        await self.proc.wait()
        if self.proc.returncode != 0 or not line:
            raise VirtmanError(
                f"fleet {self.spec_path} failed with status {self.proc.returncode}"
            )
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def _read_line(stream: asyncio.StreamReader, timeout: float) -> bytes:
    reading = asyncio.ensure_future(stream.readline())
    done, _ = await asyncio.wait([reading], timeout=timeout)
    if not done:
        reading.cancel()
        return b""
    return reading.result()


def main(argv: list[str]) -> int:
    from virtman.runtime import configure_logging, run_async

    if len(argv) != 1:
        print("usage: python -m virtman.replay.fleet SPEC.json", file=sys.stderr)
        return 2
    configure_logging("warning")
    spec = FleetSpec.load(argv[0])
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        print(f"expected 'go T0' on standard input, got {line!r}", file=sys.stderr)
        return 2
    t0 = float(line[1])

    async def go() -> int:
        cpu0 = time.process_time()
        vms = await run_fleet(spec, t0)
        cpu = time.process_time() - cpu0
        print(json.dumps({"vms": vms, "cpu_seconds": round(cpu, 3)}), flush=True)
        return 0

    return run_async(go())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
