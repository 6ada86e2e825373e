"""The daemon: load the images, take /dev/cachefiles, serve until told to stop."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cachefiles.device import CachefilesDevice
from fscached.catalog import Catalog
from fscached.config import Config
from fscached.serve import Server

log = logging.getLogger("fscached")

WORKER_THREADS = 4
DRAIN_SECONDS = 10.0


class Daemon:
    def __init__(self, config: Config, device: CachefilesDevice | None = None) -> None:
        self.config = config
        self.catalog = Catalog()
        for spec in config.images:
            self.catalog.add_image(spec)
        self.device = device or CachefilesDevice(str(config.device))
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="fscached-io")
        self.server = Server(self.device, self.catalog, self.executor)
        self._stop = asyncio.Event()

    def bind(self) -> None:
        """Take the device and bind the cache (errors are CachefilesError, user-worded)."""
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.device.open()
        self.device.bind(str(self.config.cache_dir), self.config.tag)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self.device.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self.server.on_readable)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.write_stats)
        self.server.on_readable()  # anything queued before the reader was armed
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
            self.write_stats()
            for source in self.catalog.sources():
                await source.close()
            self.device.close()
            self.executor.shutdown(wait=True)
            log.info("stopped")

    def stop(self) -> None:
        self._stop.set()

    def write_stats(self) -> None:
        if self.config.stats_file:
            _write_atomic(self.config.stats_file, json.dumps(dict(self.server.stats), sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
