"""Object table: object_id -> the anon fd and keys the kernel gave in its OPEN.

object_ids come from the kernel message and are treated as untrusted numbers: they are
only ever dictionary keys, never part of a path or a log format string.

Each entry owns one anon fd and closes it exactly once.  A worker that writes into the
fd holds the entry with `table.use(object_id)`; a CLOSE arriving meanwhile removes the
entry at once but the fd is closed only when the last user lets go, so the fd number
cannot be reused under a running pwrite (which would write into someone else's file).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fscached.util.shared_fd import SharedFd

U32_MAX = 0xFFFFFFFF


class DuplicateObject(ValueError):
    """The kernel sent an OPEN for an object_id we still hold (ids are only reused after
    their anon fd was released, so this is a bookkeeping error)."""


@dataclass(eq=False)
class ObjectEntry:
    object_id: int
    anon_fd: int
    volume_key: str
    cookie_key: bytes
    size: int
    payload: object = None
    removed: bool = False
    fd: SharedFd = field(init=False, repr=False)  # the anon fd, closed after its last user

    def __post_init__(self) -> None:
        self.fd = SharedFd(self.anon_fd)


def _check_id(object_id: int) -> int:
    if type(object_id) is not int or not 0 <= object_id <= U32_MAX:
        raise ValueError(f"object_id {object_id!r} is not a u32")
    return object_id


class ObjectTable:
    def __init__(self) -> None:
        self._entries: dict[int, ObjectEntry] = {}
        self._lock = threading.Lock()

    def add(self, object_id: int, anon_fd: int, volume_key: str, cookie_key: bytes, size: int,
            payload: object = None) -> ObjectEntry:
        """Take ownership of `anon_fd`.  Raises DuplicateObject (fd NOT taken) if the id is in use."""
        _check_id(object_id)
        with self._lock:
            if object_id in self._entries:
                raise DuplicateObject(f"object_id {object_id} is already open")
            entry = ObjectEntry(object_id, anon_fd, volume_key, cookie_key, size, payload)
            self._entries[object_id] = entry
            return entry

    def get(self, object_id: int) -> ObjectEntry | None:
        with self._lock:
            return self._entries.get(object_id)

    @contextmanager
    def use(self, object_id: int) -> Iterator[ObjectEntry | None]:
        """Hold an entry (its fd stays open) for the duration of the block; None if unknown."""
        with self._lock:
            entry = self._entries.get(object_id)
        if entry is None:
            yield None
            return
        with entry.fd.hold() as alive:
            yield entry if alive else None

    @contextmanager
    def hold(self, entry: ObjectEntry) -> Iterator[bool]:
        """Hold a known entry (not an id: the kernel reuses ids) so its fd stays open for the
        block; yields False when the entry was already removed."""
        with entry.fd.hold() as alive:
            yield alive

    def remove(self, object_id: int) -> ObjectEntry | None:
        """Forget the object; its fd is closed now, or when the last `use` ends."""
        with self._lock:
            entry = self._entries.pop(object_id, None)
            if entry is None:
                return None
            entry.removed = True
        entry.fd.close()
        return entry

    def close_all(self) -> None:
        with self._lock:
            ids = list(self._entries)
        for object_id in ids:
            self.remove(object_id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._entries

    def entries(self) -> list[ObjectEntry]:
        with self._lock:
            return list(self._entries.values())
