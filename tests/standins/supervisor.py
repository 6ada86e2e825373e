"""A stand-in for nydus-snapshotter's supervisor (pkg/supervisor), for the host tests of the
supervisor protocol (tests/fscached/test_failover_sim.py, test_nydusd_early.py,
tests/fanotify/test_nydusd_fuse.py): they import it as `standins.supervisor` (tests/ on
sys.path). The snapshotter's own failover and hot upgrade are run for real in the VM tests
(vm-tests/test_vm_snapshotter.py), no longer replayed.

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
"""
from __future__ import annotations

import array
import http.client
import json
import os
import socket
import threading
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
