"""fscached as a systemd service: sd_notify, the watchdog, the fd store, LISTEN_FDS.

The protocol is spoken here directly (no dependency): a datagram of `KEY=VALUE` lines to the
unix socket named by $NOTIFY_SOCKET ('@' = the abstract namespace), fds attached with
SCM_RIGHTS for FDSTORE=1.

    READY=1                    once the daemon answers the kernel and has mounted its images
    STATUS=...                 one line for `systemctl status`
    STOPPING=1                 a stop began
    WATCHDOG=1                 from the event loop, every third of $WATCHDOG_USEC: a loop
                               that is stuck stops sending it and systemd restarts the daemon
    FDSTORE=1 FDNAME=n FDPOLL=0 + fd    keep this fd for the next process (FDPOLL=0: the
                               cachefiles device reports POLLERR when it wants culling, which
                               must not make systemd drop it)
    FDSTOREREMOVE=1 FDNAME=n   drop it (a clean stop with nothing left mounted)

What the daemon keeps in the store (names in $LISTEN_FDNAMES when it comes back):
    "fanotify-group"           the fanotify group: while systemd holds it, readers of a dead
                               daemon's mounts wait instead of reading holes as zeros
    "blob=<volume>/<blob id>"  a cache file's non-notifying write fd (':' is %3A: systemd
                               refuses ':' in a name)
    "cachefiles"               the bound /dev/cachefiles fd: the next process writes `restore`
    "state"                    a memfd with the hand-over state (fscached.lifecycle.state), rewritten in
                               place at every bind and unbind (two slots, the newest valid one wins)

The next process (after `systemctl restart`, a crash, `kill -9`, a watchdog kill) finds them
at fd 3.. ($LISTEN_FDS, $LISTEN_FDNAMES, $LISTEN_PID) and resumes from them.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import platform
import socket
import struct
import zlib
from typing import TYPE_CHECKING, Mapping, MutableMapping

from fscached.lifecycle.state import FD_CACHEFILES, FD_FANOTIFY_GROUP, HandoverError, HandoverState, capture, read_state

if TYPE_CHECKING:
    from cachefiles.device import CachefilesDevice
    from fscached.daemon import Daemon

log = logging.getLogger("fscached.lifecycle.systemd")

LISTEN_FDS_START = 3
FD_STATE = "state"
FD_BLOB_PREFIX = "blob="
FDNAME_MAX = 255
SCM_MAX_FDS = 250  # the kernel takes at most 253 fds in one SCM_RIGHTS message
_SEND_TIMEOUT = 5.0


class SystemdError(Exception):
    """What came from systemd cannot be used, worded for the user."""


# -- sd_notify -------------------------------------------------------------------------------
def _notify_address(env: Mapping[str, str]) -> str | bytes | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()  # the abstract namespace
    if not path.startswith("/"):
        return None  # vsock: addresses are not ours to speak
    return path


def notify(message: str, fds: list[int] | tuple[int, ...] = (), *,
           env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (newline-separated KEY=VALUE lines) with `fds` attached. False
    when there is no $NOTIFY_SOCKET (not run by systemd with Type=notify) or sending failed
    (logged)."""
    address = _notify_address(os.environ if env is None else env)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(_SEND_TIMEOUT)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sock.sendmsg([message.encode()], ancillary, 0, address)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message.split("\n", 1)[0], exc.strerror or exc)
            return False
    return True


# -- LISTEN_FDS ------------------------------------------------------------------------------
def listen_fds(env: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[tuple[str, int]]:
    """The fds systemd passed (name, fd), from fd 3 on; [] when none are meant for this
    process ($LISTEN_PID names another). They are made close-on-exec; with `unset` the
    LISTEN_* variables are removed so children do not take them for theirs."""
    environ = os.environ if env is None else env
    try:
        pid = int(environ.get("LISTEN_PID", "0"))
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise SystemdError(f"LISTEN_PID={environ.get('LISTEN_PID')!r} / LISTEN_FDS={environ.get('LISTEN_FDS')!r} "
                           "are not numbers") from None
    names = environ.get("LISTEN_FDNAMES", "")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    split = names.split(":") if names else []
    found = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise SystemdError(f"LISTEN_FDS={count} but fd {fd} is not open") from None
        found.append((split[i] if i < len(split) else "unknown", fd))
    return found


def watchdog_seconds(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process ($WATCHDOG_USEC, $WATCHDOG_PID)."""
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 1e6


# -- fd names --------------------------------------------------------------------------------
def blob_store_name(volume: str, blob_id: str) -> str | None:
    """The store name of a cache file's write fd; None when it would be too long."""
    name = FD_BLOB_PREFIX + volume.replace("%", "%25").replace(":", "%3A") + "/" + blob_id
    return name if len(name) <= FDNAME_MAX else None


def blob_from_store_name(name: str) -> str | None:
    """"<volume>/<blob id>" of a store name made by blob_store_name."""
    if not name.startswith(FD_BLOB_PREFIX):
        return None
    return name[len(FD_BLOB_PREFIX):].replace("%3A", ":").replace("%25", "%")


def valid_fdname(name: str) -> bool:
    return len(name) <= FDNAME_MAX and all(" " <= c < "\x7f" and c != ":" for c in name)


# -- the state memfd -------------------------------------------------------------------------
# Header (page 0): magic, seq, active slot, slot capacity, then per slot (length, crc32).
# The bytes are written into the inactive slot first, then the header points at it: a daemon
# killed in the middle leaves the previous state readable.
_MAGIC = b"FSCSTAT1"
_HEADER = struct.Struct("<8sQIIQIQI")
_PAGE = 4096


class StateMemfd:
    def __init__(self, capacity: int = 64 << 10) -> None:
        self.capacity = capacity
        self.fd = os.memfd_create("fscached-state", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _PAGE + 2 * capacity)
        self.seq = 0
        self.active = 1
        self.slots = [(0, 0), (0, 0)]

    def write(self, data: bytes) -> None:
        if len(data) > self.capacity:
            raise ValueError("state larger than the memfd's slots")
        slot = 1 - self.active
        os.pwrite(self.fd, data, _PAGE + slot * self.capacity)
        self.slots[slot] = (len(data), zlib.crc32(data))
        self.seq += 1
        self.active = slot
        (l0, c0), (l1, c1) = self.slots
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, self.seq, slot, self.capacity, l0, c0, l1, c1), 0)

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def read(fd: int) -> tuple[int, bytes] | None:
        """(seq, bytes) of the newest valid slot of a state memfd; None when there is none."""
        try:
            head = os.pread(fd, _HEADER.size, 0)
            magic, seq, active, capacity, l0, c0, l1, c1 = _HEADER.unpack(head)
        except (OSError, struct.error):
            return None
        if magic != _MAGIC or active > 1:
            return None
        slots = [(l0, c0), (l1, c1)]
        for slot in (active, 1 - active):  # the active one, else the one before it
            length, crc = slots[slot]
            if not 0 < length <= capacity:
                continue
            data = os.pread(fd, length, _PAGE + slot * capacity)
            if len(data) == length and zlib.crc32(data) == crc:
                return (seq if slot == active else seq - 1), data
        return None


# -- the service -----------------------------------------------------------------------------
class Service:
    """fscached run by systemd (or by the test stand-in speaking the same protocol)."""

    def __init__(self, inherited: list[tuple[str, int]], env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.inherited: dict[str, list[int]] = {}
        for name, fd in inherited:
            self.inherited.setdefault(name, []).append(fd)
        # name -> (st_dev, st_ino) of what systemd holds: what it handed us is still in its store
        self.stored: dict[str, tuple[int, int]] = {}
        for name, fds in self.inherited.items():
            if name != "unknown":
                st = os.fstat(fds[0])
                self.stored[name] = (st.st_dev, st.st_ino)
        fdstore = self.env.get("FDSTORE")  # systemd 254+: FileDescriptorStoreMax
        self.fdstore_max: int | None = int(fdstore) if fdstore and fdstore.isdigit() else None
        self.watchdog = watchdog_seconds(self.env)
        self.state: HandoverState | None = None
        self._state_memfd: StateMemfd | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self.failover = True  # cachefiles: False on a kernel without `restore`
        self._read_state()

    @classmethod
    def from_environment(cls) -> Service | None:
        """The service when systemd runs us ($NOTIFY_SOCKET, or fds passed for this pid)."""
        inherited = listen_fds()
        if not inherited and _notify_address(os.environ) is None:
            return None
        service = cls(inherited, os.environ)
        os.environ.pop("NOTIFY_SOCKET", None)  # children (the API's helpers, mount) are not the service
        return service

    @property
    def can_store(self) -> bool:
        return _notify_address(self.env) is not None and self.fdstore_max != 0

    @property
    def keeps_kernel_fd(self) -> bool:
        """The store keeps our kernel fd for the next process (a stop may leave mounts to it)."""
        return self.can_store and self.failover

    def describe_start(self) -> str:
        got = sorted(self.inherited)
        if not got:
            return "run by systemd: nothing in the fd store, a fresh start"
        return f"run by systemd: took {sum(len(v) for v in self.inherited.values())} fd(s) from its store ({', '.join(_short(got))})"

    # -- inherited fds ---------------------------------------------------------------------
    def take(self, name: str) -> int | None:
        """One inherited fd by name (the caller owns it); extra fds of that name are closed."""
        fds = self.inherited.pop(name, [])
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else None

    def take_blob_fds(self) -> dict[str, int]:
        """The cache files' write fds, by "<volume>/<blob id>"."""
        found = {}
        for name in [n for n in self.inherited if n.startswith(FD_BLOB_PREFIX)]:
            key = blob_from_store_name(name)
            fd = self.take(name)
            if key is not None and fd is not None:
                found[key] = fd
        return found

    def close_unused(self) -> None:
        """Close what nobody took (our copies; systemd keeps its own until told otherwise)."""
        for name in list(self.inherited):
            fd = self.take(name)
            if fd is not None:
                os.close(fd)

    def _read_state(self) -> None:
        """The newest readable hand-over state among the "state" memfds; the newest one is kept
        (written in place from now on), older ones are closed and dropped from the store."""
        fds = self.inherited.pop(FD_STATE, [])
        best: tuple[int, bytes, int] | None = None
        for fd in fds:
            got = StateMemfd.read(fd)
            if got is not None and (best is None or got[0] > best[0]):
                best = (got[0], got[1], fd)
        for fd in fds:
            if best is None or fd != best[2]:
                os.close(fd)
        if best is None:
            if fds:
                log.warning("the state in systemd's fd store cannot be read: images bound at run time are not re-bound")
            return
        try:
            self.state = read_state(best[1])
        except HandoverError as exc:
            log.error("%s: images bound at run time are not re-bound", exc)
            os.close(best[2])
            return
        memfd = StateMemfd.__new__(StateMemfd)
        memfd.fd = best[2]
        _, _, active, capacity, l0, c0, l1, c1 = _HEADER.unpack(os.pread(memfd.fd, _HEADER.size, 0))
        memfd.capacity, memfd.seq, memfd.active, memfd.slots = capacity, best[0], active, [(l0, c0), (l1, c1)]
        self._state_memfd = memfd
        if len(fds) > 1:  # several: an older one survived a growth; keep only the newest
            self.stored.pop(FD_STATE, None)
            notify(f"FDSTOREREMOVE=1\nFDNAME={FD_STATE}", env=self.env)
            self._store_fd(FD_STATE, memfd.fd)

    # -- the store -------------------------------------------------------------------------
    def _store_fd(self, name: str, fd: int) -> bool:
        if not valid_fdname(name):
            log.warning("fd %r cannot be named in systemd's store: not stored", name)
            return False
        if not notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd], env=self.env):
            return False
        st = os.fstat(fd)
        self.stored[name] = (st.st_dev, st.st_ino)
        return True

    def _remove(self, name: str) -> None:
        if self.stored.pop(name, None) is not None:
            notify(f"FDSTOREREMOVE=1\nFDNAME={name}", env=self.env)

    def sync(self, fds: Mapping[str, int], *, keep: tuple[str, ...] = (FD_STATE,)) -> None:
        """Make the store hold exactly `fds` (by store name) besides `keep`: new ones are
        stored, gone ones removed, unchanged ones (same file) left alone. Kernel fds first:
        when the store is full (FileDescriptorStoreMax) the write fds are the ones left out
        (a successor gets a blob's write fd from its first event instead)."""
        if not self.can_store:
            return
        room = (self.fdstore_max if self.fdstore_max is not None else 1 << 30) - (1 if FD_STATE in keep else 0)
        ordered = sorted(fds.items(), key=lambda item: item[0].startswith(FD_BLOB_PREFIX))
        for name in [n for n in self.stored if n not in fds and n not in keep]:
            self._remove(name)
        for name, fd in ordered:
            st = os.fstat(fd)
            if self.stored.get(name) == (st.st_dev, st.st_ino):
                room -= 1
                continue
            if room <= 0:
                log.warning("systemd's fd store is full (FileDescriptorStoreMax=%s): %s not stored",
                            self.fdstore_max, name)
                continue
            if name in self.stored and name != FD_FANOTIFY_GROUP:
                self._remove(name)  # another file under that name: replace it (never the group:
                # between the two messages nothing would hold it; a second one is merely stored)
            if self._store_fd(name, fd):
                room -= 1

    def store_state(self, daemon: Daemon) -> None:
        """Write the daemon's hand-over state into the memfd (stored once, then rewritten in
        place). Call it on the daemon's loop, after every bind and unbind."""
        if not self.can_store:
            return
        try:
            data = capture(daemon, fd_names=sorted(n for n in self.stored if n != FD_STATE))
        except HandoverError as exc:
            log.error("the hand-over state cannot be written: %s", exc)
            return
        memfd = self._state_memfd
        if memfd is None or len(data) > memfd.capacity:
            bigger = StateMemfd(max(64 << 10, 1 << (2 * len(data)).bit_length()))
            bigger.write(data)
            if memfd is not None:
                self._remove(FD_STATE)
                memfd.close()
            self._state_memfd = bigger
            self._store_fd(FD_STATE, bigger.fd)
            return
        memfd.write(data)

    def release(self) -> None:
        """Empty the store: a clean stop that leaves nothing mounted (the next start is fresh)."""
        for name in list(self.stored):
            self._remove(name)
        if self._state_memfd is not None:
            self._state_memfd.close()
            self._state_memfd = None

    # -- notifications ---------------------------------------------------------------------
    def ready(self, status: str) -> None:
        notify(f"READY=1\nSTATUS={status}", env=self.env)

    def status(self, status: str) -> None:
        notify(f"STATUS={status}", env=self.env)

    def stopping(self) -> None:
        notify("STOPPING=1\nSTATUS=stopping", env=self.env)

    def start_watchdog(self) -> None:
        """WATCHDOG=1 from the running event loop, three times per timeout."""
        if self.watchdog is None or self._watchdog_task is not None:
            return
        self._watchdog_task = asyncio.ensure_future(self._pet(self.watchdog / 3))

    async def _pet(self, every: float) -> None:
        while True:
            notify("WATCHDOG=1", env=self.env)
            await asyncio.sleep(every)

    def stop_watchdog(self) -> None:
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None


# -- the fanotify path's holder of its fds ---------------------------------------------------
class FanotifyStore:
    """fscached.frontends.fanotify.frontend's holder of the group and write fds under systemd (instead
    of the keeper process, which systemd would kill with the service's cgroup). Names inside
    the frontend are the keeper's: "group" and "blob:<volume>/<blob id>"."""

    what = "systemd's fd store"

    def __init__(self, service: Service) -> None:
        self.service = service

    def take(self) -> dict[str, int] | None:
        group = self.service.take(FD_FANOTIFY_GROUP)
        blobs = self.service.take_blob_fds()
        if group is None:
            for fd in blobs.values():
                os.close(fd)
            return None
        handed = {"group": group}
        handed.update({f"blob:{key}": fd for key, fd in blobs.items()})
        return handed

    def start(self) -> None:
        if not self.service.can_store:
            log.warning("run by systemd without an fd store (FileDescriptorStoreMax=0, or no NOTIFY_SOCKET): "
                        "if this daemon dies, reads of its mounts are let through by the kernel (holes read as zeros)")

    def give(self, fds: Mapping[str, int]) -> None:
        named: dict[str, int] = {}
        for name, fd in fds.items():
            if name == "group":
                named[FD_FANOTIFY_GROUP] = fd
            elif name.startswith("blob:"):
                volume, _, blob_id = name[len("blob:"):].rpartition("/")
                store_name = blob_store_name(volume, blob_id)
                if store_name is not None:
                    named[store_name] = fd
        self.service.sync(named)

    def dismiss(self) -> None:
        self.service.release()


# -- which kernel path ------------------------------------------------------------------------
def stored_backend(service: Service, backend: str, why: str) -> tuple[str, str]:
    """The kernel path the fd store decides: a kept group or device is served by its own path
    (SystemdError when the configuration asks for the other one)."""
    for name, path in ((FD_FANOTIFY_GROUP, "fanotify"), (FD_CACHEFILES, "cachefiles")):
        if name in service.inherited:
            if backend not in ("auto", path):
                raise SystemdError(f"systemd's fd store holds a {path} kernel fd (a previous fscached served "
                                   f"through {path}) but --backend is {backend}: run with --backend {path}, or "
                                   "stop the service (systemctl stop), unmount its images and start it again")
            return path, "taken back from systemd's fd store"
    return backend, why


# -- cachefiles ------------------------------------------------------------------------------
def keep_device(service: Service, device: CachefilesDevice) -> None:
    """After `bind`: keep the device in systemd's fd store when the kernel can hand it over
    (`restore`); say at start when it cannot."""
    from cachefiles.device import NO_RESTORE

    service.failover = device.probe_restore()
    if service.failover:
        service.sync({FD_CACHEFILES: device.fileno()})
    else:
        log.warning("failover needs a newer kernel: %s; this kernel is %s. /dev/cachefiles is not kept in "
                    "systemd's fd store: after a restart or a crash the mounts it serves fail with EIO and "
                    "must be mounted again", NO_RESTORE, platform.release())


def _short(names: list[str]) -> list[str]:
    blobs = [n for n in names if n.startswith(FD_BLOB_PREFIX)]
    others = [n for n in names if not n.startswith(FD_BLOB_PREFIX)]
    return others + ([f"{len(blobs)} cache file(s)"] if blobs else [])
