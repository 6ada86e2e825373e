"""Writing a file so that a reader sees the old content or the new one, never a part.

`write_atomic` writes a temporary file beside the target and renames it into place. When that
fails (a full disk, a read-only directory) nothing is left behind (no empty `.tmp`), and the
error names the file and the reason in one line: `FileWriteError` (an OSError).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


class FileWriteError(OSError):
    """A file could not be written: its path and why, in one line."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600, fsync: bool = False) -> None:
    """Replace `path` with `data` atomically (FileWriteError when it cannot)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        view = memoryview(raw)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FileWriteError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path)) from None


def check_writable(path: Path, what: str) -> None:
    """Before anything is mounted: `path` can be created or replaced (its directory exists and
    is writable, and `path` is not a directory). FileWriteError naming `what` otherwise."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise FileWriteError(errno.EISDIR, f"{what} {path} is a directory", str(path))
    if not parent.is_dir():
        raise FileWriteError(errno.ENOENT, f"{what}: directory {parent} does not exist", str(path))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileWriteError(errno.EACCES, f"{what}: directory {parent} is not writable", str(path))
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise FileWriteError(errno.EACCES, f"{what} {path} is not writable", str(path))


def describe_os_error(exc: OSError) -> str:
    """One line naming the file and why: "PATH: No space left on device" (never ": reason")."""
    if isinstance(exc, FileWriteError):
        return str(exc)
    reason = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else None
    if where is None:
        return reason
    if exc.filename2 is not None:
        return f"{where} -> {exc.filename2}: {reason}"
    return f"{where}: {reason}"
