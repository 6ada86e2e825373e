"""The API's unix socket: a safe place for it (`check_socket_path`) and a socket listening there,
0600 from the moment it appears (`bind_listening`).

Light on purpose (os, socket, stat): `nydusd` binds its API socket with it before it imports the
daemon (fscached.nydusd_cli), and the API server (fscached.api.server) binds with it otherwise.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger("fscached.api")

SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its NUL
BACKLOG = 128


class ApiSocketError(Exception):
    """The API socket cannot be served at that path (worded for the user, one line)."""


def check_socket_path(path: Path) -> bool:
    """Make the API socket's directory safe (0700 when we create it) and clear a stale socket.
    Raises ApiSocketError; nothing is created for a path that cannot be a socket. True when a
    stale socket (nobody answers on it) was removed."""
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise ApiSocketError(f"API socket path {path} is {len(os.fsencode(path))} bytes: a unix socket path must be "
                             f"shorter than {SUN_PATH_MAX}")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o700, parents=True)
            os.chmod(parent, 0o700)  # not widened by the umask, whatever it is
        except OSError as exc:
            raise ApiSocketError(f"cannot create the API socket directory {parent}: {exc.strerror}") from None
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise ApiSocketError(f"API socket directory {parent}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ApiSocketError(f"API socket directory {parent} is not a directory")
    me = os.geteuid()
    if st.st_uid != me and st.st_mode & 0o022:
        raise ApiSocketError(f"API socket directory {parent} is writable by others and not owned by this user "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}): another user could replace "
                             "the socket; use a directory of our own (it is created 0700 when missing)")
    if st.st_uid not in (me, 0):
        raise ApiSocketError(f"API socket directory {parent} belongs to uid {st.st_uid}, not to this user: "
                             "use a directory of our own (it is created 0700 when missing)")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(existing.st_mode):
        raise ApiSocketError(f"API socket path {path} exists and is not a socket: not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: its daemon is gone
        log.info("removed the stale API socket %s", path)
        return True
    except OSError as exc:
        raise ApiSocketError(f"API socket {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ApiSocketError(f"API socket {path} is in use: another daemon answers on it")


class Listener:
    """A unix socket listening at `path`, and the identity (st_dev, st_ino) of its file there:
    whoever stops serving removes the file only while it is still this one (not a successor's)."""

    def __init__(self, sock: socket.socket, path: Path, ident: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self.ident = ident

    def is_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        self.sock.close()
        if self.is_ours():
            self.path.unlink(missing_ok=True)


def bind_listening(path: Path, backlog: int = BACKLOG, what: str = "the API") -> Listener:
    """A socket listening at `path` (checked first with check_socket_path). It is bound under a
    temporary name, made 0600, listening, then renamed into place: it appears at its path
    listening and 0600 at once (a client waiting for it never sees it wider, nor refusing).
    A connection made before anyone accepts waits in the backlog. ApiSocketError, naming `what`
    is served there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(tmp)) >= SUN_PATH_MAX:
        tmp = path  # no room for a longer name: bound in place, then narrowed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        if tmp != path:
            os.rename(tmp, path)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        if tmp != path:
            tmp.unlink(missing_ok=True)
        raise ApiSocketError(f"cannot serve {what} on {path}: {exc.strerror or exc}") from None
    return Listener(sock, path, (st.st_dev, st.st_ino))
