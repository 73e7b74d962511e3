"""Volt's HTTP + JSON API (FastAPI; the OpenAPI document is at ``/openapi.json``).

Errors are translated at the boundary (``httpapi.install_error_handlers``): an unknown
image or agent is 404, a name in use 409, a request Volt cannot carry out (origin
unreachable, bad settings) 422, malformed JSON 422 with pydantic's description. Each
says what is wrong in ``detail`` and changes nothing. Request bodies over
``HttpLimits.max_body_bytes`` are 413, and no error quotes more than a bounded prefix of
what was sent (``httpapi.HttpLimits``).

Every request carries a credential (``virtman.auth``): none or an unknown one is 401,
a role without the right 403. Reads are for anyone with a credential; images are the
operators'; heartbeats, joins and leaves are agents', each only under its own name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Response

from virtman import __version__
from virtman.auth import ANYONE, Authenticator, Principal, Role, check_acting_as, protect, require
from virtman.coordinator.models import (
    AgentInfo,
    Bake,
    BakeCreate,
    Heartbeat,
    HeartbeatReply,
    Image,
    ImageCreate,
    JoinRequest,
    Name,
    Paths,
    ProfileRun,
    Registration,
    TreeView,
)
from virtman.coordinator.ui import UiHub, UiLimits, ui_router
from virtman.coordinator.volt import Volt
from virtman.errors import NotFound
from virtman.httpapi import ERROR_RESPONSES, HttpLimits, install_error_handlers
from virtman.metrics import CONTENT_TYPE as METRICS_TYPE
from virtman.planner.profile import BootProfile

_ERRORS = ERROR_RESPONSES
_READ = Depends(require(*ANYONE))
_OPERATOR = Depends(require(Role.OPERATOR))
_VIEW = Depends(require(Role.VIEWER, Role.OPERATOR))  # dashboards, metrics
#: An agent, whichever: the route checks the name it acts as (it is in the body).
AgentCaller = Annotated[Principal, Depends(require(Role.AGENT))]


def create_app(
    volt: Volt,
    limits: HttpLimits | None = None,
    ui_limits: UiLimits | None = None,
    *,
    authenticator: Authenticator,
) -> FastAPI:
    hub = UiHub(volt, ui_limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        volt.start()
        yield
        hub.close()
        await volt.stop()

    app = FastAPI(title="virtman Volt coordinator", version=__version__, lifespan=lifespan)
    app.state.volt = volt

    install_error_handlers(app, limits)
    app.include_router(ui_router(hub), dependencies=[_VIEW])  # the live view: /ui, /ui/events

    @app.get("/health", dependencies=[_READ])
    async def health() -> dict[str, object]:
        failed = volt.detector_error
        return {
            "status": "ok" if failed is None else f"failure detector stopped: {failed!r}",
            "state": volt.lifecycle.value,
            "images": len(volt.images()),
            "repairs": volt.repairs,
        }

    @app.get("/metrics", response_class=Response, dependencies=[_VIEW])
    async def metrics() -> Response:
        """Prometheus text format (``virtman.metrics``)."""
        return Response(volt.metrics.render(), media_type=METRICS_TYPE)

    @app.post("/images", status_code=201, responses=_ERRORS, dependencies=[_OPERATOR])
    async def add_image(body: ImageCreate) -> Image:
        return await volt.add_image(body)

    # An operator's: what ``virtman image add`` polls, with the credentials of its
    # POST /images, while Volt reads the origin.
    @app.get("/registrations/{name}", responses=_ERRORS, dependencies=[_OPERATOR])
    async def get_registration(name: Name) -> Registration:
        p = volt.registration(name)
        return Registration(
            name=name,
            size=p.size,
            chunks=p.chunks,
            chunks_done=p.chunks_done,
            bytes_read=p.bytes_read,
        )

    @app.get("/images", dependencies=[_READ])
    async def list_images() -> list[Image]:
        return volt.images()

    @app.get("/images/{name}", responses=_ERRORS, dependencies=[_READ])
    async def get_image(name: Name) -> Image:
        return volt._image_doc(volt.image(name))

    @app.get("/images/{name}/manifest", responses=_ERRORS, dependencies=[_READ])
    async def get_manifest(name: Name) -> Response:
        return Response(volt.image(name).manifest_json, media_type="application/json")

    @app.delete("/images/{name}", status_code=204, responses=_ERRORS, dependencies=[_OPERATOR])
    async def remove_image(name: Name) -> None:
        volt.remove_image(name)

    def profile_answer(name: str, profile: BootProfile) -> dict[str, Any]:
        image = volt.image(name)
        return {
            "image": name,
            "chunks": len(profile.entries),
            "bytes": profile.bytes(image.size),
            "image_bytes": image.size,
            **profile.to_doc(),
        }

    # Boot profiles (planner.profile): agents read them to prefetch and send the boots
    # they record; operators show, import and clear them (virtman image profile).
    @app.get("/images/{name}/profile", responses=_ERRORS, dependencies=[_READ])
    async def get_profile(name: Name) -> dict[str, Any]:
        return profile_answer(name, volt.profile(name))

    @app.post("/images/{name}/profile/runs", responses=_ERRORS)
    async def add_profile_run(
        name: Name, body: ProfileRun, principal: AgentCaller
    ) -> dict[str, Any]:
        check_acting_as(principal, body.agent)
        return profile_answer(name, volt.add_profile_run(name, body.profile, body.agent))

    @app.put("/images/{name}/profile", responses=_ERRORS, dependencies=[_OPERATOR])
    async def put_profile(name: Name, body: dict[str, Any]) -> dict[str, Any]:
        profile = volt.set_profile(name, body)
        assert profile is not None
        return profile_answer(name, profile)

    @app.delete(
        "/images/{name}/profile", status_code=204, responses=_ERRORS, dependencies=[_OPERATOR]
    )
    async def delete_profile(name: Name) -> None:
        volt.profile(name)  # 404 when there is none to clear
        volt.set_profile(name, None)

    @app.get("/images/{name}/tree", responses=_ERRORS, dependencies=[_READ])
    async def get_tree(name: Name) -> TreeView:
        return volt.tree_view(name)

    @app.post("/images/{name}/members", responses=_ERRORS)
    async def join(name: Name, body: JoinRequest, principal: AgentCaller) -> Paths:
        check_acting_as(principal, body.agent)
        return volt.join(name, body.agent, body.relay_uri, body.url)

    @app.delete(
        "/images/{name}/members/{agent}",
        status_code=204,
        responses=_ERRORS,
        dependencies=[Depends(require(Role.AGENT, acting_as="agent"))],
    )
    async def leave(name: Name, agent: Name) -> None:
        volt.leave(name, agent)

    # Bakes (prebaked µVMs): an agent registers the one it made and serves; anyone reads
    # them (agents resume from them); operators remove them.
    @app.post("/bakes", status_code=201, responses=_ERRORS)
    async def add_bake(body: BakeCreate, principal: AgentCaller) -> Bake:
        check_acting_as(principal, body.agent)
        return await volt.add_bake(body)

    @app.get("/bakes", dependencies=[_READ])
    async def list_bakes() -> list[Bake]:
        return volt.bakes()

    @app.get("/bakes/{name}", responses=_ERRORS, dependencies=[_READ])
    async def get_bake(name: Name) -> Bake:
        return volt.bake(name)

    @app.delete("/bakes/{name}", status_code=204, responses=_ERRORS, dependencies=[_OPERATOR])
    async def remove_bake(name: Name) -> None:
        volt.remove_bake(name)

    @app.post(
        "/agents/{name}/heartbeat",
        responses=_ERRORS,
        dependencies=[Depends(require(Role.AGENT, acting_as="name"))],
    )
    async def heartbeat(name: Name, body: Heartbeat) -> HeartbeatReply:
        return volt.heartbeat(name, body)

    @app.get("/agents", dependencies=[_READ])
    async def list_agents() -> list[AgentInfo]:
        return volt.agents()

    @app.get("/agents/{name}", responses=_ERRORS, dependencies=[_READ])
    async def get_agent(name: Name) -> AgentInfo:
        for info in volt.agents():
            if info.name == name:
                return info
        raise NotFound(f"no agent named {name!r}")

    protect(app, authenticator)  # last: it checks that every route above has a guard
    return app
