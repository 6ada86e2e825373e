"""A journal of the fanotify events the daemon has taken but not yet answered.

A reader stays blocked on an event the daemon read and never answered (the group lives on in
the keeper). So before working on an event the daemon records its fd number, its file and its
range; a successor reads the records of a dead daemon and answers each orphan by its number,
with the bytes filled. The journal is a table of fixed slots indexed by the event's fd number,
in a MAP_SHARED file: recording is a memory store (no system call on the hot path), and what
was stored survives a kill -9 (it is in the page cache). An fd number belongs to at most one
unanswered event, so a slot is never needed twice.
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


@dataclass(frozen=True)
class Orphan:
    fd: int
    dev: int
    ino: int
    offset: int
    count: int


class EventJournal:
    def __init__(self, path: Path) -> None:
        size = SLOTS * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: only touched slots take space
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path

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

    def close(self) -> None:
        self._map.close()
