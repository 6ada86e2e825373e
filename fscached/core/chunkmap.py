"""Where the kernel's uncompressed blob offsets live: a sorted map of one blob's chunks."""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from erofs_image.index import BlobChunks
from erofs_image.tree import ChunkRef, Image

BLOCK = 4096


def round_up(value: int, align: int = BLOCK) -> int:
    return (value + align - 1) // align * align


def round_down(value: int, align: int = BLOCK) -> int:
    return value // align * align


@dataclass(frozen=True)
class Span:
    """A block-aligned piece of a READ: covered by `chunk`, or zeros when chunk is None."""

    offset: int
    length: int
    chunk: ChunkRef | None


class ChunkMap:
    """The chunks of one blob, by uncompressed offset: from a list of ChunkRefs, or from a
    bootstrap's chunk index (`from_index`: each ChunkRef made when it is first asked for)."""

    def __init__(self, chunks: list[ChunkRef], size: int) -> None:
        self._chunks: list[ChunkRef] | None = sorted(chunks, key=lambda c: c.uncompressed_offset)
        self._index: BlobChunks | None = None
        self._starts: Sequence[int] = [c.uncompressed_offset for c in self._chunks]
        self._sizes: Sequence[int] = [c.uncompressed_size for c in self._chunks]
        self.size = size
        for before, after in zip(self._chunks, self._chunks[1:]):
            if before.uncompressed_offset + before.uncompressed_size > after.uncompressed_offset:
                raise ValueError(
                    f"chunks overlap at uncompressed offset {after.uncompressed_offset}"
                )
        if self._chunks:
            last = self._chunks[-1]
            if last.uncompressed_offset + last.uncompressed_size > size:
                raise ValueError(
                    f"chunk at {last.uncompressed_offset} ends past the blob's size {size}"
                )

    @classmethod
    def from_index(cls, index: BlobChunks, size: int) -> ChunkMap:
        """A blob's chunks from its bootstrap's chunk index (checked there: sorted, no overlap,
        none past the blob's end)."""
        chunk_map = cls.__new__(cls)
        chunk_map._chunks = None
        chunk_map._index = index
        chunk_map._starts = index.starts
        chunk_map._sizes = index.sizes
        chunk_map.size = size
        if len(index) and index.starts[-1] + index.sizes[-1] > size:
            raise ValueError(f"chunk at {index.starts[-1]} ends past the blob's size {size}")
        return chunk_map

    def __len__(self) -> int:
        return len(self._starts)

    def _at(self, i: int) -> ChunkRef:
        if self._chunks is not None:
            return self._chunks[i]
        assert self._index is not None
        return self._index.ref(i)

    @property
    def chunks(self) -> list[ChunkRef]:
        """Every chunk, in address order (an indexed map makes them all now: prefer chunks_in)."""
        if self._chunks is None:
            self._chunks = [self._at(i) for i in range(len(self))]
        return self._chunks

    def ranges(self) -> list[tuple[int, int]]:
        """(uncompressed offset, size) of every chunk, without making ChunkRefs."""
        return list(zip(self._starts, self._sizes))

    def spans(self, offset: int, length: int) -> list[Span]:
        """Cover [offset, offset+length) rounded out to blocks: whole chunks and zero gaps.

        A chunk that overlaps the range is returned whole (it is the unit of verification),
        so spans may reach outside the asked range; gaps are clipped to it.
        """
        start = round_down(offset)
        end = min(round_up(offset + length), round_up(self.size))
        spans: list[Span] = []
        pos = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        count = len(self._starts)
        while pos < end:
            chunk = self._at(i) if i < count else None
            if chunk is not None and chunk.uncompressed_offset + round_up(chunk.uncompressed_size) <= pos:
                i += 1
                continue
            if chunk is None or chunk.uncompressed_offset >= end:
                spans.append(Span(pos, end - pos, None))
                break
            if chunk.uncompressed_offset > pos:
                spans.append(Span(pos, chunk.uncompressed_offset - pos, None))
            chunk_len = round_up(chunk.uncompressed_size)
            spans.append(Span(chunk.uncompressed_offset, chunk_len, chunk))
            pos = chunk.uncompressed_offset + chunk_len
            i += 1
        return spans


    def chunks_in(self, start: int, end: int) -> list[ChunkRef]:
        """The chunks overlapping [start, end), in address order."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        found: list[ChunkRef] = []
        starts, sizes = self._starts, self._sizes
        count = len(starts)
        while i < count and starts[i] < end:
            if starts[i] + sizes[i] > start:
                found.append(self._at(i))
            i += 1
        return found


MAX_GAP = BLOCK  # stored bytes skipped inside one fetch: an uncompressed blob pads each chunk to 4 KiB


def contiguous_runs(chunks: list[ChunkRef], max_bytes: int, max_gap: int = MAX_GAP) -> list[list[ChunkRef]]:
    """Group chunks (address order) whose stored bytes follow each other, or have at most
    `max_gap` bytes between them (block padding: fetched and dropped), into runs of at most
    `max_bytes` stored bytes (a single larger chunk is a run of its own): one fetch each."""
    runs: list[list[ChunkRef]] = []
    for chunk in chunks:
        if runs:
            run = runs[-1]
            last = run[-1]
            end = last.compressed_offset + last.compressed_size
            gap = chunk.compressed_offset - end
            size = chunk.compressed_offset + chunk.compressed_size - run[0].compressed_offset
            if 0 <= gap <= max_gap and size <= max_bytes:
                run.append(chunk)
                continue
        runs.append([chunk])
    return runs


def chunks_by_blob(image: Image) -> dict[int, list[ChunkRef]]:
    """Every distinct chunk the image's files reference, grouped by blob index."""
    seen: dict[tuple[int, int], ChunkRef] = {}
    stack = [image.root]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.extend(node.children.values())
        for ref in node.chunks:
            if ref is not None:
                seen.setdefault((ref.blob_index, ref.uncompressed_offset), ref)
    grouped: dict[int, list[ChunkRef]] = {}
    for (blob_index, _), ref in seen.items():
        grouped.setdefault(blob_index, []).append(ref)
    return grouped
