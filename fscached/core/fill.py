"""The backend-neutral fill core: turning a kernel request into verified bytes in a cache file.

Both frontends (cachefiles READs, fanotify pre-access events) hand the core a `FillTarget`:
an fd that accepts verified bytes plus what it already holds. The core never knows which
kernel asked. `fill_blob` raises when it could not write every chunk the range needs: it
never returns without the bytes in place.

A READ is widened to the aligned read window around it (never past the blob's end), so the
next reads find the cache filled. The chunks of that window that are neither written nor in
flight are grouped into runs whose stored bytes are contiguous, and each run is ONE ranged
fetch. Every chunk of the run is decompressed and checked against its blake3 digest from the
bootstrap before anything is written; bytes that fail go back to the source chain, which asks
the next source. A chunk already being fetched for the object is joined, not fetched again.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import threading
from collections import Counter
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable, ContextManager, Sequence, TypeVar, cast

import native
from erofs_image.reader import ChunkVerifyError, digest_matches, verify_chunk
from erofs_image.tree import BlobInfo, ChunkRef
from fetcher.source import IntegrityError, LocalRange, SourceError
from fscached.core.catalog import BlobObject, BootstrapObject
from fscached.core.chunkmap import BLOCK, contiguous_runs, round_down, round_up
from fscached.core.extents import chunks_with_data

log = logging.getLogger("fscached.fill")
T = TypeVar("T")

DEFAULT_WINDOW = 1 << 20
# The read window around a miss shrinks from the configured one (the largest) to what the link
# of the source serving the blob carries in one request's fixed cost (fetcher.link), never below
# MIN_READ_WINDOW: at 100 Mbit/s the full cold-start workload fetched 28 MiB with 1 MiB windows
# and 17 MiB with 64 KiB ones, and started 26 % sooner; on fast links the 1 MiB window stays.
MIN_READ_WINDOW = 64 << 10
UNKNOWN_LINK_WINDOW = 256 << 10  # a network source before its first reads have been timed
ONDEMAND_FETCHES = 16  # ranged fetches in flight for READs: bounds memory (each at most READAHEAD_RUN)
PREFETCH_FETCHES = 2
# A start-up profile's replay (Filler.replay): consecutive profile chunks in batches of about
# PROFILE_BATCH bytes, each fetched as runs of contiguous stored bytes of up to PROFILE_RUN bytes,
# PROFILE_FETCHES requests in flight at most (its own budget, beside on-demand reads: see replay)
PROFILE_BATCH = 16 << 20
PROFILE_RUN = 8 << 20
PROFILE_FETCHES = 3
PROFILE_WAITS_FOR_IDLE = False  # True: strictly behind on-demand reads, as prefetch (measured: slower)
# A sequential reader gets bytes fetched ahead of it, in fetches of up to READAHEAD_RUN bytes,
# topped up each time half of it has been read: few, large requests (a registry costs ~2.5 ms
# per ranged GET however small) that overlap the reader's own reads. The distance ramps up like
# the kernel's own read-ahead: READAHEAD_MIN on the first sequential READ, doubled each time the
# reader goes on, up to READAHEAD_BYTES; a jump elsewhere starts over. Start-up reads many small
# files that lie side by side in a blob: a fixed 16 MiB ahead fetched 3x the working set there.
# A reader that keeps going sequentially gets ever larger requests: each read-ahead fetch is a
# quarter of the current distance (READAHEAD_RUN at most), so a long sequential read of a blob
# from a registry is a few 16 MiB GETs in flight rather than many small ones, while the first
# read-aheads, all a reader of a few files side by side gets, stay small.
READAHEAD_MIN = 2 << 20
READAHEAD_BYTES = 64 << 20
READAHEAD_RUN = 16 << 20
READ, PREFETCH, PROFILE = "read", "prefetch", "profile"  # what a fetch job is for


class VerifyError(IntegrityError):
    """Bytes that do not match what the bootstrap records: never written."""


class TargetClosed(OSError):
    """The object was closed (CLOSE, unmount, shutdown) before its bytes were written."""


def decode_chunk(info: BlobInfo, ref: ChunkRef, raw: bytes | memoryview) -> bytes:
    """Raw blob bytes of one chunk -> its verified uncompressed bytes (VerifyError otherwise)."""
    if not ref.digest:  # the daemon never writes bytes it cannot check
        raise VerifyError(f"chunk at {ref.uncompressed_offset}: the bootstrap records no digest")
    try:
        return verify_chunk(ref, info.compressor, raw, f"blob {info.blob_id}: ")
    except ChunkVerifyError as exc:
        raise VerifyError(str(exc)) from None


def decode_run(info: BlobInfo, run: list[ChunkRef], raw: bytes) -> list[bytes]:
    base = run[0].compressed_offset
    view = memoryview(raw)
    return [decode_chunk(info, ref, view[ref.compressed_offset - base:ref.compressed_offset - base + ref.compressed_size])
            for ref in run]


_buffers = threading.local()


def thread_buffer(size: int) -> native.AlignedBuffer:
    """This worker thread's reusable aligned buffer, at least `size` bytes. Reuse matters: a
    fresh buffer costs more in page faults than the copy into it."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.capacity < size:
        buf = native.AlignedBuffer(round_up(size))
        _buffers.buf = buf
    return buf


def write_run(fd: int, info: BlobInfo, run: list[ChunkRef], datas: list[bytes]) -> None:
    """Write verified chunks into the anon fd: one aligned pwrite per address-contiguous stretch."""
    start = 0
    while start < len(run):
        end = start + 1
        while end < len(run) and run[end].uncompressed_offset == run[end - 1].uncompressed_offset + round_up(len(datas[end - 1])):
            end += 1
        first = run[start].uncompressed_offset
        last = run[end - 1]
        stop = min(last.uncompressed_offset + round_up(last.uncompressed_size), info.uncompressed_size)
        buf = thread_buffer(stop - first)
        for ref, data in zip(run[start:end], datas[start:end]):
            at = ref.uncompressed_offset - first
            buf.write(data, at)
            pad_end = min(at + round_up(len(data)), stop - first)
            if pad_end > at + len(data):
                buf.zero(at + len(data), pad_end)  # the block tail: zeros, not a previous run
        native.write_aligned(fd, buf, first, stop - first)
        start = end


def write_run_buffered(fd: int, run: list[ChunkRef], datas: list[bytes]) -> None:
    """Write verified chunks through a buffered fd (a fanotify cache file): one pwritev per
    address-contiguous stretch, straight from the decoded bytes (no copy into a bounce buffer;
    block tails stay holes, which read as zeros)."""
    start = 0
    while start < len(run):
        end = start + 1
        while end < len(run) and run[end].uncompressed_offset == run[end - 1].uncompressed_offset + len(datas[end - 1]):
            end += 1
        parts = datas[start:end]
        offset = run[start].uncompressed_offset
        want = sum(len(p) for p in parts)
        done = os.pwritev(fd, parts, offset)
        if done != want:  # a regular file writes everything or fails; never trust a short write
            raise OSError(errno.EIO, f"short write at {offset}: {done} of {want} bytes")
        start = end


def decode_and_write_run(fd: int, info: BlobInfo, run: list[ChunkRef], raw: bytes | LocalRange,
                         buffered: bool = False) -> None:
    """Verify every chunk of the run (VerifyError: nothing written), then write them all. `raw`:
    the run's stored bytes, or a LocalRange of a local blob file to read them from. In C, in
    one call without the GIL (native.fill_run), for the compressors it decodes; else in Python:
    through an aligned bounce buffer for an O_DIRECT cachefiles fd, straight into a buffered one."""
    if info.compressor in native.FILL_COMPRESSORS and all(ref.digest for ref in run):
        fill_run_native(fd, info, run, raw, buffered)
        return
    if isinstance(raw, LocalRange):
        raw = read_local(raw)
    datas = decode_run(info, run, raw)
    if buffered:
        write_run_buffered(fd, run, datas)
    else:
        write_run(fd, info, run, datas)


def read_local(where: LocalRange) -> bytes:
    data = os.pread(where.fd, where.length, where.offset)
    if len(data) != where.length:
        raise SourceError(f"short read at {where.offset}: wanted {where.length} bytes, the file has {len(data)}")
    return data


def fill_run_native(fd: int, info: BlobInfo, run: list[ChunkRef], raw: bytes | LocalRange, buffered: bool) -> None:
    """decode_and_write_run in C: read (a LocalRange), decompress, check every chunk's size and
    blake3 digest, then write; a bad chunk raises VerifyError with nothing written."""
    base = run[0].compressed_offset
    chunks = [(ref.compressed_offset - base, ref.uncompressed_offset, ref.compressed_size, ref.uncompressed_size,
               ref.compressed, ref.digest) for ref in run]
    if isinstance(raw, LocalRange):
        result = native.FillResult(-errno.EINVAL, 0, len(run))
        if raw.direct_fd >= 0:
            result = native.fill_run(chunks, info.compressor, fd, src_fd=raw.direct_fd, src_base=raw.offset,
                                     src_len=raw.length, src_direct=True, direct=not buffered,
                                     dst_size=info.uncompressed_size)
        if result.error == -errno.EINVAL and result.failed == len(run):
            # no O_DIRECT fd, or its read refused (EINVAL): through the page cache
            result = native.fill_run(chunks, info.compressor, fd, src_fd=raw.fd, src_base=raw.offset,
                                     src_len=raw.length, direct=not buffered, dst_size=info.uncompressed_size)
    else:
        result = native.fill_run(chunks, info.compressor, fd, src=raw, direct=not buffered,
                                 dst_size=info.uncompressed_size)
    if not result.error:
        return
    err = -result.error
    if err == errno.ENODATA:
        raise SourceError(f"blob {info.blob_id}: the local file ends inside the run at {base}")
    if err in (errno.EBADMSG, errno.EINVAL, errno.EPROTONOSUPPORT):
        ref = run[min(result.failed, len(run) - 1)]
        raise VerifyError(f"blob {info.blob_id}: chunk {ref.index} at {ref.compressed_offset} does not decode "
                          "to its size and blake3 digest")
    raise OSError(err, f"blob {info.blob_id}: filling the run at {run[0].uncompressed_offset}: {os.strerror(err)}")


def write_zeros(fd: int, offset: int, length: int) -> None:
    buf = thread_buffer(length)
    buf.zero(0, length)
    native.write_aligned(fd, buf, offset, length)


def chunks_in_cache(fd: int, size: int, run: list[ChunkRef]) -> list[ChunkRef]:
    """The chunks of `run` whose bytes are already in the cache file behind `fd` (of `size`
    bytes) and match their digest. Holes are skipped without reading (core.extents); anything
    else is read back and hashed, so a torn or zeroed range (a crash, a power cut) never
    counts as filled."""
    return [ref for ref in chunks_with_data(fd, size, run, whole=False)
            if digest_matches(ref, os.pread(fd, ref.uncompressed_size, ref.uncompressed_offset))]


class FillTarget:
    """One blob object as the fill core sees it: an fd that accepts verified bytes (a cachefiles
    anon fd, or a non-notifying fd of a fanotify cache file), what it holds, the jobs filling it.

    `hold()` keeps the fd open across a write and yields False once the owner has released it
    (the owner's object, not an id the kernel may reuse). `close()` cancels every fetch job and
    the prefetch: nothing keeps a closed object's fd or source busy.
    """

    def __init__(self, fd: int, hold: Callable[[], ContextManager[bool]], *,
                 holes_read_as_zeros: bool = False, buffered: bool = False, reverify: bool = False) -> None:
        self.fd = fd
        self.hold = hold
        # cachefiles' anon fds are O_DIRECT: whole blocks from aligned memory; a buffered fd
        # (fanotify) takes the decoded bytes as they are
        self.buffered = buffered
        # fanotify: a hole in the cache file reads as zeros, so ranges without a chunk need no
        # write; cachefiles answers EIO for holes, so they are written as zeros.
        self.holes_read_as_zeros = holes_read_as_zeros
        # fanotify after a restart or a crash: bytes already in the file are checked against
        # their digests before anything is fetched (and only then count as filled)
        self.reverify = reverify
        self.written: set[int] = set()  # uncompressed offsets of chunks holding verified bytes
        self.jobs: dict[int, asyncio.Future[None]] = {}
        self.prefetch: asyncio.Task[None] | None = None
        self.sequential_end = -1  # where the last READ's window ended: the next one there is sequential
        self.window_start = -1  # where the last READ's window started
        # how far fetches ahead of the sequential reader reach: a READ landing between the last
        # READ's end and there (the pages before it may raise no READ of their own, being
        # filled) is the same reader going on
        self.ahead_end = 0
        self.ahead_size = 0  # the current read-ahead distance (0: none yet)
        # replays of a start-up profile running on this blob: while one runs, READs get no
        # read-ahead (the profile already names what start-up reads; guesses would only add bytes)
        self.replaying = 0
        self.closed = False
        # called once, when `written` first holds `chunk_count` chunks (the whole blob)
        self.chunk_count = 0
        self.on_complete: Callable[[], None] | None = None
        # told of every chunk once its verified bytes are in place (the fanotify fast path's map)
        self.on_written: Callable[[list[ChunkRef]], None] | None = None

    def mark_written(self, chunks: list[ChunkRef]) -> None:
        self.written.update(c.uncompressed_offset for c in chunks)
        if self.on_written is not None and chunks:
            self.on_written(chunks)
        if self.on_complete is not None and len(self.written) >= self.chunk_count:
            done, self.on_complete = self.on_complete, None
            done()

    def close(self) -> None:
        self.closed = True
        if self.prefetch is not None:
            self.prefetch.cancel()
        for job in set(self.jobs.values()):
            job.cancel()


class Filler:
    def __init__(self, executor: Executor, stats: Counter[str], window: int = DEFAULT_WINDOW) -> None:
        if window < BLOCK or window & (window - 1):
            raise ValueError(f"read window {window} must be a power of two >= {BLOCK}")
        self.executor = executor
        self.stats = stats
        self.window = window
        self._ondemand = asyncio.Semaphore(ONDEMAND_FETCHES)
        self._prefetch = asyncio.Semaphore(PREFETCH_FETCHES)
        self._profile = asyncio.Semaphore(PROFILE_FETCHES)
        self._ondemand_waiting = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._jobs: set[asyncio.Future[None]] = set()  # every fetch job, owned here until done

    @property
    def jobs_in_flight(self) -> int:
        """Fetch jobs started and not finished (read-ahead and windows go on after a READ)."""
        return len(self._jobs)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the worker pool. If the caller is cancelled, still wait for the thread:
        it may be writing into an fd that must not be closed under it."""
        fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def drain(self, timeout: float) -> None:
        """Shutdown: give fetch jobs `timeout` seconds, then cancel the rest and wait for them
        (a cancelled job still waits for its worker thread's write to finish)."""
        await settle(self._jobs, timeout)

    # -- the bootstrap: a local file, copied block-wise by the C core ---------------------------
    async def fill_bootstrap(self, obj: BootstrapObject, target: FillTarget, offset: int, length: int) -> None:
        start = round_down(offset)
        end = min(offset + length, obj.file_size)  # copy_range zero-pads the last block
        if end > start:
            with target.hold() as alive:
                if not alive:
                    raise TargetClosed(f"bootstrap {obj.fsid} was closed")
                await self.blocking(self._copy_bootstrap, obj, target.fd, start, end - start)

    @staticmethod
    def _copy_bootstrap(obj: BootstrapObject, fd: int, offset: int, length: int) -> None:
        with open(obj.path, "rb", buffering=0) as f:
            native.copy_range(f.fileno(), offset, fd, offset, length)

    # -- data blobs -----------------------------------------------------------------------------
    def is_filled(self, obj: BlobObject, target: FillTarget, offset: int, length: int) -> bool:
        """True when every chunk under the range holds verified bytes (no I/O: the fast path
        of a frontend whose kernel asks again for ranges already filled)."""
        written = target.written
        for chunk in obj.chunk_map.chunks_in(round_down(offset), offset + length):
            if chunk.uncompressed_offset not in written:
                return False
        return True

    async def fill_blob(self, obj: BlobObject, target: FillTarget, offset: int, length: int,
                        exact: bool = False) -> None:
        """Make [offset, offset+length) of the blob hold verified bytes, or raise. `exact`: only
        the chunks under the range, no read window around them and no read-ahead (a blob whose
        reads are recorded on the cachefiles path: the kernel must ask for every chunk it reads)."""
        if target.closed:
            raise TargetClosed(f"blob {obj.info.blob_id} was closed")
        zeros: list[Awaitable[None]] = []
        needed: list[ChunkRef] = []
        for span in obj.chunk_map.spans(offset, length):
            if span.chunk is not None:
                needed.append(span.chunk)
            elif not target.holes_read_as_zeros:
                zeros.append(self._write_zeros(target, span.offset, span.length))
        await _all(zeros)
        if not needed:
            return
        size = self.read_window(obj)
        # at least the READ's own chunks, whole: a window inside one chunk would end mid-chunk,
        # and the next READ of that chunk's rest would not look sequential to the read-ahead
        window_start = min(round_down(offset, size), needed[0].uncompressed_offset)
        window_end = min(max(round_up(offset + length, size),
                             needed[-1].uncompressed_offset + round_up(needed[-1].uncompressed_size)), obj.size)
        # the window holds the READ's own chunks too (both block aligned, within the blob)
        window = needed if exact else obj.chunk_map.chunks_in(window_start, window_end)
        jobs = self._start_jobs(obj, target, window, READ, self.window)
        if not exact:  # the first read-ahead shrinks with the window (a slow link: a smaller ramp start)
            self._read_ahead(obj, target, window_start, window_end, max(size, READAHEAD_MIN * size // self.window))
        target.sequential_end = window_end
        try:
            await self._await_chunks(target, needed, jobs)
        except Exception:
            # A window run fails whole (one bad chunk, one failed range): fetch just the chunks
            # this READ needs, one by one, so a good chunk is never held hostage by a bad one.
            retry = [c for c in needed if c.uncompressed_offset not in target.written]
            if retry:
                if target.closed:
                    raise
                self.stats["chunk_retries"] += len(retry)
                await self._await_chunks(target, retry, self._start_jobs(obj, target, retry, READ, 0))
        missing = [c for c in needed if c.uncompressed_offset not in target.written]
        if missing:  # e.g. a job that ended because its object closed: never report success
            raise TargetClosed(f"blob {obj.info.blob_id}: chunk at {missing[0].uncompressed_offset} was not written")

    def read_window(self, obj: BlobObject) -> int:
        """The window fetched around a miss of `obj`: the configured one, or less where the
        source's link carries less in one request's fixed cost (MIN_READ_WINDOW at least; a
        power of two; stored bytes scaled to the blob's uncompressed ones)."""
        worth = obj.source.bytes_per_request(obj.info.blob_id)
        if worth is None:
            return min(self.window, UNKNOWN_LINK_WINDOW) if obj.source.is_remote(obj.info.blob_id) else self.window
        expansion = max(1.0, obj.info.uncompressed_size / max(1, obj.info.compressed_size))
        wanted = max(MIN_READ_WINDOW, int(worth * expansion))
        return min(self.window, max(MIN_READ_WINDOW, 1 << (wanted.bit_length() - 1)))

    def _read_ahead(self, obj: BlobObject, target: FillTarget, window_start: int, window_end: int,
                    first: int = READAHEAD_MIN) -> None:
        """Start fetches ahead of a sequential reader (see READAHEAD_MIN): on its first
        sequential READ `first` bytes ahead, doubling up to READAHEAD_BYTES while it goes on."""
        if target.replaying:
            return
        if target.window_start <= window_start and window_end <= target.sequential_end:
            return  # within the last READ's window (a reader of small pieces): no news
        target.window_start = window_start
        sequential = (window_start == target.sequential_end
                      or (target.ahead_size and target.sequential_end <= window_start <= target.ahead_end))
        if not sequential:
            target.ahead_size = 0  # a jump: the next sequential READ starts small again, from there
            target.ahead_end = 0
            return
        if window_end >= obj.size:
            return
        if target.ahead_size and target.ahead_end - window_end >= target.ahead_size // 2:
            return  # more than half of the read-ahead still in front of the reader
        target.ahead_size = min(max(2 * target.ahead_size, first), READAHEAD_BYTES)
        ahead_start = max(target.ahead_end, window_end)
        ahead_end = min(window_end + target.ahead_size, obj.size)
        if ahead_end <= ahead_start:
            return
        self._start_jobs(obj, target, obj.chunk_map.chunks_in(ahead_start, ahead_end), READ,
                         max(self.window, min(READAHEAD_RUN, target.ahead_size // 4)))
        target.ahead_end = ahead_end
        self.stats["readahead_windows"] += 1  # read-ahead fetches started

    async def _write_zeros(self, target: FillTarget, offset: int, length: int) -> None:
        with target.hold() as alive:
            if not alive:
                raise TargetClosed("object closed before its zeros were written")
            await self.blocking(write_zeros, target.fd, offset, length)

    async def _await_chunks(self, target: FillTarget, chunks: list[ChunkRef],
                            jobs: dict[int, asyncio.Future[None]]) -> None:
        waits = []
        for chunk in chunks:
            job = jobs.get(chunk.uncompressed_offset) or target.jobs.get(chunk.uncompressed_offset)
            if job is not None and chunk.uncompressed_offset not in target.written:
                waits.append(asyncio.shield(job))
        await _all(waits)

    def _start_jobs(self, obj: BlobObject, target: FillTarget, chunks: list[ChunkRef], kind: str,
                    max_run: int) -> dict[int, asyncio.Future[None]]:
        """Futures for `chunks`: joined where in flight, new runs for the rest."""
        found: dict[int, asyncio.Future[None]] = {}
        todo: list[ChunkRef] = []
        for chunk in chunks:
            key = chunk.uncompressed_offset
            if key in target.written:
                continue
            job = target.jobs.get(key)
            if job is not None:
                found[key] = job
                self.stats["joined_chunks"] += 1
            else:
                todo.append(chunk)
        for run in contiguous_runs(todo, max_run):
            job = asyncio.ensure_future(self._fetch_run(obj, target, run, kind))
            keys = [c.uncompressed_offset for c in run]
            for key in keys:
                target.jobs[key] = job
                found[key] = job
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
            job.add_done_callback(functools.partial(_forget_job, target, keys))
            job.add_done_callback(_consume_exception)
        return found

    async def _fetch_run(self, obj: BlobObject, target: FillTarget, run: list[ChunkRef], kind: str) -> None:
        with target.hold() as alive:  # the fd stays open until this run's write is done
            if not alive or target.closed:
                raise TargetClosed(f"blob {obj.info.blob_id} was closed before its fetch began")
            if target.reverify:
                present = await self.blocking(chunks_in_cache, target.fd, obj.size, run)
                target.mark_written(present)
                self.stats["reverified_chunks"] += len(present)
                run = [c for c in run if c.uncompressed_offset not in target.written]
                if not run:
                    return
            await self._fetch_run_held(obj, target, run, kind)

    async def _fetch_run_held(self, obj: BlobObject, target: FillTarget, run: list[ChunkRef], kind: str) -> None:
        start = run[0].compressed_offset
        length = run[-1].compressed_offset + run[-1].compressed_size - start
        info = obj.info

        async def verify_and_write(raw: bytes | LocalRange) -> None:
            # one worker-thread hop: every chunk is checked before the first byte is written
            try:
                await self.blocking(decode_and_write_run, target.fd, info, run, raw, target.buffered)
            except VerifyError:
                self.stats["verify_failures"] += 1
                raise

        # the chain takes sync or async checks; mypy cannot pick T from an async one alone
        verify = cast(Callable[[bytes], Any], verify_and_write)
        if kind == PREFETCH:
            await self._wait_for_idle()
            async with self._prefetch:
                await obj.source.read_verified(info.blob_id, start, length, verify, prefetch=True, local=True)
            self.stats["prefetched_chunks"] += len(run)
        elif kind == PROFILE:  # beside on-demand reads, within its own budget (replay)
            if PROFILE_WAITS_FOR_IDLE:
                await self._wait_for_idle()
            async with self._profile:
                await obj.source.read_verified(info.blob_id, start, length, verify, prefetch=True, local=True)
            self.stats["profile_chunks_prefetched"] += len(run)
        else:
            self._ondemand_waiting += 1
            self._idle.clear()
            try:
                async with self._ondemand:
                    await obj.source.read_verified(info.blob_id, start, length, verify, local=True)
            finally:
                self._ondemand_waiting -= 1
                if not self._ondemand_waiting:
                    self._idle.set()
        self.stats["fetches"] += 1
        self.stats["fetched_chunks"] += len(run)
        self.stats["fetched_bytes"] += length
        target.mark_written(run)

    async def _wait_for_idle(self) -> None:
        """Prefetch yields to on-demand reads: wait until none is waiting for a fetch."""
        while not self._idle.is_set():
            await self._idle.wait()

    # -- prefetch -------------------------------------------------------------------------------
    async def prefetch(self, obj: BlobObject, target: FillTarget, order: list[ChunkRef], bandwidth: int) -> None:
        """Fetch `order` window by window in the background, at most `bandwidth` bytes/s
        (0 = unlimited), behind every on-demand read. Only bytes this prefetch asked a source
        for count against the bandwidth, not chunks already written or being fetched."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        fetched = 0
        failed_windows: set[int] = set()  # tried once: not again for each of their chunks
        for chunk in order:
            if chunk.uncompressed_offset in target.written or chunk.uncompressed_offset in target.jobs:
                continue
            window_start = round_down(chunk.uncompressed_offset, self.window)
            if window_start in failed_windows:
                continue
            batch = [c for c in obj.chunk_map.chunks_in(window_start, window_start + self.window)
                     if c.uncompressed_offset not in target.written and c.uncompressed_offset not in target.jobs]
            jobs = self._start_jobs(obj, target, batch, PREFETCH, self.window)
            results = await asyncio.gather(*(asyncio.shield(j) for j in set(jobs.values())), return_exceptions=True)
            if any(isinstance(r, Exception) for r in results):
                self.stats["prefetch_failed"] += 1
                failed_windows.add(window_start)  # on-demand READs still fetch what they need
            fetched += sum(c.compressed_size for c in batch)
            if bandwidth:
                ahead = fetched / bandwidth - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        self.stats["prefetch_done"] += 1


    async def replay(self, obj: BlobObject, target: FillTarget, order: list[ChunkRef]) -> None:
        """Fetch a start-up profile's chunks of one blob (`order`: profile order) before the
        reader asks: consecutive chunks are taken in batches of about PROFILE_BATCH bytes, and a
        batch's chunks not yet written or in flight are fetched as runs of contiguous stored bytes
        (up to PROFILE_RUN each), so a batch is a few large requests, started in the order of
        their first chunk in the profile. The next batch is started
        while the one before is still being fetched (two batches at most); PROFILE_FETCHES
        requests are in flight at most, for every replay of the daemon together.

        Unlike `prefetch`, a replay does not wait for on-demand reads to be idle: at start-up the
        reader's own reads come one after another, and these are the very ranges it is about to
        read, so waiting behind them would leave the replay behind the reader. On-demand reads
        keep their own, larger, budget (ONDEMAND_FETCHES) and join a replay's fetch of a chunk
        they need instead of fetching it again. A failed run is left to on-demand reads. While a
        replay runs, the blob's READs get no read-ahead (see FillTarget.replaying)."""
        target.replaying += 1
        try:
            await self._replay(obj, target, order)
        finally:
            target.replaying -= 1

    async def _replay(self, obj: BlobObject, target: FillTarget, order: list[ChunkRef]) -> None:
        outstanding: list[asyncio.Future[list[BaseException | None]]] = []
        i = 0
        while i < len(order):
            batch: list[ChunkRef] = []
            size = 0
            while i < len(order) and size < PROFILE_BATCH:
                chunk = order[i]
                i += 1
                if chunk.uncompressed_offset in target.written or chunk.uncompressed_offset in target.jobs:
                    continue
                batch.append(chunk)
                size += chunk.uncompressed_size
            if not batch:
                continue
            if target.closed:
                return
            # neighbours in the blob merge into one request whatever their order in the batch;
            # the requests then start in the order of their first chunk in the profile
            rank = {c.uncompressed_offset: n for n, c in enumerate(batch)}
            runs = contiguous_runs(sorted(batch, key=lambda c: (c.compressed_offset, c.uncompressed_offset)),
                                   PROFILE_RUN)
            runs.sort(key=lambda run: min(rank[c.uncompressed_offset] for c in run))
            jobs = self._start_jobs(obj, target, [c for run in runs for c in run], PROFILE, PROFILE_RUN)
            outstanding.append(asyncio.ensure_future(asyncio.gather(
                *(asyncio.shield(j) for j in set(jobs.values())), return_exceptions=True)))
            if len(outstanding) >= 2:
                self._count_failed(await outstanding.pop(0))
        for waiting in outstanding:
            self._count_failed(await waiting)

    def _count_failed(self, results: list[BaseException | None]) -> None:
        failed = sum(1 for r in results if isinstance(r, Exception))
        if failed:
            self.stats["profile_failed"] += failed


async def settle(tasks: set[asyncio.Future[None]] | set[asyncio.Task[None]], timeout: float) -> None:
    """Give `tasks` `timeout` seconds to finish, then cancel what is left and wait for it: a
    frontend's requests (each answered, with data or an error) or the filler's jobs."""
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _all(waits: Sequence[Awaitable[None]]) -> None:
    """Await everything; then raise the first error, if any."""
    if waits:
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


def _forget_job(target: FillTarget, keys: list[int], job: asyncio.Future[None]) -> None:
    for key in keys:
        if target.jobs.get(key) is job:
            del target.jobs[key]


def _consume_exception(fut: asyncio.Future[None]) -> None:
    """A job's error is reported by the READs awaiting it; never 'exception never retrieved'."""
    if not fut.cancelled():
        fut.exception()
