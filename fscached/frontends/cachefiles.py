"""OPEN / READ / CLOSE handling: the daemon's side of the cachefiles conversation.

Every OPEN gets a copen (a size, or -errno); every READ gets a READ_COMPLETE, with data or
without (the reader then sees EIO, never a hang); every CLOSE releases the object's fd once
its READs are done.

Except in a hand-over (`handing_over`: another process holds the device too, a supervisor or a
successor, fscached.lifecycle.supervisor): then a READ that ends without its data is left unanswered, never
completed empty. The successor's `restore` makes the kernel send it again (with a new object id
once the object's anon fd is gone). `restore` re-sends the READs being served as well: a READ
whose msg_id is already in flight here is a duplicate and is dropped.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass

from cachefiles.device import CachefilesDevice, CachefilesError
from cachefiles.objects import ObjectEntry, ObjectTable
from cachefiles.messages import CloseRequest, MalformedMessage, OpenRequest, ReadRequest
from fetcher.source import SourceError
from fscached.core.catalog import VOLUME_PREFIX, BlobObject, BootstrapObject, Catalog, Served
from fscached.core.extents import chunks_with_data
from fscached.config import ImageSpec
from fscached.core.fill import DEFAULT_WINDOW, Filler, FillTarget, settle, VerifyError
from fscached.util.logs import request_log
from fscached.core.stats import RequestStats
from fscached.core.profile_recorder import ProfileRecorders

log = logging.getLogger("fscached.frontends.cachefiles")


@dataclass
class LiveObject:
    """What the daemon keeps per kernel object, as the ObjectTable entry's payload."""

    served: Served
    target: FillTarget
    name: str


class Server:
    def __init__(self, device: CachefilesDevice, catalog: Catalog, executor: Executor,
                 read_window: int = DEFAULT_WINDOW) -> None:
        self.device = device
        self.catalog = catalog
        self.stats: Counter[str] = Counter()
        self.filler = Filler(executor, self.stats, read_window)
        self.requests = RequestStats()  # outcome, latency and bytes of every READ answered
        # object_id -> anon fd (owned, closed once its last in-flight READ lets go) + LiveObject
        self.objects = ObjectTable()
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading: set[int] = set()  # msg_ids of the READs being served
        # stopping for a hand-over: never complete a READ without its data
        self.handing_over = False
        # another daemon serves this device too (a hot upgrade's overlap): READs for objects
        # not ours are its own, not an error
        self.device_shared = False
        # start-up profiles being recorded (fscached.core.profile_recorder; set by the daemon)
        self.recorders: ProfileRecorders | None = None

    def fileno(self) -> int:
        return self.device.fileno()

    @staticmethod
    def mount_args(spec: ImageSpec) -> tuple[str, str]:
        """mount(2) source and options: the kernel asks the daemon for everything else."""
        options = f"domain_id={spec.domain},fsid={spec.fsid}" if spec.domain else f"fsid={spec.fsid}"
        return "none", options

    def start_background(self) -> None:
        """Nothing to start: prefetch begins at each blob's OPEN."""

    def image_added(self, spec: ImageSpec) -> None:
        """Nothing to prepare: the kernel OPENs the objects when the image is mounted."""

    def image_removed(self, boot: BootstrapObject, dropped: list[BlobObject]) -> None:
        """Close the kernel objects of an image that was unbound: its bootstrap's and those
        of the blobs no other image uses (their fetches and prefetch stop)."""
        gone: list[Served] = [boot, *dropped]
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and any(live.served is obj for obj in gone):
                log.info("blob=%s object=%d: its image was unbound, closing it", live.name, entry.object_id)
                self._forget(entry.object_id)

    # -- message pump -------------------------------------------------------------------
    def on_readable(self) -> None:
        """Drain every queued message (read() returns one message, or nothing)."""
        while True:
            try:
                message = self.device.read_message()
            except MalformedMessage as bad:
                self._answer_malformed(bad)
                continue
            if message is None:
                return
            if isinstance(message, OpenRequest):
                self.handle_open(message)
            elif isinstance(message, ReadRequest):
                self.handle_read(message)
            elif isinstance(message, CloseRequest):
                self.handle_close(message)

    def _answer_malformed(self, bad: MalformedMessage) -> None:
        """An OPEN gets copen -EINVAL (its fd closed); anything else can only be logged."""
        self.stats["malformed"] += 1
        log.error("malformed message: %s", bad)
        try:
            self.device.reject_malformed(bad)
        except CachefilesError as exc:
            log.error("could not answer malformed msg_id=%s: %s", bad.msg_id, exc)

    # -- OPEN -------------------------------------------------------------------------------
    def handle_open(self, req: OpenRequest) -> None:
        self.stats["open"] += 1
        served = self.catalog.lookup(req.volume_key, req.cookie_key)
        # "<volume>/<blob id or fsid>", as the fanotify frontend names its cache files
        name = f"{req.volume_key.removeprefix(VOLUME_PREFIX)}/{req.cookie_key.decode('ascii', 'replace')}"
        if served is None:
            self.stats["open_unknown"] += 1
            request_log(log, "OPEN", f"msg:{req.msg_id}", name).warning("unknown cookie, answering ENOENT")
            _close_quietly(req.fd)
            self._copen(req.msg_id, -errno.ENOENT)
            return
        if req.object_id in self.objects:  # the kernel reuses an id only after CLOSE
            request_log(log, "OPEN", f"msg:{req.msg_id}", name).warning(
                "reuses open object %d: dropping the old one", req.object_id)
            self._forget(req.object_id)
        entry = self.objects.add(req.object_id, req.fd, req.volume_key, req.cookie_key, served.size)
        # a fetch holds this entry, never the id: a reused id must not keep it (or its fd) alive
        live = LiveObject(served, FillTarget(req.fd, lambda: self.objects.hold(entry)), name)
        entry.payload = live
        if isinstance(served, BlobObject):
            # what the cache file holds already (an earlier mount, a daemon before a restart or a
            # failover): the kernel reads it without asking, so no window fetches it again
            live.target.written.update(_filled_chunks(req.fd, served))
        request_log(log, "OPEN", f"msg:{req.msg_id}", name).info("object=%d size=%d", req.object_id, served.size)
        if not self._copen(req.msg_id, served.size):
            self._forget(req.object_id)
            return
        if isinstance(served, BootstrapObject) and self.recorders is not None:
            # the kernel opens the bootstrap when the image is mounted: a recording's clock starts
            self.recorders.started(req.volume_key.removeprefix(VOLUME_PREFIX), served.fsid)
        if isinstance(served, BlobObject) and (served.profile_order or served.prefetch_order):
            if self.recorders is not None and self.recorders.recording(served):
                # a prefetch would fill ranges the kernel then never asks for: not recorded
                log.info("blob=%s: its reads are being recorded: no profile replay or prefetch now", name)
                return
            task = asyncio.ensure_future(self._prefetch(live, served))
            live.target.prefetch = task
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _prefetch(self, live: LiveObject, served: BlobObject) -> None:
        """At OPEN (the mount): the start-up profile's chunks first, then the prefetch list."""
        try:
            if served.profile_order:
                await self.filler.replay(served, live.target, served.profile_order)
                log.info("profile replay blob=%s done (%d chunks)", live.name, len(served.profile_order))
            if served.prefetch_order:
                await self.filler.prefetch(served, live.target, served.prefetch_order, served.prefetch_bandwidth)
                log.info("prefetch blob=%s done (%d chunks)", live.name, len(served.prefetch_order))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("prefetch blob=%s failed", live.name)

    def _copen(self, msg_id: int, size: int) -> bool:
        try:
            self.device.copen(msg_id, size)
            return True
        except (CachefilesError, OSError) as exc:
            log.error("copen req=msg:%d size=%d failed: %s", msg_id, size, exc)
            return False

    # -- READ -------------------------------------------------------------------------------
    def handle_read(self, req: ReadRequest) -> None:
        if req.msg_id in self.reading:  # sent again by a `restore` while being served
            self.stats["read_duplicate"] += 1
            log.debug("READ req=msg:%d sent again while being served (restore): ignored", req.msg_id)
            return
        self.stats["read"] += 1
        if req.object_id not in self.objects:
            # No fd to complete on: the kernel fails the read when the object goes away.
            self.stats["read_unknown_object"] += 1
            if self.device_shared or self.handing_over:  # the other daemon's object (hot upgrade)
                log.info("READ req=msg:%d for object %d of the other daemon: left to it (or to restore)",
                         req.msg_id, req.object_id)
                return
            log.error("READ req=msg:%d for unknown object %d", req.msg_id, req.object_id)
            self.requests.observe("failed", 0.0)
            return
        if self.recorders is not None:
            live = _live(self.objects.get(req.object_id))
            if live is not None and isinstance(live.served, BlobObject) and live.served.recorders:
                self.recorders.note(live.served, req.offset, req.length)  # in the order READs come
        self.reading.add(req.msg_id)
        task = asyncio.ensure_future(self._serve_read(req, time.monotonic()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve_read(self, req: ReadRequest, started: float) -> None:
        # Holding the entry keeps its anon fd open until this READ is completed, even if a
        # CLOSE removes the object meanwhile.
        try:
            with self.objects.use(req.object_id) as entry:
                live = _live(entry)
                if live is None:
                    return
                await self._fill_and_complete(live, req, started)
        finally:
            self.reading.discard(req.msg_id)

    async def _fill_and_complete(self, live: LiveObject, req: ReadRequest, started: float) -> None:
        outcome = "failed"
        rlog = request_log(log, "READ", f"msg:{req.msg_id}", live.name)
        try:
            if isinstance(live.served, BootstrapObject):
                await self.filler.fill_bootstrap(live.served, live.target, req.offset, req.length)
                outcome = "filled"
            else:
                cached = self.filler.is_filled(live.served, live.target, req.offset, req.length)
                exact = self.recorders is not None and bool(live.served.recorders) and \
                    self.recorders.recording(live.served)
                await self.filler.fill_blob(live.served, live.target, req.offset, req.length, exact)
                outcome = "cached" if cached else "filled"
            self.stats["read_bytes"] += req.length
        except (SourceError, VerifyError, OSError, ValueError) as exc:
            if not self.handing_over:
                self.stats["read_failed"] += 1
                rlog.error("off=%d len=%d failed: %s", req.offset, req.length, exc)
            else:
                rlog.warning("off=%d len=%d failed during a hand-over (%s): left to the successor",
                             req.offset, req.length, exc)
        except asyncio.CancelledError:
            if not self.handing_over:
                self.stats["read_failed"] += 1
                rlog.warning("off=%d len=%d cancelled (object closed, or shutdown)", req.offset, req.length)
        except Exception:  # a bug must still not hang the reader
            self.stats["read_failed"] += 1
            rlog.exception("off=%d len=%d: unexpected error", req.offset, req.length)
        finally:
            if outcome == "failed" and self.handing_over:
                # no READ_COMPLETE: the reader waits, and the successor's `restore` sends it again
                self.stats["read_left"] += 1
                rlog.info("off=%d len=%d left unanswered for the successor (hand-over)", req.offset, req.length)
            else:
                self._complete(live, req.msg_id)
                self.requests.observe(outcome, time.monotonic() - started,
                                      req.length if outcome != "failed" else 0)

    def _complete(self, live: LiveObject, msg_id: int) -> None:
        try:
            self.device.complete_read(live.target.fd, msg_id)
        except (CachefilesError, OSError) as exc:
            request_log(log, "READ_COMPLETE", f"msg:{msg_id}", live.name).error("failed: %s", exc)

    # -- CLOSE ------------------------------------------------------------------------------
    def handle_close(self, req: CloseRequest) -> None:
        self.stats["close"] += 1
        live = _live(self._forget(req.object_id))
        if live is None:
            log.warning("CLOSE req=msg:%d for unknown object %d", req.msg_id, req.object_id)
            return
        request_log(log, "CLOSE", f"msg:{req.msg_id}", live.name).info("object=%d", req.object_id)

    def _forget(self, object_id: int) -> ObjectEntry | None:
        """Drop an object: its prefetch and fetch jobs stop, its fd closes once the last READ
        or write lets go."""
        entry = self.objects.remove(object_id)
        live = _live(entry)
        if live is not None:
            live.target.close()
        return entry

    # -- shutdown ---------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Let in-flight READs finish; cancel what is left (those complete without data).
        Background prefetches are not waited for."""
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and live.target.prefetch is not None:
                live.target.prefetch.cancel()
        await settle(self.tasks, timeout)
        await self.filler.drain(0)

    def release_all(self) -> None:
        """Close every anon fd: only once no worker thread can still write into one."""
        self.objects.close_all()


def _filled_chunks(fd: int, blob: BlobObject) -> list[int]:
    """Offsets of the chunks whose whole blocks are data in the object's cache file (what a
    daemon wrote, always verified first), as nydusd derives it at OPEN; an fd that cannot seek
    so gives nothing."""
    try:
        return [c.uncompressed_offset for c in chunks_with_data(fd, blob.size, blob.chunk_map.chunks, whole=True)]
    except OSError:
        return []


def _live(entry: ObjectEntry | None) -> LiveObject | None:
    """The daemon's object behind a table entry (None until OPEN has set it up)."""
    return entry.payload if entry is not None and isinstance(entry.payload, LiveObject) else None


def _close_quietly(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass
