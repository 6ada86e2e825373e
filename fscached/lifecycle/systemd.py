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

What the daemon keeps in the store is what every carrier keeps (fscached.lifecycle.carriers,
names in fscached.lifecycle.fdnames; $LISTEN_FDNAMES when it comes back): the fanotify group and
the cache files' write fds, or the bound /dev/cachefiles fd, and the "state" memfd.

The next process (after `systemctl restart`, a crash, `kill -9`, a watchdog kill) finds them
at fd 3.. ($LISTEN_FDS, $LISTEN_FDNAMES, $LISTEN_PID) and resumes from them.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Mapping, MutableMapping

from fscached.lifecycle import fdnames
from fscached.lifecycle.state_memfd import newest

if TYPE_CHECKING:
    pass

log = logging.getLogger("fscached.systemd")

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


# -- the service -----------------------------------------------------------------------------
class Service:
    """fscached run by systemd (or by the test stand-in speaking the same protocol)."""

    def __init__(self, inherited: list[tuple[str, int]], env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.inherited: dict[str, list[int]] = {}
        for name, fd in inherited:
            self.inherited.setdefault(fdnames.normalize(name), []).append(fd)
        # name -> (st_dev, st_ino) of what systemd holds: what it handed us is still in its store
        self.stored: dict[str, tuple[int, int]] = {}
        for name, fds in self.inherited.items():
            if name != "unknown":
                st = os.fstat(fds[0])
                self.stored[name] = (st.st_dev, st.st_ino)
        fdstore = self.env.get("FDSTORE")  # systemd 254+: FileDescriptorStoreMax
        self.fdstore_max: int | None = int(fdstore) if fdstore and fdstore.isdigit() else None
        self.watchdog = watchdog_seconds(self.env)
        self._watchdog_task: asyncio.Task[None] | None = None

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

    def take_all(self) -> dict[str, int]:
        """Every inherited fd by name (the caller owns them). Of several "state" memfds (an
        older one that survived a growth) the newest is taken and the others dropped from the
        store."""
        found: dict[str, int] = {}
        states = self.inherited.pop(fdnames.STATE, [])
        if states:
            best = newest(states)
            if best is None:
                log.warning("the state in systemd's fd store cannot be read: images bound at run time are not re-bound")
                self._remove(fdnames.STATE)
            else:
                found[fdnames.STATE] = best[1]
                if len(states) > 1:
                    self._remove(fdnames.STATE)
                    self._store_fd(fdnames.STATE, best[1])
        for name in list(self.inherited):
            if name == "unknown":
                continue
            fd = self.take(name)
            if fd is not None:
                found[name] = fd
        return found

    def close_unused(self) -> None:
        """Close what nobody took (our copies; systemd keeps its own until told otherwise)."""
        for name in list(self.inherited):
            fd = self.take(name)
            if fd is not None:
                os.close(fd)

    # -- the store -------------------------------------------------------------------------
    def _store_fd(self, name: str, fd: int) -> bool:
        if not fdnames.valid(name):
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

    def sync(self, fds: Mapping[str, int]) -> None:
        """Make the store hold exactly `fds` (by name): new ones are stored, gone ones removed,
        unchanged ones (same file) left alone. Kernel fds and the state first: when the store
        is full (FileDescriptorStoreMax) the write fds are the ones left out (a successor gets
        a blob's write fd from its first event instead)."""
        if not self.can_store:
            return
        room = self.fdstore_max if self.fdstore_max is not None else 1 << 30
        ordered = sorted(fds.items(), key=lambda item: item[0].startswith(fdnames.BLOB_PREFIX))
        for name in [n for n in self.stored if n not in fds]:
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
            if name in self.stored and name != fdnames.FANOTIFY_GROUP:
                self._remove(name)  # another file under that name: replace it (never the group:
                # between the two messages nothing would hold it; a second one is merely stored)
            if self._store_fd(name, fd):
                room -= 1

    def release(self) -> None:
        """Empty the store: a clean stop that leaves nothing in use (the next start is fresh)."""
        for name in list(self.stored):
            self._remove(name)

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


def _short(names: list[str]) -> list[str]:
    blobs = [n for n in names if n.startswith(fdnames.BLOB_PREFIX)]
    others = [n for n in names if not n.startswith(fdnames.BLOB_PREFIX)]
    return others + ([f"{len(blobs)} cache file(s)"] if blobs else [])
