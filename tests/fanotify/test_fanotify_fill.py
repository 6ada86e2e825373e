"""The fanotify path's own fill rules on the host kernel: bytes already in a cache file count as
filled only once they match their digests (a torn or zeroed range after a crash is fetched
again), and prefetch fills a blob with no reader, through a non-notifying fd, then unmarks it."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_proc import WORK_ROOT, FscachedProcess, drop_caches

MiB = 1 << 20


@pytest.fixture
def image():
    work = Path(tempfile.mkdtemp(prefix="fscached-fill-", dir=WORK_ROOT))
    try:
        src = work / "src"
        src.mkdir()
        (src / "a.bin").write_bytes(os.urandom(8 * MiB))
        (src / "b.txt").write_bytes(b"fscached\n" * 300_000)
        subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(work / "img"),
                        "--compressor", "zstd"], check=True, capture_output=True)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_file(work: Path) -> Path:
    files = list((work / "cache" / "blobs").rglob("*"))
    blobs = [f for f in files if f.is_file()]
    assert len(blobs) == 1, blobs
    return blobs[0]


def test_damaged_cache_bytes_are_never_trusted_after_a_restart(image: Path) -> None:
    work = image
    mnt = work / "mnt"
    spec = f"fsid=img,bootstrap={work / 'img' / 'image.boot'},mountpoint={mnt}"
    first = FscachedProcess(work / "cache", [spec])
    second = FscachedProcess(work / "cache", [spec])
    try:
        first.start()
        want = {name: sha(work / "src" / name) for name in ("a.bin", "b.txt")}
        assert {name: sha(mnt / name) for name in want} == want
        assert first.stop() == 0
        # what a crash can leave: a range zeroed (a lost page-cache write) and a range torn
        blob = cache_file(work)
        with open(blob, "r+b") as f:
            f.seek(2 * MiB)
            f.write(bytes(MiB))
            f.seek(5 * MiB + 4096)
            f.write(os.urandom(8192))
        drop_caches()
        second.start()
        assert {name: sha(mnt / name) for name in want} == want
        counters = second.counters()
        assert counters.get("read_failed", 0) == 0
        assert counters["reverified_chunks"] > 0, counters  # intact chunks were checked, not fetched
        assert counters["fetched_chunks"] == 2, counters  # exactly the zeroed chunk and the torn one
        assert second.stop() == 0
    finally:
        first.cleanup([mnt])
        second.cleanup([mnt])


def test_prefetch_fills_the_blob_without_readers_and_removes_its_mark(image: Path) -> None:
    work = image
    mnt = work / "mnt"
    spec = f"fsid=img,bootstrap={work / 'img' / 'image.boot'},mountpoint={mnt},prefetch=all"
    daemon = FscachedProcess(work / "cache", [spec])
    try:
        daemon.start()
        deadline = time.monotonic() + 60
        counters = daemon.counters()
        while counters.get("prefetch_done", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            counters = daemon.counters()
        assert counters.get("prefetch_done") == 1, counters
        assert counters.get("blobs_complete") == 1, counters
        assert counters.get("read", 0) == 0, "prefetch writes must raise no event of its own"
        fetched = counters["fetches"]
        drop_caches()
        assert sha(mnt / "a.bin") == sha(work / "src" / "a.bin")
        assert sha(mnt / "b.txt") == sha(work / "src" / "b.txt")
        after = daemon.counters()
        assert after["fetches"] == fetched and after.get("read", 0) == 0, "no event once the mark is gone"
        assert daemon.stop() == 0
    finally:
        daemon.cleanup([mnt])


def test_filled_ranges_are_answered_without_python_and_misses_still_fetched(image: Path) -> None:
    """The fast path (native/fanotify_fast.c) answers the events of ranges already holding
    verified bytes by itself, counted as read_fast; an event of a range not filled still goes
    to Python and through the full fetch, verify and write."""
    work = image
    mnt = work / "mnt"
    spec = f"fsid=img,bootstrap={work / 'img' / 'image.boot'},mountpoint={mnt}"
    proc = FscachedProcess(work / "cache", [spec])
    want = (work / "src" / "a.bin").read_bytes()

    def preads(offsets: list[int]) -> list[bytes]:
        fd = os.open(mnt / "a.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the mount's pages: its reads raise events again
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return [os.pread(fd, 65536, off) for off in offsets]
        finally:
            os.close(fd)

    try:
        proc.start()
        drop_caches()
        assert preads([0]) == [want[:65536]]  # fills the read window around it (1 MiB)
        before = proc.counters()
        assert before.get("read_fast", 0) == 0, before  # that event was a miss: Python's
        filled = [0, 256 << 10, 768 << 10]
        assert preads(filled) == [want[off:off + 65536] for off in filled]
        after = proc.counters()

        def delta(key: str, a: dict[str, int] = before, b: dict[str, int] = after) -> int:
            return b.get(key, 0) - a.get(key, 0)

        assert delta("read") >= 1, (before, after)
        assert delta("read_fast") == delta("read") == delta("read_cached"), (before, after)  # none went to Python
        assert delta("fetches") == 0, (before, after)
        missed = [6 * MiB]
        assert preads(missed) == [want[6 * MiB:6 * MiB + 65536]]
        last = proc.counters()
        assert delta("fetches", after, last) >= 1, (after, last)  # a miss: fetched, verified, written
        assert delta("read_fast", after, last) == 0 or delta("read", after, last) > delta("read_fast", after, last)
        assert last.get("read_failed", 0) == 0, last
        assert proc.stop() == 0
        final = proc.final_counters()
        assert final["read_fast"] >= after["read_fast"], final  # the C counts survive into the last stats
    finally:
        proc.cleanup([mnt])
