"""Thin typed wrappers over the C helpers in fscached_native.c (built with cffi).

Every C call runs with the GIL released (cffi API mode does that for each call), so a
thread writing a large range into an anon fd does not stall the event loop.  Errors come
back from C as -errno and are raised here as OSError with that errno.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

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
    "PAGE_SIZE",
    "AlignedBuffer",
    "copy_range",
    "copy_ranges",
    "fanotify_init",
    "fanotify_mark",
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
