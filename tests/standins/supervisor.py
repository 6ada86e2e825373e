"""A stand-in for nydus-snapshotter's failover machinery: its supervisor (pkg/supervisor) and the
part of its manager that restarts a dead daemon and drives takeover (doDaemonFailover) or a hot
upgrade (the system controller's upgradeNydusDaemon). A test helper, not shipped: host tests
import it as `standins.supervisor` (tests/ on sys.path), the VM scenarios too (they put tests/
on sys.path in the guest).

`Supervisor(path)` behaves as pkg/supervisor does, byte for byte on the socket:
  - `fetch_states(trigger)` (FetchDaemonStates): listen on `path`, call `trigger()` (the API's
    sendfd), accept ONE connection, read until EOF: the state bytes and exactly one fd
    (SCM_RIGHTS). Both are kept; a later state replaces the earlier one (its fd closed).
  - `send_states(timeout)` (SendStatesTimeout): listen, return at once; a thread accepts ONE
    connection within `timeout`, sends the kept state with the kept fd, closes, and stops
    listening (the socket file goes, as Go's listener removes it). The kept copy is not
    consumed: a second takeover gets the same state and fd.
  - It holds the fd for as long as it lives: the kernel's cache stays alive across the daemon's
    death. `close()` lets it go (DestroySupervisor).
`on_sent` (send_states) runs right after the state went out: a test kills the daemon there to
kill it in the middle of its takeover.

`Snapshotter(nydusd, root, ...)` runs `nydusd singleton --fscache ... --supervisor ...` as the
snapshotter does and drives it through the API (HTTP/1.1 on the unix socket):
  - `start_daemon()`: start, wait for the socket and RUNNING, then fetch the states (sendfd);
  - `sendfd()`: after a mount, as the snapshotter does;
  - `failover()`: the daemon died: send_states, start it again with the same command line, wait
    for INIT, takeover, start, wait for RUNNING, fetch the states; a daemon that dies on the
    way (killed during takeover) is restarted again, as the snapshotter's death monitor would;
  - `upgrade()`: send_states, start a new process with `--upgrade` on the next API socket, wait
    for INIT, takeover, wait for READY, exit the old one, start the new one, fetch the states.
Every step is timed in `events` (name, monotonic time) for the scenario's report.
"""
from __future__ import annotations

import array
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

MAX_STATE = 16 << 20
MAX_FDS = 64


class SupervisorError(Exception):
    pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _listen(path: Path) -> socket.socket:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def _stop_listening(listener: socket.socket, path: Path) -> None:
    listener.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def recv_state(conn: socket.socket) -> tuple[bytes, list[int]]:
    """Read until EOF: bytes and fds (as pkg/supervisor's recv; close-on-exec here)."""
    data = bytearray()
    fds: list[int] = []
    try:
        while True:
            msg, anc, flags, _ = conn.recvmsg(256 << 10, socket.CMSG_SPACE(4 * MAX_FDS), socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
            if flags & socket.MSG_CTRUNC:
                raise SupervisorError("received truncated control message")
            if not msg:
                break
            data += msg
            if len(data) > MAX_STATE:
                raise SupervisorError("state too large")
    except BaseException:
        _close(fds)
        raise
    return bytes(data), fds


def send_state(conn: socket.socket, data: bytes, fd: int) -> None:
    """The state with the fd on its first message (as pkg/supervisor's send)."""
    view = memoryview(data)
    sent = conn.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if sent < len(view):
        conn.sendall(view[sent:])


class Supervisor:
    """pkg/supervisor's Supervisor: keeps one daemon's state bytes and its /dev/cachefiles fd."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.data = b""
        self.fd = -1
        self.received = 0  # states received
        self.sent = 0  # states given back
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None

    def save(self, data: bytes, fd: int) -> None:
        with self._lock:
            if fd >= 0 and self.fd >= 0 and self.fd != fd:
                os.close(self.fd)
            if fd >= 0:
                self.fd = fd
            self.data = bytes(data)
            self.received += 1

    def load(self) -> tuple[bytes, int]:
        with self._lock:
            return self.data, self.fd

    def fetch_states(self, trigger: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Listen, trigger the daemon's sendfd, receive its state and fd. Returns trigger()'s
        value; raises SupervisorError when nothing (or not exactly one fd) came."""
        listener = _listen(self.path)
        listener.settimeout(timeout)
        got: dict[str, Any] = {}

        def receive() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                got["error"] = f"accept: {exc}"
                return
            with conn:
                conn.settimeout(timeout)
                try:
                    data, fds = recv_state(conn)
                except (OSError, SupervisorError) as exc:
                    got["error"] = f"receive: {exc}"
                    return
            if len(fds) != 1:
                _close(fds)
                got["error"] = f"expected exactly one control file descriptor, received {len(fds)}"
                return
            self.save(data, fds[0])
            got["bytes"] = len(data)

        thread = threading.Thread(target=receive, name="supervisor-recv", daemon=True)
        thread.start()
        try:
            result = trigger()
        except BaseException:
            _stop_listening(listener, self.path)  # wakes the accept
            thread.join(timeout)
            raise
        thread.join(timeout)
        _stop_listening(listener, self.path)
        thread.join(5)
        if "error" in got or "bytes" not in got:
            error = got.get("error", "no state received")
            self.errors.append(error)
            raise SupervisorError(f"supervisor {self.path}: {error} (trigger answered {result!r})")
        return result

    def send_states(self, timeout: float = 10.0, on_sent: Callable[[], None] | None = None) -> None:
        """Listen and return; a thread gives the kept state and fd to the first connection
        within `timeout` (the daemon's takeover), then stops listening."""
        self.wait_sent(timeout)  # one sender at a time, as the snapshotter's flows are sequential
        listener = _listen(self.path)
        listener.settimeout(timeout)

        def sender() -> None:
            try:
                try:
                    conn, _ = listener.accept()
                except OSError as exc:
                    self.errors.append(f"send: accept: {exc}")
                    return
                with conn:
                    data, fd = self.load()
                    try:
                        send_state(conn, data, fd)
                    except OSError as exc:
                        self.errors.append(f"send: {exc}")
                        return
                    self.sent += 1
                if on_sent is not None:
                    on_sent()
            finally:
                _stop_listening(listener, self.path)

        self._sender = threading.Thread(target=sender, name="supervisor-send", daemon=True)
        self._sender.start()

    def wait_sent(self, timeout: float = 10.0) -> None:
        if self._sender is not None:
            self._sender.join(timeout + 1)
            self._sender = None

    def close(self) -> None:
        """DestroySupervisor: the held fd goes (the kernel's cache dies with its last copy)."""
        self.wait_sent(0.1)
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


# -- the API, as the snapshotter's client speaks it -----------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def call(sock: str | os.PathLike[str], method: str, path: str, body: Any = None,
         timeout: float = 60.0) -> tuple[int, Any]:
    """One API request: (status, JSON body or None). OSError when nobody answers."""
    conn = _UnixConnection(str(sock), timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def daemon_state(sock: str | os.PathLike[str]) -> str | None:
    try:
        status, body = call(sock, "GET", "/api/v1/daemon", timeout=10)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return body.get("state") if status == 200 and isinstance(body, dict) else None


# -- the snapshotter's manager ----------------------------------------------------------------
class DaemonDied(SupervisorError):
    pass


class Snapshotter:
    """Runs one `nydusd singleton` daemon as nydus-snapshotter does with recover_policy =
    "failover", and drives its failover and hot upgrade."""

    def __init__(self, nydusd: str, root: str | os.PathLike[str], cache: str | os.PathLike[str], *,
                 daemon_id: str = "d0fscached0failover", log_file: str | os.PathLike[str] | None = None,
                 log_level: str = "info", env: dict[str, str] | None = None, state_timeout: float = 120.0,
                 send_timeout: float = 10.0) -> None:
        self.nydusd = nydusd
        self.root = Path(root)
        self.cache = Path(cache)
        self.daemon_id = daemon_id
        self.apisock = self.root / "socket" / daemon_id / "api.sock"
        self.supervisor = Supervisor(self.root / "supervisor" / f"{daemon_id}.sock")
        self.log_file = Path(log_file) if log_file else self.root / "logs" / daemon_id / "nydusd.log"
        self.log_level = log_level
        self.env = env if env is not None else {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        self.state_timeout = state_timeout
        # SendStatesTimeout's 10 s: from before the daemon is spawned to its takeover (a VM under
        # TCG starts Python far slower than a node: the scenarios give it more)
        self.send_timeout = send_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []  # every process started, in order
        self.events: list[tuple[str, float]] = []
        self.upgrades = 0
        self.stderr_path = self.root / "nydusd.stderr"

    def mark(self, name: str) -> float:
        now = time.monotonic()
        self.events.append((name, now))
        return now

    def command(self, *, upgrade: bool = False, apisock: Path | None = None) -> list[str]:
        cmd = [self.nydusd, "singleton", "--fscache", str(self.cache), "--apisock", str(apisock or self.apisock),
               "--log-level", self.log_level, "--log-rotation-size", "100", "--id", self.daemon_id,
               "--supervisor", str(self.supervisor.path), "--log-file", str(self.log_file)]
        if upgrade:
            cmd.append("--upgrade")
        return cmd

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as stderr:
            proc = subprocess.Popen(cmd, stdout=stderr, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def wait_state(self, want: tuple[str, ...], proc: subprocess.Popen[bytes] | None = None,
                   sock: Path | None = None, timeout: float | None = None) -> str:
        """WaitUntilState: poll GET /api/v1/daemon until the state is one of `want`."""
        proc = proc or self.proc
        sock = sock or self.apisock
        deadline = time.monotonic() + (timeout or self.state_timeout)
        while True:
            if proc is not None and proc.poll() is not None:
                raise DaemonDied(f"daemon {proc.pid} exited ({proc.returncode}) while waiting for {'/'.join(want)}")
            state = daemon_state(sock) if sock.exists() else None
            if state in want:
                return state
            if time.monotonic() > deadline:
                raise SupervisorError(f"daemon did not reach {'/'.join(want)} (last state {state})")
            time.sleep(0.02)

    def api(self, method: str, path: str, body: Any = None, sock: Path | None = None) -> tuple[int, Any]:
        return call(sock or self.apisock, method, path, body)

    def _checked(self, method: str, path: str, sock: Path | None = None) -> None:
        status, body = self.api(method, path, sock=sock)
        if status // 100 != 2:
            raise SupervisorError(f"{method} {path}: {status} {body}")

    def sendfd(self, sock: Path | None = None) -> None:
        """FetchDaemonStates(d.SendStates)."""
        self.supervisor.fetch_states(lambda: self._checked("PUT", "/api/v1/daemon/fuse/sendfd", sock))

    def start_daemon(self) -> subprocess.Popen[bytes]:
        """StartDaemon: spawn, wait for RUNNING, then the first sendfd."""
        self.proc = self._spawn(self.command())
        self.wait_state(("RUNNING",))
        self.sendfd()
        return self.proc

    def kill(self, proc: subprocess.Popen[bytes] | None = None) -> float:
        proc = proc or self.proc
        assert proc is not None
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.mark(f"kill {proc.pid}")

    def failover(self, *, kill_during_takeover: int = 0, attempts: int = 5) -> dict[str, float]:
        """doDaemonFailover, after the daemon died: returns the timings of the round that
        converged. `kill_during_takeover`: kill that many restarted daemons right after the
        supervisor gave them the state (in the middle of their takeover)."""
        assert self.proc is not None
        kills_left = [kill_during_takeover]
        for _ in range(attempts):
            self.proc.wait()  # d.Wait()
            t: dict[str, float] = {"dead": self.mark("dead")}
            victim: list[subprocess.Popen[bytes]] = []

            def on_sent(victim: list[subprocess.Popen[bytes]] = victim) -> None:  # this round's
                if kills_left[0] > 0 and victim:
                    kills_left[0] -= 1
                    self.kill(victim[0])

            self.supervisor.send_states(self.send_timeout, on_sent=on_sent)
            self.proc = self._spawn(self.command())
            victim.append(self.proc)
            t["spawned"] = self.mark("spawned")
            try:
                self.wait_state(("INIT",))
                t["init"] = self.mark("init")
                status, body = self.api("PUT", "/api/v1/daemon/fuse/takeover")
                t["takeover"] = self.mark(f"takeover {status}")
                if status != 204:
                    raise SupervisorError(f"takeover: {status} {body}")
                self._checked("PUT", "/api/v1/daemon/start")
                t["start"] = self.mark("start")
                self.wait_state(("RUNNING",))
                t["running"] = self.mark("running")
                self.sendfd()
                t["sendfd"] = self.mark("sendfd")
                self.supervisor.wait_sent()
                return t
            except (DaemonDied, OSError, http.client.HTTPException) as exc:
                self.mark(f"died during failover: {exc}")
                self.supervisor.wait_sent()
                if self.proc.poll() is None:
                    time.sleep(0.2)
                    if self.proc.poll() is None:
                        raise
                continue  # the death monitor starts the failover again
        raise SupervisorError(f"no failover converged in {attempts} attempts")

    def next_apisock(self) -> Path:
        self.upgrades += 1
        return self.apisock.with_name(f"api{self.upgrades}.sock")

    def upgrade(self, before_exit: Callable[[], None] | None = None) -> dict[str, float]:
        """upgradeNydusDaemon: a new process takes over while the old one is told to exit.
        `before_exit` runs once the new process is READY (a test puts readers to work there)."""
        old, old_sock = self.proc, self.apisock
        assert old is not None
        new_sock = self.next_apisock()
        t = {"begin": self.mark("upgrade")}
        self.supervisor.send_states(self.send_timeout)
        new = self._spawn(self.command(upgrade=True, apisock=new_sock))
        self.wait_state(("INIT",), proc=new, sock=new_sock)
        t["init"] = self.mark("new init")
        status, body = self.api("PUT", "/api/v1/daemon/fuse/takeover", sock=new_sock)
        if status != 204:
            raise SupervisorError(f"takeover: {status} {body}")
        t["takeover"] = self.mark("new takeover")
        self.wait_state(("READY",), proc=new, sock=new_sock)
        t["ready"] = self.mark("new ready")
        if before_exit is not None:
            before_exit()
        self._checked("PUT", "/api/v1/daemon/exit", sock=old_sock)  # "let the older daemon exit without umount"
        t["old_exit"] = self.mark("old exit")
        self._checked("PUT", "/api/v1/daemon/start", sock=new_sock)
        t["start"] = self.mark("new start")
        self.proc, self.apisock = new, new_sock
        self.wait_state(("RUNNING",))
        t["running"] = self.mark("new running")
        self.supervisor.wait_sent()
        self.sendfd()
        t["sendfd"] = self.mark("new sendfd")
        old.wait(60)
        t["old_gone"] = self.mark(f"old exited {old.returncode}")
        return t

    def exit(self) -> int | None:
        if self.proc is None:
            return None
        try:
            self._checked("PUT", "/api/v1/daemon/exit")
        except (OSError, SupervisorError, http.client.HTTPException):
            pass
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        self.supervisor.close()
