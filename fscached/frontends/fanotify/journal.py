"""A journal of the fanotify events the daemon has taken but not yet answered.

A reader stays blocked on an event the daemon read and never answered (the group lives on in
the keeper). So before working on an event the daemon records its fd number, its file and its
range; a successor reads the records of a dead daemon and answers each orphan by its number,
with the bytes filled. The journal is a table of fixed slots indexed by the event's fd number,
in a MAP_SHARED file: recording is a memory store (no system call on the hot path), and what
was stored survives a kill -9 (it is in the page cache). An fd number belongs to at most one
unanswered event, so a slot is never needed twice.

After the slots, one more field: the fd limit (RLIMIT_NOFILE) of the daemon that opened the
journal last. A kill can land between the read(2) that gave the daemon its events and the
store that journals them; those events are unknown to a successor, which answers every fd
number below that limit the journal does not name (fscached.frontends.fanotify.frontend).

The file's blocks are allocated when it is made (fallocate): a store into a page of a sparse
file on a full disk would kill the daemon with SIGBUS. When they cannot be (a full disk), the
journal lives in memory only, `durable` is False and the daemon says so: a kill -9 then leaves
its unanswered events to the successor's EIO (through the keeper) instead of their bytes.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SLOTS = 1 << 16  # fd numbers below this are journaled (the daemon's own fds are far fewer)
_SLOT = struct.Struct("<IiQQQq")  # state, fd, st_dev, st_ino, offset, count
PENDING = 1
_FD_LIMIT = struct.Struct("<Q")  # after the slots: the fd limit of the daemon that opened it last
_FD_LIMIT_AT = SLOTS * _SLOT.size


@dataclass(frozen=True)
class Orphan:
    fd: int
    dev: int
    ino: int
    offset: int
    count: int


class EventJournal:
    def __init__(self, path: Path, fd_limit: int) -> None:
        """`fd_limit`: this daemon's RLIMIT_NOFILE; the one recorded before is kept in
        `predecessor_fd_limit` (0 when none was: a new journal, or an older daemon's)."""
        size = _FD_LIMIT_AT + _FD_LIMIT.size
        self.path = path
        self.fd_limit = fd_limit
        self.durable = True
        self.error: str | None = None  # why it is not durable
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._in_memory(size, f"{path}: {exc.strerror}")
        else:
            try:
                os.posix_fallocate(fd, 0, size)  # every page backed by a block: no SIGBUS on a full disk
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                self._in_memory(size, f"{path}: {exc.strerror}", fd)
            finally:
                os.close(fd)
        (self.predecessor_fd_limit,) = _FD_LIMIT.unpack_from(self._map, _FD_LIMIT_AT)
        self._stamp_fd_limit()

    def _stamp_fd_limit(self) -> None:
        _FD_LIMIT.pack_into(self._map, _FD_LIMIT_AT, self.fd_limit)

    def _in_memory(self, size: int, why: str, fd: int = -1) -> None:
        self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        self.durable = False
        self.error = why
        if fd >= 0:  # a predecessor's records still count: read what the file holds (holes are zeros)
            try:
                data = os.pread(fd, size, 0)
                self._map[:len(data)] = data
            except OSError:
                pass

    @property
    def buffer(self) -> mmap.mmap:
        """The slots' memory (the fast path in C records and clears slots there too)."""
        return self._map

    def record(self, fd: int, dev: int, ino: int, offset: int, count: int) -> bool:
        if not 0 <= fd < SLOTS:
            return False
        _SLOT.pack_into(self._map, fd * _SLOT.size, PENDING, fd, dev, ino, offset, count)
        return True

    def clear(self, fd: int) -> None:
        if 0 <= fd < SLOTS:
            self._map[fd * _SLOT.size:fd * _SLOT.size + 4] = b"\0\0\0\0"

    def pending(self) -> list[Orphan]:
        """Every recorded, unanswered event (a successor's view of a dead daemon)."""
        found = []
        view = memoryview(self._map)
        for slot in range(SLOTS):
            at = slot * _SLOT.size
            if view[at] == PENDING:
                state, fd, dev, ino, offset, count = _SLOT.unpack_from(self._map, at)
                if state == PENDING and fd == slot:
                    found.append(Orphan(fd, dev, ino, offset, count))
        return found

    def reset(self) -> None:
        self._map[:] = bytes(len(self._map))
        self._stamp_fd_limit()

    def close(self) -> None:
        self._map.close()
