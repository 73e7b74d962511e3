"""``virtman bench store``: bytes on disk of the deduplicated host store.

Imports files one after another into a fresh host store (``virtman.blockdev.chunkstore``)
and prints, for each, its raw size, its data (non-zero) bytes, the store's bytes on
disk after it was imported (blobs as allocated plus the index, measured from the file
system) and what it added; then the total against the sum of raw sizes and against the
first file alone (the issue's target: four bakes of one image take at most 1.2x one
bake's bytes). Every file is then read back from the store and compared.

    virtman bench store STATE-1CPU STATE-2CPU STATE-4CPU        # real files
    virtman bench store --generate 4 --image-size 64M --change 3 # no inputs
    virtman bench store --bakes --bake-cpus 1,2,4 --bake-memory 384,512 [--format ramfile]

Without files it generates its own: a base image (a quarter zero chunks, the rest
compressible text-like or incompressible data) and versions of it that each change
``--change`` percent of its chunks; ``--shifted`` adds a copy of the base with 16 bytes
inserted at its start, which shows what fixed-size chunking cannot deduplicate.

``--bakes`` makes the files with real QEMU (``storebakes``): bakes of the test guest at
each CPU count (one boot per memory size, CPUs hot-plugged between bakes), saved as the
agent saves them (``--format stream``) or with RAM page-aligned in a file
(``--format ramfile``: device state and RAM file are imported as two recipes per bake).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from virtman.blockdev.chunkstore import ChunkStore
from virtman.errors import ConfigError
from virtman.limits import DEFAULT_CHUNK_SIZE, STORE_COMPRESSION_LEVEL
from virtman.sizes import format_size, parse_size
from virtman_bench.results import machine
from virtman_bench.storebakes import make_bakes

#: Share of a generated image's chunks that are zeros, compressible, incompressible.
ZERO_SHARE = 0.25
TEXT_SHARE = 0.45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="files to import in this order (none: generate them)")
    p.add_argument("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), metavar="SIZE",
                   help="chunk size (default %(default)s bytes, the manifest's)")
    p.add_argument("--level", type=int, default=STORE_COMPRESSION_LEVEL,
                   help="zstd level (default %(default)s)")
    p.add_argument("--generate", type=int, default=4, metavar="N",
                   help="without files: generate a base and N-1 versions (default 4)")
    p.add_argument("--image-size", default="64M", metavar="SIZE",
                   help="size of each generated image (default %(default)s)")
    p.add_argument("--change", type=float, default=3.0, metavar="PERCENT",
                   help="chunks each generated version changes (default %(default)s%%)")
    p.add_argument("--shifted", action="store_true",
                   help="also generate the base shifted by 16 bytes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bakes", action="store_true",
                   help="make the files: bakes of the test guest with QEMU (TCG)")
    p.add_argument("--bake-cpus", default="1,2,4", metavar="N,N,...",
                   help="with --bakes: one bake per CPU count, from one boot (default %(default)s)")
    p.add_argument("--bake-memory", default="384", metavar="MIB,MIB,...",
                   help="with --bakes: one boot per memory size in MiB (default %(default)s)")
    p.add_argument("--format", default="stream", choices=("stream", "ramfile"),
                   help="with --bakes: the migration stream as the agent saves it, or RAM "
                        "page-aligned in a file plus the device state (default %(default)s)")
    p.add_argument("--check-resume", action="store_true",
                   help="with --bakes --format ramfile: resume each boot's last bake from "
                        "a private mapping of its RAM file and check the guest counts on")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where the store (and generated files) go; removed afterwards")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")


def run(args: argparse.Namespace) -> int:
    chunk_size = parse_size(args.chunk_size)
    if chunk_size <= 0:
        raise ConfigError(f"--chunk-size {args.chunk_size} must be positive")
    work = tempfile.mkdtemp(prefix="virtman-bench-store-", dir=args.workdir)
    try:
        files = list(args.files)
        for path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"{path} is not a file")
        checks: list[Any] = []
        ends: dict[tuple[int, int], int] = {}
        if args.bakes:
            if files:
                raise ConfigError("--bakes makes its own files: give none")
            made, checks = make_bakes(work, _ints(args.bake_memory, "--bake-memory"),
                                      _ints(args.bake_cpus, "--bake-cpus"), args.format,
                                      args.check_resume)
            files = [b.path for b in made]
            # A ramfile bake is two files: the figures per bake are after its last one.
            ends = {(b.memory_mib, b.cpus): i for i, b in enumerate(made)}
        elif not files:
            files = generate(work, parse_size(args.image_size), chunk_size, args.generate,
                             args.change, args.shifted, args.seed)
        doc = measure(os.path.join(work, "store"), files, chunk_size, args.level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["command"] = shlex.join(["virtman", "bench", "store", *sys.argv[3:]])
    doc["settings"]["generated"] = not args.files and not args.bakes
    if args.bakes:
        doc["settings"].update(bakes=args.format, bake_cpus=args.bake_cpus,
                               bake_memory=args.bake_memory)
        doc["resume_checks"] = [asdict(c) for c in checks]
        doc["bakes"] = [{"memory_mib": m, "cpus": n,
                         "disk_bytes": doc["runs"][i]["disk_bytes"]}
                        for (m, n), i in sorted(ends.items(), key=lambda kv: kv[1])]
    elif not args.files:
        doc["settings"].update(image_size=parse_size(args.image_size), change_percent=args.change,
                               seed=args.seed)
    print_table(doc)
    if doc.get("bakes"):
        first = doc["bakes"][0]["disk_bytes"]
        for n, b in enumerate(doc["bakes"], 1):
            print(f"after bake {n} ({b['memory_mib']} MiB, {b['cpus']} CPUs): "
                  f"{format_size(b['disk_bytes'])} on disk, {b['disk_bytes'] / first:.2f}x "
                  f"one bake")
    for c in checks:
        print(f"resume of the {c.memory_mib} MiB, {c.cpus}-CPU bake from a private mapping "
              f"of its RAM file: last baked tick {c.last_baked_tick}, first resumed tick "
              f"{c.first_resumed_tick}: {'goes on' if c.ok else 'FAILED ' + c.error}")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    ok = all(r["verified"] for r in doc["runs"]) and all(c.ok for c in checks)
    return 0 if ok else 1


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: numbers separated by commas") from None


def measure(root: str, files: list[str], chunk_size: int, level: int) -> dict[str, Any]:
    """Import ``files`` in order into a fresh store at ``root``; the figures per file."""
    runs: list[dict[str, Any]] = []
    with ChunkStore.open(root, level=level) as store:
        for n, path in enumerate(files):
            name = f"{n}:{os.path.basename(path)}"
            start = time.perf_counter()
            manifest = store.import_file(name, path, chunk_size)
            seconds = time.perf_counter() - start
            data = sum(min(chunk_size, manifest.size - i * chunk_size)
                       for i in manifest.data_digests)
            runs.append({"file": path, "recipe": name, "raw_bytes": manifest.size,
                         "data_bytes": data, "import_seconds": seconds,
                         "disk_bytes": disk_bytes(root),
                         "stored_bytes": store.usage().stored_bytes,
                         "unique_bytes": store.usage().unique_bytes})
        for r in runs:
            start = time.perf_counter()
            h = hashlib.sha256(store.read(r["recipe"])).digest()
            r["read_seconds"] = time.perf_counter() - start
            r["verified"] = h == file_sha256(r["file"])
    raw_total = sum(r["raw_bytes"] for r in runs)
    first = runs[0]["disk_bytes"] if runs else 0
    last = runs[-1]["disk_bytes"] if runs else 0
    return {
        "machine": machine(), "kind": "store",
        "settings": {"chunk_size": chunk_size, "level": level},
        "runs": runs,
        "total": {"raw_bytes": raw_total, "disk_bytes": last,
                  "disk_over_raw": last / raw_total if raw_total else 0.0,
                  "disk_over_first": last / first if first else 0.0},
    }


def disk_bytes(root: str) -> int:
    """Bytes the store's files take on the file system (allocated blocks)."""
    total = 0
    for top, _dirs, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def file_sha256(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.digest()


def print_table(doc: dict[str, Any]) -> None:
    print(f"{'file':<28}{'raw':>10}{'data':>10}{'disk after':>12}{'added':>10}"
          f"{'import':>10}{'read':>10}  ok")
    before = 0
    for r in doc["runs"]:
        added = r["disk_bytes"] - before
        before = r["disk_bytes"]
        print(f"{os.path.basename(r['file'])[:27]:<28}{format_size(r['raw_bytes']):>10}"
              f"{format_size(r['data_bytes']):>10}{format_size(r['disk_bytes']):>12}"
              f"{format_size(added):>10}"
              f"{_rate(r['raw_bytes'], r['import_seconds']):>10}"
              f"{_rate(r['raw_bytes'], r['read_seconds']):>10}  "
              f"{'yes' if r['verified'] else 'NO'}")
    t = doc["total"]
    print(f"total: {format_size(t['disk_bytes'])} on disk for {format_size(t['raw_bytes'])} "
          f"raw ({t['disk_over_raw']:.3f}x the sum of raw sizes, "
          f"{t['disk_over_first']:.3f}x the first file's store)")
    m = doc["machine"]
    print(f"chunk {format_size(doc['settings']['chunk_size'])}, zstd level "
          f"{doc['settings']['level']}; {m['cpu']}, {m['cores']} cores")


def _rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e6:.0f} MB/s" if seconds > 0 else "-"


def generate(work: str, size: int, chunk_size: int, count: int, change: float, shifted: bool,
             seed: int) -> list[str]:
    """A base image and ``count - 1`` versions, each changing ``change`` % of the base's
    chunks (its own choice of them); written to ``work``. Returns their paths."""
    if count < 1 or size <= 0:
        raise ConfigError("--generate and --image-size must be positive")
    rng = random.Random(seed)
    pool = b" ".join(rng.randbytes(rng.randint(2, 10)).hex().encode() for _ in range(4096))
    chunks = (size + chunk_size - 1) // chunk_size
    base = bytearray()
    for _ in range(chunks):
        base += _chunk(rng, pool, chunk_size)
    del base[size:]
    paths = [_write(work, "base", base)]
    for v in range(1, count):
        image = bytearray(base)
        for index in rng.sample(range(chunks), round(chunks * change / 100)):
            at = index * chunk_size
            length = min(chunk_size, size - at)
            image[at : at + length] = _chunk(rng, pool, chunk_size, zero=False)[:length]
        paths.append(_write(work, f"version{v}", image))
    if shifted:
        paths.append(_write(work, "base-shifted-16", bytes(16) + base[:-16]))
    return paths


def _chunk(rng: random.Random, pool: bytes, size: int, *, zero: bool = True) -> bytes:
    kind = rng.random()
    if zero and kind < ZERO_SHARE:
        return bytes(size)
    if kind < ZERO_SHARE + TEXT_SHARE:
        out = bytearray()
        while len(out) < size:
            at = rng.randrange(len(pool) - 512)
            out += pool[at : at + rng.randint(32, 512)]
        return bytes(out[:size])
    return rng.randbytes(size)


def _write(work: str, name: str, data: bytes | bytearray) -> str:
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.write(data)
    return path
