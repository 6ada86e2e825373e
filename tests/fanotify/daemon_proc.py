"""Test helpers: the real `fscached` command on the host kernel's fanotify path.

`FscachedProcess` starts the daemon as a user would (a subprocess of the real CLI), waits for its
ready file, reads its counters (SIGUSR1 + the stats file), stops it (SIGTERM) or kills it (-9),
and cleans up whatever a failed test leaves behind: mounts (lazily unmounted) and keepers.
Cache dirs live on /var/tmp: pre-content marks need ext4/xfs/btrfs, not tmpfs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from fscached.frontends.fanotify import keeper

from fscached.util import mounts

REPO = Path(__file__).resolve().parents[2]
WORK_ROOT = Path("/var/tmp")


def drop_caches() -> None:
    """Page cache out: the next read of a mount or a blob file goes to the filesystem."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class FscachedProcess:
    def __init__(self, cache_dir: Path, images: list[str], *, backend: str = "fanotify",
                 extra: list[str] | None = None, log: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self.ready = cache_dir.parent / f"ready-{cache_dir.name}"
        self.stats_file = cache_dir.parent / f"stats-{cache_dir.name}.json"
        self.log = log or cache_dir.parent / f"log-{cache_dir.name}.txt"
        self.args = [sys.executable, "-m", "fscached.cli", "--cache-dir", str(cache_dir),
                     "--backend", backend, "--ready-file", str(self.ready),
                     "--stats-file", str(self.stats_file), "--work-dir", str(cache_dir.parent / "work")]
        for image in images:
            self.args += ["--image", image]
        self.args += extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> FscachedProcess:
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"fscached exited {self.proc.returncode} before it was ready:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fscached not ready within {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def counters(self) -> dict[str, int]:
        assert self.proc is not None and self.proc.poll() is None
        before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.stats_file.read_text())
                except ValueError:
                    pass  # caught mid-rename
            time.sleep(0.02)
        raise AssertionError("no stats file after SIGUSR1")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; the exit code. The final counters are in `final_counters()`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code

    def final_counters(self) -> dict[str, int]:
        return json.loads(self.stats_file.read_text())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def cleanup(self, mountpoints: Sequence[Path] = ()) -> None:
        """After a test, pass or fail: no daemon, no mount, no keeper left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for mountpoint in mountpoints:
            if str(mountpoint) in mounts.erofs_mounts():
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        keeper.dismiss(self.cache_dir / ".fscached" / "keeper.sock")
