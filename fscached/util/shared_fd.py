"""An fd written by worker threads, closed only after the last holder lets go.

Whoever owns the fd calls close() when it is done with it (a CLOSE from the kernel, an unbind,
a stop); a worker in the middle of a pwrite holds it (`with shared.hold() as alive:`) and the
fd is closed when that worker lets go. So an fd number is never reused under a running write:
a late write can never land in someone else's file.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedFd:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._users = 0
        self._closing = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closing(self) -> bool:
        return self._closing

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """Keep the fd open for the block; yields False when it is already closing."""
        with self._lock:
            alive = not self._closing
            if alive:
                self._users += 1
        try:
            yield alive
        finally:
            if alive:
                with self._lock:
                    self._users -= 1
                    close_now = self._closing and self._users == 0
                if close_now:
                    self._close_fd()

    def close(self) -> None:
        """The owner is done: close now, or when the last holder lets go."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            close_now = self._users == 0
        if close_now:
            self._close_fd()

    def _close_fd(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass  # EBADF would mean someone else closed it: nothing more to do
