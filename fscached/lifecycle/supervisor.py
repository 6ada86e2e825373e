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
import asyncio
import errno
import logging
import os
import platform
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Callable

from cachefiles.device import NO_RESTORE, CachefilesDevice, CachefilesError
from fscached.util import mounts
from fscached.core.catalog import CatalogError
from fscached.lifecycle.state import FD_CACHEFILES, HandoverError, HandoverState, capture, read_state
from fscached.frontends.cachefiles import Server

if TYPE_CHECKING:
    from fscached.daemon import Daemon

log = logging.getLogger("fscached.lifecycle.supervisor")

SUPERVISOR_TIMEOUT = 10.0  # the snapshotter listens for 10 s (SendStatesTimeout)
MAX_STATE_BYTES = 16 << 20
MAX_FDS = 64  # the snapshotter's receive buffer holds 64 fds
NEEDS_NEWER_KERNEL = (f"failover needs a newer kernel: {NO_RESTORE}; this kernel is {platform.release()}. "
                      "sendfd and takeover are refused: a restarted daemon could not resume the mounts "
                      "(set recover_policy = \"restart\" in nydus-snapshotter)")


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


# -- the daemon's side --------------------------------------------------------------------------
def check_kernel(daemon: Daemon) -> bool:
    """At start, on the cachefiles path, once bound: whether this kernel can fail over
    (`restore`). Says so in the log either way (a warning when it cannot)."""
    server = daemon.server
    if not isinstance(server, Server):
        log.warning("failover (sendfd / takeover) hands over /dev/cachefiles: the %s path has none", daemon.backend)
        return False
    try:
        supported = server.device.probe_restore()
    except CachefilesError as exc:
        log.warning("failover: could not ask the kernel for `restore`: %s", exc)
        return False
    if supported:
        log.info("failover: the kernel has cachefiles `restore`: sendfd / takeover supported")
    else:
        log.warning("%s", NEEDS_NEWER_KERNEL)
    return supported


def _default_device(fd: int) -> CachefilesDevice:
    return CachefilesDevice.from_fd(fd)


class Failover:
    """The supervisor protocol of one daemon (the API's sendfd / takeover / start call it).

    `waiting`: the daemon serves the API in INIT until a takeover. `upgrade`: a hot upgrade's
    new process (the old one still serves until told to exit: read the device only at start).
    `device_factory` makes the device of a received fd (tests: the kernel simulator's)."""

    def __init__(self, daemon: Daemon, supervisor: str | None, *, upgrade: bool = False, waiting: bool = False,
                 device_factory: Callable[[int], CachefilesDevice] | None = None,
                 timeout: float = SUPERVISOR_TIMEOUT) -> None:
        self.daemon = daemon
        self.supervisor = supervisor
        self.upgrade = upgrade
        self.waiting = waiting
        self.device_factory = device_factory or _default_device
        self.timeout = timeout
        self.taken_over = False
        self.started = False
        self.state: HandoverState | None = None
        self.sends = 0
        self.takeover_seconds: float | None = None
        self._busy = False
        self._aborted = False
        self._go = asyncio.Event()

    # -- sendfd ------------------------------------------------------------------------------
    async def send_fd(self) -> int:
        """Give the supervisor the state and the device fd. Returns the state's size."""
        if self.supervisor is None:
            raise FailoverError("sendfd: this daemon has no supervisor: start it with --supervisor PATH "
                                "(nydus-snapshotter does, with recover_policy = \"failover\")", 400, "BAD_REQUEST")
        server = self.daemon.server
        if not isinstance(server, Server):
            raise FailoverError(f"sendfd hands over /dev/cachefiles: this daemon serves the {self.daemon.backend} "
                                "path", 501, "UNSUPPORTED")
        device = server.device
        if device.restore_supported is None:
            try:  # not asked at start (a daemon embedded without nydusd_cli): a duplicate READ is dropped
                device.probe_restore()
            except CachefilesError as exc:
                raise FailoverError(f"sendfd: {exc}") from None
        if not device.restore_supported:
            raise FailoverError(f"sendfd refused: {NEEDS_NEWER_KERNEL}", 501, "UNSUPPORTED")
        try:
            data = capture(self.daemon, fd_names=[FD_CACHEFILES])
        except HandoverError as exc:
            raise FailoverError(f"sendfd: {exc}") from None
        assert self.supervisor is not None
        await asyncio.to_thread(send_states, self.supervisor, data, device.fileno(), self.timeout)
        self.daemon.handing_over = True  # the supervisor holds the device too: stops hand over
        self.sends += 1
        log.info("sendfd: state (%d bytes, %d image(s)) and /dev/cachefiles given to the supervisor %s",
                 len(data), len(self.daemon.catalog.images), self.supervisor)
        return len(data)

    # -- takeover ----------------------------------------------------------------------------
    async def take_over(self) -> HandoverState:
        """Receive the state and the device fd from the supervisor and serve what the previous
        daemon served. FailoverError (one line; the daemon stays in INIT) when it cannot."""
        if self.taken_over:
            raise FailoverError("takeover: this daemon has already taken over", 400, "BAD_REQUEST")
        if not self.waiting:
            raise FailoverError("takeover: this daemon is not waiting for one (it bound /dev/cachefiles itself); "
                                "a daemon restarted for failover waits in INIT", 400, "BAD_REQUEST")
        if self.supervisor is None:
            raise FailoverError("takeover: this daemon has no supervisor: start it with --supervisor PATH",
                                400, "BAD_REQUEST")
        if self._busy:
            raise FailoverError("takeover: one is already in progress", 409, "BUSY")
        self._busy = True
        started = time.monotonic()
        try:
            data, fds = await asyncio.to_thread(receive_states, self.supervisor, self.timeout)
            try:
                state, fd = self._check(data, fds)
            except BaseException:
                _close_all(fds)
                raise
            try:
                device = self.device_factory(fd)
            except BaseException:
                os.close(fd)
                raise
            try:
                await self._adopt(state, device)
            except BaseException:
                self._roll_back(device)
                raise
        finally:
            self._busy = False
        self.state = state
        self.taken_over = True
        self.takeover_seconds = time.monotonic() - started
        log.info("takeover: %d image(s) served again from the state of fscached %s, %s (%.0f ms)",
                 len(self.daemon.catalog.images), state.daemon_version or "?",
                 "restore waits for start (hot upgrade)" if self.upgrade else "restore written",
                 self.takeover_seconds * 1000)
        if not self.upgrade:
            self._go.set()
        return state

    def _check(self, data: bytes, fds: list[int]) -> tuple[HandoverState, int]:
        where = f"takeover from the supervisor {self.supervisor}"
        if not data and not fds:
            raise FailoverError(f"{where}: it had nothing to give (no daemon ever sent it a state: sendfd)")
        try:
            state = read_state(data)
        except HandoverError as exc:
            raise FailoverError(f"{where}: {exc}", 400, "BAD_REQUEST") from None
        if state.backend != "cachefiles":
            raise FailoverError(f"{where}: the state is a {state.backend} daemon's; this one takes over "
                                "/dev/cachefiles (cachefiles) only", 400, "BAD_REQUEST")
        if len(fds) != 1:
            raise FailoverError(f"{where}: expected exactly one fd (/dev/cachefiles), got {len(fds)}",
                                400, "BAD_REQUEST")
        if state.fd_names and FD_CACHEFILES not in state.fd_names:
            raise FailoverError(f"{where}: the state names its fds {', '.join(state.fd_names)}, not "
                                f"{FD_CACHEFILES}", 400, "BAD_REQUEST")
        mode = os.fstat(fds[0]).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            raise FailoverError(f"{where}: the fd is a {'file' if stat.S_ISREG(mode) else 'directory'}, "
                                "not /dev/cachefiles", 400, "BAD_REQUEST")
        return state, fds[0]

    async def _adopt(self, state: HandoverState, device: CachefilesDevice) -> None:
        daemon = self.daemon
        config = daemon.config
        if state.cache_dir != config.cache_dir:
            log.warning("takeover: the device is bound to the cache %s (the state's), not %s: serving %s",
                        state.cache_dir, config.cache_dir, state.cache_dir)
            config.cache_dir = state.cache_dir
        if state.work_dir is not None:
            config.work_dir = state.work_dir
        if state.cachefiles is not None:
            config.tag = state.cachefiles.tag
            if state.cachefiles.device is not None:
                config.device = state.cachefiles.device
        for bind in state.binds:
            spec = bind.spec
            if (spec.volume, spec.fsid) in daemon.catalog.images:
                continue  # configured on this daemon's own command line: served already
            try:
                path = bind.served_bootstrap if bind.served_bootstrap is not None and bind.served_bootstrap.is_file() \
                    else spec.bootstrap
                if path is None or not path.is_file():
                    if spec.ref is None:
                        raise CatalogError(f"image {spec.fsid}: bootstrap {path} not found")
                    path = await daemon.pull_image_bootstrap(spec)
                daemon.catalog.add_image(spec, path, daemon.pool.chain(spec))
            except (CatalogError, OSError, ValueError) as exc:
                # the others are still served: this image's mounts get errors, not a hang
                log.error("takeover: image %s cannot be served again: %s", spec.fsid, exc)
                continue
            got = tuple(blob.info.blob_id for blob in daemon.catalog.devices.get((spec.volume, spec.fsid), []))
            if bind.blob_ids and got != bind.blob_ids:
                log.warning("takeover: image %s: its bootstrap now names other blobs than the previous daemon "
                            "served (%d vs %d): was it replaced?", spec.fsid, len(got), len(bind.blob_ids))
        server = Server(device, daemon.catalog, daemon.executor, config.read_window)
        server.device_shared = self.upgrade
        daemon.backend = "cachefiles"
        daemon.loaded = True
        daemon.server = server
        daemon.handing_over = True  # the supervisor holds the device too
        table = mounts.erofs_mount_table()
        for spec in daemon.catalog.images.values():
            if spec.mountpoint is not None and str(spec.mountpoint) in table and spec.mountpoint not in daemon.mounted:
                daemon.mounted.append(spec.mountpoint)  # still mounted: unmounted at a clean stop as before
        if not self.upgrade:
            self._restore(device)

    def _restore(self, device: CachefilesDevice) -> None:
        try:
            device.restore()
        except CachefilesError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                raise FailoverError(f"takeover: {NEEDS_NEWER_KERNEL}", 501, "UNSUPPORTED") from None
            raise FailoverError(f"takeover: {exc}") from None

    def _roll_back(self, device: CachefilesDevice) -> None:
        """A takeover that failed half-way: back to INIT with nothing of it kept (the
        supervisor still holds the device: the next takeover starts from scratch)."""
        daemon = self.daemon
        for volume, fsid in list(daemon.catalog.images):
            try:
                daemon.catalog.remove_image(volume, fsid)
            except CatalogError:
                pass
        if daemon.server is not None and getattr(daemon.server, "device", None) is device:
            daemon.server = None
        daemon.mounted.clear()
        daemon.handing_over = False
        device.close()

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """PUT /api/v1/daemon/start after a takeover. A hot upgrade's new process writes
        `restore` now (the old one was told to exit) and starts reading the device."""
        if not self.taken_over or self.started:
            return
        self.started = True
        if self.upgrade:
            server = self.daemon.server
            assert isinstance(server, Server)
            try:
                server.device.restore()
            except CachefilesError as exc:
                log.warning("start: restore failed (%s): READs the old daemon left wait for it to exit", exc)
            self._go.set()

    def abort(self) -> None:
        """Exit asked for while waiting (INIT, or an upgrade waiting for start). On the
        daemon's loop (an asyncio.Event)."""
        self._aborted = True
        self._go.set()

    async def wait_until_serving(self) -> bool:
        """In INIT: wait for the takeover (and, for a hot upgrade, for start). False when the
        daemon was told to exit instead."""
        await self._go.wait()
        return not self._aborted

    @property
    def ready(self) -> bool:
        """Taken over and waiting for start, or starting to serve: the snapshotter sees READY."""
        return self.taken_over and not self._aborted
