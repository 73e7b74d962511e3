"""The agent's HTTP + JSON API: the VM operations of the paper's Table 2.

    POST   /vms                      {name, image | from_snapshot}  -> the VM and its NBD URI
                                     {name, from_bake, start: true, cpus, memory_mib}: a
                                     guest resumed from a bake (``agent.bakes``), its
                                     ``resume_seconds`` in the answer
    POST   /bakes                    {name, image, guest, ready_marker | ready_after, accel}
                                     -> the bake, served here and registered with Volt
    GET    /bakes, /bakes/{name};  DELETE /bakes/{name} (here only: Volt's record is
                                     removed by the operator, ``virtman bake remove``)
    GET    /vms, /vms/{name}
    DELETE /vms/{name}[?instance_only=true]
    POST   /vms/{name}/snapshots     {name}
    POST   /vms/{name}/clone         {destination: an agent's name, as Volt knows it}
    POST   /vms/{name}/migrate       {destination}
    POST   /vms/import?name=&image=  body: the VM's copy stream (agent to agent; the
                                     format is ``virtman.protocol.copystream``)
    POST   /vms/incoming             {name, image, source_uri, source_agent, guest, accel}
    POST   /vms/incoming/{name}/switch   {runs}   (agent to agent: a live migration's
    POST   /vms/incoming/{name}/confirm           destination, ``agent/livemig.py``)
    DELETE /vms/incoming/{name}
    POST   /vms/{name}/start         {guest: {memory_mib, cpus, kernel, initrd, append}, record,
                                      accel: auto | kvm | tcg (default: the agent's --accel)}
    POST   /vms/{name}/stop
    GET    /vms/{name}/console, /vms/{name}/xml, /vms/{name}/trace
    GET    /vms/{name}/console/wait?pattern=REGEX&timeout=S  -> {matched, running, ...}:
                                     held until the pattern is on the console, the guest
                                     is not running, or S seconds (<= 60) passed
    GET    /status, /health, /metrics (Prometheus text format)

Errors: 401 no valid credential; 403 a role without the right; 404 unknown VM, image,
snapshot or agent; 409 a name in use; 422 malformed requests (and a malformed copy
stream); 502 a failure further away (Volt, another agent, a copy stream cut or
stalled). Nothing changes on error.

Who may call (``virtman.auth``): operators everything but ``/vms/import``; viewers the
status and the VM list; other agents only ``/vms/import`` (a VM they send here),
``/vms/incoming…`` (a running guest they migrate here) and ``/health``. Consoles, domain
XML and traces are operators': they show a guest's own output and paths, which a
dashboard does not need.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field, model_validator
from starlette.requests import ClientDisconnect

from virtman import __version__
from virtman.agent.agent import Agent
from virtman.agent.bakes import BakeRequest, ResumeRequest
from virtman.auth import ANYONE, Authenticator, Principal, Role, check_acting_as, protect, require
from virtman.coordinator.models import NAME_PATTERN, Name
from virtman.errors import ConfigError, NetworkError
from virtman.httpapi import ERROR_RESPONSES, install_error_handlers
from virtman.hypervisor.qemu import Accel, GuestConfig
from virtman.limits import CONSOLE_PATTERN_MAX_CHARS, CONSOLE_WAIT_MAX_SECONDS
from virtman.metrics import CONTENT_TYPE as METRICS_TYPE
from virtman.protocol.copystream import CopyStreamError

QueryName = Annotated[str, Query(pattern=NAME_PATTERN)]
#: Another agent (a live migration's source), identified by its credential.
AgentCaller = Annotated[Principal, Depends(require(Role.AGENT))]


class GuestSpec(BaseModel):
    """How to boot the guest (QEMU): images with a bootloader inside need no kernel."""

    memory_mib: int = Field(512, ge=16, le=1024 * 1024)
    cpus: int = Field(1, ge=1, le=512)
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    #: Room to grow by hot-plug (a bake's guest): the most CPUs and MiB it may reach.
    max_cpus: int | None = Field(None, ge=1, le=512)
    max_memory_mib: int | None = Field(None, ge=16, le=1024 * 1024)

    def config(self) -> GuestConfig:
        return GuestConfig(**self.model_dump())


AccelName = Literal["auto", "kvm", "tcg"]
ACCEL_FIELD = Field(None, description="auto, kvm or tcg (default: the agent's --accel)")


def _accel(name: AccelName | None) -> Accel | None:
    return Accel(name) if name is not None else None


class GuestStart(BaseModel):
    guest: GuestSpec | None = None
    record: bool = Field(False, description="record the guest's disk requests as a trace")
    accel: AccelName | None = ACCEL_FIELD


class VmCreate(BaseModel):
    name: Name
    image: Name | None = None
    from_snapshot: str | None = Field(
        None,
        pattern=NAME_PATTERN.rstrip("$") + "/" + NAME_PATTERN.lstrip("^"),
        description="VM/SNAPSHOT on this agent",
    )
    from_bake: Name | None = Field(None, description="a bake Volt knows: resume it here")
    cpus: int | None = Field(None, ge=1, le=512, description="from_bake: CPUs to hot-plug up to")
    memory_mib: int | None = Field(None, ge=16, le=1024 * 1024,
                                   description="from_bake: MiB to hot-plug up to")

    start: bool = Field(False, description="boot a QEMU guest on it at once")
    guest: GuestSpec | None = None
    record: bool = False
    accel: AccelName | None = ACCEL_FIELD

    @model_validator(mode="after")
    def _one_source(self) -> VmCreate:
        sources = [self.image, self.from_snapshot, self.from_bake]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("give image or from_snapshot or from_bake (one of them)")
        if self.from_bake is not None:
            if not self.start:
                raise ValueError("from_bake resumes a guest: give start: true")
            if self.guest is not None or self.record:
                raise ValueError("from_bake takes the bake's guest: give cpus and memory_mib")
        elif self.cpus is not None or self.memory_mib is not None:
            raise ValueError("cpus and memory_mib size a guest resumed from_bake; "
                             "a booted guest takes them in guest")
        return self


class SnapshotCreate(BaseModel):
    name: Name


class CopyRequest(BaseModel):
    # A name only: the address is Volt's record of that agent, never the caller's word,
    # so a VM's data goes nowhere but to a host of the cluster.
    destination: Name = Field(description="the destination agent's name, as Volt knows it")


class IncomingRequest(BaseModel):
    """A live migration's source asks this agent to receive its running guest."""

    name: Name
    image: Name
    source_uri: str = Field(max_length=1024, description="the source's read-only disk export")
    source_agent: Name
    guest: dict[str, Any] = Field(description="the guest's GuestConfig, as the source has it")
    accel: Literal["kvm", "tcg"]


class IncomingSwitch(BaseModel):
    runs: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(gt=0)]]] = Field(
        description="(offset, length) of every range the source's VM wrote")


class VmInfo(BaseModel):
    name: str
    image: str
    state: str
    uri: str | None
    snapshots: list[str]
    layers: int
    written_bytes: int
    guest_running: bool
    recording: bool
    resumed: dict[str, Any] | None = None
    resume_seconds: float | None = Field(
        None, description="from_bake: seconds from the request to the guest running")


class BakeCreate(BaseModel):
    name: Name
    image: Name
    guest: GuestSpec | None = None
    ready_marker: str | None = Field(None, min_length=1, max_length=CONSOLE_PATTERN_MAX_CHARS,
                                     description="a regular expression on the console")
    ready_after: float | None = Field(None, gt=0, description="seconds after QEMU starts")
    accel: AccelName | None = ACCEL_FIELD

    @model_validator(mode="after")
    def _one_readiness(self) -> BakeCreate:
        if (self.ready_marker is None) == (self.ready_after is None):
            raise ValueError("give one of ready_marker and ready_after")
        return self


class ConsoleWaitInfo(BaseModel):
    matched: bool
    running: bool
    seconds: float
    console_bytes: int


def _console_pattern(text: str | None) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as err:
        raise ConfigError(f"pattern {text!r} is not a regular expression: {err}") from None


_OPERATOR = Depends(require(Role.OPERATOR))
_VIEW = Depends(require(Role.VIEWER, Role.OPERATOR))


def create_app(agent: Agent, *, authenticator: Authenticator) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await agent.start()
        yield
        await agent.stop()

    app = FastAPI(title=f"virtman agent {agent.name}", version=__version__, lifespan=lifespan)
    install_error_handlers(app, streamed=["/vms/import"])  # a VM copy: its own cap
    errors = ERROR_RESPONSES

    @app.get("/health", dependencies=[Depends(require(*ANYONE))])
    async def health() -> dict[str, str]:
        return {"status": agent.state.value, "name": agent.name}

    @app.get("/metrics", response_class=Response, dependencies=[_VIEW])
    async def metrics() -> Response:
        """Prometheus text format (``virtman.metrics``)."""
        return Response(agent.metrics.render(), media_type=METRICS_TYPE)

    @app.get("/status", dependencies=[_VIEW])
    async def status() -> dict[str, Any]:
        return agent.status()

    @app.post("/vms", status_code=201, responses=errors, dependencies=[_OPERATOR])
    async def create(body: VmCreate) -> VmInfo:
        if body.from_bake is not None:
            began = time.monotonic()
            request = ResumeRequest(body.name, body.from_bake, body.cpus, body.memory_mib)
            return VmInfo.model_validate((await agent.bakes.resume(request, began=began)).info())
        guest = body.guest.config() if body.guest else None  # checked before anything is made
        vm = await agent.vms.create(body.name, body.image, body.from_snapshot)
        if body.start:
            vm = await agent.vms.start_guest(body.name, guest, body.record, _accel(body.accel))
        return VmInfo.model_validate(vm.info())

    @app.post("/vms/{name}/start", responses=errors, dependencies=[_OPERATOR])
    async def start(name: Name, body: GuestStart) -> VmInfo:
        guest = body.guest.config() if body.guest else None
        vm = await agent.vms.start_guest(name, guest, body.record, _accel(body.accel))
        return VmInfo.model_validate(vm.info())

    @app.post("/vms/{name}/stop", responses=errors, dependencies=[_OPERATOR])
    async def stop(name: Name) -> VmInfo:
        return VmInfo.model_validate((await agent.vms.stop_guest(name)).info())

    @app.get(
        "/vms/{name}/console",
        response_class=PlainTextResponse,
        responses=errors,
        dependencies=[_OPERATOR],
    )
    async def console(name: Name) -> str:
        return agent.vms.console(name)

    @app.get("/vms/{name}/console/wait", responses=errors, dependencies=[_OPERATOR])
    async def console_wait(
        name: Name,
        pattern: Annotated[str | None, Query(min_length=1,
                                             max_length=CONSOLE_PATTERN_MAX_CHARS)] = None,
        timeout: Annotated[float, Query(gt=0, le=CONSOLE_WAIT_MAX_SECONDS)] = 30.0,
    ) -> ConsoleWaitInfo:
        done = await agent.vms.wait_console(name, _console_pattern(pattern), timeout)
        return ConsoleWaitInfo(matched=done.matched, running=done.running,
                               seconds=round(done.seconds, 3), console_bytes=done.console_bytes)

    @app.get("/vms/{name}/xml", responses=errors, dependencies=[_OPERATOR])
    async def xml(name: Name) -> Response:
        return Response(agent.vms.domain_xml(name), media_type="application/xml")

    @app.get(
        "/vms/{name}/trace",
        response_class=PlainTextResponse,
        responses=errors,
        dependencies=[_OPERATOR],
    )
    async def trace(name: Name) -> str:
        return agent.vms.boot_trace(name)

    @app.get("/vms", dependencies=[_VIEW])
    async def list_vms() -> list[VmInfo]:
        return [VmInfo.model_validate(vm.info()) for vm in agent.vms.list()]

    @app.get("/vms/{name}", responses=errors, dependencies=[_VIEW])
    async def get_vm(name: Name) -> VmInfo:
        return VmInfo.model_validate(agent.vms.get(name).info())

    @app.delete("/vms/{name}", status_code=204, responses=errors, dependencies=[_OPERATOR])
    async def destroy(name: Name, instance_only: bool = False) -> None:
        await agent.vms.destroy(name, instance_only=instance_only)

    @app.post(
        "/vms/{name}/snapshots", status_code=201, responses=errors, dependencies=[_OPERATOR]
    )
    async def snapshot(name: Name, body: SnapshotCreate) -> VmInfo:
        return VmInfo.model_validate((await agent.vms.snapshot(name, body.name)).info())

    @app.post("/vms/{name}/clone", responses=errors, dependencies=[_OPERATOR])
    async def clone(name: Name, body: CopyRequest) -> dict[str, Any]:
        return await agent.copy_vm(name, body.destination, move=False)

    @app.post("/vms/{name}/migrate", responses=errors, dependencies=[_OPERATOR])
    async def migrate(name: Name, body: CopyRequest) -> dict[str, Any]:
        return await agent.copy_vm(name, body.destination, move=True)

    @app.post(
        "/vms/import",
        status_code=201,
        responses=errors,
        dependencies=[Depends(require(Role.AGENT))],  # a VM another agent sends here
    )
    async def import_vm(request: Request, name: QueryName, image: QueryName) -> VmInfo:
        try:
            vm = await agent.vms.import_vm(name, image, _body(request))
        except CopyStreamError as err:
            # The stream is this request's body: its faults are the caller's bad input.
            raise ConfigError(f"copy stream refused: {err}") from err
        return VmInfo.model_validate(vm.info())

    @app.post("/vms/incoming", status_code=201, responses=errors)
    async def incoming(body: IncomingRequest, principal: AgentCaller) -> dict[str, Any]:
        check_acting_as(principal, body.source_agent)  # its snapshot names the source
        try:
            guest = GuestConfig.from_dict(body.guest)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"guest configuration refused: {err}") from err
        return await agent.vms.incoming_open(body.name, body.image, body.source_uri,
                                             body.source_agent, guest, Accel(body.accel))

    def from_its_source(name: str, principal: Principal) -> None:
        """Only the agent a VM arrives from may switch, confirm or give up its arrival:
        another agent could otherwise hand the running guest a wrong disk."""
        source = agent.vms.incoming_source(name)
        if source is not None:
            check_acting_as(principal, source)

    @app.post("/vms/incoming/{name}/switch", responses=errors)
    async def incoming_switch(name: Name, body: IncomingSwitch,
                              principal: AgentCaller) -> dict[str, Any]:
        from_its_source(name, principal)
        return await agent.vms.incoming_switch(name, body.runs)

    @app.post("/vms/incoming/{name}/confirm", responses=errors)
    async def incoming_confirm(name: Name, principal: AgentCaller) -> dict[str, Any]:
        from_its_source(name, principal)
        return await agent.vms.incoming_confirm(name)

    @app.delete("/vms/incoming/{name}", status_code=204, responses=errors)
    async def incoming_abort(name: Name, principal: AgentCaller) -> None:
        from_its_source(name, principal)
        await agent.vms.incoming_abort(name)

    @app.post("/bakes", status_code=201, responses=errors, dependencies=[_OPERATOR])
    async def bake(body: BakeCreate) -> dict[str, Any]:
        guest = body.guest.config() if body.guest else GuestConfig()
        return await agent.bakes.bake(BakeRequest(
            body.name, body.image, guest, body.ready_marker, body.ready_after,
            _accel(body.accel)))

    @app.get("/bakes", dependencies=[_VIEW])
    async def list_bakes() -> list[dict[str, Any]]:
        return [agent.bakes.info(record) for record in agent.bakes.bakes.values()]

    @app.get("/bakes/{name}", responses=errors, dependencies=[_VIEW])
    async def get_bake(name: Name) -> dict[str, Any]:
        return agent.bakes.info(agent.bakes.get(name))

    @app.delete("/bakes/{name}", status_code=204, responses=errors, dependencies=[_OPERATOR])
    async def remove_bake(name: Name) -> None:
        await agent.bakes.remove(name)

    protect(app, authenticator)  # last: it checks that every route above has a guard
    return app


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that goes away is a ``NetworkError``."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            yield chunk
    except ClientDisconnect as err:
        raise NetworkError(f"the sender went away after {received} bytes") from err
