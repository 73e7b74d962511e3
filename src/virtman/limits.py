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
#: Largest option reply payload a client accepts (a name plus a description).
MAX_OPTION_REPLY = 64 * KiB
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
#: READ replies of at least this many bytes, from a device that can say where the bytes
#: lie in a file (a warm cache), go out with sendfile(2) on plaintext connections: one
#: copy in the kernel instead of a pread into Python and a write back. Smaller replies
#: stay on the buffered path, where many of them leave in one writev per loop turn.
SENDFILE_MIN_BYTES = 64 * KiB
#: READ reply payloads of at least this many bytes are received by the NBD client into
#: an array of their own and handed on as a read-only view of it: no copy out of the
#: receive buffer, and a partly received payload is never moved within it. Smaller
#: payloads (a VM's 4 KiB reads, several per socket read) are copied out as before.
DIRECT_RECEIVE_MIN_BYTES = 64 * KiB
#: Seconds a client has to finish the handshake.
HANDSHAKE_TIMEOUT_SECONDS = 30.0
#: Connections one NBD server holds at once (in the handshake or past it); a client over
#: the limit is closed before the handshake. None: the whole of the process's connection
#: budget (``nbd/budget.py``), which all its servers share and which is derived from the
#: descriptor limit, ``(RLIMIT_NOFILE soft - DESCRIPTOR_HEADROOM) // 2`` (480 under
#: ``ulimit -n 1024``), so servers full of clients leave the process half its descriptors.
MAX_CONNECTIONS_PER_SERVER: int | None = None
#: Descriptors kept out of the derivation above for everything that is not a client
#: connection: listeners, cache and overlay files, upstream paths, QEMU, the HTTP API.
DESCRIPTOR_HEADROOM = 64
#: Seconds a connection past its handshake may have no request in flight before it is
#: closed, applied only while the server holds at least IDLE_CLOSE_FROM_FRACTION of its
#: connection limit. QEMU keeps its NBD connection for the VM's lifetime and, without
#: ``reconnect-delay``, fails every request after the server closed it with EIO (seen with
#: qemu-io 7.2), so an idle or paused VM must not be cut on a server that has room.
IDLE_TIMEOUT_SECONDS = 300.0
IDLE_CLOSE_FROM_FRACTION = 0.5

# --- Logging -------------------------------------------------------------------------------
#: Seconds during which repeats of one warning (one kind, one peer) are counted instead of
#: logged; then one line says how many there were.
LOG_REPEAT_INTERVAL_SECONDS = 60.0
#: Peers whose repeats are tracked one by one; beyond, they share one count per kind.
LOG_REPEAT_MAX_KEYS = 1024

# --- NBD client / RemoteDevice ---------------------------------------------------------
#: Seconds to connect and finish the handshake with one upstream.
CONNECT_TIMEOUT_SECONDS = 5.0
#: Seconds a closing client waits for the server to close its side after DISC.
DISCONNECT_WAIT_SECONDS = 2.0
#: Seconds one request may take on one path before that path is given up on.
REQUEST_TIMEOUT_SECONDS = 30.0
#: Seconds requests in flight on a path that ``set_paths`` dropped have to finish there
#: before they move to the current paths (a dead parent would hold them until the above).
RETIRE_GRACE_SECONDS = 1.0
#: Seconds to wait before reconnecting a failed path (doubles up to the maximum).
RECONNECT_DELAY_SECONDS = 0.2
RECONNECT_DELAY_MAX_SECONDS = 5.0
#: Seconds an agent's first open of an image (its relay) waits for the origin or a
#: parent to answer before the VM create that asked for it fails.
RELAY_OPEN_WAIT_SECONDS = 30.0
#: Rounds over all paths a RemoteDevice tries for one request before it fails it.
MAX_REQUEST_ROUNDS = 3

# --- Caching ----------------------------------------------------------------------------
#: Default cache chunk: the unit fetched on a miss and verified against the manifest.
DEFAULT_CHUNK_SIZE = 256 * KiB
#: Fetches of one chunk that fail their digest before the read fails with EIO.
MAX_DIGEST_RETRIES = 3
#: Chunks fetched from upstream at once by one CachedDevice.
MAX_CONCURRENT_FETCHES = 64
#: Adjacent chunks missed in one turn of the event loop (a client reading sequentially
#: with many requests in flight) fetched with one upstream read, up to this many bytes:
#: a relay's cold fill then sends one request per run, not per chunk. A reader of the
#: run's first chunk waits for the whole run (1 MiB: ~1 ms at 1 GB/s, ~9 ms at 1 GbE).
MISS_RUN_BYTES = 1 * MiB
#: Seconds between background syncs that make fetched chunks durable in the chunk map.
CACHE_SYNC_INTERVAL_SECONDS = 1.0
#: Seconds a cache that could not store a chunk (disk full, group at capacity) serves
#: uncached reads straight from upstream before it tries to store one again (eviction
#: that frees space ends the wait at once).
CACHE_FULL_RETRY_SECONDS = 5.0
#: Seconds between two log lines about one cache's lasting condition (full, rotten
#: chunks found): the first is logged at once, the rest are counted into the next.
CACHE_LOG_INTERVAL_SECONDS = 60.0

# --- Boot profiles and prefetch ---------------------------------------------------------
#: Bytes one prefetch request asks upstream for (adjacent chunks of the profile joined):
#: large enough that a 1 GbE round trip is a small part of it, small enough that a VM's
#: miss waiting on a chunk in it waits ~30 ms at 1 GbE.
PREFETCH_BATCH_BYTES = 4 * MiB
#: Prefetch bytes requested and not yet received, per image and host, at most. Below
#: that cap, what the upstream delivers in PREFETCH_QUEUE_SECONDS at its measured rate.
PREFETCH_INFLIGHT_BYTES = 16 * MiB
#: Seconds of upstream transfer prefetch may have queued ahead of a VM's miss: replies
#: leave a parent in order, so this is what a miss can wait behind prefetch, at most.
PREFETCH_QUEUE_SECONDS = 0.05
#: The in-flight budget's floor, in chunks: one request per parent (each host has two).
#: With one chunk in flight a child reads from one parent at a time, and on a slow link,
#: where each parent's upload is shared by its children, the budget measured from that
#: rate stays at one chunk: a 32-host testbed's deeper levels prefetched at a fraction of
#: their downlink and finished a step later per level.
PREFETCH_MIN_INFLIGHT_CHUNKS = 2
#: Prefetch rate cap per image and host (bytes/s); None: as fast as the tree gives. The
#: default leaves a 1 GbE link to demand reads and children only when they need it, as
#: demand goes first anyway; lower it on links shared with other traffic.
PREFETCH_MAX_BYTES_PER_SECOND: float | None = None
#: Profile entries a prefetch plan joins into runs at a time (see ``plan_runs``).
PREFETCH_WINDOW_ENTRIES = 256
#: Seconds of a VM's life whose first reads make its boot run of the profile.
PROFILE_RECORD_SECONDS = 120.0
#: Boot runs an agent records for an image until Volt's profile has this many merged.
PROFILE_WANTED_RUNS = 3
#: Seconds between two questions to Volt for an image's profile while it has none
#: (asked when a VM is created on it, so a profile recorded elsewhere is soon used).
PROFILE_ASK_SECONDS = 10.0
#: Runs Volt merges into one profile at most; later ones are acknowledged and dropped.
PROFILE_MAX_RUNS = 32

# --- Copy-on-write ----------------------------------------------------------------------
#: Default overlay block: the unit of allocation and of read-modify-write.
DEFAULT_COW_BLOCK_SIZE = 4 * KiB

# --- TLS (``virtman ca``, NBD over TLS) -------------------------------------------------------
#: Days a CA made by ``virtman ca init`` is valid.
CA_VALIDITY_DAYS = 3650
#: Days a certificate issued by ``virtman ca issue`` is valid.
CERT_VALIDITY_DAYS = 825
#: Seconds a TLS handshake (after NBD_OPT_STARTTLS) may take; it counts against the
#: NBD handshake's own limit too.
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0

# --- Coordinator (Volt) and agents ---------------------------------------------------------
#: Seconds between an agent's heartbeats.
HEARTBEAT_INTERVAL_SECONDS = 2.0
#: Seconds a freshly joined image waits for its parents' connections before its first
#: VM starts reading (reads meanwhile would go to the origin).
PARENT_CONNECT_WAIT_SECONDS = 1.0
#: Seconds of silence after which Volt removes an agent from every tree.
HEARTBEAT_TIMEOUT_SECONDS = 6.0
#: When more than this share of the agents is late at once (two heartbeats missed in a
#: row), Volt removes none of them: so many hosts do not fail together, while a boot
#: storm that saturates every link (or a stall of Volt's own) delays every heartbeat.
#: Removing them all reshuffled a 32-host tree mid-boot (28 of 32 removed and rejoined
#: at new places, the origin sending 3.7 working sets instead of 2). Agents still silent
#: when the share falls back are removed as usual.
MASS_SILENCE_SHARE = 0.5
#: The hold applies from this many agents (below, most of a few is not a crowd: two of
#: three hosts can fail) and lasts at most this long: hosts that really all died leave
#: the trees late, not never.
MASS_SILENCE_MIN_AGENTS = 4
MASS_SILENCE_HOLD_SECONDS = 60.0
#: Children per node and parents per node of the relay trees (the paper: binary tree).
TREE_FANOUT = 2
TREE_PARENTS_PER_NODE = 2
#: Seconds an HTTP call between virtman services may take.
HTTP_TIMEOUT_SECONDS = 30.0
#: Longest image, VM, snapshot and agent name.
MAX_NAME_LENGTH = 64
#: Bytes of a VM's written data sent per record when a VM is cloned or migrated; also
#: the largest record a receiving agent accepts.
COPY_RECORD_BYTES = 1 * MiB
#: Clone/migrate: seconds to open the connection to the destination agent.
COPY_CONNECT_TIMEOUT_SECONDS = 10.0
#: Clone/migrate: seconds either side waits without progress (no byte accepted by the
#: destination, no byte from the source, no acknowledgement) before it gives the copy up.
COPY_IDLE_TIMEOUT_SECONDS = 30.0
#: Clone/migrate: seconds a whole copy may take, acknowledgement included.
COPY_TOTAL_TIMEOUT_SECONDS = 3600.0
#: Clone/migrate: passes over the ranges the VM wrote during the previous pass, made
#: while it keeps serving writes, before the last pass that holds its writes.
COPY_LIVE_PASSES = 3
#: Default capacity of an agent's cache group.
DEFAULT_CACHE_CAPACITY = 64 * GiB

# --- Host store (``blockdev/chunkstore.py``) -------------------------------------------------
#: zstd level of the host store's chunks. Level 3 (zstd's default) compresses a 256 KiB
#: chunk in about 1 ms on this project's machines; higher levels cost several times that
#: for a few percent of space (docs/data-plane.md, "The deduplicated host store").
STORE_COMPRESSION_LEVEL = 3
#: Bytes of new chunks a store writer gathers before it makes them durable together: one
#: directory sync and one index commit per batch instead of per chunk.
STORE_BATCH_BYTES = 32 * MiB

# --- Local cluster (``virtman up``, the scale benchmark, the tests) ---------------------------
#: Seconds a started Volt or agent process has to say where it serves.
SERVICE_START_TIMEOUT_SECONDS = 30.0
#: Seconds registering an image may take (Volt digests the whole image first).
IMAGE_REGISTER_TIMEOUT_SECONDS = 3600.0
#: Seconds one VM request from the command line or the tools may take (creating the
#: first VM of an image may copy the image whole).
VM_CREATE_TIMEOUT_SECONDS = 3600.0
#: Seconds a status request to an agent may take before it counts as not answering.
STATUS_TIMEOUT_SECONDS = 10.0
#: Smallest test image ``virtman up`` and the scale benchmark generate.
MIN_TEST_IMAGE_SIZE = 64 * MiB
#: Seconds a fleet process (the stand-in VMs of one host) has to load and say it is ready.
FLEET_READY_TIMEOUT_SECONDS = 60.0

# --- Child processes of the tools (local cluster, benchmarks, tests) -------------------------
#: Seconds between readiness checks of a starting child.
CHILD_READY_POLL_SECONDS = 0.05
#: Seconds a child has after SIGTERM before it is SIGKILLed.
CHILD_STOP_GRACE_SECONDS = 10.0
#: Lines and characters of a child's log quoted in an error about it.
CHILD_LOG_TAIL_LINES = 20
CHILD_LOG_TAIL_CHARS = 4000

# --- HTTP services (Volt and the agents) ---------------------------------------------------
#: Largest request body a JSON route accepts; a larger one is answered 413 before it is
#: parsed (by Content-Length at once, or as soon as a chunked body passes it). Volt's and
#: the agents' documents are a few KiB; a heartbeat for hundreds of images is tens of KiB.
MAX_HTTP_BODY_BYTES = 1 * MiB
#: Largest body of a streamed route (an agent's ``POST /vms/import``: a VM's written data
#: as a copy stream, bounded in practice by the size of its disk).
MAX_STREAM_BODY_BYTES = 1024 * GiB
#: Characters of a caller's input quoted in an error (then "… (N bytes)").
MAX_ERROR_INPUT_CHARS = 200
#: Characters of one error message sent in an HTTP answer or printed by the CLI.
MAX_ERROR_DETAIL_CHARS = 2000
#: Validation errors listed in one 422 answer; the rest are counted in one more line.
MAX_ERROR_ITEMS = 10

#: Random bytes in a token ``virtman token issue`` makes (``secrets.token_urlsafe``).
TOKEN_BYTES = 32
#: Longest credential a service reads from a request; a longer one is refused unread.
MAX_TOKEN_CHARS = 256
#: Seconds between looks at a service's tokens file: a token issued or revoked counts
#: this long after the file changed, at most, with no restart; a stat() a second is free.
TOKENS_CHECK_SECONDS = 1.0

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
#: Seconds a new QEMU gets to open its QMP socket before the monitor gives up.
QMP_CONNECT_SECONDS = 10.0
#: Seconds between looks at a migration's progress (``query-migrate``) while a state is
#: saved or a guest moves. Short: a paused µVM's state is saved in well under a second.
MIGRATION_POLL_SECONDS = 0.02
#: Live migration: the pause QEMU aims at for its last memory pass (its
#: ``downtime-limit``; QEMU's own default is 300 ms). It goes on copying while the memory
#: left would take longer than this at the rate it measures.
MIGRATION_DOWNTIME_LIMIT_MS = 100
#: Bytes per hot-plugged memory module. Linux onlines hot-added memory in blocks of
#: 128 MiB on x86-64, so a smaller module would leave memory the guest cannot use.
MEMORY_HOTPLUG_BLOCK_MIB = 128
#: Longest a bake waits for its guest to be ready (the ready marker on its console, or
#: ``ready_after``) before it gives up and removes what it made.
BAKE_READY_MAX_SECONDS = 600.0
#: Bytes per read while a µVM's saved state is streamed from the host's cache into a
#: resuming QEMU (one chunk of the state image or less: a read the cache answers whole).
BAKE_STATE_READ_BYTES = 1024 * 1024
#: Chunk size of a bake's state image (its disk image keeps its base image's): the state
#: is read whole and in order at every resume, so large chunks mean few round trips
#: through the tree and few cache entries, and no read of it is wasted.
BAKE_STATE_CHUNK_BYTES = 1024 * 1024
#: Reads of a µVM's state in flight while it is fed to QEMU: a cold host fetches several
#: chunks from its parents at once instead of one round trip after another.
BAKE_STATE_READS_IN_FLIGHT = 8
#: Seconds the CLI and tests give a ``POST /bakes`` (boot, wait, save, and Volt reading
#: the state and disk once to digest them).
BAKE_CREATE_TIMEOUT_SECONDS = 3600.0
#: Longest a ``GET /vms/NAME/console/wait`` holds its answer before it says "not yet"
#: (the client asks again): below every client's HTTP timeout.
CONSOLE_WAIT_MAX_SECONDS = 60.0
#: Longest pattern a console wait takes: a short regular expression ("login:"), not a
#: document.
CONSOLE_PATTERN_MAX_CHARS = 1000

# --- Images ------------------------------------------------------------------------------
#: Chunk reads in flight while a manifest is computed.
MANIFEST_READS_IN_FLIGHT = 8
#: Bytes per read while a COPY-mode host downloads an image, and reads in flight.
COPY_READ_BYTES = 4 * MiB
COPY_READS_IN_FLIGHT = 8

# --- Volt's live view (/ui) ---------------------------------------------------------------
#: Browsers watching ``/ui/events`` at once; one more is answered 503. Each holds a
#: connection and a queue, and every change is rendered once and copied to each.
UI_MAX_CLIENTS = 32
#: Snapshots queued for one watcher. Every event is a whole snapshot, so a watcher that
#: reads slowly loses the oldest ones and still ends on the newest.
UI_QUEUE_EVENTS = 4
#: Seconds changes are gathered into one event: a boot of many hosts changes the stats
#: with every heartbeat, and the page needs no more than a few frames a second.
UI_MIN_EVENT_SECONDS = 0.25
#: Seconds between keep-alive comments on an idle event stream (proxies close silent ones).
UI_KEEPALIVE_SECONDS = 15.0
#: Tree changes (joins, leaves, repairs) the page lists, newest first.
UI_RECENT_CHANGES = 20

# --- Command-line output -------------------------------------------------------------------
#: Seconds between redraws of a progress display on a terminal. Each redraw reads counters
#: the command already holds (the origin's bytes sent, VMs finished), so it asks nothing of
#: the cluster; it costs about 1 ms of the event loop that also runs ``virtman up``'s
#: stand-in VMs, so twice a second: live enough for steps of seconds, 0.2 % of a core.
PROGRESS_REFRESH_SECONDS = 0.5
#: Seconds between ``virtman image add``'s looks at how far Volt's manifest is: one small
#: GET each, beside a registration that reads the whole image.
REGISTRATION_POLL_SECONDS = 0.5
