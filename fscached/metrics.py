"""Prometheus metrics of a running daemon: `render(daemon)` is the body of `GET /metrics`.

Every value is read from the daemon's live state when scraped (a custom collector on a
registry of the daemon's own, never the process-global one: tests run several daemons in one
process): the frontend's counters (`server.stats`), its answered requests (`server.requests`,
a `RequestStats` the frontends feed: outcome, latency, bytes), the source chains' counters,
the open objects, the prefetch progress of each blob and the cache directory's allocated
bytes. Nothing is counted twice and nothing is kept here that the daemon does not already
know, except the fill-latency histogram.

Labels stay few and bounded: `outcome` (cached / filled / failed), `source` (one per
configured source: a directory, a registry repository, a peer), `result`; blob ids appear
only on the per-blob prefetch gauges.

The exposition is the classic text format, `CONTENT_TYPE` (`text/plain; version=0.0.4`).
"""
from __future__ import annotations

import os
import weakref
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    Metric)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from fscached.util.buildinfo import package_version
from fscached.core.stats import OUTCOMES, RequestStats

if TYPE_CHECKING:
    from fscached.daemon import Daemon
    from fscached.frontends.base import Frontend

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SOURCE_RESULTS = ("ok", "failed", "integrity", "skipped")

# (stats key, metric name without _total, help): monotonic counters of the frontend and fill core
FRONTEND_COUNTERS = (
    ("open", "fscached_opens", "cachefiles OPEN requests"),
    ("open_unknown", "fscached_opens_unknown", "cachefiles OPENs for cookies this daemon does not serve (ENOENT)"),
    ("read_unknown_object", "fscached_reads_unknown_object",
     "READs or events for an object or file this daemon does not serve"),
    ("malformed", "fscached_malformed_messages", "kernel messages that broke the format"),
    ("event_overflow", "fscached_event_overflows", "fanotify queue overflows (events were lost)"),
    ("fetches", "fscached_fetches", "ranged fetches from blob sources that delivered verified bytes"),
    ("fetched_chunks", "fscached_fetched_chunks", "chunks fetched, verified and written to the cache"),
    ("joined_chunks", "fscached_joined_chunks", "chunks a READ found already being fetched (joined, not fetched again)"),
    ("chunk_retries", "fscached_chunk_retries", "chunks refetched alone after their window failed"),
    ("verify_failures", "fscached_verify_failures",
     "fetched runs holding a chunk whose digest did not match (never written to the cache)"),
    ("readahead_windows", "fscached_readahead_windows", "read-ahead fetches started for sequential readers"),
    ("prefetched_chunks", "fscached_prefetched_chunks", "chunks fetched by prefetch"),
    ("prefetch_done", "fscached_prefetch_blobs_done", "blobs whose prefetch ran to its end"),
    ("prefetch_failed", "fscached_prefetch_windows_failed", "prefetch windows that failed (left to on-demand reads)"),
    ("reverified_chunks", "fscached_reverified_chunks",
     "chunks found in a cache file that matched their digest (fanotify: not fetched again)"),
    ("blobs_complete", "fscached_blobs_complete", "blobs whose every chunk is filled (fanotify: mark removed)"),
    ("orphans_answered", "fscached_orphans_answered", "events a killed daemon had taken, answered by this one"),
    ("orphans_eio", "fscached_orphans_eio", "of those, answered with EIO"),
    ("orphans_gone", "fscached_orphans_gone", "events a killed daemon had taken that were already gone"),
    ("profile_ranges_loaded", "fscached_profile_ranges_loaded", "ranges of start-up profiles accepted at a bind"),
    ("profile_chunks_prefetched", "fscached_profile_chunks_prefetched", "chunks fetched by a start-up profile's replay"),
    ("profile_rejected", "fscached_profile_rejected", "start-up profiles not used (foreign, stale or malformed)"),
    ("profile_failed", "fscached_profile_failed", "profile replay runs that failed (left to on-demand reads)"),
)


class DaemonMetrics:
    """One daemon's registry (created lazily by `metrics_for`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = DaemonCollector(daemon)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_attached: weakref.WeakKeyDictionary[Daemon, DaemonMetrics] = weakref.WeakKeyDictionary()


def metrics_for(daemon: Daemon) -> DaemonMetrics:
    """The daemon's metrics object, made on first use."""
    found = _attached.get(daemon)
    if found is None:
        found = _attached[daemon] = DaemonMetrics(daemon)
    return found


def render(daemon: Daemon) -> bytes:
    """The Prometheus text exposition (format 0.0.4, `CONTENT_TYPE`) of the daemon's metrics."""
    return metrics_for(daemon).render()


def cache_bytes(path: Path) -> int:
    """Bytes allocated under `path` (st_blocks * 512 of every file; a sparse cache file counts
    only what was filled). Symlinks are not followed; files vanishing meanwhile are skipped."""
    total = 0
    stack = [os.fspath(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    return total


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.version = package_version()

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        frontend = daemon.frontend
        if frontend is not None:
            frontend.refresh_stats()
        stats: dict[str, int] = dict(frontend.stats) if frontend is not None else {}

        info = GaugeMetricFamily("fscached_info", "the daemon: package version and kernel path",
                                 labels=["version", "backend"])
        info.add_metric([self.version, daemon.kernel_path], 1)
        yield info
        yield GaugeMetricFamily("fscached_images", "images served", value=len(daemon.catalog.images))

        # -- the kernel's requests ------------------------------------------------------------
        requests: RequestStats | None = frontend.requests if frontend is not None else None
        reads = CounterMetricFamily("fscached_reads", "READs (cachefiles) or pre-access events (fanotify) "
                                    "answered, by outcome: cached (no fetch needed), filled (fetched, verified, "
                                    "written), failed (the reader saw EIO)", labels=["outcome"])
        read_bytes = CounterMetricFamily("fscached_read_bytes", "bytes of the ranges answered with data, by "
                                         "outcome: cached (served from the cache) or filled", labels=["outcome"])
        latency = HistogramMetricFamily("fscached_read_duration_seconds", "seconds from the kernel's request "
                                        "to the daemon's answer, by outcome", labels=["outcome"])
        if requests is not None:
            for outcome in OUTCOMES:
                counts = list(requests.counts[outcome])
                reads.add_metric([outcome], sum(counts))
                if outcome != "failed":
                    read_bytes.add_metric([outcome], requests.bytes[outcome])
                cumulative, running = [], 0
                for bound, count in zip((*map(_le, requests.buckets), "+Inf"), counts):
                    running += count
                    cumulative.append((bound, running))
                latency.add_metric([outcome], cumulative, requests.seconds[outcome])
        yield reads
        yield read_bytes
        yield latency

        for key, name, doc in FRONTEND_COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))

        # -- sources --------------------------------------------------------------------------
        results: Counter[tuple[str, str]] = Counter()
        fetched: Counter[str] = Counter()
        in_flight: Counter[str] = Counter()
        for chain in daemon.catalog.sources():
            for source in chain.sources:
                fetched[source.name] += 0
                in_flight[source.name] += 0
            for key, value in dict(chain.stats).items():
                name, _, result = key.rpartition(":")
                results[(name, result)] += value
            for name, value in dict(chain.bytes).items():
                fetched[name] += value
            for name, value in dict(chain.in_flight).items():
                in_flight[name] += value
        requests_family = CounterMetricFamily(
            "fscached_source_requests", "ranged reads asked of each blob source, by result: ok, failed (an "
            "error: the next source is tried), integrity (bytes that failed verification), skipped "
            "(unhealthy)", labels=["source", "result"])
        for name in sorted(fetched):
            for result in SOURCE_RESULTS:
                requests_family.add_metric([name, result], results.get((name, result), 0))
        yield requests_family
        bytes_family = CounterMetricFamily("fscached_source_bytes", "bytes each blob source delivered "
                                           "(including bytes that then failed verification)", labels=["source"])
        flight_family = GaugeMetricFamily("fscached_fetches_in_flight", "ranged reads waiting for a blob "
                                          "source now", labels=["source"])
        for name in sorted(fetched):
            bytes_family.add_metric([name], fetched[name])
            flight_family.add_metric([name], in_flight[name])
        yield bytes_family
        yield flight_family

        # -- objects, prefetch, the cache -----------------------------------------------------
        yield GaugeMetricFamily("fscached_objects_open", "open kernel objects (cachefiles) or cache files "
                                "(fanotify)", value=frontend.objects_open() if frontend is not None else 0)
        done_family = GaugeMetricFamily("fscached_prefetch_chunks_done", "chunks of a blob's prefetch list "
                                        "that hold verified bytes", labels=["volume", "blob"])
        planned_family = GaugeMetricFamily("fscached_prefetch_chunks", "chunks in a blob's prefetch list",
                                           labels=["volume", "blob"])
        for volume, blob_id, done, planned in _prefetch_progress(frontend):
            done_family.add_metric([volume, blob_id], done)
            planned_family.add_metric([volume, blob_id], planned)
        yield done_family
        yield planned_family
        yield GaugeMetricFamily("fscached_cache_bytes", "bytes allocated in the cache directory "
                                "(st_blocks * 512, summed)", value=cache_bytes(daemon.config.cache_dir))


def _le(bound: float) -> str:
    return repr(float(bound))


def _prefetch_progress(frontend: Frontend | None) -> Iterable[tuple[str, str, int, int]]:
    """(volume, blob id, chunks done, chunks planned) of every open blob with a prefetch list."""
    found: dict[tuple[str, str], tuple[int, int]] = {}
    for fill in frontend.open_blobs() if frontend is not None else []:
        order = fill.blob.prefetch_order
        if order:
            written: set[int] = fill.target.written if fill.target is not None else set()
            found[(fill.volume, fill.blob.info.blob_id)] = (sum(1 for c in order if c.uncompressed_offset in written),
                                                            len(order))
    return [(volume, blob_id, done, planned) for (volume, blob_id), (done, planned) in sorted(found.items())]
