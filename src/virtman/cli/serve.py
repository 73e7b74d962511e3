"""``virtman serve``: export a file, a caching relay of upstreams, or a COW overlay.

    virtman serve FILE --socket PATH [--export NAME] [--read-only]
    virtman serve --upstream URI [--upstream URI ...] --cache-dir DIR --socket PATH
    virtman serve --base URI --overlay FILE --socket PATH

``--listen HOST:PORT`` may replace or accompany ``--socket``. SIGTERM and SIGINT stop
the server cleanly: requests in flight finish, writes are flushed, sockets removed.
``--max-connections`` and ``--idle-timeout`` set the server's client limits (see
``virtman.nbd.server``). ``--metrics-listen HOST:PORT --tokens FILE`` serves Prometheus
metrics at ``https://HOST:PORT/metrics`` (``virtman.metrics``; docs/control-plane.md
lists them) to viewers and operators of the tokens file, over HTTPS with the TLS files
below (plain HTTP only with ``--insecure``; a token is still required).

``--tls-cert FILE --tls-key FILE --tls-ca FILE`` turn TLS on: clients must send
STARTTLS first and present a certificate signed by the CA, and the upstreams of a relay
and the base of an overlay are reached over TLS with the same certificate. ``--listen``
(TCP) needs them, or an explicit ``--insecure``; a ``--socket`` is guarded by its file
permissions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from virtman.blockdev.base import BlockDevice
from virtman.blockdev.remote import PathPolicy
from virtman.errors import ConfigError
from virtman.limits import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COW_BLOCK_SIZE,
    IDLE_CLOSE_FROM_FRACTION,
    IDLE_TIMEOUT_SECONDS,
)
from virtman.protocol.uri import parse_listen, parse_nbd_uri
from virtman.sizes import parse_size
from virtman.tlsconfig import TlsFiles, add_tls_options, tls_files

if TYPE_CHECKING:
    from virtman.auth import Authenticator
    from virtman.httpapi import HttpService
    from virtman.nbd.server import NbdServer

log = logging.getLogger("virtman.serve")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a block device over NBD",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="raw image file to export")
    p.add_argument(
        "--upstream",
        action="append",
        metavar="URI",
        default=[],
        help="NBD URI of an upstream; repeat for several paths, which share the load",
    )
    p.add_argument(
        "--fallback",
        action="append",
        metavar="URI",
        default=[],
        help="NBD URI used only while no --upstream path is up (e.g. the origin)",
    )
    p.add_argument(
        "--path-policy",
        choices=[policy.value for policy in PathPolicy],
        default=PathPolicy.ROUND_ROBIN.value,
        help="how each request picks among the --upstream paths (default round-robin)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory of a relay")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="cache chunk size of a relay (default 256K)",
    )
    p.add_argument(
        "--manifest",
        metavar="FILE",
        help="digest manifest (virtman digest) that every fetched chunk must match",
    )
    p.add_argument("--base", metavar="URI", help="NBD URI of the read-only base of an overlay")
    p.add_argument(
        "--overlay", metavar="FILE", help="copy-on-write overlay file (created if missing)"
    )
    p.add_argument(
        "--block-size",
        type=parse_size,
        default=DEFAULT_COW_BLOCK_SIZE,
        metavar="SIZE",
        help="overlay allocation block (default 4K)",
    )
    p.add_argument(
        "--socket", action="append", default=[], metavar="PATH", help="Unix socket to listen on"
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="TCP address to listen on",
    )
    p.add_argument(
        "--export", metavar="NAME", help="export name (default: derived from the source)"
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="connections held at once; more are refused before the handshake "
        "(default: half of the descriptor limit less 64)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_idle_timeout,
        default=IDLE_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="close connections with no request for this long while the server holds "
        f"{IDLE_CLOSE_FROM_FRACTION * 100:.0f}%% of --max-connections or more; 0: never "
        f"(default {IDLE_TIMEOUT_SECONDS:.0f})",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at https://HOST:PORT/metrics to the viewers and "
        "operators of --tokens (port 0: any free port, printed at start)",
    )
    p.add_argument(
        "--tokens",
        metavar="FILE",
        help="with --metrics-listen: the tokens /metrics accepts (virtman token issue)",
    )
    add_tls_options(p)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext: --listen without TLS (anyone who reaches the port reads the "
        "export), --metrics-listen over plain HTTP (a token is still required)",
    )
    p.set_defaults(run=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _idle_timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text[:40]!r}")
    return value or None


def _mode(args: argparse.Namespace) -> str:
    modes = [
        m
        for m, on in (
            ("file", args.file),
            ("relay", args.upstream),
            ("overlay", args.base or args.overlay),
        )
        if on
    ]
    if len(modes) != 1:
        raise ConfigError("give exactly one of FILE, --upstream URI, or --base URI --overlay FILE")
    mode = modes[0]
    if mode == "relay" and not args.cache_dir:
        raise ConfigError("--upstream needs --cache-dir DIR")
    if mode != "relay" and (args.cache_dir or args.manifest or args.fallback):
        raise ConfigError("--cache-dir, --fallback and --manifest only go with --upstream")
    if mode == "overlay" and not (args.base and args.overlay):
        raise ConfigError("an overlay needs both --base URI and --overlay FILE")
    if not args.socket and not args.listen:
        raise ConfigError("give --socket PATH or --listen HOST:PORT")
    return mode


def build_device(
    args: argparse.Namespace, tls: TlsFiles | None = None
) -> tuple[BlockDevice, str]:
    """The device the arguments describe, and its default export name."""
    from virtman.blockdev.cached import CachedDevice
    from virtman.blockdev.cow import CowDevice
    from virtman.blockdev.file import FileDevice
    from virtman.blockdev.manifest import load_manifest
    from virtman.blockdev.remote import RemoteDevice

    mode = _mode(args)
    if mode == "file":
        if not os.path.exists(args.file):
            raise ConfigError(f"FILE {args.file!r} does not exist")
        return FileDevice(args.file, read_only=args.read_only), os.path.basename(args.file)
    if mode == "relay":
        addresses = [parse_nbd_uri(u) for u in args.upstream]
        fallbacks = [parse_nbd_uri(u) for u in args.fallback]
        manifest = load_manifest(args.manifest) if args.manifest else None
        remote = RemoteDevice(
            addresses, fallbacks=fallbacks, policy=PathPolicy(args.path_policy), tls=tls
        )
        device = CachedDevice(remote, args.cache_dir, chunk_size=args.chunk_size, manifest=manifest)
        return device, addresses[0].export
    base_address = parse_nbd_uri(args.base)
    base = RemoteDevice([base_address], tls=tls)
    cow = CowDevice(base, args.overlay, block_size=args.block_size, read_only=args.read_only)
    return cow, os.path.splitext(os.path.basename(args.overlay))[0]


def run(args: argparse.Namespace) -> int:
    tls = tls_files(args)
    device, default_name = build_device(args, tls)
    listens = [parse_listen(text) for text in args.listen]
    if listens and tls is None and not args.insecure:
        # Secure by default: a Unix socket is guarded by its file permissions, a TCP port
        # by nothing but TLS with client certificates.
        raise ConfigError(
            "--listen without --tls-cert/--tls-key/--tls-ca would serve the export in "
            "plaintext to anyone who reaches the port; give the TLS files (virtman ca "
            "issue), or --insecure to allow it"
        )
    metrics_listen = (
        parse_listen(args.metrics_listen, "--metrics-listen") if args.metrics_listen else None
    )
    authenticator = _metrics_authenticator(args, tls) if metrics_listen is not None else None
    from virtman.runtime import configure_logging, run_async

    configure_logging(args.log_level)
    return run_async(
        _serve(
            device,
            args.export or default_name,
            args.socket,
            listens,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            tls=tls,
            metrics_listen=metrics_listen,
            authenticator=authenticator,
        )
    )


def _metrics_authenticator(args: argparse.Namespace, tls: TlsFiles | None) -> Authenticator:
    """Who may read ``--metrics-listen``: the viewers and operators of ``--tokens``. Its
    HTTP is TLS with the NBD certificate; plain only where the operator said so."""
    from virtman.auth import Authenticator, TokenFile

    if not args.tokens:
        raise ConfigError(
            "--metrics-listen needs --tokens FILE: /metrics answers only the viewers and "
            "operators it lists (virtman token issue viewer NAME --tokens FILE)"
        )
    if tls is None and not args.insecure:
        raise ConfigError(
            "--metrics-listen without --tls-cert/--tls-key/--tls-ca would send metrics and "
            "tokens over plain HTTP; give the TLS files, or --insecure to allow it"
        )
    return Authenticator(TokenFile(args.tokens), certificates=tls is not None)


async def _serve(
    device: BlockDevice,
    name: str,
    sockets: list[str],
    listens: list[tuple[str, int]],
    *,
    max_connections: int | None,
    idle_timeout: float | None,
    tls: TlsFiles | None = None,
    metrics_listen: tuple[str, int] | None = None,
    authenticator: Authenticator | None = None,
) -> int:
    from virtman.nbd.server import NbdServer

    await device.open()
    server = NbdServer(
        {name: device}, max_connections=max_connections, idle_timeout=idle_timeout, tls=tls
    )
    exporter: HttpService | None = None
    # A signal only sets this event; the stop runs here, in this coroutine, so nothing
    # runs in a task nobody holds and an error of the stop reaches run_async.
    stop_requested = asyncio.Event()
    try:
        for path in sockets:
            await server.listen_unix(path)
        for host, port in listens:
            await server.listen_tcp(host, port)
        if metrics_listen is not None:
            if authenticator is None:
                raise ConfigError("--metrics-listen needs an authenticator (--tokens FILE)")
            exporter = await _start_metrics(
                device, name, server, metrics_listen, authenticator=authenticator, tls=tls
            )
            print(f"metrics at {exporter.url}/metrics", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop, stop_requested, sig)
        print(f"serving {device.describe()} as export {name!r}", flush=True)
        await stop_requested.wait()
    finally:
        if exporter is not None:
            await exporter.close()
        await server.stop()
        await device.close()
    return 0


async def _start_metrics(
    device: BlockDevice,
    name: str,
    server: NbdServer,
    listen: tuple[str, int],
    *,
    authenticator: Authenticator,
    tls: TlsFiles | None,
) -> HttpService:
    """An HTTP service in this loop answering ``GET /metrics`` to viewers and operators:
    the collectors read the server and devices in the loop's thread, as they change in
    it, never concurrently."""
    from fastapi import Depends, FastAPI, Response

    from virtman.auth import Role, protect, require
    from virtman.blockdev.cached import CachedDevice
    from virtman.blockdev.remote import RemoteDevice
    from virtman.httpapi import HttpService, bind, install_error_handlers
    from virtman.metrics import (
        CONTENT_TYPE,
        ImageFigures,
        Metric,
        Metrics,
        data_path_families,
        fetch_histogram,
        nbd_families,
    )

    metrics = Metrics()
    relay = device if isinstance(device, CachedDevice) else None
    if relay is not None:
        relay.on_fetch = fetch_histogram(metrics).observe

    def families() -> list[Metric]:
        found = nbd_families({"serve": [server]})
        if relay is not None and isinstance(relay.upstream, RemoteDevice):
            # A relay's --upstream paths play the parents, its --fallback paths the origin.
            figures = ImageFigures.read(
                name, relay, relay.upstream, server.exports_bytes_sent().get(name, 0),
                lambda _uri, fallback: fallback,
            )
            found += data_path_families([figures])
        return found

    metrics.collect_with(families)
    app = FastAPI(title="virtman serve metrics", openapi_url=None, docs_url=None,
                  redoc_url=None)
    install_error_handlers(app)  # a refusal is a 401/403 with its reason, not a 500

    @app.get("/metrics", dependencies=[Depends(require(Role.VIEWER, Role.OPERATOR))])
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    protect(app, authenticator)
    service = HttpService(app, bind(*listen), tls=tls)
    await service.start()
    return service


def _stop(stop_requested: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s, shutting down", sig.name)
    stop_requested.set()
