"""OPEN / READ / CLOSE on /dev/cachefiles: the daemon's side of the cachefiles conversation.

Every OPEN gets a copen (a size, or -errno); every READ gets a READ_COMPLETE, with data or
without (the reader then sees EIO, never a hang); every CLOSE releases the object's fd once
its READs are done.

Except in a hand-over (`begin_hand_over`: another process holds the device too, a supervisor or
a successor, fscached.lifecycle.supervisor): then a READ that ends without its data is left
unanswered, never completed empty. The successor's `restore` makes the kernel send it again
(with a new object id once the object's anon fd is gone). `restore` re-sends the READs being
served as well: a READ whose msg_id is already in flight here is a duplicate and is dropped.

`requeue()` is the one place that writes `restore` (after a restart from systemd's fd store,
at a takeover, at a hot upgrade's start, and when a hand-over stop leaves READs behind).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefiles.device import NO_RESTORE, CachefilesDevice, CachefilesError
from cachefiles.messages import CloseRequest, MalformedMessage, OpenRequest, ReadRequest
from cachefiles.objects import ObjectEntry, ObjectTable
from fscached.config import ImageSpec
from fscached.core.catalog import VOLUME_PREFIX, BlobObject, BootstrapObject, Catalog, Served
from fscached.core.extents import chunks_with_data
from fscached.core.fill import DEFAULT_WINDOW, Filler, FillTarget, settle
from fscached.core.profile_recorder import ProfileRecorders
from fscached.core.stats import RequestStats
from fscached.frontends.base import BlobFill, InFlight, KernelPathLost, exact_fill, fill_outcome, prefetch_blob, wants_background
from fscached.frontends.cachefiles.cull import CachefilesCuller
from fscached.lifecycle import fdnames
from fscached.util import mounts
from fscached.util.logs import request_log

log = logging.getLogger("fscached.cachefiles")

NEEDS_NEWER_KERNEL = (f"failover needs a newer kernel: {NO_RESTORE}; this kernel is {os.uname().release}. "
                      "sendfd and takeover are refused: a restarted daemon could not resume the mounts "
                      "(set recover_policy = \"restart\" in nydus-snapshotter)")
# after our own unmounts at a stop, the kernel's CLOSEs for their objects come in a moment
CLOSES_SETTLE_SECONDS = 3.0


class RestoreUnsupported(CachefilesError):
    """The kernel has no `restore` (Linux < 6.8 / 6.1.95): a successor cannot resume."""


@dataclass
class LiveObject:
    """What the daemon keeps per kernel object, as the ObjectTable entry's payload."""

    served: Served
    target: FillTarget
    name: str


class CachefilesFrontend:
    kernel_path = "cachefiles"
    handover_fd_name = fdnames.CACHEFILES
    closing_fails_readers = True  # a closed device fails its waiting READs with EIO

    def __init__(self, device: CachefilesDevice, catalog: Catalog, executor: Executor, cache_dir: Path,
                 read_window: int = DEFAULT_WINDOW, *, kept: bool = False, requeue_at_start: bool = False,
                 shared: bool = False,
                 space_limits: tuple[int | None, int | None, int | None] = (None, None, None)) -> None:
        self.device = device
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.stats: Counter[str] = Counter()
        self.filler = Filler(executor, self.stats, read_window)
        self.requests = RequestStats()  # outcome, latency and bytes of every READ answered
        # object_id -> anon fd (owned, closed once its last in-flight READ lets go) + LiveObject
        self.objects = ObjectTable()
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading: set[int] = set()  # msg_ids of the READs being served
        self._in_flight: dict[int, InFlight] = {}  # msg_id -> when it came
        # stopping for a hand-over: never complete a READ without its data
        self.handing_over = False
        # another daemon serves this device too (a hot upgrade's overlap, until `start`): READs
        # for objects not ours are its own, not an error
        self.device_shared = shared
        # the device came from a carrier after a restart: `restore` once the reader is armed
        self.requeue_at_start = requeue_at_start
        self._no_objects = asyncio.Event()  # set whenever the kernel has no object of ours open
        self._no_objects.set()
        # the device was bound by a predecessor (systemd's fd store, a takeover): mounts of its
        # images may be there already, served again
        self.kept = kept
        self.recorders: ProfileRecorders | None = None
        self.culler = CachefilesCuller(self, space_limits)

    def refresh_stats(self) -> None:
        """Nothing: every READ is answered in Python."""

    def fileno(self) -> int:
        return self.device.fileno()

    # -- images ---------------------------------------------------------------------------------
    def mount_args(self, spec: ImageSpec) -> tuple[str, str]:
        """mount(2) source and options: the kernel asks the daemon for everything else."""
        options = f"domain_id={spec.domain},fsid={spec.fsid}" if spec.domain else f"fsid={spec.fsid}"
        return "none", options

    def start_background(self) -> None:
        """After a restart from a carrier, the READs the dead daemon had taken come again
        (`restore`); prefetch begins at each blob's OPEN."""
        if self.requeue_at_start:
            self.requeue_at_start = False
            self.requeue("restart")

    def image_added(self, spec: ImageSpec) -> None:
        """Nothing to prepare: the kernel OPENs the objects when the image is mounted."""

    def image_removed(self, boot: BootstrapObject, dropped: Sequence[BlobObject]) -> None:
        """Close the kernel objects of an image that was unbound: its bootstrap's and those
        of the blobs no other image uses (their fetches and prefetch stop)."""
        gone: list[Served] = [boot, *dropped]
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and any(live.served is obj for obj in gone):
                log.info("blob=%s object=%d: its image was unbound, closing it", live.name, entry.object_id)
                self._forget(entry.object_id)

    def readers_of(self, spec: ImageSpec, blobs: Sequence[BlobObject]) -> list[str]:
        """None that matter: nydus-snapshotter unbinds before it unmounts, and the objects an
        unbind closes fail their reads with EIO, never with holes."""
        return []

    def still_ours(self, spec: ImageSpec, mountpoint: Path) -> bool:
        return self.kept and mounts.fscache_mount_of(mountpoint, spec.fsid, spec.domain)

    # -- message pump ---------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Drain every queued message (read() returns one message, or nothing)."""
        while True:
            try:
                message = self.device.read_message()
            except MalformedMessage as bad:
                self._answer_malformed(bad)
                continue
            except CachefilesError as exc:  # the cache died under us: nothing more can be served
                raise KernelPathLost(str(exc)) from None
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

    # -- OPEN -----------------------------------------------------------------------------------
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
        self._no_objects.clear()
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
        if isinstance(served, BlobObject) and wants_background(served):
            task = asyncio.ensure_future(prefetch_blob(self.filler, self.recorders, served, live.target, name, log))
            live.target.prefetch = task
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _copen(self, msg_id: int, size: int) -> bool:
        try:
            self.device.copen(msg_id, size)
            return True
        except (CachefilesError, OSError) as exc:
            log.error("copen req=msg:%d size=%d failed: %s", msg_id, size, exc)
            return False

    # -- READ -----------------------------------------------------------------------------------
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
        self._in_flight[req.msg_id] = InFlight(req.object_id, req.msg_id, time.time())
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
            self._in_flight.pop(req.msg_id, None)

    async def _fill_and_complete(self, live: LiveObject, req: ReadRequest, started: float) -> None:
        served = live.served
        cached = False
        if isinstance(served, BootstrapObject):
            fill = self.filler.fill_bootstrap(served, live.target, req.offset, req.length)
        else:
            cached = self.filler.is_filled(served, live.target, req.offset, req.length)
            fill = self.filler.fill_blob(served, live.target, req.offset, req.length,
                                         exact_fill(self.recorders, served))
        done = False
        try:
            done = await fill_outcome(fill, log, "READ", f"msg:{req.msg_id}", live.name, req.offset, req.length,
                                      quiet=lambda: self.handing_over)
        finally:
            if done:
                self.stats["read_bytes"] += req.length
            elif not self.handing_over:
                self.stats["read_failed"] += 1
            if not done and self.handing_over:
                # no READ_COMPLETE: the reader waits, and the successor's `restore` sends it again
                self.stats["read_left"] += 1
                request_log(log, "READ", f"msg:{req.msg_id}", live.name).info(
                    "off=%d len=%d left unanswered for the successor (hand-over)", req.offset, req.length)
            else:
                self._complete(live, req.msg_id)
                outcome = ("cached" if cached else "filled") if done else "failed"
                self.requests.observe(outcome, time.monotonic() - started, req.length if done else 0)

    def _complete(self, live: LiveObject, msg_id: int) -> None:
        try:
            self.device.complete_read(live.target.fd, msg_id)
        except (CachefilesError, OSError) as exc:
            request_log(log, "READ_COMPLETE", f"msg:{msg_id}", live.name).error("failed: %s", exc)

    # -- CLOSE ----------------------------------------------------------------------------------
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
        if not len(self.objects):
            self._no_objects.set()
        live = _live(entry)
        if live is not None:
            live.target.close()
        return entry

    # -- restore: the one place that writes it ------------------------------------------------
    def requeue(self, why: str, *, required: bool = False) -> bool:
        """Write `restore`: the kernel marks the requests taken and not answered as new and
        re-opens the objects whose anon fds are gone, so this daemon (or a successor) gets
        them again. `required` (a takeover): RestoreUnsupported / CachefilesError when the
        kernel refuses; otherwise a refusal is a warning. True when written."""
        if not required and self.device.restore_supported is False:
            return False
        try:
            self.device.restore()
        except CachefilesError as exc:
            if required:
                if exc.errno == errno.EOPNOTSUPP:
                    raise RestoreUnsupported(str(exc)) from None
                raise
            log.warning("%s: could not give the requests in flight back to the kernel (%s)", why, exc)
            return False
        log.info("%s: the requests in flight were given back to the kernel's queue (restore)", why)
        return True

    def resumable(self) -> str | None:
        try:
            if self.device.restore_supported is None:
                self.device.probe_restore()
        except CachefilesError as exc:
            return str(exc)
        return None if self.device.restore_supported else NEEDS_NEWER_KERNEL

    def resume(self) -> None:
        self.requeue("takeover", required=True)

    def started(self) -> None:
        """A hot upgrade's new process at `start`: the old one was told to exit, its READs come
        to this one now."""
        if self.device_shared:
            self.requeue("start")

    # -- stop -----------------------------------------------------------------------------------
    async def readers_left(self) -> list[str]:
        """fscache mounts (ours are unmounted by now: their CLOSEs come in a moment, waited for
        briefly), or objects the kernel still has open (a mount in another namespace)."""
        left = [m.mountpoint for m in await asyncio.to_thread(mounts.fscache_mounts)]
        if left:
            return left
        try:
            await asyncio.wait_for(self._no_objects.wait(), CLOSES_SETTLE_SECONDS)
        except TimeoutError:
            return ["objects the kernel still has open"]
        return []

    def begin_hand_over(self) -> None:
        self.handing_over = True

    async def drain(self, timeout: float) -> None:
        """Let in-flight READs finish; cancel what is left (those complete without data, or are
        left for the successor in a hand-over). Background prefetches are not waited for."""
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and live.target.prefetch is not None:
                live.target.prefetch.cancel()
        if self.handing_over:
            log.info("stopping for a hand-over: %d request(s) in flight get %.0f s to finish with their data, "
                     "the rest are left to the successor", len(self.tasks), timeout)
        else:
            log.info("stopping: completing %d request(s) in flight", len(self.tasks))
        await settle(self.tasks, timeout)
        await self.filler.drain(0)

    def close(self, *, let_go: bool) -> None:
        """Close every anon fd (only once no worker thread can still write into one), then the
        device. A hand-over first gives the READs it left back to the kernel's queue: after the
        close, `restore` re-opens their objects for the successor with new ids."""
        self.objects.close_all()
        if self.handing_over:
            self.requeue("hand-over")
        self.device.close()

    # -- views ----------------------------------------------------------------------------------
    def blob_fill(self, volume: str, blob: BlobObject) -> BlobFill:
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and live.served is blob:
                return BlobFill(volume, blob, f"{volume}/{blob.info.blob_id}", live.target)
        return BlobFill(volume, blob, f"{volume}/{blob.info.blob_id}", None)

    def open_blobs(self) -> list[BlobFill]:
        found = []
        for entry in self.objects.entries():
            live = _live(entry)
            if live is not None and isinstance(live.served, BlobObject):
                volume = entry.volume_key.removeprefix(VOLUME_PREFIX)
                found.append(BlobFill(volume, live.served, live.name, live.target))
        return found

    def objects_open(self) -> int:
        return len(self.objects)

    def in_flight(self) -> list[InFlight]:
        return sorted(self._in_flight.values(), key=lambda f: f.started)

    def open_volumes(self, key: bytes) -> set[str]:
        """The volumes where the kernel has an object of this cookie key open."""
        return {e.volume_key[len(VOLUME_PREFIX):] for e in self.objects.entries()
                if e.cookie_key == key and e.volume_key.startswith(VOLUME_PREFIX)}

    def has_open_volume(self, volume: str) -> bool:
        return any(e.volume_key == VOLUME_PREFIX + volume for e in self.objects.entries())

    # -- hand-over ------------------------------------------------------------------------------
    def carried_fds(self) -> dict[str, int]:
        return {fdnames.CACHEFILES: self.device.fileno()}

    def pointers(self) -> Mapping[str, Any]:
        return {"device": Path(self.device.path) if self.device.path else None}


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
