"""fscached on the fanotify path run by the systemd stand-in (tests/standins/systemd.py), with
readers that say how far they got: shared by tests/fanotify/test_systemd_failover.py and
bench/failover.py.

Readers print `p <CLOCK_MONOTONIC seconds> <bytes read>` after every MiB, then `sha <hex>` or
`error <errno>`; time.monotonic() is the same clock in every process, so a reader's progress
can be set against the moment the stand-in killed or started a daemon.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon_proc import REPO
from fscached.frontends.fanotify import keeper
from fscached.util import mounts
from standins.systemd import Start, SystemdStandin

READER = r"""
import hashlib, sys, time
h = hashlib.sha256()
done = 0
try:
    with open(sys.argv[1], "rb", buffering=0) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
            done += len(block)
            print(f"p {time.monotonic():.6f} {done}", flush=True)
    print(f"sha {h.hexdigest()}", flush=True)
except OSError as exc:
    print(f"error {exc.errno}", flush=True)
"""


def make_image(work: Path, size: int, name: str = "big.bin") -> tuple[Path, str]:
    """An uncompressed image of one random file of `size` bytes: (image dir, its sha256)."""
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(src / name, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            digest.update(block)
            f.write(block)
            left -= len(block)
    subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(work / "img"),
                    "--compressor", "none"], check=True, capture_output=True, cwd=REPO)
    (src / name).unlink()
    return work / "img", digest.hexdigest()


def fscached_argv(cache: Path, images: list[str], extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    argv = [sys.executable, "-m", "fscached.cli", "--cache-dir", str(cache), "--backend", "fanotify",
            "--work-dir", str(cache.parent / "work")]
    for image in images:
        argv += ["--image", image]
    return argv + list(extra)


def standin(cache: Path, images: list[str], extra: list[str] = (), *,  # type: ignore[assignment]
            watchdog_sec: float | None = 10.0, **kwargs: object) -> SystemdStandin:
    log = cache.parent / f"log-{cache.name}.txt"
    return SystemdStandin(fscached_argv(cache, images, extra), cwd=REPO, log=log, watchdog_sec=watchdog_sec,
                          **kwargs)  # type: ignore[arg-type]


@dataclass
class Reader:
    proc: subprocess.Popen[str]
    progress: list[tuple[float, int]] = field(default_factory=list)
    result: str = ""

    def finish(self, timeout: float = 180) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "p":
                when, done = rest.split()
                self.progress.append((float(when), int(done)))
            elif kind in ("sha", "error"):
                self.result = line
        return self.result

    def first_progress_after(self, moment: float) -> float | None:
        return next((when for when, _ in self.progress if when >= moment), None)

    def bytes_at(self, moment: float) -> int:
        return max((done for when, done in self.progress if when <= moment), default=0)


def start_readers(path: Path, n: int) -> list[Reader]:
    return [Reader(subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE, text=True))
            for _ in range(n)]


def finish_readers(readers: list[Reader], timeout: float = 180) -> list[str]:
    return [r.finish(timeout) for r in readers]


def kill_readers(readers: list[Reader]) -> None:
    for r in readers:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)


@dataclass
class Recovery:
    """How long the readers waited around one kill."""

    killed_at: float
    spawned: float  # the successor's start
    ready: float  # its READY=1
    resumed: float | None  # the first reader progress at or after the successor's start

    @property
    def kill_to_resume(self) -> float | None:
        return None if self.resumed is None else self.resumed - self.killed_at

    @property
    def start_to_resume(self) -> float | None:
        return None if self.resumed is None else self.resumed - self.spawned


def recovery(readers: list[Reader], killed_at: float, successor: Start) -> Recovery:
    assert successor.ready is not None
    firsts = [r.first_progress_after(successor.spawned) for r in readers]
    resumed = min((f for f in firsts if f is not None), default=None)
    return Recovery(killed_at, successor.spawned, successor.ready, resumed)


def cleanup(cache: Path, mountpoints: list[Path]) -> None:
    """After a test or a bench run: no mount, no keeper left."""
    for mountpoint in mountpoints:
        if str(mountpoint) in mounts.erofs_mounts():
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    keeper.dismiss(cache / ".fscached" / "keeper.sock")


# -- figures for bench/failover.py ------------------------------------------------------------------
def measure(work: Path, img: Path, want: str, event: str, n_readers: int = 4) -> dict[str, object]:
    """One event under readers of the cold file through the stand-in: "kill" (kill -9),
    "restart" (`systemctl restart`: SIGTERM, then a new start with the store), "watchdog" (the
    loop stopped: SIGSTOP). Seconds from the event to: the new process (`new_process`), its
    READY=1 (`takeover`: group back, orphans being answered), every reader reading again
    (`moving_first`/`moving_last`), and `since_new` = moving_last from the new process's start."""
    from daemon_proc import drop_caches

    cache = work / f"cache-{event}"
    mnt = work / f"mnt-{event}"
    spec = f"fsid=big,bootstrap={img / 'image.boot'},mountpoint={mnt}"
    sd = standin(cache, [spec], ["--read-window", "64K"],
                 **({"watchdog_sec": 1.5, "abort_timeout": 0.5} if event == "watchdog" else {}))
    readers: list[Reader] = []
    try:
        sd.start()
        first = sd.wait_ready()
        drop_caches()
        readers = start_readers(mnt / "big.bin", n_readers)
        time.sleep(0.5)
        at = time.monotonic()
        if event == "kill":
            sd.kill()
        elif event == "restart":
            sd.restart()
        elif event == "watchdog":
            os.kill(first.pid, 19)  # SIGSTOP: its loop answers nothing any more
        successor = sd.wait_starts(2, timeout=30)
        sd.wait_ready()
        results = finish_readers(readers)
        firsts = [r.first_progress_after(successor.spawned) for r in readers]
        moving = [f - at for f in firsts if f is not None]
        ok = all(res == f"sha {want}" for res in results)
        assert successor.ready is not None
        return {"event": event, "new_process": successor.spawned - at, "takeover": successor.ready - at,
                "moving_first": min(moving) if moving else None, "moving_last": max(moving) if moving else None,
                "since_new": (max(moving) - (successor.spawned - at)) if moving else None, "ok": ok,
                "eio": sum(1 for res in results if res.startswith("error")),
                "note": "" if moving else "readers had finished", "log": "" if ok else sd.log_tail()}
    finally:
        kill_readers(readers)
        sd.close()
        cleanup(cache, [mnt])
