"""/dev/cachefiles: open, configure, bind in on-demand mode, read requests, answer them.

Kernel-exact: every command is one write(2) of text; every read(2) returns one message
or 0 bytes when nothing can be taken.  See docs/kernel-ondemand.md (shared docs).

READ completion goes to an anon fd, not to the device: `complete_read` calls a
`completer(anon_fd, msg_id)` which is the native ioctl by default; the tests' kernel simulator
(tests/standins/kernel_simulator.py, not shipped) passes its own.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from cachefiles.messages import (
    CACHEFILES_MSG_MAX_SIZE,
    OP_OPEN,
    MalformedMessage,
    OpenRequest,
    Request,
    parse_message,
)

TMPFS_MAGIC = 0x01021994
DEFAULT_PATH = "/dev/cachefiles"
READ_BUFFER_SIZE = max(4096, CACHEFILES_MSG_MAX_SIZE)
NO_RESTORE = ("this kernel has no cachefiles failover: `restore` answers EOPNOTSUPP (it needs Linux 6.8+, "
              "or 6.1.95+ on 6.1; 5.19-6.7 and 6.1.0-6.1.94 lack it)")
_NEEDS_ONDEMAND = ("the kernel lacks on-demand cachefiles: it needs CONFIG_CACHEFILES_ONDEMAND=y "
                   "and CONFIG_EROFS_FS_ONDEMAND=y")

Completer = Callable[[int, int], None]
T = TypeVar("T")
log = logging.getLogger("cachefiles")
# The kernel's defaults (cachefiles_daemon_open): cull below 5 % free, stop culling above 7 %,
# refuse to allocate below 1 % (blocks and files alike).
DEFAULT_SPACE_LIMITS = (7, 5, 1)
CLONE_FS = 0x00000200


class CachefilesError(Exception):
    """A cachefiles failure with a one-line message a user can act on (errno if known)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _native_completer(anon_fd: int, msg_id: int) -> None:
    import native  # imported here so message/simulator users need no compiled extension

    native.read_complete(anon_fd, msg_id)


def _err_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _check_arg(what: str, value: str) -> str:
    """Arguments go into a one-line text command: refuse what the kernel would cut or split."""
    if not value or "\n" in value or "\0" in value or value[0].isspace():
        raise CachefilesError(f"invalid {what} {value!r}: must be non-empty, one line, no NUL, "
                              "no leading space")
    return value


class CachefilesDevice:
    def __init__(self, path: str = DEFAULT_PATH, *, completer: Completer | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        self._completer: Completer = completer or _native_completer
        # cachefiles failover (`restore`) on this kernel: None until probe_restore() ran
        self.restore_supported: bool | None = None

    @classmethod
    def from_fd(cls, fd: int, *, path: str = DEFAULT_PATH,
                completer: Completer | None = None) -> CachefilesDevice:
        """Adopt an already open device fd (failover hand-over, or the simulator's end).
        The device then owns `fd` and closes it in close()."""
        dev = cls(path, completer=completer)
        dev._fd = fd
        return dev

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> None:
        if self._fd is not None:
            raise CachefilesError(f"{self.path} is already open")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise CachefilesError(
                    f"another daemon (fscached, nydusd or cachefilesd) holds {self.path}, or an "
                    "anon fd of a previous daemon is still open", e.errno) from None
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise CachefilesError(
                    f"no {self.path}: load the cachefiles module (modprobe cachefiles) / kernel "
                    "lacks CONFIG_CACHEFILES", e.errno) from None
            if e.errno in (errno.EPERM, errno.EACCES):
                raise CachefilesError(f"opening {self.path} needs root (CAP_SYS_ADMIN)",
                                      e.errno) from None
            raise CachefilesError(f"cannot open {self.path}: {e.strerror}", e.errno) from None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise CachefilesError(f"{self.path} is not open")
        return self._fd

    def close(self) -> None:
        """Close the device fd.  Beware: when the last copy closes, the kernel fails every
        pending request with EIO and the mounts die."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> CachefilesDevice:
        if self._fd is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------
    def _command(self, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        fd = self.fileno()
        while True:
            try:
                n = os.write(fd, data)
                break
            except BlockingIOError:  # only a non-blocking stand-in does this; the kernel never
                select.select([], [fd], [], 1.0)
        if n != len(data):
            raise CachefilesError(f"short write of command {text!r} ({n} of {len(data)} bytes)")

    def _command_or_raise(self, text: str, explain: Callable[[OSError], str | None]) -> None:
        try:
            self._command(text)
        except OSError as e:
            msg = explain(e) or f"{e.strerror} ({_err_name(e.errno or 0)})"
            raise CachefilesError(f"`{text}` failed: {msg}", e.errno) from None

    def bind(self, cache_dir: str | os.PathLike[str], tag: str | None = None, *,
             block_limits: tuple[int | None, int | None, int | None] | None = None) -> None:
        """Check the cache dir, then send `dir`, `tag`, the free-space limits for blocks
        (`brun`/`bcull`/`bstop` percentages; None keeps the kernel's default) and `bind ondemand`."""
        path = os.path.abspath(os.fspath(cache_dir))
        check_cache_dir(path)
        _check_arg("cache dir", path)
        self._command_or_raise(f"dir {path}", lambda e: (
            "this device fd was already given a cache dir" if e.errno == errno.EEXIST else None))
        if tag is not None:
            if any(c.isspace() for c in tag):
                raise CachefilesError(f"invalid cache tag {tag!r}: no spaces allowed")
            self._command_or_raise(f"tag {_check_arg('tag', tag)}", lambda e: None)
        if block_limits is not None and any(v is not None for v in block_limits):
            self.set_space_limits("b", *block_limits)

        def explain_bind(e: OSError) -> str | None:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return (f"{_NEEDS_ONDEMAND} (or the cache dir's filesystem lacks tmpfile, xattr or "
                        "sync_fs support: see dmesg)")
            if e.errno == errno.EBUSY:
                return "the cache is already bound on this device fd"
            if e.errno == errno.ENOMEM:
                return "out of memory"
            return None

        self._command_or_raise("bind ondemand", explain_bind)

    def copen(self, msg_id: int, size: int) -> None:
        """Answer an OPEN: size >= 0 is the object's data size, a negative value is -errno."""
        if size < -4095:
            raise ValueError(f"copen size {size}: a negative value must be -errno (>= -4095)")
        self._command_or_raise(f"copen {msg_id},{size}", lambda e: (
            f"no pending OPEN with msg_id {msg_id}" if e.errno == errno.EINVAL else None))

    def restore(self) -> None:
        """Re-queue the requests a previous holder of this device fd had taken (every pending
        request is marked new: one this daemon is serving may come again)."""
        try:
            self._command_or_raise("restore", lambda e: (
                NO_RESTORE if e.errno == errno.EOPNOTSUPP else None))
        except CachefilesError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                self.restore_supported = False
            raise
        self.restore_supported = True

    def probe_restore(self) -> bool:
        """Whether the kernel has cachefiles failover (`restore`): True on 6.8+ and 6.1.95+,
        False where `restore` answers EOPNOTSUPP (5.19-6.7, 6.1 before 6.1.95). Call it after
        `bind`: before it even a kernel with failover refuses `restore`. Harmless at start (no
        request is pending); later it re-sends the READs in flight, which a daemon must then
        ignore as duplicates. The result is kept in `restore_supported`."""
        try:
            self._command("restore")
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                self.restore_supported = False
                return False
            raise CachefilesError(f"`restore` failed: {e.strerror} ({_err_name(e.errno or 0)})", e.errno) from None
        self.restore_supported = True
        return True

    # -- free-space limits -----------------------------------------------------------
    def space_limit(self, command: str, percent: int) -> None:
        """One of `brun`/`bcull`/`bstop` (blocks) or `frun`/`fcull`/`fstop` (files): N % of the
        cache filesystem free. The kernel checks each against the others' CURRENT values
        (0 <= stop < cull < run < 100): `set_space_limits` sends them in an order that works."""
        if command not in ("brun", "bcull", "bstop", "frun", "fcull", "fstop"):
            raise ValueError(f"{command!r} is not a cachefiles free-space limit")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent < 100:
            raise ValueError(f"{command} must be a whole percentage 0-99, not {percent!r}")
        self._command_or_raise(f"{command} {percent}%", lambda e: (
            "the kernel wants 0% <= stop < cull < run < 100%" if e.errno == errno.EINVAL else None))

    def set_space_limits(self, kind: str, run: int | None, cull: int | None, stop: int | None) -> None:
        """Set run/cull/stop for blocks (`kind` "b") or files ("f"); None keeps the kernel's
        default (7/5/1). Before `bind`: the kernel checks the three at bind time too."""
        if kind not in ("b", "f"):
            raise ValueError(f"kind must be 'b' (blocks) or 'f' (files), not {kind!r}")
        want = [d if v is None else v for v, d in zip((run, cull, stop), DEFAULT_SPACE_LIMITS)]
        if not 0 <= want[2] < want[1] < want[0] < 100:
            raise CachefilesError(f"{kind}run/{kind}cull/{kind}stop {want[0]}/{want[1]}/{want[2]}%: the kernel "
                                  f"wants 0 <= {kind}stop < {kind}cull < {kind}run < 100", errno.EINVAL)
        # from the defaults (7/5/1), whatever the target: run up to 99, stop down to 0, then
        # cull, stop and run at their values; each step is valid against the current others
        self.space_limit(f"{kind}run", 99)
        self.space_limit(f"{kind}stop", 0)
        self.space_limit(f"{kind}cull", want[1])
        self.space_limit(f"{kind}stop", want[2])
        self.space_limit(f"{kind}run", want[0])

    # -- culling -------------------------------------------------------------------------
    def inuse_in(self, directory: str | os.PathLike[str], name: str) -> bool:
        """`inuse name` resolved in `directory` (see in_directory): True while the kernel uses it.
        CachefilesError with errno ENOENT when there is no such file."""
        return in_directory(directory, lambda: self.inuse(name))

    def cull_in(self, directory: str | os.PathLike[str], name: str) -> None:
        """`cull name` in `directory`: the kernel unlinks the file (a directory goes to the
        graveyard). CachefilesError with errno EBUSY while in use, ENOENT/ESTALE when gone."""
        in_directory(directory, lambda: self.cull(name))

    def inuse(self, name: str) -> bool:
        """Whether cache file `name` (in the CURRENT WORKING DIRECTORY) is in use."""
        _check_name(name)
        try:
            self._command(f"inuse {name}")
        except OSError as e:
            if e.errno == errno.EBUSY:
                return True
            raise CachefilesError(f"`inuse {name}` in {os.getcwd()} failed: {e.strerror}",
                                  e.errno) from None
        return False

    def cull(self, name: str) -> None:
        """Remove cache file `name` from the CURRENT WORKING DIRECTORY (chdir there first)."""
        _check_name(name)
        self._command_or_raise(f"cull {name}", lambda e: (
            f"{name} is in use" if e.errno == errno.EBUSY else
            f"no {name} in {os.getcwd()} (cull works relative to the working directory)"
            if e.errno == errno.ENOENT else None))

    # -- requests ------------------------------------------------------------------
    def read_message(self) -> Request | None:
        """Take one request; None when there is nothing to take (0-byte read or EAGAIN).

        Raises MalformedMessage for a message that breaks the format (see
        `reject_malformed`).  The anon fd of an OPEN is made close-on-exec here.
        """
        try:
            buf = os.read(self.fileno(), READ_BUFFER_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO:
                raise CachefilesError("the cache is dead (unbound or withdrawn): restart the "
                                      "daemon", e.errno) from None
            raise CachefilesError(f"reading {self.path} failed: {e.strerror}", e.errno) from None
        if not buf:
            return None
        try:
            req = parse_message(buf)
        except MalformedMessage as e:
            if e.opcode == OP_OPEN and e.fd is not None:
                _set_cloexec(e.fd)
            raise
        if isinstance(req, OpenRequest):
            _set_cloexec(req.fd)
        return req

    def reject_malformed(self, exc: MalformedMessage) -> bool:
        """Answer a malformed OPEN with copen -EINVAL and close its anon fd.  Returns False
        for anything else (a READ must be completed on an anon fd of its object)."""
        if exc.opcode != OP_OPEN or exc.msg_id is None:
            return False
        if exc.fd is not None and exc.fd > 2 and exc.fd != self._fd:
            try:
                os.close(exc.fd)
            except OSError:
                pass
        self.copen(exc.msg_id, -errno.EINVAL)
        return True

    def complete_read(self, anon_fd: int, msg_id: int) -> None:
        """READ_COMPLETE for msg_id on an anon fd of the same object (also after a failed
        fetch: the reader then gets EIO instead of hanging)."""
        try:
            self._completer(anon_fd, msg_id)
        except OSError as e:
            hint = (" (unknown msg_id, or an anon fd of another object)"
                    if e.errno == errno.EINVAL else "")
            raise CachefilesError(f"READ_COMPLETE for msg {msg_id} on fd {anon_fd} failed: "
                                  f"{os.strerror(e.errno or 0)}{hint}", e.errno) from None


class _DirectoryThread:
    """One thread whose working directory is its own: `inuse`/`cull` resolve their name in the
    writer's working directory, and a chdir there must not move the rest of the daemon (relative
    paths of other threads, the event loop). The thread calls unshare(CLONE_FS) when it starts;
    where that fails it falls back to chdir and back again, under a lock."""

    def __init__(self) -> None:
        self.private = False
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cachefiles-cwd", initializer=self._start)

    def _start(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_FS) == 0:
                self.private = True
                return
            err = ctypes.get_errno()
            log.warning("unshare(CLONE_FS) failed (%s): cull commands chdir and back under a lock",
                        os.strerror(err))
        except (OSError, AttributeError) as exc:
            log.warning("no unshare(CLONE_FS) (%s): cull commands chdir and back under a lock", exc)

    def run(self, directory: str | os.PathLike[str], fn: Callable[[], T]) -> T:
        return self._executor.submit(self._in, os.fspath(directory), fn).result()

    def _in(self, directory: str, fn: Callable[[], T]) -> T:
        # O_NOFOLLOW: the last component is never a symlink planted in the cache
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if self.private:
                os.fchdir(fd)
                return fn()
            with self._lock:
                back = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fchdir(fd)
                    return fn()
                finally:
                    os.fchdir(back)
                    os.close(back)
        finally:
            os.close(fd)


_directory_thread: _DirectoryThread | None = None
_directory_thread_lock = threading.Lock()


def in_directory(directory: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """Run `fn` (blocking) with `directory` as the working directory of the thread that runs
    it, without changing the working directory of the rest of the process."""
    global _directory_thread
    with _directory_thread_lock:
        if _directory_thread is None:
            _directory_thread = _DirectoryThread()
        worker = _directory_thread
    return worker.run(directory, fn)


def _set_cloexec(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError:
        pass  # not an fd of ours: the write into it will report the error


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or any(c.isspace() or c == "\0" for c in name):
        raise CachefilesError(f"invalid cache file name {name!r}: one path component, no spaces")


def check_cache_dir(path: str) -> None:
    """Refuse, with a clear message, a cache dir cachefiles cannot use (missing, read-only,
    not writable, tmpfs). `bind` calls it; a daemon may call it before taking the device."""
    p = Path(path)
    if not p.is_dir():
        raise CachefilesError(f"cache dir {path} does not exist: create it on an ext4, xfs or "
                              "btrfs filesystem", errno.ENOENT)
    st = os.statvfs(path)
    if st.f_flag & os.ST_RDONLY:
        raise CachefilesError(f"cache dir {path} is on a read-only filesystem", errno.EROFS)
    if not os.access(path, os.W_OK | os.X_OK):
        raise CachefilesError(f"cache dir {path} is not writable by this user", errno.EACCES)
    try:
        import native

        fstype = native.fs_type(path)
    except ImportError:
        return  # the kernel will refuse tmpfs itself, with a less helpful EOPNOTSUPP
    if fstype == TMPFS_MAGIC:
        raise CachefilesError(f"cache dir {path} is on tmpfs, which cachefiles refuses (no "
                              "sync_fs): use ext4, xfs or btrfs", errno.EOPNOTSUPP)
