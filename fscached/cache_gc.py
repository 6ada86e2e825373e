"""Cache lifecycle: cull one blob's cache on demand, keep the cache dir under a size budget.

`CacheJanitor.cull(blob_id)` is what `DELETE /api/v2/blobs?blob_id=` does (fscached.api): the
id is checked first (64 hex digits, a blob; or an fsid for a bootstrap object: 1-128 of
letters, digits, '_', '.', ':', '-'; never '/'), then the kernel path's culler removes what
nothing uses (frontends.cachefiles.cull: the kernel's `inuse`/`cull`; frontends.fanotify.cull:
the sparse cache file, when nothing has it open).

Errors are CullError subclasses with one-line messages (frontends.base): InvalidBlobId (a
ValueError: 400), CullNotFound (a LookupError: 404), CullBusy (an OSError with errno EBUSY:
409), CullFailed (an OSError: 500).

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
import logging
import os
import time
from pathlib import Path
from typing import Any

from fscached.config import Config
from fscached.frontends.base import CullBusy, CullError, CullFailed, CullNotFound, Frontend, InvalidBlobId
from fscached.util.ids import FSID
from fscached.util.units import human_bytes

log = logging.getLogger("fscached.cache_gc")

# the errors a cull raises (defined beside the cullers, in fscached.frontends.base)
__all__ = ["CacheJanitor", "CullBusy", "CullError", "CullFailed", "CullNotFound", "InvalidBlobId", "allocated_bytes",
           "check_blob_id"]

BUDGET_INTERVAL = 60.0  # seconds between two budget checks (an unbind brings the next one forward)
UNBIND_SETTLE = 1.0  # seconds after an unbind before its check: the snapshotter unmounts right after
RECENT_SECONDS = 60.0  # an unbind this recent makes a cull wait (up to COMMIT_GRACE) for the link


def check_blob_id(blob_id: object) -> str:
    if not isinstance(blob_id, str) or not blob_id:
        raise InvalidBlobId("blob_id is empty: give a blob id (64 hex digits) or an image's fsid")
    shown = repr(blob_id[:80]) + ("..." if len(blob_id) > 80 else "")
    if blob_id.startswith("sha256:"):
        raise InvalidBlobId(f"invalid blob_id {shown}: give the 64 hex digits without 'sha256:'")
    if not FSID.fullmatch(blob_id):
        raise InvalidBlobId(f"invalid blob_id {shown}: a blob id is 64 hex digits, an fsid 1-128 letters, "
                            "digits, '_', '.', ':' or '-'")
    return blob_id


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


class CacheJanitor:
    """One daemon's culling and budget (its `frontend` is set once a kernel path is taken)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.frontend: Frontend | None = None
        self.lock = asyncio.Lock()  # one cull or budget pass at a time
        self.released: dict[str, float] = {}  # id -> monotonic time of its unbind
        self.released_wall: dict[str, float] = {}  # id -> wall time (LRU)
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last: dict[str, Any] = {}  # the latest budget pass, for tests and logs

    def attach(self, frontend: Frontend) -> None:
        self.frontend = frontend
        frontend.culler.recently_released = self.recently_released

    def image_released(self, fsid: str, blob_ids: list[str]) -> None:
        """An image (its fsid) was unbound and these blobs are no longer used: remember when
        (a cull right after may have to wait for the kernel to link the objects; LRU), and
        bring the next budget check forward."""
        now, wall = time.monotonic(), time.time()
        for name in (fsid, *blob_ids):
            self.released[name] = now
            self.released_wall[name] = wall
        for name in [n for n, t in self.released.items() if now - t > RECENT_SECONDS]:
            del self.released[name]
        self.wake.set()

    def recently_released(self, blob_id: str) -> bool:
        when = self.released.get(blob_id)
        return when is not None and time.monotonic() - when < RECENT_SECONDS

    # -- cull one id --------------------------------------------------------------------------
    async def cull(self, blob_id: str) -> None:
        """Remove the cache of `blob_id` (a blob id, or an fsid for its bootstrap object)
        wherever nothing uses it. CullBusy when some of it is in use (what could go went),
        CullNotFound when there is nothing to remove, InvalidBlobId, CullFailed."""
        blob_id = check_blob_id(blob_id)
        if self.frontend is None:
            raise CullFailed(errno.EAGAIN, "the daemon is not serving the kernel yet: try again")
        async with self.lock:
            removed = await self.frontend.culler.cull(blob_id)
        log.info("culled %s: %s", blob_id, ", ".join(removed))

    # -- the budget ---------------------------------------------------------------------------
    def budget_wanted(self) -> bool:
        config = self.config
        if config.cache_budget:
            return True
        return (self.frontend is not None and self.frontend.kernel_path == "cachefiles"
                and any(v is not None for v in (config.brun, config.bcull, config.bstop)))

    async def check_budget(self) -> dict[str, Any]:
        """One budget pass (see the module's doc). Returns what it saw and did."""
        config = self.config
        cache_dir = Path(config.cache_dir)
        report: dict[str, Any] = {"budget": config.cache_budget, "culled": [], "busy": []}
        frontend = self.frontend
        if frontend is None:
            return report
        culler = frontend.culler
        async with self.lock:
            def survey() -> tuple[int, int, list[Any]]:
                space, entries = culler.survey()
                return allocated_bytes(cache_dir), space, entries

            usage, space, entries = await asyncio.to_thread(survey)
            budget = config.cache_budget
            to_free = max(usage - budget if budget else 0, space)
            report.update(usage_before=usage, to_free=to_free, usage_after=usage)
            if to_free <= 0:
                self.last = report
                return report
            for entry in entries:  # the daemon's own record of when it last let go of the blob
                entry.last_used = max(entry.last_used,
                                      self.released_wall.get(entry.key.decode("ascii", "replace"), 0.0))
            freed = 0
            for entry in sorted(entries, key=lambda e: e.last_used):
                if freed >= to_free:
                    break
                result = await culler.cull_entry(entry)
                if result == "culled":
                    freed += entry.allocated
                    report["culled"].append(str(entry.path))
                elif result == "busy":
                    report["busy"].append(str(entry.path))
            await culler.tidy()
            report["usage_after"] = await asyncio.to_thread(allocated_bytes, cache_dir)
            if report["culled"]:
                log.info("cache %s: %s over its limit: culled %d unused file(s) (%s), least recently used first",
                         cache_dir, human_bytes(to_free), len(report["culled"]), human_bytes(freed))
            if report["usage_after"] > (budget or report["usage_after"]) or (space and freed < to_free):
                log.warning("cache %s: holds %s, over its limit: everything left is in use", cache_dir,
                            human_bytes(report["usage_after"]))
            self.last = report
            return report

    def start(self, interval: float = BUDGET_INTERVAL) -> asyncio.Task[None] | None:
        """The periodic budget check, on the running loop (None when there is nothing to check)."""
        config = self.config
        if (self.frontend is not None and self.frontend.kernel_path != "cachefiles"
                and any(v is not None for v in (config.brun, config.bcull, config.bstop))):
            log.info("brun/bcull/bstop apply to the cachefiles path only: not used on %s", self.frontend.kernel_path)
        if not self.budget_wanted():
            return None
        self.task = asyncio.ensure_future(self._budget_loop(interval))
        return self.task

    async def _budget_loop(self, interval: float) -> None:
        while True:
            try:
                await self.check_budget()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a full disk must not stop the next pass
                log.exception("cache budget check failed")
            try:
                await asyncio.wait_for(self.wake.wait(), interval)
                await asyncio.sleep(UNBIND_SETTLE)
            except TimeoutError:
                pass
            self.wake.clear()

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
