from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_image.tree import ChunkRef
from fscached.core.chunkmap import BLOCK, ChunkMap, round_up


def chunk(offset: int, size: int) -> ChunkRef:
    return ChunkRef(0, offset, size, offset, size, False, b"\0" * 32)


def layout(sizes: list[int]) -> tuple[list[ChunkRef], int]:
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(chunk(pos, size))
        pos += round_up(size)
    return chunks, pos


def test_read_inside_one_chunk_returns_that_whole_chunk() -> None:
    chunks, size = layout([1 << 20, 1 << 20, 5000])
    spans = ChunkMap(chunks, size).spans((1 << 20) + 8192, 4096)
    assert [(s.offset, s.length, s.chunk) for s in spans] == [(1 << 20, 1 << 20, chunks[1])]


def test_gaps_are_zero_spans_clipped_to_the_read() -> None:
    # nydus fixture shape: 16931 bytes at 0, 13400 at 20480, blob 36864 bytes
    chunks = [chunk(0, 16931), chunk(20480, 13400)]
    spans = ChunkMap(chunks, 36864).spans(0, 36864)
    assert [(s.offset, s.length, s.chunk is None) for s in spans] == [
        (0, 20480, False), (20480, 16384, False)]
    gap = ChunkMap([chunk(8192, 4096)], 4 * BLOCK).spans(0, 4 * BLOCK)
    assert [(s.offset, s.length, s.chunk is None) for s in gap] == [
        (0, 8192, True), (8192, 4096, False), (12288, 4096, True)]


def test_overlapping_chunks_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        ChunkMap([chunk(0, 8192), chunk(4096, 4096)], 16384)
    with pytest.raises(ValueError, match="past the blob"):
        ChunkMap([chunk(0, 8193)], 8192)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40000), min_size=0, max_size=12),
    start=st.integers(0, 600000),
    length=st.integers(1, 200000),
)
def test_spans_cover_the_read_exactly_once(sizes: list[int], start: int, length: int) -> None:
    chunks, size = layout(sizes)
    size = max(size, BLOCK)
    start = start % size
    spans = ChunkMap(chunks, size).spans(start, length)
    covered: list[tuple[int, int]] = sorted((s.offset, s.offset + s.length) for s in spans)
    # no overlaps, block aligned, contiguous
    for (_, a1), (b0, _) in itertools.pairwise(covered):
        assert a1 == b0
    for a, b in covered:
        assert a % BLOCK == 0 and b % BLOCK == 0
    want_start = start // BLOCK * BLOCK
    want_end = min(round_up(start + length), round_up(size))
    assert covered[0][0] <= want_start and covered[-1][1] >= want_end
    assert covered[-1][1] <= round_up(size)
