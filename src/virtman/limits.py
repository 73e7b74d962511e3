"""Every buffer, request size, queue and timeout of the data plane, named once.

These are the defaults; the classes that use them take them as arguments so a
deployment (or a test) can change one without editing code.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- NBD protocol --------------------------------------------------------------------
#: Largest option payload a server accepts during the handshake. The specification
#: caps strings at 4096 bytes; a GO/INFO carries one name plus a few info requests.
MAX_OPTION_LENGTH = 64 * KiB
#: Largest READ/WRITE payload a server accepts and advertises as the maximum block
#: size. 32 MiB is the specification's default maximum payload.
MAX_REQUEST_PAYLOAD = 32 * MiB
#: Preferred block size advertised to clients.
PREFERRED_BLOCK_SIZE = 4 * KiB
#: Largest structured-reply chunk or simple reply a client accepts beyond the
#: requested length (error messages).
MAX_ERROR_MESSAGE = 4096
#: Largest number of option exchanges a server accepts on one connection before it
#: gives up on the client (defends against a client looping forever in the handshake).
MAX_OPTIONS_PER_CONNECTION = 1024

# --- NBD server ------------------------------------------------------------------------
#: Requests a server runs at once per connection before it stops reading from it.
MAX_INFLIGHT_PER_CONNECTION = 128
#: Seconds a stopping server waits for requests in flight before it closes anyway.
SHUTDOWN_GRACE_SECONDS = 10.0
#: Socket send/receive buffer asked for on every NBD connection (the kernel caps it at
#: net.core.wmem_max/rmem_max). Large buffers let one write hold a whole 256 KiB-4 MiB
#: reply, so a reply costs one system call instead of several wakeups.
SOCKET_BUFFER_BYTES = 4 * MiB
#: Seconds a client has to finish the handshake.
HANDSHAKE_TIMEOUT_SECONDS = 30.0

# --- NBD client / RemoteDevice ---------------------------------------------------------
#: Seconds to connect and finish the handshake with one upstream.
CONNECT_TIMEOUT_SECONDS = 5.0
#: Seconds one request may take on one path before that path is given up on.
REQUEST_TIMEOUT_SECONDS = 30.0
#: Seconds requests in flight on a path that ``set_paths`` dropped have to finish there
#: before they move to the current paths (a dead parent would hold them until the above).
RETIRE_GRACE_SECONDS = 1.0
#: Seconds to wait before reconnecting a failed path (doubles up to the maximum).
RECONNECT_DELAY_SECONDS = 0.2
RECONNECT_DELAY_MAX_SECONDS = 5.0
#: Rounds over all paths a RemoteDevice tries for one request before it fails it.
MAX_REQUEST_ROUNDS = 3

# --- Caching ----------------------------------------------------------------------------
#: Default cache chunk: the unit fetched on a miss and verified against the manifest.
DEFAULT_CHUNK_SIZE = 256 * KiB
#: Fetches of one chunk that fail their digest before the read fails with EIO.
MAX_DIGEST_RETRIES = 3
#: Chunks fetched from upstream at once by one CachedDevice.
MAX_CONCURRENT_FETCHES = 64
#: Seconds between background syncs that make fetched chunks durable in the chunk map.
CACHE_SYNC_INTERVAL_SECONDS = 1.0

# --- Copy-on-write ----------------------------------------------------------------------
#: Default overlay block: the unit of allocation and of read-modify-write.
DEFAULT_COW_BLOCK_SIZE = 4 * KiB

# --- Coordinator (Volt) and agents ---------------------------------------------------------
#: Seconds between an agent's heartbeats.
HEARTBEAT_INTERVAL_SECONDS = 2.0
#: Seconds of silence after which Volt removes an agent from every tree.
HEARTBEAT_TIMEOUT_SECONDS = 6.0
#: Children per node and parents per node of the relay trees (the paper: binary tree).
TREE_FANOUT = 2
TREE_PARENTS_PER_NODE = 2
#: Seconds an HTTP call between virtman services may take.
HTTP_TIMEOUT_SECONDS = 30.0
#: Longest image, VM, snapshot and agent name.
MAX_NAME_LENGTH = 64
#: Bytes of a VM's written data sent per record when a VM is cloned or migrated.
COPY_RECORD_BYTES = 1 * MiB
#: Default capacity of an agent's cache group.
DEFAULT_CACHE_CAPACITY = 64 * GiB

# --- Guests (QEMU) ------------------------------------------------------------------------
#: Seconds the KVM probe gives a Linux kernel under KVM to print its first console line
#: before ``--accel auto`` decides KVM does not work here. Under TCG the same kernel
#: prints it in about 3 s on this project's 2-core machines and under a working KVM in
#: well under 1 s, so a KVM that needs more than this is broken (or slower than TCG).
KVM_PROBE_SECONDS = 10.0
#: Seconds a guest started under KVM may stay silent on its serial console before it
#: is stopped and started again under TCG (once). Larger than the probe's limit: many
#: guests starting at once share the CPUs, and a bootloader may wait before it prints.
KVM_SILENCE_SECONDS = 30.0
#: Seconds between looks at a starting guest's console log for its first byte.
GUEST_CONSOLE_POLL_SECONDS = 0.1
#: Seconds a guest gets to exit after SIGTERM before it is killed.
GUEST_STOP_GRACE_SECONDS = 5.0
