"""A stand-in for systemd's side of a Type=notify service, for tests without systemd.

It speaks what systemd speaks to a service, as fscached.lifecycle.systemd expects it:
- $NOTIFY_SOCKET: a datagram socket (a path, or '@name' in the abstract namespace) on which it
  receives READY=1, STATUS=, STOPPING=1, WATCHDOG=1, FDSTORE=1 / FDNAME= / FDPOLL=0 (fds by
  SCM_RIGHTS) and FDSTOREREMOVE=1, only from the main process (NotifyAccess=main, checked with
  SCM_CREDENTIALS);
- the fd store (FileDescriptorStoreMax): it keeps the fds across the daemon's death, as systemd
  does; an fd already stored (the same open file) is not stored twice; FDPOLL other than 0 drops
  an fd on POLLHUP/POLLERR; a full store refuses more;
- a start passes the stored fds at 3.. with $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID (set
  to the new process's pid by a `sh` that execs the daemon), plus $FDSTORE, $WATCHDOG_USEC and
  $WATCHDOG_PID;
- Restart=on-failure (a non-zero exit, a signal other than SIGTERM/SIGINT/SIGHUP/SIGPIPE, a
  watchdog timeout) after RestartSec; WatchdogSec: no WATCHDOG=1 for that long (counted from
  the start) sends SIGABRT, then SIGKILL after `abort_timeout` (TimeoutAbortSec);
- `restart()` is `systemctl restart` (SIGTERM, SIGKILL after `stop_timeout`, a new start with the
  store kept); `stop()` is `systemctl stop` of systemd 252 (the store is released).

Every start is recorded (`starts`: pid, when spawned / ready / gone, how it ended) for tests and
bench/failover.py.
"""
from __future__ import annotations

import array
import ctypes
import os
import select
import signal
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


CLEAN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)
_UCRED = struct.Struct("iII")
_SYS_KCMP = 312  # x86-64
_KCMP_FILE = 0


@dataclass
class Start:
    """One process the stand-in started."""

    pid: int
    spawned: float  # time.monotonic()
    listen_names: list[str]
    ready: float | None = None
    exited: float | None = None
    status: int | None = None  # exit code, or -signal
    reason: str = ""  # "exit", "signal", "watchdog", "restart", "stop"
    notes: list[str] = field(default_factory=list)  # STATUS= lines


@dataclass
class Stored:
    name: str
    fd: int
    poll: bool


class SystemdStandin:
    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 log: Path | None = None, watchdog_sec: float | None = None, fdstore_max: int = 512,
                 restart: str = "on-failure", restart_sec: float = 0.1, stop_timeout: float = 30.0,
                 abort_timeout: float = 2.0, abstract: bool = False, first_fds: dict[int, int] | None = None,
                 announce_fdstore: bool = True) -> None:
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        for key in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                    "WATCHDOG_PID", "FDSTORE"):
            self.env.pop(key, None)
        self.cwd = str(cwd) if cwd is not None else None
        self.log = log
        self.watchdog_sec = watchdog_sec
        self.fdstore_max = fdstore_max
        self.restart_policy = restart
        self.restart_sec = restart_sec
        self.stop_timeout = stop_timeout
        self.abort_timeout = abort_timeout
        self.announce_fdstore = announce_fdstore  # $FDSTORE, as systemd 254+ sets it
        self.first_fds = dict(first_fds or {})  # target fd -> our fd, for the first start only
        self.starts: list[Start] = []
        self.store: list[Stored] = []
        self.messages: list[tuple[float, int, str]] = []  # (when, sender pid, text)
        self.rejected: list[str] = []
        self.errors: list[str] = []  # what systemd would have logged as a warning
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._last_watchdog = 0.0
        self._intent: str | None = None  # "restart" / "stop": an exit we asked for
        self._closed = False
        self._dir = Path(tempfile.mkdtemp(prefix="sd-standin-"))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"fscached-standin-{os.getpid()}-{id(self):x}"
            self.sock.bind("\0" + name)
            self.notify_socket = "@" + name
        else:
            path = self._dir / "notify"
            self.sock.bind(str(path))
            self.notify_socket = str(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._receiver = threading.Thread(target=self._receive, name="sd-notify", daemon=True)
        self._receiver.start()
        self._monitor: threading.Thread | None = None

    # -- the service's life ------------------------------------------------------------------
    def start(self) -> SystemdStandin:
        with self._cond:
            self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="sd-monitor", daemon=True)
        self._monitor.start()
        return self

    @property
    def current(self) -> Start | None:
        with self._lock:
            return self.starts[-1] if self.starts else None

    @property
    def pid(self) -> int | None:
        start = self.current
        return start.pid if start is not None and start.exited is None else None

    def wait_ready(self, index: int = -1, timeout: float = 60.0) -> Start:
        """Wait until start `index` (default: the latest, or the next one if the latest is gone)
        sent READY=1."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.starts:
                    start = self.starts[index] if index != -1 else self.starts[-1]
                    if start.ready is not None and (index != -1 or start.exited is None):
                        return start
                    if index != -1 and start.exited is not None:
                        raise AssertionError(f"start {index} (pid {start.pid}) ended ({start.reason} {start.status}) "
                                             f"before READY=1:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no READY=1 within {timeout} s:\n{self.log_tail()}")
                self._cond.wait(min(left, 0.1))

    def wait_starts(self, count: int, timeout: float = 60.0) -> Start:
        """Wait until `count` processes were started; the last one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.starts) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.starts)} start(s), not {count}, within {timeout} s:\n"
                                         f"{self.log_tail()}")
                self._cond.wait(min(left, 0.1))
            return self.starts[count - 1]

    def wait_exit(self, start: Start, timeout: float = 60.0) -> Start:
        deadline = time.monotonic() + timeout
        with self._cond:
            while start.exited is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"pid {start.pid} still running after {timeout} s")
                self._cond.wait(min(left, 0.1))
        return start

    def kill(self, sig: int = signal.SIGKILL, *, wait: bool = True) -> Start:
        """Signal the main process from outside (kill -9 by default) and, with `wait`, wait until
        it is gone; the restart policy does the rest."""
        start = self.current
        assert start is not None and start.exited is None, "no process running"
        os.kill(start.pid, sig)
        if wait:
            self.wait_exit(start, 30)
        return start

    def restart(self, timeout: float | None = None) -> Start:
        """`systemctl restart`: stop (SIGTERM, then SIGKILL) keeping the fd store, start again."""
        old = self._stop_current("restart", timeout)
        assert old is not None, "restart before start"
        with self._cond:
            self._intent = None
            self._spawn()
        return old

    def stop(self, timeout: float | None = None) -> Start | None:
        """`systemctl stop` (systemd 252): stop, then release the fd store."""
        old = self._stop_current("stop", timeout)
        self.release_store()
        return old

    def release_store(self) -> None:
        with self._lock:
            stored, self.store = self.store, []
        for entry in stored:
            os.close(entry.fd)

    def close(self) -> None:
        """Stop everything (SIGKILL if needed), close the socket and the stored fds."""
        start = self.current
        if start is not None and start.exited is None:
            try:
                self._stop_current("stop", 10)
            except AssertionError:
                pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._monitor is not None:
            self._monitor.join(5)
        self.release_store()
        self.sock.close()
        self._receiver.join(2)
        try:
            os.unlink(self._dir / "notify")
        except OSError:
            pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    def __enter__(self) -> SystemdStandin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store_names(self) -> list[str]:
        with self._lock:
            return [entry.name for entry in self.store]

    def log_tail(self, lines: int = 60) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------------
    def _stop_current(self, intent: str, timeout: float | None) -> Start | None:
        with self._cond:
            start = self.starts[-1] if self.starts else None
            if start is None or start.exited is not None:
                self._intent = intent
                return start
            self._intent = intent
        os.kill(start.pid, signal.SIGTERM)
        try:
            self.wait_exit(start, self.stop_timeout if timeout is None else timeout)
        except AssertionError:
            os.kill(start.pid, signal.SIGKILL)
            self.wait_exit(start, 10)
        return start

    def _spawn(self) -> None:
        """With the lock held: start the daemon with the stored fds at 3.."""
        if self.starts or not self.first_fds:
            passed = [(entry.name, entry.fd) for entry in self.store]
            targets = {3 + i: fd for i, (_, fd) in enumerate(passed)}
        else:
            passed, targets = [], dict(self.first_fds)
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = self.notify_socket
        if self.announce_fdstore:
            env["FDSTORE"] = str(self.fdstore_max)
        argv = list(self.argv)
        shim = []
        if self.watchdog_sec:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1e6))
            shim.append("WATCHDOG_PID=$$")
        if passed:
            env["LISTEN_FDS"] = str(len(passed))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in passed)
            shim.append("LISTEN_PID=$$")
        if shim:  # systemd sets them in the forked child: here a shell that then execs the daemon
            argv = ["/bin/sh", "-c", f"export {' '.join(shim)}; exec \"$@\"", "sh", *argv]
        # our copies out of the way of the targets first (dup2 onto 3.. must not clobber them)
        high = {target: fcntl_dupfd(fd, 3 + len(targets) + 64) for target, fd in targets.items()}
        try:
            actions: list[tuple[object, ...]] = []
            if self.log is not None:
                actions.append((os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
                actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
            for target, fd in high.items():
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
            if self.cwd is not None:  # posix_spawn has no chdir action before 3.13's... use sh
                argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', self.cwd, *argv]
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        finally:
            for fd in high.values():
                os.close(fd)
        self.starts.append(Start(pid, time.monotonic(), [name for name, _ in passed]))
        self._last_watchdog = time.monotonic()
        self._cond.notify_all()

    def _watch(self) -> None:
        """Reap the main process, fire the watchdog, restart on failure, poll FDPOLL'd fds."""
        while True:
            with self._cond:
                if self._closed:
                    return
                start = self.starts[-1]
            if start.exited is None:
                self._check_watchdog(start)
                try:
                    pid, status = os.waitpid(start.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = start.pid, 0
                if pid == start.pid:
                    self._ended(start, status)
            self._poll_store()
            time.sleep(0.01)

    def _check_watchdog(self, start: Start) -> None:
        if not self.watchdog_sec or start.reason == "watchdog":
            return
        if time.monotonic() - self._last_watchdog <= self.watchdog_sec:
            return
        start.reason = "watchdog"
        self.errors.append(f"watchdog timeout (pid {start.pid}): killing it with SIGABRT")
        try:
            os.kill(start.pid, signal.SIGABRT)
        except ProcessLookupError:
            return
        killer = threading.Timer(self.abort_timeout, _kill_quietly, (start.pid,))
        killer.daemon = True
        killer.start()

    def _ended(self, start: Start, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        with self._cond:
            start.exited = time.monotonic()
            start.status = code
            intent, self._intent = self._intent, None
            if start.reason != "watchdog":
                start.reason = intent or ("signal" if code < 0 else "exit")
            failed = start.reason == "watchdog" or (intent is None and (code > 0 or (
                code < 0 and -code not in CLEAN_SIGNALS)))
            self._cond.notify_all()
        if intent is not None or not failed or self.restart_policy != "on-failure":
            return
        time.sleep(self.restart_sec)
        with self._cond:
            if not self._closed and self.starts[-1] is start and self._intent is None:
                self._spawn()

    def _poll_store(self) -> None:
        with self._lock:
            polled = [entry for entry in self.store if entry.poll]
        if not polled:
            return
        poller = select.poll()
        for entry in polled:
            poller.register(entry.fd, select.POLLHUP | select.POLLERR)
        gone = {fd for fd, ev in poller.poll(0) if ev & (select.POLLHUP | select.POLLERR)}
        if gone:
            with self._lock:
                for entry in [e for e in self.store if e.fd in gone]:
                    self.store.remove(entry)
                    self.errors.append(f"stored fd {entry.name} reported POLLHUP/POLLERR: dropped")
                    os.close(entry.fd)

    # -- sd_notify ---------------------------------------------------------------------------
    def _receive(self) -> None:
        fd_space = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(_UCRED.size)
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, fd_space)
            except OSError:
                return
            fds: list[int] = []
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            for fd in fds:
                os.set_inheritable(fd, False)
            if not data and not fds:
                if self._closed:
                    return
                continue
            self._message(pid, data.decode(errors="replace"), fds)

    def _message(self, pid: int, text: str, fds: list[int]) -> None:
        lines = [line for line in text.split("\n") if line]
        with self._cond:
            start = self.starts[-1] if self.starts else None
            if start is None or pid != start.pid or start.exited is not None:
                self.rejected.append(f"pid {pid}: {text!r}")  # NotifyAccess=main
                for fd in fds:
                    os.close(fd)
                return
            now = time.monotonic()
            self.messages.append((now, pid, text))
            values = dict(line.partition("=")[::2] for line in lines)
            if values.get("READY") == "1" and start.ready is None:
                start.ready = now
            if "STATUS" in values:
                start.notes.append(values["STATUS"])
            if values.get("WATCHDOG") == "1":
                self._last_watchdog = now
            if values.get("FDSTOREREMOVE") == "1":
                name = values.get("FDNAME")
                if not name:
                    self.errors.append("FDSTOREREMOVE=1 without FDNAME=")
                for entry in [e for e in self.store if e.name == name]:
                    self.store.remove(entry)
                    os.close(entry.fd)
            if values.get("FDSTORE") == "1":
                name = values.get("FDNAME", "stored")
                if ":" in name or len(name) > 255 or any(ord(c) < 32 or ord(c) >= 127 for c in name):
                    self.errors.append(f"invalid FDNAME {name!r}: stored as 'stored'")
                    name = "stored"
                poll = values.get("FDPOLL") != "0"
                for fd in fds:
                    if any(_same_file(fd, e.fd) for e in self.store):
                        os.close(fd)  # already stored: systemd keeps one
                    elif len(self.store) >= self.fdstore_max:
                        self.errors.append(f"fd store full ({self.fdstore_max}): {name} refused")
                        os.close(fd)
                    else:
                        self.store.append(Stored(name, fd, poll))
                fds = []
            for fd in fds:  # fds without FDSTORE=1: systemd closes them
                os.close(fd)
            self._cond.notify_all()


def fcntl_dupfd(fd: int, lowest: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


def _same_file(a: int, b: int) -> bool:
    """Whether two of our fds are the same open file (kcmp, as systemd's same_fd)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.getpid()
        result = libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
        if result >= 0:
            return bool(result == 0)
    except OSError:
        pass
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


