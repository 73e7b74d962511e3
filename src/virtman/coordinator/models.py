"""The JSON documents of Volt's HTTP API (also used by agents and the CLI)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

from virtman.errors import ConfigError, quote
from virtman.limits import DEFAULT_CHUNK_SIZE, MAX_NAME_LENGTH
from virtman.protocol.uri import parse_nbd_uri

#: Names of images, agents, VMs and snapshots: safe as file names and URI parts.
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, . _ -")]


def _nbd_uri(value: str) -> str:
    try:
        address = parse_nbd_uri(value)
    except ConfigError as err:  # its message quotes the URI as a bounded prefix
        raise ValueError(str(err)) from err
    if address.host is not None:
        try:  # what the resolver would refuse later with a UnicodeError, not an answer
            address.host.encode("idna")
        except UnicodeError as err:
            raise ValueError(f"host {quote(address.host)} is not a valid host name") from err
    return value


#: An NBD URI (``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``),
#: checked where it enters, so a bad one is a 422 naming its field, not a failure later.
NbdUri = Annotated[str, AfterValidator(_nbd_uri)]


class ImageCreate(BaseModel):
    name: Name
    origins: list[NbdUri] = Field(min_length=1, description="NBD URIs of the image's origin(s)")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=4096, le=64 * 1024 * 1024)

    @field_validator("chunk_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"chunk_size {v} is not a power of two")
        return v


class Image(BaseModel):
    name: str
    origins: list[str]
    size: int
    chunk_size: int
    fingerprint: str = Field(description="SHA-256 over the manifest: names the content")
    created: float


class Registration(BaseModel):
    """How far the manifest of an image being registered is (``GET /registrations/NAME``)."""

    name: str
    size: int = Field(description="image bytes; 0 until the origin has answered")
    chunks: int = Field(description="chunks to read (holes excluded); 0 until known")
    chunks_done: int
    bytes_read: int


class Heartbeat(BaseModel):
    url: str = Field(description="the agent's HTTP base URL")
    relays: dict[Name, NbdUri] = Field(
        default_factory=dict, description="image name -> NBD URI of this agent's relay export"
    )
    stats: dict[str, object] = Field(default_factory=dict)


class Paths(BaseModel):
    """Where one agent fetches one image from: its parents, then the origin(s)."""

    image: str
    position: int
    level: int
    parents: list[str] = Field(description="NBD URIs of the parents, best first")
    parent_names: list[str]
    origins: list[str] = Field(description="NBD URIs of the origin: every node's last path")


class HeartbeatReply(BaseModel):
    interval: float
    timeout: float
    paths: dict[str, Paths]


class JoinRequest(BaseModel):
    agent: Name
    relay_uri: NbdUri
    url: str | None = None


class ProfileRun(BaseModel):
    """One or more recorded boots an agent sends (``POST /images/{name}/profile/runs``):
    ``profile`` is a boot profile document (``planner.profile``), checked by Volt."""

    agent: Name
    profile: dict[str, Any]


class TreeNode(BaseModel):
    agent: str
    position: int
    level: int
    parents: list[str]
    relay_uri: str


class TreeView(BaseModel):
    image: str
    fanout: int
    parents_per_node: int
    depth: int
    nodes: list[TreeNode]


class AgentInfo(BaseModel):
    name: str
    url: str
    seconds_since_heartbeat: float
    images: list[str]


class BakeCreate(BaseModel):
    """A bake an agent made and serves (``POST /bakes``, by that agent): Volt registers
    its saved state and its disk at the bake's instant as two images whose origin is
    the agent's NBD export of each, then keeps the record."""

    name: Name
    agent: Name = Field(description="the baking agent, whose exports are the origins")
    image: Name = Field(description="the image the guest was baked from")
    state_origin: NbdUri
    disk_origin: NbdUri
    state_bytes: int = Field(ge=1, description="length of QEMU's migration stream")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=4096, le=64 * 1024 * 1024)
    state_chunk_size: int | None = Field(
        None, ge=4096, le=64 * 1024 * 1024,
        description="the state image's chunks (default chunk_size): it is read whole, in order")
    guest: dict[str, Any] = Field(description="the guest's configuration (GuestConfig)")
    accel: str = Field(pattern="^(kvm|tcg)$", description="what the guest ran under")
    ready: str = Field("", description="how readiness was decided, for people")
    bake_seconds: float = 0.0

    @field_validator("chunk_size", "state_chunk_size")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError(f"chunk size {v} is not a power of two")
        return v


class Bake(BaseModel):
    name: str
    agent: str
    image: str
    state_image: str = Field(description="the image holding QEMU's saved state")
    disk_image: str = Field(description="the image holding the disk at the bake's instant")
    state_bytes: int
    disk_bytes: int
    guest: dict[str, Any]
    accel: str
    ready: str
    bake_seconds: float
    created: float


def bake_images(name: str) -> tuple[str, str]:
    """The names of a bake's state and disk images."""
    return f"{name}.state", f"{name}.disk"
