"""Turning a READ into verified bytes in the kernel's cache file.

A READ is widened to the aligned read window around it (never past the blob's end), so the
next reads find the cache filled. The chunks of that window that are neither written nor in
flight are grouped into runs whose stored bytes are contiguous, and each run is ONE ranged
fetch. Every chunk of the run is decompressed and checked against its blake3 digest from the
bootstrap before anything is written; bytes that fail go back to the source chain, which asks
the next source. A chunk already being fetched for the object is joined, not fetched again.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Any, Awaitable, Callable, ContextManager, TypeVar

import native
from erofs_image.reader import ChunkVerifyError, verify_chunk
from erofs_image.tree import BlobInfo, ChunkRef
from fetcher.source import IntegrityError
from fscached.catalog import BlobObject, BootstrapObject
from fscached.chunkmap import BLOCK, contiguous_runs, round_down, round_up

log = logging.getLogger("fscached.fill")
T = TypeVar("T")

DEFAULT_WINDOW = 1 << 20
ONDEMAND_FETCHES = 16  # ranged fetches in flight for READs: bounds memory to ~16 windows
PREFETCH_FETCHES = 2
READAHEAD_WINDOWS = 1  # windows fetched ahead of a sequential reader


class VerifyError(IntegrityError):
    """Bytes that do not match what the bootstrap records: never written."""


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


def thread_buffer(size: int) -> "native.AlignedBuffer":
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


def decode_and_write_run(fd: int, info: BlobInfo, run: list[ChunkRef], raw: bytes) -> None:
    """Verify every chunk of the run (VerifyError: nothing written), then write them all."""
    write_run(fd, info, run, decode_run(info, run, raw))


def write_zeros(fd: int, offset: int, length: int) -> None:
    buf = thread_buffer(length)
    buf.zero(0, length)
    native.write_aligned(fd, buf, offset, length)


@dataclass
class ObjectState:
    """Per kernel object (one anon fd): what was written, and jobs in flight."""

    anon_fd: int
    # keeps the anon fd open while held (the object table's `use`); yields None once removed
    hold: Callable[[], ContextManager[Any]] = nullcontext
    written: set[int] = field(default_factory=set)  # chunk uncompressed offsets
    jobs: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    prefetch: asyncio.Task[None] | None = None
    sequential_end: int = -1  # where the last READ's window ended: the next one there is sequential


class Filler:
    def __init__(self, executor: Executor, stats: Counter[str], window: int = DEFAULT_WINDOW) -> None:
        if window < BLOCK or window & (window - 1):
            raise ValueError(f"read window {window} must be a power of two >= {BLOCK}")
        self.executor = executor
        self.stats = stats
        self.window = window
        self._ondemand = asyncio.Semaphore(ONDEMAND_FETCHES)
        self._prefetch = asyncio.Semaphore(PREFETCH_FETCHES)
        self._ondemand_waiting = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in the worker pool. If the caller is cancelled, still wait for the thread:
        it may be writing into an anon fd that must not be closed under it."""
        fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    # -- the bootstrap: a local file, copied block-wise by the C core ---------------------------
    async def fill_bootstrap(self, obj: BootstrapObject, state: ObjectState, offset: int, length: int) -> None:
        start = round_down(offset)
        end = min(offset + length, obj.file_size)  # copy_range zero-pads the last block
        if end > start:
            await self.blocking(self._copy_bootstrap, obj, state.anon_fd, start, end - start)

    @staticmethod
    def _copy_bootstrap(obj: BootstrapObject, anon_fd: int, offset: int, length: int) -> None:
        with open(obj.path, "rb", buffering=0) as f:
            native.copy_range(f.fileno(), offset, anon_fd, offset, length)

    # -- data blobs -----------------------------------------------------------------------------
    async def fill_blob(self, obj: BlobObject, state: ObjectState, offset: int, length: int) -> None:
        zeros: list[Awaitable[None]] = []
        needed: list[ChunkRef] = []
        for span in obj.chunk_map.spans(offset, length):
            if span.chunk is None:
                zeros.append(self.blocking(write_zeros, state.anon_fd, span.offset, span.length))
            else:
                needed.append(span.chunk)
        await _all(zeros)
        if not needed:
            return
        window_start = round_down(offset, self.window)
        window_end = min(round_up(offset + length, self.window), obj.size)
        # the window holds the READ's own chunks too (both block aligned, within the blob)
        window = obj.chunk_map.chunks_in(window_start, window_end)
        jobs = self._start_jobs(obj, state, window, False, self.window)
        if window_start == state.sequential_end and window_end < obj.size:
            # a sequential reader: start the next window now, so fetching overlaps reading
            ahead = obj.chunk_map.chunks_in(window_end, min(window_end + READAHEAD_WINDOWS * self.window, obj.size))
            self._start_jobs(obj, state, ahead, False, self.window)
            self.stats["readahead_windows"] += 1
        state.sequential_end = window_end
        try:
            await self._await_chunks(state, needed, jobs)
        except Exception:
            # A window run fails whole (one bad chunk, one failed range): fetch just the chunks
            # this READ needs, one by one, so a good chunk is never held hostage by a bad one.
            retry = [c for c in needed if c.uncompressed_offset not in state.written]
            if not retry:
                return
            self.stats["chunk_retries"] += len(retry)
            await self._await_chunks(state, retry, self._start_jobs(obj, state, retry, False, 0))

    async def _await_chunks(self, state: ObjectState, chunks: list[ChunkRef],
                            jobs: dict[int, asyncio.Future[None]]) -> None:
        waits = []
        for chunk in chunks:
            job = jobs.get(chunk.uncompressed_offset) or state.jobs.get(chunk.uncompressed_offset)
            if job is not None and chunk.uncompressed_offset not in state.written:
                waits.append(asyncio.shield(job))
        await _all(waits)

    def _start_jobs(self, obj: BlobObject, state: ObjectState, chunks: list[ChunkRef], prefetch: bool,
                    max_run: int) -> dict[int, asyncio.Future[None]]:
        """Futures for `chunks`: joined where in flight, new runs for the rest."""
        found: dict[int, asyncio.Future[None]] = {}
        todo: list[ChunkRef] = []
        for chunk in chunks:
            key = chunk.uncompressed_offset
            if key in state.written:
                continue
            job = state.jobs.get(key)
            if job is not None:
                found[key] = job
                self.stats["joined_chunks"] += 1
            else:
                todo.append(chunk)
        for run in contiguous_runs(todo, max_run):
            job = asyncio.ensure_future(self._fetch_run(obj, state, run, prefetch))
            for chunk in run:
                state.jobs[chunk.uncompressed_offset] = job
                found[chunk.uncompressed_offset] = job
            job.add_done_callback(lambda _f, keys=[c.uncompressed_offset for c in run]: [state.jobs.pop(k, None) for k in keys])
            job.add_done_callback(_consume_exception)
        return found

    async def _fetch_run(self, obj: BlobObject, state: ObjectState, run: list[ChunkRef], prefetch: bool) -> None:
        with state.hold() as held:  # the fd stays open until this run's write is done
            if held is None:
                return  # the object was closed before the fetch began
            await self._fetch_run_held(obj, state, run, prefetch)

    async def _fetch_run_held(self, obj: BlobObject, state: ObjectState, run: list[ChunkRef], prefetch: bool) -> None:
        start = run[0].compressed_offset
        length = run[-1].compressed_offset + run[-1].compressed_size - start
        info = obj.info

        async def verify_and_write(raw: bytes) -> None:
            # one worker-thread hop: every chunk is checked before the first byte is written
            try:
                await self.blocking(decode_and_write_run, state.anon_fd, info, run, raw)
            except VerifyError:
                self.stats["verify_failures"] += 1
                raise

        if prefetch:
            await self._wait_for_idle()
            async with self._prefetch:
                await obj.source.read_verified(info.blob_id, start, length, verify_and_write, prefetch=True)
            self.stats["prefetched_chunks"] += len(run)
        else:
            self._ondemand_waiting += 1
            self._idle.clear()
            try:
                async with self._ondemand:
                    await obj.source.read_verified(info.blob_id, start, length, verify_and_write)
            finally:
                self._ondemand_waiting -= 1
                if not self._ondemand_waiting:
                    self._idle.set()
        self.stats["fetches"] += 1
        self.stats["fetched_chunks"] += len(run)
        self.stats["fetched_bytes"] += length
        state.written.update(c.uncompressed_offset for c in run)

    async def _wait_for_idle(self) -> None:
        """Prefetch yields to on-demand reads: wait until none is waiting for a fetch."""
        while not self._idle.is_set():
            await self._idle.wait()

    # -- prefetch -------------------------------------------------------------------------------
    async def prefetch(self, obj: BlobObject, state: ObjectState, order: list[ChunkRef], bandwidth: int) -> None:
        """Fetch `order` window by window in the background, at most `bandwidth` bytes/s
        (0 = unlimited), behind every on-demand read."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        fetched = 0
        for chunk in order:
            if chunk.uncompressed_offset in state.written or chunk.uncompressed_offset in state.jobs:
                continue
            window_start = round_down(chunk.uncompressed_offset, self.window)
            batch = obj.chunk_map.chunks_in(window_start, window_start + self.window)
            jobs = self._start_jobs(obj, state, batch, True, self.window)
            results = await asyncio.gather(*(asyncio.shield(j) for j in set(jobs.values())), return_exceptions=True)
            if any(isinstance(r, Exception) for r in results):
                self.stats["prefetch_failed"] += 1
            fetched += sum(c.compressed_size for c in batch)
            if bandwidth:
                ahead = fetched / bandwidth - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        self.stats["prefetch_done"] += 1


def prefetch_order(obj: BlobObject, mode: str) -> list[ChunkRef]:
    """What to prefetch for one blob: the chunks of the files in the bootstrap's prefetch
    table first, then (mode "all") every other chunk in address order."""
    index = obj.bootstrap.blobs.index(obj.info)
    by_nid: dict[int, Any] = {}
    stack = [obj.bootstrap.image.root]
    while stack:
        node = stack.pop()
        if node.nid in by_nid:
            continue
        by_nid[node.nid] = node
        stack.extend(node.children.values())
    order: dict[int, ChunkRef] = {}
    for nid in obj.bootstrap.prefetch_nids:
        node = by_nid.get(nid)
        if node is None:
            continue
        for ref in node.chunks:
            if ref is not None and ref.blob_index == index:
                order.setdefault(ref.uncompressed_offset, ref)
    if mode == "all":
        for ref in obj.chunk_map.chunks:
            order.setdefault(ref.uncompressed_offset, ref)
    return list(order.values())


async def _all(waits: list[Awaitable[None]]) -> None:
    """Await everything; then raise the first error, if any."""
    if waits:
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result


def _consume_exception(fut: asyncio.Future[None]) -> None:
    """A job's error is reported by the READs awaiting it; never 'exception never retrieved'."""
    if not fut.cancelled():
        fut.exception()
