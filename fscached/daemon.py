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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Coroutine, TypeVar, Union

from cachefiles.device import CachefilesDevice, CachefilesError, check_cache_dir
from fscached import cache_gc, mounts
from fscached.backend import choose_backend
from fscached.catalog import Catalog, CatalogError
from fscached.config import Config, ImageSpec
from fscached.fanotify_frontend import FanotifyServer
from fscached.serve import Server
from fscached.sources import SourcePool

log = logging.getLogger("fscached")

WORKER_THREADS = 4
DRAIN_SECONDS = 10.0

Frontend = Union[Server, FanotifyServer]
T = TypeVar("T")


class BusyError(Exception):
    """An image cannot be dropped now: it is mounted and in use."""


class Daemon:
    def __init__(self, config: Config, device: CachefilesDevice | None = None) -> None:
        self.config = config
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
        # until it starts stopping: the control API (fscached.api) binds images only then
        self.serving = False

    async def load(self) -> None:
        """Open every image's bootstrap (pulling it from its registry when needed) and build
        its sources. Errors are CatalogError / SourceError, worded for the user."""
        for spec in self.config.images:
            path = spec.bootstrap
            if path is None:
                path = await self.pull_image_bootstrap(spec)
            self.catalog.add_image(spec, path, self.pool.chain(spec))
        self.loaded = True

    def bind(self) -> None:
        """Choose the kernel path and take it: the device bound (cachefiles), or the group made
        or taken back and every cache file marked (fanotify). Errors are user-worded
        (CachefilesError, FanotifyError, BackendError, KeeperError)."""
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = "asked for"
        if self.backend == "auto" or self.backend == "fanotify":
            self.backend, why = choose_backend(self.backend, self.config.cache_dir, self.config.device)
        if self.backend == "fanotify":
            server = FanotifyServer(self.catalog, self.executor, self.config.cache_dir, self.config.read_window)
            server.open()
            self.server = server
        else:
            check_cache_dir(str(self.config.cache_dir))  # the most specific error first
            device = self._given_device or CachefilesDevice(str(self.config.device))
            if not device.is_open:  # not handed over already open (simulator, failover)
                device.open()
            device.bind(str(self.config.cache_dir), self.config.tag,
                        block_limits=(self.config.brun, self.config.bcull, self.config.bstop))
            self.server = Server(device, self.catalog, self.executor, self.config.read_window)
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
            if self.config.ready_file and not self._stop.is_set():
                _write_atomic(self.config.ready_file, f"{os.getpid()}\n")
            cache_gc.start(self)  # the cache budget's periodic check, when one is configured
            let_go = await self._serve_until_unmounted(server)
        finally:
            self.serving = False
            await cache_gc.stop(self)
            log.info("stopping: completing %d request(s) in flight", len(server.tasks))
            loop.remove_reader(fd)
            await server.drain(DRAIN_SECONDS)
            # no write into a cache fd is left running; waited for off the event loop
            await asyncio.to_thread(self.executor.shutdown, True)
            if isinstance(server, FanotifyServer):
                server.release_all(let_go=let_go)
            else:
                server.release_all()
                server.device.close()
            self.write_stats()
            if self.pool.sources():  # none when no image was ever served (an API-only start)
                await self.pool.close()
            log.info("stopped")
        return self.exit_code

    async def _mount_all(self, server: Frontend) -> None:
        """Mount every image with a mountpoint, once the kernel's questions can be answered."""
        for spec in self.config.images:
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
            raise OSError(f"image {spec.fsid}: {spec.mountpoint} is already mounted (from {there}), "
                          f"not by a daemon whose watch is still alive; unmount it first (umount {spec.mountpoint})")
        await asyncio.to_thread(mounts.mount_erofs, source, spec.mountpoint, options)
        self.mounted.append(spec.mountpoint)
        log.info("image %s mounted on %s", spec.fsid, spec.mountpoint)

    # -- images at run time (the control API) ------------------------------------------------
    async def add_image(self, spec: ImageSpec) -> None:
        """Serve one more image while the others are mounted and read (CatalogError, SourceError,
        OSError for a failed mount: then the image is not served)."""
        server = self.server
        assert server is not None
        path = spec.bootstrap if spec.bootstrap is not None else await self.pull_image_bootstrap(spec)
        self.catalog.add_image(spec, path, self.pool.chain(spec))
        try:
            server.image_added(spec)
            await self._mount(server, spec)
        except BaseException:
            boot, dropped = self.catalog.remove_image(spec.volume, spec.fsid)
            server.image_removed(boot, dropped)
            raise
        log.info("image %s bound%s", spec.fsid, f" (domain {spec.domain})" if spec.domain else "")

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
        boot, dropped = self.catalog.remove_image(volume, fsid)
        server.image_removed(boot, dropped)
        cache_gc.image_released(self, fsid, [blob.info.blob_id for blob in dropped])
        log.info("image %s unbound (%d blob(s) no longer used)", fsid, len(dropped))
        return spec

    async def _serve_until_unmounted(self, server: Frontend) -> bool:
        """Serve until told to stop and what we mounted is unmounted. A busy mount keeps the
        daemon serving it (it never leaves a mount unwatched). Returns whether nothing of ours
        is mounted any more (fanotify: the keeper may then let the group go)."""
        while True:
            await self._stop.wait()
            busy = []
            for mountpoint in list(self.mounted):
                if await asyncio.to_thread(mounts.unmount, mountpoint):
                    self.mounted.remove(mountpoint)
                    log.info("unmounted %s", mountpoint)
                else:
                    busy.append(str(mountpoint))
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

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Thread-safe: run a coroutine on the daemon's loop once run() has started (tests,
        embedding)."""
        assert self._loop is not None, "the daemon is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def counters(self) -> dict[str, int]:
        """The daemon's counters plus each source's, as "source:<name>:<ok|failed|...>"."""
        merged = dict(self.server.stats) if self.server is not None else {}
        for chain in self.catalog.sources():
            for key, value in chain.stats.items():
                merged[f"source:{key}"] = merged.get(f"source:{key}", 0) + value
        return merged

    def write_stats(self) -> None:
        if self.config.stats_file:
            _write_atomic(self.config.stats_file, json.dumps(self.counters(), sort_keys=True) + "\n")

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
        return pulled.bootstrap


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
