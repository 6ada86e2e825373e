"""The fanotify frontend: serve file-backed EROFS mounts whose blobs are sparse cache files.

A read of the mount that misses EROFS's page cache raises an event for a range of a blob's
cache file (fanotify.cache_file); the fill core makes the range hold verified bytes (or
fails), and the event is answered FAN_ALLOW, or FAN_DENY_ERRNO(EIO): a reader never sees a
hole as data.

The group fd and the write fds outlive the daemon in a carrier (the keeper process, or
systemd's fd store: fscached.lifecycle.carriers), and every event being worked on is journaled
(fanotify.journal), so a daemon killed with -9 leaves readers waiting, never reading zeros, and
its successor answers what it left. The frontend knows nothing of carriers: it is handed the
fds a carrier kept (`open`), says what it holds (`carried_fds`) and calls `on_fds_changed`
whenever that changes.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from fanotify.group import FAN_ALLOW, FAN_Q_OVERFLOW, Event, FanotifyError, FastPath, FastStats, Group, deny_errno
from fscached.config import ImageSpec
from fscached.core.catalog import BlobObject, BootstrapObject, Catalog
from fscached.core.fill import DEFAULT_WINDOW, Filler, settle
from fscached.core.profile_recorder import ProfileRecorders
from fscached.core.stats import RequestStats
from fscached.frontends.base import BlobFill, InFlight, KernelPathLost, exact_fill, fill_outcome, prefetch_blob, wants_background
from fscached.frontends.fanotify.cache_file import (CacheFile, create_or_open, take_clean_stop_record,
                                                    trust_clean_stop_record, write_clean_stop_record)
from fscached.frontends.fanotify.cull import FanotifyCuller
from fscached.frontends.fanotify import keeper
from fscached.frontends.fanotify.journal import SLOTS, EventJournal, Orphan
from fscached.lifecycle import fdnames
from fscached.util import mounts
from fscached.util.files import FileWriteError, write_atomic
from fscached.util.ids import BLOB_ID
from fscached.util.leases import path_held_elsewhere
from fscached.util.units import human_bytes

log = logging.getLogger("fscached.fanotify")

ORPHAN_SECONDS = 10.0  # an orphan not filled by then is answered EIO: no reader waits longer


def cap_fd_limit_at_journal_slots() -> int:
    """This process's fd limit, lowered to the journal's slots when above: every event's fd
    number then has a slot (an event with a higher number could not be journaled)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > SLOTS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SLOTS, hard))
        return SLOTS
    return soft


class FanotifyFrontend:
    kernel_path = "fanotify"
    handover_fd_name = fdnames.FANOTIFY_GROUP  # write fds come back from events
    closing_fails_readers = False  # with no group left, the kernel lets reads of holes through

    def __init__(self, catalog: Catalog, executor: Executor, cache_dir: Path,
                 read_window: int = DEFAULT_WINDOW) -> None:
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.state_dir = cache_dir / ".fscached"
        self.blobs_dir = cache_dir / "blobs"
        self.stats: Counter[str] = Counter()
        self.filler = Filler(executor, self.stats, read_window)
        self.requests = RequestStats()  # outcome, latency and bytes of every event answered
        self.tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[int, InFlight] = {}  # event fd -> what is being filled for it
        self.files: dict[str, CacheFile] = {}
        self.by_inode: dict[tuple[int, int], CacheFile] = {}
        # cache files of unbound images that keep their mark: a mount of them by hand (made
        # after the unbind looked) reads EIO from this daemon, never holes as zeros
        self.retired: set[Path] = set()
        self.group: Group | None = None
        self.journal: EventJournal | None = None
        self.takeover = False
        self.handing_over = False
        self.orphans: list[Orphan] = []
        self._placeholders: set[int] = set()
        # a group taken back: what the predecessor left is taken before this daemon reads its
        # first event (on_readable): orphans journaled since open(), events never journaled
        self._predecessors_events_left = False
        # mount ids of EROFS mounts of our images that were there before this group existed:
        # nothing watched their blobs, their page cache may hold holes read as zeros; never
        # served, whoever holds the group later (kept in the state dir beside the journal)
        self.unwatched: dict[str, int] = {}
        self._recorders: ProfileRecorders | None = None
        # the C fast path: a thread answering events of filled ranges; Python sees the rest
        self.fast: FastPath | None = None
        self._fast_seen = FastStats(0, 0, 0.0, [], [], 0, 0, 0)
        self.culler = FanotifyCuller(self)
        # called whenever the fds a successor needs change (a carrier must hold them again)
        self.on_fds_changed: Callable[[], None] = lambda: None

    @property
    def recorders(self) -> ProfileRecorders | None:
        return self._recorders

    @recorders.setter
    def recorders(self, recorders: ProfileRecorders | None) -> None:
        self._recorders = recorders
        if recorders is not None and self._recording_changed not in recorders.listeners:
            recorders.listeners.append(self._recording_changed)

    @property
    def record_path(self) -> Path:
        return self.state_dir / "verified-at-clean-stop.json"

    @property
    def unwatched_path(self) -> Path:
        return self.state_dir / "unwatched-mounts.json"

    # -- start ----------------------------------------------------------------------------------
    def open(self, handed: dict[str, int]) -> None:
        """Take the group back from what a carrier kept (`handed`, by fdnames name: a successor)
        or make a new one; create and mark every blob's cache file. FanotifyError."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        group_fd = handed.pop(fdnames.FANOTIFY_GROUP, None)
        if group_fd is not None:
            self.group = Group.adopt(group_fd)
            self.takeover = True
        else:
            self.group = Group.create()
        self.journal = EventJournal(self.state_dir / "events.journal", cap_fd_limit_at_journal_slots())
        self.fast = self.group.fast_path(self.journal.buffer, SLOTS, self.requests.buckets)
        if not self.journal.durable:
            log.warning("event journal %s: the events in flight at a kill -9 will be answered EIO by the next "
                        "daemon, not with their bytes", self.journal.error)
        if self.takeover:
            self.orphans = self.journal.pending()
            self._predecessors_events_left = True
            try:
                self.unwatched = {str(k): int(v) for k, v in json.loads(self.unwatched_path.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self.unwatched = {}
        else:
            self.journal.reset()  # a fresh group: no event of an older one can be answered
            ours = self.bootstraps()
            self.unwatched = {mp: mount_id for mp, (source, mount_id) in mounts.erofs_mount_table().items()
                              if source in ours}
            self._save_unwatched()
        verified = take_clean_stop_record(self.record_path)
        blob_fds = {key: fd for name, fd in list(handed.items())
                    if (key := fdnames.blob_key(name)) is not None and handed.pop(name) is not None}
        for volume, blob in self.catalog.blobs():
            cf = self._open_cache_file(volume, blob, blob_fds)
            self.stats["trusted_chunks"] += trust_clean_stop_record(cf, verified)
        for fd in blob_fds.values():  # blobs no image of this configuration uses
            os.close(fd)
        if self.takeover:
            # before any event is read: a new event must not get an orphan's fd number
            self._reserve_orphan_numbers()
        self._warn_if_full()

    def _save_unwatched(self) -> None:
        try:
            write_atomic(self.unwatched_path, json.dumps(self.unwatched))
        except FileWriteError as exc:  # kept in memory: this daemon still refuses them
            log.warning("%s: a successor will not know which mounts predate the group", exc)

    def _warn_if_full(self) -> None:
        try:
            st = os.statvfs(self.cache_dir)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < (1 << 20):
            log.warning("cache dir %s is full (%s free): what is cached is served, reads of the rest fail with EIO "
                        "until there is room", self.cache_dir, human_bytes(st.f_bavail * st.f_frsize))

    def _open_cache_file(self, volume: str, blob: BlobObject, handed: dict[str, int]) -> CacheFile:
        assert self.group is not None
        blob_id = blob.info.blob_id
        if not BLOB_ID.fullmatch(blob_id):
            raise FanotifyError(f"blob id {blob_id!r} is not 64 hex digits: refusing to name a cache file after it")
        directory = self.blobs_dir / volume
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / blob_id
        mounts.check_mount_path(path)
        cf = CacheFile(volume, blob, path)
        handed_fd = handed.pop(cf.name, None)
        retired = path in self.retired
        if retired:  # our own mark: off while a write fd is opened, so that fd raises no events
            self.retired.discard(path)
            if handed_fd is None:
                self.group.unmark(path)
        fd, cf.reverify = create_or_open(path, blob.size, handed_fd, fresh_group=not self.takeover or retired)
        if fd is not None:
            cf.adopt(fd, self._unmark)
        self.group.mark(path)
        cf.marked = True
        st = os.stat(path)
        self.files[cf.name] = cf
        self.by_inode[(st.st_dev, st.st_ino)] = cf
        if self.fast is not None:
            cf.fast_id = self.fast.add_blob(st.st_dev, st.st_ino, blob.size)
            # every chunk's blocks need a fill; the rest of the file is holes, read as zeros
            self.fast.set_ranges(cf.fast_id, blob.chunk_map.ranges(), filled=False)
            self._fast_attach(cf)
        return cf

    # -- the fast path ----------------------------------------------------------------------------
    def _fast_attach(self, cf: CacheFile) -> None:
        """Once the file has a write fd: what it holds, and from now on every run written into
        it, goes to the fast path's map (only after the verified bytes are in place)."""
        if self.fast is None or cf.fast_id < 0 or cf.target is None:
            return
        target = cf.target
        if target.on_written is None:
            fast, fast_id = self.fast, cf.fast_id

            def written(chunks: list[Any]) -> None:
                fast.set_ranges(fast_id, [(c.uncompressed_offset, c.uncompressed_size) for c in chunks], filled=True)
            target.on_written = written
            if target.written:
                written([c for c in cf.blob.chunk_map.chunks if c.uncompressed_offset in target.written])
        self._fast_update(cf)

    def _fast_update(self, cf: CacheFile) -> None:
        """A blob is answered on the fast path while it has a write fd and no start-up profile
        records its reads (a recording notes every read, filled or not: those go to Python)."""
        if self.fast is not None and cf.fast_id >= 0:
            self.fast.set_fast(cf.fast_id, cf.target is not None and not cf.target.closed and not cf.blob.recorders)

    def _recording_changed(self, blob: BlobObject) -> None:
        for cf in self.files.values():
            if cf.blob is blob:
                self._fast_update(cf)

    def refresh_stats(self) -> None:
        """Fold what the fast path answered since the last call into the counters and the
        request stats (`read`, `read_cached`, and `read_fast` for the fast path's own share)."""
        if self.fast is None:
            return
        now = self.fast.stats()
        last = self._fast_seen
        events = now.events - last.events
        if events:
            self.stats["read"] += events
            self.stats["read_cached"] += events
            self.stats["read_fast"] += events
            self.requests.add("cached", [a - b for a, b in zip(now.latency, last.latency or [0] * len(now.latency))],
                              now.seconds - last.seconds, now.bytes - last.bytes,
                              [a - b for a, b in zip(now.sizes, last.sizes or [0] * len(now.sizes))])
        if now.answer_errors != last.answer_errors:
            self.stats["fast_answer_errors"] += now.answer_errors - last.answer_errors
        self._fast_seen = now

    def _take_fast_misses(self) -> None:
        """Everything the fast path left to Python: misses, unknown files, overflows, blobs
        being recorded. A file's events were journaled by the fast path already."""
        assert self.fast is not None
        while True:
            events = self.fast.take()
            if not events:
                return
            for ev in events:
                event = Event(ev.fd, ev.mask, ev.pid, ev.offset, ev.count)
                try:
                    self._handle(event, (ev.dev, ev.ino) if ev.stat_ok else None)
                except Exception:  # a bug must still not leave the reader waiting
                    log.exception("event req=fd:%d off=%d: unexpected error: answering EIO", event.fd, event.offset)
                    self.stats["read_failed"] += 1
                    self.requests.observe("failed", 0.0)
                    if event.fd >= 0:
                        self._answer(event.fd, deny_errno(errno.EIO))

    def fileno(self) -> int:
        """What the event loop watches: the fast path's eventfd (it wakes Python for misses)."""
        assert self.group is not None
        return self.fast.notify_fd if self.fast is not None else self.group.fd

    # -- images ---------------------------------------------------------------------------------
    def image_added(self, spec: ImageSpec) -> None:
        """A bind at run time: cache files (marked) for the blobs the image brings."""
        for blob in self.catalog.devices[(spec.volume, spec.fsid)]:
            cf = self.files.get(f"{spec.volume}/{blob.info.blob_id}")
            if cf is None:
                cf = self._open_cache_file(spec.volume, blob, {})
                if wants_background(blob):
                    self._spawn(self._prefetch(cf))
            elif blob.profile_order and (cf.target is None or cf.target.prefetch is None
                                         or cf.target.prefetch.done()):
                # a domain's blob already served: the new image's profile may name more of it
                self._spawn(self._prefetch(cf, profile_only=True))
        self.on_fds_changed()

    def image_removed(self, boot: BootstrapObject, dropped: Sequence[BlobObject]) -> None:
        """An unbind: the blobs no image uses any more lose their mark and their fetches. The
        cache files stay (a later bind finds them filled); culling removes them."""
        for blob in dropped:
            cf = next((f for f in self.files.values() if f.blob is blob), None)
            if cf is None:
                continue
            del self.files[cf.name]
            self.by_inode = {k: v for k, v in self.by_inode.items() if v is not cf}
            if self.fast is not None and cf.fast_id >= 0:
                self.fast.remove_blob(cf.fast_id)  # its events go to Python (EIO: not served)
                cf.fast_id = -1
            if cf.marked:  # the mark stays: what still reads the file gets EIO, never holes
                self.retired.add(cf.path)
            cf.close()
        self.on_fds_changed()

    def readers_of(self, spec: ImageSpec, blobs: Sequence[BlobObject]) -> list[str]:
        """Cache files of these blobs that something besides this daemon has open: a mount of
        the image by hand, a mount detached with `umount -l` whose files are still read, in any
        mount namespace. Their marks are all that stands between those readers and holes."""
        wanted = {id(blob) for blob in blobs}
        return sorted(str(cf.path) for cf in self.files.values() if id(cf.blob) in wanted and cf.held_elsewhere())

    def still_ours(self, spec: ImageSpec, mountpoint: Path) -> bool:
        """A mount found at start: this image's bootstrap, mounted while a group we took back
        watched it (not before it existed), holding this image's own cache files (another
        daemon's mount of the same bootstrap holds another cache dir's files)."""
        if not self.takeover:
            return False
        found = mounts.erofs_mount_table().get(str(mountpoint))
        if found is None:
            return False
        source, mount_id = found
        if source != str(self.catalog.bootstrap_of(spec).path) or not self.is_watched(str(mountpoint), mount_id):
            return False
        files = [self.files[f"{spec.volume}/{blob.info.blob_id}"] for blob in self.catalog.devices[(spec.volume, spec.fsid)]]
        return not files or all(cf.held_elsewhere() for cf in files)

    def start_background(self) -> None:
        """After the reader is armed: resolve a dead predecessor's orphans, start prefetches."""
        if self._predecessors_events_left:  # on_readable took them already; here for a caller that did not
            self._take_predecessors_events()
        if self.orphans:
            log.warning("answering %d event(s) a previous daemon took and left unanswered", len(self.orphans))
            for orphan in self.orphans:
                self._spawn(self._resolve_orphan(orphan))
            self.orphans = []
        for cf in self.files.values():
            if wants_background(cf.blob):
                self._spawn(self._prefetch(cf))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- mounts ---------------------------------------------------------------------------------
    def mount_args(self, spec: ImageSpec) -> tuple[str, str]:
        devices = [self.files[f"{spec.volume}/{blob.info.blob_id}"].path
                   for blob in self.catalog.devices[(spec.volume, spec.fsid)]]
        boot = self.catalog.bootstrap_of(spec).path
        mounts.check_mount_path(boot)
        return str(boot), ",".join(f"device={path}" for path in devices)

    def bootstraps(self) -> set[str]:
        return {str(self.catalog.bootstrap_of(spec).path) for spec in self.catalog.images.values()}

    def is_watched(self, mountpoint: str, mount_id: int) -> bool:
        """False for a mount that predates the group: its reads may already have seen holes."""
        return self.unwatched.get(mountpoint) != mount_id

    # -- events ---------------------------------------------------------------------------------
    def on_readable(self) -> None:
        assert self.group is not None
        if self._predecessors_events_left:
            self._take_predecessors_events()
        if self.fast is not None:
            if not self.fast.started:  # the reader is armed: the fast path's thread reads from now on
                self.fast.start()
            self._take_fast_misses()
            self.refresh_stats()
            if self._fast_seen.error:
                raise KernelPathLost(f"fanotify group: reading its events failed: {os.strerror(-self._fast_seen.error)}")
            return
        while True:
            events = self.group.read_events()
            if not events:
                return
            # every event of the read is journaled before any is worked on: a kill -9 in the
            # middle of the batch leaves all of them to a successor, none unknown to it
            stats = [self._journal_first(event) for event in events]
            for event, st in zip(events, stats):
                try:
                    self._handle(event, (st.st_dev, st.st_ino) if st is not None else None)
                except Exception:  # a bug must still not leave the reader waiting
                    log.exception("event req=fd:%d off=%d: unexpected error: answering EIO", event.fd, event.offset)
                    self.stats["read_failed"] += 1
                    self.requests.observe("failed", 0.0)
                    if event.fd >= 0:
                        self._answer(event.fd, deny_errno(errno.EIO))

    def _journal_first(self, event: Event) -> os.stat_result | None:
        """Journal an event of a file we serve (cleared again when it is answered); its stat."""
        assert self.journal is not None
        if event.fd < 0 or event.mask & FAN_Q_OVERFLOW:
            return None
        try:
            st = os.fstat(event.fd)
        except OSError:
            return None
        cf = self.by_inode.get((st.st_dev, st.st_ino))
        if cf is not None:
            count = event.count if event.count >= 0 else cf.blob.size - event.offset
            if count > 0:
                self.journal.record(event.fd, st.st_dev, st.st_ino, event.offset, count)
        return st

    def _handle(self, event: Event, dev_ino: tuple[int, int] | None = None) -> None:
        assert self.group is not None and self.journal is not None
        started = time.monotonic()
        self.stats["read"] += 1
        if event.fd < 0 or event.mask & FAN_Q_OVERFLOW:
            self.stats["event_overflow"] += 1
            log.error("fanotify queue overflow (mask %#x): events were lost", event.mask)
            return
        if dev_ino is None:
            try:
                st = os.fstat(event.fd)
            except OSError:
                self._answer(event.fd, deny_errno(errno.EIO))
                self.requests.observe("failed", time.monotonic() - started)
                return
            dev_ino = (st.st_dev, st.st_ino)
        dev, ino = dev_ino
        cf = self.by_inode.get(dev_ino)
        if cf is None:  # marked by an older configuration: nothing here can fill it
            self.stats["read_unknown_object"] += 1
            log.error("event req=fd:%d for a file this daemon does not serve (inode %d): EIO", event.fd, ino)
            self._answer(event.fd, deny_errno(errno.EIO))
            self.requests.observe("failed", time.monotonic() - started)
            return
        if cf.target is None:
            cf.adopt(os.dup(event.fd), self._unmark)  # the kernel opened it without notification
            self._fast_attach(cf)
            self.on_fds_changed()
        assert cf.target is not None
        count = event.count if event.count >= 0 else cf.blob.size - event.offset
        if cf.blob.recorders and self.recorders is not None and count > 0:
            self.recorders.note(cf.blob, event.offset, count)  # filled or not: every read of the blob
        if count <= 0 or self.filler.is_filled(cf.blob, cf.target, event.offset, count):
            self.stats["read_cached"] += 1
            self._answer(event.fd, FAN_ALLOW)
            self.requests.observe("cached", time.monotonic() - started, max(count, 0))
            return
        self.journal.record(event.fd, dev, ino, event.offset, count)
        self._in_flight[event.fd] = InFlight(ino, event.fd, time.time())
        self._spawn(self._fill_and_answer(cf, event.fd, event.offset, count, started))

    async def _fill(self, cf: CacheFile, offset: int, length: int, kind: str, req: str) -> bool:
        """Fill the range; True when its bytes are in place."""
        assert cf.target is not None
        done = await fill_outcome(
            self.filler.fill_blob(cf.blob, cf.target, offset, length, exact_fill(self.recorders, cf.blob)),
            log, kind, req, cf.name, offset, length, quiet=lambda: self.handing_over)
        if done:
            self.stats["read_bytes"] += length
        elif not self.handing_over:
            self.stats["read_failed"] += 1
        return done

    async def _fill_and_answer(self, cf: CacheFile, event_fd: int, offset: int, length: int,
                               started: float) -> None:
        done = False
        try:
            done = await self._fill(cf, offset, length, "event", f"fd:{event_fd}")
        finally:
            if not done and self.handing_over:
                # left journaled and unanswered: the successor answers it (the reader waits)
                self.stats["read_left"] += 1
                self._in_flight.pop(event_fd, None)
                os.close(event_fd)
            else:
                self._answer(event_fd, FAN_ALLOW if done else deny_errno(errno.EIO))
                self.requests.observe("filled" if done else "failed", time.monotonic() - started,
                                      length if done else 0)

    def _answer(self, event_fd: int, response: int) -> None:
        assert self.group is not None and self.journal is not None
        try:
            self.group.answer(event_fd, response)
        except OSError as exc:
            log.error("event req=fd:%d: answering failed: %s", event_fd, exc)
        self.journal.clear(event_fd)
        self._in_flight.pop(event_fd, None)
        os.close(event_fd)

    def _unmark(self, cf: CacheFile) -> None:
        """The blob is complete: reads go straight to the file from now on."""
        if self.group is None or not cf.marked:
            return
        try:
            self.group.unmark(cf.path)
            cf.marked = False
            self.stats["blobs_complete"] += 1
            log.info("blob %s is complete: its mark is removed, reads go straight to the file", cf.name)
        except OSError as exc:
            log.warning("removing the mark of %s: %s", cf.name, exc)

    # -- a predecessor's orphans ----------------------------------------------------------------
    def _reserve_orphan_numbers(self) -> None:
        """Keep each orphan's fd number busy here until it is answered: a new event must not
        get the same number (answers are matched by number)."""
        if not self.orphans:
            return
        first = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:  # above every orphan's number: the lowest free fd may be one of them
            null = fcntl.fcntl(first, fcntl.F_DUPFD_CLOEXEC, max(orphan.fd for orphan in self.orphans) + 1)
        finally:
            os.close(first)
        try:
            for orphan in self.orphans:
                try:
                    os.fstat(orphan.fd)
                except OSError:
                    os.dup2(null, orphan.fd, inheritable=False)
                    self._placeholders.add(orphan.fd)
        finally:
            os.close(null)

    def _take_predecessors_events(self) -> None:
        """Before this daemon reads an event of its own, what a predecessor left on the group:
        - the journal read again (a hot upgrade's predecessor served on after our open(): what
          it left since is journaled too), each orphan's number kept busy here;
        - whatever event it read and was killed before journaling (between its read(2) and
          the store) answered EIO, by every fd number below its fd limit the journal does not
          name. Nobody knows their ranges; left alone, their readers would wait forever. A
          read-ahead denied this way is read again by the kernel (an event this daemon
          serves); a plain read fails with EIO."""
        assert self.group is not None and self.journal is not None
        self._predecessors_events_left = False
        self.orphans = self.journal.pending()
        pending = {orphan.fd for orphan in self.orphans}
        for number in self._placeholders - pending:  # answered by the predecessor since
            self._placeholders.discard(number)
            os.close(number)
        self._reserve_orphan_numbers()
        limit = min(self.journal.predecessor_fd_limit or SLOTS, SLOTS)
        answered = self.group.answer_any((n for n in range(limit) if n not in pending), deny_errno(errno.EIO))
        if answered:
            self.stats["orphans_unjournaled"] += len(answered)
            log.warning("answered EIO %d event(s) the previous daemon had read but not journaled when it died "
                        "(fd numbers %s): their ranges are unknown", len(answered), answered)

    async def _resolve_orphan(self, orphan: Orphan) -> None:
        done = False
        cf = self.by_inode.get((orphan.dev, orphan.ino))
        try:
            if cf is not None and cf.target is not None:
                try:
                    done = await asyncio.wait_for(
                        self._fill(cf, orphan.offset, orphan.count, "orphan", f"fd:{orphan.fd}"), ORPHAN_SECONDS)
                except TimeoutError:
                    log.error("orphan req=fd:%d blob=%s: not filled within %.0f s: EIO", orphan.fd, cf.name,
                              ORPHAN_SECONDS)
        finally:
            assert self.group is not None and self.journal is not None
            answered = self.group.answer(orphan.fd, FAN_ALLOW if done else deny_errno(errno.EIO))
            self.journal.clear(orphan.fd)
            if orphan.fd in self._placeholders:
                self._placeholders.discard(orphan.fd)
                os.close(orphan.fd)
            self.stats["orphans_answered" if answered else "orphans_gone"] += 1
            if answered and not done:
                self.stats["orphans_eio"] += 1

    # -- prefetch -------------------------------------------------------------------------------
    async def _prefetch(self, cf: CacheFile, profile_only: bool = False) -> None:
        """Once the image is served (its reader armed): the start-up profile's chunks first,
        then the prefetch list."""
        if cf.target is None and not (self.recorders is not None and self.recorders.recording(cf.blob)):
            # no write fd yet (taken over without one): one read raises the event that brings it
            await asyncio.to_thread(_read_one_byte, cf.path)
        if cf.target is None:
            return
        cf.target.prefetch = asyncio.current_task()
        await prefetch_blob(self.filler, self.recorders, cf.blob, cf.target, cf.name, log, profile_only=profile_only)

    # -- stop -----------------------------------------------------------------------------------
    async def readers_left(self) -> list[str]:
        """Cache files something besides this daemon still has open: a mount (ours that was
        busy, one by hand, one detached with `umount -l` whose files are still read). The files
        of an image mounted before this group existed are left out: that mount was never
        watched (its page cache may hold holes read as zeros) and is not served for it."""
        unwatched = self._unwatched_mount_files()
        files = [cf for cf in self.files.values() if cf.path not in unwatched]
        retired = [path for path in self.retired if path not in unwatched]

        def held() -> list[str]:
            found = [str(cf.path) for cf in files if cf.held_elsewhere()]
            return found + [str(path) for path in retired if path_held_elsewhere(path, write=True)]
        return await asyncio.to_thread(held)

    def _unwatched_mount_files(self) -> set[Path]:
        """The cache files of the images whose bootstraps the still-mounted unwatched mounts are."""
        if not self.unwatched:
            return set()
        sources = {source for mp, (source, mount_id) in mounts.erofs_mount_table().items()
                   if self.unwatched.get(mp) == mount_id}
        found: set[Path] = set()
        for spec in self.catalog.images.values():
            if str(self.catalog.bootstrap_of(spec).path) in sources:
                found.update(self.files[f"{spec.volume}/{blob.info.blob_id}"].path
                             for blob in self.catalog.devices[(spec.volume, spec.fsid)]
                             if f"{spec.volume}/{blob.info.blob_id}" in self.files)
        return found

    def resumable(self) -> str | None:
        return None  # the group, taken back, answers everything; journaled events included

    def started(self) -> None:
        """Nothing: the group is served from the takeover on."""

    def resume(self) -> None:
        """Nothing now: the journal's orphans are answered once the reader is armed."""

    def begin_hand_over(self) -> None:
        self.handing_over = True

    async def drain(self, timeout: float) -> None:
        if self.fast is not None and self.fast.started:
            # the reader is removed: the thread stops after its batch; what it queued is served
            # here (or, in a hand-over, left journaled for the successor)
            await asyncio.to_thread(self.fast.stop)
            self._take_fast_misses()
            self.refresh_stats()
        for cf in self.files.values():
            if cf.target is not None and cf.target.prefetch is not None:
                cf.target.prefetch.cancel()
        await settle(self.tasks, timeout)
        await self.filler.drain(0)

    def close(self, *, let_go: bool) -> None:
        """Close our fds. With `let_go` (nothing reads our files any more) the journal is
        cleared; otherwise the carrier keeps the group: readers wait for the next daemon
        instead of reading holes. The caller tells the carrier."""
        try:
            write_clean_stop_record(self.record_path, list(self.files.values()))
        except OSError as exc:  # only costs the next start a re-verification
            log.warning("recording the filled state at stop: %s", exc)
        for cf in self.files.values():
            cf.close()
        if self.fast is not None:  # before the journal: the thread writes into its slots
            self.refresh_stats()
            self.fast.close()
            self.fast = None
        if self.journal is not None:
            if let_go:
                self.journal.reset()
            self.journal.close()
        if self.group is not None:
            self.group.close()

    # -- views ----------------------------------------------------------------------------------
    def blob_fill(self, volume: str, blob: BlobObject) -> BlobFill:
        cf = self.files.get(f"{volume}/{blob.info.blob_id}")
        if cf is None:
            return BlobFill(volume, blob, f"{volume}/{blob.info.blob_id}", None)
        return BlobFill(volume, blob, str(cf.path), cf.target)

    def open_blobs(self) -> list[BlobFill]:
        return [BlobFill(cf.volume, cf.blob, str(cf.path), cf.target) for cf in list(self.files.values())]

    def objects_open(self) -> int:
        return len(self.files)

    def in_flight(self) -> list[InFlight]:
        return sorted(self._in_flight.values(), key=lambda f: f.started)

    def bound_file(self, name: str) -> bool:
        """Whether "<volume>/<blob id>" is a cache file a bound image uses."""
        return name in self.files

    # -- hand-over ------------------------------------------------------------------------------
    def carried_fds(self) -> dict[str, int]:
        assert self.group is not None
        fds = {fdnames.FANOTIFY_GROUP: self.group.fd}
        for cf in self.files.values():
            if cf.write_fd is not None and not cf.write_fd.closing:
                fds[fdnames.blob(cf.volume, cf.blob.info.blob_id)] = cf.write_fd.fd
        return fds

    def pointers(self) -> Mapping[str, Any]:
        return {"state_dir": self.state_dir,
                "event_journal": self.journal.path if self.journal is not None else None,
                "clean_stop_record": self.record_path,
                "keeper_socket": keeper.socket_path(self.cache_dir)}


def _read_one_byte(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.pread(fd, 1, 0)
    finally:
        os.close(fd)
