"""A stand-in for the kernel side of cachefiles on-demand mode, for fast unit tests.

A test helper, not part of the shipped `cachefiles` package (the daemon never imports it):
tests and bench/fetch.py import it as `standins.kernel_simulator` with tests/ on sys.path.

It speaks the same bytes as the kernel: the daemon gets a device fd (one end of an
AF_UNIX SOCK_SEQPACKET pair, so each read(2) returns one whole message and each write(2)
is one command), reads OPEN/READ/CLOSE messages from it and writes text commands
(`dir`, `tag`, `bind ondemand`, `copen`, `restore`, `inuse`, `cull`).

Each object's cache file is a real sparse file in `work_dir` (must not be tmpfs) and the
OPEN carries a fresh fd for it opened O_WRONLY|O_DIRECT and NOT close-on-exec, like the
kernel's anon fd: unaligned buffers or lengths fail with EINVAL.  After READ_COMPLETE the
simulator checks the range like the kernel (a hole at its start -> EIO; a hole later ->
a new READ for the rest) and that the data was written in whole 4 KiB blocks.

Where it differs from the kernel (by construction):
- a write(2) of a bad command cannot fail with an errno on a socket; the simulator
  records the errno it would have returned in `errors` (tests should assert it stays
  empty, `check()` does that);
- READ_COMPLETE is delivered through the `completer` given to CachefilesDevice
  (`sim.device()` wires it), since a regular file has no such ioctl;
- a write at a 512-aligned but not 4096-aligned offset inside a block is invisible to the
  extent check on a 4 KiB-block filesystem (6.12 answers ENOBUFS, 6.1 writes it at the
  wrong place): the misplaced data shows up in the bytes `read` returns;
- the daemon and the simulator share one process (the anon fd number in an OPEN is an fd
  of this process).

Usage:
    sim = KernelSimulator(tmp_path)
    dev = sim.device()                 # CachefilesDevice on the daemon's end
    ... run the daemon on dev in a thread ...
    obj = sim.mount("erofs,img", b"img")   # OPEN; waits for copen
    data = sim.read(obj, 0, 4096)          # READ; waits for READ_COMPLETE; reads back
    sim.close(obj)                          # CLOSE; waits until the daemon closed the fd
    sim.shutdown()

Knobs for lifetime tests:
- `mount(..., object_id=N)` reuses an object id, as the kernel does once the id's previous
  anon fd was released (SimulatorError while that fd is still open: the kernel never would);
- `fail_copen(err, count=1)`: the daemon's next `count` copen writes fail with `err`, and
  their OPENs fail with -err (the kernel gave up on the OPEN, e.g. its mount was
  interrupted, before the copen came: the daemon still owns the anon fd and must close it);
- `completed`: the msg_ids the daemon completed with READ_COMPLETE, in order (a READ failed
  because the device died is not in it).
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cachefiles.device import TMPFS_MAGIC, CachefilesDevice
from cachefiles.messages import encode_close, encode_open, encode_read

BLOCK = 4096
DEFAULT_TIMEOUT = 10.0


class SimulatorError(AssertionError):
    """The daemon broke the protocol (or the test misused the simulator)."""


@dataclass(eq=False)
class SimObject:
    """One cachefiles object as the simulated kernel sees it."""

    volume_key: str
    cookie_key: bytes
    path: Path
    object_id: int = 0
    anon_fd: int = -1  # the number handed to the daemon in the latest OPEN
    ino: tuple[int, int] = (0, 0)
    copen_result: int | None = None  # size or -errno from the latest copen
    kernel_closed: bool = False  # CLOSE sent
    reopens: int = 0

    @property
    def size(self) -> int | None:
        r = self.copen_result
        return r if r is not None and r >= 0 else None


@dataclass(eq=False)
class _Pending:
    msg_id: int
    opcode: str  # "OPEN" / "READ"
    obj: SimObject
    offset: int = 0
    length: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: int | None = None  # copen value for OPEN; 0 or -errno for READ
    taken: bool = False


class PendingRead:
    """A READ in flight; `result()` waits for completion and returns the bytes."""

    def __init__(self, sim: KernelSimulator, obj: SimObject, offset: int, length: int,
                 req: _Pending) -> None:
        self._sim, self.obj, self.offset, self.length, self._req = sim, obj, offset, length, req

    @property
    def msg_id(self) -> int:
        return self._req.msg_id

    def result(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        return self._sim._finish_read(self, timeout)


class _SimDevice(CachefilesDevice):
    """The daemon's end of the simulator: a CachefilesDevice whose command writes can be made to
    fail like the kernel's (see KernelSimulator.fail_copen)."""

    sim: KernelSimulator

    def _command(self, text: str) -> None:
        err = self.sim._injected_failure(text)
        if err:
            raise OSError(err, os.strerror(err))
        super()._command(text)


class KernelSimulator:
    def __init__(self, work_dir: str | os.PathLike[str], *, failover: bool = True) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            import native

            if native.fs_type(self.work_dir) == TMPFS_MAGIC:
                raise SimulatorError(f"{self.work_dir} is tmpfs: O_DIRECT cache files need "
                                     "ext4/xfs/btrfs")
        except ImportError:
            pass
        self.failover = failover
        self.commands: list[str] = []
        self.errors: list[str] = []
        self.discarded: list[SimObject] = []  # objects whose cache was dropped (size changed)
        self.completed: list[int] = []  # msg_ids of READs the daemon completed
        self._copen_failures: list[int] = []  # errnos for the next copen writes
        self._id_owner: dict[int, SimObject] = {}  # object_id -> the object it was last given to
        self._reopening: set[int] = set()  # id() of objects being re-opened by a restore
        self.cache_dir: str | None = None
        self.tag: str | None = None
        self.bound = False
        self.dead = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._next_msg_id = 1
        self._next_object_id = 1
        self._next_file = 1
        self._pending: dict[int, _Pending] = {}
        self._objects: dict[int, SimObject] = {}  # object_id -> object (current ids)
        self._files: dict[tuple[str, bytes], tuple[Path, int | None]] = {}  # key -> (path, size)
        self._read_fds: dict[Path, int] = {}
        self._kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon.setblocking(False)  # the real device never blocks a read: it returns 0
        self._daemon_fd: int | None = daemon.detach()
        self._daemon_fd_given = False
        self._reader = threading.Thread(target=self._serve_commands, name="sim-kernel",
                                         daemon=True)
        self._reader.start()

    # -- the daemon's side -----------------------------------------------------------
    @property
    def daemon_fd(self) -> int:
        assert self._daemon_fd is not None
        return self._daemon_fd

    def device(self) -> CachefilesDevice:
        """A CachefilesDevice on the daemon's end; it owns the fd from now on."""
        self._daemon_fd_given = True
        dev = _SimDevice.from_fd(self.daemon_fd, path="<simulator>", completer=self.complete)
        dev.sim = self
        return dev

    def fail_copen(self, err: int, count: int = 1) -> None:
        """Make the daemon's next `count` copen writes fail with `err`; their OPENs fail with
        -err (as when the kernel dropped the OPEN before the copen came)."""
        with self._lock:
            self._copen_failures.extend([err] * count)

    def _injected_failure(self, text: str) -> int:
        """The errno a command write fails with (0: none); fails the copen's OPEN too. A kernel
        without failover (failover=False) refuses `restore` with EOPNOTSUPP, as 5.19-6.7 do."""
        if text == "restore" and not self.failover:
            with self._lock:
                self.commands.append(text)
            return errno.EOPNOTSUPP
        if not text.startswith("copen "):
            return 0
        with self._cond:
            if not self._copen_failures:
                return 0
            err = self._copen_failures.pop(0)
            self.commands.append(text)
            try:
                req = self._pending.get(int(text[len("copen "):].partition(",")[0], 0))
            except ValueError:
                req = None
            if req is not None and req.opcode == "OPEN":
                del self._pending[req.msg_id]
                req.result = -err
                req.done.set()
        return err

    def complete(self, anon_fd: int, msg_id: int) -> None:
        """The READ_COMPLETE 'ioctl' (pass as CachefilesDevice's completer)."""
        try:
            st = os.fstat(anon_fd)
        except OSError as e:
            raise OSError(e.errno, f"READ_COMPLETE on fd {anon_fd}: {e.strerror}") from None
        with self._cond:
            req = self._pending.get(msg_id)
            if req is None or req.opcode != "READ" or (st.st_dev, st.st_ino) != req.obj.ino:
                raise OSError(errno.EINVAL, f"READ_COMPLETE: no READ {msg_id} for this object")
            del self._pending[msg_id]
            self.completed.append(msg_id)
            req.result = 0
            req.done.set()

    # -- the kernel's side: requests -------------------------------------------------
    def mount(self, volume_key: str, cookie_key: bytes,
              timeout: float = DEFAULT_TIMEOUT, object_id: int | None = None) -> SimObject:
        """Send an OPEN and wait for its copen; the object's `copen_result` is the size or
        -errno the daemon answered. `object_id` reuses an id whose anon fd was released."""
        with self._cond:  # commands are handled by another thread: let a bind land first
            if not self._cond.wait_for(lambda: self.bound or self.dead, timeout):
                raise SimulatorError("mount before `bind ondemand`")
        key = (volume_key, bytes(cookie_key))
        with self._lock:
            if key not in self._files:
                self._files[key] = (self.work_dir / f"cache-{self._next_file}", None)
                self._next_file += 1
            path = self._files[key][0]
        obj = SimObject(volume_key, bytes(cookie_key), path)
        self._open(obj, timeout, object_id)
        return obj

    def _open(self, obj: SimObject, timeout: float, object_id: int | None = None) -> None:
        if object_id is not None:
            owner = self._id_owner.get(object_id)
            if object_id <= 0 or (owner is not None and self.anon_fd_open(owner)):
                raise SimulatorError(f"object_id {object_id} is in use (its anon fd is still open): "
                                     "the kernel reuses an id only once its anon fd was released")
        fd = os.open(obj.path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        os.set_inheritable(fd, True)  # the kernel's anon fd is not close-on-exec
        st = os.fstat(fd)
        if obj.path not in self._read_fds:
            self._read_fds[obj.path] = os.open(obj.path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if obj.object_id:
                self._objects.pop(obj.object_id, None)
            if object_id is None:
                obj.object_id = self._next_object_id
                self._next_object_id += 1
            else:
                obj.object_id = object_id
            self._id_owner[obj.object_id] = obj
            obj.anon_fd, obj.ino = fd, (st.st_dev, st.st_ino)
            obj.copen_result = None
            self._objects[obj.object_id] = obj
            req = self._new_request("OPEN", obj)
        self._send(encode_open(req.msg_id, obj.object_id, obj.volume_key, obj.cookie_key, fd))
        if not req.done.wait(timeout):
            raise TimeoutError(f"daemon never answered OPEN msg {req.msg_id} "
                               f"({obj.volume_key}, {obj.cookie_key!r}) with copen")
        obj.copen_result = req.result

    def start_read(self, obj: SimObject, offset: int, length: int,
                   timeout: float = DEFAULT_TIMEOUT) -> PendingRead:
        """Send a READ (re-OPENing first if the daemon closed the object's anon fd)."""
        if obj.kernel_closed:
            raise SimulatorError("read of an object after CLOSE")
        if obj.size is None:
            raise OSError(errno.ENOBUFS, "read of an object whose OPEN failed")
        if not self.anon_fd_open(obj):
            obj.reopens += 1
            self._open(obj, timeout)
            if obj.size is None:
                raise OSError(errno.EIO, f"re-OPEN failed with {obj.copen_result}")
        with self._lock:
            req = self._new_request("READ", obj, offset, length)
        self._send(encode_read(req.msg_id, obj.object_id, offset, length))
        return PendingRead(self, obj, offset, length, req)

    def read(self, obj: SimObject, offset: int, length: int,
             timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """READ, wait for READ_COMPLETE, check the range, return the bytes read back."""
        return self.start_read(obj, offset, length, timeout).result(timeout)

    def _finish_read(self, pr: PendingRead, timeout: float) -> bytes:
        end = pr.offset + pr.length
        req = pr._req
        rounds = 0
        while True:
            if not req.done.wait(timeout):
                raise TimeoutError(f"daemon never sent READ_COMPLETE for msg {req.msg_id} "
                                   f"({req.offset}+{req.length})")
            if req.result:
                raise OSError(-req.result, f"READ {req.msg_id} failed: {os.strerror(-req.result)}")
            self._check_blocks(pr.obj, req.offset, req.offset + req.length)
            hole = self._first_hole(pr.obj, req.offset, end)
            if hole == req.offset:
                raise OSError(errno.EIO, f"READ {req.msg_id}: {req.offset} is still a hole after "
                                         "READ_COMPLETE")
            if hole >= end:
                break
            rounds += 1  # the kernel serves the filled part and asks again for the rest
            nxt = self.start_read(pr.obj, hole, end - hole, timeout)
            req = nxt._req
        return os.pread(self._read_fds[pr.obj.path], pr.length, pr.offset)

    def close(self, obj: SimObject, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send CLOSE; with `wait`, fail unless the daemon closes the anon fd in time."""
        obj.kernel_closed = True
        with self._lock:
            msg_id = self._next_msg_id
            self._next_msg_id += 1
            self._objects.pop(obj.object_id, None)
        self._send(encode_close(msg_id, obj.object_id))
        if wait:
            deadline = time.monotonic() + timeout
            while self.anon_fd_open(obj):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"daemon did not close anon fd {obj.anon_fd} of object "
                                       f"{obj.object_id} after CLOSE")
                time.sleep(0.005)

    def anon_fd_open(self, obj: SimObject) -> bool:
        """Whether the fd number of the latest OPEN still refers to the object's file."""
        try:
            st = os.fstat(obj.anon_fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == obj.ino

    def fd_is_cloexec(self, obj: SimObject) -> bool:
        return not os.get_inheritable(obj.anon_fd)

    def cached_extents(self, obj: SimObject) -> list[tuple[int, int]]:
        """Data extents of the object's cache file as (start, end)."""
        fd = self._read_fds[obj.path]
        out, pos = [], 0
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
        return out

    # -- checks ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if the daemon sent anything the kernel would have refused."""
        if self.errors:
            raise SimulatorError("daemon protocol errors: " + "; ".join(self.errors))

    def _first_hole(self, obj: SimObject, start: int, end: int) -> int:
        fd = self._read_fds[obj.path]
        try:
            data = os.lseek(fd, start, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return start
            raise
        if data > start:
            return start
        return os.lseek(fd, start, os.SEEK_HOLE)

    def _check_blocks(self, obj: SimObject, start: int, end: int) -> None:
        """What the daemon wrote must be whole 4 KiB blocks at 4 KiB offsets."""
        for s, e in self.cached_extents(obj):
            if e <= start or s >= end:
                continue
            if s % BLOCK or e % BLOCK:
                self._error(f"object {obj.object_id}: data at {s}..{e} is not in whole {BLOCK}-byte "
                            "blocks (the kernel needs 4 KiB aligned offsets and padded tails)")
                raise OSError(errno.EIO, "unaligned write into the cache file")

    # -- plumbing ------------------------------------------------------------------------
    def _new_request(self, opcode: str, obj: SimObject, offset: int = 0,
                     length: int = 0) -> _Pending:
        if self.dead:
            raise OSError(errno.EIO, "cache is dead (device fd closed)")
        req = _Pending(self._next_msg_id, opcode, obj, offset, length)
        self._next_msg_id += 1
        self._pending[req.msg_id] = req
        return req

    def _send(self, data: bytes) -> None:
        if self.dead:
            raise OSError(errno.EIO, "cache is dead (device fd closed)")
        self._kernel.send(data)

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _serve_commands(self) -> None:
        while True:
            try:
                data = self._kernel.recv(4096)
            except OSError:
                data = b""
            if not data:
                self._die()
                return
            text = data.decode("utf-8", "surrogateescape")
            with self._lock:
                self.commands.append(text)
            self._command(text)

    def _die(self) -> None:
        with self._cond:
            self.dead = True
            for req in self._pending.values():
                req.result = -errno.EIO
                req.done.set()
            self._pending.clear()
            self._cond.notify_all()

    def _command(self, text: str) -> None:
        if "\0" in text:
            return self._error(f"{text!r}: EINVAL (NUL in command)")
        line = text.split("\n", 1)[0]
        cmd, _, args = line.partition(" ")
        args = args.lstrip()
        if cmd == "dir":
            if not args:
                return self._error("dir: EINVAL (no path)")
            if self.cache_dir is not None:
                return self._error(f"{line}: EEXIST (dir already set)")
            self.cache_dir = args
        elif cmd == "tag":
            if not args:
                return self._error("tag: EINVAL (no tag)")
            self.tag = args
        elif cmd == "bind":
            if args != "ondemand":
                return self._error(f"{line}: EINVAL (fscached must bind ondemand)")
            if self.bound:
                return self._error("bind: EBUSY (already bound)")
            if self.cache_dir is None or not os.path.isdir(self.cache_dir):
                return self._error(f"bind: EINVAL (dir {self.cache_dir!r} not set or missing)")
            with self._cond:
                self.bound = True
                self._cond.notify_all()
        elif cmd == "copen":
            self._copen(line, args)
        elif cmd == "restore":
            if not self.failover:
                return self._error("restore: EOPNOTSUPP (kernel without failover)")
            self._restore()
        elif cmd in ("inuse", "cull"):
            if not args or "/" in args:
                return self._error(f"{line}: EINVAL")
        else:
            self._error(f"{line!r}: EOPNOTSUPP (unknown command)")

    def _copen(self, line: str, args: str) -> None:
        id_s, comma, size_s = args.partition(",")
        try:
            msg_id, size = int(id_s, 0), int(size_s, 0)
        except ValueError:
            return self._error(f"{line}: EINVAL (bad format)")
        if not comma:
            return self._error(f"{line}: EINVAL (bad format)")
        with self._cond:
            req = self._pending.get(msg_id)
            if req is None or req.opcode != "OPEN":
                self.errors.append(f"{line}: EINVAL (no pending OPEN {msg_id})")
                return
            del self._pending[msg_id]
        obj = req.obj
        if size < -4095:
            self._error(f"{line}: EINVAL (size below -4095)")
            req.result = -errno.EINVAL
        elif size < 0:
            req.result = size
        elif not self.anon_fd_open(obj):
            req.result = -errno.EBADFD  # copen after the anon fd was closed
        else:
            key = (obj.volume_key, obj.cookie_key)
            with self._lock:
                path, old = self._files[key]
                if old is not None and old != size:
                    self.discarded.append(obj)  # the kernel drops data cached at another size
                    os.truncate(path, 0)
                self._files[key] = (path, size)
            req.result = size
        req.done.set()

    def _restore(self) -> None:
        """Re-send the READs that are still uncompleted (the simulator cannot tell taken
        from untaken ones: call it only after a daemon drained the queue). A READ whose object's
        anon fd is closed (its daemon died, or let it go) first re-opens the object, as the
        kernel does when a daemon picks such a READ up: a new OPEN with a new fd and a NEW
        object id, then the READ (same msg_id) with that id. The re-open waits for its copen,
        which this thread handles: it runs on a thread of its own."""
        with self._lock:
            reads = [r for r in self._pending.values() if r.opcode == "READ"]
        closed: dict[int, list[_Pending]] = {}
        for r in reads:
            if r.obj.kernel_closed:
                continue
            if self.anon_fd_open(r.obj):
                self._send(encode_read(r.msg_id, r.obj.object_id, r.offset, r.length))
            else:
                closed.setdefault(id(r.obj), []).append(r)
        for group in closed.values():
            with self._lock:
                if id(group[0].obj) in self._reopening:
                    continue  # the re-open under way sends them
                self._reopening.add(id(group[0].obj))
            threading.Thread(target=self._reopen_and_resend, args=(group,), name="sim-reopen", daemon=True).start()

    def _reopen_and_resend(self, reads: list[_Pending]) -> None:
        obj = reads[0].obj
        try:
            obj.reopens += 1
            self._open(obj, DEFAULT_TIMEOUT)
        except (OSError, TimeoutError, SimulatorError) as exc:
            self._error(f"re-open of object {obj.cookie_key!r} for restore failed: {exc}")
            obj.copen_result = -errno.EIO
        finally:
            with self._lock:
                self._reopening.discard(id(obj))
        with self._cond:
            if obj.size is None:  # the re-open failed: so do its READs
                for r in reads:
                    if self._pending.pop(r.msg_id, None) is not None:
                        r.result = -errno.EIO
                        r.done.set()
                return
            resend = [r for r in reads if r.msg_id in self._pending]
        for r in resend:
            self._send(encode_read(r.msg_id, obj.object_id, r.offset, r.length))

    def shutdown(self) -> None:
        """Close the kernel's end (the daemon then reads 0 bytes / sees POLLHUP) and the
        simulator's own fds.  Anon fds still open belong to the daemon."""
        try:
            self._kernel.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._kernel.close()
        self._reader.join(timeout=5)
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if not self._daemon_fd_given and self._daemon_fd is not None:
            os.close(self._daemon_fd)
        self._daemon_fd = None

    def __enter__(self) -> KernelSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
