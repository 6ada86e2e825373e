"""The fill core's read-ahead (fscached.core.fill.Filler._read_ahead): it ramps up like the kernel's,
starts over after a jump, takes a READ inside the read-ahead region as the same reader, and
stays off while a start-up profile replays on the blob (the profile names what start-up reads)."""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.core.catalog import BlobObject
from fscached.core.chunkmap import ChunkMap, chunks_by_blob
from fscached.core.fill import READAHEAD_BYTES, READAHEAD_MIN, Filler, FillTarget

CHUNK = 64 << 10
MiB = 1 << 20


class Recorder(Filler):
    """A Filler whose fetches are only written down: (first offset, end) per read-ahead."""

    def __init__(self) -> None:
        super().__init__(executor=None, stats=Counter(), window=CHUNK)  # type: ignore[arg-type]
        self.started: list[tuple[int, int]] = []

    def _start_jobs(self, obj, target, chunks, kind, max_run):  # type: ignore[no-untyped-def, override]
        if chunks:
            self.started.append((chunks[0].uncompressed_offset,
                                 chunks[-1].uncompressed_offset + chunks[-1].uncompressed_size))
        return {}


def blob(tmp_path: Path, size: int) -> BlobObject:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(size))
    convert(tree, tmp_path / "img", compressor="none", chunk_size=CHUNK)
    bs = Bootstrap.open(tmp_path / "img" / "image.boot")
    info = bs.blobs[0]
    return BlobObject(info, ChunkMap(chunks_by_blob(bs.image)[0], info.uncompressed_size), None, bs)  # type: ignore[arg-type]


def read(filler: Recorder, obj: BlobObject, target: FillTarget, offset: int) -> None:
    """What fill_blob does for a READ of one window at `offset`, minus the fetch itself."""
    filler._read_ahead(obj, target, offset, offset + CHUNK)
    target.sequential_end = offset + CHUNK


def test_read_ahead_ramps_up_and_starts_over_after_a_jump(tmp_path: Path) -> None:
    obj = blob(tmp_path, 192 * MiB)
    filler, target = Recorder(), FillTarget(-1, contextlib.nullcontext)
    read(filler, obj, target, 0)
    assert filler.started == []  # one READ is not a sequential reader yet
    offset = CHUNK
    sizes = []
    while offset < 160 * MiB:
        before = len(filler.started)
        read(filler, obj, target, offset)
        if len(filler.started) > before:
            sizes.append(target.ahead_size)
        offset += CHUNK
    ramp = [READAHEAD_MIN]
    while ramp[-1] < READAHEAD_BYTES:
        ramp.append(min(2 * ramp[-1], READAHEAD_BYTES))
    assert sizes[:len(ramp)] == ramp
    assert max(sizes) == READAHEAD_BYTES  # never past the cap
    # contiguous: each read-ahead starts where the one before ended
    assert all(b[0] == a[1] for a, b in zip(filler.started[1:], filler.started[2:]))
    # a READ further on but inside what was fetched ahead: the same reader
    read(filler, obj, target, target.ahead_end - CHUNK)
    assert target.ahead_size == READAHEAD_BYTES
    # a jump back, then a sequential reader there: small again, from there
    read(filler, obj, target, 4 * MiB)
    assert target.ahead_size == 0
    before = len(filler.started)
    read(filler, obj, target, 4 * MiB + CHUNK)
    assert len(filler.started) == before + 1 and target.ahead_size == READAHEAD_MIN
    assert filler.started[-1] == (4 * MiB + 2 * CHUNK, 4 * MiB + 2 * CHUNK + READAHEAD_MIN)


def test_a_read_inside_the_read_ahead_region_is_the_same_reader(tmp_path: Path) -> None:
    # the pages fetched ahead may raise no READ of their own: the reader shows up further on
    obj = blob(tmp_path, 16 * MiB)
    filler, target = Recorder(), FillTarget(-1, contextlib.nullcontext)
    read(filler, obj, target, 0)
    read(filler, obj, target, CHUNK)  # sequential: read-ahead up to CHUNK*2 + 2 MiB
    assert target.ahead_size == READAHEAD_MIN
    read(filler, obj, target, 2 * CHUNK + READAHEAD_MIN - CHUNK)  # the last window of the region
    assert target.ahead_size == 2 * READAHEAD_MIN, filler.started  # went on, and ramped


def test_small_reads_within_one_window_keep_the_reader(tmp_path: Path) -> None:
    obj = blob(tmp_path, 16 * MiB)
    filler, target = Recorder(), FillTarget(-1, contextlib.nullcontext)
    for offset in range(0, 6 * CHUNK, 16 << 10):  # 16 KiB reads: four per window
        filler._read_ahead(obj, target, offset - offset % CHUNK, offset - offset % CHUNK + CHUNK)
        target.sequential_end = offset - offset % CHUNK + CHUNK
    assert len(filler.started) == 1 and target.ahead_size == READAHEAD_MIN, filler.started
    assert filler.started[0] == (2 * CHUNK, 2 * CHUNK + READAHEAD_MIN)


def test_no_read_ahead_while_a_profile_replays(tmp_path: Path) -> None:
    obj = blob(tmp_path, 16 * MiB)
    filler, target = Recorder(), FillTarget(-1, contextlib.nullcontext)
    target.replaying = 1
    for n in range(8):
        read(filler, obj, target, n * CHUNK)
    assert filler.started == [] and filler.stats["readahead_windows"] == 0
    target.replaying = 0  # the replay is over: a sequential reader gets read-ahead again
    read(filler, obj, target, 8 * CHUNK)
    assert filler.started and filler.stats["readahead_windows"] == 1


class FillingRecorder(Recorder):
    """A Recorder whose fetches succeed at once: fill_blob runs whole, and filled chunks are
    no longer asked for (the kernel sends no event for them)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def _start_jobs(self, obj, target, chunks, kind, max_run):  # type: ignore[no-untyped-def, override]
        super()._start_jobs(obj, target, chunks, kind, max_run)
        target.mark_written(chunks)
        return {}


def test_a_window_smaller_than_a_chunk_still_sees_a_sequential_reader(tmp_path: Path) -> None:
    """A read window shrunk below the chunk size (a slow link) covers the READ's chunks whole:
    the next miss starts where that chunk ended, so a sequential reader gets its read-ahead (it
    had none: every GET of a cold 256 MiB read from a registry was one 1 MiB chunk)."""
    import asyncio

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(32 * MiB))
    convert(tree, tmp_path / "img", compressor="none", chunk_size=4 * CHUNK)
    bs = Bootstrap.open(tmp_path / "img" / "image.boot")
    info = bs.blobs[0]
    obj = BlobObject(info, ChunkMap(chunks_by_blob(bs.image)[0], info.uncompressed_size), None, bs)  # type: ignore[arg-type]
    filler, target = FillingRecorder(window=CHUNK), FillTarget(-1, contextlib.nullcontext)
    filler.read_window = lambda _obj: CHUNK  # type: ignore[method-assign]  # the window a slow link gets

    async def sequential_reader() -> int:
        misses = 0
        for offset in range(0, 8 * MiB, CHUNK):
            if not filler.is_filled(obj, target, offset, CHUNK):
                misses += 1
                await filler.fill_blob(obj, target, offset, CHUNK)
        return misses

    misses = asyncio.run(sequential_reader())
    assert filler.stats["readahead_windows"] > 0 and target.ahead_size > 0
    assert misses < 8 * MiB // (4 * CHUNK)  # the read-ahead filled chunks before the reader asked
