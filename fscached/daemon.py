"""The daemon: load the images, take a kernel path (fanotify or cachefiles), mount what it was
asked to, serve until told to stop."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Coroutine, TypeVar, Union

from cachefiles.device import CachefilesDevice, CachefilesError, check_cache_dir
from fscached import cache_gc
from fscached.util import mounts
from fscached.kernel_path import choose_backend
from erofs_image.reader import Bootstrap
from fscached.core.catalog import Catalog, CatalogError, open_bootstrap
from fscached.config import Config, ImageSpec, ProfileSpec
from fscached.frontends.fanotify.frontend import FanotifyServer
from fscached.lifecycle.state import FD_CACHEFILES
from fscached.core.profile import ProfileError, StartupProfile, bootstrap_digest
from fscached.core.profile_recorder import ProfileRecorders
from fscached.frontends.cachefiles import Server
from fscached.core.sources import SourcePool
from fscached.util.files import write_atomic

if TYPE_CHECKING:
    from fscached.lifecycle.systemd import Service

log = logging.getLogger("fscached")

WORKER_THREADS = 4
DRAIN_SECONDS = 10.0
# a stop that hands over (fscached.lifecycle.supervisor): READs in flight get this long to finish with their
# data; the rest are left unanswered for the successor, whose `restore` has the kernel send them again
HANDOVER_DRAIN_SECONDS = 2.0

Frontend = Union[Server, FanotifyServer]
T = TypeVar("T")


class BusyError(Exception):
    """An image cannot be dropped now: it is mounted and in use."""


class Daemon:
    # how the cachefiles device is made: from its path, or from an fd systemd kept (tests put a
    # simulator's device class here)
    device_class: type[CachefilesDevice] = CachefilesDevice

    def __init__(self, config: Config, device: CachefilesDevice | None = None,
                 service: Service | None = None) -> None:
        self.config = config
        # run by systemd (fscached.lifecycle.systemd): fds from its store, READY/WATCHDOG/FDSTORE to it
        self.service = service
        self._restore = False  # cachefiles: the device came back from the fd store: `restore`
        self._device_kept = False
        # images a predecessor bound at run time (from its hand-over state in the fd store)
        self.restored_images: list[ImageSpec] = []
        self.catalog = Catalog()
        self.pool = SourcePool()
        self.loaded = False
        self._given_device = device  # tests and failover: an already open device (cachefiles)
        self.backend = "cachefiles" if device is not None else config.backend
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="fscached-io")
        self.server: Frontend | None = None
        self.mounted: list[Path] = []
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._stop_before_start = False
        self.exit_code = 0
        # True from the moment run() answers the kernel (and has mounted what it was asked to)
        # until it starts stopping: the control API (fscached.api.server) binds images only then
        self.serving = False
        # Another process holds our kernel fd too (a failover supervisor, a successor): a stop
        # is then a hand-over. Its mounts stay, and no READ is completed without its data (a
        # reader would see EIO); the requests left go back to the kernel's queue (`restore`)
        # for the successor. Set by fscached.lifecycle.supervisor (sendfd, takeover).
        self.handing_over = False
        # start-up profiles: recordings (record_profile=), and the manifest digest of each pulled
        # image (its profile is a referrer of that manifest in the registry)
        self.recorders = ProfileRecorders(config.work_dir)
        self.manifest_digests: dict[tuple[str, str], str] = {}
        # profile_ranges_loaded / profile_rejected before a frontend exists (then its stats)
        self.profile_stats: Counter[str] = Counter()

    async def load(self) -> None:
        """Open every image's bootstrap (pulling it from its registry when needed) and build
        its sources. Errors are CatalogError / SourceError, worded for the user."""
        for spec in self.config.images:
            path = spec.bootstrap
            if path is None:
                path = await self.pull_image_bootstrap(spec)
            self.catalog.add_image(spec, path, self.pool.chain(spec))
            await self._start_profiles(spec, path)
        if self.service is not None and self.service.state is not None:
            await self._bind_restored(self.service.state.run_time_images)
        self.loaded = True

    async def _bind_restored(self, specs: tuple[ImageSpec, ...]) -> None:
        """The images a predecessor bound at run time, bound again before the kernel asks."""
        for spec in specs:
            if (spec.volume, spec.fsid) in self.catalog.images:
                continue  # configured now
            try:
                path = spec.bootstrap if spec.bootstrap is not None else await self.pull_image_bootstrap(spec)
                self.catalog.add_image(spec, path, self.pool.chain(spec))
            except Exception as exc:  # one image that cannot come back must not stop the others
                log.error("image %s, bound at run time before the restart, cannot be bound again: %s", spec.fsid, exc)
                continue
            await self._start_profiles(spec, path)
            self.restored_images.append(spec)
        if self.restored_images:
            log.info("bound again %d image(s) bound at run time before the restart: %s",
                     len(self.restored_images), ", ".join(spec.fsid for spec in self.restored_images))

    def bind(self) -> None:
        """Choose the kernel path and take it: the device bound (cachefiles), or the group made
        or taken back and every cache file marked (fanotify). Errors are user-worded
        (CachefilesError, FanotifyError, BackendError, KeeperError)."""
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = "asked for"
        service = self.service
        if service is not None:
            from fscached.lifecycle.systemd import stored_backend

            self.backend, why = stored_backend(service, self.backend, why)
        if (self.backend == "auto" or self.backend == "fanotify") and why == "asked for":
            self.backend, why = choose_backend(self.backend, self.config.cache_dir, self.config.device)
        if self.backend == "fanotify":
            server = FanotifyServer(self.catalog, self.executor, self.config.cache_dir, self.config.read_window)
            if service is not None:
                from fscached.lifecycle.systemd import FanotifyStore

                server.open(FanotifyStore(service))  # systemd's fd store instead of the keeper
            else:
                server.open()
            self.server = server
        else:
            check_cache_dir(str(self.config.cache_dir))  # the most specific error first
            kept = service.take(FD_CACHEFILES) if service is not None else None
            if kept is not None:
                # bound by a predecessor, kept by systemd: no dir/bind again, `restore` once the
                # reader is armed (run())
                device = self.device_class.from_fd(kept, path=str(self.config.device))
                self._restore = self._device_kept = True
                log.info("took %s back from systemd's fd store: the requests in flight come again (restore)",
                         self.config.device)
            else:
                device = self._given_device or self.device_class(str(self.config.device))
                if not device.is_open:  # not handed over already open (simulator, failover)
                    device.open()
                device.bind(str(self.config.cache_dir), self.config.tag,
                            block_limits=(self.config.brun, self.config.bcull, self.config.bstop))
                if service is not None:
                    from fscached.lifecycle.systemd import keep_device

                    keep_device(service, device)
            self.server = Server(device, self.catalog, self.executor, self.config.read_window)
        self.server.recorders = self.recorders
        self.server.stats.update(self.profile_stats)  # counted while loading: the frontend's from now on
        self.profile_stats = self.server.stats
        # logged once it worked: a start-up error stays the one line on stderr
        log.info("kernel path: %s (%s)", self.backend, why)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            self._loop = loop
            if self._stop_before_start:
                self._stop.set()
        if not self.loaded:
            await self.load()
        if self.server is None:
            self.bind()
        server = self.server
        assert server is not None
        fd = server.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGUSR1, self.write_stats)
        self._on_readable()  # anything queued before the reader was armed
        if self._restore and isinstance(server, Server):
            self._restore = False
            try:
                server.device.restore()  # the READs the dead daemon had taken come again
            except CachefilesError as exc:
                log.error("%s", exc)
        server.start_background()
        let_go = True
        try:
            try:
                await self._mount_all(server)
            except (OSError, ValueError) as exc:
                log.error("%s", exc)
                self.exit_code = 1
                self._stop.set()
            images = ", ".join(f"{s.fsid}" + (f" (domain {s.domain})" if s.domain else "") for s in self.config.images)
            log.info("serving %d image(s) from cache %s through %s: %s", len(self.config.images),
                     self.config.cache_dir, self.backend, images or "none")
            self.serving = not self._stop.is_set()
            if self.service is not None and self.serving:
                self.service.close_unused()
                self.service.store_state(self)
                self.service.ready(f"serving {len(self.catalog.images)} image(s) through {self.backend}")
            if self.config.ready_file and not self._stop.is_set():
                write_atomic(self.config.ready_file, f"{os.getpid()}\n", mode=0o644)
            cache_gc.start(self)  # the cache budget's periodic check, when one is configured
            let_go = await self._serve_until_unmounted(server)
        finally:
            self.serving = False
            await cache_gc.stop(self)
            await self.recorders.finish_all("the daemon stops")
            handing_over = self.handing_over and isinstance(server, Server)
            loop.remove_reader(fd)
            if handing_over:
                assert isinstance(server, Server)
                server.handing_over = True  # from now on a READ without its data is left, not completed
                log.info("stopping for a hand-over: %d request(s) in flight get %.0f s to finish with their data, "
                         "the rest are left to the successor", len(server.tasks), HANDOVER_DRAIN_SECONDS)
                await server.drain(HANDOVER_DRAIN_SECONDS)
            else:
                log.info("stopping: completing %d request(s) in flight", len(server.tasks))
                await server.drain(DRAIN_SECONDS)
            # no write into a cache fd is left running; waited for off the event loop
            await asyncio.to_thread(self.executor.shutdown, True)
            if isinstance(server, FanotifyServer):
                server.release_all(let_go=let_go)
            else:
                server.release_all()
                if handing_over:
                    _requeue_for_successor(server)
                if self.service is not None and let_go:
                    self.service.release()  # nothing mounted: the next start binds afresh
                server.device.close()
            if self.service is not None:
                if not let_go and self.service.can_store:
                    log.info("systemd's fd store keeps the kernel fd and the state: the next start takes them back")
                self.service.stop_watchdog()
            self.write_stats()
            if self.pool.sources():  # none when no image was ever served (an API-only start)
                await self.pool.close()
            log.info("stopped")
        return self.exit_code

    async def _mount_all(self, server: Frontend) -> None:
        """Mount every image with a mountpoint, once the kernel's questions can be answered."""
        for spec in [*self.config.images, *self.restored_images]:
            await self._mount(server, spec)

    async def _mount(self, server: Frontend, spec: ImageSpec) -> None:
        if spec.mountpoint is None:
            return
        source, options = server.mount_args(spec)
        present = mounts.erofs_mount_table()
        if str(spec.mountpoint) in present:
            there, mount_id = present[str(spec.mountpoint)]
            if (isinstance(server, FanotifyServer) and server.takeover and there == source
                    and server.is_watched(str(spec.mountpoint), mount_id)):
                log.info("image %s: still mounted on %s, served again", spec.fsid, spec.mountpoint)
                self.mounted.append(spec.mountpoint)
                return
            if isinstance(server, Server) and self._device_kept and self._fscache_mount_of(spec):
                log.info("image %s: still mounted on %s, served again", spec.fsid, spec.mountpoint)
                self.mounted.append(spec.mountpoint)
                return
            raise OSError(f"image {spec.fsid}: {spec.mountpoint} is already mounted (from {there}), "
                          f"not by a daemon whose watch is still alive; unmount it first (umount {spec.mountpoint})")
        await asyncio.to_thread(mounts.mount_erofs, source, spec.mountpoint, options)
        self.mounted.append(spec.mountpoint)
        self.recorders.started(spec.volume, spec.fsid)  # a recording's clock starts at the mount
        log.info("image %s mounted on %s", spec.fsid, spec.mountpoint)

    # -- images at run time (the control API) ------------------------------------------------
    async def add_image(self, spec: ImageSpec, profile: ProfileSpec | None = None,
                        parsed: Bootstrap | None = None) -> None:
        """Serve one more image while the others are mounted and read (CatalogError, SourceError,
        OSError for a failed mount: then the image is not served). `profile`: its start-up
        profile keys (the bind's record_profile / profile), kept in config.profiles. `parsed`:
        its bootstrap if the caller parsed it already; else it is parsed in a worker thread
        (never on the loop: the other images' reads go on meanwhile)."""
        server = self.server
        assert server is not None
        path = spec.bootstrap if spec.bootstrap is not None else await self.pull_image_bootstrap(spec)
        if parsed is None:
            parsed = await asyncio.to_thread(open_bootstrap, spec, path)
        self.catalog.add_image(spec, path, self.pool.chain(spec), parsed)
        if profile is not None:
            if profile == ProfileSpec():
                self.config.profiles.pop((spec.volume, spec.fsid), None)
            else:
                self.config.profiles[(spec.volume, spec.fsid)] = profile
        try:
            await self._start_profiles(spec, path)  # before image_added: it starts the replay
            server.image_added(spec)
            await self._mount(server, spec)
        except BaseException:
            await self.recorders.finish(spec.volume, spec.fsid, "the bind failed")
            boot, dropped = self.catalog.remove_image(spec.volume, spec.fsid)
            server.image_removed(boot, dropped)
            raise
        log.info("image %s bound%s", spec.fsid, f" (domain {spec.domain})" if spec.domain else "")
        if self.service is not None:
            self.service.store_state(self)  # a restarted daemon binds it again

    async def remove_image(self, volume: str, fsid: str) -> ImageSpec:
        """Stop serving an image: unmount it if the daemon mounted it, close its objects, drop
        its blobs' references (a blob shared in a domain stays while another image uses it).
        CatalogError when unknown (its message holds "blob_cache: cache entry not found");
        BusyError while it is mounted and in use."""
        server = self.server
        assert server is not None
        spec = self.catalog.images.get((volume, fsid))
        if spec is None:
            raise CatalogError(f"blob_cache: cache entry not found: image {fsid} in {volume}")
        if spec.mountpoint is not None and spec.mountpoint in self.mounted:
            if not await asyncio.to_thread(mounts.unmount, spec.mountpoint):
                raise BusyError(f"image {fsid}: {spec.mountpoint} is busy")
            self.mounted.remove(spec.mountpoint)
        if isinstance(server, FanotifyServer) and server.serving_mounts_of(spec):
            # its blobs' marks are all that stands between those readers and holes
            raise BusyError(f"image {fsid}: still mounted on {', '.join(server.serving_mounts_of(spec))}")
        await self.recorders.finish(volume, fsid, "the image is unbound")
        boot, dropped = self.catalog.remove_image(volume, fsid)
        server.image_removed(boot, dropped)
        cache_gc.image_released(self, fsid, [blob.info.blob_id for blob in dropped])
        log.info("image %s unbound (%d blob(s) no longer used)", fsid, len(dropped))
        if spec in self.restored_images:
            self.restored_images.remove(spec)
        if self.service is not None:
            self.service.store_state(self)
        return spec

    async def _serve_until_unmounted(self, server: Frontend) -> bool:
        """Serve until told to stop and what we mounted is unmounted. A busy mount keeps the
        daemon serving it (it never leaves a mount unwatched). Returns whether nothing of ours
        is mounted any more (fanotify: the keeper may then let the group go)."""
        while True:
            await self._stop.wait()
            if self.service is not None:
                self.service.stopping()
            if self.handing_over:  # the successor serves them: they stay mounted
                if self.mounted:
                    log.info("hand-over: %s stay mounted for the successor", ", ".join(map(str, self.mounted)))
                return False
            busy = []
            for mountpoint in list(self.mounted):
                if await asyncio.to_thread(mounts.unmount, mountpoint):
                    self.mounted.remove(mountpoint)
                    log.info("unmounted %s", mountpoint)
                else:
                    busy.append(str(mountpoint))
            if busy and self.service is not None and self.service.keeps_kernel_fd:
                # run by systemd: its fd store keeps the kernel fd, the next start serves them
                log.warning("%s busy: left mounted for the next fscached (systemd's fd store keeps the kernel "
                            "fd; `systemctl stop` drops the store)", ", ".join(busy))
                self._hand_over_to_next()
                return False
            if isinstance(server, Server) and self.service is not None and self.service.keeps_kernel_fd:

                others = [m.mountpoint for m in mounts.fscache_mounts()]
                if not others:  # our unmounts' CLOSEs come in a moment: wait for them, briefly
                    deadline = asyncio.get_running_loop().time() + 3.0
                    while (any(True for _ in server.objects.entries())
                           and asyncio.get_running_loop().time() < deadline):
                        await asyncio.sleep(0.05)
                    if any(True for _ in server.objects.entries()):
                        others = ["objects the kernel still has open"]  # mounted elsewhere (a namespace)
                if others:
                    log.warning("%s still mounted: left to the next fscached (systemd's fd store keeps "
                                "/dev/cachefiles)", ", ".join(others))
                    self._hand_over_to_next()
                    return False
            if busy:
                log.error("still serving: %s busy (stop what uses it, then signal again)", ", ".join(busy))
                self._stop.clear()
                continue
            if isinstance(server, FanotifyServer):
                others = server.still_mounted()
                if others:
                    log.warning("%s still mounted: the keeper keeps the fanotify group, so its readers "
                                "wait for the next fscached instead of reading holes", ", ".join(others))
                    return False
            return True

    def _on_readable(self) -> None:
        assert self.server is not None
        try:
            self.server.on_readable()
        except CachefilesError as exc:  # the cache died under us: nothing more can be served
            log.error("%s", exc)
            self.exit_code = 1
            self._stop.set()

    def _hand_over_to_next(self) -> None:
        """A stop under systemd that leaves mounts to the next process: cachefiles READs in
        flight are not completed without their data (restore has the kernel send them again)."""
        if isinstance(self.server, Server) and hasattr(self, "handing_over"):
            self.handing_over = True

    def _fscache_mount_of(self, spec: ImageSpec) -> bool:
        assert spec.mountpoint is not None
        return mounts.fscache_mount_of(spec.mountpoint, spec.fsid, spec.domain)

    @property
    def stopping(self) -> bool:
        """A stop was asked for (the daemon may still be unmounting and draining)."""
        return self._stop.is_set() or self._stop_before_start

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

    def counters(self) -> dict[str, int]:
        """The daemon's counters plus each source's, as "source:<name>:<ok|failed|...>"."""
        merged = dict(self.server.stats) if self.server is not None else dict(self.profile_stats)
        for chain in self.catalog.sources():
            for key, value in chain.stats.items():
                merged[f"source:{key}"] = merged.get(f"source:{key}", 0) + value
        return merged

    def write_stats(self) -> None:
        if self.config.stats_file:
            write_atomic(self.config.stats_file, json.dumps(self.counters(), sort_keys=True) + "\n", mode=0o644)

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

    # -- start-up profiles (fscached.core.profile, fscached.core.profile_recorder) ----------------------
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
        if replay == "none":
            return None
        try:
            if replay == "auto":
                data = await self._registry_profile(spec)
                if data is None:
                    return None
                profile = StartupProfile.from_json(data, f"the registry's profile of {spec.ref}")
                where = f"the registry's profile of {spec.ref}"
            else:
                profile = await asyncio.to_thread(StartupProfile.load, Path(replay))
                where = f"profile {replay}"
            digest = await asyncio.to_thread(bootstrap_digest, bootstrap)
            sizes = {blob.info.blob_id: blob.size for blob in self.catalog.devices[(spec.volume, spec.fsid)]}
            profile.check_against(digest, sizes, where)
            return profile
        except ProfileError as exc:
            self.profile_stats["profile_rejected"] += 1
            log.warning("image %s: start-up profile not used: %s", spec.fsid, exc)
        except Exception as exc:  # a registry that failed: no profile, the image is served all the same
            log.warning("image %s: start-up profile not used: %s", spec.fsid, str(exc) or type(exc).__name__)
        return None

    async def _registry_profile(self, spec: ImageSpec) -> bytes | None:
        """profile=auto: the profile the registry holds for a `ref=` image (a referrer of its
        manifest), through fetcher.referrers when that module exists."""
        digest = self.manifest_digests.get((spec.volume, spec.fsid))
        if spec.ref is None or spec.registry is None or digest is None:
            return None
        try:
            from fetcher.referrers import fetch_profile  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            log.debug("image %s: no registry profile lookup in this build (fetcher.referrers)", spec.fsid)
            return None
        data: bytes | None = await fetch_profile(self.pool.registry(spec.registry), digest)
        if data is None:
            log.info("image %s: the registry has no start-up profile for %s", spec.fsid, digest)
        return data


def _requeue_for_successor(server: Server) -> None:
    """A hand-over stop, once every anon fd of ours is closed: `restore` marks the requests we
    took and left as new, so the successor gets them (the kernel re-opens their objects with new
    object ids first). Before the close, it would re-send them with ids only we knew."""
    if server.device.restore_supported is False:
        return
    try:
        server.device.restore()
        log.info("hand-over: the requests left were given back to the kernel's queue (restore)")
    except CachefilesError as exc:
        log.warning("hand-over: could not give the requests left back to the kernel (%s): the successor's "
                    "takeover does it", exc)
