"""Cache lifecycle: cull one blob's cache on demand, keep the cache dir under a size budget.

`cull(daemon, blob_id)` is what `DELETE /api/v2/blobs?blob_id=` does (fscached.api.server):

- cachefiles: the kernel keeps every object as `<cache>/cache/Ierofs,<volume>/@xx/D<cookie key>`
  (cachefiles.naming). For the id as a cookie key, in every erofs volume where it exists: a
  data blob's object (its key is the blob id) or an image's bootstrap object (its key is the
  fsid; nydus-snapshotter culls `<fscache_id>` after each unmount). Each one is asked about with
  the kernel's `inuse` and removed with its `cull`, both resolved in the @xx directory by a
  thread with a working directory of its own (cachefiles.device.in_directory). An object bound
  in the catalog, open (mounted: until its cookie is withdrawn at unmount the kernel keeps it in
  an unnamed tmpfile, so it has no name yet), or that the kernel says is in use, is busy and
  stays. A volume named after the id (the image's own volume, no domain) goes too once nothing
  is left in it, nothing binds and nothing mounts it (the kernel moves it to `graveyard/`,
  emptied here as cachefilesd would).
- fanotify: the blob's sparse cache file `<cache>/blobs/<volume>/<blob id>` in every volume,
  unless a bound image uses it (it is marked and served) or anything has it open: a file-backed
  EROFS mount holds its devices open, and a write lease (F_SETLEASE) is only granted on a file
  nobody else has open. The file is renamed into `.fscached/trash/` on the event loop (no bind
  can come between the check and the rename) and unlinked in a thread. An empty volume
  directory named after the id goes too.

Errors are CullError subclasses with one-line messages: InvalidBlobId (a ValueError: 400),
CullNotFound (a LookupError: 404), CullBusy (an OSError with errno EBUSY: 409), CullFailed (an
OSError: 500). An id is checked before anything is built from it: 64 hex digits (a blob), or an
fsid (1-128 of letters, digits, '_', '.', ':', '-'; never '/', never '.' or '..').

The budget (`cache_budget` in the config file): every BUDGET_INTERVAL seconds, and soon after
an unbind, the cache dir's allocated bytes (st_blocks * 512 of everything under it, walked in a
thread) are compared with the budget; past it, cache files no bound image uses are culled,
least recently used first, until it fits (busy ones are skipped). "Last used" is the latest of
the file's atime and mtime (cachefiles touches the atime of an object each time it is looked up
again; the fanotify path writes the file while filling it) and of the time this daemon last
unbound an image that used the blob (kept in memory). On cachefiles the same pass also culls
while the cache filesystem has less than `bcull` % free, until `brun` % is free (the kernel's
7 / 5 unless configured; in on-demand mode no cachefilesd culls for it).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefiles import naming
from cachefiles.device import DEFAULT_SPACE_LIMITS, CachefilesDevice, CachefilesError
from fscached.core.catalog import VOLUME_PREFIX, Catalog
from fscached.util import mounts
from fscached.util.ids import BLOB_ID, FSID as FSID_PATTERN
from fscached.util.units import human_bytes
from fscached.frontends.fanotify.frontend import FanotifyServer
from fscached.frontends.cachefiles import Server

log = logging.getLogger("fscached.cache_gc")

BUDGET_INTERVAL = 60.0  # seconds between two budget checks (an unbind brings the next one forward)
UNBIND_SETTLE = 1.0  # seconds after an unbind before its check: the snapshotter unmounts right after
COMMIT_GRACE = 3.0  # seconds a just-unbound object may take to be linked under its name by the kernel
RECENT_SECONDS = 60.0  # an unbind this recent makes a cull wait (up to COMMIT_GRACE) for the link
RETRY_SECONDS = 0.2


class CullError(Exception):
    """Why a cull did not do what was asked, in one line."""


class InvalidBlobId(CullError, ValueError):
    """The id is not a blob id nor an fsid: nothing is looked up with it."""


class CullNotFound(CullError, LookupError):
    """Nothing in the cache under that id."""


class CullBusy(CullError, OSError):
    """In use (bound, mounted, open): not removed."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EBUSY, message)

    def __str__(self) -> str:
        return str(self.strerror)


class CullFailed(CullError, OSError):
    """The kernel or the filesystem refused, for another reason than being in use."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return str(self.strerror)


def check_blob_id(blob_id: object) -> str:
    if not isinstance(blob_id, str) or not blob_id:
        raise InvalidBlobId("blob_id is empty: give a blob id (64 hex digits) or an image's fsid")
    shown = repr(blob_id[:80]) + ("..." if len(blob_id) > 80 else "")
    if blob_id.startswith("sha256:"):
        raise InvalidBlobId(f"invalid blob_id {shown}: give the 64 hex digits without 'sha256:'")
    if not FSID_PATTERN.fullmatch(blob_id):
        raise InvalidBlobId(f"invalid blob_id {shown}: a blob id is 64 hex digits, an fsid 1-128 letters, "
                            "digits, '_', '.', ':' or '-'")
    return blob_id


# -- per-daemon state ------------------------------------------------------------------------
@dataclass
class _State:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one cull or budget pass at a time
    released: dict[str, float] = field(default_factory=dict)  # id -> monotonic time of its unbind
    released_wall: dict[str, float] = field(default_factory=dict)  # id -> wall time (LRU)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the latest budget pass, for tests and logs


_states: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _state(daemon: Any) -> _State:
    state = _states.get(daemon)
    if state is None:
        state = _states[daemon] = _State()
    return state


def image_released(daemon: Any, fsid: str, blob_ids: list[str]) -> None:
    """The daemon unbound an image (its fsid) and stopped using these blobs: remember when (a
    cull right after may have to wait for the kernel to link the objects; LRU), and bring the
    next budget check forward."""
    state = _state(daemon)
    now, wall = time.monotonic(), time.time()
    for name in (fsid, *blob_ids):
        state.released[name] = now
        state.released_wall[name] = wall
    for name in [n for n, t in state.released.items() if now - t > RECENT_SECONDS]:
        del state.released[name]
    state.wake.set()


def _recently_released(state: _State, blob_id: str) -> bool:
    when = state.released.get(blob_id)
    return when is not None and time.monotonic() - when < RECENT_SECONDS


# -- cull one id ------------------------------------------------------------------------------
async def cull(daemon: Any, blob_id: str) -> None:
    """Remove the cache of `blob_id` (a blob id, or an fsid for its bootstrap object) wherever
    nothing uses it. CullBusy when some of it is in use (what could go went), CullNotFound when
    there is nothing to remove, InvalidBlobId, CullFailed."""
    blob_id = check_blob_id(blob_id)
    server = daemon.server
    if server is None:
        raise CullFailed(errno.EAGAIN, "the daemon is not serving the kernel yet: try again")
    state = _state(daemon)
    async with state.lock:
        if isinstance(server, FanotifyServer):
            await _cull_fanotify(daemon, server, blob_id)
        else:
            await _cull_cachefiles(daemon, server, blob_id, state)


@dataclass
class _Outcome:
    removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    kernel_busy: list[str] = field(default_factory=list)  # busy only in the kernel's eyes

    def raise_if_not_done(self, blob_id: str, where: str) -> None:
        if self.busy or self.kernel_busy:
            done = f"removed {', '.join(self.removed)}; " if self.removed else ""
            raise CullBusy(f"{done}in use, not removed: {'; '.join(self.busy + self.kernel_busy)}")
        if not self.removed:
            raise CullNotFound(f"no cache of {blob_id} in {where}")


# cachefiles ------------------------------------------------------------------------------------
def _erofs_volumes(cache_dir: Path) -> dict[str, Path]:
    """volume (after "erofs,") -> its directory, for every erofs volume the kernel made."""
    found: dict[str, Path] = {}
    try:
        entries = list(os.scandir(cache_dir / "cache"))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith("I" + VOLUME_PREFIX) and entry.is_dir(follow_symlinks=False):
            found[entry.name[1 + len(VOLUME_PREFIX):]] = Path(entry.path)
    return found


def _find_objects(cache_dir: Path, key: bytes) -> dict[str, tuple[Path, str]]:
    """volume -> (@xx directory, file name) where the kernel linked an object for `key`."""
    name = naming.cook_key(key)
    found: dict[str, tuple[Path, str]] = {}
    for volume, directory in _erofs_volumes(cache_dir).items():
        try:
            fan = directory / naming.fanout_name(VOLUME_PREFIX + volume, key)
            if os.path.isfile(fan / name) and not os.path.islink(fan / name):
                found[volume] = (fan, name)
        except ValueError:
            continue  # a volume key the kernel could not have made: not ours
    return found


def _kernel_cull(device: CachefilesDevice, directory: Path, name: str, level: int = logging.INFO) -> str:
    """"culled", "busy" or "gone", as the kernel answers `inuse` then `cull` in `directory`
    (each answer logged at `level`)."""
    command = "inuse"
    try:
        if device.inuse_in(directory, name):
            log.log(level, "kernel: `inuse %s` in %s: EBUSY (in use)", name, directory)
            return "busy"
        log.log(level, "kernel: `inuse %s` in %s: not in use", name, directory)
        command = "cull"
        device.cull_in(directory, name)
        log.info("kernel: `cull %s` in %s: done", name, directory)
        return "culled"
    except CachefilesError as exc:
        answer = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.log(level, "kernel: `%s %s` in %s: %s", command, name, directory, answer)
        if exc.errno == errno.EBUSY:
            return "busy"
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            return "gone"
        raise CullFailed(exc.errno or errno.EIO, f"{directory / name}: {exc}") from None


def _fscache_mounts() -> list[tuple[str, str, str | None]]:
    """(mount point, fsid, domain or None) of every EROFS mount in fscache mode."""
    return [(m.mountpoint, m.option("fsid") or "", m.option("domain_id") or None) for m in mounts.fscache_mounts()]


def _bound_volumes(catalog: Catalog, blob_id: str) -> dict[str, list[str]]:
    """volume -> the fsids of the bound images that use `blob_id` there (as a blob or as their
    own bootstrap)."""
    bound: dict[str, list[str]] = {}
    for (volume, fsid), blobs in catalog.devices.items():
        if fsid == blob_id or any(b.info.blob_id == blob_id for b in blobs):
            bound.setdefault(volume, []).append(fsid)
    return bound


def _open_volumes(server: Server, key: bytes) -> set[str]:
    return {e.volume_key[len(VOLUME_PREFIX):] for e in server.objects.entries()
            if e.cookie_key == key and e.volume_key.startswith(VOLUME_PREFIX)}


async def _cull_cachefiles(daemon: Any, server: Server, blob_id: str, state: _State) -> None:
    cache_dir = Path(daemon.config.cache_dir)
    key = blob_id.encode()
    deadline = time.monotonic() + COMMIT_GRACE
    removed: list[str] = []
    level = logging.INFO
    while True:
        outcome = await _cull_cachefiles_once(daemon, server, cache_dir, blob_id, key, level)
        level = logging.DEBUG  # the same answers again while waiting: not logged each time
        removed += outcome.removed
        outcome.removed = removed
        settling = not outcome.busy and (outcome.kernel_busy or not removed)
        if settling and _recently_released(state, blob_id) and time.monotonic() < deadline:
            # unbound moments ago: the kernel withdraws the cookie (links the object under its
            # name, then lets go of it) in a worker after the unmount returns
            await asyncio.sleep(RETRY_SECONDS)
            continue
        outcome.raise_if_not_done(blob_id, f"{cache_dir}/cache")
        log.info("culled %s: %s", blob_id, ", ".join(outcome.removed))
        return


async def _cull_cachefiles_once(daemon: Any, server: Server, cache_dir: Path, blob_id: str,
                                key: bytes, level: int = logging.INFO) -> _Outcome:
    outcome = _Outcome()
    bound = _bound_volumes(daemon.catalog, blob_id)
    opened = _open_volumes(server, key)
    present, mounted = await asyncio.to_thread(lambda: (_find_objects(cache_dir, key), _fscache_mounts()))
    mounted_volumes = {domain or fsid for _, fsid, domain in mounted}
    for volume in sorted(set(present) | opened):
        where = f"volume erofs,{volume}"
        if volume in bound:
            outcome.busy.append(f"{where}: bound (image {', '.join(sorted(bound[volume]))})")
        elif volume in opened:
            outcome.busy.append(f"{where}: open in the kernel (mounted)")
        else:
            directory, name = present[volume]
            result = await asyncio.to_thread(_kernel_cull, server.device, directory, name, level)
            if result == "culled":
                outcome.removed.append(str(directory / name))
            elif result == "busy":
                outcome.kernel_busy.append(f"{where}: in use by the kernel")
    for mountpoint, fsid, domain in mounted:  # a mounted image's bootstrap object: in use
        volume = domain or fsid
        if fsid == blob_id and volume not in present and volume not in opened:
            outcome.busy.append(f"volume erofs,{volume}: mounted on {mountpoint}")
    own = _erofs_volumes(cache_dir).get(blob_id)  # the image's own volume (no domain)
    if own is not None and blob_id not in {v for v, _ in daemon.catalog.images} and blob_id not in mounted_volumes \
            and not any(e.volume_key == VOLUME_PREFIX + blob_id for e in server.objects.entries()):
        if await asyncio.to_thread(_cull_empty_volume, server.device, cache_dir, blob_id):
            outcome.removed.append(str(own))
    return outcome


def _volume_is_empty(directory: Path) -> bool:
    """Nothing but empty @xx directories."""
    with os.scandir(directory) as fans:
        for fan in fans:
            if not fan.is_dir(follow_symlinks=False):
                return False
            with os.scandir(fan.path) as inside:
                if next(inside, None) is not None:
                    return False
    return True


def _cull_empty_volume(device: CachefilesDevice, cache_dir: Path, volume: str) -> bool:
    """Cull `Ierofs,<volume>` when it holds no object: the kernel moves it to the graveyard
    (EBUSY while the volume is acquired by a mount); then the graveyard is emptied."""
    directory = cache_dir / "cache" / naming.volume_dir_name(VOLUME_PREFIX + volume)
    try:
        if not _volume_is_empty(directory):
            return False
    except FileNotFoundError:
        return False
    result = _kernel_cull(device, cache_dir / "cache", directory.name)
    if result == "culled":
        empty_graveyard(cache_dir)
    return result == "culled"


def empty_graveyard(cache_dir: Path) -> None:
    """What cachefiles buried (culled volumes, invalidated objects) is deleted, as cachefilesd
    does: nothing in `graveyard/` is used by anything."""
    try:
        entries = list(os.scandir(cache_dir / "graveyard"))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("graveyard: cannot delete %s: %s", entry.path, exc)


# fanotify --------------------------------------------------------------------------------------
def _trash_dir(cache_dir: Path) -> Path:
    return cache_dir / ".fscached" / "trash"


def _mounted_blob_ids() -> set[str] | None:
    """Blob ids of the bootstraps of every file-backed EROFS mount (used only where the
    filesystem refuses leases); None when one cannot be read."""
    from erofs_image.reader import Bootstrap
    ids: set[str] = set()
    for source, _ in mounts.erofs_mount_table().values():
        if not source.startswith("/"):
            continue
        try:
            ids.update(b.blob_id for b in Bootstrap.open(Path(source)).blobs)
        except (OSError, ValueError):
            return None
    return ids


def _take_file(path: Path, trash: Path, mounted_ids: set[str] | None, blob_id: str) -> str:
    """On the event loop, synchronously (no bind can come between the check and the rename):
    "culled" (moved to `trash`), "busy" (someone has it open) or "gone"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    except BlockingIOError:  # someone else holds a lease on it
        return "busy"
    leased = False
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)  # granted only if nobody else has it open
            leased = True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return "busy"
            # no leases on this filesystem: fall back on what is mounted
            if mounted_ids is None or blob_id in mounted_ids:
                return "busy"
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return "gone"
        if not same:
            return "gone"
        trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(path, trash)
        return "culled"
    finally:
        if leased:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)


def empty_trash(cache_dir: Path) -> None:
    trash = _trash_dir(cache_dir)
    try:
        entries = list(os.scandir(trash))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            os.unlink(entry.path)
        except OSError as exc:
            log.warning("cannot delete %s: %s", entry.path, exc)


def _fanotify_files(cache_dir: Path, blob_id: str | None = None) -> list[tuple[str, Path]]:
    """(volume, path) of the blob cache files (of `blob_id`, or all of them)."""
    found: list[tuple[str, Path]] = []
    try:
        volumes = [e for e in os.scandir(cache_dir / "blobs") if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return found
    for volume in volumes:
        if blob_id is not None:
            path = Path(volume.path) / blob_id
            if path.is_file() and not path.is_symlink():
                found.append((volume.name, path))
            continue
        for entry in os.scandir(volume.path):
            if BLOB_ID.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found.append((volume.name, Path(entry.path)))
    return found


def _take_fanotify(server: FanotifyServer, cache_dir: Path, volume: str, path: Path,
                   mounted_ids: set[str] | None) -> str:
    """"culled" / "busy" / "bound" / "gone" for one cache file (on the loop)."""
    name = f"{volume}/{path.name}"
    if name in server.files:
        return "bound"
    trash = _trash_dir(cache_dir) / f"{volume}.{path.name}.{time.monotonic_ns()}"
    return _take_file(path, trash, mounted_ids, path.name)


async def _cull_fanotify(daemon: Any, server: FanotifyServer, blob_id: str) -> None:
    cache_dir = Path(daemon.config.cache_dir)
    outcome = _Outcome()
    files = await asyncio.to_thread(_fanotify_files, cache_dir, blob_id) if BLOB_ID.fullmatch(blob_id) else []
    mounted_ids = await asyncio.to_thread(_mounted_blob_ids) if files else set()
    for volume, path in files:
        result = _take_fanotify(server, cache_dir, volume, path, mounted_ids)
        if result == "culled":
            outcome.removed.append(str(path))
        elif result == "bound":
            users = sorted(f for (v, f), blobs in daemon.catalog.devices.items()
                           if v == volume and any(b.info.blob_id == blob_id for b in blobs))
            outcome.busy.append(f"{path}: bound (image {', '.join(users)})")
        elif result == "busy":
            outcome.busy.append(f"{path}: open (mounted)")
    own = cache_dir / "blobs" / blob_id  # the image's own volume (no domain)
    if own.is_dir() and not own.is_symlink() and not any(v == blob_id for v, _ in daemon.catalog.images) \
            and not any(n.startswith(f"{blob_id}/") for n in server.files):
        try:
            own.rmdir()  # only when empty
            outcome.removed.append(str(own))
        except OSError:
            pass
    await asyncio.to_thread(empty_trash, cache_dir)
    outcome.raise_if_not_done(blob_id, f"{cache_dir}/blobs")
    log.info("culled %s: %s", blob_id, ", ".join(outcome.removed))


# -- the budget ---------------------------------------------------------------------------------
@dataclass
class CacheFile:
    volume: str
    path: Path
    key: bytes  # cookie key (cachefiles) or blob id (fanotify)
    allocated: int
    last_used: float


def allocated_bytes(root: Path) -> int:
    """st_blocks * 512 of everything under `root` (symlinks not followed)."""
    total = 0
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


def _cachefiles_objects(cache_dir: Path) -> list[CacheFile]:
    found: list[CacheFile] = []
    for volume, directory in _erofs_volumes(cache_dir).items():
        for fan in os.scandir(directory):
            if not (fan.name.startswith("@") and fan.is_dir(follow_symlinks=False)):
                continue
            for entry in os.scandir(fan.path):
                try:
                    key = naming.uncook_key(entry.name)
                    st = entry.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                if entry.is_file(follow_symlinks=False):
                    found.append(CacheFile(volume, Path(entry.path), key, st.st_blocks * 512,
                                           max(st.st_atime, st.st_mtime)))
    return found


def _fanotify_objects(cache_dir: Path) -> list[CacheFile]:
    found = []
    for volume, path in _fanotify_files(cache_dir):
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        found.append(CacheFile(volume, path, path.name.encode(), st.st_blocks * 512, max(st.st_atime, st.st_mtime)))
    return found


def _bytes_to_free_for_space(cache_dir: Path, daemon: Any) -> int:
    """cachefiles: below bcull % free, what it takes to get back to brun % free."""
    config = daemon.config
    if not any(v is not None for v in (config.brun, config.bcull, config.bstop)):
        return 0
    run = config.brun if config.brun is not None else DEFAULT_SPACE_LIMITS[0]
    cull_at = config.bcull if config.bcull is not None else DEFAULT_SPACE_LIMITS[1]
    st = statvfs(str(cache_dir))
    if not st.f_blocks or st.f_bavail * 100 >= st.f_blocks * cull_at:
        return 0
    return max(0, (st.f_blocks * run + 99) // 100 - st.f_bavail) * st.f_frsize


statvfs = os.statvfs  # tests stand a full filesystem in


async def check_budget(daemon: Any) -> dict[str, Any]:
    """One budget pass (see the module's doc). Returns what it saw and did."""
    server = daemon.server
    config = daemon.config
    cache_dir = Path(config.cache_dir)
    state = _state(daemon)
    report: dict[str, Any] = {"budget": config.cache_budget, "culled": [], "busy": []}
    if server is None:
        return report
    async with state.lock:
        fanotify = isinstance(server, FanotifyServer)

        def survey() -> tuple[int, int, list[CacheFile]]:
            (empty_trash if fanotify else empty_graveyard)(cache_dir)
            usage = allocated_bytes(cache_dir)
            space = 0 if fanotify else _bytes_to_free_for_space(cache_dir, daemon)
            objects = _fanotify_objects(cache_dir) if fanotify else _cachefiles_objects(cache_dir)
            return usage, space, objects

        usage, space, objects = await asyncio.to_thread(survey)
        budget = config.cache_budget
        to_free = max(usage - budget if budget else 0, space)
        report.update(usage_before=usage, to_free=to_free, usage_after=usage)
        if to_free <= 0:
            state.last = report
            return report
        mounted_ids = await asyncio.to_thread(_mounted_blob_ids) if fanotify else set()
        for cf in objects:  # the daemon's own record of when it last let go of the blob
            cf.last_used = max(cf.last_used, state.released_wall.get(cf.key.decode("ascii", "replace"), 0.0))
        freed = 0
        for cf in sorted(objects, key=lambda c: c.last_used):
            if freed >= to_free:
                break
            result = await _cull_for_budget(daemon, server, cache_dir, cf, mounted_ids)
            if result == "culled":
                freed += cf.allocated
                report["culled"].append(str(cf.path))
            elif result == "busy":
                report["busy"].append(str(cf.path))
        if fanotify:
            await asyncio.to_thread(empty_trash, cache_dir)
        else:
            await _cull_unused_volumes(daemon, server, cache_dir)
        report["usage_after"] = await asyncio.to_thread(allocated_bytes, cache_dir)
        if report["culled"]:
            log.info("cache %s: %s over its limit: culled %d unused file(s) (%s), least recently used first",
                     cache_dir, human_bytes(to_free), len(report["culled"]), human_bytes(freed))
        if report["usage_after"] > (budget or report["usage_after"]) or (space and freed < to_free):
            log.warning("cache %s: holds %s, over its limit: everything left is in use", cache_dir,
                        human_bytes(report["usage_after"]))
        state.last = report
        return report


async def _cull_for_budget(daemon: Any, server: Any, cache_dir: Path, cf: CacheFile,
                           mounted_ids: set[str] | None) -> str:
    if isinstance(server, FanotifyServer):
        result = _take_fanotify(server, cache_dir, cf.volume, cf.path, mounted_ids)
        return "skip" if result == "bound" else result
    if daemon.catalog.lookup(VOLUME_PREFIX + cf.volume, cf.key) is not None:
        return "skip"  # bound: in use by definition
    if any(e.volume_key == VOLUME_PREFIX + cf.volume and e.cookie_key == cf.key for e in server.objects.entries()):
        return "skip"
    return await asyncio.to_thread(_kernel_cull, server.device, cf.path.parent, cf.path.name)


async def _cull_unused_volumes(daemon: Any, server: Server, cache_dir: Path) -> None:
    """Volumes left with no object, that nothing binds, opens or mounts (the kernel says
    busy while one is acquired): each is 257 directories."""
    volumes = await asyncio.to_thread(_erofs_volumes, cache_dir)
    bound = {v for v, _ in daemon.catalog.images}
    opened = {e.volume_key[len(VOLUME_PREFIX):] for e in server.objects.entries()}
    mounted = {domain or fsid for _, fsid, domain in await asyncio.to_thread(_fscache_mounts)}
    for volume in sorted(set(volumes) - bound - opened - mounted):
        try:
            await asyncio.to_thread(_cull_empty_volume, server.device, cache_dir, volume)
        except CullFailed as exc:
            log.warning("culling volume erofs,%s: %s", volume, exc)


def budget_wanted(daemon: Any) -> bool:
    config = daemon.config
    if config.cache_budget:
        return True
    return daemon.backend == "cachefiles" and any(v is not None for v in (config.brun, config.bcull, config.bstop))


def start(daemon: Any, interval: float = BUDGET_INTERVAL) -> asyncio.Task[None] | None:
    """The periodic budget check, on the running loop (None when there is nothing to check)."""
    config = daemon.config
    if daemon.backend != "cachefiles" and any(v is not None for v in (config.brun, config.bcull, config.bstop)):
        log.info("brun/bcull/bstop apply to the cachefiles path only: not used on %s", daemon.backend)
    if not budget_wanted(daemon):
        return None
    state = _state(daemon)
    state.task = asyncio.ensure_future(_budget_loop(daemon, state, interval))
    return state.task


async def _budget_loop(daemon: Any, state: _State, interval: float) -> None:
    while True:
        try:
            await check_budget(daemon)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or a full disk must not stop the next pass
            log.exception("cache budget check failed")
        try:
            await asyncio.wait_for(state.wake.wait(), interval)
            await asyncio.sleep(UNBIND_SETTLE)
        except TimeoutError:
            pass
        state.wake.clear()


async def stop(daemon: Any) -> None:
    state = _states.get(daemon)
    if state is None or state.task is None:
        return
    task, state.task = state.task, None
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
