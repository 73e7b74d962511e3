"""A whole virtman cluster on one machine: origin, Volt and agents as real processes.

Used by ``virtman up`` and by the tests. Volt and every agent are separate processes
(so an agent can be SIGKILLed like a dead host, and Volt restarted); the origin is an
NBD server inside the calling process, so the bytes it sends can be counted exactly.
Everything listens on loopback or on Unix sockets in directories this cluster made;
``stop()`` ends every process it started, even after a failure or Ctrl-C.

Credentials: the cluster makes its own in ``WORKDIR/credentials`` (made afresh each
time): a CA and a certificate per service (``virtman.pki``), and a tokens file with
an operator, a viewer and one agent token per host (``virtman.auth``). Volt and the
agents serve HTTPS and check every request; agents are known by their certificates.
With ``ClusterSettings.insecure`` they serve plain HTTP and agents use their tokens.
``credentials`` (the operator's) and ``api()`` are how callers reach the services.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from virtman.auth import Role, issue_token, write_secret
from virtman.blockdev.file import FileDevice
from virtman.childprocess import ChildProcess
from virtman.errors import NetworkError
from virtman.httpapi import ApiClient, Credentials, wait_for
from virtman.limits import (
    DEFAULT_CACHE_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TIMEOUT_SECONDS,
    IMAGE_REGISTER_TIMEOUT_SECONDS,
    SERVICE_START_TIMEOUT_SECONDS,
    STATUS_TIMEOUT_SECONDS,
    TREE_FANOUT,
    TREE_PARENTS_PER_NODE,
    VM_CREATE_TIMEOUT_SECONDS,
)
from virtman.nbd.server import Export, NbdServer
from virtman.pki import DEFAULT_HOSTS, init_ca, issue
from virtman.tlsconfig import TlsFiles

log = logging.getLogger(__name__)

_SERVING = re.compile(rb"serving on (https?://\S+)")
OPERATOR = "operator"
VIEWER = "viewer"


def _option(flag: str, value: str | None) -> list[str]:
    return [flag, value] if value else []


def _text(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


class Placement:
    """Where each service runs: this machine's loopback (the default)."""

    def command_prefix(self, service: str) -> list[str]:
        """What to run a service's command under (e.g. ``ip netns exec NS``)."""
        return []

    def address(self, service: str) -> str:
        """The IP address a service listens on ("origin", "volt", "host1", ...)."""
        return "127.0.0.1"


@dataclass
class ClusterSettings:
    hosts: int = 8
    fanout: int = TREE_FANOUT
    parents: int = TREE_PARENTS_PER_NODE
    heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    cache_size: int = DEFAULT_CACHE_CAPACITY
    log_level: str = "info"
    #: Seconds a started Volt or agent has to say where it serves.
    start_timeout: float = SERVICE_START_TIMEOUT_SECONDS
    #: Delivery mode of every agent (a ``virtman.delivery.DeliveryMode`` value).
    mode: str = "virtman"
    #: PAPER mode: seconds per tree level to attach.
    attach_delay: float = 0.0
    #: Every agent's ``--accel`` (auto, kvm, tcg), and its ``--qemu`` and
    #: ``--accel-cache`` when set (else the agent's defaults).
    accel: str = "auto"
    qemu: str | None = None
    accel_cache: str | None = None
    #: Plain HTTP between the services (tokens still required): ``virtman up --insecure``.
    insecure: bool = False
    #: Every agent's ``--record-seconds`` when set (how long a new VM's reads are
    #: recorded for the image's boot profile).
    record_seconds: float | None = None


@dataclass
class Service:
    """A running virtman process and where it serves."""

    child: ChildProcess
    url: str = ""
    killed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def alive(self) -> bool:
        return self.child.alive


class LocalCluster:
    def __init__(
        self,
        workdir: str,
        settings: ClusterSettings | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.settings = settings or ClusterSettings()
        self.placement = placement or Placement()
        # Unix socket paths must stay short: keep them out of a deep work directory.
        self.socket_root = tempfile.mkdtemp(prefix="vm-")
        self.origin: NbdServer | None = None
        self.origin_device: FileDevice | None = None
        self.origin_uri = ""
        self.volt: Service | None = None
        self.volt_port = 0
        self.agents: dict[str, Service] = {}
        os.makedirs(self.workdir, exist_ok=True)
        self.credentials_dir = os.path.join(self.workdir, "credentials")
        #: The tokens file Volt and the agents check requests against.
        self.tokens_file = os.path.join(self.credentials_dir, "tokens")
        self._make_credentials()
        #: The operator's: what ``api()`` and the helpers below call with.
        self.credentials = Credentials(token=self.token(OPERATOR), ca=self.ca_file)

    # --- credentials ----------------------------------------------------------------------------

    def _make_credentials(self) -> None:
        shutil.rmtree(self.credentials_dir, ignore_errors=True)  # never another run's
        self.ca_file = init_ca(self.credentials_dir).cert
        holders = [(Role.OPERATOR, OPERATOR), (Role.VIEWER, VIEWER)]
        holders += [(Role.AGENT, name) for name in self.host_names()]
        for role, name in holders:
            token = issue_token(self.tokens_file, role, name)
            write_secret(self.token_file(name), token)

    def issue_agent_token(self, name: str) -> str:
        """A token for one more agent name (a stand-in a test registers with Volt
        itself); only services started after this call know it."""
        token = issue_token(self.tokens_file, Role.AGENT, name)
        write_secret(self.token_file(name), token)
        return token

    def token_file(self, name: str) -> str:
        """Where the token of ``name`` (operator, viewer, an agent) is kept (0600)."""
        return os.path.join(self.credentials_dir, f"{name}.token")

    def token(self, name: str) -> str:
        with open(self.token_file(name), encoding="utf-8") as f:
            return f.read().strip()

    def tls_files(self, service: str) -> TlsFiles | None:
        """The certificate of a service (made on first use; None when insecure), valid
        for its address on this placement and for loopback."""
        if self.settings.insecure:
            return None
        cert = os.path.join(self.credentials_dir, f"{service}.crt")
        if os.path.exists(cert):
            return TlsFiles(cert, cert.removesuffix(".crt") + ".key", self.ca_file)
        hosts = list(dict.fromkeys([self.placement.address(service), *DEFAULT_HOSTS]))
        return issue(service, self.credentials_dir, self.credentials_dir, hosts=hosts)

    def _security_args(self, service: str, *, agent: bool) -> list[str]:
        tls = self.tls_files(service)
        args = ["--tokens", self.tokens_file]
        if tls is None:
            args.append("--insecure")
            if agent:
                args += ["--token-file", self.token_file(service)]
        else:
            args += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
        return args

    def api(self, url: str, **kwargs: Any) -> ApiClient:
        """A client of one of this cluster's services, with the operator's credentials."""
        return self.credentials.api(url, **kwargs)

    # --- processes ------------------------------------------------------------------------------

    async def _spawn(self, name: str, args: list[str]) -> Service:
        argv = [
            *self.placement.command_prefix(name),
            sys.executable,
            "-m",
            "virtman",
            "--log-level",
            self.settings.log_level,
            *args,
        ]
        # A restart appends to the log; readiness reads this run's lines only. A local
        # cluster is its parent's: if `virtman up` is SIGKILLed (a test's cleanup, an
        # OOM kill), the kernel stops Volt and the agents rather than leave them serving.
        child = ChildProcess.start(name, argv, os.path.join(self.workdir, f"{name}.log"),
                                   append=True, die_with_parent=True)
        match = await child.wait_ready_async(lambda: child.search(_SERVING),
                                             self.settings.start_timeout)
        service = Service(child, url=match.group(1).decode())
        try:
            await wait_for(service.url, credentials=self.credentials)
        except BaseException:
            await asyncio.to_thread(child.stop)  # started but never ready: not to outlive us
            raise
        return service

    # --- origin -----------------------------------------------------------------------------------

    async def start_origin(self, image_path: str, export: str = "image") -> str:
        self.origin_device = FileDevice(image_path, read_only=True)
        await self.origin_device.open()
        # Only hosts of the cluster read the image: a secure cluster's origin requires
        # STARTTLS and a client certificate of its CA, like every relay.
        tls = self.tls_files("origin")
        self.origin = NbdServer([Export(export, self.origin_device, "virtman origin")], tls=tls)
        host = self.placement.address("origin")
        port = await self.origin.listen_tcp(host, 0)
        scheme = "nbd" if tls is None else "nbds"
        self.origin_uri = f"{scheme}://{host}:{port}/{export}"
        return self.origin_uri

    @property
    def origin_bytes_sent(self) -> int:
        return self.origin.stats.bytes_read if self.origin else 0

    # --- Volt -------------------------------------------------------------------------------------

    @property
    def volt_url(self) -> str:
        scheme = "http" if self.settings.insecure else "https"
        return f"{scheme}://{self.placement.address('volt')}:{self.volt_port}"

    async def start_volt(self) -> Service:
        s = self.settings
        self.volt = await self._spawn(
            "volt",
            [
                "volt",
                "--listen",
                f"{self.placement.address('volt')}:{self.volt_port}",
                "--db",
                os.path.join(self.workdir, "volt.db"),
                "--fanout",
                str(s.fanout),
                "--parents",
                str(s.parents),
                "--heartbeat-interval",
                str(s.heartbeat_interval),
                "--heartbeat-timeout",
                str(s.heartbeat_timeout),
                *self._security_args("volt", agent=False),
            ],
        )
        self.volt_port = int(self.volt.url.rsplit(":", 1)[1])
        return self.volt

    def kill_volt(self) -> None:
        if self.volt is not None:
            self.volt.child.kill()
            self.volt.killed = True

    # --- agents -----------------------------------------------------------------------------------

    def host_names(self) -> list[str]:
        return [f"host{i + 1}" for i in range(self.settings.hosts)]

    async def start_agent(self, name: str) -> Service:
        previous = self.agents.get(name)
        listen = f"{self.placement.address(name)}:0"
        nbd_listen = listen
        if previous is not None:  # a restart keeps the addresses it had
            listen = previous.url.split("://", 1)[1]
            nbd_listen = previous.extra.get("nbd", nbd_listen)
        socket_dir = os.path.join(self.socket_root, name)
        service = await self._spawn(
            name,
            [
                "agent",
                "--volt",
                self.volt_url,
                "--name",
                name,
                "--listen",
                listen,
                "--nbd-listen",
                nbd_listen,
                "--data-dir",
                os.path.join(self.workdir, name),
                "--socket-dir",
                socket_dir,
                "--cache-size",
                str(self.settings.cache_size),
                "--mode",
                self.settings.mode,
                "--attach-delay",
                str(self.settings.attach_delay),
                "--accel",
                self.settings.accel,
                *_option("--qemu", self.settings.qemu),
                *_option("--accel-cache", self.settings.accel_cache),
                *_option("--record-seconds", _text(self.settings.record_seconds)),
                *self._security_args(name, agent=True),
            ],
        )
        async with self.api(service.url) as api:
            status = await api.get("/status")
        service.extra["nbd"] = status["relay_nbd"]
        self.agents[name] = service
        return service

    async def start_agents(self) -> None:
        await asyncio.gather(*(self.start_agent(n) for n in self.host_names()))

    def kill_agent(self, name: str) -> None:
        agent = self.agents[name]
        agent.child.kill()
        agent.killed = True
        log.info("killed agent %s (SIGKILL)", name)

    async def stop_agent(self, name: str) -> int:
        return await asyncio.to_thread(self.agents[name].child.stop)

    # --- API helpers ------------------------------------------------------------------------------

    async def register_image(self, name: str, origins: list[str] | None = None) -> Any:
        async with self.api(self.volt_url, timeout=IMAGE_REGISTER_TIMEOUT_SECONDS) as api:
            return await api.post(
                "/images",
                json={
                    "name": name,
                    "origins": origins or [self.origin_uri],
                    "chunk_size": self.settings.chunk_size,
                },
            )

    async def set_profile(self, image: str, doc: dict[str, Any]) -> Any:
        """Give Volt ``image``'s boot profile (a ``planner.profile`` document)."""
        async with self.api(self.volt_url) as api:
            return await api.put(f"/images/{image}/profile", json=doc)

    async def create_vm(
        self, host: str, name: str, image: str, timeout: float = VM_CREATE_TIMEOUT_SECONDS
    ) -> str:
        # Creating the first VM of an image may download it whole (COPY mode).
        async with self.api(self.agents[host].url, timeout=timeout) as api:
            doc = await api.post("/vms", json={"name": name, "image": image})
        return str(doc["uri"])

    async def tree(self, image: str) -> Any:
        async with self.api(self.volt_url) as api:
            return await api.get(f"/images/{image}/tree")

    async def agent_status(self, host: str) -> Any:
        agent = self.agents[host]
        if not agent.alive:
            return None
        try:
            async with self.api(agent.url, timeout=STATUS_TIMEOUT_SECONDS) as api:
                return await api.get("/status")
        except NetworkError:
            return None

    # --- teardown ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        children = [a.child for a in self.agents.values()]
        if self.volt is not None:
            children.append(self.volt.child)
        await asyncio.gather(*(asyncio.to_thread(c.stop) for c in children))
        if self.origin is not None:
            await self.origin.stop()
        if self.origin_device is not None:
            await self.origin_device.close()
        shutil.rmtree(self.socket_root, ignore_errors=True)

