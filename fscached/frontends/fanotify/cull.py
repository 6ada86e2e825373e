"""Culling on the fanotify path: a blob's sparse cache file `<cache>/blobs/<volume>/<blob id>`.

A file goes unless a bound image uses it (it is marked and served) or anything has it open: a
file-backed EROFS mount holds its devices open, and a write lease (F_SETLEASE) is only granted
on a file nobody else has open (fscached.util.leases). The file is renamed into
`.fscached/trash/` on the event loop (no bind can come between the check and the rename) and
unlinked in a thread. An empty volume directory named after the id goes too.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fscached.frontends.base import CullEntry, CullOutcome
from fscached.util.ids import BLOB_ID
from fscached.util.leases import LeasesUnsupported, exclusive_lease

if TYPE_CHECKING:
    from fscached.frontends.fanotify.frontend import FanotifyFrontend

log = logging.getLogger("fscached.cache_gc")


class FanotifyCuller:
    def __init__(self, frontend: FanotifyFrontend) -> None:
        self.frontend = frontend
        self.recently_released: Callable[[str], bool] = lambda blob_id: False  # files link at once

    @property
    def cache_dir(self) -> Path:
        return Path(self.frontend.cache_dir)

    async def cull(self, blob_id: str) -> list[str]:
        cache_dir = self.cache_dir
        catalog = self.frontend.catalog
        outcome = CullOutcome()
        files = await asyncio.to_thread(fanotify_files, cache_dir, blob_id) if BLOB_ID.fullmatch(blob_id) else []
        for volume, path in files:
            result = self._take(volume, path)
            if result == "culled":
                outcome.removed.append(str(path))
            elif result == "bound":
                users = sorted(f for (v, f), blobs in catalog.devices.items()
                               if v == volume and any(b.info.blob_id == blob_id for b in blobs))
                outcome.busy.append(f"{path}: bound (image {', '.join(users)})")
            elif result == "busy":
                outcome.busy.append(f"{path}: open (mounted)")
        own = cache_dir / "blobs" / blob_id  # the image's own volume (no domain)
        if own.is_dir() and not own.is_symlink() and not any(v == blob_id for v, _ in catalog.images) \
                and not any(n.startswith(f"{blob_id}/") for n in self.frontend.files):
            try:
                own.rmdir()  # only when empty
                outcome.removed.append(str(own))
            except OSError:
                pass
        await asyncio.to_thread(empty_trash, cache_dir)
        outcome.raise_if_not_done(blob_id, f"{cache_dir}/blobs")
        return outcome.removed

    def _take(self, volume: str, path: Path) -> str:
        """"culled" / "busy" / "bound" / "gone" for one cache file (on the loop)."""
        if self.frontend.bound_file(f"{volume}/{path.name}"):
            return "bound"
        trash = trash_dir(self.cache_dir) / f"{volume}.{path.name}.{time.monotonic_ns()}"
        return take_file(path, trash, path.name)

    # -- the budget -----------------------------------------------------------------------------
    def survey(self) -> tuple[int, list[CullEntry]]:
        empty_trash(self.cache_dir)
        return 0, fanotify_objects(self.cache_dir)  # free-space limits are the cachefiles path's

    async def cull_entry(self, entry: CullEntry) -> str:
        result = self._take(entry.volume, entry.path)
        return "skip" if result == "bound" else result

    async def tidy(self) -> None:
        await asyncio.to_thread(empty_trash, self.cache_dir)


def trash_dir(cache_dir: Path) -> Path:
    return cache_dir / ".fscached" / "trash"


def mounted_blob_ids() -> set[str] | None:
    """Blob ids of the bootstraps of every file-backed EROFS mount (used only where the
    filesystem refuses leases); None when one cannot be read."""
    from erofs_image.reader import Bootstrap
    from fscached.util import mounts

    ids: set[str] = set()
    for source, _ in mounts.erofs_mount_table().values():
        if not source.startswith("/"):
            continue
        try:
            ids.update(b.blob_id for b in Bootstrap.open(Path(source)).blobs)
        except (OSError, ValueError):
            return None
    return ids


def take_file(path: Path, trash: Path, blob_id: str) -> str:
    """On the event loop, synchronously (no bind can come between the check and the rename):
    "culled" (moved to `trash`), "busy" (someone has it open) or "gone". Where the filesystem
    has no leases, whether a mount names the blob decides (mounted_blob_ids)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    except BlockingIOError:  # someone else holds a lease on it
        return "busy"
    try:
        try:
            with exclusive_lease(fd) as granted:  # granted only if nobody else has it open
                if not granted:
                    return "busy"
                return _move_to_trash(path, fd, trash)
        except LeasesUnsupported:
            # no leases on this filesystem: fall back on what is mounted
            mounted_ids = mounted_blob_ids()
            if mounted_ids is None or blob_id in mounted_ids:
                return "busy"
            return _move_to_trash(path, fd, trash)
    finally:
        os.close(fd)


def _move_to_trash(path: Path, fd: int, trash: Path) -> str:
    try:
        same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return "gone"
    if not same:
        return "gone"
    trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.rename(path, trash)
    return "culled"


def empty_trash(cache_dir: Path) -> None:
    trash = trash_dir(cache_dir)
    try:
        entries = list(os.scandir(trash))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            os.unlink(entry.path)
        except OSError as exc:
            log.warning("cannot delete %s: %s", entry.path, exc)


def fanotify_files(cache_dir: Path, blob_id: str | None = None) -> list[tuple[str, Path]]:
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


def fanotify_objects(cache_dir: Path) -> list[CullEntry]:
    found = []
    for volume, path in fanotify_files(cache_dir):
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        found.append(CullEntry(volume, path, path.name.encode(), st.st_blocks * 512, max(st.st_atime, st.st_mtime)))
    return found
