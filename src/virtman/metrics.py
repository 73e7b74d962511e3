"""Prometheus metrics of every virtman service (``/metrics``, ``serve --metrics-listen``).

Theory of operation
-------------------
Most figures already exist as plain counters on the objects that do the work
(``DeviceStats`` of the caches and remotes, ``PathStats`` per upstream path, the NBD
server's ``ServerStats``, Volt's trees). They are read when Prometheus scrapes, by a
collector each service registers (``Metrics.collect_with``), and turned into metric
families here: the NBD request path and the cache's hit path carry no Prometheus code
at all. Only what has no counter to read is recorded at the event: latencies
(histograms: a chunk fetch, a VM create, a guest boot) and the tree changes Volt
decides (joins, leaves, repairs), which no object remembers.

Every service object owns its ``Metrics`` (its own ``CollectorRegistry``), so several
agents and a Volt in one process (the tests) never share or collide on a metric.
Collectors run in the event loop's thread (the HTTP route and the ``serve`` exporter
are both served by the loop), so they read the loop's objects without locks.

Naming follows Prometheus' conventions: every name starts with ``virtman_``, values are
in base units (bytes, seconds), counters end in ``_total``, latencies are histograms.
Labels come only from ``LABELS``, each with a bounded value set: ``image`` (registered
images, which an operator adds one by one), ``source`` (parent | origin), ``server``
(relay | vm | serve), ``state`` (a fixed set), ``reason`` (a fixed set). Never a chunk,
a peer address, an agent or a VM name: those grow with the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.core import Metric as Metric  # the type collectors return
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from virtman.blockdev.cached import CachedDevice
from virtman.blockdev.remote import RemoteDevice
from virtman.nbd.server import NbdServer

# The ``*_created`` gauge the client adds beside every counter and histogram is the
# time the process made it: a timestamp, not a count, that doubles the series and
# says nothing a scrape's process_start does not. Off, for every registry.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The prefix of every metric (Prometheus' "application prefix").
NAMESPACE = "virtman"
#: Every label a virtman metric may carry; each one has a bounded set of values.
LABELS = frozenset({"image", "source", "server", "state", "reason"})
#: The media type of ``Metrics.render`` (Prometheus text format 0.0.4/1.0.0).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Chunk fetches: a loopback parent answers in well under a millisecond, an origin
#: across a loaded WAN in seconds.
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)
#: VM creates: a disk over a warm cache in milliseconds; a first create also sets up the
#: image's relay and joins its tree.
CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Guest boots to the first console line: KVM in a fraction of a second, TCG in tens.
BOOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _name(name: str) -> str:
    return f"{NAMESPACE}_{name}"


class _FunctionCollector(Collector):
    """A collector that asks a function for its families at every scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


class Metrics:
    """One service's metrics: a registry of its own, its event instruments, and the
    collectors that read its state at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter recorded at the event; ``name`` without prefix or ``_total``."""
        _check_labels(name, labels)
        return Counter(_name(name), doc, labelnames=labels, registry=self.registry)

    def histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        _check_labels(name, labels)
        return Histogram(_name(name), doc, labelnames=labels, buckets=buckets,
                         registry=self.registry)

    def collect_with(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Read ``collect()``'s families at every scrape (in the caller's thread)."""
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this service."""
        return generate_latest(self.registry)


def _check_labels(name: str, labels: Iterable[str]) -> None:
    unknown = set(labels) - LABELS
    if unknown:  # a programming error: an unbounded label would slip in unnoticed
        raise ValueError(f"metric {name}: labels {sorted(unknown)} are not in {sorted(LABELS)}")


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    """A counter family read at scrape time; ``name`` without prefix or ``_total``."""
    _check_labels(name, labels)
    return CounterMetricFamily(_name(name), doc, labels=labels)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    _check_labels(name, labels)
    return GaugeMetricFamily(_name(name), doc, labels=labels)


# --- the data path: one image's relay (agent) or a relay of `serve` ---------------------------


@dataclass(frozen=True)
class ImageFigures:
    """One image's data-path counters on one host, read from its devices' stats."""

    image: str
    from_parents: int
    from_origin: int
    served: int
    hits: int
    misses: int
    failovers: int
    digest_mismatches: int
    rotten_chunks: int
    prefetched: int = 0

    @classmethod
    def read(
        cls,
        image: str,
        cache: CachedDevice,
        remote: RemoteDevice | Sequence[RemoteDevice],
        served: int,
        is_origin: Callable[[str, bool], bool],
    ) -> ImageFigures:
        """``is_origin(uri, fallback)`` says whether an upstream path is an origin;
        ``remote``: the upstream(s) the cache reads (an agent's prefetch has its own)."""
        remotes = [remote] if isinstance(remote, RemoteDevice) else list(remote)
        parents = origin = failovers = 0
        for one in remotes:
            failovers += one.stats.extra.get("failovers", 0)
            for path in one.path_status():
                n = int(path["bytes_received"])  # type: ignore[call-overload]
                if is_origin(str(path["uri"]), bool(path["fallback"])):
                    origin += n
                else:
                    parents += n
        cached = cache.stats.extra
        return cls(
            image,
            from_parents=parents,
            from_origin=origin,
            served=served,
            hits=cached.get("hits", 0),
            misses=cached.get("misses", 0),
            failovers=failovers,
            digest_mismatches=cached.get("digest_mismatches", 0),
            rotten_chunks=cached.get("rotten_chunks", 0),
            prefetched=cached.get("prefetched_bytes", 0),
        )


def data_path_families(figures: Iterable[ImageFigures]) -> list[Metric]:
    upstream = counter(
        "upstream_bytes", "Bytes received from upstream NBD paths: the tree parents "
        "(source=parent) or the image's origin (source=origin).", ["image", "source"])
    served = counter(
        "served_bytes", "Bytes sent in NBD READ replies of the image's relay export: "
        "to child hosts in the tree (to any client for virtman serve).", ["image"])
    hits = counter(
        "cache_hits", "Reads answered wholly from chunks the cache already held.", ["image"])
    misses = counter(
        "cache_misses", "Chunks a read had to fetch from upstream (or wait for while "
        "another read fetched them).", ["image"])
    failovers = counter(
        "failovers", "Upstream requests that succeeded only on another path after a "
        "path failed them.", ["image"])
    mismatches = counter(
        "digest_mismatches", "Chunks fetched from upstream whose bytes did not match the "
        "image's digest manifest (never served; asked again from another path).", ["image"])
    rotten = counter(
        "rotten_chunks", "Chunks held from an earlier session that failed their check "
        "at rest (manifest digest or store checksum); dropped and fetched again.", ["image"])
    refetches = counter(
        "refetches", "Chunks fetched again because a copy failed its check: "
        "digest mismatches plus rotten chunks.", ["image"])
    prefetched = counter(
        "prefetched_bytes", "Bytes the image's boot-profile prefetch received from "
        "upstream (part of upstream_bytes).", ["image"])
    for f in figures:
        upstream.add_metric([f.image, "parent"], f.from_parents)
        upstream.add_metric([f.image, "origin"], f.from_origin)
        served.add_metric([f.image], f.served)
        hits.add_metric([f.image], f.hits)
        misses.add_metric([f.image], f.misses)
        failovers.add_metric([f.image], f.failovers)
        mismatches.add_metric([f.image], f.digest_mismatches)
        rotten.add_metric([f.image], f.rotten_chunks)
        refetches.add_metric([f.image], f.digest_mismatches + f.rotten_chunks)
        prefetched.add_metric([f.image], f.prefetched)
    return [upstream, served, hits, misses, failovers, mismatches, rotten, refetches,
            prefetched]


def fetch_histogram(metrics: Metrics) -> Histogram:
    """Chunk fetch latency, observed by ``CachedDevice.on_fetch``."""
    return metrics.histogram(
        "chunk_fetch_seconds", "Time to fetch one chunk from upstream on a cache miss, "
        "retries and digest checks included.", FETCH_BUCKETS)


def nbd_families(servers: Mapping[str, Iterable[NbdServer]]) -> list[Metric]:
    """Connections and requests in flight, summed per kind of server (``server`` label:
    relay, vm, serve)."""
    connections = gauge("nbd_connections", "NBD client connections held open.", ["server"])
    in_flight = gauge("nbd_requests_in_flight",
                      "NBD requests received and not yet answered.", ["server"])
    for kind, group in servers.items():
        held = list(group)
        connections.add_metric([kind], sum(s.open_connections for s in held))
        in_flight.add_metric([kind], sum(s.requests_in_flight for s in held))
    return [connections, in_flight]
