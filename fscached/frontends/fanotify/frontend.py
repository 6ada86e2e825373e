"""The fanotify frontend: serve file-backed EROFS mounts whose blobs are sparse cache files.

Per data blob (a domain's blob once) one sparse file of the blob's uncompressed size lives in
`<cache_dir>/blobs/<volume>/<blob id>`, marked FAN_PRE_ACCESS before anything can mount it. A
read of the mount that misses EROFS's page cache raises an event for a range of that file; the
fill core makes the range hold verified bytes (or fails), and the event is answered FAN_ALLOW,
or FAN_DENY_ERRNO(EIO): a reader never sees a hole as data.

Writes go through a non-notifying fd of the cache file: one opened before the file was marked
(checked on 6.18: such an fd raises no events, even with other files of the filesystem marked),
or a duplicate of an event's fd. The group fd and those write fds also live in the keeper
(fscached.frontends.fanotify.keeper), and every event being worked on is journaled (fscached.frontends.fanotify.journal), so a
daemon killed with -9 leaves readers waiting, never reading zeros, and its successor answers
what it left. Run by systemd, systemd's fd store holds them instead of the keeper
(fscached.lifecycle.systemd.FanotifyStore).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Coroutine, Protocol

from fanotify.group import FAN_ALLOW, FAN_Q_OVERFLOW, Event, FanotifyError, Group, deny_errno
from fetcher.source import SourceError
from fscached.frontends.fanotify import keeper
from fscached.util import mounts
from fscached.core.catalog import BlobObject, BootstrapObject, Catalog
from fscached.config import ImageSpec
from fscached.frontends.fanotify.journal import EventJournal, Orphan
from fscached.core.fill import DEFAULT_WINDOW, Filler, FillTarget, VerifyError, settle
from fscached.util.shared_fd import SharedFd
from fscached.util.ids import BLOB_ID
from fscached.util.logs import request_log
from fscached.core.stats import RequestStats
from fscached.core.profile_recorder import ProfileRecorders

log = logging.getLogger("fscached.fanotify")

ORPHAN_SECONDS = 10.0  # an orphan not filled by then is answered EIO: no reader waits longer


class CacheFile:
    """One blob's sparse cache file and its fill state."""

    def __init__(self, volume: str, blob: BlobObject, path: Path) -> None:
        self.volume = volume
        self.blob = blob
        self.path = path
        self.name = f"{volume}/{blob.info.blob_id}"
        self.write_fd: SharedFd | None = None
        self.target: FillTarget | None = None
        self.marked = False
        self.reverify = False  # the file held bytes before this process: check before trusting

    def adopt(self, fd: int, on_complete: Callable[[CacheFile], None]) -> FillTarget:
        """Take `fd` (non-notifying, read-write) as the file's write fd. `on_complete` runs
        once every chunk of the blob holds verified bytes, whichever job wrote the last one."""
        self.write_fd = SharedFd(fd)
        self.target = FillTarget(fd, self.write_fd.hold, holes_read_as_zeros=True, buffered=True,
                                 reverify=self.reverify)
        self.target.chunk_count = len(self.blob.chunk_map.chunks)
        self.target.on_complete = lambda: on_complete(self)
        return self.target


class FdHolder(Protocol):
    """Who holds the group and the write fds while no daemon does. Names: "group",
    "blob:<volume>/<blob id>"."""

    what: str

    def take(self) -> dict[str, int] | None: ...
    def start(self) -> None: ...
    def give(self, fds: dict[str, int]) -> None: ...
    def dismiss(self) -> None: ...


class KeeperHolder:
    """The keeper process (fscached.frontends.fanotify.keeper): a daemon not run by systemd."""

    what = "the keeper"

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def take(self) -> dict[str, int] | None:
        return keeper.take(self.sock)

    def start(self) -> None:
        keeper.start(self.sock)

    def give(self, fds: dict[str, int]) -> None:
        keeper.give(self.sock, fds)

    def dismiss(self) -> None:
        keeper.dismiss(self.sock)


class FanotifyServer:
    def __init__(self, catalog: Catalog, executor: Executor, cache_dir: Path,
                 read_window: int = DEFAULT_WINDOW) -> None:
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.state_dir = cache_dir / ".fscached"
        self.keeper_socket = self.state_dir / "keeper.sock"
        self.stats: Counter[str] = Counter()
        self.filler = Filler(executor, self.stats, read_window)
        self.requests = RequestStats()  # outcome, latency and bytes of every event answered
        self.tasks: set[asyncio.Task[None]] = set()
        self.files: dict[str, CacheFile] = {}
        self.by_inode: dict[tuple[int, int], CacheFile] = {}
        self.group: Group | None = None
        self.journal: EventJournal | None = None
        self.takeover = False
        self.orphans: list[Orphan] = []
        self._placeholders: set[int] = set()
        # mount ids of EROFS mounts of our images that were there before this group existed:
        # nothing watched their blobs, their page cache may hold holes read as zeros; never
        # served, whoever holds the group later (kept in the state dir beside the journal)
        self.unwatched: dict[str, int] = {}
        self.holder: FdHolder = KeeperHolder(self.keeper_socket)
        # start-up profiles being recorded (fscached.core.profile_recorder; set by the daemon)
        self.recorders: ProfileRecorders | None = None

    # -- start ------------------------------------------------------------------------------
    def open(self, holder: FdHolder | None = None) -> None:
        """Take the group back from its holder (a successor) or make a new one; create and mark
        every blob's cache file; hand the fds to the holder: the keeper process, or systemd's fd
        store when run by systemd (fscached.lifecycle.systemd.FanotifyStore). Errors: FanotifyError,
        KeeperError."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.holder = holder or KeeperHolder(self.keeper_socket)
        handed = self.holder.take() or {}
        from_keeper = False
        if "group" not in handed and not isinstance(self.holder, KeeperHolder):
            # run by systemd for the first time while a keeper of a manual run holds the group
            handed = keeper.take(self.keeper_socket) or {}
            from_keeper = "group" in handed
        group_fd = handed.pop("group", None)
        if group_fd is not None:
            self.group = Group.adopt(group_fd)
            self.takeover = True
            log.info("took the fanotify group back from %s (%d write fds)",
                     "the keeper" if from_keeper else self.holder.what, len(handed))
        else:
            self.group = Group.create()
        self.journal = EventJournal(self.state_dir / "events.journal")
        unwatched_file = self.state_dir / "unwatched-mounts.json"
        if self.takeover:
            self.orphans = self.journal.pending()
            try:
                self.unwatched = {str(k): int(v) for k, v in json.loads(unwatched_file.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self.unwatched = {}
        else:
            self.journal.reset()  # a fresh group: no event of an older one can be answered
            ours = self.bootstraps()
            self.unwatched = {mp: mount_id for mp, (source, mount_id) in mounts.erofs_mount_table().items()
                              if source in ours}
            tmp = unwatched_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.unwatched))
            os.replace(tmp, unwatched_file)
        verified = self._take_clean_stop_record()
        for volume, blob in self.catalog.blobs():
            self._open_cache_file(volume, blob, handed)
            self._trust_clean_stop_record(self.files[f"{volume}/{blob.info.blob_id}"], verified)
        for fd in handed.values():  # blobs no image of this configuration uses
            os.close(fd)
        if not self.takeover:
            self.holder.start()
        else:
            # before any event is read: a new event must not get an orphan's fd number
            self._reserve_orphan_numbers()
        self._give_to_keeper()
        if from_keeper:
            keeper.dismiss(self.keeper_socket)  # after systemd holds the group: it never lapses

    def _open_cache_file(self, volume: str, blob: BlobObject, handed: dict[str, int]) -> None:
        assert self.group is not None
        blob_id = blob.info.blob_id
        if not BLOB_ID.fullmatch(blob_id):
            raise FanotifyError(f"blob id {blob_id!r} is not 64 hex digits: refusing to name a cache file after it")
        directory = self.cache_dir / "blobs" / volume
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / blob_id
        mounts.check_mount_path(path)
        cf = CacheFile(volume, blob, path)
        handed_fd = handed.pop(f"blob:{cf.name}", None)
        try:
            existing = os.stat(path).st_size
        except FileNotFoundError:
            existing = -1
        if existing not in (-1, blob.size):
            log.warning("cache file %s has %d bytes, not %d: starting it afresh", path, existing, blob.size)
            path.unlink()
            existing = -1
        cf.reverify = existing >= 0
        if existing < 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, blob.size)  # sparse: every byte a hole
            if handed_fd is not None:
                os.close(handed_fd)
            cf.adopt(fd, self._unmark)  # opened before its mark: raises no events
        elif handed_fd is not None:
            cf.adopt(handed_fd, self._unmark)
        elif not self.takeover:
            # a fresh group: no mark of ours can be on the file yet
            cf.adopt(os.open(path, os.O_RDWR | os.O_CLOEXEC), self._unmark)
        # else: marked by the group we took over, its write fd lost: the first event brings one
        self.group.mark(path)
        cf.marked = True
        st = os.stat(path)
        self.files[cf.name] = cf
        self.by_inode[(st.st_dev, st.st_ino)] = cf

    # -- what a clean stop verified -----------------------------------------------------------
    # A clean stop fsyncs every cache file, then records which chunks each held verified bytes
    # and the file's identity. The next start consumes the record (deletes it before serving:
    # after a crash there is none) and trusts it only for a file still the same (inode, size,
    # mtime); everything else is re-verified against the digests before it counts as filled.
    @property
    def _record_path(self) -> Path:
        return self.state_dir / "verified-at-clean-stop.json"

    def _take_clean_stop_record(self) -> dict[str, Any]:
        try:
            record = json.loads(self._record_path.read_text())
        except (OSError, ValueError):
            record = {}
        self._record_path.unlink(missing_ok=True)
        return record if isinstance(record, dict) else {}

    def _trust_clean_stop_record(self, cf: CacheFile, record: dict[str, Any]) -> None:
        entry = record.get(cf.name)
        if cf.target is None or not cf.reverify or not isinstance(entry, dict):
            return
        st = os.stat(cf.path)
        if [entry.get("ino"), entry.get("size"), entry.get("mtime_ns")] != [st.st_ino, st.st_size, st.st_mtime_ns]:
            return
        offsets = set(entry.get("chunks", []))
        trusted = [c for c in cf.blob.chunk_map.chunks if c.uncompressed_offset in offsets]
        cf.target.mark_written(trusted)
        self.stats["trusted_chunks"] += len(trusted)

    def _write_clean_stop_record(self) -> None:
        record: dict[str, Any] = {}
        for cf in self.files.values():
            if cf.target is None or cf.write_fd is None or not cf.target.written:
                continue
            os.fsync(cf.write_fd.fd)  # the bytes are on disk before the record says so
            st = os.fstat(cf.write_fd.fd)
            record[cf.name] = {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "chunks": sorted(cf.target.written)}
        tmp = self._record_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record_path)

    def _give_to_keeper(self) -> None:
        """The group, and as many write fds as one message carries (a write fd the holder does
        not hold is taken from the blob's first event by a successor instead)."""
        assert self.group is not None
        fds = {"group": self.group.fd}
        for cf in self.files.values():
            if cf.write_fd is not None and len(fds) < keeper.MAX_FDS:
                fds[f"blob:{cf.name}"] = cf.write_fd.fd
        self.holder.give(fds)

    def fileno(self) -> int:
        assert self.group is not None
        return self.group.fd

    def image_added(self, spec: ImageSpec) -> None:
        """A bind at run time: cache files (marked) for the blobs the image brings."""
        for blob in self.catalog.devices[(spec.volume, spec.fsid)]:
            cf = self.files.get(f"{spec.volume}/{blob.info.blob_id}")
            if cf is None:
                self._open_cache_file(spec.volume, blob, {})
                cf = self.files[f"{spec.volume}/{blob.info.blob_id}"]
                if blob.prefetch_order or blob.profile_order:
                    self._spawn(self._prefetch(cf))
            elif blob.profile_order and (cf.target is None or cf.target.prefetch is None
                                         or cf.target.prefetch.done()):
                # a domain's blob already served: the new image's profile may name more of it
                self._spawn(self._prefetch(cf, profile_only=True))
        self._give_to_keeper()

    def image_removed(self, boot: BootstrapObject, dropped: list[BlobObject]) -> None:
        """An unbind: the blobs no image uses any more lose their mark and their fetches. The
        cache files stay (a later bind finds them filled); culling removes them."""
        for blob in dropped:
            cf = next((f for f in self.files.values() if f.blob is blob), None)
            if cf is None:
                continue
            del self.files[cf.name]
            self.by_inode = {k: v for k, v in self.by_inode.items() if v is not cf}
            if cf.target is not None:
                cf.target.close()
            if cf.marked and self.group is not None:
                self.group.unmark(cf.path)
                cf.marked = False
            if cf.write_fd is not None:
                cf.write_fd.close()
        self._give_to_keeper()

    def serving_mounts_of(self, spec: ImageSpec) -> list[str]:
        """Watched mounts of this image's bootstrap (by us or by hand)."""
        source = str(self.catalog.bootstrap_of(spec).path)
        return sorted(mp for mp, (there, mount_id) in mounts.erofs_mount_table().items()
                      if there == source and self.is_watched(mp, mount_id))

    def cache_file(self, volume: str, blob: BlobObject) -> CacheFile:
        return self.files[f"{volume}/{blob.info.blob_id}"]

    def start_background(self) -> None:
        """After the reader is armed: resolve a dead predecessor's orphans, start prefetches."""
        if self.orphans:
            self._reserve_orphan_numbers()  # done by open() already; here for a caller that did not
            log.warning("answering %d event(s) a previous daemon took and left unanswered", len(self.orphans))
            for orphan in self.orphans:
                self._spawn(self._resolve_orphan(orphan))
            self.orphans = []
        for cf in self.files.values():
            if cf.blob.prefetch_order or cf.blob.profile_order:
                self._spawn(self._prefetch(cf))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- mounts -----------------------------------------------------------------------------
    def mount_args(self, spec: ImageSpec) -> tuple[str, str]:
        devices = [self.cache_file(spec.volume, blob).path for blob in self.catalog.devices[(spec.volume, spec.fsid)]]
        boot = self.catalog.bootstrap_of(spec).path
        mounts.check_mount_path(boot)
        return str(boot), ",".join(f"device={path}" for path in devices)

    def bootstraps(self) -> set[str]:
        return {str(self.catalog.bootstrap_of(spec).path) for spec in self.catalog.images.values()}

    # -- events -----------------------------------------------------------------------------
    def on_readable(self) -> None:
        assert self.group is not None
        while True:
            events = self.group.read_events()
            if not events:
                return
            # every event of the read is journaled before any is worked on: a kill -9 in the
            # middle of the batch leaves all of them to a successor, none unknown to it
            stats = [self._journal_first(event) for event in events]
            for event, st in zip(events, stats):
                try:
                    self._handle(event, st)
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

    def _handle(self, event: Event, st: os.stat_result | None = None) -> None:
        assert self.group is not None and self.journal is not None
        started = time.monotonic()
        self.stats["read"] += 1
        if event.fd < 0 or event.mask & FAN_Q_OVERFLOW:
            self.stats["event_overflow"] += 1
            log.error("fanotify queue overflow (mask %#x): events were lost", event.mask)
            return
        try:
            st = st or os.fstat(event.fd)
        except OSError:
            self._answer(event.fd, deny_errno(errno.EIO))
            self.requests.observe("failed", time.monotonic() - started)
            return
        cf = self.by_inode.get((st.st_dev, st.st_ino))
        if cf is None:  # marked by an older configuration: nothing here can fill it
            self.stats["read_unknown_object"] += 1
            log.error("event req=fd:%d for a file this daemon does not serve (inode %d): EIO", event.fd, st.st_ino)
            self._answer(event.fd, deny_errno(errno.EIO))
            self.requests.observe("failed", time.monotonic() - started)
            return
        if cf.target is None:
            cf.adopt(os.dup(event.fd), self._unmark)  # the kernel opened it without notification
            self._give_to_keeper()
        assert cf.target is not None
        count = event.count if event.count >= 0 else cf.blob.size - event.offset
        if cf.blob.recorders and self.recorders is not None and count > 0:
            self.recorders.note(cf.blob, event.offset, count)  # filled or not: every read of the blob
        if count <= 0 or self.filler.is_filled(cf.blob, cf.target, event.offset, count):
            self.stats["read_cached"] += 1
            self._answer(event.fd, FAN_ALLOW)
            self.requests.observe("cached", time.monotonic() - started, max(count, 0))
            return
        self.journal.record(event.fd, st.st_dev, st.st_ino, event.offset, count)
        self._spawn(self._fill_and_answer(cf, event.fd, event.offset, count, started))

    async def _fill(self, cf: CacheFile, offset: int, length: int, kind: str, req: str) -> int:
        """Fill the range; the answer for its event (ALLOW, or EIO)."""
        assert cf.target is not None
        # while an image records this blob's reads: only the chunks asked for, no read window or
        # read-ahead, which would put neighbours into the page cache, where reads raise no event
        exact = bool(cf.blob.recorders) and self.recorders is not None and self.recorders.recording(cf.blob)
        try:
            await self.filler.fill_blob(cf.blob, cf.target, offset, length, exact)
            self.stats["read_bytes"] += length
            return FAN_ALLOW
        except (SourceError, VerifyError, OSError, ValueError) as exc:
            self.stats["read_failed"] += 1
            request_log(log, kind, req, cf.name).error("off=%d len=%d failed: %s", offset, length, exc)
        except asyncio.CancelledError:
            self.stats["read_failed"] += 1
            request_log(log, kind, req, cf.name).warning("off=%d len=%d cancelled at shutdown", offset, length)
        except Exception:  # a bug must still not hang the reader
            self.stats["read_failed"] += 1
            request_log(log, kind, req, cf.name).exception("off=%d len=%d: unexpected error", offset, length)
        return deny_errno(errno.EIO)

    async def _fill_and_answer(self, cf: CacheFile, event_fd: int, offset: int, length: int,
                               started: float) -> None:
        response = deny_errno(errno.EIO)
        try:
            response = await self._fill(cf, offset, length, "event", f"fd:{event_fd}")
        finally:
            self._answer(event_fd, response)
            allowed = response == FAN_ALLOW
            self.requests.observe("filled" if allowed else "failed", time.monotonic() - started,
                                  length if allowed else 0)

    def _answer(self, event_fd: int, response: int) -> None:
        assert self.group is not None and self.journal is not None
        try:
            self.group.answer(event_fd, response)
        except OSError as exc:
            log.error("event req=fd:%d: answering failed: %s", event_fd, exc)
        self.journal.clear(event_fd)
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

    # -- a predecessor's orphans ------------------------------------------------------------
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

    async def _resolve_orphan(self, orphan: Orphan) -> None:
        response = deny_errno(errno.EIO)
        cf = self.by_inode.get((orphan.dev, orphan.ino))
        try:
            if cf is not None and cf.target is not None:
                try:
                    response = await asyncio.wait_for(
                        self._fill(cf, orphan.offset, orphan.count, "orphan", f"fd:{orphan.fd}"), ORPHAN_SECONDS)
                except TimeoutError:
                    request_log(log, "orphan", f"fd:{orphan.fd}", cf.name).error(
                        "not filled within %.0f s: EIO", ORPHAN_SECONDS)
        finally:
            assert self.group is not None and self.journal is not None
            answered = self.group.answer(orphan.fd, response)
            self.journal.clear(orphan.fd)
            if orphan.fd in self._placeholders:
                self._placeholders.discard(orphan.fd)
                os.close(orphan.fd)
            self.stats["orphans_answered" if answered else "orphans_gone"] += 1
            if answered and response != FAN_ALLOW:
                self.stats["orphans_eio"] += 1

    # -- prefetch ---------------------------------------------------------------------------
    async def _prefetch(self, cf: CacheFile, profile_only: bool = False) -> None:
        """Once the image is served (its reader armed): the start-up profile's chunks first,
        then the prefetch list."""
        if self.recorders is not None and self.recorders.recording(cf.blob):
            # what it filled would be read from the page cache without an event: not recorded
            log.info("blob=%s: its reads are being recorded: no profile replay or prefetch now", cf.name)
            return
        try:
            if cf.target is None:
                # no write fd yet (taken over without one): one read raises the event that brings it
                await asyncio.to_thread(_read_one_byte, cf.path)
            assert cf.target is not None
            cf.target.prefetch = asyncio.current_task()  # type: ignore[assignment]
            if cf.blob.profile_order:
                await self.filler.replay(cf.blob, cf.target, cf.blob.profile_order)
                log.info("profile replay blob=%s done (%d chunks)", cf.name, len(cf.blob.profile_order))
            if profile_only or not cf.blob.prefetch_order:
                return
            await self.filler.prefetch(cf.blob, cf.target, cf.blob.prefetch_order, cf.blob.prefetch_bandwidth)
            log.info("prefetch blob=%s done (%d chunks)", cf.name, len(cf.blob.prefetch_order))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("prefetch blob=%s failed", cf.name)

    # -- stop -------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        for cf in self.files.values():
            if cf.target is not None and cf.target.prefetch is not None:
                cf.target.prefetch.cancel()
        await settle(self.tasks, timeout)
        await self.filler.drain(0)

    def is_watched(self, mountpoint: str, mount_id: int) -> bool:
        """False for a mount that predates the group: its reads may already have seen holes."""
        return self.unwatched.get(mountpoint) != mount_id

    def still_mounted(self) -> list[str]:
        """Mount points of EROFS mounts of our bootstraps this group watches (by us or by hand)."""
        ours = self.bootstraps()
        return sorted(mp for mp, (source, mount_id) in mounts.erofs_mount_table().items()
                      if source in ours and self.is_watched(mp, mount_id))

    def release_all(self, *, let_go: bool) -> None:
        """Close our fds. With `let_go` (nothing marked is mounted) the keeper lets go too and
        the marks vanish with the group; otherwise the keeper keeps the group: readers wait for
        the next daemon instead of reading holes."""
        try:
            self._write_clean_stop_record()
        except OSError as exc:  # only costs the next start a re-verification
            log.warning("recording the filled state at stop: %s", exc)
        for cf in self.files.values():
            if cf.target is not None:
                cf.target.close()
            if cf.write_fd is not None:
                cf.write_fd.close()
        if self.journal is not None:
            if let_go:
                self.journal.reset()
            self.journal.close()
        if let_go:
            self.holder.dismiss()
        if self.group is not None:
            self.group.close()


def _read_one_byte(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.pread(fd, 1, 0)
    finally:
        os.close(fd)
