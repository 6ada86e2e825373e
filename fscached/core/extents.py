"""What a cache file already holds: its data extents (SEEK_DATA / SEEK_HOLE), walked once.

Both frontends ask it: cachefiles at an object's OPEN (whole blocks of data are what a daemon
wrote, always verified first, as nydusd derives it), fanotify after a restart (only chunks
with data are worth reading back to check against their digests: holes read as zeros).
"""
from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Sequence

from erofs_image.tree import ChunkRef
from fscached.core.chunkmap import round_up


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of every stretch of data in the first `size` bytes of the file, in order."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes from here to the end of the file
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        pos = end
    return extents


def chunks_with_data(fd: int, size: int, chunks: Sequence[ChunkRef], *, whole: bool) -> list[ChunkRef]:
    """The chunks whose bytes lie in data extents: every block of them (`whole`, up to the
    block-rounded end of the file), or at least one byte of them."""
    extents = data_extents(fd, size)
    if not extents:
        return []
    starts = [start for start, _ in extents]
    found = []
    for chunk in chunks:
        begin = chunk.uncompressed_offset
        finish = begin + (round_up(chunk.uncompressed_size) if whole else chunk.uncompressed_size)
        i = bisect.bisect_right(starts, begin) - 1
        if whole:
            if i >= 0 and extents[i][1] >= min(finish, round_up(size)):
                found.append(chunk)
        else:
            j = bisect.bisect_left(starts, finish) - 1  # the last extent starting before the chunk ends
            if j >= 0 and extents[j][1] > begin:
                found.append(chunk)
    return found
