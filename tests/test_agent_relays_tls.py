"""An agent's relay tree over TLS: origin → relay h1 → relay h2, every hop STARTTLS with
client certificates of the cluster CA, driven by a small image directory (no Volt)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from directory import StaticDirectory

from virtman.agent.images import ImageSpec
from virtman.agent.relays import RelayManager
from virtman.blockdev.manifest import compute_manifest
from virtman.blockdev.memory import MemoryDevice
from virtman.errors import NetworkError
from virtman.nbd.client import NbdClient
from virtman.nbd.server import NbdServer
from virtman.pki import init_ca, issue
from virtman.tlsconfig import TlsFiles

CHUNK = 64 * 1024


async def test_relay_tree_runs_over_mutual_tls(tmp_path: Path) -> None:
    init_ca(str(tmp_path / "ca"))
    files = {n: issue(n, str(tmp_path / "hosts"), str(tmp_path / "ca"))
             for n in ("origin", "h1", "h2", "vm")}
    data = os.urandom(1024 * 1024)
    device = MemoryDevice(data=data, read_only=True)
    origin = NbdServer({"img": device}, tls=files["origin"])
    port = await origin.listen_tcp("127.0.0.1", 0)
    origin_uri = f"nbds://127.0.0.1:{port}/img"
    manifest = await compute_manifest(device, CHUNK)
    spec = ImageSpec("img", [origin_uri], len(data), CHUNK, manifest.to_json())
    h1 = RelayManager(str(tmp_path / "h1"), StaticDirectory(spec, []), parent_wait=1.0,
                      tls=files["h1"])
    await h1.start()
    h2 = None
    try:
        await h1.image("img")
        uri1 = h1.relay_uri("img")
        assert uri1.startswith("nbds://127.0.0.1:")
        h2 = RelayManager(str(tmp_path / "h2"), StaticDirectory(spec, [uri1]), parent_wait=2.0,
                          tls=files["h2"])
        await h2.start()
        relay2 = await h2.image("img")
        assert [p["state"] for p in relay2.remote.path_status() if not p["fallback"]] == ["up"]
        client = await NbdClient.connect(h2.relay_uri("img"), tls=files["vm"])
        try:
            assert await client.read(0, len(data)) == data
        finally:
            await client.close()
        # Every byte reached h2 through h1, over TLS; h1 read it from the origin over TLS.
        assert h1.server.stats.tls_sessions >= 1 and h1.server.stats.bytes_read == len(data)
        assert origin.stats.tls_sessions >= 1 and origin.stats.bytes_read == len(data)
        assert h1.server.stats.tls_refused == 0
        # A client without the cluster's certificate reads nothing from a relay.
        with pytest.raises(NetworkError, match="requires TLS"):
            await NbdClient.connect(uri1.replace("nbds://", "nbd://"))
        stranger_ca = tmp_path / "other"
        init_ca(str(stranger_ca))
        stranger = issue("x", str(stranger_ca), str(stranger_ca))
        with pytest.raises(NetworkError):
            await NbdClient.connect(uri1, tls=TlsFiles(stranger.cert, stranger.key,
                                                       files["vm"].ca))
    finally:
        if h2 is not None:
            await h2.stop()
        await h1.stop()
        await origin.stop()
