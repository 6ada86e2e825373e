"""The one interface every kernel path's frontend offers (a typing.Protocol), and what the two
frontends share.

The daemon, the cache GC, the metrics, the API and the hand-over talk to a frontend only
through `Frontend`: none of them asks which kernel path it is (no isinstance, no hasattr).

    cachefiles (frontends.cachefiles): OPEN / READ / CLOSE on /dev/cachefiles, one kernel
        object per bootstrap and blob, `copen` and READ_COMPLETE answers.
    fanotify (frontends.fanotify): FAN_PRE_ACCESS events on sparse cache files marked before
        a file-backed EROFS mount opens them, FAN_ALLOW / FAN_DENY_ERRNO(EIO) answers.

Both hand ranges to the fill core (fscached.core.fill) and never learn where bytes come from.
"""
from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fetcher.source import SourceError
from fscached.config import ImageSpec
from fscached.core.catalog import BlobObject, BootstrapObject
from fscached.core.fill import Filler, FillTarget, VerifyError
from fscached.core.profile_recorder import ProfileRecorders
from fscached.core.stats import RequestStats
from fscached.util.logs import request_log


class KernelPathLost(Exception):
    """The kernel path died under the daemon (the cache device failed): nothing more can be
    served. The message is one line for the user."""


@dataclass(frozen=True)
class InFlight:
    """A kernel request being filled now (nydusd's /api/v1/metrics/inflight)."""

    inode: int  # the cache file's inode (fanotify) or the kernel object's id (cachefiles)
    request: int  # the event's fd number or the READ's msg_id
    started: float  # wall-clock seconds


@dataclass(frozen=True)
class BlobFill:
    """What a frontend holds of one blob now (for the API's and the metrics' eyes)."""

    volume: str
    blob: BlobObject
    cache_file: str  # the sparse cache file's path (fanotify) or "<volume>/<blob id>" (cachefiles)
    target: FillTarget | None  # None: no fd open for it right now (cachefiles: not opened by a mount)


# -- culling ----------------------------------------------------------------------------------
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


@dataclass
class CullOutcome:
    removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    kernel_busy: list[str] = field(default_factory=list)  # busy only in the kernel's eyes

    def raise_if_not_done(self, blob_id: str, where: str) -> None:
        if self.busy or self.kernel_busy:
            done = f"removed {', '.join(self.removed)}; " if self.removed else ""
            raise CullBusy(f"{done}in use, not removed: {'; '.join(self.busy + self.kernel_busy)}")
        if not self.removed:
            raise CullNotFound(f"no cache of {blob_id} in {where}")


@dataclass
class CullEntry:
    """One cache file or kernel object the cache GC may remove to keep under its budget."""

    volume: str
    path: Path
    key: bytes  # cookie key (cachefiles) or blob id (fanotify)
    allocated: int
    last_used: float


class Culler(Protocol):
    """How one kernel path removes cache content (fscached.cache_gc drives it)."""

    # the cache GC's record of unbinds (an object unbound moments ago may not be linked under
    # its name by the kernel yet: cachefiles waits for it)
    recently_released: Callable[[str], bool]

    async def cull(self, blob_id: str) -> list[str]:
        """Remove the cache of `blob_id` (checked: a blob id or an fsid) wherever nothing uses
        it; what was removed. CullBusy / CullNotFound / CullFailed otherwise."""
        ...

    def survey(self) -> tuple[int, list[CullEntry]]:
        """(bytes to free for free-space limits, the candidates): blocking, run in a thread."""
        ...

    async def cull_entry(self, entry: CullEntry) -> str:
        """"culled", "busy", "skip" (bound) or "gone"."""
        ...

    async def tidy(self) -> None:
        """After a budget pass: what the kernel path leaves to tidy (trash, empty volumes)."""
        ...


class Frontend(Protocol):
    """A kernel path, as the rest of the daemon sees it."""

    kernel_path: str  # "cachefiles" | "fanotify"
    # the one fd nydus-snapshotter's supervisor keeps for a successor (fscached.lifecycle.fdnames)
    handover_fd_name: str
    # closing this frontend's kernel fd makes waiting readers fail (EIO), never read holes:
    # with nobody to serve them, a stop may let its readers go (cachefiles: yes; fanotify: no)
    closing_fails_readers: bool
    stats: Counter[str]
    requests: RequestStats
    filler: Filler
    recorders: ProfileRecorders | None

    @property
    def culler(self) -> Culler:
        """How this kernel path removes cache content (fscached.cache_gc)."""

    # -- the event loop ------------------------------------------------------------------------
    def fileno(self) -> int: ...
    def on_readable(self) -> None:
        """Answer everything the kernel queued (KernelPathLost when the path died)."""
    def refresh_stats(self) -> None:
        """Bring `stats` and `requests` up to date with what was answered outside Python (the
        fanotify fast path); called before they are read."""
    def start_background(self) -> None:
        """Once the reader is armed: what runs beside the kernel's requests (orphans of a dead
        predecessor, prefetch, start-up profile replays)."""

    # -- images ------------------------------------------------------------------------------
    def mount_args(self, spec: ImageSpec) -> tuple[str, str]:
        """mount(2) source and options for the image."""
    def image_added(self, spec: ImageSpec) -> None:
        """A bind: make the image's blobs servable before anything mounts it."""
    def image_removed(self, boot: BootstrapObject, dropped: Sequence[BlobObject]) -> None:
        """An unbind: close what no image uses any more (their fetches stop)."""
    def readers_of(self, spec: ImageSpec, blobs: Sequence[BlobObject]) -> list[str]:
        """What still reads these blobs of the image through this daemon besides its own mount
        (a mount by hand, a detached mount): an unbind must not drop them. [] when nothing, or
        when this kernel path lets the image go safely (its readers get EIO)."""
    def still_ours(self, spec: ImageSpec, mountpoint: Path) -> bool:
        """At a start or a takeover: whether what is mounted at `mountpoint` is a live mount of
        this image that this daemon (the group or device it took back) serves, to be adopted."""

    # -- what a stop must know -------------------------------------------------------------
    async def readers_left(self) -> list[str]:
        """After the daemon's own unmounts: what still reads through this kernel path (mounts
        of others, detached mounts, objects the kernel keeps open), for the stop's decision."""
    def resumable(self) -> str | None:
        """None when a successor can resume from the carried fds; else why not, in one line
        (cachefiles: a kernel without `restore`)."""
    def started(self) -> None:
        """nydusd's `start` (READY -> RUNNING): a hot upgrade's new process takes over now."""
    def resume(self) -> None:
        """At a takeover (not a hot upgrade's: that waits for start): the requests the dead
        predecessor took and left come to this daemon (cachefiles: `restore`, raising
        RestoreUnsupported on a kernel without it; fanotify: its journal's orphans are answered
        once the reader is armed)."""
    def begin_hand_over(self) -> None:
        """Another process holds the kernel fd too and will serve on: from now on a request
        that cannot be answered with its data is left for it, never failed."""
    async def drain(self, timeout: float) -> None:
        """Stop prefetches; give requests in flight `timeout` s, then cancel what is left."""
    def close(self, *, let_go: bool) -> None:
        """Release the kernel path. `let_go`: nothing needs it any more (the keeper or fd store
        lets go too); otherwise what outlives the daemon keeps it for the next one."""

    # -- what the API and the metrics show -----------------------------------------------------
    def blob_fill(self, volume: str, blob: BlobObject) -> BlobFill: ...
    def open_blobs(self) -> list[BlobFill]:
        """Every blob with an fd open now."""
    def objects_open(self) -> int: ...
    def in_flight(self) -> list[InFlight]:
        """The kernel's requests being filled now, oldest first."""

    # -- what outlives the daemon (fscached.lifecycle) -----------------------------------------
    def carried_fds(self) -> dict[str, int]:
        """The kernel fds a successor needs, by fscached.lifecycle.fdnames name."""
    def pointers(self) -> Mapping[str, Any]:
        """Where this kernel path keeps what outlives a daemon (for the hand-over state)."""


# -- what both frontends share ------------------------------------------------------------------
FILL_ERRORS = (SourceError, VerifyError, OSError, ValueError)


async def fill_outcome(fill: Awaitable[None], log: logging.Logger, kind: str, req: str, name: str,
                       offset: int, length: int, *, quiet: Callable[[], bool] = lambda: False) -> bool:
    """Run one fill; True when its bytes are in place. Every failure is mapped the same way on
    both kernel paths: counted by the caller, logged here with the request's id, never raised
    (a bug included: a reader must get an answer). `quiet()`: failures are expected now (a
    hand-over leaves them to the successor): logged as such."""
    rlog = request_log(log, kind, req, name)
    try:
        await fill
        return True
    except FILL_ERRORS as exc:
        if quiet():
            rlog.warning("off=%d len=%d failed during a hand-over (%s): left to the successor", offset, length, exc)
        else:
            rlog.error("off=%d len=%d failed: %s", offset, length, exc)
    except asyncio.CancelledError:
        if not quiet():
            rlog.warning("off=%d len=%d cancelled (object closed, or shutdown)", offset, length)
    except Exception:  # a bug must still not hang the reader
        rlog.exception("off=%d len=%d: unexpected error", offset, length)
    return False


def exact_fill(recorders: ProfileRecorders | None, blob: BlobObject) -> bool:
    """While an image records this blob's reads (a start-up profile): fill only the chunks asked
    for, no read window or read-ahead, which would put neighbours where the kernel reads them
    without asking (fanotify: the page cache; cachefiles: filled blocks), unrecorded."""
    return bool(blob.recorders) and recorders is not None and recorders.recording(blob)


async def prefetch_blob(filler: Filler, recorders: ProfileRecorders | None, blob: BlobObject,
                        target: FillTarget, name: str, log: logging.Logger, *, profile_only: bool = False) -> None:
    """A blob's background fetches, once its image is served: its start-up profile's chunks
    first, then its prefetch list. Nothing while its reads are being recorded."""
    if recorders is not None and recorders.recording(blob):
        log.info("blob=%s: its reads are being recorded: no profile replay or prefetch now", name)
        return
    try:
        if blob.profile_order:
            await filler.replay(blob, target, blob.profile_order)
            log.info("profile replay blob=%s done (%d chunks)", name, len(blob.profile_order))
        if profile_only or not blob.prefetch_order:
            return
        await filler.prefetch(blob, target, blob.prefetch_order, blob.prefetch_bandwidth)
        log.info("prefetch blob=%s done (%d chunks)", name, len(blob.prefetch_order))
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("prefetch blob=%s failed", name)


def wants_background(blob: BlobObject) -> bool:
    return bool(blob.prefetch_order or blob.profile_order)
