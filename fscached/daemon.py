"""The daemon: take a kernel path (fanotify or cachefiles), serve the images bound to it, mount
what it was asked to, survive restarts, stop without ever leaving a reader to holes.

    INIT ──> READY ──> RUNNING ──> STOPPING ──> STOPPED
      │        │                      ^
      └────────┴──────────────────────┘

INIT: loading, or waiting for a takeover (a failover restart, a hot upgrade). READY: the kernel
path is served and the images bound, not yet started (nydusd's `start`; a hot upgrade waits
here while its predecessor still serves). RUNNING. STOPPING: a stop was asked for; no new bind
is taken; the daemon serves until nothing it must watch is read (or hands over). STOPPED.

Images are `fscached.images.Image` state machines in `self.images`; the catalog
(fscached.core.catalog) holds what the frontend serves. Every restart, however it comes (a
keeper or systemd's fd store kept the kernel fds, nydus-snapshotter's supervisor gives them
back at a takeover), goes through one path: the carried fds and the hand-over state are taken
(`_take_carried`), the binds of the state are put back (`_restore_binds`), and the mounts still
there are adopted by the same code that mounts (`_mount`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import errno
import json
import logging
import os
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cachefiles.device import CachefilesDevice, CachefilesError, check_cache_dir
from erofs_image.index import BootstrapIndex
from erofs_image.reader import Bootstrap
from fanotify.group import FanotifyError
from fscached.cache_gc import CacheJanitor
from fscached.config import Config, ImageSpec, ProfileSpec
from fscached.core.catalog import Catalog, CatalogError, open_bootstrap
from erofs_image.profile import ProfileError, StartupProfile, bootstrap_digest
from fscached.core.profile_recorder import ProfileRecorders
from fscached.core.sources import SourcePool
from fscached.frontends.base import Frontend, KernelPathLost
from fscached.frontends.cachefiles import CachefilesFrontend, RestoreUnsupported
from fscached.frontends.cachefiles.frontend import NEEDS_NEWER_KERNEL
from fscached.frontends.fanotify.frontend import FanotifyFrontend
from fscached.frontends.fanotify.keeper import socket_path as keeper_socket
from fscached.images import AlreadyBound, BusyError, Image, ImageState, ImageTable, MountpointTaken, NotBound
from fscached.kernel_path import choose_kernel_path
from fscached.lifecycle import fdnames
from fscached.lifecycle.carriers import FdCarrier, KeeperCarrier, SystemdStore, close_all
from fscached.lifecycle.state import (Bind, CachefilesInfo, FanotifyPointers, HandoverError, HandoverState, encode,
                                      read_state)
from fscached.lifecycle.state_memfd import StateMemfd
from fscached.lifecycle.supervisor import FailoverError, Supervisor
from fscached.lifecycle.systemd import Service, SystemdError
from fscached.util import mounts
from fscached.util.buildinfo import package_version
from fscached.util.files import check_writable, write_atomic

if TYPE_CHECKING:  # imported on first use (a registry image): aiohttp is a tenth of a second of the start
    from fetcher.registry import RegistrySource

log = logging.getLogger("fscached")
supervisor_log = logging.getLogger("fscached.supervisor")

WORKER_THREADS = 4
DRAIN_SECONDS = 10.0
UNMOUNT_RELEASE_SECONDS = 2.0  # an unbind waits this long for the kernel to let go of unmounted cache files
# a stop that hands over: READs in flight get this long to finish with their data; the rest
# are left unanswered for the successor
HANDOVER_DRAIN_SECONDS = 2.0
# a stop that must go on serving (a busy mount, a detached mount still read): how often it
# looks again whether nothing reads any more
STILL_SERVING_POLL = 1.0
# profile=auto asks the registry before the mount: a registry that does not answer costs the
# bind this long at most, then the image is served without a profile
PROFILE_LOOKUP_SECONDS = 5.0
T = TypeVar("T")

__all__ = ["AlreadyBound", "BusyError", "Daemon", "DaemonState", "MountpointTaken", "NotBound"]


class DaemonState(enum.Enum):
    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


_DAEMON_MOVES = {
    DaemonState.INIT: {DaemonState.READY, DaemonState.STOPPING},
    DaemonState.READY: {DaemonState.RUNNING, DaemonState.STOPPING},
    DaemonState.RUNNING: {DaemonState.STOPPING},
    DaemonState.STOPPING: {DaemonState.STOPPED},
    DaemonState.STOPPED: set(),
}


class NotServing(Exception):
    """A request that needs the daemon READY or RUNNING came in another state."""


class Daemon:
    # how the cachefiles device is made: from its path, or from an fd a carrier kept (tests put
    # a simulator's device class here)
    device_class: type[CachefilesDevice] = CachefilesDevice

    def __init__(self, config: Config, device: CachefilesDevice | None = None,
                 service: Service | None = None, *, autostart: bool = True) -> None:
        self.config = config
        self.service = service  # run by systemd: READY/WATCHDOG/FDSTORE to it
        self.autostart = autostart  # READY -> RUNNING at once (nydusd's singleton does it itself)
        self.upgrade = False  # a hot upgrade's new process: a takeover waits for start to read the kernel path
        self.catalog = Catalog()
        self.images = ImageTable()
        self.pool = SourcePool()
        self.janitor = CacheJanitor(config)
        self.recorders = ProfileRecorders(config.work_dir)
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="fscached-io")
        self.kernel_path = "cachefiles" if device is not None else config.kernel_path
        self.frontend: Frontend | None = None
        self.exit_code = 0
        self.loaded = False
        self._state = DaemonState.INIT
        self._given_device = device  # tests and a takeover: an already open device (cachefiles)
        # what outlives this process: its carrier (keeper / systemd's fd store), the state it
        # keeps, and nydus-snapshotter's supervisor when there is one
        self.carrier: FdCarrier | None = SystemdStore(service) if service is not None else None
        # the keeper (fanotify outside systemd): asked at start whether it holds a group
        self.keeper = KeeperCarrier(keeper_socket(config.cache_dir), config.cache_dir / "blobs")
        self._from_keeper = False  # run by systemd for the first time, the keeper of a manual run held the group
        self.supervisor: Supervisor | None = None
        # a takeover's device from the supervisor's fd (tests: the kernel simulator's)
        self.device_factory: Callable[[int], CachefilesDevice] | None = None
        self._carried: dict[str, int] = {}
        self._state_memfd: StateMemfd | None = None
        self._restored: HandoverState | None = None
        # another process holds our kernel fd too (a supervisor, a successor): a stop is then a
        # hand-over; mounts stay, and nothing is answered without its data
        self._handing_over = False
        self._taken_over = False
        self._stop = asyncio.Event()
        self._started = asyncio.Event()  # READY -> RUNNING (a hot upgrade waits for it)
        self._took_over = asyncio.Event()
        self._takeover_lock = asyncio.Lock()  # one takeover at a time
        self._armed = False  # run() reads the kernel path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._stop_before_start = False
        self._operations: set[asyncio.Task[Any]] = set()  # binds and unbinds in progress
        # start-up profiles: the manifest digest of each pulled image (its profile is a
        # referrer of that manifest in the registry); counters before a frontend exists
        self.manifest_digests: dict[tuple[str, str], str] = {}
        self.profile_stats: Counter[str] = Counter()

    # -- the daemon's state ---------------------------------------------------------------------
    @property
    def state(self) -> DaemonState:
        return self._state

    def _move(self, to: DaemonState) -> None:
        if to == self._state:
            return
        if to not in _DAEMON_MOVES[self._state]:
            raise AssertionError(f"daemon: {self._state.value} -> {to.value} is not a transition")
        log.debug("daemon: %s -> %s", self._state.value, to.value)
        self._state = to

    @property
    def serving(self) -> bool:
        """READY or RUNNING with the kernel path read: binds are taken. (A hot upgrade's new
        process is READY after its takeover, but reads nothing until start.)"""
        return self._armed and self._state in (DaemonState.READY, DaemonState.RUNNING)

    @property
    def stopping(self) -> bool:
        """A stop was asked for (the daemon may still be unmounting and draining)."""
        return self._stop.is_set() or self._stop_before_start or self._state in (DaemonState.STOPPING,
                                                                                   DaemonState.STOPPED)

    @property
    def handing_over(self) -> bool:
        return self._handing_over

    @property
    def taken_over(self) -> bool:
        return self._taken_over

    def start_service(self) -> None:
        """nydusd's `start`: READY -> RUNNING. A hot upgrade's new process writes `restore`
        now (the old one was told to exit) and starts reading the kernel path."""
        if self._state == DaemonState.RUNNING:
            return
        if self._state != DaemonState.READY:
            raise NotServing(f"cannot start from state {self._state.value}")
        self._move(DaemonState.RUNNING)
        if self.frontend is not None:
            self.frontend.started()
        if not self._started.is_set():
            self._started.set()

    # -- start: what a predecessor left, the configured images ------------------------------------
    async def load(self) -> None:
        """Check the output files, take what a carrier kept (fds and the hand-over state), and
        open every configured image's bootstrap (pulling it when needed) and every image a
        predecessor bound at run time. Errors are user-worded (CatalogError, SourceError,
        FileWriteError, SystemdError)."""
        for path, what in ((self.config.ready_file, "--ready-file"), (self.config.stats_file, "--stats-file")):
            if path is not None:
                check_writable(path, what)  # before anything is mounted
        self._take_carried()
        for spec in self.config.images:
            image = self.images.reserve(spec, run_time=False)
            try:
                await self._add_to_catalog(image)
            except BaseException:
                image.move(ImageState.FAILED)
                self.images.forget(image)
                raise
        if self._restored is not None:
            await self._restore_binds(self._restored)
        self.loaded = True

    def _take_carried(self) -> None:
        """What a carrier kept for us (a restart): the kernel fds, by name, and the state."""
        fanotify_possible = self._given_device is None and self.kernel_path in ("auto", "fanotify")
        carried = self.carrier.take() if self.carrier is not None else {}
        if fanotify_possible and fdnames.FANOTIFY_GROUP not in carried:
            from_keeper = self.keeper.take()  # a keeper kept the group of a daemon that died
            if fdnames.FANOTIFY_GROUP in from_keeper:
                close_all(carried)
                carried = from_keeper
                self._from_keeper = self.carrier is not None  # under systemd now: the keeper goes later
                if self.carrier is None:
                    self.carrier = self.keeper
            else:
                close_all(from_keeper)
        if not carried:
            return
        what = self.keeper.what if self._from_keeper or self.carrier is None else self.carrier.what
        state_fd = carried.pop(fdnames.STATE, None)
        if state_fd is not None:
            memfd = StateMemfd.adopt(state_fd)
            got = StateMemfd.read(state_fd) if memfd is not None else None
            if memfd is None or got is None:
                os.close(state_fd)
                log.warning("the hand-over state %s kept cannot be read: images bound at run time are not "
                            "bound again", what)
            else:
                self._state_memfd = memfd
                try:
                    self._restored = read_state(got[1])
                except HandoverError as exc:
                    log.error("%s: images bound at run time are not bound again", exc)
        self._carried = carried
        for name, path in ((fdnames.FANOTIFY_GROUP, "fanotify"), (fdnames.CACHEFILES, "cachefiles")):
            if name in carried:
                if self.kernel_path not in ("auto", path):
                    close_all(carried)
                    self._carried = {}
                    raise SystemdError(f"{what} holds a {path} kernel fd (a previous fscached served "
                                       f"through {path}) but the kernel path asked for is {self.kernel_path}: run "
                                       f"with --kernel-path {path}, or stop the service, unmount its images and "
                                       "start it again")
                self.kernel_path = path

    async def _restore_binds(self, state: HandoverState) -> None:
        """The one rebind path after any restart: the images a predecessor bound at run time
        (or all of them, at a takeover), put back in the catalog before the kernel path is
        taken, so no request for them finds them unknown. One that cannot come back is logged
        (its mounts get errors) and the others are served."""
        restored = []
        for bind in state.binds:
            spec = bind.spec
            if not bind.run_time and not self._taken_over:
                continue  # configured: this daemon's own configuration says what it serves
            if self.images.get(spec.volume, spec.fsid) is not None:
                continue
            try:
                image = self.images.reserve(spec, run_time=True)
            except (AlreadyBound, MountpointTaken) as exc:
                log.error("image %s, bound before the restart, cannot be bound again: %s", spec.fsid, exc)
                continue
            try:
                path = bind.served_bootstrap if bind.served_bootstrap is not None and bind.served_bootstrap.is_file() \
                    else None
                await self._add_to_catalog(image, path)
            except Exception as exc:  # one image that cannot come back must not stop the others
                log.error("image %s, bound before the restart, cannot be bound again: %s", spec.fsid, exc)
                image.move(ImageState.FAILED)
                self.images.forget(image)
                continue
            image.restored = True
            got = tuple(blob.info.blob_id for blob in self.catalog.devices.get(image.key, []))
            if bind.blob_ids and got != bind.blob_ids:
                log.warning("image %s: its bootstrap now names other blobs than the previous daemon served "
                            "(%d vs %d): was it replaced?", spec.fsid, len(got), len(bind.blob_ids))
            restored.append(spec.fsid)
        if restored:
            log.info("bound again %d image(s) bound at run time before the restart: %s", len(restored),
                     ", ".join(restored))

    async def _add_to_catalog(self, image: Image, bootstrap: Path | None = None,
                              parsed: Bootstrap | BootstrapIndex | None = None) -> Path:
        """Pull (a `ref`) and parse (in a worker thread: never on the loop) the image's
        bootstrap, serve it in the catalog, start its profiles. Returns the bootstrap served."""
        spec = image.spec
        path = bootstrap or spec.bootstrap
        if path is None:
            path = await self.pull_image_bootstrap(spec)
        if parsed is None:
            parsed = await asyncio.to_thread(open_bootstrap, spec, path)
        self.catalog.add_image(spec, path, self.pool.chain(spec), parsed)
        try:
            await self._start_profiles(spec, path)
        except BaseException:
            self._drop_from_catalog(spec)
            raise
        return path

    def _drop_from_catalog(self, spec: ImageSpec) -> list[str]:
        boot, dropped = self.catalog.remove_image(spec.volume, spec.fsid)
        if self.frontend is not None:
            self.frontend.image_removed(boot, dropped)
        return [blob.info.blob_id for blob in dropped]

    # -- the kernel path ------------------------------------------------------------------------
    def take_kernel_path(self) -> None:
        """Choose the kernel path and take it: the device bound (cachefiles), or the group made
        or taken back and every cache file marked (fanotify); then hand what must outlive this
        process to its carrier. Errors are user-worded (CachefilesError, FanotifyError,
        KernelPathError, KeeperError, OSError); a failed start leaves no cache dir it made."""
        cache_dir = self.config.cache_dir
        if cache_dir.exists() and not cache_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"cache dir {cache_dir} is not a directory", str(cache_dir))
        why = "asked for"
        made = _missing_dirs(cache_dir)
        try:
            if fdnames.FANOTIFY_GROUP in self._carried or fdnames.CACHEFILES in self._carried:
                why = f"taken back from {self.carrier.what if self.carrier else 'a predecessor'}"
            elif self.kernel_path in ("auto", "fanotify") and self._given_device is None:
                cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the probe marks a file in it
                self.kernel_path, why = choose_kernel_path(self.kernel_path, cache_dir, self.config.device)
            self._take_kernel_path()
        except BaseException:
            for directory in made:  # deepest first; only while empty
                try:
                    directory.rmdir()
                except OSError:
                    break
            raise
        # logged once it worked: a start-up error stays the one line on stderr
        log.info("kernel path: %s (%s)", self.kernel_path, why)

    def _take_kernel_path(self) -> None:
        if self.kernel_path == "fanotify":
            self._take_fanotify()
        else:
            self._take_cachefiles()
        assert self.frontend is not None
        self.frontend.recorders = self.recorders
        self.frontend.stats.update(self.profile_stats)  # counted while loading: the frontend's from now on
        self.profile_stats = self.frontend.stats
        self.janitor.attach(self.frontend)

    def _take_fanotify(self, source: str | None = None) -> None:
        if self.carrier is None:
            self.carrier = self.keeper
        frontend = FanotifyFrontend(self.catalog, self.executor, self.config.cache_dir, self.config.read_window)
        carried, self._carried = self._carried, {}
        took_group = fdnames.FANOTIFY_GROUP in carried
        frontend.open(carried)
        if took_group:
            log.info("took the fanotify group back from %s (%d write fds)",
                     source or (self.keeper.what if self._from_keeper or self.carrier is self.keeper
                                else self.carrier.what),
                     sum(1 for cf in frontend.files.values() if cf.write_fd is not None))
        else:
            self.carrier.start()
        self.frontend = frontend
        frontend.on_fds_changed = self._keep_fds
        self._keep_state()  # the group is carried before anything can mount its files
        if self._from_keeper:
            # systemd holds the group now: the keeper of the manual run lets go (it never lapses)
            self.keeper.dismiss()

    def _take_cachefiles(self, device: CachefilesDevice | None = None, *, taken_over: bool = False,
                         shared: bool = False) -> CachefilesFrontend:
        if self.carrier is self.keeper:
            self.carrier = None  # the keeper carries the fanotify path only
        kept_fd = self._carried.pop(fdnames.CACHEFILES, None)
        close_all(self._carried)
        self._carried = {}
        restarted = device is None and kept_fd is not None
        if device is None and kept_fd is not None:
            # bound by a predecessor, kept by a carrier: no dir/bind again, `restore` once the
            # reader is armed (start_background)
            device = self.device_class.from_fd(kept_fd, path=str(self.config.device))
            log.info("took %s back from %s: the requests in flight come again (restore)", self.config.device,
                     self.carrier.what if self.carrier else "a predecessor")
        if device is None:
            if self.config.cache_dir.exists():
                check_cache_dir(str(self.config.cache_dir))  # the most specific error first (tmpfs...)
            device = self._given_device or self.device_class(str(self.config.device))
            if not device.is_open:  # not handed over already open (simulator): no cache dir made before
                device.open()
            self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_cache_dir(str(self.config.cache_dir))
            device.bind(str(self.config.cache_dir), self.config.tag,
                        block_limits=(self.config.brun, self.config.bcull, self.config.bstop))
        frontend = CachefilesFrontend(device, self.catalog, self.executor, self.config.cache_dir,
                                      self.config.read_window, kept=restarted or taken_over,
                                      requeue_at_start=restarted, shared=shared,
                                      space_limits=(self.config.brun, self.config.bcull, self.config.bstop))
        self.frontend = frontend
        if self.carrier is not None:
            why_not = frontend.resumable()
            if why_not is None:
                self._keep_state()
            else:
                self.carrier = None
                log.warning("%s: the device is not kept for the next process: after a restart or a crash the "
                            "mounts it serves fail with EIO and must be mounted again", why_not)
        return frontend

    # -- what outlives this process ---------------------------------------------------------------
    def handover_state(self, fd_names: list[str] | None = None) -> HandoverState:
        """The running daemon's hand-over state: every image it serves (configured and bound at
        run time, in bind order, with the credentials in use), its kernel path and where it
        keeps what outlives it. Call it on the daemon's loop."""
        frontend = self.frontend
        if frontend is None:
            raise HandoverError("the daemon has not taken a kernel path yet: nothing to hand over")
        binds = []
        for image in self.images:
            if image.key not in self.catalog.images:
                continue
            binds.append(Bind(
                self._with_credentials_in_use(image.spec),
                run_time=image.run_time,
                served_bootstrap=self.catalog.bootstrap_of(image.spec).path,
                blob_ids=tuple(blob.info.blob_id for blob in self.catalog.devices.get(image.key, [])),
            ))
        pointers = frontend.pointers()
        fanotify = cachefiles = None
        if frontend.kernel_path == "fanotify":
            fanotify = FanotifyPointers(**pointers)
        else:
            cachefiles = CachefilesInfo(self.config.device, self.config.tag)
        names = list(frontend.carried_fds()) if fd_names is None else fd_names
        return HandoverState(frontend.kernel_path, self.config.cache_dir, tuple(binds), self.config.work_dir,
                             tuple(names), fanotify, cachefiles, package_version())

    def capture_state(self, fd_names: list[str] | None = None) -> bytes:
        return encode(self.handover_state(fd_names))

    def _with_credentials_in_use(self, spec: ImageSpec) -> ImageSpec:
        """The spec with the registry credentials its source uses now (PUT /api/v1/config
        renews them in the source, not in the spec; a successor must not fall back to stale
        ones)."""
        if spec.registry is None:
            return spec
        credentials = self.pool.registry(spec.registry).credentials
        if credentials is None:
            return spec
        auth = credentials.as_auth()
        if auth == spec.registry.auth:
            return spec
        return dataclasses.replace(spec, registry=dataclasses.replace(spec.registry, auth=auth))

    def _keep_state(self) -> None:
        """Write the hand-over state into its memfd and give the carrier everything a
        successor needs. After every bind and unbind, on the daemon's loop."""
        if self.carrier is None or self.frontend is None:
            return
        try:
            data = self.capture_state()
        except HandoverError as exc:
            log.error("the hand-over state cannot be written: %s", exc)
            data = b""
        memfd = self._state_memfd
        if data and (memfd is None or not memfd.holds(data)):
            bigger = StateMemfd(max(64 << 10, 1 << (2 * len(data)).bit_length()))
            if memfd is not None:
                memfd.close()
            memfd = self._state_memfd = bigger
        if data and memfd is not None:
            memfd.write(data)
        self._keep_fds()

    def _keep_fds(self) -> None:
        if self.carrier is None or self.frontend is None:
            return
        fds = self.frontend.carried_fds()
        if self._state_memfd is not None:
            fds[fdnames.STATE] = self._state_memfd.fd
        try:
            self.carrier.give(fds)
        except Exception as exc:  # a keeper that went away: readers still have this daemon
            log.error("%s could not take the fds a successor needs: %s", self.carrier.what, exc)

    # -- run --------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            self._loop = loop
            if self._stop_before_start:
                self._stop.set()
        if not self.loaded:
            await self.load()
        if self.frontend is None:
            self.take_kernel_path()
        frontend = self.frontend
        assert frontend is not None
        fd = frontend.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)
        self._armed = True
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGUSR1, self.write_stats)
        self._on_readable()  # anything queued before the reader was armed
        frontend.start_background()
        let_go = True
        try:
            try:
                await self._mount_all()
            except (OSError, ValueError, CatalogError) as exc:
                log.error("%s", exc)
                self.exit_code = 1
                self._stop.set()
            specs = [image.spec for image in self.images]
            names = ", ".join(f"{s.fsid}" + (f" (domain {s.domain})" if s.domain else "") for s in specs)
            log.info("serving %d image(s) from cache %s through %s: %s", len(specs), self.config.cache_dir,
                     self.kernel_path, names or "none")
            if not self._stop.is_set():
                if self._state == DaemonState.INIT:
                    self._move(DaemonState.READY)
                if self.autostart:
                    self.start_service()
                self._keep_state()
                if self.service is not None:
                    self.service.close_unused()
                    self.service.ready(f"serving {len(self.catalog.images)} image(s) through {self.kernel_path}")
                if self.config.ready_file:
                    write_atomic(self.config.ready_file, f"{os.getpid()}\n", mode=0o644)
            self.janitor.start()  # the cache budget's periodic check, when one is configured
            let_go = await self._serve_until_nothing_reads()
        finally:
            await self._finish(frontend, let_go)
        return self.exit_code

    async def _finish(self, frontend: Frontend, let_go: bool) -> None:
        if self._state != DaemonState.STOPPING:
            self._move(DaemonState.STOPPING)
        await self.janitor.stop()
        await self.recorders.finish_all("the daemon stops")
        loop = asyncio.get_running_loop()
        loop.remove_reader(frontend.fileno())
        self._armed = False
        if self._handing_over:
            frontend.begin_hand_over()  # from now on a request without its data is left, not failed
        await frontend.drain(HANDOVER_DRAIN_SECONDS if self._handing_over else DRAIN_SECONDS)
        # no write into a cache fd is left running; waited for off the event loop
        await asyncio.to_thread(self.executor.shutdown, True)
        frontend.close(let_go=let_go)
        if self.carrier is not None:
            if let_go:
                self.carrier.dismiss()  # nothing reads through us: the next start is fresh
            else:
                log.info("%s keeps the kernel fd and the state: the next start takes them back", self.carrier.what)
                self.carrier.leave()  # this process ends: the carrier watches from now on
        if self._state_memfd is not None:
            self._state_memfd.close()
            self._state_memfd = None
        if self.service is not None:
            self.service.stop_watchdog()
        self.write_stats()
        if self.pool.sources():  # none when no image was ever served (an API-only start)
            await self.pool.close()
        self._move(DaemonState.STOPPED)
        log.info("stopped")

    def _on_readable(self) -> None:
        assert self.frontend is not None
        try:
            self.frontend.on_readable()
        except KernelPathLost as exc:  # the cache died under us: nothing more can be served
            log.error("%s", exc)
            self.exit_code = 1
            self._stop.set()

    # -- mounts -------------------------------------------------------------------------------------
    async def _mount_all(self) -> None:
        """Mount (or adopt) every image with a mountpoint, once the kernel's questions can be
        answered; every image then is BOUND."""
        for image in self.images:
            if image.state != ImageState.BINDING:
                continue
            async with image.lock:
                try:
                    await self._mount(image)
                except BaseException:
                    if image.run_time:  # restored: the others are served all the same
                        log.error("image %s, bound before the restart, cannot be mounted again", image.spec.fsid)
                        self._fail_bind(image)
                        continue
                    raise
                image.move(ImageState.BOUND)

    async def _mount(self, image: Image) -> None:
        spec = image.spec
        frontend = self.frontend
        if spec.mountpoint is None or frontend is None:
            return
        if self.stopping:
            raise asyncio.CancelledError()
        mountpoint = spec.mountpoint
        await asyncio.to_thread(_check_mountpoint, spec, mountpoint)
        if await asyncio.to_thread(mounts.is_mountpoint, mountpoint):
            if frontend.still_ours(spec, mountpoint):
                log.info("image %s: still mounted on %s, served again", spec.fsid, mountpoint)
                image.mounted_at = mountpoint
                return
            there = mounts.erofs_mounts().get(str(mountpoint))
            what = f"from {there}" if there is not None else "another filesystem"
            raise ValueError(f"image {spec.fsid}: {mountpoint} is already a mount point ({what}), not one this "
                             f"daemon serves; unmount it first (umount {mountpoint})")
        source, options = frontend.mount_args(spec)
        await asyncio.to_thread(mounts.mount_erofs, source, mountpoint, options)
        image.mounted_at = mountpoint
        self.recorders.started(spec.volume, spec.fsid)  # a recording's clock starts at the mount
        log.info("image %s mounted on %s", spec.fsid, mountpoint)

    # -- images at run time (the control API) ---------------------------------------------------
    def rebind_restored(self, spec: ImageSpec) -> bool:
        """A bind of exactly the spec of an image restored from a predecessor's state, the
        first since: that image, served already (True; nothing changes). nydus-snapshotter
        binds every image again after a hot upgrade (RecoverRafsInstances), and counts an error
        as a failed upgrade while the new daemon serves. Any other bind of a bound id: False
        (AlreadyBound, as nydusd answers)."""
        image = self.images.get(spec.volume, spec.fsid)
        if image is None or not image.restored or image.state != ImageState.BOUND or image.spec != spec:
            return False
        image.restored = False
        log.info("image %s: bound again as before the hand-over: served already from the state, nothing changed",
                 spec.fsid)
        return True

    async def bind_image(self, spec: ImageSpec, profile: ProfileSpec | None = None,
                         parsed: Bootstrap | BootstrapIndex | None = None) -> ImageSpec:
        """Serve one more image while the others are mounted and read. AlreadyBound (a live
        bind of the id), MountpointTaken, NotServing, CatalogError, SourceError, ValueError
        (a bad mountpoint), OSError (a failed mount). Whatever fails, nothing of the bind is
        left: its mount removed, its blobs no longer served. `profile`: its start-up profile
        keys; `parsed`: its bootstrap if the caller parsed it already."""
        if not self.serving or self.frontend is None:
            raise NotServing(f"the daemon is not serving the kernel (state {self._state.value})")
        image = self.images.reserve(spec, run_time=True)  # synchronous: a second bind is refused
        task = asyncio.current_task()
        if task is not None:
            self._operations.add(task)
        try:
            async with image.lock:
                await self._bind(image, profile, parsed)
        finally:
            if task is not None:
                self._operations.discard(task)
        return image.spec

    async def _bind(self, image: Image, profile: ProfileSpec | None, parsed: Bootstrap | BootstrapIndex | None) -> None:
        spec = image.spec
        if profile is not None:
            if profile == ProfileSpec():
                self.config.profiles.pop(image.key, None)
            else:
                self.config.profiles[image.key] = profile
        created = _missing_dirs(self.config.cache_dir / "blobs" / spec.volume)
        in_catalog = False
        try:
            if self.stopping:
                raise NotServing("the daemon is stopping")
            await self._add_to_catalog(image, parsed=parsed)
            in_catalog = True
            assert self.frontend is not None
            self.frontend.image_added(spec)
            await self._mount(image)
            if self.stopping:  # a stop came while it was mounting: it unmounts what is BOUND
                log.info("image %s: bound while the daemon stops", spec.fsid)
        except BaseException:
            await self._undo_bind(image, in_catalog, created)
            raise
        image.move(ImageState.BOUND)
        log.info("image %s bound%s", spec.fsid, f" (domain {spec.domain})" if spec.domain else "")
        self._keep_state()  # a restarted daemon binds it again

    async def _undo_bind(self, image: Image, in_catalog: bool, created: list[Path]) -> None:
        spec = image.spec
        if image.mounted_at is not None:
            mountpoint = image.mounted_at
            if await asyncio.to_thread(mounts.unmount, mountpoint):
                image.mounted_at = None
            else:  # read already: its blobs stay watched, it stays bound; unbind it later
                log.error("image %s: the bind failed after its mount and %s is busy: left mounted and served",
                          spec.fsid, mountpoint)
                image.move(ImageState.BOUND)
                return
        await self.recorders.finish(spec.volume, spec.fsid, "the bind failed")
        if in_catalog:
            self._drop_from_catalog(spec)
        await asyncio.to_thread(self._remove_made_dirs, spec.volume, created)
        self._fail_bind(image)

    def _remove_made_dirs(self, volume: str, created: list[Path]) -> None:
        """A failed bind's cache directory (it made it): the empty cache files in it that no
        image serves now (another bind of the same domain may have come meanwhile), then the
        directory when nothing else is left."""
        served = {blob.info.blob_id for v, blob in self.catalog.blobs() if v == volume}
        for directory in created:  # deepest first
            try:
                for entry in os.scandir(directory):
                    if entry.name not in served and entry.is_file(follow_symlinks=False) \
                            and entry.stat(follow_symlinks=False).st_blocks == 0:
                        os.unlink(entry.path)
                directory.rmdir()
            except OSError:
                return

    def _fail_bind(self, image: Image) -> None:
        if image.key in self.catalog.images:
            self._drop_from_catalog(image.spec)
        image.move(ImageState.FAILED)
        self.images.forget(image)

    async def unbind_image(self, volume: str, fsid: str) -> ImageSpec:
        """Stop serving an image: unmount it if the daemon mounted it, close its objects, drop
        its blobs' references (a blob shared in a domain stays while another image uses it).
        NotBound when unknown (its message holds "blob_cache: cache entry not found"); Busy
        while it is mounted and in use, or its blobs are still read (a mount by hand, a
        detached mount): then it stays bound. A bind of the same id in progress is waited for."""
        image = self.images.get(volume, fsid)
        if image is None:
            raise NotBound(f"blob_cache: cache entry not found: image {fsid} in {volume}")
        task = asyncio.current_task()
        if task is not None:
            self._operations.add(task)
        try:
            async with image.lock:
                if image.state != ImageState.BOUND:
                    raise NotBound(f"blob_cache: cache entry not found: image {fsid} in {volume} "
                                   f"({image.state.value})")
                image.move(ImageState.UNBINDING)
                try:
                    await self._unbind(image)
                except BaseException:
                    image.move(ImageState.BOUND)
                    raise
                image.move(ImageState.GONE)
                self.images.forget(image)
        finally:
            if task is not None:
                self._operations.discard(task)
        return image.spec

    async def _unbind(self, image: Image) -> None:
        spec = image.spec
        frontend = self.frontend
        assert frontend is not None
        if image.mounted_at is not None:
            if not await asyncio.to_thread(mounts.unmount, image.mounted_at):
                raise BusyError(f"image {spec.fsid}: {image.mounted_at} is busy")
            log.info("unmounted %s", image.mounted_at)
            image.mounted_at = None
        # the blobs this unbind would stop serving: nothing else may still read them
        dropped = [blob for blob in self.catalog.devices.get(image.key, []) if blob.users <= {spec.fsid}]
        readers = frontend.readers_of(spec, dropped)
        waited = 0.0
        while readers and waited < UNMOUNT_RELEASE_SECONDS:
            # the kernel may close an unmounted EROFS's cache files a moment after umount returns
            # (a deferred fput, later under load): a reader that stays is one
            await asyncio.sleep(0.02)
            waited += 0.02
            readers = frontend.readers_of(spec, dropped)
        if readers:
            raise BusyError(f"image {spec.fsid}: still read through {', '.join(readers)} (a mount by hand, or one "
                       "detached with umount -l that a process still reads): unmount it, or stop what reads it")
        await self.recorders.finish(spec.volume, spec.fsid, "the image is unbound")
        dropped_ids = self._drop_from_catalog(spec)
        self.janitor.image_released(spec.fsid, dropped_ids)
        log.info("image %s unbound (%d blob(s) no longer used)", spec.fsid, len(dropped_ids))
        self._keep_state()

    # -- stop ---------------------------------------------------------------------------------------
    async def _serve_until_nothing_reads(self) -> bool:
        """Serve until told to stop; then unmount what we mounted and decide: let the kernel
        path go (nothing reads through us: True), hand it to whoever carries it for the next
        process (False), or go on serving what is still read (a busy mount, a mount detached
        with `umount -l` whose files are open, a mount by hand) until nothing is."""
        frontend = self.frontend
        assert frontend is not None
        await self._stop.wait()
        self._move(DaemonState.STOPPING)
        if self.service is not None:
            self.service.stopping()
        await self._end_operations()
        said: str | None = None
        while True:
            if self._handing_over:  # the successor serves them: they stay mounted
                mounted = [str(image.mounted_at) for image in self.images.mounted()]
                if mounted:
                    log.info("hand-over: %s stay mounted for the successor", ", ".join(mounted))
                return False
            busy = []
            for image in self.images.mounted():
                assert image.mounted_at is not None
                if await asyncio.to_thread(mounts.unmount, image.mounted_at):
                    log.info("unmounted %s", image.mounted_at)
                    image.mounted_at = None
                else:
                    busy.append(str(image.mounted_at))
            if not busy and frontend.closing_fails_readers and not self._carries_for_next():
                return True  # what others mounted gets EIO when the device closes, never holes
            left = await frontend.readers_left()
            if not busy and not left:
                return True
            if self._carries_for_next():
                assert self.carrier is not None
                log.warning("%s busy: left mounted for the next fscached (%s keeps the kernel fd; a stop of the "
                            "service drops it)", ", ".join(busy + left), self.carrier.what)
                self._handing_over = True
                return False
            what = ", ".join(f"{b} busy" for b in busy) or ", ".join(left) + " still read"
            if what != said:
                log.error("still serving: %s (stop what uses it: the daemon stops once nothing does)", what)
                said = what
            try:
                await asyncio.wait_for(self._wait_next_stop(), STILL_SERVING_POLL)
            except TimeoutError:
                pass

    async def _wait_next_stop(self) -> None:
        self._stop.clear()
        await self._stop.wait()

    def _carries_for_next(self) -> bool:
        """A carrier that keeps the kernel fd for the next process (systemd's fd store)."""
        return (self.carrier is not None and self.carrier.hands_to_next_process
                and (self.service is None or self.service.can_store))

    async def _end_operations(self) -> None:
        """At a stop: binds in progress are cancelled (each undoes itself), unbinds finish."""
        for task in list(self._operations):
            task.cancel()
        if self._operations:
            await asyncio.wait(list(self._operations), timeout=DRAIN_SECONDS)

    def stop(self) -> None:
        """Thread-safe: ask the daemon to stop (also before run() has started)."""
        with self._loop_lock:
            if self._loop is None:
                self._stop_before_start = True
            else:
                self._loop.call_soon_threadsafe(self._stop.set)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Thread-safe: run a coroutine on the daemon's loop once run() has started (tests,
        embedding)."""
        assert self._loop is not None, "the daemon is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- nydus-snapshotter's supervisor (recover_policy = "failover", hot upgrade) ---------------
    async def send_fd(self) -> int:
        """sendfd: give the supervisor the state and the one kernel fd it keeps. Returns the
        state's size. FailoverError."""
        if self.supervisor is None:
            raise FailoverError("sendfd: this daemon has no supervisor: start it with --supervisor PATH "
                                "(nydus-snapshotter does, with recover_policy = \"failover\")", 400, "BAD_REQUEST")
        frontend = self.frontend
        if not self.serving or frontend is None:
            raise FailoverError(f"sendfd: the daemon is not serving the kernel (state {self._state.value})",
                                503, "NOT_READY")
        why_not = frontend.resumable()
        if why_not is not None:
            raise FailoverError(f"sendfd refused: {why_not}", 501, "UNSUPPORTED")
        name = frontend.handover_fd_name  # the supervisor keeps one fd (fanotify: write fds come from events)
        fd = frontend.carried_fds()[name]
        try:
            data = self.capture_state([name])
        except HandoverError as exc:
            raise FailoverError(f"sendfd: {exc}") from None
        await self.supervisor.send(data, fd)
        self._handing_over = True  # the supervisor holds the kernel fd too: stops hand over
        log.info("sendfd: state (%d bytes, %d image(s)) and %s given to the supervisor %s", len(data),
                 len(self.catalog.images), name, self.supervisor.path)
        return len(data)

    def check_failover_support(self) -> bool:
        """At start, with a supervisor: say whether a successor could take over (cachefiles
        needs the kernel's `restore`); True when it could."""
        why_not = self.frontend.resumable() if self.frontend is not None else "no kernel path taken"
        if why_not is None:
            supervisor_log.info("failover: a successor can take over through the supervisor: sendfd / takeover "
                                "supported")
            return True
        supervisor_log.warning("%s", why_not)
        return False

    async def take_over(self, *, upgrade: bool = False) -> HandoverState | None:
        """takeover: receive the state and the kernel fd from the supervisor, bind what the
        previous daemon served, and (a failover, not a hot upgrade) write `restore`.
        FailoverError (one line; the daemon stays in INIT, nothing of it kept). One at a time:
        asked again (nydus-snapshotter asks twice when a daemon it restarted for failover died
        in its takeover: a failover per death, both waiting for this one's INIT), even while the
        first is under way, it waits for that one and then answers None: nothing more to do."""
        async with self._takeover_lock:
            if self._taken_over and self._state in (DaemonState.READY, DaemonState.RUNNING):
                return None
            return await self._take_over(upgrade=upgrade)

    async def _take_over(self, *, upgrade: bool) -> HandoverState:
        if self._taken_over:
            raise FailoverError("takeover: this daemon has already taken over", 400, "BAD_REQUEST")
        if self._state != DaemonState.INIT or self.frontend is not None:
            raise FailoverError("takeover: this daemon is not waiting for one (it took the kernel path itself); "
                                "a daemon restarted for failover waits in INIT", 400, "BAD_REQUEST")
        if self.supervisor is None:
            raise FailoverError("takeover: this daemon has no supervisor: start it with --supervisor PATH",
                                400, "BAD_REQUEST")
        started = time.monotonic()
        data, fds = await self.supervisor.receive()
        try:
            state, fd = self._check_takeover(data, fds)
        except BaseException:
            close_all({str(n): fd for n, fd in enumerate(fds)})
            raise
        try:
            self._taken_over = True
            self._adopt_config(state)
            if state.backend == "fanotify":
                self.kernel_path = "fanotify"
                self._take_carried()  # a keeper of the dead daemon: its write fds are the group's too
                kept_group = self._carried.pop(fdnames.FANOTIFY_GROUP, None)
                if kept_group is not None:
                    os.close(kept_group)  # the same group: the supervisor's copy is the one taken
                self._carried[fdnames.FANOTIFY_GROUP] = fd
                self._restored = None
                await self._restore_binds(state)
                self._take_fanotify(source="the supervisor")
            else:
                await self._restore_binds(state)
                device = (self.device_factory or (lambda f: self.device_class.from_fd(f, path=str(self.config.device))))(fd)
                self._take_cachefiles(device, taken_over=True, shared=upgrade)
            frontend = self.frontend
            assert frontend is not None
            frontend.recorders = self.recorders
            self.janitor.attach(frontend)
            self._handing_over = True  # the supervisor holds the kernel fd too
            if not upgrade:
                frontend.resume()
        except BaseException as exc:
            self._roll_back_takeover(fd)
            if isinstance(exc, RestoreUnsupported):
                raise FailoverError(f"takeover: {NEEDS_NEWER_KERNEL}", 501, "UNSUPPORTED") from None
            if isinstance(exc, (CachefilesError, FanotifyError)):
                raise FailoverError(f"takeover: {exc}") from None
            raise
        self.loaded = True
        self._move(DaemonState.READY)
        self._took_over.set()
        log.info("takeover: %d image(s) served again from the state of fscached %s, %s (%.0f ms)",
                 len(self.catalog.images), state.daemon_version or "?",
                 "restore waits for start (hot upgrade)" if upgrade else "restore written",
                 (time.monotonic() - started) * 1000)
        return state

    def _check_takeover(self, data: bytes, fds: list[int]) -> tuple[HandoverState, int]:
        where = f"takeover from the supervisor {self.supervisor.path if self.supervisor else '?'}"
        if not data and not fds:
            raise FailoverError(f"{where}: it had nothing to give (no daemon ever sent it a state: sendfd)")
        try:
            state = read_state(data)
        except HandoverError as exc:
            raise FailoverError(f"{where}: {exc}", 400, "BAD_REQUEST") from None
        wanted = fdnames.CACHEFILES if state.backend == "cachefiles" else fdnames.FANOTIFY_GROUP
        if self.kernel_path not in ("auto", state.backend):
            raise FailoverError(f"{where}: the state is a {state.backend} daemon's; this one serves "
                                f"{self.kernel_path}", 400, "BAD_REQUEST")
        if len(fds) != 1:
            raise FailoverError(f"{where}: expected exactly one fd ({wanted}), got {len(fds)}", 400, "BAD_REQUEST")
        if state.fd_names and wanted not in [fdnames.normalize(n) for n in state.fd_names]:
            raise FailoverError(f"{where}: the state names its fds {', '.join(state.fd_names)}, not {wanted}",
                                400, "BAD_REQUEST")
        mode = os.fstat(fds[0]).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            raise FailoverError(f"{where}: the fd is a {'file' if stat.S_ISREG(mode) else 'directory'}, "
                                f"not {'/dev/cachefiles' if state.backend == 'cachefiles' else 'a fanotify group'}",
                                400, "BAD_REQUEST")
        if state.backend == "fanotify":
            try:
                what = os.readlink(f"/proc/self/fd/{fds[0]}")
            except OSError:
                what = "unknown"
            if what != "anon_inode:[fanotify]":
                raise FailoverError(f"{where}: the fd is {what}, not a fanotify group", 400, "BAD_REQUEST")
        return state, fds[0]

    def _adopt_config(self, state: HandoverState) -> None:
        config = self.config
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

    def _roll_back_takeover(self, fd: int) -> None:
        """A takeover that failed half-way: back to INIT with nothing of it kept (the
        supervisor still holds the device: the next takeover starts from scratch)."""
        for image in list(self.images):
            if image.key in self.catalog.images:
                self._drop_from_catalog(image.spec)
            if image.state == ImageState.BINDING:
                image.move(ImageState.FAILED)
                self.images.forget(image)
        if self.frontend is not None:
            self.frontend.close(let_go=False)  # never let go: the journal's orphans are the next takeover's
            self.frontend = None
        else:
            try:
                os.close(fd)
            except OSError:
                pass
        self._handing_over = False
        self._taken_over = False

    async def wait_until_serving(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) for READY or RUNNING with the kernel path read: a request
        that arrives early (nydus-snapshotter mounts before it asks for the state) is served."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.serving:
            if self.stopping or loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def wait_for_takeover(self) -> bool:
        """In INIT (a failover restart, a hot upgrade): wait for the takeover, and for a hot
        upgrade then for start. False when told to stop instead."""
        with self._loop_lock:
            self._loop = asyncio.get_running_loop()
            if self._stop_before_start:
                self._stop.set()
        if not await self._first(self._took_over):
            return False
        return not self.upgrade or await self._first(self._started)

    async def _first(self, event: asyncio.Event) -> bool:
        """Wait for `event` or a stop; whether it was the event."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        return event.is_set() and not self._stop.is_set()

    # -- credentials (PUT /api/v1/config, nydusd's registry_token) ----------------------------------
    def _registry_sources(self, spec: ImageSpec) -> list[RegistrySource]:
        from fetcher.registry import RegistrySource

        found: dict[int, RegistrySource] = {}
        for blob in self.catalog.devices.get((spec.volume, spec.fsid), []):
            for source in blob.source.sources:
                if isinstance(source, RegistrySource):
                    found.setdefault(id(source), source)
        return list(found.values())

    def renew_credentials(self, spec: ImageSpec, auth: str) -> int:
        """New registry credentials for the sources behind an image (the token the old ones
        bought is dropped); how many sources were renewed."""
        from fetcher.auth import make_credentials

        credentials = make_credentials(auth=auth)
        sources = self._registry_sources(spec)
        for source in sources:
            source.renew_credentials(credentials)
        self._keep_state()  # a successor fetches with the new ones
        return len(sources)

    def seed_registry_token(self, spec: ImageSpec, token: str) -> int:
        sources = self._registry_sources(spec)
        for source in sources:
            source.seed_token(token)
        return len(sources)

    # -- counters ---------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The daemon's counters plus each source's, as "source:<name>:<ok|failed|...>"."""
        if self.frontend is not None:
            self.frontend.refresh_stats()
        merged = dict(self.frontend.stats) if self.frontend is not None else dict(self.profile_stats)
        for chain in self.catalog.sources():
            for key, value in chain.stats.items():
                merged[f"source:{key}"] = merged.get(f"source:{key}", 0) + value
        return merged

    def write_stats(self) -> None:
        if self.config.stats_file:
            try:
                write_atomic(self.config.stats_file, json.dumps(self.counters(), sort_keys=True) + "\n", mode=0o644)
            except OSError as exc:
                log.error("%s", exc)

    async def pull_image_bootstrap(self, spec: ImageSpec) -> Path:
        """The bootstrap of a registry image, pulled (verified) into work_dir/bootstraps."""
        from fetcher.image_ref import parse_image_ref
        from fetcher.pull import pull_bootstrap
        from fetcher.source import SourceError

        assert spec.ref is not None and spec.registry is not None
        dest = self.config.work_dir / "bootstraps"
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            pulled = await pull_bootstrap(self.pool.registry(spec.registry), parse_image_ref(spec.ref).reference, dest)
        except (SourceError, ValueError) as exc:
            raise CatalogError(f"image {spec.fsid}: cannot pull {spec.ref}: {exc}") from None
        self.manifest_digests[(spec.volume, spec.fsid)] = pulled.manifest_digest
        return pulled.bootstrap

    # -- start-up profiles (erofs_image.profile, fscached.core.profile_recorder) ----------------
    async def _start_profiles(self, spec: ImageSpec, bootstrap: Path) -> None:
        """An image was added to the catalog: start recording its reads (`record_profile`), and
        load, check and hand its start-up profile to its blobs (`profile`) so the frontend
        replays it at the mount. A profile that cannot be used is one warning, never an error."""
        key = (spec.volume, spec.fsid)
        keys = self.config.profile_of(spec)
        if keys.record_seconds > 0:
            self.recorders.add(spec.volume, spec.fsid, bootstrap, keys.record_seconds, spec.ref or spec.fsid,
                               self.catalog.devices[key])
        profile = await self._load_profile(spec, keys.replay, bootstrap)
        if profile is None:
            return
        chunks = self.catalog.add_profile(spec, profile)
        self.profile_stats["profile_ranges_loaded"] += len(profile.ranges)
        log.info("image %s: start-up profile of %d ranges (%d bytes, %d chunks to fetch) in %d blob(s): "
                 "fetched as soon as the image is mounted", spec.fsid, len(profile.ranges), profile.total_bytes,
                 chunks, len(profile.blob_ids()))

    async def _load_profile(self, spec: ImageSpec, replay: str, bootstrap: Path) -> StartupProfile | None:
        """The image's start-up profile, checked against its bootstrap and blobs; None (and one
        warning naming why, when there was one) if there is none or it cannot be used."""
        if replay == "none" or (replay == "auto" and spec.registry is None):  # auto: only a registry holds one
            return None
        try:
            digest = await asyncio.to_thread(bootstrap_digest, bootstrap)
            if replay == "auto":
                try:
                    found = await asyncio.wait_for(self._registry_profile(spec, digest), PROFILE_LOOKUP_SECONDS)
                except TimeoutError:
                    raise TimeoutError(f"the registry did not answer the profile lookup within "
                                       f"{PROFILE_LOOKUP_SECONDS:g} s") from None
                if found is None:
                    return None
                where, data = found
                profile = StartupProfile.from_json(data, where)
            else:
                where = f"profile {replay}"
                profile = await asyncio.to_thread(StartupProfile.load, Path(replay))
            sizes = {blob.info.blob_id: blob.size for blob in self.catalog.devices[(spec.volume, spec.fsid)]}
            profile.check_against(digest, sizes, where)
            return profile
        except ProfileError as exc:
            self.profile_stats["profile_rejected"] += 1
            log.warning("image %s: start-up profile not used: %s", spec.fsid, exc)
        except Exception as exc:  # a registry that failed: no profile, the image is served all the same
            log.warning("image %s: start-up profile not used: %s", spec.fsid, str(exc) or type(exc).__name__)
        return None

    async def _registry_profile(self, spec: ImageSpec, bootstrap_sha256: str) -> tuple[str, bytes] | None:
        """profile=auto: the profile the registry holds for the image: a referrer of its
        manifest (a `ref=` image, whose manifest was pulled), else the one tagged for its
        bootstrap (an image bound from a bootstrap file and a registry backend, as
        nydus-snapshotter binds them). (where it came from, its bytes), or None."""
        if spec.registry is None:
            return None
        from fetcher.referrers import fetch_profile, fetch_profile_for_bootstrap

        source = self.pool.registry(spec.registry)
        manifest = self.manifest_digests.get((spec.volume, spec.fsid))
        if manifest is not None:
            data = await fetch_profile(source, manifest)
            where = f"the registry's profile of {spec.ref}"
        else:
            data = await fetch_profile_for_bootstrap(source, bootstrap_sha256)
            where = f"the registry's profile of bootstrap {bootstrap_sha256}"
        if data is None:
            log.info("image %s: the registry has no start-up profile for %s", spec.fsid, manifest or bootstrap_sha256)
            return None
        return where, data


def _check_mountpoint(spec: ImageSpec, mountpoint: Path) -> None:
    """A mountpoint that can be one: a directory (made when missing), not below a file."""
    try:
        if mountpoint.exists() and not mountpoint.is_dir():
            raise ValueError(f"image {spec.fsid}: mountpoint {mountpoint} is not a directory")
        mountpoint.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise ValueError(f"image {spec.fsid}: mountpoint {mountpoint} is below a file, not a directory") from None
    except FileExistsError:
        raise ValueError(f"image {spec.fsid}: mountpoint {mountpoint} is not a directory") from None
    except OSError as exc:
        raise ValueError(f"image {spec.fsid}: mountpoint {mountpoint}: {exc.strerror}") from None


def _missing_dirs(path: Path) -> list[Path]:
    """The directories from `path` up that do not exist yet (deepest first)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing
