"""Guest side of test_vm_failover.py and bench/failover.py: fscached's `nydusd` under
nydus-snapshotter's failover (recover_policy = "failover") and hot upgrade, driven by the
supervisor stand-in (tests/standins/supervisor.py), while readers stream cold files.

  start   the snapshotter's start: `nydusd singleton ... --id --supervisor`, RUNNING, sendfd;
          bind the image (localfs), mount -o fsid=, sendfd
  kill    4 readers stream the cold file `files.kill` (each from its own quarter, wrapping
          around); once they are into it, kill -9 the daemon; the stand-in restarts it (INIT),
          takeover, start, RUNNING, sendfd
  again   4 readers on the cold `files.again`: kill -9 the daemon, and kill the next one in the
          middle of its takeover (right after the supervisor gave it the state); the third
          converges
  upgrade a hot upgrade to a new process (`--upgrade`, the next API socket): takeover, READY;
          then 4 readers on the cold `files.upgrade`, and once they are into it the old daemon
          is told to exit and the new one to start
Every read is timed: the result holds, per kill, how long the readers stalled (from the kill
to each reader's next read), and the digests, errors and log lines the host checks.

args: nydusd, bootstrap, blobs, files: {"kill", "again", "upgrade": file name}, readers (4),
      into (fraction of the file each reader has read at the kill, default 0.1), send_timeout
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vmharness.guest import scratch_dir

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from standins.supervisor import Snapshotter, call  # noqa: E402

RUN_ROOT = Path("/run/containerd-nydus")
FSID = hashlib.sha256(b"nydus-snapshot-failover").hexdigest()
BLOCK = 1 << 20
OPEN_LINE = re.compile(r"OPEN req=msg:\d+ blob=(?P<blob>\S+) object=(?P<object>\d+) size=")


class Reader(threading.Thread):
    """Streams one file from `start` to its end, then from 0 to `start`, hashing in that order
    and timing every read."""

    def __init__(self, path: Path, start: int, size: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.path, self.start_at, self.size = path, start, size
        self.times: list[float] = []
        self.done_bytes = 0
        self.error: str | None = None
        self.errno: int | None = None
        self.digest: str | None = None

    def run(self) -> None:
        h = hashlib.sha256()
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                for begin, end in ((self.start_at, self.size), (0, self.start_at)):
                    pos = begin
                    while pos < end:
                        data = os.pread(fd, min(BLOCK, end - pos), pos)
                        if not data:
                            raise OSError(0, f"unexpected end of file at {pos}")
                        h.update(data)
                        pos += len(data)
                        self.done_bytes += len(data)
                        self.times.append(time.monotonic())
            finally:
                os.close(fd)
            self.digest = h.hexdigest()
        except OSError as exc:
            self.error, self.errno = str(exc), exc.errno


def start_readers(path: Path, count: int) -> list[Reader]:
    size = path.stat().st_size
    quarter = size // count // BLOCK * BLOCK
    readers = [Reader(path, i * quarter, size, f"reader-{i}") for i in range(count)]
    for reader in readers:
        reader.start()
    return readers


def wait_progress(readers: list[Reader], fraction: float, timeout: float = 1200) -> None:
    """Until every reader has read `fraction` of its file (or finished, or failed)."""
    deadline = time.monotonic() + timeout
    while any(r.is_alive() and r.done_bytes < fraction * r.size for r in readers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"readers stuck: {[r.done_bytes for r in readers]}")
        time.sleep(0.05)


def stalls(readers: list[Reader], at: float) -> list[float | None]:
    """Per reader: seconds from `at` (a kill) to its first read completed after the longest gap
    between reads that spans or follows `at` within the next minute (when it moved again).
    None for a reader that had finished by then."""
    out: list[float | None] = []
    for r in readers:
        times = list(r.times)
        if not times or times[-1] <= at:
            out.append(None)
            continue
        best: tuple[float, float] | None = None  # (gap, end)
        prev = max([t for t in times if t <= at], default=at)
        for t in times:
            if t <= at:
                continue
            if t - at > 60:
                break
            gap = t - prev
            if best is None or gap > best[0]:
                best = (gap, t)
            prev = t
        out.append(round(best[1] - at, 3) if best is not None else None)
    return out


def next_reads(readers: list[Reader], at: float) -> list[float | None]:
    """Per reader: seconds from `at` to its next completed read (None: it had finished)."""
    return [round(min((t for t in r.times if t > at), default=at - 1) - at, 3) if r.times and r.times[-1] > at
            else None for r in readers]


def summary(readers: list[Reader]) -> list[dict[str, Any]]:
    return [{"start": r.start_at, "bytes": r.done_bytes, "digest": r.digest, "error": r.error,
             "errno": r.errno, "reads": len(r.times)} for r in readers]


def opens_by_process(log_text: str) -> list[list[tuple[str, int]]]:
    """The (blob, object id) of every OPEN, per daemon process (a process's first line starts
    a section; during an upgrade two processes interleave: the host only looks at failovers)."""
    sections: list[list[tuple[str, int]]] = [[]]
    for line in log_text.splitlines():
        if "singleton: cache" in line and "nydusd (fscached" in line:
            sections.append([])
        m = OPEN_LINE.search(line)
        if m:
            sections[-1].append((m.group("blob"), int(m.group("object"))))
    return [s for s in sections if s]


def run(args: dict[str, Any]) -> dict[str, Any]:
    root = scratch_dir() / "failover"
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / "1"
    (snapshot / "fs" / "image").mkdir(parents=True, exist_ok=True)
    shutil.copy(args["bootstrap"], snapshot / "fs" / "image" / "image.boot")
    mnt = snapshot / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    count = int(args.get("readers", 4))
    snap = Snapshotter(args["nydusd"], RUN_ROOT, cache, daemon_id="d0fscached0failover",
                       log_file=root / "logs" / "nydusd.log", send_timeout=float(args.get("send_timeout", 300)))
    out: dict[str, Any] = {"kills": []}
    mounted = False
    t0 = time.monotonic()
    try:
        snap.start_daemon()
        out["start_seconds"] = round(time.monotonic() - t0, 2)
        entry = {"type": "bootstrap", "id": FSID, "domain_id": FSID,
                 "config": {"id": FSID, "backend_type": "localfs",
                            "backend_config": {"dir": args["blobs"], "readahead": False, "blob_file": ""},
                            "cache_type": "fscache", "cache_config": {"work_dir": str(snapshot / "fs")},
                            "prefetch_config": {"enable": False, "threads_count": 8, "merging_size": 1048576,
                                                "bandwidth_rate": 0, "prefetch_all": False},
                            "metadata_path": str(snapshot / "fs" / "image" / "image.boot")}}
        status, body = call(snap.apisock, "PUT", "/api/v2/blobs", entry)
        if status != 204:
            raise RuntimeError(f"bind: {status} {body}")
        subprocess.run(["mount", "-t", "erofs", "none", "-o", f"fsid={FSID}", str(mnt)], check=True,
                       capture_output=True, timeout=300)
        mounted = True
        snap.sendfd()  # the snapshotter, after each mount

        into = float(args.get("into", 0.1))
        # -- kill -9 under 4 readers; then killed again, and the next one during its takeover ----
        for key, what, during in (("kill", "kill -9", 0), ("again", "kill -9, then kill during takeover", 1)):
            readers = start_readers(mnt / args["files"][key], count)
            wait_progress(readers, into)
            kill_at = snap.kill()
            timings = snap.failover(kill_during_takeover=during)
            for r in readers:
                r.join(1800)
            out["kills"].append({"what": what, "file": key, "stalls": stalls(readers, kill_at),
                                 "readers": summary(readers), **{k: round(v - kill_at, 3) for k, v in timings.items()}})
        out["failover_readers"] = [r for kill in out["kills"] for r in kill["readers"]]
        out["info_after_failover"] = call(snap.apisock, "GET", "/api/v1/daemon")[1]

        # -- hot upgrade under 4 readers ------------------------------------------------------
        phase: dict[str, list[Reader]] = {}

        def readers_in() -> None:  # the new process is READY: readers mid-stream when the old one goes
            phase["readers"] = start_readers(mnt / args["files"]["upgrade"], count)
            wait_progress(phase["readers"], into)

        upgrade = snap.upgrade(before_exit=readers_in)
        readers = phase["readers"]
        begin = upgrade["begin"]
        out["upgrade"] = {k: round(v - begin, 3) for k, v in upgrade.items()}
        for r in readers:
            r.join(1800)
        out["upgrade_readers"] = summary(readers)
        out["upgrade"]["stalls_from_old_exit"] = next_reads(readers, upgrade["old_exit"])
        out["upgrade"]["max_gap"] = max((max((b - a for a, b in zip(r.times, r.times[1:])), default=0.0)
                                         for r in readers), default=0.0)
        out["upgrade_old_exit_code"] = snap.procs[-2].returncode if len(snap.procs) >= 2 else None
        out["info_after"] = call(snap.apisock, "GET", "/api/v1/daemon")[1]
        out["processes"] = [p.pid for p in snap.procs]
        out["supervisor"] = {"received": snap.supervisor.received, "sent": snap.supervisor.sent,
                             "errors": snap.supervisor.errors}
    finally:
        out["events"] = [(name, round(t - t0, 3)) for name, t in snap.events]
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=300)
        out["exit_code"] = snap.exit()
        snap.close()
        log_text = snap.log_file.read_text(errors="replace") if snap.log_file.exists() else ""
        out["opens"] = opens_by_process(log_text)
        out["log_counts"] = {
            "left_for_successor": log_text.count("left unanswered for the successor"),
            "restore_by_old": log_text.count("given back to the kernel's queue (restore)"),
            "takeovers": log_text.count("served again from the state"),
            "read_failed": len(re.findall(r"READ req=msg:\d+ .* failed: ", log_text)),
            "errors": len(re.findall(r" ERROR ", log_text)),
        }
        out["log_errors"] = [line for line in log_text.splitlines() if " ERROR " in line][:40]
        out["log_tail"] = log_text[-6000:]
        out["stderr"] = snap.stderr_path.read_text(errors="replace")[-3000:] if snap.stderr_path.exists() else ""
    return out
