"""Is a file open anywhere else? A write lease answers it (fcntl F_SETLEASE, F_WRLCK).

The kernel grants a write lease on an fd only when no other open file description of the inode
exists: no other writer (i_writecount is the asker's own, 1 for an O_RDWR fd, shared by its
dups and by copies passed with SCM_RIGHTS) and no reader (i_readcount 0). A file-backed EROFS
superblock holds its `device=` files open read-only for as long as it lives: mounted, or
detached (`umount -l`) while a file of it is still open, in any mount namespace. So a lease
refused on a cache file means "something still reads it", and granted means "nothing but us".
Checked on Linux 6.18: mounted, detached with an open reader, another O_RDONLY or O_RDWR open:
refused; after the last of them is closed: granted.

The lease is held only for the moment of the question (or of a cull's rename). An open(2) by
someone else in that moment waits for it and "breaks" the lease: the kernel then signals the
holder, with SIGIO unless told otherwise, and SIGIO's default action ends the process. Every
lease here asks for SIGURG instead (F_SETSIG), which is ignored by default: a probe racing a
mount never kills the daemon or the keeper.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
BREAK_SIGNAL = signal.SIGURG  # default action: ignore


class LeasesUnsupported(OSError):
    """The filesystem (or the fd) takes no lease: nothing can be told by one."""


@contextmanager
def exclusive_lease(fd: int) -> Iterator[bool]:
    """Hold a write lease on `fd` for the block: yields True when it was granted (nobody else
    has the file open), False when refused. LeasesUnsupported when none can be taken here."""
    try:
        fcntl.fcntl(fd, F_SETSIG, BREAK_SIGNAL)  # a break must not send SIGIO (it would end us)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            yield False
            return
        raise LeasesUnsupported(exc.errno, exc.strerror) from None
    try:
        yield True
    finally:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def held_elsewhere(fd: int) -> bool:
    """Whether the file behind `fd` (ours: O_RDWR, or O_RDONLY when we hold no writer) is open
    by anyone else. Filesystems without leases answer as if it were (the safe side)."""
    try:
        with exclusive_lease(fd) as granted:
            return not granted
    except LeasesUnsupported:
        return True  # cannot tell: assume in use


def path_held_elsewhere(path: str | os.PathLike[str], *, write: bool = False) -> bool | None:
    """The same for a path we hold no fd of (open it O_RDONLY, or O_RDWR when `write`: use the
    mode that is not open elsewhere by us). None when the file is gone."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except BlockingIOError:  # someone else holds a lease on it: in use
        return True
    try:
        return held_elsewhere(fd)
    finally:
        os.close(fd)
