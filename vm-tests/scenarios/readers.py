"""Readers for the failover scenarios (systemd_failover.py, systemd_real.py): threads that each
stream a cold file of a mounted image while the daemon under them is killed, restarted or
replaced, checking every byte and timing every read.

    readers = start_readers(mnt / "kill.bin", 4)     # each from its own quarter, wrapping around
    wait_into(readers, 0.1)                          # every one 10 % into the file
    ... the event ...
    for r in readers: r.join()
    r.digest, r.error, r.done, r.times

A reader reads its file from `start` to the end, then from 0 to `start`, in 1 MiB preads, and
hashes in that order (the host knows what each must get); a failed read ends it with `error`
("<errno>: <message>"), never holes.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

BLOCK = 1 << 20


class Reader(threading.Thread):
    """Streams one file from `start` to its end, then from 0 to `start`, hashing in that order
    and timing every read (`times`: time.monotonic() after each)."""

    def __init__(self, path: Path, start: int, size: int, name: str | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.path, self.start_at, self.size = path, start, size
        self.times: list[float] = []
        self.done = 0  # bytes read
        self.digest: str | None = None
        self.error: str | None = None

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
                        self.done += len(data)
                        self.times.append(time.monotonic())
            finally:
                os.close(fd)
            self.digest = h.hexdigest()
        except OSError as exc:
            self.error = f"{exc.errno}: {exc}"


def start_readers(path: Path, count: int) -> list[Reader]:
    """`count` readers of `path`, reader i starting at i quarters (1 MiB aligned) in."""
    size = path.stat().st_size
    quarter = size // count // BLOCK * BLOCK
    readers = [Reader(path, i * quarter, size, f"reader-{i}") for i in range(count)]
    for reader in readers:
        reader.start()
    return readers


def wait_into(readers: list[Reader], fraction: float, timeout: float = 1200) -> None:
    """Until every reader has read `fraction` of its file (or finished, or failed)."""
    deadline = time.monotonic() + timeout
    while any(r.is_alive() and r.done < fraction * r.size for r in readers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"readers stuck: {[r.done for r in readers]}")
        time.sleep(0.05)
