"""fscached.metrics.render(daemon) against what happened: a Daemon answering the kernel
simulator (cachefiles), and on the host kernel the fanotify path; the exposition is parsed with
prometheus_client's own parser."""
from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fetcher.chain import SourceChain
from fetcher.source import SourceError
from fscached.core.chunkmap import chunks_by_blob
from fscached.config import Config, ImageSpec, PrefetchSpec
from fscached.daemon import Daemon
from fscached.core.stats import LATENCY_BUCKETS, RequestStats
from fscached.metrics import CONTENT_TYPE, cache_bytes, render
from simdaemon import WORK_ROOT, Running, expected_blob_space, make_tree
from standins.kernel_simulator import KernelSimulator

# every family render() exposes, with its type
FAMILIES = {
    "fscached_info": "gauge",
    "fscached_images": "gauge",
    "fscached_reads": "counter",
    "fscached_read_bytes": "counter",
    "fscached_read_duration_seconds": "histogram",
    "fscached_opens": "counter",
    "fscached_opens_unknown": "counter",
    "fscached_reads_unknown_object": "counter",
    "fscached_malformed_messages": "counter",
    "fscached_event_overflows": "counter",
    "fscached_fetches": "counter",
    "fscached_fetched_chunks": "counter",
    "fscached_joined_chunks": "counter",
    "fscached_chunk_retries": "counter",
    "fscached_verify_failures": "counter",
    "fscached_readahead_windows": "counter",
    "fscached_prefetched_chunks": "counter",
    "fscached_prefetch_blobs_done": "counter",
    "fscached_prefetch_windows_failed": "counter",
    "fscached_reverified_chunks": "counter",
    "fscached_blobs_complete": "counter",
    "fscached_orphans_answered": "counter",
    "fscached_orphans_eio": "counter",
    "fscached_orphans_gone": "counter",
    "fscached_profile_ranges_loaded": "counter",
    "fscached_profile_chunks_prefetched": "counter",
    "fscached_profile_rejected": "counter",
    "fscached_profile_failed": "counter",
    "fscached_source_requests": "counter",
    "fscached_source_bytes": "counter",
    "fscached_fetches_in_flight": "gauge",
    "fscached_objects_open": "gauge",
    "fscached_prefetch_chunks_done": "gauge",
    "fscached_prefetch_chunks": "gauge",
    "fscached_cache_bytes": "gauge",
}


class Scrape:
    """One parsed exposition: value(sample name, **labels), families and their types."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples += [(s.name, dict(s.labels), s.value) for s in family.samples]

    def all(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]

    def value(self, name: str, **labels: str) -> float:
        found = self.all(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0][1]

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.all(name, **labels))


def scrape(daemon: Daemon) -> Scrape:
    """render() on the daemon's own loop, as the API serves it."""
    async def on_loop() -> bytes:
        return render(daemon)
    deadline = time.monotonic() + 10
    while daemon._loop is None and time.monotonic() < deadline:  # run() has not started yet
        time.sleep(0.01)
    return Scrape(daemon.submit(on_loop()).result(30).decode())


def allocated(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def assert_histogram_consistent(m: Scrape) -> None:
    for outcome in ("cached", "filled", "failed"):
        buckets = m.all("fscached_read_duration_seconds_bucket", outcome=outcome)
        bounds = [lab["le"] for lab, _ in buckets]
        assert bounds == [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        count = m.value("fscached_read_duration_seconds_count", outcome=outcome)
        assert counts[-1] == count == m.value("fscached_reads_total", outcome=outcome)
        total = m.value("fscached_read_duration_seconds_sum", outcome=outcome)
        assert (total > 0) == (count > 0)


# -- cachefiles, through the kernel simulator ------------------------------------------------------
def test_metrics_follow_the_reads(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="none", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs")
    boot = Bootstrap.open(out / "image.boot")
    info = boot.blobs[0]
    want = expected_blob_space(boot, out / "blobs", 0)
    blob_file = out / "blobs" / info.blob_id
    data = bytearray(blob_file.read_bytes())
    data[10] ^= 0xFF  # the first chunk no longer matches its digest: its READ fails
    blob_file.write_bytes(bytes(data))
    source = f"local {out / 'blobs'}"
    kernel = work / "kernel"  # the simulator's cache files: the cache dir the daemon reports on
    with KernelSimulator(kernel) as sim:
        running = Running(sim, [spec], kernel)
        daemon = running.daemon
        try:
            m = scrape(daemon)  # before any request: every family, zeros
            assert m.types == FAMILIES, set(m.types) ^ set(FAMILIES)
            assert m.value("fscached_info", backend="cachefiles") == 1
            assert m.value("fscached_images") == 1
            assert m.sum("fscached_reads_total") == 0 and m.value("fscached_objects_open") == 0
            assert m.value("fscached_source_bytes_total", source=source) == 0
            assert_histogram_consistent(m)

            meta = sim.mount("erofs,img1", b"img1")
            blob = sim.mount("erofs,img1", info.blob_id.encode())
            assert sim.read(meta, 0, 4096) == (out / "image.boot").read_bytes()[:4096]
            with pytest.raises(OSError) as failed:
                sim.read(blob, 0, 4096)
            assert failed.value.errno == errno.EIO
            at = 64 << 10
            assert sim.read(blob, at, 4096) == want[at:at + 4096]  # its chunk alone: filled
            assert sim.read(blob, at, 4096) == want[at:at + 4096]  # asked again: nothing to fetch
            last = len(want) - 4096
            assert sim.read(blob, last, 4096) == want[last:last + 4096]

            m = scrape(daemon)
            counters = running.counters()
            assert counters["read"] == 5
            assert m.value("fscached_reads_total", outcome="failed") == 1 == counters["read_failed"]
            assert m.value("fscached_reads_total", outcome="cached") == 1
            assert m.value("fscached_reads_total", outcome="filled") == 3
            assert m.sum("fscached_read_duration_seconds_count") == counters["read"]
            assert_histogram_consistent(m)
            assert m.value("fscached_read_bytes_total", outcome="cached") == 4096
            assert m.value("fscached_read_bytes_total", outcome="filled") == 3 * 4096
            # each fetch holding the bad chunk failed verification (never written): the window of
            # the first READ, then its chunk alone; later windows still holding it failed too
            failures = counters["verify_failures"]
            assert failures >= 2
            assert m.value("fscached_verify_failures_total") == failures
            assert m.value("fscached_source_requests_total", source=source, result="integrity") == failures
            assert m.value("fscached_chunk_retries_total") == counters["chunk_retries"] >= 1
            assert m.value("fscached_source_requests_total", source=source, result="ok") == \
                counters[f"source:{source}:ok"] > 0
            assert m.value("fscached_source_requests_total", source=source, result="failed") == 0
            assert m.value("fscached_fetches_total") == counters["fetches"]
            assert m.value("fscached_fetched_chunks_total") == counters["fetched_chunks"]
            # what the source delivered: the verified bytes plus the bytes that failed verification
            assert m.value("fscached_source_bytes_total", source=source) > counters["fetched_bytes"] > 0
            assert m.value("fscached_fetches_in_flight", source=source) == 0
            assert m.value("fscached_opens_total") == 2
            assert m.value("fscached_objects_open") == 2
            assert m.value("fscached_cache_bytes") == allocated(kernel) > 0
            assert m.all("fscached_prefetch_chunks") == []  # no prefetch asked for

            sim.close(meta)
            assert scrape(daemon).value("fscached_objects_open") == 1
            assert sim.mount("erofs,nope", b"nope").copen_result == -errno.ENOENT
            m = scrape(daemon)
            assert m.value("fscached_opens_unknown_total") == 1 and m.value("fscached_opens_total") == 3
        finally:
            assert running.stop() == 0


def test_prefetch_progress_per_blob(work: Path) -> None:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10)
    spec = ImageSpec("img1", out / "image.boot", out / "blobs", prefetch=PrefetchSpec("all"))
    boot = Bootstrap.open(out / "image.boot")
    blob_id = boot.blobs[0].blob_id
    chunks = {c.uncompressed_offset for c in chunks_by_blob(boot.image)[0]}
    with KernelSimulator(work / "kernel") as sim:
        running = Running(sim, [spec], work / "kernel")
        try:
            sim.mount("erofs,img1", blob_id.encode())
            deadline = time.monotonic() + 30
            while running.stats["prefetch_done"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            m = scrape(running.daemon)
            assert m.value("fscached_prefetch_chunks", volume="img1", blob=blob_id) == len(chunks)
            assert m.value("fscached_prefetch_chunks_done", volume="img1", blob=blob_id) == len(chunks)
            assert m.value("fscached_prefetched_chunks_total") == len(chunks)
            assert m.value("fscached_prefetch_blobs_done_total") == 1
            assert m.sum("fscached_reads_total") == 0  # prefetch is not a READ
        finally:
            assert running.stop() == 0


# -- pieces -------------------------------------------------------------------------------------
def test_request_stats_buckets() -> None:
    stats = RequestStats(buckets=(0.01, 0.1))
    for seconds in (0.0, 0.01, 0.05, 0.2, -1.0):
        stats.observe("filled", seconds, 10)
    assert stats.counts["filled"] == [3, 1, 1]  # le 0.01 (0, 0.01, a negative clock step), le 0.1, +Inf
    assert stats.total("filled") == 5 and stats.bytes["filled"] == 50
    assert stats.seconds["filled"] == pytest.approx(0.26)


def test_fetches_in_flight_and_bytes_per_source() -> None:
    class Slow:
        name = "slow"

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
            await self.release.wait()
            return b"x" * length

    class Broken:
        name = "broken"

        async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
            raise SourceError("broken: down")

    async def main() -> None:
        slow = Slow()
        chain = SourceChain([Broken(), slow])  # type: ignore[list-item]
        reads = [asyncio.ensure_future(chain.read("b" * 64, i * 100, 100)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert chain.in_flight == {"broken": 0, "slow": 3}
        slow.release.set()
        await asyncio.gather(*reads)
        assert chain.in_flight == {"broken": 0, "slow": 0}
        assert chain.bytes == {"slow": 300}
        assert chain.stats == {"broken:failed": 3, "slow:ok": 3}

    asyncio.run(main())


def test_cache_bytes_counts_allocated_blocks(work: Path) -> None:
    (work / "sub").mkdir()
    with open(work / "sub" / "sparse", "wb") as f:
        f.truncate(64 << 20)  # a hole: no blocks
        f.seek(1 << 20)
        f.write(b"x" * 8192)
    (work / "full").write_bytes(os.urandom(100_000))
    os.symlink("/usr", work / "link")  # not followed
    assert cache_bytes(work) == allocated(work)
    assert 8192 + 100_000 <= cache_bytes(work) < 1 << 20
    assert cache_bytes(work / "missing") == 0


def test_content_type_is_the_classic_text_format() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_metrics_of_a_daemon_not_yet_bound(work: Path) -> None:
    daemon = Daemon(Config(cache_dir=work / "cache"))
    m = Scrape(render(daemon).decode())
    assert m.value("fscached_objects_open") == 0
    assert m.value("fscached_images") == 0
    assert m.value("fscached_cache_bytes") == 0
    assert m.all("fscached_reads_total") == []
    daemon.executor.shutdown()


# -- fanotify, on the host kernel -----------------------------------------------------------------
@pytest.fixture
def fanotify_work(work: Path) -> Path:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify pre-content marks, mount)")
    from fanotify.group import probe

    reason = probe(WORK_ROOT)
    if reason is not None:
        pytest.fail(f"no fanotify pre-content events here: {reason}")
    return work


class InThread:
    """A fanotify Daemon on its own uvloop thread."""

    def __init__(self, config: Config) -> None:
        self.daemon = Daemon(config)
        self.ready = threading.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(60) and self.error is None, f"daemon did not start: {self.error}"

    def _run(self) -> None:
        async def main() -> int:
            try:
                await self.daemon.load()
                self.daemon.take_kernel_path()
            except BaseException as exc:
                self.error = exc
                self.ready.set()
                raise
            asyncio.get_running_loop().call_later(0.2, self.ready.set)  # run() has mounted by then
            return await self.daemon.run()

        try:
            self.exit_code = uvloop.run(main())
        except BaseException:
            pass

    def stop(self) -> int | None:
        self.daemon.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.exit_code


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_fanotify_metrics(fanotify_work: Path) -> None:
    work = fanotify_work
    tree = make_tree(work / "tree")
    # past the read window and the read-ahead: reading the small files leaves the blob incomplete
    # (still marked), so reading them again raises events for filled ranges
    (tree / "zz-big.bin").write_bytes(os.urandom(40 << 20))
    out = work / "built"
    convert(tree, out, compressor="none", chunk_size=64 << 10)
    boot = Bootstrap.open(out / "image.boot")
    mnt = work / "mnt"
    spec = ImageSpec("img1", out / "image.boot", out / "blobs", mountpoint=mnt)
    cache = work / "cache"
    daemon = InThread(Config(cache_dir=cache, images=[spec], kernel_path="fanotify"))
    source = f"local {out / 'blobs'}"
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        m = scrape(daemon.daemon)
        assert m.value("fscached_info", backend="fanotify") == 1
        assert m.value("fscached_objects_open") == len(boot.blobs)  # one cache file per blob
        drop_caches()
        assert (mnt / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
        assert (mnt / "text.txt").read_bytes() == (tree / "text.txt").read_bytes()
        drop_caches()  # the page cache is gone, the cache files are filled: events answered at once
        assert (mnt / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
        m = scrape(daemon.daemon)
        counters = daemon.daemon.counters()
        assert m.sum("fscached_read_duration_seconds_count") == counters["read"] > 0
        assert m.value("fscached_reads_total", outcome="cached") == counters["read_cached"] > 0
        assert m.value("fscached_reads_total", outcome="failed") == counters.get("read_failed", 0) == 0
        assert m.value("fscached_reads_total", outcome="filled") > 0
        assert m.value("fscached_read_bytes_total", outcome="cached") > 0
        assert m.value("fscached_read_bytes_total", outcome="filled") == counters["read_bytes"]
        assert_histogram_consistent(m)
        assert m.value("fscached_source_bytes_total", source=source) == counters["fetched_bytes"] > 0
        assert m.value("fscached_source_requests_total", source=source, result="ok") == counters["fetches"]
        assert m.value("fscached_cache_bytes") == allocated(cache) > 0
    finally:
        code = daemon.stop()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert code == 0
