"""The keeper: a tiny process that holds the fanotify group fd (and the cache files' write fds)
so a daemon killed with -9 never lets the kernel fall back to reading holes as zeros.

While the keeper holds the group, readers of a dead daemon's mounts wait (they do not read
zeros); a new `fscached` with the same cache dir takes the fds back and serves them. The keeper
listens on a unix socket (0600, in a 0700 directory) and speaks one JSON line per request:
  {"op": "put", "names": [...]} + the fds (SCM_RIGHTS)  store them (replacing what it held)
  {"op": "get"}                                          answer {"names": [...]} + the fds
  {"op": "drop"}                                         close everything and exit
Run as `python -m fscached.frontends.fanotify.keeper SOCKET`; the daemon starts it in a session of its own.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MAX_FDS = 250  # SCM_RIGHTS carries at most 253 fds per message
_SUN_PATH_MAX = 107


class KeeperError(Exception):
    """Talking to the keeper failed, worded for the user."""


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
    """The fds a running keeper holds, by name (the caller owns the copies); None when no
    keeper listens there."""
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
    return dict(zip((str(n) for n in names), fds))


def give(path: Path, fds: dict[str, int]) -> None:
    """Hand `fds` (copies; the caller keeps its own) to the keeper, replacing what it held."""
    if len(fds) > MAX_FDS:
        raise KeeperError(f"the keeper holds at most {MAX_FDS} fds, not {len(fds)}")
    answer, _ = _request(path, {"op": "put", "names": list(fds)}, tuple(fds.values()))
    if answer.get("ok") is not True:
        raise KeeperError(f"keeper at {path} refused the fds: {answer!r}")


def dismiss(path: Path) -> None:
    """Tell the keeper to let go and exit (a clean stop, once nothing marked is mounted)."""
    try:
        _request(path, {"op": "drop"})
    except (ConnectionRefusedError, FileNotFoundError):
        pass


def start(path: Path, timeout: float = 10) -> None:
    """Start a keeper on `path` (its directory must exist, 0700) and wait until it listens."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise KeeperError(f"keeper socket path {path} is longer than {_SUN_PATH_MAX} bytes: use a shorter cache dir")
    subprocess.Popen([sys.executable, "-m", "fscached.frontends.fanotify.keeper", str(path)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _request(path, {"op": "ping"}, timeout=1)
            return
        except OSError:
            time.sleep(0.02)
    raise KeeperError(f"the keeper did not start listening on {path} within {timeout:.0f} s")


def serve(path: Path) -> None:
    """The keeper process itself."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    held: dict[str, int] = {}
    if path.exists() or path.is_symlink():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(8)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            try:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
                request = json.loads(data or b"{}")
                op = request.get("op")
                if op == "put":
                    names = request.get("names", [])
                    if not isinstance(names, list) or len(names) != len(fds):
                        for fd in fds:
                            os.close(fd)
                        conn.sendall(b'{"ok": false, "error": "names and fds differ"}\n')
                        continue
                    old = held
                    held = dict(zip((str(n) for n in names), fds))
                    for fd in old.values():
                        os.close(fd)  # after the new ones are held: the group never lapses
                    conn.sendall(b'{"ok": true}\n')
                elif op == "get":
                    socket.send_fds(conn, [json.dumps({"names": list(held)}).encode() + b"\n"], list(held.values()))
                elif op == "drop":
                    for fd in held.values():
                        os.close(fd)
                    held = {}
                    path.unlink(missing_ok=True)  # before answering: nobody connects to a keeper that is leaving
                    conn.sendall(b'{"ok": true}\n')
                    return
                else:
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b'{"ok": true}\n')
            except (OSError, ValueError):
                continue  # one bad client never takes the held fds down


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
