"""nydus-snapshotter's supervisor protocol on the cachefiles path (recover_policy = "failover",
and hot upgrade): the daemon's side of the snapshotter's pkg/supervisor, as nydusd speaks it.

The supervisor is a unix socket (`--supervisor PATH`) the snapshotter listens on only while it
wants something: it listens, then asks the daemon through the API, and the daemon connects.

    sendfd    PUT /api/v1/daemon/fuse/sendfd (READY or RUNNING). The snapshotter listens, then
              calls it once the daemon is RUNNING and after each mount. The daemon connects,
              sends its hand-over state (fscached.lifecycle.state.capture: every bind in order, with
              its source config) in one sendmsg carrying the /dev/cachefiles fd (SCM_RIGHTS),
              and closes: the supervisor reads until EOF, wants exactly one fd, and keeps both
              (a later state replaces the earlier one). From then on the device outlives this
              process, so every stop is a hand-over (Daemon.handing_over): mounts stay, and no
              READ is completed without its data.
    restart   The daemon died (kill -9, crash). The snapshotter starts it again with the same
              command line; /dev/cachefiles is busy (the supervisor holds it) and the API
              socket is stale: the daemon serves the API in INIT (fscached.nydusd_cli).
    takeover  PUT /api/v1/daemon/fuse/takeover (INIT). The snapshotter listens first; the daemon
              connects and receives until EOF: the state and exactly one fd. It reads the state
              (a newer format, another backend or garbage: a one-line error, and it stays in
              INIT), adopts the fd (the cache is bound already: no `dir`, no `bind`), re-adds
              every bind in order, and writes `restore`: the kernel marks the requests the dead
              daemon had taken as new, re-opens the objects whose anon fds died with it (fresh
              OPENs, new object ids) and sends their READs again. State READY.
    start     PUT /api/v1/daemon/start: READY -> RUNNING.

Hot upgrade (`nydusd ... --upgrade`, a new API socket): the snapshotter listens, starts the new
process (INIT), calls takeover on it, waits for READY, calls exit on the old daemon, then start
on the new one. The old daemon still serves between takeover and its exit, so the new one waits
for start before it reads the device or writes `restore`. The old one's exit is a hand-over: its
READs in flight get a moment to finish with their data, the rest are left; it closes its anon
fds and writes `restore` itself, so what it left goes to the new daemon (re-opened objects).

`restore` is Linux 6.8+ (and 6.1.95+): older kernels answer EOPNOTSUPP. `check_kernel` says so
at start, and sendfd / takeover are refused with that reason rather than pretending.
"""
from __future__ import annotations

import array
import logging
import os
import socket
import struct

log = logging.getLogger("fscached.supervisor")

SUPERVISOR_TIMEOUT = 10.0  # the snapshotter listens for 10 s (SendStatesTimeout)
MAX_STATE_BYTES = 16 << 20
MAX_FDS = 64  # the snapshotter's receive buffer holds 64 fds


class FailoverError(Exception):
    """A failover request that cannot be done, in one line, with the API status it maps to."""

    def __init__(self, message: str, status: int = 500, code: str = "DAEMON_ERROR") -> None:
        super().__init__(" ".join(str(message).split()))
        self.status = status
        self.code = code


# -- the supervisor socket ---------------------------------------------------------------------
def _connect(path: str, timeout: float, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise FailoverError(f"{what}: no supervisor socket {path} (the supervisor listens only while it asks "
                            "for sendfd or takeover: for 10 s from before it starts the daemon, with "
                            "nydus-snapshotter)") from None
    except ConnectionRefusedError:
        sock.close()
        raise FailoverError(f"{what}: nothing listens on the supervisor socket {path}") from None
    except OSError as exc:
        sock.close()
        raise FailoverError(f"{what}: supervisor socket {path}: {exc.strerror or exc}") from None
    try:  # the device fd goes there, and the state that comes back is trusted: root's or ours only
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
    except OSError as exc:
        sock.close()
        raise FailoverError(f"{what}: supervisor socket {path}: cannot tell who listens: {exc.strerror}") from None
    if uid not in (0, os.geteuid()):
        sock.close()
        raise FailoverError(f"{what}: the supervisor socket {path} is served by uid {uid} (pid {pid}), neither root "
                            "nor this daemon's user: refused")
    return sock


def send_states(path: str, data: bytes, fd: int, timeout: float = SUPERVISOR_TIMEOUT) -> None:
    """Connect to the supervisor and give it `data` with `fd` (SCM_RIGHTS on the first
    message, as nydusd's send_with_fd), then close: it reads until EOF. Blocking."""
    sock = _connect(path, timeout, "sendfd")
    try:
        view = memoryview(data)
        sent = sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        if sent < len(view):
            sock.sendall(view[sent:])
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise FailoverError(f"sendfd: sending the state to the supervisor {path} failed: "
                            f"{exc.strerror or exc}") from None
    finally:
        sock.close()


def receive_states(path: str, timeout: float = SUPERVISOR_TIMEOUT,
                   max_bytes: int = MAX_STATE_BYTES) -> tuple[bytes, list[int]]:
    """Connect to the supervisor and take what it gives until EOF: the state bytes and the
    fds (close-on-exec). Blocking; on error no fd is left open."""
    sock = _connect(path, timeout, "takeover")
    data = bytearray()
    fds: list[int] = []
    try:
        while True:
            msg, ancillary, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4),
                                                    socket.MSG_CMSG_CLOEXEC)
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % 4
                    fds.extend(array.array("i", cdata[:usable]))
            if flags & socket.MSG_CTRUNC:
                raise FailoverError(f"takeover: the supervisor {path} sent more fds than {MAX_FDS}")
            if not msg:
                break
            data += msg
            if len(data) > max_bytes:
                raise FailoverError(f"takeover: the supervisor {path} sent more than {max_bytes} bytes of state")
    except OSError as exc:
        _close_all(fds)
        raise FailoverError(f"takeover: receiving the state from the supervisor {path} failed: "
                            f"{exc.strerror or exc}") from None
    except BaseException:
        _close_all(fds)
        raise
    finally:
        sock.close()
    return bytes(data), fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class Supervisor:
    """The daemon's end of one supervisor socket (`--supervisor PATH`).

    `keep_offer` keeps a state and its fds taken from the supervisor before the takeover asked
    for them (a restarted `nydusd` takes them as it starts: fscached.nydusd_cli): the next
    `receive` returns them instead of connecting again. This module imports asyncio only when
    it serves (the early take runs before the daemon's imports)."""

    def __init__(self, path: str, timeout: float = SUPERVISOR_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._offer: tuple[bytes, list[int]] | None = None

    def keep_offer(self, data: bytes, fds: list[int]) -> None:
        self.drop_offer()
        self._offer = (data, list(fds))

    def drop_offer(self) -> None:
        """The kept state is not needed (the daemon took the kernel path itself): its fds closed."""
        offer, self._offer = self._offer, None
        if offer is not None:
            _close_all(offer[1])

    async def send(self, state: bytes, fd: int) -> None:
        """sendfd: the state and the one kernel fd the snapshotter keeps (FailoverError)."""
        import asyncio

        await asyncio.to_thread(send_states, self.path, state, fd, self.timeout)

    async def receive(self) -> tuple[bytes, list[int]]:
        """takeover: the state and the fds the supervisor kept (FailoverError): the ones taken
        early when there are, else from the supervisor now."""
        offer, self._offer = self._offer, None
        if offer is not None:
            log.info("takeover: the state (%d bytes, %d fd(s)) taken from the supervisor %s at start", len(offer[0]),
                     len(offer[1]), self.path)
            return offer
        import asyncio

        return await asyncio.to_thread(receive_states, self.path, self.timeout)
