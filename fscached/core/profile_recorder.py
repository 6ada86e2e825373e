"""Recording start-up profiles (image key `record_profile=SECONDS`): which blob ranges an image's
start-up read, in first-read order, written as a erofs_image.profile file.

Both frontends tell the recorders about every blob range the kernel asks for (`note`): a
cachefiles READ (its offset and length), a fanotify FAN_PRE_ACCESS event (its range of the blob's
cache file). A range is recorded as the chunks under it, each chunk once, in the order they were
first read; a blob shared within a domain is recorded into every recording image that uses it.
At most erofs_image.profile.MAX_RANGES chunks are kept per image (memory stays bounded).

The clock starts when the image is mounted (the daemon's own mount, or the kernel's OPEN of the
image's bootstrap on the cachefiles path), or at its first blob read when the daemon did not see
the mount (a fanotify mount made by hand). Reads later than SECONDS after that are not recorded.
The profile is written `SECONDS` after the mount, or earlier when the image is unbound or the
daemon stops, to `<work_dir>/profiles/<fsid>.json` (atomically: a temporary file, fsync, rename;
0644 in a 0700 directory), naming the sha256 of the bootstrap file the daemon serves.

What the kernel asks for depends on what the cache already holds: record on a node whose cache
does not hold the image yet. On the cachefiles path the kernel only asks for ranges the cache
lacks; on the fanotify path a read served from the cache file's page cache raises no event (and
a complete blob loses its mark). So while one of a blob's images records, the daemon serves that
blob's reads with exactly the chunks asked for (no read window around them, no read-ahead: the
recording node pays with more, smaller requests) and starts no prefetch or profile replay for
it: every chunk start-up reads is then asked for, and recorded.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fscached.core.catalog import BlobObject
from fscached.core.chunkmap import BLOCK, round_down, round_up
from erofs_image.profile import MAX_RANGES, ProfileRange, StartupProfile, bootstrap_digest
from fscached.util.files import write_atomic

log = logging.getLogger("fscached.profile")

PROFILE_DIR = "profiles"


@dataclass
class ImageRecorder:
    """One image's recording."""

    volume: str
    fsid: str
    bootstrap: Path
    seconds: float
    image: str  # the ref, or the fsid: informative, in the file
    blobs: list[BlobObject]
    path: Path  # where the profile goes
    started: float | None = None  # time.monotonic() of the mount
    done: bool = False
    full: bool = False
    # (blob id, chunk offset) -> (chunk length, ms after the mount), in first-read order
    seen: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    writing: asyncio.Task[Path | None] | None = None

    @property
    def recording(self) -> bool:
        """Still taking reads: not finished, and within its seconds (or not started yet)."""
        return not self.done and (self.started is None or time.monotonic() - self.started <= self.seconds)

    def note(self, blob: BlobObject, offset: int, length: int, now: float) -> bool:
        """Record the chunks under [offset, offset+length) of `blob`; False once past the time."""
        if self.started is None:
            self.started = now  # the mount was not seen: the first read starts the clock
        elapsed = now - self.started
        if elapsed > self.seconds:
            return False
        if self.full:
            return True
        at_ms = int(elapsed * 1000)
        blob_id = blob.info.blob_id
        seen = self.seen
        for chunk in blob.chunk_map.chunks_in(round_down(offset), offset + length):
            key = (blob_id, chunk.uncompressed_offset)
            if key in seen:
                continue
            if len(seen) >= MAX_RANGES:
                self.full = True
                log.warning("image %s: the start-up profile holds %d chunks, the most it may: later reads are "
                            "not recorded", self.fsid, MAX_RANGES)
                break
            seen[key] = (chunk.uncompressed_size, at_ms)
        return True

    def profile(self, digest: str) -> StartupProfile:
        """The chunks as ranges, in first-read order: a chunk that starts where the range before
        it ends (past its block padding) extends that range."""
        ranges: list[ProfileRange] = []
        for (blob_id, offset), (length, at_ms) in self.seen.items():
            if ranges:
                last = ranges[-1]
                end = last.offset + last.length
                if last.blob_id == blob_id and end <= offset <= round_up(end, BLOCK):
                    ranges[-1] = ProfileRange(blob_id, last.offset, offset + length - last.offset, last.at_ms)
                    continue
            ranges.append(ProfileRange(blob_id, offset, length, at_ms))
        return StartupProfile(digest, ranges, self.seconds, self.image)


class ProfileRecorders:
    """Every recording image of the daemon; the frontends call `started` and `note`."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir / PROFILE_DIR
        self.images: dict[tuple[str, str], ImageRecorder] = {}
        self.written: dict[tuple[str, str], Path] = {}  # the profiles written (tests, logs)
        # told whenever a blob's recorders change (the fanotify fast path stops answering the
        # reads of a blob being recorded: every read of it is noted)
        self.listeners: list[Callable[[BlobObject], None]] = []

    def add(self, volume: str, fsid: str, bootstrap: Path, seconds: float, image: str,
            blobs: list[BlobObject]) -> ImageRecorder:
        rec = ImageRecorder(volume, fsid, bootstrap, seconds, image, list(blobs), self.dir / f"{fsid}.json")
        self.images[(volume, fsid)] = rec
        for blob in rec.blobs:  # a domain's shared blob: into every recording image that uses it
            blob.recorders.append(rec)
            self._changed(blob)
        log.info("image %s: recording its start-up profile for %g s after the mount, into %s",
                 fsid, seconds, rec.path)
        return rec

    def _changed(self, blob: BlobObject) -> None:
        for listener in self.listeners:
            listener(blob)

    def recording(self, blob: BlobObject) -> bool:
        """Whether some image records this blob now (cachefiles: serve it exactly, no prefetch)."""
        return any(rec.recording for rec in blob.recorders)

    def started(self, volume: str, fsid: str) -> None:
        """The image was mounted now: start its clock (the first call counts)."""
        rec = self.images.get((volume, fsid))
        if rec is None or rec.done:
            return
        if rec.started is None:
            rec.started = time.monotonic()
        self._arm(rec)

    def note(self, blob: BlobObject, offset: int, length: int) -> None:
        """A blob range the kernel asked for (the frontends' hot path: only for a blob with
        recorders)."""
        now = time.monotonic()
        for rec in blob.recorders:
            if rec.done:
                continue
            if not rec.note(blob, offset, length, now):
                self._finish_soon(rec)
            elif rec.timer is None:
                self._arm(rec)

    def _arm(self, rec: ImageRecorder) -> None:
        if rec.timer is not None or rec.started is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, rec.started + rec.seconds - time.monotonic())
        rec.timer = loop.call_later(delay, self._finish_soon, rec)

    def _finish_soon(self, rec: ImageRecorder) -> None:
        if rec.writing is None:
            rec.writing = asyncio.ensure_future(self._write(rec, "its time is up"))

    async def finish(self, volume: str, fsid: str, why: str) -> Path | None:
        """Write the image's profile now (unbind, stop) and forget the recording."""
        rec = self.images.pop((volume, fsid), None)
        if rec is None:
            return None
        if rec.writing is None:
            rec.writing = asyncio.ensure_future(self._write(rec, why))
        path = await rec.writing
        for blob in rec.blobs:
            if rec in blob.recorders:
                blob.recorders.remove(rec)
                self._changed(blob)
        return path

    async def finish_all(self, why: str) -> None:
        for volume, fsid in list(self.images):
            await self.finish(volume, fsid, why)

    async def _write(self, rec: ImageRecorder, why: str) -> Path | None:
        rec.done = True
        if rec.timer is not None:
            rec.timer.cancel()
        if rec.started is None:
            log.info("image %s: no start-up profile written (%s): it was never mounted or read", rec.fsid, why)
            return None
        try:
            digest = await asyncio.to_thread(bootstrap_digest, rec.bootstrap)
            profile = rec.profile(digest)
            await asyncio.to_thread(_write_profile, rec.path, profile.to_json())
        except OSError as exc:
            log.error("image %s: writing its start-up profile to %s failed: %s", rec.fsid, rec.path,
                      exc.strerror or exc)
            return None
        self.written[(rec.volume, rec.fsid)] = rec.path
        log.info("image %s: start-up profile written to %s (%s): %d ranges, %d chunks, %d bytes, %s",
                 rec.fsid, rec.path, why, len(profile.ranges), len(rec.seen), profile.total_bytes,
                 f"the first {rec.seconds:g} s after the mount")
        return rec.path


def _write_profile(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_atomic(path, data, mode=0o644, fsync=True)
