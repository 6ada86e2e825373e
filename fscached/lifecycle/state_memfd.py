"""The hand-over state in a memfd: what the keeper and systemd's fd store carry as the fd
named "state" (fscached.lifecycle.fdnames), rewritten in place at every bind and unbind.
"""
from __future__ import annotations

import os
import struct
import zlib

# -------------------------------------------------------------------------
# Header (page 0): magic, seq, active slot, slot capacity, then per slot (length, crc32).
# The bytes are written into the inactive slot first, then the header points at it: a daemon
# killed in the middle leaves the previous state readable.
_MAGIC = b"FSCSTAT1"
_HEADER = struct.Struct("<8sQIIQIQI")
_PAGE = 4096


class StateMemfd:
    def __init__(self, capacity: int = 64 << 10) -> None:
        self.capacity = capacity
        self.fd = os.memfd_create("fscached-state", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _PAGE + 2 * capacity)
        self.seq = 0
        self.active = 1
        self.slots = [(0, 0), (0, 0)]

    def write(self, data: bytes) -> None:
        if len(data) > self.capacity:
            raise ValueError("state larger than the memfd's slots")
        slot = 1 - self.active
        os.pwrite(self.fd, data, _PAGE + slot * self.capacity)
        self.slots[slot] = (len(data), zlib.crc32(data))
        self.seq += 1
        self.active = slot
        (l0, c0), (l1, c1) = self.slots
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, self.seq, slot, self.capacity, l0, c0, l1, c1), 0)

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def read(fd: int) -> tuple[int, bytes] | None:
        """(seq, bytes) of the newest valid slot of a state memfd; None when there is none."""
        try:
            head = os.pread(fd, _HEADER.size, 0)
            magic, seq, active, capacity, l0, c0, l1, c1 = _HEADER.unpack(head)
        except (OSError, struct.error):
            return None
        if magic != _MAGIC or active > 1:
            return None
        slots = [(l0, c0), (l1, c1)]
        for slot in (active, 1 - active):  # the active one, else the one before it
            length, crc = slots[slot]
            if not 0 < length <= capacity:
                continue
            data = os.pread(fd, length, _PAGE + slot * capacity)
            if len(data) == length and zlib.crc32(data) == crc:
                return (seq if slot == active else seq - 1), data
        return None

    @classmethod
    def adopt(cls, fd: int) -> StateMemfd | None:
        """A memfd a predecessor wrote (taken back from a carrier), to go on writing into in
        place; None (fd untouched) when it holds no readable state."""
        try:
            magic, seq, active, capacity, l0, c0, l1, c1 = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        except (OSError, struct.error):
            return None
        if magic != _MAGIC or active > 1 or StateMemfd.read(fd) is None:
            return None
        memfd = cls.__new__(cls)
        memfd.fd, memfd.capacity, memfd.seq, memfd.active = fd, capacity, seq, active
        memfd.slots = [(l0, c0), (l1, c1)]
        return memfd

    def holds(self, data: bytes) -> bool:
        return len(data) <= self.capacity


def newest(fds: list[int]) -> tuple[bytes, int] | None:
    """Among several state memfds (a store may hold an older one beside the newest), the newest
    readable state and its fd; the others are closed."""
    best: tuple[int, bytes, int] | None = None
    for fd in fds:
        got = StateMemfd.read(fd)
        if got is not None and (best is None or got[0] > best[0]):
            best = (got[0], got[1], fd)
    for fd in fds:
        if best is None or fd != best[2]:
            os.close(fd)
    return (best[1], best[2]) if best is not None else None
