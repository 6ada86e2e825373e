"""The daemon: load the images, take /dev/cachefiles, serve until told to stop."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cachefiles.device import CachefilesDevice, CachefilesError, check_cache_dir
from fscached.catalog import Catalog, CatalogError
from fscached.sources import build_chain, registry_source
from fscached.config import Config, ImageSpec
from fscached.serve import Server

log = logging.getLogger("fscached")

WORKER_THREADS = 4
DRAIN_SECONDS = 10.0


class Daemon:
    def __init__(self, config: Config, device: CachefilesDevice | None = None) -> None:
        self.config = config
        self.catalog = Catalog()
        self.loaded = False
        self.device = device or CachefilesDevice(str(config.device))
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="fscached-io")
        self.server = Server(self.device, self.catalog, self.executor, config.read_window)
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._stop_before_start = False
        self.exit_code = 0

    async def load(self) -> None:
        """Open every image's bootstrap (pulling it from its registry when needed) and build
        its sources. Errors are CatalogError / SourceError, worded for the user."""
        for spec in self.config.images:
            path = spec.bootstrap
            if path is None:
                path = await pull_image_bootstrap(spec, self.config.work_dir)
            chain = build_chain(spec)
            for source in chain.sources:  # e.g. the Dragonfly proxy's ping_url health checks
                start = getattr(source, "start_health_checks", None)
                if start is not None:
                    start()
            self.catalog.add_image(spec, path, chain)
        self.loaded = True

    def bind(self) -> None:
        """Take the device and bind the cache (errors are CachefilesError, user-worded)."""
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_cache_dir(str(self.config.cache_dir))  # the most specific error first
        if not self.device.is_open:  # not handed over already open (simulator, failover)
            self.device.open()
        self.device.bind(str(self.config.cache_dir), self.config.tag)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            self._loop = loop
            if self._stop_before_start:
                self._stop.set()
        if not self.loaded:
            await self.load()
        fd = self.device.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGUSR1, self.write_stats)
        self._on_readable()  # anything queued before the reader was armed
        images = ", ".join(f"{s.fsid}" + (f" (domain {s.domain})" if s.domain else "") for s in self.config.images)
        log.info("serving %d image(s) from cache %s: %s", len(self.config.images), self.config.cache_dir, images or "none")
        if self.config.ready_file:
            _write_atomic(self.config.ready_file, f"{os.getpid()}\n")
        try:
            await self._stop.wait()
        finally:
            log.info("stopping: completing %d READ(s) in flight", len(self.server.tasks))
            loop.remove_reader(fd)
            await self.server.drain(DRAIN_SECONDS)
            self.executor.shutdown(wait=True)  # no write into an anon fd is left running
            self.server.release_all()
            self.write_stats()
            for source in self.catalog.sources():
                await source.close()
            self.device.close()
            log.info("stopped")
        return self.exit_code

    def _on_readable(self) -> None:
        try:
            self.server.on_readable()
        except CachefilesError as exc:  # the cache died under us: nothing more can be served
            log.error("%s", exc)
            self.exit_code = 1
            self._stop.set()

    def stop(self) -> None:
        """Thread-safe: ask the daemon to stop (also before run() has started)."""
        with self._loop_lock:
            if self._loop is None:
                self._stop_before_start = True
            else:
                self._loop.call_soon_threadsafe(self._stop.set)

    def counters(self) -> dict[str, int]:
        """The daemon's counters plus each source's, as "source:<name>:<ok|failed|...>"."""
        merged = dict(self.server.stats)
        for chain in self.catalog.sources():
            for key, value in chain.stats.items():
                merged[f"source:{key}"] = merged.get(f"source:{key}", 0) + value
        return merged

    def write_stats(self) -> None:
        if self.config.stats_file:
            _write_atomic(self.config.stats_file, json.dumps(self.counters(), sort_keys=True) + "\n")


async def pull_image_bootstrap(spec: ImageSpec, work_dir: Path) -> Path:
    """The bootstrap of a registry image, pulled (verified) into work_dir/bootstraps."""
    from fetcher.image_ref import parse_image_ref
    from fetcher.pull import pull_bootstrap
    from fetcher.source import SourceError

    assert spec.ref is not None and spec.registry is not None
    dest = work_dir / "bootstraps"
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = registry_source(spec.registry)
    try:
        pulled = await pull_bootstrap(registry, parse_image_ref(spec.ref).reference, dest)
    except (SourceError, ValueError) as exc:
        raise CatalogError(f"image {spec.fsid}: cannot pull {spec.ref}: {exc}") from None
    finally:
        await registry.close()
    return pulled.bootstrap


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
