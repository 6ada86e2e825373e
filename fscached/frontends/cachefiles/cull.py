"""Culling on the cachefiles path: the kernel's own `inuse` and `cull`.

The kernel keeps every object as `<cache>/cache/Ierofs,<volume>/@xx/D<cookie key>`
(cachefiles.naming). For an id as a cookie key, in every erofs volume where it exists: a data
blob's object (its key is the blob id) or an image's bootstrap object (its key is the fsid;
nydus-snapshotter culls `<fscache_id>` after each unmount). Each one is asked about with the
kernel's `inuse` and removed with its `cull`, both resolved in the @xx directory by a thread
with a working directory of its own (cachefiles.device.in_directory). An object bound in the
catalog, open (mounted: until its cookie is withdrawn at unmount the kernel keeps it in an
unnamed tmpfile, so it has no name yet), or that the kernel says is in use, is busy and stays.
A volume named after the id (the image's own volume, no domain) goes too once nothing is left
in it, nothing binds and nothing mounts it (the kernel moves it to `graveyard/`, emptied here
as cachefilesd would). The free-space limits (`brun`/`bcull`) are this path's own.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cachefiles import naming
from cachefiles.device import DEFAULT_SPACE_LIMITS, CachefilesError
from fscached.core.catalog import VOLUME_PREFIX, Catalog
from fscached.frontends.base import CullEntry, CullFailed, CullOutcome
from fscached.util import mounts

if TYPE_CHECKING:
    from cachefiles.device import CachefilesDevice
    from fscached.frontends.cachefiles.frontend import CachefilesFrontend

log = logging.getLogger("fscached.cache_gc")

COMMIT_GRACE = 3.0  # seconds a just-unbound object may take to be linked under its name by the kernel
RETRY_SECONDS = 0.2

statvfs = os.statvfs  # tests stand a full filesystem in


class CachefilesCuller:
    def __init__(self, frontend: CachefilesFrontend,
                 space_limits: tuple[int | None, int | None, int | None] = (None, None, None)) -> None:
        self.frontend = frontend
        self.space_limits = space_limits  # brun, bcull, bstop (None: the kernel's)
        # the cache GC's record of unbinds: a cull right after one waits for the kernel's link
        self.recently_released: Callable[[str], bool] = lambda blob_id: False

    @property
    def catalog(self) -> Catalog:
        return self.frontend.catalog

    @property
    def device(self) -> CachefilesDevice:
        return self.frontend.device

    @property
    def cache_dir(self) -> Path:
        return Path(self.frontend.cache_dir)

    async def cull(self, blob_id: str) -> list[str]:
        key = blob_id.encode()
        deadline = time.monotonic() + COMMIT_GRACE
        removed: list[str] = []
        level = logging.INFO
        while True:
            outcome = await self._cull_once(blob_id, key, level)
            level = logging.DEBUG  # the same answers again while waiting: not logged each time
            removed += outcome.removed
            outcome.removed = removed
            settling = not outcome.busy and (outcome.kernel_busy or not removed)
            if settling and self.recently_released(blob_id) and time.monotonic() < deadline:
                # unbound moments ago: the kernel withdraws the cookie (links the object under its
                # name, then lets go of it) in a worker after the unmount returns
                await asyncio.sleep(RETRY_SECONDS)
                continue
            outcome.raise_if_not_done(blob_id, f"{self.cache_dir}/cache")
            return outcome.removed

    async def _cull_once(self, blob_id: str, key: bytes, level: int = logging.INFO) -> CullOutcome:
        cache_dir = self.cache_dir
        outcome = CullOutcome()
        bound = bound_volumes(self.catalog, blob_id)
        opened = self.frontend.open_volumes(key)
        present, mounted = await asyncio.to_thread(lambda: (find_objects(cache_dir, key), fscache_mounts()))
        mounted_volumes = {domain or fsid for _, fsid, domain in mounted}
        for volume in sorted(set(present) | opened):
            where = f"volume erofs,{volume}"
            if volume in bound:
                outcome.busy.append(f"{where}: bound (image {', '.join(sorted(bound[volume]))})")
            elif volume in opened:
                outcome.busy.append(f"{where}: open in the kernel (mounted)")
            else:
                directory, name = present[volume]
                result = await asyncio.to_thread(kernel_cull, self.device, directory, name, level)
                if result == "culled":
                    outcome.removed.append(str(directory / name))
                elif result == "busy":
                    outcome.kernel_busy.append(f"{where}: in use by the kernel")
        for mountpoint, fsid, domain in mounted:  # a mounted image's bootstrap object: in use
            volume = domain or fsid
            if fsid == blob_id and volume not in present and volume not in opened:
                outcome.busy.append(f"volume erofs,{volume}: mounted on {mountpoint}")
        own = erofs_volumes(cache_dir).get(blob_id)  # the image's own volume (no domain)
        if own is not None and blob_id not in {v for v, _ in self.catalog.images} and blob_id not in mounted_volumes \
                and not self.frontend.has_open_volume(blob_id):
            if await asyncio.to_thread(cull_empty_volume, self.device, cache_dir, blob_id):
                outcome.removed.append(str(own))
        return outcome

    # -- the budget -----------------------------------------------------------------------------
    def survey(self) -> tuple[int, list[CullEntry]]:
        empty_graveyard(self.cache_dir)
        return self._bytes_to_free_for_space(), cachefiles_objects(self.cache_dir)

    def _bytes_to_free_for_space(self) -> int:
        """Below bcull % free, what it takes to get back to brun % free."""
        brun, bcull, bstop = self.space_limits
        if not any(v is not None for v in (brun, bcull, bstop)):
            return 0
        run = brun if brun is not None else DEFAULT_SPACE_LIMITS[0]
        cull_at = bcull if bcull is not None else DEFAULT_SPACE_LIMITS[1]
        st = statvfs(str(self.cache_dir))
        if not st.f_blocks or st.f_bavail * 100 >= st.f_blocks * cull_at:
            return 0
        return max(0, (st.f_blocks * run + 99) // 100 - st.f_bavail) * st.f_frsize

    async def cull_entry(self, entry: CullEntry) -> str:
        if self.catalog.lookup(VOLUME_PREFIX + entry.volume, entry.key) is not None:
            return "skip"  # bound: in use by definition
        if entry.key in {e.cookie_key for e in self.frontend.objects.entries()
                         if e.volume_key == VOLUME_PREFIX + entry.volume}:
            return "skip"
        return await asyncio.to_thread(kernel_cull, self.device, entry.path.parent, entry.path.name)

    async def tidy(self) -> None:
        """Volumes left with no object, that nothing binds, opens or mounts (the kernel says
        busy while one is acquired): each is 257 directories."""
        cache_dir = self.cache_dir
        volumes = await asyncio.to_thread(erofs_volumes, cache_dir)
        bound = {v for v, _ in self.catalog.images}
        opened = {e.volume_key[len(VOLUME_PREFIX):] for e in self.frontend.objects.entries()}
        mounted = {domain or fsid for _, fsid, domain in await asyncio.to_thread(fscache_mounts)}
        for volume in sorted(set(volumes) - bound - opened - mounted):
            try:
                await asyncio.to_thread(cull_empty_volume, self.device, cache_dir, volume)
            except CullFailed as exc:
                log.warning("culling volume erofs,%s: %s", volume, exc)


# -- the kernel's cache layout ------------------------------------------------------------------
def erofs_volumes(cache_dir: Path) -> dict[str, Path]:
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


def find_objects(cache_dir: Path, key: bytes) -> dict[str, tuple[Path, str]]:
    """volume -> (@xx directory, file name) where the kernel linked an object for `key`."""
    name = naming.cook_key(key)
    found: dict[str, tuple[Path, str]] = {}
    for volume, directory in erofs_volumes(cache_dir).items():
        try:
            fan = directory / naming.fanout_name(VOLUME_PREFIX + volume, key)
            if os.path.isfile(fan / name) and not os.path.islink(fan / name):
                found[volume] = (fan, name)
        except ValueError:
            continue  # a volume key the kernel could not have made: not ours
    return found


def kernel_cull(device: CachefilesDevice, directory: Path, name: str, level: int = logging.INFO) -> str:
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


def fscache_mounts() -> list[tuple[str, str, str | None]]:
    """(mount point, fsid, domain or None) of every EROFS mount in fscache mode."""
    return [(m.mountpoint, m.option("fsid") or "", m.option("domain_id") or None) for m in mounts.fscache_mounts()]


def bound_volumes(catalog: Catalog, blob_id: str) -> dict[str, list[str]]:
    """volume -> the fsids of the bound images that use `blob_id` there (as a blob or as their
    own bootstrap)."""
    bound: dict[str, list[str]] = {}
    for (volume, fsid), blobs in catalog.devices.items():
        if fsid == blob_id or any(b.info.blob_id == blob_id for b in blobs):
            bound.setdefault(volume, []).append(fsid)
    return bound


def volume_is_empty(directory: Path) -> bool:
    """Nothing but empty @xx directories."""
    with os.scandir(directory) as fans:
        for fan in fans:
            if not fan.is_dir(follow_symlinks=False):
                return False
            with os.scandir(fan.path) as inside:
                if next(inside, None) is not None:
                    return False
    return True


def cull_empty_volume(device: CachefilesDevice, cache_dir: Path, volume: str) -> bool:
    """Cull `Ierofs,<volume>` when it holds no object: the kernel moves it to the graveyard
    (EBUSY while the volume is acquired by a mount); then the graveyard is emptied."""
    directory = cache_dir / "cache" / naming.volume_dir_name(VOLUME_PREFIX + volume)
    try:
        if not volume_is_empty(directory):
            return False
    except FileNotFoundError:
        return False
    result = kernel_cull(device, cache_dir / "cache", directory.name)
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


def cachefiles_objects(cache_dir: Path) -> list[CullEntry]:
    found: list[CullEntry] = []
    for volume, directory in erofs_volumes(cache_dir).items():
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
                    found.append(CullEntry(volume, Path(entry.path), key, st.st_blocks * 512,
                                           max(st.st_atime, st.st_mtime)))
    return found
