"""The host store (``blockdev/chunkstore.py``): deduplication with byte counts, references
and eviction, rot never served, crashes never corrupt it, and import+read round-trips.

Real files in the test's directory; crashes are a real process killed mid-import, and
the leftovers of the other crash instants laid out by hand.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard
from conftest import small_tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtman.blockdev.chunkstore import (
    ChunkAbsent,
    ChunkStore,
    ChunkStoreError,
    RecipeDevice,
    StoreFull,
    blob_name,
    decode_digests,
    encode_digests,
)
from virtman.blockdev.manifest import Manifest, compute_manifest
from virtman.errors import Conflict, LifecycleError, NotFound
from virtman.protocol.nbd.constants import STATE_HOLE, STATE_ZERO, Errno

CS = 4096  # a small chunk keeps these tests fast; the store takes any chunk size


def chunk(seed: int, *, compressible: bool = False) -> bytes:
    rng = random.Random(seed)
    if compressible:
        words = [rng.randbytes(rng.randint(3, 9)) for _ in range(16)]
        out = b""
        while len(out) < CS:
            out += rng.choice(words)
        return out[:CS]
    return rng.randbytes(CS)


def write(path: Path, chunks: list[bytes]) -> bytes:
    data = b"".join(chunks)
    path.write_bytes(data)
    return data


def blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").glob("*/*")}


def allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (root / "blobs").glob("*/*"))


# --- deduplication --------------------------------------------------------------------------


def test_two_recipes_sharing_chunks_store_each_chunk_once(tmp_path: Path) -> None:
    a, b, c, d, e = (chunk(i, compressible=i % 2 == 0) for i in range(5))
    zero = bytes(CS)
    fa = write(tmp_path / "a", [a, b, c, zero, d])
    fb = write(tmp_path / "b", [a, b, e, a, zero])
    with ChunkStore.open(str(tmp_path / "one")) as one:
        one.import_file("a", str(tmp_path / "a"), CS)
        alone = one.usage()
    with ChunkStore.open(str(tmp_path / "both")) as both:
        both.import_file("a", str(tmp_path / "a"), CS)
        both.import_file("b", str(tmp_path / "b"), CS)
        usage = both.usage()
        assert both.read("a") == fa and both.read("b") == fb
    # a, b, c, d, e: five distinct data chunks; zeros are implied, never stored.
    assert usage.chunks == 5
    assert usage.unique_bytes == 5 * CS
    assert usage.logical_bytes == 10 * CS
    assert len(blob_files(tmp_path / "both")) == 5
    # b adds one chunk (e) to a's four: far less than a second copy of a.
    assert usage.blob_disk_bytes - alone.blob_disk_bytes == allocated(tmp_path / "both") \
        - allocated(tmp_path / "one")
    assert usage.blob_disk_bytes < 2 * alone.blob_disk_bytes
    assert usage.blob_disk_bytes == allocated(tmp_path / "both")
    # Compressed: the compressible chunks take less than their raw bytes.
    assert usage.stored_bytes < usage.unique_bytes


def test_a_chunk_put_twice_is_written_once(tmp_path: Path) -> None:
    with ChunkStore.open(str(tmp_path / "s")) as store:
        first = store.put(chunk(1))
        again = store.put(chunk(1))
        assert first == again == hashlib.sha256(chunk(1)).digest()
        assert store.stats.written == 1 and store.stats.deduplicated == 1
        assert store.get(first) == chunk(1)
        assert store.put(bytes(CS)) == hashlib.sha256(bytes(CS)).digest()
        assert store.usage().chunks == 1


# --- references and eviction ------------------------------------------------------------------


def test_removing_a_recipe_evicts_only_chunks_no_other_recipe_names(tmp_path: Path) -> None:
    a, b, c, d = (chunk(i) for i in range(4))
    write(tmp_path / "x", [a, b, c])
    fy = write(tmp_path / "y", [b, d])
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as store:
        store.import_file("x", str(tmp_path / "x"), CS)
        store.import_file("y", str(tmp_path / "y"), CS)
        store.remove("x")
        assert store.recipes() == ["y"]
        # Unreferenced chunks stay (as a cache) until room is needed or collect().
        assert store.usage().chunks == 4
        assert store.collect() == 2
        usage = store.usage()
        assert usage.chunks == 2
        assert blob_files(root) == {hashlib.sha256(x).hexdigest() for x in (b, d)}
        assert usage.blob_disk_bytes == allocated(root)
        assert store.read("y") == fy
        with pytest.raises(NotFound):
            store.remove("x")


def test_capacity_evicts_least_recently_used_unreferenced_chunks(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as probe:
        probe.put(chunk(100))
        per_chunk = probe.usage().blob_disk_bytes  # random chunks all take the same
    shutil.rmtree(root)
    with ChunkStore.open(str(root), capacity=3 * per_chunk) as store:
        x, y, z = (store.put(chunk(i)) for i in range(3))
        assert store.get(x) == chunk(0)  # x is now the most recently used
        w = store.put(chunk(3))
        assert store.get(y) is None and store.stats.evicted == 1  # y: least recently used
        assert store.get(x) == chunk(0) and store.get(z) == chunk(2)
        store.put(chunk(4))
        assert store.get(w) is None  # z and x were read after w
        assert store.usage().blob_disk_bytes <= store.capacity
        assert store.usage().blob_disk_bytes == allocated(root)


def test_a_batch_never_evicts_a_chunk_it_found_held(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as probe:
        probe.put(chunk(100))
        per_chunk = probe.usage().blob_disk_bytes
    shutil.rmtree(root)
    with ChunkStore.open(str(root), capacity=2 * per_chunk) as store:
        held = store.put(chunk(0))  # unreferenced: the only evictable chunk
        write(tmp_path / "f", [chunk(9)])
        store.import_file("f", str(tmp_path / "f"), CS)
        with pytest.raises(StoreFull):
            # chunk 0 is held (deduplicated); room for chunk 1 may not come from it
            store.put_many([chunk(0), chunk(1)])
        assert store.get(held) == chunk(0)


def test_referenced_chunks_are_never_evicted_and_a_full_store_is_unchanged(
        tmp_path: Path) -> None:
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as probe:
        probe.put(chunk(100))
        per_chunk = probe.usage().blob_disk_bytes
    shutil.rmtree(root)
    data = write(tmp_path / "f", [chunk(0), chunk(1)])
    with ChunkStore.open(str(root), capacity=2 * per_chunk) as store:
        store.import_file("f", str(tmp_path / "f"), CS)
        before = blob_files(root)
        with pytest.raises(StoreFull) as caught:
            store.put(chunk(2))
        err = caught.value
        assert err.capacity == 2 * per_chunk and err.used == 2 * per_chunk
        assert err.evictable == 0 and err.os_errno == errno.ENOSPC
        assert str(root) in str(err)
        assert blob_files(root) == before and os.listdir(root / "tmp") == []
        assert store.read("f") == data


def test_a_writer_does_not_evict_its_own_chunks(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as probe:
        probe.put(chunk(100))
        per_chunk = probe.usage().blob_disk_bytes
    shutil.rmtree(root)
    # Batches of one chunk: each put must make room, and only the stale chunk may go.
    with ChunkStore.open(str(root), capacity=3 * per_chunk, batch_bytes=CS) as store:
        stale = store.put(chunk(9))
        with store.writer("big", CS) as w, pytest.raises(StoreFull):
            for i in range(4):  # the fourth would need one of its own three evicted
                w.write(chunk(i))
        assert store.get(stale) is None
        assert store.recipes() == []
        with store.writer("r", CS) as w:
            for i in range(3):
                w.write(chunk(i))
            manifest = w.commit()
        assert store.read("r") == b"".join(chunk(i) for i in range(3))
        assert manifest.count == 3 and store.missing("r") == {}
        with store.writer("r2", CS) as w, pytest.raises(StoreFull):
            w.write(chunk(7))  # a whole batch: put at once; all three are r's


# --- rot --------------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _other_frame(path: Path) -> None:
    """A valid frame of the same size and declared length, of other bytes."""
    size = path.stat().st_size
    for seed in range(1000, 20_000):  # not the seeds of the chunks stored
        frame = zstandard.ZstdCompressor(level=3).compress(chunk(seed, compressible=True))
        if len(frame) == size:
            path.write_bytes(frame)
            return
    pytest.skip("no other frame of that size found")


def _huge_header(path: Path) -> None:
    """A frame whose header claims far more than a chunk."""
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(64 << 20))[: path.stat().st_size])


@pytest.mark.parametrize("rot", [_flip, _truncate, _other_frame, _huge_header, Path.unlink])
def test_a_rotten_blob_is_never_served(tmp_path: Path, rot: object) -> None:
    chunks = [chunk(i, compressible=True) for i in range(4)]
    data = write(tmp_path / "f", chunks)
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as store:
        manifest = store.import_file("f", str(tmp_path / "f"), CS)
    victim = manifest.data_digests[2]
    rot(root / blob_name(victim))  # type: ignore[operator]
    with ChunkStore.open(str(root)) as store:
        assert store.read("f", 0, 2 * CS) == data[: 2 * CS]  # the others still serve
        with pytest.raises(ChunkAbsent) as caught:
            store.read("f")
        assert caught.value.digest == victim.hex() and caught.value.index == 2
        assert store.stats.rotten == 1
        assert not (root / blob_name(victim)).exists()
        assert store.get(victim) is None
        assert store.missing("f") == {2: victim}
        assert store.usage().blob_disk_bytes == allocated(root)
        # The same bytes put again make it whole.
        store.put(chunks[2])
        assert store.read("f") == data and store.missing("f") == {}


def test_a_recipe_committed_before_its_chunks_reads_once_they_are_put(tmp_path: Path) -> None:
    chunks = [chunk(i) for i in range(3)]
    digests = [hashlib.sha256(c).digest() for c in chunks]
    with ChunkStore.open(str(tmp_path / "s")) as store:
        store.commit("img", Manifest.from_digests(3 * CS, CS, digests))
        assert store.missing("img") == dict(enumerate(digests))
        with pytest.raises(ChunkAbsent):
            store.read("img", CS, 10)
        store.put_many(chunks[:2])
        assert store.read("img", 0, 2 * CS) == b"".join(chunks[:2])
        assert store.missing("img") == {2: digests[2]}


# --- crashes ----------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import random, sys
    from virtman.blockdev.chunkstore import ChunkStore
    store = ChunkStore.open(sys.argv[1], batch_bytes=16 * 4096)
    for n in range(10_000):
        rng = random.Random(n)
        with store.writer(f"r{n}", 4096) as w:
            for k in range(64):
                w.write(rng.randbytes(4096) if k % 3 else bytes(4096))
            w.commit()
        print(n, flush=True)
""")


def _recipe_bytes(n: int) -> bytes:
    rng = random.Random(n)
    return b"".join(rng.randbytes(4096) if k % 3 else bytes(4096) for k in range(64))


def test_a_process_killed_mid_import_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        acknowledged = [int(proc.stdout.readline()) for _ in range(3)]
        # Kill it while it writes the next recipes' blobs and commits.
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read().split()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    acknowledged += [int(n) for n in rest]
    with ChunkStore.open(str(root)) as store:
        assert os.listdir(root / "tmp") == []
        names = store.recipes()
        for n in acknowledged:
            assert f"r{n}" in names
        for name in names:  # committed recipes, acknowledged or not, are whole
            assert store.read(name) == _recipe_bytes(int(name[1:]))
        usage = store.usage()
        assert len(blob_files(root)) == usage.chunks
        assert usage.blob_disk_bytes == allocated(root)


def test_leftovers_of_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    root = tmp_path / "s"
    data = write(tmp_path / "f", [chunk(0), chunk(1)])
    store = ChunkStore.open(str(root))
    store.import_file("f", str(tmp_path / "f"), CS)
    acked = store.put(chunk(2))  # acknowledged, unreferenced
    store.abandon()  # as if killed: not closed cleanly
    # A blob written and renamed whose row was never committed, and a torn temp file.
    orphan = hashlib.sha256(chunk(3)).digest()
    (root / blob_name(orphan)).parent.mkdir(exist_ok=True)
    (root / blob_name(orphan)).write_bytes(zstandard.ZstdCompressor().compress(chunk(3)))
    (root / "tmp" / "half").write_bytes(b"\x28\xb5\x2f")
    with ChunkStore.open(str(root)) as again:
        assert again.stats.orphans_removed == 1
        assert os.listdir(root / "tmp") == []
        assert not (root / blob_name(orphan)).exists()
        assert again.read("f") == data
        assert again.get(acked) == chunk(2)
        assert again.usage().blob_disk_bytes == allocated(root)
    # Closed cleanly now: the next open lists no directories.
    (root / blob_name(orphan)).write_bytes(b"stray")
    with ChunkStore.open(str(root)) as clean:
        assert clean.stats.orphans_removed == 0


def test_a_full_disk_fails_the_import_and_gives_the_space_back(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "3m") as disk:
        root = disk / "s"
        small = write(tmp_path / "small", [chunk(i) for i in range(64)])  # 256 KiB
        write(tmp_path / "big", [chunk(1000 + i) for i in range(1024)])  # 4 MiB
        with ChunkStore.open(str(root)) as store:
            store.import_file("small", str(tmp_path / "small"), CS)
            used = allocated(root)
            with pytest.raises(ChunkStoreError) as caught:
                store.import_file("big", str(tmp_path / "big"), CS)
            assert caught.value.os_errno == errno.ENOSPC
            assert caught.value.errno == Errno.ENOSPC
            assert store.recipes() == ["small"]
            assert allocated(root) == used == store.usage().blob_disk_bytes
            assert os.listdir(root / "tmp") == []
            assert store.read("small") == small
            store.put(chunk(5000))  # the space came back: a chunk fits again
        with ChunkStore.open(str(root)) as again:
            assert again.stats.orphans_removed == 0
            assert again.read("small") == small
            assert again.usage().blob_disk_bytes == allocated(root)


def test_a_full_index_fails_the_import_and_gives_the_blobs_back(tmp_path: Path) -> None:
    root = tmp_path / "s"
    small = write(tmp_path / "small", [chunk(i) for i in range(4)])
    big = write(tmp_path / "big", [chunk(1000 + i) for i in range(512)])
    with ChunkStore.open(str(root)) as store:
        store.import_file("small", str(tmp_path / "small"), CS)
        used = allocated(root)
        # SQLite's own page limit stands in for a full disk under the index: its commit
        # fails with SQLITE_FULL after the blobs were placed.
        db = store._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(ChunkStoreError) as caught:
            store.import_file("big", str(tmp_path / "big"), CS)
        assert caught.value.os_errno == errno.ENOSPC
        assert allocated(root) == used == store.usage().blob_disk_bytes
        assert store.recipes() == ["small"] and store.read("small") == small
        db.execute("PRAGMA max_page_count = 1073741823")
        store.import_file("big", str(tmp_path / "big"), CS)
        assert store.read("big") == big
    with ChunkStore.open(str(root)) as again:
        assert again.stats.orphans_removed == 0  # closed cleanly: nothing left to settle


# --- errors and lifecycle ---------------------------------------------------------------------


def test_errors_name_what_went_wrong(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(tmp_path / "f", [chunk(0)])
    with ChunkStore.open(str(root)) as store:
        with pytest.raises(ChunkStoreError) as caught:
            ChunkStore.open(str(root))
        assert caught.value.os_errno == errno.EWOULDBLOCK
        assert caught.value.path == str(root / "lock")
        store.import_file("f", str(tmp_path / "f"), CS)
        with pytest.raises(Conflict):
            store.import_file("f", str(tmp_path / "f"), CS)
        store.import_file("f", str(tmp_path / "f"), CS, replace=True)
        assert store.usage().chunks == 1
        with pytest.raises(ChunkStoreError) as caught:
            store.import_file("g", str(tmp_path / "nope"), CS)
        assert caught.value.os_errno == errno.ENOENT and "nope" in str(caught.value)
        with pytest.raises(ValueError, match="outside"):
            store.read("f", CS - 1, 2)
        with pytest.raises(NotFound):
            store.read("g")
    with pytest.raises(LifecycleError):
        store.read("f")


def test_recipe_codec_round_trips() -> None:
    digests = {0: b"\1" * 32, 7: b"\2" * 32, 2**40: b"\3" * 32}
    assert decode_digests(encode_digests(digests)) == digests
    with pytest.raises(ValueError):
        decode_digests(b"\0" * 41)


# --- round trip -------------------------------------------------------------------------------

PIECES = [b"", bytes(700), b"\xab" * 1000, random.Random(5).randbytes(1500), b"xyz" * 333]


def test_import_then_read_round_trips(tmp_path: Path) -> None:
    # One store for every example (making one costs more than the example), so each
    # example's recipes share it with the earlier ones, as on a host.
    with ChunkStore.open(str(tmp_path / "s")) as store:
        names = itertools.count()

        @settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(parts=st.lists(st.integers(0, len(PIECES) - 1), max_size=24),
               chunk_size=st.sampled_from([512, 1000, 4096]),
               ranges=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=4))
        def round_trip(parts: list[int], chunk_size: int,
                       ranges: list[tuple[float, float]]) -> None:
            data = b"".join(PIECES[i] for i in parts)
            n = next(names)
            path = tmp_path / f"f{n}"
            path.write_bytes(data)
            manifest = store.import_file(f"f{n}", str(path), chunk_size)
            store.import_file(f"again{n}", str(path), chunk_size)
            assert manifest.size == len(data)
            assert store.read(f"f{n}") == data
            for a, b in ranges:
                start = int(a * len(data))
                length = int(b * (len(data) - start))
                assert store.read(f"again{n}", start, length) == data[start : start + length]
            store.export(f"f{n}", str(tmp_path / "out"))
            assert (tmp_path / "out").read_bytes() == data
            distinct = {data[i : i + chunk_size] for i in range(0, len(data), chunk_size)}
            data_chunks = {c for c in distinct if c.count(0) != len(c)}
            assert len(set(manifest.data_digests.values())) == len(data_chunks)
            assert store.missing(f"f{n}") == {}
            path.unlink()

        round_trip()
        assert store.usage().blob_disk_bytes == allocated(tmp_path / "s")


# --- as a block device -------------------------------------------------------------------------


async def test_a_recipe_device_reports_holes_and_never_serves_rot(tmp_path: Path) -> None:
    a, b = chunk(1), chunk(2, compressible=True)
    data = write(tmp_path / "f", [a, bytes(CS), bytes(CS), b, bytes(100)])
    root = tmp_path / "s"
    with ChunkStore.open(str(root)) as store:
        manifest = store.import_file("f", str(tmp_path / "f"), CS)
        device = RecipeDevice(store, "f")
        await device.open()
        assert device.size == len(data) and device.read_only
        assert await device.block_status(0, device.size) == [
            (CS, 0), (2 * CS, STATE_HOLE | STATE_ZERO), (CS, 0), (100, STATE_HOLE | STATE_ZERO)]
        assert await device.block_status(CS + 5, 2 * CS) == [
            (2 * CS - 5, STATE_HOLE | STATE_ZERO), (5, 0)]
        # A manifest computed over it reads only the data chunks, and is the recipe's.
        computed = await compute_manifest(device, CS)
        assert computed.fingerprint() == manifest.fingerprint()
        assert device.stats.reads == 2
        _flip(root / blob_name(manifest.data_digests[3]))
        assert await device.read(0, CS) == a
        with pytest.raises(ChunkAbsent) as caught:
            await device.read(3 * CS, 10)
        assert caught.value.errno == Errno.EIO
        await device.close()


# --- the benchmark ----------------------------------------------------------------------------


def test_bench_store_reports_dedup_of_generated_versions(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    done = subprocess.run(
        [sys.executable, "-m", "virtman", "bench", "store", "--image-size", "2M",
         "--chunk-size", "64K", "--generate", "4", "--change", "5", "--shifted",
         "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "total:" in done.stdout and "version3" in done.stdout
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert [os.path.basename(r["file"]) for r in runs] == [
        "base", "version1", "version2", "version3", "base-shifted-16"]
    assert all(r["verified"] for r in runs)
    assert doc["total"]["raw_bytes"] == 5 * 2 * 1024 * 1024
    added = [b["disk_bytes"] - a["disk_bytes"] for a, b in itertools.pairwise(runs)]
    # A version adds about its 5 % of changed chunks; the shifted copy shares no chunk.
    assert all(a < 0.15 * runs[0]["disk_bytes"] for a in added[:3])
    assert added[3] > 0.8 * runs[0]["disk_bytes"]
    assert os.listdir(tmp_path) == ["store.json"]  # the work directory is removed
