"""A fanotify pre-content group: FAN_PRE_ACCESS marks on cache files, their events, the answers.

Facts this relies on (shared/docs/kernel-fanotify.md, checked on a 6.18 kernel):
- an event's fd is opened by the kernel without notification: writes through it raise no event;
  so does an fd opened before its file was marked;
- an answer is matched by the event fd's NUMBER, so any holder of the group fd can answer an
  event another process read (an unknown number gives ENOENT);
- with no group left, the kernel allows every access: holes read as zeros. The group fd must
  outlive the daemon (fscached.frontends.fanotify.keeper).
"""
from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import native

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_PRE_CONTENT = 0x08
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_PRE_ACCESS = 0x00100000
FAN_Q_OVERFLOW = 0x00004000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_ERRNO_SHIFT = 24
FAN_NOFD = -1
FAN_EVENT_INFO_TYPE_RANGE = 6
METADATA_VERSION = 3

_METADATA = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("<BBH")
_RANGE = struct.Struct("<4xQQ")  # after the info header: pad, offset, count
_RESPONSE = struct.Struct("<iI")
READ_BUFFER = 64 * 1024

NEEDS = ("fanotify pre-content events need Linux 6.14+ built with CONFIG_FANOTIFY=y and "
         "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y, CAP_SYS_ADMIN, and a cache dir on ext4, xfs or btrfs")


# the C fast path of a group (native/fanotify_fast.c): filled ranges answered without Python
FastPath = native.FanFastPath
FastEvent = native.FanEvent
FastStats = native.FanStats


class FanotifyError(Exception):
    """A fanotify failure worded for the user."""


@dataclass(slots=True)
class Event:
    fd: int  # opened by the kernel for this event; the answer names it; close it after
    mask: int
    pid: int
    offset: int
    count: int  # -1: no range given (the whole file)


def deny_errno(err: int = errno.EIO) -> int:
    """FAN_DENY_ERRNO(err): the reader's read fails with err (EIO by default)."""
    return FAN_DENY | ((err & 0xFF) << FAN_ERRNO_SHIFT)


def parse_events(buf: bytes) -> list[Event]:
    events: list[Event] = []
    pos = 0
    while pos + _METADATA.size <= len(buf):
        event_len, vers, _, metadata_len, mask, fd, pid = _METADATA.unpack_from(buf, pos)
        if vers != METADATA_VERSION or event_len < _METADATA.size or pos + event_len > len(buf):
            raise FanotifyError(f"malformed fanotify event at byte {pos} (version {vers}, length {event_len})")
        offset, count = 0, -1
        info = pos + metadata_len
        while info + _INFO_HEADER.size <= pos + event_len:
            info_type, _, info_len = _INFO_HEADER.unpack_from(buf, info)
            if info_len < _INFO_HEADER.size:
                break
            if info_type == FAN_EVENT_INFO_TYPE_RANGE and info_len >= _INFO_HEADER.size + _RANGE.size:
                offset, count = _RANGE.unpack_from(buf, info + _INFO_HEADER.size)
            info += info_len
        events.append(Event(fd, mask, pid, offset, count))
        pos += event_len
    return events


class Group:
    """One pre-content group fd (owned: close() closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> Group:
        try:
            fd = native.fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK,
                                      os.O_RDWR | os.O_LARGEFILE)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise FanotifyError("fanotify_init: permission denied (CAP_SYS_ADMIN needed)") from None
            raise FanotifyError(f"fanotify_init: {os.strerror(exc.errno or 0)}: {NEEDS}") from None
        return cls(fd)

    @classmethod
    def adopt(cls, fd: int) -> Group:
        """A group fd handed over by a keeper or systemd: made non-blocking, close-on-exec."""
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return cls(fd)

    def fileno(self) -> int:
        return self.fd

    def mark(self, path: str | os.PathLike[str]) -> None:
        try:
            native.fanotify_mark(self.fd, FAN_MARK_ADD, FAN_PRE_ACCESS, path)
        except OSError as exc:
            raise FanotifyError(f"cannot watch {os.fspath(path)} for pre-content events: "
                                f"{os.strerror(exc.errno or 0)} ({NEEDS})") from None

    def unmark(self, path: str | os.PathLike[str]) -> None:
        native.fanotify_mark(self.fd, FAN_MARK_REMOVE, FAN_PRE_ACCESS, path)

    def read_events(self) -> list[Event]:
        """Every event the kernel has queued for one read(2); [] when none."""
        try:
            buf = os.read(self.fd, READ_BUFFER)
        except BlockingIOError:
            return []
        return parse_events(buf)

    def answer(self, event_fd: int, response: int) -> bool:
        """Answer an event by its fd number; False when the kernel knows no such event
        (ENOENT: already answered, e.g. an orphan resolved twice)."""
        try:
            os.write(self.fd, _RESPONSE.pack(event_fd, response))
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    def answer_any(self, numbers: Iterable[int], response: int) -> list[int]:
        """Answer, by number, whatever event each of `numbers` names: for events read by a
        process that died before it said which it had (their numbers unknown); the numbers the
        kernel knew. A number of an event someone still works on must not be among them."""
        answered = []
        for number in numbers:
            if self.answer(number, response):
                answered.append(number)
        return answered

    def fast_path(self, journal: object, journal_slots: int, buckets: tuple[float, ...]) -> FastPath:
        """A C thread that answers the events of ranges already filled and queues the rest
        (see native/fanotify_fast.c); `journal`: the event journal's writable buffer."""
        return FastPath(self.fd, journal, journal_slots, buckets)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def probe(directory: Path) -> str | None:
    """None when pre-content marks work here (the kernel and `directory`'s filesystem), else
    why not, in one line."""
    try:
        group = Group.create()
    except FanotifyError as exc:
        return str(exc)
    try:
        if native.fs_type(directory) == 0x01021994:
            return f"{directory} is on tmpfs, which refuses pre-content marks: use ext4, xfs or btrfs"
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fanotify-probe-") as f:
            try:
                native.fanotify_mark(group.fd, FAN_MARK_ADD, FAN_PRE_ACCESS, f.name)
            except OSError as exc:
                return f"FAN_PRE_ACCESS marks fail in {directory}: {os.strerror(exc.errno or 0)}: {NEEDS}"
        return None
    finally:
        group.close()
