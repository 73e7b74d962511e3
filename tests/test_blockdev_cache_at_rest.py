"""A relay's cache at rest, as a user runs it: `virtman serve` processes, a real client.

- Bytes flipped in the cache file while the relay is stopped (cleanly or killed) are
  never served: every held chunk is checked on its first read after the restart
  (against the manifest, or the store's checksum), and a failing one is fetched again,
  counted and logged.
- A relay whose cache disk is full (a small tmpfs mounted here) serves every read,
  straight from upstream, and says so in its log once, not once per chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image, require, small_tmpfs

from virtman.blockdev.store import StoreFile

KiB = 1024
MiB = 1024 * KiB
CHUNK = 256 * KiB
ROTTED = [0, 3, 7, 15]  # chunks whose bytes are flipped while the relay is stopped


def nbdcopy(uri: str, dest: Path) -> bytes:
    dest.unlink(missing_ok=True)
    done = subprocess.run(["nbdcopy", uri, str(dest)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"nbdcopy failed: {done.stderr}"
    return dest.read_bytes()


def digest(image: Path, manifest: Path) -> None:
    subprocess.run([sys.executable, "-m", "virtman", "digest", str(image), "-o", str(manifest),
                    "--chunk-size", str(CHUNK)], check=True, timeout=60)


def durable_chunks(store_path: Path) -> bytearray:
    store = StoreFile.open(str(store_path))
    os.close(store.fd)
    return store.present


def flip(store_path: Path, chunks: list[int]) -> None:
    """Invert 16 bytes in the middle of each chunk's data, as rot at rest would."""
    store = StoreFile.open(str(store_path))
    try:
        for index in chunks:
            at = store.data_offset + index * CHUNK + CHUNK // 2
            os.pwrite(store.fd, bytes(b ^ 0xFF for b in os.pread(store.fd, 16, at)), at)
        os.fsync(store.fd)
    finally:
        os.close(store.fd)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
@pytest.mark.parametrize("with_manifest", [False, True], ids=["checksum", "manifest"])
def test_chunks_rotted_while_stopped_are_never_served(
        serve: Any, tmp_path: Path, with_manifest: bool, stop: str) -> None:
    require("nbdcopy")
    image = tmp_path / "image.raw"
    want = make_image(image, 16 * CHUNK)
    origin = serve("serve", str(image), "--read-only", export="disk", name="origin")
    cache_dir = tmp_path / "cache"
    relay_args = ["serve", "--upstream", origin.uri, "--cache-dir", str(cache_dir),
                  "--chunk-size", str(CHUNK)]
    if with_manifest:
        digest(image, tmp_path / "manifest.json")
        relay_args += ["--manifest", str(tmp_path / "manifest.json")]
    store_path = cache_dir / "cache.vmstore"

    relay = serve(*relay_args, export="disk", name="relay")
    assert nbdcopy(relay.uri, tmp_path / "out.raw") == want
    if stop == "sigkill":
        # Killed once the background sync has made every chunk durable: those are the
        # chunks a restart reuses without fetching, so the ones that must be checked.
        deadline = time.monotonic() + 10
        while durable_chunks(store_path).count(1) < 16:
            assert time.monotonic() < deadline, "chunks never became durable"
            time.sleep(0.05)
        relay.stop(signal.SIGKILL)
    else:
        relay.stop()
    assert durable_chunks(store_path).count(1) == 16
    flip(store_path, ROTTED)

    relay = serve(*relay_args, export="disk", name="relay")
    got = nbdcopy(relay.uri, tmp_path / "out.raw")
    bad = [i for i in range(16)
           if got[i * CHUNK : (i + 1) * CHUNK] != want[i * CHUNK : (i + 1) * CHUNK]]
    assert bad == [], f"rotted chunks {bad} were served"
    relay.stop()
    log = relay.log.read_text()
    against = "the manifest" if with_manifest else "its checksum"
    assert f"chunk 0 failed {against} (changed at rest)" in log, log
    assert "4 chunks failed their check this session and were fetched again" in log, log
    # Fetched again and stored: the next restart serves them from the cache, intact.
    store = StoreFile.open(str(store_path))
    try:
        assert store.units_present == 16
        for index in ROTTED:
            assert store.pread(index * CHUNK, CHUNK) == want[index * CHUNK : (index + 1) * CHUNK]
    finally:
        os.close(store.fd)


# --- a full cache disk -----------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (the "small disk" of a cache)."""
    with small_tmpfs(tmp_path, "4m") as mount:
        yield mount


def test_full_cache_disk_passes_reads_through(serve: Any, tmp_path: Path,
                                              small_fs: Path) -> None:
    require("nbdcopy")
    image = tmp_path / "image.raw"
    want = make_image(image, 32 * MiB)  # 128 chunks on a 4 MiB cache disk
    origin = serve("serve", str(image), "--read-only", export="disk", name="origin")
    relay = serve("serve", "--upstream", origin.uri, "--cache-dir", str(small_fs),
                  "--chunk-size", str(CHUNK), export="disk", name="relay")
    for attempt in range(2):  # the second pass: what was stored is served, the rest passes
        assert nbdcopy(relay.uri, tmp_path / "out.raw") == want, f"pass {attempt}"
    relay.stop()
    log = relay.log.read_text()
    assert log.count("cannot store chunks (disk_full") == 1, log
    assert "serving uncached reads straight from upstream" in log
    assert "EIO" not in log and "Input/output error" not in log
    # The cache kept what fitted, and nothing torn: every held chunk is the image's.
    store = StoreFile.open(str(small_fs / "cache.vmstore"))
    try:
        held = [i for i in range(store.header.units) if store.present[i]]
        assert 0 < len(held) < 16
        for index in held:
            assert store.pread(index * CHUNK, CHUNK) == want[index * CHUNK : (index + 1) * CHUNK]
    finally:
        os.close(store.fd)
