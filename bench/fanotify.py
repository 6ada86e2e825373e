#!/usr/bin/env python3
"""The fanotify backend on this machine's own kernel: ratios against baselines from the same run.

  goals         : issue 17's goal table first, each row met or MISSED from this run (the spread
                  of all runs beside the best): the cold reads below, a cold walk of a 2,000-file
                  50 MiB tree from the registry vs the same walk of the tree on local disk, the
                  fast path's capacity (events answered per second by the C fast path, 1 and 4
                  reader processes, the cache file's pages in memory and the mount's dropped:
                  every read raises an event for a filled range), the daemon's CPU per GiB of a
                  cold local read, the bind of the cold-start workload's bootstrap (in a fresh
                  process) and the daemon's start to its first mount, the warm read, the RSS
                  with 100 images
  cold local    : read of the raw blob file / read of the same file through fscached, fresh
                  cache, local uncompressed blob                              (goal >= 0.7)
  cold registry : `curl` of the blob from a loopback registry / read through fscached from that
                  registry (image pushed with skopeo)                         (goal >= 0.5)
  warm          : read through a plain file-backed EROFS mount of the image / read through
                  fscached once the cache is filled                           (goal >= 0.95)
  random 4 KiB  : cold preads at random offsets through fscached: p50 / p99 latency (the raw
                  blob read the same way is the baseline); events answered per second on the
                  fast path by one reader after drop_caches (each read also waits for the disk)
  RSS           : the daemon's resident memory with 20 images mounted, local and from one
                  registry repository, and 100 local ones, vs with 1 image    (goal < 100 MiB)
Every timed read drops the page cache first and uses the same reader (1 MiB reads, unbuffered);
cold and warm times are best of 3. Timings are never asserted: the machine is noisy. Bytes read
through fscached are checked against the source file after each timed read.
Usage: bench/fanotify.py [--size-mib 256] [--reads 2000] [--runs 3] [--threads 1,4] [--fast-reads 20000]
       [--walk-files 2000] [--walk-mib 50] [--images 20] [--many-images 100] [--json OUT.json] [--markdown OUT.md]
Needs root, a 6.14+ kernel with fanotify pre-content events and file-backed EROFS, skopeo,
docker-registry and curl.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "fanotify")]

import native  # noqa: E402
from daemon_proc import FscachedProcess, drop_caches  # noqa: E402
from fscached.util import mounts  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MIB = 1 << 20
MS_RDONLY = 0x1
READ_TIMEOUT = 180.0  # a timed read slower than this is a hang: the daemon is killed, reported
FSCACHED_IMAGE = [sys.executable, "-m", "erofs_image.cli"]  # what .venv/bin/fscached-image runs
console = Console() if sys.stdout.isatty() else Console(width=160)  # a log keeps whole rows


class Hang(Exception):
    pass


# -- plumbing ------------------------------------------------------------------------------------
class Bench:
    """Everything this run started, so it can all be undone on any exit."""

    def __init__(self, work: Path, backend: str = "fanotify") -> None:
        self.work = work
        self.backend = backend  # fscached's --kernel-path: cachefiles in the guests (bench/nydusd_guest.py)
        self.daemons: list[tuple[FscachedProcess, list[Path]]] = []
        self.plain_mounts: list[Path] = []
        self.registry: RegistryServer | None = None
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)
        console.print(f"[bold red]PROBLEM[/]: {text}")

    def daemon(self, name: str, images: list[str], mountpoints: list[Path]) -> FscachedProcess:
        run = self.work / "runs" / name
        run.mkdir(parents=True, exist_ok=True)
        proc = FscachedProcess(run / "cache", images, backend=self.backend)
        self.daemons.append((proc, mountpoints))
        proc.start(timeout=120)
        return proc

    def stop(self, proc: FscachedProcess, what: str) -> dict[str, int]:
        """SIGTERM; the final counters. A non-zero exit or ERROR lines in the log are reported."""
        try:
            code = proc.stop(timeout=60)
        except subprocess.TimeoutExpired:
            self.problem(f"{what}: the daemon did not stop within 60 s of SIGTERM")
            self.cleanup_daemon(proc)
            return {}
        if code != 0:
            self.problem(f"{what}: the daemon exited {code}")
        errors = [line for line in proc.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
        if errors:
            self.problem(f"{what}: {len(errors)} error line(s) in the daemon log, first: {errors[0]}")
        try:
            return proc.final_counters()
        except (OSError, ValueError):
            return {}

    def cleanup_daemon(self, proc: FscachedProcess) -> None:
        for known, mountpoints in self.daemons:
            if known is proc:
                proc.cleanup(mountpoints)

    def remove_run(self, name: str) -> None:
        shutil.rmtree(self.work / "runs" / name, ignore_errors=True)

    def close(self) -> None:
        for proc, mountpoints in self.daemons:
            try:
                proc.cleanup(mountpoints)
            except Exception as exc:  # cleanup goes on with the rest
                console.print(f"cleanup of a daemon: {exc}")
        for mountpoint in self.plain_mounts:
            if str(mountpoint) in mounts.erofs_mounts():
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        # anything still mounted under our work dir (a daemon killed mid-way, say)
        for mountpoint in mounts.erofs_mounts():
            if mountpoint.startswith(str(self.work) + "/"):
                subprocess.run(["umount", "-l", mountpoint], check=False)
        if self.registry is not None:
            self.registry.stop()
        shutil.rmtree(self.work, ignore_errors=True)


@contextmanager
def watchdog(seconds: float, on_timeout: Callable[[], None]) -> Iterator[threading.Event]:
    """Call on_timeout (which must unblock the reader) when the block runs longer than seconds."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        on_timeout()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def read_seconds(path: Path) -> float:
    """The reader of every sequential measurement: 1 MiB reads, no Python buffering."""
    buf = bytearray(MIB)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def timed_read(bench: Bench, path: Path, proc: FscachedProcess | None, what: str) -> float:
    """drop_caches, then read_seconds, guarded against a hang (the daemon is killed then)."""
    drop_caches()
    if proc is None:
        return read_seconds(path)
    with watchdog(READ_TIMEOUT, lambda: bench.cleanup_daemon(proc)) as fired:
        seconds = read_seconds(path)
    if fired.is_set():
        bench.problem(f"{what}: the read of {path} hung for {READ_TIMEOUT:.0f} s; daemon killed")
        raise Hang(what)
    return seconds


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(MIB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def check_bytes(bench: Bench, path: Path, expected: str, what: str) -> bool:
    got = sha256_of(path)
    if got != expected:
        bench.problem(f"{what}: WRONG BYTES through {path}: sha256 {got}, expected {expected}")
        return False
    return True


def curl_seconds(url: str) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True, timeout=READ_TIMEOUT)
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU seconds so far (/proc/PID/stat), its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> tuple[int, int]:
    """(resident, peak resident) in KiB: psutil for the first when installed; /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    try:
        import psutil  # type: ignore[import-not-found]

        fields["VmRSS"] = psutil.Process(pid).memory_info().rss // 1024
    except ImportError:
        pass
    return fields["VmRSS"], fields["VmHWM"]


def convert(src: Path, out: Path, compressor: str) -> Path:
    subprocess.run([*FSCACHED_IMAGE, "convert", str(src), str(out), "--compressor", compressor, "-q"],
                   check=True, cwd=REPO)
    return out


def only_blob(image: Path) -> Path:
    blobs = sorted((image / "blobs").iterdir())
    if len(blobs) != 1:
        raise RuntimeError(f"{image}: expected one data blob, found {len(blobs)}")
    return blobs[0]


def skopeo_push(image: Path, registry: RegistryServer, ref: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image / 'oci'}",
                    f"docker://{registry.host}/{ref}"], check=True, timeout=300)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# -- the measurements ----------------------------------------------------------------------------
def make_big(work: Path, size_mib: int, compressor: str = "none") -> tuple[Path, Path, str]:
    """(image dir, source file, sha256 of the source file); random bytes, so zstd stores most
    chunks as they are (bench/nydusd.py builds it with zstd, what both daemons read)."""
    tree = work / "big-tree"
    tree.mkdir()
    source = tree / "big.bin"
    h = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(size_mib):
            block = os.urandom(MIB)
            h.update(block)
            f.write(block)
    image = convert(tree, work / "big", compressor)
    return image, source, h.hexdigest()


def cold(bench: Bench, name: str, image_arg: Callable[[Path], str], baseline: Callable[[], float],
         expected: str, runs: int) -> dict[str, Any]:
    """Best of `runs`: the baseline and fscached alternate, a fresh empty cache each time."""
    base_times, fs_times, counters, ok = [], [], [], True
    cpus: list[float] = []
    for i in range(runs):
        base_times.append(baseline())
        run = f"{name}-{i}"
        mnt = bench.work / "runs" / run / "mnt"
        proc = bench.daemon(run, [image_arg(mnt)], [mnt])
        try:
            assert proc.proc is not None
            before = cpu_seconds(proc.proc.pid)
            fs_times.append(timed_read(bench, mnt / "big.bin", proc, f"{name} run {i + 1}"))
            cpus.append(cpu_seconds(proc.proc.pid) - before)
            counters.append(proc.counters())  # the timed read's, before the check reads again
            ok &= check_bytes(bench, mnt / "big.bin", expected, f"{name} run {i + 1}")
        finally:
            bench.stop(proc, f"{name} run {i + 1}")
            bench.remove_run(run)
    best = min(range(runs), key=lambda k: fs_times[k])
    return {"baseline_seconds": base_times, "fscached_seconds": fs_times,
            "baseline_best": min(base_times), "fscached_best": min(fs_times),
            "ratio": min(base_times) / min(fs_times), "counters": counters[best],
            "cpu_seconds": cpus, "cpu_best": cpus[best],
            "counters_all": counters, "bytes_ok": ok}


def warm(bench: Bench, image: Path, blob: Path, expected: str, runs: int) -> dict[str, Any]:
    """Filled cache: the same daemon (the complete blob is unmarked) and a restarted one (its
    chunks are re-verified on first read) vs a plain file-backed EROFS mount of the image."""
    run = "warm"
    mnt = bench.work / "runs" / run / "mnt"
    plain_mnt = bench.work / "plain-mnt"
    plain_mnt.mkdir(exist_ok=True)
    image_arg = f"fsid=warm,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"
    proc = bench.daemon(run, [image_arg], [mnt])
    plain_times, same_times, restart_times, restart_counters, ok = [], [], [], [], True
    try:
        timed_read(bench, mnt / "big.bin", proc, "warm fill")  # fills the cache
        filled = proc.counters()
        ok &= check_bytes(bench, mnt / "big.bin", expected, "warm fill")
        # plain mount: the bootstrap file as source, the original blob file as its device
        native.mount(image / "image.boot", plain_mnt, "erofs", MS_RDONLY, f"device={blob}")
        bench.plain_mounts.append(plain_mnt)
        try:
            for i in range(runs):
                plain_times.append(timed_read(bench, plain_mnt / "big.bin", None, "plain mount"))
                same_times.append(timed_read(bench, mnt / "big.bin", proc, f"warm run {i + 1}"))
            ok &= check_bytes(bench, mnt / "big.bin", expected, "warm (same daemon)")
        finally:
            mounts.unmount(plain_mnt)  # before the daemon stops: it keeps its group for mounts of its bootstraps
        same_counters = proc.counters()
        bench.stop(proc, "warm (same daemon)")
        for i in range(runs):  # a restarted daemon on the filled cache dir
            proc = bench.daemon(run, [image_arg], [mnt])
            restart_times.append(timed_read(bench, mnt / "big.bin", proc, f"warm restart {i + 1}"))
            restart_counters.append(proc.counters())
            ok &= check_bytes(bench, mnt / "big.bin", expected, f"warm restart {i + 1}")
            bench.stop(proc, f"warm restart {i + 1}")
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            bench.stop(proc, "warm")
        bench.remove_run(run)
    plain = min(plain_times)
    return {"plain_seconds": plain_times, "fscached_seconds": same_times, "restart_seconds": restart_times,
            "plain_best": plain, "fscached_best": min(same_times), "restart_best": min(restart_times),
            "ratio": plain / min(same_times), "restart_ratio": plain / min(restart_times),
            "counters_after_fill": filled, "counters_same_daemon": same_counters,
            "counters_restart": restart_counters[restart_times.index(min(restart_times))], "bytes_ok": ok}


def random_preads(path: Path, offsets: list[int]) -> tuple[list[float], list[bytes]]:
    lat, datas = [], []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter_ns()
            data = os.pread(fd, 4096, off)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            datas.append(data)
    finally:
        os.close(fd)
    return lat, datas


def random_reads(bench: Bench, image: Path, blob: Path, source: Path, size: int, reads: int) -> dict[str, Any]:
    """Cold random 4 KiB preads (fresh cache) vs the raw blob file read the same way; then the
    fast path: events for ranges already filled, answered from the daemon's map."""
    rng = random.Random(4096)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(reads)]
    drop_caches()
    raw_lat, _ = random_preads(blob, offsets)
    run = "random"
    mnt = bench.work / "runs" / run / "mnt"
    image_arg = f"fsid=rnd,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"
    result: dict[str, Any] = {"reads": reads, "raw_p50_us": percentile(raw_lat, 50), "raw_p99_us": percentile(raw_lat, 99)}
    proc = bench.daemon(run, [image_arg], [mnt])
    try:
        drop_caches()
        with watchdog(READ_TIMEOUT, lambda: bench.cleanup_daemon(proc)) as fired:
            start = time.perf_counter()
            lat, datas = random_preads(mnt / "big.bin", offsets)
            elapsed = time.perf_counter() - start
        if fired.is_set():
            bench.problem("random reads hung; daemon killed")
            raise Hang("random")
        counters = proc.counters()
        wrong = 0
        with open(source, "rb", buffering=0) as f:
            for off, data in zip(offsets, datas):
                f.seek(off)
                wrong += f.read(4096) != data
        if wrong:
            bench.problem(f"random reads: {wrong} of {reads} preads returned WRONG BYTES")
        result.update({"p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
                       "mean_us": sum(lat) / len(lat), "max_us": max(lat), "seconds": elapsed,
                       "counters": counters, "wrong_reads": wrong})
    finally:
        bench.stop(proc, "random reads")
        bench.remove_run(run)

    # Fast path. A blob whose every chunk is filled loses its mark (no events at all any more),
    # so the whole file is not read first: only its first half is, and the timed reads stay in it.
    run = "fastpath"
    mnt = bench.work / "runs" / run / "mnt"
    image_arg = f"fsid=fast,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"
    half = (size // 2) // MIB * MIB
    proc = bench.daemon(run, [image_arg], [mnt])
    try:
        drop_caches()
        with open(mnt / "big.bin", "rb", buffering=0) as f:
            buf = bytearray(MIB)
            for _ in range(half // MIB):
                f.readinto(buf)
        before = proc.counters()
        fast_offsets = [rng.randrange(0, half // 4096) * 4096 for _ in range(reads * 2)]
        drop_caches()
        with watchdog(READ_TIMEOUT, lambda: bench.cleanup_daemon(proc)) as fired:
            start = time.perf_counter()
            lat, datas = random_preads(mnt / "big.bin", fast_offsets)
            elapsed = time.perf_counter() - start
        if fired.is_set():
            bench.problem("fast-path reads hung; daemon killed")
            raise Hang("fastpath")
        mid = proc.counters()
        drop_caches()
        with watchdog(READ_TIMEOUT, lambda: bench.cleanup_daemon(proc)) as fired:
            start = time.perf_counter()
            with open(mnt / "big.bin", "rb", buffering=0) as f:
                for _ in range(half // MIB):
                    f.readinto(buf)
            seq_elapsed = time.perf_counter() - start
        after = proc.counters()
        wrong = 0
        with open(source, "rb", buffering=0) as f:
            for off, data in zip(fast_offsets, datas):
                f.seek(off)
                wrong += f.read(4096) != data
        if wrong:
            bench.problem(f"fast-path reads: {wrong} of {len(fast_offsets)} preads returned WRONG BYTES")

        def delta(a: dict[str, int], b: dict[str, int], key: str) -> int:
            return b.get(key, 0) - a.get(key, 0)

        result["fast"] = {
            "preads": len(fast_offsets), "seconds": elapsed,
            "events": delta(before, mid, "read"), "read_cached": delta(before, mid, "read_cached"),
            "fetches": delta(before, mid, "fetches"),
            "events_per_second": delta(before, mid, "read_cached") / elapsed,
            "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "seq_mib": half // MIB, "seq_seconds": seq_elapsed,
            "seq_events": delta(mid, after, "read"), "seq_read_cached": delta(mid, after, "read_cached"),
            "seq_events_per_second": delta(mid, after, "read_cached") / seq_elapsed,
            "counters_before": before, "counters_after": after, "wrong_reads": wrong,
        }
    finally:
        bench.stop(proc, "fast path")
        bench.remove_run(run)
    return result


def fast_capacity(bench: Bench, image: Path, source: Path, size: int, reads: int, threads: int) -> dict[str, Any]:
    """Events answered per second when nothing but the event path is in the way: half the blob
    filled, the cache file's pages in the page cache, the mount's own pages dropped
    (POSIX_FADV_DONTNEED on the mounted file: each read misses EROFS's page cache and raises an
    event for a range already filled, answered by the fast path), `threads` readers of random
    4 KiB preads at once."""
    run = "fastcap"
    mnt = bench.work / "runs" / run / "mnt"
    image_arg = f"fsid=cap,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"
    half = (size // 2) // MIB * MIB
    proc = bench.daemon(run, [image_arg], [mnt])
    rng = random.Random(150_000)
    try:
        with open(mnt / "big.bin", "rb", buffering=0) as f:
            buf = bytearray(MIB)
            for _ in range(half // MIB):
                f.readinto(buf)
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        before = proc.counters()
        assert proc.proc is not None
        cpu0 = cpu_seconds(proc.proc.pid)
        go = bench.work / "runs" / run / "go"
        # readers are processes (threads of one interpreter would measure its GIL): each waits
        # for `go`, times its own preads, then checks every byte it read against the source
        readers = [subprocess.Popen([sys.executable, "-c", FAST_READER, str(mnt / "big.bin"), str(source), str(go),
                                     str(rng.randrange(1 << 30)), str(reads), str(half)], stdout=subprocess.PIPE, text=True)
                   for _ in range(threads)]
        time.sleep(0.5)  # all started and waiting
        with watchdog(READ_TIMEOUT, lambda: bench.cleanup_daemon(proc)) as fired:
            go.touch()
            outs = [json.loads(r.communicate()[0]) for r in readers]
        if fired.is_set():
            bench.problem("fast-path capacity reads hung; daemon killed")
            raise Hang("fastcap")
        elapsed = max(o["seconds"] for o in outs)
        cpu = cpu_seconds(proc.proc.pid) - cpu0
        after = proc.counters()
        wrong = sum(o["wrong"] for o in outs)
        if wrong:
            bench.problem(f"fast-path capacity: {wrong} preads returned WRONG BYTES")
        events = after.get("read", 0) - before.get("read", 0)
        fast = after.get("read_fast", 0) - before.get("read_fast", 0)
        return {"threads": threads, "preads": threads * reads, "seconds": elapsed, "events": events,
                "reader_seconds": [o["seconds"] for o in outs],
                "read_fast": fast, "events_per_second": fast / elapsed,
                "daemon_cpu_us_per_event": 1e6 * cpu / max(events, 1), "wrong_reads": wrong,
                "fetches": after.get("fetches", 0) - before.get("fetches", 0)}
    finally:
        bench.stop(proc, "fast path capacity")
        bench.remove_run(run)


# one reader process of fast_capacity: argv = mounted file, source file, go file, seed, reads, span
FAST_READER = r"""
import json, os, random, sys, time
path, source, go, seed, reads, span = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rng = random.Random(seed)
offsets = [rng.randrange(0, span // 4096) * 4096 for _ in range(reads)]
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
pread = os.pread
while not os.path.exists(go):
    time.sleep(0.001)
start = time.perf_counter()
datas = [pread(fd, 4096, off) for off in offsets]
seconds = time.perf_counter() - start
src = os.open(source, os.O_RDONLY)
wrong = sum(pread(src, 4096, off) != data for off, data in zip(offsets, datas))
print(json.dumps({"seconds": seconds, "wrong": wrong}))
"""


def make_tree(work: Path, files: int, total_mib: int) -> tuple[Path, Path]:
    """A tree of `files` files (random bytes, sizes around total/files, in 20 directories) and
    its image (zstd: what a registry serves)."""
    rng = random.Random(2000)
    tree = work / "walk-tree"
    mean = total_mib * MIB // files
    for i in range(files):
        d = tree / f"d{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(max(1, int(rng.uniform(0.2, 1.8) * mean))))
    return tree, convert(tree, work / "walk", "zstd")


def walk_seconds(root: Path) -> tuple[float, str]:
    """Read every file under `root` (sorted walk), 1 MiB reads: seconds and a digest of it all."""
    h = hashlib.sha256()
    buf = bytearray(MIB)
    start = time.perf_counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(memoryview(buf)[:n])
    return time.perf_counter() - start, h.hexdigest()


def tree_walk(bench: Bench, registry: RegistryServer, tree: Path, image: Path, runs: int) -> dict[str, Any]:
    """A cold walk of the tree through fscached from the registry vs the same walk of the
    source tree on local disk (page cache dropped before each), interleaved, best of `runs`."""
    skopeo_push(image, registry, "bench/walk:v1")
    local_times, fs_times = [], []
    _, want = walk_seconds(tree)
    for i in range(runs):
        drop_caches()
        local_times.append(walk_seconds(tree)[0])
        run = f"walk-{i}"
        mnt = bench.work / "runs" / run / "mnt"
        proc = bench.daemon(run, [f"fsid=walk,ref={registry.host}/bench/walk:v1,scheme=http,mountpoint={mnt}"], [mnt])
        try:
            drop_caches()
            with watchdog(READ_TIMEOUT, functools.partial(bench.cleanup_daemon, proc)) as fired:
                seconds, got = walk_seconds(mnt)
            if fired.is_set():
                bench.problem(f"tree walk run {i + 1} hung; daemon killed")
                raise Hang("walk")
            if got != want:
                bench.problem(f"tree walk run {i + 1}: WRONG BYTES (the walk's digest differs)")
            fs_times.append(seconds)
        finally:
            bench.stop(proc, f"tree walk run {i + 1}")
            bench.remove_run(run)
    return {"local_seconds": local_times, "fscached_seconds": fs_times, "local_best": min(local_times),
            "fscached_best": min(fs_times), "ratio": min(local_times) / min(fs_times)}


def bind_and_start(bench: Bench, image: Path, runs: int) -> dict[str, Any]:
    """The bind (the catalog's add of the image: its bootstrap's chunk index, or the whole tree
    where it has no chunk table) of the full cold-start workload's bootstrap when it is built
    (else the largest one there), each in a fresh process; and seconds from spawning the daemon
    to its first mount appearing in the mount table (a local image: no pull)."""
    from erofs_image.index import BootstrapIndex

    boots = sorted(Path("/var/cache/fscached/workload").glob("*/nydus/image.boot"),
                   key=lambda p: (not p.parent.parent.name.startswith("full"), -p.stat().st_size))
    boot = boots[0] if boots else image / "image.boot"
    probe = ("import sys, time; from pathlib import Path; "
             "from fscached.config import ImageSpec; from fscached.core.catalog import Catalog, open_bootstrap; "
             "from fetcher.chain import SourceChain; from fetcher.local import LocalDirectorySource; "
             "p = Path(sys.argv[1]); spec = ImageSpec(fsid='b', bootstrap=p, blobs=p.parent / 'blobs'); "
             "t = time.perf_counter(); parsed = open_bootstrap(spec, p); "
             "Catalog().add_image(spec, p, SourceChain([LocalDirectorySource(p.parent / 'blobs')]), parsed); "
             "print(time.perf_counter() - t)")
    binds = [float(subprocess.run([sys.executable, "-c", probe, str(boot)], cwd=REPO, check=True, capture_output=True,
                                  text=True).stdout) for _ in range(runs)]
    starts = []
    for i in range(runs):
        run = f"start-{i}"
        mnt = bench.work / "runs" / run / "mnt"
        mnt.mkdir(parents=True)
        cache = bench.work / "runs" / run / "cache"
        proc = FscachedProcess(cache, [f"fsid=st,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"])
        bench.daemons.append((proc, [mnt]))
        with open(proc.log, "ab") as log:
            spawned = time.perf_counter()
            proc.proc = subprocess.Popen(proc.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while str(mnt) not in mounts.erofs_mounts():
            if proc.proc.poll() is not None or time.perf_counter() - spawned > 120:
                bench.problem(f"start run {i + 1}: the daemon never mounted its image")
                raise Hang("start")
            time.sleep(0.002)
        starts.append(time.perf_counter() - spawned)
        while not proc.ready.exists():  # then serving: stop it the usual way
            time.sleep(0.01)
        bench.stop(proc, f"start run {i + 1}")
        bench.remove_run(run)
    return {"bootstrap": str(boot), "bootstrap_bytes": boot.stat().st_size,
            "indexed": BootstrapIndex.open(boot) is not None,
            "bind_seconds": binds, "bind_best": min(binds), "start_seconds": starts, "start_best": min(starts)}


def small_images(work: Path, count: int) -> list[Path]:
    """`count` small distinct images (zstd), two files each, built two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def build(i: int) -> Path:
        tree = work / f"small-tree-{i}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "name").write_text(f"image {i}\n")
        (tree / "data.bin").write_bytes(os.urandom(256 << 10))
        return convert(tree, work / f"small-{i}", "zstd")

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(build, range(count)))


def rss(bench: Bench, registry: RegistryServer, count: int, many: int) -> dict[str, Any]:
    images = small_images(bench.work, max(count, many))
    for i, image in enumerate(images[:count]):
        skopeo_push(image, registry, f"bench/small:t{i}")

    def local(i: int, mnt: Path) -> str:
        return f"fsid=l{i},bootstrap={images[i] / 'image.boot'},blobs={images[i] / 'blobs'},mountpoint={mnt}"

    def remote(i: int, mnt: Path) -> str:
        return f"fsid=r{i},ref={registry.host}/bench/small:t{i},scheme=http,mountpoint={mnt}"

    configs = {
        "1 local image": [(local, 0)],
        f"{count} local images": [(local, i) for i in range(count)],
        f"{many} local images": [(local, i) for i in range(many)],
        "1 registry image": [(remote, 0)],
        f"{count} registry images (one repository)": [(remote, i) for i in range(count)],
        f"{count} local + {count} registry images": [(local, i) for i in range(count)] + [(remote, i) for i in range(count)],
    }
    out: dict[str, Any] = {}
    for n, (label, members) in enumerate(configs.items()):
        run = f"rss{n}"
        mnts = [bench.work / "runs" / run / f"m{k}" for k in range(len(members))]
        proc = bench.daemon(run, [make(i, m) for (make, i), m in zip(members, mnts)], mnts)
        try:
            wrong = 0
            with watchdog(READ_TIMEOUT, functools.partial(bench.cleanup_daemon, proc)) as fired:
                for (_make, i), m in zip(members, mnts):
                    wrong += (m / "data.bin").read_bytes() != (bench.work / f"small-tree-{i}" / "data.bin").read_bytes()
                    wrong += (m / "etc" / "name").read_text() != f"image {i}\n"
            if fired.is_set():
                bench.problem(f"RSS {label}: reads hung; daemon killed")
                raise Hang(label)
            if wrong:
                bench.problem(f"RSS {label}: {wrong} file(s) read WRONG BYTES")
            time.sleep(0.5)
            assert proc.proc is not None
            now, peak = rss_kib(proc.proc.pid)
            out[label] = {"images": len(members), "rss_kib": now, "hwm_kib": peak,
                          "counters": proc.counters(), "wrong_files": wrong}
        finally:
            bench.stop(proc, f"RSS {label}")
            bench.remove_run(run)
    return out


# -- report ---------------------------------------------------------------------------------------
def rows(r: dict[str, Any], size_mib: int) -> list[list[str]]:
    """Measurement, fscached, baseline, ratio, goal, met."""

    def s(x: float) -> str:
        return f"{x:.3f} s"

    def verdict(ok: bool) -> str:
        return "yes" if ok else "no"

    out = []
    if "cold_local" in r:
        c = r["cold_local"]
        out.append([f"cold read {size_mib} MiB, local blob", s(c["fscached_best"]), f"raw blob {s(c['baseline_best'])}",
                    f"{c['ratio']:.2f}", ">= 0.7", verdict(c["ratio"] >= 0.7)])
    if "cold_registry" in r:
        c = r["cold_registry"]
        out.append([f"cold read {size_mib} MiB, loopback registry", s(c["fscached_best"]), f"curl {s(c['baseline_best'])}",
                    f"{c['ratio']:.2f}", ">= 0.5", verdict(c["ratio"] >= 0.5)])
    if "warm" in r:
        w = r["warm"]
        state = "unmarked" if w["counters_after_fill"].get("blobs_complete") else "still marked"
        out.append([f"warm read, same daemon (blob filled, {state})", s(w["fscached_best"]), f"plain EROFS {s(w['plain_best'])}",
                    f"{w['ratio']:.2f}", ">= 0.95", verdict(w["ratio"] >= 0.95)])
        out.append(["warm read, restarted daemon (after a clean stop)", s(w["restart_best"]), f"plain EROFS {s(w['plain_best'])}",
                    f"{w['restart_ratio']:.2f}", "(>= 0.95)", verdict(w["restart_ratio"] >= 0.95)])
    if "random" in r:
        x = r["random"]
        if "p50_us" in x:
            out.append([f"random 4 KiB cold preads ({x['reads']}), p50", f"{x['p50_us']:.0f} us",
                        f"raw blob {x['raw_p50_us']:.0f} us", f"{x['raw_p50_us'] / x['p50_us']:.2f}", "-", "-"])
            out.append([f"random 4 KiB cold preads ({x['reads']}), p99", f"{x['p99_us']:.0f} us",
                        f"raw blob {x['raw_p99_us']:.0f} us", f"{x['raw_p99_us'] / x['p99_us']:.2f}", "-", "-"])
        if "fast" in x:
            f = x["fast"]
            out.append([f"fast path, random 4 KiB ({f['preads']} preads)", f"{f['events_per_second']:,.0f} events/s",
                        f"{f['read_cached']} read_cached in {s(f['seconds'])}, p50 {f['p50_us']:.0f} us",
                        "-", "-", "-"])
            out.append([f"fast path, sequential {f['seq_mib']} MiB", f"{f['seq_events_per_second']:,.0f} events/s",
                        f"{f['seq_read_cached']} read_cached in {s(f['seq_seconds'])}", "-", "-", "-"])
    if "rss" in r:
        base = r["rss"].get("1 local image")
        base_reg = r["rss"].get("1 registry image")
        for label, m in r["rss"].items():
            if m["images"] == 1:
                continue
            b = base_reg if "registry" in label and "local" not in label else base
            mib = m["rss_kib"] / 1024
            out.append([f"daemon RSS, {label}", f"{mib:.1f} MiB (peak {m['hwm_kib'] / 1024:.1f})",
                        f"1 image {b['rss_kib'] / 1024:.1f} MiB" if b else "-",
                        f"{m['rss_kib'] / b['rss_kib']:.2f}x" if b else "-", "< 80 MiB", verdict(mib < 80)])
    return out


HEADERS = ["measurement", "fscached", "baseline (same run)", "ratio", "goal", "met"]
GOAL_HEADERS = ["measure (issue 17)", "this run", "spread (all runs)", "goal", "met"]


def spread(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}" if values else "-"


def goal_rows(r: dict[str, Any], size_mib: int) -> list[list[str]]:
    """The issue's goal table from this run: each ratio against its baseline of the same run."""

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out: list[list[str]] = []
    if "cold_local" in r:
        c = r["cold_local"]
        ratios = [b / f for b, f in zip(c["baseline_seconds"], c["fscached_seconds"])]
        out.append([f"cold {size_mib} MiB, local blob / raw blob read", f"{c['ratio']:.2f}",
                    spread(ratios, ".2f") + " (pairs)", ">= 0.7", met(c["ratio"] >= 0.7)])
    if "cold_registry" in r:
        c = r["cold_registry"]
        ratios = [b / f for b, f in zip(c["baseline_seconds"], c["fscached_seconds"])]
        out.append([f"cold {size_mib} MiB, loopback registry / curl of the whole blob", f"{c['ratio']:.2f}",
                    spread(ratios, ".2f") + " (pairs)", ">= 0.5", met(c["ratio"] >= 0.5)])
    if "walk" in r:
        w = r["walk"]
        ratios = [b / f for b, f in zip(w["local_seconds"], w["fscached_seconds"])]
        out.append([f"cold walk of a {w['files']:,}-file {w['mib']} MiB tree from the registry / from local disk",
                    f"{w['ratio']:.2f}", spread(ratios, ".2f") + " (pairs)", ">= 0.7", met(w["ratio"] >= 0.7)])
    if "fast_capacity" in r:
        f = r["fast_capacity"]
        others = ", ".join(f"{c['threads']} readers {c['events_per_second'] / 1000:,.0f}k"
                           for c in r.get("fast_capacity_all", [f]))
        out.append([f"fast path, events answered per second (best: {f['threads']} readers)",
                    f"{f['events_per_second']:,.0f}",
                    f"{others}; {f['daemon_cpu_us_per_event']:.1f} us daemon CPU/event", ">= 150,000",
                    met(f["events_per_second"] >= 150_000)])
    if "cold_local" in r:
        c = r["cold_local"]
        per_gib = [cpu * 1024 / size_mib for cpu in c["cpu_seconds"]]
        best = c["cpu_best"] * 1024 / size_mib
        out.append(["daemon CPU per GiB filled (core-seconds, cold local read)", f"{best:.2f}",
                    spread(per_gib, ".2f"), "<= 0.4", met(best <= 0.4)])
    if "bind" in r:
        b = r["bind"]
        what = Path(b["bootstrap"]).parent.parent.name.split("-")[0]
        out.append([f"bind of the {what} workload's bootstrap ({b['bootstrap_bytes'] / MIB:.1f} MiB)",
                    f"{1000 * b['bind_best']:.1f} ms", spread([1000 * x for x in b["bind_seconds"]], ".1f") + " ms",
                    "<= 50 ms", met(b["bind_best"] <= 0.05)])
        out.append(["daemon start to first mount", f"{1000 * b['start_best']:.0f} ms",
                    spread([1000 * x for x in b["start_seconds"]], ".0f") + " ms", "<= 150 ms",
                    met(b["start_best"] <= 0.15)])
    if "warm" in r:
        w = r["warm"]
        ratios = [w["plain_best"] / x for x in w["fscached_seconds"]]
        out.append(["warm read / plain file-backed EROFS", f"{w['ratio']:.2f}", spread(ratios, ".2f"),
                    ">= 0.95", met(w["ratio"] >= 0.95)])
    if "rss" in r:
        many = [(label, m) for label, m in r["rss"].items() if m["images"] >= 100]
        for label, m in many:
            mib = m["rss_kib"] / 1024
            out.append([f"daemon RSS, {label}", f"{mib:.1f} MiB", f"peak {m['hwm_kib'] / 1024:.1f} MiB",
                        "< 100 MiB", met(mib < 100)])
    return out
COUNTER_KEYS = ["fetches", "fetched_bytes", "read", "read_cached", "read_failed", "reverified_chunks", "blobs_complete"]


def counter_rows(r: dict[str, Any]) -> list[list[str]]:
    found = []
    if "cold_local" in r:
        found.append(("cold local (best run)", r["cold_local"]["counters"]))
    if "cold_registry" in r:
        found.append(("cold registry (best run)", r["cold_registry"]["counters"]))
    if "warm" in r:
        found.append(("warm, restarted (best run)", r["warm"]["counters_restart"]))
    if "random" in r and "counters" in r["random"]:
        found.append(("random 4 KiB cold", r["random"]["counters"]))
    return [[name] + [str(c.get(k, 0)) for k in COUNTER_KEYS] for name, c in found]


def print_report(r: dict[str, Any], size_mib: int, problems: list[str]) -> None:
    goals = Table(title="issue 17's goals, from this run")
    for h in GOAL_HEADERS:
        goals.add_column(h, justify="left" if h.startswith(("measure", "spread")) else "right")
    for row in goal_rows(r, size_mib):
        goals.add_row(*row)
    console.print(goals)
    table = Table(title=f"fscached fanotify backend, kernel {platform.release()}, {os.cpu_count()} CPUs")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("measurement", "baseline (same run)") else "right")
    for row in rows(r, size_mib):
        table.add_row(*row)
    console.print(table)
    counters = Table(title="daemon counters of the timed read (SIGUSR1 right after it)")
    for h in ["run"] + COUNTER_KEYS:
        counters.add_column(h, justify="left" if h == "run" else "right")
    for row in counter_rows(r):
        counters.add_row(*row)
    console.print(counters)
    if problems:
        console.print("[bold red]problems seen:[/]")
        for p in problems:
            console.print(f"  - {p}")
    else:
        console.print("bytes checked after every timed read: all correct; no daemon errors")


def markdown(r: dict[str, Any], size_mib: int, problems: list[str]) -> str:
    def table(headers: list[str], body: list[list[str]]) -> list[str]:
        return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                + ["| " + " | ".join(row) + " |" for row in body])

    lines = [f"fscached fanotify backend, kernel {platform.release()}, {os.cpu_count()} CPUs, "
             f"{size_mib} MiB file, page cache dropped before every timed read, best of 3", ""]
    lines += table(GOAL_HEADERS, goal_rows(r, size_mib)) + [""]
    lines += table(HEADERS, rows(r, size_mib)) + [""]
    lines += table(["run"] + COUNTER_KEYS, counter_rows(r)) + [""]
    lines += [f"- problem: {p}" for p in problems] or ["bytes checked after every timed read: all correct"]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reads", type=int, default=2000, help="random 4 KiB cold preads")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=20, help="images mounted for the RSS figure")
    parser.add_argument("--many-images", type=int, default=100, help="local images bound for the RSS goal")
    parser.add_argument("--walk-files", type=int, default=2000, help="files of the cold tree walk")
    parser.add_argument("--walk-mib", type=int, default=50, help="MiB of the cold tree walk's files")
    parser.add_argument("--threads", default="1,4", help="reader processes of the fast-path capacity, one "
                        "measurement per number given (the best is the goal row's)")
    parser.add_argument("--fast-reads", type=int, default=20000, help="preads of each fast-path capacity reader")
    parser.add_argument("--json", type=Path, metavar="OUT.json")
    parser.add_argument("--markdown", type=Path, metavar="OUT.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/fanotify.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    for tool in ("skopeo", "docker-registry", "curl"):
        if shutil.which(tool) is None:
            print(f"bench/fanotify.py needs {tool}", file=sys.stderr)
            return 1

    def terminated(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)

    work = Path(tempfile.mkdtemp(prefix="fscb-", dir="/var/tmp"))  # short: the keeper socket path is limited
    bench = Bench(work)
    results: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "size_mib": args.size_mib}
    started = time.monotonic()
    try:
        console.print(f"building a {args.size_mib} MiB image in {work} ...")
        image, source, expected = make_big(work, args.size_mib)
        blob = only_blob(image)
        size = source.stat().st_size
        bench.registry = registry = RegistryServer(work / "registry").start()
        skopeo_push(image, registry, "bench/big:v1")
        blob_url = registry.blob_url("bench/big", blob.name)

        console.print("0/8 bind and daemon start ...")
        results["bind"] = bind_and_start(bench, image, args.runs)
        console.print("1/8 cold read, local blob ...")
        results["cold_local"] = cold(
            bench, "cold-local",
            lambda mnt: f"fsid=big,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}",
            lambda: timed_read(bench, blob, None, "raw blob"), expected, args.runs)
        console.print("2/8 cold read, loopback registry ...")
        results["cold_registry"] = cold(
            bench, "cold-reg",
            lambda mnt: f"fsid=big,ref={registry.host}/bench/big:v1,scheme=http,mountpoint={mnt}",
            lambda: curl_seconds(blob_url), expected, args.runs)
        console.print("3/8 warm read ...")
        results["warm"] = warm(bench, image, blob, expected, args.runs)
        console.print("4/8 random 4 KiB reads, fast path ...")
        results["random"] = random_reads(bench, image, blob, source, size, args.reads)
        console.print(f"5/8 fast path capacity, {args.threads} readers ...")
        caps = [fast_capacity(bench, image, source, size, args.fast_reads, int(n)) for n in args.threads.split(",")]
        results["fast_capacity_all"] = caps
        results["fast_capacity"] = max(caps, key=lambda c: c["events_per_second"])
        console.print(f"6/8 cold walk of a {args.walk_files}-file tree from the registry ...")
        tree, walk_image = make_tree(work, args.walk_files, args.walk_mib)
        results["walk"] = tree_walk(bench, registry, tree, walk_image, args.runs)
        results["walk"].update(files=args.walk_files, mib=args.walk_mib)
        console.print(f"7/8 daemon RSS with {args.images} and {args.many_images} images ...")
        results["rss"] = rss(bench, registry, args.images, args.many_images)
    except KeyboardInterrupt:
        console.print("interrupted: cleaning up")
        bench.problems.append("interrupted")
    except Hang:
        pass  # reported already; what was measured is printed below
    except Exception as exc:
        bench.problem(f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        bench.close()
    results["seconds_total"] = time.monotonic() - started
    results["problems"] = bench.problems
    print_report(results, args.size_mib, bench.problems)
    console.print(f"whole run: {results['seconds_total']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results, args.size_mib, bench.problems))
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
