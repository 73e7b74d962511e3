#!/usr/bin/env python3
"""Compare NBD servers (qemu-nbd, nbdkit, virtman, virtman relay) on one raw file.

Thin wrapper around :mod:`virtman_bench.nbd`; see ``--help``.  Example:

    bench/nbd_throughput.py --size 256M --seconds 3 --servers qemu-nbd,nbdkit
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the product's and the tools' sources.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "bench" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtman_bench.nbd import main

if __name__ == "__main__":
    raise SystemExit(main())
