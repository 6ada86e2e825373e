"""Thin typed wrappers over the C helpers in fscached_native.c (built with cffi).

Every C call runs with the GIL released (cffi API mode does that for each call), so a
thread writing a large range into an anon fd does not stall the event loop.  Errors come
back from C as -errno and are raised here as OSError with that errno.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

try:
    from native._fscached_native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fscached native extension not built: run `pip install -e .` (needs gcc and Python headers)"
    ) from exc

PAGE_SIZE = 4096
BLOCK_SIZE = 4096
CACHEFILES_IOC_READ_COMPLETE = 0x40049801

__all__ = [
    "BLOCK_SIZE",
    "CACHEFILES_IOC_READ_COMPLETE",
    "FILL_COMPRESSORS",
    "PAGE_SIZE",
    "AlignedBuffer",
    "ChunkIndex",
    "FanEvent",
    "FanFastPath",
    "FanStats",
    "FillResult",
    "MappedRange",
    "blake3",
    "chunk_index",
    "copy_range",
    "copy_ranges",
    "fanotify_init",
    "fanotify_mark",
    "fill_run",
    "fs_type",
    "mount",
    "pwrite_full",
    "read_complete",
    "umount",
    "write_aligned",
]


def _raise(neg_errno: int, what: str) -> None:
    err = -neg_errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _round_up(n: int) -> int:
    return (n + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE


class AlignedBuffer:
    """A page-aligned, zero-initialised C buffer (posix_memalign), freed by the GC.

    `size` is the usable length; the allocation is rounded up to whole 4 KiB blocks so
    a tail can be padded in place (`capacity`).  Suitable for O_DIRECT writes.
    """

    __slots__ = ("_ptr", "_view", "capacity", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"negative buffer size {size}")
        self.size = size
        self.capacity = max(_round_up(size), BLOCK_SIZE)
        ptr = lib.fsc_aligned_alloc(self.capacity)
        if ptr == ffi.NULL:
            raise MemoryError(f"posix_memalign of {self.capacity} bytes failed")
        self._ptr = ffi.gc(ptr, lib.fsc_aligned_free, size=self.capacity)
        self._view = memoryview(ffi.buffer(self._ptr, self.capacity))

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._ptr))

    @property
    def cdata(self) -> Any:
        return self._ptr

    def view(self) -> memoryview:
        """Writable memoryview over the first `size` bytes."""
        return self._view[: self.size]

    def full_view(self) -> memoryview:
        """Writable memoryview over the whole `capacity`."""
        return self._view

    def __len__(self) -> int:
        return self.size

    def write(self, data: bytes | bytearray | memoryview, at: int = 0) -> None:
        end = at + len(data)
        if at < 0 or end > self.capacity:
            raise ValueError(f"write of {len(data)} bytes at {at} outside buffer of {self.capacity}")
        self._view[at:end] = data

    def zero(self, start: int = 0, end: int | None = None) -> None:
        end = self.capacity if end is None else end
        if not 0 <= start <= end <= self.capacity:
            raise ValueError(f"zero range {start}..{end} outside buffer of {self.capacity}")
        self._view[start:end] = bytes(end - start)

    def __bytes__(self) -> bytes:
        return bytes(self.view())


def _c_buffer(buf: AlignedBuffer | bytes | bytearray | memoryview, length: int) -> Any:
    if isinstance(buf, AlignedBuffer):
        if length > buf.capacity:
            raise ValueError(f"length {length} exceeds buffer capacity {buf.capacity}")
        return buf.cdata
    cbuf = ffi.from_buffer(buf)
    if length > len(cbuf):
        raise ValueError(f"length {length} exceeds buffer of {len(cbuf)} bytes")
    return cbuf


def pwrite_full(fd: int, buf: AlignedBuffer | bytes | bytearray | memoryview, length: int,
                offset: int) -> int:
    """pwrite `length` bytes of `buf` at `offset`, looping on short writes; returns length."""
    if length < 0 or offset < 0:
        raise ValueError(f"negative length/offset {length}/{offset}")
    r = lib.fsc_pwrite_full(fd, _c_buffer(buf, length), length, offset)
    if r < 0:
        _raise(r, f"pwrite fd {fd} at {offset}+{length}")
    return int(r)


def write_aligned(fd: int, buf: AlignedBuffer, offset: int, length: int) -> int:
    """pwrite whole 4 KiB blocks from a page-aligned buffer (what an anon fd accepts)."""
    if not isinstance(buf, AlignedBuffer):
        raise TypeError("write_aligned needs an AlignedBuffer (O_DIRECT refuses unaligned memory)")
    if offset % BLOCK_SIZE or length % BLOCK_SIZE:
        raise ValueError(f"write at {offset}+{length} is not in whole {BLOCK_SIZE}-byte blocks")
    return pwrite_full(fd, buf, length, offset)


def read_complete(anon_fd: int, msg_id: int) -> None:
    """ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)."""
    if not 0 <= msg_id <= 0xFFFFFFFF:
        raise ValueError(f"msg_id {msg_id} out of u32 range")
    r = lib.fsc_read_complete(anon_fd, msg_id)
    if r < 0:
        _raise(r, f"READ_COMPLETE ioctl on fd {anon_fd} for msg {msg_id}")


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> int:
    """Copy `length` bytes from src_fd@src_off to dst_fd@dst_off in whole 4 KiB blocks.

    dst_off must be block aligned; the last block is zero padded.  Returns the number of
    bytes written (length rounded up to 4 KiB).  ENODATA when the source ends early.
    """
    if min(src_off, dst_off, length) < 0:
        raise ValueError("negative offset or length")
    r = lib.fsc_copy_range(src_fd, src_off, dst_fd, dst_off, length)
    if r < 0:
        _raise(r, f"copy fd {src_fd}@{src_off} -> fd {dst_fd}@{dst_off} len {length}")
    return int(r)


def copy_ranges(src_fd: int, dst_fd: int, ranges: Iterable[tuple[int, int, int]]) -> int:
    """Batched copy_range: `ranges` of (src_off, dst_off, length), one C call.

    On failure the OSError carries `ranges_done` (how many ranges were fully written).
    """
    items = list(ranges)
    if not items:
        return 0
    arr = ffi.new("struct fsc_range[]", len(items))
    for i, (s, d, n) in enumerate(items):
        if min(s, d, n) < 0:
            raise ValueError(f"negative offset or length in range {i}")
        arr[i].src_off, arr[i].dst_off, arr[i].len = s, d, n
    done = ffi.new("size_t *")
    r = lib.fsc_copy_ranges(src_fd, dst_fd, arr, len(items), done)
    if r < 0:
        err = -r
        exc = OSError(err, f"copy fd {src_fd} -> fd {dst_fd}, range {done[0]} of {len(items)}: "
                           f"{os.strerror(err)}")
        exc.ranges_done = int(done[0])  # type: ignore[attr-defined]
        raise exc
    return int(r)


def fs_type(path: str | os.PathLike[str]) -> int:
    """statfs(path).f_type (e.g. 0x01021994 for tmpfs)."""
    r = lib.fsc_fs_type(os.fsencode(path))
    if r < 0:
        _raise(r, f"statfs {os.fspath(path)}")
    return int(r)


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2): the new group's fd."""
    r = lib.fsc_fanotify_init(flags, event_f_flags)
    if r < 0:
        _raise(r, "fanotify_init")
    return int(r)


def fanotify_mark(group_fd: int, flags: int, mask: int, path: str | os.PathLike[str]) -> None:
    """fanotify_mark(2) on `path` (relative paths are taken from the working directory)."""
    r = lib.fsc_fanotify_mark(group_fd, flags, mask, -100, os.fsencode(path))  # AT_FDCWD
    if r < 0:
        _raise(r, f"fanotify_mark {os.fspath(path)}")


def mount(source: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str, flags: int,
          data: str) -> None:
    """mount(2), the GIL released (an on-demand mount waits for the daemon's own answers)."""
    r = lib.fsc_mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode())
    if r < 0:
        _raise(r, f"mount {os.fspath(source)} on {os.fspath(target)}")


def umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    r = lib.fsc_umount(os.fsencode(target), flags)
    if r < 0:
        _raise(r, f"umount {os.fspath(target)}")


# -- the fanotify fast path (fanotify_fast.c) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FanEvent:
    """An event the fast path left to Python (a miss, an unknown file, an overflow, a blob whose
    reads are recorded). `known`: a file the fast path knows, journaled already; `stat_ok`:
    dev and ino were read from the event's fd."""

    fd: int
    mask: int
    pid: int
    offset: int
    count: int
    dev: int
    ino: int
    known: bool
    stat_ok: bool


class FanStats(NamedTuple):
    """What the fast path answered, cumulative: events, bytes, seconds (summed per event, from
    the read of its batch to its answer), latency counts per bucket (the buckets given at
    creation, then one for everything above), size counts (4 KiB << n, n = 0..8, then more),
    read(2) batches, answers the kernel refused, and the thread's error (-errno, 0)."""

    events: int
    bytes: int
    seconds: float
    latency: list[int]
    sizes: list[int]
    batches: int
    answer_errors: int
    error: int


class FanFastPath:
    """The C fast path of one fanotify group: a thread of its own reads the events and answers
    those whose range already holds verified bytes; the rest wait in `take()` for Python, which
    `notify_fd` (an eventfd) wakes. Blobs are added by (dev, ino, size), their chunk blocks
    marked as needing a fill, then as filled once their verified bytes are written; a blob
    answers on the fast path only while `set_fast(id, True)`."""

    TAKE_MAX = 4096

    def __init__(self, group_fd: int, journal: Any, journal_slots: int, buckets: Sequence[float]) -> None:
        # the journal: a writable buffer (the journal's mmap) of journal_slots 40-byte slots
        self._journal = (ffi.from_buffer("char[]", journal, require_writable=True)
                         if journal is not None else ffi.NULL)
        self._buckets = ffi.new("double[]", list(buckets))
        self._nbuckets = len(buckets)
        ptr = lib.fsc_fan_new(group_fd, self._journal, journal_slots if journal is not None else 0,
                              self._buckets, len(buckets))
        if ptr == ffi.NULL:
            raise OSError(12, "fanotify fast path: out of memory or eventfd failed")
        self._fan: Any = ptr
        self._out = ffi.new("struct fsc_fan_event[]", self.TAKE_MAX)
        self._stats = ffi.new("struct fsc_fan_stats *")
        self.started = False

    @property
    def notify_fd(self) -> int:
        return int(lib.fsc_fan_notify_fd(self._fan))

    def add_blob(self, dev: int, ino: int, size: int) -> int:
        r = lib.fsc_fan_add_blob(self._fan, dev, ino, size)
        if r < 0:
            _raise(r, "fanotify fast path: adding a blob")
        return int(r)

    def remove_blob(self, blob_id: int) -> None:
        lib.fsc_fan_remove_blob(self._fan, blob_id)

    def set_fast(self, blob_id: int, on: bool) -> None:
        lib.fsc_fan_set_fast(self._fan, blob_id, 1 if on else 0)

    def set_ranges(self, blob_id: int, ranges: Sequence[tuple[int, int]], filled: bool) -> None:
        """Mark (offset, length) ranges of the blob: filled (verified bytes written, or nothing
        to fill) or needing a fill."""
        if not ranges:
            return
        offsets = ffi.new("uint64_t[]", [r[0] for r in ranges])
        lengths = ffi.new("uint64_t[]", [r[1] for r in ranges])
        r = lib.fsc_fan_set_ranges(self._fan, blob_id, offsets, lengths, len(ranges), 1 if filled else 0)
        if r < 0:
            _raise(r, "fanotify fast path: marking ranges")

    def start(self) -> None:
        r = lib.fsc_fan_start(self._fan)
        if r < 0:
            _raise(r, "fanotify fast path: starting its thread")
        self.started = True

    def stop(self) -> None:
        """Stop the thread (after its current batch): events it took are answered or queued."""
        lib.fsc_fan_stop(self._fan)
        self.started = False

    def take(self) -> list[FanEvent]:
        n = lib.fsc_fan_take(self._fan, self._out, self.TAKE_MAX)
        out: Any = self._out
        return [FanEvent(int(e.fd), int(e.mask), int(e.pid), int(e.offset), int(e.count), int(e.dev), int(e.ino),
                         bool(e.known), bool(e.stat_ok)) for e in (out[i] for i in range(n))]

    def stats(self) -> FanStats:
        st: Any = self._stats
        err = lib.fsc_fan_get_stats(self._fan, st)
        return FanStats(int(st.events), int(st.bytes), float(st.seconds),
                        [int(st.latency[i]) for i in range(self._nbuckets + 1)],
                        [int(st.sizes[i]) for i in range(10)], int(st.batches), int(st.answer_errors), int(err))

    def close(self) -> None:
        """Stop the thread and free everything; the journal buffer is let go (it can be closed)."""
        if self._fan is not None:
            lib.fsc_fan_free(self._fan)
            self._fan = None
        if self._journal != ffi.NULL:
            ffi.release(self._journal)
            self._journal = ffi.NULL


# -- one run of chunks: read / decompress / verify / write, without the GIL (fill.c) ---------------
FILL_COMPRESSORS = {"none": 0, "lz4_block": 1, "zstd": 3}  # what fill_run decodes (not gzip)


class FillResult(NamedTuple):
    """fill_run's outcome: `error` 0 and `written` bytes, or -errno and the index of the chunk
    that failed (-EBADMSG: its bytes do not decode, or do not match their size or digest;
    another errno: reading the source or writing the cache). On an error nothing of a chunk
    at or after `failed` was written, and on a bad chunk nothing at all."""

    error: int
    written: int
    failed: int


def blake3(data: bytes | bytearray | memoryview) -> bytes:
    """The blake3 digest (32 bytes) of `data`, by the C implementation the fill uses."""
    out = ffi.new("uint8_t[32]")
    lib.fsc_blake3(ffi.from_buffer(data), len(data), out)
    return bytes(ffi.buffer(out, 32))


SRC_DIRECT = 0x40000000  # fsc_fill_run: the source fd was opened O_DIRECT


def fill_run(chunks: Sequence[tuple[int, int, int, int, bool, bytes]], compressor: str, dst_fd: int, *,
             src_fd: int = -1, src: bytes | bytearray | memoryview | None = None, src_base: int = 0,
             src_len: int = 0, src_direct: bool = False, direct: bool = False, dst_size: int = 0) -> FillResult:
    """Fill one run in one C call with the GIL released: the stored bytes come from `src_fd`
    (pread at `src_base`, `src_len` bytes; `src_direct`: an O_DIRECT fd, read in whole blocks
    into an aligned buffer, the page cache left alone) or from `src` (the run's bytes, received); each chunk
    is (offset in those bytes, offset in the cache file, stored size, size, compressed, blake3
    digest). Every chunk is decoded and checked before the first byte is written, each padded
    with zeros to whole 4 KiB blocks, in one pwrite per stretch of adjacent chunks (`direct`:
    an O_DIRECT fd, written up to the last block of `dst_size`; else up to `dst_size`)."""
    code = FILL_COMPRESSORS.get(compressor)
    if code is None:
        raise ValueError(f"fill_run: compressor {compressor!r} is not decoded in C")
    n = len(chunks)
    arr: Any = ffi.new("struct fsc_chunk[]", max(n, 1))
    for i, (s_off, d_off, s_len, d_len, compressed, digest) in enumerate(chunks):
        c = arr[i]
        c.src_off, c.dst_off, c.src_len, c.dst_len = s_off, d_off, s_len, d_len
        c.flags = 1 if compressed else 0
        if len(digest) != 32:
            raise ValueError(f"fill_run: chunk {i} has a {len(digest)}-byte digest, not 32")
        c.digest = digest
    failed: Any = ffi.new("size_t *")
    if src is not None:
        buf: Any = ffi.from_buffer(src)
        src_len = len(src)
    else:
        buf = ffi.NULL
        if src_fd < 0:
            raise ValueError("fill_run needs src_fd or src")
        if src_direct:
            src_fd |= SRC_DIRECT
    r = lib.fsc_fill_run(src_fd, buf, src_base, src_len, code, arr, n, dst_fd, 1 if direct else 0, dst_size, failed)
    if r < 0:
        return FillResult(int(r), 0, int(failed[0]))
    return FillResult(0, int(r), n)


# -- a bootstrap's chunk table, checked and indexed (chunk_index.c) ---------------------------------
class ChunkIndex(NamedTuple):
    """The chunk table by (blob, uncompressed offset): `order` the table's entry numbers, `starts`
    and `sizes` their uncompressed offsets and sizes; blob b's chunks are positions
    blob_first[b] .. blob_first[b + 1]."""

    order: array
    starts: array
    sizes: array
    blob_first: list[int]


def chunk_index(table: bytes | memoryview, blobs: Sequence[tuple[int, int, int]]) -> ChunkIndex:
    """Check every 80-byte entry of a RAFS chunk table against its blob (uncompressed size,
    compressed size or 0, chunk size or 0) and index them; ValueError naming the first bad one
    (or two overlapping chunks)."""
    if len(table) % 80:
        raise ValueError(f"chunk table size {len(table)} is not a multiple of 80")
    n = len(table) // 80
    limits: Any = ffi.new("struct fsc_blob_limit[]", max(len(blobs), 1))
    for i, (usize, csize, chunk_size) in enumerate(blobs):
        limits[i].uncompressed_size, limits[i].compressed_size, limits[i].chunk_size = usize, csize, chunk_size
    order: Any = ffi.new("uint32_t[]", max(n, 1))
    starts: Any = ffi.new("uint64_t[]", max(n, 1))
    sizes: Any = ffi.new("uint32_t[]", max(n, 1))
    first: Any = ffi.new("uint64_t[]", len(blobs) + 1)
    err: Any = ffi.new("char[]", 512)
    kept = lib.fsc_chunk_index(ffi.from_buffer(table), n, limits, len(blobs), order, starts, sizes, first, err, 512)
    if kept < 0:
        message = ffi.string(err)
        raise ValueError(message.decode(errors="replace") if isinstance(message, bytes) else message)

    def arr(code: str, ptr: Any, size: int) -> array:
        out = array(code)
        out.frombytes(ffi.buffer(ptr, kept * size))
        return out
    return ChunkIndex(arr("I", order, 4), arr("Q", starts, 8), arr("I", sizes, 4),
                      [int(first[i]) for i in range(len(blobs) + 1)])


class MappedRange:
    """`length` bytes at `offset` of a file, mapped read-only (no fd kept: the file can be
    closed at once); `view` reads them. `drop_resident()` gives the pages back (clean file
    pages: read again from the page cache or the disk when touched). Unmapped when collected."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        start = offset - offset % PAGE_SIZE
        self._length = length + (offset - start)
        ptr = lib.fsc_map(fd, start, self._length)
        if ptr == ffi.NULL:
            raise OSError(12, f"mmap of {self._length} bytes at {start} failed")
        size = self._length

        def unmap(p: Any) -> None:
            lib.fsc_unmap(p, size)

        self._base: Any = ffi.gc(ptr, unmap)
        self.view = memoryview(ffi.buffer(ffi.cast("char *", self._base) + (offset - start), length)).toreadonly()

    def drop_resident(self) -> None:
        lib.fsc_map_drop(self._base, self._length)
