"""Volt's HTTP + JSON API (FastAPI; the OpenAPI document is at ``/openapi.json``).

Errors are translated at the boundary (``httpapi.install_error_handlers``): an unknown
image or agent is 404, a name in use 409, a request Volt cannot carry out (origin
unreachable, bad settings) 422, malformed JSON 422 with pydantic's description. Each
says what is wrong in ``detail`` and changes nothing. Request bodies over
``HttpLimits.max_body_bytes`` are 413, and no error quotes more than a bounded prefix of
what was sent (``httpapi.HttpLimits``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

from virtman import __version__
from virtman.coordinator.models import (
    AgentInfo,
    Heartbeat,
    HeartbeatReply,
    Image,
    ImageCreate,
    JoinRequest,
    Name,
    Paths,
    Registration,
    TreeView,
)
from virtman.coordinator.volt import Volt
from virtman.errors import NotFound
from virtman.httpapi import ERROR_RESPONSES, HttpLimits, install_error_handlers

_ERRORS = ERROR_RESPONSES


def create_app(volt: Volt, limits: HttpLimits | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        volt.start()
        yield
        await volt.stop()

    app = FastAPI(title="virtman Volt coordinator", version=__version__, lifespan=lifespan)
    app.state.volt = volt

    install_error_handlers(app, limits)

    @app.get("/health")
    async def health() -> dict[str, object]:
        failed = volt.detector_error
        return {
            "status": "ok" if failed is None else f"failure detector stopped: {failed!r}",
            "state": volt.lifecycle.value,
            "images": len(volt.images()),
            "repairs": volt.repairs,
        }

    @app.post("/images", status_code=201, responses=_ERRORS)
    async def add_image(body: ImageCreate) -> Image:
        return await volt.add_image(body)

    @app.get("/registrations/{name}", responses=_ERRORS)
    async def get_registration(name: Name) -> Registration:
        # What ``virtman image add`` polls while its POST /images reads the origin.
        p = volt.registration(name)
        return Registration(
            name=name,
            size=p.size,
            chunks=p.chunks,
            chunks_done=p.chunks_done,
            bytes_read=p.bytes_read,
        )

    @app.get("/images")
    async def list_images() -> list[Image]:
        return volt.images()

    @app.get("/images/{name}", responses=_ERRORS)
    async def get_image(name: Name) -> Image:
        return volt._image_doc(volt.image(name))

    @app.get("/images/{name}/manifest", responses=_ERRORS)
    async def get_manifest(name: Name) -> Response:
        return Response(volt.image(name).manifest_json, media_type="application/json")

    @app.delete("/images/{name}", status_code=204, responses=_ERRORS)
    async def remove_image(name: Name) -> None:
        volt.remove_image(name)

    @app.get("/images/{name}/tree", responses=_ERRORS)
    async def get_tree(name: Name) -> TreeView:
        return volt.tree_view(name)

    @app.post("/images/{name}/members", responses=_ERRORS)
    async def join(name: Name, body: JoinRequest) -> Paths:
        return volt.join(name, body.agent, body.relay_uri, body.url)

    @app.delete("/images/{name}/members/{agent}", status_code=204, responses=_ERRORS)
    async def leave(name: Name, agent: Name) -> None:
        volt.leave(name, agent)

    @app.post("/agents/{name}/heartbeat", responses=_ERRORS)
    async def heartbeat(name: Name, body: Heartbeat) -> HeartbeatReply:
        return volt.heartbeat(name, body)

    @app.get("/agents")
    async def list_agents() -> list[AgentInfo]:
        return volt.agents()

    @app.get("/agents/{name}", responses=_ERRORS)
    async def get_agent(name: Name) -> AgentInfo:
        for info in volt.agents():
            if info.name == name:
                return info
        raise NotFound(f"no agent named {name!r}")

    return app
