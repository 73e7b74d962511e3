"""The limits only the benchmarks use, named once (the product's are in ``virtman.limits``).

They live with the tools so that the product's limits describe the product alone; like
those, they are defaults that the code using them takes as arguments.
"""

from __future__ import annotations

# --- NBD benchmark (``virtman bench nbd``) -----------------------------------------------------
#: Seconds a benchmarked server has to answer ``nbdinfo`` with the export's size.
BENCH_SERVER_READY_TIMEOUT_SECONDS = 20.0
#: Seconds a benchmarked server has after SIGTERM before it is SIGKILLed.
BENCH_SERVER_STOP_GRACE_SECONDS = 5.0
