"""The keeper: a tiny process that holds the fanotify group fd (and the cache files' write fds)
so a daemon killed with -9 never lets the kernel fall back to reading holes as zeros.

While the keeper holds the group, readers of a dead daemon's mounts wait (they do not read
zeros); a new `fscached` with the same cache dir takes the fds back and serves them. The keeper
listens on a unix socket (0600, in a 0700 directory) and speaks one JSON line per request:
  {"op": "put", "names": [...]} + the fds (SCM_RIGHTS)  store them (replacing what it held)
  {"op": "get"}                                          answer {"names": [...]} + the fds
  {"op": "attach"}                                       the daemon's lifeline: it keeps this
                                                         connection open while it lives
  {"op": "drop"}                                         close everything and exit
  {"op": "ping"}                                         answer {"ok": true}

It exits by itself once nothing needs it: no daemon is attached (none ever came, or the one
that did died) and no cache file under its blobs directory is open anywhere else (a mount,
mounted or detached with `umount -l`, holds its blob files open: fscached.util.leases). A
reader waiting on a dead daemon's mount therefore keeps it, and so do mounts nobody reads;
a keeper whose daemon died with nothing mounted leaves within a few seconds.

Run as `python -m fscached.frontends.fanotify.keeper SOCKET [BLOBS_DIR]`; the daemon starts it in
a session of its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fscached.lifecycle import fdnames
from fscached.util.api_socket import ApiSocketError, bind_listening
from fscached.util.ids import is_blob_id
from fscached.util.leases import held_elsewhere, path_held_elsewhere

MAX_FDS = 250  # SCM_RIGHTS carries at most 253 fds per message
_SUN_PATH_MAX = 107
PROBE_SECONDS = 2.0  # without a daemon: how often the keeper asks whether anything still reads
QUIET_SECONDS = 5.0  # no probe this soon after a request (a successor may be taking over)


KEEPERS_RUN_DIR = Path("/run/fscached/keepers")


class KeeperError(Exception):
    """Talking to the keeper failed, worded for the user."""


def socket_path(cache_dir: Path) -> Path:
    """Where the keeper of a cache dir listens: `<cache>/.fscached/keeper.sock`, or, when that
    path is too long for a unix socket, a name derived from the cache dir in a 0700 directory
    of /run (the same cache dir always finds the same keeper)."""
    inside = cache_dir / ".fscached" / "keeper.sock"
    if len(os.fsencode(inside)) <= _SUN_PATH_MAX:
        return inside
    digest = hashlib.sha256(os.fsencode(cache_dir.resolve())).hexdigest()[:32]
    return KEEPERS_RUN_DIR / f"{digest}.sock"


# -- the daemon's side -------------------------------------------------------------------------
def _request(path: Path, request: dict[str, object], fds: tuple[int, ...] = (), timeout: float = 10) -> tuple[dict[str, object], list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], list(fds))
        data, received, _, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS)
        for fd in received:
            os.set_inheritable(fd, False)
        try:
            return json.loads(data or b"{}"), received
        except ValueError:
            for fd in received:
                os.close(fd)
            raise KeeperError(f"keeper at {path} answered garbage") from None


def take(path: Path) -> dict[str, int] | None:
    """The fds a running keeper holds, by the names they were given under (the caller owns the
    copies); None when no keeper listens there."""
    if not path.exists():
        return None
    try:
        answer, fds = _request(path, {"op": "get"})
    except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
        return None  # a socket file left by a keeper that is gone, or leaving
    except OSError as exc:
        raise KeeperError(f"keeper at {path}: {exc.strerror or exc}") from None
    names = answer.get("names", [])
    if not isinstance(names, list) or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise KeeperError(f"keeper at {path} sent {len(fds)} fds for names {names!r}")
    return {str(n): fd for n, fd in zip(names, fds)}


def give(path: Path, fds: dict[str, int]) -> None:
    """Hand `fds` (copies; the caller keeps its own) to the keeper, replacing what it held."""
    if len(fds) > MAX_FDS:
        raise KeeperError(f"the keeper holds at most {MAX_FDS} fds, not {len(fds)}")
    try:
        answer, _ = _request(path, {"op": "put", "names": list(fds)}, tuple(fds.values()))
    except OSError as exc:
        raise KeeperError(f"keeper at {path}: {exc.strerror or exc}") from None
    if answer.get("ok") is not True:
        raise KeeperError(f"keeper at {path} refused the fds: {answer!r}")


def attach(path: Path) -> socket.socket:
    """The daemon's lifeline: a connection the keeper watches; the daemon keeps it open (and
    close-on-exec) while it lives. The kernel closes it when the daemon dies, however it dies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": "attach", "pid": os.getpid()}).encode() + b"\n")
        answer = sock.recv(256)
        if not answer.startswith(b'{"ok": true'):
            raise KeeperError(f"keeper at {path} did not take the lifeline: {answer!r}")
    except OSError as exc:
        sock.close()
        raise KeeperError(f"keeper at {path}: {exc.strerror or exc}") from None
    return sock


def dismiss(path: Path) -> None:
    """Tell the keeper to let go and exit (a clean stop, once nothing marked is read any more)."""
    try:
        _request(path, {"op": "drop"})
    except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
        pass


def start(path: Path, blobs_dir: Path | None = None, timeout: float = 10) -> None:
    """Start a keeper on `path` (its directory must exist, 0700) and wait until it answers.
    `blobs_dir`: the cache files it watches to decide when nothing needs it any more.

    The socket is bound and listening before the keeper runs (the keeper inherits it): the ping
    waits exactly as long as the keeper takes to start, with no polling for the socket file."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise KeeperError(f"keeper socket path {path} is longer than {_SUN_PATH_MAX} bytes: use a shorter cache dir")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        listener = bind_listening(path, backlog=8, what="the keeper")
    except ApiSocketError as exc:
        raise KeeperError(str(exc)) from None
    try:
        fd = listener.sock.fileno()
        argv = [sys.executable, "-m", "fscached.frontends.fanotify.keeper", str(path), str(fd)]
        if blobs_dir is not None:
            argv.append(str(blobs_dir))
        subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, pass_fds=(fd,))
    finally:
        listener.sock.close()  # the keeper's now; the file stays (Listener.close would remove it)
    try:
        _request(path, {"op": "ping"}, timeout=timeout)
    except TimeoutError:
        raise KeeperError(f"the keeper did not answer on {path} within {timeout:.0f} s") from None
    except OSError as exc:  # it exited before it answered: its socket closed with it
        raise KeeperError(f"the keeper did not start on {path}: {exc.strerror or exc}") from None


# -- the keeper process ------------------------------------------------------------------------
class Keeper:
    def __init__(self, path: Path, blobs_dir: Path | None, listener: socket.socket) -> None:
        """`listener`: the socket bound to `path` and listening, made by the daemon that started it."""
        self.path = path
        self.blobs_dir = blobs_dir
        self.held: dict[str, int] = {}
        self.lifelines: set[socket.socket] = set()
        self.last_request = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.listener = listener

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ)
        next_probe = time.monotonic() + PROBE_SECONDS
        while True:
            timeout = max(0.0, next_probe - time.monotonic())
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    if self._handle(conn) == "exit":
                        return
                else:  # a lifeline: readable means its daemon closed it (or died)
                    lifeline = key.fileobj
                    assert isinstance(lifeline, socket.socket)
                    self.selector.unregister(lifeline)
                    self.lifelines.discard(lifeline)
                    lifeline.close()
                    self.last_request = time.monotonic()
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_SECONDS
                if self._unneeded():
                    self._let_go()
                    return

    def _handle(self, conn: socket.socket) -> str | None:
        self.last_request = time.monotonic()
        keep_open = False
        try:
            conn.settimeout(10)
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
            request = json.loads(data or b"{}")
            op = request.get("op")
            if op == "put":
                names = request.get("names", [])
                if not isinstance(names, list) or len(names) != len(fds):
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b'{"ok": false, "error": "names and fds differ"}\n')
                    return None
                old = self.held
                self.held = {str(n): fd for n, fd in zip(names, fds)}
                for fd in old.values():
                    os.close(fd)  # after the new ones are held: the group never lapses
                conn.sendall(b'{"ok": true}\n')
            elif op == "get":
                socket.send_fds(conn, [json.dumps({"names": list(self.held)}).encode() + b"\n"],
                                list(self.held.values()))
            elif op == "attach":
                conn.sendall(b'{"ok": true}\n')
                conn.setblocking(False)
                self.selector.register(conn, selectors.EVENT_READ)
                self.lifelines.add(conn)
                keep_open = True
            elif op == "drop":
                self._let_go()
                conn.sendall(b'{"ok": true}\n')
                return "exit"
            else:
                for fd in fds:
                    os.close(fd)
                conn.sendall(b'{"ok": true}\n')
        except (OSError, ValueError, AttributeError):
            pass  # one bad client never takes the held fds down
        finally:
            if not keep_open:
                conn.close()
        return None

    def _unneeded(self) -> bool:
        """No daemon attached, none asked for a while, and no cache file is read by anyone."""
        if self.lifelines or time.monotonic() - self.last_request < QUIET_SECONDS:
            return False
        return not self._files_in_use()

    def _files_in_use(self) -> bool:
        if self.blobs_dir is None:
            return fdnames.FANOTIFY_GROUP in self.held  # cannot tell: keep what a reader may need
        by_key = {key: fd for name, fd in self.held.items() if (key := fdnames.blob_key(name)) is not None}
        try:
            volumes = [v for v in os.scandir(self.blobs_dir) if v.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return False
        except OSError:
            return True
        for volume in volumes:
            try:
                entries = list(os.scandir(volume.path))
            except OSError:
                return True
            for entry in entries:
                if not is_blob_id(entry.name):
                    continue
                fd = by_key.get(f"{volume.name}/{entry.name}")
                held = held_elsewhere(fd) if fd is not None else path_held_elsewhere(entry.path, write=True)
                if held:
                    return True
        return False

    def _let_go(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held = {}
        self.path.unlink(missing_ok=True)  # nobody connects to a keeper that is leaving


def serve(path: Path, listen_fd: int, blobs_dir: Path | None = None) -> None:
    """The keeper process itself: `listen_fd` is its socket, listening on `path` (`start`)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    Keeper(path, blobs_dir, listener).serve()


if __name__ == "__main__":  # keeper PATH LISTEN_FD [BLOBS_DIR], as `start` runs it
    serve(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
